"""The commands of ``lrpqvit`` (also ``optimum-cli lrpqvit``): quantize, score, evaluate, push and export.

The parser and the checks that need no model live in the top-level module ``optimum_lrpqvit_cli`` (the console
script), which imports this module only once the arguments are known to be usable; ``main`` here is the same
command line for ``python -m optimum_lrpqvit.cli`` (e.g. under ``accelerate launch``), with the strategy names
of this process's registries.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from huggingface_hub import ModelCard

import optimum_lrpqvit_cli as launcher

from .architectures import find_family, transformers_class
from .config import LRPQConfig
from .data import load_coco_split, load_image_dataset, load_image_processor, preprocess
from .dense_evaluation import evaluate_dense
from .evaluation import embedding_fidelity, fidelity, predict_logits
from .export import compare_with_onnxruntime, example_input_shape, export_onnx
from .hub import push_directory, save_quantized_model
from .jobs import load_float_model, quantize_from_dataset
from .quantize import applied_config
from .registry import (
    ALLOCATION_RULES,
    GELU_QUANTIZERS,
    IMPORTANCE_CRITERIA,
    POST_LN_TREATMENTS,
    SOFTMAX_QUANTIZERS,
    WEIGHT_ROUNDINGS,
)
from .scoring import score_importance
from .serialization import load_quantized

__all__ = ["build_parser", "main", "run_command"]


def build_parser() -> argparse.ArgumentParser:
    """The ``lrpqvit`` parser with the strategies registered in this process."""
    return launcher.build_parser(post_ln=POST_LN_TREATMENTS.names(), allocation=ALLOCATION_RULES.names(),
                                 importance=IMPORTANCE_CRITERIA.names(), softmax_quantizer=SOFTMAX_QUANTIZERS.names(),
                                 gelu_quantizer=GELU_QUANTIZERS.names(), weight_rounding=WEIGHT_ROUNDINGS.names())


def _load_dataset(args: argparse.Namespace, split: str, num_samples: int | None):
    return load_image_dataset(args.dataset, split, num_samples=num_samples, seed=args.seed,
                              image_column=getattr(args, "image_column", None))


def _print_table(rows: list[tuple[str, dict]], title: str) -> None:
    print(title)
    first = rows[0][1]
    if "miou" in first:
        print("| model | mIoU (%) |\n|---|---|")
        for label, r in rows:
            print(f"| {label} | {r['miou']:.2f} |")
        return
    if "box" in first:
        kinds = [k for k in ("box", "mask") if k in first]
        print("| model | " + " | ".join(f"{k} AP | {k} AP50 | {k} AP75" for k in kinds) + " |")
        print("|---|" + "---|" * 3 * len(kinds))
        for label, r in rows:
            print(f"| {label} | " + " | ".join(f"{r[k]['AP']:.1f} | {r[k]['AP50']:.1f} | {r[k]['AP75']:.1f}"
                                               for k in kinds) + " |")
        return
    if "knn_top1" in first:
        print("| model | k-NN top-1 (%) | cosine to FP (mean) | cosine to FP (min) |")
        print("|---|---|---|---|")
        for label, r in rows:
            print(f"| {label} | {r['knn_top1']:.2f} | {r.get('cosine', 1.0):.4f} | {r.get('cosine_min', 1.0):.4f} |")
        return
    print("| model | top-1 (%) | agreement with FP (%) | KL(FP ‖ q) |")
    print("|---|---|---|---|")
    for label, r in rows:
        agreement = f"{r['agreement']:.2f}" if "agreement" in r else "100.00"
        kl = f"{r['kl']:.4f}" if "kl" in r else "0"
        print(f"| {label} | {r['top1']:.2f} | {agreement} | {kl} |")


def _index_images(args: argparse.Namespace, model, processor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The labelled images whose embeddings a k-NN classifier votes with, for a model without a classifier; None
    for a classifier."""
    if find_family(model).is_classifier(model):
        return None
    pixels, labels = preprocess(_load_dataset(args, args.knn_split, args.knn_samples), processor)
    if labels is None:
        raise SystemExit(f"error: {args.dataset} ({args.knn_split}) has no label column for the k-NN index.")
    return pixels, labels


