"""The prefill (tile) byte-dot kernels of the SIMD tiers, on the same 8-row interleaved
layout as the one-token kernel (``layout.Packed``). Per group of eight rows, the block
scales are decoded once into a scratch (eight rows per vector) and, from ``STAGE_MIN_M``
tokens on, the nibble codes unpacked once into bytes; then four tokens at a time share
every code load: per block, each 32-byte load of codes meets four tokens' broadcast x.
On VNNI (32 vector registers), groups are taken two at a time where a block has one scale
(``pairs``): each broadcast of x then serves both groups, and a block's lo and hi halves
share one int32 chain (eight chains, eight float sums); the load ports, not the dots, were
the limit of one group (about 1.6 loads per dot against two loads a cycle on Zen 4).
The offset ``"const"`` is summed in the int32 chains (they start from ``-c Σ x_q``, exact),
a ``"min"`` offset is one multiply-add per block. Tokens past the last multiple of four
take the one-token path. The float epilogue is the one-token kernel's, operation for
operation (one accumulator, blocks in order; int32 sums are exact in any order), so a
token's result in a batch is its result alone, bit for bit (tested).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from refquant.kernels import _cache
from refquant.kernels.layout import OFFSET_CONST, OFFSET_MIN, ROWS
from refquant.kernels.rows import (PREFETCH_BYTES, _const_sums, _group_rows, _kind_consts, _scales, _store_rows,
                                   _token, _unpack)
from refquant.kernels.threads import Kernel

TILE_MIN_M = 4   # from this many tokens on, ``run`` takes the tile kernel (SIMD tiers)
STAGE_MIN_M = 16    # from this many tokens on, a group's nibble codes are unpacked once, into a scratch


def _build_tiles(tier: str, kind: str, sub16: bool, offset: int, has_sc: bool, has_mn: bool, c: int,
                 dshift: int, mshift: int, mnshift: int, table: tuple | None = None):
    """The prefill kernel of one format (``kernel``'s signature and result, bit for bit;
    module docstring). ``chunks(t, nt, ...)``: task ``t`` of ``nt``,
    a contiguous run of row groups with its own scratch."""
    from refquant.kernels import simd as V

    PLANES, SIGNED = _kind_consts(kind)
    has_m = offset == OFFSET_MIN
    dot = V.DOTS[tier]
    unpack = _unpack(PLANES, table)
    scales = _scales(sub16, offset, has_sc, has_mn, dshift, mshift, mnshift)
    token = _token(tier, kind, sub16, offset, has_sc, has_mn, c, dshift, mshift, mnshift, table)
    sums = _const_sums(c, sub16)
    CONST = offset == OFFSET_CONST
    key = ("bytedot.tiles", tier, kind, sub16, offset, has_sc, has_mn, c, dshift, mshift, mnshift, table)
    LINES = 4 if kind == "s8" else 2      # cache lines of codes per block (rows._token's)
    RAW8 = kind == "s8"     # signed bytes as stored; other signed kinds are looked-up nibbles
    # signed weights on VNNI: x + 128 (unsigned) against w, minus 128 Σw per row and block
    # (exact int32: |Σ (x+128) w| <= 32·255·127), one broadcast and no sign fix-up per dot;
    # the AVX2 dot would saturate its int16 pair sums (2·255·127 > 32767)
    BIAS = SIGNED and tier == "vnni"
    # two groups per pass (VNNI: 32 vector registers hold 8 int32 chains and 8 float sums)
    # where lo and hi of a block share one chain (one scale per 32 weights)
    PAIR = tier == "vnni" and not sub16
    K128 = np.full(32, 128, np.uint8)

    @njit(inline="always")
    def sdot(acc, w, xm, am, o):
        """8-bit codes: ``dot(|x|, w·sign(x))`` against the token's broadcast bytes at ``o``."""
        return dot(acc, V.bcast4(am, o), V.sign_apply(w, V.bcast4(xm, o)))

    @njit(inline="always")
    def start(xc, t, b, cb):
        """The int32 sums a token's dots of block ``b`` start from (lo, hi): ``-c Σ x_q``
        (``"const"``) plus ``cb`` = -128 Σw (``BIAS``)."""
        lo = V.splat_i32(xc[t, 2 * b]) if CONST else V.zeros_i32()
        hi = V.splat_i32(xc[t, 2 * b + 1]) if CONST and sub16 else V.zeros_i32()
        return (V.add_i32(lo, cb) if BIAS else lo), hi

    @njit(inline="always")
    def start4(xc, t, b, cb):
        """``start`` of tokens ``t..t+3``."""
        return start(xc, t, b, cb), start(xc, t + 1, b, cb), start(xc, t + 2, b, cb), start(xc, t + 3, b, cb)

    @njit(inline="always", fastmath=True)
    def finish1(a, l, S, b, dxm, xsm):
        """``a`` + block ``b`` of one token, its dots summed in ``l`` (lo + hi): times the
        scales (``S[b]``: s0, s1, mu), then a ``"min"`` offset; the one-token kernel's
        operations, in its order."""
        a = V.fma_vec(a, l, V.mul_f32x8(V.load_f32x8(S[b], 0), dxm[b]))
        return V.fmadd_f32x8(a, V.load_f32x8(S[b], 2 * ROWS), xsm[b]) if has_m else a

    @njit(inline="always", fastmath=True)
    def finish(a, lo, hi, S, b, dxm, xsm):
        """``finish1`` of a block's two halves (``sub16``: each with its own scale)."""
        if sub16:
            a = V.fma_vec(a, lo, V.mul_f32x8(V.load_f32x8(S[b], 0), dxm[b]))
            return V.fma_vec(a, hi, V.mul_f32x8(V.load_f32x8(S[b], ROWS), dxm[b]))
        return finish1(a, V.add_i32(lo, hi), S, b, dxm, xsm)

    @njit(inline="always")
    def codes(q, hq, W, staged, b, p):
        """Load ``p`` of block ``b`` of a group's codes as bytes: weights ``4p..4p+3`` and
        ``16+4p..`` of the eight rows, from the stored 8-bit codes, or from ``W`` where the
        nibble codes were ``staged`` (unpacked once per group, in the same byte order), or
        unpacked here (a few tokens: staging would cost more than it saves)."""
        if RAW8:
            return V.load32(q, 256 * b + 32 * p), V.load32(q, 256 * b + 32 * p + 128)
        if staged:
            return V.load32(W, 256 * b + 32 * p), V.load32(W, 256 * b + 32 * p + 128)
        return unpack(q, hq, b, p)

    @njit(inline="always")
    def wdot(acc, w, xr, zr, o):
        """``acc`` + the dot of codes ``w`` with a token's four bytes at ``o`` (``xr`` its
        x_q, ``zr`` its x + 128 under ``BIAS``)."""
        if BIAS:
            return dot(acc, V.bcast4(zr, o), w)
        return dot(acc, w, V.bcast4(xr, o))

    @njit(inline="always")
    def rows4(xq, xb, t):
        """Tokens ``t..t+3``: their x_q rows and their x + 128 rows (``BIAS``; else a dummy)."""
        u = 1 if BIAS else 0
        return (xq[t], xq[t + 1], xq[t + 2], xq[t + 3]), (xb[u * t], xb[u * (t + 1)], xb[u * (t + 2)], xb[u * (t + 3)])

    @njit(inline="always", fastmath=True)
    def prepare(q, hq, dg, scg, mg, mng, S, W, C, k128, staged):
        """A group's scratch: block scales (s0, s1, mu) into ``S``, nibble codes as bytes
        into ``W`` (``staged``), -128 Σw into ``C`` (``BIAS``); hints the next group's codes."""
        for b in range(S.shape[0]):
            for i in range(LINES):      # this pass streams the group's codes: hint the next ones
                V.prefetch(q, 64 * (LINES * b + i) + PREFETCH_BYTES)
            s0, s1, mu = scales(dg, scg, mg, mng, b)
            V.store_f32x8(S[b], 0, s0)
            V.store_f32x8(S[b], ROWS, s1)
            V.store_f32x8(S[b], 2 * ROWS, mu)
            if staged and not RAW8:
                for p in range(4):
                    wl, wh = unpack(q, hq, b, p)
                    V.store32(W, 256 * b + 32 * p, wl)
                    V.store32(W, 256 * b + 32 * p + 128, wh)
            if BIAS:
                c = V.zeros_i32()
                for p in range(4):
                    wl, wh = codes(q, hq, W, staged, b, p)
                    c = dot(dot(c, k128, wl), k128, wh)
                V.store_i32x8(C[b], 0, V.sub_i32(V.zeros_i32(), c))

    @njit(fastmath=True)
    def singles(g0, g1, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out, xb, xc, S, W, C, staged):
        """Groups ``g0..g1`` one at a time, four tokens per pass: each code load serves four
        (then the last tokens, fewer than four, on the one-token path)."""
        M = out.shape[0]
        nb = dx.shape[1]
        tmp = np.empty(ROWS, np.float32)
        k128 = V.load32(K128, 0)
        for g in range(g0, g1):
            q, hq, dg, scg, mg, mng = _group_rows(g, qs, qh, d, sc, m, mn, has_sc, has_m, has_mn)
            prepare(q, hq, dg, scg, mg, mng, S, W, C, k128, staged)
            for t in range(0, M - 3, 4):
                (x0, x1, x2, x3), (z0, z1, z2, z3) = rows4(xq, xb, t)
                a0 = a1 = a2 = a3 = V.zeros_f32()
                for b in range(nb):
                    cb = V.load_i32x8(C[b], 0)
                    (l0, h0), (l1, h1), (l2, h2), (l3, h3) = start4(xc, t, b, cb)
                    for p in range(4):
                        o = 32 * b + 4 * p
                        wl, wh = codes(q, hq, W, staged, b, p)
                        if SIGNED and not BIAS:
                            l0, l1 = sdot(l0, wl, x0, xa[t], o), sdot(l1, wl, x1, xa[t + 1], o)
                            l2, l3 = sdot(l2, wl, x2, xa[t + 2], o), sdot(l3, wl, x3, xa[t + 3], o)
                            h0, h1 = sdot(h0, wh, x0, xa[t], o + 16), sdot(h1, wh, x1, xa[t + 1], o + 16)
                            h2, h3 = sdot(h2, wh, x2, xa[t + 2], o + 16), sdot(h3, wh, x3, xa[t + 3], o + 16)
                        else:
                            l0, l1 = wdot(l0, wl, x0, z0, o), wdot(l1, wl, x1, z1, o)
                            l2, l3 = wdot(l2, wl, x2, z2, o), wdot(l3, wl, x3, z3, o)
                            h0, h1 = wdot(h0, wh, x0, z0, o + 16), wdot(h1, wh, x1, z1, o + 16)
                            h2, h3 = wdot(h2, wh, x2, z2, o + 16), wdot(h3, wh, x3, z3, o + 16)
                    a0 = finish(a0, l0, h0, S, b, dx[t], xs[t])
                    a1 = finish(a1, l1, h1, S, b, dx[t + 1], xs[t + 1])
                    a2 = finish(a2, l2, h2, S, b, dx[t + 2], xs[t + 2])
                    a3 = finish(a3, l3, h3, S, b, dx[t + 3], xs[t + 3])
                for k, a in enumerate((a0, a1, a2, a3)):
                    _store_rows(out, t + k, g, a, tmp)
            for t in range(M - M % 4, M):
                v = token(q, hq, dg, scg, mg, mng, xq[t], xa[t], dx[t], xs[t], xc[t], s16[1, t], False)
                _store_rows(out, t, g, v, tmp)

    @njit(fastmath=True)
    def pairs(g0, g1, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out, xb, xc, S, W, C):
        """Groups ``g0..g1`` (an even count) two at a time, four tokens per pass, the codes
        staged: each broadcast of x serves both groups, and lo and hi of a block share one
        int32 chain (``PAIR``: one scale per 32 weights, 32 vector registers)."""
        M = out.shape[0]
        nb = dx.shape[1]
        tmp = np.empty(ROWS, np.float32)
        k128 = V.load32(K128, 0)
        S0, W0, C0, S1, W1, C1 = S[0], W[0], C[0], S[1], W[1], C[1]
        for g in range(g0, g1, 2):
            q, hq, dg, scg, mg, mng = _group_rows(g, qs, qh, d, sc, m, mn, has_sc, has_m, has_mn)
            q1, hq1, dg1, scg1, mg1, mng1 = _group_rows(g + 1, qs, qh, d, sc, m, mn, has_sc, has_m, has_mn)
            prepare(q, hq, dg, scg, mg, mng, S0, W0, C0, k128, True)
            prepare(q1, hq1, dg1, scg1, mg1, mng1, S1, W1, C1, k128, True)
            for t in range(0, M - 3, 4):
                (x0, x1, x2, x3), (z0, z1, z2, z3) = rows4(xq, xb, t)
                a0 = a1 = a2 = a3 = V.zeros_f32()
                e0 = e1 = e2 = e3 = V.zeros_f32()
                for b in range(nb):
                    c0, c1 = V.load_i32x8(C0[b], 0), V.load_i32x8(C1[b], 0)
                    (l0, _), (l1, _), (l2, _), (l3, _) = start4(xc, t, b, c0)   # lo and hi in one chain
                    (k0, _), (k1, _), (k2, _), (k3, _) = start4(xc, t, b, c1)
                    for p in range(4):
                        o = 32 * b + 4 * p
                        wl, wh = codes(q, hq, W0, True, b, p)
                        vl, vh = codes(q1, hq1, W1, True, b, p)
                        l0, k0 = wdot(l0, wl, x0, z0, o), wdot(k0, vl, x0, z0, o)
                        l1, k1 = wdot(l1, wl, x1, z1, o), wdot(k1, vl, x1, z1, o)
                        l2, k2 = wdot(l2, wl, x2, z2, o), wdot(k2, vl, x2, z2, o)
                        l3, k3 = wdot(l3, wl, x3, z3, o), wdot(k3, vl, x3, z3, o)
                        l0, k0 = wdot(l0, wh, x0, z0, o + 16), wdot(k0, vh, x0, z0, o + 16)
                        l1, k1 = wdot(l1, wh, x1, z1, o + 16), wdot(k1, vh, x1, z1, o + 16)
                        l2, k2 = wdot(l2, wh, x2, z2, o + 16), wdot(k2, vh, x2, z2, o + 16)
                        l3, k3 = wdot(l3, wh, x3, z3, o + 16), wdot(k3, vh, x3, z3, o + 16)
                    a0, e0 = finish1(a0, l0, S0, b, dx[t], xs[t]), finish1(e0, k0, S1, b, dx[t], xs[t])
                    a1, e1 = finish1(a1, l1, S0, b, dx[t + 1], xs[t + 1]), finish1(e1, k1, S1, b, dx[t + 1], xs[t + 1])
                    a2, e2 = finish1(a2, l2, S0, b, dx[t + 2], xs[t + 2]), finish1(e2, k2, S1, b, dx[t + 2], xs[t + 2])
                    a3, e3 = finish1(a3, l3, S0, b, dx[t + 3], xs[t + 3]), finish1(e3, k3, S1, b, dx[t + 3], xs[t + 3])
                for k, a in enumerate((a0, a1, a2, a3)):
                    _store_rows(out, t + k, g, a, tmp)
                for k, a in enumerate((e0, e1, e2, e3)):
                    _store_rows(out, t + k, g + 1, a, tmp)
            for t in range(M - M % 4, M):
                v = token(q, hq, dg, scg, mg, mng, xq[t], xa[t], dx[t], xs[t], xc[t], s16[1, t], False)
                _store_rows(out, t, g, v, tmp)
                v = token(q1, hq1, dg1, scg1, mg1, mng1, xq[t], xa[t], dx[t], xs[t], xc[t], s16[1, t], False)
                _store_rows(out, t, g + 1, v, tmp)

    @_cache.jit(key + ("chunks",), fastmath=True)
    def chunks(task, ntask, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        M = out.shape[0]
        G = qs.shape[0]
        nb = dx.shape[1]
        S = np.empty((2, nb, 3 * ROWS), np.float32)     # per group and block: s0, s1, mu of the 8 rows
        C = np.zeros((2, nb, ROWS), np.int32)           # BIAS: per group and block, -128 Σw of the 8 rows
        W = np.empty((2, 1 if RAW8 else 256 * nb), np.uint8)    # the groups' nibble codes as bytes
        xb = np.empty((M, xq.shape[1]) if BIAS else (1, 1), np.uint8)   # BIAS: x + 128
        if BIAS:
            for t in range(M):
                for i in range(xq.shape[1]):
                    xb[t, i] = np.uint8(np.int32(xq[t, i]) + 128)
        xc = np.zeros((M, 2 * nb) if CONST else (M, 1), np.int32)
        if CONST:
            sums(xs, dx, s16, xc)
        g0, g1 = G * task // ntask, G * (task + 1) // ntask
        staged = M >= STAGE_MIN_M
        if PAIR and staged:
            gp = g0 + (g1 - g0) // 2 * 2
            pairs(g0, gp, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out, xb, xc, S, W, C)
            g0 = gp
        singles(g0, g1, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out, xb, xc, S[0], W[0], C[0], staged)

    return Kernel(chunks)
