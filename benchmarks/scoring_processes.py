"""Sharded importance scoring: throughput of `lrpqvit score` with 1 and 2 processes, measured in the same run.

    python benchmarks/scoring_processes.py [--model reference_models/vit-fashion-mnist] [--num-samples 1024]

Runs `lrpqvit score` on the same seeded Fashion-MNIST training images three ways: one process with one thread,
one process with two threads, and two processes of one thread each under `torchrun` (accelerate joins them,
gloo on the CPU). Reports
images/s of the scoring loop (model loading and start-up excluded; they are in the wall time), the ratio to the
one-process-one-thread run, the largest difference between the scores, and the time projected for 50,000 images.
Writes benchmarks/results/scoring_processes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(label: str, launcher: list[str], threads: int, args: argparse.Namespace, out: Path) -> dict:
    command = [*launcher, "-m", "optimum_lrpqvit.cli", "score", args.model, "--dataset", "fashion_mnist",
               "--num-samples", str(args.num_samples), "--batch-size", str(args.batch_size), "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    document = json.loads(out.read_text())
    if document["metadata"]["processes"] != (2 if "processes" in label else 1):
        raise RuntimeError(f"{label}: the job ran with {document['metadata']['processes']} process(es)")
    seconds = document["metadata"]["seconds"]
    print(f"{label}: {args.num_samples / seconds:.1f} images/s (loop {seconds:.1f} s, wall {wall:.1f} s)", flush=True)
    return {"label": label, "images_per_s": args.num_samples / seconds, "loop_seconds": seconds,
            "wall_seconds": wall, "scores": document["scores"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "reference_models" / "vit-fashion-mnist"))
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    # `accelerate launch --cpu` starts a single process; torchrun starts two, which accelerate joins (gloo)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run("1 process x 1 thread", [sys.executable], 1, args, Path(tmp) / "a.json"),
                run("1 process x 2 threads", [sys.executable], 2, args, Path(tmp) / "b.json"),
                run("2 processes x 1 thread", launch, 1, args, Path(tmp) / "c.json")]
    base = runs[0]
    for r in runs:
        r["speedup_vs_1x1"] = r["images_per_s"] / base["images_per_s"]
        r["max_abs_score_diff_vs_1x1"] = max(abs(r["scores"][k] - base["scores"][k]) for k in base["scores"])
        r["projected_hours_for_50k"] = 50_000 / r["images_per_s"] / 3600
    for r in runs:
        del r["scores"]
    result = {"command": "python benchmarks/scoring_processes.py " + " ".join(sys.argv[1:]), "model": args.model,
              "num_samples": args.num_samples, "batch_size": args.batch_size, "runs": runs}
    out = ROOT / "benchmarks" / "results" / "scoring_processes.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| setting | images/s | vs 1×1 | 50k images (h) | max |Δscore| |\n|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['label']} | {r['images_per_s']:.1f} | {r['speedup_vs_1x1']:.2f}× | "
              f"{r['projected_hours_for_50k']:.2f} | {r['max_abs_score_diff_vs_1x1']:.1e} |")


if __name__ == "__main__":
    main()
