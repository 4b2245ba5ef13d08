"""Property tests over the three ways bad input gets in: configs, calibration data and checkpoint files. Each
input is either refused with TypeError/ValueError/OSError before anything changes, or accepted with a
consistent result; nothing else (no other exception, no half-changed model, no silently different outputs)."""

import json
import shutil

import models
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimum_lrpqvit import LRPQConfig, load_quantized, quantize, save_quantized
from optimum_lrpqvit.nn import is_quantized

FIELDS = ["w_bits", "a_bits", "post_ln", "crl_k", "percentiles", "mixed_precision", "allocation", "importance",
          "candidate_bits", "num_importance_samples", "seed", "num_calibration_samples", "dataset"]
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["crl", "repq", "channelwise", "layerwise", "rep", "lrp", "fisher", "random", "paper",
                     "budget", "4", "", "fashion_mnist"]),
    st.lists(st.one_of(st.integers(-1, 9), st.floats(0, 1.5)), max_size=4), st.text(max_size=4))
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS + ["wbits", "bits"]), ANY_VALUE, max_size=4))
def test_a_config_is_refused_or_valid_and_round_trips(options):
    try:
        config = LRPQConfig(**options)
    except (TypeError, ValueError):
        return
    assert LRPQConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    for name, value in options.items():  # accepted values are kept as given (no silent rounding)
        if name in ("percentiles", "candidate_bits"):
            assert list(getattr(config, name)) == list(value)
        else:
            assert getattr(config, name) == value


@FUZZ
@given(st.sampled_from(FIELDS), ANY_VALUE)
def test_a_field_changed_after_construction_is_checked_by_quantize(name, value):
    config = LRPQConfig()
    setattr(config, name, value)
    model = models.hf_vit()
    try:
        quantize(model, config, models.images(2))
    except (TypeError, ValueError):
        assert not is_quantized(model)
        return
    assert torch.isfinite(models.logits(model, models.images(2))).all()


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(2, 3, 16, 16), (2, 1, 16, 16), (2, 3, 8, 16), (3, 16, 16), (2, 3, 16), (0, 3, 16, 16)]),
       st.sampled_from(["normal", "zeros", "constant", "huge", "nan", "inf", "int"]))
def test_calibration_data_is_refused_or_gives_finite_logits(shape, kind):
    x = {"normal": torch.randn(shape), "zeros": torch.zeros(shape), "constant": torch.full(shape, 0.7),
         "huge": torch.randn(shape) * 1e30, "nan": torch.full(shape, float("nan")),
         "inf": torch.full(shape, float("inf")), "int": torch.ones(shape, dtype=torch.int64)}[kind]
    model = models.hf_vit()
    try:
        quantize(model, LRPQConfig(), x)
    except (TypeError, ValueError):
        assert not is_quantized(model)
        return
    assert torch.isfinite(models.logits(model, models.images(2))).all()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz") / "vit"
    model = quantize(models.hf_vit(), LRPQConfig(), models.images(4))
    save_quantized(model, directory)
    return directory, models.logits(model, models.images(2))


@FUZZ
@given(st.data())
def test_a_tampered_checkpoint_is_refused_or_loads_the_same_model(saved, tmp_path_factory, data):
    directory, expected = saved
    copy = tmp_path_factory.mktemp("tampered") / "vit"
    shutil.copytree(directory, copy)
    # config.json outside its quantization_config is transformers' (an edited layer_norm_eps changes outputs
    # there as in any model): tampered are the weights file's bytes and the quantization_config's values
    target = copy / data.draw(st.sampled_from(["model.safetensors", "model.safetensors", "config.json"]))
    content = bytearray(target.read_bytes())
    action = "json" if target.name == "config.json" else data.draw(st.sampled_from(["flip", "truncate"]))
    if action == "flip":
        at = data.draw(st.integers(0, len(content) - 1))
        content[at] ^= 1 << data.draw(st.integers(0, 7))
        target.write_bytes(bytes(content))
    elif action == "truncate":
        target.write_bytes(bytes(content[:data.draw(st.integers(0, len(content) - 1))]))
    else:  # a value of the quantization_config replaced
        document = json.loads((copy / "config.json").read_text())
        quant = document["quantization_config"]
        key = data.draw(st.sampled_from(sorted(quant)))
        quant[key] = data.draw(ANY_VALUE)
        (copy / "config.json").write_text(json.dumps(document))
    try:
        model = load_quantized(copy)
    except (OSError, ValueError, TypeError):
        return
    assert torch.equal(models.logits(model, models.images(2)), expected)
