"""Memory of loaded quantized models: parameter and buffer bytes, and the process's peak RSS while loading,
full precision vs W8/A8 vs W4/A4, against the packed checkpoint.

    python benchmarks/memory.py [--models reference vit-s deit-s swin-t] [--bits 8 4]

Models: the bundled reference ViT (``reference_models/vit-fashion-mnist``) and random-weight HF models with the
published configs of ViT-S/16-224, DeiT-S (with teacher) and Swin-T (built from configs, nothing is
downloaded), quantized with CRL on 4 random calibration images (memory does not depend on them) and saved with
``save_quantized``. Each checkpoint, and the float model's, is then loaded by ``from_pretrained`` in a fresh
process that reports its peak RSS (``VmHWM``, reset after the imports) above the RSS it had after importing the
libraries, with every loaded tensor read once (the weights file is memory-mapped).

Also measured, on the largest quantized Linear of each model: the alternative in-memory form, codes in an int8
container (1 byte per weight), against the bit-packed form kept by the library (bytes, and the time to rebuild
the float weight on a forward).

Writes benchmarks/results/memory.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
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

from optimum_lrpqvit import LRPQConfig, quantize, save_quantized
from optimum_lrpqvit.nn import dequantize_packed_weight, weight_modules
from optimum_lrpqvit.quantizers import dequantize_uniform
from optimum_lrpqvit.serialization import packed_state_dict

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "reference_models" / "vit-fashion-mnist"
BUILDERS = {
    "reference": lambda: AutoModelForImageClassification.from_pretrained(REFERENCE),
    "vit-s": lambda: ViTForImageClassification(ViTConfig(hidden_size=384, num_attention_heads=6,
                                                         intermediate_size=1536)),
    "deit-s": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(hidden_size=384, num_attention_heads=6,
                                                                       intermediate_size=1536)),
    "swin-t": lambda: SwinForImageClassification(SwinConfig()),
}

# Run in a fresh interpreter: RSS after the imports (with the peak reset there), then the peak while
# from_pretrained loads DIRECTORY and every tensor is read once (safetensors maps the file: pages count once read).
_LOADER = """
import json, sys
import optimum_lrpqvit, torch, transformers
from transformers import AutoModelForImageClassification
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
before = status("VmRSS")
model = AutoModelForImageClassification.from_pretrained(sys.argv[1])
tensors = list(model.parameters()) + list(model.buffers())
touched = sum(float(t.float().sum()) for t in tensors)
print(json.dumps({"rss_before": before, "peak_rss": status("VmHWM"), "rss_after": status("VmRSS"),
                  "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors)}))
"""


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def load_in_fresh_process(directory: Path) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _LOADER, str(directory)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def quantized_layer_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes the quantized layers hold in memory, bytes of the same layers' tensors in the packed checkpoint)."""
    modules = weight_modules(model)
    memory = sum(tensor_bytes(list(m.parameters()) + list(m.buffers())) for m in modules.values())
    state, _ = packed_state_dict(model)
    in_file = sum(tensor_bytes([t]) for k, t in state.items() if any(k.startswith(f"{n}.") for n in modules))
    return memory, in_file


def container_comparison(model: torch.nn.Module, repeats: int = 5) -> dict[str, float]:
    """The largest quantized Linear: bytes and dequantization time of bit-packed codes vs an int8 container."""
    name, module = max(weight_modules(model).items(), key=lambda item: math.prod(item[1].weight_shape))
    bits, shape = module.weight_quantizer.bits, module.weight_shape
    scale, zero_point = module.weight_scale, module.weight_zero_point
    codes = torch.round(module.quantized_weight() / scale[:, None]) + zero_point[:, None].float()
    codes = codes.to(torch.uint8)

    def packed():
        return dequantize_packed_weight(module.weight_packed, scale, zero_point, bits, shape)

    def int8():
        return dequantize_uniform(codes, scale[:, None], zero_point[:, None].float())

    assert torch.equal(packed(), int8())
    times = {}
    for label, fn in (("packed", packed), ("int8", int8)):
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        times[label] = statistics.median(samples)
    return {"layer": name, "shape": list(shape), "bits": bits, "packed_bytes": module.weight_packed.numel(),
            "int8_bytes": codes.numel(), "float32_bytes": codes.numel() * 4, "packed_ms": times["packed"] * 1e3,
            "int8_ms": times["int8"] * 1e3}


def measure(name: str, bits_list: list[int], work: Path) -> dict:
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    float_dir = work / f"{name}-float"
    model.save_pretrained(float_dir)
    file_bytes = (float_dir / "model.safetensors").stat().st_size
    row = {"float": {**load_in_fresh_process(float_dir), "file_bytes": file_bytes}}
    size = model.config.image_size
    calibration = torch.randn(4, model.config.num_channels, size, size)
    for bits in bits_list:
        quantized = quantize(AutoModelForImageClassification.from_pretrained(float_dir).eval(),
                             LRPQConfig(w_bits=bits, a_bits=bits, post_ln="crl"), calibration)
        directory = work / f"{name}-w{bits}"
        save_quantized(quantized, directory)
        memory, in_file = quantized_layer_bytes(quantized)
        row[f"w{bits}"] = {**load_in_fresh_process(directory),
                           "file_bytes": (directory / "model.safetensors").stat().st_size,
                           "quantized_layer_bytes": memory, "quantized_layer_file_bytes": in_file,
                           "quantized_layers_vs_file": memory / in_file,
                           "container": container_comparison(quantized)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    args = parser.parse_args()
    results = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            results["models"][name] = measure(name, args.bits, Path(work))
            print(f"{name} done", file=sys.stderr)

    mb = 1e6
    print("| model | form | params + buffers (MB) | vs float | file (MB) | peak RSS while loading (MB above imports) "
          "| vs float | quantized layers in memory / in file |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in results["models"].items():
        base = row["float"]
        base_rss = base["peak_rss"] - base["rss_before"]
        for form, r in row.items():
            rss = r["peak_rss"] - r["rss_before"]
            ratio = f"{r['quantized_layers_vs_file']:.3f}" if "quantized_layers_vs_file" in r else "-"
            print(f"| {name} | {form} | {r['tensor_bytes'] / mb:.2f} | {r['tensor_bytes'] / base['tensor_bytes']:.3f} "
                  f"| {r['file_bytes'] / mb:.2f} | {rss / mb:.1f} | {rss / base_rss:.3f} | {ratio} |")
    print("\n| model | bits | largest layer | packed / int8 container bytes | dequantize packed (ms) "
          "| from int8 (ms) |")
    print("|---|---|---|---|---|---|")
    for name, row in results["models"].items():
        for form, r in row.items():
            if "container" in r:
                c = r["container"]
                print(f"| {name} | {c['bits']} | {c['layer']} {tuple(c['shape'])} | "
                      f"{c['packed_bytes'] / c['int8_bytes']:.3f} | {c['packed_ms']:.2f} | {c['int8_ms']:.2f} |")
    out = ROOT / "benchmarks" / "results" / "memory.json"
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
