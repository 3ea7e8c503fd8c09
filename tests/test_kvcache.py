"""The KV cache's storage types (``refquant.kernels.kvcache``, llama.cpp's types registered
by ``refquant.gguf.quants.cache``): rows against other implementations of ggml's
conversions, and the compiled operations against the NumPy rows.

* the bytes a ``KVCache`` stores are gguf-py's quantizers' (and NumPy's fp16 cast) for every
  type gguf-py writes; IQ4_NL's are refquant's quantizer's, whose bytes
  ``test_gguf_quants`` holds against ggml's C; ``keys()`` / ``values()`` are gguf-py's
  dequantization of those bytes;
* inside numba code, ``store`` writes the same bytes, ``k_tile`` / ``v_tile`` the same
  floats, and ``k_scores`` / ``v_sums`` sum them within float32 rounding (and, for the
  types whose keys meet a query rounded to int16, that rounding's bound).
"""
import numpy as np
import pytest

from refquant.kernels.kvcache import CACHE_TYPES, KVCache
from tests.conftest import gguf_py, need

pytestmark = pytest.mark.oracle

# llama.cpp's common/arg.cpp (0c1e570), kv_cache_types, in its order
LLAMA_CPP = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
FP8 = ["fp8_e4m3", "fp8_e5m2"]       # vLLM's, refquant.kvfp8
DEFAULT = ("f32", "q8_0", "q4_0", "fp8_e4m3")    # the compiled operations of the others: slow tier
HD, NKV, T = 64, 3, 5


def _rows(seed: int, hd: int = HD) -> np.ndarray:
    """(T, NKV, HD) rows with what rounding cares about: a zero block, a constant block,
    an outlier, exact .5 multiples of the Q8_0 step, subnormal-sized numbers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, NKV, hd)).astype(np.float32)
    x[0, 0, :32] = 0
    x[0, 1, 32:] = 1.25
    x[1, 2, 7] = 300.0
    x[2, 0, :32] = (np.arange(32) - 16.5) / 16     # Q8_0: d = 1/16, every x/d a tie (roundf: away from 0)
    x[2, 0, 31] = 127 / 16
    x[3, 1, :32] *= 1e-30
    return x


def _expected_bytes(t: str, rows: np.ndarray) -> np.ndarray:
    """The stored row of ``rows`` (..., HD) by an implementation other than refquant's."""
    if t == "f32":
        return rows
    if t == "f16":
        return rows.astype(np.float16).view(np.uint16)
    if t in FP8:      # within range: ml_dtypes' cast (it does not saturate; vLLM's conversion does)
        import ml_dtypes

        return rows.astype(ml_dtypes.float8_e4m3fn if t == "fp8_e4m3" else ml_dtypes.float8_e5m2).view(np.uint8)
    if t == "iq4_nl":     # gguf-py does not quantize IQ4_NL
        from refquant.gguf import quants

        return quants.quantize(rows, "IQ4_NL", impl="numpy")
    g = gguf_py()
    raw = g.quants.quantize(rows, g.GGMLQuantizationType[t.upper()])
    return raw.view(np.uint16) if t == "bf16" else raw


def test_the_cache_types_are_llama_cpps_then_vllms_fp8():
    assert list(CACHE_TYPES) == LLAMA_CPP + FP8


@pytest.mark.parametrize("t", LLAMA_CPP + FP8)
def test_stored_rows_are_ggml_bytes_and_read_back_as_gguf_py_decodes_them(t):
    k, v = _rows(1), _rows(2)
    c = KVCache(2, NKV, HD, 16, type_k=t, type_v=t)
    c.store(0, 1, 4, k, v)
    for arr, rows in ((c.k, k), (c.v, v)):
        got = arr[1, 0, :, 4:4 + T]                       # (NKV, T, units)
        np.testing.assert_array_equal(got, _expected_bytes(t, rows.transpose(1, 0, 2)))
        assert not arr[0].any() and not arr[1, 0, :, :4].any() and not arr[1, 0, :, 4 + T:].any()
    for got, arr in ((c.keys(0, 1, 4 + T), c.k), (c.values(0, 1, 4 + T), c.v)):
        raw = arr[1, 0, :, :4 + T]
        want = raw if t == "f32" else _oracle_decode(t, raw)
        np.testing.assert_array_equal(got, np.asarray(want, np.float32).transpose(1, 0, 2))
    assert c.bytes_per_position == 2 * 2 * NKV * c.k.shape[-1] * c.k.itemsize


