"""Block reconstruction (``reconstruction="block"``): AdaRound's parametrization, the units, and the whole pass
through ``quantize`` on every family."""

import sys

import models
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrpqvit import LRPQConfig, applied_config, load_quantized, quantize, save_quantized
from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.nn import QuantConv2d, QuantLinear, UniformQuantizer, packed_weight_tensors, weight_modules
from optimum_lrpqvit.quantizers import fake_quant_uniform, search_uniform_params, weight_columns
from optimum_lrpqvit.reconstruction import AdaRound, reconstruct, reconstruction_units
from optimum_lrpqvit.rounding import gptq_round

ITERS = 100  # steps per unit: enough for the tiny models' error to fall clearly


def _grid(weight, bits):
    return search_uniform_params(weight_columns(weight), bits, channelwise=True)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), out=st.integers(1, 8), columns=st.integers(1, 24), seed=st.integers(0, 10**6))
def test_adaround_starts_at_the_weight_and_rounds_hard_to_nearest(bits, out, columns, seed):
    weight = torch.randn(out, columns, generator=torch.Generator().manual_seed(seed))
    scale, zero = _grid(weight, bits)
    rounding = AdaRound(weight, scale, zero, bits)
    soft = rounding(weight)
    inside = (weight / scale[:, None] + zero[:, None] > 0) & (weight / scale[:, None] + zero[:, None] < 2**bits - 1)
    # h(V) is the fractional part of w/s (to the 1e-4 margin of the initialisation), so the soft weight is w
    assert torch.allclose(soft[inside], weight[inside], atol=2e-4 * float(scale.max()))
    rounding.hard = True
    hard = rounding(weight)
    nearest = fake_quant_uniform(weight.t(), scale, zero, bits).t()
    frac = torch.frac(weight / scale[:, None]).abs()
    clear = (frac - 0.5).abs() > 1e-3  # away from a tie, the hard rounding at initialisation is round-to-nearest
    assert torch.equal(hard[clear], nearest[clear])
    quantizer = UniformQuantizer(bits, channelwise=True)
    quantizer.set_params(scale, zero)
    packed_weight_tensors(hard, quantizer)  # on the grid: raises otherwise


def test_adaround_rounding_loss_is_zero_only_at_hard_choices():
    weight = torch.tensor([[0.0, 0.25, 0.5, 0.75]])
    rounding = AdaRound(weight, torch.tensor([1.0]), torch.tensor([0.0]), 4)
    assert rounding.rounding_loss(2.0) > 0
    with torch.no_grad():
        rounding.v.copy_(torch.tensor([[-10.0, 10.0, -10.0, 10.0]]))
    assert float(rounding.rounding_loss(2.0).detach()) == 0.0


@settings(max_examples=20, deadline=None)
@given(bits=st.integers(2, 8), out=st.integers(1, 8), columns=st.integers(2, 24), seed=st.integers(0, 10**6))
def test_gptq_residual_weights_round_to_gptqs_codes(bits, out, columns, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, columns, generator=g)
    x = torch.randn(64, columns, generator=g)
    scale, zero = _grid(weight, bits)
    exact = gptq_round(weight, x.T @ x, scale, zero, bits)
    residual = gptq_round(weight, x.T @ x, scale, zero, bits, residual=True)
    assert torch.equal(fake_quant_uniform(residual.t(), scale, zero, bits).t(), exact)
    assert float((residual - exact).abs().max()) <= 0.45 * float(scale.max()) * (1 + 1e-4)


