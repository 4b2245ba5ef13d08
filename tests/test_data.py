"""Tests of :mod:`optimum_lrpqvit.data.fashion_mnist` (Fashion-MNIST from Debian's ``dataset-fashion-mnist`` IDX files).

The real dataset is parsed and encoded once per module (``real`` fixture, a private ``cache_dir``);
the cache behaviour is exercised on tiny synthetic IDX files (the split sizes in ``fashion_mnist._FILES`` are
monkeypatched down) so that no test rebuilds the 70,000 images a second time. Nothing touches the
user's ``datasets`` cache: every ``load_fashion_mnist`` call passes ``cache_dir`` or ``use_cache=False``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from optimum_lrpqvit.data import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_LABELS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fashion_mnist,
    load_fashion_mnist,
    load_fashion_mnist_arrays,
    read_idx,
)

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
ALL_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
INSTALL_HINT = "apt-get install dataset-fashion-mnist"


# --------------------------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, *, type_code: int = 0x08) -> bytes:
    """Serialize a uint8 array as an (uncompressed) IDX file."""
    array = np.asarray(array, dtype=np.uint8)
    return bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_gz(path: Path, array: np.ndarray) -> Path:
    path.write_bytes(gzip.compress(idx_bytes(array), compresslevel=1))
    return path


def real_root() -> Path:
    root = Path(DEFAULT_FASHION_MNIST_ROOT)
    missing = [name for name in ALL_FILES if not (root / name).is_file()]
    if missing:
        pytest.fail(
            f"Fashion-MNIST IDX files missing from {root}: {', '.join(missing)}. These tests need the Debian "
            f"package: `sudo {INSTALL_HINT}`.",
            pytrace=False,
        )
    return root


def label_column(ds) -> np.ndarray:
    """The whole ``label`` column as a numpy array (without decoding any image)."""
    return np.asarray(ds.with_format("numpy", columns=["label"])[:]["label"])


def cache_entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def forbid_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any (re)parse of the IDX files fail, so a successful load proves a cache hit."""

    def boom(*args, **kwargs):
        raise AssertionError("load_fashion_mnist re-parsed the IDX files instead of using its cache")

    monkeypatch.setattr(fashion_mnist, "load_fashion_mnist_arrays", boom)


# -------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real dataset, built once into a private cache directory: ``(DatasetDict, cache_dir)``."""
    root = real_root()
    cache_dir = tmp_path_factory.mktemp("fashion_mnist_cache")
    dataset = load_fashion_mnist(root, cache_dir=cache_dir)
    return dataset, cache_dir


@pytest.fixture(scope="module")
def real_arrays():
    root = real_root()
    return {split: load_fashion_mnist_arrays(split, root) for split in ("train", "test")}


@pytest.fixture(scope="module")
def t10k_raw():
    """Decompressed bytes of the real test-split files, to corrupt copies of."""
    root = real_root()
    return {name: gzip.decompress((root / name).read_bytes()) for name in (TEST_IMAGES, TEST_LABELS)}


@pytest.fixture
def t10k_copy(tmp_path):
    """A directory holding copies of the real test-split files."""
    src = real_root()
    root = tmp_path / "fmnist"
    root.mkdir()
    for name in (TEST_IMAGES, TEST_LABELS):
        shutil.copyfile(src / name, root / name)
    return root


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """Four small synthetic IDX files (train 24, test 8 examples) with the split sizes patched to match."""
    sizes = {"train": 24, "test": 8}
    monkeypatch.setattr(
        fashion_mnist,
        "_FILES",
        {
            "train": (TRAIN_IMAGES, TRAIN_LABELS, sizes["train"]),
            "test": (TEST_IMAGES, TEST_LABELS, sizes["test"]),
        },
    )
    rng = np.random.default_rng(1234)
    root = tmp_path / "tiny"
    root.mkdir()
    arrays = {}
    for split, (images_name, labels_name) in {"train": (TRAIN_IMAGES, TRAIN_LABELS), "test": (TEST_IMAGES, TEST_LABELS)}.items():
        n = sizes[split]
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx_gz(root / images_name, images)
        write_idx_gz(root / labels_name, labels)
        arrays[split] = (images, labels)
    return root, arrays


