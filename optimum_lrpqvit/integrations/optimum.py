"""``LRPQuantizer``: the Optimum-style entry point,
``LRPQuantizer.from_pretrained(m).quantize(save_dir, config=...)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from optimum.quantization_base import OptimumQuantizer
from torch import nn

from ..config import LRPQConfig
from ..hub import save_quantized_model
from ..jobs import dataset_pixel_values, load_float_model
from ..quantize import quantize

__all__ = ["LRPQuantizer"]


def _timm_processor(model: nn.Module) -> Any:
    """The transformers processor of a raw timm model, built from its ``pretrained_cfg``."""
    from transformers import TimmWrapperImageProcessor

    return TimmWrapperImageProcessor(pretrained_cfg=dict(model.pretrained_cfg))


class LRPQuantizer(OptimumQuantizer):
    """Quantizes one float model (transformers or raw timm) with LRP-QViT and saves it packed.

    ``from_pretrained`` takes a Hub id or a local directory, or an already built model (a transformers
    classifier or a raw timm ``VisionTransformer`` / ``SwinTransformer``) with an optional image processor.
    """

    def __init__(self, model: nn.Module, processor: Any = None, name_or_path: str | None = None) -> None:
        self.model = model
        self.processor = processor
        self.name_or_path = name_or_path

    @classmethod
    def from_pretrained(cls, model_or_path: str | os.PathLike | nn.Module, file_name: str | None = None,
                        processor: Any = None, **kwargs: Any) -> "LRPQuantizer":
        if file_name is not None:
            raise ValueError("LRPQuantizer reads the model.safetensors of a transformers/timm checkpoint; "
                             "file_name is not supported.")
        if isinstance(model_or_path, nn.Module):
            if processor is None and hasattr(model_or_path, "pretrained_cfg") and not hasattr(model_or_path, "config"):
                processor = _timm_processor(model_or_path)
            return cls(model_or_path.eval(), processor, getattr(model_or_path, "name_or_path", None))
        model, auto_processor = load_float_model(model_or_path, **kwargs)
        return cls(model, processor or auto_processor, os.fspath(model_or_path))

    def quantize(self, save_dir: str | os.PathLike, file_prefix: str | None = None, *, config: LRPQConfig,
                 calibration_dataset: Any = None, importance_dataset: Any = None, reconstruction_dataset: Any = None,
                 results: dict[str, Any] | None = None, base_model: str | None = None) -> nn.Module:
        """Quantize the model with ``config`` and save it to ``save_dir`` (``hub.save_quantized_model``).

        ``calibration_dataset``: preprocessed pixel values (a tensor or batches, as for ``quantize()``), or
        None to draw them from ``config.dataset``; ``importance_dataset`` and ``reconstruction_dataset``
        likewise (default: as ``quantize()``). ``results`` (accuracy before and after) and ``base_model`` (the
        float model's Hub id; default: the id the model was loaded from, if not a local path) go to the model
        card. Returns the model.
        """
        if file_prefix is not None:
            raise ValueError("file_prefix is not supported: the checkpoint is always model.safetensors.")
        importance, reconstruction = importance_dataset, reconstruction_dataset
        if calibration_dataset is None:
            if self.processor is None:
                raise ValueError("No image processor to preprocess config.dataset with: pass processor= to "
                                 "LRPQuantizer.from_pretrained, or pass calibration_dataset as pixel values.")
            drawn = dataset_pixel_values(config, self.processor, self.model)
            calibration_dataset = drawn.calibration
            importance = importance if importance is not None else drawn.importance
            reconstruction = reconstruction if reconstruction is not None else drawn.reconstruction
        quantize(self.model, config, calibration_dataset, importance_data=importance,
                 reconstruction_data=reconstruction)
        if base_model is None and self.name_or_path and not Path(self.name_or_path).exists():
            base_model = self.name_or_path
        save_quantized_model(self.model, save_dir, self.processor, base_model=base_model, results=results)
        return self.model
