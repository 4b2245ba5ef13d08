"""optimum-lrpqvit: LRP-QViT post-training quantization of vision transformers.

Importing the package registers the ``"lrpqvit"`` quantization method with transformers
(``integrations.transformers``).
"""

from .config import LRPQConfig
from .export import export_onnx
from .integer_matmul import use_integer_matmul
from .integrations import LRPQuantizer
from .lrp import compute_importance
from .nn import calibration, pack_weights, quantizers_disabled, unpack_weights
from .quantize import applied_config, quantize
from .scoring import score_importance
from .serialization import load_quantized, save_quantized

__all__ = ["LRPQConfig", "LRPQuantizer", "applied_config", "calibration", "compute_importance", "export_onnx",
           "load_quantized",
           "pack_weights", "quantize", "quantizers_disabled", "save_quantized", "score_importance", "unpack_weights",
           "use_integer_matmul"]
__version__ = "0.1.0"
