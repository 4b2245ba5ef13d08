import copy
import importlib
import json
import math
import shutil

import models
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification
from transformers.quantizers import auto as hf_auto

import optimum_lrpqvit.integrations.transformers as hf_integration
from optimum_lrpqvit import LRPQConfig, quantize
from optimum_lrpqvit.nn import (
    LogSqrt2Quantizer,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    UniformQuantizer,
    pack_weights,
    unpack_weights,
    weight_modules,
)
from optimum_lrpqvit.packing import packed_nbytes
from optimum_lrpqvit.serialization import (
    checkpoint_sizes,
    content_digest,
    load_quantized,
    packed_state_dict,
    save_quantized,
)

RAW_TIMM = ("timm_vit", "timm_deit_distilled", "timm_swin")


def _quantized(family: str, **config) -> torch.nn.Module:
    config = {"w_bits": 3, "a_bits": 4, **config}
    return quantize(models.FAMILIES[family](), LRPQConfig(**config), models.images(8))


def _reload(family: str, directory):
    if family in RAW_TIMM:  # raw timm: loaded into a float model of the same architecture (other random weights)
        return load_quantized(directory, model=models.FAMILIES[family](seed=7))
    if family in models.EMBEDDERS or family in models.DENSE:  # rebuilt as the class config.json names
        return load_quantized(directory)
    return AutoModelForImageClassification.from_pretrained(directory)


def _applied(model):
    return model.config.quantization_config if hasattr(model, "config") else model.quantization_config


@pytest.mark.parametrize("family", sorted(models.FAMILIES))
def test_round_trip_gives_identical_logits(family, tmp_path):
    model = _quantized(family)
    x = models.images(4, seed=3)
    save_quantized(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.endswith(".weight") and k[: -len(".weight")] + ".weight_packed" in keys for k in keys)
    loaded = _reload(family, tmp_path)
    assert torch.equal(models.logits(model, x), models.logits(loaded, x))
    assert _applied(loaded).bit_plan == _applied(model).bit_plan
    for name, module in loaded.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):  # packed as quantize() leaves it: no float weight
            assert module.weight_is_packed and "weight" not in module._parameters
            assert torch.equal(module.quantized_weight(), model.get_submodule(name).quantized_weight())
            assert torch.equal(module.weight_packed, model.get_submodule(name).weight_packed)


