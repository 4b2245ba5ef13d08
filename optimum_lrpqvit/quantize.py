"""``quantize(model, config, data)``: calibrate → reparameterise post-LayerNorm activations → pack weights.

Follows RepQ-ViT's pipeline (Li et al., ICCV 2023): one calibration pass with channel-wise post-LayerNorm
quantizers, reparameterisation to layer-wise (optionally clipped, CRL — LRP-QViT, arXiv 2401.11243), and
re-calibration of the weights that changed (``docs/method.md``). Every strategy is looked up by name in its
registry: ``config.post_ln`` in ``post_ln``, ``config.importance`` in ``importance``, ``config.allocation`` in
``mixed_precision``.

The applied config is attached to the model by ``attach_applied_config``: as ``model.quantization_config``,
unless an integration registered with ``register_attach_hook`` takes over (the transformers integration puts it
in ``model.config.quantization_config`` with the quantizer that makes ``save_pretrained`` write packed weights).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch
from torch import nn

from .architectures import Family, Layout, find_family
from .bit_plan import BitPlan, read_bit_plan
from .config import LRPQConfig
from .importance import importance_criterion
from .inputs import as_pixel_values
from .key_centering import center_keys, key_centering_problem
from .mixed_precision import mixed_bit_plan
from .nn import (
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    SharedInput,
    UniformQuantizer,
    calibration,
    is_quantized,
    pack_weights,
    realign,
)
from .post_ln import post_ln_treatment
from .reconstruction import reconstruct
from .registry import GELU_QUANTIZERS, SOFTMAX_QUANTIZERS
from .reparam import reparam_factors, reparameterize
from .rounding import compensate_activations, weight_rounding
from .scores import read_scores

__all__ = ["applied_config", "attach_applied_config", "calibrate", "layer_importance",
           "prepare_model", "quantize", "register_attach_hook"]

AttachHook = Callable[[nn.Module, LRPQConfig], bool]
_ATTACH_HOOKS: list[AttachHook] = []


def register_attach_hook(hook: AttachHook) -> AttachHook:
    """Let ``hook(model, config)`` attach the applied config to the models it handles (it returns True for
    those); hooks run newest first. Registering the same hook twice has no effect."""
    if hook not in _ATTACH_HOOKS:
        _ATTACH_HOOKS.insert(0, hook)
    return hook


def attach_applied_config(model: nn.Module, config: LRPQConfig) -> None:
    """Make ``config`` the applied config of the quantized ``model`` (what ``applied_config`` returns)."""
    if not any(hook(model, config) for hook in _ATTACH_HOOKS):
        model.quantization_config = config


def applied_config(model: nn.Module) -> LRPQConfig:
    """The config ``quantize`` applied to ``model`` (with its bit plan); ValueError if it was not quantized."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        config = getattr(model, "quantization_config", None)
    if not isinstance(config, LRPQConfig) or not config.bit_plan:
        raise ValueError(f"{type(model).__name__} carries no applied LRPQConfig with a bit plan; quantize it with "
                         "optimum_lrpqvit.quantize() first.")
    return config


def layer_importance(model: nn.Module, layout: Layout, config: LRPQConfig, pixels: torch.Tensor) -> dict[str, float]:
    """Relative importance of every quantized point by ``config.importance`` (seeded); a measured criterion
    uses the config's precomputed ``importance_scores`` when it has them (they must name exactly these points)."""
    criterion = importance_criterion(config.importance)
    points = layout.points()
    measured = config.importance_scores if criterion.measured else None
    if measured is not None and set(measured) != set(points):
        missing, extra = sorted(set(points) - set(measured)), sorted(set(measured) - set(points))
        raise ValueError(f"importance_scores do not fit this model (missing {missing[:4]}, unknown {extra[:4]}): "
                         "they were scored on another architecture. Score this model with `lrpqvit score`.")
    if criterion.measured and measured is None:
        if config.num_importance_samples is not None and config.num_importance_samples < len(pixels):
            generator = torch.Generator().manual_seed(config.seed)
            pixels = pixels[torch.randperm(len(pixels), generator=generator)[: config.num_importance_samples]]
        measured = criterion.measure(model, pixels, config)
    return criterion.relative(points, measured, config.seed)


