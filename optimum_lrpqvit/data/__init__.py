"""Images for calibration, importance scoring and evaluation.

The subpackage has one module per concern; every public name is re-exported here, so
``from optimum_lrpqvit.data import ...`` works as before:

* :mod:`.fashion_mnist`: Fashion-MNIST read from the local IDX files (Debian package ``dataset-fashion-mnist``)
  into a :class:`datasets.DatasetDict`, cached as PNG-encoded arrow files.
* :mod:`.sources`: one split of an image dataset from ``"fashion_mnist"``, a local directory (a ``save_to_disk``
  dataset or an image folder) or a Hub dataset id, reduced to ``image`` / ``label`` columns and optionally sampled
  (:func:`load_image_dataset`, :func:`prepare_image_dataset`).
* :mod:`.coco`: COCO-format instance annotations (a local COCO directory, or rows in the Hub ``objects`` layout),
  checked, as a pycocotools ground truth with its images (:func:`load_coco`, :func:`coco_from_objects`).
* :mod:`.pixels`: the model's image processor (:func:`load_image_processor`) and PIL images through it into pixel
  values (:func:`images_to_pixel_values`, :func:`preprocess`).

Private helpers live in their submodule only (monkeypatch them there, e.g. ``data.fashion_mnist._FILES``).
"""

from __future__ import annotations

from .coco import CocoSplit, coco_from_objects, load_coco
from .fashion_mnist import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_LABELS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
    load_fashion_mnist_arrays,
    read_idx,
)
from .pixels import images_to_pixel_values, load_image_processor, preprocess
from .sources import load_coco_split, load_image_dataset, prepare_image_dataset

__all__ = [
    "CocoSplit",
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_LABELS",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "coco_from_objects",
    "images_to_pixel_values",
    "load_fashion_mnist",
    "load_fashion_mnist_arrays",
    "load_coco",
    "load_coco_split",
    "load_image_processor",
    "load_image_dataset",
    "prepare_image_dataset",
    "preprocess",
    "read_idx",
]
