"""Key centering (``center_keys``): the float function is unchanged, every key channel ends up centred, the
families whose attention is not shift-invariant are refused, and the quantized model gains from it."""

import copy

import models
import pytest
import timm
import torch

from optimum_lrpqvit import LRPQConfig, quantize
from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.bit_plan import BitPlan
from optimum_lrpqvit.evaluation import fidelity
from optimum_lrpqvit.key_centering import center_keys, key_projection
from optimum_lrpqvit.quantize import prepare_model

NOT_SHIFT_INVARIANT = {"hf_swinv2", "hf_swinv2_model"}  # cosine attention


def _prepared(name: str, config: LRPQConfig):
    model = models.FAMILIES[name]().eval()
    family = find_family(model)
    layout = family.quantized_layout(model, config)
    prepare_model(model, family, layout, BitPlan.fixed(layout, config.w_bits, config.a_bits), config)
    return model, family, layout


def _key_ranges(model, layout, x):
    """attention → (per-channel min, max) of its keys on ``x``."""
    ranges, hooks = {}, []
    for attention in layout.attentions:
        name, fused = key_projection(layout, attention)

        def hook(module, args, out, attention=attention, fused=fused):
            third = module.out_features // 3
            keys = out[..., third:2 * third] if fused else out
            keys = keys.reshape(-1, keys.shape[-1])
            ranges[attention] = (keys.amin(0), keys.amax(0))
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    models.logits(model, x)
    for h in hooks:
        h.remove()
    return ranges


@pytest.mark.parametrize("name", sorted(set(models.FAMILIES) - NOT_SHIFT_INVARIANT))
def test_centering_keeps_the_float_function_and_centres_every_key_channel(name):
    model, family, layout = _prepared(name, LRPQConfig())
    x = models.images(6, seed=4)
    before = models.logits(model, x)
    originals = {n: p.detach().clone() for n, p in models.FAMILIES[name]().named_parameters()}
    widest_before = {a: (hi - lo).max() for a, (lo, hi) in _key_ranges(model, layout, x).items()}
    shifts = center_keys(model, family, layout, x)
    assert set(shifts) == set(layout.attentions) and any(bool(s.abs().max() > 0) for s in shifts.values())
    torch.testing.assert_close(models.logits(model, x), before, rtol=1e-4, atol=1e-4)
    for attention, (low, high) in _key_ranges(model, layout, x).items():
        torch.testing.assert_close(low, -high, rtol=0, atol=1e-4 * float(widest_before[attention]))
    fresh = models.FAMILIES[name]()  # the float modules' own parameters are untouched (quantize() can be undone)
    assert all(torch.equal(p, originals[n]) for n, p in fresh.named_parameters())


@pytest.mark.parametrize(("make", "config", "match"), [
    (models.hf_swinv2, {}, "cosine attention"),
    (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=16, patch_size=4,
                               embed_dim=32, depth=1, num_heads=2, qk_norm=True), {}, "qk_norm"),
    (models.hf_beit, {"post_ln": "layerwise"}, "has no bias"),
])
def test_shift_variant_attention_is_refused_before_anything_changes(make, config, match):
    model = make().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"center_keys=True cannot be used.*{match}.*Nothing was changed"):
        quantize(model, LRPQConfig(center_keys=True, **config), models.images(4))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(type(m).__name__.startswith("Quant") for m in model.modules())


def test_bias_free_keys_are_centred_in_the_bias_that_reparameterisation_adds():
    model = models.hf_beit()  # BEiT's key projection has no bias; CRL gives the post-LN Linears one
    layout = find_family(model).layout(model)
    keys = [key_projection(layout, a)[0] for a in layout.attentions]
    assert all(model.get_submodule(k).bias is None for k in keys)
    quantize(model, LRPQConfig(center_keys=True), models.images(8))
    assert all(model.get_submodule(k).bias.abs().max() > 0 for k in keys)


def test_centred_quantization_does_not_depend_on_key_offsets():
    """Per-channel key offsets leave the float model as it was; they cost the quantized model fidelity unless
    the keys are centred, and with centring the quantized model is the same with and without them."""
    base = models.hf_vit().eval()
    shifted = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in shifted.vit.layers:
            layer.attention.k_proj.bias += 20 * torch.randn(layer.attention.k_proj.out_features, generator=generator)
    x, calibration = models.images(32, seed=5), models.images(16, seed=6)
    reference = models.logits(base, x)
    torch.testing.assert_close(models.logits(shifted, x), reference, rtol=1e-4, atol=1e-4)
    kl = {}
    for model, center in ((base, True), (shifted, True), (shifted, False), (base, False)):
        quantized = quantize(copy.deepcopy(model), LRPQConfig(w_bits=8, a_bits=6, center_keys=center), calibration)
        kl[model is shifted, center] = fidelity(models.logits(quantized, x), reference.argmax(-1), reference)["kl"]
    assert kl[True, True] == pytest.approx(kl[False, True], rel=1e-3)
    assert kl[True, False] > 3 * kl[True, True] and kl[True, False] > 3 * kl[False, False]
