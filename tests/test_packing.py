import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrpqvit.packing import pack_codes, packed_nbytes, unpack_codes

bits_st = st.integers(2, 8)


def naive_pack(codes: list[int], bits: int) -> list[int]:
    """Bit-by-bit reference: stream bit k = bit (k mod 8) of byte k // 8, code i at bits [i·b, (i+1)·b)."""
    out = [0] * math.ceil(len(codes) * bits / 8)
    for i, code in enumerate(codes):
        for t in range(bits):
            k = i * bits + t
            out[k // 8] |= ((code >> t) & 1) << (k % 8)
    return out


@st.composite
def codes_and_bits(draw, max_size=200):
    bits = draw(bits_st)
    codes = draw(st.lists(st.integers(0, 2**bits - 1), max_size=max_size))
    return codes, bits


@settings(max_examples=150, deadline=None)
@given(cb=codes_and_bits())
def test_pack_matches_bitwise_reference_and_round_trips(cb):
    codes, bits = cb
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_codes(t, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.tolist() == naive_pack(codes, bits)
    assert torch.equal(unpack_codes(packed, bits, t.shape), t)


@settings(max_examples=60, deadline=None)
@given(bits=bits_st, shape=st.lists(st.integers(0, 7), min_size=0, max_size=4), seed=st.integers(0, 2**16))
def test_round_trip_any_shape(bits, shape, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, tuple(shape), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == packed_nbytes(codes.numel(), bits)
    out = unpack_codes(packed, bits, codes.shape)
    assert out.dtype == torch.uint8 and out.shape == codes.shape
    assert torch.equal(out, codes)
    assert torch.equal(unpack_codes(packed, bits, tuple(shape)), codes)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1001, 65_537])
def test_round_trip_every_bits_odd_sizes(bits, n):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(n + bits), dtype=torch.uint8)
    codes[0] = 2**bits - 1  # extremes present
    codes[-1] = 2**bits - 1
    packed = pack_codes(codes, bits)
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, (n,)), codes)


@pytest.mark.parametrize(
    "bits, codes, expected",
    [
        (4, [1, 2, 3], [0x21, 0x03]),
        (2, [3, 0, 1, 2, 1], [0x93, 0x01]),
        # 3 bits: 0..7 LSB first = 000|100|01 0|110|001|1 01|011|111 → one full group of 8 codes in 3 bytes
        (3, [0, 1, 2, 3, 4, 5, 6, 7], [0x88, 0xC6, 0xFA]),
        # 3 bits: code 2 (7 = 111) straddles bytes 0 and 1
        (3, [5, 3, 7, 1], [0xDD, 0x03]),
        # 5 bits: 11111|000 00|10000|1 0001 → code 1 and code 3 straddle byte boundaries
        (5, [31, 0, 1, 17], [0x1F, 0x84, 0x08]),
        (6, [63, 0, 63], [0x3F, 0xF0, 0x03]),
        (7, [127, 1], [0xFF, 0x00]),
        (8, [0, 255, 17], [0x00, 0xFF, 0x11]),
    ],
)
def test_exact_byte_layout(bits, codes, expected):
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_codes(t, bits)
    assert packed.tolist() == expected
    assert torch.equal(unpack_codes(torch.tensor(expected, dtype=torch.uint8), bits, (len(codes),)), t)


def test_layout_is_row_major_flattening():
    codes = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [0x21, 0x43]
    assert torch.equal(pack_codes(codes.t(), 4), pack_codes(codes.t().contiguous(), 4))
    assert pack_codes(codes.t(), 4).tolist() == [0x31, 0x42]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 13, 100])
