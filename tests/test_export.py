"""ONNX export: a QDQ graph whose integer codes are the library's, checked with onnxruntime on every family."""

import os
import sys

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from optimum_lrpqvit import LRPQConfig, export_onnx, quantize, save_quantized
from optimum_lrpqvit.cli import main as cli_main
from optimum_lrpqvit.nn import weight_modules


# The codes are the library's, so ORT's outputs differ from PyTorch's by float32 rounding only (1e-5), except on
# images where an activation lies within the runtime's own rounding (its LayerNorm, Softmax, GELU and
# integer-GEMM scaling) of a code boundary and takes the neighbouring code. On these inputs that happens in 1-3
# of 16 images of the tiny Swins (v1 and v2) at W8/A8, moving logits of order 1 by up to 0.07, and in at most one
# of 16 of the other families (tiny CLIP towers 0.013, data2vec-vision 0.016).
def _check_logits(family: str, got: np.ndarray, expected: np.ndarray) -> None:
    assert (got.argmax(1) == expected.argmax(1)).all()
    error = np.abs(got - expected).max(axis=1)
    moved, bound = (3, 0.15) if "swin" in family else (1, 0.05)
    assert (error > 1e-5).sum() <= moved and error.max() <= bound, error


def _quantized(family, **config):
    model = models.FAMILIES[family]()
    return quantize(model, LRPQConfig(**config), models.images(8))


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": x.numpy()})[0]


# position embeddings interpolated (bicubic, antialiased); dense models
NOT_EXPORTABLE = {"hf_dinov2": "no operator for", "hf_dinov2_registers": "no operator for",
                  **dict.fromkeys(models.DENSE, "dense-prediction models are not exported")}


@pytest.mark.parametrize("family", sorted(NOT_EXPORTABLE))
def test_a_family_the_exporter_cannot_trace_is_refused_before_writing(family, tmp_path):
    with pytest.raises(ValueError, match=NOT_EXPORTABLE[family]):
        export_onnx(_quantized(family, w_bits=8, a_bits=8), tmp_path / "model.onnx")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", sorted(set(models.FAMILIES) - set(NOT_EXPORTABLE)))
def test_onnxruntime_gives_the_quantized_models_predictions(family, bits, tmp_path):
    model = _quantized(family, w_bits=bits, a_bits=bits)
    path = export_onnx(model, tmp_path / "model.onnx")
    x = models.images(16, seed=5)
    expected = models.logits(model, x).numpy()
    got = _run(path, x)
    _check_logits(family, got, expected)


@pytest.mark.parametrize("config", [
    {"post_ln": "layerwise", "w_bits": 6, "a_bits": 6},
    {"w_bits": 3, "a_bits": 3, "post_ln": "repq"},
    {"w_bits": 4, "a_bits": 4, "mixed_precision": True, "allocation": "budget", "importance": "random"},
    {"w_bits": 8, "a_bits": 8, "softmax_quantizer": "adalog", "weight_rounding": "gptq"},
    {"w_bits": 4, "a_bits": 4, "softmax_quantizer": "adalog", "gelu_quantizer": "adalog"},
    {"w_bits": 3, "a_bits": 3, "reconstruction": "block", "reconstruction_iters": 20},
])
def test_variants_export_exactly(config, tmp_path):
    model = _quantized("hf_vit", **config)
    x = models.images(16, seed=5)
    got = _run(export_onnx(model, tmp_path / "model.onnx"), x)
    assert np.abs(got - models.logits(model, x).numpy()).max() <= 1e-5


@pytest.mark.parametrize(("weight_codes", "dtype", "low", "high"), [("auto", np.int8, -8, 7),
                                                                     ("uint8", np.uint8, 0, 15)])
def test_graph_holds_integer_weights_and_qdq_pairs(weight_codes, dtype, low, high, tmp_path):
    model = _quantized("hf_vit", w_bits=4, a_bits=4)
    path = export_onnx(model, tmp_path / "model.onnx", weight_codes=weight_codes)
    graph = onnx.load(str(path)).graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    ops = [n.op_type for n in graph.node]
    weights = weight_modules(model)
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and initializers.get(n.input[0]) is not None
                 and initializers[n.input[0]].ndim >= 2]
    assert len(weight_dq) == len(weights)
    for node in weight_dq:
        codes = initializers[node.input[0]]
        assert codes.dtype == dtype and low <= codes.min() and codes.max() <= high  # 4-bit codes, one per byte
    shapes = {tuple(m.weight_shape) for m in weights.values()} | {tuple(m.weight_shape[::-1]) for m in weights.values()}
    floats = [i for i in initializers.values() if i.dtype == np.float32 and i.ndim >= 2]
    assert not [f.shape for f in floats if f.shape in shapes]  # no float copy of a quantized weight
    # activations: every Linear input, the patch embedding and both operands of both attention products
    attentions = 2
    assert ops.count("QuantizeLinear") >= len(weights) - 2 * attentions  # q/k/v share one QDQ of their input
    assert "Log" in ops and "Exp" in ops  # log-√2 probabilities as float operations


