import models
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block, VisionTransformer
from transformers.models.deit.modeling_deit import DeiTLayer
from transformers.models.swin.modeling_swin import SwinLayer
from transformers.models.vit.modeling_vit import ViTLayer
from transformers.models.yolos.modeling_yolos import YolosLayer

from optimum_lrpqvit import relevance
from optimum_lrpqvit.architectures.hf_encoders import (
    HF_BEIT,
    HF_CLIP,
    HF_DATA2VEC_VISION,
    HF_DINOV2,
    HF_SIGLIP,
    HF_VIT_ENCODERS,
)
from optimum_lrpqvit.architectures.hf_swinv2 import HF_SWINV2
from optimum_lrpqvit.lrp import compute_importance, image_contributions, relevance_and_gradients

HF_ENCODER_LAYERS = [c for f in (HF_BEIT, HF_CLIP, HF_DATA2VEC_VISION, HF_DINOV2, HF_SIGLIP, HF_SWINV2, HF_VIT_ENCODERS)
                     for c in f.layer_classes]
BLOCKS = (ViTLayer, DeiTLayer, SwinLayer, YolosLayer, Block, SwinTransformerBlock, *HF_ENCODER_LAYERS)


def _block_relevance(model, x, targets=None):
    """Per-sample relevance totals entering and leaving every transformer block, in forward order."""
    names, handles = [], []

    def pre(module, args, kwargs):
        name = f"{len(names)}"
        names.append(name)
        relevance.active_recorder().record(f"in{name}", args[0])

    def post(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        relevance.active_recorder().record(f"out{names[-1]}", out)

    for m in model.modules():
        if isinstance(m, BLOCKS):
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post))
    try:
        _, recorder = relevance_and_gradients(model, x, targets)
    finally:
        for h in handles:
            h.remove()
    r = recorder.captured["relevance"]
    return [(r[f"in{n}"].flatten(1).sum(1), r[f"out{n}"].flatten(1).sum(1)) for n in names]


@pytest.mark.parametrize("family", sorted(models.FAMILIES))
def test_relevance_is_conserved_per_sample_through_every_block(family):
    model = models.FAMILIES[family]()
    totals = _block_relevance(model, models.images(3, seed=1))
    assert len(totals) >= 2
    for r_in, r_out in totals:
        torch.testing.assert_close(r_in, r_out, rtol=1e-3, atol=1e-4)
    # the seed totals 1 per image, at the target logit (the heads, α1β0 with a bias-free share, pass it on whole) or
    # at a dense model's backbone outputs (a Swin backbone's come from every stage); all of it enters the first block
    torch.testing.assert_close(totals[0][0], torch.ones(3), rtol=1e-3, atol=1e-3)
    if family not in models.DENSE:
        torch.testing.assert_close(totals[-1][1], torch.ones(3), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", ["hf_vit", "hf_deit_teacher", "hf_swin", "timm_vit", "timm_swin", "hf_dinov2",
                                    "hf_beit", "hf_siglip_vision", "hf_clip_model", "hf_vit_mae", "hf_swinv2",
                                    *models.DENSE])
def test_a_batch_gives_exactly_the_single_image_results(family):
    model = models.FAMILIES[family]()
    x = models.images(4, seed=2)
    targets = None if family in models.EMBEDDERS or family in models.DENSE else torch.tensor([0, 3, 1, 4])
    batched = image_contributions(model, x, targets)
    for i in range(4):
        single = image_contributions(model, x[i:i + 1], None if targets is None else targets[i:i + 1])
        for point, c in batched.items():
            torch.testing.assert_close(c[i:i + 1], single[point], rtol=1e-4, atol=1e-9)


