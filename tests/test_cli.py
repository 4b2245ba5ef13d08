"""The command line answers help and bad arguments at once, before torch is imported, naming the flag."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import models
import pytest

import optimum_lrpqvit_cli as launcher
from optimum_lrpqvit import cli
from optimum_lrpqvit.export import onnx
from optimum_lrpqvit.registry import (
    ALLOCATION_RULES,
    GELU_QUANTIZERS,
    IMPORTANCE_CRITERIA,
    POST_LN_TREATMENTS,
    SOFTMAX_QUANTIZERS,
    WEIGHT_ROUNDINGS,
)

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import sys, optimum_lrpqvit_cli as c
try:
    code = c.main(sys.argv[1:])
except SystemExit as exit_:  # argparse: help, usage errors
    code = exit_.code
print('torch imported' if 'torch' in sys.modules else 'torch not imported')
sys.exit(code)
"""


def _launch(*args, cwd=ROOT, env=None):
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd,
                         env={**os.environ, **(env or {})}, timeout=120)
    return out, time.perf_counter() - started


def test_the_launcher_knows_the_registered_names_and_export_limits():
    assert set(launcher.POST_LN_TREATMENTS) == set(POST_LN_TREATMENTS.names())
    assert set(launcher.ALLOCATION_RULES) == set(ALLOCATION_RULES.names())
    assert launcher.SOFTMAX_QUANTIZERS == SOFTMAX_QUANTIZERS.names()
    assert launcher.WEIGHT_ROUNDINGS == WEIGHT_ROUNDINGS.names()
    assert launcher.GELU_QUANTIZERS == GELU_QUANTIZERS.names()
    assert set(launcher.IMPORTANCE_CRITERIA) == set(IMPORTANCE_CRITERIA.names())
    assert launcher.WEIGHT_CODES == onnx.WEIGHT_CODES
    assert (launcher.DEFAULT_OPSET, launcher.MIN_OPSET, launcher.MAX_OPSET) == (
        onnx.DEFAULT_OPSET, onnx.MIN_OPSET, onnx.MAX_OPSET)


@pytest.mark.parametrize("args, code, message", [
    (["--help"], 0, "quantize"),
    (["quantize", "--help"], 0, "--candidate-bits"),
    (["quantize", "reference_models/vit-fashion-mnist", "outputs/x", "--w-bits", "1"], 2,
     "--w-bits: 1 is not between 2 and 8"),
    (["quantize", "reference_models/vit-fashion-mnst", "outputs/x"], 1,
     "no such local directory (did you mean 'vit-fashion-mnist'?)"),
    (["score", "reference_models/vit-fashion-mnist", "--dataset", "fashion-mnist", "--output", "s.json"], 1,
     "did you mean 'fashion_mnist'"),
    (["evaluate", "reference_models/vit-fashion-mnist", "--batch-size", "0"], 2, "--batch-size: 0 is not at least 1"),
    (["export", "reference_models/vit-fashion-mnist", "x.onnx", "--opset", "9"], 2, "--opset: 9 is not between 13"),
    (["push", "nowhere/dir/x", "me/repo"], 1, "MODEL_DIR nowhere/dir/x: no such local directory"),
])
def test_help_and_bad_arguments_return_at_once_without_torch(args, code, message):
    out, seconds = _launch(*args)
    assert out.returncode == code, out.stderr
    assert message in out.stdout + out.stderr
    assert "torch not imported" in out.stdout
    assert "Traceback" not in out.stderr
    assert seconds < 10  # ~0.3 s here; generous for a loaded machine, far below loading torch cold


def test_an_unreachable_hub_is_said_at_once(tmp_path):
    unreachable = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "lrpqvit"}}')
    out, seconds = _launch("push", str(tmp_path), "me/repo", env=unreachable)
    assert out.returncode == 1 and "the Hub (http://127.0.0.1:9) cannot be reached" in out.stderr
    assert "Traceback" not in out.stderr and seconds < 10


def test_an_output_directory_of_an_earlier_run_needs_overwrite(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    float_dir = models.save_checkpoint(models.hf_vit(), tmp_path / "float")
    assert cli.main(["quantize", float_dir, str(tmp_path / "out"), "--num-calibration-samples", "4"]) == 1
    assert "already holds files" in capsys.readouterr().err
    assert cli.main(["quantize", float_dir, str(tmp_path / "out"), "--overwrite",
                     "--num-calibration-samples", "4"]) == 1  # not an lrpqvit output: left alone
    assert "not removed" in capsys.readouterr().err and (tmp_path / "out" / "notes.txt").exists()
    (tmp_path / "out" / "notes.txt").unlink()
    assert cli.main(["quantize", float_dir, str(tmp_path / "out"), "--num-calibration-samples", "4"]) == 0
    assert cli.main(["quantize", float_dir, str(tmp_path / "out"), "--overwrite", "--w-bits", "8",
                     "--num-calibration-samples", "4"]) == 0
    assert '"w_bits": 8' in (tmp_path / "out" / "config.json").read_text()


def test_the_accuracy_options_reach_the_saved_config(tmp_path):
    float_dir = models.save_checkpoint(models.hf_vit(), tmp_path / "float")
    assert cli.main(["quantize", float_dir, str(tmp_path / "out"), "--num-calibration-samples", "4",
                     "--softmax-quantizer", "adalog", "--gelu-quantizer", "adalog", "--weight-rounding", "gptq",
                     "--center-keys", "--compensate-activations"]) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert (saved["softmax_quantizer"], saved["gelu_quantizer"], saved["weight_rounding"]) == ("adalog",) * 2 + ("gptq",)
    assert saved["center_keys"] is True and saved["compensate_activations"] is True
    card = (tmp_path / "out" / "README.md").read_text()
    assert "AdaLog attention probabilities" in card and "keys centred" in card and "re-solved" in card


def test_library_errors_name_the_flags():
    assert cli._with_flags("w_bits must be an integer; num_calibration_samples too, split='x'") == \
        "--w-bits must be an integer; --num-calibration-samples too, --split 'x'"
