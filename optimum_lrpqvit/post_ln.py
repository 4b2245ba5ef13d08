"""Post-LayerNorm activation treatments, ``config.post_ln``
(``docs/method.md#post-layernorm-activations-repq-vit-and-crl``).

The inputs of the Linear layers fed by a LayerNorm (q/k/v or qkv, fc1, patch-merging reductions) vary by
orders of magnitude across channels. Each treatment says how they are calibrated and what happens after
calibration:

* ``layerwise``: one per-tensor quantizer (the baseline);
* ``channelwise``: one quantizer per channel, kept at inference (accurate, but not per-tensor hardware friendly);
* ``repq``: calibrated per channel, then reparameterised to per tensor (RepQ-ViT, Li et al., ICCV 2023);
* ``crl``: like ``repq`` with the channel-wise scales and zero points first clipped to μ ± k·σ (LRP-QViT's
  clipped reparameterisation, Ranjan & Savakis, arXiv 2401.11243).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .registry import POST_LN_TREATMENTS
from .reparam import clip_channel_params

__all__ = ["PostLNTreatment", "post_ln_treatment"]

ChannelParams = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class PostLNTreatment:
    """``channelwise``: calibrate the post-LayerNorm inputs per channel. ``before_reparam``: None keeps the
    calibrated quantizers as they are; otherwise the model is reparameterised to per tensor from the channel
    parameters this function returns, given the calibrated ``(scale, zero_point)`` and ``crl_k``."""

    channelwise: bool
    before_reparam: Callable[[torch.Tensor, torch.Tensor, float], ChannelParams] | None = None

    @property
    def reparameterises(self) -> bool:
        return self.before_reparam is not None


def _unchanged(scale: torch.Tensor, zero_point: torch.Tensor, k: float) -> ChannelParams:
    return scale, zero_point


POST_LN_TREATMENTS.register("layerwise")(PostLNTreatment(channelwise=False))
POST_LN_TREATMENTS.register("channelwise")(PostLNTreatment(channelwise=True))
POST_LN_TREATMENTS.register("repq")(PostLNTreatment(channelwise=True, before_reparam=_unchanged))
POST_LN_TREATMENTS.register("crl")(PostLNTreatment(channelwise=True, before_reparam=clip_channel_params))


def post_ln_treatment(name: str) -> PostLNTreatment:
    """The treatment registered as ``name``; ValueError naming the valid ones otherwise."""
    return POST_LN_TREATMENTS.get(name)
