"""Fashion-MNIST from the local IDX files (Debian package ``dataset-fashion-mnist``).

Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
Algorithms", arXiv 1708.07747. The four ``*-idx?-ubyte.gz`` files are parsed with numpy (magic number,
dimensions and payload size are validated) and turned into a :class:`datasets.DatasetDict` whose
``image`` column holds grayscale (``"L"``) PIL images and whose ``label`` column is a ``ClassLabel``.
The encoded dataset is cached with ``save_to_disk`` and memory-mapped by later calls.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_LABELS",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "load_fashion_mnist",
    "load_fashion_mnist_arrays",
    "read_idx",
]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_LABELS: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# Pixel statistics of the 60,000 training images, pixels scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

# split -> (images file, labels file, number of examples)
_FILES: dict[str, tuple[str, str, int]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
_IMAGE_SIZE = 28
_UBYTE = 0x08  # IDX type code of unsigned bytes, the only one Fashion-MNIST uses
_CACHE_VERSION = 1

logger = logging.getLogger(__name__)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a (gzip-compressed or plain) IDX file of unsigned bytes into a numpy array.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid IDX (bad magic, unsupported type, truncated or oversized
            payload, broken gzip stream); the message names the file.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: cannot decompress IDX file ({error})") from error

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != _UBYTE:
        raise ValueError(f"{path}: unsupported IDX element type 0x{raw[2]:02x} (expected 0x08, ubyte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX payload has {len(raw) - header} bytes, the header (shape {shape}) "
            f"announces {expected - header}; the file is truncated or corrupted"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _split_files(root: Path, split: str) -> tuple[Path, Path, int]:
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_FILES)}")
    images_name, labels_name, count = _FILES[split]
    images, labels = root / images_name, root / labels_name
    missing = [str(p) for p in (images, labels) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
            f"`apt-get install dataset-fashion-mnist` or pass root= the directory holding the IDX files."
        )
    return images, labels, count


def load_fashion_mnist_arrays(
    split: str = "train", root: str | os.PathLike = DEFAULT_FASHION_MNIST_ROOT
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)`` of one split as read-only numpy arrays.

    ``images`` is ``uint8`` of shape ``(n, 28, 28)``, ``labels`` is ``int64`` of shape ``(n,)``.
    """
    images_path, labels_path, count = _split_files(Path(root), split)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.shape != (count, _IMAGE_SIZE, _IMAGE_SIZE):
        raise ValueError(
            f"{images_path}: expected images of shape {(count, _IMAGE_SIZE, _IMAGE_SIZE)}, got {images.shape}"
        )
    if labels.shape != (count,):
        raise ValueError(f"{labels_path}: expected {count} labels, got shape {labels.shape}")
    if labels.max(initial=0) >= len(FASHION_MNIST_LABELS):
        raise ValueError(f"{labels_path}: label {int(labels.max())} out of range 0..{len(FASHION_MNIST_LABELS) - 1}")
    labels = labels.astype(np.int64)
    labels.flags.writeable = False
    return images, labels


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_bytes(images: np.ndarray) -> list[bytes]:
    """Encode ``(n, h, w)`` uint8 images as 8-bit grayscale PNGs (written directly: ~5x faster than PIL)."""
    n, height, width = images.shape
    header = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    trailer = _png_chunk(b"IEND", b"")
    scanlines = np.zeros((n, height, width + 1), dtype=np.uint8)  # filter byte 0 ("None") per row
    scanlines[:, :, 1:] = images
    return [header + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + trailer for rows in scanlines]


def _cache_path(root: Path, cache_dir: str | os.PathLike | None) -> Path:
    from datasets import config

    key = hashlib.sha256(str(root.resolve()).encode())
    for split in _FILES:
        for name in _FILES[split][:2]:
            stat = (root / name).stat()
            key.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    base = Path(cache_dir) if cache_dir is not None else Path(config.HF_DATASETS_CACHE) / "optimum_lrpqvit"
    return base / f"fashion_mnist-v{_CACHE_VERSION}-{key.hexdigest()[:16]}"


def load_fashion_mnist(
    root: str | os.PathLike = DEFAULT_FASHION_MNIST_ROOT,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> datasets.DatasetDict:
    """Load Fashion-MNIST as a ``datasets.DatasetDict`` with ``"train"`` (60,000) and ``"test"`` (10,000).

    Columns: ``image`` (``datasets.Image``, decodes to a grayscale ``"L"`` PIL image of 28×28) and
    ``label`` (``datasets.ClassLabel`` named by :data:`FASHION_MNIST_LABELS`).

    The first call parses the IDX files and encodes the images as PNG (a few seconds); the result is
    saved under ``cache_dir`` (defaults to ``$HF_DATASETS_CACHE/optimum_lrpqvit``), keyed by the path,
    size and modification time of the four files, and later calls memory-map it.

    Args:
        root: directory holding the four ``*-ubyte.gz`` files (the Debian package's location by default).
        cache_dir: where to keep the encoded dataset; ``None`` for the ``datasets`` cache.
        use_cache: read and write the cache; ``False`` always rebuilds in memory.

    Raises:
        FileNotFoundError: the files are missing (install ``dataset-fashion-mnist`` or pass ``root``).
        ValueError: a file is corrupted or truncated; the message names it.
    """
    import pyarrow as pa
    from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Image, load_from_disk
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    root = Path(root)
    for split in _FILES:
        _split_files(root, split)  # FileNotFoundError before anything else
    cache = _cache_path(root, cache_dir) if use_cache else None
    if cache is not None and cache.is_dir():
        try:
            return load_from_disk(str(cache))
        except (OSError, ValueError, FileNotFoundError) as error:
            logger.warning("rebuilding unreadable Fashion-MNIST cache %s: %s", cache, error)
            shutil.rmtree(cache, ignore_errors=True)

    features = Features({"image": Image(mode="L"), "label": ClassLabel(names=FASHION_MNIST_LABELS)})
    splits = {}
    for split in _FILES:
        images, labels = load_fashion_mnist_arrays(split, root)
        image_column = pa.StructArray.from_arrays(
            [pa.array(_png_bytes(images), type=pa.binary()), pa.nulls(len(images), type=pa.string())],
            names=["bytes", "path"],
        )
        table = pa.Table.from_arrays(
            [image_column, pa.array(labels, type=pa.int64())], names=["image", "label"]
        ).cast(features.arrow_schema)
        splits[split] = Dataset(table, info=DatasetInfo(features=features), split=split)
    dataset = DatasetDict(splits)

    if cache is not None:
        tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
        bars_were_disabled = are_progress_bars_disabled()
        disable_progress_bars()
        try:
            dataset.save_to_disk(str(tmp))
            tmp.rename(cache)  # atomic; fails harmlessly if another process got there first
        except OSError as error:
            logger.warning("could not cache Fashion-MNIST at %s: %s", cache, error)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if not bars_were_disabled:
                enable_progress_bars()
    return dataset
