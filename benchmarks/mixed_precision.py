"""LRP mixed precision against fixed bits and other importance criteria, at equal model size.

    python benchmarks/mixed_precision.py [--models ...] [--bits 3 4 6] [--seeds 0 1 2] [--num-eval 10000]

For each reference model and average bit width b (W = A = b): fixed-bit CRL; LRP importance with the paper
rule and with the budget (integer program) allocation; LRP normalised per layer role, Fisher, random and
uniform importance with the paper rule (same size as LRP's plan); Fisher with the budget. "… budget" uses the
default candidates {3, 4, 5, 6, 8}, so at 3 bits it can only give every layer 3 bits; "… budget 2-8" adds 2 bits. 32
calibration images and 256 importance images per seed, drawn from the train split; evaluated on the test
images (top-1, agreement with full precision, KL(FP ‖ quantized)).
Writes benchmarks/results/mixed_precision.json and .md.
"""

from __future__ import annotations

from accuracy import methods_main

METHODS = {
    "fixed crl": {},
    "lrp paper": {"mixed_precision": True, "importance": "lrp", "allocation": "paper"},
    "lrp budget": {"mixed_precision": True, "importance": "lrp", "allocation": "budget"},
    "lrp budget 2-8": {"mixed_precision": True, "importance": "lrp", "allocation": "budget",
                       "candidate_bits": (2, 3, 4, 5, 6, 8)},
    "lrp_per_role paper": {"mixed_precision": True, "importance": "lrp_per_role", "allocation": "paper"},
    "fisher paper": {"mixed_precision": True, "importance": "fisher", "allocation": "paper"},
    "fisher budget": {"mixed_precision": True, "importance": "fisher", "allocation": "budget"},
    "fisher budget 2-8": {"mixed_precision": True, "importance": "fisher", "allocation": "budget",
                          "candidate_bits": (2, 3, 4, 5, 6, 8)},
    "random paper": {"mixed_precision": True, "importance": "random", "allocation": "paper"},
    "uniform paper": {"mixed_precision": True, "importance": "uniform", "allocation": "paper"},
}


def main() -> None:
    methods_main("mixed_precision", METHODS, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
