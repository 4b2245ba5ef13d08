"""Steps shared by quantize-at-load (``from_pretrained``), ``LRPQuantizer`` and the ``lrpqvit`` command line:
load a float model, draw its calibration and importance images from the dataset a config names, quantize."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from torch import nn

from .architectures import find_family, transformers_class
from .config import LRPQConfig
from .data import images_to_pixel_values, load_image_dataset, load_image_processor
from .quantize import quantize

__all__ = ["DrawnPixels", "dataset_pixel_values", "load_float_model", "quantize_from_dataset"]


def load_float_model(name_or_path: str | os.PathLike, **kwargs: Any) -> tuple[nn.Module, Any]:
    """A float model and its image processor from a Hub id or a local directory (safetensors only), as the class
    its ``config.json`` names where a family supports it (a bare encoder such as ``Dinov2Model`` stays one), else
    through ``AutoModelForImageClassification`` (timm checkpoints: ``TimmWrapperForImageClassification``)."""
    model_class = transformers_class(name_or_path, **kwargs)
    model = model_class.from_pretrained(name_or_path, use_safetensors=True, **kwargs).eval()
    find_family(model)  # TypeError naming the supported families before any data is read
    return model, load_image_processor(name_or_path)


class DrawnPixels(NamedTuple):
    """Pixel values drawn for one quantization; None where the calibration images serve."""

    calibration: torch.Tensor
    importance: torch.Tensor | None
    reconstruction: torch.Tensor | None


def dataset_pixel_values(config: LRPQConfig, processor: Any, model: nn.Module) -> DrawnPixels:
    """From one seeded draw of ``config.dataset`` / ``config.dataset_split``: the calibration pixels
    (``config.num_calibration_samples`` images); for LRP mixed precision without precomputed scores, the
    importance pixels (the next ``config.num_importance_samples``, or None to score on the calibration images);
    for block reconstruction, the reconstruction pixels (the next ``config.reconstruction_samples``, or None to
    reconstruct on the calibration images)."""
    if config.dataset is None:
        raise ValueError("LRPQConfig.dataset is not set: name the calibration data, e.g. "
                         "LRPQConfig(dataset='fashion_mnist'), a local image folder or a Hub dataset id.")
    n_calibration = config.num_calibration_samples
    n_importance = (config.num_importance_samples or 0) if config.measures_importance else 0
    n_reconstruction = (config.reconstruction_samples or 0) if config.reconstruction is not None else 0
    dataset = load_image_dataset(config.dataset, config.dataset_split,
                                 num_samples=n_calibration + n_importance + n_reconstruction, seed=config.seed)
    images = [row["image"] for row in dataset]
    channels = find_family(model).input_shape(model)[0]

    def pixels(start: int, count: int) -> torch.Tensor | None:
        return images_to_pixel_values(images[start:start + count], processor, channels) if count else None

    return DrawnPixels(pixels(0, n_calibration), pixels(n_calibration, n_importance),
                       pixels(n_calibration + n_importance, n_reconstruction))


def quantize_from_dataset(model: nn.Module, config: LRPQConfig, processor: Any,
                          checkpoint_dir: str | os.PathLike | None = None) -> nn.Module:
    """``quantize`` with the calibration (importance, reconstruction) images that ``config`` names; a block
    reconstruction resumes from ``checkpoint_dir``."""
    drawn = dataset_pixel_values(config, processor, model)
    return quantize(model, config, drawn.calibration, importance_data=drawn.importance,
                    reconstruction_data=drawn.reconstruction, checkpoint_dir=checkpoint_dir)
