"""GPTQ against a textbook column-by-column implementation, against RTN, and its special cases."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refquant import affine, gptq, packing


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


@settings(max_examples=50)   # each example runs the O(d³) textbook and three lazy-batch sizes
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
    (dict(impl="torch"), "impl must be"),
])
def test_bad_arguments(kw, match):
    w, X = layer(0)
    with pytest.raises(ValueError, match=match):
        gptq.gptq_quantize(w, gptq.hessian(X), **kw)
    with pytest.raises(ValueError, match="H must be"):
        gptq.gptq_quantize(w, np.eye(3))
    with pytest.raises(ValueError, match="non-finite"):
        gptq.hessian(np.full((3, 4), np.nan))


def textbook(w, H, bits, gs, sym=True, act_order=False, static_groups=False, percdamp=0.01):
    """The textbook algorithm of every variant: columns in act order (largest H_jj first,
    stable), groups fitted on the columns as they stand when the group's first column comes
    up (or on the original weights, static groups), error fed forward through the explicit
    inverse Hessian. Returns codes, scales, zeros (or None) and GPTQ's loss."""
    W = w.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    n = W.shape[1]
    gs = n if gs == -1 else gs
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)
    scales, zeros = np.zeros((w.shape[0], n // gs), np.float16), np.zeros((w.shape[0], n // gs), np.int64)
    if static_groups:
        for g in range(n // gs):
            scales[:, g], z = gptq._group_params(W[:, g * gs:(g + 1) * gs], bits, sym, np.float16)
            zeros[:, g] = 0 if z is None else z
    W, H = W[:, perm], H[np.ix_(perm, perm)]
    H[np.diag_indices(n)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.inv(H)
    codes, loss = np.zeros(W.shape, np.int64), 0.0
    for q in range(n):
        g = perm[q] // gs if static_groups else q // gs
        if not static_groups and q % gs == 0:
            scales[:, g], z = gptq._group_params(W[:, q:q + gs], bits, sym, np.float16)
            zeros[:, g] = 0 if z is None else z
        s, z = scales[:, g], (None if sym else zeros[:, g])
        c = affine.quantize_codes(W[:, q], s, z, bits, sym=sym)
        codes[:, perm[q]] = c
        err = W[:, q] - affine.dequantize_codes(c, s, z)
        loss += float(np.sum(err**2)) / Hinv[q, q] / 2
        W[:, q + 1:] -= np.outer(err / Hinv[q, q], Hinv[q, q + 1:])
        Hinv = Hinv - np.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
    return codes, scales, None if sym else zeros, loss


@pytest.mark.parametrize("gs, sym, act_order, static_groups, blocksize", [
    (16, True, False, False, 32), (16, False, False, False, 32), (32, True, True, False, 16),
    (32, False, True, True, 64), (16, True, True, True, 24), (-1, False, False, False, 16),
    (64, True, True, False, 128), (8, False, True, False, 20),
])
@pytest.mark.parametrize("impl", ["numpy", "numba"])
def test_every_variant_equals_the_textbook_algorithm(gs, sym, act_order, static_groups, blocksize, impl):
    """Lazy batches of any size (including ones a group straddles) give the textbook's codes,
    scales and zeros exactly and its loss to round-off; g_idx and the layout follow. Both
    the NumPy loop and the compiled one."""
    w, X = layer(3, out=8, n=64, tokens=200)
    H = gptq.hessian(X)
    qt, loss = gptq.gptq_quantize(w, H, bits=3, group_size=gs, sym=sym, act_order=act_order,
                                  static_groups=static_groups, blocksize=blocksize, impl=impl)
    codes, scales, zeros, want_loss = textbook(w, H, 3, gs, sym, act_order, static_groups)
    q = packing.unpack(qt.codes, 3, 64, signed=sym)
    np.testing.assert_array_equal(q, codes)
    np.testing.assert_array_equal(qt.scales, scales)
    if sym:
        assert qt.zeros is None
    else:
        assert qt.zeros.dtype == np.uint8
        np.testing.assert_array_equal(qt.zeros, zeros)
    assert loss == pytest.approx(want_loss, rel=1e-9)
    g = 64 if gs == -1 else gs
    if act_order and not static_groups:
        perm = np.argsort(-np.diag(H), kind="stable")
        want_g = np.empty(64, np.int32)
        want_g[perm] = np.arange(64) // g
        assert qt.kind == "gptq" and qt.meta["group_size"] == g
        np.testing.assert_array_equal(qt.meta["g_idx"], want_g)
    else:
        assert qt.kind == "affine"
        assert qt.meta["granularity"] == ("channel" if gs == -1 else "group")
        assert qt.meta["group_size"] == (None if gs == -1 else gs)
    group_of = want_g if act_order and not static_groups else np.arange(64) // g
    z = 0 if sym else zeros[:, group_of]
    s = scales.astype(np.float32)[:, group_of]   # the decoder reads the layout back to the same weights
    np.testing.assert_array_equal(qt.dequantize(), ((codes - z).astype(np.float32) * s).astype(np.float32))


@pytest.mark.parametrize("kw", [
    dict(bits=4, group_size=128), dict(bits=4, group_size=64, sym=False, act_order=True),
    dict(bits=3, group_size=-1, blocksize=96), dict(bits=8, group_size=256, blocksize=64),
    dict(bits=4, group_size=32, act_order=True, static_groups=True),
])
def test_compiled_loop_gives_the_numpy_loops_codes(kw):
    """The compiled column loop (rows in chunks of 256, in parallel, left-looking updates)
    against the NumPy loop on a layer with more rows than one chunk: the same codes, scales
    and zeros, the loss to round-off."""
    w, X = layer(11, out=300, n=512, tokens=1200)
    H = gptq.hessian(X)
    a, la = gptq.gptq_quantize(w, H, impl="numpy", **kw)
    b, lb = gptq.gptq_quantize(w, H, impl="numba", **kw)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)
    assert (a.zeros is None) == (b.zeros is None) and (a.zeros is None or np.array_equal(a.zeros, b.zeros))
    assert la == pytest.approx(lb, rel=1e-9)


def test_upper_cholesky_factor_of_the_inverse():
    """``inverse_cholesky_upper(H)`` is the upper factor U of H⁻¹ (H⁻¹ = Uᵀ U, U upper with
    a positive diagonal), checked through H·(Uᵀ U) = I; sizes cross the 128 base case."""
    rng = np.random.default_rng(5)
    for n in (7, 128, 300):
        A = rng.standard_normal((n, 2 * n))
        H = A @ A.T / n + 0.1 * np.eye(n)
        U = gptq.inverse_cholesky_upper(H)
        assert np.array_equal(U, np.triu(U)) and np.all(np.diag(U) > 0)
        np.testing.assert_allclose(H @ (U.T @ U), np.eye(n), atol=1e-9)


def test_names_and_messages():
    w, X = layer(0, out=4, n=32, tokens=50)
    H = gptq.hessian(X)
    assert gptq.gptq_quantize(w, H, bits=4, group_size=16)[0].scheme == "gptq_int4_g16"
    assert gptq.gptq_quantize(w, H, bits=3, group_size=-1, sym=False, act_order=True)[0].scheme == "gptq_int3_g-1_asym_act"
    assert gptq.gptq_quantize(w, H, scheme="mine", group_size=16)[0].scheme == "mine"
    with pytest.raises(ValueError, match=r"^H must be \(32, 32\) for w of shape \(4, 32\), got \(3, 3\)$"):
        gptq.gptq_quantize(w, np.eye(3))
    with pytest.raises(ValueError, match=r"^group_size=48 must be -1 or a positive divisor of in=32$"):
        gptq.gptq_quantize(w, H, group_size=48)
    with pytest.raises(ValueError, match=r"^group_size=0 must be -1"):
        gptq.gptq_quantize(w, H, group_size=0)
    with pytest.raises(ValueError, match=r"^percdamp must be in \[0, 1\), got 1.5$"):
        gptq.gptq_quantize(w, H, percdamp=1.5, group_size=16)
    gptq.gptq_quantize(w, H, percdamp=0.0, group_size=16)   # the closed end is allowed


def test_argument_edges():
    w, X = layer(0, out=4, n=32, tokens=50)
    H = gptq.hessian(X)
    for bits in (2, 8):                                      # both ends of the bit range
        qt, _ = gptq.gptq_quantize(w, H, bits=bits, group_size=16)
        assert qt.meta["bits"] == bits
    assert gptq.gptq_quantize(w, H, group_size=1)[0].scales.shape == (4, 32)   # one scale per weight
    with pytest.raises(ValueError, match=r"^percdamp must be in \[0, 1\), got 1$"):
        gptq.gptq_quantize(w, H, percdamp=1, group_size=16)
    with pytest.raises(ValueError, match=r"^w must be 2-D"):
        gptq.gptq_quantize(w[0], H)
    with pytest.raises(ValueError, match=r"^H must be 2-D"):
        gptq.gptq_quantize(w, H[0])
    with pytest.raises(ValueError, match=r"^bits must be one of 2\.\.8"):
        gptq.gptq_quantize(w, H, bits=9, group_size=16)
    qt, _ = gptq.gptq_quantize(w, H, group_size=16, scale_dtype=np.float32)
    assert qt.scales.dtype == np.float32
