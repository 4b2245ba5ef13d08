"""Tiny random models of every supported family, shared by the tests."""

from __future__ import annotations

import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from torch import nn
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    SwinConfig,
    SwinForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

IMAGE_SIZE = 16
NUM_LABELS = 5

_VIT = dict(image_size=IMAGE_SIZE, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, num_labels=NUM_LABELS, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
_SWIN = dict(image_size=IMAGE_SIZE, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2, 2],
             num_heads=[2, 2, 4], window_size=2, num_labels=NUM_LABELS)
_TIMM_VIT = dict(img_size=IMAGE_SIZE, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
                 num_classes=NUM_LABELS)
_TIMM_SWIN = dict(img_size=IMAGE_SIZE, patch_size=2, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4),
                  window_size=2, num_classes=NUM_LABELS)


def _spread(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw weights with a larger spread (and LayerNorm affines away from 1/0) so logits differ clearly
    between classes and channels have different ranges, as in trained models."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.1))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _spread(ViTForImageClassification(ViTConfig(**_VIT)), seed)


def hf_deit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _spread(DeiTForImageClassification(DeiTConfig(**_VIT)), seed)


def hf_deit_teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _spread(DeiTForImageClassificationWithTeacher(DeiTConfig(**_VIT)), seed)


def hf_swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _spread(SwinForImageClassification(SwinConfig(**_SWIN)), seed)


def timm_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _spread(timm.models.vision_transformer.VisionTransformer(**_TIMM_VIT), seed)


def deep_timm_vit(seed: int = 0) -> nn.Module:
    """Six blocks: enough for mixed precision to have layers outside the first two blocks."""
    torch.manual_seed(seed)
    return _spread(timm.models.vision_transformer.VisionTransformer(**{**_TIMM_VIT, "depth": 6}), seed)


def timm_deit_distilled(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _spread(VisionTransformerDistilled(**_TIMM_VIT), seed)


def timm_swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _spread(timm.models.swin_transformer.SwinTransformer(**_TIMM_SWIN), seed)


def _wrapped(architecture: str, model_args: dict, seed: int, **config_kwargs) -> nn.Module:
    torch.manual_seed(seed)
    config = TimmWrapperConfig(architecture=architecture, model_args=model_args, num_labels=NUM_LABELS,
                               **config_kwargs)
    return _spread(TimmWrapperForImageClassification(config), seed)


def wrapped_timm_vit(seed: int = 0) -> nn.Module:
    args = {k: v for k, v in _TIMM_VIT.items() if k != "num_classes"}
    return _wrapped("vit_tiny_patch16_224", args, seed)


def wrapped_timm_swin(seed: int = 0) -> nn.Module:
    args = {k: v for k, v in _TIMM_SWIN.items() if k != "num_classes"}
    return _wrapped("swin_tiny_patch4_window7_224", args, seed)


FAMILIES = {
    "hf_vit": hf_vit,
    "hf_deit": hf_deit,
    "hf_deit_teacher": hf_deit_teacher,
    "hf_swin": hf_swin,
    "timm_vit": timm_vit,
    "timm_deit_distilled": timm_deit_distilled,
    "timm_swin": timm_swin,
    "wrapped_timm_vit": wrapped_timm_vit,
    "wrapped_timm_swin": wrapped_timm_swin,
}


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits through each family's own call signature."""
    with torch.no_grad():
        if isinstance(model, (timm.models.vision_transformer.VisionTransformer,
                              timm.models.swin_transformer.SwinTransformer)):
            return model(x)
        return model(pixel_values=x).logits


def processor_for(model: nn.Module):
    """The image processor a saved tiny model ships with: Fashion-MNIST-like grayscale images → RGB 16×16."""
    from transformers import TimmWrapperImageProcessor, ViTImageProcessor

    if isinstance(model, TimmWrapperForImageClassification):
        return TimmWrapperImageProcessor(pretrained_cfg=model.config.pretrained_cfg,
                                         architecture=model.config.architecture)
    return ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3, do_convert_rgb=True)


_PRETRAINED_CFG_16 = dict(input_size=[3, IMAGE_SIZE, IMAGE_SIZE], crop_pct=1.0, crop_mode="center",
                          interpolation="bilinear", mean=[0.5] * 3, std=[0.5] * 3, num_classes=NUM_LABELS)


def wrapped_timm_vit_16(seed: int = 0) -> nn.Module:
    """``wrapped_timm_vit`` whose ``pretrained_cfg`` describes its 16×16 input, so its processor fits."""
    args = {k: v for k, v in _TIMM_VIT.items() if k != "num_classes"}
    return _wrapped("vit_tiny_patch16_224", args, seed, pretrained_cfg=_PRETRAINED_CFG_16)


def wrapped_timm_swin_16(seed: int = 0) -> nn.Module:
    args = {k: v for k, v in _TIMM_SWIN.items() if k != "num_classes"}
    return _wrapped("swin_tiny_patch4_window7_224", args, seed, pretrained_cfg=_PRETRAINED_CFG_16)


def save_checkpoint(model: nn.Module, directory) -> str:
    """``save_pretrained`` with the model's processor: a float checkpoint as users have them."""
    model.save_pretrained(directory)
    processor = processor_for(model)
    if not isinstance(model, TimmWrapperForImageClassification):  # timm keeps its processor in config.json
        processor.save_pretrained(directory)
    return str(directory)
