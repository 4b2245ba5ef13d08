"""Thin layers that plug optimum-lrpqvit into other libraries; importing this package registers them."""

from .optimum import LRPQuantizer
from .transformers import LRPQHfQuantizer, register

__all__ = ["LRPQHfQuantizer", "LRPQuantizer", "register"]
