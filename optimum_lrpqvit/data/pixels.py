"""PIL images to the model's pixel values, through its image processor.

:func:`load_image_processor` reads a model's processor, :func:`images_to_pixel_values` converts grayscale images
to RGB when the processor asks for it and checks the channel count and finiteness of the result;
:func:`preprocess` runs a ``datasets.Dataset`` through it in batches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets
    import torch

__all__ = ["images_to_pixel_values", "load_image_processor", "preprocess"]

PROCESSOR_FILE = "preprocessor_config.json"


def load_image_processor(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """``AutoImageProcessor.from_pretrained(name_or_path, **kwargs)``, reading ``preprocessor_config.json`` of a
    local directory that has one. (For a local timm checkpoint, transformers ≥ 5.25 reads the processor from
    ``config.json`` even when ``preprocessor_config.json`` is there, which a Hub repo of the same files does not.)"""
    from transformers import AutoImageProcessor

    local = os.path.join(name_or_path, kwargs.get("subfolder", ""), PROCESSOR_FILE)
    if os.path.isfile(local):
        kwargs.setdefault("image_processor_filename", PROCESSOR_FILE)
    return AutoImageProcessor.from_pretrained(name_or_path, **kwargs)


def preprocess(
    dataset: datasets.Dataset,
    processor: object,
    indices: Sequence[int] | None = None,
    batch_size: int = 1000,
    image_column: str = "image",
    label_column: str | None = "label",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pixel values ``(N, C, H, W)`` of ``dataset`` (rows ``indices``, default all) through the model's image
    processor, and the labels (None without ``label_column``). Images are converted to RGB first when the
    processor asks for it (``do_convert_rgb``), so grayscale datasets feed RGB models."""
    import torch
    from tqdm.auto import tqdm

    rows = dataset if indices is None else dataset.select(list(indices))
    pixels, labels = [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="preprocessing", disable=not progress, leave=False):
        batch = rows[start:start + batch_size]
        pixels.append(images_to_pixel_values(batch[image_column], processor))
        if label_column is not None:
            labels.append(torch.as_tensor(batch[label_column]))
    return torch.cat(pixels), (torch.cat(labels) if label_column is not None else None)


def images_to_pixel_values(images: list, processor: object, num_channels: int | None = None) -> torch.Tensor:
    """Pixel values ``(N, C, H, W)`` of the PIL ``images`` through the model's image ``processor``.

    Images are converted to RGB first when the processor asks for it (``do_convert_rgb``) or is a
    ``TimmWrapperImageProcessor``. ``num_channels`` is the channel count the model expects (``None``: not checked).

    Raises:
        ValueError: no images; the pixel values do not have ``num_channels`` channels (or the processor failed
            on images that do not), with the fix; the pixel values are not all finite.
    """
    import torch

    if not images:
        raise ValueError("images_to_pixel_values() got no images")
    if getattr(processor, "do_convert_rgb", False) or type(processor).__name__.startswith("TimmWrapper"):
        images = [image.convert("RGB") for image in images]
    image_channels = sorted({len(image.getbands()) for image in images})
    try:
        pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    except (RuntimeError, ValueError) as error:
        if num_channels is None or image_channels == [num_channels]:
            raise
        raise ValueError(_channel_mismatch(
            f"{type(processor).__name__} failed ({error}) on images with {'/'.join(map(str, image_channels))} "
            f"channels", num_channels
        )) from error
    if num_channels is not None and pixel_values.shape[1] != num_channels:
        raise ValueError(_channel_mismatch(
            f"{type(processor).__name__} produced pixel values with {pixel_values.shape[1]} channels", num_channels
        ))
    if not torch.isfinite(pixel_values).all():
        raise ValueError(
            f"{type(processor).__name__} produced NaN or infinite pixel values; check its image_std "
            f"({getattr(processor, 'image_std', None)}) for zeros and its rescale/normalize settings"
        )
    return pixel_values


def _channel_mismatch(problem: str, num_channels: int) -> str:
    fix = (
        "set processor.do_convert_rgb = True so that grayscale images are converted to RGB"
        if num_channels == 3
        else f"convert the images to a {num_channels}-channel mode before preprocessing"
    )
    return f"{problem}, but the model expects {num_channels} channels: {fix}"
