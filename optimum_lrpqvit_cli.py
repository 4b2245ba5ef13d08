"""The ``lrpqvit`` command line (also ``optimum-cli lrpqvit``): its parser and the checks that need no model.

This module imports neither torch nor transformers nor ``optimum_lrpqvit`` (whose import registers the
transformers integration, and so loads both): ``--help``, a mistyped flag value, a local path that does not exist
or a misspelled dataset name are answered in well under a second. Only then are the commands
(``optimum_lrpqvit.cli``) imported and run.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import socket
import sys
import urllib.parse

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

__all__ = ["ALLOCATION_RULES", "IMPORTANCE_CRITERIA", "LRPQVitOptimumCommand", "POST_LN_TREATMENTS",
           "GELU_QUANTIZERS", "SOFTMAX_QUANTIZERS", "UsageError", "WEIGHT_ROUNDINGS",
           "add_commands", "build_parser", "check_arguments", "main", "run"]

# the names registered by optimum_lrpqvit (tests/test_cli.py checks that they are the same); commands run in a
# Python process that registered more pass those to build_parser
POST_LN_TREATMENTS = ("crl", "repq", "channelwise", "layerwise")
ALLOCATION_RULES = ("paper", "budget")
SOFTMAX_QUANTIZERS = ("log_sqrt2", "adalog")
GELU_QUANTIZERS = ("uniform", "adalog")
WEIGHT_ROUNDINGS = ("nearest", "gptq")
IMPORTANCE_CRITERIA = ("lrp", "lrp_per_role", "fisher", "random", "uniform")
WEIGHT_CODES = ("auto", "int8", "uint8")
DEFAULT_OPSET, MIN_OPSET, MAX_OPSET = 17, 13, 20
BUNDLED_DATASET = "fashion_mnist"

EXAMPLES = """examples:
  lrpqvit quantize reference_models/vit-fashion-mnist outputs/vit-fashion-mnist-w4a4 \\
      --mixed-precision --num-importance-samples 256 --evaluate
  lrpqvit evaluate outputs/vit-fashion-mnist-w4a4 --reference reference_models/vit-fashion-mnist
  lrpqvit export outputs/vit-fashion-mnist-w4a4 outputs/vit-w4a4.onnx --verify 64
  lrpqvit push outputs/vit-fashion-mnist-w4a4 my-user/vit-fashion-mnist-w4a4
  lrpqvit score google/vit-base-patch16-224 --dataset ILSVRC/imagenet-1k --num-samples 50000 \\
      --output outputs/scores.json --checkpoint-dir outputs/scores-ckpt
      (sharded: accelerate launch --multi_gpu --num_processes 8 -m optimum_lrpqvit.cli score ...)
  lrpqvit quantize google/vit-base-patch16-224 outputs/vit-b-w4a4 --dataset ILSVRC/imagenet-1k \\
      --mixed-precision --importance outputs/scores.json