class _Evaluation:
    """A command's evaluation images and the measure of a model on them: top-1 with agreement and KL against the
    first model measured (classifiers), k-NN top-1 and cosine to the first (encoders), or the COCO metrics of
    ``dense_evaluation`` (dense models, on a COCO directory's split)."""

    def __init__(self, args: argparse.Namespace, model, processor, split: str, num_samples: int | None) -> None:
        self.args, self.processor, self.split, self.reference = args, processor, split, None
        self.dense = find_family(model).backbone(model) is not None
        if self.dense:
            self.coco = load_coco_split(args.dataset, split, num_samples=num_samples, seed=args.seed)
            self.ids = self.coco.image_ids
            if num_samples is not None and num_samples < len(self.ids):  # a COCO directory: all of its images
                self.ids = sorted(random.Random(args.seed).sample(self.ids, num_samples))
            self.num_images, self.index = len(self.ids), None
            return
        self.pixels, self.labels = preprocess(_load_dataset(args, split, num_samples), processor)
        if self.labels is None:
            raise SystemExit(f"error: {args.dataset} ({split}) has no label column to evaluate against.")
        self.num_images, self.index = len(self.labels), _index_images(args, model, processor)

    def __call__(self, model, desc: str) -> dict:
        if self.dense:
            metrics = evaluate_dense(model, self.processor, self.coco, self.ids, self.args.batch_size, desc)
            return {k: v for k, v in metrics.items() if k != "num_images"}
        outputs = predict_logits(model, self.pixels, batch_size=self.args.batch_size, desc=desc)
        if self.index is None:
            results = fidelity(outputs, self.labels, self.reference)
        else:
            index = predict_logits(model, self.index[0], batch_size=self.args.batch_size, desc=f"{desc} (k-NN index)")
            results = embedding_fidelity(outputs, self.labels, (index, self.index[1]), self.reference)
        if self.reference is None:
            self.reference = outputs
        return results

    def title(self) -> str:
        title = f"{self.num_images} {self.args.dataset} {self.split} images"
        return title + ("" if self.index is None else f", k-NN (k=20) over {len(self.index[1])} "
                        f"{self.args.knn_split} images")


def _hub_id(name: object) -> str | None:
    """``name`` if it reads as a Hub model id (``owner/name``, not a local path), else None."""
    if not isinstance(name, str) or name.count("/") != 1 or Path(name).exists() or name.startswith((".", "/", "~")):
        return None
    return name


def _card_license(model: str) -> str | None:
    """The license in the model card (README.md) of the float model, local or on the Hub, if it has one."""
    try:
        card = ModelCard.load(Path(model) / "README.md" if Path(model).is_dir() else model)
    except Exception:  # no card, or no network: the card then says the license was not recorded
        return None
    return card.data.license if isinstance(card.data.license, str) else None


