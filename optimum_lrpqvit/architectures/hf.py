"""Adapters for Hugging Face ViT, DeiT (with and without the distillation head) and Swin, as classifiers and as bare
encoders (``ViTModel``, ``DeiTModel``: the [CLS] token; ``SwinModel``: ``pooler_output``), and the machinery the
other transformers encoder adapters (``hf_encoders``, ``hf_swinv2``) share.

The pre-norm encoder layer of transformers ≥ 5.9 is ``norm_before`` → ``attention.{q,k,v}_proj``,
``attention.{o_proj|out_proj}``, ``norm_after`` → ``mlp.fc1``, ``mlp.fc2``, optionally with layer scales after the
two branches; ``BlockNames`` says where one family keeps these parts (ViT/DeiT/Swin: ``layernorm_before``,
``layernorm_after``; Swin adds ``downsample.norm`` → ``downsample.reduction``). Attention is intercepted through
transformers' ``AttentionInterface``: the function is registered under ``"lrpqvit"`` and selected per model instance
with ``set_attn_implementation`` (families that predate the interface set ``HFFamily.attention_forward``, which
replaces their attention modules' ``forward`` per instance).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AttentionInterface,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    PreTrainedModel,
    SwinForImageClassification,
    SwinModel,
    ViTForImageClassification,
    ViTModel,
)
from transformers.models.deit.modeling_deit import DeiTLayer
from transformers.models.swin.modeling_swin import SwinLayer, SwinPatchMerging, window_partition, window_reverse
from transformers.models.vit.modeling_vit import ViTLayer

from ..relevance import pass_through, residual_add
from .base import Family, Layout, install_instance_forward, quantized_attention, remove_instance_forward

__all__ = ["ATTN_IMPLEMENTATION", "BlockNames", "HF_SWIN", "HF_VIT", "HFFamily", "check_modules",
           "install_swin_pad_values", "is_transformers_model", "pre_norm_layer_forward", "remove_swin_pad_values",
           "swin_layer_forward"]

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


@dataclass(frozen=True)
class BlockNames:
    """Where a pre-norm encoder layer keeps its parts, as submodule paths relative to the layer. ``attention`` holds
    the two quantized matmuls (and is the module the layer calls, as ``mlp`` is); ``scales`` are the layer-scale
    modules after the attention and MLP branches, None where there are none."""

    norm_before: str = "layernorm_before"
    attention: str = "attention"
    qkv: tuple[str, str, str] = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
    out_proj: str = "attention.o_proj"
    norm_after: str = "layernorm_after"
    mlp: str = "mlp"
    fc1: str = "mlp.fc1"
    fc2: str = "mlp.fc2"
    scales: tuple[str | None, str | None] = (None, None)


def _scaled(layer: nn.Module, scale: str | None, x: torch.Tensor) -> torch.Tensor:
    # a layer scale multiplies channels by constants: relevance passes through it unchanged
    return x if scale is None else pass_through(x, layer.get_submodule(scale))


def pre_norm_layer_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                           names: BlockNames, **kwargs):
    """h ← h + γ₁·Attn(LN₁(h)); h ← h + γ₂·MLP(LN₂(h)), the eval-mode forward of a pre-norm encoder layer (dropout
    and drop-path are the identity), with relevance-conserving residual additions. Bound per layer with
    ``functools.partial(pre_norm_layer_forward, names=...)``."""
    normed = self.get_submodule(names.norm_before)(hidden_states)
    attention, _ = self.get_submodule(names.attention)(normed, attention_mask=attention_mask, **kwargs)
    hidden_states = residual_add(_scaled(self, names.scales[0], attention), hidden_states)
    mlp = self.get_submodule(names.mlp)(self.get_submodule(names.norm_after)(hidden_states))
    return residual_add(_scaled(self, names.scales[1], mlp), hidden_states)


def swin_layer_forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int],
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


def check_modules(model: nn.Module, layout: Layout) -> None:
    """TypeError, before anything is changed, unless every point of ``layout`` is an ``nn.Linear`` (or the patch
    embedding's ``nn.Conv2d``) and every LayerNorm to reparameterise an ``nn.LayerNorm`` with weight and bias."""
    modules = dict(model.named_modules())
    expected = [(n, nn.Linear) for n in layout.weight_points()[1:]] + [(n, nn.LayerNorm) for n, _ in layout.post_ln]
    for name, kind in expected:
        module = modules.get(name)
        if not isinstance(module, kind) or (kind is nn.LayerNorm and (module.weight is None or module.bias is None)):
            found = "nothing" if module is None else f"a {type(module).__name__}"
            raise TypeError(f"{type(model).__name__}: {name} is {found} where this adapter expects nn."
                            f"{kind.__name__}{' with weight and bias' if kind is nn.LayerNorm else ''}; this variant "
                            "is not supported and nothing was changed.")


class HFFamily(Family):
    """A transformers model family: its model and encoder-layer classes, where each layer keeps its parts
    (``names``) and the Linear heads quantized after the last block. Subclasses override the hooks where a family
    differs (outputs, structure checks, layer forwards)."""

    model_classes: tuple[type, ...] = ()
    classifiers: tuple[type, ...] = ()  # the model classes with a classifier; the others are bare encoders
    layer_classes: tuple[type, ...] = ()
    names: BlockNames = BlockNames()
    heads: tuple[str, ...] = ("classifier", "cls_classifier", "distillation_classifier")
    # families that predate AttentionInterface: this replaces the attention modules' forward per instance
    attention_forward: Callable | None = None

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_classes)

    def is_classifier(self, model: nn.Module) -> bool:
        return isinstance(model, self.classifiers)

    def embedding(self, output) -> torch.Tensor:
        """The image embedding in a bare encoder's output."""
        return output.pooler_output

    def tower(self, model: nn.Module) -> str:
        """The prefix of the module names that are quantized ("" for the whole model; "vision_model." for the vision
        tower of a two-tower model)."""
        return ""

    def check_structure(self, model: nn.Module) -> None:
        """TypeError, before anything is changed, for variants of the family this adapter would quantize wrongly."""

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        prefix = self.tower(model)
        return [(n, m) for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, self.layer_classes)]

    def layout(self, model: nn.Module) -> Layout:
        self.check_structure(model)
        prefix, names = self.tower(model), self.names
        convs = [n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Conv2d)]
        if len(convs) != 1:
            raise TypeError(f"{type(model).__name__} has {len(convs)} convolutions where one patch embedding was "
                            "expected; nothing was changed.")
        post_ln, linears, attentions, block_of, post_gelu = [], [], [], {convs[0]: -1}, []
        block = -1
        for name, module in model.named_modules():
            if not name.startswith(prefix):
                continue
            if isinstance(module, self.layer_classes):
                block += 1
                attention = f"{name}.{names.attention}"
                qkv = [f"{name}.{p}" for p in names.qkv]
                fc1, out_proj, fc2 = (f"{name}.{p}" for p in (names.fc1, names.out_proj, names.fc2))
                post_ln += [(f"{name}.{names.norm_before}", qkv), (f"{name}.{names.norm_after}", [fc1])]
                linears += [out_proj, fc2]
                post_gelu.append(fc2)
                attentions.append(attention)
                points = [*qkv, fc1, out_proj, fc2, *(f"{attention}.{p}" for p in ("matmul1", "softmax", "matmul2"))]
                block_of.update(dict.fromkeys(points, block))
            elif isinstance(module, SwinPatchMerging):
                # merging belongs to the stage it closes
                post_ln.append((f"{name}.norm", [f"{name}.reduction"]))
                block_of[f"{name}.reduction"] = block
        layout = Layout(post_ln, linears, convs[0], attentions, block_of, post_gelu)
        self.add_heads(model, layout, block + 1)
        check_modules(model, layout)
        return layout

    def add_heads(self, model: nn.Module, layout: Layout, block: int) -> None:
        """Append the model's Linear heads (``heads``) to ``layout`` as points of ``block``."""
        for head in self.heads:
            if isinstance(getattr(model, head, None), nn.Linear):
                layout.linears.append(head)
                layout.block_of[head] = block

    def attention_root(self, model: nn.Module) -> PreTrainedModel:
        """The (sub)model whose attention implementation is switched to this library's: the model itself, or a
        dense model's backbone (its head keeps its own attention)."""
        return model

    def install_attention(self, model: nn.Module, layout: Layout) -> None:
        if self.attention_forward is not None:
            for name in layout.attentions:
                install_instance_forward(model.get_submodule(name), self.attention_forward)
            return
        root = self.attention_root(model)
        if getattr(root, _PREVIOUS_ATTN, None) is None:
            setattr(root, _PREVIOUS_ATTN, root.config._attn_implementation)
        root.set_attn_implementation(ATTN_IMPLEMENTATION)

    def remove_attention(self, model: nn.Module, layout: Layout) -> None:
        if self.attention_forward is not None:
            for name in layout.attentions:
                remove_instance_forward(model.get_submodule(name))
            return
        root = self.attention_root(model)
        previous = getattr(root, _PREVIOUS_ATTN, None)
        if previous is not None:
            root.set_attn_implementation(previous)
            delattr(root, _PREVIOUS_ATTN)

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        output = model(pixel_values=pixel_values)
        return output.logits if self.is_classifier(model) else self.embedding(output)

    def layer_forward(self, model: nn.Module) -> Callable:
        """The relevance-conserving forward of this family's encoder layers."""
        return functools.partial(pre_norm_layer_forward, names=self.names)

    def block_forwards(self, model: nn.Module) -> list[tuple[nn.Module, Callable]]:
        forward = self.layer_forward(model)
        return [(m, forward) for _, m in self.layers(model)]

    def input_shape(self, model: nn.Module) -> tuple[int, int | None, int | None]:
        config = getattr(model.config, "vision_config", model.config)  # two-tower models: the vision tower's
        size = config.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return config.num_channels, height, width


