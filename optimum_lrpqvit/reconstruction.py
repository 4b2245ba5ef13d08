"""Block reconstruction, ``config.reconstruction = "block"`` (``docs/method.md``, "Block reconstruction").

After calibration (and weight rounding), each reconstruction unit — a transformer block; the patch embedding, a
Swin patch merging and each head on their own — is tuned in execution order to reproduce the float model's
output of that unit (BRECQ, Li et al., ICLR 2021; QDrop, Wei et al., ICLR 2022):

    min  ‖f_q(x̃) − f(x)‖²  +  λ · Σ_w (1 − |2h(V_w) − 1|^β)

over the rounding of every weight (AdaRound, Nagel et al., ICML 2020: w̃ = s · (clamp(⌊w/s⌋ + h(V) + z, 0, 2^b − 1)
− z), h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1), ζ = 1.1, γ = −0.1, V initialised so that h is the fractional part of
w/s) and the step size of every uniform activation quantizer in the unit (LSQ gradients). f(x) is the float unit
on the float model's input x; x̃ is the quantized model's input to the unit with each element replaced by x with
probability ½, and inside the unit each activation element is left unquantized with probability ½ (QDrop). β falls
from 20 to 2 after a warm-up of 20 % of the iterations without the rounding term; at the end every h is rounded to
0 or 1, so the weights are on their grids again. The log quantizers of the probabilities keep their Δ (their
rounding passes gradients straight through).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .architectures import Family, Layout
from .digest import content_digest
from .files import atomic_write
from .nn import UniformQuantizer, quantizers, quantizers_disabled, weight_modules

__all__ = ["AdaRound", "UnitResult", "reconstruct", "reconstruction_units"]

ZETA, GAMMA = 1.1, -0.1
ROUNDING_WEIGHT = 0.01  # λ
WARMUP = 0.2  # share of the iterations without the rounding term
BETA = (20.0, 2.0)
DROP_PROB = 0.5
WEIGHT_LR = 1e-2  # Adam, rounding variables V
SCALE_LR = 1e-3  # Adam, log step sizes of the activation quantizers
BATCH = 32
TIMED_STEPS = 5  # steps timed before a time budget sets a unit's step count
ERROR_IMAGES = 256  # images of the reported output errors


class UnitResult(NamedTuple):
    """One unit's reconstruction: the steps run, and the output error ‖f̂(x̂) − f(x)‖² (summed over features,
    averaged over the first ``ERROR_IMAGES`` images' tokens) on the quantized model's own inputs, before and
    after."""

    steps: int
    error_before: float
    error_after: float


class AdaRound(nn.Module):
    """The parametrization w ↦ s · (clamp(⌊w/s⌋ + h(V) + z, 0, 2^b − 1) − z) of a weight, with V a Parameter;
    ``hard`` rounds h to {0, 1}, which puts the weight on its grid."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> None:
        super().__init__()
        rows = weight.detach().reshape(weight.shape[0], -1).float()
        self.shape = weight.shape
        self.register_buffer("scale", scale.detach().float().reshape(-1, 1))
        self.register_buffer("zero_point", zero_point.detach().float().reshape(-1, 1))
        self.high = 2**bits - 1
        t = rows / self.scale
        self.register_buffer("floor", torch.floor(t))
        rest = (t - self.floor).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False

    def h(self) -> torch.Tensor:
        if self.hard:
            return (self.v >= 0).float()
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def rounding_loss(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(self.floor + self.h() + self.zero_point, 0, self.high)
        return ((q - self.zero_point) * self.scale).reshape(self.shape).to(weight.dtype)


def _point_units(layout: Layout) -> dict[str, str]:
    """Point name → the highest module above it that holds no point of another block (``layout.block_of``)."""
    block_of = layout.block_of
    units = {}
    for point, block in block_of.items():
        parts = point.split(".")
        unit = point
        for depth in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:depth])
            if any(block_of[p] != block for p in block_of if p.startswith(prefix + ".")):
                break
            unit = prefix
        units[point] = unit
    return units


class _Stop(Exception):
    pass


@torch.no_grad()
def reconstruction_units(model: nn.Module, family: Family, layout: Layout, pixels: torch.Tensor) -> list[str]:
    """The names of the units reconstructed one after the other, in the order one forward pass calls them."""
    names = sorted(set(_point_units(layout).values()))
    order: list[str] = []
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, _a, n=n: order.append(n) if n not in order else None) for n in names]
    try:
        family.logits(model, pixels[:1])
    finally:
        for handle in handles:
            handle.remove()
    return order


