"""Packed checkpoint size against full precision and the ideal Σ params × bits / 8 (+ other params × 4 bytes).

    python benchmarks/checkpoint_size.py [--models deit-s swin-t ...] [--bits 3 4] [--reference DIR ...]

Random-weight HF models with the sizes of DeiT-Ti/S, ViT-B/16 and Swin-T (built from configs, nothing is
downloaded) and, with --reference, saved models such as reference_models/vit-fashion-mnist; quantized with
4 random calibration images (size does not depend on them), saved with save_pretrained.
Writes benchmarks/results/checkpoint_size.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageClassification,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from optimum_lrpqvit import LRPQConfig, quantize
from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.serialization import checkpoint_sizes

BUILDERS = {
    "deit-ti": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(hidden_size=192, num_attention_heads=3,
                                                                        intermediate_size=768)),
    "deit-s": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(hidden_size=384, num_attention_heads=6,
                                                                       intermediate_size=1536)),
    "vit-b": lambda: ViTForImageClassification(ViTConfig()),
    "swin-t": lambda: SwinForImageClassification(SwinConfig()),
}


def measure(model: torch.nn.Module, bits: int) -> dict[str, float]:
    channels, height, width = find_family(model).input_shape(model)
    size = height or 224
    x = torch.randn(4, channels, size, width or size, generator=torch.Generator().manual_seed(0))
    quantize(model.eval(), LRPQConfig(w_bits=bits, a_bits=bits), x)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return checkpoint_sizes(model, directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["deit-s", "swin-t"], choices=list(BUILDERS))
    parser.add_argument("--reference", nargs="*", default=[])
    parser.add_argument("--bits", nargs="+", type=int, default=[3, 4])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoint_size.json"))
    args = parser.parse_args()
    rows = {}
    for bits in args.bits:
        for name in args.models:
            torch.manual_seed(0)
            rows[f"{name}/W{bits}"] = measure(BUILDERS[name](), bits)
        for path in args.reference:
            rows[f"{Path(path).name}/W{bits}"] = measure(AutoModelForImageClassification.from_pretrained(path), bits)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/checkpoint_size.py " + " ".join(sys.argv[1:]),
                                          "results": rows}, indent=2) + "\n")
    print("| model | file (MB) | ideal (MB) | file / ideal | file / float32 |")
    print("|---|---|---|---|---|")
    for key, r in rows.items():
        print(f"| {key} | {r['file_bytes'] / 1e6:.2f} | {r['ideal_bytes'] / 1e6:.2f} | {r['vs_ideal']:.3f} | "
              f"{r['vs_full_precision']:.3f} |")


if __name__ == "__main__":
    main()
