"""Publishing a quantized model: a result directory for the Hub (packed weights, processor, model card,
importance figure, results) and its upload in one commit."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi
from torch import nn

from .architectures import find_family
from .model_card import render_model_card
from .quantize import applied_config
from .report import plot_importance
from .serialization.reading import config_from_document, read_checkpoint, read_config, weight_files
from .serialization.saving import save_quantized

__all__ = ["push_directory", "push_to_hub", "save_quantized_model"]


def save_quantized_model(
    model: nn.Module,
    directory: str | os.PathLike,
    processor: Any = None,
    *,
    base_model: str | None = None,
    results: dict[str, Any] | None = None,
    name: str | None = None,
    license: str | None = None,
) -> Path:
    """Save a quantized model for the Hub: packed weights and config, the processor, ``importance.png``
    (mixed precision), ``results.json`` and a ``README.md`` model card (see ``model_card``) whose loading example
    names the model ``name`` (default: ``./<the directory's name>``; ``push_directory`` puts the repo id there)
    and whose license is ``license``."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory; give a new or existing directory.")
    config = applied_config(model)
    figure = "importance.png" if config.importance_scores is not None else None
    # the card first: it checks `results`, before anything is written
    card = render_model_card(model, base_model=base_model, results=results, figure=figure,
                             name=name or f"./{directory.name}", license=license)
    save_quantized(model, directory)
    if processor is not None:
        processor.save_pretrained(directory)
    for stale, written in (("importance.png", figure), ("results.json", results)):
        if written is None and (directory / stale).is_file():  # left by an earlier run into this directory
            (directory / stale).unlink()
    if figure is not None:
        layout = find_family(model).layout(model)
        plot_importance(config.importance_scores, config.bit_plan, layout.block_of, directory / figure,
                        title=f"{config.importance} importance and bit plan ({config.allocation} rule)",
                        num_blocks=len(layout.attentions))
    if results is not None:
        (directory / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (directory / "README.md").write_text(card)
    return directory


def push_directory(directory: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                   token: str | None = None, commit_message: str | None = None) -> str:
    """Upload a directory written by ``save_quantized_model`` (or ``save_quantized``) to the Hub repo
    ``repo_id`` in one commit, creating the repo if needed; returns the commit URL. The directory is checked
    first (an lrpqvit config with a bit plan and readable safetensors weights), so a broken checkpoint is never
    published; the model card's name for the model (the directory's) becomes ``repo_id``."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory; write one with `lrpqvit quantize`.")
    config = config_from_document(read_config(directory), directory)
    if not config.bit_plan:
        raise ValueError(f"{directory}/config.json has no bit plan; it was not saved by optimum-lrpqvit.")
    read_checkpoint(weight_files(directory))  # digest and format checks
    links = [p for p in Path(directory).rglob("*") if p.is_symlink()]
    if links:
        raise ValueError(f"{directory} holds symbolic links ({', '.join(map(str, links[:3]))}); push_directory "
                         "uploads regular files of the directory only, so that nothing outside it is published. "
                         "Replace the links by copies, or remove them.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = []
    for path in sorted(Path(directory).rglob("*")):
        relative = path.relative_to(directory)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        content: str | bytes = str(path)
        if relative.as_posix() == "README.md":
            name = Path(directory).resolve().name
            content = path.read_text(encoding="utf-8").replace(f'model="./{name}"', f'model="{repo_id}"').encode()
        operations.append(CommitOperationAdd(relative.as_posix(), content))
    info = api.create_commit(repo_id, operations, revision=revision,
                             commit_message=commit_message or f"Upload {config.bit_plan_summary['avg_w_bits']}-bit "
                                                              "LRP-QViT quantized model")
    return info.commit_url


def push_to_hub(model: nn.Module, repo_id: str, processor=None, *, base_model: str | None = None,
                results: dict | None = None, private: bool = False, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None, license: str | None = None) -> str:
    """Save ``model`` with ``save_quantized_model`` (packed weights, bit plan, processor, model card with
    the bit plan, importance figure, ``results``) and upload it to ``repo_id``; returns the commit URL.
    ``base_model`` defaults to the Hub id the model was loaded from, if it was (``model.name_or_path``).

    A quantized transformers model's own ``model.push_to_hub(repo_id, ...)`` calls this function (the
    transformers integration installs it on the instance), so both give the same card."""
    if base_model is None:
        source = getattr(model, "name_or_path", "") or ""
        base_model = source if source.count("/") == 1 and not os.path.exists(source) else None
    with tempfile.TemporaryDirectory() as tmp:
        save_quantized_model(model, tmp, processor, base_model=base_model, results=results, name=repo_id,
                             license=license)
        return push_directory(tmp, repo_id, private=private, token=token, revision=revision,
                              commit_message=commit_message)
