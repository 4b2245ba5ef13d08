"""One adapter per supported architecture family, and the lookup that picks it."""

from __future__ import annotations

from torch import nn

from .base import Family, Layout, quantized_attention
from .hf import HF_SWIN, HF_VIT, is_transformers_model
from .timm_swin import TIMM_SWIN
from .timm_vit import TIMM_VIT
from .timm_wrapper import HF_TIMM_WRAPPER

__all__ = ["FAMILIES", "Family", "Layout", "find_family", "is_transformers_model", "quantized_attention"]

FAMILIES: tuple[Family, ...] = (HF_VIT, HF_SWIN, HF_TIMM_WRAPPER, TIMM_VIT, TIMM_SWIN)


def find_family(model: nn.Module) -> Family:
    """The adapter for ``model``; TypeError naming the supported families if there is none."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    supported = "; ".join(f.name for f in FAMILIES)
    raise TypeError(f"Unsupported model {type(model).__name__}. optimum-lrpqvit quantizes: {supported}.")
