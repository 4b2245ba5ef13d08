"""Dense-prediction models (Mask2Former, UperNet, YOLOS): the backbone adapters, quantize_head, LRP targets, COCO
data and the COCO metrics. The families' shared behaviour (equivalence, round trips, conservation) is tested with
the classifiers, over models.FAMILIES."""

import copy
import json

import coco_data
import models
import numpy as np
import pytest
import torch
import transformers
from torch import nn

from optimum_lrpqvit import LRPQConfig, quantize
from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.architectures.hf_dense import pixel_class_target, query_class_target
from optimum_lrpqvit.data import coco_from_objects, load_coco, load_image_dataset
from optimum_lrpqvit.dense_evaluation import (
    coco_average_precision,
    evaluate_dense,
    label_categories,
    mean_iou,
)
from optimum_lrpqvit.lrp import compute_importance
from optimum_lrpqvit.nn import QuantLinear, is_quantized
from optimum_lrpqvit.serialization import load_quantized, save_quantized

pycocotools = pytest.importorskip("pycocotools.cocoeval")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return coco_data.write_coco(tmp_path_factory.mktemp("coco"), "val", num_images=4)


def test_query_target_sums_the_kept_queries_best_real_class():
    # 2 real classes + "no object"; image 0 keeps queries 0 and 2, image 1 keeps none: its best real logit counts
    logits = torch.tensor([[[3.0, 1.0, 0.0], [0.0, 1.0, 5.0], [0.5, 2.0, 1.0]],
                           [[0.0, 1.0, 4.0], [2.0, 0.0, 3.0], [0.0, 0.0, 9.0]]])
    torch.testing.assert_close(query_class_target(logits), torch.tensor([3.0 + 2.0, 2.0]))


def test_pixel_target_averages_the_predicted_class_logit():
    logits = torch.tensor([[[[1.0, 4.0]], [[2.0, 0.0]]]])  # (1, 2 classes, 1, 2)
    torch.testing.assert_close(pixel_class_target(logits), torch.tensor([(2.0 + 4.0) / 2]))


def test_a_convolutional_backbone_is_refused_naming_the_supported_one():
    config = transformers.UperNetConfig(backbone_config=transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3",
                                                                                        "stage4"]),
        hidden_size=16, auxiliary_channels=8, num_labels=3)
    model = transformers.UperNetForSemanticSegmentation(config).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="ResNetBackbone backbone.*SwinBackbone.*Nothing was changed"):
        quantize(model, LRPQConfig(), models.images(2))
    assert not is_quantized(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["hf_mask2former", "hf_yolos"])
def test_quantize_head_quantizes_the_heads_linears_and_round_trips(family, tmp_path):
    model = quantize(models.FAMILIES[family](), LRPQConfig(w_bits=8, a_bits=8, quantize_head=True), models.images(8))
    head = find_family(model).head_linears(model)
    assert head and all(isinstance(model.get_submodule(n), QuantLinear) for n in head)
    for module in model.modules():  # nn.MultiheadAttention reads its out_proj's weight directly: kept float
        if isinstance(module, nn.MultiheadAttention):
            assert not isinstance(module.out_proj, QuantLinear)
    plan = model.config.quantization_config.bit_plan
    assert set(head) <= set(plan)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    x = models.images(3, seed=4)
    assert torch.equal(models.logits(model, x), models.logits(loaded, x))
    assert loaded.config.quantization_config.bit_plan == plan


def test_quantize_head_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="convolutional"):
        quantize(models.hf_upernet(), LRPQConfig(quantize_head=True), models.images(2))
    with pytest.raises(ValueError, match="dense-prediction models"):
        quantize(models.hf_vit(), LRPQConfig(quantize_head=True), models.images(2))
    with pytest.raises(ValueError, match="mixed_precision"):
        LRPQConfig(quantize_head=True, mixed_precision=True)


@pytest.mark.parametrize("family", sorted(models.DENSE))
def test_dense_importance_has_no_class_targets_and_drives_mixed_precision(family):
    model = models.FAMILIES[family]()
    with pytest.raises(ValueError, match="dense target"):
        compute_importance(model, models.images(2), targets=[0, 1])
    scores = compute_importance(model, models.images(4), progress=False)
    assert set(scores) == set(find_family(model).layout(model).points())
    assert abs(sum(scores.values()) - 1) < 1e-9 and max(scores.values()) < 1
    # the tiny YOLOS has only two blocks, too few for the paper rule's first two blocks at w_bits + 1
    allocation = "budget" if family == "hf_yolos" else "paper"
    quantized = quantize(model, LRPQConfig(mixed_precision=True, allocation=allocation), models.images(8))
    bits = {b["w_bits"] for b in quantized.config.quantization_config.bit_plan.values() if b["w_bits"]}
    assert len(bits) > 1


