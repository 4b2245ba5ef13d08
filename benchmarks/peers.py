"""This library against the quantizers users would pick instead, side by side in one run.

    pip install optimum-quanto torchao   # optional benchmark dependencies
    python benchmarks/peers.py [--models reference_models/vit-fashion-mnist ...] [--num-eval 2000] [--seed 0]
        [--w-bits 8 4] [--methods "lrpqvit default" optimum-quanto ...]

On every reference model, the same 32 seeded calibration images from the train split and the first `--num-eval`
test images: full precision, then at W8/A8 and W4/A8

* this library (`quantize`, every Linear, the patch embedding and both attention matmuls quantized, activations
  static per tensor): the paper's default (CRL, log-√2 probabilities, round-to-nearest weights) and the options
  `softmax_quantizer="adalog"`, `weight_rounding="gptq"` and `post_ln="repq"`, alone and combined, and the
  three with block reconstruction (`reconstruction="block"`, on the 1,024 train images after the calibration
  images), also with min–max activation ranges (`percentiles=[1.0]`: no clipping, which 8 bits can afford),
  and calibration only with `compensate_activations=True` or (with min–max ranges) `center_keys=True`, and
  AdaLog and GPTQ with min–max ranges and one per-tensor quantizer for the post-LayerNorm inputs (`layerwise`);
* optimum-quanto (`quantize(weights=qint8|qint4, activations=qint8)` + `Calibration`, static activation scales on
  the Linear layers; attention matmuls in float);
* torchao (`Int8DynamicActivationInt8WeightConfig`, and `Int8DynamicActivationIntxWeightConfig(torch.int4)` per
  output channel: activations quantized per token at run time, no calibration; Linear layers only).

Top-1, agreement with full precision and KL(FP ‖ q); results in benchmarks/results/peers.{json,md}. A model's
runs are measured again only when its weights changed (the JSON records them by checksum).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from accuracy import REFERENCE_MODELS, RESULTS, model_entry, reference_inputs, sample_indices, save_merged

from optimum_lrpqvit import LRPQConfig, quantize
from optimum_lrpqvit.data import load_fashion_mnist, load_image_processor, preprocess
from optimum_lrpqvit.evaluation import fidelity

ADALOG_GPTQ = {"softmax_quantizer": "adalog", "weight_rounding": "gptq"}
ADALOG_GPTQ_REPQ = {**ADALOG_GPTQ, "post_ln": "repq"}
MINMAX = {"percentiles": [1.0]}
BLOCK = {"reconstruction": "block"}
COMP = {"compensate_activations": True}
KEYS = {"center_keys": True}
OURS = {
    "default": {},
    "adalog": {"softmax_quantizer": "adalog"},
    "gptq": {"weight_rounding": "gptq"},
    "repq": {"post_ln": "repq"},
    "adalog+gptq": ADALOG_GPTQ,
    "adalog+gptq+repq": ADALOG_GPTQ_REPQ,
    "adalog+gptq+repq+block": {**ADALOG_GPTQ_REPQ, **BLOCK},
    "adalog+gptq+repq+minmax": {**ADALOG_GPTQ_REPQ, **MINMAX},
    "adalog+gptq+repq+minmax+block": {**ADALOG_GPTQ_REPQ, **MINMAX, **BLOCK},
    "adalog+gptq+repq+comp": {**ADALOG_GPTQ_REPQ, **COMP},
    "adalog+gptq+repq+minmax+comp": {**ADALOG_GPTQ_REPQ, **MINMAX, **COMP},
    "adalog+gptq+repq+minmax+keys": {**ADALOG_GPTQ_REPQ, **MINMAX, **KEYS},
    "adalog+gptq+layerwise+minmax": {**ADALOG_GPTQ, "post_ln": "layerwise", **MINMAX},
}


@torch.no_grad()
def logits_of(model: torch.nn.Module, pixels: torch.Tensor, batch: int = 250) -> torch.Tensor:
    return torch.cat([model(pixel_values=pixels[i:i + batch]).logits.float() for i in range(0, len(pixels), batch)])


def quanto(model: torch.nn.Module, w_bits: int, calibration: torch.Tensor) -> torch.nn.Module:
    from optimum.quanto import Calibration, freeze, qint4, qint8
    from optimum.quanto import quantize as quanto_quantize

    quanto_quantize(model, weights=qint8 if w_bits == 8 else qint4, activations=qint8)
    with Calibration():
        logits_of(model, calibration)
    freeze(model)
    return model


def torchao(model: torch.nn.Module, w_bits: int, calibration: torch.Tensor) -> torch.nn.Module:
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerAxis

    config = (Int8DynamicActivationInt8WeightConfig() if w_bits == 8 else
              Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerAxis(0)))
    quantize_(model, config)
    return model


def ours(options: dict, w_bits: int, calibration: torch.Tensor, reconstruction: torch.Tensor):
    def run(model: torch.nn.Module, *_: object) -> torch.nn.Module:
        config = LRPQConfig(w_bits=w_bits, a_bits=8, **options)
        data = reconstruction if config.reconstruction else None
        return quantize(model, config, calibration, reconstruction_data=data, progress=False)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=REFERENCE_MODELS)
    parser.add_argument("--num-eval", type=int, default=2000)
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--w-bits", nargs="+", type=int, default=[8, 4], choices=[8, 4])
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods (default: all)",
                        choices=[f"lrpqvit {k}" for k in OURS] + ["optimum-quanto", "torchao dynamic"])
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    out_json = RESULTS / "peers.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    data = load_fashion_mnist()
    for model_dir in args.models:
        name = Path(model_dir).name
        entry = model_entry(results, model_dir, args.num_eval)
        base, pixels, labels, calibration = reference_inputs(model_dir, data, args.seed, args.num_eval,
                                                             args.num_calibration)
        train = data["train"]
        reconstruction, _ = preprocess(train.select(sample_indices(args.seed, 1024, len(train), args.num_calibration)),
                                       load_image_processor(model_dir), progress=False)
        reference = logits_of(base, pixels)
        entry["full_precision"] = fidelity(reference, labels)
        for w_bits in args.w_bits:
            methods = {f"lrpqvit {k}": ours(v, w_bits, calibration, reconstruction) for k, v in OURS.items()}
            methods |= {"optimum-quanto": quanto, "torchao dynamic": torchao}
            methods = {k: v for k, v in methods.items() if args.methods is None or k in args.methods}
            for method, run in methods.items():
                key = f"W{w_bits}/A8 {method}"
                if key in entry["runs"]:
                    continue
                start = time.perf_counter()
                model = run(copy.deepcopy(base), w_bits, calibration)
                seconds = time.perf_counter() - start
                entry["runs"][key] = fidelity(logits_of(model, pixels), labels, reference) | {
                    "quantize_seconds": round(seconds, 2)}
                print(f"{name} {key}: {entry['runs'][key]}", file=sys.stderr, flush=True)
                entry["command"] = "python benchmarks/peers.py " + " ".join(sys.argv[1:])
                results = save_merged(out_json, {name: entry})
    write_markdown(results)


def write_markdown(results: dict) -> None:
    keys = list(dict.fromkeys(k for entry in results.values() for k in entry["runs"]))
    lines = ["Made with `python benchmarks/peers.py` (the command of each model's run is in peers.json). "
             "KL(FP ‖ q) / top-1 agreement with full precision (%) on the first "
             f"{next(iter(results.values()))['num_eval']} test images; 32 calibration images.", ""]
    for w_bits in (8, 4):
        cols = [k for k in keys if k.startswith(f"W{w_bits}/")]
        lines += ["| model | FP top-1 | " + " | ".join(c.split(" ", 1)[1] for c in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for name, entry in results.items():
            cells = [f"{entry['runs'][c]['kl']:.6f} / {entry['runs'][c]['agreement']:.2f}" if c in entry["runs"]
                     else "–" for c in cols]
            lines.append(f"| {name} W{w_bits}/A8 | {entry['full_precision']['top1']:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    (RESULTS / "peers.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
