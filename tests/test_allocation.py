import itertools
import math
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrpqvit.allocation import (
    budget_allocation,
    paper_allocation,
    plan_summary_bits,
    weight_quantization_errors,
)
from optimum_lrpqvit.importance import relative_importance as importance_scores
from optimum_lrpqvit.nn import QuantConv2d, QuantLinear

# ------------------------------------------------------------------------------------------------ paper rule

PAPER_EXAMPLE = {  # name: (block, params, importance)
    "patch_embed": (-1, 100, 0.005),
    "blocks.0.qkv": (0, 300, 0.3),
    "blocks.0.fc1": (0, 100, 0.1),
    "blocks.1.proj": (1, 100, 0.2),
    "blocks.2.qkv": (2, 300, 0.02),
    "blocks.2.fc1": (2, 200, 0.02),  # ties with blocks.2.qkv: drops first by name
    "blocks.3.fc2": (3, 200, 0.01),
    "head": (4, 100, 0.5),
}


def _split(example):
    return ({k: v[2] for k, v in example.items()}, {k: v[1] for k, v in example.items()},
            {k: v[0] for k, v in example.items()})


def test_paper_allocation_hand_made_example():
    importance, params, block_of = _split(PAPER_EXAMPLE)
    plan = paper_allocation(importance, params, block_of, bits=4)
    # first blocks +500 parameter-bits; patch_embed (100) + blocks.3.fc2 (200) + blocks.2.fc1 (200) pay exactly
    assert plan == {
        "patch_embed": 3, "blocks.0.qkv": 5, "blocks.0.fc1": 5, "blocks.1.proj": 5,
        "blocks.2.qkv": 4, "blocks.2.fc1": 3, "blocks.3.fc2": 3, "head": 4,
    }
    assert plan_summary_bits(params, plan) == 4.0


def test_paper_allocation_one_first_block_and_none():
    importance, params, block_of = _split(PAPER_EXAMPLE)
    plan = paper_allocation(importance, params, block_of, bits=6, first_blocks=1)
    # block 0 holds 400: patch_embed (100) + blocks.3.fc2 (200) + blocks.2.fc1 (200) = 500 >= 400
    assert plan == {
        "patch_embed": 5, "blocks.0.qkv": 7, "blocks.0.fc1": 7, "blocks.1.proj": 6,
        "blocks.2.qkv": 6, "blocks.2.fc1": 5, "blocks.3.fc2": 5, "head": 6,
    }
    assert paper_allocation(importance, params, block_of, bits=3, first_blocks=0) == {k: 3 for k in params}


point_st = st.tuples(st.integers(-1, 5), st.integers(1, 1000), st.sampled_from([0.0, 0.01, 0.1, 0.1, 0.3, 1.0]))


@settings(max_examples=150, deadline=None)
@given(points=st.dictionaries(st.text("abcdef", min_size=1, max_size=3), point_st, min_size=1, max_size=10),
       bits=st.integers(3, 7), first_blocks=st.integers(0, 3))
def test_paper_allocation_properties(points, bits, first_blocks):
    importance, params, block_of = _split(points)
    first = {k for k in points if 0 <= block_of[k] < first_blocks}
    first_params = sum(params[k] for k in first)
    if first_params > sum(params.values()) - first_params:
        with pytest.raises(ValueError, match="first_blocks"):
            paper_allocation(importance, params, block_of, bits, first_blocks)
        return
    plan = paper_allocation(importance, params, block_of, bits, first_blocks)
    total = sum(params.values())
    assert sum(params[k] * plan[k] for k in plan) <= bits * total
    assert plan_summary_bits(params, plan) <= bits
    assert all(plan[k] == bits + 1 for k in first)
    dropped = [k for k in points if k not in first and plan[k] == bits - 1]
    kept = [k for k in points if k not in first and plan[k] == bits]
    assert len(dropped) + len(kept) + len(first) == len(points)
    # only the least important drop (ties by name)
    if dropped and kept:
        assert max((importance[k], k) for k in dropped) < min((importance[k], k) for k in kept)
        assert max(importance[k] for k in dropped) <= min(importance[k] for k in kept)
    # and no more than needed: keeping the last one dropped would break the budget
    if dropped:
        last = max(dropped, key=lambda k: (importance[k], k))
        assert sum(params[k] * plan[k] for k in plan) + params[last] > bits * total


