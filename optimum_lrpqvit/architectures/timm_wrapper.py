"""Adapter for timm models inside transformers' ``TimmWrapperForImageClassification``.

The wrapped ``timm_model`` is handled by the timm adapters; point names carry the ``timm_model.`` prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn
from transformers import TimmWrapperForImageClassification

from .base import Family, Layout
from .timm_swin import TIMM_SWIN
from .timm_vit import TIMM_VIT

__all__ = ["HF_TIMM_WRAPPER"]

_PREFIX = "timm_model."


def _inner(model: nn.Module) -> Family:
    for family in (TIMM_VIT, TIMM_SWIN):
        if family.matches(model.timm_model):
            return family
    raise TypeError(f"TimmWrapperForImageClassification around {type(model.timm_model).__name__} is not supported; "
                    "the wrapped timm model must be a VisionTransformer or SwinTransformer.")


def _strip(layout: Layout) -> Layout:
    """The layout as the wrapped timm model names it (only the attention names are needed there)."""
    return replace(layout, attentions=[a[len(_PREFIX):] for a in layout.attentions])


class _TimmWrapper(Family):
    name = "transformers TimmWrapper (timm ViT/DeiT/Swin)"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, TimmWrapperForImageClassification) and any(
            f.matches(model.timm_model) for f in (TIMM_VIT, TIMM_SWIN))

    def layout(self, model: nn.Module) -> Layout:
        inner = _inner(model).layout(model.timm_model)
        p = _PREFIX
        return Layout(
            post_ln=[(p + ln, [p + n for n in names]) for ln, names in inner.post_ln],
            linears=[p + n for n in inner.linears],
            patch_embed=p + inner.patch_embed,
            attentions=[p + n for n in inner.attentions],
            block_of={p + n: b for n, b in inner.block_of.items()},
            post_gelu=[p + n for n in inner.post_gelu],
        )

    def install_attention(self, model: nn.Module, layout: Layout) -> None:
        _inner(model).install_attention(model.timm_model, _strip(layout))

    def remove_attention(self, model: nn.Module, layout: Layout) -> None:
        _inner(model).remove_attention(model.timm_model, _strip(layout))

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).logits

    def block_forwards(self, model: nn.Module) -> list[tuple[nn.Module, Callable]]:
        return _inner(model).block_forwards(model.timm_model)

    def key_centering_problem(self, model: nn.Module) -> str | None:
        return _inner(model).key_centering_problem(model.timm_model)

    def input_shape(self, model: nn.Module) -> tuple[int, int | None, int | None]:
        return _inner(model).input_shape(model.timm_model)


HF_TIMM_WRAPPER = _TimmWrapper()
