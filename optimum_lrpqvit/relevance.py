"""Relevance-aware primitives for Layer-wise Relevance Propagation through transformers
(``docs/method.md#lrp-importance``).

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


def alpha1_beta0(x: torch.Tensor, weight: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """α1β0 for signed inputs x (m, in), weight (out, in), relevance R = signal (m, out):
    R_i = Σ_j (x_i⁺ w_ji⁺ + x_i⁻ w_ji⁻) / Z_j · R_j, Z_j = Σ_i (x_i⁺ w_ji⁺ + x_i⁻ w_ji⁻), summed from its
    terms (≥ 0)."""
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    z = F.linear(x_pos, w_pos).addmm_(x_neg, w_neg.t()).add_(EPS)
    s = torch.div(signal, z, out=z)
    return (s @ w_pos).mul_(x_pos).addcmul_(x_neg, s @ w_neg)


# Rows with an output where 2 Z < CANCELLATION · (|x|·|w| + |b|) take ``alpha1_beta0`` (see ``_Linear``).
CANCELLATION = 1e-2


class _Linear(torch.autograd.Function):
    """α1β0 (``alpha1_beta0``) in three products instead of four: each term (x_i w_ji)⁺ = ½ (x_i w_ji + |x_i| |w_ji|),
    so 2 Z = (y − b) + |x|·|w| with y the forward's output, and R_i = x_i (S·w)_i + |x_i| (S·|w|)_i, S = R / 2Z.

    The sum cancels where Z ≪ |x|·|w| + |b| (its float32 error is a few ulp of that scale), so rows with an
    output below CANCELLATION of that scale are computed term by term; elsewhere the two agree to ~1e-5
    relative by that bound (≤ 1.4e-6 measured on the reference models). The bias takes no relevance.
    Conservative except for outputs with Z_j = 0 (no positive term at all), whose relevance is dropped.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, recorder):
        y = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight, bias)
        # y kept unsaved: an in-place op after the layer (timm LayerScale(inplace=True)) would make the saved
        # tensor raise; the backward sums Z term by term instead if y changed
        ctx.y, ctx.y_version = y.detach(), y._version
        ctx.recorder = recorder
        return y

    @staticmethod
    def backward(ctx, signal):
        x, weight, bias = ctx.saved_tensors
        if ctx.recorder.mode == "grad":
            return signal @ weight, None, None, None
        shape, (n_out, n_in) = x.shape, weight.shape
        x, y, signal = x.reshape(-1, n_in), ctx.y.reshape(-1, n_out), signal.reshape(-1, n_out)
        if ctx.y._version != ctx.y_version:
            return alpha1_beta0(x, weight, signal).view(shape), None, None, None
        bias = y.new_zeros(n_out) if bias is None else bias
        x_abs, w_abs = x.abs(), weight.abs()
        z = torch.addmm(y, x_abs, w_abs.t()).sub_(bias - 2 * EPS)  # 2 Z + 2 EPS
        # 2Z < τ (|x|·|w| + |b|) with |x|·|w| = 2Z − (y − b)  ⟺  2Z (1 − τ) / τ + y < b + |b|
        margin = torch.add(y, z, alpha=(1 - CANCELLATION) / CANCELLATION).sub_(2 * bias.clamp(min=0))
        rows = (margin.amin(1) < 0).nonzero().squeeze(1)  # a row minimum: bool maps are slow on CPU
        s = torch.div(signal, z, out=z)
        r = (s @ weight).mul_(x).addcmul_(x_abs, s @ w_abs)
        if len(rows):
            r[rows] = alpha1_beta0(x[rows], weight, signal[rows])
        return r.view(shape), None, None, None


class _MatMul(torch.autograd.Function):
    """Z = A·B: each operand receives half of R, shared in proportion to |a_ik b_kj| (the |z|-rule):
    R_A = ½ |A| ⊙ (S·|B|ᵀ), R_B = ½ |B| ⊙ (|A|ᵀ·S), S = R / (|A|·|B|). Exactly conservative. An operand without
    gradient (a constant, e.g. the learned query of an attention-pooling head) gets no share and the other all of R.

    Chefer et al. share in proportion to the signed terms a_ik b_kj / Z_ij instead; with signed q, k and v
    that ratio is unbounded where terms cancel, and on Swin models it amplified float32 rounding noise of
    the forward pass into O(1) changes of the scores (a batch no longer matched its single images)."""

    @staticmethod
    def forward(ctx, a, b, recorder):
        # q, k, v arrive as per-head views of the projections; matmul would copy them into batches on each
        # pass, so copy once here
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        ctx.recorder = recorder
        return torch.matmul(a, b)

    @staticmethod
    def backward(ctx, signal):
        a, b = ctx.saved_tensors
        if ctx.recorder.mode == "grad":
            return signal @ b.transpose(-2, -1), a.transpose(-2, -1) @ signal, None
        a, b = a.abs(), b.abs()
        # each operand's ½, folded in; an operand that is a constant (a learned probe query) passes its half on
        both = ctx.needs_input_grad[0] and ctx.needs_input_grad[1]
        s = signal / torch.matmul(a, b).add_(EPS).mul_(2 if both else 1)
        r_a = (s @ b.transpose(-2, -1)).mul_(a) if ctx.needs_input_grad[0] else None
        r_b = (a.transpose(-2, -1) @ s).mul_(b) if ctx.needs_input_grad[1] else None
        return r_a, r_b, None


class _PassThrough(torch.autograd.Function):
    """y = fn(x) for an elementwise-shaped op (LayerNorm, GELU, softmax, scaling, constant bias), applied as
    ``_PassThrough(fn(x), x)``: the gradient flows back through fn's own autograd graph, relevance passes
    to x unchanged."""

    @staticmethod
    def forward(ctx, y, x, recorder):
        ctx.recorder = recorder
        return y.detach()  # not y: a returned input becomes a view that in-place ops after it may not modify

    @staticmethod
    def backward(ctx, signal):
        if ctx.recorder.mode == "grad":
            return signal, None, None
        return None, signal, None


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
    return fn(x) if recorder is None else _PassThrough.apply(fn(x), x, recorder)


def residual_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    recorder = active_recorder()
    return x + y if recorder is None else _ResidualAdd.apply(x, y, recorder)
