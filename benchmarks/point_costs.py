"""What each kind of quantized point costs: the model with only that group quantized, everything else float.

    python benchmarks/point_costs.py [--models ...] [--bits 8 4] [--num-eval 2000] [--seed 0]

For every reference model, W = A = b, quantized with the default config (CRL, log-√2), with
`softmax_quantizer="adalog"`, and with AdaLog, `post_ln="repq"` and min–max ranges (32 seeded calibration images):
KL(FP ‖ q) and top-1 agreement on the first `--num-eval` test images with all points quantized, then with one group
of points quantized alone: the weights; the inputs of the post-LayerNorm Linears (q/k/v, fc1, patch merging); the
other Linears' inputs by role (o_proj, fc2 = post-GELU, the classifier, ...); the patch-embedding input; q and k of
q·kᵀ; the probabilities A and V of A·V. The groups' costs do not add up exactly (the errors interact), but they rank
where the error comes from. Weights stay float (round-to-nearest, fake-quantized on each call) so that they can be
switched off.
Results in benchmarks/results/point_costs.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from accuracy import REFERENCE_MODELS, RESULTS, model_entry, reference_inputs

from optimum_lrpqvit import LRPQConfig
from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.bit_plan import BitPlan
from optimum_lrpqvit.data import load_fashion_mnist
from optimum_lrpqvit.evaluation import fidelity, predict_logits
from optimum_lrpqvit.nn import QuantConv2d, QuantLinear, QuantMatMul, quantizers
from optimum_lrpqvit.quantize import calibrate, prepare_model

CONFIGS = {"default": {}, "adalog": {"softmax_quantizer": "adalog"},
           # the best calibration-only W8/A8 recipe of benchmarks/peers.py, weights round-to-nearest here
           "adalog repq minmax": {"softmax_quantizer": "adalog", "post_ln": "repq", "percentiles": [1.0]}}


def groups(model: torch.nn.Module, layout) -> dict[str, list[torch.nn.Module]]:
    """Group name → the quantizers of that kind of point."""
    post_ln = {n for _, names in layout.post_ln for n in names}
    out: dict[str, list] = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            out.setdefault("weights", []).append(module.weight_quantizer)
            role = ("patch embedding input" if isinstance(module, QuantConv2d) else
                    "post-LN Linear inputs" if name in post_ln else f"{name.rsplit('.', 1)[-1]} input")
            out.setdefault(role, []).append(module.input_quantizer)
        elif isinstance(module, QuantMatMul):
            a, b = ("q", "k") if name.endswith("matmul1") else ("probabilities A", "V")
            out.setdefault(f"{a} (of {name.rsplit('.', 1)[-1]})", []).append(module.quantizer_a)
            out.setdefault(f"{b} (of {name.rsplit('.', 1)[-1]})", []).append(module.quantizer_b)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=REFERENCE_MODELS)
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    parser.add_argument("--num-eval", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out_json = RESULTS / "point_costs.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    data = load_fashion_mnist()
    for model_dir in args.models:
        name = Path(model_dir).name
        entry = model_entry(results, model_dir, args.num_eval)
        base, pixels, labels, calibration = reference_inputs(model_dir, data, args.seed, args.num_eval)
        reference = predict_logits(base, pixels, progress=False)
        for bits in args.bits:
            for config_name, options in CONFIGS.items():
                key = f"W{bits}/A{bits} {config_name}"
                if key in entry["runs"]:
                    continue
                model = copy.deepcopy(base)
                config = LRPQConfig(w_bits=bits, a_bits=bits, **options)
                family = find_family(model)
                layout = family.layout(model)
                prepare_model(model, family, layout, BitPlan.fixed(layout, bits, bits), config)
                calibrate(model, family, layout, config, calibration)
                everything = quantizers(model)
                run = {"all": fidelity(predict_logits(model, pixels, progress=False), labels, reference)}
                for group, members in groups(model, layout).items():
                    for q in everything:
                        q.enabled = any(q is m for m in members)
                    run[group] = fidelity(predict_logits(model, pixels, progress=False), labels, reference)
                print(name, key, {g: round(r["kl"], 5) for g, r in run.items()}, file=sys.stderr, flush=True)
                entry["runs"][key] = run
                entry["command"] = "python benchmarks/point_costs.py " + " ".join(sys.argv[1:])
                results[name] = entry
                RESULTS.mkdir(parents=True, exist_ok=True)
                out_json.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results)


def write_markdown(results: dict) -> None:
    lines = ["Made with `python benchmarks/point_costs.py`. KL(FP ‖ q) with only the named group of points "
             "quantized (everything else float), on the first "
             f"{next(iter(results.values()))['num_eval']} test images, 32 calibration images; `all`: every point.",
             ""]
    for name, entry in results.items():
        keys = list(entry["runs"])
        rows = list(next(iter(entry["runs"].values())))
        lines += [f"### {name}", "", "| points quantized | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for row in rows:
            lines.append(f"| {row} | " + " | ".join(
                f"{entry['runs'][k][row]['kl']:.5f}" if row in entry["runs"][k] else "–" for k in keys) + " |")
        lines.append("")
    (RESULTS / "point_costs.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
