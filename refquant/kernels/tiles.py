"""The prefill (tile) byte-dot kernels of the SIMD tiers: per chunk of 16 rows the codes
are unpacked to bytes and the scales decoded once, then tiles of 2 rows x 4 tokens share
every load (``_tile``, one compilation for every format). Its float epilogue sums in
another order than the one-token kernel's, so a token's result in a batch differs from
its result alone in the last bits; both are held to the same bound.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from refquant.kernels import _cache
from refquant.kernels.layout import _ROW_SHIFT, OFFSET_CONST, OFFSET_MIN, OFFSET_NONE
from refquant.kernels.rows import _bdot, _codes2, _kind_consts, _scale_reader
from refquant.kernels.threads import Kernel


TILE_MIN_M = 4   # from this many tokens on, ``run`` takes the tile kernel (SIMD tiers)


def _unit_scales(sub16, offset, has_sc, has_mn, c, dshift, mnshift):
    """``(lanes8, one)``: a row's weight scale and offset coefficient per *unit* (a block;
    for Q6_K each 16 weights, two units per block), such that with the token's ``d_x`` and
    ``XS`` = ``d_x S`` of each unit::

        y = Σ_u s_u · d_x,u · (dot of unit u)  +  Σ_u mu_u · XS_u

    ``lanes8(r, u, d, sc, m, mn)`` -> ``(s, mu)`` as 8-lane vectors for units u..u+7 (all
    within the row); ``one(r, u, d, sc, m, mn)`` -> the two scalars of unit u."""
    from refquant.kernels import simd as V

    scale = _scale_reader(lambda a, r, i: V.f16_at(a[r], i))
    per_row = dshift >= _ROW_SHIFT
    G = 1 if per_row else 1 << dshift          # blocks per stored scale
    UG = 2 * G if sub16 else G                 # units per stored scale
    MN_PER_BLOCK = mnshift == 0
    cf = -np.float32(c)
    glanes = V.make_group_lanes(G) if G in (1, 2, 4, 8) and not per_row else None

    @njit(inline="always", fastmath=True)
    def one(r, u, d, sc, m, mn):
        gi = 0 if per_row else u // UG
        s = scale(d, r, gi)
        if sub16 or has_sc:
            s *= np.float32(sc[r, u])
        mu = np.float32(0)
        if offset == OFFSET_CONST:
            mu = cf * s
        elif offset == OFFSET_MIN:
            mu = scale(m, r, gi)
            if has_mn:
                mu *= np.float32(mn[r, u] if MN_PER_BLOCK else mn[r, gi])
        return s, mu

    @njit(inline="always", fastmath=True)
    def lanes8(r, u, d, sc, m, mn):
        if per_row:
            s = V.mul_f32x8(V.ones_f32(), scale(d, r, 0))
        elif sub16 or has_sc:       # K-quants and Q6_K: 8 units share one d
            s = V.mul_f32x8(V.bytes8_f32(sc[r], u), scale(d, r, u // UG))
        else:
            s = glanes(d[r], u // G)
        if offset == OFFSET_CONST:
            mu = V.mul_f32x8(s, cf)
        elif offset == OFFSET_MIN:
            if has_sc:
                mu = V.mul_f32x8(V.bytes8_f32(mn[r], u), scale(m, r, u // UG))
            else:
                mu = glanes(m[r], u // G)
                if has_mn:
                    mu = V.mul_f32x8(mu, glanes(mn[r], u // G))
        else:
            mu = V.zeros_f32()
        return s, mu
    return lanes8, one


_TILES: dict = {}


def _tile(tier: str, signed: bool, sub16: bool):
    """``tile(wb, P, nrows, xq, xa, toff, out, r0, tmp)``: ``out[t, r0 + i]`` = ``toff[i, t]``
    + Σ_b P[i, t, b] · (the block dot of row i of a chunk with token t), for the chunk's
    codes as bytes ``wb`` (16 rows; an odd ``nrows`` followed by a zero row) and every
    token of ``xq``/``xa`` (x_q and |x_q|, zero-padded to a multiple of 4 tokens; ``out``
    has the real ones); ``tmp`` 8 floats of scratch; ``P[i, t, u]`` = ``s_u · d_x,u`` per unit
    (``_unit_scales``: ``d_b · d_x,b``; Q6_K two units per block). Two rows times four tokens per
    pass: each block's two code loads serve four tokens, each token's x load two rows,
    and every product is one dot, one convert and one multiply-add by a scale broadcast
    from memory, into eight accumulators summed by one ``hsum8``. Layout-independent: one
    compilation per tier, signedness and scale width serves every format."""
    key = (tier, signed, sub16)
    if key in _TILES:
        return _TILES[key]
    from refquant.kernels import simd as V

    bdot = _bdot(tier, signed)

    @njit(inline="always")
    def acc(c, v, p, b):
        if sub16:
            return V.fma_lanes2(c, v, p[2 * b], p[2 * b + 1])
        return V.fma_lanes(c, v, p[b])

    @njit(inline="always")
    def token(c0, c1, w0, w1, xr, ar, p0, p1, b, o):
        """One token's x block against both rows' codes: one load, two dots."""
        v, a = V.load32(xr, o), V.load32(ar, o)
        return acc(c0, bdot(w0, v, a), p0, b), acc(c1, bdot(w1, v, a), p1, b)

    @_cache.jit(("bytedot.tile", tier, signed, sub16), fastmath=True)
    def tile(wb, P, nrows, xq, xa, toff, out, r0, tmp):
        M = out.shape[0]
        T4 = xq.shape[0]
        nb = xq.shape[1] // 32
        for i in range(0, nrows, 2):
            w0r, w1r = wb[i], wb[i + 1]
            for t in range(0, T4, 4):
                x0, x1, x2, x3 = xq[t], xq[t + 1], xq[t + 2], xq[t + 3]
                b0, b1, b2, b3 = xa[t], xa[t + 1], xa[t + 2], xa[t + 3]
                p00, p01, p02, p03 = P[i, t], P[i, t + 1], P[i, t + 2], P[i, t + 3]
                p10, p11, p12, p13 = P[i + 1, t], P[i + 1, t + 1], P[i + 1, t + 2], P[i + 1, t + 3]
                c00 = V.zeros_f32()
                c01 = V.zeros_f32()
                c02 = V.zeros_f32()
                c03 = V.zeros_f32()
                c10 = V.zeros_f32()
                c11 = V.zeros_f32()
                c12 = V.zeros_f32()
                c13 = V.zeros_f32()
                for b in range(nb):
                    o = 32 * b
                    w0, w1 = V.load32(w0r, o), V.load32(w1r, o)
                    c00, c10 = token(c00, c10, w0, w1, x0, b0, p00, p10, b, o)
                    c01, c11 = token(c01, c11, w0, w1, x1, b1, p01, p11, b, o)
                    c02, c12 = token(c02, c12, w0, w1, x2, b2, p02, p12, b, o)
                    c03, c13 = token(c03, c13, w0, w1, x3, b3, p03, p13, b, o)
                V.store_f32x8(tmp, 0, V.hsum8(c00, c01, c02, c03, c10, c11, c12, c13))
                for k in range(min(4, M - t)):
                    out[t + k, r0 + i] = tmp[k] + toff[i, t + k]
                    if i + 1 < nrows:
                        out[t + k, r0 + i + 1] = tmp[4 + k] + toff[i + 1, t + k]
    _TILES[key] = tile
    return tile


def _build_tiles(tier: str, kind: str, sub16: bool, offset: int, has_sc: bool, has_mn: bool, c: int,
                 dshift: int, mshift: int, mnshift: int):
    """The prefill kernel of one format (``kernel``'s signature and result, up to the order
    of its float epilogue). Per chunk of 16 rows: the codes are unpacked once into bytes;
    the scales are decoded once per row, 8 units at a time (``_unit_scales``), and
    multiplied by every token's ``d_x`` into ``P``, their offset terms summed for 16 tokens
    at once; ``_tile`` then runs the chunk against all tokens, four at a time. The
    one-token kernel unpacks and decodes every block again per token.

    The chunks run in a plain ``@njit`` function (``chunks``), which one parallel function
    per tuple of array types (``_parallel``, shared by every layout) calls once per thread
    (``_tasks``): the same loops inlined into a ``prange`` body ran 1.5x as long on one
    thread (3072 x 576 Q4_1, M = 16)."""
    from refquant.kernels import simd as V

    PLANES, SIGNED = _kind_consts(kind)
    WIDTH = 2 if sub16 else 1
    codes2 = _codes2(PLANES, SIGNED)
    lanes8, one = _unit_scales(sub16, offset, has_sc, has_mn, c, dshift, mnshift)
    tile = _tile(tier, SIGNED, sub16)
    key = ("bytedot.tiles", tier, kind, sub16, offset, has_sc, has_mn, c, dshift, mshift, mnshift)

    @njit(inline="always")
    def row_units(r, u0, k0, d, sc, m, mn, DX, XST, M, Pi, o, mus):
        """Units u0..u0+7 of row r: ``P`` for every token; offsets of units u0+k0.. into o."""
        sv, mv = lanes8(r, u0, d, sc, m, mn)
        for t in range(M):
            V.store_f32x8(Pi[t], u0, V.mul_f32x8(sv, V.load_f32x8(DX[t], u0)))
        o0, o1 = o
        if offset != OFFSET_NONE:
            V.store_f32x8(mus, 0, mv)
            for k in range(k0, 8):
                o0 = V.add_f32x8(o0, V.mul_f32x8(V.load_f32x8(XST[u0 + k], 0), mus[k]))
                o1 = V.add_f32x8(o1, V.mul_f32x8(V.load_f32x8(XST[u0 + k], 8), mus[k]))
        return o0, o1

    @_cache.jit(key + ("chunks",), fastmath=True)
    def chunks(g, ng, qs, qh, d, sc, m, mn, xq4, xa4, DX, XST, s16, out):
        """Group g of ng: its contiguous run of 16-row chunks, with its own scratch."""
        M, R = out.shape
        T4, NU = DX.shape
        nb = xq4.shape[1] // 32
        wb = np.zeros((16, 32 * nb), qs.dtype)
        P = np.zeros((16, T4, NU), np.float32)
        tmp = np.empty(8, np.float32)
        toff = np.empty((16, 16), np.float32)
        mus = np.empty(8, np.float32)
        nch = (R + 15) // 16
        for ch in range(nch * g // ng, nch * (g + 1) // ng):
            r0 = 16 * ch
            nrows = min(16, R - r0)
            if nrows < 16:
                wb[nrows:] = 0
            for i in range(nrows):
                r = r0 + i
                row, hrow, wr, Pi = qs[r], qh[r], wb[i], P[i]
                for p in range(nb // 2):
                    lo, hi = codes2(row, hrow, p)
                    V.store32(wr, 64 * p, lo)
                    V.store32(wr, 64 * p + 32, hi)
                o = (V.zeros_f32(), V.zeros_f32())      # offset terms of tokens 0-7, 8-15
                for u0 in range(0, NU - 7, 8):
                    o = row_units(r, u0, 0, d, sc, m, mn, DX, XST, M, Pi, o, mus)
                oi = toff[i]
                if NU % 8 and NU >= 8:   # the last units: the last 8, the new ones' offsets
                    o = row_units(r, NU - 8, 8 - NU % 8, d, sc, m, mn, DX, XST, M, Pi, o, mus)
                V.store_f32x8(oi, 0, o[0])
                V.store_f32x8(oi, 8, o[1])
                if NU < 8:
                    for u in range(NU):
                        s1, m1 = one(r, u, d, sc, m, mn)
                        for t in range(M):
                            Pi[t, u] = s1 * DX[t, u]
                            oi[t] += m1 * XST[u, t]
            tile(wb, P, nrows, xq4, xa4, toff, out, r0, tmp)

    return Kernel(chunks, tiles=True, width=WIDTH)
