"""LRP layer importance (``docs/method.md#lrp-importance``): ``compute_importance(model, data)``.

LRP-QViT (Ranjan & Savakis, arXiv 2401.11243) scores each quantized point l by the positive part of
gradient ⊙ relevance at its output, M_l = (G_l ⊙ R_l)⁺, with R propagated by the rules of Chefer et al.
(CVPR 2021, see ``relevance``). The image's contribution is c_l = mean(M_l) (heads averaged for attention
maps); the layer score C_l is the mean of c_l over the images and the importance I_l = C_l / Σ C.

One forward pass and two backward passes per batch (gradient, then relevance), in float32, on the model as
it is (float, not yet quantized); the model is unchanged afterwards.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import relevance
from .architectures import Family, Layout, find_family
from .architectures.base import install_instance_forward, remove_instance_forward
from .inputs import as_pixel_values
from .nn import is_quantized
from .scores import normalised

__all__ = ["check_targets", "compute_importance", "dense_seeds", "eval_with_gradients_for", "float32_model",
           "image_contributions", "point_contributions", "relevance_and_gradients", "scoring"]

try:  # timm's LayerScale multiplies by γ: relevance passes through it
    from timm.layers import LayerScale as _TimmLayerScale
except ImportError:  # pragma: no cover
    _TimmLayerScale = ()

_ELEMENTWISE = (nn.LayerNorm, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, _TimmLayerScale)


def _is_elementwise(module: nn.Module) -> bool:
    return isinstance(module, _ELEMENTWISE) or type(module).__module__ == "transformers.activations"


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return relevance.record(self, relevance.linear(x, self.weight, self.bias))


def _patch_embed_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # relevance is read up to the patch embedding's output: the graph starts there
    out = self._conv_forward(x, self.weight, self.bias).detach().requires_grad_()
    relevance.active_recorder().roots.append(out)
    return relevance.record(self, out)


def _elementwise_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    forward = type(self).forward.__get__(self)
    if getattr(self, "inplace", False):  # ReLU(inplace=True), LayerScale(inplace=True): x must stay x for relevance
        return relevance.pass_through(x, lambda t: forward(t.clone()))
    return relevance.pass_through(x, forward)


@contextlib.contextmanager
def eval_with_gradients_for(model: nn.Module, params: Sequence[nn.Parameter] = ()) -> Iterator[None]:
    """``model`` in eval mode with ``requires_grad`` only on ``params``; mode and flags restored on exit."""
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.eval()
        for p, _ in grad_flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(was_training)


@contextlib.contextmanager
def scoring(model: nn.Module) -> Iterator[tuple[Family, Layout, relevance.Recorder]]:
    """Route ``model`` (this instance only) through the relevance primitives and record every quantized point;
    everything is undone on exit."""
    family = find_family(model)
    if is_quantized(model):
        raise ValueError("compute_importance scores the float model; call it before quantize().")
    layout = family.layout(model)
    recorder = relevance.Recorder()
    names = {name: module for name, module in model.named_modules()}
    for point in [*layout.weight_points(), *layout.attentions]:
        recorder.names[id(names[point])] = point
    patched = [(names[layout.patch_embed], _patch_embed_forward)]
    patched += [(m, _linear_forward) for m in model.modules() if isinstance(m, nn.Linear)]
    patched += [(m, _elementwise_forward) for m in model.modules() if _is_elementwise(m)]
    patched += family.block_forwards(model)
    with eval_with_gradients_for(model):
        try:
            family.install_attention(model, layout)
            for module, forward in patched:
                install_instance_forward(module, forward)
            with recorder:
                yield family, layout, recorder
        finally:
            for module, _ in patched:
                remove_instance_forward(module)
            family.remove_attention(model, layout)


_NO_CLASSES = ("{} has no classifier: it is scored on its image embedding (the projection on its own direction) or, "
               "for a dense-prediction model, on its dense target (the predicted classes of its queries or pixels), "
               "so there are no classes to target; pass no targets / labels.")


def _cut(value: object, originals: list[torch.Tensor], leaves: list[torch.Tensor]) -> object:
    """``value`` (a tensor, or a model output, dict, tuple or list of them) with every tensor in the autograd graph
    replaced by a detached leaf that requires grad; the replaced tensors go to ``originals``, the leaves to
    ``leaves``."""
    if isinstance(value, torch.Tensor):
        if not value.requires_grad:
            return value
        originals.append(value)
        leaves.append(value.detach().requires_grad_())
        return leaves[-1]
    if isinstance(value, dict):
        return type(value)(**{k: _cut(v, originals, leaves) for k, v in value.items()})
    if isinstance(value, (tuple, list)):
        return type(value)(_cut(v, originals, leaves) for v in value)
    return value


def dense_seeds(model: nn.Module, family: Family, pixel_values: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(backbone outputs F, gradient seeds ∂s/∂F, relevance seeds) of a dense model, from one forward pass.

    The head between the backbone and the target s = ``family.relevance_target`` is differentiated, not
    relevance-propagated: the relevance entering the backbone is the positive part of gradient ⊙ input,
    R_F = (F ⊙ ∂s/∂F)⁺ (the evidence for the target of LRP's z-rule, for a head taken as linear at F; α1β0 keeps
    it non-negative through the backbone), scaled per image to Σ R_F = 1 over all of its backbone outputs, so that
    every image weighs the same as a classifier's one-hot seed.
    """
    originals, leaves = [], []
    handle = model.get_submodule(family.backbone(model)).register_forward_hook(
        lambda module, args, output: _cut(output, originals, leaves))
    try:
        target = family.relevance_target(family.logits(model, pixel_values))
    finally:
        handle.remove()
    grads = torch.autograd.grad(target.sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    products = [(leaf.detach() * g).clamp_(min=0) for leaf, g in zip(leaves, grads)]
    total = sum(p.flatten(1).sum(1) for p in products).clamp_min(relevance.EPS)
    return originals, grads, [p / total.view(-1, *[1] * (p.dim() - 1)) for p in products]


def relevance_and_gradients(
    model: nn.Module, pixel_values: torch.Tensor, targets: torch.Tensor | None = None
) -> tuple[Layout, relevance.Recorder]:
    """One forward and the two backward passes; the recorder holds, per point, the gradient
    (``captured["grad"]``) and the relevance (``captured["relevance"]``) of the target at its output.

    The target of a classifier is the logit of ``targets`` (default: the predicted class), seeded with gradient 1
    and relevance 1. A model without a classifier is scored on its embedding e's projection on its own direction,
    s = e·ê with ê = e/‖e‖ held constant: gradient seed ê, relevance seed e ⊙ ê / ‖e‖ (≥ 0, summing to 1). A
    dense-prediction model is seeded at its backbone's outputs (``dense_seeds``).
    """
    # the backward passes need autograd even under a caller's torch.inference_mode(); its tensors are cloned
    with torch.inference_mode(False), torch.enable_grad(), scoring(model) as (family, layout, recorder):
        if family.backbone(model) is not None:
            if targets is not None:
                raise ValueError(_NO_CLASSES.format(type(model).__name__))
            outputs, grad_seed, relevance_seed = dense_seeds(model, family, pixel_values.clone())
        elif family.is_classifier(model):
            outputs = family.logits(model, pixel_values.clone())
            if targets is None:
                targets = outputs.argmax(-1)
            grad_seed = relevance_seed = F.one_hot(targets.to(outputs.device), outputs.shape[-1]).to(outputs.dtype)
        else:
            if targets is not None:
                raise ValueError(_NO_CLASSES.format(type(model).__name__))
            outputs = family.logits(model, pixel_values.clone())
            embedding = outputs.detach()
            grad_seed = F.normalize(embedding, dim=-1)
            relevance_seed = embedding * grad_seed / embedding.norm(dim=-1, keepdim=True).clamp_min(relevance.EPS)
        recorder.mode = "grad"
        torch.autograd.grad(outputs, recorder.roots, grad_seed, retain_graph=True)
        recorder.mode = "relevance"
        torch.autograd.grad(outputs, recorder.roots, relevance_seed)
    return layout, recorder


def image_contributions(
    model: nn.Module, pixel_values: torch.Tensor, targets: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-image contributions c_l = mean((G_l ⊙ R_l)⁺) of every quantized point, each of shape (N,).

    ``targets``: class per image, or None for the predicted class. The model must be float32.
    """
    layout, recorder = relevance_and_gradients(model, pixel_values, targets)
    return point_contributions(layout, recorder, len(pixel_values))


def point_contributions(layout: Layout, recorder: relevance.Recorder, num_images: int) -> dict[str, torch.Tensor]:
    """c_l = mean((G_l ⊙ R_l)⁺) per image, from what ``relevance_and_gradients`` recorded; each of shape (N,)."""
    out = {}
    for point in layout.points():
        m = (recorder.captured["grad"][point] * recorder.captured["relevance"][point]).clamp_(min=0)
        # window attention (Swin) puts images × windows in dim 0, images first: mean per image
        per_row = m.sum(tuple(range(1, m.dim())))  # summing first avoids copying a non-contiguous m
        out[point] = (per_row.reshape(num_images, -1).sum(1) / (m.numel() // num_images)).cpu()
    return out


def check_targets(targets: object, n: int, num_classes: int) -> torch.Tensor | None:
    """``targets`` as a long tensor of ``n`` class indices in [0, num_classes), or None; else ValueError."""
    if targets is None:
        return None
    targets = torch.as_tensor(targets)
    if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be a 1-D sequence of integer class indices, got {targets.dtype} "
                         f"of shape {tuple(targets.shape)}.")
    if len(targets) != n:
        raise ValueError(f"targets has {len(targets)} labels but the data has {n} images.")
    if len(targets) and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"targets must be class indices in [0, {num_classes - 1}], got values in "
                         f"[{int(targets.min())}, {int(targets.max())}].")
    return targets.long()


def float32_model(model: nn.Module) -> nn.Module:
    """``model`` itself when all its parameters are float32 (scoring needs float32), else a float32 copy."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return copy.deepcopy(model).float()
    return model


def compute_importance(
    model: nn.Module, data: object, targets: Sequence[int] | torch.Tensor | None = None, batch_size: int = 32,
    progress: bool = True,
) -> dict[str, float]:
    """Relative LRP importance ``{point name: I_l}`` of every quantized point, summing to 1.

    ``data`` as for ``quantize()``; ``targets`` are labels, or None for each image's predicted class (for a model
    without a classifier: None, see ``relevance_and_gradients``).
    Batches of ``batch_size`` images; a batch gives exactly the per-image results (to float rounding). A
    progress bar (tqdm, on stderr) counts the batches when there is more than one and ``progress`` is set.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    family = find_family(model)
    pixels = as_pixel_values(data, *family.input_shape(model))
    scored = float32_model(model)
    device = next(scored.parameters()).device
    if targets is not None and not family.is_classifier(model):
        raise ValueError(_NO_CLASSES.format(type(model).__name__))
    labels = None
    if targets is not None:
        with torch.no_grad():
            num_classes = family.logits(scored, pixels[:1].to(device)).shape[-1]
        labels = check_targets(targets, len(pixels), num_classes)
    sums: dict[str, float] = {}
    starts = range(0, len(pixels), batch_size)
    for start in tqdm(starts, desc="LRP importance", unit="batch", leave=False,
                      disable=not progress or len(starts) < 2):
        batch_targets = None if labels is None else labels[start:start + batch_size]
        contributions = image_contributions(scored, pixels[start:start + batch_size].to(device), batch_targets)
        for point, c in contributions.items():
            sums[point] = sums.get(point, 0.0) + c.double().sum().item()
    return normalised(sums)