@pytest.mark.parametrize(("family", "config"), [
    ("hf_swin", {"post_ln": "repq"}),  # patch-merging reductions get a bias
    ("wrapped_timm_vit", {"post_ln": "channelwise", "w_bits": 5}),  # channel-wise activation scales
    ("hf_vit", {"w_bits": 8, "post_ln": "layerwise"}),
    ("hf_deit", {"w_bits": 4, "mixed_precision": True, "allocation": "budget", "importance": "random"}),
    ("hf_vit", {"softmax_quantizer": "adalog", "gelu_quantizer": "adalog", "weight_rounding": "gptq"}),
    ("wrapped_timm_vit", {"gelu_quantizer": "adalog", "a_bits": 3}),
    ("hf_swin", {"softmax_quantizer": "adalog", "a_bits": 8}),
    ("wrapped_timm_vit", {"center_keys": True}),  # shifted key biases, in the fused qkv
    ("hf_vit", {"center_keys": True, "weight_rounding": "gptq"}),
    ("hf_swin", {"compensate_activations": True, "weight_rounding": "gptq"}),  # re-solved weights and biases
])
def test_round_trip_variants(family, config, tmp_path):
    model = _quantized(family, **config)
    if config.get("mixed_precision"):  # several bit widths in one checkpoint
        assert len({b["w_bits"] for b in _applied(model).bit_plan.values()} - {None}) > 1
    save_quantized(model, tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    x = models.images(4, seed=3)
    assert torch.equal(models.logits(model, x), models.logits(loaded, x))
    # and again through save_pretrained of the loaded model: the same tensors
    loaded.save_pretrained(tmp_path / "again")
    again, first = load_file(tmp_path / "again" / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    assert torch.equal(models.logits(AutoModelForImageClassification.from_pretrained(tmp_path / "again"), x),
                       models.logits(model, x))


def test_load_into_a_float_transformers_model_and_shards(tmp_path):
    model = _quantized("hf_swin")
    save_quantized(model, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    x = models.images(4, seed=3)
    loaded = load_quantized(tmp_path, model=models.hf_swin(seed=9))
    assert torch.equal(models.logits(model, x), models.logits(loaded, x))
    assert torch.equal(models.logits(model, x), models.logits(load_quantized(tmp_path), x))
    loaded.save_pretrained(tmp_path / "again")  # packed again: the loaded model carries the lrpqvit quantizer
    assert torch.equal(models.logits(model, x), models.logits(load_quantized(tmp_path / "again"), x))


@pytest.mark.parametrize("bits", [4, 3])
def test_size_is_within_ten_percent_of_ideal(bits, tmp_path):
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=1024, num_labels=10)
    torch.manual_seed(0)
    model = quantize(ViTForImageClassification(config).eval(), LRPQConfig(w_bits=bits, a_bits=4),
                     torch.randn(4, 3, 32, 32))
    save_quantized(model, tmp_path)
    sizes = checkpoint_sizes(model, tmp_path)
    assert 1.0 < sizes["vs_ideal"] < 1.10, sizes
    assert sizes["vs_full_precision"] < (bits + 1) / 32, sizes
    fc1 = model.vit.layers[0].mlp.fc1
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("vit.encoder.layer.0.intermediate.dense.weight_packed")
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(math.prod(fc1.weight_shape), bits)
    assert torch.equal(packed, fc1.weight_packed)  # what the file holds is what the model holds
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    layers = weight_modules(loaded)
    in_memory = sum(t.numel() * t.element_size() for m in layers.values() for t in [*m.parameters(), *m.buffers()])
    state, _ = packed_state_dict(loaded)
    in_file = sum(t.numel() * t.element_size() for k, t in state.items() if k.rpartition(".")[0] in layers
                  or k.rsplit(".", 2)[0] in layers)
    assert in_memory <= 1.15 * in_file, (in_memory, in_file)
    assert not any(p.dim() >= 2 for m in layers.values() for p in m.parameters())  # no float weight anywhere


def test_loading_needs_no_data(tmp_path, monkeypatch):
    model = _quantized("hf_vit")
    save_quantized(model, tmp_path)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration during loading")

    monkeypatch.setattr(UniformQuantizer, "fit", no_calibration)
    monkeypatch.setattr(LogSqrt2Quantizer, "fit", no_calibration)
    monkeypatch.setattr(importlib.import_module("optimum_lrpqvit.quantize"), "calibrate", no_calibration)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    x = models.images(4, seed=3)
    assert torch.equal(models.logits(model, x), models.logits(loaded, x))


def test_float_models_in_the_same_process_are_unaffected(tmp_path):
    float_model = models.hf_vit()
    float_model.save_pretrained(tmp_path / "float")
    x = models.images(4, seed=3)
    before = models.logits(float_model, x)
    save_quantized(_quantized("hf_vit"), tmp_path / "quantized")
    AutoModelForImageClassification.from_pretrained(tmp_path / "quantized")
    for fresh in (AutoModelForImageClassification.from_pretrained(tmp_path / "float"), models.hf_vit()):
        assert not any(isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul)) for m in fresh.modules())
        assert fresh.config._attn_implementation != "lrpqvit"
        assert getattr(fresh, "hf_quantizer", None) is None
        assert torch.equal(models.logits(fresh, x), before)
    assert getattr(float_model, "hf_quantizer", None) is None


def test_registration_is_idempotent_and_guarded():
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["lrpqvit"] is LRPQConfig
    hf_integration.register()
    reloaded = importlib.reload(hf_integration)
    assert hf_auto.AUTO_QUANTIZER_MAPPING["lrpqvit"] is reloaded.LRPQHfQuantizer
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["lrpqvit"] is LRPQConfig

    class Foreign(LRPQConfig):
        pass

    with pytest.raises(ValueError, match="already has a quantization method"):
        hf_integration._register({"lrpqvit": Foreign}, hf_auto.register_quantization_config, LRPQConfig)


