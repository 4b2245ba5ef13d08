"""Importance-scoring cost: images/s of ``compute_importance`` on ``--images`` images against plain forward passes
over the same images at the same batch size, measured back to back in the same run, and where one batch's cost
goes (scoring forward, gradient pass, relevance pass, per-image contributions), each in forward passes.

    python benchmarks/scoring.py [--images 128] [--batch 32] [--repeats 15] [--threads N]

Model: the 12-block, 128-wide ViT of benchmarks/speed.py. Writes benchmarks/results/scoring.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from speed import build, forward, paired_ratio, timed  # noqa: E402

from optimum_lrpqvit import compute_importance, lrp  # noqa: E402


def phase_times(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Seconds of each step of ``lrp.image_contributions`` (``relevance_and_gradients`` written out to time its
    passes separately, then ``point_contributions``)."""
    times = {}
    with lrp.scoring(model) as (family, layout, recorder), torch.enable_grad():
        start = time.perf_counter()
        logits = family.logits(model, x)
        times["forward"] = time.perf_counter() - start
        seed = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
        recorder.mode = "grad"
        times["gradient pass"] = timed(lambda: torch.autograd.grad(logits, recorder.roots, seed, retain_graph=True))
        recorder.mode = "relevance"
        times["relevance pass"] = timed(lambda: torch.autograd.grad(logits, recorder.roots, seed))
    times["contributions"] = timed(lambda: lrp.point_contributions(layout, recorder, len(x)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="hf_vit", choices=["hf_vit", "timm_vit"])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scoring.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.family)
    x = torch.randn(args.images, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    batches = x.split(args.batch)
    ratio, score_s = paired_ratio(lambda: compute_importance(model, x, batch_size=args.batch),
                                  lambda: [forward(model, batch) for batch in batches], args.repeats)
    phases = []
    for _ in range(args.repeats):
        plain = timed(lambda: forward(model, batches[0]))
        phases.append({name: t / plain for name, t in phase_times(model, batches[0]).items()})
    result = {"family": args.family, "images": args.images, "batch": args.batch, "threads": torch.get_num_threads(),
              "scoring_images_per_s": args.images / score_s, "forward_images_per_s": args.images * ratio / score_s,
              "scoring_cost_in_forward_passes": ratio,
              "phases_in_forward_passes": {name: statistics.median(p[name] for p in phases) for name in phases[0]},
              "command": "python benchmarks/scoring.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.family}, {args.images} images in batches of {args.batch}, {result['threads']} threads: scoring "
          f"{result['scoring_images_per_s']:.0f} images/s, forward {result['forward_images_per_s']:.0f} images/s: "
          f"scoring costs {ratio:.2f} forward passes per image; by step (one batch): "
          + ", ".join(f"{name} {v:.2f}" for name, v in result["phases_in_forward_passes"].items()))


if __name__ == "__main__":
    main()
