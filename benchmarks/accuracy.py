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
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageClassification

from optimum_lrpqvit import LRPQConfig, applied_config, quantize
from optimum_lrpqvit.data import load_fashion_mnist, load_image_processor, preprocess
from optimum_lrpqvit.evaluation import fidelity, predict_logits
from optimum_lrpqvit.outliers import channel_range_ratio, inject_outlier_channels

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STRESS_FACTORS = (10.0, 30.0, 100.0)
Job = tuple[str, dict, int]  # (run key without seed, LRPQConfig kwargs, seed)


def sample_indices(seed: int, n: int, total: int, offset: int = 0) -> list[int]:
    """``n`` seeded random training-image indices, from position ``offset`` of the seed's permutation."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[offset:offset + n].tolist()


def save_merged(out_json: Path, entries: dict[str, dict]) -> dict:
    """Write ``entries`` (key → entry with ``model_sha256`` and ``runs``) into ``out_json``, keeping the runs that
    other processes wrote meanwhile (several may run at once, also on the same model): those are merged into the
    entry objects themselves, which their callers keep adding runs to. The read-merge-replace is not locked, so a
    run can still be lost to a write in between, and is then measured again by the next invocation. Returns the
    file's whole content."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    on_disk = json.loads(out_json.read_text()) if out_json.exists() else {}
    for key, entry in entries.items():
        theirs = on_disk.get(key, {})
        if theirs.get("model_sha256") == entry["model_sha256"]:
            for run_key, metrics in theirs["runs"].items():
                entry["runs"].setdefault(run_key, metrics)
        on_disk[key] = entry
    tmp = out_json.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(on_disk, indent=2) + "\n")
    os.replace(tmp, out_json)
    return on_disk


def run_jobs(model_dirs: list[str], jobs: list[Job], variants: tuple[str, ...], name: str, num_eval: int,
             num_calibration: int = 32, num_importance: int = 256) -> dict:
    """Quantize and evaluate every job on every model variant; results are saved after each run."""
    out_json = RESULTS / f"{name}.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    command = f"python benchmarks/{name}.py " + " ".join(sys.argv[1:])
    data = load_fashion_mnist()
    train = data["train"]
    mine: set[str] = set()

    def save() -> None:
        results.update(save_merged(out_json, {key: results[key] for key in mine}))

    for model_dir in model_dirs:
        base = AutoModelForImageClassification.from_pretrained(model_dir).eval()
        processor = load_image_processor(model_dir)
        pixels, labels = preprocess(data["test"].select(range(num_eval)), processor)
        weights = hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()[:16]
        for variant in variants:
            model = copy.deepcopy(base)
            if variant == "stress":
                inject_outlier_channels(model, STRESS_FACTORS)
            key = f"{Path(model_dir).name}/{variant}"
            entry = results.setdefault(key, {"runs": {}})
            mine.add(key)
            entry["command"] = command
            if entry.get("model_sha256") != weights:  # the model was retrained: its old runs do not count
                entry.update(runs={}, model_sha256=weights)
            entry["channel_range_ratio_median"] = statistics.median(channel_range_ratio(model, pixels[:32]).values())
            fp_logits = predict_logits(model, pixels, desc=f"{key} FP")
            entry["full_precision"] = fidelity(fp_logits, labels)
            save()
            for job_key, kwargs, seed in jobs:
                run_key = f"{job_key}/seed={seed}"
                if run_key in entry["runs"]:
                    continue
                config = LRPQConfig(seed=seed, **kwargs)
                calib, _ = preprocess(train, processor, sample_indices(seed, num_calibration, len(train)),
                                      progress=False)
                importance = reconstruction = None
                if config.measures_importance:
                    importance, _ = preprocess(train, processor, sample_indices(
                        seed, num_importance, len(train), offset=num_calibration), progress=False)
                if config.reconstruction is not None:
                    reconstruction, _ = preprocess(train, processor, sample_indices(
                        seed, config.reconstruction_samples, len(train), offset=num_calibration + num_importance),
                        progress=False)
                start = time.perf_counter()
                quantized = quantize(copy.deepcopy(model), config, calib, importance_data=importance,
                                     reconstruction_data=reconstruction, progress=False)
                seconds = time.perf_counter() - start
                forward = calibration_pass_seconds(model, calib)
                logits = predict_logits(quantized, pixels, desc=f"{key} {run_key}")
                entry["runs"][run_key] = {**fidelity(logits, labels, fp_logits),
                                          **applied_config(quantized).bit_plan_summary,
                                          "quantize_seconds": round(seconds, 2),
                                          "calibration_passes": round(seconds / forward, 1)}
                print(key, run_key, entry["runs"][run_key], flush=True)
                save()
    return results


