"""Weight rounding, ``config.weight_rounding`` (``docs/method.md``, "Weight rounding").

The per-output-channel grid (s, z) of every weight is set by calibration; the rounding chooses each weight's code
on that grid:

* ``nearest``: q = clamp(round(w/s) + z, 0, 2^b − 1), every weight on its own;
* ``gptq``: GPTQ/OPTQ (Frantar et al., ICLR 2023): the input columns of W are rounded in order of decreasing
  Hessian diagonal, and the error of each is compensated in the columns not yet rounded, minimising
  ‖(W − Ŵ) X‖² for the layer's calibration inputs X through H = X Xᵀ. The inputs are those of the calibrated,
  reparameterised model (one more forward pass of the calibration images), so the compensation acts on the
  weights the model runs with.

With ``config.compensate_activations`` (``compensate_activations`` below) each Linear's weight and bias are
first re-solved, in execution order, so that the layer reproduces the float model's output from its quantized
input; the rounding then acts on those weights, GPTQ with the Hessian of the quantized inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import Family, Layout
from .nn import QuantConv2d, QuantLinear, quantizers_disabled
from .registry import WEIGHT_ROUNDINGS

__all__ = ["compensate_activations", "compensated_weight", "gptq_round", "input_hessians", "weight_rounding"]

GPTQ_DAMPING = 0.01  # of the mean Hessian diagonal, added to the diagonal (as GPTQ does)
GPTQ_BLOCK = 128  # columns per lazy-update block: the result does not depend on it
RESIDUAL_MARGIN = 0.45  # of a step: far enough inside ±½ that float32 rounding cannot move a code
COMPENSATION_RIDGE = 0.3  # λ of compensated_weight, of the mean Hessian diagonal (benchmarks/compensation_ridge.py)


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
        _set_weight(module, _gptq_rows(module, module.weight, hessians[name]))


@torch.no_grad()
def compensated_weight(weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor, cross: torch.Tensor,
                       ridge: float = COMPENSATION_RIDGE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``(out, in)`` weight W* and ``(out,)`` bias b* of a Linear that, applied to its quantized inputs x̃,
    best reproduce its float outputs W x + b:

        [W* b*] = argmin ‖[W b] X − [W* b*] X̃‖² + λ ‖[W* b*] − [W b]‖²  =  [W b] (C + λI) (H + λI)⁻¹

    with X, X̃ the float and quantized inputs as columns, each with a row of ones appended when the Linear has a
    bias (``bias`` None: no bias, none appended); ``hessian`` is H = X̃ X̃ᵀ and ``cross`` C = X X̃ᵀ; λ =
    ``ridge`` · mean(diag H) keeps the solution near [W b] where the calibration inputs do not determine it
    (ERQ's activation quantization error reduction, Zhong et al., ICML 2024, here with the bias). Computed in
    float64; returns float32 (b* None without a bias)."""
    out, columns = weight.shape
    size = columns + (bias is not None)
    if hessian.shape != (size, size) or cross.shape != hessian.shape:
        raise ValueError(f"the Hessian and cross terms must be ({size}, {size}) for a weight of {columns} input "
                         f"columns{' and a bias' if bias is not None else ''}, got {tuple(hessian.shape)} and "
                         f"{tuple(cross.shape)}.")
    wb = weight.detach().double()
    if bias is not None:
        wb = torch.cat([wb, bias.detach().double()[:, None]], dim=1)
    h = hessian.double()
    eye = torch.eye(size, dtype=torch.float64, device=h.device)
    lam = ridge * h.diagonal().mean()
    solved = torch.linalg.solve(h + lam * eye, (wb @ (cross.double() + lam * eye)).T).T  # H + λI is symmetric
    if bias is None:
        return solved.float(), None
    return solved[:, :-1].float(), solved[:, -1].float()


