"""The ridge λ of activation compensation (`compensate_activations=True`), swept on the reference models.

    python benchmarks/compensation_ridge.py [--models ...] [--bits 4 3 8] [--ridges 0.01 0.03 0.1 0.3 1 3]
        [--num-eval 2000] [--seed 0]

AdaLog probabilities and post-GELU activations and GPTQ rounding (the options compensation is measured with), W = A
= b, 32 seeded calibration images from the train split, KL(FP ‖ q) and top-1 agreement on the first `--num-eval`
test images: without compensation, then with it at each λ (a multiple of the mean diagonal of each layer's
Hessian, `rounding.compensated_weight`). Writes benchmarks/results/compensation_ridge.json.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
from pathlib import Path
from unittest import mock

from accuracy import REFERENCE_MODELS, RESULTS, reference_inputs
from peers import logits_of

from optimum_lrpqvit import LRPQConfig, quantize, rounding
from optimum_lrpqvit.data import load_fashion_mnist
from optimum_lrpqvit.evaluation import fidelity

OPTIONS = {"softmax_quantizer": "adalog", "gelu_quantizer": "adalog", "weight_rounding": "gptq"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=REFERENCE_MODELS)
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3, 8])
    parser.add_argument("--ridges", nargs="+", type=float, default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--num-eval", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = RESULTS / "compensation_ridge.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    data = load_fashion_mnist()
    for model_dir in args.models:
        name = Path(model_dir).name
        base, pixels, labels, calibration = reference_inputs(model_dir, data, args.seed, args.num_eval)
        reference = logits_of(base, pixels)
        entry = results.setdefault(name, {"num_eval": args.num_eval, "seed": args.seed, "runs": {}})
        for bits in args.bits:
            for ridge in [None, *args.ridges]:
                key = f"W{bits}A{bits} " + ("no compensation" if ridge is None else f"ridge {ridge:g}")
                if key in entry["runs"]:
                    continue
                model = copy.deepcopy(base)
                config = LRPQConfig(w_bits=bits, a_bits=bits, compensate_activations=ridge is not None, **OPTIONS)
                # the λ of this run only: compensate_activations reads compensated_weight from the module
                solve = functools.partial(rounding.compensated_weight, ridge=ridge)
                with mock.patch.object(rounding, "compensated_weight", solve):
                    quantize(model, config, calibration, progress=False)
                entry["runs"][key] = fidelity(logits_of(model, pixels), labels, reference)
                print(name, key, {k: round(v, 6) for k, v in entry["runs"][key].items()}, flush=True)
                entry["command"] = "python " + " ".join(sys.argv)
                out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
