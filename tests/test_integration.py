"""transformers / Optimum / CLI integration: quantize at load, save, reload, pipeline, model card, push and pull."""

import json
import os
import subprocess
import sys

import models
import pytest
import requests
import torch
import yaml
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from optimum_lrpqvit import LRPQConfig, LRPQuantizer, applied_config, cli, load_quantized, quantize
from optimum_lrpqvit.architectures import transformers_class
from optimum_lrpqvit.data import load_fashion_mnist
from optimum_lrpqvit.jobs import dataset_pixel_values

LOADABLE = {"hf_vit": models.hf_vit, "hf_deit": models.hf_deit, "hf_deit_teacher": models.hf_deit_teacher,
            "hf_swin": models.hf_swin, "wrapped_timm_vit": models.wrapped_timm_vit_16,
            "wrapped_timm_swin": models.wrapped_timm_swin_16,
            **{name: models.FAMILIES[name] for name in ("hf_dinov2", "hf_vit_msn", "hf_beit", "hf_data2vec_vision",
                                                        "hf_clip_classifier", "hf_siglip_classifier", "hf_swinv2",
                                                        *models.EMBEDDERS)}}


def _config(**kwargs):
    return LRPQConfig(dataset="fashion_mnist", num_calibration_samples=8, seed=1, **kwargs)


def _gray_images(n=4):
    return [row["image"] for row in load_fashion_mnist()["test"].select(range(n))]


@pytest.fixture(scope="module", params=list(LOADABLE))
def float_dir(request, tmp_path_factory):
    return models.save_checkpoint(LOADABLE[request.param](), tmp_path_factory.mktemp(request.param) / "float")


def test_from_pretrained_quantizes_at_load_like_quantize(float_dir, tmp_path):
    config = _config(mixed_precision=True, allocation="budget", num_importance_samples=8)  # 2 blocks: no paper rule
    model_class = transformers_class(float_dir)  # Auto* for classifiers, the encoder's own class for encoders
    loaded = model_class.from_pretrained(float_dir, quantization_config=config)
    # the same job by hand: float model, the config's images through the model's processor, quantize()
    reference = model_class.from_pretrained(float_dir)
    processor = AutoImageProcessor.from_pretrained(float_dir)
    calibration, importance, _ = dataset_pixel_values(config, processor, reference)
    assert calibration.shape[0] == 8 and importance.shape[0] == 8
    quantize(reference, config, calibration, importance_data=importance)
    x = models.images(4, seed=5)
    torch.testing.assert_close(models.logits(loaded, x), models.logits(reference, x), rtol=0, atol=0)
    applied = loaded.config.quantization_config
    assert applied.bit_plan == applied_config(reference).bit_plan and applied.dataset == "fashion_mnist"

    loaded.save_pretrained(tmp_path / "q")
    reloaded = model_class.from_pretrained(tmp_path / "q")
    torch.testing.assert_close(models.logits(reloaded, x), models.logits(loaded, x), rtol=0, atol=0)


def test_quantizing_at_load_needs_a_dataset(float_dir):
    with pytest.raises(ValueError, match="dataset="):
        transformers_class(float_dir).from_pretrained(float_dir, quantization_config=LRPQConfig())


def test_pipeline_with_fresh_and_reloaded_models(tmp_path):
    float_dir = models.save_checkpoint(models.hf_vit(), tmp_path / "float")
    model = AutoModelForImageClassification.from_pretrained(float_dir, quantization_config=_config())
    processor = AutoImageProcessor.from_pretrained(float_dir)
    images = _gray_images()
    expected = model(**processor(images, return_tensors="pt")).logits.argmax(-1).tolist()
    fresh = pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    assert [model.config.label2id[p[0]["label"]] for p in fresh(images)] == expected
    model.save_pretrained(tmp_path / "q")
    processor.save_pretrained(tmp_path / "q")
    reloaded = pipeline("image-classification", model=str(tmp_path / "q"), device="cpu")
    assert [model.config.label2id[p[0]["label"]] for p in reloaded(images)] == expected


def test_optimum_quantizer_saves_model_card_and_reloads(tmp_path):
    float_dir = models.save_checkpoint(models.hf_swin(), tmp_path / "float")
    quantizer = LRPQuantizer.from_pretrained(float_dir)
    results = {"dataset": "fashion_mnist", "split": "test", "num_images": 100,
               "full_precision": {"top1": 80.0}, "quantized": {"top1": 79.0, "agreement": 95.0, "kl": 0.01}}
    model = quantizer.quantize(tmp_path / "q", config=_config(mixed_precision=True, allocation="budget"),
                               results=results, base_model="tester/swin-float")
    x = models.images(3)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "q")
    torch.testing.assert_close(models.logits(reloaded, x), models.logits(model, x), rtol=0, atol=0)
    assert (tmp_path / "q" / "importance.png").read_bytes()[:4] == b"\x89PNG"
    card = (tmp_path / "q" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "tester/swin-float" and meta["base_model_relation"] == "quantized" and meta["pipeline_tag"] == "image-classification"
    assert meta["library_name"] == "transformers" and "zalando-datasets/fashion_mnist" in meta["datasets"]
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in metrics] == [80.0, 79.0]
    plan = applied_config(model).bit_plan
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert len(rows) == len(plan) and "![importance](importance.png)" in card
    summary = applied_config(model).bit_plan_summary
    assert f"{summary['avg_w_bits']} bits on average" in card and f"{summary['size_mb']} MB" in card