"""


class UsageError(ValueError):
    """A command-line argument that cannot work, found before anything is loaded."""


def _int_in(low: int, high: int | None, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer ({what})") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is not {bound} ({what})")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a positive finite number")
    return value


BITS = _int_in(2, 8, "bits are 2 to 8")
POSITIVE = _int_in(1, None, "a positive integer")
SEED = _int_in(0, None, "a non-negative integer")


def _data_args(parser: argparse.ArgumentParser, split: str, samples_help: str | None, batch_help: str) -> None:
    parser.add_argument("--dataset", default=BUNDLED_DATASET,
                        help="Hub dataset id, local image folder / save_to_disk directory, or 'fashion_mnist' "
                             "(the bundled Debian package) (default: %(default)s)")
    parser.add_argument("--split", default=split, help="dataset split (default: %(default)s)")
    parser.add_argument("--image-column", default=None, help="image column (default: the first Image column)")
    if samples_help is not None:
        parser.add_argument("--num-samples", type=POSITIVE, default=None, help=samples_help)
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the random samples (default: %(default)s)")
    parser.add_argument("--batch-size", type=POSITIVE, default=32, help=batch_help)


def _knn_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--knn-split", default="train",
                        help="for models without a classifier: split of --dataset whose embeddings the k-NN "
                             "classifier votes with (default: %(default)s)")
    parser.add_argument("--knn-samples", type=POSITIVE, default=1000,
                        help="for models without a classifier: labelled k-NN index images (default: %(default)s)")


def add_commands(parser: argparse.ArgumentParser, post_ln: tuple[str, ...] = POST_LN_TREATMENTS,
                 allocation: tuple[str, ...] = ALLOCATION_RULES,
                 importance: tuple[str, ...] = IMPORTANCE_CRITERIA,
                 softmax_quantizer: tuple[str, ...] = SOFTMAX_QUANTIZERS,
                 gelu_quantizer: tuple[str, ...] = GELU_QUANTIZERS,
                 weight_rounding: tuple[str, ...] = WEIGHT_ROUNDINGS) -> None:
    """Add the subcommands to ``parser`` (``args.command`` names the one chosen); the strategy names default to
    those optimum-lrpqvit registers."""
    sub = parser.add_subparsers(title="commands", dest="command", metavar="{quantize,score,evaluate,push,export}")

    q = sub.add_parser("quantize", help="quantize a model and save it packed with its bit plan and model card",
                       description="Load a float model (Hub id or directory), calibrate on a seeded sample of a "
                                   "dataset, quantize it and save it packed, with its processor, a model card, "
                                   "importance.png (mixed precision) and, with --evaluate, results.json.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("model", help="float model: Hub id or local directory (transformers or timm format)")
    q.add_argument("output_dir", help="where to write the quantized model (a new or empty directory, or --overwrite)")
    q.add_argument("--w-bits", type=BITS, default=4, help="weight bits, 2-8 (default: %(default)s)")
    q.add_argument("--a-bits", type=BITS, default=4, help="activation bits, 2-8 (default: %(default)s)")
    q.add_argument("--post-ln", default="crl", choices=post_ln,
                   help="post-LayerNorm activation quantization (default: %(default)s)")
    q.add_argument("--crl-k", type=_positive_float, default=2.0,
                   help="CRL clipping band in standard deviations (default: %(default)s)")
    q.add_argument("--softmax-quantizer", default="log_sqrt2", choices=softmax_quantizer,
                   help="attention-probability quantizer: log_sqrt2, or adalog (base searched per layer; better at "
                        "6-8 bits) (default: %(default)s)")
    q.add_argument("--gelu-quantizer", default="uniform", choices=gelu_quantizer,
                   help="quantizer of the post-GELU activations (fc2 inputs): uniform, or adalog (shifted log grid; "
                        "ONNX then runs fc2 in float) (default: %(default)s)")
    q.add_argument("--weight-rounding", default="nearest", choices=weight_rounding,
                   help="weight rounding: nearest, or gptq (error-compensating, one more calibration pass) "
                        "(default: %(default)s)")
    q.add_argument("--center-keys", action="store_true",
                   help="shift each key channel by its calibration midpoint, folded into the key bias (softmax "
                        "unchanged; one more calibration pass) (default: off)")
    q.add_argument("--compensate-activations", action="store_true",
                   help="before rounding, re-solve each Linear's weight and bias so that it reproduces the float "
                        "output from its quantized input (two more calibration passes) (default: off)")
    q.add_argument("--reconstruction", default=None, choices=["block"],
                   help="block: after calibration, tune each block's weight rounding and activation step sizes to "
                        "the float block's output (AdaRound + QDrop; minutes to hours) (default: calibration only)")
    q.add_argument("--reconstruction-samples", type=POSITIVE, default=1024,
                   help="images drawn for --reconstruction, after the calibration images (default: %(default)s)")
    q.add_argument("--reconstruction-iters", type=POSITIVE, default=500,
                   help="Adam steps per block of --reconstruction (default: %(default)s)")
    q.add_argument("--reconstruction-seconds", type=_positive_float, default=None,
                   help="time budget of --reconstruction in seconds; blocks run fewer steps to fit (default: none)")
    q.add_argument("--checkpoint-dir", default=None,
                   help="with --reconstruction: save each finished block here and resume from it when run again")
    q.add_argument("--quantize-head", action="store_true",
                   help="dense models: also quantize the head's Linear layers (default: the backbone only)")
    q.add_argument("--mixed-precision", action="store_true", help="allocate bits per layer by importance")
    q.add_argument("--allocation", default="paper", choices=allocation,
                   help="bit allocation rule of mixed precision (default: %(default)s)")
    q.add_argument("--candidate-bits", type=BITS, nargs="+", default=None, metavar="BITS",
                   help="weight bits the budget rule may choose (default: 2 3 4 5 6 8)")
    q.add_argument("--importance", default="lrp",
                   help=f"{', '.join(importance)}, or a scores JSON written by `lrpqvit score` (default: %(default)s)")
    _data_args(q, "train", None, "images per batch of the evaluation (default: %(default)s)")
    q.add_argument("--num-calibration-samples", type=POSITIVE, default=32,
                   help="calibration images (default: %(default)s)")
    q.add_argument("--num-importance-samples", type=POSITIVE, default=None,
                   help="images scored for LRP importance (default: the calibration images)")
    q.add_argument("--evaluate", action="store_true",
                   help="evaluate full precision and quantized on --eval-split and put the results in the card")
    q.add_argument("--eval-split", default="test", help="evaluation split of --dataset (default: %(default)s)")
    q.add_argument("--num-eval-samples", type=POSITIVE, default=None, help="evaluation images (default: all)")
    _knn_args(q)
    q.add_argument("--base-model", default=None,
                   help="Hub id of the float model for the card (default: MODEL when it is a Hub id, else the Hub "
                        "id recorded in its config.json, if any)")
    q.add_argument("--license", default=None,
                   help="license of the quantized model's card, e.g. apache-2.0 (default: the base model card's)")
    q.add_argument("--overwrite", action="store_true", help="replace what an earlier run wrote to OUTPUT_DIR")

    s = sub.add_parser("score", help="score LRP layer importance (sharded with accelerate, resumable)",
                       description="Score LRP importance of every quantized layer over a seeded sample of a "
                                   "dataset. Run under `accelerate launch --multi_gpu` (GPUs) or `torchrun "
                                   "--nproc_per_node N` (CPU) to shard over processes.")
    s.add_argument("model", help="float model: Hub id or local directory")
    _data_args(s, "train", "images to score (default: the whole split)", "images per batch (default: %(default)s)")
    s.add_argument("--use-labels", action="store_true", help="explain the label instead of the predicted class")
    s.add_argument("--output", required=True, help="scores JSON, accepted by `quantize --importance`")
    s.add_argument("--checkpoint-dir", default=None, help="resume from / save partial sums here")
    s.add_argument("--checkpoint-every", type=POSITIVE, default=10,
                   help="batches between checkpoints (default: %(default)s)")

    e = sub.add_parser("evaluate", help="top-1 accuracy, and agreement and KL against a reference model",
                       description="Evaluate a (quantized or float) model on a dataset split; with --reference, "
                                   "also top-1 agreement with it and KL(reference ‖ model). A model without a "
                                   "classifier (Dinov2Model, CLIP/SigLIP vision towers, MAE encoders) is evaluated "
                                   "on its embeddings: k-NN top-1 and, with --reference, their cosine similarity.")
    e.add_argument("model", help="model to evaluate: Hub id or local directory")
    e.add_argument("--reference", default=None, help="full-precision model to compare with")
    _data_args(e, "test", "images to evaluate (default: the whole split)", "images per batch (default: %(default)s)")
    e.add_argument("--output", default=None, help="also write the results as JSON")
    _knn_args(e)

    p = sub.add_parser("push", help="upload a quantized model directory to the Hub",
                       description="Create the repository if needed and upload the directory written by "
                                   "`lrpqvit quantize` (weights, config with bit plan, processor, model card).")
    p.add_argument("model_dir", help="directory written by `lrpqvit quantize`")
    p.add_argument("repo_id", help="target repository, e.g. my-user/vit-w4a4")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to push to (default: main)")
    p.add_argument("--token", default=None, help="Hub token (default: the saved login)")

    x = sub.add_parser("export", help="export a quantized model to ONNX (QDQ graph with the integer codes)",
                       description="Load a quantized model directory (or Hub id) and write it as an ONNX graph of "
                                   "QuantizeLinear/DequantizeLinear pairs that integer kernels (onnxruntime) run. "
                                   'Needs `pip install "optimum-lrpqvit[onnx]"`.')
    x.add_argument("model", help="quantized model: directory written by `lrpqvit quantize`, or a Hub id")
    x.add_argument("output", help="the .onnx file to write (its directory must exist)")
    x.add_argument("--opset", type=_int_in(MIN_OPSET, MAX_OPSET, "ONNX opsets the exporter writes"),
                   default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    x.add_argument("--weight-codes", choices=WEIGHT_CODES, default="auto",
                   help="type of the weight codes: int8 up to 7 bits and uint8 at 8 (auto, exact on every CPU), "
                        "int8 (fastest on CPUs with VNNI; 8-bit weights may saturate without VNNI) or uint8 "
                        "(default: %(default)s)")
    x.add_argument("--verify", type=_int_in(0, None, "a non-negative integer"), default=0, metavar="N",
                   help="run the export with onnxruntime on N random inputs and print the largest logit difference "
                        "and the top-1 agreement with the PyTorch model (default 0: no check)")


def build_parser(**strategies: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrpqvit", description="LRP-QViT post-training quantization of vision transformers.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_commands(parser, **strategies)
    return parser


# ------------------------------------------------------------------------------------------ checks before loading


def _close(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.75)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _looks_local(value: str) -> bool:
    """A path, not a Hub id (``name`` or ``owner/name``): it starts or ends like a path, has more than one '/',
    or its first part is a local directory."""
    return (value.startswith((".", "/", "~")) or value.endswith("/") or value.count("/") > 1
            or ("/" in value and os.path.isdir(value.split("/")[0])))


def _missing_path(value: str, what: str, flag: str) -> str:
    parent, name = os.path.split(os.path.normpath(os.path.expanduser(value)))
    parent = parent or "."
    if not os.path.isdir(parent):
        return f"{flag} {value}: no such local {what} ({parent} does not exist either)."
    return f"{flag} {value}: no such local {what}{_close(name, sorted(os.listdir(parent)))}."


def _check_quantized_directory(directory: str) -> None:
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            method = (json.load(f).get("quantization_config") or {}).get("quant_method")
    except (OSError, ValueError, AttributeError):
        method = None
    if method != "lrpqvit":
        raise UsageError(f"MODEL_DIR {directory} has no lrpqvit quantization_config in its config.json: it is not "
                         "a model written by `lrpqvit quantize`.")


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urllib.parse.urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_arguments(args: argparse.Namespace) -> None:
    """UsageError for arguments that cannot work, before any model or data is loaded: a local path that does not
    exist (with the closest name), a dataset name close to the bundled 'fashion_mnist', an output directory that
    holds an earlier run (without --overwrite), a push while the Hub cannot be reached. Hub ids while the Hub
    cannot be reached are read from the local cache only (HF_HUB_OFFLINE=1, when huggingface_hub is not imported
    yet), so that a missing one fails at once instead of after minutes of retries."""
    hub_ids = []
    output_dir = getattr(args, "output_dir", None)
    if output_dir is not None:
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise UsageError(f"OUTPUT_DIR {output_dir} exists and is not a directory; give a new or empty directory.")
        if os.path.isdir(output_dir) and os.listdir(output_dir) and not getattr(args, "overwrite", False):
            raise UsageError(f"OUTPUT_DIR {output_dir} already holds files (an earlier run?); pass --overwrite to "
                             "replace them, or give a new directory.")
    for flag, value in (("MODEL", getattr(args, "model", None)), ("--reference", getattr(args, "reference", None)),
                        ("MODEL_DIR", getattr(args, "model_dir", None))):
        if value is None or os.path.isdir(value):
            continue
        if _looks_local(value) or flag == "MODEL_DIR":
            raise UsageError(_missing_path(value, "directory", flag))
        hub_ids.append((flag, value))
    dataset = getattr(args, "dataset", None)
    if dataset is not None and dataset != BUNDLED_DATASET and not os.path.exists(dataset):
        if _looks_local(dataset):
            raise UsageError(_missing_path(dataset, "dataset directory", "--dataset"))
        if "/" not in dataset and _close(dataset, [BUNDLED_DATASET]):
            raise UsageError(f"--dataset {dataset}: no such local directory; did you mean {BUNDLED_DATASET!r} "
                             "(the bundled Fashion-MNIST)? Hub datasets are named owner/name.")
        hub_ids.append(("--dataset", dataset))
    if args.command == "push":
        _check_quantized_directory(args.model_dir)
    needs_hub = hub_ids or args.command == "push"
    if needs_hub and not _offline() and not _hub_reachable():
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        if args.command == "push":
            raise UsageError(f"push: the Hub ({endpoint}) cannot be reached; check the network (or HF_ENDPOINT).")
        names = ", ".join(f"{flag} {value}" for flag, value in hub_ids)
        if "huggingface_hub" not in sys.modules:  # read at its import: cached files load at once, others fail so
            os.environ["HF_HUB_OFFLINE"] = "1"
        print(f"note: {names} is not a local directory and the Hub ({endpoint}) cannot be reached: only the local "
              "cache of Hub files can be used.", file=sys.stderr)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Check ``args``, then import and run the command (``optimum_lrpqvit.cli.run_command``); the exit status."""
    if args.command is None:
        parser.print_help()
        return 2
    try:
        check_arguments(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"lrpqvit {args.command}: loading torch and transformers ...", file=sys.stderr, flush=True)
    from optimum_lrpqvit.cli import run_command

    return run_command(args)


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """``lrpqvit ARGS``: parse ``argv`` (with ``parser``, default ``build_parser()``) and ``run`` it."""
    parser = parser or build_parser()
    return run(parser, parser.parse_args(argv))


class LRPQVitOptimumCommand(BaseOptimumCLICommand):
    """``optimum-cli lrpqvit ...`` (registered by ``optimum/commands/register/lrpqvit.py``)."""

    COMMAND = CommandInfo(name="lrpqvit",
                          help="LRP-QViT post-training quantization (quantize, score, evaluate, push, export)")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.epilog = EXAMPLES.replace("lrpqvit ", "optimum-cli lrpqvit ")
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        add_commands(parser)

    def run(self) -> None:
        code = run(self.parser, self.args)
        if code:
            raise SystemExit(code)


if __name__ == "__main__":
    raise SystemExit(main())
