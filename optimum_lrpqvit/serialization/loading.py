"""Loading packed checkpoints: the module surgery that turns a float model into the exact tensor layout of the
checkpoint (``prepare_packed_loading``), unpacking after the tensors are loaded (``finish_packed_loading``), and
``load_quantized``, which does both for a model instance or leaves it to transformers' ``from_pretrained``."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..architectures import Layout, find_family, transformers_class
from ..bit_plan import BitPlan
from ..config import LRPQConfig
from ..nn import (
    AdaLogQuantizer,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    UniformQuantizer,
    is_quantized,
    realign,
    weight_placeholder,
)
from ..packing import packed_nbytes
from ..quantize import attach_applied_config, prepare_model
from ..quantizers import MAX_BITS, MIN_BITS
from .format import CONFIG_NAME, RESAVE, WeightModule, weight_modules
from .reading import (
    canonical_tensors,
    config_from_document,
    read_checkpoint,
    read_config,
    stored_bit_plan,
    weight_files,
)

__all__ = ["finish_packed_loading", "load_quantized", "prepare_packed_loading"]


@dataclass(frozen=True)
class _Spec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _bit_plan(config: LRPQConfig, layout: Layout, source: str) -> BitPlan:
    if not isinstance(config.bit_plan, dict) or not config.bit_plan:
        raise ValueError(f"config.json of {source}: quantization_config has no bit_plan, so this is not a packed "
                         f"checkpoint saved by optimum-lrpqvit; {RESAVE}.")
    return BitPlan.from_dict(config.bit_plan, layout, f"config.json of {source}: bit plan")


def _activation_quantizers(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Name → (quantizer, owner) for every quantizer except the weight quantizers."""
    owners = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            owners[f"{name}.input_quantizer"] = (module.input_quantizer, module)
        elif isinstance(module, QuantMatMul):
            owners[f"{name}.quantizer_a"] = (module.quantizer_a, module)
            owners[f"{name}.quantizer_b"] = (module.quantizer_b, module)
    return owners


def _quantizer_leaves(quantizer: nn.Module) -> tuple[str, ...]:
    if isinstance(quantizer, UniformQuantizer):
        return "scale", "zero_point"
    return ("delta", "numerator", "shift") if isinstance(quantizer, AdaLogQuantizer) else ("delta",)


def _quantizer_shapes(quantizer: nn.Module, owner: nn.Module) -> tuple[tuple[int, ...], ...]:
    if isinstance(quantizer, UniformQuantizer) and isinstance(owner, QuantLinear):
        return (), (0,), (owner.in_features,)
    return (), (0,)


def _to_packed_form(module: WeightModule, bits: int, zero_point_dtype: torch.dtype) -> None:
    """Give ``module`` the packed form with empty tensors of the checkpoint's shapes (``nn`` ``pack_weight``), so
    that a state-dict loader fills exactly the tensors of the checkpoint; no float weight is kept."""
    weight = module.weight
    shape, device = tuple(weight.shape), weight.device
    del module.weight
    module.register_buffer("weight", weight_placeholder(weight), persistent=False)
    module.weight_quantizer._non_persistent_buffers_set.update(("scale", "zero_point"))
    module.register_buffer("weight_packed", torch.empty(packed_nbytes(math.prod(shape), bits), dtype=torch.uint8,
                                                        device=device))
    module.register_buffer("weight_scale", torch.empty(shape[0], dtype=torch.float32, device=device))
    module.register_buffer("weight_zero_point", torch.empty(shape[0], dtype=zero_point_dtype, device=device))


def _packed_bits_message(key: str, nbytes: int, shape: tuple[int, ...], planned: int, source: str) -> str:
    numel = math.prod(shape)
    fits = [b for b in range(MIN_BITS, MAX_BITS + 1) if packed_nbytes(numel, b) == nbytes]
    what = f"the {'/'.join(map(str, fits))}-bit packing" if fits else "no bit width's packing"
    return (f"{source}: {key} holds {nbytes} bytes, {what} of the {tuple(shape)} weight, but the bit plan in "
            f"config.json says {planned} bits ({packed_nbytes(numel, planned)} bytes). config.json and the weights "
            f"do not belong together; {RESAVE}.")


