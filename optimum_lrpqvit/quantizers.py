"""Quantizer math for LRP-QViT (``docs/method.md#quantizers``).

Uniform asymmetric quantization and log-√2 quantization as used by RepQ-ViT (Li et al., ICCV 2023,
arXiv 2212.08254) and LRP-QViT (Ranjan & Savakis, arXiv 2401.11243). Everything here is a pure function
of tensors; ranges are chosen by a percentile/MSE search that is vectorised over channels.

Conventions: per-channel statistics are taken over dim 0 of a 2-D ``(samples, channels)`` view;
a per-tensor search is the one-channel case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "DEFAULT_PERCENTILES",
    "MAX_BITS",
    "MIN_BITS",
    "check_bits",
    "sorted_quantiles",
    "uniform_params",
    "search_uniform_params",
    "centered_codes",
    "fake_quant_uniform",
    "fake_quant_weight",
    "uniform_codes",
    "quantize_uniform",
    "dequantize_uniform",
    "search_log_sqrt2_delta",
    "ADALOG_DENOMINATOR",
    "search_adalog_params",
    "log_thresholds",
    "log_levels",
    "quantize_log",
    "dequantize_log_shift",
    "fake_quant_log",
    "log_sqrt2_levels",
    "log_sqrt2_thresholds",
    "quantize_log_sqrt2",
    "dequantize_log_sqrt2",
    "dequantize_log_sqrt2_shift",
    "fake_quant_log_sqrt2",
    "weight_columns",
]

DEFAULT_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)
MIN_BITS, MAX_BITS = 2, 8
ADALOG_DENOMINATOR = 32  # AdaLog's base 2^(n/d): d table constants at inference, exponents n/d from 1/32 to 2
_TINY = 1e-8


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if it is an int in [MIN_BITS, MAX_BITS] = [2, 8], else raise ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer between {MIN_BITS} and {MAX_BITS}, got {bits!r}.")
    return bits


def sorted_quantiles(x_sorted: torch.Tensor, ps: Sequence[float]) -> torch.Tensor:
    """Quantiles of each column of an ascending-sorted ``(n, c)`` tensor, shape ``(len(ps), c)``.

    Bit-identical to ``torch.quantile`` (linear interpolation), without its input-size limit and sorting
    only once for all ``ps``.
    """
    n = x_sorted.shape[0]
    # ranks as torch.quantile computes them: p rounded to the input dtype, then multiplied in float64
    pos = torch.tensor(list(ps), dtype=x_sorted.dtype).double() * (n - 1)
    lo, hi = pos.floor(), pos.ceil()
    weight = (pos - lo).to(device=x_sorted.device, dtype=x_sorted.dtype).unsqueeze(1)
    return torch.lerp(x_sorted[lo.long()], x_sorted[hi.long()], weight)


def uniform_params(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for the range [low, high]: s = (u − l)/(2^b − 1), z = round(−l/s).

    A degenerate range (u ≈ l, e.g. a constant channel) is widened to include 0, and an all-zero one
    to [0, 1], so the scale is always finite and positive.
    """
    degenerate = (high - low) <= _TINY * torch.maximum(low.abs(), high.abs()).clamp_min(1.0)
    low = torch.where(degenerate, low.clamp_max(0.0), low)
    high = torch.where(degenerate, high.clamp_min(0.0), high)
    high = torch.where(high - low <= _TINY, low + 1.0, high)
    scale = (high - low) / (2**bits - 1)
    zero_point = torch.round(-low / scale)
    return scale, zero_point


def centered_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """q − z = clamp(round(x/s), −z, 2^b − 1 − z) in x's float dtype: the codes q = clamp(round(x/s) + z, 0,
    2^b − 1) less the zero point. x̂ = s · (q − z) (``fake_quant_uniform``), so a product of two quantized tensors
    is s_a · s_b · Σ (q_a − z_a)(q_b − z_b): integer products, exact in float32 while the sums stay below 2^24."""
    if zero_point.dim() == 0:
        # Per tensor, with Python scalars (tensor bounds are several times slower). Clamping x to
        # [−z·s, (2^b − 1 − z)·s] before rounding gives the same codes, since the bounds are integers.
        s, z = float(scale), float(zero_point)
        return torch.clamp(x, -z * s, (2**bits - 1 - z) * s).div_(s).round_()
    q = torch.div(x, scale).round_()
    q = torch.maximum(q, -zero_point, out=q)
    return torch.minimum(q, (2**bits - 1) - zero_point, out=q)