@torch.no_grad()
def calibration_pass_seconds(model: torch.nn.Module, pixels: torch.Tensor, repeats: int = 3) -> float:
    """Median seconds of one forward pass of the float ``model`` on the calibration batch (the unit of
    ``calibration_passes``: a run's quantize time over it, measured in the same process right after it)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(pixel_values=pixels)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _mean_std(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _grouped(entry: dict) -> list[tuple[str, str, list[dict]]]:
    """The entry's runs as (W/A, method, runs over seeds), by bits, methods in the order first measured."""
    groups: dict[str, list[dict]] = {}
    for run_key, metrics in entry["runs"].items():
        groups.setdefault(run_key.rsplit("/seed=", 1)[0], []).append(metrics)
    ordered = sorted(groups.items(), key=lambda item: int(item[0][1:].split("A", 1)[0]))
    return [(group.split("/", 1)[0][1:].replace("A", "/"), group.split("/", 1)[1], runs) for group, runs in ordered]


def summary(results: dict) -> str:
    """One table per W/A: a row per model variant, a column per method, cells "top-1 / agreement / KL" (means
    over the seeds measured; their count and the spread are in the full tables)."""
    entries = {key: entry for key, entry in sorted(results.items()) if isinstance(entry, dict) and "runs" in entry}
    cells: dict[str, dict[str, dict[str, str]]] = {}
    methods: dict[str, list[str]] = {}
    for key, entry in entries.items():
        for wa, method, runs in _grouped(entry):
            mean = {m: statistics.mean(r[m] for r in runs) for m in ("top1", "agreement", "kl")}
            cells.setdefault(wa, {}).setdefault(key, {})[method] = (
                f"{mean['top1']:.2f} / {mean['agreement']:.1f} / {mean['kl']:.4f}")
            if method not in methods.setdefault(wa, []):
                methods[wa].append(method)
    lines = []
    for wa, rows in sorted(cells.items(), key=lambda item: int(item[0].split("/")[0])):
        lines += [f"W{wa.replace('/', '/A')}: top-1 (%) / agreement (%) / KL(FP ‖ q)", "",
                  "| model | FP top-1 | " + " | ".join(methods[wa]) + " |", "|---|---|" + "---|" * len(methods[wa])]
        for key, row in rows.items():
            fp = entries[key]["full_precision"]["top1"]
            lines.append(f"| {key} | {fp:.2f} | " + " | ".join(row.get(m, "–") for m in methods[wa]) + " |")
        lines.append("")
    return "\n".join(lines)


