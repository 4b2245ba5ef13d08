"""Calibration and fake-quant inference speed, as ratios to a full-precision forward pass in the same run.

    python benchmarks/speed.py [--family hf_vit|timm_vit] [--batch 32] [--repeats 7]

Model: a 12-block, 128-wide ViT (patch 4, 28×28 inputs, 3 channels), the size of the reference ViT. The
fake-quant forward is timed with the packed weights ``quantize()`` leaves (dequantized every call) and after
``unpack_weights`` (float weights holding the same values).
Writes benchmarks/results/speed.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from transformers import ViTConfig, ViTForImageClassification

from optimum_lrpqvit import LRPQConfig, quantize, unpack_weights


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "timm_vit":
        return timm.models.vision_transformer.VisionTransformer(
            img_size=28, patch_size=4, embed_dim=128, depth=12, num_heads=4, num_classes=10).eval()
    config = ViTConfig(image_size=28, patch_size=4, num_channels=3, hidden_size=128, num_hidden_layers=12,
                       num_attention_heads=4, intermediate_size=512, num_labels=10)
    return ViTForImageClassification(config).eval()


def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x) if isinstance(model, timm.models.VisionTransformer) else model(pixel_values=x).logits


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_ratio(fn, baseline, repeats: int) -> tuple[float, float]:
    """Median of time(fn) / time(baseline), each pair timed back to back (robust to a noisy machine);
    also returns the median time of fn."""
    fn(), baseline()  # warm-up
    pairs = [(timed(fn), timed(baseline)) for _ in range(repeats)]
    return statistics.median(a / b for a, b in pairs), statistics.median(a for a, _ in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="hf_vit", choices=["hf_vit", "timm_vit"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build(args.family)
    x = torch.randn(args.batch, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    fp_forward = lambda: forward(model, x)  # noqa: E731
    rows = {}
    for post_ln in ("repq", "crl"):
        config = LRPQConfig(w_bits=4, a_bits=4, post_ln=post_ln)
        calib_ratio, calib_s = paired_ratio(lambda: quantize(copy.deepcopy(model), config, x), fp_forward, 3)
        quantized = quantize(copy.deepcopy(model), config, x)
        fq_ratio, _ = paired_ratio(lambda: forward(quantized, x), fp_forward, args.repeats)
        unpack_weights(quantized)
        unpacked_ratio, _ = paired_ratio(lambda: forward(quantized, x), fp_forward, args.repeats)
        rows[post_ln] = {"calibration_s": calib_s, "calibration_over_fp": calib_ratio, "fake_quant_over_fp": fq_ratio,
                         "fake_quant_unpacked_over_fp": unpacked_ratio}
    fp_s = statistics.median(timed(fp_forward) for _ in range(args.repeats))
    result = {"family": args.family, "batch": args.batch, "threads": torch.get_num_threads(), "fp_forward_s": fp_s,
              "torch": torch.__version__, "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]),
              "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.family}, batch {args.batch}, {torch.get_num_threads()} threads; FP forward {fp_s * 1e3:.1f} ms")
    print("| post_ln | calibration (s) | calibration / FP forward | fake-quant forward / FP forward (packed) "
          "| (unpacked) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['calibration_s']:.2f} | {r['calibration_over_fp']:.1f}× "
              f"| {r['fake_quant_over_fp']:.2f}× | {r['fake_quant_unpacked_over_fp']:.2f}× |")


if __name__ == "__main__":
    main()
