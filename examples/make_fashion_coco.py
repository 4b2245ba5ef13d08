"""Write a COCO-format detection / segmentation dataset made from Fashion-MNIST (seeded, reproducible).

Every canvas (64×64 by default, grayscale saved as PNG) holds 1–4 Fashion-MNIST items at random positions and
scales; an item's instance mask is its visible pixels (brighter than ``--threshold``, minus what later items
cover), its box the mask's bounding box, its category the item's class. Items that end up with fewer than
``--min-area`` visible pixels are dropped. The train split draws from Fashion-MNIST's train images, the val split
from its test images, so no item is in both.

    python examples/make_fashion_coco.py --out data/fashion-coco

writes ``data/fashion-coco/{train,val}/*.png`` and ``data/fashion-coco/annotations/instances_{train,val}.json``,
read by ``optimum_lrpqvit.data.load_coco`` (and by pycocotools) exactly as COCO 2017 would be.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimum_lrpqvit.data import FASHION_MNIST_LABELS, load_fashion_mnist_arrays  # noqa: E402
from optimum_lrpqvit.data.coco import mask_rle, pycocotools  # noqa: E402


def compose(items: np.ndarray, labels: np.ndarray, rng: np.random.Generator, size: int, max_items: int,
            threshold: int, min_area: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One canvas (size, size) uint8 and its instances ``(class, visible mask)``, drawing items from ``items``."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    placed: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(1, max_items + 1))):
        index = int(rng.integers(len(items)))
        side = int(round(28 * rng.uniform(0.75, 1.25)))
        item = np.asarray(Image.fromarray(items[index]).resize((side, side), Image.BILINEAR))
        y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
        mask = np.zeros((size, size), dtype=bool)
        mask[y:y + side, x:x + side] = item > threshold
        canvas[mask] = item[mask[y:y + side, x:x + side]]
        placed = [(c, m & ~mask) for c, m in placed]  # the new item covers the earlier ones
        placed.append((int(labels[index]), mask))
    return canvas, [(c, m) for c, m in placed if m.sum() >= min_area]


def write_split(root: Path, split: str, items: np.ndarray, labels: np.ndarray, count: int, seed: int,
                args: argparse.Namespace) -> dict:
    mask_utils = pycocotools().mask
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    document = {"info": {"description": f"Fashion-MNIST canvases ({split}), examples/make_fashion_coco.py",
                         "seed": seed},
                "images": [], "annotations": [],
                "categories": [{"id": i + 1, "name": name} for i, name in enumerate(FASHION_MNIST_LABELS)]}
    for image_id in range(1, count + 1):
        canvas, instances = compose(items, labels, rng, args.size, args.max_items, args.threshold, args.min_area)
        name = f"{image_id:06d}.png"
        Image.fromarray(canvas).save(root / split / name)
        document["images"].append({"id": image_id, "file_name": name, "width": args.size, "height": args.size})
        for label, mask in instances:
            rle = mask_rle(mask)
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            document["annotations"].append({"id": len(document["annotations"]) + 1, "image_id": image_id,
                                            "category_id": label + 1, "bbox": [x, y, w, h],
                                            "area": float(mask.sum()), "iscrowd": 0, "segmentation": rle})
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    return {"images": count, "instances": len(document["annotations"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--train", type=int, default=4000, help="train canvases")
    parser.add_argument("--val", type=int, default=500, help="val canvases")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-items", type=int, default=4)
    parser.add_argument("--threshold", type=int, default=20, help="an item's pixels brighter than this are its mask")
    parser.add_argument("--min-area", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train_items, train_labels = load_fashion_mnist_arrays("train")
    test_items, test_labels = load_fashion_mnist_arrays("test")
    summary = {"train": write_split(args.out, "train", train_items, train_labels, args.train, args.seed, args),
               "val": write_split(args.out, "val", test_items, test_labels, args.val, args.seed + 1, args)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
