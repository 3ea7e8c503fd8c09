"""Float formats against ml_dtypes (and NumPy's own float16): exhaustive and properties."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from refquant import formats
from tests.conftest import need

# format -> (oracle dtype, ml_dtypes' name for it or NumPy's float16; storage dtype of the bit patterns)
ORACLES = {
    "fp16": ("float16", np.uint16),       # NumPy's float16 is the oracle for binary16
    "bf16": ("bfloat16", np.uint16),
    "fp8_e5m2": ("float8_e5m2", np.uint8),
    "fp8_e4m3fn": ("float8_e4m3fn", np.uint8),
    "fp4_e2m1": ("float4_e2m1fn", np.uint8),
    "e8m0": ("float8_e8m0fnu", np.uint8),
}
FMTS = list(ORACLES)


def oracle_dtype(fmt):
    name = ORACLES[fmt][0]
    return np.float16 if name == "float16" else getattr(need("ml_dtypes"), name)


def oracle_encode(x, fmt):
    dtype, storage = oracle_dtype(fmt), ORACLES[fmt][1]
    with np.errstate(all="ignore"):
        return np.asarray(x, np.float32).astype(dtype).view(storage)


def all_patterns(fmt):
    width = formats.get_format(fmt).width
    return np.arange(1 << width, dtype=np.uint16 if width == 16 else np.uint8)


def same_floats(a, b):
    return np.array_equal(a, b, equal_nan=True) and np.array_equal(np.signbit(a[~np.isnan(a)]),
                                                                     np.signbit(b[~np.isnan(b)]))


@pytest.mark.parametrize("fmt", FMTS)
def test_decode_every_bit_pattern_like_the_oracle(fmt):
    bits = all_patterns(fmt)
    expected = bits.view(oracle_dtype(fmt)).astype(np.float32)
    got = formats.decode(bits, fmt)
    assert got.dtype == np.float32
    assert same_floats(got, expected)


@pytest.mark.parametrize("fmt", FMTS)
def test_encode_every_float16_value_like_the_oracle(fmt):
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)   # incl. NaNs, Infs, subnormals
    np.testing.assert_array_equal(formats.encode(x, fmt), oracle_encode(x, fmt))


@st.composite
def float32_inputs(draw, fmt):
    """Random float32 plus the hard cases: exact ties between neighbours, values past the
    maximum, the subnormal range, NaN and Inf."""
    vals = formats.representable_values(fmt).astype(np.float64)
    vals = vals[vals >= 0]
    kind = draw(st.sampled_from(["any", "tie", "beyond", "tiny"]))
    if kind == "any":
        return draw(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True))
    if kind == "tie":
        i = draw(st.integers(0, len(vals) - 2))
        mid = np.float32((vals[i] + vals[i + 1]) / 2)
        return float(mid) * draw(st.sampled_from([1, -1]))
    if kind == "beyond":
        f = draw(st.floats(1.0, 3.0))
        return float(np.float32(min(vals[-1] * f, 3e38))) * draw(st.sampled_from([1, -1]))
    tiny = float(np.float32(1e-36))
    return draw(st.floats(-tiny, tiny, width=32, allow_subnormal=True))


@pytest.mark.parametrize("fmt", FMTS)
@given(data=st.data())
def test_encode_float32_like_the_oracle(fmt, data):
    x = np.array(data.draw(st.lists(float32_inputs(fmt), min_size=1, max_size=16)), np.float32)
    np.testing.assert_array_equal(formats.encode(x, fmt), oracle_encode(x, fmt))


@pytest.mark.parametrize("fmt", FMTS)
def test_decode_encode_is_identity_on_representable_values(fmt):
    v = formats.representable_values(fmt)
    np.testing.assert_array_equal(formats.round_to(v, fmt), v)


@pytest.mark.parametrize("fmt", [f for f in FMTS if f != "e8m0"])
@given(data=st.data())
def test_encode_is_monotone(fmt, data):
    xs = data.draw(hnp.arrays(np.float32, st.integers(2, 32),
                              elements=st.floats(-1e5, 1e5, width=32, allow_subnormal=True)))
    xs = np.sort(xs)
    r = formats.round_to(xs, fmt, saturate=True)
    assert np.all(np.diff(r.astype(np.float64)) >= 0)


@pytest.mark.parametrize("fmt", FMTS)
@given(data=st.data())
def test_relative_error_in_the_normal_range(fmt, data):
    f = formats.get_format(fmt)
    lo, hi = 2.0**f.emin, f.max
    x = data.draw(st.floats(lo, hi, width=32))
    r = float(formats.round_to(np.array([x], np.float32), fmt)[0])
    assert abs(r - x) <= abs(x) * 2.0 ** -(f.man_bits + 1)


def test_golden_values():
    enc = lambda v, fmt: int(formats.encode(np.array([v], np.float32), fmt)[0])
    assert enc(1.0, "bf16") == 0x3F80 and enc(-2.0, "fp16") == 0xC000
    assert enc(448.0, "fp8_e4m3fn") == 0x7E            # S.1111.110 = 1.75 * 2^8
    assert enc(464.0, "fp8_e4m3fn") == 0x7E            # tie between 448 and (NaN) 480: to even
    assert enc(465.0, "fp8_e4m3fn") == 0x7F            # overflow -> NaN (no Inf)
    assert enc(2.0**-9, "fp8_e4m3fn") == 0x01          # smallest subnormal: 2^-6 * 1/8
    assert enc(57344.0, "fp8_e5m2") == 0x7B and enc(1e6, "fp8_e5m2") == 0x7C   # max, then Inf
    assert enc(2.5, "fp4_e2m1") == 0b0100              # tie 2 | 3 -> 2 (even mantissa)
    assert enc(5.0, "fp4_e2m1") == 0b0110              # tie 4 | 6 -> 4
    assert enc(-100.0, "fp4_e2m1") == 0b1111           # saturates to -6
    assert enc(1.0, "e8m0") == 127 and enc(0.25, "e8m0") == 125 and enc(0.0, "e8m0") == 0xFF
    assert formats.get_format("fp8_e4m3fn").max == 448 and formats.get_format("fp4_e2m1").max == 6


def test_saturate_option():
    x = np.array([1000.0, -np.inf, np.nan], np.float32)
    r = formats.round_to(x, "fp8_e4m3fn", saturate=True)
    assert r[0] == 448 and r[1] == -448 and np.isnan(r[2])


def test_scaled_fp8_per_tensor_and_channel():
    w = np.array([[1.0, -4.0], [0.5, 0.25]], np.float32)
    t = formats.quantize(w, "fp8_e4m3fn", granularity="tensor")
    assert t.scales.item() == np.float32(4.0 / 448)
    c = formats.quantize(w, "fp8_e4m3fn", granularity="channel", axis=0)
    np.testing.assert_allclose(c.scales[:, 0], np.float32([4.0 / 448, 0.5 / 448]))
    # the largest element of each row lands exactly on ±448
    np.testing.assert_array_equal(formats.decode(c.codes, "fp8_e4m3fn")[[0, 1], [1, 0]], [-448, 448])
    np.testing.assert_allclose(c.dequantize(), w, rtol=2**-4)


def test_bad_input():
    with pytest.raises(ValueError, match="fmt must be one of"):
        formats.encode(np.ones(2, np.float32), "fp6")
    with pytest.raises(TypeError, match="x must be a floating-point"):
        formats.encode(np.ones(2, np.int32), "bf16")
    with pytest.raises(ValueError, match="bits must be in"):
        formats.decode(np.array([16], np.uint8), "fp4_e2m1")
    with pytest.raises(ValueError, match="beyond the fp16 range"):
        formats.quantize(np.array([1e6], np.float32), "fp16")


def test_messages_are_exact():
    with pytest.raises(TypeError, match=r"^bits must be an unsigned integer array, got float32$"):
        formats.decode(np.ones(2, np.float32), "bf16")
    with pytest.raises(TypeError, match=r"^bits must be an unsigned integer array, got list$"):
        formats.decode([1, 2], "bf16")
    with pytest.raises(ValueError, match=r"^bits must be in \[0, 15\] for fp4_e2m1, got \[3, 16\]$"):
        formats.decode(np.array([3, 16], np.uint8), "fp4_e2m1")
    with pytest.raises(ValueError, match=r"^fp32 has too many values to list$"):
        formats.representable_values("fp32")
    with pytest.raises(ValueError, match=r"^w has \|values\| up to 1e\+06, beyond the fp16 range \(max 65504\)$"):
        formats.quantize(np.array([1e6], np.float32), "fp16")
    with pytest.raises(ValueError, match=r"^axis=2 is out of range for w with 2 dimension\(s\)$"):
        formats.quantize(np.ones((2, 2), np.float32), "fp8_e4m3fn", granularity="channel", axis=2)
    with pytest.raises(ValueError, match=r"^granularity must be one of"):
        formats.quantize(np.ones((2, 2), np.float32), "fp8_e4m3fn", granularity="group")
    with pytest.raises(ValueError, match=r"^w contains 1 non-finite"):
        formats.quantize(np.array([1.0, np.nan], np.float32), "fp8_e4m3fn", granularity="tensor")


def test_fp32_is_the_identity_on_bits():
    x = np.array([0.0, -0.0, 1.5, -3e38, 1e-45, np.inf, np.nan], np.float32)
    bits = formats.encode(x, "fp32")
    assert bits.dtype == np.uint32
    np.testing.assert_array_equal(bits, x.view(np.uint32))
    back = formats.decode(bits, "fp32")
    assert back.dtype == np.float32 and same_floats(back, x)
    assert formats.encode(1.5, "fp32").item() == np.float32(1.5).view(np.uint32)   # Python scalars too


def test_range_edge_of_unscaled_formats():
    """Exactly the maximum, and values that round down to it, are stored; beyond is refused."""
    assert formats.quantize(np.array([65504.0], np.float32), "fp16").dequantize()[0] == 65504
    assert formats.quantize(np.array([65519.0], np.float32), "fp16").dequantize()[0] == 65504   # rounds to max
    with pytest.raises(ValueError, match="beyond the fp16 range"):
        formats.quantize(np.array([65520.0], np.float32), "fp16")                              # rounds to Inf
    assert formats.quantize(np.array([3e38], np.float32), "fp32").dequantize()[0] == np.float32(3e38)


def test_e8m0_rounding_edges():
    """E8M0 rounds the float32 exponent field up from 1.5 (ties up), a subnormal input up from
    its exponent as soon as its field exceeds 0x400000 (1.25·2^-127 -> 2^-126, as ml_dtypes);
    non-positive and too-large values as ml_dtypes' float8_e8m0fnu does."""
    cases = {2.0**-127: 0x00, np.float32(2.0**-127 * 1.5): 0x01, np.float32(2.0**-127 * 1.25): 0x01,
             1.0: 127, 1.5: 128, np.float32(1.4999999): 127, 2.0**127: 254, np.float32(1.5 * 2.0**127): 0xFF,
             0.0: 0xFF, -1.0: 0xFF}
    x = np.array(list(cases), np.float32)
    got = formats.encode(x, "e8m0")
    np.testing.assert_array_equal(got, list(cases.values()))
    np.testing.assert_array_equal(got, oracle_encode(x, "e8m0"))


