"""Reading packed checkpoints: ``config.json``, the weight files of a directory (one file or shards) and their
tensors, each checked (readable, format version, content digest) with errors that name the file and the fix."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..architectures import is_transformers_model
from ..config import FORMAT_VERSION, QUANT_METHOD, LRPQConfig
from ..digest import content_digest
from .format import BIT_PLAN_KEY, CONFIG_NAME, DIGEST_KEY, RESAVE, VERSION_KEY, WEIGHTS_NAME

__all__ = ["canonical_tensors", "config_from_document", "read_checkpoint", "read_config", "stored_bit_plan",
           "weight_files"]


def read_checkpoint(files: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """Every tensor of a packed checkpoint (one file or its shards), checked for readability, format version and
    content digest; OSError for an unreadable, truncated or corrupted file, ValueError for a foreign or newer one."""
    files = [os.fspath(files)] if isinstance(files, (str, os.PathLike)) else [os.fspath(f) for f in files]
    tensors: dict[str, torch.Tensor] = {}
    digests: dict[str, str] = {}
    for path in files:
        if not path.endswith(".safetensors"):
            raise OSError(f"{path}: optimum-lrpqvit reads packed checkpoints from safetensors files only (never "
                          f"pickle); {RESAVE}.")
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                for key in f.keys():
                    if key in tensors:
                        raise ValueError(f"{path}: tensor {key!r} appears in more than one shard; {RESAVE}.")
                    tensors[key] = f.get_tensor(key)
        except SafetensorError as e:
            raise OSError(f"{path} is not a readable safetensors file ({e}): it is truncated or corrupted; "
                          f"{RESAVE}.") from e
        except FileNotFoundError as e:
            raise OSError(f"{path} does not exist; {RESAVE}.") from e
        version = metadata.get(VERSION_KEY)
        if version is None:
            raise ValueError(f"{path} was not written by optimum-lrpqvit (its metadata has no {VERSION_KEY!r}); "
                             f"{RESAVE}.")
        if version != str(FORMAT_VERSION):
            raise ValueError(f"{path} uses lrpqvit format version {version!r}; this version of optimum-lrpqvit reads "
                             f"version {FORMAT_VERSION}. Upgrade optimum-lrpqvit.")
        if DIGEST_KEY not in metadata:
            raise OSError(f"{path} has no content digest ({DIGEST_KEY!r} in its metadata), which every packed "
                          f"checkpoint of optimum-lrpqvit carries: it was modified or rewritten by another tool; "
                          f"{RESAVE}.")
        digests[path] = metadata[DIGEST_KEY]
    if len(set(digests.values())) > 1:
        raise OSError(f"The shards {sorted(digests)} come from different saves; {RESAVE}.")
    if content_digest(tensors.values()) != next(iter(digests.values())):
        raise OSError(f"{', '.join(files)}: the tensor data does not match the digest written at save time, the file "
                      f"is corrupted; {RESAVE}.")
    return tensors


def stored_bit_plan(files: Iterable[str | os.PathLike]) -> dict | None:
    """The bit plan recorded in the safetensors metadata at save time (``BIT_PLAN_KEY``), or None for files saved
    before it was recorded; OSError if the shards disagree or it is not valid JSON."""
    plans = set()
    for path in files:
        with safe_open(os.fspath(path), framework="pt") as f:
            plans.add((f.metadata() or {}).get(BIT_PLAN_KEY))
    if len(plans) > 1:
        raise OSError(f"The shards {[os.fspath(f) for f in files]} record different bit plans; {RESAVE}.")
    plan = plans.pop() if plans else None
    if plan is None:
        return None
    try:
        return json.loads(plan)
    except json.JSONDecodeError as e:
        raise OSError(f"The bit plan in the metadata of {[os.fspath(f) for f in files]} is not valid JSON ({e}); "
                      f"{RESAVE}.") from e


def _key_renamer(model: nn.Module, keys: Iterable[str]) -> Callable[[str], str]:
    """Checkpoint key → this model's state-dict key: transformers' renamings for its models (``save_pretrained``
    writes the original checkpoint names), the ``timm_model.`` prefix of TimmWrapper checkpoints for raw timm."""
    if not is_transformers_model(model):
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
            raise ValueError(f"{source}: {stored[new]} and {key} both load into {new}; {RESAVE}.")
        renamed[new], stored[new] = tensor, key
    return renamed, stored


def read_config(directory: str) -> dict:
    """The parsed ``config.json`` of ``directory``; OSError or ValueError unless it holds an lrpqvit
    ``quantization_config``."""
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except FileNotFoundError as e:
        raise OSError(f"{path} does not exist; {RESAVE}.") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OSError(f"{path} is not valid JSON ({e}); {RESAVE}.") from e
    quant = document.get("quantization_config") if isinstance(document, dict) else None
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path} has no lrpqvit quantization_config; it is not a packed checkpoint of "
                         "optimum-lrpqvit.")
    return document


def config_from_document(document: dict, directory: str) -> LRPQConfig:
    """The ``LRPQConfig`` of a parsed ``config.json``; ValueError naming the file if it is invalid."""
    try:
        return LRPQConfig.from_dict(document["quantization_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(directory, CONFIG_NAME)}: {e}") from e


def weight_files(directory: str) -> list[str]:
    """The safetensors weight files of ``directory``: the shards of its index, or ``model.safetensors``, or
    every ``*.safetensors``; OSError if there is none."""
    index = os.path.join(directory, WEIGHTS_NAME + ".index.json")
    if os.path.isfile(index):  # sharded by save_pretrained(max_shard_size=...)
        try:
            with open(index, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise OSError(f"{index} is not a valid shard index ({e}); {RESAVE}.") from e
        outside = [n for n in names if not isinstance(n, str) or os.path.basename(n) != n or n in ("", ".", "..")]
        if outside:
            raise OSError(f"{index} names shards outside {directory} ({outside[:3]}): shards are files of the model's "
                          f"own directory; optimum-lrpqvit never reads a file elsewhere. {RESAVE}.")
        missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            stale = (f" and {WEIGHTS_NAME} exists next to it: the index is left from an earlier sharded save; delete "
                     "it" if os.path.isfile(os.path.join(directory, WEIGHTS_NAME)) else f"; {RESAVE}")
            raise OSError(f"{index} lists shards that do not exist ({missing[:3]}){stale}.")
        return [os.path.join(directory, name) for name in names]
    if os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        return [os.path.join(directory, WEIGHTS_NAME)]
    names = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not names:
        others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        hint = f" (found {others}: optimum-lrpqvit never reads pickle files)" if others else ""
        raise OSError(f"{directory} has no *.safetensors weights{hint}; {RESAVE}.")
    return [os.path.join(directory, f) for f in names]
