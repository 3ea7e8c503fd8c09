"""The decode step compiled: whole transformer blocks in one numba call per token.

``llama.forward`` and ``model.forward`` are the readable NumPy references; per token they
make ~20 NumPy calls per layer and grow the KV cache by concatenation, which on SmolLM2
costs more than the weight products themselves. ``Llama(params, cfg)`` and
``MiniGPT(params, cfg, linears)`` run the same arithmetic inside numba:

* every weight role (fused q/k/v, attention output, fused gate/up or up, down) is one
  ``refquant.kernels.stacked.Operand`` over the layers, multiplied by the same byte-dot
  kernel ``Linear`` calls use (x rounded to Q8_0 blocks as llama.cpp does), or by a
  float32 kernel for float weights;
* the KV cache is a preallocated ``KVCache`` of ``n_seq`` sequences, written in place;
  attention, RMSNorm / LayerNorm, RoPE, SwiGLU / GELU and the residuals are loops;
* one numba call (a team of threads, ``_build_layers``) runs every layer and the output
  head for a block of tokens: decode, one token; prefill, blocks of ``PREFILL_BLOCK`` (128) of
  one sequence; ``step_batch``, one token of each of up to 16 sequences, each at its own
  position (each weight read once for all of them). Layers whose weights differ in layout
  (a file mixing types per layer) are split into runs of equal layout, one call each.

``session.prefill(ids, seq=0)`` -> logits (T, vocab) (``last_only=True``: the last token's,
(1, vocab)); ``session.step(id)`` -> logits (vocab,) (sequence 0);
``session.step_batch(ids, seqs=None)`` -> logits (B, vocab); ``session.reset(seq=None)``.
``llama.Session`` is the NumPy session with the same interface for one sequence.
"""
from __future__ import annotations

import math
import operator

import numpy as np
from numba import njit, prange

from minigpt_np.model import CacheSession, token_ids
from refquant.kernels import MAX_BATCH, _cache, bytedot, kvcache, stacked, threads
from refquant.kernels import simd as V
from refquant.kernels.simd import f32_from_bits

# the step's code, cached on disk under its compile key, is built from these modules too
# a cache type's store inlines its ggml quantizer (refquant.gguf.quants.cache)
_DEPS = ("minigpt_np/compiled.py", "refquant/gguf/quants/compiled.py", "refquant/gguf/quants/cache.py",
         "refquant/gguf/quants/constants.py", "refquant/kvfp8.py", "refquant/formats.py")


# --- the block's pieces, in numba ---------------------------------------------------------

# reassociation lets LLVM vectorize the sums and dot products (no nnan/ninf: the code
# compares with -inf); the norms' sums are float64, and with arcp/contract their last
# float32 steps may differ from NumPy's in the last bit (the tests' float tolerance)
_FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(fastmath=_FAST)
def _rms_norm(x, w, eps, out):
    T, d = x.shape
    for t in range(T):
        ss = 0.0
        for i in range(d):
            ss += np.float64(x[t, i]) * x[t, i]
        r = np.float32(1.0 / math.sqrt(ss / d + eps))
        for i in range(d):
            out[t, i] = (x[t, i] * r) * w[i]


@njit(fastmath=_FAST)
def _layer_norm(x, w, b, eps, out):
    T, d = x.shape
    for t in range(T):
        mu = 0.0
        for i in range(d):
            mu += x[t, i]
        mu /= d
        var = 0.0
        for i in range(d):
            c = x[t, i] - mu
            var += c * c
        r = 1.0 / math.sqrt(var / d + eps)
        for i in range(d):
            out[t, i] = np.float32((x[t, i] - mu) * r) * w[i] + b[i]