@pytest.mark.parametrize("bits", [2, 8, 1, 9, 4.0, True])
def test_paper_allocation_rejects_bits_outside_range(bits):
    importance, params, block_of = _split(PAPER_EXAMPLE)
    with pytest.raises(ValueError, match="between 3 and 7"):
        paper_allocation(importance, params, block_of, bits)


def test_paper_allocation_rejects_bad_input():
    importance, params, block_of = _split(PAPER_EXAMPLE)
    with pytest.raises(ValueError, match="non-empty"):
        paper_allocation({}, {}, {}, 4)
    with pytest.raises(ValueError, match="head"):
        paper_allocation({k: v for k, v in importance.items() if k != "head"}, params, block_of, 4)
    with pytest.raises(ValueError, match="positive integer"):
        paper_allocation(importance, {**params, "head": 0}, block_of, 4)
    with pytest.raises(ValueError, match="finite"):
        paper_allocation({**importance, "head": float("nan")}, params, block_of, 4)
    with pytest.raises(ValueError, match="block index"):
        paper_allocation(importance, params, {**block_of, "head": 1.5}, 4)
    with pytest.raises(ValueError, match="first_blocks"):
        paper_allocation(importance, params, block_of, 4, first_blocks=-1)


# ------------------------------------------------------------------------------------------------ knapsack

def _objective(importance, errors, plan, lo):
    return sum(importance[k] * (errors[k][lo] - errors[k][b]) for k, b in plan.items())


def _brute_force(importance, params, errors, avg_bits, cands):
    names = list(params)
    limit = math.floor(Fraction(avg_bits) * sum(params.values()))
    best = None
    for combo in itertools.product(cands, repeat=len(names)):
        if sum(params[k] * b for k, b in zip(names, combo)) <= limit:
            value = _objective(importance, errors, dict(zip(names, combo)), cands[0])
            best = value if best is None else max(best, value)
    return best


@st.composite
def knapsack_instances(draw):
    n = draw(st.integers(1, 5))
    names = [f"p{i}" for i in range(n)]
    cands = sorted(draw(st.sets(st.integers(2, 8), min_size=3, max_size=3)))
    params = {k: draw(st.integers(1, 60)) for k in names}
    importance = {k: draw(st.floats(0, 1)) for k in names}
    errors = {k: {b: draw(st.floats(0, 1)) for b in cands} for k in names}
    avg_bits = draw(st.integers(4 * cands[0], 4 * cands[-1] + 2)) / 4
    return importance, params, errors, avg_bits, cands


@settings(max_examples=80, deadline=None)
@given(instance=knapsack_instances())
@pytest.mark.filterwarnings("ignore:avg_bits=.*no mixed precision")
def test_budget_allocation_matches_brute_force(instance):
    importance, params, errors, avg_bits, cands = instance
    plan = budget_allocation(importance, params, errors, avg_bits, cands)
    assert set(plan) == set(params) and set(plan.values()) <= set(cands)
    assert sum(params[k] * plan[k] for k in plan) <= Fraction(avg_bits) * sum(params.values())
    best = _brute_force(importance, params, errors, avg_bits, cands)
    scale = max(abs(importance[k] * (errors[k][cands[0]] - errors[k][b])) for k in params for b in cands)
    # HiGHS stops at an absolute MIP gap of 1e-6 of the objective normalised by at most the largest gain
    assert _objective(importance, errors, plan, cands[0]) >= best - 1e-5 * scale - 1e-12
    assert budget_allocation(importance, params, errors, avg_bits, cands) == plan