def _is_batch(value: object, size: int) -> bool:
    """Whether a call argument is per image: a tensor whose first dimension is the batch's size (a unit's other
    arguments, Swin's input dimensions or a mask of None, are the same for every batch)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size


def _main_output(result: object) -> torch.Tensor:
    """A unit's output tensor: itself, or the first element of a tuple or of a ``ModelOutput``."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, dict):
        return next(iter(result.values()))
    return result[0]


def _output_error(result: object, target: torch.Tensor) -> torch.Tensor:
    """‖f̂ − f‖² of a unit's output: summed over features, averaged over tokens and images (the objective, and
    the error ``UnitResult`` reports)."""
    return (_main_output(result) - target).pow(2).sum(-1).mean()


def _mixed_batch(value: object, float_value: object, idx: torch.Tensor, images: int,
                 generator: torch.Generator) -> object:
    """Rows ``idx`` of a per-image argument (of ``images`` rows), each float element taken from the float model's
    input instead with probability ``DROP_PROB`` (QDrop); other arguments as they are."""
    if not _is_batch(value, images):
        return value
    rows = value[idx]
    if not torch.is_floating_point(rows):
        return rows
    keep_float = torch.rand(rows.shape, generator=generator, device=rows.device) < DROP_PROB
    return torch.where(keep_float, float_value[idx], rows)


@torch.no_grad()
def _capture(model: nn.Module, family: Family, unit: nn.Module, pixels: torch.Tensor,
             output: bool = False) -> tuple[list, dict, torch.Tensor | None]:
    """The unit's call arguments for all of ``pixels`` (batch tensors concatenated, others from the first
    batch) and, with ``output``, its output, from forward passes of the model cut short after the unit."""
    calls: list[tuple[tuple, dict]] = []
    outputs: list[torch.Tensor] = []

    def before(_m, args, kwargs):
        calls.append((args, kwargs))
        if not output:
            raise _Stop

    def after(_m, _args, _kwargs, result):
        outputs.append(_main_output(result))
        raise _Stop

    handles = [unit.register_forward_pre_hook(before, with_kwargs=True)]
    if output:
        handles.append(unit.register_forward_hook(after, with_kwargs=True))
    try:
        for start in range(0, len(pixels), BATCH):
            chunk = pixels[start:start + BATCH]
            try:
                family.logits(model, chunk)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    first_args, first_kwargs = calls[0]
    size = len(pixels[:BATCH])

    def join(i: int | str, value: object) -> object:
        if not _is_batch(value, size):
            return value
        parts = [(c[0][i] if isinstance(i, int) else c[1][i]) for c in calls]
        return torch.cat(parts)

    args = [join(i, v) for i, v in enumerate(first_args)]
    kwargs = {k: join(k, v) for k, v in first_kwargs.items()}
    return args, kwargs, torch.cat(outputs) if output else None


@contextmanager
def _float_weights(model: nn.Module, float_params: dict[str, nn.Parameter]) -> Iterator[None]:
    """The float model: every quantizer the identity and every quantized layer on its float parameters."""
    params, folded = [], {}
    for path, param in float_params.items():
        module_name, key = path.rsplit(".", 1)
        module = model.get_submodule(module_name)
        folded.setdefault(module, module.weight_folded)  # once per module, before any of its parameters is swapped
        params.append((module, key, module._parameters[key]))
        module._parameters[key] = param
        module.weight_folded = False
    try:
        with quantizers_disabled(model):
            yield
    finally:
        for module, key, param in params:
            module._parameters[key] = param
        for module, flag in folded.items():
            module.weight_folded = flag


class _StepSizes:
    """The step sizes s = s₀ · e^u of a unit's calibrated uniform activation quantizers, u a Parameter (Adam then
    moves every s by about the same ratio, whatever its magnitude); quantizers that share one input and bits
    share one u. ``apply`` writes s into the quantizers (in the graph), ``finish`` writes it as a plain buffer."""

    def __init__(self, unit: nn.Module, skip: set[int]) -> None:
        self.groups: list[tuple[list[UniformQuantizer], torch.Tensor, nn.Parameter]] = []
        by_input: dict[tuple, int] = {}
        for q in quantizers(unit):
            if not isinstance(q, UniformQuantizer) or id(q) in skip or not q.calibrated or not q.enabled:
                continue
            key = (id(q.shared_input), q.bits) if q.shared_input is not None else (id(q),)
            if key in by_input and torch.equal(self.groups[by_input[key]][1], q.scale):
                self.groups[by_input[key]][0].append(q)
                continue
            by_input[key] = len(self.groups)
            base = q.scale.detach().clone()
            self.groups.append(([q], base, nn.Parameter(torch.zeros_like(base))))

    def parameters(self) -> list[nn.Parameter]:
        return [u for _, _, u in self.groups]

    def apply(self) -> None:
        for members, base, u in self.groups:
            scale = base * torch.exp(u)
            for q in members:
                q.scale = scale

    @torch.no_grad()
    def finish(self) -> None:
        for members, base, u in self.groups:
            for q in members:
                q.scale = (base * torch.exp(u)).detach().clone()


