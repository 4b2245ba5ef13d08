"""How much key centering (`center_keys=True`) can narrow the keys' per-tensor range, layer by layer.

    python benchmarks/key_ranges.py [--models ...] [--num-images 32] [--seed 0]

On the seeded calibration images of each reference model, the float keys of every attention layer: the ratio of
the per-tensor range, max_c hi_c − min_c lo_c, to the widest channel range, max_c (hi_c − lo_c), which is what
the tensor's range becomes once every channel is centred on its midpoint (docs/method.md, key centering). 1.00:
centring cannot narrow the range. Prints one line per model.
"""

from __future__ import annotations

import argparse

import torch
from accuracy import REFERENCE_MODELS, sample_indices
from transformers import AutoModelForImageClassification

from optimum_lrpqvit.architectures import find_family
from optimum_lrpqvit.data import load_fashion_mnist, load_image_processor, preprocess
from optimum_lrpqvit.key_centering import key_projection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=REFERENCE_MODELS)
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = load_fashion_mnist()["train"]
    for model_dir in args.models:
        model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
        pixels, _ = preprocess(train.select(sample_indices(args.seed, args.num_images, len(train))),
                               load_image_processor(model_dir), progress=False)
        family = find_family(model)
        layout = family.layout(model)
        ratios = []

        def measure(fused: bool):
            def hook(module: torch.nn.Linear, args: tuple, out: torch.Tensor) -> None:
                third = out.shape[-1] // 3
                keys = (out[..., third:2 * third] if fused else out).flatten(0, -2)
                low, high = keys.amin(0), keys.amax(0)
                ratios.append(float((high.max() - low.min()) / (high - low).max()))
            return hook

        handles = [model.get_submodule(name).register_forward_hook(measure(fused))
                   for name, fused in (key_projection(layout, a) for a in layout.attentions)]
        with torch.no_grad():
            family.logits(model, pixels)
        for handle in handles:
            handle.remove()
        print(f"{model_dir}: per-tensor / widest channel range of k, by layer:", " ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