# ------------------------------------------------------------------------------------------ real data


def test_real_dataset_splits_rows_and_features(real):
    from datasets import ClassLabel, DatasetDict, Image

    dataset, _ = real
    assert isinstance(dataset, DatasetDict)
    assert sorted(dataset) == ["test", "train"]
    assert dataset["train"].num_rows == 60_000
    assert dataset["test"].num_rows == 10_000
    for split in ("train", "test"):
        ds = dataset[split]
        assert ds.column_names == ["image", "label"]
        assert isinstance(ds.features["image"], Image)
        assert ds.features["image"].mode == "L"
        label = ds.features["label"]
        assert isinstance(label, ClassLabel)
        assert label.num_classes == 10
        assert label.names == FASHION_MNIST_LABELS
    assert len(FASHION_MNIST_LABELS) == 10 == len(set(FASHION_MNIST_LABELS))
    assert FASHION_MNIST_LABELS[0] == "T-shirt/top" and FASHION_MNIST_LABELS[9] == "Ankle boot"


@pytest.mark.parametrize("split,index", [("train", 0), ("train", 31_337), ("train", 59_999), ("test", 0), ("test", 9_999)])
def test_real_images_decode_to_grayscale_28x28(real, split, index):
    from PIL import Image as PILImage

    image = real[0][split][index]["image"]
    assert isinstance(image, PILImage.Image)
    assert image.mode == "L"
    assert image.size == (28, 28)


def test_real_labels_in_range_and_every_class_present(real):
    dataset, _ = real
    for split, per_class in (("train", 6_000), ("test", 1_000)):
        labels = label_column(dataset[split])
        assert labels.shape == (dataset[split].num_rows,)
        assert labels.min() >= 0 and labels.max() <= 9
        # Fashion-MNIST is exactly balanced: every class present, 6,000 / 1,000 times.
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)


def test_real_arrays_shapes_and_dtypes(real_arrays):
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = real_arrays[split]
        assert isinstance(images, np.ndarray) and isinstance(labels, np.ndarray)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert labels.min() >= 0 and labels.max() < len(FASHION_MNIST_LABELS)
        assert not images.flags.writeable  # documented as read-only
        assert images.max() > 0 and images.min() == 0  # not an all-zero / constant payload


def test_real_arrays_labels_are_read_only(real_arrays):
    assert not real_arrays["test"][1].flags.writeable


def test_real_arrays_match_dataset_pixel_for_pixel(real, real_arrays):
    dataset, _ = real
    for split, indices in (("train", [0, 1, 7, 12_345, 59_999]), ("test", [0, 42, 5_000, 9_999])):
        images, labels = real_arrays[split]
        rows = dataset[split].select(indices)
        for row, index in zip(rows, indices):
            decoded = np.asarray(row["image"])
            assert decoded.dtype == np.uint8 and decoded.shape == (28, 28)
            np.testing.assert_array_equal(decoded, images[index], err_msg=f"{split}[{index}]")
            assert row["label"] == labels[index]
        np.testing.assert_array_equal(label_column(dataset[split]), labels)
    # Sanity: distinct examples really differ (a broken encoder returning one image would pass above
    # only if the arrays were also broken).
    assert not np.array_equal(real_arrays["train"][0][0], real_arrays["train"][0][1])


