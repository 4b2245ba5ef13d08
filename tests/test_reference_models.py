"""The bundled reference models load with the Auto classes and pipeline(), from a directory and from the Hub,
and their processors take Fashion-MNIST's grayscale PIL images as they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from optimum_lrpqvit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist_arrays, load_image_processor

ROOT = Path(__file__).resolve().parents[1] / "reference_models"
NAMES = ["vit-fashion-mnist", "deit-fashion-mnist", "swin-fashion-mnist", "timm-vit-fashion-mnist"]


@pytest.fixture(scope="module")
def test_images():
    images, labels = load_fashion_mnist_arrays("test")
    return images[:200], torch.tensor(labels[:200])


@pytest.mark.parametrize("name", NAMES)
def test_reference_model_loads_and_classifies_grayscale_images(name, test_images):
    directory = ROOT / name
    images, labels = test_images
    assert (directory / "model.safetensors").stat().st_size <= 12 * 2**20
    assert json.loads((directory / "training_log.json").read_text())["test_top1"] >= 0.85
    model = AutoModelForImageClassification.from_pretrained(directory).eval()
    processor = load_image_processor(directory)
    gray = [Image.fromarray(image, mode="L") for image in images]
    pixel_values = processor(gray, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape[:2] == (len(gray), 3)
    if pixel_values.shape[-1] == 28:  # the same tensors the model was trained on (Swin's are resized to 32)
        expected = (torch.tensor(images).float() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        torch.testing.assert_close(pixel_values[:, 1], expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        predictions = model(pixel_values=pixel_values).logits.argmax(-1)
    assert (predictions == labels).float().mean() >= 0.8
    # transformers ≥ 5.25 reads a local timm checkpoint's processor from config.json: hand pipeline() the right one
    classify = pipeline("image-classification", model=str(directory), image_processor=processor, device="cpu")
    assert [r[0]["label"] for r in classify(gray[:4])] == [model.config.id2label[int(i)] for i in predictions[:4]]


def test_timm_reference_is_read_by_timm_and_pulled_from_the_hub_with_the_same_processor(tmp_path, local_hub):
    import timm
    from huggingface_hub import HfApi

    directory = ROOT / "timm-vit-fashion-mnist"
    config = json.loads((directory / "config.json").read_text())
    direct = timm.create_model(config["architecture"], pretrained=True, num_classes=10, **config["model_args"],
                               pretrained_cfg_overlay=dict(file=str(directory / "model.safetensors"),
                                                           num_classes=10)).eval()
    wrapped = AutoModelForImageClassification.from_pretrained(directory).eval()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(direct(x), wrapped(pixel_values=x).logits, rtol=0, atol=1e-6)

    api = HfApi(endpoint=local_hub.url, token="test-token")
    api.create_repo("tester/timm-vit")
    api.upload_folder(repo_id="tester/timm-vit", folder_path=str(directory), allow_patterns=["*.json", "*.safetensors"])
    code = ("from transformers import AutoImageProcessor as P; import numpy as np; from PIL import Image;"
            "p = P.from_pretrained('tester/timm-vit');"
            "print(type(p).__name__, tuple(p(Image.fromarray(np.zeros((28, 28), np.uint8)), return_tensors='pt')"
            "['pixel_values'].shape))")
    env = {**os.environ, "HF_ENDPOINT": local_hub.url, "HF_TOKEN": "test-token", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    local = AutoImageProcessor.from_pretrained(directory)
    assert out.stdout.split()[0] == type(local).__name__ == "ViTImageProcessor"
    assert "(1, 3, 28, 28)" in out.stdout


def test_dense_reference_model_keeps_its_stated_miou_on_the_regenerated_validation_split(tmp_path):
    from transformers import UperNetForSemanticSegmentation

    from optimum_lrpqvit.data import load_coco
    from optimum_lrpqvit.dense_evaluation import evaluate_dense

    directory = ROOT / "upernet-swin-fashion-coco"
    log = json.loads((directory / "training_log.json").read_text())
    assert (directory / "model.safetensors").stat().st_size <= 10 * 2**20
    script = Path(__file__).resolve().parents[1] / "examples" / "make_fashion_coco.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--train", "1", "--val", "500"],
                   check=True, capture_output=True, timeout=300)
    model = UperNetForSemanticSegmentation.from_pretrained(directory).eval()
    processor = load_image_processor(directory)
    metrics = evaluate_dense(model, processor, load_coco(tmp_path, "val"), batch_size=64)
    assert metrics["miou"] == pytest.approx(log["val_miou"], abs=0.01)
    segments = pipeline("image-segmentation", model=str(directory), device="cpu")(load_coco(tmp_path, "val").image(1))
    assert {s["label"] for s in segments} <= set(model.config.id2label.values())
