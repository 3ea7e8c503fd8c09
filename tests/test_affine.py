import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from refquant import affine
from tests.conftest import TOL
from tests.oracles import refused
from tests.strategies import float_arrays

TINY = 2.0**-149  # float32 subnormal step: absolute slack when ŵ = s*q is itself subnormal


@st.composite
def affine_case(draw, *, allow_subnormal=True):
    """A weight array plus affine arguments that fit it."""
    bits = draw(st.integers(2, 8))
    sym = draw(st.booleans())
    full_range = sym and draw(st.booleans())
    granularity = draw(st.sampled_from(["tensor", "channel", "group"]))
    kw = dict(bits=bits, sym=sym, full_range=full_range, granularity=granularity)
    if granularity == "group":
        g = draw(st.integers(1, 8))
        pad = draw(st.booleans())
        w = draw(float_arrays(last_multiple_of=1 if pad else g))
        kw.update(group_size=g, pad=pad)
    else:
        w = draw(float_arrays())
        if granularity == "channel":
            kw["axis"] = draw(st.integers(-w.ndim, w.ndim - 1))
    if not allow_subnormal:
        w = np.where(np.abs(w) < 1e-30, 0, w).astype(w.dtype)
    return w, kw


def exact_codes(w, qt):
    """Unclipped codes round(w/s) + z computed independently in float64, and the clip mask."""
    m = qt.meta
    s = affine.step_sizes(qt) * np.sign(np.broadcast_to(_expand(qt.scales, qt), qt.shape))
    z = 0 if qt.zeros is None else np.broadcast_to(_expand(qt.zeros.astype(np.float64), qt), qt.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.where(s == 0, 0.0, np.round(w.astype(np.float64) / s)) + z
    lo, hi = affine.code_range(m["bits"], sym=m["sym"], full_range=m["full_range"])
    return raw, (raw < lo) | (raw > hi)


def _expand(a, qt):
    if qt.meta["granularity"] == "group":
        return np.repeat(a, qt.meta["group_size"], axis=-1)[..., : qt.shape[-1]]
    return a


@given(affine_case())
def test_error_bound_half_step_for_unclipped(case):
    """|w - ŵ| <= |s|/2 for every element whose code was not clipped."""
    w, kw = case
    qt = affine.quantize(w, **kw)
    w_hat = qt.dequantize()
    assert w_hat.shape == w.shape and w_hat.dtype == np.float32
    err = np.abs(w.astype(np.float64) - w_hat)
    s = affine.step_sizes(qt)
    _, clipped = exact_codes(w, qt)
    bound = s / 2 * (1 + TOL["dequant_rel"]) + TINY
    assert np.all(err[~clipped] <= bound[~clipped])
    if kw["sym"] and not kw["full_range"]:
        assert not clipped.any(), "absmax scaling must never clip the restricted symmetric range"
    # clipped elements (the extreme of an asymmetric / full-range block) stay within one step
    assert np.all(err <= s * (1 + TOL["dequant_rel"]) + TINY)


@given(affine_case())
def test_codes_in_range_and_nbytes_hand_counted(case):
    w, kw = case
    qt = affine.quantize(w, **kw)
    q = affine.codes(qt)
    lo, hi = affine.code_range(kw["bits"], sym=kw["sym"], full_range=kw["full_range"])
    assert q.min() >= lo and q.max() <= hi
    # hand count: packed rows of ceil(n*b/8) bytes, one fp32 scale (+ uint8 zero) per block
    n = w.shape[-1]
    if kw["granularity"] == "group":
        n = math.ceil(n / kw["group_size"]) * kw["group_size"]
        blocks = math.prod(w.shape[:-1]) * n // kw["group_size"]
    elif kw["granularity"] == "channel":
        blocks = w.shape[kw["axis"]]
    else:
        blocks = 1
    rows = math.prod(w.shape[:-1])
    expected = rows * math.ceil(n * kw["bits"] / 8) + blocks * (4 + (0 if kw["sym"] else 1))
    assert qt.nbytes == expected


@given(affine_case(allow_subnormal=False))
def test_requantizing_the_grid_gives_the_same_codes(case):
    """ŵ lies on its own grid: quantizing it again reproduces the codes.

    Symmetric: with freshly computed scales (absmax of ŵ is the same step * qmax).
    Asymmetric: the zero point is rounded, so the recomputed range can shift by a step;
    there the invariant is with the grid held fixed (the same scales and zeros).
    """
    w, kw = case
    qt = affine.quantize(w, **kw)
    w_hat = qt.dequantize()
    if kw["sym"]:
        again = affine.codes(affine.quantize(w_hat, **kw))
    else:
        wb = w_hat
        scales, zeros = qt.scales, qt.zeros.astype(np.int64)
        if kw["granularity"] == "group":
            g = kw["group_size"]
            pad = (-w.shape[-1]) % g
            wb = np.concatenate([w_hat, np.zeros(w.shape[:-1] + (pad,), np.float32)], axis=-1)
            wb = wb.reshape(wb.shape[:-1] + (-1, g))
            scales, zeros = scales[..., None], zeros[..., None]
        again = affine.quantize_codes(wb, scales, zeros, kw["bits"], sym=False).reshape(qt.meta["padded_shape"])
    np.testing.assert_array_equal(again, affine.codes(qt))


@given(affine_case(allow_subnormal=False), st.integers(5, 40))
def test_clip_search_never_worse_than_absmax(case, grid):
    w, kw = case
    base = affine.quantize(w, **kw)
    searched = affine.quantize(w, clip_search=True, grid=grid, **kw)
    mse = lambda qt: np.sum((qt.dequantize().astype(np.float64) - w) ** 2)
    assert mse(searched) <= mse(base) * (1 + 1e-9) + 1e-30


def test_clip_search_clips_an_outlier():
    # 255 inliers in [-1, 1] all round to 0 on the absmax grid (step 8/3): clipping the
    # range to 0.2 * 8 costs the outlier (8 - 1.6)^2 = 41 but saves ~255/3 = 85 on the rest.
    w = np.concatenate([np.linspace(-1, 1, 255), [8.0]]).astype(np.float32)[None, :]
    base = affine.quantize(w, 3, granularity="channel")
    searched = affine.quantize(w, 3, granularity="channel", clip_search=True)
    assert abs(searched.scales[0, 0]) < abs(base.scales[0, 0])
    mse = lambda qt: np.mean((qt.dequantize() - w) ** 2)
    assert mse(searched) < 0.6 * mse(base)


# --- golden values, worked out by hand ----------------------------------------------

def test_golden_int8_tensor_symmetric():
    w = np.array([0.5, -1.0, 0.25, 1.0], np.float32)
    qt = affine.quantize(w, 8)
    # s = 1/127; 0.5*127 = 63.5 -> 64 (half to even), -127, 31.75 -> 32, 127
    np.testing.assert_array_equal(affine.codes(qt), [64, -127, 32, 127])
    np.testing.assert_allclose(qt.scales, [1 / 127], rtol=1e-7)
    np.testing.assert_allclose(qt.dequantize(), np.array([64, -127, 32, 127]) / 127, rtol=1e-6)
    assert qt.nbytes == 4 + 4


def test_golden_asymmetric_2bit():
    w = np.array([-1.0, 0.0, 0.5, 2.0], np.float32)
    qt = affine.quantize(w, 2, sym=False)
    # lo=-1, hi=2, s=1, z=round(1)=1; q = round(w)+1 = [0, 1, 0+1, 3] (0.5 rounds to 0)
    np.testing.assert_array_equal(affine.codes(qt), [0, 1, 1, 3])
    assert qt.zeros.item() == 1 and qt.scales.item() == 1.0
    np.testing.assert_array_equal(qt.dequantize(), [-1, 0, 0, 2])
    assert qt.codes.tolist() == [0b11010100]


def test_golden_group_3bit():
    w = np.array([[1.0, -3.0, 0.25, 0.7]], np.float32)
    qt = affine.quantize(w, 3, granularity="group", group_size=2)
    # group 1: s = 3/3 = 1, q = [1, -3]; group 2: s = 0.7/3, 0.25/s = 1.07 -> 1, q = [1, 3]
    np.testing.assert_array_equal(affine.codes(qt), [[1, -3, 1, 3]])
    np.testing.assert_allclose(qt.dequantize(), [[1, -3, 0.7 / 3, 0.7]], rtol=1e-6)
    assert qt.scales.shape == (1, 2)


def test_golden_full_range_4bit():
    w = np.array([0.5, -0.25, 1.0, -0.9], np.float32)
    qt = affine.quantize(w, 4, full_range=True)
    # m = 1.0 -> s = 1/-8; q = [-4, 2, -8, round(7.2)=7]
    assert qt.scales.item() == -0.125
    np.testing.assert_array_equal(affine.codes(qt), [-4, 2, -8, 7])
    np.testing.assert_array_equal(qt.dequantize(), [0.5, -0.25, 1.0, -0.875])


def test_golden_channel_axis1():
    w = np.array([[1.0, 4.0], [-2.0, 8.0]], np.float32)
    qt = affine.quantize(w, 8, granularity="channel", axis=1)
    np.testing.assert_allclose(qt.scales, [[2 / 127, 8 / 127]], rtol=1e-7)
    np.testing.assert_array_equal(affine.codes(qt), [[round(127 / 2), round(4 * 127 / 8)], [-127, 127]])


def test_padding_crops_back():
    w = np.arange(1, 7, dtype=np.float32).reshape(1, 6)
    qt = affine.quantize(w, 4, granularity="group", group_size=4, pad=True)
    assert qt.meta["padded_shape"] == (1, 8) and qt.scales.shape == (1, 2)
    assert qt.dequantize().shape == (1, 6)
    np.testing.assert_allclose(qt.dequantize(), w, atol=6 / 7 / 2 + 1e-6)


def test_all_zero_block_and_scale_dtype():
    w = np.zeros((2, 8), np.float32)
    w[1] = 0.875  # s = 0.875 / 7 = 0.125, exact in float16
    qt = affine.quantize(w, 4, granularity="group", group_size=8, scale_dtype=np.float16)
    assert qt.scales.dtype == np.float16 and qt.scales[0, 0] == 0
    np.testing.assert_array_equal(qt.dequantize(), w)


def test_quantizedtensor_is_read_only():
    qt = affine.quantize(np.ones((2, 4), np.float32), 4)
    with pytest.raises(ValueError):
        qt.codes[0] = 1
    with pytest.raises(AttributeError):
        qt.scheme = "x"


# --- bad input: each names the argument ---------------------------------------------

BAD_INPUTS = [
    (np.array([1.0, np.nan]), {}, ValueError, "w contains 1 non-finite"),
    (np.array([1.0, np.inf], np.float32), {}, ValueError, "w contains 1 non-finite"),
    (np.zeros((0, 4), np.float32), {}, ValueError, "w is empty"),
    (np.array(1.0), {}, ValueError, "w must have at least 1 dimension"),
    (np.ones(4, np.int32), {}, TypeError, "w must be a floating-point array"),
    (np.ones(4), dict(bits=1), ValueError, "bits must be one of 2..8"),
    (np.ones(4), dict(bits=9), ValueError, "bits must be one of 2..8"),
    (np.ones(4), dict(bits=4.0), TypeError, "bits must be an integer"),
    (np.ones((2, 6)), dict(granularity="group", group_size=4), ValueError, "group_size=4 does not divide"),
    (np.ones((2, 6)), dict(granularity="group"), ValueError, "needs group_size"),
    (np.ones((2, 6)), dict(granularity="group", group_size=0), ValueError, "group_size must be a positive"),
    (np.ones((2, 6)), dict(group_size=2), ValueError, "group_size=2 is only meaningful"),
    (np.ones((2, 6)), dict(granularity="row"), ValueError, "granularity must be one of"),
    (np.ones((2, 6)), dict(granularity="channel", axis=2), ValueError, "axis=2 is out of range"),
    (np.ones((2, 6)), dict(sym=False, full_range=True), ValueError, "full_range=True applies"),
    (np.ones((2, 6)), dict(scale_dtype=np.int8), ValueError, "scale_dtype"),
    (np.full(4, 1e6), dict(bits=4, scale_dtype=np.float16), ValueError, "overflows scale_dtype"),
]


def test_bad_input_raises_with_a_clear_message():
    for i, (w, kw, exc, match) in enumerate(BAD_INPUTS):
        refused(f"case {i}: {kw}", exc, match, affine.quantize, w, **kw)


# --- the whole quantizer against a naive loop over blocks ------------------------------------

def naive_blocks(shape, granularity, axis, group_size):
    """Index arrays of the blocks that share a scale, in the order scales are stored."""
    idx = np.arange(math.prod(shape)).reshape(shape)
    if granularity == "tensor":
        return [idx.reshape(-1)]
    if granularity == "channel":
        return [np.take(idx, i, axis=axis).reshape(-1) for i in range(shape[axis])]
    rows = idx.reshape(-1, shape[-1])
    return [r[j:j + group_size] for r in rows for j in range(0, shape[-1], group_size)]


def naive_params(v, bits, sym, full_range, ratio, scale_dtype):
    """Scale (stored dtype) and zero for one block ``v`` (float64), by the module's formulas."""
    qmax = (1 << bits) - 1 if not sym else (1 << (bits - 1)) - 1
    tiny = float(np.finfo(scale_dtype).smallest_subnormal)
    store = lambda s, nonzero: scale_dtype(math.copysign(tiny, s)) if nonzero and scale_dtype(s) == 0 \
        else scale_dtype(s)  # noqa: E731
    if sym and full_range:
        m = max(v, key=abs) * ratio if len(v) else 0.0       # first of the largest magnitudes
        return store(m / -(1 << (bits - 1)), m != 0), None
    if sym:
        amax = max(abs(x) for x in v) * ratio
        return store(amax / qmax, amax > 0), None
    lo, hi = min(min(v), 0.0) * ratio, max(max(v), 0.0) * ratio
    s = store((hi - lo) / qmax, hi > lo)
    z = 0 if s == 0 else int(min(max(round(-lo / float(s)), 0), qmax))   # round: half to even, as np.round
    return s, z


def naive_codes(v, s, z, bits, sym, full_range):
    lo = -(1 << (bits - 1)) if sym and full_range else (-(1 << (bits - 1)) + 1 if sym else 0)
    hi = (1 << (bits - 1)) - 1 if sym else (1 << bits) - 1
    out = []
    for x in v:
        q = 0 if s == 0 else round(x / float(s))
        out.append(min(max(q + (z or 0), lo), hi))
    return out


def naive_quantize(w, bits, sym, full_range, granularity, axis, group_size, scale_dtype, clip_grid=None,
                   max_shrink=0.8):
    flat = w.astype(np.float64).reshape(-1)
    codes, scales, zeros = np.zeros(flat.size, np.int64), [], []
    for b in naive_blocks(w.shape, granularity, axis, group_size):
        v = [float(x) for x in flat[b]]
        best = None
        ratios = [1.0] + ([1.0 - i / clip_grid for i in range(1, int(max_shrink * clip_grid) + 1)] if clip_grid else [])
        for r in ratios:
            s, z = naive_params(v, bits, sym, full_range, r, scale_dtype)
            q = naive_codes(v, s, z, bits, sym, full_range)
            err = sum((float(np.float32(qi - (z or 0)) * np.float32(s)) - x) ** 2 for qi, x in zip(q, v))
            if best is None or err < best[0]:
                best = (err, s, z, q)
        _, s, z, q = best
        codes[b] = q
        scales.append(s)
        zeros.append(z)
    return codes.reshape(w.shape), np.array(scales, scale_dtype), None if sym else np.array(zeros)


@st.composite
def naive_case(draw):
    bits = draw(st.integers(2, 8))
    sym = draw(st.booleans())
    full_range = sym and draw(st.booleans())
    granularity = draw(st.sampled_from(["tensor", "channel", "group"]))
    rows, n = draw(st.integers(1, 4)), draw(st.sampled_from([8, 16, 24]))
    w = draw(st.lists(st.sampled_from([0.0, 1.0, -1.0, 0.5, -2.5, 3.0, 0.1, -0.3, 7.25, 1e-3]),
                      min_size=rows * n, max_size=rows * n))
    w = (np.array(w).reshape(rows, n) * draw(st.sampled_from([1.0, 1e-6, 300.0]))).astype(np.float32)
    axis = draw(st.sampled_from([0, 1, -1]))
    group = draw(st.sampled_from([4, 8])) if granularity == "group" else None
    scale_dtype = draw(st.sampled_from([np.float16, np.float32]))
    grid = draw(st.sampled_from([None, 5]))
    return w, bits, sym, full_range, granularity, axis, group, scale_dtype, grid


@given(naive_case())
def test_quantize_matches_a_naive_loop_over_blocks(case):
    """Codes, scales and zeros bit for bit against a per-block loop written from the
    module's formulas: every granularity, sign convention, scale dtype and the clip search."""
    w, bits, sym, full_range, granularity, axis, group, scale_dtype, grid = case
    try:
        qt = affine.quantize(w, bits, sym=sym, full_range=full_range, granularity=granularity, axis=axis,
                             group_size=group, scale_dtype=scale_dtype, clip_search=grid is not None,
                             grid=grid or 100)
    except ValueError as e:   # fp16 scales of 300-sized weights on a 2-bit grid can overflow: say so
        assert "overflows scale_dtype=float16" in str(e) and scale_dtype is np.float16
        return
    q, s, z = naive_quantize(w, bits, sym, full_range, granularity, axis % w.ndim, group, scale_dtype, grid)
    np.testing.assert_array_equal(affine.codes(qt), q)
    assert qt.scales.dtype == np.dtype(scale_dtype)
    np.testing.assert_array_equal(qt.scales.reshape(-1), s)
    if sym:
        assert qt.zeros is None
    else:
        assert qt.zeros.dtype == np.uint8
        np.testing.assert_array_equal(qt.zeros.reshape(-1), z)


def test_code_ranges_by_hand():
    assert [affine.code_range(b) for b in (2, 4, 8)] == [(-1, 1), (-7, 7), (-127, 127)]
    assert [affine.code_range(b, full_range=True) for b in (2, 4, 8)] == [(-2, 1), (-8, 7), (-128, 127)]
    assert [affine.code_range(b, sym=False) for b in (2, 4, 8)] == [(0, 3), (0, 15), (0, 255)]
    assert affine.code_range(3, sym=False, full_range=True) == (0, 7)


def test_messages_name_the_fix():
    with pytest.raises(ValueError, match=r"pass pad=True to zero-pad each row to 8$"):
        affine.quantize(np.ones((2, 6)), granularity="group", group_size=4)
    with pytest.raises(ValueError, match=r"a scale of 142857 overflows scale_dtype=float16; "
                                         r"use scale_dtype=np.float32 or rescale the weights"):
        affine.quantize(np.full(4, 1e6), bits=4, scale_dtype=np.float16)
    with pytest.raises(ValueError, match=r"^full_range=True applies to symmetric quantization only \(got sym=False\)$"):
        affine.quantize(np.ones(4), sym=False, full_range=True)
    with pytest.raises(ValueError, match=r"^granularity='group' needs group_size$"):
        affine.quantize(np.ones(4), granularity="group")
    with pytest.raises(ValueError, match=r"scale_dtype must be float16 or float32, got int8"):
        affine.quantize(np.ones(4), scale_dtype=np.int8)
    with pytest.raises(ValueError, match=r"^grid must be a positive"):
        affine.quantize(np.ones(4), clip_search=True, grid=0)
    with pytest.raises(ValueError, match=r"max_shrink must be in \[0, 1\), got 1"):
        affine.quantize(np.ones(4), clip_search=True, max_shrink=1)


def test_error_bound_by_hand():
    """Half a step for the restricted symmetric grid, a whole step where clipping can happen;
    per element of its group (the last group cropped to the row)."""
    w = np.array([[1.0, -2.0, 0.5, 3.0, 0.0, -7.0]], np.float32)
    sym = affine.quantize(w, 4, granularity="group", group_size=4, pad=True)       # s = 3/7, 7/7
    np.testing.assert_allclose(affine.error_bound(sym), [[1.5 / 7] * 4 + [0.5] * 2], rtol=1e-6)
    asym = affine.quantize(w, 4, sym=False, granularity="group", group_size=2, pad=False)
    steps = [3 / 15, 3 / 15, 3 / 15, 3 / 15, 7 / 15, 7 / 15]                      # (max - min) / 15 per group
    np.testing.assert_allclose(affine.error_bound(asym), [steps], rtol=1e-6)
    full = affine.quantize(w, 4, full_range=True, granularity="tensor")           # s = 7/8, a whole step
    np.testing.assert_allclose(affine.error_bound(full), np.full(w.shape, 7 / 8), rtol=1e-6)
    chan = affine.quantize(w.reshape(2, 3), 8, granularity="channel", axis=0)     # rows: max 2, 7
    np.testing.assert_allclose(affine.error_bound(chan), [[1 / 127] * 3, [3.5 / 127] * 3], rtol=1e-6)


def test_clip_search_chooses_per_block():
    """Each block keeps its own best ratio: a block with an outlier clips, a flat one does not."""
    w = np.array([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.5], [1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0]], np.float32)
    qt = affine.quantize(w, 2, granularity="channel", axis=0, clip_search=True, grid=10)
    q, s, _ = naive_quantize(w, 2, True, False, "channel", 0, None, np.float32, clip_grid=10)
    np.testing.assert_array_equal(qt.scales.reshape(-1), s)
    assert s[1] == np.float32(1.0) and s[0] < np.float32(1.5)    # the flat row keeps absmax, the other clips