def test_units_cover_every_point_once_in_execution_order():
    model = models.hf_swin()
    family = find_family(model)
    layout = family.layout(model)
    units = reconstruction_units(model, family, layout, models.images(2))
    covered = [p for p in layout.weight_points() if any(p == u or p.startswith(u + ".") for u in units)]
    assert covered == layout.weight_points()
    for point in layout.weight_points():
        assert sum(point == u or point.startswith(u + ".") for u in units) == 1
    assert units[0] == "swin.embeddings" and units[-1] == "classifier"
    # a stage's patch merging is its own unit, between the blocks of two stages
    merging = units.index("swin.encoder.layers.0.downsample")
    assert units[merging - 1] == "swin.encoder.layers.0.blocks.1"
    assert units[merging + 1] == "swin.encoder.layers.1.blocks.0"


@pytest.mark.parametrize("family", sorted(models.FAMILIES))
def test_reconstruction_lowers_the_error_and_saves_packed(family, tmp_path, monkeypatch):
    """On every family: the units' output errors to the float units fall by a tenth in all (none rises by more
    than 5 %: the hard rounding at the end is not the soft optimum, and on Swin's patch embedding + LayerNorm
    it stays a little above round-to-nearest), every weight ends on its grid (packed), and the saved model
    reloads with the same outputs."""
    results = []
    monkeypatch.setattr(sys.modules["optimum_lrpqvit.quantize"], "reconstruct", lambda *a, **k: results.append(reconstruct(*a, **k)))
    x = models.images(32, seed=1)
    config = LRPQConfig(w_bits=3, a_bits=3, reconstruction="block", reconstruction_iters=ITERS)
    model = quantize(models.FAMILIES[family](), config, x, progress=False)
    (units,) = results
    for name, result in units.items():
        assert result.error_after < 1.05 * result.error_before, name
    assert sum(r.error_after for r in units.values()) < 0.9 * sum(r.error_before for r in units.values())
    assert all(m.weight_is_packed for m in weight_modules(model).values())
    save_quantized(model, tmp_path)
    raw_timm = not hasattr(model, "config")  # loaded into a float model of the same architecture
    reloaded = load_quantized(tmp_path, model=models.FAMILIES[family](seed=7) if raw_timm else None)
    assert torch.equal(models.logits(reloaded, x), models.logits(model, x))


def test_reconstruction_composes_with_gptq_and_mixed_precision(monkeypatch):
    """After GPTQ on a mixed bit plan the reconstruction starts from GPTQ's codes (the first unit's error before
    tuning is that of the GPTQ-only model) and lowers the units' errors."""
    results = []
    monkeypatch.setattr(sys.modules["optimum_lrpqvit.quantize"], "reconstruct",
                        lambda *a, **k: results.append(reconstruct(*a, **k)))
    x = models.images(32, seed=1)
    options = dict(w_bits=4, a_bits=3, weight_rounding="gptq", mixed_precision=True, allocation="budget")
    gptq = quantize(models.hf_vit(), LRPQConfig(**options), x)
    model = quantize(models.hf_vit(), LRPQConfig(**options, reconstruction="block", reconstruction_iters=ITERS), x,
                     progress=False)
    assert len({p["w_bits"] for p in applied_config(model).bit_plan.values()} - {None}) > 1
    assert applied_config(model).bit_plan == applied_config(gptq).bit_plan
    (units,) = results
    embeddings = units["vit.embeddings"]
    with torch.no_grad():
        reference = models.hf_vit().vit.embeddings(x)
        assert embeddings.error_before == pytest.approx(
            float((gptq.vit.embeddings(x[:32]) - reference).pow(2).sum(-1).mean()), rel=1e-5)
    assert sum(r.error_after for r in units.values()) < 0.9 * sum(r.error_before for r in units.values())


def _prepared(iters: int = ITERS):
    """A calibrated tiny ViT ready for ``reconstruct`` (quantize's steps up to it)."""
    from optimum_lrpqvit.bit_plan import BitPlan
    from optimum_lrpqvit.quantize import calibrate, prepare_model

    model = models.hf_vit()
    family = find_family(model)
    config = LRPQConfig(w_bits=3, a_bits=3)
    layout = family.quantized_layout(model, config)
    prepare_model(model, family, layout, BitPlan.fixed(layout, 3, 3), config)
    x = models.images(32, seed=1)
    calibrate(model, family, layout, config, x)
    float_weights = {f"{n}.weight": model.get_submodule(n).weight for n in layout.weight_points()}
    return model, family, layout, x, float_weights


