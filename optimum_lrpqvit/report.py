"""A picture of a bit plan: a block × role grid of the bits, beside each block's share of the importance."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

__all__ = ["bit_plan_grid", "plot_importance", "role_of"]

# the order in which a transformer block runs its points (matched as substrings of the role; others go last)
_EXECUTION_ORDER = ("query", "q_proj", "qkv", "key", "k_proj", "value", "v_proj", "matmul1", "softmax", "matmul2",
                    "o_proj", "attention.output", "attn.proj", "fc1", "intermediate", "fc2", "output", "reduction")


def role_of(point: str) -> str:
    """A point's role inside its block: its name after the last numeric component (``vit.layers.3.mlp.fc1`` →
    ``mlp.fc1``); the whole name for points outside the blocks (patch embedding, heads)."""
    parts = point.split(".")
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[numeric[-1] + 1:]) if numeric else point


def _order(role: str) -> tuple[int, str]:
    ranks = [i for i, key in enumerate(_EXECUTION_ORDER) if re.search(rf"(^|\.){re.escape(key)}", role)]
    return (min(ranks) if ranks else len(_EXECUTION_ORDER), role)


def bit_plan_grid(bit_plan: Mapping[str, Mapping[str, int | None]], block_of: Mapping[str, int],
                  num_blocks: int | None = None) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The roles of the transformer blocks in execution order, and the rows of a bit plan: ``(label, points)``
    for the patch embedding, every block (points in role order) and the heads (the points of blocks from
    ``num_blocks`` on; by default those of the last block index: a model without quantized heads names
    ``num_blocks``)."""
    last = max(block_of[p] for p in bit_plan) if num_blocks is None else num_blocks
    blocks = sorted({block_of[p] for p in bit_plan if 0 <= block_of[p] < last})
    roles = sorted({role_of(p) for p in bit_plan if block_of[p] in blocks}, key=_order)
    rows = [("patch embedding", [p for p in bit_plan if block_of[p] < 0])]
    rows += [(f"block {b}", sorted((p for p in bit_plan if block_of[p] == b), key=lambda p: roles.index(role_of(p))))
             for b in blocks]
    rows.append(("heads", [p for p in bit_plan if block_of[p] >= last]))
    return roles, [(label, points) for label, points in rows if points]


def plot_importance(
    importance: Mapping[str, float],
    bit_plan: Mapping[str, Mapping[str, int | None]],
    block_of: Mapping[str, int],
    path: str | os.PathLike,
    title: str = "",
    num_blocks: int | None = None,
) -> None:
    """Save a PNG of a bit plan. Left: one row per transformer block (and rows for the patch embedding and the
    heads), one column per role in execution order; each cell coloured and labelled by its bits (weight bits,
    or activation bits for the attention products, marked "a"). Right: each row's share of the importance
    (Σ I_l over its points, in %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm

    roles, rows = bit_plan_grid(bit_plan, block_of, num_blocks)
    width = max(len(roles), max(len(points) for _, points in rows))

    cmap = plt.get_cmap("viridis", 7)
    norm = BoundaryNorm([b - 0.5 for b in range(2, 10)], cmap.N)
    fig, (grid, bars) = plt.subplots(1, 2, figsize=(3.0 + 0.85 * width + 3.2, 1.2 + 0.36 * len(rows)),
                                     gridspec_kw={"width_ratios": [0.85 * width, 3.2]}, sharey=True)
    total = sum(max(v, 0.0) for v in importance.values()) or 1.0
    shares = [100.0 * sum(max(importance.get(p, 0.0), 0.0) for p in points) / total for _, points in rows]
    # shares span decades (the heads often hold most of it): a log axis, with 0 shown at its floor
    floor = min((s for s in shares if s > 0), default=1.0) / 4
    for y, (label, points) in enumerate(rows):
        for i, point in enumerate(points):
            x = roles.index(role_of(point)) if label.startswith("block") else i
            bits = bit_plan[point]
            value = bits["w_bits"] if bits["w_bits"] is not None else bits["a_bits"]
            grid.add_patch(plt.Rectangle((x - 0.47, y - 0.45), 0.94, 0.9, color=cmap(norm(value))))
            text = str(value) if bits["w_bits"] is not None else f"a{value}"
            if not label.startswith("block"):
                text = f"{role_of(point).rsplit('.', 1)[-1]} {text}"
            grid.text(x, y, text, ha="center", va="center", fontsize=9, color="white" if value < 6 else "black")
        share = shares[y]
        bars.barh(y, max(share, floor) - floor, left=floor, color="0.45", height=0.7)
        bars.text(max(share, floor), y, f" {share:.3g} %", va="center", fontsize=9)
    grid.set_xlim(-0.5, width - 0.5)
    grid.set_ylim(len(rows) - 0.5, -0.5)
    grid.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=9)
    grid.set_xticks(range(len(roles)), roles, rotation=30, ha="right", fontsize=9)
    grid.tick_params(length=0)
    for side in grid.spines.values():
        side.set_visible(False)
    grid.set_title("bits per point (a = activation bits of an attention product)", fontsize=10)
    bars.set_xscale("log")
    bars.set_xlim(floor, 100 * 8)
    bars.set_xlabel("share of importance (%, log scale)", fontsize=9)
    bars.tick_params(labelsize=9)
    bars.set_title("importance", fontsize=10)
    fig.suptitle(title or "Bit plan and layer importance", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
