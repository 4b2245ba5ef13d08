"""Bad input is refused before any work is done, and nothing outside a directory is published."""

import json
import os
import shutil
import sys

import models
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForImageClassification

from optimum_lrpqvit import LRPQConfig, compute_importance, load_quantized, quantize, save_quantized, score_importance
from optimum_lrpqvit.cli import main as cli_main
from optimum_lrpqvit.data import load_image_dataset
from optimum_lrpqvit.hub import push_directory, save_quantized_model
from optimum_lrpqvit.nn import is_quantized
from optimum_lrpqvit.scoring import _checksum

RESULTS = {"dataset": "fashion_mnist", "split": "test", "num_images": 4, "full_precision": {"top1": 50.0},
           "quantized": {"top1": 50.0, "agreement": 100.0, "kl": 0.0}}


@pytest.fixture(scope="module")
def mixed():
    return quantize(models.hf_vit(), LRPQConfig(mixed_precision=True, allocation="budget", importance="random"),
                    models.images(8))


def test_scoring_destinations_are_checked_before_scoring(tmp_path):
    def never(*args, **kwargs):
        raise AssertionError("the dataset was read")

    with pytest.raises(FileNotFoundError, match="does not exist; create .*missing first"):
        score_importance(models.hf_vit(), never, None, output=tmp_path / "missing" / "scores.json")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        score_importance(models.hf_vit(), never, None, output=tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="checkpoint_dir .* is not a directory"):
        score_importance(models.hf_vit(), never, None, checkpoint_dir=tmp_path / "file")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 2.5"):
        score_importance(models.hf_vit(), never, None, batch_size=2.5)


def test_results_without_their_keys_are_refused_before_writing(mixed, tmp_path):
    with pytest.raises(ValueError, match=r"results lacks \['dataset'"):
        save_quantized_model(mixed, tmp_path / "out", results={"split": "test"})
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        save_quantized_model(mixed, tmp_path / "file")


def test_a_second_save_leaves_no_stale_results_or_figure(mixed, tmp_path):
    save_quantized_model(mixed, tmp_path, results=RESULTS)
    assert {"results.json", "importance.png"} <= set(os.listdir(tmp_path))
    fixed = quantize(models.hf_vit(), LRPQConfig(), models.images(8))
    save_quantized_model(fixed, tmp_path)  # no results, no importance this time
    assert not {"results.json", "importance.png"} & set(os.listdir(tmp_path))


def test_push_refuses_symbolic_links_before_contacting_the_hub(mixed, tmp_path, monkeypatch):
    save_quantized_model(mixed, tmp_path / "out", results=RESULTS)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the directory")
    (tmp_path / "out" / "notes.txt").symlink_to(secret)
    monkeypatch.setattr("optimum_lrpqvit.hub.HfApi", None)  # any use of the Hub client would raise TypeError
    with pytest.raises(ValueError, match="symbolic links .*notes.txt"):
        push_directory(tmp_path / "out", "user/repo", token="x")


