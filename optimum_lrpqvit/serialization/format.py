"""The packed checkpoint format, version 1 (``docs/method.md#checkpoint-format``), in ``model.safetensors``;
nothing is ever unpickled:

* every quantized weight (``QuantLinear`` / ``QuantConv2d``, named ``<m>``) is stored as
  ``<m>.weight_packed`` (uint8, 1-D: the codes q = round(w / s) + z of the row-major weight ``(out, ...)``, packed at
  the point's ``w_bits`` by ``packing.pack_codes``), ``<m>.weight_scale`` (float32, ``(out,)``) and
  ``<m>.weight_zero_point`` (int16, or float32 when not representable, ``(out,)``), so that w = s · (q − z) — and
  not as a float weight;
* everything else as in ``model.state_dict()``: biases, norms, embeddings, the activation quantizers' ``scale`` /
  ``zero_point`` (``()`` per tensor, ``(C,)`` channel-wise) and the log-√2 ``delta``;
* the safetensors metadata holds ``lrpqvit_format_version`` and ``lrpqvit_sha256``, a digest of the tensors'
  contents (independent of their names and order, so transformers' key renaming on save does not change it).

``config.json`` is the model's config with its ``quantization_config`` (an ``LRPQConfig`` with ``bit_plan``,
``post_ln`` and ``format_version``).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..config import FORMAT_VERSION
from ..nn import QuantConv2d, QuantLinear
from ..packing import pack_codes, unpack_codes
from ..quantizers import uniform_codes
from .digest import content_digest

__all__ = ["CONFIG_NAME", "DIGEST_KEY", "RESAVE", "VERSION_KEY", "WEIGHTS_NAME", "WeightModule", "checkpoint_sizes",
           "pack_weight", "packed_state_dict", "unpack_weight", "weight_modules"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
VERSION_KEY = "lrpqvit_format_version"
DIGEST_KEY = "lrpqvit_sha256"
RESAVE = "save the quantized model again with `optimum_lrpqvit.save_quantized` (or download it again)"
_INT16 = (-(2**15), 2**15 - 1)
WeightModule = QuantLinear | QuantConv2d


def weight_modules(model: nn.Module) -> dict[str, WeightModule]:
    """Name → module of every quantized layer with weights."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}


@torch.no_grad()
def pack_weight(module: WeightModule, name: str = "module") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes, scale, zero point) of a folded quantized weight; ValueError if it is not on its grid.

    The codes are recovered from the folded weight as q = round(w / s) + z per output channel and checked to
    reproduce the weight bit for bit.
    """
    if not getattr(module, "weight_folded", False):
        raise ValueError(f"{name}: the weight is not folded to its quantized values; only models returned by "
                         "optimum_lrpqvit.quantize() (or loaded from a packed checkpoint) can be saved packed.")
    quantizer = module.weight_quantizer
    weight = module.weight.detach()
    out = weight.shape[0]
    scale = quantizer.scale.detach().float().reshape(-1)
    zero_point = quantizer.zero_point.detach().float().reshape(-1)
    if scale.numel() != out or zero_point.numel() != out:
        raise ValueError(f"{name}: the weight quantizer has {scale.numel()} scales for {out} output channels.")
    rows = weight.reshape(out, -1).float()
    codes = uniform_codes(rows, scale[:, None], zero_point[:, None])
    high = 2**quantizer.bits - 1
    if not bool(((codes >= 0) & (codes <= high)).all()) or not torch.equal(
        ((codes - zero_point[:, None]) * scale[:, None]).to(weight.dtype), weight.reshape(out, -1)
    ):
        raise ValueError(f"{name}: the weight is not on its {quantizer.bits}-bit quantization grid (was it changed "
                         "after quantize()?); it cannot be stored packed without changing the model.")
    integral = torch.equal(zero_point, zero_point.round())
    in_range = bool(((zero_point >= _INT16[0]) & (zero_point <= _INT16[1])).all())
    zero_point = zero_point.to(torch.int16) if integral and in_range else zero_point
    return pack_codes(codes.to(torch.uint8), quantizer.bits), scale.clone(), zero_point.clone()


def unpack_weight(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                  shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight s · (q − z) of ``shape`` (output channels first) from its packed codes."""
    shape = tuple(shape)
    out = shape[0]
    codes = unpack_codes(packed.reshape(-1), bits, (out, math.prod(shape[1:])))
    scale = scale.reshape(-1).float()
    weight = (codes.float() - zero_point.reshape(-1).float()[:, None]) * scale[:, None]
    return weight.reshape(shape).to(dtype)


def packed_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict of the packed format (see the module docstring) and its safetensors metadata; each weight
    is packed at the bits its module holds."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, module in weight_modules(model).items():
        packed, scale, zero_point = pack_weight(module, name)
        for suffix in ("weight", "weight_quantizer.scale", "weight_quantizer.zero_point"):
            state.pop(f"{name}.{suffix}")
        state.update({f"{name}.weight_packed": packed, f"{name}.weight_scale": scale,
                      f"{name}.weight_zero_point": zero_point})
    state = {k: v.contiguous() for k, v in state.items()}
    metadata = {"format": "pt", VERSION_KEY: str(FORMAT_VERSION), DIGEST_KEY: content_digest(state.values())}
    return state, metadata


def checkpoint_sizes(model: nn.Module, directory: str | os.PathLike) -> dict[str, float]:
    """Bytes of the saved ``*.safetensors`` against full precision (every parameter in float32) and against the
    ideal Σ quantized params × bits / 8 + other params × 4; ``vs_ideal`` and ``vs_full_precision`` are ratios."""
    file_bytes = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
                     if f.endswith(".safetensors"))
    bits = {id(m.weight): m.weight_quantizer.bits for m in weight_modules(model).values()}
    params = list(model.parameters())
    ideal = sum(p.numel() * bits[id(p)] / 8 if id(p) in bits else p.numel() * 4 for p in params)
    full = sum(p.numel() * 4 for p in params)
    return {"file_bytes": file_bytes, "ideal_bytes": ideal, "full_precision_bytes": full,
            "vs_ideal": file_bytes / ideal, "vs_full_precision": file_bytes / full}
