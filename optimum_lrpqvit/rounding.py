"""Weight rounding, ``config.weight_rounding`` (``docs/method.md``, "Weight rounding").

The per-output-channel grid (s, z) of every weight is set by calibration; the rounding chooses each weight's code
on that grid:

* ``nearest``: q = clamp(round(w/s) + z, 0, 2^b − 1), every weight on its own;
* ``gptq``: GPTQ/OPTQ (Frantar et al., ICLR 2023): the input columns of W are rounded in order of decreasing
  Hessian diagonal, and the error of each is compensated in the columns not yet rounded, minimising
  ‖(W − Ŵ) X‖² for the layer's calibration inputs X through H = X Xᵀ. The inputs are those of the calibrated,
  reparameterised model (one more forward pass of the calibration images), so the compensation acts on the
  weights the model runs with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import Family, Layout
from .nn import QuantConv2d, QuantLinear
from .registry import WEIGHT_ROUNDINGS

__all__ = ["gptq_round", "input_hessians", "weight_rounding"]

GPTQ_DAMPING = 0.01  # of the mean Hessian diagonal, added to the diagonal (as GPTQ does)
GPTQ_BLOCK = 128  # columns per lazy-update block: the result does not depend on it
RESIDUAL_MARGIN = 0.45  # of a step: far enough inside ±½ that float32 rounding cannot move a code


@torch.no_grad()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               bits: int, damping: float = GPTQ_DAMPING, block: int = GPTQ_BLOCK,
               residual: bool = False) -> torch.Tensor:
    """Ŵ on the grid of ``scale``/``zero_point`` (per row, ``(out,)``) for the ``(out, in)`` weight, chosen by GPTQ
    for the ``(in, in)`` input Hessian H = Σ x xᵀ.

    With λ = ``damping`` · mean(diag H) added to the diagonal, columns are taken in order of decreasing diag H;
    column j is rounded to the nearest grid point and its error e_j = (w_j − ŵ_j) / U_jj is subtracted from the
    later columns as e_j U_j,k, where U is the upper Cholesky factor of H⁻¹. Inputs that were always zero
    (diag H = 0) are rounded to nearest. Computed in float64; returns float32 values s · (q − z) with integer
    codes q in [0, 2^b − 1] (exactly what ``nn.packed_weight_tensors`` stores).

    ``residual``: return s · (q − z + r) instead, r the compensated weight's distance to its code w̃/s − (q − z)
    clamped to ±``RESIDUAL_MARGIN``: off the grid, but rounding to nearest gives exactly the codes q, and a
    later rounding search (block reconstruction) starts from GPTQ's compensated weights."""
    out, columns = weight.shape
    if hessian.shape != (columns, columns):
        raise ValueError(f"the Hessian has shape {tuple(hessian.shape)}, the weight {columns} input columns.")
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * h.diagonal().mean())
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    w, h = w[:, order], h[order][:, order]
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s = scale.detach().double().reshape(-1, 1)
    z = zero_point.detach().double().reshape(-1, 1)
    high = 2**bits - 1
    codes = torch.empty_like(w)
    compensated = torch.empty_like(w)
    for start in range(0, columns, block):
        stop = min(start + block, columns)
        part, errors = w[:, start:stop].clone(), torch.empty(out, stop - start, dtype=w.dtype)
        u = upper[start:stop, start:stop]
        for j in range(stop - start):
            q = torch.clamp(torch.round(part[:, j:j + 1] / s) + z, 0, high)
            codes[:, start + j:start + j + 1] = q
            compensated[:, start + j:start + j + 1] = part[:, j:j + 1]
            error = (part[:, j:j + 1] - (q - z) * s) / u[j, j]
            part[:, j:] -= error * u[j:j + 1, j:]
            errors[:, j:j + 1] = error
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    inverse = torch.argsort(order)
    codes = codes[:, inverse]
    if residual:
        offset = (compensated[:, inverse] / s - (codes - z)).clamp(-RESIDUAL_MARGIN, RESIDUAL_MARGIN)
        return ((codes - z + offset) * s).float()
    return (codes.float() - zero_point.detach().float().reshape(-1, 1)) * scale.detach().float().reshape(-1, 1)


