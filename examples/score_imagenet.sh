#!/usr/bin/env bash
# LRP importance of ViT-B/16 over 50,000 ImageNet-1k training images on all GPUs of a machine, then the
# LRP-QViT W4/A4 model calibrated on 32 of them. The scoring job is sharded by accelerate (one process per GPU),
# checkpoints every 20 batches per process and, when killed, resumes where it stopped if run again as is.
# Needs access to the gated ILSVRC/imagenet-1k dataset (`hf auth login`); images are streamed, not downloaded.
set -euo pipefail
MODEL=${MODEL:-google/vit-base-patch16-224}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}

accelerate launch --multi_gpu --num_processes "$GPUS" -m optimum_lrpqvit.cli score "$MODEL" \
    --dataset ILSVRC/imagenet-1k --split train --num-samples 50000 --seed 0 --batch-size 64 \
    --output vit-b-imagenet-scores.json --checkpoint-dir vit-b-imagenet-scores.ckpt --checkpoint-every 20

lrpqvit quantize "$MODEL" vit-b-w4a4-lrpqvit --dataset ILSVRC/imagenet-1k --split train \
    --mixed-precision --importance vit-b-imagenet-scores.json --w-bits 4 --a-bits 4 \
    --evaluate --eval-split validation