def _vit_like_instance():
    g = torch.Generator().manual_seed(0)
    params = {"patch_embed": 589_824, "head": 769_000}
    for i in range(12):
        params.update({f"blocks.{i}.qkv": 1_769_472, f"blocks.{i}.proj": 589_824,
                       f"blocks.{i}.fc1": 2_359_296, f"blocks.{i}.fc2": 2_359_296})
    importance = dict(zip(params, torch.rand(len(params), generator=g).tolist()))
    errors = {k: {b: 4.0 ** -b * (1 + 0.5 * torch.rand(1, generator=g).item()) for b in (3, 4, 5, 6, 8)}
              for k in params}
    return importance, params, errors


@pytest.mark.parametrize("avg_bits", [3.0, 4.0, 4.37, 5.123456789, 7.99, 8.0, 9.5])
def test_budget_allocation_respects_budget_exactly_at_scale(avg_bits):
    importance, params, errors = _vit_like_instance()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = budget_allocation(importance, params, errors, avg_bits)
    # at the smallest candidate the only plan is uniform: the caller is told how to get a trade-off
    assert [str(w.message) for w in caught if "no mixed precision" in str(w.message)] == (
        ["avg_bits=3.0 leaves no room above the smallest candidate: every point gets 3 bits (no mixed precision). "
         "Add a smaller candidate, e.g. candidates=[2, 3, 4, 5, 6, 8]."]
        if avg_bits == 3.0 else [])
    used = sum(params[k] * plan[k] for k in plan)
    assert used <= Fraction(avg_bits) * sum(params.values())
    if avg_bits >= 8:
        assert set(plan.values()) == {8}
    if avg_bits == 3.0:
        assert set(plan.values()) == {3}
    _assert_no_affordable_upgrade(plan, params, avg_bits)


def _assert_no_affordable_upgrade(plan, params, avg_bits, cands=(3, 4, 5, 6, 8)):
    """Errors fall with bits and every importance is > 0, so an optimum leaves no affordable single upgrade."""
    used = sum(params[k] * plan[k] for k in plan)
    for k, b in plan.items():
        if b < cands[-1]:
            upgrade = params[k] * (cands[cands.index(b) + 1] - b)
            assert used + upgrade > Fraction(avg_bits) * sum(params.values()), k


@pytest.mark.parametrize("avg_bits", [4.0, 6.0])
def test_budget_allocation_is_optimal_when_one_point_dominates_the_importance(avg_bits):
    # LRP gives a ViT's classifier ~0.9999 of the importance; the other points must still be allocated
    importance, params, errors = _vit_like_instance()
    params["head"] = 1_290
    importance["head"] = 1e4 * sum(v for k, v in importance.items() if k != "head")
    plan = budget_allocation(importance, params, errors, avg_bits)
    _assert_no_affordable_upgrade(plan, params, avg_bits)


def test_budget_allocation_prefers_important_points():
    params = {"a": 10, "b": 10}
    errors = {"a": {3: 1.0, 5: 0.1}, "b": {3: 1.0, 5: 0.1}}
    assert budget_allocation({"a": 0.9, "b": 0.1}, params, errors, 4.0, (3, 5)) == {"a": 5, "b": 3}
    assert budget_allocation({"a": 0.1, "b": 0.9}, params, errors, 4.0, (3, 5)) == {"a": 3, "b": 5}


@pytest.mark.parametrize("avg_bits", [2.99, 2.0, 0.0])
def test_budget_allocation_infeasible_names_feasible_range(avg_bits):
    importance, params, errors = _vit_like_instance()
    with pytest.raises(ValueError, match="between 3 and 8"):
        budget_allocation(importance, params, errors, avg_bits)


