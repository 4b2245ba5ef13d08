"""Model cards for quantized models, rendered from ``model_cards/lrpqvit.md`` (Jinja, Hub card metadata)."""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .architectures import find_family
from .config import LRPQConfig
from .quantize import applied_config
from .report import bit_plan_grid, role_of

__all__ = ["render_model_card"]

FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
TEMPLATE = Path(__file__).with_name("model_cards") / "lrpqvit.md"


def _dataset_id(name: str | None) -> str | None:
    return FASHION_MNIST_HUB_ID if name == "fashion_mnist" else name


_RESULT_KEYS = ("dataset", "split", "num_images", "full_precision.top1", "quantized.top1", "quantized.agreement",
                "quantized.kl")
_ENCODER_RESULT_KEYS = ("dataset", "split", "num_images", "full_precision.knn_top1", "quantized.knn_top1",
                        "quantized.cosine", "quantized.cosine_min")
_SEGMENTATION_RESULT_KEYS = ("dataset", "split", "num_images", "full_precision.miou", "quantized.miou")
_DETECTION_RESULT_KEYS = ("dataset", "split", "num_images", "full_precision.box.AP", "quantized.box.AP",
                          "quantized.box.AP50", "quantized.box.AP75")


def _check_results(results: object) -> None:
    """ValueError naming the missing keys unless ``results`` has the form ``render_model_card`` documents."""
    def has(key: str) -> bool:
        node = results
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    keys = next((keys for probe, keys in (("quantized.knn_top1", _ENCODER_RESULT_KEYS),
                                          ("quantized.miou", _SEGMENTATION_RESULT_KEYS),
                                          ("quantized.box", _DETECTION_RESULT_KEYS)) if has(probe)), _RESULT_KEYS)
    missing = [k for k in keys if not has(k)]
    if missing:
        raise ValueError(f"results lacks {missing}: it must be the dict `lrpqvit evaluate --output` writes, "
                         "{'dataset', 'split', 'num_images', 'full_precision': {'top1'}, 'quantized': {'top1', "
                         "'agreement', 'kl'}} (a model without a classifier: 'knn_top1' for 'top1', 'cosine' and "
                         "'cosine_min' for 'agreement' and 'kl'; a dense model: 'miou', or 'box' (and 'mask') "
                         "{'AP', 'AP50', 'AP75'}).")


def _headline(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key path, metric name, metric type) of the results that go into the card's model-index."""
    quantized = results["quantized"]
    if "top1" in quantized:
        return [("top1", "top-1 accuracy", "accuracy")]
    if "knn_top1" in quantized:
        return [("knn_top1", "k-NN top-1", "accuracy")]
    if "miou" in quantized:
        return [("miou", "mIoU", "mean_iou")]
    return [(f"{kind}.AP", f"{kind} AP", "mAP") for kind in ("box", "mask") if kind in quantized]


def _at(results: dict[str, Any], path: str) -> float:
    for part in path.split("."):
        results = results[part]
    return results


def _mix(counts: Mapping[int, float], unit: str) -> str:
    """``{bits: share}`` as "3 bits: 7 %, 4 bits: 86 %, ..." (shares of ``unit``)."""
    return ", ".join(f"{bits} bits: {share:.3g} %" for bits, share in sorted(counts.items())) + f" of the {unit}"


def _method_line(config: LRPQConfig) -> str:
    treatment = {"crl": "clipped reparameterisation of post-LayerNorm activations (CRL)",
                 "repq": "RepQ-ViT's reparameterisation of post-LayerNorm activations",
                 "channelwise": "channel-wise post-LayerNorm activation scales",
                 "layerwise": "per-tensor post-LayerNorm activation scales"}.get(config.post_ln, config.post_ln)
    probabilities = ("AdaLog attention probabilities (log base searched per layer)"
                     if config.softmax_quantizer == "adalog" else "log-√2 attention probabilities")
    if config.gelu_quantizer == "adalog":
        probabilities += ", AdaLog post-GELU activations"
    if config.compensate_activations:
        probabilities += ", weights and biases re-solved for the quantized inputs"
    if config.weight_rounding == "gptq":
        probabilities += ", GPTQ weight rounding"
    if config.center_keys:
        probabilities += ", keys centred per channel (folded into the key bias)"
    if config.reconstruction == "block":
        probabilities += (", block reconstruction (AdaRound weight rounding and LSQ activation step sizes with "
                          f"QDrop, up to {config.reconstruction_iters} steps per block)")
    if config.mixed_precision:
        return (f"LRP-QViT ([arXiv:2401.11243](https://arxiv.org/abs/2401.11243)): mixed precision with each layer's "
                f"bits from its `{config.importance}` importance, {treatment}, {probabilities}")
    return f"W{config.w_bits}/A{config.a_bits} for every layer, with {treatment} and {probabilities}"


