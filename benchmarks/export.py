"""Latency of PyTorch FP32, PyTorch fake-quant, onnxruntime FP32 and onnxruntime QDQ (W8/A8, W4/A4), all in one
run, and onnxruntime's profile of the QDQ graphs: which kernels ran and what share of the time they took.

    python benchmarks/export.py [--models reference vit-s] [--batches 1 32] [--repeats 7] [--threads 2]

Models: the bundled reference ViT (28×28 Fashion-MNIST, 12 blocks of width 128) and a random-weight ViT with the
published ViT-S/16-224 config (nothing is downloaded), quantized with CRL on 4 random calibration images (speed
does not depend on them). Every variant is timed once per round, the rounds interleaved, so that the machine's
load changes hit all variants alike; reported are median latencies and the median of the per-round ratios to
onnxruntime FP32. The float graph is exported with the same torch exporter (TorchScript-based, opset 17). The QDQ
graphs use ``export_onnx``'s default weight codes (uint8 at 8 bits, int8 at 4), and W8/A8 is exported once more
with ``weight_codes="int8"`` (u8·s8 kernels; exact on CPUs with VNNI, which the results record).
Writes benchmarks/results/export.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime
import torch
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from optimum_lrpqvit import LRPQConfig, export_onnx, quantize
from optimum_lrpqvit.export import DEFAULT_OPSET

ROOT = Path(__file__).resolve().parents[1]
BUILDERS = {
    "reference": lambda: AutoModelForImageClassification.from_pretrained(
        ROOT / "reference_models" / "vit-fashion-mnist"),
    "vit-s": lambda: ViTForImageClassification(ViTConfig(hidden_size=384, num_attention_heads=6,
                                                         intermediate_size=1536)),
}
INTEGER_OPS = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QLinearConv", "ConvInteger",
               "DynamicQuantizeMatMul", "QGemm", "QAttention"}


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def export_float(model: torch.nn.Module, path: Path, example: torch.Tensor) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(model), (example,), str(path), dynamo=False, input_names=["pixel_values"],
                          output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=DEFAULT_OPSET)
    return path


def session(path: Path, threads: int, profile_prefix: str | None = None) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def profile(path: Path, x: torch.Tensor, threads: int, work: Path, runs: int = 3) -> dict:
    """Kernel time per operator type over ``runs`` + 1 runs, as shares of the total."""
    s = session(path, threads, str(work / f"profile-{path.stem}"))
    feed = {"pixel_values": x.numpy()}
    s.run(None, feed)
    for _ in range(runs):
        s.run(None, feed)
    events = json.loads(Path(s.end_profiling()).read_text())
    times, counts = collections.Counter(), collections.Counter()
    for event in events:  # the warm-up run included
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"]
            counts[event["args"]["op_name"]] += 1
    total = sum(times.values())
    ops = {op: {"share": t / total, "calls_per_run": counts[op] / (runs + 1)} for op, t in times.most_common()}
    return {"ops": ops, "integer_share": sum(v["share"] for op, v in ops.items() if op in INTEGER_OPS),
            "integer_ops": sorted(op for op in ops if op in INTEGER_OPS)}


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, batches: list[int], repeats: int, threads: int, work: Path) -> dict:
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    size, channels = model.config.image_size, model.config.num_channels
    calibration = torch.randn(4, channels, size, size)
    quantized = {bits: quantize(copy.deepcopy(model), LRPQConfig(w_bits=bits, a_bits=bits), calibration)
                 for bits in (8, 4)}
    paths = {"ORT FP32": export_float(model, work / f"{name}-fp32.onnx", calibration[:1])}
    for bits, q in quantized.items():
        paths[f"ORT QDQ W{bits}/A{bits}"] = export_onnx(q, work / f"{name}-w{bits}.onnx")
    paths["ORT QDQ W8/A8 int8 weights"] = export_onnx(quantized[8], work / f"{name}-w8-int8.onnx",
                                                      weight_codes="int8")
    sessions = {label: session(path, threads) for label, path in paths.items()}
    row = {"batches": {}, "profiles": {}}
    for batch in batches:
        x = torch.randn(batch, channels, size, size)
        feed = {"pixel_values": x.numpy()}

        def run_torch(m):
            def run():
                with torch.no_grad():
                    return m(pixel_values=x)
            return run

        variants = {"PyTorch FP32": run_torch(model)}
        for bits, q in quantized.items():
            variants[f"PyTorch fake-quant W{bits}/A{bits}"] = run_torch(q)
        for label, s in sessions.items():
            variants[label] = lambda s=s: s.run(None, feed)
        for fn in variants.values():  # warm-up
            fn()
        samples = {label: [] for label in variants}
        for _ in range(repeats):
            for label, fn in variants.items():
                samples[label].append(timed(fn))
        base = samples["ORT FP32"]
        row["batches"][batch] = {label: {"median_ms": 1e3 * statistics.median(t),
                                         "vs_ort_fp32": statistics.median(a / b for a, b in zip(t, base))}
                                 for label, t in samples.items()}
        print(f"{name} batch {batch} done", file=sys.stderr)
    x = torch.randn(max(batches), channels, size, size)
    for label, path in paths.items():
        row["profiles"][label] = profile(path, x, threads, work)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
               "onnxruntime": onnxruntime.__version__, "threads": args.threads,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "vnni": _has_vnni(), "models": {}}
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            results["models"][name] = measure(name, args.batches, args.repeats, args.threads, Path(work))

    print(f"latency, {args.threads} threads, {results['cpu_capability']}{' with VNNI' if results['vnni'] else ''}, "
          f"median of {args.repeats} interleaved rounds")
    print("| model | batch | variant | median (ms) | vs ORT FP32 |")
    print("|---|---|---|---|---|")
    for name, row in results["models"].items():
        for batch, variants in row["batches"].items():
            for label, r in variants.items():
                print(f"| {name} | {batch} | {label} | {r['median_ms']:.1f} | {r['vs_ort_fp32']:.3f} |")
    print(f"\nonnxruntime profile at batch {max(args.batches)}: share of kernel time")
    print("| model | graph | integer kernels (share) | top operators |")
    print("|---|---|---|---|")
    for name, row in results["models"].items():
        for label, p in row["profiles"].items():
            top = ", ".join(f"{op} {100 * v['share']:.0f} %" for op, v in list(p["ops"].items())[:5])
            ints = ", ".join(p["integer_ops"]) or "none"
            print(f"| {name} | {label} | {ints} ({100 * p['integer_share']:.0f} %) | {top} |")
    (ROOT / "benchmarks" / "results" / "export.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