def test_a_time_budget_cuts_the_steps_and_keeps_the_float_weights():
    model, family, layout, x, float_weights = _prepared()
    saved = {n: w.detach().clone() for n, w in float_weights.items()}
    done = reconstruct(model, family, layout, x, float_weights, iterations=10**6, seconds=1.0, progress=False)
    assert set(done) == set(reconstruction_units(model, family, layout, x))
    assert all(1 <= result.steps < 10**6 for result in done.values())
    for name, weight in float_weights.items():  # the float model's Parameters are not written into
        assert torch.equal(weight, saved[name]), name
    for module in weight_modules(model).values():
        assert isinstance(module, (QuantLinear, QuantConv2d)) and module.weight_folded
        assert not module.weight.requires_grad


def test_step_sizes_of_quantizers_sharing_an_input_stay_shared():
    model, family, layout, x, float_weights = _prepared()
    points = [n for n in layout.weight_points() if n != layout.patch_embed]
    before = {n: model.get_submodule(n).input_quantizer.scale.clone() for n in points}
    reconstruct(model, family, layout, x, float_weights, iterations=ITERS, progress=False)
    for _, names in layout.post_ln:
        assert len({float(model.get_submodule(n).input_quantizer.scale) for n in names}) == 1, names
    after = {n: model.get_submodule(n).input_quantizer.scale for n in points}
    assert all(not torch.equal(after[n], before[n]) for n in points)
    assert not any(scale.requires_grad for scale in after.values())


def test_an_interrupted_reconstruction_leaves_the_float_model(monkeypatch):
    model = models.hf_vit()
    x = models.images(32, seed=1)
    before = models.logits(model, x)
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    import optimum_lrpqvit.reconstruction as reconstruction

    original = reconstruction._reconstruct_unit
    monkeypatch.setattr(reconstruction, "_reconstruct_unit", interrupt)
    with pytest.raises(KeyboardInterrupt):
        quantize(model, LRPQConfig(w_bits=3, a_bits=3, reconstruction="block", reconstruction_iters=5), x,
                 progress=False)
    assert torch.equal(models.logits(model, x), before)
    assert not any(p.requires_grad is False for p in model.parameters())


@pytest.mark.parametrize("options, message", [
    ({"reconstruction": "blocks"}, "reconstruction must be one of"),
    ({"reconstruction_iters": 0}, "reconstruction_iters must be a positive int"),
    ({"reconstruction_samples": 2.5}, "reconstruction_samples must be a positive int"),
    ({"reconstruction_seconds": 0}, "reconstruction_seconds must be a positive number"),
    ({"reconstruction_seconds": float("inf")}, "reconstruction_seconds must be a positive number"),
])
def test_bad_reconstruction_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        LRPQConfig(**options)


def test_reconstruction_data_without_reconstruction_is_refused_before_anything_changes():
    model = models.hf_vit()
    x = models.images(4)
    before = models.logits(model, x)
    with pytest.raises(ValueError, match="reconstruction='block'"):
        quantize(model, LRPQConfig(), x, reconstruction_data=x)
    assert torch.equal(models.logits(model, x), before)


