"""Adapter for timm ``VisionTransformer`` (ViT and DeiT, ``VisionTransformerDistilled`` included).

Block layout: ``norm1`` → ``attn.qkv``, ``attn.proj``, ``norm2`` → ``mlp.fc1``, ``mlp.fc2``; heads ``head``
and, for DeiT, ``head_dist``. Attention is intercepted by replacing ``forward`` on each attention instance.
"""

from __future__ import annotations

import types

import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..relevance import residual_add
from .base import Family, Layout, quantized_attention

__all__ = ["TIMM_VIT", "install_instance_forward", "remove_instance_forward"]


def install_instance_forward(module: nn.Module, forward) -> None:
    """Replace ``forward`` on this instance only (the class and every other instance are untouched)."""
    module.forward = types.MethodType(forward, module)


def remove_instance_forward(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)


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


class _TimmViT(Family):
    name = "timm VisionTransformer (ViT/DeiT)"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def layout(self, model: nn.Module) -> Layout:
        post_ln, linears, attentions, block_of = [], [], [], {"patch_embed.proj": -1}
        for i, blk in enumerate(model.blocks):
            attn = getattr(blk, "attn", None)
            if type(attn) is not Attention or attn.gate is not None:
                raise TypeError(f"timm block {i} uses {type(attn).__name__}; only the standard timm `Attention` "
                                "(without gating) is supported.")
            p = f"blocks.{i}"
            post_ln += [(f"{p}.norm1", [f"{p}.attn.qkv"]), (f"{p}.norm2", [f"{p}.mlp.fc1"])]
            linears += [f"{p}.attn.proj", f"{p}.mlp.fc2"]
            attentions.append(f"{p}.attn")
            points = [f"{p}.attn.qkv", f"{p}.attn.proj", f"{p}.mlp.fc1", f"{p}.mlp.fc2"]
            points += [f"{p}.attn.{m}" for m in ("matmul1", "softmax", "matmul2")]
            block_of.update(dict.fromkeys(points, i))
        for head in ("head", "head_dist"):
            if isinstance(getattr(model, head, None), nn.Linear):
                linears.append(head)
                block_of[head] = len(model.blocks)
        return Layout(post_ln, linears, "patch_embed.proj", attentions, block_of)

    def install_attention(self, model: nn.Module, layout: Layout) -> None:
        for name in layout.attentions:
            install_instance_forward(model.get_submodule(name), _attention_forward)

    def remove_attention(self, model: nn.Module, layout: Layout) -> None:
        for name in layout.attentions:
            remove_instance_forward(model.get_submodule(name))

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values)

    def block_forwards(self, model: nn.Module) -> list[tuple[nn.Module, object]]:
        return [(block, _block_forward) for block in model.blocks]

    def input_shape(self, model: nn.Module) -> tuple[int, int | None, int | None]:
        pe = model.patch_embed
        if getattr(pe, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True):
            return pe.proj.in_channels, None, None
        return pe.proj.in_channels, *pe.img_size


TIMM_VIT = _TimmViT()
