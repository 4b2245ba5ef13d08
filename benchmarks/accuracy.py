"""Accuracy benchmark on the Fashion-MNIST reference models.

    python benchmarks/accuracy.py [--models reference_models/vit-fashion-mnist ...] [--bits 3 4 6]
        [--post-ln layerwise channelwise repq crl] [--seeds 0 1 2] [--crl-k 0.5 1 2 3 4] [--num-eval 10000]

For every model and its outlier-stressed variant (`optimum_lrpqvit.outliers`: γ, β of three channels of
every post-LayerNorm LayerNorm × 10/30/100, fed Linear columns ÷ the same): full precision, then each W/A
and post-LayerNorm treatment with 32 calibration images from the train split (3 calibration seeds at W4/A4,
the first seed elsewhere), evaluated on the test images: top-1, top-1 agreement with full precision and
mean KL(FP ‖ quantized). `--crl-k` adds a W4/A4 CRL sweep over the clipping band k.

Results go to benchmarks/results/accuracy.json (each entry is saved as soon as it is measured; a re-run
with the same arguments skips what is there) and accuracy.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from optimum_lrpqvit import LRPQConfig, quantize
from optimum_lrpqvit.data import load_fashion_mnist, preprocess
from optimum_lrpqvit.evaluation import fidelity, predict_logits
from optimum_lrpqvit.outliers import channel_range_ratio, inject_outlier_channels

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STRESS_FACTORS = (10.0, 30.0, 100.0)


def calibration_indices(seed: int, n: int, total: int) -> list[int]:
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def run(args: argparse.Namespace) -> dict:
    out_json = RESULTS / "accuracy.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    results["command"] = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:])
    data = load_fashion_mnist()

    def save() -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2) + "\n")

    for model_dir in args.models:
        name = Path(model_dir).name
        base = AutoModelForImageClassification.from_pretrained(model_dir).eval()
        processor = AutoImageProcessor.from_pretrained(model_dir)
        test = data["test"].select(range(args.num_eval))
        pixels, labels = preprocess(test, processor)
        for variant in ("original", "stress"):
            model = copy.deepcopy(base)
            if variant == "stress":
                inject_outlier_channels(model, STRESS_FACTORS)
            key = f"{name}/{variant}"
            entry = results.setdefault(key, {"runs": {}})
            ratios = channel_range_ratio(model, pixels[:32])
            entry["channel_range_ratio_median"] = statistics.median(ratios.values())
            fp_logits = predict_logits(model, pixels, desc=f"{key} FP")
            entry["full_precision"] = fidelity(fp_logits, labels)
            save()
            jobs = [(b, post, seed, None) for b in args.bits for post in args.post_ln
                    for seed in (args.seeds if b == 4 else args.seeds[:1])]
            jobs += [(4, "crl", seed, k) for k in args.crl_k for seed in args.seeds]
            for bits, post, seed, k in jobs:
                run_key = f"W{bits}A{bits}/{post}" + (f"/k={k:g}" if k is not None else "") + f"/seed={seed}"
                if run_key in entry["runs"]:
                    continue
                config = LRPQConfig(w_bits=bits, a_bits=bits, post_ln=post, **({"crl_k": k} if k else {}))
                calib, _ = preprocess(data["train"], processor,
                                      calibration_indices(seed, args.num_calibration, len(data["train"])),
                                      progress=False)
                quantized = quantize(copy.deepcopy(model), config, calib)
                logits = predict_logits(quantized, pixels, desc=f"{key} {run_key}")
                entry["runs"][run_key] = fidelity(logits, labels, fp_logits)
                print(key, run_key, entry["runs"][run_key], flush=True)
                save()
    return results


def _mean_std(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", ""]
    for key, entry in results.items():
        if not isinstance(entry, dict) or "runs" not in entry:
            continue
        fp = entry["full_precision"]["top1"]
        lines += [f"### {key} (FP top-1 {fp:.2f}%, widest/median post-LN channel range "
                  f"{entry['channel_range_ratio_median']:.1f}×)", "",
                  "| W/A | post_ln | top-1 (%) | agreement (%) | KL(FP ‖ q) | seeds |", "|---|---|---|---|---|---|"]
        groups: dict[str, list[dict]] = {}
        for run_key, metrics in entry["runs"].items():
            groups.setdefault(run_key.rsplit("/seed=", 1)[0], []).append(metrics)
        for group, runs in groups.items():
            wa, post = group.split("/", 1)
            lines.append(f"| {wa[1:].replace('A', '/')} | {post} | {_mean_std([r['top1'] for r in runs], 2)} | "
                         f"{_mean_std([r['agreement'] for r in runs], 2)} | {_mean_std([r['kl'] for r in runs], 4)} "
                         f"| {len(runs)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=sorted(str(p) for p in (ROOT / "reference_models").iterdir() if p.is_dir()))
    parser.add_argument("--bits", nargs="+", type=int, default=[3, 4, 6])
    parser.add_argument("--post-ln", nargs="+", default=["layerwise", "channelwise", "repq", "crl"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--crl-k", nargs="*", type=float, default=[])
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--num-eval", type=int, default=10_000)
    args = parser.parse_args()
    results = run(args)
    table = markdown(results)
    (RESULTS / "accuracy.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
