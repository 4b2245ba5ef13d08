"""Model cards for quantized models, rendered from ``model_cards/lrpqvit.md`` (Jinja, Hub card metadata)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .quantize import applied_config

__all__ = ["render_model_card"]

FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
TEMPLATE = Path(__file__).with_name("model_cards") / "lrpqvit.md"


def _dataset_id(name: str | None) -> str | None:
    return FASHION_MNIST_HUB_ID if name == "fashion_mnist" else name


_RESULT_KEYS = ("dataset", "split", "num_images", "full_precision.top1", "quantized.top1", "quantized.agreement",
                "quantized.kl")


def _check_results(results: object) -> None:
    """ValueError naming the missing keys unless ``results`` has the form ``render_model_card`` documents."""
    def has(key: str) -> bool:
        node = results
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = [k for k in _RESULT_KEYS if not has(k)]
    if missing:
        raise ValueError(f"results lacks {missing}: it must be the dict `lrpqvit evaluate --output` writes, "
                         "{'dataset', 'split', 'num_images', 'full_precision': {'top1'}, 'quantized': {'top1', "
                         "'agreement', 'kl'}}.")


def render_model_card(
    model: nn.Module,
    *,
    base_model: str | None = None,
    results: dict[str, Any] | None = None,
    figure: str | None = None,
    name: str | None = None,
) -> str:
    """The README.md of a quantized model: card metadata (``base_model``, ``base_model_relation: quantized``,
    library and pipeline tags, datasets, accuracy before and after as model-index results), the bit plan as
    a table with its summary, and ``figure`` (a file in the same repo) when given. ``name``: the repo id or
    directory the card's loading example names (default: the model's ``name_or_path``).

    ``results``: ``{"dataset", "split", "num_images", "full_precision": {"top1"}, "quantized": {"top1",
    "agreement", "kl"}}`` as written by ``lrpqvit evaluate`` (accuracies in %).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config = applied_config(model)
    summary = config.bit_plan_summary
    name = str(name or getattr(model, "name_or_path", None) or type(model).__name__)
    eval_results = None
    if results is not None:
        _check_results(results)
        common = dict(task_type="image-classification", dataset_type=_dataset_id(results["dataset"]),
                      dataset_name=results["dataset"], dataset_split=results["split"], metric_type="accuracy")
        eval_results = [
            EvalResult(metric_name="top-1 accuracy, full precision",
                       metric_value=round(results["full_precision"]["top1"], 2),
                       **common),
            EvalResult(metric_name="top-1 accuracy, quantized", metric_value=round(results["quantized"]["top1"], 2),
                       **common),
        ]
    datasets = sorted({d for d in (_dataset_id(config.dataset), results and _dataset_id(results["dataset"])) if d})
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["optimum-lrpqvit", "lrpqvit", "quantized", f"{round(summary['avg_w_bits'])}-bit", "vision-transformer"],
        datasets=datasets or None,
        model_name=name.split("/")[-1],
        eval_results=eval_results,
    )
    template = TEMPLATE.read_text(encoding="utf-8")
    base_line = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "A vision transformer"
    card = ModelCard.from_template(
        card_data, template_str=template, model_name=name.split("/")[-1], base_model_line=base_line, config=config,
        summary=summary, results=results, figure=figure, bit_plan=config.bit_plan,
        importance=config.importance_scores, repo_id=name,
    )
    return str(card)
