"""The README's main job: quantize the bundled reference ViT on Fashion-MNIST and compare accuracies.

    python examples/quantize_reference.py [--model reference_models/vit-fashion-mnist] [--w-bits 4] [--a-bits 4]
        [--post-ln crl] [--no-mixed-precision] [--allocation paper|budget] [--num-calibration-samples 32]
        [--num-importance-samples 256] [--seed 0] [--out DIR]

Scores LRP layer importance on seeded random Fashion-MNIST training images, allocates bits (LRP-QViT's rule by
default) at the size of uniform W-bit quantization, calibrates on other training images, evaluates full
precision and the quantized model on the 10,000 test images, prints them side by side and writes the
quantized model (safetensors, fake-quantized weights, the bit plan in config.json), its processor,
results.json and importance.png (importance per layer and block, with the bit plan) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from optimum_lrpqvit import LRPQConfig, quantize
from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.data import load_fashion_mnist, preprocess
from optimum_lrpqvit.evaluation import fidelity, predict_logits
from optimum_lrpqvit.report import plot_importance

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "reference_models" / "vit-fashion-mnist"))
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--post-ln", default="crl", choices=["layerwise", "channelwise", "repq", "crl"])
    parser.add_argument("--crl-k", type=float, default=None, help="CRL band (default: LRPQConfig's)")
    parser.add_argument("--no-mixed-precision", dest="mixed_precision", action="store_false",
                        help="fixed W/A bits everywhere instead of LRP mixed precision")
    parser.add_argument("--allocation", default="paper", choices=["paper", "budget"])
    parser.add_argument("--importance", default="lrp", choices=["lrp", "random", "uniform"])
    parser.add_argument("--num-calibration-samples", type=int, default=32)
    parser.add_argument("--num-importance-samples", type=int, default=256)
    parser.add_argument("--num-eval-samples", type=int, default=None, help="default: all 10,000 test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default: outputs/<model>-w<W>a<A>-<post_ln>")
    args = parser.parse_args()

    model = AutoModelForImageClassification.from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    data = load_fashion_mnist()
    calib_idx = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(args.seed))
    calib, _ = preprocess(data["train"], processor, calib_idx[: args.num_calibration_samples].tolist())
    n_calib, n_imp = args.num_calibration_samples, args.num_importance_samples
    importance_images, _ = preprocess(data["train"], processor, calib_idx[n_calib: n_calib + n_imp].tolist())
    test = data["test"] if args.num_eval_samples is None else data["test"].select(range(args.num_eval_samples))
    pixels, labels = preprocess(test, processor)

    fp_logits = predict_logits(model, pixels, desc="full precision")
    config = LRPQConfig(w_bits=args.w_bits, a_bits=args.a_bits, post_ln=args.post_ln,
                        mixed_precision=args.mixed_precision, allocation=args.allocation, importance=args.importance,
                        seed=args.seed, **({} if args.crl_k is None else {"crl_k": args.crl_k}))
    layout = find_family(model).layout(model)
    start = time.perf_counter()
    quantize(model, config, calib, importance_data=importance_images)
    calibration_s = time.perf_counter() - start
    label = f"W{args.w_bits}/A{args.a_bits} {args.post_ln}" + (
        f" {args.importance} mixed ({args.allocation})" if args.mixed_precision else "")
    q_logits = predict_logits(model, pixels, desc=label)

    fp, q = fidelity(fp_logits, labels), fidelity(q_logits, labels, fp_logits)
    name = Path(args.model).name
    print(f"\n{name} on {len(labels)} Fashion-MNIST test images, {n_calib} calibration images"
          + (f", {n_imp} importance images" if args.mixed_precision else "")
          + f" (seed {args.seed}); quantization took {calibration_s:.1f} s")
    print("| model | top-1 (%) | agreement with FP (%) | KL(FP ‖ q) |")
    print("|---|---|---|---|")
    print(f"| full precision | {fp['top1']:.2f} | 100.00 | 0 |")
    print(f"| {label} | {q['top1']:.2f} | {q['agreement']:.2f} | {q['kl']:.4f} |")
    summary = config.bit_plan_summary
    print(f"bit plan: avg weight bits {summary['avg_w_bits']}, avg activation bits {summary['avg_a_bits']}, "
          f"{summary['size_mb']} MB")

    suffix = f"-{args.importance}-{args.allocation}" if args.mixed_precision else ""
    out = Path(args.out or ROOT / "outputs" / f"{name}-w{args.w_bits}a{args.a_bits}-{args.post_ln}{suffix}")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if args.mixed_precision:
        plot_importance(config.importance_scores, config.bit_plan, layout.block_of, out / "importance.png",
                        title=f"{name}: {args.importance} importance and bit plan ({args.allocation} rule)")
    results = {"model": args.model, "config": config.to_dict(), "calibration_s": calibration_s,
               "num_test_images": len(labels), "full_precision": fp, "quantized": q}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"quantized model written to {out}")


if __name__ == "__main__":
    main()
