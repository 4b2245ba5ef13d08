"""Accuracy and fidelity of a (quantized) model against its full-precision reference.

A classifier: top-1, agreement with the reference, KL(reference ‖ model) (``fidelity``). A model without a
classifier (an image encoder): the top-1 of a cosine k-NN classifier on its own embeddings of labelled index
images, and the cosine similarity of its embeddings to the reference's (``embedding_fidelity``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .architectures import find_family

__all__ = ["embedding_fidelity", "fidelity", "knn_top1", "predict_logits"]


@torch.no_grad()
def predict_logits(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 250, progress: bool = True,
                   desc: str = "evaluating") -> torch.Tensor:
    """Logits (for a model without a classifier: embeddings) of ``model`` on ``pixel_values``, in batches (float32,
    on the CPU)."""
    family = find_family(model)
    model.eval()
    param = next(model.parameters())
    out = []
    for start in tqdm(range(0, len(pixel_values), batch_size), desc=desc, disable=not progress, leave=False):
        batch = pixel_values[start:start + batch_size].to(device=param.device, dtype=param.dtype)
        out.append(family.logits(model, batch).float().cpu())
    return torch.cat(out)


def fidelity(logits: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None = None) -> dict[str, float]:
    """``top1`` accuracy (%) against ``labels``; with ``reference`` logits also ``agreement`` (% of equal top-1
    predictions) and ``kl``, the mean KL(softmax(reference) ‖ softmax(logits)) in nats."""
    result = {"top1": 100.0 * (logits.argmax(-1) == labels).float().mean().item()}
    if reference is not None:
        result["agreement"] = 100.0 * (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        result["kl"] = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True,
                                reduction="batchmean").item()
    return result


def knn_top1(index: torch.Tensor, index_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor,
             k: int = 20) -> float:
    """Top-1 accuracy (%) of a cosine k-NN classifier: each query takes the label whose members among its ``k``
    most similar ``index`` embeddings have the largest summed cosine similarity."""
    index, queries = F.normalize(index.float(), dim=-1), F.normalize(queries.float(), dim=-1)
    num_classes = int(max(index_labels.max(), labels.max())) + 1
    correct = 0
    for chunk, truth in zip(queries.split(1024), labels.split(1024)):
        nearest = (chunk @ index.T).topk(min(k, len(index)), dim=-1)
        votes = torch.zeros(len(chunk), num_classes).scatter_add_(1, index_labels[nearest.indices], nearest.values)
        correct += int((votes.argmax(-1) == truth).sum())
    return 100.0 * correct / len(queries)


def embedding_fidelity(embeddings: torch.Tensor, labels: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor],
                       reference: torch.Tensor | None = None, k: int = 20) -> dict[str, float]:
    """``knn_top1`` (%) of ``embeddings`` against ``labels`` with ``index`` = (the same model's embeddings of the
    index images, their labels); with ``reference`` embeddings of the same images also ``cosine`` and
    ``cosine_min``, the mean and the smallest cosine similarity to them."""
    result = {"knn_top1": knn_top1(*index, embeddings, labels, k)}
    if reference is not None:
        cosine = F.cosine_similarity(embeddings, reference, dim=-1)
        result |= {"cosine": cosine.mean().item(), "cosine_min": cosine.min().item()}
    return result