def test_cli_quantize_into_a_file_fails_before_quantizing(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code = cli_main(["quantize", str(tmp_path / "nowhere-model"), str(tmp_path / "file")])
    err = capsys.readouterr().err
    assert code == 1 and "OUTPUT_DIR" in err and "is not a directory" in err  # before the (missing) model is read


# --------------------------------------------------------------------------------------------- scoring jobs


@pytest.fixture(scope="module")
def images():
    return load_image_dataset("fashion_mnist", "train", num_samples=16, seed=3)


def _score(images, directory, **kwargs):
    model = models.hf_vit()
    return score_importance(model, images, models.processor_for(model), batch_size=4, checkpoint_dir=directory,
                            checkpoint_every=1, progress=False, **kwargs)


def _rewrite_checkpoint(path, sums=None, **metadata):
    with safe_open(str(path), "pt") as f:
        meta, tensor = f.metadata(), f.get_tensor("sums")
    save_file({"sums": tensor if sums is None else sums(tensor)}, str(path), metadata={**meta, **metadata})


def test_a_scoring_checkpoint_edited_or_corrupted_is_refused(images, tmp_path):
    _score(images, tmp_path)
    path = tmp_path / "rank0-of-1.safetensors"
    original = path.read_bytes()
    _rewrite_checkpoint(path, sums=lambda t: t + t.abs().min() * 1e-9)  # one score nudged
    with pytest.raises(ValueError, match="does not match its checksum"):
        _score(images, tmp_path)
    path.write_bytes(original)
    _rewrite_checkpoint(path, batches_done="2")  # a hand-edited counter
    with pytest.raises(ValueError, match="does not match its checksum"):
        _score(images, tmp_path)
    path.write_bytes(original)
    with safe_open(str(path), "pt") as f:  # a counter edited with its checksum recomputed: impossible counts
        meta, sums = f.metadata(), f.get_tensor("sums")
    save_file({"sums": sums}, str(path), metadata={**meta, "images": "15",
                                                   "checksum": _checksum(sums, meta["fingerprint"], 4, 15)})
    with pytest.raises(ValueError, match="counts 15 images after 4 batches"):
        _score(images, tmp_path)


def test_a_stream_does_not_resume_from_a_job_on_other_data(images, tmp_path):
    _score(images.to_iterable_dataset(), tmp_path)
    other = load_image_dataset("fashion_mnist", "train", num_samples=16, seed=4)
    assert repr(other.to_iterable_dataset()) == repr(images.to_iterable_dataset())  # what the job was known by
    with pytest.raises(ValueError, match="different job"):
        _score(other.to_iterable_dataset(), tmp_path)
    again = _score(images.to_iterable_dataset(), tmp_path)  # the same stream resumes
    assert again == _score(images, tmp_path / "map-style")


def test_a_dataset_without_an_image_column_is_refused_before_scoring(images):
    with pytest.raises(ValueError, match="no 'image' column .*rename_column"):
        _score(images.rename_column("image", "img"), None)


def test_importance_under_inference_mode_is_the_same():
    model, x = models.hf_vit(), models.images(4)
    expected = compute_importance(model, x)
    with torch.inference_mode():
        assert compute_importance(model, x.clone()) == expected  # an inference tensor too


# ------------------------------------------------------------------------------------------------ quantize()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["hf_vit", "hf_swin", "timm_vit"])
def test_a_failed_quantization_leaves_the_model_as_it_was(family, monkeypatch):
    model = models.FAMILIES[family]()
    before, x = _state(model), models.images(4)
    expected = models.logits(model, x)

    def fail(*args):
        raise RuntimeError("injected failure after reparameterisation")

    monkeypatch.setattr(sys.modules["optimum_lrpqvit.quantize"], "pack_weights", fail)
    with pytest.raises(RuntimeError, match="injected"):
        quantize(model, LRPQConfig(), x)
    monkeypatch.undo()
    assert not is_quantized(model) and model.training is False
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(models.logits(model, x), expected)
    quantize(model, LRPQConfig(), x)  # a retry works
    assert is_quantized(model)


def test_half_precision_and_meta_models_are_refused_before_any_change():
    x = models.images(2)
    for model, error, message in ((models.hf_vit().half(), TypeError, "float16 weights: call model.float"),
                                  (models.hf_vit().to(torch.bfloat16), TypeError, "bfloat16"),
                                  (models.hf_vit().to("meta"), ValueError, "meta device")):
        with pytest.raises(error, match=message):
            quantize(model, LRPQConfig(), x)
        assert not is_quantized(model)


# --------------------------------------------------------------------------------------- files read at load


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("packed") / "vit"
    save_quantized(quantize(models.hf_vit(), LRPQConfig(), models.images(4)), directory)
    return directory


def test_a_path_in_a_stored_config_is_never_followed(packed, tmp_path):
    directory = tmp_path / "vit"
    shutil.copytree(packed, directory)
    (tmp_path / "outside.json").write_text("{}")
    document = json.loads((directory / "config.json").read_text())
    document["quantization_config"]["importance_scores"] = "../outside.json"
    (directory / "config.json").write_text(json.dumps(document))
    for load in (AutoModelForImageClassification.from_pretrained, load_quantized):
        with pytest.raises(ValueError, match="not the path '../outside.json'"):
            load(directory)


def _sharded_elsewhere(packed, tmp_path):
    directory = tmp_path / "model" / "vit"
    shutil.copytree(packed, directory)
    (directory / "model.safetensors").rename(tmp_path / "model" / "x.safetensors")
    with safe_open(str(tmp_path / "model" / "x.safetensors"), "pt") as f:
        weight_map = {key: "../x.safetensors" for key in f.keys()}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def test_a_shard_index_pointing_outside_the_directory_is_refused(packed, tmp_path):
    directory = _sharded_elsewhere(packed, tmp_path)
    with pytest.raises(OSError, match="outside"):
        load_quantized(directory)
    # transformers ≥ 5.25 refuses it itself (ValueError) before this library's quantizer sees the files
    with pytest.raises((OSError, ValueError), match="outside"):
        AutoModelForImageClassification.from_pretrained(directory)


def test_a_stale_shard_index_next_to_the_weights_is_named(packed, tmp_path):
    directory = tmp_path / "vit"
    shutil.copytree(packed, directory)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(OSError, match="left from an earlier sharded save; delete it"):
        load_quantized(directory)


def test_quantizing_at_load_never_unpickles_a_float_checkpoint(tmp_path, monkeypatch):
    model = models.hf_vit()
    models.save_checkpoint(model, tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # the only weights: a pickle

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(OSError, match=r"pytorch_model.bin.*never loads pickle"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "bin",
                                                        quantization_config=LRPQConfig(dataset="fashion_mnist"))


def test_quantizing_at_load_takes_the_processor_of_the_subfolder(tmp_path, monkeypatch):
    model = models.hf_vit()
    models.save_checkpoint(model, tmp_path / "repo" / "sub")
    root = models.processor_for(model)
    root.image_mean = [0.1] * 3  # another normalisation at the repository root
    root.save_pretrained(tmp_path / "repo")
    seen = []
    monkeypatch.setattr("optimum_lrpqvit.integrations.transformers.quantize_from_dataset",
                        lambda model, config, processor: seen.append(processor) or model)
    AutoModelForImageClassification.from_pretrained(tmp_path / "repo", subfolder="sub",
                                                    quantization_config=LRPQConfig(dataset="fashion_mnist"))
    assert list(seen[0].image_mean) == [0.5] * 3


def test_an_applied_config_changed_to_garbage_is_refused_before_saving(tmp_path):
    model = quantize(models.hf_vit(), LRPQConfig(), models.images(4))
    model.config.quantization_config.percentiles = [0.1]
    with pytest.raises(ValueError, match="percentiles"):
        save_quantized(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


SAVE_TWICE = """
import sys, torch
sys.path.insert(0, "tests")
import models
from optimum_lrpqvit import LRPQConfig, quantize, save_quantized
save_quantized(quantize(models.hf_vit(), LRPQConfig(), models.images(4)), sys.argv[1])
"""


def test_saved_files_are_byte_reproducible_and_follow_the_umask(tmp_path):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for run in ("a", "b"):  # separate processes: safetensors orders its metadata differently in each
        subprocess.run([sys.executable, "-c", SAVE_TWICE, str(tmp_path / run)], cwd=root, check=True,
                       capture_output=True)
    a, b = (tmp_path / "a" / "model.safetensors"), (tmp_path / "b" / "model.safetensors")
    assert a.read_bytes() == b.read_bytes()
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(a).st_mode & 0o777 == 0o666 & ~mask
    assert load_quantized(tmp_path / "a") is not None  # the rewritten header still loads


# ---------------------------------------------------------------------------------------- timm ViT variants


def _timm_vit(**kwargs):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                             **kwargs).eval()


def _refused_variants():
    from functools import partial

    from timm.layers import GluMlp, RmsNorm, SwiGLU
    from timm.models.vision_transformer import ResPostBlock

    return [({"block_fn": ResPostBlock}, "ResPostBlock"), ({"global_pool": "map"}, "attention-pool head"),
            ({"norm_layer": RmsNorm}, "RmsNorm normalisation"), ({"mlp_layer": SwiGLU}, "SwiGLU MLP"),
            ({"mlp_layer": partial(GluMlp, gate_last=False)}, "GluMlp MLP")]


@pytest.mark.parametrize("index", range(5))
def test_timm_vit_variants_it_would_quantize_wrongly_are_refused_untouched(index):
    kwargs, message = _refused_variants()[index]
    model = _timm_vit(**kwargs)
    before, x = _state(model), models.images(4)
    with pytest.raises(TypeError, match=message):
        quantize(model, LRPQConfig(w_bits=8, a_bits=8), x)
    assert not is_quantized(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs", [{"init_values": 1e-5}, {"reg_tokens": 2}, {"qk_norm": True},
                                    {"scale_mlp_norm": True}, {"scale_attn_norm": True},
                                    {"global_pool": "avg", "fc_norm": True}])
def test_timm_vit_variants_it_handles_stay_close_to_float_at_w8a8(kwargs):
    model = _timm_vit(**kwargs)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = models.logits(model, x)
    quantize(model, LRPQConfig(w_bits=8, a_bits=8), x)
    got = models.logits(model, x)
    assert float((got - expected).norm() / expected.norm()) < 0.05


def _encoder(model_class: str, config_class: str, **kwargs):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**models._ENCODER, **kwargs)
    return getattr(transformers, model_class)(config).eval()


