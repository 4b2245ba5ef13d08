"""Quantized outputs and checkpoints stay what they were: logits and bit plans of the reference models, and
packed checkpoints written by earlier versions (``tests/golden/make_golden.py`` wrote them)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

from optimum_lrpqvit import applied_config, load_quantized

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))

import make_golden  # noqa: E402

LOGITS = load_file(str(GOLDEN / "logits.safetensors"))
with safe_open(str(GOLDEN / "logits.safetensors"), "pt") as _file:
    WRITTEN_ON = (_file.metadata() or {}).get("cpu_capability")
PLANS = json.loads((GOLDEN / "bit_plans.json").read_text())


@pytest.mark.parametrize("case", sorted(make_golden.CASES))
def test_reference_model_quantizes_to_the_golden_logits_and_plan(case):
    directory, overrides = make_golden.CASES[case]
    path = make_golden.ROOT / "reference_models" / directory
    model = AutoModelForImageClassification.from_pretrained(path, quantization_config=make_golden.case_config(overrides))
    assert applied_config(model).bit_plan == PLANS[case]
    pixels = make_golden.test_pixels(AutoImageProcessor.from_pretrained(path))
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    if make_golden.cpu_capability() == WRITTEN_ON:
        assert torch.equal(logits, LOGITS[case])
    else:  # other kernels flip 4-bit calibration choices (make_golden's docstring): same plan, same predictions
        agree = int((logits.argmax(1) == LOGITS[case].argmax(1)).sum())
        assert agree >= 60 and float((logits - LOGITS[case]).abs().max()) < 1.0, (agree, case)


def test_checkpoint_of_format_version_1_loads_with_identical_logits():
    model = AutoModelForImageClassification.from_pretrained(GOLDEN / "checkpoint-vit-w4a4-mixed")
    assert applied_config(model).bit_plan == PLANS["vit-crl-lrp-paper"]
    processor = AutoImageProcessor.from_pretrained(make_golden.ROOT / "reference_models" / "vit-fashion-mnist")
    with torch.no_grad():
        logits = model(pixel_values=make_golden.test_pixels(processor)).logits
    assert torch.equal(logits, LOGITS["vit-w4a4-mixed-checkpoint"])


def test_raw_timm_checkpoint_of_format_version_1_loads_with_identical_logits():
    skeleton, _, test = make_golden.tiny_timm_model()
    model = load_quantized(GOLDEN / "checkpoint-timm-vit-tiny", model=skeleton)
    with torch.no_grad():
        assert torch.equal(model(test), LOGITS["timm-vit-tiny-checkpoint"])