def _reconstruct_unit(unit: nn.Module, inputs: tuple[list, dict], float_inputs: tuple[list, dict],
                      target: torch.Tensor, iterations: int, generator: torch.Generator,
                      deadline: float | None, progress: tqdm) -> int:
    """Tune one unit (see the module docstring) for ``iterations`` steps, or as many as end by ``deadline``
    (``time.perf_counter()``; judged from the first ``TIMED_STEPS``); returns the steps run. The unit's weights
    end folded on their grids and its step sizes as plain buffers."""
    weights = {n: m for n, m in weight_modules(unit).items() if m.weight_quantizer.enabled}
    roundings = {}
    for name, module in weights.items():
        q = module.weight_quantizer
        rounding = AdaRound(module.weight, q.scale, q.zero_point, q.bits)
        # a copy: removing the parametrization writes into the Parameter it wraps, which the float model (and
        # the float targets) may share
        module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
        parametrize.register_parametrization(module, "weight", rounding, unsafe=True)
        module.weight_folded = True  # quantized_weight() returns the parametrized weight
        roundings[name] = rounding
    weight_quantizers = {id(m.weight_quantizer) for m in weights.values()}
    scales = _StepSizes(unit, weight_quantizers)
    acts = [q for q in quantizers(unit) if id(q) not in weight_quantizers]
    for q in acts:
        q.learning, q.drop_prob, q.drop_generator = True, DROP_PROB, generator
    groups = [{"params": [r.v for r in roundings.values()], "lr": WEIGHT_LR}]
    if scales.groups:
        groups.append({"params": scales.parameters(), "lr": SCALE_LR})
    optimizer = torch.optim.Adam(groups)
    args, kwargs = inputs
    fargs, fkwargs = float_inputs
    warmup = int(WARMUP * iterations)
    step, started = 0, time.perf_counter()
    try:
        while step < iterations:
            idx = torch.randint(len(target), (min(BATCH, len(target)),), generator=generator, device=generator.device)

            call_args = [_mixed_batch(a, f, idx, len(target), generator) for a, f in zip(args, fargs)]
            call_kwargs = {k: _mixed_batch(v, fkwargs[k], idx, len(target), generator) for k, v in kwargs.items()}
            scales.apply()
            loss = _output_error(unit(*call_args, **call_kwargs), target[idx])
            if step >= warmup and roundings:
                progress_share = (step - warmup) / max(1, iterations - warmup)
                beta = BETA[0] + (BETA[1] - BETA[0]) * progress_share
                loss = loss + ROUNDING_WEIGHT * sum(r.rounding_loss(beta) for r in roundings.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.update(1)
            step += 1
            if step == TIMED_STEPS and deadline is not None:
                rate = (time.perf_counter() - started) / step
                fit = step + int(max(0.0, deadline - time.perf_counter()) / rate)
                if fit < iterations:
                    progress.total -= iterations - fit
                    iterations, warmup = fit, int(WARMUP * fit)
    finally:
        for q in acts:
            q.learning, q.drop_prob, q.drop_generator = False, 0.0, None
        scales.finish()
        with torch.no_grad():
            for name, module in weights.items():
                roundings[name].hard = True
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
                module.weight.requires_grad_(False)
    return step


@torch.no_grad()
def _unit_error(unit: nn.Module, inputs: tuple[list, dict], target: torch.Tensor) -> float:
    args, kwargs = inputs
    n = min(ERROR_IMAGES, len(target))
    call_args = [a[:n] if _is_batch(a, len(target)) else a for a in args]
    call_kwargs = {k: v[:n] if _is_batch(v, len(target)) else v for k, v in kwargs.items()}
    return float(_output_error(unit(*call_args, **call_kwargs), target[:n]))


def _unit_state(unit: nn.Module) -> dict[str, torch.Tensor]:
    """What reconstruction changes in a unit: its layers' weights and its activation quantizers' step sizes."""
    state = {f"{name}.weight": module.weight.detach() for name, module in weight_modules(unit).items()}
    for name, module in unit.named_modules():
        if isinstance(module, UniformQuantizer) and module.calibrated:
            state[f"{name}.scale"] = module.scale.detach()
    return state


@torch.no_grad()
def _load_unit_state(unit: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in state.items():
        name, _, attr = key.rpartition(".")
        module = unit.get_submodule(name)
        if attr == "weight":
            module.weight = nn.Parameter(value.clone(), requires_grad=False)
            module.weight_folded = True
        else:
            module.scale = value.clone()


class _Checkpoint:
    """``directory/state.json`` (the job's fingerprint; per finished unit its file, SHA-256 and result) and one
    ``unit-NNN.safetensors`` per unit, written atomically after each unit. A file whose checksum does not match,
    or a state of another job, is an error, not a silent restart."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "state.json"
        self.fingerprint = fingerprint
        self.units: dict[str, dict] = {}
        if self.path.exists():
            state = json.loads(self.path.read_text())
            if state.get("fingerprint") != fingerprint:
                raise ValueError(f"{self.path} belongs to another reconstruction (other model, config, calibration "
                                 "or reconstruction images); use an empty checkpoint directory for this one.")
            self.units = state["units"]

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], list] | None:
        entry = self.units.get(name)
        if entry is None:
            return None
        file = self.directory / entry["file"]
        if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != entry["sha256"]:
            raise ValueError(f"{file} is missing or does not match its SHA-256 in {self.path}: the checkpoint is "
                             "damaged. Delete the directory to reconstruct from the start.")
        return load_file(file), entry["result"]

    def save(self, index: int, name: str, state: dict[str, torch.Tensor], result: UnitResult) -> None:
        file = self.directory / f"unit-{index:03d}.safetensors"
        atomic_write(file, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, str(tmp)))
        self.units[name] = {"file": file.name, "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                            "result": list(result)}
        document = json.dumps({"fingerprint": self.fingerprint, "units": self.units}, indent=2)
        atomic_write(self.path, lambda tmp: tmp.write_text(document))


def _fingerprint(model: nn.Module, pixels: torch.Tensor, units: list[str], settings: tuple) -> str:
    """The job: the calibrated model's tensors, the reconstruction images, the units and the settings."""
    h = hashlib.sha256(content_digest(model.state_dict().values()).encode())
    h.update(content_digest([pixels]).encode())
    h.update(json.dumps([units, list(settings)]).encode())
    return h.hexdigest()


def reconstruct(model: nn.Module, family: Family, layout: Layout, pixels: torch.Tensor,
                float_params: dict[str, nn.Parameter], iterations: int, seconds: float | None = None,
                seed: int = 0, progress: bool = True,
                checkpoint_dir: str | os.PathLike | None = None) -> dict[str, UnitResult]:
    """Block reconstruction of the calibrated ``model`` on ``pixels`` (module docstring): each unit for
    ``iterations`` Adam steps on batches of ``BATCH``, fewer where a budget of ``seconds`` for all units would
    otherwise be exceeded. ``float_params``: the float Parameters of the quantized layers as before weight
    rounding, by their names in ``model`` (every ``.weight``, and the ``.bias`` that activation compensation
    re-solves). Unit ``i`` draws its batches from a generator seeded with (``seed``, ``i``), so that with
    ``checkpoint_dir`` a run started again with the same arguments loads the units finished before (checked by
    SHA-256) and goes on with the same result as an uninterrupted run. Returns ``{unit: UnitResult}``."""
    units = reconstruction_units(model, family, layout, pixels)
    checkpoint = None
    if checkpoint_dir is not None:
        fingerprint = _fingerprint(model, pixels, units, (iterations, seconds, seed, BATCH))
        checkpoint = _Checkpoint(checkpoint_dir, fingerprint)
    grads = {p: p.requires_grad for p in model.parameters()}
    for p in grads:
        p.requires_grad_(False)
    started = time.perf_counter()
    done: dict[str, UnitResult] = {}
    bar = tqdm(total=iterations * len(units), desc="block reconstruction", disable=not progress)
    try:
        for i, name in enumerate(units):
            unit = model.get_submodule(name)
            saved = checkpoint.load(name) if checkpoint is not None else None
            if saved is not None:
                _load_unit_state(unit, saved[0])
                done[name] = UnitResult(*saved[1])
                bar.update(iterations)
                continue
            with _float_weights(model, float_params):
                fargs, fkwargs, target = _capture(model, family, unit, pixels, output=True)
            args, kwargs, _ = _capture(model, family, unit, pixels)
            bar.set_postfix_str(name)
            now = time.perf_counter()
            deadline = None if seconds is None else now + (seconds - (now - started)) / (len(units) - i)
            generator = torch.Generator(device=target.device).manual_seed(seed * 1_000_003 + i)
            before = _unit_error(unit, (args, kwargs), target)
            steps = _reconstruct_unit(unit, (args, kwargs), (fargs, fkwargs), target, iterations, generator,
                                      deadline, bar)
            done[name] = UnitResult(steps, before, _unit_error(unit, (args, kwargs), target))
            if checkpoint is not None:
                checkpoint.save(i, name, _unit_state(unit), done[name])
    finally:
        bar.close()
        for p, flag in grads.items():
            p.requires_grad_(flag)
    return done
