"""The int16-activation INT4 kernel against its NumPy twin, over drawn shapes; bad input raises.
(The byte-dot kernels every scheme runs on are tested in test_bytedot.py.)"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refquant import affine, kernels

pytestmark = pytest.mark.oracle   # the matvec kernels rely on numba

REL = 1e-5   # float32 accumulation vs the float64 twin, relative to sum |w x| (tests/conftest.py TOL)


def close(y, ref, scale):
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.all(np.abs(y.astype(np.float64) - ref) <= REL * scale + 1e-30)


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


@settings(max_examples=30)   # the legacy int16-activation kernel: a smaller share of the suite's time
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
    p, s4 = np.zeros((4, 64), np.uint8), np.ones((4, 1), np.float32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        kernels.matvec_int4(p, s4, None, np.ones(128, np.float32), group_size=48)
    with pytest.raises(ValueError, match="x has 200 features"):
        kernels.matvec_int4(p, s4, None, np.ones(200, np.float32))
    with pytest.raises(ValueError, match="scales must have shape"):
        kernels.matvec_int4(p, np.ones((4, 2), np.float32), None, np.ones(128, np.float32))
    with pytest.raises(TypeError, match="zeros must have dtype"):
        kernels.matvec_int4(p, s4, np.ones((4, 1), np.float64), np.ones(128, np.float32))
    with pytest.raises(ValueError, match="at most 16"):
        kernels.matmul_int4(p, s4, None, np.ones((17, 128), np.float32))
