import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from refquant import packing
from tests.strategies import int_codes


def naive_pack(q, bits):
    """Bit-by-bit oracle: code i of a row occupies bits [i*bits, (i+1)*bits) little-endian."""
    q = np.asarray(q, dtype=np.int64)
    rows = q.reshape(-1, q.shape[-1])
    nbytes = -(-q.shape[-1] * bits // 8)
    out = np.zeros((rows.shape[0], nbytes), np.uint8)
    for r, row in enumerate(rows):
        for i, code in enumerate(row):
            u = int(code) & ((1 << bits) - 1)
            for b in range(bits):
                if u >> b & 1:
                    pos = i * bits + b
                    out[r, pos // 8] |= 1 << (pos % 8)
    return out.reshape(q.shape[:-1] + (nbytes,))


def test_nibble_order_golden():
    # element 0 -> low nibble of byte 0, element 1 -> high nibble; odd tail zero-padded.
    q = np.array([0x1, 0x2, 0xF, 0x0, 0x7], np.uint8)
    np.testing.assert_array_equal(packing.pack(q, 4), [0x21, 0x0F, 0x07])
    # signed 4-bit: -1 is 0xF, -8 is 0x8 (two's complement)
    np.testing.assert_array_equal(packing.pack(np.array([-1, -8]), 4, signed=True), [0x8F])
    # 3-bit: 8 codes 0..7 -> bit stream 000 001 010 011 100 101 110 111 (LSB first)
    np.testing.assert_array_equal(packing.pack(np.arange(8), 3), [0x88, 0xC6, 0xFA])
    # 2-bit: four per byte from the low bits
    np.testing.assert_array_equal(packing.pack(np.array([3, 0, 1, 2]), 2), [0b10010011])
    # and back: unsigned by default (0xF is 15), two's complement when asked (0xF is -1)
    u = packing.unpack(np.array([0x21, 0x0F, 0x07], np.uint8), 4, 5)
    assert u.dtype == np.uint8 and u.tolist() == [1, 2, 15, 0, 7]
    assert packing.unpack(np.array([0x8F], np.uint8), 4, 2, signed=True).tolist() == [-1, -8]


@st.composite
def int32_args(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=2, max_side=40))
    return draw(int_codes(bits, False, shape)), bits, draw(st.sampled_from([0, 1]))


@given(int32_args())
def test_int32_unpack_inverts_pack(args):
    q, bits, axis = args
    packed = packing.pack_int32(q, bits, axis=axis)
    assert packed.dtype == np.int32
    per = 32 // bits
    assert packed.shape[axis] == -(-q.shape[axis] // per)
    np.testing.assert_array_equal(packing.unpack_int32(packed, bits, q.shape[axis], axis=axis), q)


def test_int32_gptq_layout_golden():
    # AutoGPTQ qweight: codes q (out, in); 8 nibbles along `in` per int32, first lowest.
    q = np.arange(16, dtype=np.int64).reshape(1, 16) % 16          # out=1, in=16
    qweight = packing.pack_int32(q.T, 4, axis=0)                     # (in/8, out)
    assert qweight.shape == (2, 1)
    assert qweight.view(np.uint32)[0, 0] == 0x76543210
    assert qweight.view(np.uint32)[1, 0] == 0xFEDCBA98


def test_bad_input():
    with pytest.raises(ValueError, match="bits"):
        packing.pack(np.zeros(4, np.int8), 9)
    with pytest.raises(ValueError, match="unsigned 4-bit range"):
        packing.pack(np.array([16]), 4)
    with pytest.raises(ValueError, match="signed 4-bit range"):
        packing.pack(np.array([8]), 4, signed=True)
    with pytest.raises(TypeError, match="integer"):
        packing.pack(np.array([1.0]), 4)
    with pytest.raises(ValueError, match="need"):
        packing.unpack(np.zeros(3, np.uint8), 4, 7)
    with pytest.raises(ValueError, match="bits"):
        packing.pack_int32(np.zeros((8, 1), np.int8), 3)


@st.composite
def any_width_codes(draw):
    bits = draw(st.integers(1, 8))
    signed = bits > 1 and draw(st.booleans())
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=13))
    return draw(int_codes(bits, signed, shape)), bits, signed


