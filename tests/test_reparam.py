import math

import models
import pytest
import torch
from torch import nn

from optimum_lrpqvit import LRPQConfig, quantize, quantizers_disabled
from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.bit_plan import BitPlan, PointBits
from optimum_lrpqvit.nn import QuantLinear
from optimum_lrpqvit.quantize import calibrate, prepare_model
from optimum_lrpqvit.quantizers import fake_quant_uniform, search_uniform_params
from optimum_lrpqvit.reparam import clip_channel_params, reparam_factors, reparameterize
from optimum_lrpqvit.serialization import load_quantized, save_quantized


def _channel_params(c: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, c, generator=g) * (torch.rand(c, generator=g) * 3 + 0.1) + torch.randn(c, generator=g)
    x[:, 3] *= 40  # an outlier channel
    return x, *search_uniform_params(x, 4, channelwise=True)


def test_reparam_makes_layerwise_quantization_equal_channelwise():
    x, scale, zero = _channel_params()
    r, b, s_t, z_t = reparam_factors(scale, zero)
    channelwise = fake_quant_uniform(x, scale, zero, 4)
    layerwise = fake_quant_uniform(x / r - b, s_t, z_t, 4)
    # undo X' = X/r − b on the quantized values: the two quantized tensors are the same up to rounding of z̃
    torch.testing.assert_close((layerwise + b) * r, channelwise, atol=scale.max().item() * 0.51, rtol=0)


