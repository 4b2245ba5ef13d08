"""Key centering, ``config.center_keys`` (``docs/method.md#key-centering-center_keystrue``).

Softmax attention is unchanged when every key of a head is shifted by the same vector m:

    softmax_j(q_i·(k_j − m)·s + b_ij) = softmax_j(q_i·k_j·s + b_ij),

since the logits of query i all move by −q_i·m·s, a constant over the keys j (position biases and masks
``b_ij`` included). Key channels carry offsets of their own, and one per-tensor scale of k has to cover every
channel's offset as well as its spread; with m the per-channel midpoint (min + max)/2 of the calibration keys,
every channel is centred on 0 and the scale covers only the spread. The shift is folded into the key
projection's bias (k = W x + b − m), so the quantized model runs the same graph at no extra cost.

Not for attention that normalises its keys (cosine attention, q/k LayerNorms): there k − m is not k shifted
after the normalisation, and the softmax changes.
"""

from __future__ import annotations

import torch
from torch import nn

from .architectures import Family, Layout

__all__ = ["center_keys", "key_centering_problem", "key_projection"]


def key_projection(layout: Layout, attention: str) -> tuple[str, bool]:
    """(name of the Linear whose output holds the keys of ``attention``, whether it is a fused qkv projection
    whose middle third are the keys): the post-LayerNorm Linears under ``attention``'s name, three separate
    q/k/v projections or one fused one. ValueError where the layout has neither."""
    for _, names in layout.post_ln:
        under = [n for n in names if n.startswith(f"{attention}.")]
        if len(under) in (1, 3):
            return under[len(under) // 2], len(under) == 1
    raise ValueError(f"No key projection found for attention {attention!r}.")


def _key_rows(linear: nn.Linear, fused: bool) -> slice:
    third = linear.out_features // 3
    return slice(third, 2 * third) if fused else slice(0, linear.out_features)


def key_centering_problem(model: nn.Module, family: Family, layout: Layout, adds_bias: bool) -> str | None:
    """Why the keys of ``model`` cannot be centred, or None where they can. ``adds_bias``: whether quantizing
    gives bias-free post-LayerNorm Linears a zero bias (the reparameterising post-LN treatments), into which the
    shift can then be folded."""
    problem = family.key_centering_problem(model)
    if problem is not None:
        return problem
    for attention in layout.attentions:
        name, _ = key_projection(layout, attention)
        if model.get_submodule(name).bias is None and not adds_bias:
            return (f"the key projection {name} has no bias to fold the shift into (post_ln='layerwise' and "
                    "'channelwise' add none; 'repq' and 'crl' do)")
    return None


@torch.no_grad()
def center_keys(model: nn.Module, family: Family, layout: Layout, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Shift every key channel of a prepared, not yet calibrated model (which computes in float) by the midpoint
    of its range on ``pixels``, through the key projections' biases: new Parameters, so that the float model's
    own stay as they were. One forward pass. Returns attention name → the shift m, (key channels,)."""
    projections = {a: key_projection(layout, a) for a in layout.attentions}
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def observer(attention: str, fused: bool):
        def hook(module: nn.Linear, args: tuple, out: torch.Tensor) -> None:
            keys = out[..., _key_rows(module, fused)].flatten(0, -2)
            low, high = keys.amin(0), keys.amax(0)
            if attention in ranges:
                low, high = torch.minimum(low, ranges[attention][0]), torch.maximum(high, ranges[attention][1])
            ranges[attention] = (low, high)
        return hook

    hooks = [model.get_submodule(name).register_forward_hook(observer(a, fused))
             for a, (name, fused) in projections.items()]
    try:
        family.logits(model, pixels)
    finally:
        for handle in hooks:
            handle.remove()
    shifts = {}
    for attention, (name, fused) in projections.items():
        linear = model.get_submodule(name)
        low, high = ranges[attention]
        shifts[attention] = (low + high) / 2
        bias = linear.bias.detach().clone()
        bias[_key_rows(linear, fused)] -= shifts[attention].to(bias.dtype)
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return shifts
