import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrpqvit.quantizers import (
    ADALOG_DENOMINATOR,
    DEFAULT_PERCENTILES,
    centered_codes,
    check_bits,
    dequantize_log_shift,
    dequantize_log_sqrt2,
    dequantize_log_sqrt2_shift,
    dequantize_uniform,
    fake_quant_log,
    fake_quant_log_sqrt2,
    fake_quant_uniform,
    log_thresholds,
    quantize_log,
    quantize_log_sqrt2,
    quantize_uniform,
    search_adalog_params,
    search_log_sqrt2_delta,
    search_uniform_params,
    sorted_quantiles,
    uniform_params,
)

bits_st = st.integers(2, 8)
floats = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(bits=bits_st, low=st.floats(-50, 0, width=32), width=st.floats(0.0625, 100, width=32),
       xs=st.lists(st.floats(0, 1, width=32), min_size=1, max_size=50))
def test_uniform_round_trip_error_at_most_half_step_inside_range(bits, low, width, xs):
    scale, zero = uniform_params(torch.tensor(low), torch.tensor(low + width), bits)
    lo, hi = (-zero * scale).item(), ((2**bits - 1 - zero) * scale).item()
    x = torch.tensor(xs) * (hi - lo) + lo
    err = (fake_quant_uniform(x, scale, zero, bits) - x).abs()
    # half a step, plus float32's rounding of x itself where |x| is large against the step (x = −33.96, s = 0.029)
    assert (err <= scale / 2 * (1 + 1e-4) + 4 * torch.finfo(torch.float32).eps * x.abs().max() + 1e-6).all()


@settings(max_examples=60, deadline=None)
@given(bits=bits_st, xs=st.lists(floats, min_size=2, max_size=64))
def test_uniform_fake_quant_is_idempotent_and_monotone(bits, xs):
    x = torch.tensor(xs)
    scale, zero = search_uniform_params(x, bits)
    y = fake_quant_uniform(x, scale, zero, bits)
    assert torch.equal(fake_quant_uniform(y, scale, zero, bits), y)
    order = x.argsort()
    assert (y[order].diff() >= 0).all()


@settings(max_examples=40, deadline=None)
@given(bits=bits_st, xs=st.lists(floats, min_size=1, max_size=64))
def test_codes_and_dequantize_match_fake_quant(bits, xs):
    x = torch.tensor(xs)
    scale, zero = search_uniform_params(x, bits)
    q = quantize_uniform(x, scale, zero, bits)
    assert int(q.max()) <= 2**bits - 1
    torch.testing.assert_close(dequantize_uniform(q, scale, zero), fake_quant_uniform(x, scale, zero, bits))



