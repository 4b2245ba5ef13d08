"""Fake-quantized modules: activation quantizers, Linear, Conv2d and the attention matmuls
(``docs/method.md#quantizers``).

Each quantizer holds its calibrated parameters as buffers. While ``calibrating`` is set it re-fits them on
the tensor it sees and then applies them, so one forward pass calibrates every point in execution order
with all upstream points already quantized (as RepQ-ViT does).
"""

from __future__ import annotations

import abc
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .packing import pack_codes, unpack_codes
from .quantizers import (
    ADALOG_DENOMINATOR,
    DEFAULT_PERCENTILES,
    centered_codes,
    fake_quant_log,
    fake_quant_log_sqrt2,
    fake_quant_uniform,
    search_adalog_params,
    search_log_sqrt2_delta,
    search_uniform_params,
    uniform_codes,
    uniform_params,
    weight_columns,
)
from .registry import GELU_QUANTIZERS, SOFTMAX_QUANTIZERS

__all__ = [
    "SharedInput",
    "UniformQuantizer",
    "LogSqrt2Quantizer",
    "AdaLogQuantizer",
    "QuantLinear",
    "QuantConv2d",
    "QuantMatMul",
    "dequantize_packed_weight",
    "packed_weight_codes",
    "is_quantized",
    "pack_weights",
    "packed_weight_tensors",
    "quantizers",
    "calibration",
    "realign",
    "quantizers_disabled",
    "unpack_weights",
    "weight_modules",
]


class _Quantizer(nn.Module, abc.ABC):
    def __init__(self, bits: int, percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> None:
        super().__init__()
        self.bits = bits
        self.percentiles = tuple(percentiles)
        self.calibrating = False
        self.enabled = True
        self.learning = False  # set by reconstruction: differentiable (straight-through) quantization
        self.drop_prob = 0.0  # with ``learning``: QDrop's chance that an element is left unquantized
        self.drop_generator: torch.Generator | None = None  # of those draws (reproducible reconstruction)

    @property
    @abc.abstractmethod
    def calibrated(self) -> bool:
        """Whether the parameters have been fitted."""

    @abc.abstractmethod
    def fit(self, x: torch.Tensor) -> None:
        """Fit the parameters to ``x``."""

    @abc.abstractmethod
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the fitted parameters."""

    def quantize_differentiable(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ with the straight-through gradient ∂x̂/∂x = 1 (the parameters get none)."""
        return x + (self.quantize(x) - x).detach()

    def integer(self, x: torch.Tensor) -> bool:
        """Whether the forward of ``x`` is x̂ = s · (q − z) with one scale and exactly representable codes, so that
        a consumer may multiply the codes (``UniformQuantizer.codes``) and scale the product. Log quantizers:
        never."""
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.fit(x)
        if not self.enabled or not self.calibrated:
            return x
        if not self.learning:
            return self.quantize(x)
        xq = self.quantize_differentiable(x)
        if self.drop_prob:
            draw = torch.rand(x.shape, generator=self.drop_generator, device=x.device, dtype=x.dtype)
            xq = torch.where(draw < self.drop_prob, x, xq)
        return xq


# Dtypes in which a product of integer codes is computed exactly (while its sums stay below 2^24 in float32):
# there, quantized layers multiply the codes and scale the result, as integer kernels do.
_EXACT_DTYPES = (torch.float32, torch.float64)


class SharedInput:
    """Lets quantizers that read the same tensor (transformers' separate q/k/v projections) quantize it once:
    the last input and its codes less the zero point, reused for an identical per-tensor quantizer."""

    __slots__ = ("input", "key", "codes")

    def __init__(self) -> None:
        self.input = self.key = self.codes = None


class UniformQuantizer(_Quantizer):
    """Uniform asymmetric fake quantizer, per tensor or per last-dim channel."""

    def __init__(self, bits: int, channelwise: bool = False, percentiles: tuple[float, ...] = DEFAULT_PERCENTILES):
        super().__init__(bits, percentiles)
        self.channelwise = channelwise
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))
        self.shared_input: SharedInput | None = None

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    def fit(self, x: torch.Tensor) -> None:
        scale, zero_point = search_uniform_params(x, self.bits, self.channelwise, self.percentiles)
        self.set_params(scale, zero_point)

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.channelwise = scale.dim() > 0
        self.scale = scale.detach().clone()
        self.zero_point = zero_point.detach().clone()

    def set_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Set the parameters that map [low, high] onto the 2^b codes."""
        self.set_params(*uniform_params(low, high, self.bits))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_input is None or self.channelwise or self.calibrating:
            return fake_quant_uniform(x, self.scale, self.zero_point, self.bits)
        return self.codes(x) * float(self.scale)

    def integer(self, x: torch.Tensor) -> bool:
        """Enabled, calibrated, per tensor, neither calibrating nor learning, and ``x`` float32 or float64."""
        return (self.enabled and not self.calibrating and not self.learning and not self.channelwise
                and self.calibrated and x.dtype in _EXACT_DTYPES)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """q − z of ``x`` (``quantizers.centered_codes``, per tensor), computed once for identical quantizers that
        share the input."""
        shared = self.shared_input
        if shared is None:
            return centered_codes(x, self.scale, self.zero_point, self.bits)
        key = (self.bits, float(self.scale), float(self.zero_point))
        if shared.input is not x or shared.key != key:
            shared.input, shared.key = x, key
            shared.codes = centered_codes(x, self.scale, self.zero_point, self.bits)
        return shared.codes

    def quantize_differentiable(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ = s · (clamp(⌊x/s⌉ + z, 0, 2^b − 1) − z) with the rounding straight-through, so that x and s get
        LSQ's gradients (Esser et al., ICLR 2020)."""
        t = x / self.scale
        q = torch.clamp(t + (torch.round(t) - t).detach() + self.zero_point, 0, 2**self.bits - 1)
        return (q - self.zero_point) * self.scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channelwise={self.channelwise}"


