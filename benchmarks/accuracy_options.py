"""The accuracy options beyond the paper: AdaLog, GPTQ, key centering, activation compensation, block
reconstruction, alone and combined.

    python benchmarks/accuracy_options.py [--models ...] [--bits 3 4 6] [--methods ...] [--seeds 0 1 2]
        [--num-eval 10000]

For each reference model and W = A = b: CRL as the paper (log-√2 probabilities, uniform post-GELU activations,
round-to-nearest weights), then with `softmax_quantizer="adalog"`, `gelu_quantizer="adalog"` or
`weight_rounding="gptq"` alone, with all three, and with all three and LRP mixed precision (paper rule, 256
importance images); with `center_keys=True` alone and with all three; with `compensate_activations=True` after
all three, with and without the keys and LRP mixed precision; then block reconstruction
(`reconstruction="block"`, 1,024 images after those, default steps) alone and after all three. 32 calibration
images per seed from the train split; evaluated on the test images (top-1, agreement with full precision, KL(FP ‖
quantized)) with the quantization time (`quantize_seconds`, calibration, rounding and reconstruction) and that time
in forward passes of the float model on the calibration batch (`calibration_passes`, timed in the same process).
Writes benchmarks/results/accuracy_options.json and .md.
"""

from __future__ import annotations

from accuracy import methods_main

ALL = {"softmax_quantizer": "adalog", "gelu_quantizer": "adalog", "weight_rounding": "gptq"}
METHODS = {
    "crl": {},
    "crl adalog": {"softmax_quantizer": "adalog"},
    "crl adalog-gelu": {"gelu_quantizer": "adalog"},
    "crl gptq": {"weight_rounding": "gptq"},
    "crl all three": ALL,
    "crl all three lrp paper": {**ALL, "mixed_precision": True},
    "crl keys": {"center_keys": True},
    "crl all three keys": {**ALL, "center_keys": True},
    "crl all three keys lrp paper": {**ALL, "center_keys": True, "mixed_precision": True},
    "crl all three comp": {**ALL, "compensate_activations": True},
    "crl all three keys comp": {**ALL, "center_keys": True, "compensate_activations": True},
    "crl all three keys comp lrp paper": {**ALL, "center_keys": True, "compensate_activations": True,
                                          "mixed_precision": True},
    "crl block": {"reconstruction": "block"},
    "crl all three block": {**ALL, "reconstruction": "block"},
}


def main() -> None:
    methods_main("accuracy_options", METHODS, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
