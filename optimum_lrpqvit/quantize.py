"""``quantize(model, config, data)``: calibrate → reparameterise post-LayerNorm activations → fold weights.

Follows RepQ-ViT's pipeline (Li et al., ICCV 2023): one calibration pass with channel-wise post-LayerNorm
quantizers, reparameterisation to layer-wise (optionally clipped, CRL — LRP-QViT, arXiv 2401.11243), and
re-calibration of the weights that changed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .allocation import budget_allocation, importance_scores, paper_allocation, weight_quantization_errors
from .architectures import Family, Layout, find_family
from .config import MEASURED_IMPORTANCES, LRPQConfig
from .fisher import fisher_importance
from .inputs import as_pixel_values
from .lrp import compute_importance
from .nn import LogSqrt2Quantizer, QuantConv2d, QuantLinear, QuantMatMul, SharedInput, UniformQuantizer, calibration
from .reparam import clip_channel_params, reparam_factors, reparameterize

__all__ = ["PATCH_EMBED_A_BITS", "applied_config", "bit_plan_summary", "calibrate", "fixed_bit_plan", "fold_weights",
           "layer_importance", "mixed_bit_plan", "prepare_model", "quantize"]

PATCH_EMBED_A_BITS = 8
PAPER_FIRST_BLOCKS = 2
BitPlan = dict[str, dict[str, int | None]]


def applied_config(model: nn.Module) -> LRPQConfig:
    """The config ``quantize`` applied to ``model`` (with its bit plan); ValueError if it was not quantized."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        config = getattr(model, "quantization_config", None)
    if not isinstance(config, LRPQConfig) or not config.bit_plan:
        raise ValueError(f"{type(model).__name__} carries no applied LRPQConfig with a bit plan; quantize it with "
                         "optimum_lrpqvit.quantize() first.")
    return config


def fixed_bit_plan(layout: Layout, w_bits: int, a_bits: int) -> BitPlan:
    """Every point at (w_bits, a_bits); the patch embedding's input at 8 bits."""
    plan: BitPlan = {p: {"w_bits": w_bits, "a_bits": a_bits} for p in layout.weight_points()}
    plan[layout.patch_embed]["a_bits"] = PATCH_EMBED_A_BITS
    plan.update({p: {"w_bits": None, "a_bits": a_bits} for p in layout.points() if p not in plan})
    return plan


def mixed_bit_plan(model: nn.Module, layout: Layout, config: LRPQConfig, importance: dict[str, float]) -> BitPlan:
    """Per-layer bits from ``importance`` (SPEC §5) at the size of uniform ``config.w_bits``.

    Weight points get their allocated bits; their input activations shift by the same amount (the patch
    embedding's input stays at 8 bits). Attention products keep ``a_bits``, +1 in the first two blocks with
    the paper rule.
    """
    plan = fixed_bit_plan(layout, config.w_bits, config.a_bits)
    weighted = layout.weight_points()
    params = {p: model.get_submodule(p).weight.numel() for p in weighted}
    scores = {p: importance[p] for p in weighted}
    if config.allocation == "paper":
        w_bits = paper_allocation(scores, params, {p: layout.block_of[p] for p in weighted}, config.w_bits,
                                  first_blocks=PAPER_FIRST_BLOCKS)
    else:
        weights = {p: model.get_submodule(p).weight.detach() for p in weighted}
        errors = weight_quantization_errors(weights, config.candidate_bits, config.percentiles)
        w_bits = budget_allocation(scores, params, errors, config.w_bits, config.candidate_bits)
    for point, bits in plan.items():
        if point in w_bits:
            delta = w_bits[point] - config.w_bits
            bits["w_bits"] = w_bits[point]
            if point != layout.patch_embed:
                bits["a_bits"] = min(8, max(2, config.a_bits + delta))
        elif config.allocation == "paper" and 0 <= layout.block_of[point] < PAPER_FIRST_BLOCKS:
            bits["a_bits"] = min(8, config.a_bits + 1)
    return plan


