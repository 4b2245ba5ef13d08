"""Does LRP rank layers by how much their quantization hurts? Importance against measured sensitivity.

    python benchmarks/importance_vs_sensitivity.py [--model reference_models/vit-fashion-mnist] [--bits 3]
        [--num-importance 256] [--num-eval 2000] [--from-json]

For every weight point of the model, only that layer's weights are quantized (per output channel, `--bits`,
the range search of `QuantLinear`) and the sensitivity is KL(FP ‖ that model), averaged over `--num-eval` test
images. The LRP importance (`compute_importance` on `--num-importance` seeded training images) is compared with
it by Spearman rank correlation (see ``correlations``). Writes
benchmarks/results/importance_vs_sensitivity_<model>.json; ``--from-json`` recomputes the correlations from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from transformers import AutoModelForImageClassification

from optimum_lrpqvit import compute_importance
from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.data import load_image_dataset, load_image_processor, preprocess
from optimum_lrpqvit.evaluation import predict_logits
from optimum_lrpqvit.importance import fisher_importance, relative_importance
from optimum_lrpqvit.quantizers import fake_quant_weight

ROOT = Path(__file__).resolve().parent.parent


def correlations(importance: dict[str, float], sensitivity: dict[str, float], block_of: dict[str, int],
                 fisher: dict[str, float]) -> dict:
    """Spearman ρ between importance and sensitivity: raw LRP over all weight points, without the head(s), over
    the blocks' layers alone (no patch embedding, no head), and there for LRP normalised per layer role, for
    block depth alone (earlier = more sensitive) and for Fisher importance (at the same bits)."""
    last = max(block_of.values())
    points = list(sensitivity)
    without_heads = [p for p in points if block_of[p] != last]
    blocks = [p for p in without_heads if block_of[p] >= 0]
    per_role = relative_importance("lrp_per_role", blocks, importance)
    rho = {}
    for label, chosen, score in (("all weight points", points, importance),
                                 ("without heads", without_heads, importance),
                                 ("block layers", blocks, importance),
                                 ("block layers, LRP per role", blocks, per_role),
                                 ("block layers, depth alone", blocks, {p: -block_of[p] for p in blocks}),
                                 ("all weight points, Fisher", points, fisher),
                                 ("block layers, Fisher", blocks, fisher)):
        rho[label] = spearmanr([score[p] for p in chosen], [sensitivity[p] for p in chosen]).statistic
        print(f"Spearman ρ, importance vs sensitivity, {label} ({len(chosen)}): {rho[label]:.3f}")
    for role in sorted({p.rsplit(".", 1)[-1] for p in blocks}):
        mine = [p for p in blocks if p.rsplit(".", 1)[-1] == role]
        rho[f"role {role}"] = spearmanr([importance[p] for p in mine], [sensitivity[p] for p in mine]).statistic
        print(f"  within {role} ({len(mine)}): {rho[f'role {role}']:.3f}")
    return rho


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "reference_models" / "vit-fashion-mnist"))
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--num-importance", type=int, default=256)
    parser.add_argument("--num-eval", type=int, default=2000)
    parser.add_argument("--from-json", action="store_true",
                        help="recompute the correlations from the measurements saved by an earlier run")
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results" / f"importance_vs_sensitivity_{Path(args.model).name}.json"
    model = AutoModelForImageClassification.from_pretrained(args.model).eval()
    layout = find_family(model).layout(model)
    processor = load_image_processor(args.model)
    importance_pixels, _ = preprocess(load_image_dataset("fashion_mnist", "train", num_samples=args.num_importance),
                                      processor)
    if args.from_json:
        result = json.loads(out.read_text())
        result["correlations_command"] = "python benchmarks/importance_vs_sensitivity.py " + " ".join(sys.argv[1:])
    else:
        result = measure(model, layout.weight_points(), processor, importance_pixels, args)
    if result.get("fisher_importance") is None:
        result["fisher_importance"] = fisher_importance(model, importance_pixels, result["bits"])
    result["spearman"] = correlations(result["importance"], result["sensitivity_kl"], layout.block_of,
                                      result["fisher_importance"])
    out.write_text(json.dumps(result, indent=2) + "\n")


def measure(model, weight_points: list[str], processor, importance_pixels: torch.Tensor,
            args: argparse.Namespace) -> dict:
    """LRP importance, and the KL sensitivity of each weight point quantized alone."""
    pixels, _ = preprocess(load_image_dataset("fashion_mnist", "test").select(range(args.num_eval)), processor)
    scores = compute_importance(model, importance_pixels)
    fp = F.log_softmax(predict_logits(model, pixels, progress=False), -1)
    sensitivity = {}
    for point in weight_points:
        module = model.get_submodule(point)
        original = module.weight.data.clone()
        module.weight.data = fake_quant_weight(original, args.bits)
        q = F.log_softmax(predict_logits(model, pixels, progress=False), -1)
        module.weight.data = original
        sensitivity[point] = float(F.kl_div(q, fp, log_target=True, reduction="batchmean"))
        print(f"{point}: importance {scores[point]:.4f}, KL {sensitivity[point]:.5f}", flush=True)
    return {"command": "python benchmarks/importance_vs_sensitivity.py " + " ".join(sys.argv[1:]),
            "model": args.model, "bits": args.bits, "importance": {p: scores[p] for p in sensitivity},
            "sensitivity_kl": sensitivity}


if __name__ == "__main__":
    main()