def prepare_model(model: nn.Module, family: Family, layout: Layout, plan: BitPlan, config: LRPQConfig) -> None:
    """Swap in quantized modules at every point of ``layout`` with the bits of ``plan`` (uncalibrated)."""
    pct = tuple(config.percentiles)
    treatment = post_ln_treatment(config.post_ln)
    post_ln_linears = {n for _, names in layout.post_ln for n in names}
    for name in layout.weight_points()[1:]:
        is_post_ln = name in post_ln_linears
        model.set_submodule(name, QuantLinear.from_linear(
            model.get_submodule(name), plan[name].w_bits, plan[name].a_bits, percentiles=pct,
            act_channelwise=is_post_ln and treatment.channelwise, add_bias=is_post_ln and treatment.reparameterises))
    gelu_quantizer = GELU_QUANTIZERS.get(config.gelu_quantizer)
    for name in layout.post_gelu:
        module = model.get_submodule(name)
        module.input_quantizer = gelu_quantizer(module.input_quantizer.bits, percentiles=pct)
    for _, names in layout.post_ln:
        if len(names) > 1:
            shared = SharedInput()
            for name in names:
                model.get_submodule(name).input_quantizer.shared_input = shared
    if treatment.reparameterises:
        family.install_pad_values(model)
    softmax_quantizer = SOFTMAX_QUANTIZERS.get(config.softmax_quantizer)
    conv = model.get_submodule(layout.patch_embed)
    bits = plan[layout.patch_embed]
    model.set_submodule(layout.patch_embed, QuantConv2d.from_conv(conv, bits.w_bits, bits.a_bits, pct))
    for attn in layout.attentions:
        module = model.get_submodule(attn)
        module.matmul1 = QuantMatMul(UniformQuantizer(plan[f"{attn}.matmul1"].a_bits, percentiles=pct),
                                     UniformQuantizer(plan[f"{attn}.matmul1"].a_bits, percentiles=pct))
        module.matmul2 = QuantMatMul(softmax_quantizer(plan[f"{attn}.softmax"].a_bits, percentiles=pct),
                                     UniformQuantizer(plan[f"{attn}.matmul2"].a_bits, percentiles=pct))
    family.install_attention(model, layout)


@torch.no_grad()
def _reparameterize_post_ln(model: nn.Module, layout: Layout, config: LRPQConfig) -> None:
    treatment = post_ln_treatment(config.post_ln)
    for norm_name, names in layout.post_ln:
        linears: list[QuantLinear] = [model.get_submodule(n) for n in names]
        for linear in linears:  # the float Linear keeps its weights: quantize() can be undone
            linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
            linear.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        ref = linears[0].input_quantizer
        scale, zero_point = treatment.before_reparam(ref.scale, ref.zero_point, config.crl_k)
        r, b, target_scale, target_zero = reparam_factors(scale, zero_point)
        norm = model.get_submodule(norm_name)
        reparameterize(norm, linears, r, b)
        if hasattr(norm, "pad_value"):  # a block that pads X' must pad with the image of X = 0
            norm.pad_value.copy_(-b)
        low = -target_zero * target_scale
        high = low + target_scale * (2**ref.bits - 1)
        for linear in linears:
            if linear.input_quantizer.bits == ref.bits:
                linear.input_quantizer.set_params(target_scale, target_zero)
            else:  # same range, other bits (mixed precision inside one group)
                linear.input_quantizer.set_range(low, high)
            linear.calibrate_weight()


