"""Train the dense reference model: UperNet semantic segmentation on the Fashion-MNIST COCO canvases, with the
bundled Swin classifier as its backbone (CPU, seeded, resumable).

    python examples/make_fashion_coco.py --out data/fashion-coco
    python examples/train_dense_reference.py --data data/fashion-coco \\
        --backbone reference_models/swin-fashion-mnist --out reference_models/upernet-swin-fashion-coco

The backbone (``SwinBackbone``, stages 1–3 of the classifier, its weights copied; stage 3's output norm is the
classifier's final LayerNorm) feeds a small UperNet head (``--hidden-size`` channels, no auxiliary head) that
predicts background or one of the 10 Fashion-MNIST classes per pixel. The whole model is trained with AdamW, the
backbone at a tenth of the head's learning rate. Every epoch ends with a checkpoint in ``<out>/checkpoint``
(weights and optimizer state as safetensors, with their SHA-256 in ``state.json``); ``--resume`` continues from it
after verifying the checksums. The final model is saved with ``save_pretrained`` (safetensors) together with its
image processor and ``training_log.json``, which records the command and the validation mIoU of every epoch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import (  # noqa: E402
    SegformerImageProcessor,
    SwinConfig,
    SwinForImageClassification,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from optimum_lrpqvit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_coco  # noqa: E402
from optimum_lrpqvit.dense_evaluation import evaluate_dense, semantic_target  # noqa: E402


def build(backbone_dir: Path, hidden_size: int, size: int) -> tuple[UperNetForSemanticSegmentation, object]:
    classifier = SwinForImageClassification.from_pretrained(backbone_dir, use_safetensors=True)
    swin = classifier.config.to_dict()
    stages = [f"stage{i + 1}" for i in range(len(swin["depths"]))]
    backbone = SwinConfig(**{k: swin[k] for k in ("patch_size", "num_channels", "embed_dim", "depths", "num_heads",
                                                  "window_size", "mlp_ratio", "hidden_act", "layer_norm_eps")},
                          image_size=size, out_features=stages)
    labels = ["background", *classifier.config.id2label.values()]
    config = UperNetConfig(backbone_config=backbone, hidden_size=hidden_size, pool_scales=[1, 2, 4],
                           use_auxiliary_head=False, num_labels=len(labels),
                           id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model = UperNetForSemanticSegmentation(config)
    state = {f"backbone.{k}": v for k, v in classifier.state_dict().items() if k.startswith("swin.")}
    state[f"backbone.hidden_states_norms.{stages[-1]}.weight"] = classifier.swin.layernorm.weight.detach()
    state[f"backbone.hidden_states_norms.{stages[-1]}.bias"] = classifier.swin.layernorm.bias.detach()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("decode_head.", "backbone.hidden_states_norms.")) for k in missing)
    processor = SegformerImageProcessor(size={"height": size, "width": size}, image_mean=[FASHION_MNIST_MEAN] * 3,
                                        image_std=[FASHION_MNIST_STD] * 3, do_reduce_labels=False)
    return model, processor


def tensors(split, processor, model) -> tuple[torch.Tensor, torch.Tensor]:
    ids = split.image_ids
    pixels = torch.cat([processor([split.image(i) for i in ids[s:s + 256]], return_tensors="pt")["pixel_values"]
                        for s in range(0, len(ids), 256)])
    targets = torch.stack([torch.from_numpy(semantic_target(split, i, model.config)) for i in ids])
    return pixels, targets


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(directory: Path, model, optimizer, epoch: int, log: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    optimizer_state = optimizer.state_dict()
    flat = {f"{i}.{k}": v for i, s in optimizer_state["state"].items() for k, v in s.items()}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.tmp")
    save_file({k: v.reshape(-1) if v.dim() == 0 else v for k, v in flat.items()}, directory / "optimizer.tmp")
    for name in ("model", "optimizer"):  # complete files only: a killed run leaves the previous checkpoint
        (directory / f"{name}.tmp").replace(directory / f"{name}.safetensors")
    state = {"epoch": epoch, "log": log, "sha256": {n: sha256(directory / f"{n}.safetensors")
                                                    for n in ("model", "optimizer")},
             "param_groups": optimizer_state["param_groups"], "torch_rng": torch.get_rng_state().tolist()}
    (directory / "state.tmp").write_text(json.dumps(state))
    (directory / "state.tmp").replace(directory / "state.json")


def load_checkpoint(directory: Path, model, optimizer) -> tuple[int, dict]:
    state = json.loads((directory / "state.json").read_text())
    for name, digest in state["sha256"].items():
        if sha256(directory / f"{name}.safetensors") != digest:
            raise SystemExit(f"{directory / name}.safetensors does not match its checksum in state.json; "
                             "remove the checkpoint directory to start again.")
    model.load_state_dict(load_file(directory / "model.safetensors"))
    flat = load_file(directory / "optimizer.safetensors")
    per_param: dict[int, dict] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value.reshape(()) if name == "step" else value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return state["epoch"], state["log"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--backbone", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, processor = build(args.backbone, args.hidden_size, args.size)
    train, val = load_coco(args.data, "train"), load_coco(args.data, "val")
    pixels, targets = tensors(train, processor, model)
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    optimizer = torch.optim.AdamW([{"params": backbone, "lr": args.lr / 10}, {"params": head, "lr": args.lr}],
                                  weight_decay=0.01)
    steps_per_epoch = (len(pixels) + args.batch_size - 1) // args.batch_size
    checkpoint = args.out / "checkpoint"
    log = {"command": shlex.join([sys.executable, *sys.argv]), "args": {k: str(v) for k, v in vars(args).items()},
           "train_images": len(pixels), "val_images": len(val.image_ids),
           "parameters": sum(p.numel() for p in model.parameters()), "per_epoch": []}
    start = 0
    if args.resume and (checkpoint / "state.json").is_file():
        start, log = load_checkpoint(checkpoint, model, optimizer)
        print(f"resumed after epoch {start}", flush=True)
    for epoch in range(start, args.epochs):
        model.train()
        generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(len(pixels), generator=generator)
        started, losses = time.perf_counter(), []
        for step in range(steps_per_epoch):
            # cosine decay over all steps, from each group's initial learning rate
            progress = (epoch * steps_per_epoch + step) / (args.epochs * steps_per_epoch)
            for group, base in zip(optimizer.param_groups, (args.lr / 10, args.lr)):
                group["lr"] = base * 0.5 * (1 + np.cos(np.pi * progress))
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            logits = model(pixel_values=pixels[batch]).logits
            loss = F.cross_entropy(logits, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        metrics = evaluate_dense(model, processor, val, batch_size=64)
        log["per_epoch"].append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_miou": metrics["miou"],
                                 "train_seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(log["per_epoch"][-1]), flush=True)
        save_checkpoint(checkpoint, model, optimizer, epoch + 1, log)
    model.eval()
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    log["val_miou"] = log["per_epoch"][-1]["val_miou"]
    log["weights_bytes"] = (args.out / "model.safetensors").stat().st_size
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"saved {args.out} (val mIoU {log['val_miou']:.2f} %)")


if __name__ == "__main__":
    main()