def test_saving_needs_a_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="quantize it"):
        save_quantized(models.hf_vit(), tmp_path)
    model = unpack_weights(_quantized("timm_vit"))  # float Parameters holding x̂, which research code may change
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.add_(1e-3)
    with pytest.raises(ValueError, match="not on its 3-bit quantization grid"):
        save_quantized(model, tmp_path)
    with pytest.raises(ValueError, match="blocks.0.attn.qkv: the weight is not on its 3-bit quantization grid"):
        pack_weights(model)


def test_raw_timm_checkpoints_need_the_float_model(tmp_path):
    save_quantized(_quantized("timm_vit"), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["library_name"] == "timm"
    with pytest.raises(ValueError, match="raw timm model"):
        load_quantized(tmp_path)
    with pytest.raises(ValueError, match="already quantized"):
        load_quantized(tmp_path, model=_quantized("timm_vit"))
    loaded = load_quantized(tmp_path, model=models.timm_vit())
    assert isinstance(loaded, timm.models.vision_transformer.VisionTransformer)


# --- corrupted and mismatched checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved")
    save_quantized(_quantized("hf_vit"), directory)
    return directory


@pytest.fixture
def broken(saved, tmp_path):
    directory = tmp_path / "broken"
    shutil.copytree(saved, directory)
    return directory


FC1 = "vit.encoder.layer.0.intermediate.dense"  # vit.layers.0.mlp.fc1 under its checkpoint name


def _edit_config(directory, edit) -> None:
    path = directory / "config.json"
    document = json.loads(path.read_text())
    edit(document["quantization_config"])
    path.write_text(json.dumps(document))


def _edit_tensors(directory, edit) -> None:
    """Rewrite the checkpoint consistently (valid digest): a well-formed file that does not match the config."""
    path = str(directory / "model.safetensors")
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    edit(tensors)
    metadata["lrpqvit_sha256"] = content_digest(tensors.values())
    save_file(tensors, path, metadata=metadata)


LOADERS = {
    "from_pretrained": AutoModelForImageClassification.from_pretrained,
    "load_quantized_into_float": lambda d: load_quantized(d, model=models.hf_vit()),
}


@pytest.fixture(params=sorted(LOADERS))
def load(request):
    return LOADERS[request.param]


def test_truncated_file(broken, load):
    path = broken / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(OSError, match=r"model\.safetensors is not a readable safetensors file.*truncated"):
        load(broken)


def test_corrupted_header_and_data(broken, load):
    path = broken / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-50] ^= 0xFF  # one bit pattern in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(OSError, match=r"model\.safetensors: the tensor data does not match the digest"):
        load(broken)
    data[-50] ^= 0xFF
    data[20:30] = b"#" * 10  # the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(OSError, match="not a readable safetensors file"):
        load(broken)


def test_bit_plan_that_does_not_match_the_packed_tensors(broken, load):
    _edit_config(broken, lambda q: q["bit_plan"]["vit.layers.0.mlp.fc1"].update(w_bits=4))
    with pytest.raises(ValueError, match=rf"{FC1}.weight_packed .* 3-bit packing of the \(64, 32\) weight, but the "
                                         r"bit plan in config.json says 4 bits"):
        load(broken)


