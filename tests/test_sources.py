"""Tests of the image sources of :mod:`optimum_lrpqvit.data`: :func:`load_image_dataset`,
:func:`prepare_image_dataset` and :func:`images_to_pixel_values`.

Every source is a small local one (bundled Fashion-MNIST, an image folder, ``save_to_disk`` datasets, a
parquet file streamed, a directory standing in for a Hub repo); nothing reaches the network. The
``datasets`` cache is redirected to a temporary directory for the whole module.
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, IterableDataset, List, Value
from PIL import Image as PILImage

from optimum_lrpqvit.data import (
    images_to_pixel_values,
    load_fashion_mnist,
    load_fashion_mnist_arrays,
    load_image_dataset,
    prepare_image_dataset,
    preprocess,
)

REFERENCE_MODEL = Path(__file__).resolve().parents[1] / "reference_models" / "vit-fashion-mnist"
HUB_ID = "tester/fashion-sample"  # served from a local directory by the `hub` fixture


# --------------------------------------------------------------------------------------------- helpers


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels_of(dataset) -> list[np.ndarray]:
    return [np.asarray(example["image"]) for example in dataset]


def write_parquet(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Encoded images as ``{"bytes", "path"}`` structs (no ``datasets`` metadata), int labels and a text column."""
    encoded = pa.array(
        [{"bytes": png_bytes(pixels), "path": None} for pixels in images],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"png": encoded, "label": pa.array(labels, pa.int64()), "note": ["x"] * len(labels)})
    pq.write_table(table, path)
    return path


def stream_parquet(path: Path) -> IterableDataset:
    return datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)


