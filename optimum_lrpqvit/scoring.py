"""LRP importance over many images: sharded over ``accelerate`` processes, checkpointed, resumable.

Global batch ``b`` holds images ``[b·B, (b+1)·B)`` of the dataset; process ``r`` of ``W`` scores the batches with
``b mod W = r`` (a streamed dataset is split with ``datasets.distributed.split_dataset_by_node`` instead, and a
resumed process reads past the batches it had done). Each process keeps float64 per-point sums of the per-image
contributions (``lrp.image_contributions``) and an image count, and every ``checkpoint_every`` of its batches
writes them to ``checkpoint_dir/rank{r}-of-{W}.safetensors`` (atomically). A run started again with the same
arguments resumes each process after its last checkpoint, so at most ``checkpoint_every`` batches are redone. At
the end the sums are all-reduced and normalised: I_l = Σ c_l / Σ_l' Σ c_l', the scores of ``compute_importance``
on the same images up to the order of float64 additions.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .architectures import find_family
from .data import images_to_pixel_values
from .digest import content_digest
from .files import atomic_write
from .lrp import check_targets, float32_model, image_contributions
from .scores import normalised, write_scores

__all__ = ["score_importance"]


def _checksum(sums: torch.Tensor, fingerprint: str, done: int, images: int) -> str:
    return hashlib.sha256(sums.numpy().tobytes() + f"|{fingerprint}|{done}|{images}".encode()).hexdigest()


def _load_checkpoint(path: Path, fingerprint: str, points: list[str],
                     images_after: Callable[[int], tuple[int, int]]) -> tuple[torch.Tensor, int, int] | None:
    """(sums, batches done, images) of a checkpoint of this job, or None if there is none; ValueError for one of
    another job or one whose content does not match its checksum. ``images_after(done)`` bounds the image count
    after ``done`` batches."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            sums = f.get_tensor("sums")
        done, images = int(meta["batches_done"]), int(meta["images"])
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise ValueError(f"Scoring checkpoint {path} is unreadable ({error}); delete it to start this "
                         "process's shard again.") from None
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(f"Scoring checkpoint {path} belongs to a different job (other model, data, batch size, "
                         "targets or number of processes). Use another --checkpoint-dir, or delete it to start over.")
    if sums.shape != (len(points),) or sums.dtype != torch.float64:
        raise ValueError(f"Scoring checkpoint {path} has {sums.shape} sums for {len(points)} points; delete it.")
    if meta.get("checksum") != _checksum(sums, fingerprint, done, images):
        raise ValueError(f"Scoring checkpoint {path} does not match its checksum: it was corrupted or edited. "
                         "Delete it to score this process's shard again.")
    low, high = images_after(done)
    if not (done >= 0 and low <= images <= high):
        raise ValueError(f"Scoring checkpoint {path} counts {images} images after {done} batches, which this job "
                         f"cannot have (expected {low}..{high}); delete it.")
    return sums, done, images


def _rows_digest(rows: Mapping[str, Any] | None) -> str:
    """SHA-256 of a batch's images and labels: part of a job's identity, so that a resumed job is known to read
    the data it started on (a stream's ``repr`` says nothing about its content)."""
    h = hashlib.sha256()
    for image in (rows or {}).get("image", []):
        if hasattr(image, "tobytes"):  # PIL images, numpy arrays
            h.update(f"{getattr(image, 'mode', '')}|{getattr(image, 'size', '')}|".encode())
            h.update(image.tobytes())
        elif isinstance(image, torch.Tensor):
            h.update(image.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(image).encode())
    h.update(repr((rows or {}).get("label")).encode())
    return h.hexdigest()


def _check_destinations(output: str | os.PathLike | None, checkpoint_dir: str | os.PathLike | None) -> None:
    """Before any image is scored: ``output`` must be a file path in an existing directory, ``checkpoint_dir`` a
    directory (or not exist yet)."""
    if output is not None:
        output = Path(output)
        if output.is_dir():
            raise IsADirectoryError(f"output {output} is a directory; give the path of the scores JSON to write.")
        if not output.parent.is_dir():
            raise FileNotFoundError(f"The directory of output {output} does not exist; create {output.parent} first "
                                    "(checked before scoring, so that no run is lost).")
    if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise NotADirectoryError(f"checkpoint_dir {checkpoint_dir} exists and is not a directory.")


