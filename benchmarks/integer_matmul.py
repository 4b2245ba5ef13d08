"""CUDA only: quantized Linear layers through ``torch._int_mm`` (``use_integer_matmul``) against the fake-quant
forward, FP32 and FP16, on a ViT-S/16-224-sized model with random weights (nothing is downloaded).

    python benchmarks/integer_matmul.py [--batch 64] [--repeats 20]

Prints median latencies (CUDA events, after warm-up), the ratios to FP16, and the largest logit difference
between the integer path and the fake-quant path. Writes benchmarks/results/integer_matmul.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

from optimum_lrpqvit import LRPQConfig, quantize, use_integer_matmul

ROOT = Path(__file__).resolve().parents[1]


def cuda_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/integer_matmul.py needs a CUDA device (torch._int_mm is a slow reference on "
                         "the CPU); tests/test_integer_matmul.py checks the path's exactness on the CPU.")
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=384, num_attention_heads=6,
                                                intermediate_size=1536)).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    results = {"command": " ".join(["python", *sys.argv]), "device": torch.cuda.get_device_name(),
               "torch": torch.__version__, "batch": args.batch, "ms": {}}
    fp32 = model.cuda()
    fp16 = copy.deepcopy(model).half()
    quantized = {}
    for bits in (8, 4):
        q = quantize(copy.deepcopy(model), LRPQConfig(w_bits=bits, a_bits=bits), x[:8].cuda())
        quantized[f"fake-quant W{bits}/A{bits}"] = q
        quantized[f"int_mm W{bits}/A{bits}"] = use_integer_matmul(copy.deepcopy(q))
    x = x.cuda()
    with torch.no_grad():
        results["ms"]["FP32"] = cuda_ms(lambda: fp32(pixel_values=x), args.repeats)
        results["ms"]["FP16"] = cuda_ms(lambda: fp16(pixel_values=x.half()), args.repeats)
        for label, m in quantized.items():
            results["ms"][label] = cuda_ms(lambda m=m: m(pixel_values=x), args.repeats)
        results["max_abs_logit_diff"] = {
            bits: float((quantized[f"int_mm W{bits}/A{bits}"](pixel_values=x).logits
                         - quantized[f"fake-quant W{bits}/A{bits}"](pixel_values=x).logits).abs().max())
            for bits in (8, 4)}
    print(f"{results['device']}, batch {args.batch}, median of {args.repeats}")
    print("| variant | ms | vs FP16 |")
    print("|---|---|---|")
    for label, ms in results["ms"].items():
        print(f"| {label} | {ms:.2f} | {ms / results['ms']['FP16']:.3f} |")
    print("largest logit difference int_mm vs fake-quant:", results["max_abs_logit_diff"])
    (ROOT / "benchmarks" / "results" / "integer_matmul.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
