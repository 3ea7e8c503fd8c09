"""GPTQ against a textbook column-by-column implementation, against RTN, and its special cases."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from refquant import affine, gptq


def layer(seed, out=32, n=128, tokens=400):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n, n)) / np.sqrt(n)
    X = rng.standard_normal((tokens, n)) @ mix * rng.uniform(0.2, 3.0, n)
    w = rng.standard_normal((out, n)) * 0.05
    return w.astype(np.float32), X.astype(np.float32)


def naive_gptq(w, H, bits, gs, percdamp=0.01):
    """The O(d³) textbook form (OBS): invert H explicitly; quantize column q, update the
    later columns with -err · H⁻¹[q, q:] / H⁻¹[q, q], then eliminate row and column q from H⁻¹."""
    W = w.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    n = W.shape[1]
    H[np.diag_indices(n)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.inv(H)
    codes = np.zeros(W.shape, np.int64)
    scales = []
    for q in range(n):
        if q % gs == 0:
            s, _ = gptq._group_params(W[:, q:q + gs], bits, True, np.float16)
            scales.append(s)
        c = affine.quantize_codes(W[:, q], s, None, bits)
        codes[:, q] = c
        err = W[:, q] - affine.dequantize_codes(c, s, None)
        W[:, q + 1:] -= np.outer(err / Hinv[q, q], Hinv[q, q + 1:])
        Hinv = Hinv - np.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
    return codes, np.stack(scales, axis=1)


def out_err(w, wh, X):
    return np.linalg.norm(X.astype(np.float64) @ (w.astype(np.float64) - wh).T)


@given(seed=st.integers(0, 1000), gs=st.sampled_from([32, 128]), bits=st.sampled_from([3, 4]))
def test_lazy_batches_equal_the_textbook_algorithm(seed, gs, bits):
    w, X = layer(seed)
    H = gptq.hessian(X)
    ref, ref_scales = naive_gptq(w, H, bits, gs)
    for blocksize in (gs, 128, 1):  # lazy batching must not change the result
        qt, _ = gptq.gptq_quantize(w, H, bits=bits, group_size=gs, blocksize=blocksize)
        assert np.mean(affine.codes(qt) == ref) > 0.999  # identical up to float64 round-off at rounding ties
        assert np.mean(qt.scales == ref_scales) > 0.999


@given(seed=st.integers(0, 1000), act=st.booleans(), sym=st.booleans())
def test_gptq_beats_round_to_nearest_on_the_layer_output(seed, act, sym):
    w, X = layer(seed)
    qt, loss = gptq.gptq_quantize(w, gptq.hessian(X), bits=4, group_size=32, sym=sym, act_order=act)
    rtn = affine.quantize(w, 4, sym=sym, granularity="group", group_size=32, scale_dtype=np.float16)
    assert out_err(w, qt.dequantize(), X) < out_err(w, rtn.dequantize(), X)
    assert loss > 0


def test_with_an_uncorrelated_hessian_gptq_is_round_to_nearest():
    """H = c·I: U is diagonal, no error feedback, so GPTQ must reproduce RTN's codes."""
    w, _ = layer(3)
    qt, _ = gptq.gptq_quantize(w, 4.0 * np.eye(w.shape[1]), bits=4, group_size=32, percdamp=0.0)
    rtn = affine.quantize(w, 4, granularity="group", group_size=32, scale_dtype=np.float16)
    np.testing.assert_array_equal(affine.codes(qt), affine.codes(rtn))
    np.testing.assert_array_equal(qt.scales, rtn.scales)


def test_act_order_groups_follow_g_idx():
    w, X = layer(5)
    H = gptq.hessian(X)
    qt, _ = gptq.gptq_quantize(w, H, bits=4, group_size=32, act_order=True)
    g = qt.meta["g_idx"]
    order = np.argsort(-np.diag(H), kind="stable")
    np.testing.assert_array_equal(g[order], np.arange(w.shape[1]) // 32)  # contiguous in processing order
    q = affine.packing.unpack(qt.codes, 4, w.shape[1], signed=True).reshape(w.shape)
    manual = q * qt.scales.astype(np.float32)[:, g]
    np.testing.assert_array_equal(qt.dequantize(), manual)
    assert qt.nbytes == qt.codes.nbytes + qt.scales.nbytes + g.nbytes
    static, _ = gptq.gptq_quantize(w, H, bits=4, group_size=32, act_order=True, static_groups=True)
    assert static.kind == "affine" and "g_idx" not in static.meta


def test_deterministic_and_dead_inputs_are_zeroed():
    w, X = layer(7)
    X[:, 5] = 0  # input 5 never active
    H = gptq.hessian(X)
    a, la = gptq.gptq_quantize(w, H)
    b, lb = gptq.gptq_quantize(w, H)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert la == lb
    assert np.all(a.dequantize()[:, 5] == 0)


@pytest.mark.parametrize("kw, match", [
    (dict(group_size=48), "positive divisor"),
    (dict(bits=9), "bits must be one of"),
    (dict(percdamp=1.5), "percdamp"),
])
def test_bad_arguments(kw, match):
    w, X = layer(0)
    with pytest.raises(ValueError, match=match):
        gptq.gptq_quantize(w, gptq.hessian(X), **kw)
    with pytest.raises(ValueError, match="H must be"):
        gptq.gptq_quantize(w, np.eye(3))
    with pytest.raises(ValueError, match="non-finite"):
        gptq.hessian(np.full((3, 4), np.nan))
