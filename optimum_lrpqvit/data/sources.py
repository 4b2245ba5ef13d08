"""Image dataset sources: one split of the bundled Fashion-MNIST, a local directory or a Hub dataset.

:func:`load_image_dataset` resolves ``source`` (``"fashion_mnist"``, a ``save_to_disk`` dataset, an image folder or
a Hub dataset id) and picks the split; :func:`prepare_image_dataset` detects the image and label columns, reduces
the dataset to them and draws a seeded random sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .coco import CocoSplit, coco_from_objects, coco_image_paths, coco_splits, load_coco
from .fashion_mnist import load_fashion_mnist

if TYPE_CHECKING:
    import datasets

__all__ = ["load_coco_split", "load_image_dataset", "prepare_image_dataset"]


def load_image_dataset(
    source: str,
    split: str = "train",
    *,
    num_samples: int | None = None,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    streaming: bool | None = None,
    buffer_size: int = 10_000,
) -> datasets.Dataset | datasets.IterableDataset:
    """One split of an image dataset, with an ``image`` column and, when there are labels, a ``label`` column.

    ``source`` is ``"fashion_mnist"`` (the bundled :func:`load_fashion_mnist`), a local directory (a
    ``save_to_disk`` dataset, whose split is picked when it is a ``DatasetDict``; a COCO directory, whose
    ``annotations/instances_<split>.json`` names the split's images, see ``coco``; or else an image folder, whose
    class subdirectories give the labels) or a Hub dataset id such as ``"ILSVRC/imagenet-1k"``. Hub datasets are
    streamed unless ``streaming=False``; ``streaming=True`` streams local sources too. Columns, sampling and the
    remaining arguments are those of :func:`prepare_image_dataset`.

    Raises:
        FileNotFoundError: ``source`` looks like a path (starts with ``.``, ``/`` or ``~``, or is not of the Hub
            id form ``name`` / ``namespace/name``) and does not exist.
        ValueError: ``source`` is a file; the split does not exist (the available ones are listed); the errors of
            :func:`prepare_image_dataset`.
    """
    dataset = _load_split(source, split, streaming)
    return prepare_image_dataset(
        dataset, num_samples=num_samples, seed=seed, image_column=image_column, label_column=label_column,
        buffer_size=buffer_size,
    )


def load_coco_split(source: str, split: str = "val", *, num_samples: int | None = None, seed: int = 0,
                    bbox_format: str = "xywh") -> CocoSplit:
    """A COCO-format split for the dense metrics: a COCO directory's split (:func:`coco.load_coco`, all of its images:
    ``num_samples`` is for the caller to apply to its ids), or ``num_samples`` rows (seeded) of any other source
    :func:`load_image_dataset` reads (Hub ids streamed) that has an ``objects`` column in the Hub layout
    (:func:`coco.coco_from_objects`; the categories are the names of its ``category`` ClassLabel).

    Raises:
        ValueError: the dataset has no ``objects`` column, or its categories are not a ClassLabel; the errors of
            :func:`load_coco`, :func:`load_image_dataset` and :func:`coco.coco_from_objects`.
    """
    if coco_splits(Path(source).expanduser()):
        return load_coco(source, split)
    dataset = load_image_dataset(source, split, num_samples=num_samples, seed=seed)
    if "objects" not in dataset.features:
        raise ValueError(f"{source} ({split}) is neither a COCO directory (annotations/instances_<split>.json) nor a "
                         f"dataset with an 'objects' column (bbox, category); its columns are {list(dataset.features)}")
    objects = dataset.features["objects"]
    category = getattr(objects, "feature", objects)["category"]
    names = getattr(getattr(category, "feature", category), "names", None)
    if names is None:
        raise ValueError(f"{source} ({split}): objects.category is {category}, not a ClassLabel, so the categories "
                         "have no names to match the model's labels with")
    return coco_from_objects(list(dataset), names, bbox_format, name=f"{source} ({split})")


def _load_split(source: str, split: str, streaming: bool | None) -> datasets.Dataset | datasets.IterableDataset:
    """Split ``split`` of ``source`` as :func:`load_image_dataset` describes it, columns untouched."""
    from datasets import Dataset, Image, config, load_dataset, load_from_disk

    path = Path(source).expanduser()
    if source == "fashion_mnist":
        dataset = _pick_split(load_fashion_mnist(), split, source)
    elif (path / config.DATASETDICT_JSON_FILENAME).is_file() or (path / config.DATASET_STATE_JSON_FILENAME).is_file():
        saved = load_from_disk(str(path))
        dataset = saved if isinstance(saved, Dataset) else _pick_split(saved, split, source)
    elif coco_splits(path):
        # as CocoSplit.image gives them to the evaluator: RGB (COCO holds some grayscale images)
        dataset = Dataset.from_dict({"image": coco_image_paths(path, split)}).cast_column("image", Image(mode="RGB"))
    elif path.is_dir():
        return _pick_split(load_dataset("imagefolder", data_dir=str(path), streaming=bool(streaming)), split, source)
    elif path.exists():
        raise ValueError(
            f"{source} is a file; load_image_dataset() reads directories (a save_to_disk dataset or an image folder) "
            f"and Hub ids. For data files, load them with datasets.load_dataset() and pass the split to "
            f"prepare_image_dataset()"
        )
    elif _looks_like_path(source):
        raise FileNotFoundError(
            f"{source} does not exist; pass an existing directory (a save_to_disk dataset or an image folder), "
            f"a Hub dataset id (namespace/name) or 'fashion_mnist'"
        )
    else:
        return _load_hub_split(source, split, streaming)
    return dataset.to_iterable_dataset() if streaming else dataset


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` cannot be a Hub dataset id (``name`` or ``namespace/name``)."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def _load_hub_split(source: str, split: str, streaming: bool | None) -> datasets.Dataset | datasets.IterableDataset:
    """Split ``split`` of the Hub dataset ``source``, streamed unless ``streaming`` is False. The split is checked
    against the dataset's splits (resolved from its file listing) before any data is downloaded."""
    from datasets import load_dataset

    dataset = _pick_split(load_dataset(source, streaming=True), split, source)
    return load_dataset(source, split=split) if streaming is False else dataset