@SOFTMAX_QUANTIZERS.register("log_sqrt2")
class LogSqrt2Quantizer(_Quantizer):
    """Log-√2 fake quantizer for post-softmax probabilities (RepQ-ViT): x̂ = Δ · 2^(−q/2), Δ searched."""

    def __init__(self, bits: int, percentiles: tuple[float, ...] = DEFAULT_PERCENTILES):
        super().__init__(bits, percentiles)
        self.register_buffer("delta", torch.empty(0))

    @property
    def calibrated(self) -> bool:
        return self.delta.numel() > 0

    def fit(self, x: torch.Tensor) -> None:
        self.delta = search_log_sqrt2_delta(x, self.bits, self.percentiles)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_log_sqrt2(x, self.delta, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, log_sqrt2=True"


@SOFTMAX_QUANTIZERS.register("adalog")
class AdaLogQuantizer(_Quantizer):
    """AdaLog fake quantizer (Wu et al., ECCV 2024): x̂ = Δ · 2^(−q·n/d) − σ of x + σ, with d = ``ADALOG_DENOMINATOR``
    and the base exponent n/d and Δ searched per layer (``quantizers.search_adalog_params``).

    For post-softmax probabilities σ = 0 (log-√2 is the fixed base n/d = ½; at 6–8 bits a finer base spends the
    extra codes on resolution, where log-√2 only extends the range). ``shifted`` (post-GELU activations): σ is the
    negated minimum of the calibration data (GELU's is −0.17), which puts the activations' mode, just above their
    minimum, at the fine end of the log grid; at inference −σ folds into the next Linear's bias. x̂ is a shift and
    a lookup in a table of d constants (``quantizers.dequantize_log_shift``). Buffers: ``delta``, ``numerator``
    (n, float) and ``shift`` (σ)."""

    denominator = ADALOG_DENOMINATOR

    def __init__(self, bits: int, percentiles: tuple[float, ...] = DEFAULT_PERCENTILES, shifted: bool = False):
        super().__init__(bits, percentiles)
        self.shifted = shifted
        self.register_buffer("delta", torch.empty(0))
        self.register_buffer("numerator", torch.empty(0))
        self.register_buffer("shift", torch.empty(0))

    @property
    def calibrated(self) -> bool:
        return self.delta.numel() > 0

    def fit(self, x: torch.Tensor) -> None:
        shift = (-x.detach().min()).clamp_min(0).float() if self.shifted else x.new_zeros((), dtype=torch.float32)
        delta, numerator = search_adalog_params(x + shift if self.shifted else x, self.bits, self.percentiles,
                                                self.denominator)
        self.delta, self.shift = delta, shift.reshape(())
        self.numerator = torch.tensor(float(numerator), device=delta.device)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.shifted:
            return fake_quant_log(x, self.delta, self.bits, int(self.numerator), self.denominator)
        shift = self.shift.to(x.dtype)
        return fake_quant_log(x + shift, self.delta, self.bits, int(self.numerator), self.denominator) - shift

    def extra_repr(self) -> str:
        return f"bits={self.bits}, adalog=True, shifted={self.shifted}"


GELU_QUANTIZERS.register("uniform")(UniformQuantizer)
GELU_QUANTIZERS.register("adalog")(functools.partial(AdaLogQuantizer, shifted=True))


class _WeightQuantMixin:
    """Per-output-channel weight quantization, with the weight in one of three forms:

    * float: the ``weight`` Parameter, fake-quantized on every call (while calibrating);
    * folded (``fold_weight``): ``weight`` holds x̂ = s · (q − z) for good, as float (research code that needs
      weights as Parameters, e.g. for gradients);
    * packed (``pack_weight``, what ``quantize`` and the loaders leave): no float weight. Buffers ``weight_packed``
      (the codes q = round(w/s) + z of the row-major ``(out, ...)`` weight, bit-packed at b bits by
      ``packing.pack_codes``), ``weight_scale`` (float32, ``(out,)``) and ``weight_zero_point`` (int16, or float32
      when not integral, ``(out,)``). Where the input quantizer is per tensor (``UniformQuantizer.integer``) a
      call multiplies codes as an integer kernel does, y = s_x · s_w · ((q_x − z_x) · (q_w − z_w)) + bias,
      exact in float32 while the sums stay below 2^24 (8-bit codes and up to 258 input features, 4-bit codes
      and up to 74,000); otherwise it dequantizes x̂ = s · (q − z), bit-identical to the folded weight, whose
      forward rounds every product (``docs/method.md#integer-arithmetic-in-the-pytorch-forward``).
      These are also the tensors of the packed checkpoint (``docs/method.md#checkpoint-format``). ``weight`` is
      then an empty tensor that only carries the weight's dtype and device (model code reads
      ``projection.weight.dtype``, and ``model.to(...)`` moves and casts it); the shape is ``weight_shape``.
    """

    weight: nn.Parameter
    weight_quantizer: UniformQuantizer
    input_quantizer: UniformQuantizer
    weight_folded: bool

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the float weight, also when it is packed."""
        raise NotImplementedError

    @property
    def weight_is_packed(self) -> bool:
        return "weight_packed" in self._buffers

    def calibrate_weight(self) -> None:
        self.weight_quantizer.fit(weight_columns(self.weight))
        self.weight_folded = False

    def quantized_weight(self) -> torch.Tensor:
        if self.weight_is_packed:
            return dequantize_packed_weight(self.weight_packed, self.weight_scale, self.weight_zero_point,
                                            self.weight_quantizer.bits, self.weight_shape).to(self.weight.dtype)
        if self.weight_folded or not self.weight_quantizer.enabled:
            return self.weight
        if self.weight_quantizer.calibrating or not self.weight_quantizer.calibrated:
            self.calibrate_weight()
        wq = self.weight_quantizer.quantize(weight_columns(self.weight))
        return wq.t().reshape(self.weight.shape)

    def integer_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """q − z of the weight (``weight_shape``, in x's dtype) where this call of ``x`` multiplies codes: a packed
        weight and an input quantizer for which ``integer(x)`` holds; None otherwise."""
        if not (self.weight_is_packed and self.input_quantizer.integer(x)):
            return None
        return packed_weight_codes(self.weight_packed, self.weight_zero_point, self.weight_quantizer.bits,
                                   self.weight_shape).to(x.dtype)

    @torch.no_grad()
    def fold_weight(self) -> None:
        """Float weight ← x̂ (from the packed codes, or fake-quantized from the float weight)."""
        weight = self.quantized_weight().detach().clone()
        if self.weight_is_packed:
            for name in ("weight", "weight_packed", "weight_scale", "weight_zero_point"):
                del self._buffers[name]
            self.weight_quantizer._non_persistent_buffers_set.difference_update(("scale", "zero_point"))
            self.weight = nn.Parameter(weight)
        else:
            self.weight.copy_(weight)
        self.weight_folded = True

    @torch.no_grad()
    def pack_weight(self, name: str = "module") -> None:
        """Replace the float weight by its packed codes; ValueError (naming ``name``) if a folded weight is no longer
        on its grid. The weight quantizer's scale and zero point stay set but leave the state dict, where
        ``weight_scale`` / ``weight_zero_point`` hold them."""
        if self.weight_is_packed:
            return
        if not self.weight_folded:
            self.fold_weight()
        packed, scale, zero_point = packed_weight_tensors(self.weight, self.weight_quantizer, name)
        placeholder = weight_placeholder(self.weight)
        del self.weight
        self.register_buffer("weight", placeholder, persistent=False)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        self.weight_quantizer._non_persistent_buffers_set.update(("scale", "zero_point"))


def weight_placeholder(weight: torch.Tensor) -> torch.Tensor:
    """What a packed module keeps as ``weight``: no elements, but the float weight's dtype, device, rank and input
    dimensions (shape (0, in, ...)), so that code reading ``.weight`` works, transformers' weight init (which
    computes a fan-in) included."""
    return torch.empty((0, *weight.shape[1:]), dtype=weight.dtype, device=weight.device)


def packed_weight_codes(packed: torch.Tensor, zero_point: torch.Tensor, bits: int,
                        shape: tuple[int, ...]) -> torch.Tensor:
    """q − z of ``shape`` (output channels first, float32) from codes packed by ``packing.pack_codes``."""
    out = shape[0]
    codes = unpack_codes(packed.reshape(-1), bits, (out, math.prod(shape[1:])))
    return (codes.float() - zero_point.reshape(-1, 1).float()).reshape(shape)


def dequantize_packed_weight(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                             shape: tuple[int, ...]) -> torch.Tensor:
    """x̂ = s · (q − z) of ``shape`` (output channels first, float32) from codes packed by ``packing.pack_codes``."""
    codes = packed_weight_codes(packed, zero_point, bits, shape)
    return (codes.reshape(shape[0], -1) * scale.reshape(-1, 1).float()).reshape(shape)


def packed_weight_tensors(weight: torch.Tensor, quantizer: UniformQuantizer,
                          name: str = "module") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes, float32 scale, int16 — or float32 if not integral — zero point) of a weight on its grid.

    The codes q = round(w / s) + z per output channel must reproduce ``weight`` bit for bit: ValueError naming
    ``name`` otherwise (e.g. a folded weight changed after quantization)."""
    weight = weight.detach()
    out = weight.shape[0]
    scale = quantizer.scale.detach().float().reshape(-1)
    zero_point = quantizer.zero_point.detach().float().reshape(-1)
    if scale.numel() != out or zero_point.numel() != out:
        raise ValueError(f"{name}: the weight quantizer has {scale.numel()} scales for {out} output channels.")
    rows = weight.reshape(out, -1)
    codes = uniform_codes(rows.float(), scale[:, None], zero_point[:, None])
    high = 2**quantizer.bits - 1
    if not bool(((codes >= 0) & (codes <= high)).all()) or not torch.equal(
        ((codes - zero_point[:, None]) * scale[:, None]).to(weight.dtype), rows
    ):
        raise ValueError(f"{name}: the weight is not on its {quantizer.bits}-bit quantization grid (was it changed "
                         "after quantize()?); it cannot be stored packed without changing the model.")
    integral = torch.equal(zero_point, zero_point.round())
    in_range = bool(((zero_point >= -(2**15)) & (zero_point < 2**15)).all())
    zero_point = zero_point.to(torch.int16) if integral and in_range else zero_point
    return pack_codes(codes.to(torch.uint8), quantizer.bits), scale.clone(), zero_point.clone()


class QuantLinear(_WeightQuantMixin, nn.Linear):
    """``nn.Linear`` with a per-output-channel weight quantizer and an input quantizer."""

    def __init__(self, in_features: int, out_features: int, bias: bool, w_bits: int, a_bits: int,
                 act_channelwise: bool = False, percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_quantizer = UniformQuantizer(w_bits, channelwise=True, percentiles=percentiles)
        self.input_quantizer = UniformQuantizer(a_bits, channelwise=act_channelwise, percentiles=percentiles)
        self.weight_folded = False

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.out_features, self.in_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, w_bits: int, a_bits: int, act_channelwise: bool = False,
                    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES, add_bias: bool = False) -> "QuantLinear":
        """Wrap ``linear``'s parameters (shared, not copied). ``add_bias`` gives a bias-free layer a zero bias."""
        has_bias = linear.bias is not None or add_bias
        q = cls(linear.in_features, linear.out_features, has_bias, w_bits, a_bits, act_channelwise, percentiles,
                device="meta")
        q.weight = linear.weight
        if linear.bias is not None:
            q.bias = linear.bias
        elif add_bias:
            q.bias = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device,
                                              dtype=linear.weight.dtype))
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.integer_weight(x)
        if weight is None:
            return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)
        y = F.linear(self.input_quantizer.codes(x), weight).mul_(self.input_quantizer.scale * self.weight_scale)
        return y if self.bias is None else y.add_(self.bias)


