"""The compiled decode step (``minigpt_np.compiled``) against the NumPy references.

Piece by piece the compiled step is exact: its x rounding is ``bytedot.quantize_x``
bit for bit and each weight product is the very kernel ``Linear`` calls, so those are
tested for equality. The whole model cannot be: RMSNorm / attention / softmax sum in a
different order, and a float32 difference at a rounding boundary of Q8_0 moves an x code
by one step, which then propagates. So end to end:

* float32 weights (no x rounding): logits agree within the float32 error of the dots,
  ``n_layer · n_max · 2⁻²⁴`` relative to the largest logit (``n_max`` the longest dot,
  a factor 8 for the ~8 dots in sequence per layer);
* kernel weights: both the compiled step and the NumPy forward equal the float-x forward
  ``f`` (same Ŵ, x not rounded) plus an x-rounding perturbation of the same kind, so by
  the triangle inequality ``|c - s| <= |c - f| + |f - s|``, about ``2 |s - f|``: the RMS
  of the compiled step's gap to the NumPy kernel forward ``s`` is held to twice the RMS
  of ``s - f`` (both measured here, from the references) plus the float32 term.
"""
import numpy as np
import pytest

from minigpt_np import llama
from refquant import linear
from refquant.gguf import quants
from tests.conftest import need

pytestmark = pytest.mark.oracle   # the compiled decode relies on numba (parallel loops, first-class functions)

F32_EPS = 2.0**-24


def compiled():
    """``minigpt_np.compiled`` (numba), imported by the tests that use it: a Python without
    numba still collects this module and fails these tests by name."""
    return need("minigpt_np.compiled")


# --- the pieces ------------------------------------------------------------------------

def test_f16_round_is_numpys_cast_on_edges_and_a_sweep():
    from refquant.kernels import stacked
    from numba import njit

    @njit
    def all_rounded(x, out):
        for i in range(x.size):
            out[i] = stacked.f16_round(x[i])

    # hand-derived: fp16 spacing is 2^-10 at 1, 2^-24 below 2^-14, 32 at 2^15..2^16
    edges = {1 + 2.0**-11: 1.0,                   # tie -> even (1.0)
             1 + 3 * 2.0**-11: 1 + 2.0**-9,       # tie -> even (2 ulps)
             2.0**-25: 0.0,                       # half the smallest subnormal: tie -> 0
             3 * 2.0**-25: 2.0**-23,              # 1.5 subnormal steps -> 2
             65504.0: 65504.0, 65519.0: 65504.0, 65520.0: np.inf, -65520.0: -np.inf,
             -(1 + 2.0**-10): -(1 + 2.0**-10)}
    x = np.array(list(edges), np.float32)
    out = np.empty_like(x)
    all_rounded(x, out)
    np.testing.assert_array_equal(out, np.array(list(edges.values()), np.float32))
    rng = np.random.default_rng(1)
    sweep = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-9, 6, 200_000)).astype(np.float32)
    out = np.empty_like(sweep)
    all_rounded(sweep, out)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out, sweep.astype(np.float16).astype(np.float32))


def test_the_step_rounds_x_with_the_one_q8_0_rounder():
    """The compiled step and ``bytedot.quantize_x_q8_0`` share one rounder (tested against
    llama.cpp's Q8_0, ties included, in test_bytedot); the step's direct call refuses x
    beyond the fp16 range of the block scale."""
    from refquant.kernels import bytedot, stacked

    assert stacked.quantize_x is bytedot.quantize_x
    with pytest.raises(ValueError, match="Q8_0 range"):
        stacked.quantize_x(np.full((1, 32), 1e7, np.float32), 32, np.empty((1, 32), np.int8),
                           np.empty((1, 1), np.float32), np.empty((1, 1), np.float32))


def _kernel_weight(rng, kind, shape):
    """A Linear with a byte-dot kernel: a GGML type (upper case) or a registered scheme."""
    w = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    if kind.isupper():
        return linear.ggml(quants.quantize(w, kind), kind, shape)
    return linear.quantize(w, kind)


# one kind per branch of the apply wrapper and per scale pass of the kernels (signed 8-bit
# codes, per-row scales, nibbles with a constant offset, K-quant sub-scales, Q6_K's
# per-16 scales, group scales with zero points); the small models below use the same
# kinds, so each wrapper compiles once per test process
KERNEL_KINDS = ["Q8_0", "int8_channel", "Q4_0", "Q4_K", "Q6_K", "int4_g64_asym"]


@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_stacked_part_is_the_kernel_linear_calls(kind):
    """Layer 1 of a 2-layer stack through ``make_part`` (all its chunks claimed by one
    caller) equals ``bytedot.matmul`` on that layer's own weight, bit for bit, for 1 and 3
    rows of x (the one-token kernel) and 5 (the tile kernel: both sides take it from
    ``bytedot.TILE_MIN_M`` rows on)."""
    from refquant.kernels import bytedot, stacked

    rng = np.random.default_rng(3)
    lins = [_kernel_weight(rng, kind, (40, 256)) for _ in range(2)]
    op = stacked.stack([stacked.layer_weight([lin]) for lin in lins])
    part = stacked.make_part(op)
    for T in (1, 3, 5):
        X = rng.standard_normal((T, 256)).astype(np.float32)
        out = np.empty((T, 40), np.float32)
        part(op.arrays, 1, X, out, stacked.addresses(op), np.zeros(3, np.int64), 2, 3)
        np.testing.assert_array_equal(out, bytedot.matmul(lins[1].packed(), X))


def _tiers():
    """The tiers this machine runs, its best first (``tests/test_bytedot.py``'s order)."""
    try:
        from refquant.kernels import bytedot
        return bytedot.available_tiers()
    except ImportError:     # no numba: the tests fail by name, the module still collects
        return ["numba"]


# the default run checks the tier this machine uses; `pytest -m slow` the others (each
# compiles every part again)
_TIER_PARAMS = [pytest.param(t, marks=[pytest.mark.slow] if i else []) for i, t in enumerate(_tiers())]