def test_coco_directory_loads_checked_and_gives_calibration_images(coco):
    split = load_coco(coco, "val")
    assert split.image_ids == [1, 2, 3, 4] and list(split.category_names) == [10, 11, 12, 13, 14]
    assert split.image(1).size == (32, 32)
    images = load_image_dataset(str(coco), "val")
    assert len(images) == 4 and images[0]["image"].size == (32, 32)
    with pytest.raises(ValueError, match=r"no annotations/instances_train.json; its COCO splits are \['val'\]"):
        load_coco(coco, "train")


def _broken(coco, tmp_path, change):
    root = tmp_path / "broken"
    coco_data.write_coco(root, "val", num_images=2)
    path = root / "annotations" / "instances_val.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    return root


@pytest.mark.parametrize("change, message", [
    (lambda d: d["images"][0].update(file_name="missing.png"), r"image 1 names 'missing.png', which is not in"),
    (lambda d: d["images"][0].update(file_name="../../outside.png"), r"outside .*only files inside"),
    (lambda d: d["annotations"][0].update(bbox=[30, 0, 10, 5]), r"annotation 1 \(image 1\) has bbox .* outside its 32x32"),
    (lambda d: d["annotations"][0].update(category_id=99), r"annotation 1 .* category_id 99"),
    (lambda d: d["annotations"][0].update(image_id=77), r"annotation 1 \(image 77\) names an image that is not"),
    (lambda d: d.pop("categories"), r"needs the lists 'images', 'annotations' and 'categories'"),
])
def test_bad_coco_files_name_the_file_and_the_annotation(coco, tmp_path, change, message):
    root = _broken(coco, tmp_path, change)
    with pytest.raises(ValueError, match=message) as error:
        load_coco(root, "val")
    assert "instances_val.json" in str(error.value)


def test_objects_layout_rows_become_the_same_ground_truth(coco):
    split = load_coco(coco, "val")
    rows = []
    for image_id in split.image_ids:
        anns = split.coco.loadAnns(split.coco.getAnnIds(imgIds=image_id))
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        rows.append({"image_id": image_id, "image": split.image(image_id),
                     "objects": {"bbox": boxes, "category": [a["category_id"] - 10 for a in anns],
                                 "segmentation": [split.coco.annToMask(a) for a in anns]}})
    rebuilt = coco_from_objects(rows, coco_data.CATEGORIES, bbox_format="xyxy")
    for image_id in split.image_ids:
        original = split.coco.loadAnns(split.coco.getAnnIds(imgIds=image_id))
        got = rebuilt.coco.loadAnns(rebuilt.coco.getAnnIds(imgIds=image_id))
        assert [a["bbox"] for a in got] == [a["bbox"] for a in original]
        for a, b in zip(got, original):
            assert np.array_equal(rebuilt.coco.annToMask(a), split.coco.annToMask(b))


def _ground_truth_results(split, shift: float = 0.0):
    results = []
    for ann in split.coco.loadAnns(split.coco.getAnnIds()):
        x, y, w, h = ann["bbox"]
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 0.9,
                        "bbox": [x + shift, y, w, h]})
    return results