def fake_quant_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """x̂ = s · (clamp(round(x/s) + z, 0, 2^b − 1) − z) = s · ``centered_codes``."""
    if zero_point.dim() == 0:
        return centered_codes(x, scale, zero_point, bits).mul_(float(scale))
    return centered_codes(x, scale, zero_point, bits).mul_(scale)


def uniform_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Unclamped codes round(x/s) + z, in x's float dtype (values outside [0, 2^b − 1] are off the grid)."""
    return torch.round(x / scale) + zero_point


def quantize_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes q = clamp(round(x/s) + z, 0, 2^b − 1) as uint8."""
    return uniform_codes(x, scale, zero_point).clamp_(0, 2**bits - 1).to(torch.uint8)


def dequantize_uniform(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """x̂ = s · (q − z)."""
    return (q.to(scale.dtype) - zero_point) * scale


def _as_columns(x: torch.Tensor, channelwise: bool) -> torch.Tensor:
    x = x.detach().float()
    return x.reshape(-1, x.shape[-1]) if channelwise else x.reshape(-1, 1)


def search_uniform_params(
    x: torch.Tensor,
    bits: int,
    channelwise: bool = False,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile/MSE range search.

    For each p, the range is [quantile(1 − p), quantile(p)]; the range with the lowest MSE(x, x̂) is kept,
    independently per channel. ``channelwise`` takes one range per last-dim channel, statistics over all
    other dims. Returns (scale, zero_point) of shape ``(C,)`` or ``()``.
    """
    cols = _as_columns(x, channelwise)
    if cols.numel() == 0:
        raise ValueError("Cannot calibrate a quantizer on an empty tensor.")
    xs = cols.sort(dim=0).values
    lows = sorted_quantiles(xs, [1.0 - p for p in percentiles])
    highs = sorted_quantiles(xs, list(percentiles))
    best_err = best_scale = best_zero = None
    for low, high in zip(lows, highs):
        scale, zero = uniform_params(low, high, bits)
        err = (fake_quant_uniform(cols, scale, zero, bits) - cols).pow_(2).mean(dim=0)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    if not channelwise:
        return best_scale.reshape(()), best_zero.reshape(())
    return best_scale, best_zero


def weight_columns(weight: torch.Tensor) -> torch.Tensor:
    """The ``(fan_in, out_channels)`` view of a Linear or Conv weight: one quantizer channel per output channel."""
    return weight.detach().reshape(weight.shape[0], -1).t()


