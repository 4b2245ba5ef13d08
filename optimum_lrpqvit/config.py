"""``LRPQConfig``: what to quantize and how, and the bit plan that records what was applied."""

from __future__ import annotations

import math
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .quantizers import DEFAULT_PERCENTILES, check_bits

__all__ = ["LRPQConfig", "POST_LN_MODES", "QUANT_METHOD"]

QUANT_METHOD = "lrpqvit"
POST_LN_MODES = ("layerwise", "channelwise", "repq", "crl")
FORMAT_VERSION = 1


class LRPQConfig(QuantizationConfigMixin):
    """Configuration of LRP-QViT post-training quantization.

    Args:
        w_bits (`int`, *optional*, defaults to 4):
            Weight bits (2–8), per output channel.
        a_bits (`int`, *optional*, defaults to 4):
            Activation bits (2–8). The patch-embedding input always uses 8 bits.
        post_ln (`str`, *optional*, defaults to `"crl"`):
            Post-LayerNorm activations: `"layerwise"` (per tensor), `"channelwise"` (per channel, kept at
            inference), `"repq"` (channel-wise reparameterised to layer-wise) or `"crl"` (clipped, then
            reparameterised).
        crl_k (`float`, *optional*, defaults to 2.0):
            CRL clipping band, in cross-channel standard deviations around the mean of the channel-wise
            scales and zero points. Only used with `post_ln="crl"`.
        percentiles (`list[float]`, *optional*, defaults to `[0.999, 0.9999, 0.99999]`):
            Candidate percentiles of the range search; the lowest-MSE one is kept.
        mixed_precision (`bool`, *optional*, defaults to `False`):
            Allocate bits per layer from LRP importance.
        bit_plan (`dict`, *optional*):
            Set by `quantize`: `{point name: {"w_bits": int | None, "a_bits": int}}`.
        bit_plan_summary (`dict`, *optional*):
            Set by `quantize`: `{"avg_w_bits", "avg_a_bits", "size_mb"}`.
        kwargs:
            Unknown keys are kept as attributes (forward compatibility of saved configs).
    """

    def __init__(
        self,
        w_bits: int = 4,
        a_bits: int = 4,
        post_ln: str = "crl",
        crl_k: float = 2.0,
        percentiles: list[float] | tuple[float, ...] = DEFAULT_PERCENTILES,
        mixed_precision: bool = False,
        bit_plan: dict[str, dict[str, int | None]] | None = None,
        bit_plan_summary: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = kwargs.pop("format_version", FORMAT_VERSION)
        kwargs.pop("quant_method", None)
        self.w_bits = w_bits
        self.a_bits = a_bits
        self.post_ln = post_ln
        self.crl_k = crl_k
        self.percentiles = [float(p) for p in percentiles]
        self.mixed_precision = mixed_precision
        self.bit_plan = bit_plan
        self.bit_plan_summary = bit_plan_summary
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.post_init()

    def post_init(self) -> None:
        """Validate the fields; ValueError says which one is wrong and what is accepted."""
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        if self.post_ln not in POST_LN_MODES:
            raise ValueError(f"post_ln must be one of {POST_LN_MODES}, got {self.post_ln!r}.")
        if isinstance(self.crl_k, bool) or not isinstance(self.crl_k, (int, float)) or not (
            math.isfinite(self.crl_k) and self.crl_k > 0
        ):
            raise ValueError(f"crl_k must be a positive finite number, got {self.crl_k!r} "
                             "(use post_ln='repq' for no clipping).")
        if not self.percentiles or not all(0.5 < p <= 1.0 for p in self.percentiles):
            raise ValueError(f"percentiles must be a non-empty list of values in (0.5, 1], got {self.percentiles!r}.")
        if not isinstance(self.mixed_precision, bool):
            raise ValueError(f"mixed_precision must be a bool, got {self.mixed_precision!r}.")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"Unknown lrpqvit format_version {self.format_version!r}; this version of "
                             f"optimum-lrpqvit reads version {FORMAT_VERSION}. Upgrade optimum-lrpqvit.")