def test_budget_allocation_rejects_bad_input():
    params = {"a": 10}
    errors = {"a": {3: 1.0, 4: 0.5}}
    with pytest.raises(ValueError, match="every candidate"):
        budget_allocation({"a": 1.0}, params, errors, 4.0, (3, 4, 5))
    with pytest.raises(ValueError, match="between 2 and 8"):
        budget_allocation({"a": 1.0}, params, {"a": {3: 1.0, 9: 0.5}}, 4.0, (3, 9))
    with pytest.raises(ValueError, match="non-empty"):
        budget_allocation({"a": 1.0}, params, errors, 4.0, ())
    with pytest.raises(ValueError, match="finite"):
        budget_allocation({"a": 1.0}, params, errors, float("nan"), (3, 4))
    with pytest.raises(ValueError, match="finite"):
        budget_allocation({"a": 1.0}, params, {"a": {3: -1.0, 4: 0.5}}, 4.0, (3, 4))
    with pytest.raises(ValueError, match="missing from importance"):
        budget_allocation({"b": 1.0}, params, errors, 4.0, (3, 4))


# ------------------------------------------------------------------------------------------------ errors

def test_weight_errors_decrease_with_bits():
    g = torch.Generator().manual_seed(0)
    weights = {"fc": torch.randn(48, 96, generator=g), "conv": torch.randn(16, 3, 4, 4, generator=g) * 0.02}
    errors = weight_quantization_errors(weights, (2, 3, 4, 5, 6, 8))
    for row in errors.values():
        values = [row[b] for b in (2, 3, 4, 5, 6, 8)]
        assert all(0 < v < 1 for v in values)
        assert all(a > b for a, b in zip(values, values[1:])), values
    assert weight_quantization_errors({"z": torch.zeros(4, 4)}, (4,)) == {"z": {4: 0.0}}


def test_weight_errors_match_quantized_modules():
    torch.manual_seed(0)
    linear, conv = torch.nn.Linear(32, 24), torch.nn.Conv2d(3, 8, 4, stride=4)
    errors = weight_quantization_errors({"fc": linear.weight, "conv": conv.weight}, (3, 5))
    for bits in (3, 5):
        for name, module in (("fc", QuantLinear.from_linear(linear, bits, 8)),
                             ("conv", QuantConv2d.from_conv(conv, bits, 8))):
            w = module.weight.detach()
            expected = ((module.quantized_weight().detach() - w).pow(2).sum() / w.pow(2).sum()).item()
            assert errors[name][bits] == pytest.approx(expected, rel=1e-5)


def test_weight_errors_reject_bad_input():
    with pytest.raises(ValueError, match="2-D Linear"):
        weight_quantization_errors({"b": torch.randn(8)}, (4,))
    with pytest.raises(ValueError, match="floating-point"):
        weight_quantization_errors({"b": torch.ones(2, 2, dtype=torch.int64)}, (4,))
    with pytest.raises(ValueError, match="between 2 and 8"):
        weight_quantization_errors({"b": torch.randn(2, 2)}, (1,))
    with pytest.raises(ValueError, match="non-empty"):
        weight_quantization_errors({}, (4,))


# ------------------------------------------------------------------------------------------------ importance

POINTS = ["blocks.0.qkv", "blocks.0.proj", "blocks.1.fc1", "head"]


def test_importance_random_is_seeded_and_normalised():
    a = importance_scores("random", POINTS, None, seed=1)
    assert a == importance_scores("random", POINTS, None, seed=1)
    assert a != importance_scores("random", POINTS, None, seed=2)
    assert a == importance_scores("random", POINTS[::-1], None, seed=1)
    assert list(a) == POINTS and all(v > 0 for v in a.values())
    assert sum(a.values()) == pytest.approx(1.0)


def test_importance_uniform_and_lrp():
    u = importance_scores("uniform", POINTS, None, seed=0)
    assert sum(u.values()) == pytest.approx(1.0) and set(u.values()) == {0.25}
    lrp = {"blocks.0.qkv": 2.0, "blocks.0.proj": 1.0, "blocks.1.fc1": 1.0, "head": 0.0, "blocks.0.matmul1": 9.0}
    assert importance_scores("lrp", POINTS, lrp, seed=0) == {
        "blocks.0.qkv": 0.5, "blocks.0.proj": 0.25, "blocks.1.fc1": 0.25, "head": 0.0}


