"""The packed checkpoint format, version 1 (``docs/method.md#checkpoint-format``), in ``model.safetensors``;
nothing is ever unpickled:

* every quantized weight (``QuantLinear`` / ``QuantConv2d``, named ``<m>``) is stored as
  ``<m>.weight_packed`` (uint8, 1-D: the codes q = round(w / s) + z of the row-major weight ``(out, ...)``, packed at
  the point's ``w_bits`` by ``packing.pack_codes``), ``<m>.weight_scale`` (float32, ``(out,)``) and
  ``<m>.weight_zero_point`` (int16, or float32 when not representable, ``(out,)``), so that w = s · (q − z) — and
  not as a float weight;
* everything else as in ``model.state_dict()``: biases, norms, embeddings, the activation quantizers' ``scale`` /
  ``zero_point`` (``()`` per tensor, ``(C,)`` channel-wise) and the log-√2 ``delta``;
* the safetensors metadata holds ``lrpqvit_format_version``, ``lrpqvit_sha256``, a digest of the tensors'
  contents (independent of their names and order, so transformers' key renaming on save does not change it),
  and ``lrpqvit_bit_plan``, the bit plan of the tensors as JSON (absent in files saved before it was recorded),
  which loading compares with the plan in ``config.json``.

``config.json`` is the model's config with its ``quantization_config`` (an ``LRPQConfig`` with ``bit_plan``,
``post_ln`` and ``format_version``).
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from ..architectures import find_family
from ..bit_plan import read_bit_plan
from ..config import FORMAT_VERSION
from ..digest import content_digest
from ..nn import QuantConv2d, QuantLinear, packed_weight_tensors, weight_modules

__all__ = ["BIT_PLAN_KEY", "CONFIG_NAME", "DIGEST_KEY", "RESAVE", "VERSION_KEY", "WEIGHTS_NAME", "WeightModule",
           "checkpoint_sizes", "packed_state_dict", "weight_modules"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
VERSION_KEY = "lrpqvit_format_version"
DIGEST_KEY = "lrpqvit_sha256"
BIT_PLAN_KEY = "lrpqvit_bit_plan"
RESAVE = "save the quantized model again with `optimum_lrpqvit.save_quantized` (or download it again)"
WeightModule = QuantLinear | QuantConv2d


def packed_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict of the packed format (see the module docstring) and its safetensors metadata: the model's own
    state dict where its weights are packed (``nn.pack_weights``), and the packed tensors of folded weights (the
    model is not changed)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, module in weight_modules(model).items():
        if module.weight_is_packed:
            continue
        if not module.weight_folded:
            raise ValueError(f"{name}: the weight is not quantized yet; only models returned by "
                             "optimum_lrpqvit.quantize() (or loaded from a packed checkpoint) can be saved packed.")
        packed, scale, zero_point = packed_weight_tensors(module.weight, module.weight_quantizer, name)
        for suffix in ("weight", "weight_quantizer.scale", "weight_quantizer.zero_point"):
            state.pop(f"{name}.{suffix}")
        state.update({f"{name}.weight_packed": packed, f"{name}.weight_scale": scale,
                      f"{name}.weight_zero_point": zero_point})
    state = {k: v.contiguous() for k, v in state.items()}
    plan = read_bit_plan(model, find_family(model).layout(model)).to_dict()
    metadata = {"format": "pt", VERSION_KEY: str(FORMAT_VERSION), DIGEST_KEY: content_digest(state.values()),
                BIT_PLAN_KEY: json.dumps(plan, sort_keys=True)}
    return state, metadata


def checkpoint_sizes(model: nn.Module, directory: str | os.PathLike) -> dict[str, float]:
    """Bytes of the saved ``*.safetensors`` against full precision (every parameter in float32) and against the
    ideal Σ quantized params × bits / 8 + other params × 4; ``vs_ideal`` and ``vs_full_precision`` are ratios."""
    file_bytes = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
                     if f.endswith(".safetensors"))
    modules = weight_modules(model).values()
    folded = {id(m.weight) for m in modules if not m.weight_is_packed}
    other = sum(p.numel() for p in model.parameters() if id(p) not in folded)
    quantized = [(math.prod(m.weight_shape), m.weight_quantizer.bits) for m in modules]
    ideal = sum(n * bits / 8 for n, bits in quantized) + other * 4
    full = sum(n for n, _ in quantized) * 4 + other * 4
    return {"file_bytes": file_bytes, "ideal_bytes": ideal, "full_precision_bytes": full,
            "vs_ideal": file_bytes / ideal, "vs_full_precision": file_bytes / full}
