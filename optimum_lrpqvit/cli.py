"""``lrpqvit``: quantize, score, evaluate, push and export from the command line (also ``optimum-cli lrpqvit``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from transformers import AutoImageProcessor, AutoModelForImageClassification

from .config import LRPQConfig
from .data import load_image_dataset, preprocess
from .evaluation import fidelity, predict_logits
from .export import DEFAULT_OPSET, compare_with_onnxruntime, example_input_shape, export_onnx
from .hub import push_directory, save_quantized_model
from .jobs import load_float_model, quantize_from_dataset
from .quantize import applied_config
from .registry import ALLOCATION_RULES, IMPORTANCE_CRITERIA, POST_LN_TREATMENTS
from .scoring import score_importance
from .serialization import load_quantized

__all__ = ["LRPQVitOptimumCommand", "add_commands", "build_parser", "main"]

EXAMPLES = """examples:
  lrpqvit quantize reference_models/vit-fashion-mnist outputs/vit-w4a4 --dataset fashion_mnist \\
      --mixed-precision --num-importance-samples 256 --evaluate
  accelerate launch --multi_gpu --num_processes 8 -m optimum_lrpqvit.cli score google/vit-base-patch16-224 \\
      --dataset ILSVRC/imagenet-1k --num-samples 50000 --output scores.json --checkpoint-dir scores-ckpt
  lrpqvit quantize google/vit-base-patch16-224 vit-b-w4a4 --dataset ILSVRC/imagenet-1k \\
      --mixed-precision --importance scores.json
  lrpqvit evaluate outputs/vit-w4a4 --reference reference_models/vit-fashion-mnist --dataset fashion_mnist
  lrpqvit push outputs/vit-w4a4 my-user/vit-fashion-mnist-w4a4
  lrpqvit export outputs/vit-w4a4 vit-w4a4.onnx --verify 64
