"""The prefill (tile) byte-dot kernels of the SIMD tiers, on the same 8-row interleaved
layout as the one-token kernel (``layout.Packed``): per group of eight rows, the block
scales are decoded once into a scratch (eight rows per vector), then four tokens at a
time share every code load and unpacking: per block, each 32-byte load of codes meets
four tokens' broadcast x (sixteen int32 dot chains, four float accumulators). Tokens past
the last multiple of four take the one-token path. Its float epilogue is the one-token
kernel's, operation for operation (one accumulator, blocks in order, the offset term
summed apart and added last), so a token's result in a batch is its result alone, bit for
bit (tested).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from refquant.kernels import _cache
from refquant.kernels.layout import OFFSET_CONST, OFFSET_MIN, OFFSET_NONE, ROWS
from refquant.kernels.rows import PREFETCH_BYTES, _group_rows, _kind_consts, _scales, _store_rows, _token, _unpack
from refquant.kernels.threads import Kernel

TILE_MIN_M = 4   # from this many tokens on, ``run`` takes the tile kernel (SIMD tiers)


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
    cf = np.float32(-c) if offset == OFFSET_CONST else np.float32(1)
    key = ("bytedot.tiles", tier, kind, sub16, offset, has_sc, has_mn, c, dshift, mshift, mnshift, table)
    LINES = 4 if kind == "s8" else 2      # cache lines of codes per block (rows._token's)
    RAW8 = kind == "s8"     # signed bytes as stored; other signed kinds are looked-up nibbles
    # signed weights on VNNI: x + 128 (unsigned) against w, minus 128 Σw per row and block
    # (exact int32: |Σ (x+128) w| <= 32·255·127), one broadcast and no sign fix-up per dot;
    # the AVX2 dot would saturate its int16 pair sums (2·255·127 > 32767)
    BIAS = SIGNED and tier == "vnni"
    K128 = np.full(32, 128, np.uint8)

    @njit(inline="always")
    def sdot(acc, w, xm, am, o):
        """8-bit codes: ``dot(|x|, w·sign(x))`` against the token's broadcast bytes at ``o``."""
        return dot(acc, V.bcast4(am, o), V.sign_apply(w, V.bcast4(xm, o)))

    @njit(inline="always", fastmath=True)
    def epilogue(a, lo, hi, S, b, dxm):
        """``a`` + this block's dots of one token times its scales (``S[b]``: s0, s1)."""
        if sub16:
            a = V.fma_vec(a, lo, V.mul_f32x8(V.load_f32x8(S[b], 0), dxm[b]))
            return V.fma_vec(a, hi, V.mul_f32x8(V.load_f32x8(S[b], ROWS), dxm[b]))
        return V.fma_vec(a, V.add_i32(lo, hi), V.mul_f32x8(V.load_f32x8(S[b], 0), dxm[b]))

    @njit(inline="always", fastmath=True)
    def offsets(S, xsm, s16m):
        """A token's offset term for the group (before the ``-c`` of ``"const"``)."""
        o = V.zeros_f32()
        for b in range(S.shape[0]):
            if sub16:
                o = V.add_f32x8(o, V.add_f32x8(V.mul_f32x8(V.load_f32x8(S[b], 0), s16m[2 * b]),
                                               V.mul_f32x8(V.load_f32x8(S[b], ROWS), s16m[2 * b + 1])))
            else:
                o = V.add_f32x8(o, V.mul_f32x8(V.load_f32x8(S[b], 2 * ROWS), xsm[b]))
        return o

    @njit(inline="always")
    def signed_codes(q, hq, b, p):
        """Load ``p`` of block ``b`` of signed codes: weights ``4p..`` and ``16+4p..`` of the rows."""
        if RAW8:
            return V.load32(q, 256 * b + 32 * p), V.load32(q, 256 * b + 32 * p + 128)
        return unpack(q, hq, b, p)

    @_cache.jit(key + ("chunks",), fastmath=True)
    def chunks(task, ntask, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        M = out.shape[0]
        G = qs.shape[0]
        nb = dx.shape[1]
        S = np.empty((nb, 3 * ROWS), np.float32)     # per block: s0, s1, mu of the 8 rows
        C = np.empty((nb, ROWS), np.int32)           # BIAS: per block, 128 Σw of the 8 rows
        tmp = np.empty(ROWS, np.float32)
        xb = np.empty((M, xq.shape[1]) if BIAS else (1, 1), np.uint8)   # BIAS: x + 128
        if BIAS:
            for t in range(M):
                for i in range(xq.shape[1]):
                    xb[t, i] = np.uint8(np.int32(xq[t, i]) + 128)
        k128 = V.load32(K128, 0)
        for g in range(G * task // ntask, G * (task + 1) // ntask):
            q, hq, dg, scg, mg, mng = _group_rows(g, qs, qh, d, sc, m, mn, has_sc, has_m, has_mn)
            for b in range(nb):
                s0, s1, mu = scales(dg, scg, mg, mng, b)
                V.store_f32x8(S[b], 0, s0)
                V.store_f32x8(S[b], ROWS, s1)
                V.store_f32x8(S[b], 2 * ROWS, mu)
                if BIAS:
                    c = V.zeros_i32()
                    for p in range(4):
                        wl, wh = signed_codes(q, hq, b, p)
                        c = dot(dot(c, k128, wl), k128, wh)
                    V.store_i32x8(C[b], 0, c)
            for t in range(0, M - 3, 4):
                x0, x1, x2, x3 = xq[t], xq[t + 1], xq[t + 2], xq[t + 3]
                y0, y1, y2, y3 = xa[t], xa[t + 1], xa[t + 2], xa[t + 3]
                z0, z1, z2, z3 = xb[t if BIAS else 0], xb[t + 1 if BIAS else 0], xb[t + 2 if BIAS else 0], \
                    xb[t + 3 if BIAS else 0]
                a0 = V.zeros_f32()
                a1 = V.zeros_f32()
                a2 = V.zeros_f32()
                a3 = V.zeros_f32()
                for b in range(nb):
                    if t == 0:      # the first pass over a group streams its codes: hint the next ones
                        for i in range(LINES):
                            V.prefetch(q, 64 * (LINES * b + i) + PREFETCH_BYTES)
                    l0 = V.zeros_i32()
                    l1 = V.zeros_i32()
                    l2 = V.zeros_i32()
                    l3 = V.zeros_i32()
                    h0 = V.zeros_i32()
                    h1 = V.zeros_i32()
                    h2 = V.zeros_i32()
                    h3 = V.zeros_i32()
                    xo = 32 * b
                    for p in range(4):
                        o = xo + 4 * p
                        if BIAS:
                            wl, wh = signed_codes(q, hq, b, p)
                            l0, l1 = dot(l0, V.bcast4(z0, o), wl), dot(l1, V.bcast4(z1, o), wl)
                            l2, l3 = dot(l2, V.bcast4(z2, o), wl), dot(l3, V.bcast4(z3, o), wl)
                            h0, h1 = dot(h0, V.bcast4(z0, o + 16), wh), dot(h1, V.bcast4(z1, o + 16), wh)
                            h2, h3 = dot(h2, V.bcast4(z2, o + 16), wh), dot(h3, V.bcast4(z3, o + 16), wh)
                        elif SIGNED:
                            wl, wh = signed_codes(q, hq, b, p)
                            l0, l1 = sdot(l0, wl, x0, y0, o), sdot(l1, wl, x1, y1, o)
                            l2, l3 = sdot(l2, wl, x2, y2, o), sdot(l3, wl, x3, y3, o)
                            h0, h1 = sdot(h0, wh, x0, y0, o + 16), sdot(h1, wh, x1, y1, o + 16)
                            h2, h3 = sdot(h2, wh, x2, y2, o + 16), sdot(h3, wh, x3, y3, o + 16)
                        else:
                            wl, wh = unpack(q, hq, b, p)
                            l0, l1 = dot(l0, wl, V.bcast4(x0, o)), dot(l1, wl, V.bcast4(x1, o))
                            l2, l3 = dot(l2, wl, V.bcast4(x2, o)), dot(l3, wl, V.bcast4(x3, o))
                            h0, h1 = dot(h0, wh, V.bcast4(x0, o + 16)), dot(h1, wh, V.bcast4(x1, o + 16))
                            h2, h3 = dot(h2, wh, V.bcast4(x2, o + 16)), dot(h3, wh, V.bcast4(x3, o + 16))
                    if BIAS:
                        cb = V.load_i32x8(C[b], 0)
                        l0, l1, l2, l3 = V.sub_i32(l0, cb), V.sub_i32(l1, cb), V.sub_i32(l2, cb), V.sub_i32(l3, cb)
                    a0 = epilogue(a0, l0, h0, S, b, dx[t])
                    a1 = epilogue(a1, l1, h1, S, b, dx[t + 1])
                    a2 = epilogue(a2, l2, h2, S, b, dx[t + 2])
                    a3 = epilogue(a3, l3, h3, S, b, dx[t + 3])
                for k, a in enumerate((a0, a1, a2, a3)):
                    if offset != OFFSET_NONE:
                        a = V.add_f32x8(a, V.mul_f32x8(offsets(S, xs[t + k], s16[1, t + k]), cf))
                    _store_rows(out, t + k, g, a, tmp)
            for t in range(M - M % 4, M):    # the last tokens, fewer than four
                v = token(q, hq, dg, scg, mg, mng, xq[t], xa[t], dx[t], xs[t], s16[0, t], s16[1, t], False)
                _store_rows(out, t, g, v, tmp)

    return Kernel(chunks)