@given(any_width_codes())
def test_every_width_against_the_bit_oracle_with_dtypes(args):
    q, bits, signed = args
    packed = packing.pack(q, bits, signed=signed)
    assert packed.dtype == np.uint8 and packed.shape == q.shape[:-1] + (-(-q.shape[-1] * bits // 8),)
    np.testing.assert_array_equal(packed, naive_pack(q, bits))
    back = packing.unpack(packed, bits, q.shape[-1], signed=signed)
    assert back.dtype == (np.int8 if signed else np.uint8) and back.flags.c_contiguous
    np.testing.assert_array_equal(back, q)


@st.composite
def int32_nd_args(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=20))
    return draw(int_codes(bits, False, shape)), bits, draw(st.integers(-len(shape), len(shape) - 1))


def naive_pack_int32(q, bits, axis):
    """Word k along ``axis`` holds codes k·per … k·per + per - 1, the first in the lowest bits."""
    q = np.moveaxis(np.asarray(q, np.int64), axis, -1)
    per = 32 // bits
    n = q.shape[-1]
    out = np.zeros(q.shape[:-1] + (-(-n // per),), np.uint64)
    for idx in np.ndindex(q.shape[:-1]):
        for i in range(n):
            out[idx + (i // per,)] |= np.uint64(int(q[idx + (i,)]) << (bits * (i % per)))
    return np.moveaxis(out.astype(np.uint32).view(np.int32), -1, axis)


@given(int32_nd_args())
def test_int32_any_rank_and_axis_against_a_naive_loop(args):
    q, bits, axis = args
    packed = packing.pack_int32(q, bits, axis=axis)
    np.testing.assert_array_equal(packed, naive_pack_int32(q, bits, axis))
    back = packing.unpack_int32(packed, bits, q.shape[axis], axis=axis)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, q)
    np.testing.assert_array_equal(packing.unpack_int32(packed.view(np.uint32), bits, q.shape[axis], axis=axis), q)


def test_packed_length_and_code_range_by_hand():
    assert [packing.packed_length(n, b) for n, b in ((7, 4), (8, 3), (9, 3), (1, 1), (0, 8))] == [4, 3, 4, 1, 0]
    packing.pack(np.array([-8, 7]), 4, signed=True)                 # the signed range ends are accepted
    packing.pack(np.array([0, 15]), 4)
    for bad, signed in (([-9], True), ([8], True), ([-1], False), ([16], False)):
        with pytest.raises(ValueError, match="range"):
            packing.pack(np.array(bad), 4, signed=signed)


def test_every_message_is_exact():
    cases = [
        (lambda: packing.pack([1, 2], 4), TypeError, r"^q must be a NumPy integer array, got list$"),
        (lambda: packing.pack(np.array([1.0]), 4), TypeError, r"^q must be an integer array, got dtype float64$"),
        (lambda: packing.pack(np.array(3), 4), ValueError, r"^q must have at least one dimension, got a 0-d array$"),
        (lambda: packing.pack(np.array([16]), 4), ValueError,
         r"^q holds values in \[16, 16\], outside the unsigned 4-bit range \[0, 15\]$"),
        (lambda: packing.pack(np.array([-9, 3]), 4, signed=True), ValueError,
         r"^q holds values in \[-9, 3\], outside the signed 4-bit range \[-8, 7\]$"),
        (lambda: packing.pack(np.zeros(2, np.int8), 9), ValueError, r"^bits must be one of"),
        (lambda: packing.unpack(np.zeros(2, np.int8), 4, 4), TypeError, r"^packed must be a uint8 array, got int8$"),
        (lambda: packing.unpack([0, 1], 4, 4), TypeError, r"^packed must be a uint8 array, got list$"),
        (lambda: packing.unpack(np.array(3, np.uint8), 4, 2), ValueError, r"^packed must have at least one dimension$"),
        (lambda: packing.unpack(np.zeros(3, np.uint8), 4, 7), ValueError,
         r"^packed rows have 3 bytes but 7 codes of 4 bits need 4$"),
        (lambda: packing.unpack(np.zeros(3, np.uint8), 9, 7), ValueError, r"^bits must be one of"),
        (lambda: packing.pack_int32(np.zeros((8, 1), np.int8), 3), ValueError, r"^bits must be one of"),
        (lambda: packing.unpack_int32(np.zeros(2, np.int8), 4, 8), TypeError,
         r"^packed must be an int32 array, got int8$"),
        (lambda: packing.unpack_int32([0, 1], 4, 8), TypeError, r"^packed must be an int32 array, got list$"),
        (lambda: packing.unpack_int32(np.zeros((2, 3, 5), np.int32), 4, 8, axis=1), ValueError,
         r"^packed has 3 words along axis 1, 8 codes need 1$"),
        (lambda: packing.unpack_int32(np.zeros(2, np.int32), 3, 8), ValueError, r"^bits must be one of"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
