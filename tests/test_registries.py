"""The strategy registries: config validation, ``quantize()`` and the command line read the same tables, so a
new strategy is one registration."""

import models
import pytest
import torch

from optimum_lrpqvit import LRPQConfig, applied_config, cli, quantize
from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.importance import ImportanceCriterion, normalised_over
from optimum_lrpqvit.registry import ALLOCATION_RULES, IMPORTANCE_CRITERIA, POST_LN_TREATMENTS, Registry


def test_registries_hold_the_builtin_strategies_in_their_documented_order():
    assert POST_LN_TREATMENTS.names() == ("layerwise", "channelwise", "repq", "crl")
    assert ALLOCATION_RULES.names() == ("paper", "budget")
    assert IMPORTANCE_CRITERIA.names() == ("lrp", "lrp_per_role", "fisher", "random", "uniform")


def test_registry_refuses_a_taken_name_and_names_the_valid_ones():
    table = Registry("colour")
    table.register("red")(1)
    with pytest.raises(ValueError, match="already registered"):
        table.register("red")(2)
    with pytest.raises(ValueError, match=r"colour must be one of \('red',\), got 'blue'"):
        table.get("blue")
    assert "red" in table and "blue" not in table and table.unregister("red") == 1 and "red" not in table


def test_a_new_importance_criterion_is_one_registration():
    seen = {}

    def weight_norm(model, pixels, config):  # a measured criterion: ‖W‖ per weight point, 0 elsewhere
        seen["images"] = len(pixels)
        layout = find_family(model).layout(model)
        weighted = set(layout.weight_points())
        return {p: model.get_submodule(p).weight.detach().norm().item() if p in weighted else 0.0
                for p in layout.points()}

    IMPORTANCE_CRITERIA.register("weight_norm")(ImportanceCriterion(relative=normalised_over, measure=weight_norm))
    try:
        config = LRPQConfig(mixed_precision=True, importance="weight_norm", allocation="budget", w_bits=4)
        assert config.measures_importance
        model = quantize(models.timm_vit(), config, models.images(8))
        applied = applied_config(model)
        assert seen["images"] == 8 and sum(applied.importance_scores.values()) == pytest.approx(1.0)
        assert set(applied.importance_scores) == set(applied.bit_plan)
        assert "weight_norm" in _quantize_help()
    finally:
        IMPORTANCE_CRITERIA.unregister("weight_norm")
    with pytest.raises(ValueError, match="importance must be one of"):
        LRPQConfig(importance="weight_norm")


def _quantize_help() -> str:
    quantize_parser = cli.build_parser()._subparsers._group_actions[0].choices["quantize"]
    return quantize_parser.format_help()


def test_quantize_help_lists_the_registered_strategies(capsys):
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in (*POST_LN_TREATMENTS, *ALLOCATION_RULES, *IMPORTANCE_CRITERIA))


@pytest.mark.parametrize("field, value, match", [
    ("post_ln", "rep", "post_ln must be one of"),
    ("a_bits", 0, "a_bits must be an integer between 2 and 8"),
    ("percentiles", [0.1], "percentiles must be"),
    ("importance", "hessian", "importance must be one of"),
])
def test_fields_changed_after_construction_are_validated_before_the_model_is_touched(field, value, match):
    config = LRPQConfig()
    setattr(config, field, value)
    model = models.timm_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        quantize(model, config, models.images(4))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
