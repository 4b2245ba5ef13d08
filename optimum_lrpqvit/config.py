"""``LRPQConfig``: the recipe of a quantization and its calibration source; the applied copy also records the
result (bit plan, its summary, the importance scores used)."""

from __future__ import annotations

import difflib
import inspect
import math
import os
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .allocation import DEFAULT_CANDIDATES
from .quantizers import DEFAULT_PERCENTILES, check_bits
from .registry import (
    ALLOCATION_RULES,
    GELU_QUANTIZERS,
    IMPORTANCE_CRITERIA,
    POST_LN_TREATMENTS,
    SOFTMAX_QUANTIZERS,
    WEIGHT_ROUNDINGS,
)
from .scores import check_scores

__all__ = ["FORMAT_VERSION", "LRPQConfig", "QUANT_METHOD"]

QUANT_METHOD = "lrpqvit"
RECONSTRUCTIONS = (None, "block")
FORMAT_VERSION = 1  # of the packed checkpoint (docs/method.md#checkpoint-format)


def _number_list(value: object, name: str) -> list:
    """``value`` as a list of numbers (ints stay ints, so that ``check_bits`` sees 2.5 as it is); ValueError for
    a string, None or a non-number element."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of numbers, got {value!r}.")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name} must be a list of numbers, got the element {v!r} in {list(value)!r}.")
    return list(value)


def _unknown_options_message(kwargs: dict[str, Any]) -> str:
    known = [p for p in inspect.signature(LRPQConfig.__init__).parameters if p not in ("self", "kwargs")]
    hints = []
    for key in sorted(kwargs):
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"LRPQConfig got unknown option(s) {', '.join(hints)}; the options are {', '.join(known)}."


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
        softmax_quantizer (`str`, *optional*, defaults to `"log_sqrt2"`):
            Attention probabilities: `"log_sqrt2"` (x̂ = Δ·2^(−q/2), RepQ-ViT and LRP-QViT) or `"adalog"` (AdaLog's
            base 2^(−n/32), n searched per layer with Δ; finer than √2 where there are codes to spare).
        gelu_quantizer (`str`, *optional*, defaults to `"uniform"`):
            Inputs of the MLPs' second Linear (post-GELU): `"uniform"` (per tensor), or `"adalog"` (AdaLog on the
            activations shifted by their minimum, base and Δ searched per layer).
        weight_rounding (`str`, *optional*, defaults to `"nearest"`):
            `"nearest"`, or `"gptq"`: GPTQ's error-compensating rounding on each layer's calibration inputs
            (one more forward pass of the calibration images).
        center_keys (`bool`, *optional*, defaults to `False`):
            Before calibration, shift every key channel by the midpoint of its calibration range, folded into the
            key projection's bias (one more forward pass of the calibration images): the softmax over the keys
            is unchanged, and one per-tensor scale of k no longer has to span the channels' offsets. Not for
            attention with normalised keys (Swin V2, timm ViTs with `qk_norm`).
        compensate_activations (`bool`, *optional*, defaults to `False`):
            Before weight rounding, re-solve every Linear's weight and bias, in execution order, so that the layer
            on its quantized input reproduces the float model's output (ridge regression, as ERQ's activation
            quantization error reduction; two more forward passes of the calibration images, holding every
            Linear's float input on them). With `weight_rounding="gptq"`, GPTQ then uses the Hessian of the
            quantized inputs.
        reconstruction (`str`, *optional*):
            `"block"`: after calibration and weight rounding, tune each block's weight rounding (AdaRound) and
            activation step sizes (LSQ) to reproduce the float block's output, with QDrop's random dropping of
            activation quantization (BRECQ/QDrop block reconstruction); None (default): calibration only.
        reconstruction_samples (`int`, *optional*, defaults to 1024):
            Images that `from_pretrained`, `LRPQuantizer` and the command line draw for the reconstruction (the
            next ones of the calibration draw; None: the calibration images). `quantize()` reconstructs on its
            `reconstruction_data`.
        reconstruction_iters (`int`, *optional*, defaults to 500):
            Adam steps per block, on batches of 32 of the reconstruction images.
        reconstruction_seconds (`float`, *optional*):
            Time budget of the whole reconstruction, shared equally among the blocks still to do: a block runs
            fewer than `reconstruction_iters` steps when they would not fit (the result then depends on the
            machine's speed). No budget by default.
        quantize_head (`bool`, *optional*, defaults to `False`):
            Dense-prediction models (Mask2Former, UperNet, YOLOS): also quantize the Linear layers of the head
            (pixel decoder, transformer decoder, predictors) at `w_bits`/`a_bits`; by default only the backbone is
            quantized and the head stays float. Classifiers always quantize their head; not with
            `mixed_precision` (the head's layers have no LRP importance).
        percentiles (`list[float]`, *optional*, defaults to `[0.999, 0.9999, 0.99999]`):
            Candidate percentiles of the range search; the lowest-MSE one is kept.
        mixed_precision (`bool`, *optional*, defaults to `False`):
            Allocate bits per layer from layer importance, keeping the model size of uniform `w_bits`.
        allocation (`str`, *optional*, defaults to `"paper"`):
            `"paper"`: the first two blocks at w_bits+1, the least important layers at w_bits−1 until the
            parameter-weighted average is back at w_bits. `"budget"`: one of `candidate_bits` per layer,
            maximising the importance-weighted reduction of weight quantization error at an average of
            exactly ≤ w_bits (an integer program).
        importance (`str`, *optional*, defaults to `"lrp"`):
            `"lrp"` (LRP relevance ⊙ gradient), `"lrp_per_role"` (the same scores normalised within each layer
            role, e.g. all `fc1` layers, before ranking), `"fisher"` (diagonal Fisher × weight quantization
            error at `w_bits`), or `"random"` / `"uniform"` for ablations at equal size.
        candidate_bits (`list[int]`, *optional*, defaults to `[3, 4, 5, 6, 8]`):
            Weight bits the `"budget"` allocation may choose from.
        num_importance_samples (`int`, *optional*):
            Images scored for importance (a seeded random subset); all of the importance data by default.
        importance_scores (`dict` or `str`, *optional*):
            Precomputed importance `{point name: score}`, or the path of a JSON file written by
            `lrpqvit score` / `score_importance` (read by `quantize`); used instead of measuring by the measured
            criteria (LRP, Fisher). Set by `quantize` to the scores it used.
        seed (`int`, *optional*, defaults to 0):
            Fixes every random choice (calibration and importance samples, random importance).
        dataset (`str`, *optional*):
            Calibration data for `from_pretrained(..., quantization_config=...)`: a Hub dataset id, a local
            image folder or `save_to_disk` directory, or `"fashion_mnist"` (the bundled loader). Images are
            preprocessed with the model's own image processor.
        dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of `dataset` to sample from.
        num_calibration_samples (`int`, *optional*, defaults to 32):
            Calibration images drawn (seeded) from `dataset`; the importance images are the next
            `num_importance_samples` of the same draw (default: the calibration images themselves).
        bit_plan (`dict`, *optional*):
            Set by `quantize`: `{point name: {"w_bits": int | None, "a_bits": int}}`.
        bit_plan_summary (`dict`, *optional*):
            Set by `quantize`: `{"avg_w_bits", "avg_a_bits", "size_mb"}`.

    Unknown keyword arguments raise TypeError (a misspelled option must not be ignored); ``from_dict``, which reads
    saved configs, keeps unknown keys as attributes instead, for configs written by later versions.
    """

    def __init__(
        self,
        w_bits: int = 4,
        a_bits: int = 4,
        post_ln: str = "crl",
        crl_k: float = 2.0,
        softmax_quantizer: str = "log_sqrt2",
        gelu_quantizer: str = "uniform",
        weight_rounding: str = "nearest",
        center_keys: bool = False,
        compensate_activations: bool = False,
        reconstruction: str | None = None,
        reconstruction_samples: int = 1024,
        reconstruction_iters: int = 500,
        reconstruction_seconds: float | None = None,
        quantize_head: bool = False,
        percentiles: list[float] | tuple[float, ...] = DEFAULT_PERCENTILES,
        mixed_precision: bool = False,
        allocation: str = "paper",
        importance: str = "lrp",
        candidate_bits: list[int] | tuple[int, ...] = DEFAULT_CANDIDATES,
        num_importance_samples: int | None = None,
        importance_scores: dict[str, float] | str | None = None,
        seed: int = 0,
        dataset: str | None = None,
        dataset_split: str = "train",
        num_calibration_samples: int = 32,
        bit_plan: dict[str, dict[str, int | None]] | None = None,
        bit_plan_summary: dict[str, float] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(_unknown_options_message(kwargs))
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r} for an LRPQConfig, got {quant_method!r}.")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.w_bits = w_bits
        self.a_bits = a_bits
        self.post_ln = post_ln
        self.crl_k = crl_k
        self.softmax_quantizer = softmax_quantizer
        self.gelu_quantizer = gelu_quantizer
        self.weight_rounding = weight_rounding
        self.center_keys = center_keys
        self.compensate_activations = compensate_activations
        self.reconstruction = reconstruction
        self.reconstruction_samples = reconstruction_samples
        self.reconstruction_iters = reconstruction_iters
        self.reconstruction_seconds = reconstruction_seconds
        self.quantize_head = quantize_head
        self.percentiles = _number_list(percentiles, "percentiles")
        self.mixed_precision = mixed_precision
        self.allocation = allocation
        self.importance = importance
        self.candidate_bits = _number_list(candidate_bits, "candidate_bits")
        self.num_importance_samples = num_importance_samples
        self.importance_scores = importance_scores
        self.seed = seed
        self.dataset = dataset
        self.dataset_split = dataset_split
        self.num_calibration_samples = num_calibration_samples
        self.bit_plan = bit_plan
        self.bit_plan_summary = bit_plan_summary
        self.post_init()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """The config saved as ``config_dict`` (``to_dict``); keys this version does not know are kept as
        attributes, so that a config written by a later version still loads and saves them again. A stored
        config holds its importance scores, never a path: a path in a downloaded ``config.json`` would be read
        from outside the model's directory, so it is refused."""
        if isinstance(config_dict.get("importance_scores"), str):
            raise ValueError(f"importance_scores in a stored quantization_config must be the scores themselves, not "
                             f"the path {config_dict['importance_scores']!r} (never followed from a config file); "
                             "pass the path to LRPQConfig(importance_scores=...) instead.")
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        config = cls(**{k: v for k, v in config_dict.items() if k in known})
        for key, value in config_dict.items():
            if key not in known:
                setattr(config, key, value)
        unused = {}
        for key, value in kwargs.items():
            if hasattr(config, key):
                setattr(config, key, value)
            else:
                unused[key] = value
        config.post_init()
        return (config, unused) if return_unused_kwargs else config

    @property
    def measures_importance(self) -> bool:
        """Whether quantizing with this config measures importance on data (a measured criterion such as LRP
        or Fisher, and no precomputed ``importance_scores``)."""
        return (self.mixed_precision and IMPORTANCE_CRITERIA.get(self.importance).measured
                and self.importance_scores is None)

    def post_init(self) -> None:
        """Validate the fields; ValueError says which one is wrong and what is accepted."""
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        POST_LN_TREATMENTS.get(self.post_ln)
        if isinstance(self.crl_k, bool) or not isinstance(self.crl_k, (int, float)) or not (
            math.isfinite(self.crl_k) and self.crl_k > 0
        ):
            raise ValueError(f"crl_k must be a positive finite number, got {self.crl_k!r} "
                             "(use post_ln='repq' for no clipping).")
        SOFTMAX_QUANTIZERS.get(self.softmax_quantizer)
        GELU_QUANTIZERS.get(self.gelu_quantizer)
        WEIGHT_ROUNDINGS.get(self.weight_rounding)
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {self.reconstruction!r}.")
        seconds = self.reconstruction_seconds
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                    or not (math.isfinite(seconds) and seconds > 0)):
            raise ValueError(f"reconstruction_seconds must be a positive number of seconds or None, got {seconds!r}.")
        self.percentiles = _number_list(self.percentiles, "percentiles")
        self.candidate_bits = _number_list(self.candidate_bits, "candidate_bits")
        if not self.percentiles or not all(0.5 < p <= 1.0 for p in self.percentiles):
            raise ValueError(f"percentiles must be a non-empty list of values in (0.5, 1], got {self.percentiles!r}.")
        for name in ("mixed_precision", "quantize_head", "center_keys", "compensate_activations"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        if self.compensate_activations and self.weight_rounding not in ("nearest", "gptq"):
            raise ValueError("compensate_activations=True re-solves the weights before rounding them by "
                             f"'nearest' or 'gptq', not by weight_rounding={self.weight_rounding!r}.")
        if self.quantize_head and self.mixed_precision:
            raise ValueError("quantize_head=True cannot be combined with mixed_precision=True: LRP importance is "
                             "measured on the backbone only, so the head's layers would have no score. Quantize the "
                             "head at uniform bits, or leave it float.")
        ALLOCATION_RULES.get(self.allocation)
        IMPORTANCE_CRITERIA.get(self.importance)
        if not self.candidate_bits:
            raise ValueError("candidate_bits must be a non-empty list of integers between 2 and 8, got [].")
        for b in self.candidate_bits:
            check_bits(b, "candidate_bits")
        for name in ("num_importance_samples", "num_calibration_samples", "reconstruction_samples",
                     "reconstruction_iters"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        scores = self.importance_scores
        if scores is not None and not isinstance(scores, (str, os.PathLike)):
            try:
                if not isinstance(scores, dict) or not scores:
                    raise ValueError(f"got {scores!r}")
                check_scores(scores, "importance_scores")
            except ValueError as error:
                raise ValueError("importance_scores must be a non-empty {point name: non-negative score} dict or "
                                 f"the path of a scores JSON file written by `lrpqvit score` ({error}).") from None
        if self.dataset is not None and not isinstance(self.dataset, str):
            raise ValueError(f"dataset must be a Hub dataset id, a local directory or 'fashion_mnist', got "
                             f"{self.dataset!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}.")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"Unknown lrpqvit format_version {self.format_version!r} (quantization_config."
                             f"format_version in the checkpoint's config.json); this version of optimum-lrpqvit "
                             f"reads version {FORMAT_VERSION}. Upgrade optimum-lrpqvit.")
