"""optimum-lrpqvit: LRP-QViT post-training quantization of vision transformers.

Importing the package registers the ``"lrpqvit"`` quantization method with transformers
(``integrations.transformers``).
"""

from .config import LRPQConfig
from .integrations import LRPQuantizer
from .lrp import compute_importance
from .nn import calibration, quantizers_disabled
from .quantize import applied_config, quantize
from .scoring import score_importance
from .serialization import load_quantized, save_quantized

__all__ = ["LRPQConfig", "LRPQuantizer", "applied_config", "calibration", "compute_importance", "load_quantized",
           "quantize", "quantizers_disabled", "save_quantized", "score_importance"]
__version__ = "0.1.0"
