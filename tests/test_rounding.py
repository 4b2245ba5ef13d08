"""GPTQ weight rounding: the math (``gptq_round``), the input Hessians, and ``weight_rounding="gptq"`` through
``quantize``."""

import models
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrpqvit import LRPQConfig, quantize
from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.nn import UniformQuantizer, packed_weight_tensors
from optimum_lrpqvit.quantizers import fake_quant_uniform, search_uniform_params, weight_columns
from optimum_lrpqvit.rounding import gptq_round, input_hessians


def _grid(weight: torch.Tensor, bits: int):
    return search_uniform_params(weight_columns(weight), bits, channelwise=True)


def _nearest(weight: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    return fake_quant_uniform(weight.t(), scale, zero, bits).t()


def _objective(weight, rounded, hessian) -> float:
    delta = (weight - rounded).double()
    return float(torch.einsum("oi,ij,oj->", delta, hessian.double(), delta))


def _correlated_inputs(n: int, columns: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(columns // 4, columns, generator=g)
    return torch.randn(n, columns // 4, generator=g) @ basis + 0.1 * torch.randn(n, columns, generator=g)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), out=st.integers(1, 12), columns=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_a_diagonal_hessian_gives_round_to_nearest(bits, out, columns, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, columns, generator=g)
    hessian = torch.diag(torch.rand(columns, generator=g) + 0.1)
    scale, zero = _grid(weight, bits)
    assert torch.equal(gptq_round(weight, hessian, scale, zero, bits), _nearest(weight, scale, zero, bits))


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), out=st.integers(1, 12), columns=st.integers(4, 40), seed=st.integers(0, 10**6))
def test_the_result_is_on_the_weight_grid(bits, out, columns, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, columns, generator=g)
    x = _correlated_inputs(64, columns, seed)
    quantizer = UniformQuantizer(bits, channelwise=True)
    quantizer.set_params(*_grid(weight, bits))
    rounded = gptq_round(weight, x.T @ x, quantizer.scale, quantizer.zero_point, bits)
    packed_weight_tensors(rounded, quantizer)  # raises unless every value is s · (q − z) with q in [0, 2^b − 1]


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlated_inputs_lose_less_than_round_to_nearest(bits, seed):
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(seed))
    x = _correlated_inputs(512, 64, seed)
    hessian = x.T @ x
    scale, zero = _grid(weight, bits)
    nearest = _objective(weight, _nearest(weight, scale, zero, bits), hessian)
    gptq = _objective(weight, gptq_round(weight, hessian, scale, zero, bits), hessian)
    assert gptq < 0.7 * nearest


def test_inputs_that_are_always_zero_are_rounded_to_nearest():
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    x = _correlated_inputs(128, 16, 0)
    x[:, [3, 11]] = 0
    scale, zero = _grid(weight, 4)
    rounded = gptq_round(weight, x.T @ x, scale, zero, 4)
    assert torch.isfinite(rounded).all()
    nearest = _nearest(weight, scale, zero, 4)
    assert torch.equal(rounded[:, [3, 11]], nearest[:, [3, 11]])


def test_the_block_size_does_not_change_the_result():
    weight = torch.randn(16, 40, generator=torch.Generator().manual_seed(3))
    x = _correlated_inputs(256, 40, 3)
    scale, zero = _grid(weight, 3)
    results = [gptq_round(weight, x.T @ x, scale, zero, 3, block=b) for b in (1, 7, 128)]
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_a_hessian_of_the_wrong_shape_is_refused():
    weight = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"Hessian has shape \(6, 6\), the weight 8 input columns"):
        gptq_round(weight, torch.eye(6), *_grid(weight, 4), 4)


def test_input_hessians_are_the_layer_inputs_and_leave_no_hooks():
    model = models.FAMILIES["hf_vit"]()
    family = find_family(model)
    layout = family.layout(model)
    quantize(model, LRPQConfig(w_bits=8, a_bits=8), models.images(4))
    x = models.images(3, seed=2)
    seen = {}
    (_, (q, k, v)), (_, (fc1,)) = layout.post_ln[:2]
    fc2 = layout.linears[1]
    assert fc2.endswith("fc2")
    fc2 = model.get_submodule(fc2)

    def record(_, args):
        seen.setdefault("x", args[0].reshape(-1, args[0].shape[-1]))

    handle = fc2.register_forward_pre_hook(record)
    with input_hessians(model, layout) as hessians:
        family.logits(model, x)
    handle.remove()
    torch.testing.assert_close(hessians[layout.linears[1]], seen["x"].T @ seen["x"])
    assert hessians[q] is hessians[k] is hessians[v]  # one LayerNorm output, one Hessian
    assert hessians[fc1] is not hessians[q]
    patch = layout.patch_embed
    assert hessians[patch].shape == (3 * 4 * 4, 3 * 4 * 4)  # 3 channels, 4×4 patches
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["hf_vit", "hf_swin", "timm_vit"])
def test_gptq_through_quantize_reduces_the_layer_output_error(family):
    """Σ over layers of ‖(W − Ŵ) x‖² on the calibration inputs: GPTQ below round-to-nearest on the same grids."""
    calibration = models.images(16)
    errors = {}
    for rounding in ("nearest", "gptq"):
        model = models.FAMILIES[family]()
        reference = {n: p.detach().clone() for n, p in model.named_parameters()}
        quantize(model, LRPQConfig(w_bits=3, a_bits=8, post_ln="layerwise", weight_rounding=rounding), calibration)
        fam = find_family(model)
        layout = fam.layout(model)
        with input_hessians(model, layout) as hessians:
            fam.logits(model, calibration)
        errors[rounding] = sum(
            _objective(reference[f"{name}.weight"].reshape(len(reference[f"{name}.weight"]), -1),
                       model.get_submodule(name).quantized_weight().reshape(len(reference[f"{name}.weight"]), -1),
                       hessians[name])
            for name in layout.weight_points() if name in hessians)
    assert errors["gptq"] < 0.9 * errors["nearest"]


@pytest.mark.parametrize("failing, options", [("gptq_round", {"weight_rounding": "gptq"}),
                                              ("compensated_weight", {"compensate_activations": True})])
def test_a_failed_rounding_leaves_the_float_model(monkeypatch, failing, options):
    model = models.FAMILIES["hf_vit"]()
    x = models.images(4, seed=1)
    before = models.logits(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(f"optimum_lrpqvit.rounding.{failing}", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        quantize(model, LRPQConfig(**options), models.images(8))
    assert torch.equal(models.logits(model, x), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_an_unknown_rounding_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"weight_rounding must be one of \('nearest', 'gptq'\), got 'gtpq'"):
        LRPQConfig(weight_rounding="gtpq")


def test_gptq_and_adalog_compose_with_mixed_precision():
    model = models.FAMILIES["hf_deit"]()
    config = LRPQConfig(w_bits=4, a_bits=4, mixed_precision=True, allocation="budget", importance="random",
                        weight_rounding="gptq", softmax_quantizer="adalog")
    quantize(model, config, models.images(8))
    plan = model.config.quantization_config.bit_plan
    assert len({b["w_bits"] for b in plan.values()} - {None}) > 1
    assert all(m.weight_is_packed for m in model.modules() if hasattr(m, "weight_is_packed"))
