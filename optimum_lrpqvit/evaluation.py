"""Accuracy and fidelity of a (quantized) classifier: top-1, agreement with a reference, KL(reference ‖ model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .architectures import find_family

__all__ = ["predict_logits", "fidelity"]


@torch.no_grad()
def predict_logits(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 250, progress: bool = True,
                   desc: str = "evaluating") -> torch.Tensor:
    """Logits of ``model`` on ``pixel_values``, in batches (float32, on the CPU)."""
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
