"""Adapter for timm ``SwinTransformer``.

Stage ``layers.i`` opens (for i > 0) with a ``downsample`` patch merging (``norm`` → ``reduction``); each
block has ``norm1`` → ``attn.qkv``, ``attn.proj``, ``norm2`` → ``mlp.fc1``, ``mlp.fc2``; the head is
``head.fc``. Window attention is intercepted by replacing ``forward`` on each attention instance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformer, WindowAttention
from torch import nn

from ..relevance import residual_add
from .base import Layout, quantized_attention
from .timm_common import TimmFamily, block_points

__all__ = ["TIMM_SWIN"]


def _window_attention_forward(self: WindowAttention, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    windows, tokens, _ = x.shape
    qkv = self.qkv(x).reshape(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    bias = self._get_rel_pos_bias()  # (1, heads, tokens, tokens)
    if mask is not None:  # (num_windows, tokens, tokens), 0 / -inf, repeated over the batch
        bias = bias + mask.repeat(windows // mask.shape[0], 1, 1).unsqueeze(1)
    out, _ = quantized_attention(self, q, k, v, self.scale, bias)
    out = out.transpose(1, 2).reshape(windows, tokens, -1)
    return self.proj_drop(self.proj(out))


def _block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm ``SwinTransformerBlock.forward`` with relevance-conserving residual additions."""
    batch, height, width, channels = x.shape
    x = residual_add(x, self.drop_path1(self._attn(self.norm1(x)))).reshape(batch, -1, channels)
    x = residual_add(x, self.drop_path2(self.mlp(self.norm2(x))))
    return x.reshape(batch, height, width, channels)


class _TimmSwin(TimmFamily):
    name = "timm SwinTransformer"
    attention_forward = _window_attention_forward

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, SwinTransformer)

    def layout(self, model: nn.Module) -> Layout:
        layout = Layout([], [], "patch_embed.proj", [], {"patch_embed.proj": -1})
        block = -1
        for s, stage in enumerate(model.layers):
            if isinstance(stage.downsample, PatchMerging):
                # merging belongs to the stage it closes
                layout.post_ln.append((f"layers.{s}.downsample.norm", [f"layers.{s}.downsample.reduction"]))
                layout.block_of[f"layers.{s}.downsample.reduction"] = block
            for b, _ in enumerate(stage.blocks):
                block += 1
                block_points(f"layers.{s}.blocks.{b}", block, layout)
        if isinstance(getattr(model.head, "fc", None), nn.Linear):
            layout.linears.append("head.fc")
            layout.block_of["head.fc"] = block + 1
        return layout

    def block_forwards(self, model: nn.Module) -> list[tuple[nn.Module, Callable]]:
        return [(block, _block_forward) for stage in model.layers for block in stage.blocks]

    def input_shape(self, model: nn.Module) -> tuple[int, int | None, int | None]:
        pe = model.patch_embed
        if getattr(pe, "strict_img_size", True) and not getattr(pe, "dynamic_img_pad", False):
            return pe.proj.in_channels, *pe.img_size
        return pe.proj.in_channels, None, None


TIMM_SWIN = _TimmSwin()
