"""What an importance criterion is, and the functions that apply one by name (``config.importance``).

A criterion turns a model into relative layer importance I_l (Σ_l I_l = 1) over the quantized points; the
mixed-precision rules (``mixed_precision``) give more bits to more important points. A measured criterion
scores the model on images (``measure``); ``relative`` turns measured or precomputed scores (or none, for the
data-free ablations) into the relative importance. A new criterion is one module that registers an
``ImportanceCriterion`` in ``registry.IMPORTANCE_CRITERIA`` and is imported by ``importance/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import LRPQConfig
from ..registry import IMPORTANCE_CRITERIA
from ..scores import check_scores, normalised

__all__ = ["ImportanceCriterion", "importance_criterion", "normalised_over", "relative_importance", "scores_of"]

Scores = Mapping[str, float]


@dataclass(frozen=True)
class ImportanceCriterion:
    """``relative(points, scores, seed)``: ``{point: I_l}`` summing to 1, from the measured or precomputed
    ``scores`` (None for criteria that need none). ``measure(model, pixel_values, config)``: raw scores of every
    point of the float model on images, or None when the criterion needs no data."""

    relative: Callable[[Sequence[str], Scores | None, int], dict[str, float]]
    measure: Callable[[nn.Module, torch.Tensor, LRPQConfig], Scores] | None = None

    @property
    def measured(self) -> bool:
        return self.measure is not None


def importance_criterion(name: str) -> ImportanceCriterion:
    """The criterion registered as ``name``; ValueError naming the valid ones otherwise."""
    return IMPORTANCE_CRITERIA.get(name)


def scores_of(points: Sequence[str], scores: Scores | None) -> dict[str, float]:
    """The checked scores of ``points`` (extra keys, e.g. activation-only points, are ignored); ValueError when
    they are missing."""
    if not scores:
        raise ValueError("This importance criterion needs the measured scores: pass scores={point: score}.")
    missing = [p for p in points if p not in scores]
    if missing:
        raise ValueError(f"The scores are missing points: {missing}.")
    return check_scores({p: scores[p] for p in points})


def normalised_over(points: Sequence[str], scores: Scores | None, seed: int = 0) -> dict[str, float]:
    """I_l = C_l / Σ C over ``points`` (``seed`` unused: the criterion is deterministic)."""
    return normalised(scores_of(points, scores))


def relative_importance(kind: str, points: Sequence[str], scores: Scores | None = None,
                        seed: int = 0) -> dict[str, float]:
    """Relative importance I_l (Σ_l I_l = 1) of ``points`` by the criterion registered as ``kind``."""
    criterion = importance_criterion(kind)
    if isinstance(points, (str, bytes)) or not isinstance(points, Sequence) or not points:
        raise ValueError("points must be a non-empty list of point names.")
    if len(set(points)) != len(points):
        duplicates = sorted({p for p in points if points.count(p) > 1})
        raise ValueError(f"points must be unique, got duplicates: {duplicates}.")
    return criterion.relative(points, scores, seed)