def _has_vnni():
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


@pytest.mark.parametrize("weight_codes", ["int8", "uint8"])
def test_weight_code_types_give_the_same_graph_values(weight_codes, tmp_path):
    model = _quantized("hf_vit", w_bits=8, a_bits=8)
    path = export_onnx(model, tmp_path / "model.onnx", weight_codes=weight_codes)
    initializers = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
    assert {i.dtype for i in initializers if i.ndim == 2} == {np.dtype(weight_codes)}
    if weight_codes == "int8" and not _has_vnni():
        pytest.skip("8-bit int8 weights may saturate in x86 u8·s8 kernels without VNNI (why 'auto' keeps uint8)")
    x = models.images(16, seed=5)
    assert np.abs(_run(path, x) - models.logits(model, x).numpy()).max() <= 1e-5


def test_batch_dimension_is_dynamic(tmp_path):
    model = _quantized("hf_deit_teacher")
    path = export_onnx(model, tmp_path / "model.onnx")
    for n in (1, 5):
        x = models.images(n, seed=2)
        assert _run(path, x).shape == (n, models.NUM_LABELS)


def test_export_leaves_the_model_as_it_was(tmp_path):
    model = _quantized("hf_swin")
    x = models.images(4, seed=1)
    before_logits = models.logits(model, x)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "model.onnx")
    assert torch.equal(models.logits(model, x), before_logits)
    state = model.state_dict()
    assert state.keys() == before_state.keys() and all(torch.equal(state[k], before_state[k]) for k in state)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any("onnx" in name for name, _ in model.named_buffers())


def test_unquantized_model_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ValueError, match="quantize"):
        export_onnx(models.hf_vit(), tmp_path / "model.onnx")
    assert os.listdir(tmp_path) == []


def test_bad_destinations_are_refused_before_exporting(tmp_path):
    model = _quantized("timm_vit")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "model.onnx")
    with pytest.raises(IsADirectoryError):
        export_onnx(model, tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises((FileNotFoundError, NotADirectoryError)):
        export_onnx(model, tmp_path / "file" / "model.onnx")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_inexpressible_point_names_itself_and_leaves_nothing(tmp_path):
    model = _quantized("hf_vit", w_bits=8, a_bits=8)
    quantizer = model.vit.layers[0].mlp.fc2.input_quantizer
    quantizer.set_params(quantizer.scale, torch.tensor(300.0))  # a range 300 codes away from 0: not uint8
    with pytest.raises(ValueError, match=r"fc2.input_quantizer: zero point 300 at 8 bits"):
        export_onnx(model, tmp_path / "model.onnx")
    assert os.listdir(tmp_path) == []
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_channelwise_activations_are_refused_naming_what_is_supported(tmp_path):
    model = _quantized("hf_vit", post_ln="channelwise")
    with pytest.raises(ValueError, match="channel-wise activation scales.*post_ln='crl'"):
        export_onnx(model, tmp_path / "model.onnx")
    assert os.listdir(tmp_path) == []


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r'pip install "optimum-lrpqvit\[onnx\]"'):
        export_onnx(_quantized("timm_vit"), tmp_path / "model.onnx")


def test_cli_exports_a_saved_quantized_model(tmp_path, capsys):
    model = _quantized("hf_vit", w_bits=4, a_bits=4)
    save_quantized(model, tmp_path / "quantized")
    assert cli_main(["export", str(tmp_path / "quantized"), str(tmp_path / "model.onnx"), "--verify", "4"]) == 0
    out = capsys.readouterr().out
    assert "model.onnx" in out and "top-1 agreement 100.00 %" in out
    x = models.images(8, seed=4)
    assert np.abs(_run(tmp_path / "model.onnx", x) - models.logits(model, x).numpy()).max() <= 1e-5
    assert cli_main(["export", str(tmp_path / "nowhere"), str(tmp_path / "b.onnx")]) == 1
    assert "nowhere" in capsys.readouterr().err
