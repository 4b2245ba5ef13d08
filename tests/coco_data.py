"""A small COCO directory written by the tests: filled rectangles of a few categories on noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ["square", "bar", "dot", "block", "frame"]  # as many as models.NUM_LABELS


def write_coco(root: Path, split: str = "val", num_images: int = 4, size: int = 32, seed: int = 0) -> Path:
    """``root/annotations/instances_<split>.json`` and ``root/<split>/*.png``: every image holds 1-3 rectangles
    with their boxes and polygon masks; returns ``root``."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    document = {"images": [], "annotations": [],
                "categories": [{"id": 10 + i, "name": n} for i, n in enumerate(CATEGORIES)]}
    for image_id in range(1, num_images + 1):
        pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            w, h = (int(v) for v in rng.integers(4, size // 2, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            category = int(rng.integers(len(CATEGORIES)))
            pixels[y:y + h, x:x + w] = 120 + 25 * category
            document["annotations"].append({
                "id": len(document["annotations"]) + 1, "image_id": image_id, "category_id": 10 + category,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(root / split / name)
        document["images"].append({"id": image_id, "file_name": name, "width": size, "height": size})
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    return root
