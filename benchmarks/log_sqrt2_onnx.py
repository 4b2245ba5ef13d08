"""The exported log-√2 quantizer (``export.onnx._LogQuant`` of base √2) against the library's, on one ViT-S-sized
softmax output at batch 32 (32·6·197 rows of 197 probabilities, logits ~ N(0, 3²)): how many codes and values
differ when onnxruntime runs the graph's Log/Round/Exp, and how long the graph takes.

    python benchmarks/log_sqrt2_onnx.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime
import torch

from optimum_lrpqvit.export.onnx import _LogQuant
from optimum_lrpqvit.quantizers import fake_quant_log_sqrt2


class _Quantizer(torch.nn.Module):
    def __init__(self, delta: float, bits: int) -> None:
        super().__init__()
        self.delta, self.bits = delta, bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LogQuant.apply(x, self.delta, self.bits, 1, 2, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(32 * 6 * 197, 197) * 3, -1)
    delta = float(probs.max())
    print("| bits | ORT time (ms) | values that differ | codes that differ | max relative value error (same code) |")
    print("|---|---|---|---|---|")
    for bits in (4, 8):
        path = f"/tmp/log_sqrt2_{bits}.onnx"
        torch.onnx.export(_Quantizer(delta, bits), (probs[:2],), path, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "rows"}})
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        x = probs.numpy()
        session.run(None, {"x": x})
        start = time.perf_counter()
        for _ in range(5):
            got = session.run(None, {"x": x})[0]
        ms = (time.perf_counter() - start) / 5 * 1000
        want = fake_quant_log_sqrt2(probs, torch.tensor(delta), bits).numpy()
        relative = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
        flips = relative > 0.1  # neighbouring levels differ by a factor √2
        print(f"| {bits} | {ms:.1f} | {int((got != want).sum())} of {got.size} | {int(flips.sum())} "
              f"| {float(relative[~flips].max()):.2g} |")


if __name__ == "__main__":
    main()
