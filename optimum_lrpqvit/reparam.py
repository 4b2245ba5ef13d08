"""Scale reparameterisation of post-LayerNorm activations (RepQ-ViT, Li et al., ICCV 2023) and its clipped
variant CRL (LRP-QViT, Ranjan & Savakis, arXiv 2401.11243);
``docs/method.md#post-layernorm-activations-repq-vit-and-crl``.

Channel-wise parameters (s_c, z_c) of X = LayerNorm(x) become one layer-wise pair (s̃, z̃) by folding
r_c = s_c / s̃ and b_c = −z_c s_c / r_c + z̃ s̃ into the LayerNorm affine and the Linear layers fed by X:

    X' = X / r − b,   γ' = γ / r,   β' = β / r − b,   W'[:, c] = W[:, c] · r_c,   bias' = bias + W' b
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["clip_channel_params", "reparam_factors", "reparameterize"]


def clip_channel_params(
    scale: torch.Tensor, zero_point: torch.Tensor, k: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CRL: s_c ← clamp(s_c, μ_s − kσ_s, μ_s + kσ_s), z_c ← round(clamp(z_c, μ_z − kσ_z, μ_z + kσ_z)).

    μ and σ (population std) are taken over channels; k = ∞ returns the parameters unchanged (plain RepQ).
    The clipped scale stays positive (the band's upper end is at least the mean).
    """
    if math.isinf(k):
        return scale, zero_point
    if k < 0:
        raise ValueError(f"crl_k must be non-negative, got {k}.")

    def band(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, sigma = v.mean(), v.std(unbiased=False)
        return mu - k * sigma, mu + k * sigma

    s_lo, s_hi = band(scale)
    z_lo, z_hi = band(zero_point)
    return scale.clamp(s_lo, s_hi), zero_point.clamp(z_lo, z_hi).round()


def reparam_factors(
    scale: torch.Tensor, zero_point: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r, b, s̃, z̃) with s̃ = mean_c s_c, z̃ = round(mean_c z_c), r = s / s̃, b = −z s / r + z̃ s̃."""
    target_scale = scale.mean()
    target_zero = zero_point.mean().round()
    r = scale / target_scale
    b = -zero_point * scale / r + target_zero * target_scale
    return r, b, target_scale, target_zero


@torch.no_grad()
def reparameterize(norm: nn.LayerNorm, linears: Sequence[nn.Linear], r: torch.Tensor, b: torch.Tensor) -> None:
    """Fold X' = X / r − b into ``norm`` and every Linear fed by it, in place; the function is unchanged.

    Every Linear must have a bias (give bias-free ones a zero bias first).
    """
    if norm.weight is None or norm.bias is None:
        raise TypeError("Reparameterisation needs a LayerNorm with an elementwise affine (weight and bias).")
    r = r.to(norm.weight.dtype)
    b = b.to(norm.weight.dtype)
    norm.weight.div_(r)
    norm.bias.div_(r).sub_(b)
    for linear in linears:
        if linear.bias is None:
            raise TypeError("Reparameterisation needs a bias on every Linear fed by the LayerNorm.")
        linear.weight.mul_(r)
        linear.bias.add_(linear.weight @ b)
