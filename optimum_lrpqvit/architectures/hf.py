"""Adapters for Hugging Face ViT, DeiT (with and without the distillation head) and Swin classifiers.

The three share their block layout in transformers ≥ 5.9 (``layernorm_before`` → ``attention.{q,k,v}_proj``,
``attention.o_proj``, ``layernorm_after`` → ``mlp.fc1``, ``mlp.fc2``; Swin adds ``downsample.norm`` →
``downsample.reduction``). Attention is intercepted through transformers' ``AttentionInterface``: the
function is registered under ``"lrpqvit"`` and selected per model instance with ``set_attn_implementation``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    AttentionInterface,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    PreTrainedModel,
    SwinForImageClassification,
    ViTForImageClassification,
)
from transformers.models.deit.modeling_deit import DeiTLayer
from transformers.models.swin.modeling_swin import SwinLayer, SwinPatchMerging, window_partition, window_reverse
from transformers.models.vit.modeling_vit import ViTLayer

from ..relevance import residual_add
from .base import Family, Layout, quantized_attention

__all__ = ["ATTN_IMPLEMENTATION", "HF_SWIN", "HF_VIT", "is_transformers_model"]

ATTN_IMPLEMENTATION = "lrpqvit"
_PREVIOUS_ATTN = "_lrpqvit_previous_attn_implementation"


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model (its config and weights go through ``save_pretrained`` /
    ``from_pretrained``)."""
    return isinstance(model, PreTrainedModel)


def lrpqvit_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``AttentionInterface`` function: eager attention with the module's quantized matmuls."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    out, probs = quantized_attention(module, query, key, value, scaling, attention_mask)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(ATTN_IMPLEMENTATION, lrpqvit_attention)


def _vit_layer_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """``ViTLayer``/``DeiTLayer.forward`` with relevance-conserving residual additions."""
    attention, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
    hidden_states = residual_add(self.dropout(attention), hidden_states)
    return residual_add(self.dropout(self.mlp(self.layernorm_after(hidden_states))), hidden_states)


def _swin_layer_forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int],
                        always_partition: bool = False, **kwargs):
    """``SwinLayer.forward`` with relevance-conserving residual additions."""
    if not always_partition:
        self.set_shift_and_window_size(input_dimensions)
    height, width = input_dimensions
    batch_size, _, channels = hidden_states.size()
    shortcut = hidden_states
    hidden_states = self.layernorm_before(hidden_states).view(batch_size, height, width, channels)
    hidden_states, pad_values = self.maybe_pad(hidden_states, height, width)
    _, height_pad, width_pad, _ = hidden_states.shape
    windows = window_partition(self.cyclic_shift(hidden_states), self.window_size)
    windows = windows.view(-1, self.window_size * self.window_size, channels)
    attn_mask = self.get_attn_mask(height_pad, width_pad, dtype=hidden_states.dtype, device=windows.device)
    attention_output, attn_weights = self.attention(windows, attn_mask, **kwargs)
    attention_windows = self.dropout(attention_output).view(-1, self.window_size, self.window_size, channels)
    attention_windows = self.cyclic_shift(
        window_reverse(attention_windows, self.window_size, height_pad, width_pad), reverse=True)
    if pad_values[3] > 0 or pad_values[5] > 0:
        attention_windows = attention_windows[:, :height, :width, :].contiguous()
    attention_windows = attention_windows.view(batch_size, height * width, channels)
    hidden_states = residual_add(shortcut, self.drop_path(attention_windows))
    mlp_output = self.dropout(self.mlp(self.layernorm_after(hidden_states)))
    return residual_add(mlp_output, hidden_states), attn_weights


class _HFFamily(Family):
    model_classes: tuple[type, ...] = ()
    layer_classes: tuple[type, ...] = ()
    heads: tuple[str, ...] = ("classifier", "cls_classifier", "distillation_classifier")

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_classes)

    def layout(self, model: nn.Module) -> Layout:
        post_ln, linears, attentions, block_of = [], [], [], {}
        block = -1
        patch_embed = f"{model.base_model_prefix}.embeddings.patch_embeddings.projection"
        block_of[patch_embed] = -1
        for name, module in model.named_modules():
            if isinstance(module, self.layer_classes):
                block += 1
                qkv = [f"{name}.attention.{p}_proj" for p in "qkv"]
                post_ln += [(f"{name}.layernorm_before", qkv), (f"{name}.layernorm_after", [f"{name}.mlp.fc1"])]
                linears += [f"{name}.attention.o_proj", f"{name}.mlp.fc2"]
                attentions.append(f"{name}.attention")
                points = qkv + [f"{name}.mlp.fc1", f"{name}.attention.o_proj", f"{name}.mlp.fc2"]
                points += [f"{name}.attention.{p}" for p in ("matmul1", "softmax", "matmul2")]
                block_of.update(dict.fromkeys(points, block))
            elif isinstance(module, SwinPatchMerging):
                # merging belongs to the stage it closes
                post_ln.append((f"{name}.norm", [f"{name}.reduction"]))
                block_of[f"{name}.reduction"] = block
        for head in self.heads:
            if isinstance(getattr(model, head, None), nn.Linear):
                linears.append(head)
                block_of[head] = block + 1
        return Layout(post_ln, linears, patch_embed, attentions, block_of)

    def install_attention(self, model: nn.Module, layout: Layout) -> None:
        if getattr(model, _PREVIOUS_ATTN, None) is None:
            setattr(model, _PREVIOUS_ATTN, model.config._attn_implementation)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)

    def remove_attention(self, model: nn.Module, layout: Layout) -> None:
        previous = getattr(model, _PREVIOUS_ATTN, None)
        if previous is not None:
            model.set_attn_implementation(previous)
            delattr(model, _PREVIOUS_ATTN)

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).logits

    def block_forwards(self, model: nn.Module) -> list[tuple[nn.Module, Callable]]:
        forward = _swin_layer_forward if isinstance(model, SwinForImageClassification) else _vit_layer_forward
        return [(m, forward) for m in model.modules() if isinstance(m, self.layer_classes)]

    def input_shape(self, model: nn.Module) -> tuple[int, int | None, int | None]:
        size = model.config.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return model.config.num_channels, height, width


class _HFViT(_HFFamily):
    name = "transformers ViT/DeiT"
    model_classes = (ViTForImageClassification, DeiTForImageClassification, DeiTForImageClassificationWithTeacher)
    layer_classes = (ViTLayer, DeiTLayer)


class _HFSwin(_HFFamily):
    name = "transformers Swin"
    model_classes = (SwinForImageClassification,)
    layer_classes = (SwinLayer,)

    def input_shape(self, model: nn.Module) -> tuple[int, int | None, int | None]:
        return model.config.num_channels, None, None  # Swin pads any size

    def padded_after_norm(self, model: nn.Module, height: int, width: int) -> list[str]:
        # SwinLayer pads its normed input to a multiple of its window (shrunk to the map when the map is smaller);
        # the feature map is the patch grid, halved (rounded up) by every patch merging
        config = model.config
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        h, w = math.ceil(height / patch), math.ceil(width / patch)
        padded = []
        for i, depth in enumerate(config.depths):
            window = min(config.window_size, h, w)
            if h % window or w % window:
                padded += [f"swin.encoder.layers.{i}.blocks.{j}" for j in range(depth)]
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return padded


HF_VIT = _HFViT()
HF_SWIN = _HFSwin()