def _patch_rows(module: QuantConv2d, x: torch.Tensor) -> torch.Tensor | None:
    """The convolution's input as the rows a Linear over patches would see, if it is one (non-overlapping
    patches, no padding, dilation or groups: the patch embedding); None otherwise."""
    if (module.stride != module.kernel_size or module.padding not in ((0, 0), "valid") or module.groups != 1
            or module.dilation != (1, 1)):
        return None
    patches = F.unfold(x, module.kernel_size, stride=module.stride)  # (N, C·kh·kw, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@contextmanager
def input_hessians(model: nn.Module, layout: Layout) -> Iterator[dict[str, torch.Tensor]]:
    """Within the context, every forward pass adds Σ x xᵀ of the (float) inputs of each quantized Linear, and of a
    patch-embedding convolution, to ``hessians[name]`` (float32, ``(in, in)``); Linears that read the same
    LayerNorm output share one tensor. The hooks are this model's only and are removed on exit."""
    hessians: dict[str, torch.Tensor] = {}
    shared = {name: names[0] for _, names in layout.post_ln for name in names}
    handles = []

    def hook(name: str, module: nn.Module) -> Callable:
        def add(_: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            rows = _patch_rows(module, x) if isinstance(module, QuantConv2d) else x.reshape(-1, x.shape[-1])
            if rows is None:
                return
            if name not in hessians:
                hessians[name] = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
            hessians[name].addmm_(rows.T, rows)
        return add

    try:
        for name in layout.weight_points():
            module = model.get_submodule(name)
            if isinstance(module, (QuantLinear, QuantConv2d)) and shared.get(name, name) == name:
                handles.append(module.register_forward_pre_hook(hook(name, module)))
        yield hessians
    finally:
        for handle in handles:
            handle.remove()
        for name, owner in shared.items():
            if owner in hessians:
                hessians[name] = hessians[owner]


Rounding = Callable[[nn.Module, Family, Layout, torch.Tensor], None]


@WEIGHT_ROUNDINGS.register("nearest")
def _nearest(model: nn.Module, family: Family, layout: Layout, pixels: torch.Tensor) -> None:
    """Round to nearest: what calibration already gives."""


@WEIGHT_ROUNDINGS.register("gptq")
@torch.no_grad()
def _gptq(model: nn.Module, family: Family, layout: Layout, pixels: torch.Tensor) -> None:
    """One pass of ``pixels`` through the calibrated model for the input Hessians, then ``gptq_round`` of every
    weight with one. The weights keep GPTQ's compensated values within ``RESIDUAL_MARGIN`` of the chosen codes
    (``residual``): their round-to-nearest, which packing applies, is GPTQ's rounding."""
    with input_hessians(model, layout) as hessians:
        family.logits(model, pixels)
    for name in layout.weight_points():
        module = model.get_submodule(name)
        if name not in hessians:
            continue
        quantizer = module.weight_quantizer
        rows = module.weight.reshape(module.weight.shape[0], -1)
        rounded = gptq_round(rows, hessians[name], quantizer.scale, quantizer.zero_point, quantizer.bits,
                             residual=True)
        # a new Parameter: the float model's own Linear keeps its weight, so that quantize() can be undone
        module.weight = nn.Parameter(rounded.reshape(module.weight.shape).to(module.weight.dtype), requires_grad=False)


def weight_rounding(name: str) -> Rounding:
    """The weight rounding registered as ``name``: ``rounding(model, family, layout, calibration pixels)``
    re-rounds the calibrated model's weights in place; ValueError naming the valid ones otherwise."""
    return WEIGHT_ROUNDINGS.get(name)