def test_real_arrays_match_documented_pixel_statistics(real_arrays):
    images = real_arrays["train"][0]
    counts = np.bincount(images.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
    assert mean == pytest.approx(FASHION_MNIST_MEAN, abs=1e-4)
    assert std == pytest.approx(FASHION_MNIST_STD, abs=1e-4)


def test_real_cache_is_reused(real, monkeypatch):
    built, cache_dir = real
    entries = cache_entries(cache_dir)
    assert len(entries) == 1 and entries[0].startswith("fashion_mnist-v"), entries  # no leftover .tmp-*
    forbid_parsing(monkeypatch)  # the second call must not parse / re-encode anything
    first = load_fashion_mnist(real_root(), cache_dir=cache_dir)
    second = load_fashion_mnist(real_root(), cache_dir=cache_dir)
    assert cache_entries(cache_dir) == entries
    for split in ("train", "test"):
        assert first[split].num_rows == built[split].num_rows
        assert first[split].features == built[split].features
        # memory-mapped from the cache entry, and the same dataset state both times
        files = [f["filename"] for f in first[split].cache_files]
        assert files and all(Path(f).is_relative_to(cache_dir / entries[0]) for f in files)
        assert first[split]._fingerprint == second[split]._fingerprint
    np.testing.assert_array_equal(np.asarray(first["test"][123]["image"]), np.asarray(built["test"][123]["image"]))


# ---------------------------------------------------------------------------------------- error cases


@pytest.mark.parametrize("loader", ["dataset", "arrays"])
def test_missing_directory_raises_with_install_hint(tmp_path, loader):
    root = tmp_path / "does-not-exist"
    cache_dir = tmp_path / "cache"
    with pytest.raises(FileNotFoundError) as excinfo:
        if loader == "dataset":
            load_fashion_mnist(root, cache_dir=cache_dir)
        else:
            load_fashion_mnist_arrays("train", root)
    message = str(excinfo.value)
    assert INSTALL_HINT in message
    assert str(root / TRAIN_IMAGES) in message
    assert not cache_dir.exists()


def test_partially_missing_files_name_the_missing_ones(t10k_copy, tmp_path):
    # Only the test split is there: arrays of "test" load, the full dataset does not.
    images, labels = load_fashion_mnist_arrays("test", t10k_copy)
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)
    with pytest.raises(FileNotFoundError) as excinfo:
        load_fashion_mnist(t10k_copy, cache_dir=tmp_path / "cache")
    message = str(excinfo.value)
    assert str(t10k_copy / TRAIN_IMAGES) in message and str(t10k_copy / TRAIN_LABELS) in message
    assert TEST_IMAGES not in message
    assert INSTALL_HINT in message


def test_unknown_split_raises_value_error(t10k_copy):
    with pytest.raises(ValueError, match="validation"):
        load_fashion_mnist_arrays("validation", t10k_copy)


def test_copies_load_identically_and_plain_idx_is_accepted(t10k_copy, t10k_raw, real_arrays):
    images, labels = load_fashion_mnist_arrays("test", t10k_copy)
    np.testing.assert_array_equal(images, real_arrays["test"][0])
    np.testing.assert_array_equal(labels, real_arrays["test"][1])
    plain = t10k_copy / "labels.idx"  # uncompressed IDX
    plain.write_bytes(t10k_raw[TEST_LABELS])
    np.testing.assert_array_equal(read_idx(plain), real_arrays["test"][1])


def _truncate_payload(raw: bytes) -> bytes:
    return raw[:-100]


def _oversize_payload(raw: bytes) -> bytes:
    return raw + b"\x00" * 28


def _bad_magic(raw: bytes) -> bytes:
    return b"\x08\x03\x00\x00" + raw[4:]


def _wrong_type_code(raw: bytes) -> bytes:
    return raw[:2] + b"\x0d" + raw[3:]  # 0x0D = float


def _wrong_image_shape(raw: bytes) -> bytes:
    # a valid IDX file of shape (10000, 28, 27): consistent header and payload, wrong geometry
    return idx_bytes(np.frombuffer(raw, dtype=np.uint8, offset=16)[: 10_000 * 28 * 27].reshape(10_000, 28, 27))


