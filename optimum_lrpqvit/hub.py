"""Packed checkpoints: save a quantized model with its weights packed at their bit width, load it without data.

Format version 1, in ``model.safetensors`` (safetensors only; nothing is ever unpickled):

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
``post_ln`` and ``format_version``). transformers models are saved through ``save_pretrained`` (the packed tensors
come from the ``"lrpqvit"`` quantizer, see ``integrations/transformers.py``) and load back with
``AutoModelForImageClassification.from_pretrained(directory)``. Raw timm models have no config class from which
transformers could rebuild them: their ``config.json`` only records the quantization and the timm
``pretrained_cfg``, and ``load_quantized(directory, model=<the float timm model>)`` loads them into a float
skeleton. Quantize timm models inside ``TimmWrapperForImageClassification`` to get ``from_pretrained`` support.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .architectures import Layout, find_family
from .config import FORMAT_VERSION, QUANT_METHOD, LRPQConfig
from .nn import LogSqrt2Quantizer, QuantConv2d, QuantLinear, QuantMatMul, UniformQuantizer, quantizers
from .packing import pack_codes, packed_nbytes, unpack_codes
from .quantize import applied_config, fixed_bit_plan, prepare_model
from .quantizers import check_bits

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "canonical_tensors",
    "checkpoint_sizes",
    "content_digest",
    "finish_packed_loading",
    "load_quantized",
    "pack_weight",
    "packed_state_dict",
    "prepare_packed_loading",
    "read_checkpoint",
    "save_quantized",
    "unpack_weight",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
VERSION_KEY = "lrpqvit_format_version"
DIGEST_KEY = "lrpqvit_sha256"
_INT16 = (-(2**15), 2**15 - 1)
_RESAVE = "save the quantized model again with `optimum_lrpqvit.hub.save_quantized` (or download it again)"
_WeightModule = QuantLinear | QuantConv2d


# --- weights ------------------------------------------------------------------------------------------------------


def _weight_modules(model: nn.Module) -> dict[str, _WeightModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}


@torch.no_grad()
def pack_weight(module: _WeightModule, name: str = "module") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    codes = torch.round(rows / scale[:, None]) + zero_point[:, None]
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


def content_digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 over every tensor's dtype, shape and bytes, independent of names and order."""
    parts = []
    for tensor in tensors:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(data)
        parts.append(h.hexdigest())
    return hashlib.sha256("".join(sorted(parts)).encode()).hexdigest()