@given(st.lists(st.floats(1e-6, 1e3), min_size=3, max_size=3), st.lists(st.floats(1e-6, 1e3), min_size=2, max_size=2),
       st.floats(1e-3, 1e3))
def test_importance_lrp_per_role_compares_layers_with_their_own_role(fc1, proj, factor):
    points = ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.2.mlp.fc1", "blocks.0.attn.proj", "blocks.1.attn.proj"]
    scores = dict(zip(points, fc1 + proj))
    per_role = importance_scores("lrp_per_role", points, scores, seed=0)
    assert sum(per_role.values()) == pytest.approx(1.0)
    for role in ("fc1", "proj"):  # every role gets the same total mass per layer, ordered as before within it
        mine = [p for p in points if p.endswith(role)]
        assert sum(per_role[p] for p in mine) / len(mine) == pytest.approx(1 / len(points))
        assert sorted(mine, key=per_role.get) == sorted(mine, key=scores.get)
    rescaled = {p: v * factor if p.endswith("fc1") else v for p, v in scores.items()}  # a role's scale is ignored
    assert importance_scores("lrp_per_role", points, rescaled, seed=0) == pytest.approx(per_role)
    assert importance_scores("lrp_per_role", points, per_role, seed=0) == pytest.approx(per_role)  # idempotent


@pytest.mark.parametrize("lrp, match", [
    (None, "needs the measured scores"),
    ({}, "needs the measured scores"),
    ({"blocks.0.qkv": 1.0}, "missing points"),
    ({p: 1.0 for p in POINTS} | {"head": -1.0}, "finite and >= 0"),
    ({p: 1.0 for p in POINTS} | {"head": float("nan")}, "finite and >= 0"),
    ({p: 0.0 for p in POINTS}, "sum to 0"),
])
def test_importance_lrp_rejects_bad_scores(lrp, match):
    with pytest.raises(ValueError, match=match):
        importance_scores("lrp", POINTS, lrp, seed=0)


def test_importance_rejects_unknown_kind_and_bad_points():
    with pytest.raises(ValueError, match=r"importance must be one of \('lrp', 'lrp_per_role', 'fisher', 'random', 'uniform'\)"):
        importance_scores("hessian", POINTS, None, seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        importance_scores("uniform", [], None, seed=0)
    with pytest.raises(ValueError, match="unique"):
        importance_scores("uniform", ["a", "a"], None, seed=0)
    with pytest.raises(ValueError, match="seed"):
        importance_scores("random", POINTS, None, seed=-1)


# ------------------------------------------------------------------------------------------------ summary

def test_plan_summary_bits():
    assert plan_summary_bits({"a": 1, "b": 3}, {"a": 8, "b": 4}) == 5.0
    with pytest.raises(ValueError, match="missing from w_bits"):
        plan_summary_bits({"a": 1, "b": 3}, {"a": 8})
    with pytest.raises(ValueError, match="between 2 and 8"):
        plan_summary_bits({"a": 1}, {"a": 9})


def test_budget_allocation_retightens_when_the_solver_slips(monkeypatch):
    import scipy.optimize

    real_milp, calls = scipy.optimize.milp, []

    def sloppy_milp(c, *, constraints, **kwargs):  # first solve: budget row loosened by 5 parameter-bits
        calls.append(constraints[1].ub[0])
        if len(calls) == 1:
            constraints = [constraints[0], scipy.optimize.LinearConstraint(constraints[1].A, -float("inf"),
                                                                           constraints[1].ub + 5)]
        return real_milp(c, constraints=constraints, **kwargs)

    monkeypatch.setattr(scipy.optimize, "milp", sloppy_milp)
    params = {"a": 7, "b": 5}
    errors = {"a": {3: 1.0, 4: 0.5}, "b": {3: 1.0, 4: 0.5}}
    plan = budget_allocation({"a": 1.0, "b": 0.5}, params, errors, 3.5, (3, 4))
    assert plan == {"a": 3, "b": 4} and len(calls) == 2 and calls[1] < calls[0]