def _labels_as_images(raw: bytes) -> bytes:
    return idx_bytes(np.zeros(10_000, dtype=np.uint8))


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (_truncate_payload, "truncated or corrupted"),
        (_oversize_payload, "truncated or corrupted"),
        (_bad_magic, "bad magic"),
        (_wrong_type_code, "element type"),
        (_wrong_image_shape, "expected images of shape"),
        (_labels_as_images, "expected images of shape"),
    ],
    ids=["truncated", "oversized", "bad-magic", "float-type", "28x27", "1-d"],
)
def test_corrupted_images_file_raises_value_error_naming_it(t10k_copy, t10k_raw, corrupt, match):
    path = t10k_copy / TEST_IMAGES
    path.write_bytes(gzip.compress(corrupt(t10k_raw[TEST_IMAGES]), compresslevel=0))  # level 0: fast
    with pytest.raises(ValueError, match=match) as excinfo:
        load_fashion_mnist_arrays("test", t10k_copy)
    assert str(path) in str(excinfo.value)


def test_truncated_gzip_stream_raises_value_error_naming_it(t10k_copy):
    path = t10k_copy / TEST_IMAGES
    compressed = path.read_bytes()
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match="decompress") as excinfo:
        load_fashion_mnist_arrays("test", t10k_copy)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not an IDX file, just some text\n", b"\x1f\x8b" + b"definitely not deflate data" * 4, b"\x00\x00"],
    ids=["empty", "text", "fake-gzip-header", "two-bytes"],
)
@pytest.mark.parametrize("name", [TEST_IMAGES, TEST_LABELS])
def test_garbage_file_raises_value_error_naming_it(t10k_copy, name, content):
    path = t10k_copy / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as excinfo:
        load_fashion_mnist_arrays("test", t10k_copy)
    assert str(path) in str(excinfo.value)
    with pytest.raises(ValueError) as excinfo:
        read_idx(path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize("count", [9_999, 10_001])
def test_label_count_mismatch_raises_value_error_naming_labels_file(t10k_copy, t10k_raw, count):
    labels = np.frombuffer(t10k_raw[TEST_LABELS], dtype=np.uint8, offset=8)
    labels = np.resize(labels, count)  # a *valid* IDX file, just with the wrong number of labels
    path = write_idx_gz(t10k_copy / TEST_LABELS, labels)
    with pytest.raises(ValueError, match="expected 10000 labels") as excinfo:
        load_fashion_mnist_arrays("test", t10k_copy)
    assert str(path) in str(excinfo.value)
    assert str(t10k_copy / TEST_IMAGES) not in str(excinfo.value)


def test_header_count_disagreeing_with_payload_raises(t10k_copy, t10k_raw):
    raw = bytearray(t10k_raw[TEST_LABELS])
    raw[4:8] = struct.pack(">I", 9_999)  # header says 9,999, payload holds 10,000
    path = t10k_copy / TEST_LABELS
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ValueError, match="truncated or corrupted") as excinfo:
        load_fashion_mnist_arrays("test", t10k_copy)
    assert str(path) in str(excinfo.value)


def test_out_of_range_label_raises_value_error(t10k_copy, t10k_raw):
    labels = np.frombuffer(t10k_raw[TEST_LABELS], dtype=np.uint8, offset=8).copy()
    labels[1234] = 10
    path = write_idx_gz(t10k_copy / TEST_LABELS, labels)
    with pytest.raises(ValueError, match="out of range") as excinfo:
        load_fashion_mnist_arrays("test", t10k_copy)
    assert str(path) in str(excinfo.value)


def test_load_dataset_propagates_corruption_and_leaves_no_cache(tmp_path):
    src = real_root()
    root = tmp_path / "fmnist"
    root.mkdir()
    for name in (TRAIN_LABELS, TEST_IMAGES, TEST_LABELS):
        os.symlink(src / name, root / name)
    bad = root / TRAIN_IMAGES
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    cache_dir = tmp_path / "cache"
    with pytest.raises(ValueError) as excinfo:
        load_fashion_mnist(root, cache_dir=cache_dir)
    assert str(bad) in str(excinfo.value)
    assert cache_entries(cache_dir) == []


# -------------------------------------------------------------------------- caching (synthetic files)


