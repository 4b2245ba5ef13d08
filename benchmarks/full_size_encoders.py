"""The transformers encoder adapters on full-size configurations (the published config values, random weights, no
download), through the public API: W8/A8 quantization with 2 images at the native resolution, then a save and a
reload.

    python benchmarks/full_size_encoders.py [--models dinov2-small clip-vit-b-32 ...]

Checks, per model: every Linear of the encoder (all but those kept float by design: SigLIP's attention-pooling
head, Swinv2's position-bias MLP) became a quantized point; the smallest cosine similarity of the W8/A8 outputs
(logits or embeddings) to the float model's; the reloaded model gives the same outputs bit for bit. Wall times
of quantize() and of the reload are reported (this machine, noisy). Results: benchmarks/results/full_size_encoders.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch import nn

from optimum_lrpqvit import LRPQConfig, load_quantized, quantize, save_quantized
from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.nn import QuantLinear

RESULTS = Path(__file__).resolve().parent / "results"
_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
# name: (model class, config class, config values of the published checkpoint, input size)
CONFIGS = {
    "dinov2-small": ("Dinov2Model", "Dinov2Config", dict(hidden_size=384, num_hidden_layers=12,
                                                         num_attention_heads=6, patch_size=14, image_size=518), 224),
    "clip-vit-base-patch32": ("CLIPVisionModelWithProjection", "CLIPVisionConfig",
                              dict(**_BASE, patch_size=32, image_size=224, projection_dim=512), 224),
    "siglip-base-patch16-224": ("SiglipVisionModel", "SiglipVisionConfig", dict(**_BASE, patch_size=16,
                                                                                 image_size=224), 224),
    "beit-base-patch16-224": ("BeitForImageClassification", "BeitConfig",
                              dict(**_BASE, use_relative_position_bias=True, use_mean_pooling=True,
                                   layer_scale_init_value=0.1, num_labels=1000), 224),
    "swinv2-tiny-patch4-window8-256": ("Swinv2ForImageClassification", "Swinv2Config",
                                       dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                                            window_size=8, image_size=256, num_labels=1000), 256),
}
FLOAT_BY_DESIGN = ("head.attention", "head.mlp", "continuous_position_bias_mlp")


def measure(name: str) -> dict:
    model_class, config_class, values, size = CONFIGS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**values)).eval()
    linears = {n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(part in n for part in FLOAT_BY_DESIGN)}
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    family = find_family(model)
    with torch.no_grad():
        expected = family.logits(model, x)
    started = time.perf_counter()
    quantize(model, LRPQConfig(w_bits=8, a_bits=8), x)
    quantize_s = time.perf_counter() - started
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    with torch.no_grad():
        got = family.logits(model, x)
    with tempfile.TemporaryDirectory() as directory:
        save_quantized(model, directory)
        started = time.perf_counter()
        reloaded = load_quantized(directory)
        load_s = time.perf_counter() - started
        with torch.no_grad():
            same = torch.equal(family.logits(reloaded, x), got)
    return {"class": model_class, "family": family.name, "linears": len(linears), "quantized_linears": len(quantized),
            "all_linears_quantized": quantized == linears,
            "min_cosine_w8a8": torch.nn.functional.cosine_similarity(got, expected).min().item(),
            "reload_identical": same, "quantize_s": round(quantize_s, 1), "load_s": round(load_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()
    results = {name: measure(name) for name in args.models}
    command = "python benchmarks/full_size_encoders.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "full_size_encoders.json").write_text(json.dumps({"command": command, "results": results}, indent=2)
                                                      + "\n")
    lines = [f"`{command.strip()}` (2 images, W8/A8, random weights)",
             "| config | class | quantized Linears / Linears | smallest cosine W8/A8 vs float | reload identical | "
             "quantize (s) | reload (s) |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | `{r['class']}` | {r['quantized_linears']} / {r['linears']} | "
                     f"{r['min_cosine_w8a8']:.4f} | {r['reload_identical']} | {r['quantize_s']} | {r['load_s']} |")
    (RESULTS / "full_size_encoders.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
