"""What an architecture adapter tells the quantizer: where the quantized points are and how to reach them."""

from __future__ import annotations

import abc
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import relevance

if TYPE_CHECKING:
    from ..config import LRPQConfig

__all__ = ["Layout", "Family", "install_instance_forward", "quantized_attention", "remove_instance_forward"]


@dataclass
class Layout:
    """Names (``model.named_modules()``) of the quantized points of one model.

    Attributes:
        post_ln: ``(LayerNorm, [Linears it feeds])`` pairs; those Linears get reparameterisable inputs.
        linears: the other Linear layers (per-tensor input quantizer), classifier heads included.
        patch_embed: the patch-embedding convolution.
        attentions: the attention modules whose two matmuls are quantized.
        block_of: for every point name, the index of the transformer block it belongs to (-1 for the patch
            embedding, ``len(blocks)`` for heads).
        post_gelu: the Linears among ``linears`` that read an MLP's activation (fc2: GELU or its variants), whose
            input quantizer is ``config.gelu_quantizer``.
    """

    post_ln: list[tuple[str, list[str]]]
    linears: list[str]
    patch_embed: str
    attentions: list[str]
    block_of: dict[str, int] = field(default_factory=dict)
    post_gelu: list[str] = field(default_factory=list)

    def weight_points(self) -> list[str]:
        """The points with weights: patch embedding, post-LayerNorm Linears, other Linears."""
        return [self.patch_embed, *(n for _, names in self.post_ln for n in names), *self.linears]

    def points(self) -> list[str]:
        """Every quantized point, as named in the bit plan: the weight points, then for every attention module
        ``.matmul1`` (q·kᵀ), ``.softmax`` (A, log-√2) and ``.matmul2`` (·V)."""
        products = [f"{a}.{p}" for a in self.attentions for p in ("matmul1", "softmax", "matmul2")]
        return self.weight_points() + products


class Family(abc.ABC):
    """One adapter per architecture family. Subclasses fill in the hooks below."""

    name: str = ""

    @abc.abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family."""

    @abc.abstractmethod
    def layout(self, model: nn.Module) -> Layout:
        """The quantized points of ``model``."""

    @abc.abstractmethod
    def install_attention(self, model: nn.Module, layout: Layout) -> None:
        """Route the listed attention modules through ``quantized_attention`` (this model instance only)."""

    @abc.abstractmethod
    def remove_attention(self, model: nn.Module, layout: Layout) -> None:
        """Undo ``install_attention``."""

    @abc.abstractmethod
    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's classification logits, through its own call signature; for a model without a classifier
        (``is_classifier`` False) its image embedding, (batch, features)."""

    def is_classifier(self, model: nn.Module) -> bool:
        """Whether ``logits`` gives class logits (else an image embedding)."""
        return True

    def pipeline_task(self, model: nn.Module) -> str:
        """The transformers ``pipeline`` task of ``model`` (the model card's pipeline tag)."""
        return "image-classification" if self.is_classifier(model) else "image-feature-extraction"

    def backbone(self, model: nn.Module) -> str | None:
        """For a dense-prediction model, the name of the backbone module whose outputs feed its float head (LRP
        relevance enters the backbone there, see ``relevance_target``); None for classifiers and encoders."""
        return None

    def relevance_target(self, logits: torch.Tensor) -> torch.Tensor:
        """For a dense-prediction model, the per-image scalar (batch,) whose relevance LRP propagates, from the
        ``logits`` of ``logits()``."""
        raise NotImplementedError(f"{self.name} models are classifiers or encoders: they have no dense target.")

    def quantized_layout(self, model: nn.Module, config: LRPQConfig) -> Layout:
        """The points that ``config`` quantizes: ``layout``, with a dense model's head Linears
        when ``config.quantize_head``. ValueError for ``quantize_head`` on a model without a dense head."""
        if config.quantize_head:
            raise ValueError(f"quantize_head=True applies to dense-prediction models (Mask2Former, UperNet, YOLOS); "
                             f"{type(model).__name__} always quantizes its Linear heads. Leave quantize_head unset.")
        return self.layout(model)

    @abc.abstractmethod
    def block_forwards(self, model: nn.Module) -> list[tuple[nn.Module, Callable]]:
        """(block, forward) pairs that, installed per instance, route every residual addition through
        ``relevance.residual_add`` (used during importance scoring only)."""

    def install_pad_values(self, model: nn.Module) -> None:
        """For blocks that zero-pad a LayerNorm's output (Swin pads the normed map to a multiple of its window):
        register a ``pad_value`` buffer (zeros) on that LayerNorm and pad with it instead, so that
        reparameterisation, which sets it to the image of 0 (X' = X / r − b: −b), stays exact for every input
        size. This model instance only; undone by ``remove_pad_values``. Nothing in most families."""

    def remove_pad_values(self, model: nn.Module) -> None:
        """Undo ``install_pad_values``."""

    def key_centering_problem(self, model: nn.Module) -> str | None:
        """Why shifting ``model``'s keys would change its attention (``key_centering``: normalised keys), or None
        where softmax attention over the keys is invariant to it."""
        return None

    def export_problem(self, model: nn.Module) -> str | None:
        """Why ``model`` cannot be exported to ONNX, or None where it can."""
        return None

    @abc.abstractmethod
    def input_shape(self, model: nn.Module) -> tuple[int, int | None, int | None]:
        """(channels, height, width) the model expects; None where any size is accepted."""


def install_instance_forward(module: nn.Module, forward: Callable) -> None:
    """Replace ``forward`` on this instance only (the class and every other instance are untouched)."""
    module.forward = types.MethodType(forward, module)


def remove_instance_forward(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)


def quantized_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q(q)·Q(k)ᵀ·scaling + bias) = A, then Q_log√2(A)·Q(v); inputs are (batch, heads, tokens, dim).

    ``module.matmul1`` / ``module.matmul2`` are the ``QuantMatMul`` points; without them this is plain attention.
    During importance scoring the products, scaling, bias and softmax follow the LRP rules of
    ``relevance`` and the points ``.matmul1``, ``.softmax`` and ``.matmul2`` are recorded.
    Returns (output (batch, heads, tokens, dim), A).
    """
    matmul1 = getattr(module, "matmul1", relevance.matmul)
    matmul2 = getattr(module, "matmul2", relevance.matmul)

    def softmax(scores: torch.Tensor) -> torch.Tensor:
        scores = scores * scaling
        if bias is not None:
            scores = scores + bias
        return scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)

    scores = relevance.record(module, matmul1(query, key.transpose(-2, -1)), "matmul1")
    probs = relevance.record(module, relevance.pass_through(scores, softmax), "softmax")
    return relevance.record(module, matmul2(probs, value), "matmul2"), probs