def test_scaled_formats_record_their_layout_and_never_overflow():
    w = np.array([[[1.0, -4.0], [0.0, 0.0]], [[0.5, 1e4], [2.0, -2.0]]], np.float32)   # (2, 2, 2)
    for axis in (0, 1, 2, -1):
        qt = formats.quantize(w, "fp8_e4m3fn", granularity="channel", axis=axis)
        assert qt.meta == {"kind": "float", "fmt": "fp8_e4m3fn", "granularity": "channel", "axis": axis}
        amax = np.max(np.abs(w), axis=tuple(i for i in range(3) if i != axis % 3), keepdims=True)
        np.testing.assert_array_equal(qt.scales, np.where(amax > 0, amax / 448, 1.0).astype(np.float32))
        assert np.isfinite(qt.dequantize()).all()
        np.testing.assert_allclose(qt.dequantize(), w, rtol=2**-4, atol=0)
    t = formats.quantize(np.zeros((2, 3), np.float32), "fp8_e5m2", granularity="tensor")
    assert t.scales.item() == 1.0 and t.meta["axis"] is None and not t.dequantize().any()   # all-zero: scale 1
    n = formats.quantize(np.ones((1, 2), np.float32), "bf16")
    assert n.scales is None and n.meta == {"kind": "float", "fmt": "bf16", "granularity": "none", "axis": None}


def test_error_bound_is_half_an_ulp_by_hand():
    """fp16: 10 mantissa bits, smallest normal 2^-14: half an ulp is 2^-11 at 1, 2^-10 at 2..4,
    and the subnormal half step 2^-25 at and below 2^-14; e4m3: 3 bits, emin -6."""
    x = np.array([1.0, 1.999, 2.0, 3.5, 2.0**-14, 2.0**-20, 0.0, -1.5])
    np.testing.assert_array_equal(formats.error_bound(x, "fp16"),
                                  [2.0**-11, 2.0**-11, 2.0**-10, 2.0**-10, 2.0**-25, 2.0**-25, 2.0**-25, 2.0**-11])
    np.testing.assert_array_equal(formats.error_bound(np.array([1.0, 448.0, 2.0**-9]), "fp8_e4m3fn"),
                                  [2.0**-4, 2.0**4, 2.0**-10])
    for fmt in ("fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"):   # and it bounds the real rounding
        v = np.random.default_rng(0).standard_normal(1000) * 4
        assert np.all(np.abs(formats.round_to(v.astype(np.float32), fmt) - v.astype(np.float32))
                      <= formats.error_bound(v.astype(np.float32), fmt))
