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


@st.composite
def codes_and_bits(draw):
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    signed = draw(st.booleans())
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=17))
    return draw(int_codes(bits, signed, shape)), bits, signed


@given(codes_and_bits())
def test_unpack_inverts_pack(args):
    q, bits, signed = args
    packed = packing.pack(q, bits, signed=signed)
    assert packed.dtype == np.uint8
    assert packed.shape == q.shape[:-1] + (-(-q.shape[-1] * bits // 8),)
    np.testing.assert_array_equal(packing.unpack(packed, bits, q.shape[-1], signed=signed), q)


@given(codes_and_bits())
def test_pack_matches_bitwise_oracle(args):
    q, bits, signed = args
    np.testing.assert_array_equal(packing.pack(q, bits, signed=signed), naive_pack(q, bits))


@pytest.mark.parametrize("bits", [1, 5, 6, 7])
def test_other_widths_round_trip(bits, rng):
    q = rng.integers(0, 1 << bits, size=(5, 37))
    np.testing.assert_array_equal(packing.unpack(packing.pack(q, bits), bits, 37), q)
    np.testing.assert_array_equal(packing.pack(q, bits), naive_pack(q, bits))


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