@pytest.mark.parametrize("tier", _TIER_PARAMS)
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q5_1", "Q6_K", "IQ4_NL", "int4_g64_asym"])
def test_prompt_blocks_of_any_length_are_each_token_alone_bit_for_bit(kind, tier):
    """A prompt block's products (the tile kernels, 4 tokens per pass, two groups of rows at
    a time on VNNI with codes staged as bytes, the rest one by one) for T = 17, 64, 100 and
    103 tokens, on every tier this machine runs: each row equals the
    one-token kernel on that token alone, bit for bit on the SIMD tiers (the one-token
    kernel is held against the naive product in tests/test_bytedot.py), to float32
    rounding on the plain-numba tier (LLVM sums its loops in an order that depends on the
    token count); odd row counts (44: a partial group)."""
    from refquant.kernels import bytedot, stacked

    rng = np.random.default_rng(5)
    n = 512 if kind in ("Q6_K", "int4_g64_asym") else 96     # Q5_1: bit planes and a "min" offset
    lin = _kernel_weight(rng, kind, (44, n))
    op = stacked.stack([stacked.layer_weight([lin])])
    part = stacked.make_part(op, tier)
    fa = stacked.addresses(op, tier)
    for T in (17, 64, 100, 103):
        X = (rng.standard_normal((T, n)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
        out = np.full((T, 44), np.nan, np.float32)
        part(op.arrays, 0, X, out, fa, np.zeros(3, np.int64), 2, 4)
        alone = np.stack([bytedot.matmul(lin.packed(), X[t], tier=tier) for t in range(T)])
        if tier == "numba":
            np.testing.assert_allclose(out, alone, rtol=1e-5, atol=1e-6 * np.abs(alone).max(), err_msg=f"T={T}")
        else:
            np.testing.assert_array_equal(out, alone, err_msg=f"{tier} T={T}")


def test_float_part_tiles_equal_the_float64_product_and_keep_rows_independent():
    """Float32 weights through ``make_part``: the 4 x 4 register tiles (T >= 4, with
    leftover tokens and rows), the one-chain decode path (T < 4), and widths that are not a
    multiple of 8, against the float64 product; a token's row is the same bits in any
    block."""
    from refquant import linear
    from refquant.kernels import stacked

    rng = np.random.default_rng(6)
    for R, n in ((45, 37), (64, 576), (3, 8)):
        W = rng.standard_normal((R, n)).astype(np.float32)
        op = stacked.stack([stacked.layer_weight([linear.DenseLinear(W)])])
        part = stacked.make_part(op)
        X = rng.standard_normal((103, n)).astype(np.float32)
        want = X.astype(np.float64) @ W.T.astype(np.float64)
        rows = {}
        for T in (1, 3, 4, 17, 64, 103):
            out = np.full((T, R), np.nan, np.float32)
            part(op.arrays, 0, X[:T], out, stacked.addresses(op), np.zeros(3, np.int64), 2, 3)
            tol = 4 * n * 2.0**-24 * (np.abs(X[:T]) @ np.abs(W.T).astype(np.float64))
            assert np.all(np.abs(out - want[:T]) <= tol), (R, n, T)
            rows[T] = out
        for T in (3, 4, 17, 64, 103):
            np.testing.assert_array_equal(rows[T][0], rows[1][0])
        np.testing.assert_array_equal(rows[64][:17], rows[17])
        np.testing.assert_array_equal(rows[103][:64], rows[64])


def test_parts_that_do_not_row_stack_fill_their_own_columns():
    from refquant.kernels import bytedot, stacked

    rng = np.random.default_rng(4)
    X = rng.standard_normal((2, 256)).astype(np.float32)
    for rows in ((24, 8, 16), (8, 40, 8)):   # the same layouts again: one compiled part, any rows
        lins = [_kernel_weight(rng, k, (r, 256)) for k, r in zip(("Q4_0", "Q8_0", "Q6_K"), rows)]
        parts = stacked.layer_parts(lins)
        assert len(parts) == 3          # three layouts: no row-stacking
        ops = [stacked.stack([p]) for p in parts]
        out = np.empty((2, sum(rows)), np.float32)
        fas = stacked.concat_addresses(ops)
        want = np.concatenate([bytedot.matmul(lin.packed(), X) for lin in lins], axis=1)
        part = stacked.make_concat_part(ops)
        for chunks in (1, 2, 3, 5):
            for start in range(chunks):     # the chunks before ``start`` claimed by other members
                sync = np.zeros(8, np.int64)
                sync[4:7] = start
                out[:] = np.nan
                part(tuple(op.arrays for op in ops), 0, X, out, fas, sync, 4, chunks)
                c0 = 0
                for r in rows:              # part k: chunk c of n holds groups [G c // n, G (c + 1) // n)
                    G = r // 8
                    n = min(chunks, G)
                    first = 8 * (G * start // n) if start < n else r
                    assert np.isnan(out[:, c0:c0 + first]).all()
                    np.testing.assert_array_equal(out[:, c0 + first:c0 + r], want[:, c0 + first:c0 + r])
                    c0 += r
                assert sync[4:7].tolist() == [max(start, min(chunks, r // 8)) + 1 for r in rows]
                assert sync[[0, 1, 2, 3, 7]].tolist() == [0] * 5
    same = stacked.layer_parts([_kernel_weight(rng, "Q4_0", (r, 256)) for r in (8, 4)])
    assert len(same) == 1 and same[0][1].shape == (12, 256)


def test_schemes_that_round_x_their_own_way_have_no_compiled_path():
    from refquant.kernels import stacked

    w = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="its own way"):
        stacked.operand_kind(linear.quantize(w, "w8a8"))
    assert stacked.operand_kind(linear.quantize(w, "nf4")) == "dequantized"
    assert stacked.operand_kind(linear.DenseLinear(w)) == "f32"


# --- a small Llama, every storage ---------------------------------------------------------

TINY = llama.LlamaConfig(n_layer=2, d_model=256, d_ff=512, n_head=4, n_head_kv=2, n_rot=64, rope_base=10000.0,
                         eps=1e-5, vocab=300, n_ctx=64)
# per layer: q, k, v, output, gate, up, down types (layer 1 mixes q/k/v types: three parts)
TINY_TYPES = [("Q4_K",) * 7, ("Q4_0", "Q8_0", "Q6_K", "Q4_0", "Q4_0", "Q4_0", "Q6_K")]
SUFFIXES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def tiny_llama(stored: bool):
    """Random weights; ``stored``: GGML types (TINY_TYPES), fused as ``llama.load`` fuses;
    else the same dequantized weights as float32."""
    rng = np.random.default_rng(6)
    c = TINY
    kv = c.n_head_kv * c.head_dim
    shapes = dict(attn_q=(c.d_model, c.d_model), attn_k=(kv, c.d_model), attn_v=(kv, c.d_model),
                  attn_output=(c.d_model, c.d_model), ffn_gate=(c.d_ff, c.d_model), ffn_up=(c.d_ff, c.d_model),
                  ffn_down=(c.d_model, c.d_ff))
    p = {}

    def put(name, w, t):
        lin = linear.ggml(quants.quantize(w, t), t, w.shape)
        p[name] = lin if stored else linear.DenseLinear(lin.dequantize())

    put("token_embd.weight", rng.standard_normal((c.vocab, c.d_model)).astype(np.float32), "Q8_0")
    p["output.weight"] = p["token_embd.weight"]
    p["output_norm.weight"] = (1 + 0.1 * rng.standard_normal(c.d_model)).astype(np.float32)
    for i in range(c.n_layer):
        for s in ("attn_norm", "ffn_norm"):
            p[f"blk.{i}.{s}.weight"] = (1 + 0.1 * rng.standard_normal(c.d_model)).astype(np.float32)
        for s, t in zip(SUFFIXES, TINY_TYPES[i]):
            w = (rng.standard_normal(shapes[s]) / np.sqrt(shapes[s][1])).astype(np.float32)
            put(f"blk.{i}.{s}.weight", w, t)
        for group in (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up")):
            names = [f"blk.{i}.{g}.weight" for g in group]
            p.update(zip(names, linear.fuse([p[n] for n in names])))
    return p


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(True), tiny_llama(False)


def _float_tol(cfg_layers, n_max, ref):
    return 8 * cfg_layers * n_max * F32_EPS * np.abs(ref).max()


def _rms(a):
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


IDS = [5, 17, 2, 299, 140, 33, 71, 8, 90, 12, 250, 61, 3, 44, 199, 7, 120, 18, 36, 222]


def test_tiny_llama_float_weights_equal_the_numpy_forward(tiny):
    _, pf = tiny
    ref, _ = llama.forward(pf, TINY, IDS)
    sess = compiled().Llama(pf, TINY)
    got = sess.prefill(IDS)
    assert np.abs(got - ref).max() <= _float_tol(TINY.n_layer, TINY.d_ff, ref)
    assert sess.pos == len(IDS)


def test_compiled_and_numpy_sessions_hold_the_same_kv_cache(tiny):
    """Both engines hold a ``KVCache`` (layers, sequences, kv heads, positions, head_dim):
    after the same prefill and steps, the rows they stored agree within float32 rounding of
    the products that made them (the NumPy q/k/v come from BLAS, the compiled ones from the
    step's float kernel), and the rows past the last position were never written."""
    _, pf = tiny
    ref, comp = llama.Session(pf, TINY), compiled().Llama(pf, TINY)
    for sess in (ref, comp):
        sess.prefill(IDS[:12])
        for t in IDS[12:15]:
            sess.step(t)
    n = 15
    assert ref.pos == comp.pos == n and ref.cache.key() == comp.cache.key() == ("kv", "f32", "f32")
    for a, b in ((ref.cache.k, comp.cache.k), (ref.cache.v, comp.cache.v)):
        assert a.shape[:3] == b.shape[:3] == (TINY.n_layer, 1, TINY.n_head_kv)
        np.testing.assert_allclose(b[:, :, :, :n], a[:, :, :, :n], rtol=1e-4, atol=1e-4 * np.abs(a).max())
        assert not a[:, :, :, n:].any() and not b[:, :, :, n:].any()
    assert np.abs(ref.cache.k[:, :, :, :n]).max() > 0
    comp.reset()
    assert comp.pos == 0 and comp.cache.pos.tolist() == [0]


@pytest.mark.parametrize("types", [("q8_0", "q8_0"), ("q4_0", "q4_0"),
                                   pytest.param(("f16", "bf16"), marks=pytest.mark.slow),
                                   pytest.param(("iq4_nl", "q5_1"), marks=pytest.mark.slow),
                                   pytest.param(("q4_1", "q5_0"), marks=pytest.mark.slow),
                                   pytest.param(("fp8_e4m3", "fp8_e5m2"), marks=pytest.mark.slow)])
def test_compiled_step_on_a_quantized_cache_within_its_rounding_of_the_numpy_session(tiny, types):
    """The NumPy session on the same cache types is the reference (its rows are ggml's
    bytes: ``test_kvcache``). The two engines store rows rounded from keys and values that
    differ by float32 rounding (BLAS against the float kernel), so a code can move one step
    at a rounding boundary: as for x rounding (module docstring), the compiled step's RMS
    gap to the reference is held to twice the reference's own gap to an f32 cache, plus
    float rounding. The prompt runs the tiled attention (``k_tile`` / ``v_tile``), the steps
    the one-token attention (``k_scores`` / ``v_sums``). fp8 caches with scales that are not
    1, a number per layer for the keys and per layer and head for the values."""
    _, pf = tiny
    kw = dict(cache_type_k=types[0], cache_type_v=types[1])
    sessions = [llama.Session(pf, TINY), llama.Session(pf, TINY, **kw), compiled().Llama(pf, TINY, **kw)]
    if types[0].startswith("fp8"):
        for sess in sessions[1:]:
            sess.cache.set_scales(k_scale=np.linspace(0.01, 0.1, TINY.n_layer),
                                  v_scale=np.full((TINY.n_layer, TINY.n_head_kv), 0.03) * np.arange(1, TINY.n_head_kv + 1))
    f, s, c = (np.concatenate([sess.prefill(IDS[:12])] + [sess.step(t)[None] for t in IDS[12:16]])
               for sess in sessions)
    assert sessions[2].cache.key() == sessions[1].cache.key() == ("kv", *types)
    assert _rms(s - f) > 0                      # the cache does round
    assert _rms(c - s) <= 2 * _rms(s - f) + _float_tol(TINY.n_layer, TINY.d_ff, s)
    assert (c.argmax(1) == s.argmax(1)).mean() >= 0.9


def test_context_beyond_the_trained_one_needs_asking_for(tiny):
    _, pf = tiny
    for make in (lambda **kw: llama.Session(pf, TINY, **kw), lambda **kw: compiled().Llama(pf, TINY, **kw)):
        with pytest.raises(ValueError, match=f"n_ctx 65 is beyond the {TINY.n_ctx} positions the model was trained"):
            make(n_ctx=TINY.n_ctx + 1)
        assert make(n_ctx=TINY.n_ctx + 1, allow_long_context=True).cache.n_ctx == TINY.n_ctx + 1
        with pytest.raises(ValueError, match="n_ctx must be a positive integer, got 0"):
            make(n_ctx=0)


def test_kv_cache_refuses_what_it_cannot_hold():
    from refquant.kernels.kvcache import KVCache

    with pytest.raises(ValueError, match="type_k 'q7_0' is not a cache type"):
        KVCache(2, 1, 8, 16, type_k="q7_0")
    with pytest.raises(ValueError, match="n_ctx must be a positive integer"):
        KVCache(2, 1, 8, 0)
    c = KVCache(2, 1, 8, 4)
    with pytest.raises(ValueError, match="outside this cache's 4"):
        c.store(0, 0, 3, np.zeros((2, 1, 8)), np.zeros((2, 1, 8)))


def test_tiny_llama_kernel_weights_within_the_x_rounding_bound(tiny):
    ps, pf = tiny
    s, _ = llama.forward(ps, TINY, IDS[:16])     # <= 16 tokens: the NumPy forward runs the kernels
    f, _ = llama.forward(pf, TINY, IDS[:16])
    sess = compiled().Llama(ps, TINY)
    assert len(sess.runs) == 2                   # layer 1's layout differs: two compiled runs
    c = sess.prefill(IDS[:16])
    assert _rms(s - f) > 0                       # the kernels do round x
    assert _rms(c - s) <= 2 * _rms(s - f) + _float_tol(TINY.n_layer, TINY.d_ff, s)
    assert (c.argmax(1) == s.argmax(1)).mean() >= 0.9


@pytest.mark.slow
def test_the_step_on_every_kernel_tier_within_the_x_rounding_bound(tiny, monkeypatch):
    """The compiled step built on each tier this machine runs (VNNI, AVX2, plain numba: the
    team's chunked parts, the numba tier's single chunk) against the NumPy forward, in
    blocks and token by token."""
    from refquant.kernels import bytedot

    ps, pf = tiny
    s, _ = llama.forward(ps, TINY, IDS[:16])
    f, _ = llama.forward(pf, TINY, IDS[:16])
    bound = 2 * _rms(s - f) + _float_tol(TINY.n_layer, TINY.d_ff, s)
    for tier in bytedot.available_tiers():
        monkeypatch.setenv(bytedot.TIER_ENV, tier)
        sess = compiled().Llama(ps, TINY)
        c = np.concatenate([sess.prefill(IDS[:13]), *(sess.step(t)[None] for t in IDS[13:16])])
        assert _rms(c - s) <= bound, tier


def test_prefill_in_blocks_equals_token_by_token_within_the_x_rounding_bound(tiny):
    """20 tokens as blocks of 16 + 4 (the kernels' tile path, a block boundary inside the
    prompt) against 20 single steps
    (their one-token path): the two sum each row's float epilogue in another order, which
    can move an activation across a Q8_0 rounding step, so they agree within the bound
    the x rounding implies, not bit for bit; with float32 weights (one kernel for every
    block size) they differ only by the order of the attention's sums (a block's is tiled
    over the keys, a step's is not): to float32 rounding."""
    ps, pf = tiny
    f, _ = llama.forward(pf, TINY, IDS)
    s, _ = llama.forward(ps, TINY, IDS)
    a = compiled().Llama(ps, TINY)
    a.prefill_block = 16
    block = a.prefill(IDS)
    a.reset()
    steps = np.stack([a.step(t) for t in IDS])
    assert _rms(block - steps) <= 2 * _rms(s - f) + _float_tol(TINY.n_layer, TINY.d_ff, s)
    assert (block.argmax(1) == steps.argmax(1)).mean() >= 0.9
    b = compiled().Llama(pf, TINY)
    b.prefill_block = 16
    block = b.prefill(IDS)
    b.reset()
    assert _rms(block - np.stack([b.step(t) for t in IDS])) <= _float_tol(TINY.n_layer, TINY.d_ff, f)


def test_last_only_prefill_is_the_last_row_of_the_full_one(tiny):
    """``last_only`` (what generation asks for after a prompt) runs the head on the last
    token alone and leaves the cache as a full prefill does: its logits are the full
    prefill's last row (bit for bit on the float kernel, whose rows are independent), and
    so are the NumPy session's (to float32 rounding: BLAS takes another path for 1 row)."""
    ps, pf = tiny
    for engine, params, exact in (("compiled", pf, True), ("compiled", ps, False), ("numpy", pf, False)):
        sess = compiled().Llama(params, TINY) if engine == "compiled" else llama.Session(params, TINY)
        full = sess.prefill(IDS)
        nxt = sess.step(9)
        sess.reset()
        last = sess.prefill(IDS, last_only=True)
        assert last.shape == (1, TINY.vocab)
        if exact:
            np.testing.assert_array_equal(last, full[-1:])
        else:
            np.testing.assert_allclose(last, full[-1:], rtol=0, atol=1e-5 * np.abs(full).max())
        np.testing.assert_allclose(sess.step(9), nxt, rtol=0, atol=1e-5 * np.abs(nxt).max())


def test_step_is_a_one_token_prefill_bit_for_bit(tiny):
    """``step`` takes a shorter path than ``prefill`` (its own checks, the embedding row
    decoded by the block decoder directly): the same row as ``Linear.rows`` and the same
    logits as ``prefill([t])`` from the same position, bit for bit."""
    ps, _ = tiny
    a, b = compiled().Llama(ps, TINY), compiled().Llama(ps, TINY)
    emb = ps["token_embd.weight"]
    for t in (0, 7, TINY.vocab - 1):
        np.testing.assert_array_equal(a._embed_one(t, np.zeros(1, np.int64)), emb.rows(np.array([t])))
    a.prefill(IDS[:5])
    b.prefill(IDS[:5])
    for t in (7, 0, TINY.vocab - 1):
        np.testing.assert_array_equal(a.step(np.int64(t)), b.prefill([t])[0])
    assert a.pos == b.pos == 8


def test_session_errors(tiny):
    ps, _ = tiny
    sess = compiled().Llama(ps, TINY, n_ctx=8)
    with pytest.raises(ValueError, match="empty"):
        sess.prefill([])
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        sess.prefill([300])
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        sess.step(300)
    with pytest.raises(TypeError):
        sess.step(1.5)
    sess.prefill(IDS[:8])
    with pytest.raises(ValueError, match="exceed"):
        sess.step(1)
    with pytest.raises(ValueError, match="n_ctx"):
        compiled().Llama(ps, TINY, n_ctx=65)


def test_token_ids_given_as_floats_or_bools_are_refused(tiny):
    ps, pf = tiny
    for sess in (compiled().Llama(ps, TINY, n_ctx=8), llama.Session(pf, TINY)):
        for bad in ([1.7], [True, 2], np.array([1.0])):
            with pytest.raises(TypeError, match="integers"):
                sess.prefill(bad)
        with pytest.raises(TypeError):
            sess.step(True)
        assert sess.pos == 0


# Models whose tensors and config disagree (issue 36, D1-D5): each engine, NumPy and compiled,
# refuses each before any kernel runs, naming the tensor or the config field.
def _llama_edits():
    c, d = TINY, TINY.d_model
    rng = np.random.default_rng(9)
    emb = lambda rows: linear.DenseLinear(rng.standard_normal((rows, d)).astype(np.float32))  # noqa: E731
    rows = lambda n, cols: linear.DenseLinear(rng.standard_normal((n, cols)).astype(np.float32))  # noqa: E731
    return {   # name: (config changes, tensor changes, what the message names)
        "D1 head wider than the vocabulary": ({}, {"output.weight": emb(c.vocab + 32)}, "output.weight"),
        "D2 head narrower than the vocabulary": ({}, {"output.weight": emb(c.vocab - 32)}, "output.weight"),
        "D3 rope wider than a head": ({"n_rot": 2 * c.head_dim}, {}, "rope.dimension_count"),
        "D4 ffn width not the tensors'": ({"d_ff": c.d_ff + 128}, {}, "ffn_gate.weight"),
        "D5 heads not a multiple of kv heads": ({"n_head_kv": 3}, {}, "head_count_kv"),
        "more layers than tensors": ({"n_layer": 3}, {}, "blk.2.attn_norm.weight is missing"),
        "a tensor past the layers": ({"n_layer": 1}, {}, "blk.1.* is not one this model reads"),
        "ffn_down wider than ffn_up": ({}, {"blk.0.ffn_down.weight": rows(d, c.d_ff + 32)}, "blk.0.ffn_down.weight"),
    }


@pytest.mark.parametrize("case", list(_llama_edits()))
def test_inconsistent_llama_models_are_refused_by_every_engine(tiny, case):
    from dataclasses import replace

    ps, pf = tiny
    cfg_edit, tensor_edit, named = _llama_edits()[case]
    cfg = replace(TINY, **cfg_edit)
    match = named.replace(".", r"\.").replace("*", r"\S+")
    for params in (ps, pf):
        params = {**params, **tensor_edit}
        with pytest.raises(ValueError, match=match):
            compiled().Llama(params, cfg, n_ctx=8)
        with pytest.raises(ValueError, match=match):
            llama.Session(params, cfg)


@pytest.mark.parametrize("case", ["D1", "D3", "D4", "D5", "layers"])
def test_inconsistent_llama_files_are_refused_when_loaded(tmp_path, case):
    """The same checks on a file's own metadata and tensor entries, named with the file."""
    from tests.test_hf_checkpoint import tiny_llama_gguf
    from refquant import gguf

    p = tmp_path / "m.gguf"
    t = tiny_llama_gguf(p)
    with gguf.read(p) as f:
        meta = dict(f.metadata)
    meta["tokenizer.ggml.tokens"] = [f"t{i}" for i in range(16)]
    edit = {"D1": ({}, {"output.weight": np.zeros((24, 64), np.float32)}, "output.weight"),
            "D3": ({"llama.rope.dimension_count": np.uint32(32)}, {}, "rope.dimension_count"),
            "D4": ({"llama.feed_forward_length": np.uint32(96)}, {}, "ffn_gate.weight"),
            "D5": ({"llama.attention.head_count_kv": np.uint32(3)}, {}, "head_count_kv"),
            "layers": ({"llama.block_count": np.uint32(2)}, {}, "blk.1.attn_norm.weight is missing")}[case]
    gguf.write(p, {**meta, **edit[0]}, {**t, **edit[1]})
    for dtype in ("f32", "stored"):
        with pytest.raises(ValueError, match=rf"m\.gguf.*{edit[2].replace('.', r'[.]')}"):
            llama.load(p, dtype=dtype)


def test_inconsistent_minigpt_models_are_refused_by_every_engine():
    """MiniGPT's engines on edited tensors and configs (issue 36): fewer or more embedding
    rows than tokens, a head count that does not divide d_model, a cut MLP; the MLP width
    is the config's (``d_ff``, ``gpt2.feed_forward_length``), not 4 d_model."""
    from dataclasses import replace

    from minigpt_np import model

    cfg = model.Config(n_layer=1, d_model=32, n_head=2, n_ctx=16, vocab=300)
    params = model.init_params(cfg, 0)
    edits = [({}, {"token_embd.weight": np.zeros((200, 32), np.float32)}, "token_embd.weight"),
             ({"vocab": 297}, {}, "token_embd.weight"),
             ({"n_head": 3}, {}, "head_count 3"),
             ({}, {"blk.0.ffn_up.weight": np.zeros((64, 32), np.float32)}, "blk.0.ffn_up.weight"),
             ({"d_ff": 64}, {}, "blk.0.ffn_up.weight")]
    for cfg_edit, tensor_edit, named in edits:
        c, p = replace(cfg, **cfg_edit), {**params, **tensor_edit}
        with pytest.raises(ValueError, match=named.replace(".", r"\.")):
            compiled().MiniGPT(p, c)
        with pytest.raises(ValueError, match=named.replace(".", r"\.")):
            model.Linears(p, c)
    narrow = model.Config(n_layer=1, d_model=32, n_head=2, n_ctx=16, vocab=300, d_ff=64)   # a real d_ff != 4 d
    p = model.init_params(narrow, 1)
    ids = [5, 17, 256]
    want = model.forward(p, ids, cfg=narrow)[0][0]
    np.testing.assert_allclose(compiled().MiniGPT(p, narrow).prefill(ids), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="integers"):
        model.forward(p, [1.5], cfg=narrow)


# --- SmolLM2 ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_stored(smollm2_path):
    from minigpt_np.tokenizer import Tokenizer

    params, cfg, meta = llama.load(smollm2_path, dtype="stored")
    return params, cfg, Tokenizer(meta)


def test_smollm2_compiled_step_follows_the_numpy_forward_for_64_tokens(smollm2_stored):
    """Teacher-forced on the NumPy forward's own 64 greedy tokens (not stopping at an
    end-of-text token), the compiled step's
    logits at every position lie within the x-rounding bound of the NumPy forward on the same
    stored weights (twice that forward's RMS gap to the float weights at the position, plus
    float rounding), and the compiled step's own greedy text says Paris.

    Token-for-token greedy identity is not something the two can promise: both round x to
    Q8_0 in the same kernels, but their float parts (norms, softmax, exp) differ in the
    last ulp, so now and then an element of x rounds the other way at a half-way point,
    and over 30 layers the two drift apart by about the x rounding itself (max |Δlogit|
    near 1 here), more than some top-2 margins of this text (0.09 at its 15th token)."""
    from minigpt_np import generate

    params, cfg, tok = smollm2_stored
    ids = tok.encode("The capital of France is")
    floats = {k: linear.DenseLinear(v.dequantize()) if isinstance(v, linear.Linear) else v
              for k, v in params.items()}
    sessions = [compiled().Llama(params, cfg, n_ctx=128), llama.Session(params, cfg), llama.Session(floats, cfg)]
    logits = [[np.ravel(sess.prefill(ids)[-1])] for sess in sessions]
    for _ in range(63):     # the NumPy forward's greedy token, past any end of text
        t = int(np.argmax(logits[1][-1]))
        for sess, out in zip(sessions, logits):
            out.append(np.ravel(sess.step(t)))
    assert all(len(out) == 64 for out in logits)
    for c, s, f in zip(*logits):
        assert c.shape == s.shape == f.shape == (params["output.weight"].shape[0],)
        assert _rms(c - s) <= 2 * _rms(s - f) + _float_tol(cfg.n_layer, cfg.d_ff, s)
    sess = sessions[0]
    sess.reset()
    out_c, _ = generate.generate(sess, tok, ids, 64)   # may stop early at EOS
    assert "Paris" in tok.decode(out_c)


@pytest.mark.slow
def test_smollm2_q8_0_cache_keeps_the_greedy_answer(smollm2_stored):
    """llama.cpp's q8_0 cache on the compiled step: the Paris prompt's greedy text is the
    f32 cache's for its first 5 tokens (" Paris.\n\nThe"), each won by a margin of 0.84 or
    more. The 6th is a near tie (" answer" over " United" by 0.06), below what any float32
    difference upstream of the kernels' x rounding moves a logit here (up to ~1:
    ``test_smollm2_compiled_step_follows_the_numpy_forward_for_64_tokens``)."""
    from minigpt_np import generate

    params, cfg, tok = smollm2_stored
    ids = tok.encode("The capital of France is")
    texts = {}
    for t in ("f32", "q8_0"):
        sess = compiled().Llama(params, cfg, n_ctx=64, cache_type_k=t, cache_type_v=t)
        texts[t] = tok.decode(generate.generate(sess, tok, ids, 5)[0])
    assert texts["q8_0"] == texts["f32"] == " Paris.\n\nThe"


# --- MiniGPT ----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["fp32", "int8_channel", "nf4"])
def test_minigpt_compiled_equals_forward(scheme):
    from minigpt_np import checkpoint, evaluate
    from minigpt_np.model import Linears, forward

    params, cfg, _ = checkpoint.load()
    p, lin = evaluate.prepare(params, cfg, scheme)
    prompt = list(b"the farmers have paint")   # 22 tokens: one block of 16, one of 6
    m = compiled().MiniGPT(p, cfg, lin)
    m.prefill_block = 16
    c = m.prefill(prompt)
    n_max = 4 * cfg.d_model
    # the NumPy forward through the kernels: blocks of <= 16 tokens with their KV cache
    s1, past = forward(p, np.array([prompt[:16]]), cfg=cfg, linears=lin)
    s2, _ = forward(p, np.array([prompt[16:]]), cfg=cfg, linears=lin, past=past)
    s = np.concatenate([s1[0], s2[0]])
    if scheme in ("fp32", "nf4"):             # float products on both sides (nf4 has no kernel)
        assert np.abs(c - s).max() <= _float_tol(cfg.n_layer, n_max, s)
        return
    dense = Linears(p, cfg)
    for name, layer in lin.layers.items():
        dense.layers[name] = linear.DenseLinear(layer.dequantize())
    f, _ = forward(p, np.array([prompt]), cfg=cfg, linears=dense)
    assert _rms(s - f[0]) > 0
    assert _rms(c - s) <= 2 * _rms(s - f[0]) + _float_tol(cfg.n_layer, n_max, s)


def test_minigpt_numpy_session_and_the_compiled_one_hold_the_same_cache():
    """``model.Session`` (the NumPy forward on a ``KVCache``) against ``compiled.MiniGPT``
    on float weights: the same logits within float32 rounding, token by token after a
    prefill, the same stored rows, and the session equals one forward over every token."""
    from minigpt_np import checkpoint
    from minigpt_np.model import Session, forward

    params, cfg, _ = checkpoint.load()
    ids = list(b"the farmers have paint")
    ref, comp = Session(params, cfg), compiled().MiniGPT(params, cfg)
    a = np.concatenate([ref.prefill(ids[:10]), *[ref.step(t)[None] for t in ids[10:]]])
    b = np.concatenate([comp.prefill(ids[:10]), *[comp.step(t)[None] for t in ids[10:]]])
    whole, _ = forward(params, np.array([ids]), cfg=cfg)
    tol = _float_tol(cfg.n_layer, 4 * cfg.d_model, whole[0])
    assert np.abs(a - whole[0]).max() <= tol and np.abs(b - whole[0]).max() <= tol
    n = len(ids)
    assert ref.pos == comp.pos == n
    for x, y in ((ref.cache.k, comp.cache.k), (ref.cache.v, comp.cache.v)):
        np.testing.assert_allclose(y[:, :, :, :n], x[:, :, :, :n], rtol=1e-4, atol=1e-4 * np.abs(x).max())
    ref.reset()
    np.testing.assert_array_equal(ref.prefill(ids[:10], last_only=True), a[9:10])
    for sess, want in ((ref, a), (comp, b)):   # rewinding (what the benchmarks do) replays a step
        sess.pos = 12
        np.testing.assert_array_equal(sess.step(ids[12]), want[12]) if sess is comp else \
            np.testing.assert_allclose(sess.step(ids[12]), want[12], rtol=0, atol=tol)
        assert sess.pos == 13
    with pytest.raises(ValueError, match="pos must be an integer"):
        comp.pos = -1



def test_the_step_gives_the_same_logits_on_any_number_of_threads(tiny):
    """The team splits each product by whole row groups and leaves every row's arithmetic
    alone, so one, two and three threads give the same logits bit for bit (prefill in
    blocks, the tile kernel, and steps)."""
    import numba

    ps, _ = tiny
    before = numba.get_num_threads()
    got = []
    try:
        for nt in sorted({1, 2, min(3, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(nt)
            s = compiled().Llama(ps, TINY)
            got.append(np.concatenate([s.prefill(IDS[:6]), s.step(3)[None], s.step(11)[None]]))
    finally:
        numba.set_num_threads(before)
    for g in got[1:]:
        np.testing.assert_array_equal(g, got[0])


def test_a_team_forms_from_the_threads_that_run_and_its_barrier_waits_for_all():
    """``threads.join``: a thread alone (a region run serially) closes the team after its
    wait and works as a team of one; a thread coming after that is turned away. In a
    parallel region, every member's writes before a barrier are seen after it."""
    from numba import njit, prange

    from refquant.kernels import threads

    @njit
    def alone(sync):
        return threads.join(sync, 4)

    sync = threads.team_sync()
    assert alone(sync) == (0, 1)
    assert alone(sync) == (-1, 0)

    @njit(parallel=True)
    def region(nt, sync, a, seen):
        for i in prange(nt):
            tid, m = threads.join(sync, nt)
            if tid >= 0:
                k = 0
                for r in range(50):
                    a[tid] = r + 1
                    k = threads.barrier(sync, m, k)
                    s = 0
                    for j in range(m):
                        s += a[j]
                    seen[tid, r] = s
                    k = threads.barrier(sync, m, k)
        return sync[0] & ((1 << 40) - 1)

    a = np.zeros(8, np.int64)
    seen = np.zeros((8, 50), np.int64)
    m = region(2, threads.team_sync(), a, seen)
    assert 1 <= m <= 2
    np.testing.assert_array_equal(seen[:m], np.tile(m * np.arange(1, 51), (m, 1)))


def test_batched_steps_equal_each_sequence_decoded_alone(tiny):
    """``step_batch``: one token of each of several sequences, at different positions,
    through one team call per 16. With fewer than ``TILE_MIN_M`` tokens every token takes
    the one-token kernel; with more, the tile kernel, whose float epilogue is the one-token
    kernel's: either way each row equals that sequence's own step bit for bit. The cache
    positions of the sequences advance, and other sequences' rows are left alone."""
    from refquant.kernels import bytedot

    ps, _ = tiny
    prompts = [IDS[:5], IDS[3:12], IDS[7:9], IDS[1:14], IDS[10:13]]
    nxt = [7, 250, 31, 2, 199]
    alone = []
    for p, t in zip(prompts, nxt):
        sess = compiled().Llama(ps, TINY)
        sess.prefill(p)
        alone.append(np.concatenate([sess.step(t)[None], sess.step(t + 1)[None]]))
    for B in (3, 5):
        assert (B >= bytedot.TILE_MIN_M) == (B == 5)
        batch = compiled().Llama(ps, TINY, n_seq=B)
        for q in reversed(range(B)):            # filled in any order
            batch.prefill(prompts[q], seq=q)
        k_before = batch.cache.k.copy()
        got = [batch.step_batch(nxt[:B]), batch.step_batch([t + 1 for t in nxt[:B]])]
        assert batch.cache.pos.tolist() == [len(p) + 2 for p in prompts[:B]]
        for q in range(B):
            n = len(prompts[q])
            np.testing.assert_array_equal(batch.cache.k[:, q, :, :n], k_before[:, q, :, :n])
            for i in range(2):
                np.testing.assert_array_equal(got[i][q], alone[q][i])
    part = batch.step_batch([4, 5], seqs=[3, 1])    # a subset, in any order
    assert part.shape == (2, TINY.vocab) and batch.cache.pos.tolist() == [7, 12, 4, 16, 5]


def test_batched_step_errors(tiny):
    ps, _ = tiny
    sess = compiled().Llama(ps, TINY, n_ctx=8, n_seq=2)
    with pytest.raises(ValueError, match="one token per sequence"):
        sess.step_batch([1, 2], seqs=[1, 1])
    with pytest.raises(ValueError, match=r"seq must be an integer in \[0, 2\)"):
        sess.step_batch([1, 2], seqs=[0, 2])
    with pytest.raises(ValueError, match="one per token"):
        sess.step_batch([1, 2], seqs=[0])
    with pytest.raises(ValueError, match=r"seq must be an integer in \[0, 2\)"):
        sess.prefill([1], seq=-1)
    sess.prefill(list(range(8)), seq=1)
    with pytest.raises(ValueError, match="9 positions exceed"):
        sess.step_batch([1, 2])
    assert sess.cache.pos.tolist() == [0, 8]
    sess.reset(1)
    assert sess.cache.pos.tolist() == [0, 0]
    with pytest.raises(ValueError, match="empty"):
        sess.step_batch([])


def test_minigpt_batched_steps_use_each_sequences_positions():
    """MiniGPT adds a position embedding per token: in a batch, each at its own position."""
    from minigpt_np import checkpoint

    params, cfg, _ = checkpoint.load()
    a, b = list(b"the farmers"), list(b"paint the barn red")
    batch = compiled().MiniGPT(params, cfg, n_seq=2)
    batch.prefill(a, seq=0)
    batch.prefill(b, seq=1)
    got = batch.step_batch([ord("x"), ord("y")])
    for q, (p, t) in enumerate(((a, ord("x")), (b, ord("y")))):
        alone = compiled().MiniGPT(params, cfg)
        alone.prefill(p)
        np.testing.assert_array_equal(got[q], alone.step(t))


def _greedy_alone(make, prompt, n):
    sess = make()
    t = int(np.argmax(sess.prefill(prompt, last_only=True)[-1]))
    out = [t]
    for _ in range(n - 1):
        t = int(np.argmax(sess.step(t)))
        out.append(t)
    return out


def test_batch_session_joins_and_leaves_and_keeps_each_text(tiny):
    """``generate.BatchSession``: sequences join and leave between steps; each one's greedy
    tokens are those it gets decoded alone (five at once take the tile kernel)."""
    from minigpt_np import generate

    ps, _ = tiny
    prompts = [IDS[:5], IDS[3:12], IDS[7:9], IDS[1:14], IDS[10:13], IDS[2:4]]
    alone = [_greedy_alone(lambda: compiled().Llama(ps, TINY), p, 8) for p in prompts]
    bs = generate.BatchSession(ps, TINY, n_seq=5)
    seqs = [bs.add(p) for p in prompts[:5]]
    assert seqs == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="all 5 sequences are in use"):
        bs.add(prompts[5])
    got = {q: [] for q in range(6)}
    owner = dict(zip(seqs, range(5)))
    for i in range(8):
        if i == 3:                      # the third prompt leaves, the sixth takes its place
            bs.remove(2)
            assert bs.add(prompts[5]) == 2
            owner[2] = 5
        for q, t in bs.step().items():
            got[owner[q]].append(t)
    for k in (0, 1, 3, 4):
        assert got[k] == alone[k]
    assert got[2] == alone[2][:3] and got[5] == alone[5][:5]
    with pytest.raises(ValueError, match="not active"):
        bs.remove(7)


def test_smollm2_batch_of_eight_keeps_every_text(smollm2_stored):
    """Eight prompts decoded together (M = 8 products on the tile kernel) give each the
    greedy text it gets alone, 12 tokens each."""
    from minigpt_np import generate

    params, cfg, tok = smollm2_stored
    texts = ["The capital of France is", "Water boils at", "The largest planet is", "My favourite colour is",
             "In 1492, Columbus", "def fibonacci(n):", "Quantization of weights", "Once upon a time"]
    prompts = [tok.encode(t) for t in texts]
    bs = generate.BatchSession(params, cfg, n_seq=8, n_ctx=64)
    for p in prompts:
        bs.add(p)
    got = {q: [] for q in range(8)}
    for _ in range(12):
        for q, t in bs.step().items():
            got[q].append(t)
    for q, p in enumerate(prompts):
        assert got[q] == _greedy_alone(lambda: compiled().Llama(params, cfg, n_ctx=64), p, 12), texts[q]


def test_batch_session_retires_a_sequence_whose_context_is_full(tiny):
    """A sequence that fills its context returns its last token and leaves; the others go
    on, and its place can be taken again."""
    from minigpt_np import generate

    ps, _ = tiny
    bs = generate.BatchSession(ps, TINY, n_seq=2, n_ctx=8)
    a, b = bs.add(IDS[:6]), bs.add(IDS[:2])
    seen = {a: [], b: []}
    for _ in range(3):
        for q, t in bs.step().items():
            seen[q].append(t)
    # a: tokens at positions 6 and 7 run; the third step returns its pending token, and it leaves
    assert len(seen[a]) == 3 and len(seen[b]) == 3 and bs.active == [b]
    assert seen[a] == _greedy_alone(lambda: compiled().Llama(ps, TINY, n_ctx=8), IDS[:6], 3)
    with pytest.raises(ValueError, match="9 positions exceed"):
        bs.add(IDS[:9])             # refused: the sequence stays free
    assert bs.add(IDS[:3]) == a and bs.active == [a, b]


def _attention_oracle(qkv, k, v, poss, n_head, n_kv, hd):
    """Causal attention of each row of ``qkv`` over keys/values 0..poss[t] (float64 NumPy)."""
    group = n_head // n_kv
    out = np.zeros((len(poss), n_head * hd))
    for t, p in enumerate(poss):
        for h in range(n_head):
            q = qkv[t, h * hd:(h + 1) * hd].astype(np.float64)
            K, Vv = k[0, 0, h // group, :p + 1].astype(np.float64), v[0, 0, h // group, :p + 1].astype(np.float64)
            s = K @ q / np.sqrt(hd)
            w = np.exp(s - s.max())
            out[t, h * hd:(h + 1) * hd] = (w / w.sum()) @ Vv
    return out


@pytest.mark.parametrize("n_head, n_kv, hd, poss", [
    (9, 3, 64, list(range(40, 56))),          # SmolLM2's heads, a prefill block past two tiles
    (9, 3, 64, [0, 1, 2, 3, 4]),               # the first block: the padding rows, a partial tile
    (4, 2, 24, [3, 17, 16, 40, 41, 90, 5]),    # hd not a multiple of 32 (the one-row path), any positions
    (2, 1, 32, list(range(15, 33))),           # rows whose keys start in a later tile
])
def test_tiled_attention_equals_the_plain_one_and_the_float64_oracle(n_head, n_kv, hd, poss):
    """The prefill's tiled attention (online softmax over tiles of 16 keys) against the
    decode's per-token attention and a float64 NumPy softmax, in work items of one
    key/value head and a run of tokens as a team claims them; keys after a row's position
    must not count (the cache holds large values there). The decode's attention splits
    the positions over 1, 2 or 3 members (one of them empty at position 0) and merges
    their shares."""
    c = compiled()
    rng = np.random.default_rng(hd + len(poss))
    T, P = len(poss), max(poss) + 1
    k = rng.standard_normal((1, 1, n_kv, P + 20, hd)).astype(np.float32) * 2
    v = rng.standard_normal((1, 1, n_kv, P + 20, hd)).astype(np.float32)
    k[:, :, :, P:], v[:, :, :, P:] = 1e4, 1e4           # never read
    qkv = rng.standard_normal((T, (n_head + 2 * n_kv) * hd)).astype(np.float32)
    poss = np.array(poss, np.int64)
    key = ("kv", "f32", "f32")
    tiled, plain = c._make_tiled_attention(key), c._make_attention(key)
    want = _attention_oracle(qkv, k, v, poss, n_head, n_kv, hd)
    got = np.full((T, n_head * hd), np.nan, np.float32)
    cut = T // 3
    ones = np.ones((1, n_kv), np.float32)      # the scales of a scaled cache type
    for kv in range(n_kv):
        tiled(qkv, k, v, ones, ones, 0, 0, poss, n_head, n_kv, hd, got, kv, 0, cut)
        tiled(qkv, k, v, ones, ones, 0, 0, poss, n_head, n_kv, hd, got, kv, cut, T)
    part, merge = plain
    one = np.empty((T, n_head * hd), np.float32)
    for t in range(T):
        nt = 3 if poss[t] < 2 else 1 + t % 3     # positions 0 and 1: a member with no keys
        shares = np.full((nt, n_head, hd + 2), np.nan, np.float32)
        for tid in range(nt):
            part(qkv[t], k, v, ones, ones, 0, 0, poss[t], n_head, n_kv, hd, shares, tid, nt)
        merge(shares, nt, n_head, hd, one[t], 0, n_head - 1)    # the heads of two members
        merge(shares, nt, n_head, hd, one[t], n_head - 1, n_head)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(got, one, rtol=0, atol=2e-5)


def test_vector_exp_and_reductions_against_numpy():
    """``simd.exp_f32x8`` within 2 ulp of float64 ``exp`` (rounded to float32) on the range it
    promises, clamped outside it; ``hmax``/``hsum``/``keep_first`` against NumPy."""
    compiled()
    from numba import njit

    from refquant.kernels import simd as V

    @njit
    def run(x, k, out):
        for i in range(0, x.size, 8):
            V.store_f32x8(out[0], i, V.exp_f32x8(V.load_f32x8(x, i)))
            V.store_f32x8(out[1], i, V.keep_first(V.load_f32x8(x, i), k, np.float32(-1)))
            out[2, i] = V.hmax_f32x8(V.load_f32x8(x, i))
            out[3, i] = V.hsum_f32x8(V.load_f32x8(x, i))

    rng = np.random.default_rng(7)
    x = np.concatenate([rng.uniform(-87.3, 88.3, 4000), [0, -1e-30, 1, -87.3, 88.3, -200, 500, -np.inf, np.inf,
                                                          np.log(2), 10, -10, 1e-7, -1e-7, 87, -87]]).astype(np.float32)
    out = np.zeros((4, x.size), np.float32)
    for k in (0, 3, 8):
        run(x, k, out)
        blocks = x.reshape(-1, 8)
        np.testing.assert_array_equal(out[1].reshape(-1, 8), np.where(np.arange(8) < k, blocks, -1))
    want = np.exp(np.clip(x.astype(np.float64), np.float32(-87.3), np.float32(88.3))).astype(np.float32)   # float32 bounds
    ulp = np.abs(out[0].view(np.int32).astype(np.int64) - want.view(np.int32))
    assert ulp.max() <= 2, x[ulp.argmax()]
    finite = blocks[np.isfinite(blocks).all(1)]
    np.testing.assert_array_equal(out[2, ::8][np.isfinite(blocks).all(1)], finite.max(1))
    np.testing.assert_allclose(out[3, ::8][np.isfinite(blocks).all(1)], finite.astype(np.float64).sum(1), rtol=1e-6,
                               atol=1e-4)