def test_missing_and_unknown_tensors(broken, load):
    _edit_tensors(broken, lambda t: t.pop(f"{FC1}.weight_packed"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*weight_packed"):
        load(broken)
    _edit_tensors(broken, lambda t: t.update({f"{FC1}.weight_packed": torch.zeros(768, dtype=torch.uint8),
                                              f"{FC1}.weight": torch.zeros(64, 32)}))
    with pytest.raises(ValueError, match=r"holds 1 tensor\(s\) that this model .* do not have"):
        load(broken)


def test_activation_bits_that_do_not_match_the_saved_quantizers(broken, load):
    # a_bits leave no trace in the tensors' shapes: the plan the weights were saved with catches it
    _edit_config(broken, lambda q: q["bit_plan"]["vit.layers.0.mlp.fc1"].update(a_bits=8))
    with pytest.raises(ValueError, match=r"saved with another bit plan .*'vit.layers.0.mlp.fc1': weights "
                                         r"\{'a_bits': 4, 'w_bits': 3\}, config \{'a_bits': 8, 'w_bits': 3\}"):
        load(broken)


def test_checkpoint_without_its_digest_is_refused(broken, load):
    path = str(broken / "model.safetensors")
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    del metadata["lrpqvit_sha256"]
    save_file(load_file(path), path, metadata=metadata)
    with pytest.raises(OSError, match=r"model\.safetensors has no content digest"):
        load(broken)


@pytest.mark.parametrize(("key", "value", "match"), [
    (f"{FC1}.bias", float("nan"), rf"{FC1}.bias .*holds NaN or infinite values"),
    ("vit.encoder.layer.0.output.dense.input_quantizer.scale", 0.0, "input_quantizer.scale .*holds a scale that is "
                                                                    "not positive"),
    ("vit.encoder.layer.1.attention.matmul2.quantizer_a.delta", float("nan"), "delta .*holds NaN"),
    ("vit.encoder.layer.1.attention.matmul2.quantizer_a.delta", -1.0, "delta .*is not positive"),
    (f"{FC1}.weight_zero_point", 1e9, "weight_zero_point .*holds a zero point that is not an integer within"),
    (f"{FC1}.input_quantizer.zero_point", 0.5, "zero_point .*holds a zero point that is not an integer"),
])
def test_impossible_quantizer_values_are_refused(broken, load, key, value, match):
    def edit(tensors):
        old = tensors[key]
        tensors[key] = torch.full(old.shape, value, dtype=old.dtype if old.is_floating_point() else torch.float32)

    _edit_tensors(broken, edit)
    with pytest.raises(ValueError, match=match):
        load(broken)


@pytest.mark.parametrize(("leaf", "value", "match"), [
    ("matmul2.quantizer_a.numerator", 0.0, r"is not an integer between 1 and 64 \(the AdaLog base"),
    ("matmul2.quantizer_a.numerator", 2.5, r"is not an integer between 1 and 64 \(the AdaLog base"),
    ("matmul2.quantizer_a.numerator", 65.0, r"is not an integer between 1 and 64 \(the AdaLog base"),
    ("output.dense.input_quantizer.shift", -0.1, "is negative"),
])
def test_impossible_adalog_parameters_are_refused(tmp_path, leaf, value, match):
    save_quantized(_quantized("hf_vit", softmax_quantizer="adalog", gelu_quantizer="adalog"), tmp_path)
    key = f"vit.encoder.layer.1.{'attention.' if leaf.startswith('matmul') else ''}{leaf}"
    _edit_tensors(tmp_path, lambda tensors: tensors.__setitem__(key, torch.tensor(value)))
    with pytest.raises(ValueError, match=rf"{key} .*{match}"):
        AutoModelForImageClassification.from_pretrained(tmp_path)


def test_unknown_format_version(broken, load):
    _edit_config(broken, lambda q: q.update(format_version=2))
    with pytest.raises(ValueError, match="format_version 2.*Upgrade optimum-lrpqvit"):
        load(broken)


def test_unknown_format_version_in_the_weights(broken, load):
    path = str(broken / "model.safetensors")
    save_file(load_file(path), path, metadata={"format": "pt", "lrpqvit_format_version": "2"})
    with pytest.raises(ValueError, match=r"model\.safetensors uses lrpqvit format version '2'.*Upgrade"):
        load(broken)


def test_only_safetensors_are_read(broken, load):
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(OSError, match="never .*pickle"):
        load(broken)


def test_original_model_is_not_changed_by_saving(tmp_path):
    model = _quantized("wrapped_timm_swin")
    state = copy.deepcopy(model.state_dict())
    quantizer = getattr(model, "hf_quantizer", None)
    save_quantized(model, tmp_path)
    assert getattr(model, "hf_quantizer", None) is quantizer
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_plain_save_pretrained_of_a_fresh_quantized_model_writes_packed_weights(tmp_path):
    model = _quantized("hf_vit")
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("weight_packed") for k in keys)
    assert not any(k.endswith("q_proj.weight") or k.endswith("query.weight") for k in keys)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    x = models.images(4, seed=9)
    assert torch.equal(models.logits(reloaded, x), models.logits(model, x))
