"""LRP importance (LRP-QViT, Ranjan & Savakis, arXiv 2401.11243; ``docs/method.md#lrp-importance``):
``"lrp"``, and ``"lrp_per_role"``, the same scores compared within each layer role."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import LRPQConfig
from ..lrp import compute_importance
from ..registry import IMPORTANCE_CRITERIA
from ..scores import normalised
from .base import ImportanceCriterion, Scores, normalised_over, scores_of

__all__ = ["per_role"]


def _measure(model: nn.Module, pixel_values: torch.Tensor, config: LRPQConfig) -> Scores:
    return compute_importance(model, pixel_values)


def _role(point: str) -> str:
    return point.rsplit(".", 1)[-1]


def per_role(points: Sequence[str], scores: Scores | None, seed: int = 0) -> dict[str, float]:
    """Each C_l divided by the mean C of the points in the same role (the last part of the name: ``q_proj``,
    ``fc1``, ``matmul1``, … across blocks), then normalised: layers are compared with their counterparts in
    other blocks rather than across roles."""
    raw = scores_of(points, scores)
    roles: dict[str, list[float]] = {}
    for p, v in raw.items():
        roles.setdefault(_role(p), []).append(v)
    role_mean = {role: sum(values) / len(values) for role, values in roles.items()}
    return normalised({p: v / role_mean[_role(p)] if v > 0 else 0.0 for p, v in raw.items()})


IMPORTANCE_CRITERIA.register("lrp")(ImportanceCriterion(relative=normalised_over, measure=_measure))
IMPORTANCE_CRITERIA.register("lrp_per_role")(ImportanceCriterion(relative=per_role, measure=_measure))
