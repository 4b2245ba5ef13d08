"""Export of quantized models to other runtimes.

``export_onnx`` writes a model returned by ``optimum_lrpqvit.quantize`` (or loaded packed) as an ONNX QDQ graph
whose integer codes are this library's (``docs/method.md#quantizers``); ``compare_with_onnxruntime`` checks it.
Both need the optional extra ``pip install "optimum-lrpqvit[onnx]"`` (``onnx``, ``onnxruntime``), imported only
when called.
"""

from .onnx import DEFAULT_OPSET, INSTALL_HINT, WEIGHT_CODES, compare_with_onnxruntime, example_input_shape, export_onnx

__all__ = ["DEFAULT_OPSET", "INSTALL_HINT", "WEIGHT_CODES", "compare_with_onnxruntime", "example_input_shape",
           "export_onnx"]