def test_importance_is_deterministic_normalised_and_leaves_the_model_unchanged():
    model = models.hf_swin()
    x = models.images(6, seed=3)
    before = models.logits(model, x)
    attn = model.config._attn_implementation
    first = compute_importance(model, x, batch_size=4)
    second = compute_importance(model, x, batch_size=6)
    assert first.keys() == second.keys()
    for k in first:
        assert first[k] == pytest.approx(second[k], rel=1e-5, abs=1e-12)
    assert sum(first.values()) == pytest.approx(1.0) and all(v >= 0 for v in first.values())
    assert torch.equal(models.logits(model, x), before)
    assert model.config._attn_implementation == attn
    assert all(p.requires_grad for p in model.parameters())
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_in_place_elementwise_modules_score_like_their_out_of_place_versions():
    from timm.layers import LayerScale

    torch.manual_seed(0)
    model = models._spread(VisionTransformer(**{**models._TIMM_VIT, "init_values": 0.5}), 0)
    x = models.images(3, seed=7)
    expected = image_contributions(model, x)
    for m in model.modules():
        if isinstance(m, LayerScale):
            m.inplace = True
    got = image_contributions(model, x)
    for point, c in expected.items():
        torch.testing.assert_close(got[point], c, rtol=1e-5, atol=1e-12, msg=point)


def test_importance_points_are_the_bit_plan_points():
    from optimum_lrpqvit import LRPQConfig, quantize

    model = models.hf_deit_teacher()
    scores = compute_importance(model, models.images(2))
    quantize(model, LRPQConfig(), models.images(4))
    assert set(scores) == set(model.config.quantization_config.bit_plan)


def test_labels_change_the_scores_and_default_to_predictions():
    model = models.timm_vit()
    x = models.images(4, seed=4)
    predicted = models.logits(model, x).argmax(-1)
    assert compute_importance(model, x) == compute_importance(model, x, targets=predicted)
    assert compute_importance(model, x) != compute_importance(model, x, targets=(predicted + 1) % models.NUM_LABELS)


@pytest.mark.parametrize("targets, match", [
    ([0, 1], "2 labels but the data has 3"),
    ([0, 1, 9], r"\[0, 4\]"),
    ([0, -1, 2], r"\[0, 4\]"),
    ([0.5, 1.0, 2.0], "integer"),
])
def test_bad_targets_are_rejected(targets, match):
    with pytest.raises(ValueError, match=match):
        compute_importance(models.timm_vit(), models.images(3), targets=targets)


def test_empty_data_and_quantized_models_are_rejected():
    from optimum_lrpqvit import LRPQConfig, quantize

    with pytest.raises(ValueError, match="empty"):
        compute_importance(models.timm_vit(), torch.empty(0, 3, 16, 16))
    quantized = quantize(models.timm_vit(), LRPQConfig(), models.images(4))
    with pytest.raises(ValueError, match="before quantize"):
        compute_importance(quantized, models.images(2))


# --- a slow, explicit reference: the rules written out for one image of a timm ViT -------------------------

def _alpha1beta0(x, w, r):
    """R_i = Σ_j (x_i⁺w_ji⁺ + x_i⁻w_ji⁻) / Σ_i'(x_i'⁺w_ji'⁺ + x_i'⁻w_ji'⁻) · R_j, for x (n, in), w (out, in)."""
    pos = x.clamp(min=0)[:, None, :] * w.clamp(min=0)[None] + x.clamp(max=0)[:, None, :] * w.clamp(max=0)[None]
    z = pos.sum(-1, keepdim=True)
    return (pos / (z + relevance.EPS) * r[:, :, None]).sum(1)


def _matmul_halves(a, b, r):
    """Half of R to each operand, shared in proportion to |a_ik b_kj|."""
    terms = (a[:, :, None] * b[None, :, :]).abs()  # (n, k, m)
    share = terms / (terms.sum(1, keepdim=True) + relevance.EPS) * r[:, None, :]
    return 0.5 * share.sum(2), 0.5 * share.sum(0)


def _residual(x, y, r):
    share = x.abs() / (x.abs() + y.abs() + relevance.EPS)
    return share * r, (1 - share) * r