class QuantConv2d(_WeightQuantMixin, nn.Conv2d):
    """``nn.Conv2d`` (the patch embedding) with per-output-channel weights and a per-tensor input quantizer."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, w_bits: int, a_bits: int,
                  percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        q.weight = conv.weight
        q.bias = conv.bias
        q.weight_quantizer = UniformQuantizer(w_bits, channelwise=True, percentiles=percentiles)
        q.input_quantizer = UniformQuantizer(a_bits, percentiles=percentiles)
        q.weight_folded = False
        return q.to(conv.weight.device)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.out_channels, self.in_channels // self.groups, *self.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.integer_weight(x)
        if weight is None:
            return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)
        y = self._conv_forward(self.input_quantizer.codes(x), weight, None)
        y = y.mul_((self.input_quantizer.scale * self.weight_scale).reshape(-1, 1, 1))
        return y if self.bias is None else y.add_(self.bias.reshape(-1, 1, 1))


class QuantMatMul(nn.Module):
    """a @ b with each operand fake-quantized: ``quantizer_a`` (uniform, or log-√2 for probabilities) and
    ``quantizer_b`` (uniform). Two per-tensor uniform operands multiply their codes, s_a · s_b · ((q_a − z_a) ·
    (q_b − z_b)), as ``QuantLinear`` does."""

    def __init__(self, quantizer_a: _Quantizer, quantizer_b: _Quantizer) -> None:
        super().__init__()
        self.quantizer_a = quantizer_a
        self.quantizer_b = quantizer_b

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        qa, qb = self.quantizer_a, self.quantizer_b
        if qa.integer(a) and qb.integer(b):
            return torch.matmul(qa.codes(a), qb.codes(b)).mul_(qa.scale * qb.scale)
        return torch.matmul(qa(a), qb(b))


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds any quantized module."""
    return any(isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul)) for m in model.modules())