def prepare_packed_loading(model: nn.Module, config: LRPQConfig, tensors: Mapping[str, torch.Tensor],
                           source: str, stored_names: Mapping[str, str] | None = None,
                           stored_plan: Mapping | None = None) -> None:
    """Turn a float model (real or on the meta device) into the packed-loading form for the checkpoint tensors
    ``tensors`` (this model's key → tensor): quantized modules of the bit plan, the packed tensors as
    buffers, activation quantizers shaped as stored. Raises ValueError naming ``source`` unless the model's state
    dict then has exactly the checkpoint's keys, shapes and dtypes (``stored_names``: this model's key → the key in
    the file, for the messages) and ``stored_plan`` (the weights' own record of their bit plan, if any) is the plan
    of ``config``. ``finish_packed_loading`` completes it."""
    if not isinstance(config, LRPQConfig):
        raise TypeError(f"config must be an LRPQConfig, got {type(config).__name__}.")
    if is_quantized(model):
        raise ValueError("The model to load into is already quantized; pass a float model of the architecture.")
    specs = {k: _Spec(tuple(v.shape), v.dtype) for k, v in tensors.items()}
    stored_names = dict(stored_names or {})

    def label(key: str) -> str:
        stored = stored_names.get(key, key)
        return key if stored == key else f"{stored} (this model's {key})"

    family = find_family(model)
    layout = family.quantized_layout(model, config)
    plan = _bit_plan(config, layout, source)
    prepare_model(model, family, layout, plan, config)
    if not any(key.endswith(".pad_value") for key in specs):
        family.remove_pad_values(model)  # saved before pad values were kept: such a model pads with 0
    for name, module in weight_modules(model).items():
        stored = specs.get(f"{name}.weight_zero_point")
        zero_dtype = stored.dtype if stored is not None and stored.dtype == torch.float32 else torch.int16
        _to_packed_form(module, plan[name].w_bits, zero_dtype)
    for name, (quantizer, owner) in _activation_quantizers(model).items():
        for tensor in _quantizer_leaves(quantizer):
            key, current = f"{name}.{tensor}", getattr(quantizer, tensor)
            stored = specs.get(key)
            shape = stored.shape if stored is not None else ()
            if shape not in _quantizer_shapes(quantizer, owner):
                raise ValueError(f"{source}: {label(key)} has shape {shape}, expected one of "
                                 f"{list(_quantizer_shapes(quantizer, owner))}; {RESAVE}.")
            setattr(quantizer, tensor, torch.empty(shape, dtype=torch.float32, device=current.device))
    _check_tensors(model, plan, specs, source, label)
    _check_values(model, tensors, source, label)
    if stored_plan is not None and dict(stored_plan) != config.bit_plan:
        differ = sorted(k for k in set(stored_plan) | set(config.bit_plan or {})
                        if stored_plan.get(k) != (config.bit_plan or {}).get(k))
        raise ValueError(f"{source}: the weights were saved with another bit plan than the one in config.json (they "
                         f"differ at {differ[:3]}, e.g. {differ[0]!r}: weights {stored_plan.get(differ[0])}, config "
                         f"{(config.bit_plan or {}).get(differ[0])}); config.json and the weights do not belong "
                         f"together; {RESAVE}.")


def _check_tensors(model: nn.Module, plan: Mapping, specs: Mapping[str, _Spec], source: str,
                   label: Callable[[str], str]) -> None:
    expected = {k: _Spec(tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}
    missing, extra = sorted(set(expected) - set(specs)), sorted(set(specs) - set(expected))
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensor(s) that this model and the bit plan in config.json "
                         f"need, e.g. {[label(k) for k in missing[:5]]}; the weights are incomplete or belong to "
                         f"another config; {RESAVE}.")
    if extra:
        raise ValueError(f"{source} holds {len(extra)} tensor(s) that this model and the bit plan in config.json do "
                         f"not have, e.g. {[label(k) for k in extra[:5]]}; the weights belong to another model or "
                         f"config; {RESAVE}.")
    modules = weight_modules(model)
    for key, want in expected.items():
        got = specs[key]
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight_packed" and owner in modules:
            if got.dtype != torch.uint8 or len(got.shape) != 1:
                raise ValueError(f"{source}: {label(key)} must be a 1-D uint8 tensor, got {got.dtype} {got.shape}; "
                                 f"{RESAVE}.")
            if got.shape != want.shape:
                raise ValueError(_packed_bits_message(label(key), got.shape[0], modules[owner].weight_shape,
                                                      plan[owner].w_bits, source))
            continue
        if got.shape != want.shape:
            raise ValueError(f"{source}: {label(key)} has shape {got.shape}, this model expects {want.shape}; "
                             f"{RESAVE}.")
        if leaf == "weight_scale" and owner in modules and got.dtype != torch.float32:
            raise ValueError(f"{source}: {label(key)} must be float32, got {got.dtype}; {RESAVE}.")
        if leaf == "weight_zero_point" and owner in modules and got.dtype not in (torch.int16, torch.float32):
            raise ValueError(f"{source}: {label(key)} must be int16 or float32, got {got.dtype}; {RESAVE}.")
        if want.dtype.is_floating_point != got.dtype.is_floating_point:
            raise ValueError(f"{source}: {label(key)} is {got.dtype}, this model expects {want.dtype}; {RESAVE}.")