class _HFViT(HFFamily):
    name = "transformers ViT/DeiT"
    classifiers = (ViTForImageClassification, DeiTForImageClassification, DeiTForImageClassificationWithTeacher)
    model_classes = (*classifiers, ViTModel, DeiTModel)
    layer_classes = (ViTLayer, DeiTLayer)

    def embedding(self, output) -> torch.Tensor:
        # the final LayerNorm's [CLS] token (DINO's feature); the optional tanh pooler is a separate, float head
        return output.last_hidden_state[:, 0]


class _HFSwin(HFFamily):
    name = "transformers Swin"
    classifiers = (SwinForImageClassification,)
    model_classes = (*classifiers, SwinModel)
    layer_classes = (SwinLayer,)

    def layer_forward(self, model: nn.Module) -> Callable:
        return swin_layer_forward

    def input_shape(self, model: nn.Module) -> tuple[int, int | None, int | None]:
        return model.config.num_channels, None, None  # Swin pads any size

    def install_pad_values(self, model: nn.Module) -> None:
        install_swin_pad_values(self.layers(model))

    def remove_pad_values(self, model: nn.Module) -> None:
        remove_swin_pad_values(self.layers(model))


def _maybe_pad_with_value(self: SwinLayer, hidden_states: torch.Tensor, height: int, width: int):
    """``SwinLayer.maybe_pad`` with the padded positions set to ``layernorm_before.pad_value`` (per channel)
    instead of 0."""
    padded, pad_values = type(self).maybe_pad(self, hidden_states, height, width)
    if pad_values[3] or pad_values[5]:
        inside = torch.zeros(padded.shape[1:3], dtype=torch.bool, device=padded.device)
        inside[:height, :width] = True
        padded = torch.where(inside[:, :, None], padded, self.layernorm_before.pad_value.to(padded.dtype))
    return padded, pad_values


def install_swin_pad_values(layers: list[tuple[str, nn.Module]]) -> None:
    """``Family.install_pad_values`` for ``SwinLayer``s: a ``pad_value`` buffer on each ``layernorm_before`` and the
    layer's ``maybe_pad`` replaced per instance by one that pads with it."""
    for _, layer in layers:
        norm = layer.layernorm_before
        norm.register_buffer("pad_value", torch.zeros_like(norm.bias))
        layer.maybe_pad = types.MethodType(_maybe_pad_with_value, layer)


def remove_swin_pad_values(layers: list[tuple[str, nn.Module]]) -> None:
    for _, layer in layers:
        layer.__dict__.pop("maybe_pad", None)
        layer.layernorm_before._buffers.pop("pad_value", None)


HF_VIT = _HFViT()
HF_SWIN = _HFSwin()