def _assert_matches(dataset, arrays):
    for split, (images, labels) in arrays.items():
        assert dataset[split].num_rows == len(labels)
        np.testing.assert_array_equal(label_column(dataset[split]), labels)
        for i in (0, len(labels) - 1):
            np.testing.assert_array_equal(np.asarray(dataset[split][i]["image"]), images[i])


def test_tiny_dataset_round_trips(tiny, tmp_path):
    root, arrays = tiny
    _assert_matches(load_fashion_mnist(root, use_cache=False), arrays)
    _assert_matches(load_fashion_mnist(root, cache_dir=tmp_path / "cache"), arrays)


def test_cache_is_reused_then_invalidated_when_a_file_changes(tiny, tmp_path, monkeypatch):
    root, arrays = tiny
    cache_dir = tmp_path / "nested" / "cache"  # does not exist yet: must be created
    _assert_matches(load_fashion_mnist(root, cache_dir=cache_dir), arrays)
    (entry,) = cache_entries(cache_dir)

    with monkeypatch.context() as patch:
        forbid_parsing(patch)
        cached = load_fashion_mnist(root, cache_dir=cache_dir)
        again = load_fashion_mnist(root, cache_dir=cache_dir)
    _assert_matches(cached, arrays)
    assert cached["train"]._fingerprint == again["train"]._fingerprint
    assert cache_entries(cache_dir) == [entry]

    # Change the test labels (same size): the old entry must not be served.
    images, labels = arrays["test"]
    new_labels = (labels + 3) % 10
    path = write_idx_gz(root / TEST_LABELS, new_labels)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # robust to coarse mtimes
    changed = load_fashion_mnist(root, cache_dir=cache_dir)
    _assert_matches(changed, {"train": arrays["train"], "test": (images, new_labels)})
    entries = cache_entries(cache_dir)
    assert len(entries) == 2 and entry in entries

    with monkeypatch.context() as patch:  # and the new entry is reused in turn
        forbid_parsing(patch)
        _assert_matches(load_fashion_mnist(root, cache_dir=cache_dir), {"train": arrays["train"], "test": (images, new_labels)})


def test_cache_is_keyed_by_directory(tiny, tmp_path):
    root, arrays = tiny
    cache_dir = tmp_path / "cache"
    other = tmp_path / "other"
    shutil.copytree(root, other, copy_function=shutil.copy2)  # same names, sizes and mtimes
    load_fashion_mnist(root, cache_dir=cache_dir)
    load_fashion_mnist(other, cache_dir=cache_dir)
    assert len(cache_entries(cache_dir)) == 2


def test_use_cache_false_writes_nothing(tiny, tmp_path):
    root, arrays = tiny
    cache_dir = tmp_path / "cache"
    _assert_matches(load_fashion_mnist(root, cache_dir=cache_dir, use_cache=False), arrays)
    assert cache_entries(cache_dir) == []


def test_unreadable_cache_falls_back_to_rebuilding(tiny, tmp_path):
    root, arrays = tiny
    cache_dir = tmp_path / "cache"
    load_fashion_mnist(root, cache_dir=cache_dir)
    (entry,) = cache_entries(cache_dir)
    (cache_dir / entry / "train" / "state.json").unlink()
    _assert_matches(load_fashion_mnist(root, cache_dir=cache_dir), arrays)
    assert [e for e in cache_entries(cache_dir) if ".tmp-" in e] == []


def test_unreadable_cache_is_repaired(tiny, tmp_path, monkeypatch):
    root, arrays = tiny
    cache_dir = tmp_path / "cache"
    load_fashion_mnist(root, cache_dir=cache_dir)
    (entry,) = cache_entries(cache_dir)
    (cache_dir / entry / "train" / "state.json").unlink()
    load_fashion_mnist(root, cache_dir=cache_dir)  # rebuilds; should also rewrite the entry
    forbid_parsing(monkeypatch)
    _assert_matches(load_fashion_mnist(root, cache_dir=cache_dir), arrays)