@torch.no_grad()
def fake_quant_weight(weight: torch.Tensor, bits: int,
                      percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> torch.Tensor:
    """Ŵ: per-output-channel uniform quantization of ``weight`` to ``bits`` with the range search, as the
    quantized Linear and Conv layers calibrate it, in float32 and the weight's shape."""
    cols = weight_columns(weight.float())
    scale, zero = search_uniform_params(cols, bits, channelwise=True, percentiles=percentiles)
    return fake_quant_uniform(cols, scale, zero, bits).t().reshape(weight.shape)


def log_thresholds(delta: torch.Tensor, bits: int, numerator: int, denominator: int) -> torch.Tensor:
    """The 2^b code boundaries T_k = Δ · 2^(−(k + ½)·e), e = numerator/denominator, k = 0 … 2^b − 1 (descending,
    float32): between the levels of codes k and k + 1, where round(−log2(x/Δ)/e) steps. Computed in float64 and
    rounded once, so that the codes do not depend on any library's log2."""
    k = torch.arange(2**bits, dtype=torch.float64, device=delta.device)
    return (torch.exp2(-(k + 0.5) * numerator / denominator) * delta.double()).float()


def quantize_log(x: torch.Tensor, delta: torch.Tensor, bits: int, numerator: int, denominator: int) -> torch.Tensor:
    """Base-2^e log codes q = round(−log2(x/Δ)/e) clamped to [0, 2^b], e = numerator/denominator, computed exactly
    as q = #{k : x < T_k} (``log_thresholds``); the code 2^b is the zero code (x ≤ 0 or below the smallest
    boundary). int64.

    The count is found from the float32 log, which is within one code of it, and corrected by comparing x with the
    two boundaries around that code (an order of magnitude faster than a binary search over 2^b boundaries); where
    the smallest boundary is below float32's normal range, by the binary search."""
    boundaries = log_thresholds(delta, bits, numerator, denominator).to(x.dtype)
    top = 2**bits
    if bool(boundaries[-1] < torch.finfo(x.dtype).tiny):
        return top - torch.bucketize(x, boundaries.flip(0), right=True)
    flat = x.reshape(-1)
    approx = torch.log2(flat / delta.to(x.dtype)).mul_(-denominator / numerator).add_(0.5)
    q = torch.nan_to_num_(approx, nan=top, posinf=top, neginf=0.0).floor_().clamp_(0, top).long()
    ext = torch.cat([boundaries, boundaries.new_full((1,), -math.inf)])  # T_{2^b} = −∞: nothing is below it
    q += ext.index_select(0, q) > flat  # x < T_q: one more boundary above x
    q -= ((q > 0) & (ext.index_select(0, (q - 1).clamp_(min=0)) <= flat)).long()  # x ≥ T_{q−1}: one fewer
    return q.reshape(x.shape)


def dequantize_log_shift(q: torch.Tensor, delta: torch.Tensor, bits: int, numerator: int,
                         denominator: int) -> torch.Tensor:
    """Inference form of x̂ = Δ · 2^(−q·n/d): Δ · 2^(−⌊q·n/d⌋) · τ[(q·n) mod d] with the d constants
    τ[j] = 2^(−j/d) (float32): a right shift and one table lookup; 0 for the zero code 2^b. It defines the levels
    (``log_levels``)."""
    q = q.to(torch.int64)
    table = torch.exp2(-torch.arange(denominator, dtype=torch.float64, device=delta.device) / denominator)
    fraction = table.to(delta.dtype)[(q * numerator) % denominator]
    shifted = torch.ldexp(torch.ones_like(q, dtype=delta.dtype), -((q * numerator) // denominator))
    return torch.where(q >= 2**bits, torch.zeros_like(shifted), delta * shifted * fraction)


def log_levels(delta: torch.Tensor, bits: int, numerator: int, denominator: int) -> torch.Tensor:
    """The value of every code, ``(2^b + 1,)``: Δ · 2^(−q·n/d) for q < 2^b (``dequantize_log_shift``), 0 for the
    zero code 2^b."""
    return dequantize_log_shift(torch.arange(2**bits + 1, device=delta.device), delta, bits, numerator, denominator)


def fake_quant_log(x: torch.Tensor, delta: torch.Tensor, bits: int, numerator: int, denominator: int) -> torch.Tensor:
    """x̂ = Δ · 2^(−q·n/d) with the codes of ``quantize_log``; codes ≥ 2^b (and x = 0) give 0."""
    levels = log_levels(delta, bits, numerator, denominator).to(x.dtype)
    return levels.index_select(0, quantize_log(x, delta, bits, numerator, denominator).reshape(-1)).reshape(x.shape)


def log_sqrt2_thresholds(delta: torch.Tensor, bits: int) -> torch.Tensor:
    """``log_thresholds`` of base √2 (e = ½): T_k = Δ · 2^(−(k + ½)/2)."""
    return log_thresholds(delta, bits, 1, 2)


def quantize_log_sqrt2(x: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    """Log-√2 codes q = round(−2·log2(x/Δ)) clamped to [0, 2^b] (``quantize_log`` with e = ½); 2^b is the zero
    code. int64."""
    return quantize_log(x, delta, bits, 1, 2)


def log_sqrt2_levels(delta: torch.Tensor, bits: int) -> torch.Tensor:
    """The value of every code, ``(2^b + 1,)``: Δ · 2^(−q/2) for q < 2^b and 0 for the zero code 2^b."""
    return log_levels(delta, bits, 1, 2)


def dequantize_log_sqrt2(q: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    """x̂ = Δ · 2^(−q/2), and 0 for the code 2^b."""
    return log_sqrt2_levels(delta, bits)[q.long()]


def dequantize_log_sqrt2_shift(q: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    """Inference form: Δ · 2^(−⌊q/2⌋) · (2^(−½) if q is odd else 1) — a right shift and one constant multiply
    (``dequantize_log_shift`` with e = ½)."""
    return dequantize_log_shift(q, delta, bits, 1, 2)


def fake_quant_log_sqrt2(x: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    """x̂ = Δ · 2^(−q/2) with q = clamp(round(−2·log2(x/Δ)), 0, 2^b − 1) (``quantize_log_sqrt2``); codes ≥ 2^b
    (and x = 0) give 0."""
    return fake_quant_log(x, delta, bits, 1, 2)


def search_log_sqrt2_delta(
    x: torch.Tensor, bits: int, percentiles: Sequence[float] = DEFAULT_PERCENTILES
) -> torch.Tensor:
    """Δ = quantile(x, p) for the p with the lowest MSE(x, x̂) (per tensor)."""
    cols = _as_columns(x, channelwise=False)
    if cols.numel() == 0:
        raise ValueError("Cannot calibrate a quantizer on an empty tensor.")
    xs = cols.sort(dim=0).values
    best_err = best_delta = None
    for delta in sorted_quantiles(xs, list(percentiles)).reshape(-1):
        delta = delta.clamp_min(_TINY)
        err = (fake_quant_log_sqrt2(cols, delta, bits) - cols).pow_(2).mean()
        if best_err is None or err < best_err:
            best_err, best_delta = err, delta
    return best_delta.reshape(())


def search_adalog_params(
    x: torch.Tensor, bits: int, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    denominator: int = ADALOG_DENOMINATOR,
) -> tuple[torch.Tensor, int]:
    """AdaLog's adaptive base (Wu et al., ECCV 2024, arXiv 2407.12951), per tensor: the (Δ, n) with the lowest
    MSE(x, x̂) of ``fake_quant_log(x, Δ, bits, n, denominator)`` over the base exponents n/d, n = 1 … 2d, and
    Δ = quantile(x, p) for p in ``percentiles`` and p = 1 (the largest value). For non-negative x (post-softmax).

    Exact for every candidate in one sort: the codes are monotone in x, so each code's values are a run of the
    sorted x, whose squared error to the code's level follows from prefix sums of x and x² (float64)."""
    cols = _as_columns(x, channelwise=False).reshape(-1)
    if cols.numel() == 0:
        raise ValueError("Cannot calibrate a quantizer on an empty tensor.")
    xs = cols.sort().values
    wide = xs.double()
    zero = wide.new_zeros(1)
    s1, s2 = torch.cat([zero, wide.cumsum(0)]), torch.cat([zero, (wide * wide).cumsum(0)])
    n = xs.numel()
    first = torch.zeros(1, dtype=torch.long, device=xs.device)
    last = torch.full((1,), n, dtype=torch.long, device=xs.device)
    deltas = sorted_quantiles(xs.reshape(-1, 1), [*percentiles, 1.0]).reshape(-1).clamp_min(_TINY)
    best_err, best = None, None
    for delta in deltas:
        for numerator in range(1, 2 * denominator + 1):
            boundaries = log_thresholds(delta, bits, numerator, denominator).flip(0)  # ascending
            edges = torch.cat([first, torch.searchsorted(xs, boundaries, side="left"), last])
            count = (edges[1:] - edges[:-1]).double()
            sum1, sum2 = s1[edges[1:]] - s1[edges[:-1]], s2[edges[1:]] - s2[edges[:-1]]
            # bucket i (values in [B_{i-1}, B_i)) holds code 2^b − i
            level = log_levels(delta, bits, numerator, denominator).double().flip(0)
            err = float((sum2 - 2 * level * sum1 + count * level * level).sum()) / n
            if best_err is None or err < best_err:
                best_err, best = err, (delta.reshape(()), numerator)
    return best
