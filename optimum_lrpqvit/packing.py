"""Dense bit packing of low-bit integer codes for packed checkpoints.

Layout: the codes are flattened (row-major) into one little-endian bitstream. Code ``i`` of a ``b``-bit
tensor occupies stream bits ``[i·b, (i+1)·b)``, least significant bit first, and stream bit ``k`` is bit
``k mod 8`` of byte ``k // 8``. The stream is stored as a 1-D uint8 tensor of ``ceil(numel·b/8)`` bytes;
unused high bits of the last byte are zero. Example, b = 4: codes ``[1, 2, 3]`` → bytes ``[0x21, 0x03]``.

Eight ``b``-bit codes fill exactly ``b`` bytes, so the work is done on groups of eight codes: each group is
assembled into one int64 word (at most 56 bits for b ≤ 7) and split into bytes — a loop over ≤ 8 positions,
vectorised over all groups, independent of the host's byte order.
"""

from __future__ import annotations

import math

import torch

from .quantizers import check_bits

__all__ = ["packed_nbytes", "pack_codes", "unpack_codes"]


def _check_count(numel: int, what: str) -> int:
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {numel!r}.")
    return numel


def packed_nbytes(numel: int, bits: int) -> int:
    """Number of bytes ``ceil(numel·bits/8)`` that ``numel`` codes of ``bits`` bits occupy when packed."""
    _check_count(numel, "numel")
    check_bits(bits)
    return (numel * bits + 7) // 8


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_codes(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Return ``flat`` as uint8, raising ValueError if any code is outside [0, 2^bits − 1]."""
    high = 2**bits - 1
    if flat.numel() == 0:
        return flat.to(torch.uint8)
    values = flat if flat.dtype == torch.uint8 else flat.to(torch.int64)
    if flat.dtype == torch.uint8:
        if int(values.max()) <= high:
            return flat
    else:
        lo, hi = torch.aminmax(values)
        if int(lo) >= 0 and int(hi) <= high:
            return values.to(torch.uint8)
    bad = (values > high) if flat.dtype == torch.uint8 else ((values < 0) | (values > high))
    offenders = values[bad]
    raise ValueError(
        f"{int(bad.sum())} of {flat.numel()} codes are outside [0, {high}] for bits={bits} "
        f"(min {int(offenders.min())}, max {int(offenders.max())})."
    )


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (each in [0, 2^bits − 1], bits in 2..8) into a dense little-endian bitstream.

    Args:
        codes (`torch.Tensor`): codes of any shape and integer dtype (uint8 from ``quantize_uniform``),
            flattened in row-major order.
        bits (`int`): bits per code, 2 to 8.

    Returns:
        A 1-D uint8 tensor of ``packed_nbytes(codes.numel(), bits)`` bytes on ``codes.device``; code ``i``
        is stream bits ``[i·bits, (i+1)·bits)``, stream bit ``k`` is bit ``k mod 8`` of byte ``k // 8``.

    Raises:
        ValueError: ``bits`` outside 2..8, ``codes`` not a tensor of an integer dtype, or a code out of range.
    """
    check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"codes must be a torch.Tensor, got {type(codes).__name__}.")
    if not _is_integer_dtype(codes.dtype):
        raise ValueError(f"codes must have an integer dtype (uint8 expected), got {codes.dtype}.")
    flat = _check_codes(codes.reshape(-1), bits)
    n = flat.numel()
    nbytes = packed_nbytes(n, bits)
    if bits == 8:
        return flat.clone()
    groups = -(-n // 8)
    if n % 8:
        padded = torch.zeros(groups * 8, dtype=torch.uint8, device=flat.device)
        padded[:n] = flat
        flat = padded
    cols = flat.view(groups, 8)
    word = cols[:, 0].to(torch.int64)
    for j in range(1, 8):
        word |= cols[:, j].to(torch.int64) << (j * bits)
    out = torch.empty(groups, bits, dtype=torch.uint8, device=flat.device)
    for m in range(bits):
        out[:, m] = (word >> (8 * m)) & 0xFF
    out = out.view(-1)
    return out if out.numel() == nbytes else out[:nbytes].clone()


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of ``pack_codes``: read ``prod(shape)`` codes of ``bits`` bits from a packed bitstream.

    Args:
        packed (`torch.Tensor`): 1-D uint8 tensor of exactly ``packed_nbytes(prod(shape), bits)`` bytes,
            in the layout of ``pack_codes``.
        bits (`int`): bits per code, 2 to 8.
        shape (`tuple[int, ...]` or `torch.Size`): shape of the unpacked codes.

    Returns:
        uint8 codes of ``shape`` on ``packed.device``.

    Raises:
        ValueError: ``bits`` outside 2..8, a bad ``shape``, ``packed`` not a 1-D uint8 tensor, or ``packed``
            of the wrong length (e.g. a truncated or corrupted checkpoint tensor).
    """
    check_bits(bits)
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be a tuple of non-negative integers, got {shape!r}.") from None
    for dim in shape:
        _check_count(dim, f"shape {shape!r}: every dimension")
    if not isinstance(packed, torch.Tensor):
        raise ValueError(f"packed must be a torch.Tensor, got {type(packed).__name__}.")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got {packed.dtype}.")
    if packed.dim() != 1:
        raise ValueError(f"packed must be 1-D, got shape {tuple(packed.shape)}.")
    n = math.prod(shape)
    nbytes = packed_nbytes(n, bits)
    if packed.numel() != nbytes:
        raise ValueError(
            f"packed has {packed.numel()} bytes but {n} codes of {bits} bits (shape {shape}) need "
            f"{nbytes} bytes; the tensor is truncated, corrupted or paired with the wrong shape/bits."
        )
    if bits == 8:
        return packed.clone().view(shape)
    groups = -(-n // 8)
    if groups * bits != nbytes:
        padded = torch.zeros(groups * bits, dtype=torch.uint8, device=packed.device)
        padded[:nbytes] = packed
        packed = padded
    cols = packed.reshape(groups, bits)
    word = cols[:, 0].to(torch.int64)
    for m in range(1, bits):
        word |= cols[:, m].to(torch.int64) << (8 * m)
    out = torch.empty(groups, 8, dtype=torch.uint8, device=packed.device)
    mask = 2**bits - 1
    for j in range(8):
        out[:, j] = (word >> (j * bits)) & mask
    out = out.view(-1)
    return (out if out.numel() == n else out[:n].clone()).view(shape)
