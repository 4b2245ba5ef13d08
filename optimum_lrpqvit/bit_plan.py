"""The bit plan: weight and activation bits of every quantized point of a model.

Point names are module names for the Linear layers and the patch embedding, and ``<attention>.matmul1``
(q·kᵀ), ``<attention>.softmax`` (the log-√2 probabilities) and ``<attention>.matmul2`` (·V) for the attention
products (``Layout.points``). A plan is built by a fixed-bit or mixed-precision rule to quantize a model, read
back from the quantized modules (``read_bit_plan``: the modules are where the bits live), written into
``config.json`` as ``{point: {"w_bits", "a_bits"}}``, and checked against the architecture on load
(``BitPlan.from_dict``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from torch import nn

from .architectures import Layout
from .nn import QuantConv2d, QuantLinear, QuantMatMul
from .quantizers import check_bits

__all__ = ["PATCH_EMBED_A_BITS", "BitPlan", "PointBits", "read_bit_plan"]

PATCH_EMBED_A_BITS = 8  # the image's pixels: quantizing them below 8 bits costs accuracy for no memory gain


@dataclass(frozen=True)
class PointBits:
    """``w_bits`` (None for the attention products, which have no weights) and ``a_bits`` of one point."""

    w_bits: int | None
    a_bits: int

    def to_dict(self) -> dict[str, int | None]:
        return {"w_bits": self.w_bits, "a_bits": self.a_bits}


class BitPlan(Mapping[str, PointBits]):
    """An immutable ``{point: PointBits}`` in the layout's order."""

    def __init__(self, bits: Mapping[str, PointBits]) -> None:
        self._bits = dict(bits)

    def __getitem__(self, point: str) -> PointBits:
        return self._bits[point]

    def __iter__(self) -> Iterator[str]:
        return iter(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def __repr__(self) -> str:
        return f"BitPlan({len(self)} points)"

    @classmethod
    def fixed(cls, layout: Layout, w_bits: int, a_bits: int) -> BitPlan:
        """Every point at (w_bits, a_bits); the patch embedding's input at ``PATCH_EMBED_A_BITS``."""
        weighted = set(layout.weight_points())
        bits = {p: PointBits(w_bits if p in weighted else None, a_bits) for p in layout.points()}
        bits[layout.patch_embed] = PointBits(w_bits, PATCH_EMBED_A_BITS)
        return cls(bits)

    def to_dict(self) -> dict[str, dict[str, int | None]]:
        """The JSON form written into ``config.json``: ``{point: {"w_bits", "a_bits"}}``."""
        return {point: bits.to_dict() for point, bits in self.items()}

    @classmethod
    def from_dict(cls, document: object, layout: Layout, where: str = "bit plan") -> BitPlan:
        """Validate the JSON form against ``layout``: exactly its points, integer bits in 2..8, ``w_bits``
        exactly where the point has weights. ValueError naming ``where`` and the entry otherwise."""
        if not isinstance(document, Mapping) or not document:
            raise ValueError(f"{where} is missing or empty.")
        points, weighted = layout.points(), set(layout.weight_points())
        missing, extra = sorted(set(points) - set(document)), sorted(set(document) - set(points))
        if missing or extra:
            raise ValueError(f"{where} does not fit this model (points it lacks: {missing[:5]}, unknown points: "
                             f"{extra[:5]}); it was saved for another architecture.")
        bits = {}
        for point in points:
            entry = document[point]
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where} entry {point!r} must be a dict, got {entry!r}.")
            a_bits = check_bits(entry.get("a_bits"), f"{where} {point!r} a_bits")
            if point in weighted:
                w_bits = check_bits(entry.get("w_bits"), f"{where} {point!r} w_bits")
            elif entry.get("w_bits") is not None:
                raise ValueError(f"{where} {point!r} has no weights but says w_bits={entry['w_bits']!r}.")
            else:
                w_bits = None
            bits[point] = PointBits(w_bits, a_bits)
        return cls(bits)

    def summary(self, model: nn.Module) -> dict[str, float]:
        """Parameter-weighted average weight bits, mean activation bits, and model size in MB (10^6 bytes):
        quantized weights at their bits, every other parameter at 32 bits (scales and zero points not counted)."""
        weight_bits = weight_params = 0
        quantized = set()
        for name, bits in self.items():
            if bits.w_bits is not None:
                module = model.get_submodule(name)
                numel = math.prod(module.weight_shape)
                if "weight" in module._parameters:  # float or folded; a packed weight is no parameter
                    quantized.add(id(module.weight))
                weight_params += numel
                weight_bits += numel * bits.w_bits
        other = sum(p.numel() for p in model.parameters() if id(p) not in quantized)
        a_bits = [bits.a_bits for bits in self.values()]
        return {
            "avg_w_bits": round(weight_bits / weight_params, 4),
            "avg_a_bits": round(sum(a_bits) / len(a_bits), 4),
            "size_mb": round((weight_bits + 32 * other) / 8 / 1e6, 4),
        }


def read_bit_plan(model: nn.Module, layout: Layout) -> BitPlan:
    """The bits the quantized modules of ``model`` hold, for every point of ``layout``; ValueError if a point
    is not quantized."""
    bits = {}
    for point in layout.weight_points():
        module = model.get_submodule(point)
        if not isinstance(module, (QuantLinear, QuantConv2d)):
            raise ValueError(f"{point} is a {type(module).__name__}, not a quantized layer.")
        bits[point] = PointBits(module.weight_quantizer.bits, module.input_quantizer.bits)
    for attention in layout.attentions:
        module = model.get_submodule(attention)
        matmul1, matmul2 = getattr(module, "matmul1", None), getattr(module, "matmul2", None)
        if not isinstance(matmul1, QuantMatMul) or not isinstance(matmul2, QuantMatMul):
            raise ValueError(f"{attention} has no quantized attention products.")
        bits[f"{attention}.matmul1"] = PointBits(None, matmul1.quantizer_a.bits)
        bits[f"{attention}.softmax"] = PointBits(None, matmul2.quantizer_a.bits)
        bits[f"{attention}.matmul2"] = PointBits(None, matmul2.quantizer_b.bits)
    return BitPlan(bits)
