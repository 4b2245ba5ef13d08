"""Write the golden outputs that ``tests/test_golden.py`` compares against.

Quantizes the bundled reference ViT and Swin at W4/A4 (CRL with fixed bits, and CRL with LRP mixed precision
under LRP-QViT's allocation rule), seed 0, through the public API only, and stores each model's logits on the
first 64 Fashion-MNIST test images and its bit plan. It also saves two packed checkpoints (the reference ViT
with mixed precision through ``save_pretrained``, and a tiny raw timm ViT with the budget rule through
``save_quantized``) so that later versions prove they still read checkpoints written by this one.

    python tests/golden/make_golden.py        # from the repository root; ~1 minute on 2 cores
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 DNNL_MAX_CPU_ISA=AVX2 python tests/golden/make_golden.py
                                              # on an AVX-512 machine: the kernels of the AVX2 machines CI runs on

Only re-run it when a change is meant to alter quantized outputs, and say so in the commit. The checkpoints are
written only when absent; the logits of loading them are re-recorded.

Quantizing is exact only on the instruction set the logits were written with (the safetensors metadata
``cpu_capability``): at 4 bits a last-bit difference of another kernel path (AVX-512 vs AVX2 in ATen, MKL and
oneDNN) flips calibration choices and moves logits by up to ~0.5, as measured on an AVX-512 machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests"))

import optimum_lrpqvit  # noqa: E402,F401  (registers "lrpqvit" with transformers)
from optimum_lrpqvit import LRPQConfig, applied_config, quantize, save_quantized  # noqa: E402

CASES = {
    "vit-crl-fixed": ("vit-fashion-mnist", dict(mixed_precision=False)),
    "vit-crl-lrp-paper": ("vit-fashion-mnist", dict(mixed_precision=True, num_importance_samples=64)),
    "swin-crl-fixed": ("swin-fashion-mnist", dict(mixed_precision=False)),
    "swin-crl-lrp-paper": ("swin-fashion-mnist", dict(mixed_precision=True, num_importance_samples=64)),
}
NUM_TEST_IMAGES = 64


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels dispatch to (``ATEN_CPU_CAPABILITY`` can lower it)."""
    return torch.backends.cpu.get_cpu_capability()


def case_config(overrides: dict) -> LRPQConfig:
    return LRPQConfig(w_bits=4, a_bits=4, post_ln="crl", allocation="paper", importance="lrp", seed=0,
                      dataset="fashion_mnist", dataset_split="train", num_calibration_samples=32, **overrides)


def test_pixels(processor) -> torch.Tensor:
    from optimum_lrpqvit.data import load_fashion_mnist

    images = load_fashion_mnist()["test"][:NUM_TEST_IMAGES]["image"]
    return processor(images=images, return_tensors="pt")["pixel_values"]


def tiny_timm_model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A seeded tiny timm ViT, its calibration pixels and test pixels."""
    from models import timm_vit

    model = timm_vit(seed=3)
    generator = torch.Generator().manual_seed(3)
    calibration = torch.randn(8, 3, 16, 16, generator=generator)
    test = torch.randn(16, 3, 16, 16, generator=generator)
    return model, calibration, test


def main() -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from optimum_lrpqvit import load_quantized

    logits, plans = {}, {}
    for case, (directory, overrides) in CASES.items():
        path = ROOT / "reference_models" / directory
        model = AutoModelForImageClassification.from_pretrained(path, quantization_config=case_config(overrides))
        pixels = test_pixels(AutoImageProcessor.from_pretrained(path))
        with torch.no_grad():
            logits[case] = model(pixel_values=pixels).logits.contiguous()
        plans[case] = applied_config(model).bit_plan
        if case == "vit-crl-lrp-paper" and not (HERE / "checkpoint-vit-w4a4-mixed").exists():
            model.save_pretrained(HERE / "checkpoint-vit-w4a4-mixed")
        print(case, applied_config(model).bit_plan_summary)

    # The checkpoints are kept once written: they prove that later versions read what earlier ones wrote.
    model = AutoModelForImageClassification.from_pretrained(HERE / "checkpoint-vit-w4a4-mixed")
    pixels = test_pixels(AutoImageProcessor.from_pretrained(ROOT / "reference_models" / "vit-fashion-mnist"))
    with torch.no_grad():
        logits["vit-w4a4-mixed-checkpoint"] = model(pixel_values=pixels).logits.contiguous()
    model, calibration, test = tiny_timm_model()
    if not (HERE / "checkpoint-timm-vit-tiny").exists():
        quantize(model, LRPQConfig(w_bits=4, a_bits=4, post_ln="crl", mixed_precision=True, allocation="budget"),
                 calibration)
        save_quantized(model, HERE / "checkpoint-timm-vit-tiny")
    model = load_quantized(HERE / "checkpoint-timm-vit-tiny", model=tiny_timm_model()[0])
    with torch.no_grad():
        logits["timm-vit-tiny-checkpoint"] = model(test).contiguous()

    save_file(logits, str(HERE / "logits.safetensors"), metadata={"cpu_capability": cpu_capability()})
    (HERE / "bit_plans.json").write_text(json.dumps(plans, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