def _reference_relevance(model, image, target):
    """Relevance at every point's output, for one image, by explicit rules (no autograd)."""
    with torch.no_grad():
        x = model.patch_embed(image[None])
        x = model._pos_embed(x)[0]
        acts = []
        for blk in model.blocks:
            a = blk.attn
            h1 = blk.norm1(x)
            qkv = F.linear(h1, a.qkv.weight, a.qkv.bias)
            q, k, v = qkv.reshape(len(x), 3, a.num_heads, -1).permute(1, 2, 0, 3)
            s = q @ k.transpose(-2, -1)
            p = (s * a.scale).softmax(-1)
            o = p @ v
            o_flat = o.transpose(0, 1).reshape(len(x), -1)
            proj = a.proj(o_flat)
            mid = x + proj
            h2 = blk.norm2(mid)
            f1 = blk.mlp.fc1(h2)
            g = blk.mlp.act(f1)
            f2 = blk.mlp.fc2(g)
            acts.append(dict(x=x, h1=h1, q=q, k=k, v=v, p=p, o_flat=o_flat, proj=proj, mid=mid, h2=h2, f1=f1, g=g, f2=f2))
            x = mid + f2
        cls = model.norm(x)[0]
        logits = model.head(cls)
        r_logits = F.one_hot(torch.tensor(target), logits.shape[-1]).float()
        out = {"head": r_logits}
        r_x = torch.zeros_like(x)
        r_x[0] = _alpha1beta0(cls[None], model.head.weight, r_logits[None])[0]
        for i in reversed(range(len(model.blocks))):
            blk, t = model.blocks[i], acts[i]
            a = blk.attn
            r_mid, r_f2 = _residual(t["mid"], t["f2"], r_x)
            out[f"blocks.{i}.mlp.fc2"] = r_f2
            r_g = _alpha1beta0(t["g"], blk.mlp.fc2.weight, r_f2)
            out[f"blocks.{i}.mlp.fc1"] = r_g
            r_mid = r_mid + _alpha1beta0(t["h2"], blk.mlp.fc1.weight, r_g)
            r_x, r_proj = _residual(t["x"], t["proj"], r_mid)
            out[f"blocks.{i}.attn.proj"] = r_proj
            r_o = _alpha1beta0(t["o_flat"], a.proj.weight, r_proj).reshape(len(r_x), a.num_heads, -1).transpose(0, 1)
            out[f"blocks.{i}.attn.matmul2"] = r_o
            r_q, r_k, r_v, r_p = [], [], [], []
            for h in range(a.num_heads):
                rp, rv = _matmul_halves(t["p"][h], t["v"][h], r_o[h])
                rq, rkt = _matmul_halves(t["q"][h], t["k"][h].t(), rp)
                r_p.append(rp), r_v.append(rv), r_q.append(rq), r_k.append(rkt.t())
            out[f"blocks.{i}.attn.softmax"] = out[f"blocks.{i}.attn.matmul1"] = torch.stack(r_p)
            r_qkv = torch.stack([torch.stack(r_q), torch.stack(r_k), torch.stack(r_v)])  # (3, heads, n, d)
            r_qkv = r_qkv.permute(2, 0, 1, 3).reshape(len(r_x), -1)
            out[f"blocks.{i}.attn.qkv"] = r_qkv
            r_x = r_x + _alpha1beta0(t["h1"], a.qkv.weight, r_qkv)
    return out


def _linear_relevance(x, weight, bias, r):
    """Relevance that ``relevance.linear`` sends to its input x (m, in) for relevance r (m, out) at its output."""
    x = x.clone().requires_grad_()
    with relevance.Recorder() as recorder:
        recorder.mode = "relevance"
        (r_x,) = torch.autograd.grad(relevance.linear(x, weight, bias), x, r)
    return r_x


