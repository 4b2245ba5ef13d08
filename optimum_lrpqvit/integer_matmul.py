"""Integer GEMM for quantized Linear layers with ``torch._int_mm`` (int8 × int8 → int32), meant for CUDA.

A quantized Linear computes y = x̂ Ŵᵀ + b with x̂ = s_x (q_x − z_x) per tensor and Ŵ[j] = s_j (q_j − z_j) per
output channel (``docs/method.md#quantizers``). With the codes (b ≤ 8 bits, in [0, 255]) moved to int8 as
a = q_x − 128 and w = q_w − 128, and c_x = 128 − z_x, c_j = 128 − z_j:

    Σ_k (q_x,k − z_x)(q_jk − z_j) = Σ_k a_k w_jk + c_j Σ_k a_k + c_x Σ_k w_jk + K c_x c_j

so y_j = s_x s_j (A Wᵀ + c_j rowsum(A) + c_x colsum_j(W) + K c_x c_j) + b_j: one int8 GEMM with int32
accumulation (exact: |Σ a·w| ≤ 128² K < 2³¹ for K < 2¹⁷) and a correction of rank one, the zero points folded
in. It equals the fake-quant forward up to float32 rounding: the fake-quant path sums float products x̂ ŵ, this
one sums integers exactly and scales once.

``torch._int_mm`` on CUDA needs more than 16 rows and K and N multiples of 8; other shapes (and channel-wise
activations) keep the fake-quant path. On the CPU ``torch._int_mm`` is a slow reference kernel: use it there only
to test.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .nn import QuantLinear, UniformQuantizer, weight_modules
from .packing import unpack_codes

__all__ = ["int_mm_linear", "int_mm_supported", "use_integer_matmul"]


def int_mm_supported(rows: int, in_features: int, out_features: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` takes an ``(rows, in) × (in, out)`` product on ``device``."""
    if device.type != "cuda":
        return in_features > 1  # torch 2.14's CPU kernel returns wrong sums for K = 1 (measured)
    return rows > 16 and in_features % 8 == 0 and out_features % 8 == 0


def int_mm_linear(x: torch.Tensor, x_scale: float, x_zero_point: int, x_bits: int, weight_codes: torch.Tensor,
                  weight_scale: torch.Tensor, weight_zero_point: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x̂ Ŵᵀ + b by an int8 GEMM (module docstring).

    Args:
        x: float input ``(..., in)``, quantized here per tensor: q_x = clamp(round(x / s_x) + z_x, 0, 2^b − 1).
        x_scale, x_zero_point, x_bits: the input quantizer's s_x, z_x and b.
        weight_codes: uint8 codes ``(out, in)`` in [0, 255].
        weight_scale, weight_zero_point: s_j and z_j, ``(out,)``.
        bias: ``(out,)`` or None.
    """
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    top = 2**x_bits - 1
    q_x = torch.clamp(torch.round(rows / x_scale) + x_zero_point, 0, top)
    a = (q_x - 128).to(torch.int8)
    w = (weight_codes.to(torch.int16) - 128).to(torch.int8)
    k = rows.shape[1]
    c_x = 128 - int(x_zero_point)
    c_w = (128 - weight_zero_point.to(torch.int32)).reshape(1, -1)
    acc = torch._int_mm(a, w.t())  # (in, out), column-major: the layout cuBLASLt takes for B
    acc = acc + c_w * a.to(torch.int32).sum(1, keepdim=True) + c_x * w.to(torch.int32).sum(1).reshape(1, -1)
    acc = acc + k * c_x * c_w
    y = acc.to(torch.float32) * (x_scale * weight_scale.float().reshape(1, -1))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def _codes(module: QuantLinear) -> torch.Tensor:
    out, fan_in = module.weight_shape
    return unpack_codes(module.weight_packed.reshape(-1), module.weight_quantizer.bits, (out, fan_in))


def _integer_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    quantizer = self.input_quantizer
    out, fan_in = self.weight_shape
    rows = math.prod(x.shape[:-1])
    zero_point = self.weight_zero_point
    if (not isinstance(quantizer, UniformQuantizer) or quantizer.channelwise or not quantizer.enabled
            or not quantizer.calibrated or quantizer.calibrating
            or not int_mm_supported(rows, fan_in, out, x.device) or not torch.equal(zero_point, zero_point.round())):
        return F.linear(quantizer(x), self.quantized_weight(), self.bias)
    return int_mm_linear(x, float(quantizer.scale), int(quantizer.zero_point), quantizer.bits, _codes(self),
                         self.weight_scale, zero_point, self.bias)


def use_integer_matmul(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make the packed quantized Linear layers of ``model`` run ``int_mm_linear`` (``enabled=False`` undoes it).

    Per instance: each layer gets an instance ``forward``; the class and other models are untouched. Layers whose
    shape or input quantizer ``torch._int_mm`` cannot take fall back to the fake-quant forward per call.
    """
    layers = [m for m in weight_modules(model).values() if isinstance(m, QuantLinear)]
    if enabled and not all(m.weight_is_packed for m in layers):
        raise ValueError("use_integer_matmul needs packed weights: call optimum_lrpqvit.pack_weights(model) first.")
    for module in layers:
        if enabled:
            module.forward = _integer_forward.__get__(module)
        else:
            module.__dict__.pop("forward", None)
    return model