# -------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def datasets_settings(tmp_path_factory):
    """Keep every ``datasets`` cache write (Fashion-MNIST, image folders) out of the user's cache, and shorten the
    5 s pause ``datasets`` makes after each shuffled pass over parquet files (a workaround for pyarrow threads
    crashing at shutdown, apache/arrow#45214, for which 0.1 s suffices) so that the streaming tests stay fast."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))
        patch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.1)
        yield


@pytest.fixture(scope="module")
def fashion_test():
    """The first 40 Fashion-MNIST test images and labels as numpy arrays."""
    images, labels = load_fashion_mnist_arrays("test")
    return images[:40], labels[:40]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, fashion_test):
    """Two class subfolders of PNGs: ``coat`` (3 coats) and ``sneaker`` (4 sneakers); returns (root, pixels by class)."""
    images, labels = fashion_test
    root = tmp_path_factory.mktemp("image_folder")
    by_class = {"coat": images[labels == 4][:3], "sneaker": images[labels == 7][:4]}
    for name, pixels in by_class.items():
        (root / name).mkdir()
        for i, image in enumerate(pixels):
            (root / name / f"{i}.png").write_bytes(png_bytes(image))
    return root, by_class


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory, fashion_test):
    images, labels = fashion_test
    return write_parquet(tmp_path_factory.mktemp("parquet") / "train.parquet", images[:30], labels[:30])


@pytest.fixture
def hub(tmp_path, monkeypatch, parquet_file):
    """``datasets.load_dataset`` answers HUB_ID from a local repo directory (parquet + README split metadata, the
    layout of a Hub dataset repo); returns the list of (path, kwargs) it was called with."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train-00000-of-00001.parquet").write_bytes(parquet_file.read_bytes())
    (repo / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: png\n    dtype: image\n  - name: label\n    dtype: int64\n"
        "  - name: note\n    dtype: string\n  splits:\n  - name: train\n    num_bytes: 1\n    num_examples: 30\n---\n"
    )
    calls = []
    real_load_dataset = datasets.load_dataset

    def load_dataset(path, *args, **kwargs):
        assert path == HUB_ID, path
        calls.append((path, kwargs))
        return real_load_dataset(str(repo), *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(REFERENCE_MODEL)


# ------------------------------------------------------------------------------------ bundled Fashion-MNIST


def test_fashion_mnist_sample_is_seeded_and_matches_randperm():
    first = load_image_dataset("fashion_mnist", "test", num_samples=20, seed=3)
    again = load_image_dataset("fashion_mnist", "test", num_samples=20, seed=3)
    other = load_image_dataset("fashion_mnist", "test", num_samples=20, seed=4)
    assert isinstance(first, Dataset) and first.column_names == ["image", "label"] and first.num_rows == 20
    assert isinstance(first.features["label"], ClassLabel)
    image = first[0]["image"]
    assert isinstance(image, PILImage.Image) and image.mode == "L" and image.size == (28, 28)
    np.testing.assert_array_equal(pixels_of(first), pixels_of(again))
    assert first["label"] == again["label"]
    assert first["label"] != other["label"] or not np.array_equal(pixels_of(first), pixels_of(other))
    # the selection of the examples and benchmarks: torch.randperm with the seed, first num_samples
    indices = torch.randperm(10_000, generator=torch.Generator().manual_seed(3))[:20].tolist()
    assert first["label"] == load_fashion_mnist()["test"].select(indices)["label"]


def test_fashion_mnist_whole_split_and_streaming():
    assert load_image_dataset("fashion_mnist", "test").num_rows == 10_000
    streamed = load_image_dataset("fashion_mnist", "test", num_samples=3, streaming=True)
    assert isinstance(streamed, IterableDataset)
    rows = list(streamed)
    assert len(rows) == 3 and set(rows[0]) == {"image", "label"}


@pytest.mark.parametrize("num_samples,match", [(0, "at least 1"), (-2, "at least 1"), (10_001, "only 10000 rows")])
def test_num_samples_out_of_range(num_samples, match):
    with pytest.raises(ValueError, match=match):
        load_image_dataset("fashion_mnist", "test", num_samples=num_samples)


def test_missing_split_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', 'train'\]"):
        load_image_dataset("fashion_mnist", "validation")


# ---------------------------------------------------------------------------------------------- local paths


def test_image_folder_gives_labels_from_class_folders(image_folder):
    root, by_class = image_folder
    dataset = load_image_dataset(str(root))
    assert dataset.column_names == ["image", "label"] and dataset.num_rows == 7
    names = dataset.features["label"].names
    assert names == ["coat", "sneaker"]
    for example in dataset:
        pixels = np.asarray(example["image"])
        assert any(np.array_equal(pixels, known) for known in by_class[names[example["label"]]])
    sample = load_image_dataset(str(root), num_samples=4, seed=1)
    assert sample.num_rows == 4
    np.testing.assert_array_equal(pixels_of(sample), pixels_of(load_image_dataset(str(root), num_samples=4, seed=1)))


def test_image_folder_streaming(image_folder):
    root, _ = image_folder
    streamed = load_image_dataset(str(root), streaming=True, num_samples=5, seed=0)
    assert isinstance(streamed, IterableDataset)
    rows = list(streamed)
    assert len(rows) == 5 and set(rows[0]) == {"image", "label"}


def test_saved_dataset_dict_picks_the_split_and_normalises_columns(tmp_path, fashion_test):
    images, labels = fashion_test
    features = Features({"img": Image(), "caption": Value("string"), "fine_label": ClassLabel(num_classes=10)})

    def split(rows):
        return Dataset.from_dict(
            {"img": [{"bytes": png_bytes(images[i]), "path": None} for i in rows],
             "caption": ["text"] * len(rows), "fine_label": labels[rows].tolist()},
            features=features,
        )

    DatasetDict({"train": split(range(10)), "test": split(range(10, 16))}).save_to_disk(str(tmp_path / "saved"))
    dataset = load_image_dataset(str(tmp_path / "saved"), "test")
    assert dataset.column_names == ["image", "label"]
    assert dataset["label"] == labels[10:16].tolist()
    np.testing.assert_array_equal(pixels_of(dataset), images[10:16])
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', 'train'\]"):
        load_image_dataset(str(tmp_path / "saved"), "validation")


def test_saved_single_dataset_and_decode_false_images(tmp_path, fashion_test):
    images, _ = fashion_test
    Dataset.from_dict(
        {"picture": [{"bytes": png_bytes(p), "path": None} for p in images[:5]]},
        features=Features({"picture": Image(decode=False)}),
    ).save_to_disk(str(tmp_path / "single"))
    dataset = load_image_dataset(str(tmp_path / "single"))
    assert dataset.column_names == ["image"]  # no labels
    assert isinstance(dataset[0]["image"], PILImage.Image)  # decoded although stored with decode=False
    np.testing.assert_array_equal(pixels_of(dataset), images[:5])


def test_coco_style_objects_are_kept(tmp_path, fashion_test):
    images, _ = fashion_test
    objects = [
        {"bbox": [[1.0, 2.0, 10.0, 12.0]], "category": [3]},
        {"bbox": [[0.0, 0.0, 28.0, 28.0], [4.0, 4.0, 5.0, 6.0]], "category": [0, 7]},
        {"bbox": [], "category": []},
    ]
    features = Features({
        "image_id": Value("int64"),
        "image": Image(),
        "objects": {"bbox": List(List(Value("float32"), length=4)), "category": List(Value("int64"))},
    })
    coco = Dataset.from_dict(
        {"image_id": [11, 12, 13], "image": [PILImage.fromarray(p) for p in images[:3]], "objects": objects},
        features=features,
    )
    coco.save_to_disk(str(tmp_path / "coco"))
    dataset = load_image_dataset(str(tmp_path / "coco"))
    assert dataset.column_names == ["image", "objects"]
    assert dataset["objects"] == objects
    np.testing.assert_array_equal(pixels_of(dataset), images[:3])


@pytest.mark.parametrize("source", ["./no-such-dir", "/no/such/dir", "~/no-such-dir-lrpqvit", "a/b/c"])
def test_missing_local_path_is_file_not_found_without_hub_lookup(source, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("a path was looked up on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset(source)


def test_a_file_is_not_a_source(parquet_file):
    with pytest.raises(ValueError, match="is a file.*prepare_image_dataset"):
        load_image_dataset(str(parquet_file))


# ------------------------------------------------------------------------------------ streaming and the Hub


@pytest.mark.parametrize("untyped", [False, True], ids=["typed", "features-none"])
def test_streaming_parquet_sample_is_seeded(parquet_file, fashion_test, untyped):
    images, labels = fashion_test

    def sample(seed):
        stream = stream_parquet(parquet_file)
        if untyped:
            stream = stream.map(lambda example: example)  # drops the features: typed from the first example
            assert stream.features is None
        dataset = prepare_image_dataset(stream, num_samples=6, seed=seed, buffer_size=30)
        assert isinstance(dataset, IterableDataset)
        return list(dataset)

    first, again, other = sample(0), sample(0), sample(1)
    assert len(first) == 6 and set(first[0]) == {"image", "label"}
    assert isinstance(first[0]["image"], PILImage.Image)
    assert [row["label"] for row in first] == [row["label"] for row in again]
    assert [np.asarray(row["image"]).tobytes() for row in first] != [np.asarray(row["image"]).tobytes() for row in other]
    for row in first:  # every sampled row is a real (image, label) pair of the file
        index = next(i for i in range(30) if np.array_equal(images[i], np.asarray(row["image"])))
        assert row["label"] == labels[index]


def test_streaming_untyped_pil_images():
    def generate():
        for i in range(4):
            yield {"photo": PILImage.new("RGB", (8, 8), (i, i, i)), "labels": i}

    stream = IterableDataset.from_generator(generate)
    assert stream.features is None
    rows = list(prepare_image_dataset(stream))
    assert [row["label"] for row in rows] == [0, 1, 2, 3]
    assert rows[2]["image"].getpixel((0, 0)) == (2, 2, 2)


def test_hub_id_streams_by_default(hub):
    dataset = load_image_dataset(HUB_ID, "train", num_samples=5, seed=2)
    assert isinstance(dataset, IterableDataset)
    rows = list(dataset)
    assert len(rows) == 5 and set(rows[0]) == {"image", "label"}
    assert [row["label"] for row in rows] == [row["label"] for row in load_image_dataset(HUB_ID, num_samples=5, seed=2)]
    assert all(kwargs.get("streaming") for _, kwargs in hub)


def test_hub_split_size_from_metadata_bounds_num_samples(hub):
    with pytest.raises(ValueError, match="only 30 rows"):
        load_image_dataset(HUB_ID, num_samples=31)


def test_hub_missing_split_is_reported_before_download(hub):
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['train'\]"):
        load_image_dataset(HUB_ID, "validation", streaming=False)
    assert [kwargs for _, kwargs in hub] == [{"streaming": True}]


def test_hub_without_streaming_downloads_the_split(hub):
    dataset = load_image_dataset(HUB_ID, streaming=False, num_samples=4)
    assert isinstance(dataset, Dataset) and dataset.column_names == ["image", "label"] and dataset.num_rows == 4


# ------------------------------------------------------------------------------------------ column errors


@pytest.fixture(scope="module")
def mixed(fashion_test):
    images, labels = fashion_test
    return Dataset.from_dict(
        {"note": ["a", "b"], "score": [0.5, 0.25], "photo": [PILImage.fromarray(p) for p in images[:2]],
         "label": labels[:2].tolist()},
        features=Features({"note": Value("string"), "score": Value("float32"), "photo": Image(), "label": Value("int64")}),
    )


def test_auto_detection_and_overrides(mixed):
    assert prepare_image_dataset(mixed).column_names == ["image", "label"]
    relabelled = prepare_image_dataset(mixed.add_column("grade", [3, 4]), label_column="grade")
    assert relabelled["label"] == [3, 4]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"image_column": "note"}, r"image_column='note' holds Value\('string'\), not images; image columns: \['photo'\]"),
        ({"image_column": "missing"}, r"image_column='missing' is not a column; columns: \['note', 'score', 'photo', 'label'\]"),
        ({"label_column": "score"}, r"label_column='score' holds Value\('float32'\), not class indices"),
        ({"label_column": "missing"}, "label_column='missing' is not a column"),
    ],
)
def test_bad_column_arguments(mixed, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prepare_image_dataset(mixed, **kwargs)


def test_no_image_column():
    with pytest.raises(ValueError, match="no image column.*image_column="):
        prepare_image_dataset(Dataset.from_dict({"text": ["a"], "label": [1]}))


def test_empty_datasets(parquet_file):
    empty = Dataset.from_dict({"image": [], "label": []}, features=Features({"image": Image(), "label": Value("int64")}))
    with pytest.raises(ValueError, match="empty"):
        prepare_image_dataset(empty)
    with pytest.raises(ValueError, match="empty"):
        prepare_image_dataset(stream_parquet(parquet_file).skip(30))


# -------------------------------------------------------------------------------------- pixel values


def test_grayscale_images_through_the_reference_processor(processor, fashion_test):
    images = [PILImage.fromarray(p) for p in fashion_test[0][:4]]
    pixel_values = images_to_pixel_values(images, processor, num_channels=3)
    assert pixel_values.shape == (4, 3, 28, 28) and pixel_values.dtype == torch.float32
    torch.testing.assert_close(pixel_values[:, 0], pixel_values[:, 2])  # gray replicated to RGB
    expected = (torch.tensor(fashion_test[0][:4]).float() / 255 - 0.286) / 0.353
    torch.testing.assert_close(pixel_values[:, 1], expected, atol=1e-5, rtol=0)


def test_preprocess_uses_the_same_path(processor):
    dataset = load_image_dataset("fashion_mnist", "test", num_samples=6, seed=0)
    pixels, labels = preprocess(dataset, processor, indices=[1, 4], progress=False)
    torch.testing.assert_close(pixels, images_to_pixel_values(dataset.select([1, 4])["image"], processor))
    assert labels.tolist() == dataset.select([1, 4])["label"]


def test_channel_mismatch_names_both_counts_and_the_fix(fashion_test):
    from transformers import AutoImageProcessor

    images = [PILImage.fromarray(p) for p in fashion_test[0][:2]]
    one_channel = AutoImageProcessor.from_pretrained(REFERENCE_MODEL, do_convert_rgb=False, image_mean=[0.286],
                                                     image_std=[0.353])
    assert images_to_pixel_values(images, one_channel).shape == (2, 1, 28, 28)  # unchecked without num_channels
    with pytest.raises(ValueError, match=r"with 1 channels, but the model expects 3 channels.*do_convert_rgb = True"):
        images_to_pixel_values(images, one_channel, num_channels=3)
    # the reference processor's 3-channel mean cannot even normalise grayscale images: same error, chained
    no_rgb = AutoImageProcessor.from_pretrained(REFERENCE_MODEL, do_convert_rgb=False)
    with pytest.raises(ValueError, match=r"images with 1 channels, but the model expects 3.*do_convert_rgb") as info:
        images_to_pixel_values(images, no_rgb, num_channels=3)
    assert info.value.__cause__ is not None


def test_non_finite_pixel_values_and_no_images(fashion_test):
    from transformers import AutoImageProcessor

    zero_std = AutoImageProcessor.from_pretrained(REFERENCE_MODEL, image_std=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="NaN or infinite.*image_std"):
        images_to_pixel_values([PILImage.fromarray(fashion_test[0][0])], zero_std)
    with pytest.raises(ValueError, match="no images"):
        images_to_pixel_values([], zero_std)