def _oracle_decode(t: str, raw: np.ndarray) -> np.ndarray:
    if t in FP8:
        import ml_dtypes

        return raw.view(ml_dtypes.float8_e4m3fn if t == "fp8_e4m3" else ml_dtypes.float8_e5m2).astype(np.float32)
    g = gguf_py()
    return g.quants.dequantize(raw.view(np.uint8), g.GGMLQuantizationType[t.upper()])


def test_fp8_rows_are_x_over_their_scale_saturated_and_read_back_times_it():
    """vLLM's conversion: fp8(x / scale), round to nearest even, finite overflow and ±inf to
    ±max (448 / 57344), NaN kept; a scale per layer or per layer and head."""
    import ml_dtypes

    c = KVCache(2, NKV, HD, 16, type_k="fp8_e4m3", type_v="fp8_e5m2")
    ks, vs = np.array([1.0, 0.375], np.float32), np.array([[1.0] * NKV, [3.0, 0.5, 1e-3]], np.float32)
    c.set_scales(k_scale=ks, v_scale=vs)
    x = _rows(6)
    x[0, 0, :6] = [1e4, -1e4, np.inf, -np.inf, np.nan, 170.0]   # 170 / 0.375 = 453.3: rounds to 448
    x[1, 1, :3] = [6e4, 60.0, -2e-9]                              # v head 1: 6e4 / 0.5 saturates to 57344
    c.store(0, 1, 4, x, x)
    for arr, scale, fmt, fmax in ((c.k, ks[1] + np.zeros((NKV, 1, 1), np.float32), ml_dtypes.float8_e4m3fn, 448.0),
                                  (c.v, vs[1][:, None, None], ml_dtypes.float8_e5m2, 57344.0)):
        y = x.transpose(1, 0, 2) / scale
        want = np.where(np.isnan(y), y, np.clip(y, -fmax, fmax)).astype(fmt).view(np.uint8)
        np.testing.assert_array_equal(arr[1, 0, :, 4:4 + T], want)
    assert c.k[1, 0, 0, 4, :6].tolist() == [0x7E, 0xFE, 0x7E, 0xFE, 0x7F, 0x7E]
    np.testing.assert_array_equal(c.keys(0, 1, 4 + T)[4:], (c.k[1, 0, :, 4:4 + T].view(ml_dtypes.float8_e4m3fn)
                                                           .astype(np.float32) * ks[1]).transpose(1, 0, 2))
    np.testing.assert_array_equal(c.values(0, 1, 4 + T)[4:], (c.v[1, 0, :, 4:4 + T].view(ml_dtypes.float8_e5m2)
                                                             .astype(np.float32) * vs[1][:, None, None]).transpose(1, 0, 2))
    with pytest.raises(ValueError, match="k_scale: 'q8_0' rows have no scale"):
        KVCache(2, 1, 32, 4, type_k="q8_0").set_scales(k_scale=2.0)
    with pytest.raises(ValueError, match=r"v_scale must be a number, \(2,\) or \(2, 3\); got shape \(3,\)"):
        c.set_scales(v_scale=[1.0, 2.0, 3.0])
    for bad in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="k_scale must be positive and finite"):
            c.set_scales(k_scale=bad)


def test_compiled_fp8_store_divides_rounds_and_saturates_as_the_numpy_rows():
    """Every special case of the conversion in numba's put: overflow, ±inf, NaN, ties,
    subnormals, a scale that is not a power of two."""
    need("numba")
    from numba import njit

    from refquant.kernels import kvcache

    store = kvcache.ops("fp8_e4m3", "fp8_e5m2").store

    @njit
    def run(K, V, ks, vs, rows):
        for t in range(rows.shape[0]):
            store(K, V, ks, vs, 1, 0, t, rows[t], 0, NKV * HD, 0, NKV, HD)

    ref = KVCache(2, NKV, HD, 8, type_k="fp8_e4m3", type_v="fp8_e5m2")
    ref.set_scales(k_scale=[1.0, 0.3], v_scale=[1.0, 7.0])
    x = _rows(7) * 50
    x[0, 0, :8] = [1e4, -1e4, np.inf, -np.inf, np.nan, -np.nan, 2.0**-9 * 0.3, 2.0**-10 * 0.3]
    x[1, 0, :4] = [4e5, -np.inf, 2.0**-16 * 7, 9.0 * 7 * 1.0625]
    ref.store(0, 1, 0, x, x)
    K, V = np.zeros_like(ref.k), np.zeros_like(ref.v)
    run(K, V, ref.k_scale, ref.v_scale, np.concatenate([x.reshape(T, -1), x.reshape(T, -1)], axis=1))
    np.testing.assert_array_equal(K, ref.k)
    np.testing.assert_array_equal(V, ref.v)