def layer_importance(model: nn.Module, layout: Layout, config: LRPQConfig, pixels: torch.Tensor) -> dict[str, float]:
    """Relative importance of every quantized point by ``config.importance`` (seeded); the measured criteria
    use the config's precomputed ``importance_scores`` when it has them (they must name exactly these points)."""
    points = layout.points()
    measured = config.importance_scores if config.importance in MEASURED_IMPORTANCES else None
    if measured is not None and set(measured) != set(points):
        missing, extra = sorted(set(points) - set(measured)), sorted(set(measured) - set(points))
        raise ValueError(f"importance_scores do not fit this model (missing {missing[:4]}, unknown {extra[:4]}): "
                         "they were scored on another architecture. Score this model with `lrpqvit score`.")
    if config.measures_importance:
        if config.num_importance_samples is not None and config.num_importance_samples < len(pixels):
            generator = torch.Generator().manual_seed(config.seed)
            pixels = pixels[torch.randperm(len(pixels), generator=generator)[: config.num_importance_samples]]
        if config.importance == "fisher":
            measured = fisher_importance(model, pixels, config.w_bits)
        else:
            measured = compute_importance(model, pixels)
    return importance_scores(config.importance, points, measured, config.seed)


def bit_plan_summary(model: nn.Module, plan: BitPlan) -> dict[str, float]:
    """Parameter-weighted average weight bits, mean activation bits, and model size in MB (10^6 bytes):
    quantized weights at their bits, every other parameter at 32 bits (scales and zero points not counted)."""
    weight_bits = weight_params = 0
    quantized = set()
    for name, bits in plan.items():
        if bits["w_bits"] is not None:
            weight = model.get_submodule(name).weight
            quantized.add(id(weight))
            weight_params += weight.numel()
            weight_bits += weight.numel() * bits["w_bits"]
    other = sum(p.numel() for p in model.parameters() if id(p) not in quantized)
    a_bits = [bits["a_bits"] for bits in plan.values()]
    return {
        "avg_w_bits": round(weight_bits / weight_params, 4),
        "avg_a_bits": round(sum(a_bits) / len(a_bits), 4),
        "size_mb": round((weight_bits + 32 * other) / 8 / 1e6, 4),
    }


def prepare_model(model: nn.Module, family: Family, layout: Layout, plan: BitPlan, config: LRPQConfig) -> None:
    """Swap in quantized modules at every point of ``layout`` with the bits of ``plan`` (uncalibrated)."""
    pct = tuple(config.percentiles)
    channelwise = config.post_ln != "layerwise"
    reparam = config.post_ln in ("repq", "crl")
    post_ln_linears = [n for _, names in layout.post_ln for n in names]
    for name in layout.weight_points()[1:]:
        linear = model.get_submodule(name)
        bits = plan[name]
        is_post_ln = name in post_ln_linears
        model.set_submodule(name, QuantLinear.from_linear(
            linear, bits["w_bits"], bits["a_bits"], act_channelwise=is_post_ln and channelwise, percentiles=pct,
            add_bias=is_post_ln and reparam))
    for _, names in layout.post_ln:
        if len(names) > 1:
            shared = SharedInput()
            for name in names:
                model.get_submodule(name).input_quantizer.shared_input = shared
    conv = model.get_submodule(layout.patch_embed)
    bits = plan[layout.patch_embed]
    model.set_submodule(layout.patch_embed, QuantConv2d.from_conv(conv, bits["w_bits"], bits["a_bits"], pct))
    for attn in layout.attentions:
        module = model.get_submodule(attn)
        module.matmul1 = QuantMatMul(UniformQuantizer(plan[f"{attn}.matmul1"]["a_bits"], percentiles=pct),
                                     UniformQuantizer(plan[f"{attn}.matmul1"]["a_bits"], percentiles=pct))
        module.matmul2 = QuantMatMul(LogSqrt2Quantizer(plan[f"{attn}.softmax"]["a_bits"], percentiles=pct),
                                     UniformQuantizer(plan[f"{attn}.matmul2"]["a_bits"], percentiles=pct))
    family.install_attention(model, layout)


