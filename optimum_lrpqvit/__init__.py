"""optimum-lrpqvit: LRP-QViT post-training quantization of vision transformers."""

from .config import LRPQConfig
from .lrp import compute_importance
from .nn import calibration, quantizers_disabled
from .quantize import quantize
from .hub import load_quantized, save_quantized
from . import integrations  # noqa: F401,E402  (registers "lrpqvit" with transformers)

__all__ = ["LRPQConfig", "calibration", "compute_importance", "load_quantized", "quantize", "quantizers_disabled",
           "save_quantized"]
__version__ = "0.1.0"
