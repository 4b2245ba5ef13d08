"""Full-size dense models with random weights: Mask2Former Swin-T (COCO instance) and UperNet Swin-T (ADE20k),
built from their published config values (no download), quantized with the backbone only and, for Mask2Former,
with its head's Linear layers too (``quantize_head``).

    python benchmarks/dense_full_size.py [--images 4] [--size 224]

For each model and W/A: the relative error ‖z_q − z‖ / ‖z‖ of the class logits (Mask2Former: per query; UperNet:
per pixel) against full precision on seeded random images, their arg-max agreement, the quantization time and
the peak RSS. Random weights say nothing about accuracy; they show what the quantized head adds to the backbone's
error, and that the wiring holds at full size. Results: benchmarks/results/dense_full_size.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

import torch

from optimum_lrpqvit import LRPQConfig, quantize
from optimum_lrpqvit.architectures import find_family

RESULTS = Path(__file__).resolve().parent / "results"
# the published config values, shared with the test of the same wiring
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from models import FULL_SIZE_DENSE as MODELS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    x = torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, build in MODELS.items():
        torch.manual_seed(0)
        model = build()
        family = find_family(model)
        with torch.no_grad():
            reference = family.logits(model, x)
        classes = -1 if reference.dim() == 3 else 1
        heads = [False, True] if family.head_linears(model) else [False]
        for bits in (8, 6, 4):
            for head in heads:
                start = time.perf_counter()
                quantized = quantize(copy.deepcopy(model), LRPQConfig(w_bits=bits, a_bits=bits, quantize_head=head), x)
                seconds = time.perf_counter() - start
                with torch.no_grad():
                    got = family.logits(quantized, x)
                agreement = (got.argmax(classes) == reference.argmax(classes)).float().mean()
                rows.append({"model": name, "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                             "bits": bits, "head": "quantized" if head else "float",
                             "relative_error": float((got - reference).norm() / reference.norm()),
                             "agreement": 100 * float(agreement),
                             "quantize_seconds": round(seconds, 1)})
                print(json.dumps(rows[-1]), flush=True)
                del quantized
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    command = "python benchmarks/dense_full_size.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dense_full_size.json").write_text(json.dumps({"command": command, "images": args.images,
                                                              "size": args.size, "peak_rss_gib": round(peak, 2),
                                                              "rows": rows}, indent=2) + "\n")
    lines = [f"Made with `{command}` ({args.images} random {args.size}×{args.size} images; random weights; peak RSS "
             f"{peak:.2f} GiB).", "", "| model | params (M) | W/A | head | rel. error of class logits | arg-max "
             "agreement (%) | quantize (s) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['parameters_m']} | {r['bits']}/{r['bits']} | {r['head']} | "
              f"{r['relative_error']:.4f} | {r['agreement']:.2f} | {r['quantize_seconds']} |" for r in rows]
    (RESULTS / "dense_full_size.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