def test_calibrated_scales_are_absmax_over_the_formats_largest_value():
    from refquant.kvfp8 import calibrated_scales

    np.testing.assert_array_equal(calibrated_scales([448.0, 0.0, 8.96], "fp8_e4m3"), np.float32([1.0, 1.0, 0.02]))
    assert calibrated_scales(57344.0 * 3, "fp8_e5m2") == np.float32(3.0)
    with pytest.raises(ValueError, match="cache_type 'q8_0' has no scale"):
        calibrated_scales(1.0, "q8_0")
    with pytest.raises(ValueError, match="absmax must be finite and non-negative"):
        calibrated_scales([-1.0], "fp8_e4m3")


G = 4          # query heads per key/value head: a group of three and one repeated


def _harness(t_k: str, t_v: str, hd: int, seq: int):
    """A numba function that runs every compiled operation of the (t_k, t_v) cache on
    layer 1, sequence ``seq`` of rows of ``hd`` numbers."""
    need("numba")
    from numba import njit

    from refquant.kernels import kvcache

    o = kvcache.ops(t_k, t_v)
    store, k_scores, v_sums, k_tile, v_tile = o.store, o.k_scores, o.v_sums, o.k_tile, o.v_tile

    @njit
    def run(K, V, ks, vs, rows, q, p, out0):
        for t in range(rows.shape[0]):
            store(K, V, ks, vs, 1, seq, 4 + t, rows[t], 0, NKV * hd, 0, NKV, hd)
        n = 4 + rows.shape[0]
        scores = np.full((NKV, G, n + 3), np.float32(7))
        out = out0.copy()
        kt = np.full((NKV, hd, kvcache.TILE), np.float32(7))
        vt = np.full((NKV, kvcache.TILE, hd), np.float32(7))
        for h in range(NKV):
            k_scores(K, 1, seq, h, 1, n - 1, q, 0, G, hd, np.float32(0.5), scores[h].reshape(-1), n + 3)
            v_sums(V, 1, seq, h, 1, n - 1, p, n + 3, G, out[h].reshape(-1), hd)
            k_tile(K, 1, seq, h, 2, n - 2, kt[h])
            v_tile(V, 1, seq, h, 2, n - 2, vt[h])
        return scores, out, kt, vt
    return run


# the types whose keys meet the query rounded to int16, one scale per head (kvcache._scorer)
INT16_QUERY = ("q8_0", "q4_0", "q4_1")


