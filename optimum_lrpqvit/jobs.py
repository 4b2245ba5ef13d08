"""End-to-end jobs shared by ``from_pretrained``, ``LRPQuantizer`` and the ``lrpqvit`` command line:
load a model, draw its calibration images from a dataset, quantize, evaluate, save with a model card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import find_family
from .config import LRPQConfig
from .data import images_to_pixel_values, load_image_dataset
from .quantize import applied_config, quantize

__all__ = ["dataset_pixel_values", "load_float_model", "quantize_from_dataset", "save_quantized_model"]


def load_float_model(name_or_path: str | os.PathLike, **kwargs: Any) -> tuple[nn.Module, Any]:
    """A float image classifier and its image processor from a Hub id or a local directory (safetensors
    only); timm checkpoints load through ``TimmWrapperForImageClassification``."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(name_or_path, use_safetensors=True, **kwargs).eval()
    find_family(model)  # TypeError naming the supported families before any data is read
    return model, AutoImageProcessor.from_pretrained(name_or_path)


def dataset_pixel_values(
    config: LRPQConfig, processor: Any, model: nn.Module
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Calibration pixels (``config.num_calibration_samples`` images) and, for LRP mixed precision without
    precomputed scores, importance pixels (the next ``config.num_importance_samples`` of the same seeded
    draw, or None to score on the calibration images) from ``config.dataset`` / ``config.dataset_split``."""
    if config.dataset is None:
        raise ValueError("LRPQConfig.dataset is not set: name the calibration data, e.g. "
                         "LRPQConfig(dataset='fashion_mnist'), a local image folder or a Hub dataset id.")
    n_calibration = config.num_calibration_samples
    n_importance = 0
    if config.measures_importance:
        n_importance = config.num_importance_samples or 0
    dataset = load_image_dataset(config.dataset, config.dataset_split, num_samples=n_calibration + n_importance,
                                 seed=config.seed)
    images = [row["image"] for row in dataset]
    channels = find_family(model).input_shape(model)[0]
    calibration = images_to_pixel_values(images[:n_calibration], processor, channels)
    importance = images_to_pixel_values(images[n_calibration:], processor, channels) if n_importance else None
    return calibration, importance


def quantize_from_dataset(model: nn.Module, config: LRPQConfig, processor: Any) -> nn.Module:
    """``quantize`` with the calibration (and importance) images that ``config`` names."""
    calibration, importance = dataset_pixel_values(config, processor, model)
    return quantize(model, config, calibration, importance_data=importance)


def save_quantized_model(
    model: nn.Module,
    directory: str | os.PathLike,
    processor: Any = None,
    *,
    base_model: str | None = None,
    results: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Save a quantized model for the Hub: packed weights and config, the processor, ``importance.png``
    (mixed precision), ``results.json`` and a ``README.md`` model card (see ``model_card``) that calls the
    model ``name`` (default: the directory's name; ``hub.push_directory`` renames it to the repo id)."""
    from .hub import save_quantized
    from .model_card import render_model_card
    from .report import plot_importance

    directory = Path(directory)
    save_quantized(model, directory)
    if processor is not None:
        processor.save_pretrained(directory)
    config = applied_config(model)
    figure = None
    if config.importance_scores is not None:
        layout = find_family(model).layout(model)
        figure = "importance.png"
        plot_importance(config.importance_scores, config.bit_plan, layout.block_of, directory / figure,
                        title=f"{config.importance} importance and bit plan ({config.allocation} rule)")
    if results is not None:
        (directory / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    card = render_model_card(model, base_model=base_model, results=results, figure=figure,
                             name=name or directory.name)
    (directory / "README.md").write_text(card)
    return directory