def _clear_earlier_run(directory: Path) -> None:
    """Remove ``directory`` if it holds an earlier lrpqvit output (--overwrite); refuse anything else."""
    config = directory / "config.json"
    try:
        ours = json.loads(config.read_text()).get("quantization_config", {}).get("quant_method") == "lrpqvit"
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(f"--overwrite: {directory} does not hold a model written by lrpqvit (no lrpqvit "
                         "config.json), so it is not removed; give a new or empty directory.")
    shutil.rmtree(directory)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quantize_command(args: argparse.Namespace) -> int:
    if args.checkpoint_dir is not None and args.reconstruction is None:
        raise ValueError("--checkpoint-dir resumes a block reconstruction: add --reconstruction block, or leave "
                         "--checkpoint-dir out.")
    criterion = args.importance if args.importance in IMPORTANCE_CRITERIA else "lrp"
    scores = None if criterion == args.importance else args.importance
    options = {} if args.candidate_bits is None else {"candidate_bits": args.candidate_bits}
    config = LRPQConfig(w_bits=args.w_bits, a_bits=args.a_bits, post_ln=args.post_ln, crl_k=args.crl_k,
                        softmax_quantizer=args.softmax_quantizer, gelu_quantizer=args.gelu_quantizer,
                        weight_rounding=args.weight_rounding, center_keys=args.center_keys,
                        compensate_activations=args.compensate_activations,
                        quantize_head=args.quantize_head,
                        reconstruction=args.reconstruction, reconstruction_samples=args.reconstruction_samples,
                        reconstruction_iters=args.reconstruction_iters,
                        reconstruction_seconds=args.reconstruction_seconds,
                        mixed_precision=args.mixed_precision or scores is not None, allocation=args.allocation,
                        importance=criterion, importance_scores=scores, seed=args.seed, dataset=args.dataset,
                        dataset_split=args.split, num_calibration_samples=args.num_calibration_samples,
                        num_importance_samples=args.num_importance_samples, **options)
    output = Path(args.output_dir)
    _progress(f"loading {args.model}")
    model, processor = load_float_model(args.model)
    if args.evaluate:  # before quantizing (in place): the full-precision outputs
        evaluation = _Evaluation(args, model, processor, args.eval_split, args.num_eval_samples)
        fp_results = evaluation(model, "full precision")
    what = (f"LRP importance on {args.num_importance_samples or args.num_calibration_samples} images, then "
            if config.measures_importance else "")
    if args.reconstruction:
        what += f"block reconstruction on {args.reconstruction_samples} images after "
    _progress(f"quantizing: {what}calibration on {args.num_calibration_samples} {args.dataset} images")
    started = time.perf_counter()
    quantize_from_dataset(model, config, processor, checkpoint_dir=args.checkpoint_dir)
    seconds = time.perf_counter() - started
    applied = applied_config(model)
    base = args.base_model or _hub_id(args.model) or _hub_id(getattr(model.config, "_name_or_path", None))
    if args.overwrite and output.is_dir() and any(output.iterdir()):
        _clear_earlier_run(output)
    license = args.license or _card_license(args.model)
    save_quantized_model(model, output, processor, base_model=base, license=license)  # before evaluating: kept
    summary = applied.bit_plan_summary
    print(f"bit plan: avg weight bits {summary['avg_w_bits']}, avg activation bits {summary['avg_a_bits']}, "
          f"{summary['size_mb']} MB; quantization took {seconds:.1f} s\nquantized model written to {output}")
    if args.evaluate:
        q_results = evaluation(model, "quantized")
        results = {"dataset": args.dataset, "split": args.eval_split, "num_images": evaluation.num_images,
                   "full_precision": fp_results, "quantized": q_results}
        label = " ".join([f"W{args.w_bits}/A{args.a_bits} {args.post_ln}",
                          *([args.softmax_quantizer] if args.softmax_quantizer != "log_sqrt2" else []),
                          *([f"gelu {args.gelu_quantizer}"] if args.gelu_quantizer != "uniform" else []),
                          *([args.weight_rounding] if args.weight_rounding != "nearest" else []),
                          *(["keys centred"] if args.center_keys else []),
                          *(["activations compensated"] if args.compensate_activations else []),
                          *([f"{args.reconstruction} reconstruction"] if args.reconstruction else []),
                          *(["head quantized"] if args.quantize_head else []),
                          *([f"{applied.importance} mixed ({applied.allocation})"] if applied.mixed_precision else [])])
        _print_table([("full precision", results["full_precision"]), (label, results["quantized"])],
                     f"{Path(args.model).name} on {evaluation.title()}, "
                     f"{args.num_calibration_samples} calibration images"
                     + (f", {args.num_importance_samples} importance images" if args.num_importance_samples else "")
                     + f" (seed {args.seed})")
        save_quantized_model(model, output, processor, base_model=base, results=results, license=license)
        print(f"results and model card written to {output}")
    if base is None:
        print("note: the model card names no base model (MODEL is a local directory whose config.json records "
              "no Hub id); pass --base-model OWNER/NAME to link it.", file=sys.stderr)
    return 0