def test_default_names_and_recorded_layout():
    w = np.ones((2, 8), np.float32)
    cases = [(dict(bits=8), "int8_tensor", None, None), (dict(bits=4, sym=False, granularity="channel", axis=1),
             "int4_channel1_asym", 1, None), (dict(bits=3, full_range=True, granularity="group", group_size=4),
             "int3_g4_full", None, 4)]
    for kw, name, axis, group in cases:
        qt = affine.quantize(w, **kw)
        assert qt.scheme == name and qt.meta["axis"] == axis and qt.meta["group_size"] == group
        assert qt.meta["kind"] == "affine" and qt.meta["padded_shape"] == (2, 8)
    assert affine.quantize(w, scheme="mine").scheme == "mine"


def test_presets_state_what_they_are_by_hand():
    """Each branch of the preset table, written out by hand: scale type by granularity,
    the byte-dot kernels' reach (symmetric INT8, every INT4 group grid; not INT3 or
    asymmetric INT8), and the description a user reads."""
    from refquant import schemes
    from refquant.schemes import Spec

    want = {
        "int8_tensor": (Spec(8, "int", "tensor", None, True, "fp32", None, "q8_0"),
                        "INT8 symmetric, one fp32 scale per tensor"),
        "int8_channel_asym": (Spec(8, "int", "channel", None, False, "fp32", None, "float"),
                              "INT8 asymmetric (uint8 zero point), one fp32 scale per output channel"),
        "int4_g64_asym": (Spec(4, "int", "group", 64, False, "fp16", None, "q8_0"),
                          "INT4 asymmetric (uint8 zero point), fp16 scale per group of 64 inputs"),
        "int3_g128": (Spec(3, "int", "group", 128, True, "fp16", None, "float"),
                      "INT3 symmetric, fp16 scale per group of 128 inputs"),
    }
    for name, (spec, description) in want.items():
        assert affine.PRESETS[name] == spec, name
        assert schemes.get(name).spec == spec and schemes.get(name).description == description, name
    assert len(affine.PRESETS) == 11


