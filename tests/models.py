"""Tiny random models of every supported family, shared by the tests."""

from __future__ import annotations

import timm
import torch
import transformers
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


def hf_vit_model(seed: int = 0) -> nn.Module:
    """A bare ViTModel (e.g. DINO): scored and evaluated on its [CLS] token; its tanh pooler stays float."""
    torch.manual_seed(seed)
    return _spread(transformers.ViTModel(ViTConfig(**_VIT)), seed)


def hf_swin_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _spread(transformers.SwinModel(SwinConfig(**_SWIN)), seed)


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


_ENCODER = dict(image_size=IMAGE_SIZE, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=64)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _built(model_class: str, config: transformers.PretrainedConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _spread(getattr(transformers, model_class)(config), seed)


def hf_dinov2(seed: int = 0) -> nn.Module:
    """Dinov2 classifier: layer scale, [CLS] and mean patch token into the head."""
    config = transformers.Dinov2Config(**_ENCODER, **_NO_DROPOUT, num_labels=NUM_LABELS)
    return _built("Dinov2ForImageClassification", config, seed)


def hf_dinov2_registers(seed: int = 0) -> nn.Module:
    """Dinov2 with four register tokens, no classifier: scored on its pooled embedding."""
    config = transformers.Dinov2WithRegistersConfig(**_ENCODER, **_NO_DROPOUT, num_register_tokens=4)
    return _built("Dinov2WithRegistersModel", config, seed)


def hf_vit_msn(seed: int = 0) -> nn.Module:
    return _built("ViTMSNForImageClassification",
                  transformers.ViTMSNConfig(**_ENCODER, **_NO_DROPOUT, num_labels=NUM_LABELS), seed)


def hf_vit_mae(seed: int = 0) -> nn.Module:
    """The MAE encoder on all patches (mask_ratio 0), no classifier."""
    return _built("ViTMAEModel", transformers.ViTMAEConfig(**_ENCODER, **_NO_DROPOUT, mask_ratio=0.0), seed)


def hf_beit(seed: int = 0) -> nn.Module:
    """BEiT classifier: relative position bias per layer, layer-scale parameters, mean pooling."""
    config = transformers.BeitConfig(**_ENCODER, **_NO_DROPOUT, num_labels=NUM_LABELS,
                                     use_relative_position_bias=True, layer_scale_init_value=0.1)
    return _built("BeitForImageClassification", config, seed)


def hf_data2vec_vision(seed: int = 0) -> nn.Module:
    """Data2VecVision classifier (BEiT's layout before AttentionInterface): relative position bias, layer scale."""
    config = transformers.Data2VecVisionConfig(**_ENCODER, **_NO_DROPOUT, num_labels=NUM_LABELS,
                                               use_relative_position_bias=True, layer_scale_init_value=0.1)
    return _built("Data2VecVisionForImageClassification", config, seed)


def _clip_vision(**kwargs) -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(**_ENCODER, projection_dim=8, **kwargs)


def _tower_config(name: str, **kwargs) -> transformers.PretrainedConfig:
    vision = {**_ENCODER}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)
    if name == "clip":
        return transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=8, **kwargs)
    return transformers.SiglipConfig(vision_config=vision, text_config=text, **kwargs)


def hf_clip_vision(seed: int = 0) -> nn.Module:
    """CLIP vision tower with its projection: pre-LayerNorm, QuickGELU, bias-free patch embedding."""
    return _built("CLIPVisionModelWithProjection", _clip_vision(), seed)


def hf_clip_classifier(seed: int = 0) -> nn.Module:
    return _built("CLIPForImageClassification", _tower_config("clip", num_labels=NUM_LABELS), seed)


def hf_clip_model(seed: int = 0) -> nn.Module:
    """The two-tower CLIPModel: its vision tower and projection are quantized, the text tower stays float."""
    return _built("CLIPModel", _tower_config("clip"), seed)


def hf_siglip_vision(seed: int = 0) -> nn.Module:
    """SigLIP vision tower with its attention-pooling head (kept float)."""
    return _built("SiglipVisionModel", transformers.SiglipVisionConfig(**_ENCODER), seed)


def hf_siglip_classifier(seed: int = 0) -> nn.Module:
    return _built("SiglipForImageClassification", _tower_config("siglip", num_labels=NUM_LABELS), seed)


def stays_float(name: str) -> bool:
    """Whether the module ``name`` is one the library keeps float by design: a two-tower model's text tower,
    SigLIP's attention-pooling head, Swinv2's position-bias MLP, ViTModel's tanh pooler and the heads of the dense
    models (quantized only with ``quantize_head``)."""
    dense_heads = ("model.pixel_level_module.decoder.", "model.transformer_module.", "class_predictor",
                   "class_labels_classifier.", "bbox_predictor.")
    return name.startswith(("text_model", "text_projection", *dense_heads)) or any(
        part in f".{name}." for part in (".head.attention.", ".head.mlp.", ".continuous_position_bias_mlp.", ".pooler."))


