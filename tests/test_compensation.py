"""``compensate_activations``: the ridge solution (``compensated_weight``) and the sequential compensation through
``quantize`` on every classifier family."""

import models
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrpqvit import LRPQConfig, quantize
from optimum_lrpqvit import reconstruction as reconstruction_module
from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.rounding import compensated_weight


def _problem(out: int, columns: int, rows: int, seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, columns, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    x = torch.randn(rows, columns, generator=g, dtype=torch.float64)
    # an input error with a systematic part (a scale and an offset, as clipping and rounding give) and noise
    xq = 0.9 * x + 0.05 + 0.05 * torch.randn(rows, columns, generator=g, dtype=torch.float64)
    if bias:
        x, xq = (torch.cat([t, torch.ones(rows, 1, dtype=t.dtype)], 1) for t in (x, xq))
    return weight, b, x, xq


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 8), columns=st.integers(1, 12), seed=st.integers(0, 10**6), bias=st.booleans(),
       ridge=st.sampled_from([1e-3, 0.3, 3.0]))
def test_the_solution_satisfies_the_ridge_normal_equations(out, columns, seed, bias, ridge):
    """(Y − W* X̃) X̃ᵀ = λ (W* − W), Y = W X: the gradient of the ridge objective is zero."""
    weight, b, x, xq = _problem(out, columns, 3 * columns + 4, seed, bias)
    hessian, cross = xq.T @ xq, x.T @ xq
    w_new, b_new = compensated_weight(weight, b, hessian, cross, ridge)
    wb = weight if b is None else torch.cat([weight, b[:, None]], 1)
    solved = w_new.double() if b_new is None else torch.cat([w_new, b_new[:, None]], 1).double()
    lam = ridge * hessian.diagonal().mean()
    gradient = (wb @ x.T - solved @ xq.T) @ xq - lam * (solved - wb)
    assert (b_new is None) == (b is None)
    torch.testing.assert_close(gradient, torch.zeros_like(gradient), atol=1e-3 * float(wb.abs().max() * lam + 1), rtol=0)


@settings(max_examples=20, deadline=None)
@given(out=st.integers(1, 8), columns=st.integers(1, 12), seed=st.integers(0, 10**6), bias=st.booleans())
def test_unquantized_inputs_keep_the_weights(out, columns, seed, bias):
    weight, b, x, _ = _problem(out, columns, 2 * columns + 4, seed, bias)
    w_new, b_new = compensated_weight(weight, b, x.T @ x, x.T @ x)
    torch.testing.assert_close(w_new, weight.float(), atol=1e-5, rtol=1e-5)
    if bias:
        torch.testing.assert_close(b_new, b.float(), atol=1e-5, rtol=1e-5)


def test_the_compensated_layer_reproduces_the_float_output_better():
    weight, b, x, xq = _problem(6, 10, 200, 0, True)
    w_new, b_new = compensated_weight(weight, b, xq.T @ xq, x.T @ xq)
    target = x[:, :-1] @ weight.T + b
    before = (xq[:, :-1] @ weight.T + b - target).pow(2).sum()
    after = (xq[:, :-1] @ w_new.double().T + b_new.double() - target).pow(2).sum()
    assert after < 0.5 * before


def test_terms_of_the_wrong_shape_are_refused():
    weight, b, x, xq = _problem(3, 5, 20, 0, True)
    with pytest.raises(ValueError, match=r"must be \(6, 6\) for a weight of 5 input columns and a bias"):
        compensated_weight(weight, b, (xq.T @ xq)[:5, :5], (x.T @ xq)[:5, :5])


def _output_error(model, reference, x) -> float:
    return float((models.logits(model, x) - reference).pow(2).mean())


@pytest.mark.parametrize("family", sorted(models.FAMILIES))
def test_compensation_brings_the_quantized_model_closer_to_float(family):
    """On the calibration images, W4/A4 with gptq (dense models with their heads quantized where they have
    Linears): the output's error to float falls, and no hook is left."""
    calibration = models.images(16)
    head = {"quantize_head": True} if family in models.DENSE and family != "hf_upernet" else {}
    errors = {}
    for compensate in (False, True):
        model = models.FAMILIES[family]()
        reference = models.logits(model, calibration)
        quantize(model, LRPQConfig(w_bits=4, a_bits=4, weight_rounding="gptq", compensate_activations=compensate,
                                   **head), calibration)
        errors[compensate] = _output_error(model, reference, calibration)
        assert all(not m._forward_pre_hooks for m in model.modules())
    assert errors[True] < errors[False]