def packed_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict of the packed format (see the module docstring) and its safetensors metadata."""
    config = applied_config(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, module in _weight_modules(model).items():
        planned = config.bit_plan.get(name, {}).get("w_bits")
        if planned != module.weight_quantizer.bits:
            raise ValueError(f"{name}: the bit plan says w_bits={planned!r} but the layer holds "
                             f"{module.weight_quantizer.bits}-bit weights; the config does not describe this model.")
        packed, scale, zero_point = pack_weight(module, name)
        for suffix in ("weight", "weight_quantizer.scale", "weight_quantizer.zero_point"):
            state.pop(f"{name}.{suffix}")
        state.update({f"{name}.weight_packed": packed, f"{name}.weight_scale": scale,
                      f"{name}.weight_zero_point": zero_point})
    state = {k: v.contiguous() for k, v in state.items()}
    metadata = {"format": "pt", VERSION_KEY: str(FORMAT_VERSION), DIGEST_KEY: content_digest(state.values())}
    return state, metadata


# --- saving -------------------------------------------------------------------------------------------------------


def save_quantized(model: nn.Module, save_directory: str | os.PathLike, **save_pretrained_kwargs) -> None:
    """Save a quantized model as a packed checkpoint (``model.safetensors`` + ``config.json``).

    transformers models go through ``model.save_pretrained(save_directory, **save_pretrained_kwargs)`` with the
    ``"lrpqvit"`` quantizer attached for the call; raw timm models are written directly (reload them with
    ``load_quantized(save_directory, model=<float timm model of the same architecture>)``).
    """
    config = applied_config(model)
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        from .integrations.transformers import LRPQHfQuantizer

        previous = model.__dict__.get("hf_quantizer", None)
        if not isinstance(previous, LRPQHfQuantizer):
            model.hf_quantizer = LRPQHfQuantizer(config, pre_quantized=True)
        try:
            model.save_pretrained(save_directory, **save_pretrained_kwargs)
        finally:
            if previous is None:
                model.__dict__.pop("hf_quantizer", None)
            else:
                model.hf_quantizer = previous
        return
    if save_pretrained_kwargs:
        raise TypeError(f"Unexpected arguments for a {type(model).__name__}: {sorted(save_pretrained_kwargs)}.")
    state, metadata = packed_state_dict(model)
    os.makedirs(save_directory, exist_ok=True)
    save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata=metadata)
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    try:
        json.dumps(pretrained_cfg)
    except (TypeError, ValueError):
        pretrained_cfg = None
    document = {"library_name": "timm", "architectures": [type(model).__name__], "pretrained_cfg": pretrained_cfg,
                "quantization_config": config.to_dict()}
    with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2, sort_keys=True)
        f.write("\n")


def checkpoint_sizes(model: nn.Module, directory: str | os.PathLike) -> dict[str, float]:
    """Bytes of the saved ``*.safetensors`` against full precision (every parameter in float32) and against the
    ideal Σ quantized params × bits / 8 + other params × 4; ``vs_ideal`` and ``vs_full_precision`` are ratios."""
    plan = applied_config(model).bit_plan
    file_bytes = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
                     if f.endswith(".safetensors"))
    bits = {id(m.weight): plan[n]["w_bits"] for n, m in _weight_modules(model).items()}
    params = list(model.parameters())
    ideal = sum(p.numel() * bits[id(p)] / 8 if id(p) in bits else p.numel() * 4 for p in params)
    full = sum(p.numel() * 4 for p in params)
    return {"file_bytes": file_bytes, "ideal_bytes": ideal, "full_precision_bytes": full,
            "vs_ideal": file_bytes / ideal, "vs_full_precision": file_bytes / full}


# --- reading ------------------------------------------------------------------------------------------------------


def read_checkpoint(files: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """Every tensor of a packed checkpoint (one file or its shards), checked for readability, format version and
    content digest; OSError for an unreadable, truncated or corrupted file, ValueError for a foreign or newer one."""
    files = [os.fspath(files)] if isinstance(files, (str, os.PathLike)) else [os.fspath(f) for f in files]
    tensors: dict[str, torch.Tensor] = {}
    digests: dict[str, str] = {}
    for path in files:
        if not path.endswith(".safetensors"):
            raise OSError(f"{path}: optimum-lrpqvit reads packed checkpoints from safetensors files only (never "
                          f"pickle); {_RESAVE}.")
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                for key in f.keys():
                    if key in tensors:
                        raise ValueError(f"{path}: tensor {key!r} appears in more than one shard; {_RESAVE}.")
                    tensors[key] = f.get_tensor(key)
        except SafetensorError as e:
            raise OSError(f"{path} is not a readable safetensors file ({e}): it is truncated or corrupted; "
                          f"{_RESAVE}.") from e
        except FileNotFoundError as e:
            raise OSError(f"{path} does not exist; {_RESAVE}.") from e
        version = metadata.get(VERSION_KEY)
        if version is None:
            raise ValueError(f"{path} was not written by optimum-lrpqvit (its metadata has no {VERSION_KEY!r}); "
                             f"{_RESAVE}.")
        if version != str(FORMAT_VERSION):
            raise ValueError(f"{path} uses lrpqvit format version {version!r}; this version of optimum-lrpqvit reads "
                             f"version {FORMAT_VERSION}. Upgrade optimum-lrpqvit.")
        if DIGEST_KEY in metadata:
            digests[path] = metadata[DIGEST_KEY]
    if len(set(digests.values())) > 1:
        raise OSError(f"The shards {sorted(digests)} come from different saves; {_RESAVE}.")
    if digests and content_digest(tensors.values()) != next(iter(digests.values())):
        raise OSError(f"{', '.join(files)}: the tensor data does not match the digest written at save time, the file "
                      f"is corrupted; {_RESAVE}.")
    return tensors


def _key_renamer(model: nn.Module, keys: Iterable[str]) -> Callable[[str], str]:
    """Checkpoint key → this model's state-dict key: transformers' renamings for its models (``save_pretrained``
    writes the original checkpoint names), the ``timm_model.`` prefix of TimmWrapper checkpoints for raw timm."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        keys = list(keys)
        prefix = "timm_model."
        if keys and all(k.startswith(prefix) for k in keys):
            return lambda k: k[len(prefix):]
        return lambda k: k
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers without key renaming: names are stored as they are
        return lambda k: k
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    return lambda k: rename_source_key(k, renamings, [])[0]