def markdown(results: dict, name: str) -> str:
    """The summary, then one table per model variant; runs that differ only in their seed are averaged
    (mean ± std)."""
    lines = [f"Made with `python benchmarks/{name}.py` (every model, bits and seed of the grid; it skips the runs "
             f"already in {name}.json, so the grid was filled by several partial runs at once, each entry's "
             "last one recorded there as `command`).", "", summary(results)]
    for key, entry in sorted(results.items()):
        if not isinstance(entry, dict) or "runs" not in entry:
            continue
        fp = entry["full_precision"]["top1"]
        timed = all("quantize_seconds" in r for r in entry["runs"].values())  # recorded since the options benchmark
        passes = timed and any("calibration_passes" in r for r in entry["runs"].values())
        lines += [f"### {key} (FP top-1 {fp:.2f}%, widest/median post-LN channel range "
                  f"{entry['channel_range_ratio_median']:.1f}×)", "",
                  "| W/A | method | avg w bits | avg a bits | top-1 (%) | agreement (%) | KL(FP ‖ q) | seeds |"
                  + (" quantize (s) |" if timed else "") + (" cost (calibration passes) |" if passes else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|" if timed else "") + ("---|" if passes else "")]
        for wa, method, runs in _grouped(entry):
            lines.append(f"| {wa} | {method} | {_mean_std([r['avg_w_bits'] for r in runs], 3)} | "
                         f"{_mean_std([r['avg_a_bits'] for r in runs], 3)} | "
                         f"{_mean_std([r['top1'] for r in runs], 2)} | {_mean_std([r['agreement'] for r in runs], 2)} "
                         f"| {_mean_std([r['kl'] for r in runs], 4)} | {len(runs)} |"
                         + (f" {_mean_std([r['quantize_seconds'] for r in runs], 1)} |" if timed else "")
                         + (f" {_passes(runs)} |" if passes else ""))
        lines.append("")
    return "\n".join(lines)


def _passes(runs: list[dict]) -> str:
    measured = [r["calibration_passes"] for r in runs if "calibration_passes" in r]
    return _mean_std(measured, 0) if measured else "–"


def write_markdown(name: str, results: dict | None = None) -> str:
    """Write benchmarks/results/<name>.md from ``results`` (default: the saved <name>.json); returns it."""
    if results is None:
        results = json.loads((RESULTS / f"{name}.json").read_text())
    table = markdown(results, name)
    (RESULTS / f"{name}.md").write_text(table + "\n")
    return table


def methods_main(name: str, methods: dict[str, dict], description: str) -> None:
    """The command line of a benchmark of named config ``methods`` at W = A = b with CRL (``mixed_precision.py``,
    ``accuracy_options.py``): the grid of models × bits × methods × seeds into benchmarks/results/<name>.*."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--bits", nargs="+", type=int, default=[3, 4, 6])
    parser.add_argument("--methods", nargs="+", default=list(methods), choices=list(methods))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-eval", type=int, default=10_000)
    parser.add_argument("--markdown-only", action="store_true", help=f"rewrite {name}.md from {name}.json")
    args = parser.parse_args()
    if args.markdown_only:
        print(write_markdown(name))
        return
    jobs: list[Job] = [(f"W{b}A{b}/{m}", {"w_bits": b, "a_bits": b, "post_ln": "crl", **methods[m]}, seed)
                       for seed in args.seeds for b in args.bits for m in args.methods]
    results = run_jobs(args.models or default_models(), jobs, ("original",), name, args.num_eval)
    print(write_markdown(name, results))


REFERENCE_MODELS = [f"reference_models/{name}-fashion-mnist" for name in ("vit", "deit", "swin", "timm-vit")]


def model_entry(results: dict, model_dir: str, num_eval: int) -> dict:
    """``results``' entry of the model in ``model_dir`` (keyed by its directory name), empty if its weights (by
    SHA-256) or the number of evaluation images changed since it was measured."""
    weights = hashlib.sha256((ROOT / model_dir / "model.safetensors").read_bytes()).hexdigest()[:16]
    entry = results.get(Path(model_dir).name, {})
    if entry.get("model_sha256") != weights or entry.get("num_eval") != num_eval:
        entry = {"model_sha256": weights, "num_eval": num_eval, "runs": {}}
    return entry


def reference_inputs(model_dir: str, data: dict, seed: int, num_eval: int, num_calibration: int = 32):
    """(float model, the first ``num_eval`` test images' pixels and labels, ``num_calibration`` seeded training
    images' pixels) of a reference model, preprocessed with its own processor."""
    processor = load_image_processor(ROOT / model_dir)
    pixels, labels = preprocess(data["test"].select(range(num_eval)), processor, progress=False)
    calibration, _ = preprocess(data["train"].select(sample_indices(seed, num_calibration, len(data["train"]))),
                                processor, progress=False)
    return AutoModelForImageClassification.from_pretrained(ROOT / model_dir).eval(), pixels, labels, calibration


def default_models() -> list[str]:
    """The Fashion-MNIST classifiers among the reference models (not the dense one)."""
    return [str(ROOT / m) for m in REFERENCE_MODELS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--bits", nargs="+", type=int, default=[3, 4, 6])
    parser.add_argument("--post-ln", nargs="+", default=["layerwise", "channelwise", "repq", "crl"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--crl-k", nargs="*", type=float, default=[])
    parser.add_argument("--variants", nargs="+", default=["original", "stress"], choices=["original", "stress"])
    parser.add_argument("--num-eval", type=int, default=10_000)
    parser.add_argument("--markdown-only", action="store_true", help="rewrite accuracy.md from accuracy.json")
    args = parser.parse_args()
    if args.markdown_only:
        print(write_markdown("accuracy"))
        return
    jobs: list[Job] = [(f"W{b}A{b}/{post}", {"w_bits": b, "a_bits": b, "post_ln": post}, seed)
                       for b in args.bits for post in args.post_ln
                       for seed in (args.seeds if b == 4 else args.seeds[:1])]
    jobs += [(f"W4A4/crl k={k:g}", {"post_ln": "crl", "crl_k": k}, seed) for k in args.crl_k for seed in args.seeds]
    results = run_jobs(args.models or default_models(), jobs, tuple(args.variants), "accuracy", args.num_eval)
    print(write_markdown("accuracy", results))


if __name__ == "__main__":
    main()