def test_optimum_quantizer_on_a_raw_timm_model(tmp_path):
    float_model = models.timm_vit()  # as timm.create_model leaves it: with the pretrained_cfg of its input
    float_model.pretrained_cfg = dict(input_size=(3, models.IMAGE_SIZE, models.IMAGE_SIZE), crop_pct=1.0,
                                      crop_mode="center", interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="No image processor"):
        LRPQuantizer.from_pretrained(models.timm_vit()).quantize(tmp_path / "x", config=_config())
    quantizer = LRPQuantizer.from_pretrained(float_model)
    model = quantizer.quantize(tmp_path / "q", config=_config())
    assert (tmp_path / "q" / "README.md").exists()
    reloaded = load_quantized(tmp_path / "q", model=models.timm_vit())
    x = models.images(3)
    torch.testing.assert_close(models.logits(reloaded, x), models.logits(model, x), rtol=0, atol=0)


def _run(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=600)


def test_cli_help_lists_the_commands_also_under_optimum_cli(capsys):
    out = _run("lrpqvit", "--help")  # the console script
    assert out.returncode == 0 and all(c in out.stdout for c in ("quantize", "score", "evaluate", "push"))
    for command in ("quantize", "score", "evaluate", "push"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0 and f"usage: lrpqvit {command}" in capsys.readouterr().out
    out = _run("optimum-cli", "lrpqvit", "quantize", "--help")  # registered in optimum.commands.register
    assert out.returncode == 0 and "--mixed-precision" in out.stdout, out.stderr


def test_cli_quantize_evaluate_push_and_pull(tmp_path, local_hub, capsys):
    float_dir = models.save_checkpoint(models.hf_deit_teacher(), tmp_path / "float")
    scores = tmp_path / "scores.json"
    assert cli.main(["score", float_dir, "--num-samples", "16", "--output", str(scores)]) == 0
    q = tmp_path / "q"
    assert cli.main(["quantize", float_dir, str(q), "--importance", str(scores), "--allocation", "budget",
                     "--num-calibration-samples", "8", "--evaluate", "--num-eval-samples", "64"]) == 0
    out = capsys.readouterr().out
    assert "| full precision |" in out and "lrp mixed (budget)" in out
    results = json.loads((q / "results.json").read_text())
    config = json.loads((q / "config.json").read_text())["quantization_config"]
    # the bit plan renormalises the file's scores (I_l = C_l / Σ C): equal up to float64 rounding
    assert config["importance_scores"] == pytest.approx(json.loads(scores.read_text())["scores"], rel=1e-12, abs=0)
    assert cli.main(["evaluate", str(q), "--reference", float_dir, "--num-samples", "64",
                     "--output", str(tmp_path / "eval.json")]) == 0
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["model_results"] == pytest.approx(results["quantized"])

    hub = {"HF_ENDPOINT": local_hub.url, "HF_TOKEN": "test-token", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_CACHE": str(tmp_path / "cache")}
    out = _run("lrpqvit", "push", str(q), "tester/deit-w4a4", env=hub)
    assert out.returncode == 0, out.stderr
    card = requests.get(f"{local_hub.url}/tester/deit-w4a4/resolve/main/README.md", timeout=10).text
    assert 'model="tester/deit-w4a4"' in card
    metrics = yaml.safe_load(card.split("---")[1])["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in metrics] == [round(results["full_precision"]["top1"], 2),
                                             round(results["quantized"]["top1"], 2)]
    x = models.images(2)
    torch.save(x, tmp_path / "x.pt")
    pull = ("import sys, torch, optimum_lrpqvit; from transformers import AutoModelForImageClassification as A;"
            "m = A.from_pretrained('tester/deit-w4a4'); x = torch.load(sys.argv[1]);"
            "torch.save(m(pixel_values=x).logits, sys.argv[2])")
    out = _run(sys.executable, "-c", pull, str(tmp_path / "x.pt"), str(tmp_path / "pulled.pt"), env=hub)
    assert out.returncode == 0, out.stderr
    local = load_quantized(q)
    torch.testing.assert_close(torch.load(tmp_path / "pulled.pt"), models.logits(local, x), rtol=0, atol=0)


def test_cli_quantizes_and_evaluates_an_encoder_on_its_embeddings(tmp_path, capsys):
    float_dir = models.save_checkpoint(models.hf_clip_vision(), tmp_path / "float")
    q = tmp_path / "q"
    knn = ["--knn-samples", "128"]
    assert cli.main(["quantize", float_dir, str(q), "--mixed-precision", "--allocation", "budget",
                     "--num-calibration-samples", "8", "--evaluate", "--num-eval-samples", "64", *knn]) == 0
    out = capsys.readouterr().out
    assert "| model | k-NN top-1 (%) | cosine to FP (mean) | cosine to FP (min) |" in out
    results = json.loads((q / "results.json").read_text())
    assert 0 < results["quantized"]["cosine_min"] <= results["quantized"]["cosine"] < 1
    assert 10 < results["quantized"]["knn_top1"] <= 100  # 10 classes: above chance even with random weights
    card = (q / "README.md").read_text()
    assert "pipeline_tag: image-feature-extraction" in card and "k-NN top-1" in card
    assert cli.main(["evaluate", str(q), "--reference", float_dir, "--num-samples", "64", *knn,
                     "--output", str(tmp_path / "eval.json")]) == 0
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["model_results"] == pytest.approx(results["quantized"])
    assert evaluation["reference"]["knn_top1"] == pytest.approx(results["full_precision"]["knn_top1"])
    capsys.readouterr()
    assert cli.main(["score", float_dir, "--num-samples", "4", "--use-labels", "--output", str(tmp_path / "s")]) == 1
    assert "has no classifier" in capsys.readouterr().err and not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, message", [
    (["--dataset", "{tmp}/nowhere"], "nowhere"),
    (["--importance", "{tmp}/none.json"], "lrpqvit score"),
])
def test_cli_reports_bad_input_clearly(tmp_path, capsys, args, message):
    float_dir = models.save_checkpoint(models.hf_vit(), tmp_path / "float")
    args = [a.format(tmp=tmp_path) for a in args]
    assert cli.main(["quantize", float_dir, str(tmp_path / "q"), *args]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and message in err.split("error: ", 1)[1] and "Traceback" not in err
    assert cli.main(["push", float_dir, "tester/x"]) == 1
    assert "quantization_config" in capsys.readouterr().err


def test_push_to_hub_from_python_and_pull_by_repo_id(tmp_path, local_hub, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import HfApi

    from optimum_lrpqvit.hub import push_to_hub

    model = AutoModelForImageClassification.from_pretrained(
        models.save_checkpoint(models.hf_vit(), tmp_path / "float"), quantization_config=_config())
    hub = {"HF_ENDPOINT": local_hub.url, "HF_TOKEN": "test-token", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_CACHE": str(tmp_path / "cache")}
    code = ("import sys, torch, optimum_lrpqvit; from transformers import AutoModelForImageClassification as A;"
            "m = A.from_pretrained('tester/vit'); torch.save(m(pixel_values=torch.load(sys.argv[1])).logits, "
            "sys.argv[2])")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", local_hub.url)  # read at import time otherwise
    push_to_hub(model, "tester/vit", processor=models.processor_for(model), token="test-token")
    x = models.images(2)
    torch.save(x, tmp_path / "x.pt")
    out = _run(sys.executable, "-c", code, str(tmp_path / "x.pt"), str(tmp_path / "pulled.pt"), env=hub)
    assert out.returncode == 0, out.stderr
    torch.testing.assert_close(torch.load(tmp_path / "pulled.pt"), models.logits(model, x), rtol=0, atol=0)
    api = HfApi(endpoint=local_hub.url, token="test-token")
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(
        api.list_repo_files("tester/vit"))
    card = requests.get(f"{local_hub.url}/tester/vit/resolve/main/README.md", timeout=10).text
    assert "## Bit plan" in card and 'model="tester/vit"' in card
    assert "base_model_relation" not in card  # a model quantized from a local directory has no Hub base


def test_the_models_own_push_to_hub_gives_the_quantized_card(tmp_path, local_hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", local_hub.url)
    model = AutoModelForImageClassification.from_pretrained(
        models.save_checkpoint(models.hf_vit(), tmp_path / "float"), quantization_config=_config())
    model.save_pretrained(tmp_path / "packed")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "packed")
    for source, repo in ((model, "tester/own"), (loaded, "tester/own-reloaded")):
        source.push_to_hub(repo, token="test-token", commit_message="quantized")
        card = requests.get(f"{local_hub.url}/{repo}/resolve/main/README.md", timeout=10).text
        assert "## Bit plan" in card and f'model="{repo}"' in card and "transformers model that has been pushed" \
            not in card
    with pytest.raises(TypeError, match="create_pr"):
        model.push_to_hub("tester/own", create_pr=True)  # transformers' options are not silently dropped
