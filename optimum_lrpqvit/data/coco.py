"""COCO-format instance annotations, checked, as a pycocotools ``COCO`` ground truth with its images.

Two sources: a local COCO directory, ``<root>/annotations/instances_<split>.json`` with the images under
``<root>/<split>/`` (the layout of COCO 2017: ``val2017`` etc.; :func:`load_coco`), and rows in the ``objects``
layout of Hub detection datasets, ``{"image": PIL image, "objects": {"bbox": [...], "category": [...],
"segmentation": [...] (optional)}}`` (:func:`coco_from_objects`). Either gives a :class:`CocoSplit`, which the
dense evaluator (``dense_evaluation``) scores with pycocotools' own ``COCOeval``; for calibration,
``load_image_dataset`` reads the images of a COCO directory's split.

Annotation files are JSON (never pickle) and only files inside the directory named are read.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["CocoSplit", "coco_from_objects", "coco_image_paths", "coco_splits", "load_coco", "mask_rle", "pycocotools"]

_TOLERANCE = 1.0  # pixels a box may pass the image border by (COCO's own boxes do, by float rounding)


@dataclass
class CocoSplit:
    """One split of COCO-format data: ``coco`` (a pycocotools ``COCO`` holding the checked ground truth), the
    ``image(image_id)`` loader and a ``name`` for messages."""

    coco: Any
    name: str
    _paths: dict[int, Path] | None = None
    _images: dict[int, Any] | None = None

    @property
    def image_ids(self) -> list[int]:
        return sorted(self.coco.getImgIds())

    @property
    def category_names(self) -> dict[int, str]:
        """``{category id: name}`` in the order of the categories' ids."""
        return {c["id"]: c["name"] for c in sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])}

    def image(self, image_id: int):
        """The RGB PIL image ``image_id``."""
        if self._images is not None:
            return self._images[image_id].convert("RGB")
        with Image.open(self._paths[image_id]) as image:
            return image.convert("RGB")


def coco_splits(root: str | Path) -> list[str]:
    """The splits of a COCO directory: the ``<split>`` of every ``annotations/instances_<split>.json``."""
    files = (Path(root) / "annotations").glob("instances_*.json")
    return sorted(p.name[len("instances_"):-len(".json")] for p in files)


def _annotation_file(root: Path, split: str) -> Path:
    path = root / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        splits = coco_splits(root)
        raise ValueError(f"{root} has no {path.relative_to(root)}"
                         + (f"; its COCO splits are {splits}: pass one of them" if splits else
                            ": a COCO directory holds annotations/instances_<split>.json and the images in <split>/"))
    return path


def pycocotools():
    """The ``pycocotools`` package; ImportError naming the extra that installs it when it is missing."""
    try:
        import pycocotools.coco
        import pycocotools.cocoeval
        import pycocotools.mask
    except ImportError as error:
        raise ImportError("COCO data and metrics need pycocotools: pip install 'optimum-lrpqvit[dense]'.") from error
    return pycocotools


def _as_coco(document: dict, name: str):
    """A pycocotools ``COCO`` of ``document`` (its index built without pycocotools' progress prints)."""
    coco = pycocotools().coco.COCO()
    coco.dataset = document
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _checked(document: object, name: str) -> dict:
    """``document`` with defaults filled in (``iscrowd`` 0, ``area`` from the box); ValueError naming ``name``
    and the annotation for missing keys, unknown images or categories, and boxes outside their image."""
    if not isinstance(document, dict) or not all(isinstance(document.get(k), list)
                                                 for k in ("images", "annotations", "categories")):
        raise ValueError(f"{name} is not COCO instance annotations: it needs the lists 'images', 'annotations' and "
                         "'categories'.")
    images = {}
    for image in document["images"]:
        if not all(k in image for k in ("id", "width", "height")):
            raise ValueError(f"{name}: image {image.get('id', image)} lacks id, width or height.")
        images[image["id"]] = image
    categories = {c.get("id") for c in document["categories"]}
    for ann in document["annotations"]:
        where = f"{name}: annotation {ann.get('id')!r} (image {ann.get('image_id')!r})"
        if ann.get("image_id") not in images:
            raise ValueError(f"{where} names an image that is not in 'images'.")
        if ann.get("category_id") not in categories:
            raise ValueError(f"{where} has category_id {ann.get('category_id')!r}, which is not in 'categories'.")
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                                  for v in box)):
            raise ValueError(f"{where} has bbox {box!r}; COCO boxes are [x, y, width, height] in pixels.")
        x, y, w, h = box
        image = images[ann["image_id"]]
        if (w < 0 or h < 0 or x < -_TOLERANCE or y < -_TOLERANCE or x + w > image["width"] + _TOLERANCE
                or y + h > image["height"] + _TOLERANCE):
            raise ValueError(f"{where} has bbox {box} outside its {image['width']}x{image['height']} image (boxes are "
                             "[x, y, width, height]; is it in another format, e.g. [x0, y0, x1, y1]?).")
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(w * h))
    return document


