"""Adapter for Hugging Face Swinv2 (``Swinv2ForImageClassification``, ``Swinv2Model``).

Swinv2 blocks are post-norm: x ← x + LN(Attn(x)), x ← x + LN(MLP(x)), and the LayerNorms after the patch embedding
and after each patch-merging reduction feed the next block's residual stream as well as its q/k/v. No LayerNorm
feeds only Linear layers, so there is nothing to reparameterise: every Linear (``attention.self.{query,key,value}``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``, ``downsample.reduction``, the classifier) has a
per-tensor input quantizer, and ``post_ln`` changes nothing. Attention is cosine attention,
softmax(τ_h · q̂·k̂ᵀ + 16·σ(B) + M) with q̂ = q/‖q‖ and k̂ = k/‖k‖: the quantized q·kᵀ takes q̂ and k̂. The
continuous position bias MLP maps constant coordinates to the bias table B and stays float. Swinv2 does not use
transformers' ``AttentionInterface``, so attention is intercepted by replacing ``forward`` per instance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Swinv2ForImageClassification, Swinv2Model
from transformers.models.swinv2.modeling_swinv2 import (
    Swinv2Layer,
    Swinv2PatchMerging,
    Swinv2SelfAttention,
    window_partition,
    window_reverse,
)

from .. import relevance
from .base import Layout, quantized_attention
from .hf import HFFamily, check_modules

__all__ = ["HF_SWINV2"]


def _attention_forward(self: Swinv2SelfAttention, hidden_states: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, output_attentions: bool | None = False):
    """``Swinv2SelfAttention.forward`` through ``quantized_attention``."""
    batch, tokens, _ = hidden_states.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return relevance.pass_through(x, lambda t: F.normalize(t, dim=-1))

    query, key = unit(heads(self.query(hidden_states))), unit(heads(self.key(hidden_states)))
    value = heads(self.value(hidden_states))
    scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
    table = self.continuous_position_bias_mlp(self.relative_coords_table).view(-1, self.num_attention_heads)
    bias = table[self.relative_position_index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1)
    bias = 16 * torch.sigmoid(bias).unsqueeze(0)
    if attention_mask is not None:  # transformers' Swinv2SelfAttention adds the shift mask twice
        mask = attention_mask.unsqueeze(1).repeat(batch // attention_mask.shape[0], 1, 1, 1)
        bias = bias + mask + mask
    context, probs = quantized_attention(self, query, key, value, scale, bias)
    context = context.transpose(1, 2).reshape(batch, tokens, self.all_head_size)
    return (context, probs) if output_attentions else (context,)


def _layer_forward(self: Swinv2Layer, hidden_states: torch.Tensor, input_dimensions: tuple[int, int],
                   output_attentions: bool | None = False):
    """``Swinv2Layer.forward`` in eval mode with relevance-conserving residual additions."""
    height, width = input_dimensions
    batch, _, channels = hidden_states.size()
    shortcut = hidden_states
    hidden_states, pad_values = self.maybe_pad(hidden_states.view(batch, height, width, channels), height, width)
    _, height_pad, width_pad, _ = hidden_states.shape
    if self.shift_size > 0:
        hidden_states = torch.roll(hidden_states, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
    windows = window_partition(hidden_states, self.window_size).view(-1, self.window_size * self.window_size, channels)
    attn_mask = self.get_attn_mask(height_pad, width_pad, dtype=hidden_states.dtype, device=windows.device)
    attention = self.attention(windows, attn_mask, output_attentions=output_attentions)
    shifted = window_reverse(attention[0].view(-1, self.window_size, self.window_size, channels), self.window_size,
                             height_pad, width_pad)
    if self.shift_size > 0:
        shifted = torch.roll(shifted, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
    if pad_values[3] > 0 or pad_values[5] > 0:
        shifted = shifted[:, :height, :width, :].contiguous()
    attended = self.layernorm_before(shifted.view(batch, height * width, channels))
    hidden_states = relevance.residual_add(shortcut, attended)
    mlp = self.layernorm_after(self.output(self.intermediate(hidden_states)))
    layer_output = relevance.residual_add(hidden_states, mlp)
    return (layer_output, attention[1]) if output_attentions else (layer_output,)


class _HFSwinv2(HFFamily):
    name = "transformers Swinv2"
    classifiers = (Swinv2ForImageClassification,)
    model_classes = (*classifiers, Swinv2Model)
    layer_classes = (Swinv2Layer,)
    attention_forward = staticmethod(_attention_forward)

    def key_centering_problem(self, model: nn.Module) -> str | None:
        return "Swin V2's cosine attention normalises every key, so a shifted key changes the attention"

    def layout(self, model: nn.Module) -> Layout:
        prefix = "swinv2." if isinstance(model, Swinv2ForImageClassification) else ""
        patch_embed = f"{prefix}embeddings.patch_embeddings.projection"
        layout = Layout([], [], patch_embed, [], {patch_embed: -1})
        block = -1
        for name, module in model.named_modules():
            if isinstance(module, Swinv2Layer):
                block += 1
                attention = f"{name}.attention.self"
                points = [f"{attention}.{p}" for p in ("query", "key", "value")]
                points += [f"{name}.attention.output.dense", f"{name}.intermediate.dense", f"{name}.output.dense"]
                layout.linears += points
                layout.post_gelu.append(f"{name}.output.dense")
                layout.attentions.append(attention)
                points += [f"{attention}.{p}" for p in ("matmul1", "softmax", "matmul2")]
                layout.block_of.update(dict.fromkeys(points, block))
            elif isinstance(module, Swinv2PatchMerging):  # merging belongs to the stage it closes
                layout.linears.append(f"{name}.reduction")
                layout.block_of[f"{name}.reduction"] = block
        self.add_heads(model, layout, block + 1)
        check_modules(model, layout)
        return layout

    def layer_forward(self, model: nn.Module) -> Callable:
        return _layer_forward

    def input_shape(self, model: nn.Module) -> tuple[int, int | None, int | None]:
        return model.config.num_channels, None, None  # Swinv2 pads any size


HF_SWINV2 = _HFSwinv2()