def test_quantize_spec_passes_the_spec_s_fields():
    """``quantize_spec`` is ``quantize`` with the spec's arguments, written out by hand."""
    from refquant.schemes import Spec

    w = np.random.default_rng(4).standard_normal((3, 128)).astype(np.float32)
    cases = [(Spec(4, "int", "group", 64, symmetric=False, scale_dtype="fp16"),
              dict(bits=4, sym=False, granularity="group", group_size=64, scale_dtype=np.float16)),
             (Spec(8, "int", "channel", symmetric=True, scale_dtype="fp32"),
              dict(bits=8, sym=True, granularity="channel", axis=0, scale_dtype=np.float32)),
             (Spec(3, "int", "tensor", symmetric=True, scale_dtype="fp16"),
              dict(bits=3, sym=True, granularity="tensor", scale_dtype=np.float16))]
    for spec, kw in cases:
        a, b = affine.quantize_spec(w, spec, scheme="s"), affine.quantize(w, scheme="s", **kw)
        assert a.meta == b.meta, spec
        for x, y in ((a.codes, b.codes), (a.scales, b.scales), (a.zeros, b.zeros)):
            assert (x is None and y is None) or (x.dtype == y.dtype and np.array_equal(x, y)), spec
    with pytest.raises(ValueError, match="not an affine integer spec"):
        affine.quantize_spec(w, Spec(4, "codebook", "block"))
