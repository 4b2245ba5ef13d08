"""Fisher importance (``"fisher"``): a sensitivity criterion to set against LRP at equal model size.

F_l = Σ_i E_x[g_i²] · (Ŵ_i − W_i)², the diagonal-Fisher estimate of how much the log-likelihood of the
model's own prediction drops when only layer l's weights are quantized to ``bits`` (the second-order
criterion of HAWQ / OBS-style pruning, with the Fisher as the Hessian). g = ∂ log p(ŷ | x) / ∂W per image,
ŷ the predicted class; Ŵ is the per-output-channel quantization ``QuantLinear`` / ``QuantConv2d`` use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..allocation import quantization_residual
from ..architectures import find_family
from ..config import LRPQConfig
from ..inputs import as_pixel_values
from ..lrp import eval_with_gradients_for, float32_model
from ..registry import IMPORTANCE_CRITERIA
from ..scores import normalised
from .base import ImportanceCriterion, Scores, normalised_over

__all__ = ["fisher_importance"]


def fisher_importance(model: nn.Module, data: object, bits: int) -> dict[str, float]:
    """Relative Fisher importance ``{point name: F_l / Σ F}`` of every quantized point, summing to 1.

    Weight points are scored as above, one image at a time (the Fisher needs per-image gradients);
    activation-only points (the attention products) have no weights and score 0. ``data`` as for
    ``quantize()``. The model is unchanged afterwards.
    """
    family = find_family(model)
    if not family.is_classifier(model):
        raise ValueError(f"Fisher importance needs class log-probabilities and {type(model).__name__} has no "
                         "classifier; use importance='lrp' (scored on the image embedding) or 'uniform'.")
    pixels = as_pixel_values(data, *family.input_shape(model))
    scored = float32_model(model)
    layout = family.layout(scored)
    weights = {point: scored.get_submodule(point).weight for point in layout.weight_points()}
    sq_grads = {point: torch.zeros_like(w) for point, w in weights.items()}
    device = next(scored.parameters()).device
    with eval_with_gradients_for(scored, list(weights.values())), torch.enable_grad():
        for image in pixels.split(1):
            log_probs = F.log_softmax(family.logits(scored, image.to(device)), dim=-1)
            grads = torch.autograd.grad(log_probs.max(), list(weights.values()))
            for acc, g in zip(sq_grads.values(), grads):
                acc.add_(g.square())
    sums = {point: float((sq_grads[point].double() * quantization_residual(w, bits).double().square()).sum())
            for point, w in weights.items()}
    return normalised({point: sums.get(point, 0.0) for point in layout.points()})


def _measure(model: nn.Module, pixel_values: torch.Tensor, config: LRPQConfig) -> Scores:
    return fisher_importance(model, pixel_values, config.w_bits)


IMPORTANCE_CRITERIA.register("fisher")(ImportanceCriterion(relative=normalised_over, measure=_measure))
