"""Dense-prediction benchmark: the dense reference model (UperNet on a Swin backbone, trained on the Fashion-MNIST
COCO canvases) at full precision and quantized, on the validation split.

    python examples/make_fashion_coco.py --out data/fashion-coco
    python benchmarks/dense.py [--model reference_models/upernet-swin-fashion-coco] [--data data/fashion-coco]
        [--bits 4 6] [--methods layerwise repq crl crl+lrp crl+random] [--seeds 0 1 2]

Every W/A (weights and activations at the same bits) × method × calibration seed quantizes the backbone with 32
calibration canvases of the train split (a seeded draw), the head staying float, and predicts every validation
canvas: mIoU against the ground truth and pixel agreement with the full-precision prediction. Methods: per-tensor
post-LayerNorm activations (``layerwise``), RepQ-ViT's reparameterisation (``repq``), CRL (``crl``), CRL with LRP
mixed precision by the paper's rule (``crl+lrp``: importance scored on the calibration canvases) and the same rule
with random importance at the same size (``crl+random``).

Results go to benchmarks/results/dense.json (saved after every run; a re-run skips what is there, and a retrained
model starts afresh) and dense.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import UperNetForSemanticSegmentation

from optimum_lrpqvit import LRPQConfig, applied_config, quantize
from optimum_lrpqvit.data import load_coco, load_image_processor
from optimum_lrpqvit.dense_evaluation import mean_iou, predict_coco, semantic_target

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METHODS = {
    "layerwise": {"post_ln": "layerwise"},
    "repq": {"post_ln": "repq"},
    "crl": {"post_ln": "crl"},
    "crl+lrp": {"post_ln": "crl", "mixed_precision": True, "importance": "lrp"},
    "crl+random": {"post_ln": "crl", "mixed_precision": True, "importance": "random"},
}


def calibration_pixels(split, processor, seed: int, n: int) -> torch.Tensor:
    ids = split.image_ids
    chosen = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return processor([split.image(ids[i]) for i in chosen], return_tensors="pt")["pixel_values"]


def measure(model, processor, val, targets, reference=None) -> tuple[list[np.ndarray], dict]:
    maps = [r["label_map"] for r in predict_coco(model, processor, val, batch_size=64)]
    metrics = {"miou": mean_iou(maps, targets, len(model.config.id2label))}
    if reference is not None:
        metrics["pixel_agreement"] = 100 * float(np.mean([np.mean(a == b) for a, b in zip(maps, reference)]))
    return maps, metrics


def _mean_std(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(entry: dict, command: str) -> str:
    groups: dict[str, list[dict]] = {}
    for run_key, metrics in entry["runs"].items():
        groups.setdefault(run_key.rsplit("/seed=", 1)[0], []).append(metrics)
    lines = [f"Made with `{command}` ({entry['model']}, {entry['num_val']} validation canvases of "
             f"{entry['data']}, 32 calibration canvases per seed; the head stays float).", "",
             f"Full precision: mIoU {entry['full_precision']['miou']:.2f} %.", "",
             "| W/A | method | avg w bits | mIoU (%) | Δ mIoU to FP | pixel agreement with FP (%) | seeds | "
             "quantize (s) |", "|---|---|---|---|---|---|---|---|"]
    fp = entry["full_precision"]["miou"]
    for group, runs in sorted(groups.items(), key=lambda kv: (int(kv[0][1:].split("A")[0]),
                                                              list(METHODS).index(kv[0].split("/", 1)[1]))):
        wa, method = group.split("/", 1)
        lines.append(f"| {wa[1:].replace('A', '/')} | {method} | {_mean_std([r['avg_w_bits'] for r in runs], 3)} | "
                     f"{_mean_std([r['miou'] for r in runs], 2)} | {_mean_std([r['miou'] - fp for r in runs], 2)} | "
                     f"{_mean_std([r['pixel_agreement'] for r in runs], 2)} | {len(runs)} | "
                     f"{_mean_std([r['quantize_seconds'] for r in runs], 1)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "reference_models" / "upernet-swin-fashion-coco"))
    parser.add_argument("--data", default=str(ROOT / "data" / "fashion-coco"))
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 6])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-calibration", type=int, default=32)
    args = parser.parse_args()
    command = "python benchmarks/dense.py " + " ".join(sys.argv[1:])
    out_json = RESULTS / "dense.json"
    entry = json.loads(out_json.read_text()) if out_json.exists() else {}
    weights = hashlib.sha256((Path(args.model) / "model.safetensors").read_bytes()).hexdigest()[:16]
    if entry.get("model_sha256") != weights:  # a retrained model: its old runs do not count
        entry = {"model_sha256": weights, "runs": {}}
    model = UperNetForSemanticSegmentation.from_pretrained(args.model, use_safetensors=True).eval()
    processor = load_image_processor(args.model)
    train, val = load_coco(args.data, "train"), load_coco(args.data, "val")
    targets = [semantic_target(val, i, model.config) for i in val.image_ids]
    reference, entry["full_precision"] = measure(model, processor, val, targets)
    entry.update(model=Path(args.model).name, data=Path(args.data).name, num_val=len(targets), command=command)

    def save() -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        tmp = out_json.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entry, indent=2) + "\n")
        os.replace(tmp, out_json)
        (RESULTS / "dense.md").write_text(markdown(entry, command))

    save()
    for bits in args.bits:
        for method in args.methods:
            for seed in args.seeds:
                run_key = f"W{bits}A{bits}/{method}/seed={seed}"
                if run_key in entry["runs"]:
                    continue
                config = LRPQConfig(w_bits=bits, a_bits=bits, seed=seed, **METHODS[method])
                pixels = calibration_pixels(train, processor, seed, args.num_calibration)
                start = time.perf_counter()
                quantized = quantize(copy.deepcopy(model), config, pixels)
                seconds = time.perf_counter() - start
                _, metrics = measure(quantized, processor, val, targets, reference)
                entry["runs"][run_key] = {**metrics, **applied_config(quantized).bit_plan_summary,
                                          "quantize_seconds": round(seconds, 2)}
                print(run_key, entry["runs"][run_key], flush=True)
                save()
    print(markdown(entry, command))


if __name__ == "__main__":
    main()
