"""Importance scores ``{point name: score}``: their validation, normalisation, and the JSON file that
``lrpqvit score`` writes and ``quantize --importance FILE`` reads."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .files import atomic_write

__all__ = ["SCORES_FORMAT", "check_scores", "normalised", "read_scores", "write_scores"]

SCORES_FORMAT = "optimum-lrpqvit/importance-scores/1"


def check_scores(scores: Mapping[str, object], what: str = "scores") -> dict[str, float]:
    """``scores`` as ``{name: float}``; ValueError unless every value is a finite real number >= 0."""
    out = {}
    for name, value in scores.items():
        if isinstance(value, bool):
            raise ValueError(f"{what}[{name!r}] must be a real number, got {value!r}.")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what}[{name!r}] must be a real number, got {value!r}.") from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{what}[{name!r}] must be finite and >= 0, got {value!r}.")
        out[name] = v
    return out


def normalised(scores: Mapping[str, float]) -> dict[str, float]:
    """I_l = C_l / Σ C_l'; ValueError when the scores sum to 0."""
    total = sum(scores.values())
    if not total > 0:
        raise ValueError("The scores of the points sum to 0 (every layer scored zero importance); check the data.")
    return {point: value / total for point, value in scores.items()}


def write_scores(path: str | os.PathLike, scores: Mapping[str, float], metadata: Mapping[str, Any]) -> None:
    """Write ``{"format", "scores", "metadata"}`` as JSON (atomically)."""
    document = {"format": SCORES_FORMAT, "scores": dict(scores), "metadata": dict(metadata)}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))


def read_scores(path: str | os.PathLike) -> dict[str, float]:
    """The ``{point: importance}`` of a file written by ``write_scores``; ValueError if it is not one."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"Importance scores file {path} does not exist; write it with `lrpqvit score`.")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"Importance scores file {path} is not valid JSON ({error}); it may be truncated. "
                         "Score again with `lrpqvit score`.") from None
    if not isinstance(document, dict) or document.get("format") != SCORES_FORMAT:
        raise ValueError(f"{path} is not an optimum-lrpqvit importance file (expected format {SCORES_FORMAT!r}, "
                         f"got {document.get('format') if isinstance(document, dict) else type(document).__name__!r}).")
    scores = document.get("scores")
    if not isinstance(scores, dict) or not scores:
        raise ValueError(f"{path}: 'scores' must be a non-empty mapping of point names to finite non-negative "
                         "numbers.")
    scores = check_scores(scores, f"{path}: scores")
    if abs(sum(scores.values()) - 1.0) > 1e-6:
        raise ValueError(f"{path}: the scores sum to {sum(scores.values())}, not 1; the file was edited or corrupted.")
    return {str(k): v for k, v in scores.items()}
