"""Data-free importance for ablations at equal model size: ``"random"`` (seeded) and ``"uniform"``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..registry import IMPORTANCE_CRITERIA
from .base import ImportanceCriterion, Scores

__all__ = ["random_importance", "uniform_importance"]


def random_importance(points: Sequence[str], scores: Scores | None = None, seed: int = 0) -> dict[str, float]:
    """u_l ~ U(0, 1] from ``numpy.random.default_rng(seed)`` assigned in sorted point order, normalised
    (independent of the order of ``points``)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    ordered = sorted(points)
    values = 1.0 - np.random.default_rng(int(seed)).random(len(ordered))  # in (0, 1]
    values = values / values.sum()
    by_name = dict(zip(ordered, values.tolist()))
    return {p: by_name[p] for p in points}


def uniform_importance(points: Sequence[str], scores: Scores | None = None, seed: int = 0) -> dict[str, float]:
    """I_l = 1/n."""
    return {p: 1.0 / len(points) for p in points}


IMPORTANCE_CRITERIA.register("random")(ImportanceCriterion(relative=random_importance))
IMPORTANCE_CRITERIA.register("uniform")(ImportanceCriterion(relative=uniform_importance))