@torch.no_grad()
def compensate_activations(model: nn.Module, family: Family, layout: Layout, pixels: torch.Tensor,
                           rounding: str) -> None:
    """Sequential compensation of the activation quantization error, then ``rounding`` (``"nearest"`` or
    ``"gptq"``) of every weight.

    One float pass of ``pixels`` (every quantizer the identity) records each quantized Linear's input X; in one
    pass of the calibrated model, before each Linear runs, its weight and bias become ``compensated_weight`` for
    X and the quantized inputs X̃ it is given there (which already come from the compensated layers before it), its
    weight grid is re-fitted, and the weight is rounded — by GPTQ with H = X̃ X̃ᵀ for ``"gptq"``. A Linear that
    runs more than once per forward (a prediction head applied to every decoder layer's output) is solved after
    the pass, over all its calls. The patch embedding (its input is the image) is rounded only. Holds every
    quantized Linear's float input on ``pixels`` at once (ViT-S/16, 32 images: about 0.8 GB); Linears that read
    the same tensor share it."""
    if rounding not in ("nearest", "gptq"):
        raise ValueError(f"compensate_activations works with weight_rounding 'nearest' or 'gptq', got {rounding!r}.")
    modules = {name: model.get_submodule(name) for name in layout.weight_points()}
    linears = {name: m for name, m in modules.items() if isinstance(m, QuantLinear)}
    float_inputs: dict[str, list[torch.Tensor]] = {name: [] for name in linears}  # one entry per call
    last: list[torch.Tensor | None] = [None, None]  # the last input seen and its rows, for Linears that share it

    def record(name: str) -> Callable:
        def hook(_: nn.Module, args: tuple) -> None:
            if args[0] is not last[0]:
                last[0], last[1] = args[0], args[0].detach().float().reshape(-1, args[0].shape[-1]).clone()
            float_inputs[name].append(last[1])
        return hook

    repeated = {}  # name → [H, C] summed over the calls of a Linear that runs more than once

    def update(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            if isinstance(module, QuantConv2d):
                rows = _patch_rows(module, x)
                if rounding == "gptq" and rows is not None:
                    _set_weight(module, _gptq_rows(module, module.weight, rows.T @ rows))
                return
            xq = module.input_quantizer(x).reshape(-1, x.shape[-1]).double()
            xf = float_inputs[name].pop(0).double()
            if module.bias is not None:
                xq, xf = _with_ones(xq), _with_ones(xf)
            if name in repeated:
                repeated[name][0] += xq.T @ xq
                repeated[name][1] += xf.T @ xq
            else:
                _compensate(module, xq.T @ xq, xf.T @ xq, rounding)
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in linears.items()]
    try:
        with quantizers_disabled(model):
            family.logits(model, pixels)
    finally:
        for handle in handles:
            handle.remove()
    last[:] = [None, None]
    for name, inputs in float_inputs.items():
        if len(inputs) > 1:
            module = linears[name]
            size = module.in_features + (module.bias is not None)
            repeated[name] = [torch.zeros(size, size, dtype=torch.float64, device=module.weight.device)
                              for _ in range(2)]
    handles = [m.register_forward_pre_hook(update(name)) for name, m in modules.items()]
    try:
        family.logits(model, pixels)
    finally:
        for handle in handles:
            handle.remove()
    for name, (hessian, cross) in repeated.items():
        _compensate(linears[name], hessian, cross, rounding)


def _compensate(module: QuantLinear, hessian: torch.Tensor, cross: torch.Tensor, rounding: str) -> None:
    """The module's weight and bias ← ``compensated_weight``, its grid re-fitted, the weight rounded."""
    weight, bias = compensated_weight(module.weight, module.bias, hessian, cross)
    _set_weight(module, weight)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(module.bias.dtype), requires_grad=False)
    module.calibrate_weight()
    if rounding == "gptq":
        columns = module.in_features
        _set_weight(module, _gptq_rows(module, weight, hessian[:columns, :columns]))


def _with_ones(rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype, device=rows.device)], dim=1)


def _gptq_rows(module: QuantLinear | QuantConv2d, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``gptq_round`` of ``weight`` (the module's shape) on the module's weight grid, with GPTQ's residuals."""
    quantizer = module.weight_quantizer
    rows = weight.reshape(weight.shape[0], -1)
    rounded = gptq_round(rows, hessian, quantizer.scale, quantizer.zero_point, quantizer.bits, residual=True)
    return rounded.reshape(weight.shape)


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    # a new Parameter: the float model's own Linear keeps its weight, so that quantize() can be undone
    module.weight = nn.Parameter(weight.to(module.weight.dtype), requires_grad=False)


def weight_rounding(name: str) -> Rounding:
    """The weight rounding registered as ``name``: ``rounding(model, family, layout, calibration pixels)``
    re-rounds the calibrated model's weights in place; ValueError naming the valid ones otherwise."""
    return WEIGHT_ROUNDINGS.get(name)
