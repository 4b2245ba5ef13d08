"""A picture of a bit plan: per-layer importance by transformer block, with each layer's weight bits."""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["plot_importance"]


def _kind(point: str) -> str:
    """The layer's role inside its block (q_proj, qkv, fc1, matmul1, …): the last dotted name."""
    return point.rsplit(".", 1)[-1]


def plot_importance(
    importance: Mapping[str, float],
    bit_plan: Mapping[str, Mapping[str, int | None]],
    block_of: Mapping[str, int],
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """Save a PNG: one group of bars per block (−1 = patch embedding, last = heads), one bar per quantized
    point coloured by its role, labelled with its weight bits (activation bits for the attention products)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(importance, key=lambda p: (block_of.get(p, 0), p))
    kind = {p: "patch embedding" if block_of.get(p, 0) < 0 else _kind(p) for p in points}
    kinds = sorted(set(kind.values()))
    colours = {k: plt.get_cmap("tab20")(i % 20) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(max(8.0, 0.22 * len(points)), 4.5))
    xs, previous_block = [], None
    x = 0.0
    for point in points:
        if previous_block is not None and block_of.get(point) != previous_block:
            x += 0.8  # gap between blocks
        previous_block = block_of.get(point)
        xs.append(x)
        x += 1.0
    # a log axis cannot show 0 (Fisher gives it to the attention products): such bars stand at a floor
    floor = min((v for v in importance.values() if v > 0), default=1.0) / 10
    for xpos, point in zip(xs, points):
        bits = bit_plan[point]
        height = max(importance[point], floor)
        ax.bar(xpos, height, color=colours[kind[point]], width=0.9, hatch="//" if importance[point] <= 0 else None)
        label = bits["w_bits"] if bits["w_bits"] is not None else f"a{bits['a_bits']}"
        ax.text(xpos, height, str(label), ha="center", va="bottom", fontsize=6)
    blocks = sorted({block_of.get(p, 0) for p in points})
    centres = [sum(xp for xp, p in zip(xs, points) if block_of.get(p) == b) /
               max(1, sum(1 for p in points if block_of.get(p) == b)) for b in blocks]
    ax.set_xticks(centres, ["embed" if b < 0 else ("head" if b == max(blocks) else str(b)) for b in blocks])
    ax.set_xlabel("transformer block")
    ax.set_ylabel("relative importance (log)")
    ax.set_yscale("log")
    ax.set_title(title or "Layer importance and bit plan (bar labels: weight bits; aN: activation bits)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in kinds]
    ax.legend(handles, kinds, fontsize=7, ncol=min(len(kinds), 6), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