@pytest.mark.parametrize("model_class, config_class, kwargs, message", [
    ("Dinov2Model", "Dinov2Config", {**models._ENCODER, "use_swiglu_ffn": True}, "use_swiglu_ffn=True"),
    ("ViTMAEModel", "ViTMAEConfig", {**models._ENCODER, "mask_ratio": 0.75}, "mask_ratio=0.0"),
])
def test_transformers_encoders_it_cannot_quantize_are_refused_untouched(model_class, config_class, kwargs, message):
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs)).eval()
    before = _state(model)
    with pytest.raises(TypeError, match=message):
        quantize(model, LRPQConfig(w_bits=8, a_bits=8), models.images(4))
    assert not is_quantized(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("model_class, config_class, kwargs", [
    ("BeitForImageClassification", "BeitConfig", {"use_shared_relative_position_bias": True, "num_labels": 5}),
    ("BeitForImageClassification", "BeitConfig", {"use_mean_pooling": False, "layer_scale_init_value": 0.0,
                                                  "num_labels": 5}),
    ("BeitModel", "BeitConfig", {"use_relative_position_bias": True}),
    ("Dinov2Model", "Dinov2Config", {"layerscale_value": 0.1}),
    ("SiglipVisionModel", "SiglipVisionConfig", {"vision_use_head": False}),
    ("ViTMSNModel", "ViTMSNConfig", {}),
    ("CLIPVisionModel", "CLIPVisionConfig", {}),
])
def test_transformers_encoder_variants_it_handles_stay_close_to_float_at_w8a8(model_class, config_class, kwargs):
    model = _encoder(model_class, config_class, **kwargs)
    x = models.images(8, seed=1)
    expected = models.logits(model, x)
    quantize(model, LRPQConfig(w_bits=8, a_bits=8), x)
    got = models.logits(model, x)
    assert float((got - expected).norm() / expected.norm()) < 0.05


def test_an_encoder_whose_parts_are_not_the_expected_modules_is_refused_untouched():
    import transformers

    model = transformers.Dinov2Model(transformers.Dinov2Config(**models._ENCODER)).eval()
    model.encoder.layer[1].norm2 = nn.LayerNorm(32, bias=False)  # e.g. a bias-free norm: nothing to fold b into
    before = _state(model)
    with pytest.raises(TypeError, match=r"encoder.layer.1.norm2 is a LayerNorm where this adapter expects "
                                        r"nn.LayerNorm with weight and bias"):
        quantize(model, LRPQConfig(w_bits=8, a_bits=8), models.images(4))
    assert not is_quantized(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_timm_eva_is_refused_untouched():
    from timm.models.eva import Eva

    model = Eva(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=5, use_rot_pos_emb=True,
                swiglu_mlp=True).eval()
    before = _state(model)
    with pytest.raises(TypeError, match="Unsupported model Eva"):
        quantize(model, LRPQConfig(w_bits=8, a_bits=8), models.images(4))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