def weight_modules(model: nn.Module) -> dict[str, QuantLinear | QuantConv2d]:
    """Name → module of every quantized layer with weights."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}


def pack_weights(model: nn.Module) -> nn.Module:
    """Give every quantized weight of ``model`` the packed form (integer codes in memory, no float copy)."""
    for name, module in weight_modules(model).items():
        module.pack_weight(name)
    return model


def unpack_weights(model: nn.Module) -> nn.Module:
    """Give every quantized weight of ``model`` the folded form: a float Parameter holding x̂ (same outputs)."""
    for module in weight_modules(model).values():
        module.fold_weight()
    return model


def quantizers(model: nn.Module) -> list[_Quantizer]:
    """Every quantizer module in ``model``."""
    return [m for m in model.modules() if isinstance(m, _Quantizer)]


@torch.no_grad()
def realign(model: nn.Module) -> None:
    """Give the parameters and buffers of ``model`` that sit on unaligned memory (slices of a memory-mapped
    safetensors file) fresh, aligned copies of themselves. CPU convolution kernels round differently on
    unaligned weights (~1e-6 on a float UperNet head), which would make a model reloaded from its checkpoint
    differ from the one that was saved."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is not None and tensor.numel() and tensor.data_ptr() % 64:
                    tensor.data = tensor.data.clone()


class calibration:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within the context every quantizer of ``model`` re-fits its parameters on the data it sees."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        for q in quantizers(self.model):
            q.calibrating = True
        return self.model

    def __exit__(self, *exc) -> None:
        for q in quantizers(self.model):
            q.calibrating = False


class quantizers_disabled:  # noqa: N801
    """Within the context every quantizer of ``model`` is the identity (weights not yet folded stay float)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self._saved = [(q, q.enabled) for q in quantizers(self.model)]
        for q, _ in self._saved:
            q.enabled = False
        return self.model

    def __exit__(self, *exc) -> None:
        for q, enabled in self._saved:
            q.enabled = enabled