@settings(max_examples=40, deadline=None)
@given(bits=bits_st, channelwise=st.booleans(), xs=st.lists(floats, min_size=4, max_size=64))
def test_centered_codes_are_the_integer_codes_less_the_zero_point(bits, channelwise, xs):
    x = torch.tensor(xs[: len(xs) // 2 * 2]).reshape(-1, 2)
    scale, zero = search_uniform_params(x, bits, channelwise=channelwise)
    c = centered_codes(x, scale, zero, bits)
    assert torch.equal(c, quantize_uniform(x, scale, zero, bits).float() - zero)
    assert torch.equal(c * scale, fake_quant_uniform(x, scale, zero, bits))  # bit for bit: x̂ = s · (q − z)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_log_sqrt2_shift_form_equals_power_form_for_every_code(bits):
    delta = torch.tensor(0.73)
    q = torch.arange(0, 2**bits + 1)
    power, shift = dequantize_log_sqrt2(q, delta, bits), dequantize_log_sqrt2_shift(q, delta, bits)
    normal = (power == 0) | (power >= torch.finfo(torch.float32).tiny)  # 8-bit codes > 252 are subnormal
    assert normal.sum() >= min(2**bits + 1, 253)
    assert torch.equal(power[normal], shift[normal])
    torch.testing.assert_close(power, shift, rtol=0, atol=1e-44)


@settings(max_examples=60, deadline=None)
@given(bits=bits_st, xs=st.lists(st.floats(0, 1, width=32), min_size=1, max_size=64))
def test_log_sqrt2_fake_quant_equals_codes_then_shift_form(bits, xs):
    x = torch.tensor(xs)
    delta = search_log_sqrt2_delta(x.clamp_min(1e-6), bits)
    expected = dequantize_log_sqrt2_shift(quantize_log_sqrt2(x, delta, bits), delta, bits)
    got = fake_quant_log_sqrt2(x, delta, bits)
    normal = (expected == 0) | (expected >= torch.finfo(torch.float32).tiny)  # see dequantize_log_sqrt2_shift
    assert torch.equal(got[normal], expected[normal])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-44)


def test_log_sqrt2_zero_and_underflow_dequantize_to_zero():
    delta = torch.tensor(1.0)
    x = torch.tensor([0.0, 2.0 ** -20, 1.0, 0.5, 2.0])
    y = fake_quant_log_sqrt2(x, delta, 4)  # codes 0..15 cover [2^-7.5, 1]
    assert y.tolist() == [0.0, 0.0, 1.0, 0.5, 1.0]


def test_sorted_quantiles_match_torch_quantile():
    x = torch.randn(1001, 7, generator=torch.Generator().manual_seed(0))
    ps = [0.001, 1 - 0.99999, 0.5, 0.999, 0.9999, 0.99999]
    expected = torch.stack([torch.quantile(x, p, dim=0) for p in ps])
    assert torch.equal(sorted_quantiles(x.sort(dim=0).values, ps), expected)


def _reference_search(column: torch.Tensor, bits: int, percentiles) -> tuple[float, float]:
    """Obviously-correct per-channel search with torch.quantile, one channel at a time."""
    best = None
    for p in percentiles:
        low, high = torch.quantile(column, 1 - p), torch.quantile(column, p)
        scale = (high - low) / (2**bits - 1)
        zero = torch.round(-low / scale)
        xq = (torch.clamp(torch.round(column / scale) + zero, 0, 2**bits - 1) - zero) * scale
        err = ((xq - column) ** 2).mean()
        if best is None or err < best[0]:
            best = (err, scale.item(), zero.item())
    return best[1], best[2]


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_vectorised_channel_search_equals_per_channel_loop(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(500, 12, generator=g) * torch.linspace(0.1, 20, 12) + torch.linspace(-3, 3, 12)
    pct = (0.9, 0.99, 0.999)
    scale, zero = search_uniform_params(x, bits, channelwise=True, percentiles=pct)
    for c in range(x.shape[1]):
        s, z = _reference_search(x[:, c], bits, pct)
        assert math.isclose(scale[c].item(), s, rel_tol=1e-5) and zero[c].item() == z


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_and_zero_channels_get_finite_scales(bits):
    x = torch.randn(100, 4)
    x[:, 1] = 0.0
    x[:, 2] = 3.5
    x[:, 3] = -2.0
    scale, zero = search_uniform_params(x, bits, channelwise=True)
    assert torch.isfinite(scale).all() and (scale > 0).all() and torch.isfinite(zero).all()
    y = fake_quant_uniform(x, scale, zero, bits)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 1:], x[:, 1:])


def test_per_tensor_search_on_all_zero_tensor_is_finite():
    scale, zero = search_uniform_params(torch.zeros(10, 3), 4)
    assert torch.isfinite(scale) and scale > 0 and zero == 0


@pytest.mark.parametrize("bad", [1, 9, 0, 4.0, True, "4", None])
def test_bits_outside_2_to_8_are_rejected(bad):
    with pytest.raises(ValueError, match="between 2 and 8"):
        check_bits(bad)


def test_empty_tensor_cannot_be_calibrated():
    with pytest.raises(ValueError, match="empty"):
        search_uniform_params(torch.empty(0, 3), 4)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(1, 64), d=st.sampled_from([2, 7, 32]))
def test_log_shift_form_is_the_power_form(bits, n, d):
    delta = torch.tensor(0.81)
    codes = torch.arange(2**bits + 1)
    levels = dequantize_log_shift(codes, delta, bits, n, d).double()
    expected = 0.81 * torch.exp2(-codes.double() * n / d)
    expected[-1] = 0.0
    normal = expected >= torch.finfo(torch.float32).tiny
    torch.testing.assert_close(levels[normal], expected[normal], rtol=2e-7, atol=0)
    assert levels[-1] == 0


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(1, 64),
       xs=st.lists(st.floats(1e-6, 1.0), min_size=1, max_size=64))