def test_reparameterize_keeps_layernorm_linear_function():
    torch.manual_seed(0)
    norm, fc1, fc2 = nn.LayerNorm(16), nn.Linear(16, 8), nn.Linear(16, 4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 3.0)
        norm.bias.normal_()
    x = torch.randn(10, 16)
    before = (fc1(norm(x)), fc2(norm(x)))
    _, scale, zero = _channel_params()
    r, b, _, _ = reparam_factors(scale, zero)
    reparameterize(norm, [fc1, fc2], r, b)
    torch.testing.assert_close(fc1(norm(x)), before[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fc2(norm(x)), before[1], atol=1e-4, rtol=1e-4)


def test_reparameterize_needs_biases():
    r, b = torch.ones(4), torch.zeros(4)
    with pytest.raises(TypeError, match="bias"):
        reparameterize(nn.LayerNorm(4), [nn.Linear(4, 2, bias=False)], r, b)


def test_crl_clips_to_the_band_and_infinite_k_is_repq():
    _, scale, zero = _channel_params()
    assert clip_channel_params(scale, zero, math.inf) == (scale, zero)
    k = 1.0
    s, z = clip_channel_params(scale, zero, k)
    assert (s <= scale.mean() + k * scale.std(unbiased=False) + 1e-6).all()
    assert (s >= scale.mean() - k * scale.std(unbiased=False) - 1e-6).all()
    assert (s > 0).all() and torch.equal(z, z.round())
    assert s[3] < scale[3]  # the outlier channel is clipped
    in_band = (scale - scale.mean()).abs() <= k * scale.std(unbiased=False)
    torch.testing.assert_close(s[in_band], scale[in_band])


@pytest.mark.parametrize("post_ln", ["repq", "crl"])
@pytest.mark.parametrize("family", sorted(models.FAMILIES))
def test_reparameterised_model_in_float_computes_the_original_function(family, post_ln):
    model = models.FAMILIES[family]()
    x = models.images(8, seed=1)
    expected = models.logits(model, x)
    config = LRPQConfig(post_ln=post_ln, crl_k=0.5)
    adapter = find_family(model)
    layout = adapter.layout(model)
    prepare_model(model, adapter, layout, BitPlan.fixed(layout, 4, 4), config)
    norm_before = {n: model.get_submodule(n).weight.clone() for n, _ in layout.post_ln}
    calibrate(model, adapter, layout, config, models.images(32, seed=2))
    # the model really was changed: every post-LN LayerNorm is rescaled and its quantizers are layer-wise
    for n, linears in layout.post_ln:
        assert not torch.equal(model.get_submodule(n).weight, norm_before[n])
        assert all(not model.get_submodule(m).input_quantizer.channelwise for m in linears)
    with quantizers_disabled(model):
        torch.testing.assert_close(models.logits(model, x), expected, atol=5e-5, rtol=1e-4)


def test_swin_patch_merging_reduction_gets_a_bias_for_reparam():
    model = models.hf_swin()
    adapter = find_family(model)
    layout = adapter.layout(model)
    prepare_model(model, adapter, layout, BitPlan.fixed(layout, 4, 4), LRPQConfig(post_ln="repq"))
    reduction = model.swin.encoder.layers[0].downsample.reduction
    assert isinstance(reduction, QuantLinear) and reduction.bias is not None and not reduction.bias.any()


def test_mixed_bits_in_one_group_share_the_reparameterised_range():
    model = models.hf_vit()
    adapter = find_family(model)
    layout = adapter.layout(model)
    q, k, v = layout.post_ln[0][1]
    plan = BitPlan({**BitPlan.fixed(layout, 4, 4), k: PointBits(4, 6)})
    config = LRPQConfig(post_ln="repq")
    prepare_model(model, adapter, layout, plan, config)
    calibrate(model, adapter, layout, config, models.images(32, seed=2))
    qq, kq = model.get_submodule(q).input_quantizer, model.get_submodule(k).input_quantizer
    low_q, low_k = -qq.zero_point * qq.scale, -kq.zero_point * kq.scale
    high_q, high_k = low_q + 15 * qq.scale, low_k + 63 * kq.scale
    assert kq.bits == 6 and not kq.channelwise
    torch.testing.assert_close(high_k - low_k, high_q - low_q, rtol=1e-5, atol=0)
    assert abs(low_k - low_q) <= kq.scale / 2 + 1e-7


@pytest.mark.parametrize("family", ["hf_vit", "hf_swin", "timm_vit", "wrapped_timm_swin"])
def test_outlier_injection_keeps_the_function_and_widens_channels(family):
    from optimum_lrpqvit.outliers import channel_range_ratio, inject_outlier_channels

    model = models.FAMILIES[family]()
    x = models.images(8, seed=1)
    expected = models.logits(model, x)
    before = channel_range_ratio(model, x)
    chosen = inject_outlier_channels(model, factors=(20.0, 50.0))
    assert set(chosen) == set(before) and all(len(c) == 2 for c in chosen.values())
    torch.testing.assert_close(models.logits(model, x), expected, atol=1e-4, rtol=1e-4)
    after = channel_range_ratio(model, x)
    assert all(after[n] > 5 * before[n] for n in before)


@pytest.mark.parametrize("family", ["hf_swin", "hf_upernet", "hf_mask2former"])
def test_swin_blocks_that_pad_the_normed_map_stay_exact(family):
    model = models.FAMILIES[family]()
    x = torch.randn(3, 3, 20, 12, generator=torch.Generator().manual_seed(0))  # maps the windows do not divide
    expected = models.logits(model, x)
    config = LRPQConfig(post_ln="crl", crl_k=0.5)
    adapter = find_family(model)
    layout = adapter.layout(model)
    prepare_model(model, adapter, layout, BitPlan.fixed(layout, 4, 4), config)
    calibrate(model, adapter, layout, config, x)
    with quantizers_disabled(model):
        torch.testing.assert_close(models.logits(model, x), expected, atol=5e-5, rtol=1e-4)
        adapter.remove_pad_values(model)  # padding X' with 0 is what made it inexact
        assert (models.logits(model, x) - expected).abs().max() > 1e-3


def test_swin_checkpoints_without_pad_values_still_load_and_pad_with_zero(tmp_path):
    model = quantize(models.hf_swin(), LRPQConfig(), models.images(8))
    find_family(model).remove_pad_values(model)  # as versions before pad values saved it
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert not any(name.endswith("pad_value") for name, _ in loaded.named_buffers())
    x = torch.randn(2, 3, 20, 12)
    assert torch.equal(models.logits(loaded, x), models.logits(model, x))


def test_pad_values_are_saved_and_loaded_with_the_model(tmp_path):
    x = torch.randn(4, 3, 20, 12, generator=torch.Generator().manual_seed(3))
    model = quantize(models.hf_swin(), LRPQConfig(), x)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    pads = {n: b for n, b in loaded.named_buffers() if n.endswith("pad_value")}
    assert len(pads) == 6 and all(b.abs().max() > 0 for b in pads.values())
    assert torch.equal(models.logits(loaded, x), models.logits(model, x))
