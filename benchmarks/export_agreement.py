"""Agreement of the ONNX export (onnxruntime, CPU) with the PyTorch quantized model on the 10,000 Fashion-MNIST
test images, for every reference model at W8/A8 and W4/A4.

    python benchmarks/export_agreement.py [--models vit deit swin timm-vit] [--bits 8 4] [--num-images 10000]
                                          [--weight-codes auto int8] [--references]

Each reference model is quantized at load (``from_pretrained(..., quantization_config=LRPQConfig(w_bits=b,
a_bits=b, dataset="fashion_mnist"))``: CRL, 32 calibration images, seed 0), exported with ``export_onnx`` and
run by onnxruntime on the test images; printed: top-1 agreement between the two, the largest absolute logit
difference, and both top-1 accuracies, once per ``export_onnx(weight_codes=...)`` asked for. With
``--references`` also the images on which the PyTorch forward (integer codes multiplied, the default), the
dequantized forward (``unpack_weights``: float weights x̂, every product rounded), the same model in float64
and ONNX Runtime disagree pairwise (``docs/method.md#integer-arithmetic-in-the-pytorch-forward``). Writes
benchmarks/results/export_agreement.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch
from transformers import AutoModelForImageClassification

from optimum_lrpqvit import LRPQConfig, export_onnx, unpack_weights
from optimum_lrpqvit.data import load_image_dataset, load_image_processor, preprocess
from optimum_lrpqvit.evaluation import predict_logits

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "export_agreement.json"
MODELS = {"vit": "vit-fashion-mnist", "deit": "deit-fashion-mnist", "swin": "swin-fashion-mnist",
          "timm-vit": "timm-vit-fashion-mnist"}


def ort_logits(path: Path, pixels: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.cat([torch.from_numpy(session.run(None, {"pixel_values": b.numpy()})[0])
                      for b in pixels.split(batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    parser.add_argument("--num-images", type=int, default=10000)
    parser.add_argument("--weight-codes", nargs="+", default=["auto"], choices=["auto", "int8", "uint8"])
    parser.add_argument("--references", action="store_true",
                        help="also compare the dequantized and the float64 forward (two more evaluations)")
    args = parser.parse_args()
    results = {"command": " ".join(["python", *sys.argv]), "onnxruntime": onnxruntime.__version__,
               "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": []}
    test = load_image_dataset("fashion_mnist", "test", num_samples=args.num_images)
    for name in args.models:
        path = ROOT / "reference_models" / MODELS[name]
        pixels, labels = preprocess(test, load_image_processor(path))
        for bits in args.bits:
            config = LRPQConfig(w_bits=bits, a_bits=bits, dataset="fashion_mnist")
            model = AutoModelForImageClassification.from_pretrained(path, quantization_config=config).eval()
            expected = predict_logits(model, pixels, desc=f"{name} W{bits}/A{bits} PyTorch")
            references = {}
            if args.references:
                references["dequantized"] = predict_logits(unpack_weights(copy.deepcopy(model)), pixels,
                                                           desc="dequantized")
                references["float64"] = predict_logits(copy.deepcopy(model).double(), pixels, desc="float64")
            for codes in args.weight_codes:
                with tempfile.TemporaryDirectory() as work:
                    onnx_path = export_onnx(model, Path(work) / "model.onnx", weight_codes=codes)
                    started = time.perf_counter()
                    got = ort_logits(onnx_path, pixels)
                    ort_seconds = time.perf_counter() - started
                row = {"model": name, "bits": bits, "weight_codes": codes, "num_images": len(labels),
                       "top1_agreement": 100.0 * float((got.argmax(1) == expected.argmax(1)).float().mean()),
                       "disagreeing_images": int((got.argmax(1) != expected.argmax(1)).sum()),
                       "max_abs_logit_diff": float((got - expected).abs().max()),
                       "max_abs_logit": float(expected.abs().max()),
                       "top1_pytorch": 100.0 * float((expected.argmax(1) == labels).float().mean()),
                       "top1_onnxruntime": 100.0 * float((got.argmax(1) == labels).float().mean()),
                       "onnxruntime_seconds": ort_seconds}
                if references:
                    logits = {"integer": expected, **references, "onnxruntime": got}
                    names = list(logits)
                    row["disagreeing_images_pairwise"] = {
                        f"{a} vs {b}": int((logits[a].argmax(1) != logits[b].argmax(1)).sum())
                        for i, a in enumerate(names) for b in names[i + 1:]}
                results["rows"].append(row)
                print(json.dumps(row), file=sys.stderr)
                OUT.write_text(json.dumps(results, indent=1) + "\n")  # after every row: a long run keeps its rows
    print(f"ONNX export vs PyTorch quantized, {args.num_images} fashion_mnist test images "
          f"(onnxruntime {onnxruntime.__version__}, {results['cpu_capability']})")
    print("| model | W/A | weight codes | top-1 agreement (%) | images that differ | max abs logit diff (max abs "
          "logit) | top-1 PyTorch (%) | top-1 ORT (%) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['model']} | {r['bits']}/{r['bits']} | {r['weight_codes']} | {r['top1_agreement']:.2f} "
              f"| {r['disagreeing_images']} "
              f"| {r['max_abs_logit_diff']:.2g} ({r['max_abs_logit']:.1f}) | {r['top1_pytorch']:.2f} "
              f"| {r['top1_onnxruntime']:.2f} |")
    pairwise = [r for r in results["rows"] if "disagreeing_images_pairwise" in r]
    if pairwise:
        pairs = list(pairwise[0]["disagreeing_images_pairwise"])
        print("\nImages (of the same test images) whose top-1 differs between two forwards:")
        print("| model | W/A | " + " | ".join(pairs) + " |")
        print("|---|---|" + "---|" * len(pairs))
        for r in pairwise:
            print(f"| {r['model']} | {r['bits']}/{r['bits']} | "
                  + " | ".join(str(r["disagreeing_images_pairwise"][p]) for p in pairs) + " |")


if __name__ == "__main__":
    main()