def _pick_split(
    splits: datasets.DatasetDict | datasets.IterableDatasetDict, split: str, source: str
) -> datasets.Dataset | datasets.IterableDataset:
    """``splits[split]`` of a ``DatasetDict`` / ``IterableDatasetDict``; a ValueError listing the splits if absent."""
    if split not in splits:
        raise ValueError(f"{source} has no split {split!r}; available splits: {sorted(splits)}. "
                         "Pass split= one of them.")
    return splits[split]


def prepare_image_dataset(
    dataset: datasets.Dataset | datasets.IterableDataset,
    *,
    num_samples: int | None = None,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    buffer_size: int = 10_000,
) -> datasets.Dataset | datasets.IterableDataset:
    """``dataset`` reduced to an ``image`` column (PIL images on access), a ``label`` column (int class index) when
    it has labels, and a COCO-style ``objects`` column when it has one; optionally a seeded random sample.

    ``image_column`` defaults to the first column of type ``datasets.Image`` (or of encoded ``{"bytes", "path"}``
    images, which are cast to ``Image()``); ``label_column`` to the first ``ClassLabel`` column, else a ``label`` or
    ``labels`` column of ints. A streaming dataset is read up to its first example, to tell whether it is empty
    and, when it has no ``features``, to type its columns.

    ``num_samples`` images (``None``: all) are drawn with ``seed``: a map-style dataset keeps the rows of the first
    ``num_samples`` entries of ``torch.randperm(len(dataset))`` (the selection of the examples and benchmarks), a
    streaming one is shuffled with a ``buffer_size`` buffer and cut to ``num_samples`` (fewer if the split is
    shorter and its size is unknown).

    Raises:
        ValueError: the dataset is empty; ``num_samples`` is < 1 or larger than the split; there is no image column,
            or ``image_column`` / ``label_column`` is missing or does not hold images / class indices.
    """
    from datasets import Dataset, Image

    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be at least 1 (or None for the whole split), got {num_samples}")
    if isinstance(dataset, Dataset):
        if len(dataset) == 0:
            raise ValueError("the dataset is empty (0 rows); check the source and the split")
    else:
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError("the streaming dataset is empty (it yields no examples); check the source and the split")
        if dataset.features is None:
            dataset = dataset.cast(Dataset.from_list([first]).features)

    features = dataset.features
    image_column = _image_column(features, image_column)
    label_column = _label_column(features, label_column)
    kept = {image_column: "image", **({label_column: "label"} if label_column else {})}
    if "objects" in features and "objects" not in kept:
        kept["objects"] = "objects"
    dataset = dataset.select_columns(list(kept))
    image_feature = features[image_column]
    if not (isinstance(image_feature, Image) and image_feature.decode):
        dataset = dataset.cast_column(image_column, Image(mode=getattr(image_feature, "mode", None)))
    dataset = dataset.rename_columns({name: new for name, new in kept.items() if name != new})
    return _sample(dataset, num_samples, seed, buffer_size)