"""


def _data_args(parser: argparse.ArgumentParser, split: str, samples_help: str) -> None:
    parser.add_argument("--dataset", default="fashion_mnist",
                        help="Hub dataset id, local image folder / save_to_disk directory, or 'fashion_mnist' "
                             "(the bundled Debian package; default)")
    parser.add_argument("--split", default=split, help=f"dataset split (default {split})")
    parser.add_argument("--image-column", default=None, help="image column (default: the first Image column)")
    parser.add_argument("--num-samples", type=int, default=None, help=samples_help)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Add the subcommands to ``parser`` (each sets ``args.run``)."""
    sub = parser.add_subparsers(title="commands", metavar="{quantize,score,evaluate,push,export}")

    q = sub.add_parser("quantize", help="quantize a model and save it packed with its bit plan and model card",
                       description="Load a float model (Hub id or directory), calibrate on a seeded sample of a "
                                   "dataset, quantize it and save it packed, with its processor, a model card, "
                                   "importance.png (mixed precision) and, with --evaluate, results.json.")
    q.add_argument("model", help="float model: Hub id or local directory (transformers or timm format)")
    q.add_argument("output_dir", help="where to write the quantized model")
    q.add_argument("--w-bits", type=int, default=4, help="weight bits, 2-8 (default 4)")
    q.add_argument("--a-bits", type=int, default=4, help="activation bits, 2-8 (default 4)")
    q.add_argument("--post-ln", default="crl", choices=POST_LN_TREATMENTS.names(),
                   help="post-LayerNorm activation quantization (default crl)")
    q.add_argument("--crl-k", type=float, default=2.0, help="CRL clipping band in standard deviations (default 2)")
    q.add_argument("--mixed-precision", action="store_true", help="allocate bits per layer by importance")
    q.add_argument("--allocation", default="paper", choices=ALLOCATION_RULES.names(), help="bit allocation rule")
    q.add_argument("--importance", default="lrp",
                   help=f"{', '.join(IMPORTANCE_CRITERIA.names())}, or a scores JSON written by `lrpqvit score` "
                        "(default lrp)")
    q.add_argument("--dataset", default="fashion_mnist", help="calibration data (see `score --help`)")
    q.add_argument("--split", default="train", help="calibration split (default train)")
    q.add_argument("--num-calibration-samples", type=int, default=32, help="calibration images (default 32)")
    q.add_argument("--num-importance-samples", type=int, default=None,
                   help="images scored for LRP importance (default: the calibration images)")
    q.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    q.add_argument("--evaluate", action="store_true",
                   help="evaluate full precision and quantized on --eval-split and put the results in the card")
    q.add_argument("--eval-split", default="test", help="evaluation split of --dataset (default test)")
    q.add_argument("--num-eval-samples", type=int, default=None, help="evaluation images (default: all)")
    q.add_argument("--base-model", default=None,
                   help="Hub id of the float model for the card (default: MODEL when it is not a local path)")
    q.set_defaults(run=quantize_command)

    s = sub.add_parser("score", help="score LRP layer importance (sharded with accelerate, resumable)",
                       description="Score LRP importance of every quantized layer over a seeded sample of a "
                                   "dataset. Run under `accelerate launch --multi_gpu` (GPUs) or `torchrun "
                                   "--nproc_per_node N` (CPU) to shard over processes.")
    s.add_argument("model", help="float model: Hub id or local directory")
    _data_args(s, "train", "images to score (default: the whole split)")
    s.add_argument("--use-labels", action="store_true", help="explain the label instead of the predicted class")
    s.add_argument("--output", required=True, help="scores JSON, accepted by `quantize --importance`")
    s.add_argument("--checkpoint-dir", default=None, help="resume from / save partial sums here")
    s.add_argument("--checkpoint-every", type=int, default=10, help="batches between checkpoints (default 10)")
    s.set_defaults(run=score_command)

    e = sub.add_parser("evaluate", help="top-1 accuracy, and agreement and KL against a reference model",
                       description="Evaluate a (quantized or float) model on a dataset split; with --reference, "
                                   "also top-1 agreement with it and KL(reference ‖ model).")
    e.add_argument("model", help="model to evaluate: Hub id or local directory")
    e.add_argument("--reference", default=None, help="full-precision model to compare with")
    _data_args(e, "test", "images to evaluate (default: the whole split)")
    e.add_argument("--output", default=None, help="also write the results as JSON")
    e.set_defaults(run=evaluate_command)

    p = sub.add_parser("push", help="upload a quantized model directory to the Hub",
                       description="Create the repository if needed and upload the directory written by "
                                   "`lrpqvit quantize` (weights, config with bit plan, processor, model card).")
    p.add_argument("model_dir", help="directory written by `lrpqvit quantize`")
    p.add_argument("repo_id", help="target repository, e.g. my-user/vit-w4a4")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to push to (default: main)")
    p.add_argument("--token", default=None, help="Hub token (default: the saved login)")
    p.set_defaults(run=push_command)

    x = sub.add_parser("export", help="export a quantized model to ONNX (QDQ graph with the integer codes)",
                       description="Load a quantized model directory (or Hub id) and write it as an ONNX graph of "
                                   "QuantizeLinear/DequantizeLinear pairs that integer kernels (onnxruntime) run. "
                                   'Needs `pip install "optimum-lrpqvit[onnx]"`.')
    x.add_argument("model", help="quantized model: directory written by `lrpqvit quantize`, or a Hub id")
    x.add_argument("output", help="the .onnx file to write (its directory must exist)")
    x.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    x.add_argument("--verify", type=int, default=0, metavar="N",
                   help="run the export with onnxruntime on N random inputs and print the largest logit difference "
                        "and the top-1 agreement with the PyTorch model (default 0: no check)")
    x.set_defaults(run=export_command)


def _load_dataset(args: argparse.Namespace, split: str, num_samples: int | None):
    return load_image_dataset(args.dataset, split, num_samples=num_samples, seed=args.seed,
                              image_column=getattr(args, "image_column", None))


def _print_table(rows: list[tuple[str, dict]], title: str) -> None:
    print(title)
    print("| model | top-1 (%) | agreement with FP (%) | KL(FP ‖ q) |")
    print("|---|---|---|---|")
    for label, r in rows:
        agreement = f"{r['agreement']:.2f}" if "agreement" in r else "100.00"
        kl = f"{r['kl']:.4f}" if "kl" in r else "0"
        print(f"| {label} | {r['top1']:.2f} | {agreement} | {kl} |")