@torch.no_grad()
def finish_packed_loading(model: nn.Module, source: str = "checkpoint") -> None:
    """After the packed tensors were loaded into the buffers of ``prepare_packed_loading`` (which checked their
    values): copy the weight scales and zero points into the weight quantizers; the weights stay packed."""
    for module in weight_modules(model).values():
        if module.weight_is_packed:
            module.weight_quantizer.set_params(module.weight_scale.float(), module.weight_zero_point.float())
            module.weight_folded = True
    for quantizer, _ in _activation_quantizers(model).values():
        if isinstance(quantizer, UniformQuantizer):
            quantizer.channelwise = quantizer.scale.dim() > 0
    realign(model)


def _check_values(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str,
                  label: Callable[[str], str]) -> None:
    """ValueError unless every float tensor is finite, every scale and log Δ positive, every zero point an
    integer within ±2^15 and every AdaLog numerator an integer in [1, 2d] (what calibration gives and the format
    stores), before anything is loaded."""
    def bad(key: str, what: str) -> ValueError:
        return ValueError(f"{source}: {label(key)} {what}; the file is corrupted; {RESAVE}.")

    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise bad(key, "holds NaN or infinite values")
    pairs = [(f"{n}.weight_scale", f"{n}.weight_zero_point") for n in weight_modules(model)]
    for name, (quantizer, _) in _activation_quantizers(model).items():
        if isinstance(quantizer, UniformQuantizer):
            pairs.append((f"{name}.scale", f"{name}.zero_point"))
            continue
        if not bool((tensors[f"{name}.delta"] > 0).all()):
            raise bad(f"{name}.delta", "is not positive")
        if isinstance(quantizer, AdaLogQuantizer):
            numerator = tensors[f"{name}.numerator"].float()
            if not (torch.equal(numerator, numerator.round())
                    and bool(((numerator >= 1) & (numerator <= 2 * quantizer.denominator)).all())):
                raise bad(f"{name}.numerator", f"is not an integer between 1 and {2 * quantizer.denominator} (the "
                                               "AdaLog base exponent's numerator)")
            if not bool((tensors[f"{name}.shift"] >= 0).all()):
                raise bad(f"{name}.shift", "is negative")
    for scale_key, zero_key in pairs:
        zero_point = tensors[zero_key].float()
        if not bool((tensors[scale_key] > 0).all()):
            raise bad(scale_key, "holds a scale that is not positive")
        if not (torch.equal(zero_point, zero_point.round()) and bool((zero_point.abs() <= 2**15).all())):
            raise bad(zero_key, "holds a zero point that is not an integer within ±32768")


def load_quantized(directory: str | os.PathLike, model: nn.Module | type | None = None, **from_pretrained_kwargs):
    """Load a packed checkpoint saved by ``save_quantized`` (no calibration data needed).

    Args:
        directory (`str` or `os.PathLike`): a local directory with ``config.json`` and ``model.safetensors``
            (or its shards); with ``model`` ``None`` or a class, also a Hub repo id.
        model (`nn.Module` or `type`, *optional*): ``None`` loads a transformers checkpoint with the class its
            ``config.json`` names (``AutoModelForImageClassification`` where that is no supported class), through
            the ``"lrpqvit"`` quantizer that importing ``optimum_lrpqvit`` registers with transformers; a class
            loads with its own ``from_pretrained``; a float model instance (any supported family, raw timm
            included) is quantized in place with the saved bit plan and filled from the checkpoint without
            transformers' loader (if the checkpoint turns out not to fit, that instance is left half-converted:
            build a new one).
        from_pretrained_kwargs: passed to ``from_pretrained`` (``model`` ``None`` or a class only).

    Returns:
        The quantized model, giving the logits of the model that was saved.
    """
    directory = os.fspath(directory)
    if model is None or isinstance(model, type):
        if os.path.isdir(directory):  # local: fail early, naming the file, where transformers would be vaguer
            document = read_config(directory)
            config_from_document(document, directory)
            if "model_type" not in document:
                raise ValueError(f"{os.path.join(directory, CONFIG_NAME)} was saved from a raw timm model, which "
                                 "transformers cannot rebuild: pass the float timm model of the same architecture "
                                 "as `model=`, or quantize timm models inside TimmWrapperForImageClassification.")
            weight_files(directory)
        model_class = model or transformers_class(directory, **from_pretrained_kwargs)
        return model_class.from_pretrained(directory, **from_pretrained_kwargs)
    if from_pretrained_kwargs:
        raise TypeError(f"Unexpected arguments when loading into a model instance: {sorted(from_pretrained_kwargs)}.")
    config = config_from_document(read_config(directory), directory)
    files = weight_files(directory)
    source = ", ".join(files)
    tensors, stored_names = canonical_tensors(model, read_checkpoint(files), source)
    prepare_packed_loading(model, config, tensors, source, stored_names, stored_bit_plan(files))
    model.load_state_dict(tensors, strict=True)
    finish_packed_loading(model, source)
    model.eval()
    attach_applied_config(model, config)
    return model