def _check_compiled_ops(t_k: str, t_v: str, hd: int = HD, seq: int = 1):
    """Sequence ``seq`` of a cache of two (the readers' row arithmetic spans sequences)."""
    k, v = _rows(3, hd), _rows(4, hd)
    ref = KVCache(2, NKV, hd, 16, n_seq=2, type_k=t_k, type_v=t_v)
    for side, t in (("k_scale", t_k), ("v_scale", t_v)):      # a scaled type's store divides by its layer's
        if CACHE_TYPES[t].scaled:
            ref.set_scales(**{side: np.array([[1.0] * NKV, [0.5, 3.0, 0.01]])})
    ref.store(seq, 1, 4, k, v)
    K, V = np.zeros_like(ref.k), np.zeros_like(ref.v)
    n = 4 + T
    rng = np.random.default_rng(5)
    q = rng.standard_normal((G, hd)).astype(np.float32)
    q[1, 3] = 40.0      # one head's scale set by an outlier
    p = rng.random((G, n + 3)).astype(np.float32)
    out0 = rng.standard_normal((NKV, G, hd)).astype(np.float32)
    rows = np.concatenate([k.reshape(T, -1), v.reshape(T, -1)], axis=1)
    scores, out, kt, vt = _harness(t_k, t_v, hd, seq)(K, V, ref.k_scale, ref.v_scale, rows, q.reshape(-1),
                                                      p.reshape(-1), out0)
    np.testing.assert_array_equal(K, ref.k)            # the same bytes
    np.testing.assert_array_equal(V, ref.v)
    # the readers give the rows as stored, before a scaled type's scale (the caller's)
    keys = CACHE_TYPES[t_k].decode(ref.k[1, seq, :, :n]).transpose(1, 0, 2).astype(np.float64)
    vals = CACHE_TYPES[t_v].decode(ref.v[1, seq, :, :n]).transpose(1, 0, 2).astype(np.float64)
    np.testing.assert_array_equal(kt[:, :, :n - 2], keys[2:].transpose(1, 2, 0))      # the same floats
    np.testing.assert_array_equal(vt[:, :n - 2], vals[2:].transpose(1, 0, 2))
    assert not kt[:, :, n - 2:].any() and not vt[:, n - 2:].any()
    assert (scores[:, :, n - 1:] == 7).all()            # nothing written past the rows asked for
    # float32 sums of hd (and n) terms, |error| <= terms · 2^-24 · Σ|term| (first order),
    # where a block type's number d·u + m may be summed as its two parts: |d·u| + |m| is at
    # most 3 max|x| of its block (q4_0: |d| = amax/8, |u| <= 15, |m| = 8|d|; q4_1: |d·u| <=
    # max - min, |m| = |min|; q8_0: d·u = x). A query rounded to int16 (qd = amax/32767) is
    # off by at most 0.5 qd (+ the float32 rounding of q/qd: 32767 · 2^-23 qd) per number.
    keys, vals = keys[1:], vals[1:]
    mk, mv = _magnitudes(t_k, keys), _magnitudes(t_v, vals)
    qd = np.abs(q).max(1) / 32767 if t_k in INT16_QUERY else np.zeros(G)
    want = 0.5 * np.einsum("jhd,gd->hgj", keys, q)
    bound = 0.5 * (2 * hd * 2.0**-24 * np.einsum("jhd,gd->hgj", mk, np.abs(q) + qd[:, None])
                   + 0.504 * qd[None, :, None] * np.abs(keys).sum(-1).T[:, None, :]) + 1e-30
    assert (np.abs(scores[:, :, :n - 1] - want) <= bound).all()
    want = out0 + np.einsum("jhd,gj->hgd", vals, p[:, :n - 1])
    bound = 2 * n * 2.0**-24 * (np.einsum("jhd,gj->hgd", mv, p[:, :n - 1]) + np.abs(out0)) + 1e-30
    assert (np.abs(out - want) <= bound).all()


def _magnitudes(t: str, x: np.ndarray) -> np.ndarray:
    """|x| for plain floats, 3 max|x| of each block of 32 for block types (above)."""
    if CACHE_TYPES[t].block == 1:
        return np.abs(x)
    b = np.abs(x).reshape(*x.shape[:-1], -1, 32).max(-1, keepdims=True)
    return np.broadcast_to(3 * b, b.shape[:-1] + (32,)).reshape(x.shape)


@pytest.mark.parametrize("t", DEFAULT)
def test_compiled_store_and_reads_equal_the_numpy_rows(t):
    _check_compiled_ops(t, t)


@pytest.mark.parametrize("t", ["f32", "f16", "bf16"])
def test_compiled_reads_of_plain_rows_of_any_width(t):
    """40 numbers: the vector readers' tail of 8 after pairs of 8 (and bf16's scalar path)."""
    _check_compiled_ops(t, t, hd=40, seq=0)


@pytest.mark.slow
@pytest.mark.parametrize("t_k,t_v", [(t, t) for t in LLAMA_CPP + FP8 if t not in DEFAULT] + [
    ("q8_0", "f16"), ("q4_0", "q5_1"), ("fp8_e5m2", "q8_0")])
def test_compiled_store_and_reads_equal_the_numpy_rows_of_every_type(t_k, t_v):
    _check_compiled_ops(t_k, t_v)


def test_cache_refuses_unknown_types_and_head_dims_its_blocks_do_not_divide():
    with pytest.raises(ValueError, match=r"type_k 'q7_0' is not a cache type refquant has \(known: f32, f16"):
        KVCache(2, 1, 64, 16, type_k="q7_0")
    with pytest.raises(ValueError, match="type_v 'q4_0' stores blocks of 32 numbers along head_dim; head_dim 48"):
        KVCache(2, 1, 48, 16, type_v="q4_0")
    assert KVCache(2, 1, 48, 16, type_k="f16", type_v="bf16").k.dtype == np.uint16
