"""Train the small Fashion-MNIST reference classifiers the project quantizes (CPU, seeded, reproducible).

Each model is saved with ``save_pretrained`` (safetensors) together with its image processor, so that
``AutoModelForImageClassification``, ``AutoImageProcessor`` and ``pipeline("image-classification")``
load it from the output directory, and a ``training_log.json`` records the run.

    python examples/train_reference.py --arch vit --epochs 5 --out reference_models/vit-fashion-mnist --threads 1
    python examples/train_reference.py --arch deit --epochs 1 --out reference_models/deit-fashion-mnist \\
        --init reference_models/vit-fashion-mnist
    python examples/train_reference.py --arch vit --epochs 2 --out vit-longer --init reference_models/vit-fashion-mnist

Architectures: ``vit`` (HF ViT), ``deit`` (HF DeiT with distillation token), ``swin`` (HF Swin, 3 stages)
and ``timm_vit`` (timm VisionTransformer in the HF ``TimmWrapperForImageClassification`` format).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimum_lrpqvit.data import (  # noqa: E402
    FASHION_MNIST_LABELS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist_arrays,
)

ARCHS = ("vit", "deit", "swin", "timm_vit")
IMAGE_SIZE = {"vit": 28, "deit": 28, "swin": 32, "timm_vit": 28}
MEAN = [FASHION_MNIST_MEAN] * 3
STD = [FASHION_MNIST_STD] * 3
ID2LABEL = dict(enumerate(FASHION_MNIST_LABELS))
LABEL2ID = {name: i for i, name in ID2LABEL.items()}
VIT_DIMS = dict(hidden_size=128, num_hidden_layers=12, num_attention_heads=4, intermediate_size=512)
TIMM_ARCHITECTURE = "vit_tiny_patch16_224"  # registered timm name; model_args below override its shape
TIMM_MODEL_ARGS = dict(img_size=28, patch_size=4, in_chans=3, embed_dim=128, depth=12, num_heads=4, mlp_ratio=4.0)
MAX_MODEL_BYTES = 12 * 1024 * 1024


# --------------------------------------------------------------------------------------------- models
def build_model(arch: str) -> nn.Module:
    """A freshly initialised classifier of the given architecture (10 Fashion-MNIST classes)."""
    import transformers as tf

    labels = dict(num_labels=10, id2label=ID2LABEL, label2id=LABEL2ID)
    common = dict(image_size=28, patch_size=4, num_channels=3, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6, **VIT_DIMS, **labels)
    if arch == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(**common))
    if arch == "deit":
        return tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**common))
    if arch == "swin":
        # 32x32 input, patch 2 -> 16x16 tokens, window 4; stages at 16x16, 8x8, 4x4 (last one: a single window).
        config = tf.SwinConfig(image_size=32, patch_size=2, num_channels=3, embed_dim=64, depths=[2, 2, 2],
                               num_heads=[2, 4, 8], window_size=4, mlp_ratio=4.0, drop_path_rate=0.0,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **labels)
        return tf.SwinForImageClassification(config)
    if arch == "timm_vit":
        config = tf.TimmWrapperConfig(architecture=TIMM_ARCHITECTURE, model_args=dict(TIMM_MODEL_ARGS),
                                      pretrained_cfg=timm_pretrained_cfg(), **labels)
        model = tf.TimmWrapperForImageClassification(config)
        return model
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def timm_pretrained_cfg() -> dict[str, Any]:
    return dict(input_size=[3, 28, 28], interpolation="bilinear", mean=MEAN, std=STD, crop_pct=1.0,
                crop_mode="center", num_classes=10, first_conv="patch_embed.proj", classifier="head")


def build_processor(arch: str) -> Any:
    """The image processor saved next to the model: a ViTImageProcessor converting gray -> RGB, for every arch.

    For timm_vit it stands in for TimmWrapperImageProcessor, whose timm transforms cannot take grayscale
    images; it computes the same tensors as timm's eval transform on RGB input (see ``save_timm_processor``).
    """
    from transformers import ViTImageProcessor

    size = IMAGE_SIZE[arch]
    return ViTImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=2, do_rescale=True,
                             do_normalize=True, image_mean=MEAN, image_std=STD, do_convert_rgb=True)


def all_logits(model: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Logits to train on: both heads for DeiT (cls and distillation), the single head otherwise."""
    out = model(pixel_values=pixel_values)
    if hasattr(out, "cls_logits"):
        return [out.cls_logits, out.distillation_logits]
    return [out.logits]


