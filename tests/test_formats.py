"""Float formats against ml_dtypes (and NumPy's own float16): exhaustive and properties."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from refquant import formats
from tests.conftest import need

pytestmark = pytest.mark.oracle   # ml_dtypes is the oracle of every float format

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


# The float32 bit patterns where E8M0's "value" and "bits" roundings differ (formats' docstring:
# the subnormals strictly between 2^-127 and 1.5·2^-127).
E8M0_BAND = (0x00400001, 0x005FFFFF)


def e8m0_oracle_rounding() -> str:
    """Which documented E8M0 rounding the installed ml_dtypes follows: ml_dtypes changed its
    cast in 0.7.0 ("bits" before, "value" since), so the oracle comparison holds it to the
    rule it states, read off three inputs of the band, and fails if it follows neither."""
    probe = np.array([E8M0_BAND[0], 0x00500000, E8M0_BAND[1]], np.uint32).view(np.float32)
    o = oracle_encode(probe, "e8m0")
    rules = [r for r in ("value", "bits") if np.array_equal(formats.encode(probe, "e8m0", rounding=r), o)]
    assert len(rules) == 1, f"ml_dtypes {need('ml_dtypes').__version__} gives {o} on the band: neither rule"
    return rules[0]


def encode_as_oracle(x, fmt):
    """``formats.encode`` under the rule the oracle follows (only E8M0 has more than one)."""
    return formats.encode(x, fmt, rounding=e8m0_oracle_rounding() if fmt == "e8m0" else "value")


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
    np.testing.assert_array_equal(encode_as_oracle(x, fmt), oracle_encode(x, fmt))


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
    np.testing.assert_array_equal(encode_as_oracle(x, fmt), oracle_encode(x, fmt))


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
    """Each E8M0 rounding on the edges worked by hand in formats' docstring (value / bits /
    floor / ceil): ties, the subnormal band, the bottom and top of the range, and what has no
    E8M0 value (zero, negatives, Inf, NaN); ``saturate`` keeps finite overflow and +Inf at 254."""
    f32 = lambda v: float(np.float32(v))
    cases = [   # (x, (value, bits, floor, ceil))
        (1.0, (127, 127, 127, 127)), (0.25, (125, 125, 125, 125)), (1.5, (128, 128, 127, 128)),
        (f32(np.nextafter(np.float32(1.5), np.float32(0))), (127, 127, 127, 128)),
        (f32(3 * 2.0**-5), (124, 124, 123, 124)),                # 1.5·2^-4: the tie goes up to 2^-3
        (f32(1.25 * 2.0**-127), (0, 1, 0, 1)), (f32(1.5 * 2.0**-127), (1, 1, 0, 1)),
        (f32(2.0**-127), (0, 0, 0, 0)), (f32(2.0**-149), (0, 0, 0, 0)), (f32(2.0**-126), (1, 1, 1, 1)),
        (2.0**127, (254, 254, 254, 254)), (f32(1.5 * 2.0**127), (255, 255, 254, 255)),
        (f32(np.finfo(np.float32).max), (255, 255, 254, 255)),
        (np.inf, (255,) * 4), (np.nan, (255,) * 4), (0.0, (255,) * 4), (-0.0, (255,) * 4), (-1.0, (255,) * 4),
        (-np.inf, (255,) * 4),
    ]
    x = np.array([c[0] for c in cases], np.float32)
    for i, rule in enumerate(formats.E8M0_ROUNDINGS):
        want = np.array([c[1][i] for c in cases])
        np.testing.assert_array_equal(formats.encode(x, "e8m0", rounding=rule), want, err_msg=rule)
        sat = np.where(np.isin(x, [np.inf, f32(1.5 * 2.0**127), f32(np.finfo(np.float32).max)]), 254, want)
        np.testing.assert_array_equal(formats.encode(x, "e8m0", rounding=rule, saturate=True), sat, err_msg=rule)
    assert formats.encode(x, "e8m0").tolist() == formats.encode(x, "e8m0", rounding="value").tolist()
    with pytest.raises(ValueError, match="rounding"):
        formats.encode(x, "e8m0", rounding="nearest")
    with pytest.raises(ValueError, match="rounding"):
        formats.encode(x, "fp16", rounding="floor")


def _e8m0_differences(bits: np.ndarray) -> np.ndarray:
    """The bit patterns among ``bits`` where refquant's default E8M0 rounding and the installed
    ml_dtypes give different codes."""
    x = bits.view(np.float32)
    return bits[formats.encode(x, "e8m0") != oracle_encode(x, "e8m0")]


def _check_e8m0_differences(bits: np.ndarray):
    """The differences are exactly the documented band (ml_dtypes < 0.7, rule "bits") or none
    (ml_dtypes >= 0.7, rule "value"): listed and counted, not assumed from the version."""
    diff = _e8m0_differences(bits)
    band = bits[(bits >= E8M0_BAND[0]) & (bits <= E8M0_BAND[1])]
    assert band.size > 0
    expected = band if e8m0_oracle_rounding() == "bits" else band[:0]
    assert diff.size == expected.size and np.array_equal(np.sort(diff), np.sort(expected)), (
        f"{diff.size} differences, e.g. {[hex(int(b)) for b in diff[:5]]}; expected {expected.size}")


def test_e8m0_differs_from_the_oracle_only_on_the_documented_band():
    """Every positive float32 subnormal, every bit pattern of [1, 2) and of the top binade,
    and every 4093rd pattern otherwise (the slow tier checks all of them)."""
    parts = [np.arange(0, 1 << 23), np.arange(0x3F800000, 0x40000000), np.arange(0x7F000000, 0x7F800001),
             np.arange(0, 1 << 32, 4093)]
    _check_e8m0_differences(np.concatenate(parts).astype(np.uint32))


@pytest.mark.slow   # 2^32 casts on each side (about a minute)
def test_e8m0_differs_from_the_oracle_only_on_the_documented_band_exhaustively():
    """Every float32 bit pattern."""
    diffs = []
    for hi in range(256):
        bits = (np.arange(1 << 24, dtype=np.uint32) | np.uint32(hi << 24))
        diffs.append(_e8m0_differences(bits))
    diff = np.concatenate(diffs)
    if e8m0_oracle_rounding() == "bits":
        np.testing.assert_array_equal(diff, np.arange(E8M0_BAND[0], E8M0_BAND[1] + 1, dtype=np.uint32))
    else:
        assert diff.size == 0, [hex(int(b)) for b in diff[:5]]


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