def _is_image_feature(feature: object) -> bool:
    """A ``datasets.Image`` or the struct of encoded images (``bytes`` and/or ``path``)."""
    from datasets import Image

    return isinstance(feature, Image) or (
        isinstance(feature, dict) and bool(feature) and set(feature) <= {"bytes", "path"})


def _is_class_index(feature: object) -> bool:
    from datasets import ClassLabel, Value

    return isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")))


def _image_column(features: datasets.Features, requested: str | None) -> str:
    image_columns = [name for name, feature in features.items() if _is_image_feature(feature)]
    if requested is None:
        if not image_columns:
            raise ValueError(
                f"the dataset has no image column (columns: {dict(features)}); pass image_column= the column "
                f"holding the images, cast to datasets.Image() if it holds file paths"
            )
        return image_columns[0]
    if requested not in features:
        raise ValueError(f"image_column={requested!r} is not a column; columns: {list(features)}")
    if requested not in image_columns:
        raise ValueError(
            f"image_column={requested!r} holds {features[requested]}, not images; image columns: {image_columns}. "
            f"Pass one of them, or cast the column to datasets.Image() if it holds file paths"
        )
    return requested


def _label_column(features: datasets.Features, requested: str | None) -> str | None:
    from datasets import ClassLabel

    if requested is None:
        candidates = [name for name, feature in features.items() if isinstance(feature, ClassLabel)]
        candidates += [name for name in ("label", "labels") if name in features and _is_class_index(features[name])]
        return candidates[0] if candidates else None
    if requested not in features:
        raise ValueError(f"label_column={requested!r} is not a column; columns: {list(features)}")
    if not _is_class_index(features[requested]):
        raise ValueError(
            f"label_column={requested!r} holds {features[requested]}, not class indices (a ClassLabel or integer "
            f"column); pass another column, or leave label_column=None"
        )
    return requested


def _sample(
    dataset: datasets.Dataset | datasets.IterableDataset, num_samples: int | None, seed: int, buffer_size: int
) -> datasets.Dataset | datasets.IterableDataset:
    """``num_samples`` seeded random rows of ``dataset`` (all of them for ``None``)."""
    import torch
    from datasets import Dataset

    if num_samples is None:
        return dataset
    num_rows = _num_rows(dataset)
    if num_rows is not None and num_samples > num_rows:
        raise ValueError(
            f"num_samples={num_samples} but the split has only {num_rows} rows; pass num_samples <= {num_rows} "
            f"or None for all of them"
        )
    if isinstance(dataset, Dataset):
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
        return dataset.select(order[:num_samples].tolist())
    return dataset.shuffle(seed=seed, buffer_size=buffer_size).take(num_samples)


def _num_rows(dataset: datasets.Dataset | datasets.IterableDataset) -> int | None:
    """Rows of a map-style dataset, or of a streaming one's split when its metadata records them (else None)."""
    from datasets import Dataset

    if isinstance(dataset, Dataset):
        return len(dataset)
    splits = dataset.info.splits
    recorded = splits[dataset.split].num_examples if splits and dataset.split in splits else 0
    return recorded or None
