"""``save_quantized``: a quantized model as a packed checkpoint (``model.safetensors`` + ``config.json``)."""

from __future__ import annotations

import json
import os

from safetensors.torch import save_file
from torch import nn

from ..architectures import find_family, is_transformers_model
from ..bit_plan import read_bit_plan
from ..config import LRPQConfig
from ..files import finish_written_file
from ..quantize import applied_config, attach_applied_config
from .format import CONFIG_NAME, WEIGHTS_NAME, packed_state_dict
from .reading import weight_files

__all__ = ["record_bit_plan", "save_quantized"]


def record_bit_plan(model: nn.Module) -> LRPQConfig:
    """Set the bit plan of ``model``'s applied config to what its quantized modules hold, which is what the
    packed tensors hold (``config.json`` records the modules, never a plan they might have left); returns the
    config, validated again (ValueError before anything is written if a field was changed to an invalid value)."""
    config = applied_config(model)
    config.bit_plan = read_bit_plan(model, find_family(model).layout(model)).to_dict()
    config.post_init()
    return config


def save_quantized(model: nn.Module, save_directory: str | os.PathLike, **save_pretrained_kwargs) -> None:
    """Save a quantized model as a packed checkpoint (``docs/method.md#checkpoint-format``).

    transformers models go through ``model.save_pretrained(save_directory, **save_pretrained_kwargs)``, whose
    ``"lrpqvit"`` quantizer writes the packed tensors, and load back with ``from_pretrained``. Raw timm models have
    no config class from which transformers could rebuild them: they are written directly, their ``config.json``
    holding the quantization and the timm ``pretrained_cfg``; reload them with
    ``load_quantized(save_directory, model=<float timm model of the same architecture>)``, or quantize timm models
    inside ``TimmWrapperForImageClassification`` for ``from_pretrained`` support.

    The weight files get the mode of the user's umask and a reproducible header (``files.finish_written_file``):
    two saves of the same model are byte-identical.
    """
    if is_transformers_model(model):  # its quantizer records the bit plan while save_pretrained runs
        if getattr(model, "hf_quantizer", None) is None:  # dropped since quantize(): attach it again
            attach_applied_config(model, applied_config(model))
        model.save_pretrained(save_directory, **save_pretrained_kwargs)
        for path in weight_files(os.fspath(save_directory)):
            finish_written_file(path)
        return
    config = record_bit_plan(model)
    if save_pretrained_kwargs:
        raise TypeError(f"Unexpected arguments for a {type(model).__name__}: {sorted(save_pretrained_kwargs)}.")
    state, metadata = packed_state_dict(model)
    os.makedirs(save_directory, exist_ok=True)
    save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata=metadata)
    finish_written_file(os.path.join(save_directory, WEIGHTS_NAME))
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
