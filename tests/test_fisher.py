import models
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.importance.fisher import fisher_importance
from optimum_lrpqvit.nn import QuantConv2d, QuantLinear


def _reference(model, x, bits):
    """Per-image .backward() into .grad, and Ŵ from the quantized modules quantize() installs."""
    family = find_family(model)
    layout = family.layout(model)
    model.eval()
    modules = {p: model.get_submodule(p) for p in layout.weight_points()}
    fisher = {p: torch.zeros_like(m.weight) for p, m in modules.items()}
    for image in x:
        model.zero_grad()
        F.log_softmax(family.logits(model, image[None]), -1).max().backward()
        for p, m in modules.items():
            fisher[p] += m.weight.grad ** 2
    model.zero_grad(set_to_none=True)
    scores = {}
    for p, m in modules.items():
        if isinstance(m, nn.Conv2d):
            quantized = QuantConv2d.from_conv(m, bits, 8).quantized_weight()
        else:
            quantized = QuantLinear.from_linear(m, bits, 8).quantized_weight()
        scores[p] = float((fisher[p] * (quantized - m.weight).detach() ** 2).sum())
    total = sum(scores.values())
    return {p: scores.get(p, 0.0) / total for p in layout.points()}


@pytest.mark.parametrize("family", ["hf_vit", "hf_deit_teacher", "hf_swin", "timm_vit"])
def test_fisher_importance_matches_per_image_backward(family):
    model = models.FAMILIES[family]()
    x = models.images(3)
    before = models.logits(model, x)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scores = fisher_importance(model, x, bits=3)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(models.logits(model, x), before, rtol=0, atol=0)
    expected = _reference(model, x, bits=3)
    assert list(scores) == list(expected)
    torch.testing.assert_close(torch.tensor(list(scores.values())), torch.tensor(list(expected.values())),
                               rtol=1e-4, atol=1e-9)
    layout = find_family(model).layout(model)
    weight_points = set(layout.weight_points())
    assert all(scores[p] > 0 for p in weight_points)
    assert all(scores[p] == 0 for p in scores if p not in weight_points)  # attention products: no weights


def test_fisher_importance_is_order_invariant_and_rejects_empty_data():
    model = models.timm_vit()
    x = models.images(4)
    scores = fisher_importance(model, x, bits=4)
    torch.testing.assert_close(torch.tensor(list(fisher_importance(model, x.flip(0), bits=4).values())),
                               torch.tensor(list(scores.values())), rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="empty"):
        fisher_importance(model, x[:0], bits=4)