def load_coco(root: str | Path, split: str = "val2017") -> CocoSplit:
    """Split ``split`` of the COCO directory ``root`` (see the module docstring), checked before any image is read.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        ValueError: no annotation file for ``split`` (the splits there are listed); the file is not JSON or not COCO
            instance annotations; an annotation names a missing image or category or has a box outside its image;
            an image file is missing or lies outside ``root/<split>`` — each naming the file and the annotation.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; a COCO directory holds annotations/instances_<split>.json "
                                "and the images in <split>/.")
    path = _annotation_file(root, split)
    try:
        document = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None
    document = _checked(document, str(path))
    image_dir = (root / split).resolve()
    paths = {}
    for image in document["images"]:
        file = (image_dir / str(image.get("file_name", ""))).resolve()
        if not file.is_relative_to(image_dir):
            raise ValueError(f"{path}: image {image['id']} has file_name {image.get('file_name')!r}, outside "
                             f"{image_dir}; only files inside the COCO directory are read.")
        if not file.is_file():
            raise ValueError(f"{path}: image {image['id']} names {image.get('file_name')!r}, which is not in "
                             f"{image_dir}.")
        paths[image["id"]] = file
    return CocoSplit(_as_coco(document, str(path)), str(path), _paths=paths)


def coco_image_paths(root: str | Path, split: str) -> list[str]:
    """The image files of a COCO directory's split, in image-id order (for calibration)."""
    coco = load_coco(root, split)
    return [str(coco._paths[i]) for i in coco.image_ids]


def mask_rle(mask) -> dict:
    """A binary mask (H, W) as COCO run-length encoding with a JSON-friendly ``counts``."""
    rle = pycocotools().mask.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_from_objects(rows: Iterable[dict], categories: Sequence[str], bbox_format: str = "xywh",
                      name: str = "dataset") -> CocoSplit:
    """A :class:`CocoSplit` of rows in the Hub ``objects`` layout: ``row["image"]`` a PIL image,
    ``row["objects"]`` with parallel lists ``bbox`` (``bbox_format`` ``"xywh"`` as COCO, or ``"xyxy"``) and
    ``category`` (indices into ``categories``), and optionally ``segmentation`` (COCO polygons or RLE, or binary
    masks) and ``iscrowd``. Image ids are the rows' ``image_id`` when they have one, else their positions; category
    ids are the indices. Checked as :func:`load_coco` checks a file."""
    if bbox_format not in ("xywh", "xyxy"):
        raise ValueError(f"bbox_format must be 'xywh' or 'xyxy', got {bbox_format!r}.")
    document = {"images": [], "annotations": [],
                "categories": [{"id": i, "name": str(n)} for i, n in enumerate(categories)]}
    images = {}
    for position, row in enumerate(rows):
        if "image" not in row or "objects" not in row:
            raise ValueError(f"{name}: row {position} has keys {sorted(row)}; the objects layout needs 'image' and "
                             "'objects' (bbox, category).")
        image_id = int(row.get("image_id", position))
        width, height = row["image"].size
        document["images"].append({"id": image_id, "width": width, "height": height})
        images[image_id] = row["image"]
        objects = row["objects"]
        segmentations = objects.get("segmentation") or [None] * len(objects["bbox"])
        crowd = objects.get("iscrowd") or [0] * len(objects["bbox"])
        for box, category, segmentation, iscrowd in zip(objects["bbox"], objects["category"], segmentations, crowd):
            box = [float(v) for v in box]
            if bbox_format == "xyxy":
                box = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            ann = {"id": len(document["annotations"]) + 1, "image_id": image_id, "category_id": int(category),
                   "bbox": box, "iscrowd": int(iscrowd)}
            if segmentation is not None:
                is_mask = isinstance(segmentation, np.ndarray) or hasattr(segmentation, "getbands")
                ann["segmentation"] = mask_rle(np.asarray(segmentation)) if is_mask else segmentation
            document["annotations"].append(ann)
    if not document["images"]:
        raise ValueError(f"{name} has no rows.")
    return CocoSplit(_as_coco(_checked(document, name), name), name, _images=images)
