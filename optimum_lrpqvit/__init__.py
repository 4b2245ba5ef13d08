"""optimum-lrpqvit: LRP-QViT post-training quantization of vision transformers."""

from .config import LRPQConfig
from .lrp import compute_importance
from .nn import calibration, quantizers_disabled
from .quantize import quantize

__all__ = ["LRPQConfig", "calibration", "compute_importance", "quantize", "quantizers_disabled"]
__version__ = "0.1.0"