def _cancelling_layer(m=6, n_in=64, seed=0):
    """Positive inputs; output 0 has one tiny positive weight against 63 negative ones (Z₀ / |x|·|w| ≈ 1e-6), so
    x·w + |x|·|w| loses every digit of Z₀ to rounding; output 1 is ordinary."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(m, n_in, generator=g) + 0.5
    weight = torch.randn(2, n_in, generator=g)
    weight[0] = -weight[0].abs()
    weight[0, 0] = 1e-4
    return x, weight, torch.tensor([3.0, -0.5]), torch.rand(m, 2, generator=g) + 0.1


def test_linear_relevance_stays_exact_where_its_positive_part_cancels(monkeypatch):
    x, weight, bias, r = _cancelling_layer()
    expected = _alpha1beta0(x, weight, r)
    torch.testing.assert_close(_linear_relevance(x, weight, bias, r), expected, rtol=1e-5, atol=1e-7)
    monkeypatch.setattr(relevance, "CANCELLATION", 1e-12)  # no guard: the shortcut alone is wrong here
    assert not torch.allclose(_linear_relevance(x, weight, bias, r), expected, rtol=1e-2, atol=1e-4)


def test_linear_relevance_is_exact_after_an_in_place_op_on_the_layer_output():
    g = torch.Generator().manual_seed(1)
    x, weight, bias, r = (torch.randn(5, 8, generator=g, requires_grad=True), torch.randn(3, 8, generator=g),
                          torch.randn(3, generator=g), torch.rand(5, 3, generator=g))
    with relevance.Recorder() as recorder:
        y = relevance.linear(x, weight, bias).mul_(3)  # e.g. timm's LayerScale(inplace=True)
        (grad,) = torch.autograd.grad(y, x, r, retain_graph=True)
        recorder.mode = "relevance"
        (r_x,) = torch.autograd.grad(y, x, r)
    torch.testing.assert_close(grad, 3 * r @ weight)
    torch.testing.assert_close(r_x, _alpha1beta0(x.detach(), weight, 3 * r), rtol=1e-5, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 5), n_in=st.integers(1, 40), n_out=st.integers(1, 12), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), with_bias=st.booleans())
def test_linear_relevance_matches_the_rule_term_by_term(m, n_in, n_out, seed, scale, with_bias):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n_in, generator=g) * scale
    x[torch.rand(m, n_in, generator=g) < 0.2] = 0
    weight = torch.randn(n_out, n_in, generator=g)
    bias = torch.randn(n_out, generator=g) * 10 if with_bias else None
    r = torch.rand(m, n_out, generator=g)
    got = _linear_relevance(x, weight, bias, r)
    torch.testing.assert_close(got, _alpha1beta0(x, weight, r), rtol=1e-4, atol=1e-6 * float(r.sum()))


def test_pass_through_gives_fn_gradient_or_passes_relevance_and_allows_in_place_ops_after_it():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with relevance.Recorder() as recorder:
        y = torch.relu_(relevance.pass_through(x * 1, F.gelu))  # e.g. an nn.ReLU(inplace=True) after it
        (grad,) = torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True)
        recorder.mode = "relevance"
        (rel,) = torch.autograd.grad(y, x, torch.ones_like(y))
    plain = x.detach().requires_grad_()
    (expected,) = torch.autograd.grad(torch.relu(F.gelu(plain)).sum(), plain)
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(rel, (F.gelu(x) > 0).float())  # relevance passes GELU, the ReLU's mask stays


def test_engine_agrees_with_an_explicit_per_image_reference():
    model = models.timm_vit(seed=5)
    x = models.images(2, seed=6)
    targets = torch.tensor([2, 0])
    _, recorder = relevance_and_gradients(model, x, targets)
    for i in range(2):
        expected = _reference_relevance(model, x[i], int(targets[i]))
        for point, r in expected.items():
            got = recorder.captured["relevance"][point][i]
            torch.testing.assert_close(got.reshape(r.shape), r, rtol=1e-4, atol=1e-6, msg=point)


@pytest.mark.parametrize("importance", ["lrp", "fisher"])  # Fisher scores the attention products 0
def test_importance_figure_is_written(tmp_path, importance):
    import warnings

    from optimum_lrpqvit import LRPQConfig, quantize
    from optimum_lrpqvit.architectures import find_family
    from optimum_lrpqvit.report import plot_importance

    model = models.deep_timm_vit()
    layout = find_family(model).layout(model)
    config = quantize(model, LRPQConfig(mixed_precision=True, importance=importance),
                      models.images(4)).quantization_config
    path = tmp_path / "importance.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_importance(config.importance_scores, config.bit_plan, layout.block_of, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_a_model_without_classifier_is_scored_on_its_embedding_and_refuses_targets():
    model = models.hf_dinov2_registers()
    x = models.images(3, seed=5)
    embedding = models.logits(model, x)
    with pytest.raises(ValueError, match="has no classifier"):
        compute_importance(model, x, targets=[0, 1, 2])
    scores = compute_importance(model, x)
    assert sum(scores.values()) == pytest.approx(1.0)
    assert torch.equal(models.logits(model, x), embedding)
