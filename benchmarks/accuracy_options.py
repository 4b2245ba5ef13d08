"""The accuracy options beyond the paper: AdaLog probabilities, GPTQ weight rounding, alone and combined.

    python benchmarks/accuracy_options.py [--models ...] [--bits 3 4 6] [--methods ...] [--seeds 0 1 2]
        [--num-eval 10000]

For each reference model and W = A = b: CRL as the paper (log-√2 probabilities, uniform post-GELU activations,
round-to-nearest weights), then with `softmax_quantizer="adalog"`, `gelu_quantizer="adalog"` or
`weight_rounding="gptq"` alone, with all three, and with all three and LRP mixed precision (paper rule, 256
importance images). 32 calibration images per seed from the train split; evaluated on
the test images (top-1, agreement with full precision, KL(FP ‖ quantized)) with the quantization time
(`quantize_seconds`, calibration and rounding). Writes benchmarks/results/accuracy_options.json and .md.
"""

from __future__ import annotations

import argparse

from accuracy import Job, default_models, run_jobs, write_markdown

ALL = {"softmax_quantizer": "adalog", "gelu_quantizer": "adalog", "weight_rounding": "gptq"}
METHODS = {
    "crl": {},
    "crl adalog": {"softmax_quantizer": "adalog"},
    "crl adalog-gelu": {"gelu_quantizer": "adalog"},
    "crl gptq": {"weight_rounding": "gptq"},
    "crl all three": ALL,
    "crl all three lrp paper": {**ALL, "mixed_precision": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--bits", nargs="+", type=int, default=[3, 4, 6])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-eval", type=int, default=10_000)
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite accuracy_options.md from accuracy_options.json")
    args = parser.parse_args()
    if args.markdown_only:
        print(write_markdown("accuracy_options"))
        return
    jobs: list[Job] = [(f"W{b}A{b}/{m}", {"w_bits": b, "a_bits": b, "post_ln": "crl", **METHODS[m]}, seed)
                       for seed in args.seeds for b in args.bits for m in args.methods]
    results = run_jobs(args.models or default_models(), jobs, ("original",), "accuracy_options", args.num_eval)
    print(write_markdown("accuracy_options", results))


if __name__ == "__main__":
    main()
