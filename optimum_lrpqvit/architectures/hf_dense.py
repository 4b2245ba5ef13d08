"""Adapters for transformers dense-prediction models built on a supported encoder: Mask2Former
(``Mask2FormerForUniversalSegmentation``) and UperNet (``UperNetForSemanticSegmentation``) with a Swin backbone
(``SwinBackbone``), and YOLOS (``YolosForObjectDetection``, a ViT with detection tokens).

The backbone is quantized exactly as the classifier of its family is (the Swin layers and patch mergings of
``hf``, named under the backbone's path); the head (pixel decoder, transformer decoder, predictors) stays float
unless ``LRPQConfig.quantize_head``, which adds its Linear layers at uniform bits (see ``head_linears`` for the
ones that stay float).

LRP relevance enters the backbone at its outputs (``Family.backbone``): the head is differentiated, not
relevance-propagated, and the relevance of a backbone output F is gradient ⊙ input of the dense target,
(F ⊙ ∂s/∂F)⁺, normalised per image to Σ R = 1 (``lrp.relevance_and_gradients``). The target s per image is
``query_class_target`` (detection and instance segmentation) or ``pixel_class_target`` (semantic segmentation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import (
    Mask2FormerForUniversalSegmentation,
    UperNetForSemanticSegmentation,
    YolosForObjectDetection,
)
from transformers.models.swin.modeling_swin import SwinBackbone, SwinLayer
from transformers.models.yolos.modeling_yolos import YolosLayer, YolosModel

from ..relevance import residual_add
from .base import Layout
from .hf import BlockNames, HFFamily, install_swin_pad_values, remove_swin_pad_values, swin_layer_forward

if TYPE_CHECKING:
    from ..config import LRPQConfig

__all__ = ["HF_SWIN_DENSE", "HF_YOLOS", "pixel_class_target", "query_class_target"]


def query_class_target(logits: torch.Tensor) -> torch.Tensor:
    """s = Σ_{q kept} max_{c<K} z_qc per image, for query logits (batch, queries, K + 1) whose last class is
    "no object": the kept queries are those whose arg-max is a real class; an image with none keeps the query with
    the largest real-class logit, so that every image has a target."""
    best = logits[..., :-1].amax(-1)  # (batch, queries)
    kept = logits.argmax(-1) != logits.shape[-1] - 1
    fallback = torch.zeros_like(kept).scatter_(1, best.argmax(1, keepdim=True), True)
    kept = torch.where(kept.any(1, keepdim=True), kept, fallback)
    return (best * kept).sum(1)


def pixel_class_target(logits: torch.Tensor) -> torch.Tensor:
    """s = mean_p z_{c*(p), p} per image, for per-pixel logits (batch, classes, height, width): each pixel's
    predicted-class logit, averaged over the pixels."""
    return logits.amax(1).flatten(1).mean(1)


class _DenseFamily(HFFamily):
    """A dense model: a backbone of a supported family (``backbone_classes``, at ``backbone_paths[model class]``)
    feeding a float head."""

    classifiers = ()
    heads = ()
    backbone_classes: tuple[type, ...] = ()
    backbone_paths: dict[type, str] = {}

    def backbone(self, model: nn.Module) -> str:
        return next(path for cls, path in self.backbone_paths.items() if isinstance(model, cls))

    def tower(self, model: nn.Module) -> str:
        return self.backbone(model) + "."

    def attention_root(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.backbone(model))

    def check_structure(self, model: nn.Module) -> None:
        backbone = model.get_submodule(self.backbone(model))
        if not isinstance(backbone, self.backbone_classes):
            supported = ", ".join(c.__name__ for c in self.backbone_classes)
            raise TypeError(f"{type(model).__name__} has a {type(backbone).__name__} backbone; optimum-lrpqvit "
                            f"quantizes {type(model).__name__} with a {supported} backbone (vision transformers, "
                            "not convolutional backbones such as ConvNeXt or ResNet). Nothing was changed.")

    def head_linears(self, model: nn.Module) -> list[str]:
        """The Linear layers outside the backbone that ``quantize_head`` quantizes: all but those of
        ``nn.MultiheadAttention`` and those the head calls through a plain Python list (Mask2Former's prediction
        MLPs), where swapping the registered module would not change what runs."""
        prefix = self.tower(model)
        listed = {id(v) for m in model.modules() for value in vars(m).values() if isinstance(value, (list, tuple))
                  for v in value if isinstance(v, nn.Module)}
        excluded = [f"{n}." for n, m in model.named_modules()
                    if isinstance(m, nn.MultiheadAttention) or id(m) in listed]
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(prefix)
                and id(m) not in listed and not any(n.startswith(e) for e in excluded)]

    def _with_head(self, model: nn.Module, layout: Layout) -> Layout:
        head = self.head_linears(model)
        if not head:
            raise ValueError(f"quantize_head=True, but the head of {type(model).__name__} has no Linear layers (it "
                             "is convolutional); leave quantize_head unset.")
        block = max(layout.block_of.values()) + 1
        layout.linears += head
        layout.block_of.update(dict.fromkeys(head, block))
        return layout

    def layout(self, model: nn.Module) -> Layout:
        layout = super().layout(model)
        if any(hasattr(model.get_submodule(n), "input_quantizer") for n in self.head_linears(model)):
            return self._with_head(model, layout)  # quantized with its head
        return layout

    def quantized_layout(self, model: nn.Module, config: LRPQConfig) -> Layout:
        layout = super().layout(model)  # of the float model: the backbone
        return self._with_head(model, layout) if config.quantize_head else layout

    def export_problem(self, model: nn.Module) -> str | None:
        return "ONNX export covers the classification families; dense-prediction models are not exported yet"


class _HFSwinDense(_DenseFamily):
    name = "transformers Mask2Former and UperNet with a Swin backbone"
    model_classes = (Mask2FormerForUniversalSegmentation, UperNetForSemanticSegmentation)
    layer_classes = (SwinLayer,)
    backbone_classes = (SwinBackbone,)
    backbone_paths = {Mask2FormerForUniversalSegmentation: "model.pixel_level_module.encoder",
                      UperNetForSemanticSegmentation: "backbone"}

    def pipeline_task(self, model: nn.Module) -> str:
        return "image-segmentation"

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        output = model(pixel_values=pixel_values)
        return output.logits if isinstance(model, UperNetForSemanticSegmentation) else output.class_queries_logits

    def relevance_target(self, logits: torch.Tensor) -> torch.Tensor:
        return pixel_class_target(logits) if logits.dim() == 4 else query_class_target(logits)

    def layer_forward(self, model: nn.Module):
        return swin_layer_forward

    def input_shape(self, model: nn.Module) -> tuple[int, int | None, int | None]:
        return model.config.backbone_config.num_channels, None, None

    def install_pad_values(self, model: nn.Module) -> None:
        install_swin_pad_values(self.layers(model))

    def remove_pad_values(self, model: nn.Module) -> None:
        remove_swin_pad_values(self.layers(model))


def _yolos_layer_forward(self: YolosLayer, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """``YolosLayer.forward`` in eval mode with relevance-conserving residual additions (YolosOutput adds the
    second residual inside; here it is taken apart)."""
    attention = self.attention(self.layernorm_before(hidden_states), **kwargs)
    hidden_states = residual_add(attention, hidden_states)
    mlp = self.output.dense(self.intermediate(self.layernorm_after(hidden_states)))
    return residual_add(mlp, hidden_states)


class _HFYolos(_DenseFamily):
    name = "transformers YOLOS"
    model_classes = (YolosForObjectDetection,)
    layer_classes = (YolosLayer,)
    backbone_classes = (YolosModel,)
    backbone_paths = {YolosForObjectDetection: "vit"}
    names = BlockNames(attention="attention.attention",
                       qkv=tuple(f"attention.attention.{p}" for p in ("query", "key", "value")),
                       out_proj="attention.output.dense", fc1="intermediate.dense", fc2="output.dense")

    def pipeline_task(self, model: nn.Module) -> str:
        return "object-detection"

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).logits

    def relevance_target(self, logits: torch.Tensor) -> torch.Tensor:
        return query_class_target(logits)

    def layer_forward(self, model: nn.Module):
        return _yolos_layer_forward

    def input_shape(self, model: nn.Module) -> tuple[int, int | None, int | None]:
        return model.config.num_channels, None, None  # position embeddings are interpolated to any size


HF_SWIN_DENSE = _HFSwinDense()
HF_YOLOS = _HFYolos()