def calibrate(model: nn.Module, family: Family, layout: Layout, config: LRPQConfig, pixels: torch.Tensor,
              reconstruction_pixels: torch.Tensor | None = None, progress: bool = True,
              checkpoint_dir: str | os.PathLike | None = None) -> None:
    """With ``config.center_keys``, centre the keys (``key_centering``, one float pass); calibrate every quantizer
    of a prepared model in one pass, then reparameterise its post-LayerNorm activations (``repq``/``crl``),
    re-calibrate the weights that changed and round them by ``config.weight_rounding`` (``gptq``: one more pass),
    with ``config.compensate_activations`` after re-solving each Linear for its quantized inputs (two passes);
    with ``config.reconstruction``, then tune the rounding and activation step sizes block by block on
    ``reconstruction_pixels`` (default: ``pixels``), resumable from ``checkpoint_dir``. Weights are not packed."""
    with torch.no_grad():
        if config.center_keys:
            center_keys(model, family, layout, pixels)
        with calibration(model):
            family.logits(model, pixels)
        _check_all_ran(model, layout)
        if post_ln_treatment(config.post_ln).reparameterises:
            _reparameterize_post_ln(model, layout, config)
        float_params = {f"{name}.{key}": p for name in layout.weight_points()
                        for key, p in model.get_submodule(name).named_parameters(recurse=False)}
        if config.compensate_activations:
            compensate_activations(model, family, layout, pixels, config.weight_rounding)
        else:
            weight_rounding(config.weight_rounding)(model, family, layout, pixels)
    if config.reconstruction is not None:
        reconstruct(model, family, layout, pixels if reconstruction_pixels is None else reconstruction_pixels,
                    float_params, config.reconstruction_iters, config.reconstruction_seconds, config.seed, progress,
                    checkpoint_dir)


def _check_all_ran(model: nn.Module, layout: Layout) -> None:
    """ValueError naming the points whose quantizers saw no data in the calibration pass: modules the model's
    forward does not call through its module tree (held in a plain list, say), whose swap would change nothing."""
    idle = [name for name in layout.weight_points() if not model.get_submodule(name).input_quantizer.calibrated]
    idle += [f"{a}.matmul1" for a in layout.attentions if not model.get_submodule(a).matmul1.quantizer_a.calibrated]
    if idle:
        raise ValueError(f"{len(idle)} quantized points were never called by {type(model).__name__}'s forward "
                         f"({idle[:3]}, ...): the adapter does not fit this model's variant. Nothing was changed.")


def _check_weights(model: nn.Module) -> None:
    """Before anything is changed: real float32 weights (calibration statistics and reparameterisation are
    computed in the weights' dtype; float16 scales would lose the codes' precision)."""
    params = list(model.parameters())
    if any(p.is_meta for p in params):
        raise ValueError("The model's weights are on the meta device (not loaded: init_empty_weights or a meta "
                         "device_map); load it with its weights before quantizing.")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    if dtypes != ["float32"]:
        raise TypeError(f"quantize() needs a float32 model, this one has {', '.join(dtypes)} weights: call "
                        "model.float() first (or load it with dtype=torch.float32).")


def _restorer(model: nn.Module, family: Family, layout: Layout) -> Callable[[], None]:
    """A function that undoes what quantizing ``model`` changes: the swapped modules, the attention routing and
    matmul points, and the reparameterised LayerNorms (``_reparameterize_post_ln`` rescales copies of the
    Linear weights, so the original Linears stay as they were)."""
    modules = {name: model.get_submodule(name) for name in layout.weight_points()}
    norms = {name: {k: p.detach().clone() for k, p in model.get_submodule(name).named_parameters(recurse=False)}
             for name, _ in layout.post_ln}
    training = model.training

    @torch.no_grad()
    def restore() -> None:
        family.remove_attention(model, layout)
        family.remove_pad_values(model)
        for attn in layout.attentions:
            module = model.get_submodule(attn)
            for point in ("matmul1", "matmul2"):
                if hasattr(module, point):
                    delattr(module, point)
        for name, module in modules.items():
            model.set_submodule(name, module)
        for name, saved in norms.items():
            for key, value in model.get_submodule(name).named_parameters(recurse=False):
                value.copy_(saved[key])
        model.train(training)

    return restore