def test_log_codes_round_the_log_to_the_nearest_code(bits, n, xs):
    x, delta, e = torch.tensor(xs), torch.tensor(0.9), n / ADALOG_DENOMINATOR
    codes = quantize_log(x, delta, bits, n, ADALOG_DENOMINATOR)
    exact = -torch.log2(x.double() / 0.9) / e
    away = ((exact - exact.floor()) - 0.5).abs() > 1e-4  # not within float rounding of a boundary
    expected = exact.round().clamp(0, 2**bits)
    assert torch.equal(codes[away], expected[away].long())


def test_log_sqrt2_is_the_log_quantizer_of_exponent_one_half():
    x = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    delta = torch.tensor(0.7)
    assert torch.equal(fake_quant_log_sqrt2(x, delta, 4), fake_quant_log(x, delta, 4, 1, 2))


def _mse(approx, x) -> float:
    return (approx - x).double().pow(2).mean().item()


def _brute_force_adalog(x, bits, percentiles):
    xs = x.reshape(-1, 1).sort(0).values
    best = None
    for delta in sorted_quantiles(xs, [*percentiles, 1.0]).reshape(-1).clamp_min(1e-8):
        for n in range(1, 2 * ADALOG_DENOMINATOR + 1):
            err = _mse(fake_quant_log(x, delta, bits, n, ADALOG_DENOMINATOR), x)
            if best is None or err < best[0] * (1 - 1e-9):
                best = (err, float(delta), n)
    return best


@settings(max_examples=15, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 10**6), temperature=st.floats(0.5, 5))
def test_adalog_search_finds_the_lowest_error_base(bits, seed, temperature):
    x = torch.softmax(torch.randn(6, 30, generator=torch.Generator().manual_seed(seed)) * temperature, -1)
    delta, n = search_adalog_params(x, bits)
    err = _mse(fake_quant_log(x, delta, bits, n, ADALOG_DENOMINATOR), x)
    assert err <= _brute_force_adalog(x, bits, DEFAULT_PERCENTILES)[0] * (1 + 1e-6) + 1e-15


@settings(max_examples=10, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 10**6), temperature=st.floats(0.5, 5))
def test_adalog_is_never_worse_than_log_sqrt2(bits, seed, temperature):
    """Log-√2 (n/d = ½, the same Δ candidates) is one of AdaLog's candidates."""
    x = torch.softmax(torch.randn(8, 40, generator=torch.Generator().manual_seed(seed)) * temperature, -1)
    delta, n = search_adalog_params(x, bits)
    adalog = _mse(fake_quant_log(x, delta, bits, n, ADALOG_DENOMINATOR), x)
    sqrt2 = _mse(fake_quant_log_sqrt2(x, search_log_sqrt2_delta(x, bits), bits), x)
    assert adalog <= sqrt2 * (1 + 1e-6) + 1e-15


def test_adalog_spends_8_bits_on_resolution():
    x = torch.softmax(torch.randn(16, 4, 50, 50, generator=torch.Generator().manual_seed(0)) * 3, -1)
    delta, n = search_adalog_params(x, 8)
    adalog = (fake_quant_log(x, delta, 8, n, ADALOG_DENOMINATOR) - x).pow(2).mean()
    sqrt2 = (fake_quant_log_sqrt2(x, search_log_sqrt2_delta(x, 8), 8) - x).pow(2).mean()
    assert n < ADALOG_DENOMINATOR // 2 and adalog < sqrt2 / 10


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(1, 64), delta=st.floats(1e-3, 10.0), seed=st.integers(0, 10**6))
def test_log_codes_count_the_boundaries_above_x_exactly(bits, n, delta, seed):
    """The log-and-correct code equals the binary search over the boundaries, at the boundaries themselves, their
    float32 neighbours, zero, negatives, infinities and random values."""
    delta = torch.tensor(delta)
    boundaries = log_thresholds(delta, bits, n, ADALOG_DENOMINATOR)
    random = delta * torch.rand(200, generator=torch.Generator().manual_seed(seed)) ** 4 * 1.5
    x = torch.cat([boundaries, torch.nextafter(boundaries, torch.tensor(0.0)),
                   torch.nextafter(boundaries, torch.tensor(math.inf)), random,
                   torch.tensor([0.0, -1e-8, -1.0, math.inf, 1e-38, 1e-45])])
    expected = 2**bits - torch.bucketize(x, boundaries.flip(0), right=True)
    assert torch.equal(quantize_log(x, delta, bits, n, ADALOG_DENOMINATOR), expected)