def test_a_linear_that_runs_once_per_decoder_layer_is_solved_over_all_its_calls():
    """Mask2Former applies its class predictor to every decoder layer's output: one solution over all the calls."""
    model = models.FAMILIES["hf_mask2former"]()
    predictor = model.class_predictor
    calls = []
    handle = predictor.register_forward_pre_hook(lambda _, args: calls.append(args[0]))
    models.logits(model, models.images(2))
    handle.remove()
    assert len(calls) > 1
    float_bias = predictor.bias.detach().clone()
    quantize(model, LRPQConfig(w_bits=4, a_bits=4, quantize_head=True, compensate_activations=True),
             models.images(8))
    assert not torch.equal(model.class_predictor.bias.detach(), float_bias)


def test_compensation_with_nearest_rounding_leaves_weights_on_their_grid():
    model = models.FAMILIES["hf_vit"]()
    calibration = models.images(8)
    reference = models.logits(model, calibration)
    quantize(model, LRPQConfig(w_bits=4, a_bits=8, compensate_activations=True), calibration)
    baseline = models.FAMILIES["hf_vit"]()
    quantize(baseline, LRPQConfig(w_bits=4, a_bits=8), calibration)
    assert all(m.weight_is_packed for m in model.modules() if hasattr(m, "weight_is_packed"))
    assert _output_error(model, reference, calibration) < _output_error(baseline, reference, calibration)


def test_compensation_composes_with_mixed_precision():
    model = models.FAMILIES["hf_deit"]()
    config = LRPQConfig(w_bits=4, a_bits=4, mixed_precision=True, allocation="budget", importance="random",
                        weight_rounding="gptq", compensate_activations=True)
    quantize(model, config, models.images(8))
    plan = model.config.quantization_config.bit_plan
    assert len({b["w_bits"] for b in plan.values()} - {None}) > 1


def test_block_reconstruction_targets_the_float_model_not_the_compensated_biases(monkeypatch):
    """Reconstruction's float model (its target) runs the float weights and biases, not the re-solved ones."""
    model = models.FAMILIES["hf_vit"]()
    calibration = models.images(8)
    reference = models.logits(model, calibration)
    family = find_family(model)
    seen = []
    original = reconstruction_module._float_weights

    def checked(model_, float_params):
        context = original(model_, float_params)

        class Check:
            def __enter__(self):
                context.__enter__()
                if not seen:
                    seen.append(family.logits(model_, calibration))

            def __exit__(self, *exc):
                return context.__exit__(*exc)
        return Check()

    monkeypatch.setattr(reconstruction_module, "_float_weights", checked)
    quantize(model, LRPQConfig(w_bits=4, a_bits=4, compensate_activations=True, reconstruction="block",
                               reconstruction_iters=2), calibration, progress=False)
    torch.testing.assert_close(seen[0], reference, atol=1e-4, rtol=1e-4)


def test_the_option_is_checked_before_anything_runs():
    with pytest.raises(ValueError, match="compensate_activations must be a bool, got 'yes'"):
        LRPQConfig(compensate_activations="yes")


def test_the_float_model_context_restores_every_parameter_and_folded_flag():
    """Reconstruction's float model swaps in weights and biases; leaving it restores both and each module's
    ``weight_folded`` (the units already tuned hold folded weights)."""
    from optimum_lrpqvit.bit_plan import BitPlan
    from optimum_lrpqvit.quantize import calibrate, prepare_model

    model = models.FAMILIES["hf_vit"]()
    family = find_family(model)
    config = LRPQConfig(w_bits=4, a_bits=4)
    layout = family.quantized_layout(model, config)
    prepare_model(model, family, layout, BitPlan.fixed(layout, 4, 4), config)
    calibrate(model, family, layout, config, models.images(8))
    modules = {n: model.get_submodule(n) for n in layout.weight_points()}
    for module in list(modules.values())[:len(modules) // 2]:
        module.fold_weight()
    before = {n: (m.weight_folded, dict(m._parameters)) for n, m in modules.items()}
    assert any(m.bias is not None and m.weight_folded for m in modules.values())
    float_params = {f"{n}.{k}": torch.nn.Parameter(p.detach().clone())
                    for n, m in modules.items() for k, p in m.named_parameters(recurse=False)}
    with reconstruction_module._float_weights(model, float_params):
        assert all(not m.weight_folded for m in modules.values())
    for name, module in modules.items():
        assert module.weight_folded == before[name][0]
        assert all(module._parameters[k] is p for k, p in before[name][1].items())