def quantize(model: nn.Module, config: LRPQConfig, calibration_data: object,
             importance_data: object = None, reconstruction_data: object = None, progress: bool = True,
             checkpoint_dir: str | os.PathLike | None = None) -> nn.Module:
    """Quantize ``model`` in place with ``config``, calibrating on ``calibration_data``; returns the model.

    ``calibration_data``: a float tensor (N, C, H, W) of preprocessed pixel values, or an iterable of such
    tensors or of dicts holding ``pixel_values``. With ``config.mixed_precision`` the layer importance is
    scored on ``importance_data`` (same forms; the calibration data by default) before quantization, unless
    ``config.importance_scores`` holds precomputed scores (or the path of a scores file). With
    ``config.reconstruction`` the blocks are reconstructed on ``reconstruction_data`` (same forms; the calibration
    data by default), with a progress bar unless ``progress`` is False; with ``checkpoint_dir`` each finished
    block is saved there, and a run started again with the same model, config and data resumes after the last
    one (``reconstruction.reconstruct``). The model keeps its
    call signature. Its quantized weights are left packed: integer codes in memory, dequantized per layer and
    call (``nn.pack_weights``; ``nn.unpack_weights`` gives float Parameters holding the same x̂, for research code
    that needs them). ``config`` is not modified: the applied copy (with ``bit_plan``, ``bit_plan_summary`` and,
    for mixed precision, ``importance_scores``) is ``applied_config(model)``, i.e.
    ``model.config.quantization_config`` for transformers models and ``model.quantization_config`` otherwise.
    """
    if not isinstance(config, LRPQConfig):
        raise TypeError(f"config must be an LRPQConfig, got {type(config).__name__}.")
    config = copy.deepcopy(config)
    config.post_init()  # fields may have been changed since the config was built
    family = find_family(model)
    if is_quantized(model):
        raise ValueError("This model is already quantized; load the float model again to re-quantize it.")
    if isinstance(config.importance_scores, (str, os.PathLike)):
        config.importance_scores = read_scores(config.importance_scores)
    _check_weights(model)
    shape = family.input_shape(model)
    pixels = as_pixel_values(calibration_data, *shape)
    param = next(model.parameters())
    pixels = pixels.to(device=param.device, dtype=param.dtype)

    layout = family.quantized_layout(model, config)
    importance = None if importance_data is None else as_pixel_values(importance_data, *shape).to(param.device)
    reconstruction = None
    if checkpoint_dir is not None and config.reconstruction is None:
        raise ValueError("checkpoint_dir is for resuming a block reconstruction, but config.reconstruction is None: "
                         "set LRPQConfig(reconstruction='block'), or leave checkpoint_dir out.")
    if reconstruction_data is not None:
        if config.reconstruction is None:
            raise ValueError("reconstruction_data was given but config.reconstruction is None: set "
                             "LRPQConfig(reconstruction='block') to reconstruct, or leave reconstruction_data out.")
        reconstruction = as_pixel_values(reconstruction_data, *shape).to(device=param.device, dtype=param.dtype)
    if config.center_keys:
        problem = key_centering_problem(model, family, layout, post_ln_treatment(config.post_ln).reparameterises)
        if problem is not None:
            raise ValueError(f"center_keys=True cannot be used with this {type(model).__name__}: {problem}. "
                             "Leave center_keys off. Nothing was changed.")
    restore = _restorer(model, family, layout)
    try:
        model.eval()
        if config.mixed_precision:
            config.importance_scores = layer_importance(model, layout, config,
                                                        pixels if importance is None else importance)
            plan = mixed_bit_plan(model, layout, config, config.importance_scores)
        else:
            plan = BitPlan.fixed(layout, config.w_bits, config.a_bits)
        prepare_model(model, family, layout, plan, config)
        calibrate(model, family, layout, config, pixels, reconstruction, progress, checkpoint_dir)
        pack_weights(model)
        realign(model)  # the float layers reloaded from the checkpoint will be aligned too: same rounding
        applied = read_bit_plan(model, layout)
    except BaseException:
        restore()  # a failed (or interrupted) quantization leaves the float model as it was
        raise
    config.bit_plan = applied.to_dict()
    config.bit_plan_summary = applied.summary(model)
    attach_applied_config(model, config)
    return model