def _vit_state(path: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The HF ViT at ``path`` and its state dict under transformers' in-memory names.

    transformers 5 renames ViT modules in memory (``vit.layers.N.attention.q_proj``, ``mlp.fc1``) but
    writes the legacy names (``vit.encoder.layer.N.attention.attention.query``) to disk, so the
    checkpoint is loaded through ``from_pretrained`` rather than read with safetensors directly.
    """
    from transformers import ViTForImageClassification

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--init {path}: no config.json (expected a saved HF ViT)")
    vit = ViTForImageClassification.from_pretrained(path).eval()
    return vit, {k: v.detach().clone() for k, v in vit.state_dict().items()}


def warm_start(arch: str, model: nn.Module, init: Path) -> list[str]:
    """Start from the checkpoint at ``init``: one of the same architecture (training continues), or an HF ViT
    whose matching tensors are copied (deit, timm_vit); returns notes for the log."""
    from transformers import AutoConfig, AutoModelForImageClassification

    if (init / "config.json").is_file() and AutoConfig.from_pretrained(init).model_type == model.config.model_type:
        model.load_state_dict(AutoModelForImageClassification.from_pretrained(init).state_dict())
        return [f"continued from {init} (same architecture: every tensor loaded)"]
    vit_model, vit = _vit_state(init)
    target = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    if arch == "vit":
        new = {k: v for k, v in vit.items() if k in target}
    elif arch == "deit":
        for key, value in vit.items():
            if key.startswith("vit.") and key.replace("vit.", "deit.", 1) in target:
                new[key.replace("vit.", "deit.", 1)] = value
        cls_token = vit["vit.embeddings.cls_token"]
        pos = vit["vit.embeddings.position_embeddings"]  # [cls, patches]
        new["deit.embeddings.distillation_token"] = cls_token.clone()
        new["deit.embeddings.position_embeddings"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
        for head in ("cls_classifier", "distillation_classifier"):
            new[f"{head}.weight"] = vit["classifier.weight"].clone()
            new[f"{head}.bias"] = vit["classifier.bias"].clone()
    elif arch == "timm_vit":
        p = "timm_model."
        new[p + "cls_token"] = vit["vit.embeddings.cls_token"]
        new[p + "pos_embed"] = vit["vit.embeddings.position_embeddings"]
        new[p + "patch_embed.proj.weight"] = vit["vit.embeddings.patch_embeddings.projection.weight"]
        new[p + "patch_embed.proj.bias"] = vit["vit.embeddings.patch_embeddings.projection.bias"]
        for i in range(TIMM_MODEL_ARGS["depth"]):
            src, dst = f"vit.layers.{i}.", f"{p}blocks.{i}."
            for part in ("weight", "bias"):
                new[dst + f"norm1.{part}"] = vit[src + f"layernorm_before.{part}"]
                new[dst + f"norm2.{part}"] = vit[src + f"layernorm_after.{part}"]
                new[dst + f"attn.qkv.{part}"] = torch.cat(
                    [vit[src + f"attention.{n}_proj.{part}"] for n in ("q", "k", "v")], dim=0)
                new[dst + f"attn.proj.{part}"] = vit[src + f"attention.o_proj.{part}"]
                new[dst + f"mlp.fc1.{part}"] = vit[src + f"mlp.fc1.{part}"]
                new[dst + f"mlp.fc2.{part}"] = vit[src + f"mlp.fc2.{part}"]
        for part in ("weight", "bias"):
            new[p + f"norm.{part}"] = vit[f"vit.layernorm.{part}"]
            new[p + f"head.{part}"] = vit[f"classifier.{part}"]
    else:
        raise ValueError(f"--init is not supported for arch {arch!r}")
    bad = [k for k, v in new.items() if k not in target or target[k].shape != v.shape]
    if bad:
        raise ValueError(f"--init {init}: tensors do not fit the {arch} model: {bad[:5]}")
    missing = sorted(set(target) - set(new))
    model.load_state_dict({**target, **new})
    notes = [f"warm-started from {init}: {len(new)} tensors copied"]
    if missing:
        notes.append(f"left at random init: {missing}")
    if arch == "timm_vit":  # the mapping is exact: same function up to float rounding
        probe = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(0))
        model.eval()
        with torch.no_grad():
            diff = float((model(pixel_values=probe).logits - vit_model(pixel_values=probe).logits).abs().max())
        if diff > 1e-4:
            raise RuntimeError(f"timm model after warm start differs from the HF ViT: max |Δlogits| = {diff}")
        notes.append(f"timm ViT reproduces the HF ViT after the copy (max |Δlogits| = {diff:.2e})")
    if arch == "deit":
        notes.append("distillation token, its position embedding and the distillation head initialised "
                     "from the ViT cls token / cls position embedding / classifier")
    return notes


# ----------------------------------------------------------------------------------------------- data
def prepare_inputs(arch: str, images: np.ndarray, processor: Any, chunk: int = 5000) -> torch.Tensor:
    """Normalised single-channel tensors ``(n, 1, S, S)``, exactly what the saved processor produces."""
    uint8 = torch.from_numpy(np.array(images, dtype=np.uint8))[:, None]
    if arch == "timm_vit":  # timm eval transform at 28x28 with crop_pct 1.0: ToTensor + Normalize
        return (uint8.float() / 255.0 - MEAN[0]) / STD[0]
    parts = []
    for start in range(0, len(uint8), chunk):
        batch = uint8[start:start + chunk].expand(-1, 3, -1, -1)
        parts.append(processor(batch, return_tensors="pt")["pixel_values"][:, :1].clone())
    return torch.cat(parts)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop with ``pad`` pixels of (normalised) black padding and random horizontal flip."""
    n, _, h, w = x.shape
    background = (0.0 - MEAN[0]) / STD[0]
    padded = F.pad(x[:, 0], (pad, pad, pad, pad), value=background)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(n)[:, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.where(flip[:, None, None], out.flip(-1), out)
    return out[:, None]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(pixel_values=x[start:start + batch_size].expand(-1, 3, -1, -1)).logits
        correct += int((logits.argmax(-1) == y[start:start + batch_size]).sum())
    return correct / len(x)


# ------------------------------------------------------------------------------------------- checks
@torch.no_grad()
def verify_saved(arch: str, out: Path, model: nn.Module, test_images: np.ndarray, x_test: torch.Tensor) -> dict:
    """Reload with the Auto classes and pipeline(); compare logits and preprocessing. Raises on mismatch."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    model.eval()
    reloaded = AutoModelForImageClassification.from_pretrained(out).eval()
    batch = x_test[:16].expand(-1, 3, -1, -1)
    logits_diff = float((reloaded(pixel_values=batch).logits - model(pixel_values=batch).logits).abs().max())
    if logits_diff > 1e-5:
        raise RuntimeError(f"reloaded model differs from the trained one: max |Δlogits| = {logits_diff}")
    if reloaded.config.id2label[0] != FASHION_MNIST_LABELS[0]:
        raise RuntimeError(f"labels lost on reload: {reloaded.config.id2label}")
    processor = AutoImageProcessor.from_pretrained(out)
    gray = [Image.fromarray(img, mode="L") for img in test_images[:16]]
    report: dict[str, Any] = {"processor": type(processor).__name__, "max_abs_logits_diff": logits_diff}
    pixels = processor(gray, return_tensors="pt")["pixel_values"]  # grayscale PIL images as they are
    report["max_abs_pixel_diff_vs_training_tensors"] = float((pixels - batch).abs().max())
    if report["max_abs_pixel_diff_vs_training_tensors"] > 1e-4:
        raise RuntimeError(f"processor output differs from the training tensors: {report}")
    if arch == "timm_vit":
        import timm

        direct = timm.create_model(TIMM_ARCHITECTURE, pretrained=True, num_classes=10, **TIMM_MODEL_ARGS,
                                   pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                               num_classes=10)).eval()
        report["timm_create_model_logits_diff"] = float(
            (direct(batch) - model(pixel_values=batch).logits).abs().max())
        if report["timm_create_model_logits_diff"] > 1e-5:
            raise RuntimeError(f"timm.create_model cannot read the checkpoint: {report}")
    classifier = pipeline("image-classification", model=str(out), device="cpu")
    predictions = classifier(gray[:4])
    report["pipeline_top1_on_grayscale"] = [p[0]["label"] for p in predictions]
    report["model_top1"] = [ID2LABEL[int(i)] for i in model(pixel_values=batch[:4]).logits.argmax(-1)]
    if report["pipeline_top1_on_grayscale"] != report["model_top1"]:
        raise RuntimeError(f"pipeline() disagrees with the model: {report}")
    return report


def save_timm_processor(out: Path, processor: Any) -> None:
    """Make ``AutoImageProcessor`` load ``processor`` for the TimmWrapper checkpoint at ``out``.

    For a local timm checkpoint transformers reads the processor settings from config.json (the Hub is tried
    for preprocessor_config.json first); naming ``image_processor_type`` there sends both to the
    preprocessor_config.json written here, so local directories and Hub repos load the same processor.
    """
    processor.save_pretrained(out)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config["image_processor_type"] = type(processor).__name__
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=ARCHS, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init", type=Path, default=None,
                        help="checkpoint to start from: the same architecture, or an HF ViT (deit, timm_vit)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="peak LR (default 1e-3, 3e-4 with --init)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--limit-test", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    processor = build_processor(args.arch)
    train_images, train_labels = load_fashion_mnist_arrays("train", args.data_root)
    test_images, test_labels = load_fashion_mnist_arrays("test", args.data_root)
    if args.limit_train is not None:
        train_images, train_labels = train_images[:args.limit_train], train_labels[:args.limit_train]
    if args.limit_test is not None:
        test_images, test_labels = test_images[:args.limit_test], test_labels[:args.limit_test]
    x_train = prepare_inputs(args.arch, train_images, processor)
    y_train = torch.from_numpy(train_labels)
    x_test = prepare_inputs(args.arch, test_images, processor)
    y_test = torch.from_numpy(test_labels)
    print(f"data ready: train {tuple(x_train.shape)}, test {tuple(x_test.shape)} ({time.time() - started:.1f}s)",
          flush=True)

    model = build_model(args.arch)
    notes: list[str] = []
    if args.init is not None:
        notes += warm_start(args.arch, model, args.init)
        print("\n".join(notes), flush=True)
    if args.arch == "deit":
        notes.append("no teacher available: both the cls head and the distillation head are trained on the "
                     "labels (loss = mean of the two cross-entropies); inference logits = mean of the heads")
    n_params = sum(p.numel() for p in model.parameters())
    lr = args.lr if args.lr is not None else (3e-4 if args.init is not None else 1e-3)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=args.epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=0.15)
    epochs_log = []
    init_acc = evaluate(model, x_test, y_test) if args.init is not None else None
    if init_acc is not None:
        print(f"test top-1 after warm start, before training: {init_acc:.4f}", flush=True)
    for epoch in range(args.epochs):
        model.train()
        epoch_start, total_loss, seen = time.time(), 0.0, 0
        order = torch.randperm(len(x_train), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size:(step + 1) * args.batch_size]
            xb = augment(x_train[index], generator).expand(-1, 3, -1, -1)
            loss = sum(F.cross_entropy(logits, y_train[index], label_smoothing=args.label_smoothing)
                       for logits in all_logits(model, xb))
            loss = loss / (2 if args.arch == "deit" else 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total_loss += loss.detach().item() * len(index)
            seen += len(index)
            if (step + 1) % args.log_every == 0:
                rate = (time.time() - epoch_start) / (step + 1)
                print(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps_per_epoch} "
                      f"loss {total_loss / seen:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                      f"{rate:.3f}s/step eta-epoch {rate * (steps_per_epoch - step - 1):.0f}s", flush=True)
        train_seconds = time.time() - epoch_start
        acc = evaluate(model, x_test, y_test)
        epochs_log.append(dict(epoch=epoch + 1, train_loss=total_loss / seen, test_top1=acc,
                               train_seconds=round(train_seconds, 1),
                               seconds_per_1k_images=round(1000 * train_seconds / len(x_train), 2)))
        print(f"== epoch {epoch + 1}: loss {total_loss / seen:.4f} test top-1 {acc:.4f} "
              f"({train_seconds:.0f}s train)", flush=True)

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    if args.arch == "timm_vit":
        # TimmWrapper keeps its preprocessing in config.json (pretrained_cfg); its save_pretrained writes the
        # keys with a "timm_model." prefix, which timm itself cannot read. Hub timm checkpoints carry bare
        # timm keys, which TimmWrapper loads too, so store those: one file for both libraries.
        weights = args.out / "model.safetensors"
        state = load_file(str(weights))
        save_file({k.removeprefix("timm_model."): v for k, v in state.items()}, str(weights),
                  metadata={"format": "pt"})
        save_timm_processor(args.out, processor)
    else:
        processor.save_pretrained(args.out)
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    if size > MAX_MODEL_BYTES:
        raise RuntimeError(f"saved weights are {size / 2**20:.1f} MiB, over the 12 MiB limit")
    test_acc = epochs_log[-1]["test_top1"]
    checks = verify_saved(args.arch, args.out, model, test_images, x_test)
    log = dict(
        command=shlex.join([sys.executable, *sys.argv]), arch=args.arch, seed=args.seed, epochs=args.epochs,
        threads=torch.get_num_threads(), batch_size=args.batch_size, peak_lr=lr, weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing, optimizer="AdamW", schedule="OneCycleLR(pct_start=0.15)",
        augmentation="random crop (padding 2) + horizontal flip", init=str(args.init) if args.init else None,
        test_top1_after_init=init_acc, train_images=len(x_train), test_images=len(x_test), parameters=n_params,
        weights_bytes=size, per_epoch=epochs_log, test_top1=test_acc, wall_seconds=round(time.time() - started, 1),
        notes=notes, checks=checks,
        versions=dict(python=platform.python_version(), torch=torch.__version__,
                      transformers=__import__("transformers").__version__, timm=__import__("timm").__version__),
    )
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"saved {args.out} ({size / 2**20:.2f} MiB): test top-1 {test_acc:.4f} on {len(x_test)} images; "
          f"wall {log['wall_seconds']:.0f}s\nchecks: {json.dumps(checks)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
