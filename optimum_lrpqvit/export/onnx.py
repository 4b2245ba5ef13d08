"""ONNX export of a quantized model as a QDQ graph with this library's integer codes.

``export_onnx(model, path)`` writes a model returned by :func:`optimum_lrpqvit.quantize` (or
:func:`optimum_lrpqvit.load_quantized`) as an ONNX graph in QDQ form (``QuantizeLinear`` → ``DequantizeLinear``
pairs around float operators, see the ONNX operator specs of QuantizeLinear, DequantizeLinear and Clip at
https://onnx.ai/onnx/operators/), so that a runtime with integer kernels (ONNX Runtime fuses
``DequantizeLinear`` → ``MatMul`` into ``MatMulIntegerToFloat``) computes with exactly the codes of
``docs/method.md#quantizers``:

* uniform activation quantizers (per tensor: the inputs of every ``QuantLinear`` and of the patch-embedding
  ``QuantConv2d``, both operands of q·kᵀ and V of A·V) become ``Clip → QuantizeLinear → DequantizeLinear``::

      q = clamp(round(x / s) + z, 0, 2^b − 1)          x̂ = s · (q − z)

  with a uint8 zero point z. ``QuantizeLinear`` rounds half to even and saturates to [0, 255]; for b < 8 the
  ``Clip`` of x to [−z·s, (2^b − 1 − z)·s] (float32 bounds, as ``quantizers.fake_quant_uniform`` clamps) keeps
  the codes in [0, 2^b − 1]. A zero point outside [0, 255] (a range that does not contain 0) is written with
  the codes shifted by c = −z, i.e. uint8 codes q + c and zero point z + c, which dequantise to the same x̂;
  that needs 2^b − 1 − z ≤ 255. Channel-wise activation quantizers (``post_ln="channelwise"``) are refused:
  a scale per input channel lies on the reduction axis of the matmul, where integer kernels take one scale
  (ONNX Runtime's ``MatMulIntegerToFloat`` rejects it); ``crl`` and ``repq`` reparameterise exactly these
  activations to one scale per tensor;
* quantized weights are stored as int8 or uint8 initializers holding the codes q of the packed weight (one
  code per byte: the TorchScript exporter writes opsets ≤ 20, before ONNX's 4-bit types; int8 codes centred
  as q − 2^(b−1), see ``export_onnx``'s ``weight_codes``), with float32 scales and zero points of the codes'
  type per output channel, feeding ``DequantizeLinear``: a Linear's codes are stored as ``(in, out)``
  (``axis=1``, the layout of the right operand of ``MatMul``, which integer MatMul kernels take per column),
  the convolution's as ``(out, in, kh, kw)`` (``axis=0``). No float copy of a quantized weight is written (except
  for the Linears that read AdaLog post-GELU activations, below);
* the log-quantized attention probabilities (log-√2, or AdaLog's base 2^(n/d)) are written as the float
  operations they are (docs/method.md#quantizers): the code from ``Log`` and ``Round``, the level from ``Exp``
  (see ``_LogQuant``; a value within float32 rounding of a code boundary may take the neighbouring code). So are
  AdaLog-quantized post-GELU activations (``gelu_quantizer="adalog"``): the Linear that reads them takes a float
  input, and its dequantized weight x̂ is written as a float32 initializer, a float ``MatMul`` (ONNX Runtime would
  otherwise run ``DequantizeLinear → MatMul`` as ``MatMulNBits``, which quantizes the float input its own way).

The export uses torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) with the QDQ
nodes emitted by the ``symbolic`` methods of private ``torch.autograd.Function`` classes: those are looked up
per call, so nothing is registered globally. It takes well under a second for a small model; the
``torch.export``-based exporter (torch's default) produces the same graph from ``quantized_decomposed``
ops but spends ~10 s in its decomposition pass even for a 2-block model. During the export every quantizer,
``QuantLinear`` and ``QuantConv2d`` of ``model`` gets an instance-level ``forward`` and temporary
buffers (the codes, named ``_onnx_export_*``); both are removed afterwards, so the model, its class and every other
instance are unchanged.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import Family, find_family
from ..nn import (
    AdaLogQuantizer,
    LogSqrt2Quantizer,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    UniformQuantizer,
    packed_weight_tensors,
)
from ..packing import unpack_codes
from ..quantize import applied_config
from ..quantizers import fake_quant_log

__all__ = ["DEFAULT_OPSET", "INSTALL_HINT", "MAX_OPSET", "MIN_OPSET", "WEIGHT_CODES", "compare_with_onnxruntime",
           "example_input_shape", "export_onnx"]

DEFAULT_OPSET = 17
"""Default ONNX opset: the first with ``LayerNormalization`` (per-axis QDQ needs 13)."""
MIN_OPSET = 13
MAX_OPSET = 20
"""The highest opset torch's TorchScript-based exporter writes."""
INSTALL_HINT = 'pip install "optimum-lrpqvit[onnx]"'