def score_command(args: argparse.Namespace) -> int:
    model, processor = load_float_model(args.model)
    dataset = _load_dataset(args, args.split, args.num_samples)
    metadata = {"model": args.model, "dataset": args.dataset, "split": args.split, "num_samples": args.num_samples,
                "seed": args.seed}
    scores = score_importance(model, dataset, processor, batch_size=args.batch_size, use_labels=args.use_labels,
                              checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                              output=args.output, metadata=metadata)
    top = sorted(scores.items(), key=lambda kv: -kv[1])[:5]
    print(f"scores of {len(scores)} points written to {args.output}; most important: "
          + ", ".join(f"{k} {v:.3g}" for k, v in top))
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    model = transformers_class(args.model).from_pretrained(args.model, use_safetensors=True).eval()
    processor = load_image_processor(args.model)
    evaluation = _Evaluation(args, model, processor, args.split, args.num_samples)
    rows, results = [], {"model": args.model, "dataset": args.dataset, "split": args.split,
                         "num_images": evaluation.num_images}
    if args.reference is not None:
        reference = transformers_class(args.reference).from_pretrained(args.reference, use_safetensors=True).eval()
        results["reference"] = {"model": args.reference, **evaluation(reference, Path(args.reference).name)}
        rows.append((f"{args.reference} (reference)", results["reference"]))
    results["model_results"] = evaluation(model, Path(args.model).name)
    rows.append((args.model, results["model_results"]))
    _print_table(rows, evaluation.title())
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def push_command(args: argparse.Namespace) -> int:
    url = push_directory(args.model_dir, args.repo_id, private=args.private, revision=args.revision,
                         token=args.token)
    print(f"pushed {args.model_dir} to {url}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    model = load_quantized(args.model)
    path = export_onnx(model, args.output, opset=args.opset, weight_codes=args.weight_codes)
    print(f"ONNX graph written to {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if args.verify:
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(args.verify, *example_input_shape(model)[1:], generator=generator)
        check = compare_with_onnxruntime(model, path, pixels)
        print(f"onnxruntime vs PyTorch on {args.verify} random inputs: largest logit difference "
              f"{check['max_abs_logit_diff']:.3g}, top-1 agreement {check['top1_agreement']:.2f} %")
    return 0


COMMANDS = {"quantize": quantize_command, "score": score_command, "evaluate": evaluate_command,
            "push": push_command, "export": export_command}
# Python names in the library's messages → the flags a command-line user typed
_FLAGS = {"w_bits": "--w-bits", "a_bits": "--a-bits", "post_ln": "--post-ln", "crl_k": "--crl-k",
          "softmax_quantizer": "--softmax-quantizer", "gelu_quantizer": "--gelu-quantizer",
          "weight_rounding": "--weight-rounding", "center_keys": "--center-keys",
          "compensate_activations": "--compensate-activations",
          "reconstruction_samples": "--reconstruction-samples",
          "reconstruction_iters": "--reconstruction-iters", "reconstruction_seconds": "--reconstruction-seconds",
          "reconstruction": "--reconstruction",
          "candidate_bits": "--candidate-bits", "num_importance_samples": "--num-importance-samples",
          "num_calibration_samples": "--num-calibration-samples", "importance_scores": "--importance",
          "dataset_split": "--split", "split=": "--split ", "batch_size": "--batch-size",
          "checkpoint_every": "--checkpoint-every", "checkpoint_dir": "--checkpoint-dir",
          "image_column": "--image-column", "output_dir": "OUTPUT_DIR"}
_HUB_CLIENTS = ("httpx", "httpcore", "requests", "urllib3", "huggingface_hub")


def _with_flags(message: str) -> str:
    for name, flag in _FLAGS.items():
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w])", flag, message)
    return message


def run_command(args: argparse.Namespace) -> int:
    """Run the command ``args.command``; errors caused by the input are printed as one line (exit status 1)."""
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {_with_flags(str(error))}", file=sys.stderr)
    except Exception as error:
        if type(error).__module__.split(".")[0] not in _HUB_CLIENTS:
            raise
        print(f"error: the Hub could not be reached or refused the request ({type(error).__name__}: {error}); "
              "check the network, HF_ENDPOINT and the token.", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """``lrpqvit ARGS`` in this process (``python -m optimum_lrpqvit.cli``): the console script's command line,
    with the strategies registered here."""
    return launcher.main(argv, parser=build_parser())


if __name__ == "__main__":
    raise SystemExit(main())