@torch.no_grad()
def _reparameterize_post_ln(model: nn.Module, layout: Layout, config: LRPQConfig) -> None:
    for norm_name, names in layout.post_ln:
        linears: list[QuantLinear] = [model.get_submodule(n) for n in names]
        ref = linears[0].input_quantizer
        scale, zero_point = ref.scale, ref.zero_point
        if config.post_ln == "crl":
            scale, zero_point = clip_channel_params(scale, zero_point, config.crl_k)
        r, b, target_scale, target_zero = reparam_factors(scale, zero_point)
        reparameterize(model.get_submodule(norm_name), linears, r, b)
        low = -target_zero * target_scale
        high = low + target_scale * (2**ref.bits - 1)
        for linear in linears:
            if linear.input_quantizer.bits == ref.bits:
                linear.input_quantizer.set_params(target_scale, target_zero)
            else:  # same range, other bits (mixed precision inside one group)
                linear.input_quantizer.set_range(low, high)
            linear.calibrate_weight()


def _is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul)) for m in model.modules())


@torch.no_grad()
def calibrate(model: nn.Module, family: Family, layout: Layout, config: LRPQConfig, pixels: torch.Tensor) -> None:
    """Calibrate every quantizer of a prepared model in one pass, then reparameterise its post-LayerNorm
    activations (``repq``/``crl``) and re-calibrate the weights that changed. Weights stay float."""
    with calibration(model):
        family.logits(model, pixels)
    if config.post_ln in ("repq", "crl"):
        _reparameterize_post_ln(model, layout, config)


def fold_weights(model: nn.Module) -> None:
    """Replace every float weight by its quantized value (x̂ = s · (q − z))."""
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            module.fold_weight()


def quantize(model: nn.Module, config: LRPQConfig, calibration_data: object,
             importance_data: object = None) -> nn.Module:
    """Quantize ``model`` in place with ``config``, calibrating on ``calibration_data``; returns the model.

    ``calibration_data``: a float tensor (N, C, H, W) of preprocessed pixel values, or an iterable of such
    tensors or of dicts holding ``pixel_values``. With ``config.mixed_precision`` the layer importance is
    scored on ``importance_data`` (same forms; the calibration data by default) before quantization, unless
    ``config.importance_scores`` holds precomputed scores. The model keeps its call signature. ``config`` is
    not modified: the applied copy (with ``bit_plan``, ``bit_plan_summary`` and, for mixed precision,
    ``importance_scores``) is ``applied_config(model)``, i.e. ``model.config.quantization_config`` for
    transformers models and ``model.quantization_config`` otherwise.
    """
    if not isinstance(config, LRPQConfig):
        raise TypeError(f"config must be an LRPQConfig, got {type(config).__name__}.")
    family = find_family(model)
    if _is_quantized(model):
        raise ValueError("This model is already quantized; load the float model again to re-quantize it.")
    shape = family.input_shape(model)
    pixels = as_pixel_values(calibration_data, *shape)
    param = next(model.parameters())
    pixels = pixels.to(device=param.device, dtype=param.dtype)

    config = copy.deepcopy(config)
    model.eval()
    layout = family.layout(model)
    if config.mixed_precision:
        scored = pixels if importance_data is None else as_pixel_values(importance_data, *shape).to(param.device)
        config.importance_scores = layer_importance(model, layout, config, scored)
        plan = mixed_bit_plan(model, layout, config, config.importance_scores)
    else:
        plan = fixed_bit_plan(layout, config.w_bits, config.a_bits)
    prepare_model(model, family, layout, plan, config)
    calibrate(model, family, layout, config, pixels)
    fold_weights(model)

    config.bit_plan = plan
    config.bit_plan_summary = bit_plan_summary(model, plan)
    if hasattr(model, "config") and hasattr(model.config, "to_dict"):
        from .integrations.transformers import LRPQHfQuantizer

        model.config.quantization_config = config
        model.hf_quantizer = LRPQHfQuantizer(config, pre_quantized=True)  # save_pretrained writes packed weights
    else:
        model.quantization_config = config
    return model