_SWINV2 = dict(image_size=IMAGE_SIZE, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
               window_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_swinv2(seed: int = 0) -> nn.Module:
    """Swinv2 classifier: post-norm blocks, cosine attention, shifted windows, one patch merging."""
    return _built("Swinv2ForImageClassification", transformers.Swinv2Config(**_SWINV2, num_labels=NUM_LABELS), seed)


def hf_swinv2_model(seed: int = 0) -> nn.Module:
    return _built("Swinv2Model", transformers.Swinv2Config(**_SWINV2), seed)


EMBEDDERS = {
    "hf_vit_model": hf_vit_model,
    "hf_swin_model": hf_swin_model,
    "hf_dinov2_registers": hf_dinov2_registers,
    "hf_vit_mae": hf_vit_mae,
    "hf_clip_vision": hf_clip_vision,
    "hf_clip_model": hf_clip_model,
    "hf_siglip_vision": hf_siglip_vision,
    "hf_swinv2_model": hf_swinv2_model,
}

CLASSIFIERS = {
    "hf_vit": hf_vit,
    "hf_deit": hf_deit,
    "hf_deit_teacher": hf_deit_teacher,
    "hf_swin": hf_swin,
    "timm_vit": timm_vit,
    "timm_deit_distilled": timm_deit_distilled,
    "timm_swin": timm_swin,
    "wrapped_timm_vit": wrapped_timm_vit,
    "wrapped_timm_swin": wrapped_timm_swin,
    "hf_dinov2": hf_dinov2,
    "hf_vit_msn": hf_vit_msn,
    "hf_beit": hf_beit,
    "hf_data2vec_vision": hf_data2vec_vision,
    "hf_clip_classifier": hf_clip_classifier,
    "hf_siglip_classifier": hf_siglip_classifier,
    "hf_swinv2": hf_swinv2,
}

_DENSE_SWIN = dict(image_size=IMAGE_SIZE, patch_size=1, num_channels=3, embed_dim=16, depths=[2, 2, 2, 2],
                   num_heads=[2, 2, 4, 4], window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])


def hf_mask2former(seed: int = 0) -> nn.Module:
    """Mask2Former (instance/universal) with a Swin backbone whose 16, 8, 4, 2 feature maps the window divides."""
    config = transformers.Mask2FormerConfig(
        backbone_config=SwinConfig(**_DENSE_SWIN), hidden_dim=32, num_queries=6, encoder_layers=1, decoder_layers=2,
        num_labels=NUM_LABELS, feature_size=32, mask_feature_size=32, encoder_feedforward_dim=32, dim_feedforward=32,
        num_attention_heads=2)
    return _built("Mask2FormerForUniversalSegmentation", config, seed)


def hf_upernet(seed: int = 0) -> nn.Module:
    config = transformers.UperNetConfig(backbone_config=SwinConfig(**_DENSE_SWIN), hidden_size=16,
                                        auxiliary_channels=8, num_labels=NUM_LABELS)
    return _built("UperNetForSemanticSegmentation", config, seed)


def hf_yolos(seed: int = 0) -> nn.Module:
    config = transformers.YolosConfig(**{**_ENCODER, "image_size": [IMAGE_SIZE, IMAGE_SIZE]}, **_NO_DROPOUT,
                                      num_detection_tokens=4, num_labels=NUM_LABELS)
    return _built("YolosForObjectDetection", config, seed)


# Swin-T as published (microsoft/swin-tiny-patch4-window7-224), the backbone of facebook/mask2former-swin-tiny-coco-
# instance and openmmlab/upernet-swin-tiny; the heads with those checkpoints' config values. Random weights, no download.
_SWIN_T = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.3,
               out_features=["stage1", "stage2", "stage3", "stage4"])
FULL_SIZE_DENSE = {
    "mask2former-swin-tiny-coco-instance": lambda: transformers.Mask2FormerForUniversalSegmentation(
        transformers.Mask2FormerConfig(backbone_config=SwinConfig(**_SWIN_T), num_labels=80)).eval(),
    "upernet-swin-tiny": lambda: transformers.UperNetForSemanticSegmentation(transformers.UperNetConfig(
        backbone_config=SwinConfig(**_SWIN_T), hidden_size=512, auxiliary_in_channels=384, num_labels=150)).eval(),
}

DENSE = {
    "hf_mask2former": hf_mask2former,
    "hf_upernet": hf_upernet,
    "hf_yolos": hf_yolos,
}

FAMILIES = {**CLASSIFIERS, **EMBEDDERS, **DENSE}


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits through each family's own call signature; a model without a classifier gives its image embedding."""
    with torch.no_grad():
        if isinstance(model, (timm.models.vision_transformer.VisionTransformer,
                              timm.models.swin_transformer.SwinTransformer)):
            return model(x)
        if isinstance(model, (transformers.CLIPModel, transformers.SiglipModel)):
            return model.get_image_features(pixel_values=x).pooler_output
        if isinstance(model, transformers.ViTMAEModel):  # all patches, in order
            noise = torch.arange(model.embeddings.patch_embeddings.num_patches).expand(len(x), -1)
            return model(pixel_values=x, noise=noise).last_hidden_state[:, 0]
        out = model(pixel_values=x)
        if isinstance(model, (transformers.ViTModel, transformers.DeiTModel)):
            return out.last_hidden_state[:, 0]
        for key in ("logits", "class_queries_logits", "image_embeds", "pooler_output"):
            if getattr(out, key, None) is not None:
                return out[key]
        return out.last_hidden_state[:, 0]


def processor_for(model: nn.Module):
    """The image processor a saved tiny model ships with: Fashion-MNIST-like grayscale images → RGB 16×16."""
    from transformers import TimmWrapperImageProcessor, ViTImageProcessor

    dense = {transformers.Mask2FormerForUniversalSegmentation: transformers.Mask2FormerImageProcessor,
             transformers.UperNetForSemanticSegmentation: transformers.SegformerImageProcessor,
             transformers.YolosForObjectDetection: transformers.YolosImageProcessor}
    for model_class, processor_class in dense.items():
        if isinstance(model, model_class):
            return processor_class(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
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