def test_average_precision_is_cocoeval_on_the_same_results(coco):
    split = load_coco(coco, "val")
    assert coco_average_precision(split, _ground_truth_results(split), "bbox") == {"AP": 100.0, "AP50": 100.0,
                                                                                   "AP75": 100.0}
    shifted = _ground_truth_results(split, shift=2.0)
    ours = coco_average_precision(split, shifted, "bbox")
    evaluator = pycocotools.COCOeval(split.coco, split.coco.loadRes(shifted), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert ours == pytest.approx({"AP": 100 * evaluator.stats[0], "AP50": 100 * evaluator.stats[1],
                                  "AP75": 100 * evaluator.stats[2]})
    assert 0 < ours["AP"] < 100
    masks = [{**r, "segmentation": split.coco.annToRLE(a)}
             for r, a in zip(_ground_truth_results(split), split.coco.loadAnns(split.coco.getAnnIds()))]
    assert coco_average_precision(split, masks, "segm")["AP"] == 100.0


def test_mean_iou_by_hand():
    prediction = np.array([[0, 0, 1, 1]])
    target = np.array([[0, 1, 1, 255]])
    # label 0: TP 1, FP 1, FN 0 → 1/2; label 1: TP 1, FP 0, FN 1 → 1/2 (the ignored pixel counts for neither)
    assert mean_iou([prediction], [target], num_labels=2) == pytest.approx(50.0)


def test_labels_map_to_categories_by_name_then_by_position():
    categories = {10: "cat", 20: "dog"}
    assert label_categories({0: "dog", 1: "cat", 2: "background"}, categories) == {0: 20, 1: 10}
    assert label_categories({0: "LABEL_0", 1: "LABEL_1"}, categories) == {0: 10, 1: 20}
    with pytest.raises(ValueError, match="match neither the names nor the number"):
        label_categories({0: "LABEL_0"}, categories)


@pytest.mark.parametrize("family", sorted(models.DENSE))
def test_evaluate_dense_gives_each_tasks_metrics_for_float_and_quantized(family, coco):
    model = models.FAMILIES[family]()
    processor = models.processor_for(model)
    split = load_coco(coco, "val")
    full = evaluate_dense(model, processor, split)
    one_image = processor(split.image(1), return_tensors="pt")["pixel_values"]  # the paper calibrates on one
    quantized = evaluate_dense(quantize(copy.deepcopy(model), LRPQConfig(w_bits=8, a_bits=8), one_image),
                               processor, split)
    expected = {"hf_mask2former": {"box", "mask"}, "hf_yolos": {"box"}, "hf_upernet": {"miou"}}[family]
    assert set(full) == expected | {"num_images"} == set(quantized) and full["num_images"] == 4
    for metrics in (full, quantized):
        values = [metrics["miou"]] if "miou" in metrics else [v for k in expected for v in metrics[k].values()]
        assert all(0 <= v <= 100 for v in values)


@pytest.mark.parametrize("family", sorted(models.DENSE))
def test_quantize_at_load_from_a_local_directory_with_a_coco_calibration_split(family, coco, tmp_path):
    model = models.FAMILIES[family]()
    directory = models.save_checkpoint(model, tmp_path / "float")
    config = LRPQConfig(w_bits=8, a_bits=8, dataset=str(coco), dataset_split="val", num_calibration_samples=1)
    model_class = type(model)
    quantized = model_class.from_pretrained(directory, quantization_config=config)
    assert is_quantized(quantized)
    # the same seeded draw of one image, preprocessed by the processor saved with the model
    image = list(load_image_dataset(str(coco), "val", num_samples=1)["image"])
    pixels = models.processor_for(model)(image, return_tensors="pt")["pixel_values"]
    reference = quantize(models.FAMILIES[family](), LRPQConfig(w_bits=8, a_bits=8), pixels)
    x = models.images(2, seed=6)
    assert torch.equal(models.logits(quantized, x), models.logits(reference, x))
    quantized.save_pretrained(tmp_path / "quantized")
    reloaded = model_class.from_pretrained(tmp_path / "quantized")
    assert torch.equal(models.logits(quantized, x), models.logits(reloaded, x))


@pytest.mark.parametrize("family, options, table", [
    ("hf_upernet", [], "| model | mIoU (%) |"),
    ("hf_mask2former", ["--quantize-head"], "| model | box AP | box AP50 | box AP75 | mask AP | mask AP50 | mask AP75 |"),
])
def test_the_command_line_quantizes_and_evaluates_on_a_coco_directory(family, options, table, coco, tmp_path, capsys):
    from optimum_lrpqvit import cli

    float_dir = models.save_checkpoint(models.FAMILIES[family](), tmp_path / "float")
    out = tmp_path / "out"
    assert cli.main(["quantize", float_dir, str(out), "--dataset", str(coco), "--split", "val", "--w-bits", "8",
                     "--a-bits", "8", "--num-calibration-samples", "1", "--evaluate", "--eval-split", "val",
                     *options]) == 0
    printed = capsys.readouterr().out
    assert table in printed and "| full precision |" in printed
    card = (out / "README.md").read_text()
    assert "## Quality" in card and table.split(" | ")[1] in card and "pipeline_tag: image-segmentation" in card
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quantize_head"] == bool(options)
    assert cli.main(["evaluate", str(out), "--dataset", str(coco), "--split", "val", "--reference", float_dir,
                     "--output", str(tmp_path / "results.json")]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_images"] == 4 and results["reference"].keys() - {"model"} == results["model_results"].keys()


@pytest.mark.parametrize("family, task", [("hf_mask2former", "image-segmentation"),
                                          ("hf_upernet", "image-segmentation"), ("hf_yolos", "object-detection")])
def test_a_saved_quantized_dense_model_runs_in_its_pipeline(family, task, coco, tmp_path):
    model = quantize(models.FAMILIES[family](), LRPQConfig(w_bits=8, a_bits=8), models.images(4))
    models.save_checkpoint(model, tmp_path)
    predictions = transformers.pipeline(task, model=str(tmp_path))(load_coco(coco, "val").image(1))
    assert isinstance(predictions, list)
    if task == "image-segmentation" and family == "hf_upernet":  # one segment per predicted class
        assert predictions and all(p["mask"].size == (32, 32) for p in predictions)


@pytest.mark.parametrize("name", sorted(models.FULL_SIZE_DENSE))
def test_full_size_dense_models_reparameterise_exactly_stay_close_at_w8a8_and_round_trip(name, tmp_path):
    from optimum_lrpqvit import quantizers_disabled
    from optimum_lrpqvit.bit_plan import BitPlan
    from optimum_lrpqvit.quantize import calibrate, prepare_model

    torch.manual_seed(0)
    model = models.FULL_SIZE_DENSE[name]()
    # maps 48×64, 24×32, 12×16, 6×8: every Swin block pads to its windows of 7
    x = torch.randn(2, 3, 192, 256, generator=torch.Generator().manual_seed(1))
    expected = models.logits(model, x)

    reparameterised = copy.deepcopy(model)
    config = LRPQConfig(post_ln="repq")
    adapter = find_family(reparameterised)
    layout = adapter.layout(reparameterised)
    assert len(layout.attentions) == 12 and not layout.linears[-1].startswith("model.transformer_module")
    prepare_model(reparameterised, adapter, layout, BitPlan.fixed(layout, 4, 4), config)
    calibrate(reparameterised, adapter, layout, config, x)
    with quantizers_disabled(reparameterised):
        torch.testing.assert_close(models.logits(reparameterised, x), expected, atol=1e-4, rtol=1e-3)
    del reparameterised

    backbone = adapter.backbone(model)
    with torch.no_grad():
        features = model.get_submodule(backbone)(x).feature_maps
    quantized = quantize(model, LRPQConfig(w_bits=8, a_bits=8), x)
    with torch.no_grad():
        got_features = quantized.get_submodule(backbone)(x).feature_maps
    # the quantized backbone's four feature maps (1-3 % here); the random heads amplify that (2-5 % in the logits),
    # and the near-uniform class scores of random queries make their arg-max meaningless
    for got, want in zip(got_features, features, strict=True):
        assert (got - want).norm() / want.norm() < 0.05
    got = models.logits(quantized, x)
    assert (got - expected).norm() / expected.norm() < 0.1
    if got.dim() == 4:  # UperNet: the predicted class of every pixel
        assert (got.argmax(1) == expected.argmax(1)).float().mean() > 0.9
    save_quantized(quantized, tmp_path)
    assert torch.equal(models.logits(load_quantized(tmp_path), x), got)


def test_the_optimum_quantizer_takes_a_dense_checkpoint_and_a_coco_directory(coco, tmp_path):
    from optimum_lrpqvit import LRPQuantizer

    float_dir = models.save_checkpoint(models.hf_yolos(), tmp_path / "float")
    quantizer = LRPQuantizer.from_pretrained(float_dir)
    config = LRPQConfig(w_bits=8, a_bits=8, dataset=str(coco), dataset_split="val", num_calibration_samples=2,
                        quantize_head=True)
    model = quantizer.quantize(tmp_path / "out", config=config)
    assert isinstance(model, transformers.YolosForObjectDetection) and is_quantized(model)
    loaded = load_quantized(tmp_path / "out")
    x = models.images(2, seed=8)
    assert torch.equal(models.logits(model, x), models.logits(loaded, x))
    assert loaded.config.quantization_config.quantize_head


def test_a_dataset_in_the_objects_layout_is_evaluated_like_the_coco_directory(coco, tmp_path):
    import datasets

    from optimum_lrpqvit.data import load_coco_split

    split = load_coco(coco, "val")
    rows = {"image": [], "objects": []}
    for image_id in split.image_ids:
        anns = split.coco.loadAnns(split.coco.getAnnIds(imgIds=image_id))
        rows["image"].append(split.image(image_id))
        rows["objects"].append({"bbox": [a["bbox"] for a in anns], "category": [a["category_id"] - 10 for a in anns]})
    features = datasets.Features({"image": datasets.Image(), "objects": datasets.Sequence({
        "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
        "category": datasets.ClassLabel(names=coco_data.CATEGORIES)})})
    datasets.DatasetDict({"val": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(tmp_path / "hub")
    objects = load_coco_split(str(tmp_path / "hub"), "val")
    assert objects.category_names == dict(enumerate(coco_data.CATEGORIES)) and len(objects.image_ids) == 4
    shifted = _ground_truth_results(split, shift=2.0)
    renumbered = [{**r, "image_id": r["image_id"] - 1, "category_id": r["category_id"] - 10} for r in shifted]
    assert coco_average_precision(objects, renumbered, "bbox") == coco_average_precision(split, shifted, "bbox")
    model = models.hf_yolos()
    assert evaluate_dense(model, models.processor_for(model), objects).keys() == {"num_images", "box"}
    with pytest.raises(ValueError, match="neither a COCO directory .* nor a dataset with an 'objects' column"):
        load_coco_split("fashion_mnist", "test", num_samples=2)


def test_a_quantized_dense_model_is_pushed_with_its_card_and_pulled_by_repo_id(coco, tmp_path, local_hub):
    import os
    import subprocess
    import sys

    import requests
    import yaml

    from optimum_lrpqvit import cli

    float_dir = models.save_checkpoint(models.hf_upernet(), tmp_path / "float")
    out = tmp_path / "out"
    assert cli.main(["quantize", float_dir, str(out), "--dataset", str(coco), "--split", "val",
                     "--num-calibration-samples", "1", "--evaluate", "--eval-split", "val"]) == 0
    results = json.loads((out / "results.json").read_text())
    env = {**os.environ, "HF_ENDPOINT": local_hub.url, "HF_TOKEN": "test-token",
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}

    def run(*args):
        done = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr

    run("lrpqvit", "push", str(out), "tester/upernet-w4a4")
    card = requests.get(f"{local_hub.url}/tester/upernet-w4a4/resolve/main/README.md", timeout=10).text
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["pipeline_tag"] == "image-segmentation"
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in metrics] == [round(results[k]["miou"], 2) for k in ("full_precision", "quantized")]
    x = models.images(2)
    torch.save(x, tmp_path / "x.pt")
    # the float head's convolutions round by thread count: the pulling process uses this one's
    run(sys.executable, "-c", "import sys, torch, optimum_lrpqvit; from transformers import "
        "UperNetForSemanticSegmentation as U; torch.set_num_threads(int(sys.argv[3])); "
        "m = U.from_pretrained('tester/upernet-w4a4'); "
        "torch.save(m(pixel_values=torch.load(sys.argv[1])).logits, sys.argv[2])",
        str(tmp_path / "x.pt"), str(tmp_path / "pulled.pt"), str(torch.get_num_threads()))
    assert torch.equal(torch.load(tmp_path / "pulled.pt"), models.logits(load_quantized(out), x))


def test_lrpqvit_score_gives_the_dense_importance_of_compute_importance(coco, tmp_path):
    from optimum_lrpqvit import cli
    from optimum_lrpqvit.data import images_to_pixel_values

    model = models.hf_mask2former()
    float_dir = models.save_checkpoint(model, tmp_path / "float")
    assert cli.main(["score", float_dir, "--dataset", str(coco), "--split", "val", "--num-samples", "4",
                     "--batch-size", "3", "--output", str(tmp_path / "scores.json")]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())["scores"]
    images = list(load_image_dataset(str(coco), "val", num_samples=4)["image"])
    expected = compute_importance(model, images_to_pixel_values(images, models.processor_for(model), 3),
                                  progress=False)
    assert scores.keys() == expected.keys()
    assert all(scores[k] == pytest.approx(expected[k], rel=1e-4, abs=1e-9) for k in expected)
