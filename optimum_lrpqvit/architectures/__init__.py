"""One adapter per supported architecture family, and the lookup that picks it."""

from __future__ import annotations

import os

from torch import nn

from .base import Family, Layout, quantized_attention
from .hf import HF_SWIN, HF_VIT, is_transformers_model
from .hf_dense import HF_SWIN_DENSE, HF_YOLOS
from .hf_encoders import HF_BEIT, HF_CLIP, HF_DATA2VEC_VISION, HF_DINOV2, HF_SIGLIP, HF_VIT_ENCODERS
from .hf_swinv2 import HF_SWINV2
from .timm_swin import TIMM_SWIN
from .timm_vit import TIMM_VIT
from .timm_wrapper import HF_TIMM_WRAPPER

__all__ = ["FAMILIES", "Family", "Layout", "find_family", "is_transformers_model", "quantized_attention",
           "transformers_class"]

FAMILIES: tuple[Family, ...] = (HF_VIT, HF_SWIN, HF_SWINV2, HF_DINOV2, HF_VIT_ENCODERS, HF_BEIT, HF_DATA2VEC_VISION,
                                HF_CLIP, HF_SIGLIP, HF_TIMM_WRAPPER, TIMM_VIT, TIMM_SWIN, HF_SWIN_DENSE, HF_YOLOS)


def find_family(model: nn.Module) -> Family:
    """The adapter for ``model``; TypeError naming the supported families if there is none."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    supported = "; ".join(f.name for f in FAMILIES)
    raise TypeError(f"Unsupported model {type(model).__name__}. optimum-lrpqvit quantizes: {supported}.")


_HUB_KWARGS = ("revision", "token", "cache_dir", "subfolder", "local_files_only", "force_download", "proxies")


def transformers_class(name_or_path: str | os.PathLike, **from_pretrained_kwargs) -> type:
    """The transformers class that the ``config.json`` of a checkpoint (local directory or Hub id) names in
    ``architectures``, where a family supports it (a bare encoder is rebuilt as itself, not as a classifier); else
    ``AutoModelForImageClassification``. Hub arguments (revision, token, ...) are taken from
    ``from_pretrained_kwargs``."""
    import transformers

    hub = {k: v for k, v in from_pretrained_kwargs.items() if k in _HUB_KWARGS}
    config, _ = transformers.PretrainedConfig.get_config_dict(name_or_path, **hub)
    supported = tuple(c for f in FAMILIES for c in getattr(f, "model_classes", ()))
    for name in config.get("architectures") or ():
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, supported):
            return cls
    return transformers.AutoModelForImageClassification
