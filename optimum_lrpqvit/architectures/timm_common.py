"""What the timm adapters share: attention intercepted per instance and the layout of a timm block."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .base import Family, Layout, install_instance_forward, remove_instance_forward

__all__ = ["TimmFamily", "block_points"]


def block_points(prefix: str, block: int, layout: Layout) -> None:
    """Add a timm block's points (``norm1`` → ``attn.qkv``, ``attn.proj``, ``norm2`` → ``mlp.fc1``, ``mlp.fc2``
    and the attention products) to ``layout``."""
    p = prefix
    layout.post_ln += [(f"{p}.norm1", [f"{p}.attn.qkv"]), (f"{p}.norm2", [f"{p}.mlp.fc1"])]
    layout.linears += [f"{p}.attn.proj", f"{p}.mlp.fc2"]
    layout.post_gelu.append(f"{p}.mlp.fc2")
    layout.attentions.append(f"{p}.attn")
    points = [f"{p}.attn.qkv", f"{p}.attn.proj", f"{p}.mlp.fc1", f"{p}.mlp.fc2"]
    points += [f"{p}.attn.{m}" for m in ("matmul1", "softmax", "matmul2")]
    layout.block_of.update(dict.fromkeys(points, block))


class TimmFamily(Family):
    """timm models: called as ``model(x)``; attention intercepted by ``attention_forward`` per instance."""

    attention_forward: Callable

    def install_attention(self, model: nn.Module, layout: Layout) -> None:
        for name in layout.attentions:
            install_instance_forward(model.get_submodule(name), type(self).attention_forward)

    def remove_attention(self, model: nn.Module, layout: Layout) -> None:
        for name in layout.attentions:
            remove_instance_forward(model.get_submodule(name))

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values)
