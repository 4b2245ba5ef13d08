"""Function-preserving outlier channels, to stress post-LayerNorm quantization like ImageNet ViTs do.

Small models trained on small data have mild post-LayerNorm outliers (widest channel ≈ 2× the median range);
ImageNet ViTs reach 10–100× (the reason for RepQ-ViT's reparameterisation). Scaling γ and β of a few channels
of a LayerNorm by f and the matching input columns of every Linear it feeds by 1/f keeps the model's function
while giving those channels f-times wider ranges.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .architectures import find_family

__all__ = ["inject_outlier_channels", "channel_range_ratio"]


@torch.no_grad()
def inject_outlier_channels(
    model: nn.Module, factors: Sequence[float] = (10.0, 30.0, 100.0), seed: int = 0
) -> dict[str, list[int]]:
    """Give every post-LayerNorm point of ``model`` ``len(factors)`` outlier channels, in place.

    Channel ``c_i`` (drawn at random per LayerNorm) gets γ, β × ``factors[i]`` and the Linear columns ÷
    ``factors[i]``. Returns ``{LayerNorm name: channels}``.
    """
    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    for norm_name, linear_names in find_family(model).layout(model).post_ln:
        norm = model.get_submodule(norm_name)
        channels = torch.randperm(norm.weight.numel(), generator=generator)[: len(factors)]
        scale = torch.ones_like(norm.weight)
        scale[channels] = torch.tensor(list(factors), dtype=scale.dtype)
        norm.weight.mul_(scale)
        norm.bias.mul_(scale)
        for name in linear_names:
            model.get_submodule(name).weight.div_(scale)
        chosen[norm_name] = channels.tolist()
    return chosen


@torch.no_grad()
def channel_range_ratio(model: nn.Module, pixel_values: torch.Tensor) -> dict[str, float]:
    """For every post-LayerNorm point, max over channels of (max − min) divided by its median over channels."""
    family = find_family(model)
    ratios, hooks = {}, []

    def record(name: str):
        def hook(_module, _inputs, output):
            flat = output.reshape(-1, output.shape[-1])
            width = flat.amax(0) - flat.amin(0)
            ratios[name] = (width.max() / width.median()).item()
        return hook

    for norm_name, _ in family.layout(model).post_ln:
        hooks.append(model.get_submodule(norm_name).register_forward_hook(record(norm_name)))
    try:
        family.logits(model, pixel_values)
    finally:
        for h in hooks:
            h.remove()
    return ratios