def quantize_command(args: argparse.Namespace) -> int:
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise NotADirectoryError(f"output_dir {args.output_dir} exists and is not a directory; give a new or existing "
                                 "directory (checked before quantizing).")
    criterion = args.importance if args.importance in IMPORTANCE_CRITERIA else "lrp"
    scores = None if criterion == args.importance else args.importance
    config = LRPQConfig(w_bits=args.w_bits, a_bits=args.a_bits, post_ln=args.post_ln, crl_k=args.crl_k,
                        mixed_precision=args.mixed_precision or scores is not None, allocation=args.allocation,
                        importance=criterion, importance_scores=scores, seed=args.seed, dataset=args.dataset,
                        dataset_split=args.split, num_calibration_samples=args.num_calibration_samples,
                        num_importance_samples=args.num_importance_samples)
    model, processor = load_float_model(args.model)
    if args.evaluate:
        test = _load_dataset(args, args.eval_split, args.num_eval_samples)
        pixels, labels = preprocess(test, processor)
        fp_logits = predict_logits(model, pixels, desc="full precision")
    started = time.perf_counter()
    quantize_from_dataset(model, config, processor)
    seconds = time.perf_counter() - started
    applied = applied_config(model)
    results = None
    if args.evaluate:
        q_logits = predict_logits(model, pixels, desc="quantized")
        results = {"dataset": args.dataset, "split": args.eval_split, "num_images": len(labels),
                   "full_precision": fidelity(fp_logits, labels), "quantized": fidelity(q_logits, labels, fp_logits)}
        label = f"W{args.w_bits}/A{args.a_bits} {args.post_ln}" + (
            f" {applied.importance} mixed ({applied.allocation})" if applied.mixed_precision else "")
        _print_table([("full precision", results["full_precision"]), (label, results["quantized"])],
                     f"{Path(args.model).name} on {len(labels)} {args.dataset} {args.eval_split} images, "
                     f"{args.num_calibration_samples} calibration images"
                     + (f", {args.num_importance_samples} importance images" if args.num_importance_samples else "")
                     + f" (seed {args.seed}); quantization took {seconds:.1f} s")
    base = args.base_model or (None if Path(args.model).exists() else args.model)
    save_quantized_model(model, args.output_dir, processor, base_model=base, results=results)
    summary = applied.bit_plan_summary
    print(f"bit plan: avg weight bits {summary['avg_w_bits']}, avg activation bits {summary['avg_a_bits']}, "
          f"{summary['size_mb']} MB\nquantized model written to {args.output_dir}")
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
          + ", ".join(f"{k} {v:.4f}" for k, v in top))
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    model = AutoModelForImageClassification.from_pretrained(args.model, use_safetensors=True).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    pixels, labels = preprocess(_load_dataset(args, args.split, args.num_samples), processor)
    if labels is None:
        raise SystemExit(f"error: {args.dataset} ({args.split}) has no label column to evaluate against.")
    logits = predict_logits(model, pixels, batch_size=args.batch_size, desc=Path(args.model).name)
    rows, results = [], {"model": args.model, "dataset": args.dataset, "split": args.split, "num_images": len(labels)}
    if args.reference is not None:
        reference = AutoModelForImageClassification.from_pretrained(args.reference, use_safetensors=True).eval()
        ref_logits = predict_logits(reference, pixels, batch_size=args.batch_size, desc=Path(args.reference).name)
        results["reference"] = {"model": args.reference, **fidelity(ref_logits, labels)}
        rows.append((f"{args.reference} (reference)", results["reference"]))
        results["model_results"] = fidelity(logits, labels, ref_logits)
    else:
        results["model_results"] = fidelity(logits, labels)
    rows.append((args.model, results["model_results"]))
    _print_table(rows, f"{len(labels)} {args.dataset} {args.split} images")
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
    path = export_onnx(model, args.output, opset=args.opset)
    print(f"ONNX graph written to {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if args.verify:
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(args.verify, *example_input_shape(model)[1:], generator=generator)
        check = compare_with_onnxruntime(model, path, pixels)
        print(f"onnxruntime vs PyTorch on {args.verify} random inputs: largest logit difference "
              f"{check['max_abs_logit_diff']:.3g}, top-1 agreement {check['top1_agreement']:.2f} %")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrpqvit", description="LRP-QViT post-training quantization of vision transformers.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_commands(parser)
    return parser


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return _run(parser, parser.parse_args(argv))


class LRPQVitOptimumCommand(BaseOptimumCLICommand):
    """`optimum-cli lrpqvit ...` (registered by optimum/commands/register/lrpqvit.py)."""

    COMMAND = CommandInfo(name="lrpqvit",
                          help="LRP-QViT post-training quantization (quantize, score, evaluate, push, export)")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.epilog = EXAMPLES.replace("lrpqvit ", "optimum-cli lrpqvit ")
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        add_commands(parser)

    def run(self) -> None:
        code = _run(self.parser, self.args)
        if code:
            raise SystemExit(code)


if __name__ == "__main__":
    raise SystemExit(main())