def canonical_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                      source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The checkpoint's tensors under this model's state-dict keys, and model key → stored key."""
    rename = _key_renamer(model, tensors)
    renamed: dict[str, torch.Tensor] = {}
    stored: dict[str, str] = {}
    for key, tensor in tensors.items():
        new = rename(key)
        if new in renamed:
            raise ValueError(f"{source}: {stored[new]} and {key} both load into {new}; {_RESAVE}.")
        renamed[new], stored[new] = tensor, key
    return renamed, stored


# --- loading ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _check_plan(config: LRPQConfig, layout: Layout, source: str) -> dict[str, dict[str, int | None]]:
    plan = config.bit_plan
    if not isinstance(plan, dict) or not plan:
        raise ValueError(f"config.json of {source}: quantization_config has no bit_plan, so this is not a packed "
                         f"checkpoint saved by optimum-lrpqvit; {_RESAVE}.")
    expected = fixed_bit_plan(layout, 4, 4)
    missing, extra = sorted(set(expected) - set(plan)), sorted(set(plan) - set(expected))
    if missing or extra:
        raise ValueError(f"config.json of {source}: the bit plan does not fit this model (points it lacks: "
                         f"{missing[:5]}, unknown points: {extra[:5]}); config.json was saved for another "
                         f"architecture; {_RESAVE}.")
    where = f"config.json of {source}: bit plan"
    for point, bits in plan.items():
        if not isinstance(bits, dict):
            raise ValueError(f"{where} entry {point!r} must be a dict, got {bits!r}.")
        check_bits(bits.get("a_bits"), f"{where} {point!r} a_bits")
        if expected[point]["w_bits"] is None:
            if bits.get("w_bits") is not None:
                raise ValueError(f"{where} {point!r} has no weights but says w_bits={bits['w_bits']!r}.")
        else:
            check_bits(bits.get("w_bits"), f"{where} {point!r} w_bits")
    return plan


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


def _quantizer_shapes(quantizer: nn.Module, owner: nn.Module) -> tuple[tuple[int, ...], ...]:
    if isinstance(quantizer, UniformQuantizer) and isinstance(owner, QuantLinear):
        return (), (0,), (owner.in_features,)
    return (), (0,)


def _to_packed_form(module: _WeightModule, bits: int, zero_point_dtype: torch.dtype) -> None:
    """Give ``module`` the packed tensors as persistent buffers and drop its float weight and weight-quantizer
    parameters from its state dict, so that a state-dict loader fills exactly the tensors of the checkpoint."""
    weight = module.weight
    shape, dtype, device = tuple(weight.shape), weight.dtype, weight.device
    del module.weight
    module.register_buffer("weight", torch.empty(shape, dtype=dtype, device=device), persistent=False)
    module.weight_quantizer._non_persistent_buffers_set.update(("scale", "zero_point"))
    out = shape[0]
    module.register_buffer("weight_packed", torch.empty(packed_nbytes(math.prod(shape), bits), dtype=torch.uint8,
                                                        device=device))
    module.register_buffer("weight_scale", torch.empty(out, dtype=torch.float32, device=device))
    module.register_buffer("weight_zero_point", torch.empty(out, dtype=zero_point_dtype, device=device))


def _packed_bits_message(key: str, nbytes: int, shape: tuple[int, ...], planned: int, source: str) -> str:
    numel = math.prod(shape)
    fits = [b for b in range(2, 9) if packed_nbytes(numel, b) == nbytes]
    what = f"the {'/'.join(map(str, fits))}-bit packing" if fits else "no bit width's packing"
    return (f"{source}: {key} holds {nbytes} bytes, {what} of the {tuple(shape)} weight, but the bit plan in "
            f"config.json says {planned} bits ({packed_nbytes(numel, planned)} bytes). config.json and the weights "
            f"do not belong together; {_RESAVE}.")


def prepare_packed_loading(model: nn.Module, config: LRPQConfig, specs: Mapping[str, _Spec | torch.Tensor],
                           source: str, stored_names: Mapping[str, str] | None = None) -> None:
    """Turn a float model (real or on the meta device) into the packed-loading form for the checkpoint tensors
    ``specs`` (this model's key → tensor or (shape, dtype)): quantized modules of the bit plan, the packed tensors as
    buffers, activation quantizers shaped as stored. Raises ValueError naming ``source`` unless the model's state
    dict then has exactly the checkpoint's keys, shapes and dtypes (``stored_names``: this model's key → the key in
    the file, for the messages). ``finish_packed_loading`` completes it."""
    if not isinstance(config, LRPQConfig):
        raise TypeError(f"config must be an LRPQConfig, got {type(config).__name__}.")
    if any(isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul)) for m in model.modules()):
        raise ValueError("The model to load into is already quantized; pass a float model of the architecture.")
    specs = {k: _Spec(tuple(v.shape), v.dtype) for k, v in specs.items()}
    stored_names = dict(stored_names or {})

    def label(key: str) -> str:
        stored = stored_names.get(key, key)
        return key if stored == key else f"{stored} (this model's {key})"

    family = find_family(model)
    layout = family.layout(model)
    plan = _check_plan(config, layout, source)
    prepare_model(model, family, layout, plan, config)
    for name, module in _weight_modules(model).items():
        stored = specs.get(f"{name}.weight_zero_point")
        zero_dtype = stored.dtype if stored is not None and stored.dtype == torch.float32 else torch.int16
        _to_packed_form(module, plan[name]["w_bits"], zero_dtype)
    for name, (quantizer, owner) in _activation_quantizers(model).items():
        tensors = ("delta",) if isinstance(quantizer, LogSqrt2Quantizer) else ("scale", "zero_point")
        for tensor in tensors:
            key, current = f"{name}.{tensor}", getattr(quantizer, tensor)
            stored = specs.get(key)
            shape = stored.shape if stored is not None else ()
            if shape not in _quantizer_shapes(quantizer, owner):
                raise ValueError(f"{source}: {label(key)} has shape {shape}, expected one of "
                                 f"{list(_quantizer_shapes(quantizer, owner))}; {_RESAVE}.")
            setattr(quantizer, tensor, torch.empty(shape, dtype=torch.float32, device=current.device))
    _check_tensors(model, plan, specs, source, label)


def _check_tensors(model: nn.Module, plan: Mapping, specs: Mapping[str, _Spec], source: str,
                   label: Callable[[str], str]) -> None:
    expected = {k: _Spec(tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}
    missing, extra = sorted(set(expected) - set(specs)), sorted(set(specs) - set(expected))
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensor(s) that this model and the bit plan in config.json "
                         f"need, e.g. {[label(k) for k in missing[:5]]}; the weights are incomplete or belong to "
                         f"another config; {_RESAVE}.")
    if extra:
        raise ValueError(f"{source} holds {len(extra)} tensor(s) that this model and the bit plan in config.json do "
                         f"not have, e.g. {[label(k) for k in extra[:5]]}; the weights belong to another model or "
                         f"config; {_RESAVE}.")
    modules = _weight_modules(model)
    for key, want in expected.items():
        got = specs[key]
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight_packed" and owner in modules:
            if got.dtype != torch.uint8 or len(got.shape) != 1:
                raise ValueError(f"{source}: {label(key)} must be a 1-D uint8 tensor, got {got.dtype} {got.shape}; "
                                 f"{_RESAVE}.")
            if got.shape != want.shape:
                raise ValueError(_packed_bits_message(label(key), got.shape[0], tuple(modules[owner].weight.shape),
                                                      plan[owner]["w_bits"], source))
            continue
        if got.shape != want.shape:
            raise ValueError(f"{source}: {label(key)} has shape {got.shape}, this model expects {want.shape}; "
                             f"{_RESAVE}.")
        if leaf == "weight_scale" and owner in modules and got.dtype != torch.float32:
            raise ValueError(f"{source}: {label(key)} must be float32, got {got.dtype}; {_RESAVE}.")
        if leaf == "weight_zero_point" and owner in modules and got.dtype not in (torch.int16, torch.float32):
            raise ValueError(f"{source}: {label(key)} must be int16 or float32, got {got.dtype}; {_RESAVE}.")
        if want.dtype.is_floating_point != got.dtype.is_floating_point:
            raise ValueError(f"{source}: {label(key)} is {got.dtype}, this model expects {want.dtype}; {_RESAVE}.")


@torch.no_grad()
def finish_packed_loading(model: nn.Module, source: str = "checkpoint") -> None:
    """After the packed tensors were loaded into the buffers of ``prepare_packed_loading``: unpack and dequantize
    every weight (marked folded), set the weight quantizers, and drop the packed buffers."""
    for name, module in _weight_modules(model).items():
        if "weight_packed" not in module._buffers:
            continue
        packed = module._buffers.pop("weight_packed")
        scale = module._buffers.pop("weight_scale").float()
        zero_point = module._buffers.pop("weight_zero_point").float()
        if not bool(torch.isfinite(scale).all() & (scale > 0).all() & torch.isfinite(zero_point).all()):
            raise ValueError(f"{source}: {name}.weight_scale / weight_zero_point hold non-positive or non-finite "
                             f"values; the file is corrupted; {_RESAVE}.")
        placeholder = module._buffers.pop("weight")
        weight = unpack_weight(packed, scale, zero_point, module.weight_quantizer.bits, placeholder.shape,
                               placeholder.dtype)
        module.weight = nn.Parameter(weight.to(placeholder.device))
        quantizer = module.weight_quantizer
        quantizer._non_persistent_buffers_set.difference_update(("scale", "zero_point"))
        quantizer.set_params(scale.to(placeholder.device), zero_point.to(placeholder.device))
        module.weight_folded = True
    for quantizer in quantizers(model):
        if isinstance(quantizer, UniformQuantizer):
            quantizer.channelwise = quantizer.scale.dim() > 0


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except FileNotFoundError as e:
        raise OSError(f"{path} does not exist; {_RESAVE}.") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OSError(f"{path} is not valid JSON ({e}); {_RESAVE}.") from e
    quant = document.get("quantization_config") if isinstance(document, dict) else None
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path} has no lrpqvit quantization_config; it is not a packed checkpoint of "
                         "optimum-lrpqvit.")
    return document


def _config_from(document: dict, directory: str) -> LRPQConfig:
    try:
        return LRPQConfig.from_dict(document["quantization_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(directory, CONFIG_NAME)}: {e}") from e


def _weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, WEIGHTS_NAME + ".index.json")
    if os.path.isfile(index):  # sharded by save_pretrained(max_shard_size=...)
        try:
            with open(index, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise OSError(f"{index} is not a valid shard index ({e}); {_RESAVE}.") from e
        return [os.path.join(directory, name) for name in names]
    if os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        return [os.path.join(directory, WEIGHTS_NAME)]
    names = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not names:
        others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        hint = f" (found {others}: optimum-lrpqvit never reads pickle files)" if others else ""
        raise OSError(f"{directory} has no *.safetensors weights{hint}; {_RESAVE}.")
    return [os.path.join(directory, f) for f in names]


def load_quantized(directory: str | os.PathLike, model: nn.Module | type | None = None, **from_pretrained_kwargs):
    """Load a packed checkpoint saved by ``save_quantized`` (no calibration data needed).

    Args:
        directory (`str` or `os.PathLike`): a local directory with ``config.json`` and ``model.safetensors``
            (or its shards); with ``model`` ``None`` or a class, also a Hub repo id.
        model (`nn.Module` or `type`, *optional*): ``None`` loads a transformers checkpoint with
            ``AutoModelForImageClassification.from_pretrained``; a transformers class loads with its own
            ``from_pretrained``; a float model instance (any supported family, raw timm included) is quantized in
            place with the saved bit plan and filled from the checkpoint without transformers' loader (if the
            checkpoint turns out not to fit, that instance is left half-converted: build a new one).
        from_pretrained_kwargs: passed to ``from_pretrained`` (``model`` ``None`` or a class only).

    Returns:
        The quantized model, giving the logits of the model that was saved.
    """
    directory = os.fspath(directory)
    if model is None or isinstance(model, type):
        from . import integrations  # noqa: F401  (registers the "lrpqvit" quantizer with transformers)

        model_class = model
        if model_class is None:
            from transformers import AutoModelForImageClassification as model_class
        if os.path.isdir(directory):  # local: fail early, naming the file, where transformers would be vaguer
            document = _read_config(directory)
            _config_from(document, directory)
            if "model_type" not in document:
                raise ValueError(f"{os.path.join(directory, CONFIG_NAME)} was saved from a raw timm model, which "
                                 "transformers cannot rebuild: pass the float timm model of the same architecture "
                                 "as `model=`, or quantize timm models inside TimmWrapperForImageClassification.")
            _weight_files(directory)
        return model_class.from_pretrained(directory, **from_pretrained_kwargs)
    if from_pretrained_kwargs:
        raise TypeError(f"Unexpected arguments when loading into a model instance: {sorted(from_pretrained_kwargs)}.")
    config = _config_from(_read_config(directory), directory)
    files = _weight_files(directory)
    source = ", ".join(files)
    tensors, stored_names = canonical_tensors(model, read_checkpoint(files), source)
    prepare_packed_loading(model, config, tensors, source, stored_names)
    model.load_state_dict(tensors, strict=True)
    finish_packed_loading(model, source)
    model.eval()
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):  # as from_pretrained leaves it: save_pretrained writes the packed format
        from .integrations.transformers import LRPQHfQuantizer

        model.config.quantization_config = config
        model.hf_quantizer = LRPQHfQuantizer(config, pre_quantized=True)
    else:
        model.quantization_config = config
    return model


def push_directory(directory: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                   token: str | None = None, commit_message: str | None = None) -> str:
    """Upload a directory written by ``jobs.save_quantized_model`` (or ``save_quantized``) to the Hub repo
    ``repo_id`` in one commit, creating the repo if needed; returns the commit URL. The directory is checked
    first (an lrpqvit config with a bit plan and readable safetensors weights), so a broken checkpoint is never
    published; the model card's name for the model (the directory's) becomes ``repo_id``."""
    from huggingface_hub import CommitOperationAdd, HfApi

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory; write one with `lrpqvit quantize`.")
    config = _config_from(_read_config(directory), directory)
    if not config.bit_plan:
        raise ValueError(f"{directory}/config.json has no bit plan; it was not saved by optimum-lrpqvit.")
    read_checkpoint(_weight_files(directory))  # digest and format checks
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = []
    for path in sorted(Path(directory).rglob("*")):
        relative = path.relative_to(directory)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        content: str | bytes = str(path)
        if relative.as_posix() == "README.md":
            name = Path(directory).resolve().name
            content = path.read_text(encoding="utf-8").replace(f'model="{name}"', f'model="{repo_id}"').encode()
        operations.append(CommitOperationAdd(relative.as_posix(), content))
    info = api.create_commit(repo_id, operations, revision=revision,
                             commit_message=commit_message or f"Upload {config.bit_plan_summary['avg_w_bits']}-bit "
                                                              "LRP-QViT quantized model")
    return info.commit_url


def push_to_hub(model: nn.Module, repo_id: str, processor=None, *, base_model: str | None = None,
                results: dict | None = None, private: bool = False, token: str | None = None) -> str:
    """Save ``model`` with ``jobs.save_quantized_model`` (packed weights, bit plan, processor, model card with
    the bit plan, importance figure, ``results``) and upload it to ``repo_id``; returns the commit URL.

    ``model.push_to_hub`` of a quantized transformers model uploads the packed weights too, but with
    transformers' generic model card."""
    import tempfile

    from .jobs import save_quantized_model

    with tempfile.TemporaryDirectory() as tmp:
        save_quantized_model(model, tmp, processor, base_model=base_model, results=results, name=repo_id)
        return push_directory(tmp, repo_id, private=private, token=token)
