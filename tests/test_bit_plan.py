"""The bit plan: built by the rules, read back from the quantized modules, validated when read from JSON."""

import json

import models
import pytest

from optimum_lrpqvit import LRPQConfig, applied_config, quantize, save_quantized
from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.bit_plan import PATCH_EMBED_A_BITS, BitPlan, PointBits, read_bit_plan


def _layout(model):
    return find_family(model).layout(model)


def test_fixed_plan_covers_every_point_with_the_patch_embedding_input_at_8_bits():
    model = models.hf_vit()
    layout = _layout(model)
    plan = BitPlan.fixed(layout, 3, 5)
    assert list(plan) == layout.points()
    assert plan[layout.patch_embed] == PointBits(3, PATCH_EMBED_A_BITS)
    assert all(plan[p] == PointBits(3, 5) for p in layout.weight_points()[1:])
    assert all(plan[p] == PointBits(None, 5) for p in layout.points() if p not in layout.weight_points())


@pytest.mark.parametrize("make", [models.hf_vit, models.hf_swin, models.timm_vit])
def test_the_applied_plan_is_what_the_modules_hold(make):
    model = quantize(make(), LRPQConfig(w_bits=4, a_bits=4, mixed_precision=True, allocation="budget"),
                     models.images(8))
    assert read_bit_plan(model, _layout(model)).to_dict() == applied_config(model).bit_plan
    assert {b["w_bits"] for b in applied_config(model).bit_plan.values()} - {None} != {4}  # really mixed


def test_config_json_records_the_modules_bits(tmp_path):
    model = quantize(models.timm_vit(), LRPQConfig(w_bits=4, a_bits=4), models.images(8))
    applied_config(model).bit_plan = BitPlan.fixed(_layout(model), 8, 8).to_dict()  # a stale record
    save_quantized(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["bit_plan"]
    assert saved == read_bit_plan(model, _layout(model)).to_dict()


def test_read_bit_plan_refuses_a_float_model():
    model = models.timm_vit()
    with pytest.raises(ValueError, match="not a quantized layer"):
        read_bit_plan(model, _layout(model))


@pytest.mark.parametrize("edit, match", [
    (lambda d, layout: d.pop(layout.patch_embed), "points it lacks"),
    (lambda d, layout: d.update({"blocks.9.attn.qkv": {"w_bits": 4, "a_bits": 4}}), "unknown points"),
    (lambda d, layout: d[layout.patch_embed].update(w_bits=9), "w_bits must be an integer between 2 and 8"),
    (lambda d, layout: d[layout.patch_embed].update(w_bits=None), "w_bits must be an integer"),
    (lambda d, layout: d[f"{layout.attentions[0]}.softmax"].update(w_bits=4), "has no weights"),
    (lambda d, layout: d[f"{layout.attentions[0]}.softmax"].update(a_bits=2.5), "a_bits must be an integer"),
    (lambda d, layout: d.update({layout.patch_embed: [4, 8]}), "must be a dict"),
])
def test_from_dict_names_the_bad_entry(edit, match):
    layout = _layout(models.timm_vit())
    document = BitPlan.fixed(layout, 4, 4).to_dict()
    assert BitPlan.from_dict(document, layout).to_dict() == document
    edit(document, layout)
    with pytest.raises(ValueError, match=match):
        BitPlan.from_dict(document, layout, "config.json: bit plan")
