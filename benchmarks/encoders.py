"""Image encoders without a classifier (Dinov2Model, ViTMSNModel, ViTMAEModel), quantized and evaluated on their
embeddings, on the 10,000 Fashion-MNIST test images.

    python benchmarks/encoders.py [--encoders dinov2 vit_msn vit_mae] [--bits 8 6 4] [--seeds 0 1 2]
        [--num-index 10000] [--num-eval 10000]

No trained encoder of these classes can be downloaded here, so each is built from the trained reference ViT
(`reference_models/vit-fashion-mnist`): the same weights in the encoder's own class and layer names (Dinov2 with
layer scale 1), checked to give the ViT's [CLS] feature after its final LayerNorm to 1e-4. The encoder then goes
through the library as a user's Dinov2Model would: quantized with 32 train images (W/A at every bit width, and W4/A4
with LRP mixed precision scored on the embedding target with 256 images), and evaluated by the top-1 of a cosine
k-NN classifier (k = 20) on its own embeddings of `--num-index` train images, and by the cosine similarity of its
embeddings to the float encoder's.

Results go to benchmarks/results/encoders.json (saved after every run; a re-run skips what is there, so runs
with other arguments add to one table) and encoders.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import transformers
from transformers import ViTForImageClassification

from optimum_lrpqvit import LRPQConfig, quantize
from optimum_lrpqvit.data import load_fashion_mnist, load_image_processor, preprocess
from optimum_lrpqvit.evaluation import embedding_fidelity, predict_logits

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "reference_models" / "vit-fashion-mnist"
RESULTS = ROOT / "benchmarks" / "results"
ENCODERS = ("dinov2", "vit_msn", "vit_mae")


def encoder_from_vit(vit: ViTForImageClassification, kind: str) -> torch.nn.Module:
    """The ViT's encoder as a ``kind`` model with the same weights (its classifier dropped)."""
    c = vit.config
    sizes = {key: getattr(c, key) for key in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                              "num_attention_heads", "image_size", "patch_size", "num_channels",
                                              "layer_norm_eps", "hidden_act")}
    state = {k.removeprefix("vit."): v for k, v in vit.state_dict().items() if k.startswith("vit.")}
    if kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(**sizes, layerscale_value=1.0))
        renamed = {}
        for key, value in state.items():
            key = key.replace("layers.", "encoder.layer.").replace("layernorm_before", "norm1")
            renamed[key.replace("layernorm_after", "norm2")] = value
        missing, unexpected = model.load_state_dict(renamed, strict=False)
        assert not unexpected and all("layer_scale" in k or k == "embeddings.mask_token" for k in missing), missing
    elif kind == "vit_msn":
        model = transformers.ViTMSNModel(transformers.ViTMSNConfig(**sizes))
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("pooler.")})
    else:
        model = transformers.ViTMAEModel(transformers.ViTMAEConfig(**sizes, mask_ratio=0.0))
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("pooler.")})
    return model.eval()


def vit_features(vit: ViTForImageClassification, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vit.vit(pixel_values=pixels).last_hidden_state[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", choices=ENCODERS, default=list(ENCODERS))
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-index", type=int, default=10000)
    parser.add_argument("--num-eval", type=int, default=10000)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out_json = RESULTS / "encoders.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    commands = results.setdefault("commands", [])
    for command in (results.pop("command", None), "python benchmarks/encoders.py " + " ".join(sys.argv[1:])):
        if command and command not in commands:
            commands.append(command)

    data = load_fashion_mnist()
    processor = load_image_processor(REFERENCE)
    index_rows = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(1234))[:args.num_index]
    index_pixels, index_labels = preprocess(data["train"].select(index_rows.tolist()), processor)
    pixels, labels = preprocess(data["test"].select(range(args.num_eval)), processor)
    vit = ViTForImageClassification.from_pretrained(REFERENCE).eval()
    reference_features = vit_features(vit, pixels[:256])
    for kind in args.encoders:
        runs = results.setdefault(kind, {})
        model = encoder_from_vit(vit, kind)
        fp = predict_logits(model, pixels, progress=False)
        error = float((fp[:256] - reference_features).abs().max())
        assert error < 1e-4, f"{kind} does not reproduce the ViT's features ({error})"
        fp_index = predict_logits(model, index_pixels, progress=False)
        if "full precision" not in runs:
            runs["full precision"] = embedding_fidelity(fp, labels, (fp_index, index_labels))
        jobs = [(f"W{b}/A{b}", {"w_bits": b, "a_bits": b}) for b in args.bits]
        jobs.append(("W4/A4 LRP mixed", {"w_bits": 4, "a_bits": 4, "mixed_precision": True}))
        for label, options in jobs:
            for seed in args.seeds:
                key = f"{label} seed {seed}"
                if key in runs:
                    continue
                train = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(seed))
                calibration, _ = preprocess(data["train"].select(train[:32].tolist()), processor, progress=False)
                importance = None
                if options.get("mixed_precision"):
                    importance, _ = preprocess(data["train"].select(train[32:288].tolist()), processor,
                                               progress=False)
                quantized = encoder_from_vit(vit, kind)
                quantize(quantized, LRPQConfig(seed=seed, **options), calibration, importance_data=importance)
                q = predict_logits(quantized, pixels, progress=False)
                q_index = predict_logits(quantized, index_pixels, progress=False)
                runs[key] = embedding_fidelity(q, labels, (q_index, index_labels), fp)
                print(kind, key, runs[key], flush=True)
                RESULTS.mkdir(parents=True, exist_ok=True)
                out_json.write_text(json.dumps(results, indent=2) + "\n")
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "encoders.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = ["Encoders built from the reference ViT: " + "; ".join(f"`{c.strip()}`" for c in results["commands"]),
             "| encoder | variant | k-NN top-1 (%) | cosine to FP, mean | cosine to FP, smallest |",
             "|---|---|---|---|---|"]
    for kind in ENCODERS:
        runs = results.get(kind)
        if not runs:
            continue
        fp = runs["full precision"]
        lines.append(f"| {kind} | full precision | {fp['knn_top1']:.2f} | 1 | 1 |")
        labels = sorted({k.rsplit(" seed ", 1)[0] for k in runs if " seed " in k},
                        key=lambda v: (-int(v[1]), v))
        for label in labels:
            seeds = [m for k, m in runs.items() if k.startswith(label + " seed ")]

            def stat(metric: str, digits: int) -> str:
                values = [m[metric] for m in seeds]
                spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
                return f"{statistics.mean(values):.{digits}f}{spread}"

            lines.append(f"| {kind} | {label} ({len(seeds)} seeds) | {stat('knn_top1', 2)} | {stat('cosine', 4)} | "
                         f"{stat('cosine_min', 4)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