def test_packed_nbytes(bits, n):
    assert packed_nbytes(n, bits) == math.ceil(n * bits / 8)
    assert pack_codes(torch.zeros(n, dtype=torch.uint8), bits).numel() == packed_nbytes(n, bits)


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)])
def test_empty_round_trip(bits, shape):
    codes = torch.zeros(shape, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (0,)
    out = unpack_codes(packed, bits, shape)
    assert out.dtype == torch.uint8 and out.shape == shape


def test_scalar_round_trip():
    codes = torch.tensor(5, dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    assert packed.tolist() == [5]
    out = unpack_codes(packed, 3, ())
    assert out.shape == () and int(out) == 5


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_other_integer_dtypes_pack_like_uint8(dtype):
    codes = torch.tensor([5, 3, 7, 1], dtype=dtype)
    assert pack_codes(codes, 3).tolist() == [0xDD, 0x03]


def test_output_is_compact_and_input_untouched():
    codes = torch.tensor([1, 2, 3], dtype=torch.uint8)
    before = codes.clone()
    packed = pack_codes(codes, 4)
    assert torch.equal(codes, before)
    assert packed.is_contiguous() and packed.untyped_storage().nbytes() == 2
    out = unpack_codes(packed, 4, (3,))
    assert out.is_contiguous() and out.untyped_storage().nbytes() == 3
    out8 = unpack_codes(packed, 8, (2,))
    out8[0] = 0
    assert packed[0] == 0x21  # unpacking never aliases its input


@pytest.mark.parametrize("bits", [1, 9, 0, -3, True, 3.0, "4"])
def test_bad_bits(bits):
    codes = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(codes, bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), bits, (4,))
    with pytest.raises(ValueError, match="bits"):
        packed_nbytes(4, bits)


@pytest.mark.parametrize("numel", [-1, 2.0, True])
def test_packed_nbytes_bad_numel(numel):
    with pytest.raises(ValueError, match="numel"):
        packed_nbytes(numel, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool, torch.complex64])
def test_pack_rejects_non_integer_dtype(dtype):
    with pytest.raises(ValueError, match="integer dtype"):
        pack_codes(torch.zeros(4, dtype=dtype), 4)


def test_pack_rejects_non_tensor():
    with pytest.raises(ValueError, match="torch.Tensor"):
        pack_codes([1, 2, 3], 4)


def test_pack_rejects_codes_out_of_range_with_count_and_max():
    codes = torch.tensor([0, 7, 8, 3, 200, 9], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"3 of 6 codes are outside \[0, 7\] for bits=3.*max 200"):
        pack_codes(codes, 3)


def test_pack_rejects_negative_codes():
    codes = torch.tensor([0, -1, 3, -5], dtype=torch.int64)
    with pytest.raises(ValueError, match=r"2 of 4 codes .*min -5"):
        pack_codes(codes, 4)
    with pytest.raises(ValueError, match=r"1 of 1 codes .*max 256"):
        pack_codes(torch.tensor([256]), 8)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("delta", [-1, 1])
def test_unpack_rejects_wrong_length(bits, delta):
    shape = (5, 3)
    packed = pack_codes(torch.ones(shape, dtype=torch.uint8), bits)
    expected = math.ceil(15 * bits / 8)
    bad = packed[:delta] if delta < 0 else torch.cat([packed, torch.zeros(1, dtype=torch.uint8)])
    msg = rf"has {expected + delta} bytes but 15 codes of {bits} bits .* need {expected} bytes"
    with pytest.raises(ValueError, match=msg):
        unpack_codes(bad, bits, shape)


def test_unpack_rejects_wrong_shape_or_bits_for_stream():
    packed = pack_codes(torch.ones(16, dtype=torch.uint8), 4)  # 8 bytes
    with pytest.raises(ValueError, match="need 9 bytes"):
        unpack_codes(packed, 4, (18,))
    with pytest.raises(ValueError, match="need 10 bytes"):
        unpack_codes(packed, 5, (16,))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.float32, torch.bool])
def test_unpack_rejects_wrong_dtype(dtype):
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(torch.zeros(2, dtype=dtype), 4, (3,))


def test_unpack_rejects_bad_packed_and_shape():
    with pytest.raises(ValueError, match="1-D"):
        unpack_codes(torch.zeros(1, 2, dtype=torch.uint8), 4, (3,))
    with pytest.raises(ValueError, match="torch.Tensor"):
        unpack_codes(b"\x21\x03", 4, (3,))
    with pytest.raises(ValueError, match="shape"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, (-3,))
    with pytest.raises(ValueError, match="shape"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, (1.5, 2))
    with pytest.raises(ValueError, match="shape"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, 3)
