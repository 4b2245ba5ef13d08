"""The noise floor of agreement: the same quantized model, run by PyTorch with its AVX-512 kernels and with its
AVX2 kernels, on the 10,000 Fashion-MNIST test images (the same comparison as benchmarks/export_agreement.py,
with float kernels that differ in their last bits instead of another runtime).

    python benchmarks/kernel_agreement.py [--models vit swin] [--bits 8 4] [--num-images 10000]

Needs a machine whose CPU has AVX-512. Each reference model is quantized at load (CRL, 32 calibration images,
seed 0) and saved packed; two fresh processes load that checkpoint, one with the default kernels and one with
``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 DNNL_MAX_CPU_ISA=AVX2``, and write their logits.
Writes benchmarks/results/kernel_agreement.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from optimum_lrpqvit import LRPQConfig, save_quantized

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"vit": "vit-fashion-mnist", "deit": "deit-fashion-mnist", "swin": "swin-fashion-mnist",
          "timm-vit": "timm-vit-fashion-mnist"}
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}

_RUN = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModelForImageClassification
from optimum_lrpqvit.data import load_image_dataset, preprocess
from optimum_lrpqvit.evaluation import predict_logits
model = AutoModelForImageClassification.from_pretrained(sys.argv[1]).eval()
pixels, _ = preprocess(load_image_dataset("fashion_mnist", "test", num_samples=int(sys.argv[3])),
                       AutoImageProcessor.from_pretrained(sys.argv[4]))
save_file({"logits": predict_logits(model, pixels, progress=False).contiguous(),
           "capability": torch.tensor([ord(c) for c in torch.backends.cpu.get_cpu_capability()])}, sys.argv[2])
"""


def logits_in_process(directory: Path, out: Path, num_images: int, processor: Path,
                      env: dict[str, str]) -> tuple[torch.Tensor, str]:
    subprocess.run([sys.executable, "-c", _RUN, str(directory), str(out), str(num_images), str(processor)],
                   check=True, env={**os.environ, **env}, capture_output=True)
    tensors = load_file(str(out))
    return tensors["logits"], "".join(map(chr, tensors["capability"].tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit", "swin"], choices=list(MODELS))
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    parser.add_argument("--num-images", type=int, default=10000)
    args = parser.parse_args()
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        raise SystemExit("kernel_agreement.py compares AVX-512 with AVX2 kernels: this CPU has "
                         f"{torch.backends.cpu.get_cpu_capability()}.")
    results = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__, "rows": []}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name in args.models:
            path = ROOT / "reference_models" / MODELS[name]
            for bits in args.bits:
                config = LRPQConfig(w_bits=bits, a_bits=bits, dataset="fashion_mnist")
                directory = work / f"{name}-w{bits}"
                save_quantized(AutoModelForImageClassification.from_pretrained(path, quantization_config=config),
                               directory)
                a, cap_a = logits_in_process(directory, work / "a.safetensors", args.num_images, path, {})
                b, cap_b = logits_in_process(directory, work / "b.safetensors", args.num_images, path, AVX2)
                row = {"model": name, "bits": bits, "kernels": [cap_a, cap_b], "num_images": len(a),
                       "top1_agreement": 100.0 * float((a.argmax(1) == b.argmax(1)).float().mean()),
                       "disagreeing_images": int((a.argmax(1) != b.argmax(1)).sum()),
                       "max_abs_logit_diff": float((a - b).abs().max())}
                results["rows"].append(row)
                print(json.dumps(row), file=sys.stderr)
    print(f"PyTorch quantized model, AVX-512 vs AVX2 kernels, {args.num_images} fashion_mnist test images")
    print("| model | W/A | top-1 agreement (%) | images that differ | max abs logit diff |")
    print("|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['model']} | {r['bits']}/{r['bits']} | {r['top1_agreement']:.2f} | {r['disagreeing_images']} "
              f"| {r['max_abs_logit_diff']:.2g} |")
    (ROOT / "benchmarks" / "results" / "kernel_agreement.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
