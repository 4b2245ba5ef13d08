"""Relevance-aware primitives for Layer-wise Relevance Propagation through transformers (SPEC §4).

Rules of Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention Visualization" (CVPR 2021), as
used by LRP-QViT (Ranjan & Savakis, arXiv 2401.11243). Each primitive is an autograd function whose
backward follows the mode of the active ``Recorder``: ``"grad"`` gives the ordinary gradient, ``"relevance"``
propagates relevance R with the LRP rule of that operation. One forward pass therefore serves both
backward passes. Permutations, reshapes, slicing, padding and averaging keep their ordinary backward, which
moves (or evenly spreads) relevance without changing its total.

Outside ``Recorder`` contexts every primitive is the plain operation, so the model code that calls them
(the attention function and the block forwards installed during scoring) costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["Recorder", "active_recorder", "linear", "matmul", "pass_through", "record", "residual_add"]

# Every denominator below is a sum of non-negative terms, so the sign-aware stabiliser is simply + EPS.
EPS = 1e-9
_ACTIVE: list[Recorder] = []


class Recorder:
    """Collects, per named point, the relevance and the gradient arriving at the point's output tensor.

    Used as a context manager around the forward pass; ``mode`` is switched between the backward passes.
    """

    def __init__(self, names: dict[int, str] | None = None) -> None:
        self.mode = "grad"
        self.names = names or {}  # id(module) -> point prefix
        self.captured: dict[str, dict[str, torch.Tensor]] = {"grad": {}, "relevance": {}}
        self.roots: list[torch.Tensor] = []  # where the backward passes stop

    def __enter__(self) -> Recorder:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

    def record(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.requires_grad:

            def hook(signal: torch.Tensor) -> None:
                self.captured[self.mode][name] = signal.detach()

            tensor.register_hook(hook)
        return tensor


def active_recorder() -> Recorder | None:
    return _ACTIVE[-1] if _ACTIVE else None


def record(module: object, tensor: torch.Tensor, suffix: str = "") -> torch.Tensor:
    """Mark ``tensor`` as the output of the point ``<name of module>[.suffix]`` (a no-op outside a Recorder
    or for modules it does not name)."""
    recorder = active_recorder()
    if recorder is None or id(module) not in recorder.names:
        return tensor
    name = recorder.names[id(module)]
    return recorder.record(f"{name}.{suffix}" if suffix else name, tensor)


class _Linear(torch.autograd.Function):
    """α1β0 for signed inputs: R_i = Σ_j (x_i⁺ w_ji⁺ + x_i⁻ w_ji⁻) / Z_j · R_j, Z_j = Σ_i (x_i⁺ w_ji⁺ + x_i⁻ w_ji⁻).

    The bias takes no relevance. Conservative except for outputs with Z_j = 0 (no positive contribution at all),
    whose relevance is dropped. Z is summed from its non-negative terms: the shortcut
    ½ (x·w + |x|·|w|) cancels catastrophically where Z ≈ 0.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, recorder):
        ctx.save_for_backward(x, weight)
        ctx.recorder = recorder
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, signal):
        x, weight = ctx.saved_tensors
        if ctx.recorder.mode == "grad":
            return signal @ weight, None, None, None
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        # in place where possible: on CPU these passes over activations cost as much as the products
        z = F.linear(x_pos, w_pos)
        z.view(-1, z.shape[-1]).addmm_(x_neg.reshape(-1, x.shape[-1]), w_neg.t())  # Z ≥ 0
        s = torch.div(signal, z.add_(EPS), out=z)
        return (s @ w_pos).mul_(x_pos).addcmul_(x_neg, s @ w_neg), None, None, None


class _MatMul(torch.autograd.Function):
    """Z = A·B: each operand receives half of R, shared in proportion to |a_ik b_kj| (the |z|-rule):
    R_A = ½ |A| ⊙ (S·|B|ᵀ), R_B = ½ |B| ⊙ (|A|ᵀ·S), S = R / (|A|·|B|). Exactly conservative.

    Chefer et al. share in proportion to the signed terms a_ik b_kj / Z_ij instead; with signed q, k and v
    that ratio is unbounded where terms cancel, and on Swin models it amplified float32 rounding noise of
    the forward pass into O(1) changes of the scores (a batch no longer matched its single images)."""

    @staticmethod
    def forward(ctx, a, b, recorder):
        ctx.save_for_backward(a, b)
        ctx.recorder = recorder
        return torch.matmul(a, b)

    @staticmethod
    def backward(ctx, signal):
        a, b = ctx.saved_tensors
        if ctx.recorder.mode == "grad":
            return signal @ b.transpose(-2, -1), a.transpose(-2, -1) @ signal, None
        a, b = a.abs(), b.abs()
        s = signal / torch.matmul(a, b).add_(EPS).mul_(2)  # the ½ of each operand's share, folded in
        return (s @ b.transpose(-2, -1)).mul_(a), (a.transpose(-2, -1) @ s).mul_(b), None


class _PassThrough(torch.autograd.Function):
    """y = fn(x) for an elementwise-shaped op (LayerNorm, GELU, softmax, scaling, constant bias):
    relevance passes unchanged; the gradient is fn's own, from fn's autograd graph built in the forward
    (so the gradient pass does not evaluate fn again)."""

    @staticmethod
    def forward(ctx, x, fn, recorder):
        ctx.recorder = recorder
        with torch.enable_grad():
            ctx.x = x.detach().requires_grad_()
            ctx.y = fn(ctx.x)
        return ctx.y.detach()

    @staticmethod
    def backward(ctx, signal):
        if ctx.recorder.mode != "grad":
            return signal, None, None
        (grad,) = torch.autograd.grad(ctx.y, ctx.x, signal)
        return grad, None, None


class _ResidualAdd(torch.autograd.Function):
    """z = x + y: R_x = |x| / (|x| + |y|) · R and R_y = |y| / (|x| + |y|) · R, so every element, and hence
    every sample, keeps its total exactly. (The signed split x / z of Chefer et al. is unbounded where the
    branch cancels the shortcut; see ``_MatMul``.)"""

    @staticmethod
    def forward(ctx, x, y, recorder):
        ctx.save_for_backward(x, y)
        ctx.recorder = recorder
        return x + y

    @staticmethod
    def backward(ctx, signal):
        if ctx.recorder.mode == "grad":
            return signal, signal, None
        x, y = (t.abs() for t in ctx.saved_tensors)
        r_x = (signal * x).div_(y.add_(x).add_(EPS))
        return r_x, signal - r_x, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    recorder = active_recorder()
    return F.linear(x, weight, bias) if recorder is None else _Linear.apply(x, weight, bias, recorder)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    recorder = active_recorder()
    return torch.matmul(a, b) if recorder is None else _MatMul.apply(a, b, recorder)


def pass_through(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    recorder = active_recorder()
    return fn(x) if recorder is None else _PassThrough.apply(x, fn, recorder)


def residual_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    recorder = active_recorder()
    return x + y if recorder is None else _ResidualAdd.apply(x, y, recorder)