def score_importance(
    model: nn.Module,
    dataset: Any,
    processor: Any,
    *,
    batch_size: int = 32,
    use_labels: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    output: str | os.PathLike | None = None,
    metadata: Mapping[str, Any] | None = None,
    accelerator: Any = None,
    progress: bool = True,
) -> dict[str, float]:
    """LRP importance ``{point: I_l}`` (summing to 1) of ``model`` over every image of ``dataset``.

    ``dataset``: a ``datasets.Dataset`` or ``IterableDataset`` with an ``image`` column (and ``label`` for
    ``use_labels``; otherwise each image's predicted class is explained), e.g. from
    ``data.load_image_dataset``; images go through ``processor``. Sharded over the processes of
    ``accelerator`` (default: a new ``accelerate.Accelerator``, one process unless launched with
    ``accelerate launch`` or ``torchrun``; gloo on machines without a GPU); the model is moved to its device.
    With ``checkpoint_dir``, partial sums are saved every ``checkpoint_every`` batches of each process and a
    restarted job resumes from them. ``output``: JSON written by the main process (``write_scores``) with
    ``metadata`` plus the counts of the run.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    for name, value in (("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    _check_destinations(output, checkpoint_dir)
    # without cpu=True accelerate ignores the launcher's processes on machines without a GPU
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    family = find_family(model)
    if use_labels and not family.is_classifier(model):
        raise ValueError(f"use_labels=True but {type(model).__name__} has no classifier: it is scored on its image "
                         "embedding, with no classes to target.")
    model = float32_model(model).eval().to(accelerator.device)
    points = family.layout(model).points()
    channels = family.input_shape(model)[0]
    iterable = not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__")
    if not iterable and len(dataset) == 0:
        raise ValueError("The importance dataset is empty.")
    if use_labels and "label" not in (dataset.column_names or []):
        raise ValueError(f"use_labels=True but the dataset has no 'label' column (columns: {dataset.column_names}).")

    if iterable:  # a stream: each process reads its own part (datasets.distributed), skipping what it did
        from datasets.distributed import split_dataset_by_node

        part = split_dataset_by_node(dataset, rank=rank, world_size=world) if world > 1 else dataset
        stream = part.iter(batch_size=batch_size)
        head = next(stream, None)
        batches = itertools.chain([] if head is None else [head], stream)
        total = None

        def images_after(done: int) -> tuple[int, int]:
            return done, done * batch_size
    else:
        n_batches = math.ceil(len(dataset) / batch_size)
        own = range(rank, n_batches, world)
        head = dataset[:batch_size]
        total = len(own)

        def images_after(done: int) -> tuple[int, int]:
            if done > len(own):
                return 1, 0  # no count fits
            exact = sum(min(batch_size, len(dataset) - b * batch_size) for b in own[:done])
            return exact, exact

    if head is not None and "image" not in head:
        raise ValueError(f"The importance dataset has no 'image' column (it has {sorted(head)}); rename the column "
                         "that holds the images: dataset.rename_column(name, 'image').")
    job = dict(model=content_digest(model.state_dict().values())[:16],
               data=[getattr(dataset, "_fingerprint", None) or repr(dataset),
                     None if iterable else len(dataset), _rows_digest(head)],
               batch_size=batch_size, use_labels=use_labels, processes=world, points=points,
               processor=repr(processor.to_dict() if hasattr(processor, "to_dict") else processor))
    fingerprint = hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()
    path = None
    sums, done, images = torch.zeros(len(points), dtype=torch.float64), 0, 0
    if checkpoint_dir is not None:
        path = Path(checkpoint_dir) / f"rank{rank}-of-{world}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = _load_checkpoint(path, fingerprint, points, images_after)
        if state is not None:
            sums, done, images = state
    resumed_at = done

    def save() -> None:
        meta = {"fingerprint": fingerprint, "batches_done": str(done), "images": str(images),
                "checksum": _checksum(sums, fingerprint, done, images)}
        atomic_write(path, lambda tmp: save_file({"sums": sums}, str(tmp), metadata=meta))

    if iterable:
        batches = itertools.islice(batches, done, None)
    else:
        batches = (dataset[b * batch_size:(b + 1) * batch_size] for b in own[done:])
    desc = f"scoring importance (resumed after {done} batches)" if done else "scoring importance"
    bar = tqdm(total=total, initial=done, desc=desc, unit="batch", disable=not (
        progress and accelerator.is_main_process))
    started = time.perf_counter()
    num_classes = None
    for rows in batches:
        pixels = images_to_pixel_values(rows["image"], processor, channels).to(accelerator.device)
        targets = None
        if use_labels:
            if num_classes is None:
                with torch.no_grad():
                    num_classes = family.logits(model, pixels[:1]).shape[-1]
            targets = check_targets(rows["label"], len(pixels), num_classes)
        contributions = image_contributions(model, pixels, targets)
        sums += torch.stack([contributions[point].double().sum() for point in points])
        done, images = done + 1, images + len(pixels)
        bar.update(1)
        if path is not None and done % checkpoint_every == 0:
            save()
    bar.close()
    if path is not None:
        save()

    totals = accelerator.reduce(torch.cat([sums, torch.tensor([images], dtype=torch.float64)]).to(
        accelerator.device), reduction="sum").cpu()
    sums, n_images = totals[:-1], int(totals[-1])
    if n_images == 0:
        raise ValueError("The importance dataset is empty.")
    scores = normalised(dict(zip(points, sums.tolist())))
    if output is not None and accelerator.is_main_process:
        write_scores(output, scores, {**(metadata or {}), "num_images": n_images, "batch_size": batch_size,
                                      "targets": "labels" if use_labels else "predicted", "processes": world,
                                      "resumed_at_batch": resumed_at, "model_digest": job["model"],
                                      "seconds": round(time.perf_counter() - started, 3)})
    accelerator.wait_for_everyone()
    return scores
