"""Turning user calibration / importance data into one validated pixel tensor."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["as_pixel_values"]


def _batches(data: object) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, Mapping):
        return _batches(data.get("pixel_values"))
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        out = []
        for item in data:
            if isinstance(item, Mapping):
                if "pixel_values" not in item:
                    raise ValueError(f"A calibration item has keys {sorted(item)} but no 'pixel_values'.")
                item = item["pixel_values"]
            if not isinstance(item, torch.Tensor):
                raise TypeError(f"Calibration items must be tensors or dicts with 'pixel_values', got "
                                f"{type(item).__name__}.")
            out.append(item.unsqueeze(0) if item.dim() == 3 else item)
        return out
    raise TypeError("Calibration data must be a float tensor (N, C, H, W), or an iterable of such tensors or of "
                    f"dicts holding 'pixel_values'; got {type(data).__name__}.")


def as_pixel_values(
    data: object, channels: int | None = None, height: int | None = None, width: int | None = None
) -> torch.Tensor:
    """Concatenate ``data`` into one float tensor (N, C, H, W) and check it.

    ValueError for empty data, a wrong number of dims, channels or size, and NaN or inf values.
    """
    batches = _batches(data)
    if not batches or all(b.numel() == 0 for b in batches):
        raise ValueError("Calibration data is empty: pass at least one image (the default is 32).")
    for b in batches:
        if b.dim() != 4:
            raise ValueError(f"Calibration images must be (N, C, H, W) tensors, got shape {tuple(b.shape)}.")
        if not b.is_floating_point():
            raise ValueError(f"Calibration pixel values must be float (preprocessed), got {b.dtype}.")
    shapes = {tuple(b.shape[1:]) for b in batches}
    if len(shapes) > 1:
        raise ValueError(f"Calibration batches have different image shapes: {sorted(shapes)}.")
    x = torch.cat(batches) if len(batches) > 1 else batches[0]
    c, h, w = x.shape[1:]
    if channels is not None and c != channels:
        raise ValueError(f"The model expects {channels} input channels but the calibration images have {c} "
                         "(grayscale vs RGB?). Preprocess them with the model's image processor.")
    if (height is not None and h != height) or (width is not None and w != width):
        raise ValueError(f"The model expects {height}x{width} images but the calibration images are {h}x{w}. "
                         "Preprocess them with the model's image processor.")
    if torch.isnan(x).any():
        raise ValueError("Calibration data contains NaN values.")
    if torch.isinf(x).any():
        raise ValueError("Calibration data contains inf values.")
    return x
