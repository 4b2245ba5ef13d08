"""Dense-prediction metrics on COCO-format data: box and mask AP with pycocotools' ``COCOeval``, mIoU for semantic
segmentation (``evaluate_dense``).

Predictions go through the model's own image processor and its post-processing: instance segmentation
(Mask2Former) gives masks and scores, whose boxes are the masks' bounding boxes (as Mask2Former reports box AP);
object detection (YOLOS) gives boxes; semantic segmentation (UperNet) gives one class per pixel, compared with the
ground-truth instance masks painted by category (pixels of no object are the model's ``background`` label where it
has one, else ignored). A model label is the category of the same name, or else, when the model has exactly as
many labels as there are categories, the category at the same position.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from .architectures import find_family
from .data.coco import CocoSplit, mask_rle, pycocotools

__all__ = ["coco_average_precision", "evaluate_dense", "label_categories", "mean_iou", "predict_coco",
           "semantic_target"]

IGNORE = 255


def label_categories(id2label: dict[int, str], categories: dict[int, str]) -> dict[int, int]:
    """``{model label: COCO category id}``; ValueError when the labels match the categories neither by name nor by
    count."""
    by_name = {name: cid for cid, name in categories.items()}
    labels = {int(i): str(n) for i, n in id2label.items()}
    named = {i: by_name[n] for i, n in labels.items() if n in by_name}
    if set(by_name) <= {labels[i] for i in named}:
        return named
    real = {i: n for i, n in labels.items() if n != "background"}
    if len(real) == len(categories):
        return dict(zip(sorted(real), categories))
    raise ValueError(f"The model's {len(labels)} labels ({list(labels.values())[:5]}, ...) match neither the names "
                     f"nor the number of the dataset's {len(categories)} categories "
                     f"({list(categories.values())[:5]}, ...).")


def _box_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _task(model: nn.Module) -> str:
    family = find_family(model)
    if family.backbone(model) is None:
        raise ValueError(f"{type(model).__name__} is not a dense-prediction model; evaluate classifiers with "
                         "optimum_lrpqvit.evaluation.")
    if isinstance(model, transformers.Mask2FormerForUniversalSegmentation):
        return "instance"
    return "semantic" if isinstance(model, transformers.UperNetForSemanticSegmentation) else "detection"


@torch.no_grad()
def predict_coco(model: nn.Module, processor: Any, split: CocoSplit, image_ids: Sequence[int] | None = None,
                 batch_size: int = 8, threshold: float = 0.0, desc: str = "predicting") -> list[dict]:
    """COCO results of ``model`` on ``image_ids`` (default: all): per image and instance ``{"image_id",
    "category_id", "score", "bbox"}`` and, for instance segmentation, ``"segmentation"`` (RLE); for semantic
    segmentation per image ``{"image_id", "label_map"}`` (H, W). Instances scoring below ``threshold`` are dropped
    (0: all of them, as COCO AP ranks them by score)."""
    task = _task(model)
    categories = label_categories(model.config.id2label, split.category_names)
    ids = split.image_ids if image_ids is None else list(image_ids)
    param = next(model.parameters())
    results = []
    for start in tqdm(range(0, len(ids), batch_size), desc=desc, unit="batch", leave=False,
                      disable=len(ids) <= batch_size):
        batch = ids[start:start + batch_size]
        images = [split.image(i) for i in batch]
        sizes = [(image.height, image.width) for image in images]
        pixel_values = processor(images, return_tensors="pt")["pixel_values"].to(param.device, param.dtype)
        outputs = model(pixel_values=pixel_values)
        if task == "semantic":
            maps = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
            results += [{"image_id": i, "label_map": m.cpu().numpy()} for i, m in zip(batch, maps)]
        elif task == "detection":
            for i, found in zip(batch, processor.post_process_object_detection(outputs, threshold, sizes)):
                for score, label, (x0, y0, x1, y1) in zip(found["scores"].tolist(), found["labels"].tolist(),
                                                          found["boxes"].tolist()):
                    if label in categories:
                        results.append({"image_id": i, "category_id": categories[label], "score": score,
                                        "bbox": [x0, y0, x1 - x0, y1 - y0]})
        else:
            found = processor.post_process_instance_segmentation(outputs, threshold=threshold, target_sizes=sizes,
                                                                 return_binary_maps=True)
            for i, image in zip(batch, found):
                masks = image["segmentation"]
                for k, segment in enumerate(image["segments_info"]):
                    if segment["label_id"] not in categories:
                        continue
                    mask = masks[k].cpu().numpy().astype(np.uint8)
                    rle = mask_rle(mask)
                    results.append({"image_id": i, "category_id": categories[segment["label_id"]],
                                    "score": float(segment["score"]), "bbox": _box_of(mask), "segmentation": rle})
    return results


def coco_average_precision(split: CocoSplit, results: list[dict], iou_type: str,
                           image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """AP, AP50 and AP75 (in %) of ``results`` against ``split`` by pycocotools' ``COCOeval`` (``iou_type``
    ``"bbox"`` or ``"segm"``), over ``image_ids`` (default: all). No results: 0."""
    COCOeval = pycocotools().cocoeval.COCOeval
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        detections = split.coco.loadRes([{k: v for k, v in r.items() if iou_type == "segm" or k != "segmentation"}
                                         for r in results])
        evaluator = COCOeval(split.coco, detections, iou_type)
        evaluator.params.imgIds = split.image_ids if image_ids is None else list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where no ground truth exists
    return {k: max(0.0, 100 * float(v)) for k, v in zip(("AP", "AP50", "AP75"), evaluator.stats[:3])}


def semantic_target(split: CocoSplit, image_id: int, config: Any) -> np.ndarray:
    """The ground-truth label map (H, W) of an image for a semantic-segmentation model with ``config``
    (``id2label``): every instance mask painted with its category's label, in annotation order; the other pixels
    the label named ``background``, or ``IGNORE`` where there is none."""
    categories = label_categories(config.id2label, split.category_names)
    label_of = {cid: label for label, cid in categories.items()}
    background = next((int(i) for i, n in config.id2label.items() if n == "background"), IGNORE)
    info = split.coco.loadImgs(image_id)[0]
    target = np.full((info["height"], info["width"]), background, dtype=np.int64)
    for ann in split.coco.loadAnns(split.coco.getAnnIds(imgIds=image_id, iscrowd=None)):
        if "segmentation" in ann:
            target[split.coco.annToMask(ann).astype(bool)] = label_of[ann["category_id"]]
    return target


def mean_iou(predictions: Sequence[np.ndarray], targets: Sequence[np.ndarray], num_labels: int,
             ignore_index: int = IGNORE) -> float:
    """mIoU in %: per label TP / (TP + FP + FN) over all pixels whose target is not ``ignore_index``, averaged over
    the labels that occur in the targets or the predictions."""
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    for prediction, target in zip(predictions, targets):
        keep = target != ignore_index
        confusion += np.bincount(num_labels * target[keep] + prediction[keep],
                                 minlength=num_labels ** 2).reshape(num_labels, num_labels)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    return float(100 * (tp[present] / union[present]).mean()) if present.any() else 0.0


def evaluate_dense(model: nn.Module, processor: Any, split: CocoSplit, image_ids: Sequence[int] | None = None,
                   batch_size: int = 8, desc: str = "evaluating") -> dict[str, Any]:
    """The dense metrics of ``model`` on ``split``: ``{"box": {AP, AP50, AP75}, "mask": {...}}`` for instance
    segmentation, ``{"box": ...}`` for detection, ``{"miou": ...}`` for semantic segmentation; with
    ``num_images``."""
    ids = split.image_ids if image_ids is None else list(image_ids)
    results = predict_coco(model, processor, split, ids, batch_size=batch_size, desc=desc)
    metrics: dict[str, Any] = {"num_images": len(ids)}
    if _task(model) == "semantic":
        targets = [semantic_target(split, r["image_id"], model.config) for r in results]
        metrics["miou"] = mean_iou([r["label_map"] for r in results], targets, len(model.config.id2label))
        return metrics
    metrics["box"] = coco_average_precision(split, results, "bbox", ids)
    if _task(model) == "instance":
        metrics["mask"] = coco_average_precision(split, results, "segm", ids)
    return metrics
