"""A content digest of tensors, stored with checkpoints to detect corruption and to identify a model."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

__all__ = ["content_digest"]


def content_digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 over every tensor's dtype, shape and bytes, independent of names and order."""
    parts = []
    for tensor in tensors:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(data)
        parts.append(h.hexdigest())
    return hashlib.sha256("".join(sorted(parts)).encode()).hexdigest()
