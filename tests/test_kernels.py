"""Each numba kernel against its NumPy twin, over drawn shapes; bad input raises."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from refquant import affine, kernels

REL = 1e-5   # float32 accumulation vs the float64 twin, relative to sum |w x| (tests/conftest.py TOL)


def close(y, ref, scale):
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.all(np.abs(y.astype(np.float64) - ref) <= REL * scale + 1e-30)


@st.composite
def int8_case(draw):
    out = draw(st.integers(1, 40))
    n = draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.integers(-127, 128, size=(out, n)).astype(np.int8)
    s = (rng.random(out) + 0.01).astype(np.float32)
    x = rng.standard_normal(n).astype(np.float32)
    return q, s, x, rng


@given(int8_case())
def test_matvec_int8_equals_twin(case):
    q, s, x, rng = case
    scale = s.astype(np.float64) * (np.abs(q.astype(np.float64)) @ np.abs(x))
    close(kernels.matvec_int8(q, s, x), kernels.matvec_int8_ref(q, s, x).astype(np.float64), scale)
    X = rng.standard_normal((int(rng.integers(1, 17)), q.shape[1])).astype(np.float32)
    ref = (X.astype(np.float64) @ q.T.astype(np.float64)) * s
    close(kernels.matmul_int8(q, s, X), ref, (np.abs(X) @ np.abs(q.T.astype(np.float64))) * s)


@given(int8_case())
def test_matvec_w8a8_integer_sums_are_exact(case):
    q, s, x, _ = case
    y = kernels.matvec_w8a8(q, s, x)
    ref = kernels.matvec_w8a8_ref(q, s, x)
    # the int32 sum is exact; only the two float multiplies after it may round differently
    np.testing.assert_allclose(y, ref, rtol=2**-21, atol=0)
    xq, sx = kernels.quantize_activation_int8(x)
    assert np.all(np.abs(xq.astype(np.float64) * sx - x) <= sx / 2 * (1 + 1e-6))


@st.composite
def int4_case(draw):
    g = draw(st.sampled_from(kernels.matvec.INT4_GROUPS))
    out = draw(st.integers(1, 24))
    n = draw(st.integers(1, 3 * g))                      # tails not divisible by the group included
    sym = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = rng.standard_normal((out, n)).astype(np.float32)
    qt = affine.quantize(w, 4, sym=sym, granularity="group", group_size=g, pad=True, scale_dtype=np.float16)
    return qt, g, rng


@given(int4_case())
def test_matvec_int4_equals_twin_and_dequantize(case):
    qt, g, rng = case
    n = qt.shape[1]
    x = rng.standard_normal(n).astype(np.float32)
    w_hat = qt.dequantize().astype(np.float64)
    x_hat = kernels.matvec.dequantize_activation_int16(np.pad(x, (0, -n % g)), g)[:n]
    scale = np.abs(w_hat) @ np.abs(x) + np.abs(qt.scales.astype(np.float64)).sum(axis=1) * np.abs(x).max() * 8
    y = kernels.matvec_int4(qt.codes, qt.scales, qt.zeros, x, group_size=g)
    close(y, kernels.matvec_int4_ref(qt.codes, qt.scales, qt.zeros, x, group_size=g).astype(np.float64), scale)
    close(y, w_hat @ x_hat, scale)              # the kernel computes Ŵ x̂ ...
    # ... and x̂ is x rounded to int16 per group: |x̂ - x| <= s_g / 2 = max|x_g| / 65534, plus
    # the float32 rounding of x / s_g before it is rounded (<= 32767 * 2^-24 steps: 1 + 2^-8)
    step = np.repeat(np.abs(np.pad(x, (0, -n % g))).reshape(-1, g).max(axis=1), g)[:n] / 65534 * (1 + 2**-8)
    assert np.all(np.abs(x_hat - x) <= step)
    assert np.all(np.abs(y - w_hat @ x) <= REL * scale + np.abs(w_hat) @ step)
    X = rng.standard_normal((int(rng.integers(1, 17)), n)).astype(np.float32)
    Y = kernels.matmul_int4(qt.codes, qt.scales, qt.zeros, X, group_size=g)
    close(Y, X.astype(np.float64) @ w_hat.T, np.abs(X) @ np.abs(w_hat).T + 1e-3 * np.abs(X).max())


def test_quantize_activation_int16_golden():
    # block max 3 -> step 3/32767; 1.5 -> 16383.5 rounds half to even (16384); a zero block stays 0
    q, s = kernels.matvec.quantize_activation_int16(np.array([3.0, -1.5, 0.0, 0.0], np.float32), 2)
    np.testing.assert_array_equal(q, [32767, -16384, 0, 0])
    np.testing.assert_array_equal(s, np.array([3.0, 0.0], np.float32) / np.float32(32767))


def test_int4_unpack_golden():
    packed = np.array([[0x21, 0xF8]], np.uint8)
    np.testing.assert_array_equal(kernels.unpack_int4_ref(packed, signed=False), [[1, 2, 8, 15]])
    np.testing.assert_array_equal(kernels.unpack_int4_ref(packed, signed=True), [[1, 2, -8, -1]])


def test_bad_input():
    q, s, x = np.zeros((4, 8), np.int8), np.ones(4, np.float32), np.ones(8, np.float32)
    with pytest.raises(TypeError, match="q must have dtype int8"):
        kernels.matvec_int8(q.astype(np.int16), s, x)
    with pytest.raises(ValueError, match="scales must have shape"):
        kernels.matvec_int8(q, np.ones(3, np.float32), x)
    with pytest.raises(ValueError, match="x has 7 features"):
        kernels.matvec_int8(q, s, np.ones(7, np.float32))
    with pytest.raises(ValueError, match="x contains 1 non-finite"):
        kernels.matvec_w8a8(q, s, np.r_[np.ones(7), np.nan].astype(np.float32))
    with pytest.raises(ValueError, match="at most 16"):
        kernels.matmul_int8(q, s, np.ones((17, 8), np.float32))
    p, s4 = np.zeros((4, 64), np.uint8), np.ones((4, 1), np.float32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        kernels.matvec_int4(p, s4, None, np.ones(128, np.float32), group_size=48)
    with pytest.raises(ValueError, match="x has 200 features"):
        kernels.matvec_int4(p, s4, None, np.ones(200, np.float32))
    with pytest.raises(ValueError, match="scales must have shape"):
        kernels.matvec_int4(p, np.ones((4, 2), np.float32), None, np.ones(128, np.float32))
    with pytest.raises(TypeError, match="zeros must have dtype"):
        kernels.matvec_int4(p, s4, np.ones((4, 1), np.float64), np.ones(128, np.float32))


# --- GGML block kernels ----------------------------------------------------------------

from refquant.gguf import quants as ggml_quants  # noqa: E402


@st.composite
def ggml_case(draw):
    t = draw(st.sampled_from(["Q8_0", "Q4_0", "Q4_1", "Q4_K"]))
    block = ggml_quants.TYPES[t].block_size
    rows, nb = draw(st.integers(1, 9)), draw(st.integers(1, 3 if block == 256 else 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    w = (rng.standard_normal((rows, nb * block)) * scale).astype(np.float32)
    if draw(st.booleans()):
        w[:, :block] = 0  # an all-zero block
    x = (rng.standard_normal(nb * block) * draw(st.sampled_from([1e-2, 1.0, 1e3]))).astype(np.float32)
    return t, w, x


@given(case=ggml_case())
def test_ggml_kernels_equal_their_twin_and_approach_dequantize(case):
    t, w, x = case
    raw = ggml_quants.quantize(w, t)
    fn = {"Q8_0": kernels.matvec_q8_0, "Q4_0": kernels.matvec_q4_0, "Q4_1": kernels.matvec_q4_1,
          "Q4_K": kernels.matvec_q4_k}[t]
    y = fn(raw, x)
    w_hat = ggml_quants.dequantize(raw, t, w.shape).astype(np.float64)
    scale = np.abs(w_hat) @ np.abs(x.astype(np.float64)) + 1e-30
    close(y, kernels.matvec_ggml_ref(raw, x, t).astype(np.float64), scale)   # same integer sums
    # against the exact product: only x's 8-bit rounding (|err| <= half a step per block) remains
    step = np.abs(x).reshape(-1, ggml_quants.TYPES[t].block_size if t != "Q4_K" else 256).max(axis=1) / 127
    bound = np.abs(w_hat) @ np.repeat(step / 2 * 1.01, x.size // step.size) + 1e-5 * scale
    assert np.all(np.abs(y - w_hat @ x) <= bound)


def test_ggml_twin_by_hand():
    """One Q8_0 block worked by hand: w = 1..32 gives d_w = fp16(32/127); x = ones gives d_x = fp16(1/127)."""
    w = np.arange(1, 33, dtype=np.float32)[None, :]
    x = np.ones(32, np.float32)
    raw = ggml_quants.quantize(w, "Q8_0")
    # d_w = fp16(32/127); codes round(i * 127/32); x: d_x = fp16(1/127), codes all 127
    dw = float(np.float16(np.float32(32) / np.float32(127)))
    dx = float(np.float16(np.float32(1) / np.float32(127)))
    codes = np.floor(np.arange(1, 33) * (127 / 32) + 0.5)
    expected = dw * dx * 127 * codes.sum()
    assert abs(float(kernels.matvec_ggml_ref(raw, x, "Q8_0")[0]) - expected) <= 1e-6 * expected
    assert abs(float(kernels.matvec_q8_0(raw, x)[0]) - expected) <= 1e-5 * expected


def test_ggml_kernels_reject_bad_input():
    raw = ggml_quants.quantize(np.ones((2, 64), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="x has 32 features"):
        kernels.matvec_q8_0(raw, np.ones(32, np.float32))
    with pytest.raises(ValueError, match="multiple of Q4_0's 18-byte block"):
        kernels.matvec_q4_0(raw, np.ones(64, np.float32))
    with pytest.raises(TypeError, match="raw must have dtype uint8"):
        kernels.matvec_q8_0(raw.view(np.int8), np.ones(64, np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        kernels.matvec_q8_0(raw, np.full(64, np.inf, np.float32))


@given(n_blocks=st.integers(1, 6), scale=st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e4]), seed=st.integers(0, 2**32 - 1))
def test_compiled_q8_0_activation_is_bit_identical(n_blocks, scale, seed):
    """The decode path's numba Q8_0 quantizer against the NumPy one the twin uses."""
    from refquant.kernels import ggml
    x = (np.random.default_rng(seed).standard_normal(32 * n_blocks) * scale).astype(np.float32)
    x[::7] = np.round(x[::7] * 4) / 4  # exact halves after scaling are common in real activations
    a, b = ggml.quantize_activation_q8_0(x), ggml.quantize_activation(x, "Q8_0")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2][:, 0], b[0].reshape(-1, 32).sum(axis=1, dtype=np.int64))  # Σ q per block