def test_a_resumed_reconstruction_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    x = models.images(32, seed=1)
    config = LRPQConfig(w_bits=3, a_bits=3, reconstruction="block", reconstruction_iters=20)
    whole = quantize(models.hf_vit(), config, x, progress=False)

    import optimum_lrpqvit.reconstruction as reconstruction

    original, calls = reconstruction._reconstruct_unit, []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(reconstruction, "_reconstruct_unit", interrupt)
    with pytest.raises(KeyboardInterrupt):
        quantize(models.hf_vit(), config, x, progress=False, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "unit-000.safetensors",
                                                         "unit-001.safetensors"]
    monkeypatch.setattr(reconstruction, "_reconstruct_unit", original)
    resumed = quantize(models.hf_vit(), config, x, progress=False, checkpoint_dir=tmp_path)
    assert len(calls) == 3  # the two finished units were loaded, not tuned again
    assert torch.equal(models.logits(resumed, x), models.logits(whole, x))


def test_a_damaged_or_foreign_checkpoint_is_refused(tmp_path):
    x = models.images(32, seed=1)
    config = LRPQConfig(w_bits=3, a_bits=3, reconstruction="block", reconstruction_iters=5)
    quantize(models.hf_vit(), config, x, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="another reconstruction"):
        quantize(models.hf_vit(), LRPQConfig(w_bits=4, a_bits=3, reconstruction="block", reconstruction_iters=5),
                 x, progress=False, checkpoint_dir=tmp_path)
    unit = tmp_path / "unit-001.safetensors"
    unit.write_bytes(unit.read_bytes()[:-8] + b"\0" * 8)
    model = models.hf_vit()
    before = models.logits(model, x)
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        quantize(model, config, x, progress=False, checkpoint_dir=tmp_path)
    assert torch.equal(models.logits(model, x), before)


def test_a_checkpoint_dir_without_reconstruction_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reconstruction='block'"):
        quantize(models.hf_vit(), LRPQConfig(), models.images(4), checkpoint_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_from_pretrained_and_the_command_line_reconstruct_on_the_drawn_images(tmp_path):
    """Quantize at load draws the reconstruction images after the calibration images and gives what
    ``quantize`` gives on them; ``lrpqvit quantize --reconstruction block`` resumes from --checkpoint-dir and
    writes the same model; the model card names the reconstruction."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from optimum_lrpqvit import cli
    from optimum_lrpqvit.jobs import dataset_pixel_values

    float_dir = models.save_checkpoint(models.hf_vit(), tmp_path / "float")
    config = LRPQConfig(w_bits=3, a_bits=3, dataset="fashion_mnist", num_calibration_samples=8, seed=1,
                        reconstruction="block", reconstruction_samples=16, reconstruction_iters=5)
    loaded = AutoModelForImageClassification.from_pretrained(float_dir, quantization_config=config)
    drawn = dataset_pixel_values(config, AutoImageProcessor.from_pretrained(float_dir),
                                 AutoModelForImageClassification.from_pretrained(float_dir))
    assert drawn.calibration.shape[0] == 8 and drawn.reconstruction.shape[0] == 16
    assert not any(torch.equal(drawn.calibration[0], r) for r in drawn.reconstruction)
    reference = quantize(AutoModelForImageClassification.from_pretrained(float_dir), config, drawn.calibration,
                         reconstruction_data=drawn.reconstruction, progress=False)
    x = models.images(4, seed=5)
    assert torch.equal(models.logits(loaded, x), models.logits(reference, x))

    out, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    args = ["quantize", float_dir, str(out), "--w-bits", "3", "--a-bits", "3", "--num-calibration-samples", "8",
            "--seed", "1", "--reconstruction", "block", "--reconstruction-samples", "16",
            "--reconstruction-iters", "5", "--checkpoint-dir", str(checkpoints)]
    assert cli.main(args) == 0
    assert (checkpoints / "state.json").is_file()
    assert cli.main([*args, "--overwrite"]) == 0  # every unit loaded from the checkpoints
    written = AutoModelForImageClassification.from_pretrained(out)
    assert torch.equal(models.logits(written, x), models.logits(reference, x))
    assert "block reconstruction" in (out / "README.md").read_text()
    assert cli.main(["quantize", float_dir, str(tmp_path / "other"), "--checkpoint-dir", str(checkpoints)]) == 1
