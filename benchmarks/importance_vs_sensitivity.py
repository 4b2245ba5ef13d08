"""Does LRP rank layers by how much their quantization hurts? Importance against measured sensitivity.

    python benchmarks/importance_vs_sensitivity.py [--model reference_models/vit-fashion-mnist] [--bits 3]
        [--num-importance 256] [--num-eval 2000]

For every weight point of the model, only that layer's weights are quantized (per output channel, `--bits`,
the range search of `QuantLinear`) and the sensitivity is KL(FP ‖ that model), averaged over `--num-eval` test
images. The LRP importance (`compute_importance` on `--num-importance` seeded training images) is compared with
it by Spearman rank correlation, over all weight points and without the classifier head(s) (whose LRP score
is 1/classes by construction). Writes benchmarks/results/importance_vs_sensitivity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from transformers import AutoImageProcessor, AutoModelForImageClassification

from optimum_lrpqvit import compute_importance
from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.data import load_image_dataset, preprocess
from optimum_lrpqvit.evaluation import predict_logits
from optimum_lrpqvit.quantizers import fake_quant_uniform, search_uniform_params

ROOT = Path(__file__).resolve().parent.parent


def quantized_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    cols = weight.reshape(weight.shape[0], -1).t()
    scale, zero = search_uniform_params(cols, bits, channelwise=True)
    return fake_quant_uniform(cols, scale, zero, bits).t().reshape(weight.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "reference_models" / "vit-fashion-mnist"))
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--num-importance", type=int, default=256)
    parser.add_argument("--num-eval", type=int, default=2000)
    args = parser.parse_args()
    model = AutoModelForImageClassification.from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    importance_pixels, _ = preprocess(load_image_dataset("fashion_mnist", "train", num_samples=args.num_importance),
                                      processor)
    pixels, _ = preprocess(load_image_dataset("fashion_mnist", "test").select(range(args.num_eval)), processor)
    scores = compute_importance(model, importance_pixels)
    layout = find_family(model).layout(model)
    fp = F.log_softmax(predict_logits(model, pixels, progress=False), -1)
    sensitivity = {}
    for point in layout.weight_points():
        module = model.get_submodule(point)
        original = module.weight.data.clone()
        module.weight.data = quantized_weight(original, args.bits)
        q = F.log_softmax(predict_logits(model, pixels, progress=False), -1)
        module.weight.data = original
        sensitivity[point] = float(F.kl_div(q, fp, log_target=True, reduction="batchmean"))
        print(f"{point}: importance {scores[point]:.4f}, KL {sensitivity[point]:.5f}", flush=True)
    heads = {p for p in sensitivity if layout.block_of[p] == max(layout.block_of.values())}
    result = {"command": "python benchmarks/importance_vs_sensitivity.py " + " ".join(sys.argv[1:]),
              "model": args.model, "bits": args.bits, "importance": {p: scores[p] for p in sensitivity},
              "sensitivity_kl": sensitivity}
    for label, points in (("all weight points", list(sensitivity)),
                          ("without heads", [p for p in sensitivity if p not in heads])):
        rho = spearmanr([scores[p] for p in points], [sensitivity[p] for p in points]).statistic
        result[f"spearman_{label.replace(' ', '_')}"] = rho
        print(f"Spearman rank correlation, LRP importance vs {args.bits}-bit sensitivity, {label} "
              f"({len(points)}): {rho:.3f}")
    out = ROOT / "benchmarks" / "results" / f"importance_vs_sensitivity_{Path(args.model).name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
