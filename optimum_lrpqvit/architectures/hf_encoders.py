"""Adapters for the other transformers ViT-style encoders: Dinov2 (with and without registers), ViTMSN and ViTMAE,
BEiT and Data2VecVision, and the CLIP and SigLIP vision towers, each as a classifier, as a bare encoder and, for
CLIP and SigLIP, inside the two-tower model.

All are pre-norm encoders (``hf.HFFamily`` does the layout and, through ``AttentionInterface``, the interception;
Data2VecVision, which predates that interface, gets its self-attention ``forward`` replaced per instance); what
differs is where a layer keeps its parts (``BlockNames``), Dinov2's layer scales, BEiT's relative position bias and
layer-scale parameters, and what the model outputs. A model with a classifier is scored and evaluated on its
logits; a model without one on its image embedding (``Family.is_classifier``):

- Dinov2, BEiT, Data2VecVision, CLIP vision, SigLIP vision: ``pooler_output``;
- CLIPVisionModelWithProjection: ``image_embeds``; CLIPModel, SiglipModel: ``get_image_features``;
- ViTMSN, ViTMAE: the [CLS] token of ``last_hidden_state`` (ViTMAE with ``mask_ratio=0`` and patches in order).

Stays float: SigLIP's attention-pooling head (an ``nn.MultiheadAttention`` probe; relevance passes through it by
the same rules as through the encoder) and, in a two-tower model, the text tower.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    BeitForImageClassification,
    BeitModel,
    CLIPForImageClassification,
    CLIPModel,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Data2VecVisionForImageClassification,
    Data2VecVisionModel,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    SiglipForImageClassification,
    SiglipModel,
    SiglipVisionModel,
    ViTMAEModel,
    ViTMSNForImageClassification,
    ViTMSNModel,
)
from transformers.models.beit.modeling_beit import BeitLayer
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.data2vec.modeling_data2vec_vision import Data2VecVisionLayer, Data2VecVisionSelfAttention
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipMultiheadAttentionPoolingHead
from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer
from transformers.models.vit_msn.modeling_vit_msn import ViTMSNLayer

from .. import relevance
from .base import quantized_attention
from .hf import BlockNames, HFFamily

__all__ = ["HF_BEIT", "HF_CLIP", "HF_DATA2VEC_VISION", "HF_DINOV2", "HF_SIGLIP", "HF_VIT_ENCODERS"]

_TWO_TOWER = (CLIPModel, SiglipModel)
_INTERPOLATED = ("its embeddings interpolate the position embeddings (bicubic with antialiasing) whenever they are "
                 "traced, which torch's ONNX exporter has no operator for")


class _Encoder(HFFamily):
    heads = ("classifier", "visual_projection")

    def tower(self, model: nn.Module) -> str:
        return "vision_model." if isinstance(model, _TWO_TOWER) else ""

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        if isinstance(model, _TWO_TOWER):
            return model.get_image_features(pixel_values=pixel_values).pooler_output
        return super().logits(model, pixel_values)


class _Dinov2(_Encoder):
    name = "transformers Dinov2 (with and without registers)"
    classifiers = (Dinov2ForImageClassification, Dinov2WithRegistersForImageClassification)
    model_classes = (*classifiers, Dinov2Model, Dinov2WithRegistersModel)
    layer_classes = (Dinov2Layer, Dinov2WithRegistersLayer)
    names = BlockNames(norm_before="norm1", norm_after="norm2", scales=("layer_scale1", "layer_scale2"))

    def check_structure(self, model: nn.Module) -> None:
        if model.config.use_swiglu_ffn:
            raise TypeError(f"{type(model).__name__} with use_swiglu_ffn=True (a SwiGLU MLP, the giant Dinov2) is not "
                            "supported: only the fc1/GELU/fc2 MLP is; nothing was changed.")

    def export_problem(self, model: nn.Module) -> str | None:
        return _INTERPOLATED

    def input_shape(self, model: nn.Module) -> tuple[int, int | None, int | None]:
        return model.config.num_channels, None, None  # position embeddings are interpolated to any size


class _ViTEncoders(_Encoder):
    name = "transformers ViTMSN, ViTMAE (encoder)"
    classifiers = (ViTMSNForImageClassification,)
    model_classes = (*classifiers, ViTMSNModel, ViTMAEModel)
    layer_classes = (ViTMSNLayer, ViTMAELayer)

    def check_structure(self, model: nn.Module) -> None:
        if isinstance(model, ViTMAEModel) and model.config.mask_ratio > 0:
            raise TypeError(f"ViTMAEModel with mask_ratio={model.config.mask_ratio} encodes a random subset of the "
                            "patches; load it with mask_ratio=0.0 (from_pretrained(..., mask_ratio=0.0)) to quantize "
                            "the encoder. Nothing was changed.")

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        if isinstance(model, ViTMAEModel):  # patches in order: MAE shuffles them by `noise` even when it keeps all
            patches = model.embeddings.patch_embeddings.num_patches
            # (batch, patches) ascending; built from pixel_values so that a traced graph keeps a dynamic batch
            noise = torch.arange(patches, device=pixel_values.device) + 0 * pixel_values[:, :1, 0, 0]
            return model(pixel_values=pixel_values, noise=noise).last_hidden_state[:, 0]
        return super().logits(model, pixel_values)

    def embedding(self, output) -> torch.Tensor:
        return output.last_hidden_state[:, 0]


def _beit_layer_forward(self: BeitLayer, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        interpolate_pos_encoding: bool = False, resolution: tuple[int, int] | None = None, **kwargs):
    """``BeitLayer.forward`` in eval mode with relevance-conserving residual additions; relevance passes the
    layer-scale factors λ₁, λ₂ unchanged."""
    if self.relative_position_bias is not None:
        height, width = resolution
        bias = self.relative_position_bias((height // self.patch_size, width // self.patch_size),
                                           interpolate_pos_encoding, dim_size=hidden_states.shape[1])
        attention_mask = bias if attention_mask is None else bias + attention_mask
    attention, _ = self.attention(self.layernorm_before(hidden_states), attention_mask=attention_mask, **kwargs)
    hidden_states = relevance.residual_add(relevance.pass_through(attention, lambda t: self.lambda_1 * t),
                                           hidden_states)
    mlp = self.mlp(self.layernorm_after(hidden_states))
    return relevance.residual_add(relevance.pass_through(mlp, lambda t: self.lambda_2 * t), hidden_states)


class _Beit(_Encoder):
    name = "transformers BEiT"
    classifiers = (BeitForImageClassification,)
    model_classes = (*classifiers, BeitModel)
    layer_classes = (BeitLayer,)

    def layer_forward(self, model: nn.Module) -> Callable:
        return _beit_layer_forward


def _data2vec_attention_forward(self: Data2VecVisionSelfAttention, hidden_states: torch.Tensor,
                                output_attentions: bool = False, relative_position_bias: torch.Tensor | None = None,
                                interpolate_pos_encoding: bool = False, resolution: tuple[int, int] | None = None):
    """``Data2VecVisionSelfAttention.forward`` (eager and SDPA alike) through ``quantized_attention``."""
    shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    query, key, value = (layer(hidden_states).view(shape).transpose(1, 2) for layer in (self.query, self.key,
                                                                                         self.value))
    bias = relative_position_bias
    if self.has_relative_position_bias:
        height, width = resolution
        own = self.relative_position_bias((height // self.config.patch_size, width // self.config.patch_size),
                                          interpolate_pos_encoding, dim_size=hidden_states.shape[1])
        bias = own if bias is None else own + bias
    context, probs = quantized_attention(self, query, key, value, self.attention_head_size ** -0.5, bias)
    context = context.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)
    return (context, probs) if output_attentions else (context,)


def _data2vec_layer_forward(self: Data2VecVisionLayer, hidden_states: torch.Tensor, output_attentions: bool = False,
                            relative_position_bias: torch.Tensor | None = None, interpolate_pos_encoding: bool = False,
                            resolution: tuple[int, int] | None = None):
    """``Data2VecVisionLayer.forward`` in eval mode with relevance-conserving residual additions."""
    outputs = self.attention(self.layernorm_before(hidden_states), output_attentions=output_attentions,
                             relative_position_bias=relative_position_bias,
                             interpolate_pos_encoding=interpolate_pos_encoding, resolution=resolution)
    attention = outputs[0]
    if self.lambda_1 is not None:
        attention = relevance.pass_through(attention, lambda t: self.lambda_1 * t)
    hidden_states = relevance.residual_add(attention, hidden_states)
    mlp = self.output(self.intermediate(self.layernorm_after(hidden_states)))
    if self.lambda_2 is not None:
        mlp = relevance.pass_through(mlp, lambda t: self.lambda_2 * t)
    return (relevance.residual_add(mlp, hidden_states), *outputs[1:])


class _Data2VecVision(_Encoder):
    name = "transformers Data2VecVision"
    classifiers = (Data2VecVisionForImageClassification,)
    model_classes = (*classifiers, Data2VecVisionModel)
    layer_classes = (Data2VecVisionLayer,)
    names = BlockNames(attention="attention.attention", qkv=tuple(f"attention.attention.{p}" for p in
                                                                   ("query", "key", "value")),
                       out_proj="attention.output.dense", fc1="intermediate.dense", fc2="output.dense")
    attention_forward = staticmethod(_data2vec_attention_forward)

    def layer_forward(self, model: nn.Module) -> Callable:
        return _data2vec_layer_forward


_TOWER_NAMES = BlockNames(norm_before="layer_norm1", attention="self_attn",
                          qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                          out_proj="self_attn.out_proj", norm_after="layer_norm2")


class _Clip(_Encoder):
    name = "transformers CLIP vision (CLIPVisionModel[WithProjection], CLIPForImageClassification, CLIPModel)"
    classifiers = (CLIPForImageClassification,)
    model_classes = (*classifiers, CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel)
    layer_classes = (CLIPEncoderLayer,)
    names = _TOWER_NAMES

    def embedding(self, output) -> torch.Tensor:
        return output.image_embeds if getattr(output, "image_embeds", None) is not None else output.pooler_output


def _siglip_head_forward(self: SiglipMultiheadAttentionPoolingHead, hidden_state: torch.Tensor) -> torch.Tensor:
    """The attention-pooling head in float with the relevance rules of the encoder: the probe's query is a constant,
    keys and values are Linear maps of the tokens, softmax(q·kᵀ/√d)·v as in ``quantized_attention``."""
    attention = self.attention
    batch, tokens, width = hidden_state.shape
    heads = attention.num_heads
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3)

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, -1, heads, width // heads).transpose(1, 2)

    query = split(nn.functional.linear(self.probe, w_q, b_q).expand(batch, -1, -1))
    key, value = split(relevance.linear(hidden_state, w_k, b_k)), split(relevance.linear(hidden_state, w_v, b_v))
    pooled, _ = quantized_attention(attention, query, key, value, (width // heads) ** -0.5)
    pooled = pooled.transpose(1, 2).reshape(batch, -1, width)
    pooled = relevance.linear(pooled, attention.out_proj.weight, attention.out_proj.bias)
    return relevance.residual_add(pooled, self.mlp(self.layernorm(pooled)))[:, 0]


class _Siglip(_Encoder):
    name = "transformers SigLIP vision (SiglipVisionModel, SiglipForImageClassification, SiglipModel)"
    classifiers = (SiglipForImageClassification,)
    model_classes = (*classifiers, SiglipVisionModel, SiglipModel)
    layer_classes = (SiglipEncoderLayer,)
    names = _TOWER_NAMES

    def embedding(self, output) -> torch.Tensor:
        # without the attention-pooling head (vision_use_head=False) the tokens are averaged, as the classifier does
        return output.last_hidden_state.mean(1) if output.pooler_output is None else output.pooler_output

    def block_forwards(self, model: nn.Module) -> list[tuple[nn.Module, Callable]]:
        prefix = self.tower(model)
        pool = [m for n, m in model.named_modules()
                if n.startswith(prefix) and isinstance(m, SiglipMultiheadAttentionPoolingHead)]
        return super().block_forwards(model) + [(m, _siglip_head_forward) for m in pool]


HF_DINOV2 = _Dinov2()
HF_VIT_ENCODERS = _ViTEncoders()
HF_BEIT = _Beit()
HF_DATA2VEC_VISION = _Data2VecVision()
HF_CLIP = _Clip()
HF_SIGLIP = _Siglip()
