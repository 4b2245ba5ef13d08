"""optimum-lrpqvit: LRP-QViT post-training quantization of vision transformers."""

from .config import LRPQConfig
from .lrp import compute_importance
from .nn import calibration, quantizers_disabled
from .quantize import applied_config, quantize
from .hub import load_quantized, save_quantized
from . import integrations  # noqa: F401,E402  (registers "lrpqvit" with transformers)
from .integrations.optimum import LRPQuantizer
from .scoring import score_importance

__all__ = ["LRPQConfig", "LRPQuantizer", "applied_config", "calibration", "compute_importance", "load_quantized",
           "quantize", "quantizers_disabled", "save_quantized", "score_importance"]
__version__ = "0.1.0"
