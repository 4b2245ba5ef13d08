"""Mixed-precision weight-bit allocation (``docs/method.md#bit-allocation``).

LRP-QViT (Ranjan & Savakis, arXiv 2401.11243) gives every layer of the first two transformer blocks b+1 bits
and pays for it by dropping the least important layers (by LRP importance I_l) to b−1 bits, so that the
parameter-weighted average weight bits stays at or under b (the size of uniform b-bit quantization).

Beyond the paper: an exact knapsack over a candidate set of bit widths (``budget_allocation``, an integer
linear program solved with ``scipy.optimize.milp``), the per-layer weight-quantization errors it trades off
(``weight_quantization_errors``). Everything here is a pure function of plain dicts keyed by quantization point
(module name); the result ``{point: w_bits}`` feeds the bit plans of ``mixed_precision``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np
import torch

from .quantizers import DEFAULT_PERCENTILES, MAX_BITS, MIN_BITS, check_bits, fake_quant_weight
from .scores import check_scores

__all__ = [
    "DEFAULT_CANDIDATES",
    "budget_allocation",
    "paper_allocation",
    "plan_summary_bits",
    "quantization_residual",
    "weight_quantization_errors",
]

DEFAULT_CANDIDATES: tuple[int, ...] = (3, 4, 5, 6, 8)


# ---------------------------------------------------------------------------------------------- validation

def _check_params(params: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(params, Mapping) or not params:
        raise ValueError("params must be a non-empty dict {point: number of weight parameters}.")
    for name, n in params.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"params[{name!r}] must be a positive integer (number of weight parameters), "
                             f"got {n!r}.")
    return {name: int(n) for name, n in params.items()}


def _check_same_keys(what: str, mapping: Mapping[str, object], params: Mapping[str, int]) -> None:
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError(f"{what} must be a non-empty dict keyed by point.")
    missing, extra = sorted(set(params) - set(mapping)), sorted(set(mapping) - set(params))
    if missing or extra:
        raise ValueError(f"The points of {what} and params differ: missing from {what}: {missing}; "
                         f"not in params: {extra}.")


def _check_importance(importance: Mapping[str, float], params: Mapping[str, int]) -> dict[str, float]:
    _check_same_keys("importance", importance, params)
    return check_scores(importance, "importance")


def _check_candidates(candidates: Sequence[int]) -> tuple[int, ...]:
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence) or not candidates:
        raise ValueError(f"candidates must be a non-empty sequence of bit widths, got {candidates!r}.")
    for b in candidates:
        check_bits(b, "Each candidate bit width")
    return tuple(sorted(set(candidates)))


# ---------------------------------------------------------------------------------------------- summaries

def plan_summary_bits(params: Mapping[str, int], w_bits: Mapping[str, int]) -> float:
    """Parameter-weighted average weight bits: Σ_l n_l·b_l / Σ_l n_l."""
    params = _check_params(params)
    _check_same_keys("w_bits", w_bits, params)
    for name, b in w_bits.items():
        check_bits(b, f"w_bits[{name!r}]")
    return sum(params[n] * w_bits[n] for n in params) / sum(params.values())


# ---------------------------------------------------------------------------------------------- paper rule

def paper_allocation(
    importance: Mapping[str, float],
    params: Mapping[str, int],
    block_of: Mapping[str, int],
    bits: int,
    first_blocks: int = 2,
) -> dict[str, int]:
    """The LRP-QViT rule over weight points.

    Every point with ``0 <= block_of[l] < first_blocks`` gets ``bits + 1``; all others start at ``bits``.
    Then the points outside the first blocks (patch embedding at block −1 and heads included) drop to
    ``bits − 1`` one at a time, least important first (ties broken by name), until
    Σ_l n_l·b_l <= bits · Σ_l n_l (checked in exact integer arithmetic).

    Args:
        importance (`dict[str, float]`): relative importance I_l of each point (finite, >= 0).
        params (`dict[str, int]`): number of weight parameters n_l of each point.
        block_of (`dict[str, int]`): transformer block index of each point (−1 for the patch embedding).
        bits (`int`): the budget b, between 3 and 7 so that b−1 and b+1 stay within 2..8.
        first_blocks (`int`, *optional*, defaults to 2): how many leading blocks get b+1 bits.

    Returns:
        `dict[str, int]`: ``{point: w_bits}``.

    Raises:
        ValueError: on malformed input, or if even dropping every other point cannot pay for the first
            blocks (their parameters outnumber the rest).
    """
    params = _check_params(params)
    scores = _check_importance(importance, params)
    _check_same_keys("block_of", block_of, params)
    for name, block in block_of.items():
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
            raise ValueError(f"block_of[{name!r}] must be an integer block index, got {block!r}.")
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS + 1 <= bits <= MAX_BITS - 1:
        raise ValueError(f"bits must be an integer between {MIN_BITS + 1} and {MAX_BITS - 1} so that bits-1 and "
                         f"bits+1 stay within {MIN_BITS}..{MAX_BITS}, got {bits!r}.")
    if isinstance(first_blocks, bool) or not isinstance(first_blocks, int) or first_blocks < 0:
        raise ValueError(f"first_blocks must be a non-negative integer, got {first_blocks!r}.")

    plan = {name: bits + 1 if 0 <= block_of[name] < first_blocks else bits for name in params}
    budget = bits * sum(params.values())
    total = sum(params[n] * plan[n] for n in params)
    droppable = sorted((n for n in params if plan[n] == bits), key=lambda n: (scores[n], n))
    for name in droppable:
        if total <= budget:
            break
        plan[name] = bits - 1
        total -= params[name]
    if total > budget:
        first = sum(params[n] for n in params if plan[n] == bits + 1)
        raise ValueError(f"Cannot keep the average at {bits} bits: the first {first_blocks} block(s) hold {first} "
                         f"weight parameters, more than the {sum(params.values()) - first} that can drop to "
                         f"{bits - 1} bits: the model is too shallow for this rule. Use allocation='budget' "
                         "(LRPQConfig), or pass paper_allocation fewer first_blocks.")
    return plan


# ---------------------------------------------------------------------------------------------- knapsack

def budget_allocation(
    importance: Mapping[str, float],
    params: Mapping[str, int],
    errors: Mapping[str, Mapping[int, float]],
    avg_bits: float,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
) -> dict[str, int]:
    """Exact importance-weighted allocation under a size budget (multiple-choice knapsack).

    With binary x_{l,b} (one-hot per point, Σ_b x_{l,b} = 1), maximise
    Σ_l I_l · (e_l[b_min] − e_l[b_l]) subject to Σ_l n_l·b_l <= ⌊avg_bits · Σ_l n_l⌋, solved with
    ``scipy.optimize.milp`` (HiGHS, ``mip_rel_gap=0``; the objective is normalised so that a typical point's
    largest gain is 1, which keeps HiGHS' absolute tolerances below the gains). The solver's rounded solution is
    re-checked in exact integer arithmetic (the budget is tightened and re-solved if a tolerance let it slip).

    Args:
        importance (`dict[str, float]`): I_l of each point (finite, >= 0).
        params (`dict[str, int]`): number of weight parameters n_l of each point.
        errors (`dict[str, dict[int, float]]`): measured quantization error e_l[b] of each point at each
            candidate b (see ``weight_quantization_errors``); finite, >= 0.
        avg_bits (`float`): the budget, as parameter-weighted average weight bits (>= min candidate).
        candidates (`Sequence[int]`, *optional*, defaults to (3, 4, 5, 6, 8)): allowed bit widths (2..8).

    Returns:
        `dict[str, int]`: ``{point: w_bits}``.
    """
    params = _check_params(params)
    scores = _check_importance(importance, params)
    cands = _check_candidates(candidates)
    _check_same_keys("errors", errors, params)
    for name in params:
        row = errors[name]
        if not isinstance(row, Mapping) or any(b not in row for b in cands):
            raise ValueError(f"errors[{name!r}] must give an error for every candidate {list(cands)}, got "
                             f"{row!r}.")
        for b in cands:
            e = float(row[b])
            if not math.isfinite(e) or e < 0:
                raise ValueError(f"errors[{name!r}][{b}] must be finite and >= 0, got {row[b]!r}.")
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or not math.isfinite(avg_bits):
        raise ValueError(f"avg_bits must be a finite number, got {avg_bits!r}.")
    lo, hi = cands[0], cands[-1]
    if avg_bits < lo:
        raise ValueError(f"avg_bits={avg_bits} is infeasible with candidates {list(cands)}: feasible budgets are "
                         f"between {lo} and {hi} average bits (a budget above {hi} gives every point {hi} bits).")

    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError as err:
        raise ImportError("budget_allocation needs scipy >= 1.9 (scipy.optimize.milp): pip install scipy") from err

    names = list(params)
    total = sum(params.values())
    # budget in integer parameter-bits above the all-minimum plan, in units of gcd(n_l) (exact)
    step = math.gcd(*params.values())
    n = [params[k] // step for k in names]
    limit = (math.floor(Fraction(avg_bits) * total) - lo * total) // step
    if len(cands) == 1 or limit < min(n) * (cands[1] - lo):
        smaller = f" Add a smaller candidate, e.g. candidates={[lo - 1, *cands]}." if lo > MIN_BITS else ""
        warnings.warn(f"avg_bits={avg_bits} leaves no room above the smallest candidate: every point gets {lo} bits "
                      f"(no mixed precision).{smaller}", stacklevel=2)
    nl, nb = len(names), len(cands)
    gain = np.array([[scores[k] * (float(errors[k][lo]) - float(errors[k][b])) for b in cands] for k in names])
    # minimise −gain / scale, scale = the median point's largest gain, kept within 1e6 of the largest gain (HiGHS
    # fails on wider cost ranges). HiGHS' tolerances (incl. its 1e-6 absolute MIP gap) are absolute, and gains
    # span orders of magnitude (LRP gives the classifier ~0.9999 of the importance): scaled by the largest gain,
    # every other point would fall below them and keep whatever bits the solver stopped at.
    per_point = np.abs(gain).max(axis=1)
    scale = max(np.median(per_point[per_point > 0]), per_point.max() * 1e-6) if per_point.max() > 0 else 1.0
    c = -(gain / scale).ravel()
    one_hot = LinearConstraint(np.kron(np.eye(nl), np.ones((1, nb))), 1, 1)
    size = np.array([[ni * (b - lo) for b in cands] for ni in n], dtype=float).reshape(1, -1)
    # presolve off: HiGHS' MIP presolve prints debug lines to stdout (scipy 1.17) and is slower on large plans
    options = {"mip_rel_gap": 0.0, "presolve": False}
    cap = limit
    for _ in range(8):
        res = milp(c, integrality=np.ones(nl * nb), bounds=Bounds(0, 1),
                   constraints=[one_hot, LinearConstraint(size, -np.inf, cap)], options=options)
        if not res.success or res.x is None:
            raise RuntimeError(f"scipy.optimize.milp failed on a feasible budget: {res.message}")
        plan_idx = np.asarray(res.x).reshape(nl, nb).argmax(axis=1)
        used = sum(ni * (cands[j] - lo) for ni, j in zip(n, plan_idx))
        if used <= limit:
            break
        cap -= used - limit  # a feasibility tolerance let the budget slip: tighten and re-solve
    else:
        raise RuntimeError("scipy.optimize.milp did not return a plan within the exact budget.")
    return {k: cands[j] for k, j in zip(names, plan_idx)}


# ---------------------------------------------------------------------------------------------- errors

def quantization_residual(weight: torch.Tensor, bits: int,
                          percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> torch.Tensor:
    """Ŵ − W (``quantizers.fake_quant_weight``), in float32."""
    return fake_quant_weight(weight, bits, percentiles) - weight.detach().float()


def weight_quantization_errors(
    weights: Mapping[str, torch.Tensor],
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, dict[int, float]]:
    """Relative weight-quantization error e_l[b] = ‖Ŵ − W‖² / ‖W‖² for each point and candidate b
    (Ŵ − W from ``quantization_residual``). An all-zero weight has error 0.
    """
    cands = _check_candidates(candidates)
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty dict {point: weight tensor}.")
    out: dict[str, dict[int, float]] = {}
    for name, w in weights.items():
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise ValueError(f"weights[{name!r}] must be a floating-point tensor, got {type(w).__name__}.")
        if w.dim() not in (2, 4) or w.numel() == 0:
            raise ValueError(f"weights[{name!r}] must be a non-empty 2-D Linear (out, in) or 4-D conv weight, "
                             f"got shape {tuple(w.shape)}.")
        norm = w.detach().double().pow(2).sum().item()
        out[name] = {b: quantization_residual(w, b, percentiles).double().pow(2).sum().item() / norm if norm > 0
                     else 0.0 for b in cands}
    return out
