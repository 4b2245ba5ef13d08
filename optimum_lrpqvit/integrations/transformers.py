"""transformers integration: ``LRPQConfig`` and ``LRPQHfQuantizer`` registered as quantization method ``"lrpqvit"``.

With them, ``AutoModelForImageClassification.from_pretrained(packed_dir)`` rebuilds a model saved by
``save_quantized`` (or by ``save_pretrained`` of a model loaded that way): transformers builds the float
skeleton on the meta device, the before-loading hook quantizes it with the saved bit plan and gives it exactly the
checkpoint's tensors (packed weights as buffers, see ``serialization.loading.prepare_packed_loading``),
transformers' own loader fills them from ``model.safetensors``, and the after-loading hook unpacks the weights
(``finish_packed_loading``). ``get_state_dict_and_metadata`` makes ``save_pretrained`` write the packed format.
Importing this module also registers an attach hook with ``quantize``, so that a quantized transformers model
carries its applied config in ``model.config.quantization_config`` together with this quantizer.

``from_pretrained(float_checkpoint, quantization_config=LRPQConfig(dataset=..., ...))`` loads the float weights,
then the after-loading hook draws the calibration (and importance) images the config names, preprocesses them
with the checkpoint's own image processor (the one next to the weights, ``subfolder=`` included) and runs
``quantize`` (``jobs.quantize_from_dataset``). Only safetensors weight files inside the model's directory are
accepted, float checkpoints included. A quantized model's ``push_to_hub`` (after quantizing or loading) is
``hub.push_to_hub``, so that it uploads this library's model card.

Written against the quantizer lifecycle of transformers 5.x (tested with 5.24 and 5.25): ``preprocess_model`` passes
``checkpoint_files`` to ``_process_model_before_weight_loading`` on a meta-device model.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from torch import nn
from transformers.quantizers import auto as _auto
from transformers.quantizers.base import HfQuantizer

from .. import hub
from ..architectures import is_transformers_model
from ..config import QUANT_METHOD, LRPQConfig
from ..data import load_image_processor
from ..jobs import quantize_from_dataset
from ..quantize import register_attach_hook
from ..serialization.format import RESAVE, packed_state_dict
from ..serialization.loading import finish_packed_loading, prepare_packed_loading
from ..serialization.reading import canonical_tensors, read_checkpoint, stored_bit_plan
from ..serialization.saving import record_bit_plan

__all__ = ["LRPQHfQuantizer", "attach_to_transformers_model", "register"]


class LRPQHfQuantizer(HfQuantizer):
    """Loads and saves optimum-lrpqvit packed checkpoints through ``from_pretrained`` / ``save_pretrained``."""

    requires_calibration = False
    quantization_config: LRPQConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            if self.quantization_config.dataset is None:
                raise ValueError(
                    "Quantizing at load needs calibration data: set LRPQConfig(dataset=...) to a Hub dataset id, a "
                    "local image folder or 'fashion_mnist', or load the float model and call "
                    "optimum_lrpqvit.quantize(model, config, calibration_data).")
            return
        if not self.quantization_config.bit_plan:
            raise ValueError("The lrpqvit quantization_config of this checkpoint has no bit_plan, so it was not saved "
                             "by optimum-lrpqvit; save the quantized model again with "
                             "optimum_lrpqvit.save_quantized.")

    def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any):
        if checkpoint_files:
            _check_weight_files(checkpoint_files, model.name_or_path)
            self._subfolder = _subfolder(checkpoint_files[0], model.name_or_path)
        if not self.pre_quantized:
            return model  # float weights load as usual; quantized after loading
        if not checkpoint_files:
            raise ValueError("An lrpqvit checkpoint is loaded from its model.safetensors; from_pretrained found no "
                             "checkpoint file (state_dict= is not supported).")
        self._source = ", ".join(map(str, checkpoint_files))
        # the tensors under the names transformers' loader will give them (it renames legacy checkpoint keys)
        tensors, stored_names = canonical_tensors(model, read_checkpoint(checkpoint_files), self._source)
        prepare_packed_loading(model, self.quantization_config, tensors, self._source, stored_names,
                               stored_bit_plan(checkpoint_files))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if self.pre_quantized:
            finish_packed_loading(model, getattr(self, "_source", "checkpoint"))
            _install_push_to_hub(model)
            return model
        # the processor next to the weights: from_pretrained(..., subfolder=) does not tell the quantizer
        processor = load_image_processor(model.name_or_path, subfolder=getattr(self, "_subfolder", ""))
        # quantize() attaches the applied config and a pre-quantized quantizer, so save_pretrained writes packed
        return quantize_from_dataset(model, self.quantization_config, processor)

    def get_state_dict_and_metadata(self, model):
        record_bit_plan(model)  # save_pretrained writes config.json after this call
        return packed_state_dict(model)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _subfolder(weight_file: str, name_or_path: str) -> str:
    """The folder of ``weight_file`` relative to the model's root: the local directory ``name_or_path``, or the
    snapshot directory of the Hub cache (``.../snapshots/<revision>/``)."""
    folder = os.path.dirname(os.path.abspath(weight_file))
    if os.path.isdir(name_or_path):
        root = os.path.abspath(name_or_path)
    else:
        parts = folder.split(os.sep)
        if "snapshots" not in parts:
            return ""
        at = len(parts) - 1 - parts[::-1].index("snapshots")
        root = os.sep.join(parts[:at + 2])
    relative = os.path.relpath(folder, root)
    return "" if relative == "." else relative.replace(os.sep, "/")


def _check_weight_files(files: list[str], name_or_path: str) -> None:
    """OSError unless the weight files are safetensors (pickle is never read, float checkpoints included) and
    lie in one directory, inside ``name_or_path`` when that is a local directory (a shard index naming
    ``../x.safetensors`` must not make the loader read files elsewhere)."""
    pickled = [f for f in files if not os.fspath(f).endswith(".safetensors")]
    if pickled:
        raise OSError(f"{name_or_path} has weights in {[os.path.basename(f) for f in pickled]}, not safetensors: "
                      "optimum-lrpqvit never loads pickle files. Load them once with a tool you trust, save the model "
                      "with save_pretrained (which writes safetensors) and load that directory.")
    folders = {os.path.dirname(os.path.abspath(f)) for f in files}
    root = os.path.abspath(name_or_path) if name_or_path and os.path.isdir(name_or_path) else None
    if len(folders) > 1 or (root is not None and os.path.commonpath([root, *folders]) != root):
        raise OSError(f"The shard index of {name_or_path} names weight files outside its directory ({files[:3]}); "
                      f"optimum-lrpqvit never reads a file elsewhere. {RESAVE}.")


def _register(mapping: dict, decorator, cls: type) -> None:
    current = mapping.get(QUANT_METHOD)
    if current is cls:
        return
    if current is None:
        decorator(QUANT_METHOD)(cls)
    elif (current.__module__, current.__qualname__) == (cls.__module__, cls.__qualname__):
        mapping[QUANT_METHOD] = cls  # our own class from an earlier import of a reloaded module
    else:
        raise ValueError(f"transformers already has a quantization method {QUANT_METHOD!r} registered by "
                         f"{current.__module__}.{current.__qualname__}; optimum-lrpqvit cannot register its own.")


def attach_to_transformers_model(model: nn.Module, config: LRPQConfig) -> bool:
    """``quantize``'s attach hook: the applied config goes to ``model.config.quantization_config`` with a
    pre-quantized ``LRPQHfQuantizer``, so that ``save_pretrained`` / ``push_to_hub`` write packed weights."""
    if not is_transformers_model(model):
        return False
    model.config.quantization_config = config
    model.hf_quantizer = LRPQHfQuantizer(config, pre_quantized=True)
    _install_push_to_hub(model)
    return True


def _install_push_to_hub(model: nn.Module) -> None:
    """``model.push_to_hub(repo_id, ...)`` of this instance becomes ``hub.push_to_hub(model, repo_id, ...)``:
    the same upload and model card as ``lrpqvit push`` (transformers' own writes a generic card). Arguments
    that only transformers' method takes raise TypeError rather than being ignored."""
    model.push_to_hub = functools.partial(hub.push_to_hub, model)


def register() -> None:
    """Register ``LRPQConfig`` and ``LRPQHfQuantizer`` under ``"lrpqvit"`` (idempotent; transformers' own
    ``register_*`` functions raise on a second registration of a name)."""
    _register(_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, _auto.register_quantization_config, LRPQConfig)
    _register(_auto.AUTO_QUANTIZER_MAPPING, _auto.register_quantizer, LRPQHfQuantizer)
    register_attach_hook(attach_to_transformers_model)


register()