def render_model_card(
    model: nn.Module,
    *,
    base_model: str | None = None,
    results: dict[str, Any] | None = None,
    figure: str | None = None,
    name: str | None = None,
    license: str | None = None,
) -> str:
    """The README.md of a quantized model: card metadata (``base_model``, ``base_model_relation: quantized``,
    library and pipeline tags, datasets, accuracy before and after as model-index results), the bit plan as
    a block × role table with each block's share of the importance and, folded, every point, and ``figure`` (a
    file in the same repo) when given. ``name``: the repo id or directory the card's loading example names
    (default: the model's ``name_or_path``). ``license``: the card's license (an SPDX id such as ``apache-2.0``;
    usually the base model's), recorded as "not recorded" when None.

    ``results``: ``{"dataset", "split", "num_images", "full_precision": {"top1"}, "quantized": {"top1",
    "agreement", "kl"}}`` as written by ``lrpqvit evaluate`` (accuracies in %); for a model without a classifier
    ``"knn_top1"`` in place of ``"top1"`` and ``"cosine"``, ``"cosine_min"`` in place of the agreement and KL.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config = applied_config(model)
    summary = config.bit_plan_summary
    name = str(name or getattr(model, "name_or_path", None) or type(model).__name__)
    task = find_family(model).pipeline_task(model)
    eval_results = None
    if results is not None:
        _check_results(results)
        common = dict(task_type=task, dataset_type=_dataset_id(results["dataset"]), dataset_name=results["dataset"],
                      dataset_split=results["split"])
        eval_results = [EvalResult(metric_name=f"{metric}, {label}", metric_type=kind,
                                   metric_value=round(_at(results[which], key), 2), **common)
                        for key, metric, kind in _headline(results)
                        for which, label in (("full_precision", "full precision"), ("quantized", "quantized"))]
    datasets = sorted({d for d in (_dataset_id(config.dataset), results and _dataset_id(results["dataset"])) if d})
    card_data = ModelCardData(
        license=license,
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        library_name="transformers",
        pipeline_tag=task,
        tags=["optimum-lrpqvit", "lrpqvit", "quantized", f"{round(summary['avg_w_bits'])}-bit", "vision-transformer"],
        datasets=datasets or None,
        model_name=name.split("/")[-1],
        eval_results=eval_results,
    )
    template = TEMPLATE.read_text(encoding="utf-8")
    base_line = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "A vision transformer"
    plan, importance = config.bit_plan, config.importance_scores
    layout = find_family(model).layout(model)
    numel = {p: math.prod(model.get_submodule(p).weight_shape) for p in layout.weight_points()}
    weights, activations = collections.Counter(), collections.Counter()
    for point, bits in plan.items():
        if bits["w_bits"] is not None:
            weights[bits["w_bits"]] += 100.0 * numel[point] / sum(numel.values())
        activations[bits["a_bits"]] += 100.0 / len(plan)
    roles, rows = bit_plan_grid(plan, layout.block_of, len(layout.attentions))
    total = sum(importance.values()) if importance else 1.0

    def cell(point: str) -> str:
        bits = plan[point]
        return str(bits["w_bits"]) if bits["w_bits"] is not None else f"a{bits['a_bits']}"

    grid = []
    for label, points in rows:
        if label.startswith("block"):
            by_role = {role_of(p): cell(p) for p in points}
            cells = [by_role.get(role, "") for role in roles]
        else:  # patch embedding, heads: their own points, named
            cells = [f"{role_of(p).rsplit('.', 1)[-1]} {cell(p)}" for p in points]
            cells += [""] * (len(roles) - len(cells))
        share = f"{100.0 * sum(importance[p] for p in points) / total:.3g} %" if importance else ""
        grid.append({"label": label, "cells": cells, "share": share})
    ranks = {p: i + 1 for i, p in enumerate(sorted(importance, key=lambda p: -importance[p]))} if importance else {}
    card = ModelCard.from_template(
        card_data, template_str=template, model_name=name.split("/")[-1], base_model_line=base_line, config=config,
        summary=summary, results=results, figure=figure, bit_plan=plan, importance=importance, repo_id=name,
        method_line=_method_line(config), weight_mix=_mix(weights, "weights"),
        activation_mix=_mix(activations, "quantized points"), roles=roles, grid=grid, ranks=ranks, license=license,
        task=task,
    )
    return str(card)
