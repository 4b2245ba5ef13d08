"""Adapter for timm ``VisionTransformer`` (ViT and DeiT, ``VisionTransformerDistilled`` included).

Block layout: ``norm1`` → ``attn.qkv``, ``attn.proj``, ``norm2`` → ``mlp.fc1``, ``mlp.fc2``; heads ``head``
and, for DeiT, ``head_dist``. Attention is intercepted by replacing ``forward`` on each attention instance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..relevance import residual_add
from .base import Layout, quantized_attention
from .timm_common import TimmFamily, block_points

__all__ = ["TIMM_VIT"]


def _attention_forward(self: Attention, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                       is_causal: bool = False) -> torch.Tensor:
    if is_causal:
        raise ValueError("Quantized timm attention does not support is_causal=True.")
    batch, tokens, _ = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    out, _ = quantized_attention(self, q, k, v, self.scale, attn_mask)
    out = self.norm(out.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
    return self.proj_drop(self.proj(out))


def _block_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """timm ``Block.forward`` with relevance-conserving residual additions."""
    x = residual_add(x, self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))))
    return residual_add(x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


def _check_structure(model: VisionTransformer) -> None:
    """TypeError, before anything is changed, for the timm ViT variants this adapter would quantize wrongly or
    partly: blocks other than the pre-norm ``Block`` (``ResPostBlock`` normalises after the residual branch, so its
    LayerNorms do not feed the Linears; parallel blocks), norms other than ``LayerNorm`` (RmsNorm has no bias to
    fold the reparameterisation into), MLPs other than ``Mlp`` (SwiGLU, GLU), gated or non-standard attention,
    and attention-pool heads (``global_pool="map"``: their Linear layers are not quantized points)."""
    if getattr(model, "attn_pool", None) is not None:
        raise TypeError(f"timm VisionTransformer with global_pool={model.global_pool!r} (an attention-pool head) is "
                        "not supported: its Linear layers would stay float. Supported: global_pool 'token', 'avg', "
                        "'max', 'avgmax' or ''.")
    for i, blk in enumerate(model.blocks):
        problem = None
        if type(blk) is not Block:
            problem = f"a {type(blk).__name__} (only the pre-norm timm `Block` is supported)"
        elif type(blk.attn) is not Attention or blk.attn.gate is not None:
            problem = f"{type(blk.attn).__name__} attention (only the standard timm `Attention`, without gating)"
        elif type(blk.mlp) is not Mlp:
            problem = f"a {type(blk.mlp).__name__} MLP (only timm `Mlp` with fc1/fc2 is supported)"
        else:
            norms = [n for n in (blk.norm1, blk.norm2) if not isinstance(n, nn.LayerNorm) or n.bias is None]
            if norms:
                problem = (f"{type(norms[0]).__name__} normalisation (reparameterisation folds into a LayerNorm "
                           "with weight and bias)")
        if problem is not None:
            raise TypeError(f"timm block {i} is {problem}; nothing was changed. This timm ViT variant is not "
                            "supported yet.")


class _TimmViT(TimmFamily):
    name = "timm VisionTransformer (ViT/DeiT)"
    attention_forward = _attention_forward

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def layout(self, model: nn.Module) -> Layout:
        _check_structure(model)
        layout = Layout([], [], "patch_embed.proj", [], {"patch_embed.proj": -1})
        for i in range(len(model.blocks)):
            block_points(f"blocks.{i}", i, layout)
        for head in ("head", "head_dist"):
            if isinstance(getattr(model, head, None), nn.Linear):
                layout.linears.append(head)
                layout.block_of[head] = len(model.blocks)
        return layout

    def block_forwards(self, model: nn.Module) -> list[tuple[nn.Module, Callable]]:
        return [(block, _block_forward) for block in model.blocks]

    def key_centering_problem(self, model: nn.Module) -> str | None:
        if any(not isinstance(block.attn.k_norm, nn.Identity) for block in model.blocks):
            return "this timm ViT normalises its keys (qk_norm), so a shifted key changes the attention"
        return None

    def input_shape(self, model: nn.Module) -> tuple[int, int | None, int | None]:
        pe = model.patch_embed
        if getattr(pe, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True):
            return pe.proj.in_channels, None, None
        return pe.proj.in_channels, *pe.img_size


TIMM_VIT = _TimmViT()
