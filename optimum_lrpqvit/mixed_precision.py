"""Mixed-precision bit plans from layer importance (``config.allocation``; ``docs/method.md#bit-allocation``).

Each rule gives every weight point its bits at the model size of uniform ``config.w_bits``; a point's input
activations shift by as many bits as its weights (within 2..8; the patch embedding's input stays at 8 bits):

* ``paper``: LRP-QViT's rule (Ranjan & Savakis, arXiv 2401.11243): the first two blocks at w_bits + 1 (their
  attention products at a_bits + 1 too), the least important other layers at w_bits − 1 (``paper_allocation``);
* ``budget``: one of ``config.candidate_bits`` per layer, maximising the importance-weighted reduction of weight
  quantization error under the size budget (``budget_allocation``).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .allocation import budget_allocation, paper_allocation, weight_quantization_errors
from .architectures import Layout
from .bit_plan import BitPlan, PointBits
from .config import LRPQConfig
from .quantizers import MAX_BITS, MIN_BITS
from .registry import ALLOCATION_RULES

__all__ = ["PAPER_FIRST_BLOCKS", "budget_plan", "mixed_bit_plan", "paper_plan"]

PAPER_FIRST_BLOCKS = 2


def _plan(layout: Layout, config: LRPQConfig, w_bits: Mapping[str, int], boosted_blocks: int = 0) -> BitPlan:
    """The fixed plan with ``w_bits`` on the weight points, their inputs shifted with them, and the attention
    products of blocks ``0 .. boosted_blocks − 1`` at a_bits + 1."""
    plan = dict(BitPlan.fixed(layout, config.w_bits, config.a_bits))
    for point, bits in plan.items():
        if point in w_bits:
            a_bits = bits.a_bits
            if point != layout.patch_embed:
                a_bits = min(MAX_BITS, max(MIN_BITS, config.a_bits + w_bits[point] - config.w_bits))
            plan[point] = PointBits(w_bits[point], a_bits)
        elif 0 <= layout.block_of[point] < boosted_blocks:
            plan[point] = PointBits(None, min(MAX_BITS, config.a_bits + 1))
    return BitPlan(plan)


@ALLOCATION_RULES.register("paper")
def paper_plan(model: nn.Module, layout: Layout, config: LRPQConfig, importance: Mapping[str, float]) -> BitPlan:
    weighted = layout.weight_points()
    w_bits = paper_allocation({p: importance[p] for p in weighted},
                              {p: model.get_submodule(p).weight.numel() for p in weighted},
                              {p: layout.block_of[p] for p in weighted}, config.w_bits, first_blocks=PAPER_FIRST_BLOCKS)
    return _plan(layout, config, w_bits, boosted_blocks=PAPER_FIRST_BLOCKS)


@ALLOCATION_RULES.register("budget")
def budget_plan(model: nn.Module, layout: Layout, config: LRPQConfig, importance: Mapping[str, float]) -> BitPlan:
    weighted = layout.weight_points()
    weights = {p: model.get_submodule(p).weight.detach() for p in weighted}
    errors = weight_quantization_errors(weights, config.candidate_bits, config.percentiles)
    w_bits = budget_allocation({p: importance[p] for p in weighted}, {p: w.numel() for p, w in weights.items()},
                               errors, config.w_bits, config.candidate_bits)
    return _plan(layout, config, w_bits)


def mixed_bit_plan(model: nn.Module, layout: Layout, config: LRPQConfig, importance: Mapping[str, float]) -> BitPlan:
    """The plan of the rule ``config.allocation`` for the relative ``importance`` of every point."""
    return ALLOCATION_RULES.get(config.allocation)(model, layout, config, importance)
