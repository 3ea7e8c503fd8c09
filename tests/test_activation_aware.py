"""SmoothQuant, LLM.int8(), W8A8 and AWQ against their defining identities and RTN."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from refquant import affine, awq, llm_int8, schemes, smoothquant


def acts(seed, tokens=256, n=256, outliers=()):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((tokens, n)) @ (rng.standard_normal((n, n)) / np.sqrt(n))
    X[:, list(outliers)] *= 50.0
    return X.astype(np.float32)


@given(seed=st.integers(0, 10**6), alpha=st.floats(0, 1))
def test_smoothquant_migration_is_exact(seed, alpha):
    rng = np.random.default_rng(seed)
    X, w = rng.standard_normal((16, 32)) * rng.uniform(0.1, 40, 32), rng.standard_normal((8, 32))
    s = smoothquant.smooth_scales(np.abs(X).max(axis=0), w, alpha)
    Xs, ws = smoothquant.migrate(X, w, s)
    np.testing.assert_allclose(Xs @ ws.T, X @ w.T, rtol=1e-12, atol=1e-12 * np.abs(X).max() * np.abs(w).max())


def vectorwise_int8(X, w):
    """Independent vector-wise int8: per-row absmax for X and for W, integer products."""
    sx, sw = np.abs(X).max(1, keepdims=True) / 127, np.abs(w).max(1, keepdims=True) / 127
    qx, qw = np.round(X / sx), np.round(w / sw)
    return (qx @ qw.T) * sx * sw.T


def test_llm_int8_without_outliers_is_vectorwise_int8_and_with_all_is_fp16():
    rng = np.random.default_rng(0)
    X, w = rng.standard_normal((6, 64)).astype(np.float32), rng.standard_normal((10, 64)).astype(np.float32)
    none = llm_int8.quantize(w, np.abs(X).max(0), threshold=1e9)
    np.testing.assert_allclose(llm_int8.matmul(none, X), vectorwise_int8(X.astype(np.float64), w), rtol=1e-5, atol=1e-5)
    every = llm_int8.quantize(w, np.abs(X).max(0), threshold=0.0)
    X16, w16 = X.astype(np.float16).astype(np.float64), w.astype(np.float16).astype(np.float64)
    # Exact products of the fp16 values (float64); the float32 matmul errs by at most
    # n·2⁻²⁴·Σ|x||w| per element (any summation order), plus the final float32 rounding.
    err = np.abs(llm_int8.matmul(every, X) - X16 @ w16.T)
    bound = (X.shape[1] + 1) * 2.0**-24 * (np.abs(X16) @ np.abs(w16).T)
    assert np.all(err <= bound), (err / bound).max()


def test_awq_with_alpha_zero_and_no_clip_is_rtn():
    rng = np.random.default_rng(1)
    w, X = rng.standard_normal((16, 256)).astype(np.float32), acts(1)
    a = awq.awq_quantize(w, X, alpha=0.0, clip=False)
    rtn = affine.quantize(w, 4, sym=False, granularity="group", group_size=128, scale_dtype=np.float16)
    np.testing.assert_array_equal(a.meta["awq_scales"], 1.0)
    np.testing.assert_array_equal(a.codes, rtn.codes)
    np.testing.assert_array_equal(a.dequantize(), rtn.dequantize())


@pytest.mark.parametrize("sym", [True, False])
def test_folded_awq_without_clip_is_the_rtn_scheme_and_clip_only_lowers_the_error(sym):
    """With the scaling folded in (``s = 1``), AWQ's last step on ``w`` is the registered RTN
    grid itself, same codes and scheme, kind ``affine`` (what a GGUF can hold); its clip
    search can only lower the output error on the inputs it searched (the unclipped range is
    one of its candidates)."""
    rng = np.random.default_rng(4)
    w, X = rng.standard_normal((16, 256)).astype(np.float32), acts(4)
    name = "int4_g32" if sym else "int4_g32_asym"
    rtn = schemes.get(name).quantize(w)
    plain = awq.folded_quantize(w, X, group_size=32, sym=sym, clip=False)
    assert (plain.scheme, plain.meta) == (rtn.scheme, rtn.meta)
    np.testing.assert_array_equal(plain.codes, rtn.codes)
    np.testing.assert_array_equal(plain.dequantize(), rtn.dequantize())
    clipped = awq.folded_quantize(w, X, group_size=32, sym=sym)
    err = lambda qt: np.linalg.norm(X.astype(np.float64) @ (qt.dequantize() - w).T)  # noqa: E731
    assert err(clipped) <= err(plain)
    assert not np.array_equal(clipped.codes, plain.codes)
    with pytest.raises(ValueError, match=f"unknown scheme '{name.replace('32', '16')}'"):
        awq.folded_quantize(w, X, group_size=16, sym=sym)


def test_awq_protects_salient_channels_better_than_rtn():
    rng = np.random.default_rng(2)
    X = acts(2, outliers=(3, 70, 200))
    w = rng.standard_normal((64, 256)).astype(np.float32) * 0.05
    ref = X @ w.T
    err = lambda wh: np.linalg.norm(X @ wh.T - ref)  # noqa: E731
    a = awq.awq_quantize(w, X)
    rtn = affine.quantize(w, 4, sym=False, granularity="group", group_size=128, scale_dtype=np.float16)
    assert err(a.dequantize()) < 0.8 * err(rtn.dequantize())
    assert a.meta["alpha"] > 0


def test_w8a8_outlier_cliff_and_its_fixes():
    """A few x50 activation channels blow up W8A8's error; SmoothQuant and LLM.int8() fix it."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 256)).astype(np.float32) * 0.05
    errs = {}
    for tag, X in (("clean", acts(3)), ("outliers", acts(3, outliers=(5, 17, 90, 201)))):
        ref = X.astype(np.float64) @ w.T
        for name in ("w8a8", "smoothquant_w8a8", "llm_int8"):
            s = schemes.get(name)
            qt = s.quantize(w, calib=X)
            errs[tag, name] = np.linalg.norm(s.matmul(qt, X) - ref) / np.linalg.norm(ref)
    assert errs["outliers", "w8a8"] > 2.5 * errs["clean", "w8a8"]
    assert errs["outliers", "smoothquant_w8a8"] < 0.5 * errs["outliers", "w8a8"]
    assert errs["outliers", "llm_int8"] < 0.2 * errs["outliers", "w8a8"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha must be in"):
        smoothquant.smooth_scales(np.ones(3), np.ones((2, 3)), 1.5)
    with pytest.raises(ValueError, match="X has 5 features"):
        awq.awq_quantize(np.ones((2, 128), np.float32), np.ones((4, 5), np.float32))


def test_exact_int8_products_are_the_integer_matmul():
    """float64 BLAS on int8 codes: every partial sum is an integer below 2^53, so the result is
    the integer product exactly, the extremes ±127²·K included."""
    from refquant.smoothquant import exact_int8_products

    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (7, 1536)).astype(np.int8)
    c = rng.integers(-127, 128, (5, 1536)).astype(np.int8)
    q[0], q[1], c[0] = 127, -127, 127
    got = exact_int8_products(q, c)
    np.testing.assert_array_equal(got, q.astype(np.int64) @ c.astype(np.int64).T)
    assert got[0, 0] == 127 * 127 * 1536 and got[1, 0] == -127 * 127 * 1536
