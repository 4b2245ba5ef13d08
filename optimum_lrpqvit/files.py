"""Writing files: atomically (an interrupted job never leaves a half-written one), with the permissions the
user's umask asks for, and byte-reproducibly."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "canonical_safetensors", "finish_written_file"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path`` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        finish_written_file(tmp, safetensors=path.suffix == ".safetensors")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def canonical_safetensors(path: str | os.PathLike) -> None:
    """Rewrite the header of the safetensors file ``path`` with its ``__metadata__`` keys sorted.

    safetensors writes the metadata from a hash map, in an order that changes from process to process, so two
    identical saves would differ in their bytes; sorted, they are equal. The header is rewritten in place (same
    length: only the order changes), the tensor data untouched."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
        header = json.loads(raw)
        metadata = header.get("__metadata__")
        if not metadata:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # another writer's escaping; leave the file as it is rather than move the data
            return
        f.seek(8)
        f.write(text + b" " * (length - len(text)))


def finish_written_file(path: str | os.PathLike, safetensors: bool | None = None) -> None:
    """Give a file this library wrote the mode of the user's umask (safetensors creates its files 0600, so other
    users and containers could not read a saved model) and, for safetensors (default: by its suffix), a
    reproducible header."""
    if os.fspath(path).endswith(".safetensors") if safetensors is None else safetensors:
        canonical_safetensors(path)
    os.chmod(path, 0o666 & ~_umask())