@njit
def _rope(v, off, heads, hd, n_rot, cos, sin, pos):
    """Rotate pairs (2i, 2i+1) of the first ``n_rot`` dims of each head in ``v[off:]``."""
    for h in range(heads):
        base = off + h * hd
        for i in range(n_rot // 2):
            a, b = v[base + 2 * i], v[base + 2 * i + 1]
            c, s = cos[pos, i], sin[pos, i]
            v[base + 2 * i] = a * c - b * s
            v[base + 2 * i + 1] = a * s + b * c


@njit(inline="always")
def _exp(x):
    """float32 ``exp(x)`` within 2 ulp (Cephes ``expf``: ``x = n ln 2 + r``, |r| <= ln2/2,
    ``e^r`` by a degree-7 polynomial, ``2^n`` built from its exponent bits), in plain
    arithmetic so that LLVM vectorizes the loops that call it (libm's ``expf`` is a scalar
    call: SwiGLU's 46k per SmolLM2 token took 0.4 ms). x is clamped to [-87.3, 88.3]:
    below, the result is ~1e-38 instead of a subnormal or 0; above, Inf would be 1.7e38."""
    x = min(max(x, np.float32(-87.3)), np.float32(88.3))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1)
    return p * f32_from_bits(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


def _make_attention(cache_key: tuple):
    """``(part, merge)``: one token's attention split over the positions, flash-decoding
    style, so that every member of a team reads its own share of the cache for every head
    (split over heads, the members of SmolLM2's 3 key/value heads read one of them twice).

    ``part(q, k, v, ks, vs, l, seq, pos, n_head, n_kv, hd, P, tid, nt)``: query row ``q`` (n_head·hd)
    against positions ``j`` of ``share(pos + 1, tid, nt)`` of layer ``l``, sequence ``seq`` of
    a ``KVCache``'s arrays, read only through the cache's ``k_scores`` / ``v_sums``; for every
    query head ``h`` it writes ``P[tid, h] = (m, Σ_j e_j, Σ_j e_j V_j)`` with ``m`` its share's
    largest score and ``e_j = exp(s_j − m)`` (``m = −inf``, zero sums for an empty share).
    The query heads of a key/value head go together. ``merge(P, nt, n_head, hd, out, h0,
    h1)``: heads ``h0 <= h < h1`` of ``out`` (n_head·hd) from the ``nt`` shares,
    ``Σ_i e^{m_i − M} A_i / Σ_i e^{m_i − M} L_i`` with ``M`` the largest ``m_i``: the softmax
    over all positions. Each head of ``out`` is written once, by one member (summed in
    ``out`` itself, the cache line two members share at their boundary went back and forth
    between the cores ~200 times per layer: SmolLM2's step took 0.75 ms longer)."""
    if cache_key not in _ATTENTION:
        cops = kvcache.ops(*cache_key[1:])
        k_scores, v_sums = cops.k_scores, cops.v_sums
        NEG = np.float32(-np.inf)

        @njit(fastmath=_FAST, error_model="numpy")
        def part(q, k, v, ks, vs, l, seq, pos, n_head, n_kv, hd, P, tid, nt):
            group = n_head // n_kv
            scale = np.float32(1.0 / math.sqrt(hd))
            j0, j1 = threads.share(pos + 1, tid, nt)
            n = j1 - j0
            N = n + (-n) % 8                    # rows of whole vectors
            s = np.empty(group * max(N, 8), np.float32)
            acc = np.empty(group * hd, np.float32)
            W = hd + 2
            Pf = P.reshape(-1)
            base = tid * n_head * W
            for kv in range(n_kv):
                k_scores(k, l, seq, kv, j0, n, q, kv * group * hd, group, hd, scale * ks[l, kv], s, N)
                for g in range(group):          # the softmax's numerators, eight scores at a time
                    r = g * N
                    for j in range(n, N):
                        s[r + j] = NEG
                    m8 = V.splat_f32x8(NEG)
                    for j in range(0, N, 8):
                        m8 = V.max_f32x8(m8, V.load_f32x8(s, r + j))
                    mx = V.hmax_f32x8(m8)
                    t8 = V.zeros_f32()
                    if n > 0:
                        nm = V.splat_f32x8(-mx)
                        for j in range(0, N, 8):
                            e = V.keep_first(V.exp_f32x8(V.add_f32x8(V.load_f32x8(s, r + j), nm)), n - j,
                                             np.float32(0))
                            V.store_f32x8(s, r + j, e)
                            t8 = V.add_f32x8(t8, e)
                    Pf[base + (kv * group + g) * W] = mx
                    Pf[base + (kv * group + g) * W + 1] = V.hsum_f32x8(t8)
                acc[:] = 0
                v_sums(v, l, seq, kv, j0, n, s, N, group, acc, hd)
                f = vs[l, kv]       # a scaled type's values (1 for the others)
                for g in range(group):
                    o = base + (kv * group + g) * W + 2
                    for i in range(hd):
                        Pf[o + i] = acc[g * hd + i] * f

        @njit(fastmath=_FAST, error_model="numpy")
        def merge(P, nt, n_head, hd, out, h0, h1):
            row = np.empty(hd, np.float32)
            for h in range(h0, h1):
                M = NEG
                for i in range(nt):
                    M = max(M, P[i, h, 0])
                L = np.float32(0)
                row[:] = 0
                for i in range(nt):
                    if P[i, h, 0] != NEG:      # an empty share (a NaN in a share still reaches out)
                        f = _exp(P[i, h, 0] - M)
                        L += f * P[i, h, 1]
                        for d in range(hd):
                            row[d] += f * P[i, h, 2 + d]
                inv = np.float32(1) / L
                for d in range(hd):
                    out[h * hd + d] = row[d] * inv
        _ATTENTION[cache_key] = (part, merge)
    return _ATTENTION[cache_key]


_ATTENTION: dict = {}


@njit(fastmath=_FAST)
def _pv(o, vt, p, f, lim, hd):
    """``o[:hd] = o·f + Σ_{c < lim} p[c] vt[c·hd:(c+1)·hd]``: one output row, any ``hd``."""
    for i in range(hd):
        a = o[i] * f
        for c in range(lim):
            a += p[c] * vt[c * hd + i]
        o[i] = a


def _make_tiled_attention(cache_key: tuple):
    """``tiled(qkv, k, v, ks, vs, l, seq, poss, n_head, n_kv, hd, att, kv, t0, t1)``: the attention of
    ``_make_attention`` for rows ``t0 <= t < t1`` of ``qkv`` (tokens of sequence ``seq`` at
    positions ``poss``, their keys and values already stored) and the query heads of
    key/value head ``kv`` (one work item of a team: ``_build_layers``), tiled over the keys
    as flash attention is. The cache is read ``kvcache.TILE`` (16) keys at a time
    (``k_tile``, transposed, and ``v_tile``) and each tile serves every query row of the
    heads that share it, four rows at a time: their scores are eight
    vector accumulators (4 rows x 16 keys), their weighted values sixteen (4 rows x 32
    columns, each value row loaded once for the four). A running maximum and sum per row
    (the online softmax) rescale what the row has summed so far when a tile raises its
    maximum. Keys after a row's own position weigh exactly 0. A prefill's attention then
    reads each cached row once per member and block of tokens instead of once per token.
    The hot loops index flat buffers and call nothing that takes an array: numba counts
    references of arrays passed to a function with branches, two atomic operations per
    call that cost more than the arithmetic here."""
    if cache_key not in _TILED:
        cops = kvcache.ops(*cache_key[1:])
        k_tile, v_tile = cops.k_tile, cops.v_tile
        BK = kvcache.TILE
        assert BK == 16    # two vectors of scores per row
        NEG, ZERO = np.float32(-np.inf), np.float32(0)

        @njit(inline="always", fastmath=_FAST)
        def online(sa, sb, rp, m_old, j0, n):
            """One row's scores ``sa|sb`` of the tile at ``j0`` (``n`` keys; the row at
            position ``rp``, its running maximum ``m_old``) -> (its weights, masked keys
            exactly 0; the factor its sums so far take; the keys it weighs; its new maximum)."""
            lim = min(n, rp - j0 + 1)     # keys after the row's position are masked
            sa, sb = V.keep_first(sa, lim, NEG), V.keep_first(sb, lim - 8, NEG)
            m = max(m_old, V.hmax_f32x8(V.max_f32x8(sa, sb)))
            sa = V.keep_first(V.exp_f32x8(V.add_f32x8(sa, V.splat_f32x8(-m))), lim, ZERO)
            sb = V.keep_first(V.exp_f32x8(V.add_f32x8(sb, V.splat_f32x8(-m))), lim - 8, ZERO)
            f = _exp(m_old - m) if m > m_old else np.float32(1)   # the first tile: sums are 0, f any
            return sa, sb, f, lim, m

        @njit(fastmath=_FAST, error_model="numpy")
        def tiled(qkv, k, v, ks, vs, l, seq, poss, n_head, n_kv, hd, att, kv, t0, t1):
            T = t1 - t0
            group = n_head // n_kv
            scale = np.float32(1.0 / math.sqrt(hd)) * ks[l, kv]     # a scaled type's keys (1 for the others)
            upto = 0
            for t in range(t0, t1):
                upto = max(upto, poss[t] + 1)
            R = T * group + 3
            Q = np.zeros(R * hd, np.float32)      # flat buffers (docstring)
            O = np.empty(R * hd, np.float32)
            mx = np.empty(R, np.float32)
            tot = np.empty(R, np.float32)
            rpos = np.empty(R, np.int64)
            kt = np.empty((hd, BK), np.float32)
            vt = np.empty((BK, hd), np.float32)
            ktf, vtf = kt.reshape(-1), vt.reshape(-1)
            s = np.empty(4 * BK, np.float32)
            fs = np.empty(4, np.float32)
            nr = 0
            for t in range(t0, t1):
                for g in range(group):
                    base = (kv * group + g) * hd
                    for i in range(hd):
                        Q[nr * hd + i] = qkv[t, base + i] * scale
                    rpos[nr] = poss[t]
                    nr += 1
            Q[nr * hd:] = 0      # padding rows of the last four: all masked, weights 0
            rpos[nr:] = -1
            O[:] = 0
            mx[:] = NEG
            tot[:] = 0
            for j0 in range(0, upto, BK):
                n = min(BK, upto - j0)
                k_tile(k, l, seq, kv, j0, n, kt)
                v_tile(v, l, seq, kv, j0, n, vt)
                for r0 in range(0, nr, 4):
                    if max(max(rpos[r0], rpos[r0 + 1]), max(rpos[r0 + 2], rpos[r0 + 3])) < j0:
                        continue
                    a0, a1, a2, a3 = V.zeros_f32(), V.zeros_f32(), V.zeros_f32(), V.zeros_f32()
                    a4, a5, a6, a7 = V.zeros_f32(), V.zeros_f32(), V.zeros_f32(), V.zeros_f32()
                    q = r0 * hd
                    for i in range(hd):
                        ka, kb = V.load_f32x8(ktf, BK * i), V.load_f32x8(ktf, BK * i + 8)
                        q0, q1, q2, q3 = Q[q + i], Q[q + hd + i], Q[q + 2 * hd + i], Q[q + 3 * hd + i]
                        a0, a1 = V.fmadd_f32x8(a0, ka, q0), V.fmadd_f32x8(a1, kb, q0)
                        a2, a3 = V.fmadd_f32x8(a2, ka, q1), V.fmadd_f32x8(a3, kb, q1)
                        a4, a5 = V.fmadd_f32x8(a4, ka, q2), V.fmadd_f32x8(a5, kb, q2)
                        a6, a7 = V.fmadd_f32x8(a6, ka, q3), V.fmadd_f32x8(a7, kb, q3)
                    lim = 0
                    for rr in range(4):
                        r = r0 + rr
                        sa, sb = (a0, a1) if rr == 0 else (a2, a3) if rr == 1 else (a4, a5) if rr == 2 else (a6, a7)
                        if rpos[r] < j0:            # this row's keys all come later (or a padding row)
                            sa, sb, f = V.zeros_f32(), V.zeros_f32(), np.float32(1)
                        else:
                            sa, sb, f, rl, mx[r] = online(sa, sb, rpos[r], mx[r], j0, n)
                            tot[r] = tot[r] * f + V.hsum_f32x8(V.add_f32x8(sa, sb))
                            lim = max(lim, rl)
                        V.store_f32x8(s, BK * rr, sa)
                        V.store_f32x8(s, BK * rr + 8, sb)
                        fs[rr] = f
                    if hd % 32:
                        for rr in range(4):
                            _pv(O[(r0 + rr) * hd:], vtf, s[BK * rr:], fs[rr], lim, hd)
                        continue
                    f0, f1, f2, f3 = fs[0], fs[1], fs[2], fs[3]
                    for v0 in range(0, hd, 32):     # 16 accumulators: 4 rows x 32 columns
                        o0, o1, o2, o3 = r0 * hd + v0, (r0 + 1) * hd + v0, (r0 + 2) * hd + v0, (r0 + 3) * hd + v0
                        b00, b01, b02, b03 = V.load4(O, o0, f0)
                        b10, b11, b12, b13 = V.load4(O, o1, f1)
                        b20, b21, b22, b23 = V.load4(O, o2, f2)
                        b30, b31, b32, b33 = V.load4(O, o3, f3)
                        for c in range(lim):
                            w = c * hd + v0
                            w0, w1 = V.load_f32x8(vtf, w), V.load_f32x8(vtf, w + 8)
                            w2, w3 = V.load_f32x8(vtf, w + 16), V.load_f32x8(vtf, w + 24)
                            b00, b01, b02, b03 = V.fmadd4(b00, b01, b02, b03, w0, w1, w2, w3, s[c])
                            b10, b11, b12, b13 = V.fmadd4(b10, b11, b12, b13, w0, w1, w2, w3, s[BK + c])
                            b20, b21, b22, b23 = V.fmadd4(b20, b21, b22, b23, w0, w1, w2, w3, s[2 * BK + c])
                            b30, b31, b32, b33 = V.fmadd4(b30, b31, b32, b33, w0, w1, w2, w3, s[3 * BK + c])
                        V.store4(O, o0, b00, b01, b02, b03)
                        V.store4(O, o1, b10, b11, b12, b13)
                        V.store4(O, o2, b20, b21, b22, b23)
                        V.store4(O, o3, b30, b31, b32, b33)
            nr = 0
            for t in range(t0, t1):
                for g in range(group):
                    base = (kv * group + g) * hd
                    inv = vs[l, kv] / tot[nr]
                    for i in range(hd):
                        att[t, base + i] = O[nr * hd + i] * inv
                    nr += 1
        _TILED[cache_key] = tiled
    return _TILED[cache_key]


_TILED: dict = {}


@njit(fastmath=_FAST, error_model="numpy")
def _swiglu(up, act, d_ff):
    """``silu(gate) · up`` for ``up`` = [gate | up] (one token)."""
    for i in range(d_ff):
        g = up[i]
        act[i] = g / (np.float32(1) + _exp(-g)) * up[d_ff + i]


_GELU_C, _GELU_A = np.float32(np.sqrt(2.0 / np.pi)), np.float32(0.044715)


@njit(fastmath=_FAST, error_model="numpy")
def _gelu(u, b, act, d_ff):
    """GPT-2's tanh GELU of ``u + b`` (one token): ``tanh(z) = 1 - 2 / (e^{2z} + 1)``."""
    for i in range(d_ff):
        v = u[i] + b[i]
        z = _GELU_C * (v + _GELU_A * v * v * v)
        act[i] = np.float32(0.5) * v * (np.float32(2) - np.float32(2) / (_exp(np.float32(2) * z) + np.float32(1)))


def _build_layers(key, parts, structure, cache_key, *, n_head, n_kv, hd, n_rot, eps, d_ff, llama):
    """The compiled loop over layers for one run of equal layout, and the output head
    (module docstring).

    ``parts``: (qkv, o, up, down, head) ``stacked.make_concat_part`` functions,
    ``structure`` the number of arrays of each of their operands (``_team``); ``cache_key``:
    the ``KVCache``'s (its storage types: the cache is written by its ``store`` and read by
    the attention built on its ``k_scores``/``v_sums``). ``llama``: RMSNorm, RoPE, SwiGLU
    (gate|up stacked), no biases; else GPT-2: LayerNorm with bias, GELU, biases on every
    Linear (positions are added to the embedding by the caller).

    ``team(nt, sync, only_products, x, seqs, poss, *norms, *biases, *final, *weights, k, v, ks, vs, cos,
    sin, fas, logits, head, chunks)`` (``_flat``) is one parallel region of ``nt`` threads (0:
    numba's thread count) for the whole run (``threads.join``; ``sync``, ``_counters`` work
    counters after its two words, is reset by it): every member keeps its own copy of the
    residual stream and computes the norms and activations itself (a few µs), each product
    is cut into ``chunks`` chunks of row groups (0: ``CHUNKS`` per member) that the members
    claim as they go (``make_part``: one that runs ahead takes more), and a barrier (~50 ns) follows each product, the cache stores and the attention. Each
    member rotates (or biases) and stores its share of the key/value heads, then attends
    with its share of the query heads (SmolLM2 on two threads: its 9 query heads split 4/5
    where its 3 key/value heads split 1/2). A parallel call per product
    instead cost ~2.5 µs of fork and join each, 120 times per SmolLM2 token, and left the
    other core idle during everything between products. ``head`` 1: then the final norm and
    the output head on the last ``logits.shape[0]`` tokens into ``logits``, in the same
    region (0: no head; a file of several runs asks it of the last). ``only_products``: the
    products alone on inputs of ones (the time breakdown)."""
    p_qkv, p_o, p_up, p_down, p_head = parts
    cops = kvcache.ops(*cache_key[1:])
    store, fetch = cops.store, cops.fetch
    part, merge = _make_attention(cache_key)
    tiled = _make_tiled_attention(cache_key)
    q_len, kv_len = n_head * hd, n_kv * hd
    group = n_head // n_kv
    up_rows = 2 * d_ff if llama else d_ff

    @njit
    def norm(x, w, b, out):
        if llama:
            _rms_norm(x, w, eps, out)
        else:
            _layer_norm(x, w, b, eps, out)

    @njit(inline="always")
    def residual(xl, o, bias, l):
        for t in range(xl.shape[0]):
            for i in range(xl.shape[1]):
                xl[t, i] += o[t, i] if llama else o[t, i] + bias[l, i]

    @njit(inline="always")
    def slot(l, role):
        """The work counter of layer ``l``'s product ``role`` (role 4: its tiled attention;
        ``_counters``)."""
        return 2 + 3 * (ROLES * l + role)

    @njit(inline="always")
    def position(row, bias, l, pos, h0, h1, kv0, kv1, cos, sin):
        """RoPE (llama) or the biases (GPT-2) on query heads ``h0 <= h < h1`` and key/value
        heads ``kv0 <= h < kv1`` of one token's q|k|v ``row``."""
        if llama:
            _rope(row, h0 * hd, h1 - h0, hd, n_rot, cos, sin, pos)
            _rope(row, q_len + kv0 * hd, kv1 - kv0, hd, n_rot, cos, sin, pos)
        else:
            for i in range(h0 * hd, h1 * hd):
                row[i] += bias[l, i]
            for i in range(q_len + kv0 * hd, q_len + kv1 * hd):
                row[i] += bias[l, i]
                row[i + kv_len] += bias[l, i + kv_len]

    @_cache.jit(key + ("body",), deps=_DEPS)
    def body(tid, nt, sync, only_products, x, seqs, poss, norms, biases, final, wqkv, wo, wup, wdown, whead, k, v,
             ks, vs, cos, sin, fas, qkv, att, o, up, parts, logits, head, chunks):
        """One team member's work for every layer and the head (``team``)."""
        T, d = x.shape
        L = norms[0].shape[0]
        xl = x.copy()
        n = np.ones((T, d), np.float32)
        act = np.ones((T, d_ff), np.float32)
        kv0, kv1 = threads.share(n_kv, tid, nt)        # the heads this member stores
        h0, h1 = threads.share(n_head, tid, nt)         # and attends with
        kb = 0
        one_seq = T >= TILED_MIN_T      # a prefill block: tiled attention
        for t in range(1, T):
            one_seq = one_seq and seqs[t] == seqs[0]
        for l in range(L):
            if not only_products:
                norm(xl, norms[0][l], norms[1][l], n)
                runs = 1
                for t in range(1, T):
                    if seqs[t] != seqs[t - 1]:
                        runs += 1
                for t in range(T):      # during the product: each sequence's rows once, L2's share
                    if t == 0 or seqs[t] != seqs[t - 1]:
                        if one_seq:     # tiled: this member's heads
                            fetch(k, v, l, seqs[t], h0 // group, (h1 + group - 1) // group, 0, poss[t], runs)
                        else:           # this member's share of the positions
                            j0, j1 = threads.share(poss[t] + 1, tid, nt)     # part's split
                            fetch(k, v, l, seqs[t], 0, n_kv, j0, j1, runs)
            p_qkv(wqkv, l, n, qkv, fas[0], sync, slot(l, 0), chunks)
            kb = threads.barrier(sync, nt, kb)
            if not only_products:
                for t in range(T):
                    position(qkv[t], biases[0], l, poss[t], h0, h1, kv0, kv1, cos, sin)
                    store(k, v, ks, vs, l, seqs[t], poss[t], qkv[t], q_len, q_len + kv_len, kv0, kv1, hd)
            kb = threads.barrier(sync, nt, kb)      # every key and value stored
            if not only_products:
                if one_seq:     # items (key/value head, 16 tokens), the latest tokens first
                    nb = (T + ATT_TOKENS - 1) // ATT_TOKENS
                    c = threads.claim(sync, slot(l, 4))
                    while c < nb * n_kv:
                        b = nb - 1 - c // n_kv
                        tiled(qkv, k, v, ks, vs, l, seqs[0], poss, n_head, n_kv, hd, att, c % n_kv, ATT_TOKENS * b,
                              min(ATT_TOKENS * (b + 1), T))
                        c = threads.claim(sync, slot(l, 4))
                else:           # each member its share of the positions, then its heads
                    for t in range(T):
                        part(qkv[t], k, v, ks, vs, l, seqs[t], poss[t], n_head, n_kv, hd, parts[t], tid, nt)
                    kb = threads.barrier(sync, nt, kb)
                    for t in range(T):
                        merge(parts[t], nt, n_head, hd, att[t], h0, h1)
            kb = threads.barrier(sync, nt, kb)
            p_o(wo, l, att, o, fas[1], sync, slot(l, 1), chunks)
            kb = threads.barrier(sync, nt, kb)
            if not only_products:
                residual(xl, o, biases[1], l)
                norm(xl, norms[2][l], norms[3][l], n)
            p_up(wup, l, n, up, fas[2], sync, slot(l, 2), chunks)
            kb = threads.barrier(sync, nt, kb)
            if not only_products:
                for t in range(T):
                    if llama:
                        _swiglu(up[t], act[t], d_ff)
                    else:
                        _gelu(up[t], biases[2][l], act[t], d_ff)
            p_down(wdown, l, act, o, fas[3], sync, slot(l, 3), chunks)
            kb = threads.barrier(sync, nt, kb)
            if not only_products:
                residual(xl, o, biases[3], l)
        if head:
            t0 = T - logits.shape[0]
            if not only_products:
                norm(xl[t0:], final[0], final[1], n[t0:])
            p_head(whead, 0, n[t0:], logits, fas[4], sync, slot(L, 0), chunks)
        if tid == 0:
            x[:] = xl

    team = _team(key, body, structure, q_len + 2 * kv_len, q_len, up_rows, n_head, hd)

    @_cache.jit(key + ("attend",), deps=_DEPS)
    def attend(k, v, ks, vs, pos):
        """Only the attention of one token at ``pos`` over every layer's cache (one thread)."""
        q = np.ones(q_len, np.float32)
        out = np.empty(q_len, np.float32)
        P = np.empty((1, n_head, hd + 2), np.float32)
        for l in range(k.shape[0]):
            part(q, k, v, ks, vs, l, 0, pos, n_head, n_kv, hd, P, 0, 1)
            merge(P, 1, n_head, hd, out, 0, n_head)

    return team, attend


def _team(key, body, structure, qkv_cols, q_len, up_rows, n_head, hd):
    """The parallel region that runs ``body`` on a team: ``team(nt, sync, only_products, x,
    seqs, poss, *norms, *biases, *final, *weights, k, v, ks, vs, cos, sin, fas, logits, head, chunks)``. numba
    passes the variables of a ``prange`` body to it as array or scalar arguments, never
    tuples, so the weights come flat (``_flat``: ``structure`` gives each role's operands'
    array counts) and become tuples again inside. Its source is generated for that
    structure and compiled as if it were this file's, so numba's disk cache takes it
    (under ``key``)."""
    ws, roles = [], []
    for r, role in enumerate(structure):
        parts = []
        for p, count in enumerate(role):
            names = [f"w{r}_{p}_{i}" for i in range(count)]
            ws += names
            parts.append("(" + ", ".join(names) + ",)")
        roles.append("(" + ", ".join(parts) + ",)")
    norms, biases, final = [f"n{i}" for i in range(4)], [f"b{i}" for i in range(4)], ["f0", "f1"]
    args = ", ".join(norms + biases + final + ws)
    src = f"""
def team(nt, sync, only_products, x, seqs, poss, {args}, k, v, ks, vs, cos, sin, fas, logits, head, chunks):
    T = x.shape[0]
    qkv = np.empty((T, {qkv_cols}), np.float32)     # shared by the members
    att = np.ones((T, {q_len}), np.float32)
    o = np.empty((T, x.shape[1]), np.float32)
    up = np.empty((T, {up_rows}), np.float32)
    want = nt if nt > 0 else num_threads()
    parts = np.empty((T, want, {n_head}, {hd} + 2), np.float32)   # a token's attention per member
    sync[:] = 0
    for i in prange(want):
        tid, members = join(sync, want)
        if tid >= 0:
            body(tid, members, sync, only_products, x, seqs, poss, ({", ".join(norms)}), ({", ".join(biases)}),
                 ({", ".join(final)}), {", ".join(roles)}, k, v, ks, vs, cos, sin, fas, qkv, att, o, up, parts, logits, head,
                 chunks if chunks > 0 else CHUNKS * members)
    return x
"""
    ns = dict(np=np, prange=prange, join=threads.join, num_threads=threads.num_threads, body=body, CHUNKS=CHUNKS,
              __name__=__name__)
    exec(compile(src, __file__, "exec"), ns)
    return _cache.jit(key + ("team", structure), deps=_DEPS, parallel=True)(ns["team"])


def _flat(norms, biases, final, ops) -> tuple:
    """The arrays ``team`` takes between ``poss`` and ``k``, in its order."""
    return (*norms, *biases, *final, *(a for role in ops for part in role for a in part))


_CACHE: dict = {}
PREFILL_BLOCK = 128  # prompt tokens per team call: every weight is read once per block (SmolLM2 on
# Zen 4, 512-token prompt, tokens/s with blocks of 16 / 32 / 64 / 128 / 256: F32 415 / 550 / 629 / 724 / 726,
# Q4_0 1018 / 1208 / 1264 / 1328 / 1337 (two runs); 2048 tokens, 64 -> 128: F32 489 -> 521, Q4_0 718 -> 783)
TILED_MIN_T = 2     # tokens of one sequence from which a block's attention is tiled
CHUNKS = 3      # chunks of each product per team member, claimed dynamically (make_part): SmolLM2
# Q4_0 steps took 2.8, 2.6, 2.7 and 3.0 ms with 2, 4, 8 and 16 chunks on 2 threads (6: as 4)


ROLES = 5           # work counted per layer: 4 products and the tiled attention
ATT_TOKENS = 16     # tokens per work item of a block's attention (with one key/value head)


def _counters(n_layer: int) -> int:
    """Work counters a team needs: three (one per part of a role) per role of a layer
    (``ROLES``) and the head."""
    return 3 * (ROLES * n_layer + 1)



def _addresses(roles, tier) -> np.ndarray:
    """The kernels' addresses the step passes to each role's part: uint64 (roles, 3, 5),
    ``stacked.concat_addresses`` of each role's parts, zero-padded to 3 parts (one array, not
    a tuple: numba types a tuple argument in Python, ~2 µs per element and call)."""
    fas = np.zeros((len(roles), 3, 5), np.uint64)
    for r, parts in enumerate(roles):
        fas[r, :len(parts)] = stacked.concat_addresses(parts, tier)
    return fas


def _compiled(key, build):
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


class _Compiled(CacheSession):
    """Shared machinery: runs of layers, the KV cache, prefill in blocks of ``prefill_block``."""

    def _setup(self, roles, head_lin, norms, biases, final_norm, *, n_layer, n_head, n_kv, hd, n_rot, eps, d_ff,
               llama, n_ctx, vocab, rope_base=10000.0, n_seq=1, cache_type_k="f32", cache_type_v="f32"):
        self.n_ctx, self.vocab = n_ctx, vocab
        self.cache = kvcache.KVCache(n_layer, n_kv, hd, n_ctx, n_seq=n_seq, type_k=cache_type_k, type_v=cache_type_v)
        cache_key = self.cache.key()
        # role -> layer -> parts (one part when the role's Linears row-stack)
        per_layer = [[stacked.layer_parts(lins) for lins in role] for role in roles]
        sig = [tuple(tuple(stacked.part_key(w) for w in per_layer[r][l]) for r in range(4)) for l in range(n_layer)]
        runs, start = [], 0
        for l in range(1, n_layer + 1):
            if l == n_layer or sig[l] != sig[start]:
                runs.append((start, l))
                start = l
        consts = dict(n_head=n_head, n_kv=n_kv, hd=hd, n_rot=n_rot, eps=eps, d_ff=d_ff, llama=llama)
        tier = bytedot.backend()
        hop = stacked.stack([stacked.layer_weight([head_lin])])
        self.runs = []
        for a, b in runs:
            ops = [[stacked.stack([per_layer[r][l][k] for l in range(a, b)]) for k in range(len(per_layer[r][a]))]
                   for r in range(4)] + [[hop]]
            keys = tuple(tuple(op.key() for op in role) for role in ops)
            parts = [stacked.make_concat_part(role, tier) for role in ops]
            key = ("compiled.layers", tier, keys, cache_key, tuple(sorted(consts.items())))
            structure = tuple(tuple(len(op.arrays) for op in role) for role in ops)
            team, attend = _compiled(key, lambda: _build_layers(key, parts, structure, cache_key, **consts))
            run_norms, run_biases = tuple(n[a:b] for n in norms), tuple(bb[a:b] for bb in biases)
            self.runs.append(dict(team=team, attend=attend, operands=[op for role in ops[:4] for op in role],
                                  flat=_flat(run_norms, run_biases, final_norm,
                                             [[op.arrays for op in role] for role in ops]),
                                  fas=_addresses(ops, tier), norms=run_norms, start=a, stop=b))
        self._sync = threads.team_sync(_counters(n_layer))
        self.prefill_block = PREFILL_BLOCK    # tokens per call of a prompt (a test may set fewer)
        self.chunks = 0     # chunks per product: CHUNKS per member (a time study may set another)
        # bytes of weights one token reads
        self.weight_bytes = hop.nbytes + sum(op.nbytes for run in self.runs for op in run["operands"])
        self._one_seq, self._one_pos = np.zeros(1, np.int64), np.zeros(1, np.int64)    # step's, reused
        if llama:
            from minigpt_np.llama import rope_angles

            cos, sin = rope_angles(np.arange(n_ctx), n_rot, rope_base)
            self.cos, self.sin = np.ascontiguousarray(cos[:, 0]), np.ascontiguousarray(sin[:, 0])
        else:
            self.cos = self.sin = np.zeros((1, 1), np.float32)

    def _block(self, x: np.ndarray, seqs: np.ndarray, poss: np.ndarray, head: str = "all") -> np.ndarray | None:
        """The layers on a block of tokens, token t of sequence ``seqs[t]`` at position
        ``poss[t]`` (checked by the caller, who also advances ``cache.pos``), then the head on
        ``"all"`` of them, the ``"last"`` one or ``"none"``."""
        T = x.shape[0]
        x = np.ascontiguousarray(x, np.float32)
        logits = np.empty((0 if head == "none" else T if head == "all" else 1, self.vocab), np.float32)
        last = len(self.runs) - 1
        for i, run in enumerate(self.runs):
            s, e = run["start"], run["stop"]
            x = run["team"](0, self._sync, False, x, seqs, poss, *run["flat"], *self._cache_of(s, e), self.cos,
                            self.sin, run["fas"], logits, i == last and head != "none", self.chunks)
        return None if head == "none" else logits

    def _cache_of(self, s: int, e: int) -> tuple:
        """The cache's arrays for layers ``s <= l < e`` as a team takes them: keys, values,
        their scales."""
        c = self.cache
        return c.k[s:e], c.v[s:e], c.k_scale[s:e], c.v_scale[s:e]

    def _embed(self, ids: np.ndarray, poss: np.ndarray) -> np.ndarray:
        """Token ``ids[t]``'s input row at position ``poss[t]`` (T, d) float32."""
        raise NotImplementedError

    def pieces(self) -> dict:
        """Callables that run one part of a decode step at the current position, for a time
        breakdown (``benchmarks.decode``): ``"products"`` every weight product of one token
        (layers and head), ``"attention"`` every layer's attention over the cache."""
        d = self.runs[0]["norms"][0].shape[1]
        x = np.ones((1, d), np.float32)
        logits = np.empty((1, self.vocab), np.float32)
        zero = np.zeros(1, np.int64)

        def products():
            last = len(self.runs) - 1
            for i, run in enumerate(self.runs):
                s, e = run["start"], run["stop"]
                run["team"](0, self._sync, True, x.copy(), zero, zero, *run["flat"], *self._cache_of(s, e), self.cos,
                            self.sin, run["fas"], logits, i == last, self.chunks)

        def attention():
            for run in self.runs:
                s, e = run["start"], run["stop"]
                run["attend"](*self._cache_of(s, e), max(self.pos - 1, 0))
        return dict(products=products, attention=attention)

    def prefill(self, ids, *, last_only: bool = False, seq: int = 0) -> np.ndarray:
        """Logits (T, vocab) of ``ids`` after the positions sequence ``seq`` already holds;
        ``last_only``: (1, vocab), the last token's (the head, 49152 x 576 on SmolLM2, then
        runs once)."""
        ids = token_ids(ids, self.vocab).reshape(-1)
        seq = self._seq(seq)
        pos = int(self.cache.pos[seq])
        if pos + ids.size > self.n_ctx:
            raise ValueError(f"{pos + ids.size} positions exceed this session's context of {self.n_ctx}")
        outs = []
        B = self.prefill_block
        for i in range(0, ids.size, B):
            chunk = ids[i:i + B]
            poss = np.arange(pos + i, pos + i + chunk.size, dtype=np.int64)
            head = "all" if not last_only else "last" if i + B >= ids.size else "none"
            outs.append(self._block(self._embed(chunk, poss), np.full(chunk.size, seq, np.int64), poss, head))
            self.cache.pos[seq] += chunk.size
        return outs[-1] if last_only else np.concatenate(outs)

    def step(self, token: int) -> np.ndarray:
        """Logits (vocab,) of one more token of sequence 0: ``prefill([token])[0]`` with as
        little Python as it can (a step streams the weights through the caches, so every
        interpreter object the next call touches comes from memory again: each Python layer
        costs tens of µs here, against a few ms for the step)."""
        if isinstance(token, bool):   # operator.index takes True as 1
            raise TypeError(f"a token id must be an integer, got {token!r}")
        t = operator.index(token)
        if not 0 <= t < self.vocab:
            raise ValueError(f"token ids must be in [0, {self.vocab}), got {t}..{t}")
        pos = self.pos
        if pos + 1 > self.n_ctx:
            raise ValueError(f"{pos + 1} positions exceed this session's context of {self.n_ctx}")
        self._one_pos[0] = pos
        out = self._block(self._embed_one(t, self._one_pos), self._one_seq, self._one_pos)[0]
        self.cache.pos[0] += 1
        return out

    def step_batch(self, tokens, seqs=None) -> np.ndarray:
        """Logits (B, vocab): one more token of each of B sequences (``seqs``, distinct;
        default 0..B-1), each at its own position, decoded together (every weight read
        once per ``kernels.MAX_BATCH`` tokens: the seeds' batched decode)."""
        ids = token_ids(tokens, self.vocab).reshape(-1)
        seqs = np.arange(ids.size) if seqs is None else np.asarray(seqs)
        if seqs.shape != ids.shape or not np.issubdtype(seqs.dtype, np.integer):
            raise ValueError(f"seqs must be {ids.size} integers, one per token, got {seqs!r}")
        if len(set(seqs.tolist())) != seqs.size:
            raise ValueError("a batch holds one token per sequence; got a sequence twice")
        seqs = np.array([self._seq(q) for q in seqs.tolist()], np.int64)
        poss = self.cache.pos[seqs].astype(np.int64)
        if poss.max() + 1 > self.n_ctx:
            raise ValueError(f"{poss.max() + 1} positions exceed this session's context of {self.n_ctx}")
        outs = []
        for i in range(0, ids.size, MAX_BATCH):
            sl = slice(i, i + MAX_BATCH)
            outs.append(self._block(self._embed(ids[sl], poss[sl]), seqs[sl], poss[sl]))
        self.cache.pos[seqs] += 1
        return np.concatenate(outs)

    def reset(self, seq: int | None = None) -> None:
        """Forget every position of sequence ``seq`` (of every sequence when None)."""
        self.cache.reset(None if seq is None else self._seq(seq))

    def _seq(self, seq) -> int:
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or not 0 <= seq < self.cache.n_seq:
            raise ValueError(f"seq must be an integer in [0, {self.cache.n_seq}), got {seq!r}")
        return int(seq)

    def _embed_one(self, t: int, poss: np.ndarray) -> np.ndarray:
        return self._embed(np.array([t]), poss)


class Llama(_Compiled):
    """SmolLM2 / any ``minigpt_np.llama`` model, compiled (module docstring). ``params``
    from ``llama.load`` (``dtype="stored"``: the GGUF's own types on the byte-dot kernels;
    ``"f32"``: float32 weights on the float kernel); ``n_ctx``: positions the preallocated
    cache holds (default: the model's context, at most 4096); ``n_seq``: sequences it holds
    (``step_batch`` decodes one token of each at once; ``prefill(ids, seq=s)`` fills one);
    ``cache_type_k`` / ``cache_type_v``: how the cache stores keys and values
    (``refquant.kernels.kvcache``; llama.cpp's ``--cache-type-k/v`` names: f32, f16, bf16,
    q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1; vLLM's fp8_e4m3, fp8_e5m2, their scales set on
    ``self.cache`` by ``set_scales``), each pair its own compiled step;
    ``allow_long_context``: ``n_ctx`` beyond the model's trained context (``llama.new_cache``)."""

    def __init__(self, params, cfg, *, n_ctx: int | None = None, n_seq: int = 1, cache_type_k: str = "f32",
                 cache_type_v: str = "f32", allow_long_context: bool = False):
        from minigpt_np.llama import check_n_ctx, validate

        validate(params, cfg)   # the kernels below trust every shape
        n_ctx = check_n_ctx(cfg, min(cfg.n_ctx, 4096) if n_ctx is None else n_ctx, allow_long_context)
        L = cfg.n_layer
        blk = lambda i, s: params[f"blk.{i}.{s}.weight"]  # noqa: E731
        roles = [[[blk(i, s) for s in ("attn_q", "attn_k", "attn_v")] for i in range(L)],
                 [[blk(i, "attn_output")] for i in range(L)],
                 [[blk(i, s) for s in ("ffn_gate", "ffn_up")] for i in range(L)],
                 [[blk(i, "ffn_down")] for i in range(L)]]
        norms = tuple(np.stack([np.asarray(blk(i, s), np.float32) for i in range(L)]) for s in
                      ("attn_norm", "attn_norm", "ffn_norm", "ffn_norm"))
        z = np.zeros((L, 1), np.float32)
        on = np.asarray(params["output_norm.weight"], np.float32)
        self.params, self.cfg = params, cfg
        self._row = _row_decoder(params["token_embd.weight"])
        self._setup(roles, params["output.weight"], norms, (z, z, z, z), (on, on), n_layer=L, n_head=cfg.n_head,
                    n_kv=cfg.n_head_kv, hd=cfg.head_dim, n_rot=cfg.n_rot, eps=cfg.eps, d_ff=cfg.d_ff, llama=True,
                    n_ctx=n_ctx, vocab=cfg.vocab, rope_base=cfg.rope_base, n_seq=n_seq, cache_type_k=cache_type_k,
                    cache_type_v=cache_type_v)

    def _embed(self, ids, poss):
        return self.params["token_embd.weight"].rows(ids)

    def _embed_one(self, t: int, poss) -> np.ndarray:
        return self._row(t)


def _row_decoder(emb):
    """``row(t) -> (1, d) float32``: one embedding row, for ``step``. A GGUF block tensor goes
    straight to its compiled block decoder (the one ``Linear.rows`` reaches through
    ``quants.dequantize``, so the same floats) without the layers of Python around it."""
    from refquant.linear import QuantizedLinear

    if isinstance(emb, QuantizedLinear) and emb.qt.kind == "ggml":
        from refquant.gguf.quants import compiled as qc, core

        t = core.ggml_type(emb.qt.meta["ggml_type"])
        if t.name in qc.DEQUANTIZERS:
            fn, codes, d = qc.DEQUANTIZERS[t.name], emb.qt.codes, emb.shape[1]

            def row(tok):
                out = np.empty((1, d), np.float32)
                fn(codes[tok].reshape(-1, t.type_size), out.reshape(-1, t.block_size))
                return out
            return row
    return lambda tok: emb.rows(np.array([tok]))


class MiniGPT(_Compiled):
    """MiniGPT (``minigpt_np.model``), compiled: ``linears`` (``model.Linears``, any scheme
    with a compiled path; None: the float32 weights in ``params``); ``cache_type_k`` /
    ``cache_type_v`` as ``Llama``'s."""

    def __init__(self, params, cfg, linears=None, *, n_seq: int = 1, cache_type_k: str = "f32",
                 cache_type_v: str = "f32"):
        from minigpt_np.model import Linears, validate

        linears = linears or Linears(params, cfg)
        validate({**params, **{n + ".weight": lin for n, lin in linears.layers.items()}}, cfg)   # the kernels trust shapes
        L = cfg.n_layer
        lin = lambda i, s: linears.layers[f"blk.{i}.{s}"]  # noqa: E731
        roles = [[[lin(i, s)] for i in range(L)] for s in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")]
        p = lambda i, s: np.asarray(params[f"blk.{i}.{s}"], np.float32)  # noqa: E731
        norms = tuple(np.stack([p(i, s) for i in range(L)]) for s in
                      ("attn_norm.weight", "attn_norm.bias", "ffn_norm.weight", "ffn_norm.bias"))
        biases = tuple(np.stack([p(i, s + ".bias") for i in range(L)]) for s in
                       ("attn_qkv", "attn_output", "ffn_up", "ffn_down"))
        from refquant.linear import DenseLinear

        self.params, self.cfg = params, cfg
        self._setup(roles, DenseLinear(params["token_embd.weight"]), norms, biases,
                    (np.asarray(params["output_norm.weight"], np.float32),
                     np.asarray(params["output_norm.bias"], np.float32)),
                    n_layer=L, n_head=cfg.n_head, n_kv=cfg.n_head, hd=cfg.d_model // cfg.n_head, n_rot=0,
                    eps=cfg.eps, d_ff=cfg.d_ff, llama=False, n_ctx=cfg.n_ctx, vocab=cfg.vocab, n_seq=n_seq,
                    cache_type_k=cache_type_k, cache_type_v=cache_type_v)

    def _embed(self, ids, poss):
        return (self.params["token_embd.weight"][ids] + self.params["position_embd.weight"][poss]).astype(np.float32)