_CODE_MAX = 255  # uint8
WEIGHT_CODES = ("auto", "int8", "uint8")
_BUFFER_PREFIX = "_onnx_export_"


def _require(package: str, what: str) -> None:
    """ImportError naming the extra when ``package`` is missing."""
    try:
        __import__(package)
    except ImportError as error:
        raise ImportError(f"{what} needs the `{package}` package: {INSTALL_HINT}") from error


# ----------------------------------------------------------------------------------------------------------
# QDQ operators: eager forward = this library's fake quantization; symbolic = the ONNX nodes.


def _const(g: object, value: torch.Tensor) -> object:
    return g.op("Constant", value_t=value)


class _QDQPerTensor(torch.autograd.Function):
    """x ↦ s · (clamp(round(x/s) + z', c, c + 2^b − 1) − z'), z' = z + c; ONNX: [Clip] → QuantizeLinear →
    DequantizeLinear with a uint8 zero point z'."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, scale: float, zero_point: int, low: float, high: float,
                clip: bool) -> torch.Tensor:
        return torch.clamp(x, low, high).div(scale).round().mul(scale)

    @staticmethod
    def symbolic(g: object, x: object, scale: float, zero_point: int, low: float, high: float,
                 clip: bool) -> object:
        if clip:
            x = g.op("Clip", x, _const(g, torch.tensor(low, dtype=torch.float32)),
                     _const(g, torch.tensor(high, dtype=torch.float32)))
        s = _const(g, torch.tensor(scale, dtype=torch.float32))
        z = _const(g, torch.tensor(zero_point, dtype=torch.uint8))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


class _DequantizeWeight(torch.autograd.Function):
    """w = s · (q − z) from uint8 or int8 codes; ONNX: DequantizeLinear(codes, scale, zero_point, axis)."""

    @staticmethod
    def forward(ctx: object, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                axis: int) -> torch.Tensor:
        shape = [1] * codes.dim()
        shape[axis] = -1
        return (codes.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g: object, codes: object, scale: object, zero_point: object, axis: int) -> object:
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


class _LogQuant(torch.autograd.Function):
    """Log fake quantization of base 2^e, e = n/d (``quantizers.fake_quant_log``; log-√2 is e = ½) of x + σ, minus σ
    (σ = 0 but for AdaLog on post-GELU activations), as the float operations it is::

        q  = Clip(Round(Log(max(x + σ, 0)) · (−1 / (e · ln 2)) + log2 Δ / e), 0, 2^b)   (Log(0) = −inf → 2^b)
        x̂  = Exp(q · (−e · ln 2) + ln Δ) · Clip(2^b − q, 0, 1) − σ                (the zero code 2^b gives −σ)

    Eleven element-wise passes over the largest tensor of the network, none of them a Gather or a comparison
    (ONNX Runtime's per-element Gather and boolean kernels cost 3–4× a float pass at this size). ``Log`` and
    ``Exp`` round differently from the library's float64-derived boundaries and levels
    (``quantizers.log_thresholds``, ``log_levels``): a probability within float32 rounding of a boundary may take
    the neighbouring code (log-√2: 13 of 7.45 million softmax values at 8 bits, none at 4:
    ``benchmarks/log_sqrt2_onnx.py``), and the levels are within 1.5e-6 relative of the library's.
    """

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, delta: float, bits: int, numerator: int, denominator: int,
                shift: float) -> torch.Tensor:
        delta = torch.tensor(delta, dtype=x.dtype, device=x.device)
        if shift == 0:
            return fake_quant_log(x, delta, bits, numerator, denominator)
        shift = torch.tensor(shift, dtype=x.dtype, device=x.device)
        return fake_quant_log(x + shift, delta, bits, numerator, denominator) - shift

    @staticmethod
    def symbolic(g: object, x: object, delta: float, bits: int, numerator: int, denominator: int,
                 shift: float) -> object:
        def f32(value: float) -> object:
            return _const(g, torch.tensor(value, dtype=torch.float32))

        if shift != 0:  # x + σ may round below 0 where x is at GELU's minimum: Relu gives it the zero code
            x = g.op("Relu", g.op("Add", x, f32(shift)))
        e = numerator / denominator
        zero, top = f32(0.0), f32(float(2**bits))
        code = g.op("Add", g.op("Mul", g.op("Log", x), f32(-1.0 / (e * math.log(2.0)))), f32(math.log2(delta) / e))
        code = g.op("Clip", g.op("Round", code), zero, top)
        level = g.op("Exp", g.op("Add", g.op("Mul", code, f32(-e * math.log(2.0))), f32(math.log(delta))))
        out = g.op("Mul", level, g.op("Clip", g.op("Sub", top, code), zero, f32(1.0)))
        return out if shift == 0 else g.op("Sub", out, f32(shift))


# ----------------------------------------------------------------------------------------------------------
# Export plan: every point's integer parameters, checked before anything is touched.


@dataclass
class _TensorQDQ:
    scale: float
    zero_point: int  # uint8 zero point as written (library z + shift)
    low: float
    high: float
    clip: bool


def _uniform_params(name: str, quantizer: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) as float tensors; ValueError where they cannot be written as uint8 QDQ."""
    if not quantizer.enabled:
        raise ValueError(f"{name}: the quantizer is disabled (quantizers_disabled?); export_onnx exports enabled, "
                         "calibrated quantizers only.")
    if not quantizer.calibrated:
        raise ValueError(f"{name}: the quantizer is not calibrated; export_onnx exports models returned by "
                         "optimum_lrpqvit.quantize() or load_quantized().")
    scale = quantizer.scale.detach().float().cpu()
    zero_point = quantizer.zero_point.detach().float().cpu()
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError(f"{name}: non-positive or non-finite scale; only positive finite scales are supported.")
    if not torch.equal(zero_point, zero_point.round()):
        raise ValueError(f"{name}: non-integer zero point; ONNX QuantizeLinear supports integer zero points only.")
    return scale, zero_point


def _shift(name: str, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Per element, the code shift c ≥ 0 that puts z + c and the codes [c, c + 2^b − 1] into uint8."""
    shift = (-zero_point).clamp_min(0)
    top = 2**bits - 1
    if bool((zero_point > _CODE_MAX).any()) or bool((shift + top > _CODE_MAX).any()):
        bad = zero_point[(zero_point > _CODE_MAX) | (shift + top > _CODE_MAX)][0].item()
        raise ValueError(f"{name}: zero point {bad:g} at {bits} bits cannot be written as uint8 "
                         f"QuantizeLinear/DequantizeLinear; supported zero points are {top - _CODE_MAX} to "
                         f"{_CODE_MAX} (the range must be within 255 codes of 0).")
    return shift


def _tensor_plan(name: str, quantizer: UniformQuantizer) -> _TensorQDQ:
    scale, zero_point = _uniform_params(name, quantizer)
    shift = _shift(name, zero_point, quantizer.bits)
    s, z, c = float(scale), int(zero_point), int(shift)
    top = 2**quantizer.bits - 1
    # the bounds as fake_quant_uniform computes them (Python floats, rounded to float32 by the op)
    low, high = -z * s, (top - z) * s
    return _TensorQDQ(s, z + c, low, high, clip=top + c < _CODE_MAX or c > 0)


def _weight_codes(name: str, module: QuantLinear | QuantConv2d,
                  weight_codes: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (out, ...), float32 scale (out,), zero point (out,)) of a quantized weight; ValueError if the
    weight is not quantized or not on its grid.

    int8 codes are q − 2^(b−1) with zero point z − 2^(b−1) (same values, codes centred on 0), written where
    ``weight_codes`` asks for them ("int8"; "auto": at b ≤ 7 bits, where |codes| ≤ 64 keeps the pairwise int16
    sums of x86 u8·s8 kernels without VNNI from saturating); otherwise uint8 codes, shifted per channel where
    the zero point needs it."""
    bits, shape = module.weight_quantizer.bits, module.weight_shape
    if module.weight_is_packed:
        packed, scale, zero_point = module.weight_packed, module.weight_scale, module.weight_zero_point
    elif module.weight_folded and module.weight_quantizer.enabled:
        packed, scale, zero_point = packed_weight_tensors(module.weight, module.weight_quantizer, name)
    else:
        raise ValueError(f"{name}: the weight is not quantized; export_onnx exports models returned by "
                         "optimum_lrpqvit.quantize() or load_quantized().")
    scale, zero_point = scale.detach().float().cpu(), zero_point.detach().float().cpu()
    codes = unpack_codes(packed.detach().cpu(), bits, (shape[0], math.prod(shape[1:]))).float()
    centre = 2 ** (bits - 1)
    fits_int8 = bool(((zero_point - centre >= -128) & (zero_point - centre <= 127)).all())
    if weight_codes == "int8" or (weight_codes == "auto" and bits <= 7 and fits_int8):
        if not fits_int8:
            raise ValueError(f"{name}: a weight zero point ({zero_point.min().item():g} to "
                             f"{zero_point.max().item():g}) cannot be written as int8 at {bits} bits; export with "
                             "weight_codes='uint8' or 'auto'.")
        return ((codes - centre).to(torch.int8).reshape(shape), scale.clone(),
                (zero_point - centre).to(torch.int8))
    shift = _shift(f"{name} (weight)", zero_point, bits)
    codes = (codes + shift[:, None]).to(torch.uint8).reshape(shape)
    return codes, scale.clone(), (zero_point + shift).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# Instance forwards used during the export.


def _uniform_forward(self: UniformQuantizer, x: torch.Tensor) -> torch.Tensor:
    plan: _TensorQDQ = self.__dict__["_onnx_plan"]
    if self.shared_input is None:
        return _QDQPerTensor.apply(x, plan.scale, plan.zero_point, plan.low, plan.high, plan.clip)
    # identical per-tensor quantizers on the same tensor (q/k/v): one QDQ pair, as at inference
    cache = self.__dict__["_onnx_cache"]
    key = (id(self.shared_input), id(x), self.bits, plan.scale, plan.zero_point)
    if key not in cache:
        cache[key] = (x, _QDQPerTensor.apply(x, plan.scale, plan.zero_point, plan.low, plan.high, plan.clip))
    return cache[key][1]


def _log_forward(self: LogSqrt2Quantizer | AdaLogQuantizer, x: torch.Tensor) -> torch.Tensor:
    delta, numerator, denominator, shift = self.__dict__["_onnx_log"]
    return _LogQuant.apply(x, delta, self.bits, numerator, denominator, shift)


def _linear_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    p = _BUFFER_PREFIX
    weight_t = _DequantizeWeight.apply(getattr(self, p + "weight_codes"), getattr(self, p + "weight_scale"),
                                       getattr(self, p + "weight_zero_point"), 1)
    y = torch.matmul(self.input_quantizer(x), weight_t)
    return y if self.bias is None else y + self.bias


def _float_input_linear_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """A Linear whose input is log-quantized (AdaLog post-GELU): no integer kernel can take that input, and ONNX
    Runtime would turn ``DequantizeLinear → MatMul`` with a float input into its weight-only ``MatMulNBits``, which
    quantizes the input its own way; the dequantized weight x̂ is written as a float initializer instead."""
    y = torch.matmul(self.input_quantizer(x), getattr(self, _BUFFER_PREFIX + "weight_t"))
    return y if self.bias is None else y + self.bias


def _conv_forward(self: QuantConv2d, x: torch.Tensor) -> torch.Tensor:
    p = _BUFFER_PREFIX
    weight = _DequantizeWeight.apply(getattr(self, p + "weight_codes"), getattr(self, p + "weight_scale"),
                                     getattr(self, p + "weight_zero_point"), 0)
    if self.padding_mode != "zeros":
        raise ValueError(f"QuantConv2d with padding_mode={self.padding_mode!r} is not supported by export_onnx; "
                         "supported: 'zeros'.")
    return F.conv2d(self.input_quantizer(x), weight, self.bias, self.stride, self.padding, self.dilation,
                    self.groups)


class _Patched:
    """Instance forwards and temporary buffers on the modules of one model; ``restore`` undoes all of it."""

    def __init__(self) -> None:
        self._forwards: list[tuple[nn.Module, object]] = []
        self._buffers: list[tuple[nn.Module, str]] = []
        self._attrs: list[tuple[nn.Module, str]] = []

    def forward(self, module: nn.Module, forward: object) -> None:
        self._forwards.append((module, module.__dict__.get("forward", _Patched)))
        module.forward = types.MethodType(forward, module)

    def buffer(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        name = _BUFFER_PREFIX + name
        if name in module._buffers or hasattr(module, name):
            raise RuntimeError(f"{type(module).__name__} already has an attribute {name}")
        module.register_buffer(name, value, persistent=True)
        self._buffers.append((module, name))

    def attr(self, module: nn.Module, name: str, value: object) -> None:
        module.__dict__[name] = value
        self._attrs.append((module, name))

    def restore(self) -> None:
        for module, previous in reversed(self._forwards):
            if previous is _Patched:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
        for module, name in reversed(self._buffers):
            module._buffers.pop(name, None)
        for module, name in reversed(self._attrs):
            module.__dict__.pop(name, None)


_LOG_QUANTIZERS = (LogSqrt2Quantizer, AdaLogQuantizer)


def _plan_and_patch(model: nn.Module, patched: _Patched, weight_codes: str) -> None:
    """Check every point, then install the export forwards (ValueError before any module is changed)."""
    quantizers = [(n, m) for n, m in model.named_modules() if isinstance(m, (UniformQuantizer, *_LOG_QUANTIZERS))]
    weights = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    if not weights or not any(isinstance(m, QuantMatMul) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no quantized modules; quantize it with "
                         "optimum_lrpqvit.quantize() first.")
    for name, module in weights:
        if isinstance(module, QuantConv2d) and module.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode={module.padding_mode!r} is not supported; supported: 'zeros'.")
    plans: dict[int, object] = {}
    for name, q in quantizers:
        if q in (getattr(m, "weight_quantizer", None) for _, m in weights):
            continue
        if isinstance(q, _LOG_QUANTIZERS):
            if not q.enabled or not q.calibrated:
                raise ValueError(f"{name}: the log quantizer is disabled or not calibrated; export_onnx "
                                 "exports enabled, calibrated quantizers only.")
            delta = q.delta.detach().float().cpu()
            if not bool(torch.isfinite(delta)) or float(delta) <= 0:
                raise ValueError(f"{name}: non-positive or non-finite log Δ; a positive finite Δ is supported.")
            adalog = isinstance(q, AdaLogQuantizer)
            base = (int(q.numerator), q.denominator, float(q.shift)) if adalog else (1, 2, 0.0)
            plans[id(q)] = (float(delta), *base)
        elif q.channelwise:
            raise ValueError(f"{name}: channel-wise activation scales (post_ln='channelwise') lie on the reduction "
                             "axis of the matmul, which integer kernels cannot take; export_onnx supports per-tensor "
                             "activations: quantize with post_ln='crl' (default), 'repq' or 'layerwise'.")
        else:
            plans[id(q)] = _tensor_plan(name, q)
    codes = {id(m): _weight_codes(n, m, weight_codes) for n, m in weights}

    # nothing below raises on user input
    device = next(model.parameters()).device
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, q in quantizers:
        plan = plans.get(id(q))
        if plan is None:
            continue
        if isinstance(q, _LOG_QUANTIZERS):
            patched.attr(q, "_onnx_log", plan)
            patched.forward(q, _log_forward)
        else:
            patched.attr(q, "_onnx_plan", plan)
            patched.attr(q, "_onnx_cache", cache)
            patched.forward(q, _uniform_forward)
    for name, module in weights:
        if isinstance(module, QuantLinear) and isinstance(module.input_quantizer, _LOG_QUANTIZERS):
            patched.buffer(module, "weight_t", module.quantized_weight().detach().t().contiguous().to(device))
            patched.forward(module, _float_input_linear_forward)
            continue
        w_codes, w_scale, w_zero = codes[id(module)]
        if isinstance(module, QuantLinear):
            w_codes = w_codes.t().contiguous()  # (in, out): MatMul's right operand, per column
        patched.buffer(module, "weight_codes", w_codes.to(device))
        patched.buffer(module, "weight_scale", w_scale.to(device))
        patched.buffer(module, "weight_zero_point", w_zero.to(device))
        patched.forward(module, _linear_forward if isinstance(module, QuantLinear) else _conv_forward)


class _Logits(nn.Module):
    """``pixel_values`` → ``logits`` through the family's own call signature."""

    def __init__(self, model: nn.Module, family: Family) -> None:
        super().__init__()
        self.model = model
        self._family = family

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._family.logits(self.model, pixel_values)


def example_input_shape(model: nn.Module, batch_size: int = 1) -> tuple[int, int, int, int]:
    """``(batch_size, C, H, W)`` of the model's ``pixel_values`` (H, W from its config)."""
    family = find_family(model)
    channels, height, width = family.input_shape(model)
    if height is None or width is None:
        size = getattr(getattr(model, "config", None), "image_size", None)
        if size is None:
            size = getattr(getattr(model, "timm_model", model), "patch_embed", None)
            size = getattr(size, "img_size", None)
        if size is None:
            raise ValueError(f"Cannot tell the input size of {type(model).__name__}; it has no image_size.")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
    return batch_size, channels, height, width


def _check_destination(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}.")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the path of the .onnx file to write.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"The directory {parent} does not exist; create it before exporting to {path}.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"The directory {parent} is not writable; cannot export to {path}.")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{path} exists and is not writable.")
    return path


@contextlib.contextmanager
def _temporary_file(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path``, renamed to ``path`` on success and removed otherwise."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # as open() would create it, not mkstemp's 0600
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _finalize(file: Path, config: object) -> None:
    """Rename the export-time initializers (``model.<m>._onnx_export_weight_codes`` → ``<m>.weight_codes``) and
    record the bit plan in the model's metadata."""
    import json

    import onnx

    proto = onnx.load(str(file))
    graph = proto.graph
    renames: dict[str, str] = {}
    for init in graph.initializer:
        name = init.name.removeprefix("model.").replace(_BUFFER_PREFIX, "")
        if name != init.name:
            renames[init.name] = name
            init.name = name
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for value in graph.input:
        value.name = renames.get(value.name, value.name)
    proto.producer_name = "optimum-lrpqvit"
    entry = proto.metadata_props.add()
    entry.key, entry.value = "lrpqvit_bit_plan", json.dumps(getattr(config, "bit_plan", None), sort_keys=True)
    onnx.save(proto, str(file))


def export_onnx(model: nn.Module, path: str | os.PathLike, *, opset: int | None = None,
                batch_size: int = 1, weight_codes: str = "auto") -> Path:
    """Export a quantized model to ONNX as a QDQ graph with this library's integer codes; returns the path.

    Args:
        model: a model returned by :func:`optimum_lrpqvit.quantize` or :func:`optimum_lrpqvit.load_quantized`
            (transformers ViT/DeiT/Swin, ``TimmWrapperForImageClassification``, raw timm ViT/Swin), float32.
            It is not modified: the export-time forwards and buffers are removed afterwards.
        path: the ``.onnx`` file to write; its directory must exist. The file is written to a temporary file
            in that directory and renamed at the end, so a failed export leaves nothing behind.
        opset: the ONNX opset, ``MIN_OPSET`` (13) to ``MAX_OPSET`` (20); default ``DEFAULT_OPSET`` (17).
        batch_size: the batch size of the example input traced (the batch dimension of the graph is dynamic).
        weight_codes: the type of the weight codes: ``"auto"`` (default: int8 for weights of at most 7 bits,
            uint8 for 8-bit weights), ``"int8"`` or ``"uint8"``. The values are the same; the kernels differ.
            ONNX Runtime's u8·s8 integer GEMM is 2–4× faster than its u8·u8 one on x86, but on CPUs without
            VNNI it sums pairs of products in int16, which 8-bit weights can saturate (its documentation's
            "saturation issue"); "auto" keeps every graph exact on every CPU, ``"int8"`` is the fastest on CPUs
            with VNNI (AVX512-VNNI, AVX-VNNI) and on ARM.

    The graph has one input ``pixel_values`` ``(batch, C, H, W)`` float32 (H, W as the model's config) and one
    output ``logits`` ``(batch, num_labels)``. Quantized points become QDQ as described in the module docstring
    (math: docs/method.md#quantizers).

    Raises:
        ImportError: ``onnx`` is not installed (``pip install "optimum-lrpqvit[onnx]"``).
        TypeError: ``model`` is not an ``nn.Module`` of a supported family, or bad argument types.
        ValueError: the model is not quantized (use ``quantize()``), is not float32, or a point cannot be
            expressed (message names the point and what is supported); bad ``opset`` / ``batch_size``.
        FileNotFoundError / PermissionError / IsADirectoryError: the destination cannot be written (checked
            before exporting).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if opset is None:
        opset = DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if weight_codes not in WEIGHT_CODES:
        raise ValueError(f"weight_codes must be one of {WEIGHT_CODES}, got {weight_codes!r}.")
    path = _check_destination(path)
    family = find_family(model)
    config = applied_config(model)  # ValueError naming quantize() for an unquantized model
    problem = family.export_problem(model)
    if problem is not None:
        raise ValueError(f"export_onnx cannot export {type(model).__name__}: {problem}. The quantized model itself "
                         "works in PyTorch and saves with save_quantized.")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"export_onnx exports float32 models; this one has {sorted(map(str, dtypes))} parameters "
                         "(call model.float() first).")
    _require("onnx", "export_onnx")

    shape = example_input_shape(model, batch_size)
    param = next(model.parameters())
    example = torch.zeros(shape, dtype=torch.float32, device=param.device)
    patched = _Patched()
    was_training = model.training
    try:
        _plan_and_patch(model, patched, weight_codes)
        model.eval()
        with _temporary_file(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and TorchScript-exporter deprecation warnings
            with torch.no_grad():
                torch.onnx.export(_Logits(model, family), (example,), str(tmp), dynamo=False,
                                  input_names=["pixel_values"], output_names=["logits"],
                                  dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                                  opset_version=opset, do_constant_folding=True)
            _finalize(tmp, config)
    finally:
        patched.restore()
        model.train(was_training)
    return path


def compare_with_onnxruntime(model: nn.Module, path: str | os.PathLike, pixel_values: torch.Tensor,
                             batch_size: int = 32) -> dict[str, float]:
    """Run the exported graph at ``path`` with onnxruntime (CPU) and ``model`` on ``pixel_values``; returns the
    largest absolute logit difference and the top-1 agreement in percent."""
    _require("onnxruntime", "compare_with_onnxruntime")
    import onnxruntime

    family = find_family(model)
    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    largest, agree = 0.0, 0
    with torch.no_grad():
        for batch in pixel_values.split(batch_size):
            expected = family.logits(model, batch).float().cpu()
            got = torch.from_numpy(session.run(None, {"pixel_values": batch.float().cpu().numpy()})[0])
            largest = max(largest, float((got - expected).abs().max()))
            agree += int((got.argmax(1) == expected.argmax(1)).sum())
    return {"max_abs_logit_diff": largest, "top1_agreement": 100.0 * agree / len(pixel_values)}
