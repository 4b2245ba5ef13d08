"""Importance-scoring cost: images/s of ``compute_importance`` against a plain forward pass at the same batch
size, measured back to back in the same run.

    python benchmarks/scoring.py [--batch 32] [--repeats 5] [--threads N]

Model: the 12-block, 128-wide ViT of benchmarks/speed.py. Writes benchmarks/results/scoring.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import build, forward, paired_ratio  # noqa: E402

from optimum_lrpqvit import compute_importance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="hf_vit", choices=["hf_vit", "timm_vit"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scoring.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.family)
    x = torch.randn(args.batch, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    ratio, score_s = paired_ratio(lambda: compute_importance(model, x, batch_size=args.batch),
                                  lambda: forward(model, x), args.repeats)
    result = {"family": args.family, "batch": args.batch, "threads": torch.get_num_threads(),
              "scoring_images_per_s": args.batch / score_s, "forward_images_per_s": args.batch * ratio / score_s,
              "scoring_cost_in_forward_passes": ratio,
              "command": "python benchmarks/scoring.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.family}, batch {args.batch}, {result['threads']} threads: scoring "
          f"{result['scoring_images_per_s']:.0f} images/s, forward {result['forward_images_per_s']:.0f} images/s: "
          f"scoring costs {ratio:.2f} forward passes per image")


if __name__ == "__main__":
    main()
