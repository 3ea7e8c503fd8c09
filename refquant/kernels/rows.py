"""The byte-dot kernels on the 8-row interleaved layout (``layout.Packed``): the one-token
kernel of the SIMD tiers (``_build``), its building blocks, and the ``numba`` tier
(``_build_numba``, plain loops, every M).

Per group of eight rows and block of 32 weights, a SIMD kernel makes eight byte dots
(``vpdpbusd``, or ``vpmaddubsw``/``vpmaddwd``; ``refquant.kernels.simd``), each of one
32-byte load of codes against four bytes of x broadcast to every lane, so that lane ``r``
sums row ``r``'s products (exact int32); then one convert and one multiply-add by the
eight rows' block scales times ``d_x`` (one load and one multiply), and for an offset
``"min"`` one multiply-add by ``m_b · d_x Σ x_q``. The offset ``"const"`` (``u - c``) costs
no float work: the dots of a block start from ``-c Σ x_q`` (``_const_sums``). A row's
result is a lane of the group's accumulator: no horizontal sum, no scale pass per row.
The arithmetic is ``layout.reference``'s.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from refquant.kernels import _cache
from refquant.kernels import simd as V
from refquant.kernels.layout import _PLANES, OFFSET_CONST, OFFSET_MIN, OFFSET_NONE, ROWS, SIGNED_KINDS
from refquant.kernels.threads import Kernel

# Software prefetch distance into the code stream (bytes ahead of the block being read;
# the groups of a task are contiguous, so it runs on into the next group's codes)
PREFETCH_BYTES = 2048


def _kind_consts(kind: str) -> tuple[int, bool]:
    """``(PLANES, SIGNED)`` of a code kind: bit planes beyond the nibble; weights that are
    signed bytes once read (8-bit codes, looked-up nibbles)."""
    return _PLANES[kind], kind in SIGNED_KINDS


# --- the SIMD building blocks (one group of 8 rows, one block of 32 weights) ------------

def _unpack(PLANES: int, table=None):
    """``unpack(q, hq, b, p) -> (wl, wh)``: load ``p`` (< 4) of block ``b`` of a group's
    nibble codes ``q`` as bytes: weights ``4p..4p+3`` (``wl``) and ``16+4p..`` (``wh``) of
    the eight rows, unsigned with ``PLANES`` bit planes from ``hq`` for 5/6-bit codes, or
    ``table``'s signed values for looked-up nibbles."""
    LUT = table is not None
    lut = V.make_lookup(table if LUT else (0,) * 16)

    @njit(inline="always")
    def unpack(q, hq, b, p):
        w = V.load32(q, 128 * b + 32 * p)
        wl, wh = V.low_nibbles(w), V.high_nibbles(w)
        if LUT:
            return lut(wl), lut(wh)
        if PLANES >= 1:
            o = 32 * PLANES * b + 8 * p
            wl = V.or_shifted(wl, V.load_bits32(hq, o), 4)
            wh = V.or_shifted(wh, V.load_bits32(hq, o + 4), 4)
        if PLANES == 2:
            o = 64 * b + 32 + 8 * p
            wl = V.or_shifted(wl, V.load_bits32(hq, o), 5)
            wh = V.or_shifted(wh, V.load_bits32(hq, o + 4), 5)
        return wl, wh
    return unpack


def _dots(tier: str, PLANES: int, SIGNED: bool, table=None):
    """``dots(q, hq, xm, am, b, lo, hi) -> (lo, hi)``: int32 lanes, lane ``r`` = row
    ``r``'s ``Σ u·x_q`` over weights 0-15 (added to ``lo``) and 16-31 (to ``hi``) of block
    ``b``; ``xm`` the token's x_q, ``am`` its |x_q| (8-bit codes take ``dot(|x|, w·sign(x))``)."""
    dot = V.DOTS[tier]
    unpack = _unpack(PLANES, table)
    LUT = table is not None

    @njit(inline="always")
    def dots(q, hq, xm, am, b, lo, hi):
        xo = 32 * b
        if LUT:
            for p in range(4):
                wl, wh = unpack(q, hq, b, p)
                o = xo + 4 * p
                lo = dot(lo, V.bcast4(am, o), V.sign_apply(wl, V.bcast4(xm, o)))
                hi = dot(hi, V.bcast4(am, o + 16), V.sign_apply(wh, V.bcast4(xm, o + 16)))
            return lo, hi
        if SIGNED:
            for j in range(4):
                o = xo + 4 * j
                lo = dot(lo, V.bcast4(am, o), V.sign_apply(V.load32(q, 256 * b + 32 * j), V.bcast4(xm, o)))
                o += 16
                hi = dot(hi, V.bcast4(am, o), V.sign_apply(V.load32(q, 256 * b + 32 * j + 128), V.bcast4(xm, o)))
            return lo, hi
        for p in range(4):
            wl, wh = unpack(q, hq, b, p)
            lo = dot(lo, wl, V.bcast4(xm, xo + 4 * p))
            hi = dot(hi, wh, V.bcast4(xm, xo + 16 + 4 * p))
        return lo, hi
    return dots


def _scales(sub16: bool, offset: int, has_sc: bool, has_mn: bool, dshift: int, mshift: int, mnshift: int):
    """``scales(dg, scg, mg, mng, b) -> (s0, s1, mu)``: float32 lanes of a group's block ``b``
    (``dg`` etc. the group's rows of each scale field): the weight scale of weights 0-15
    (``s0``) and 16-31 (``s1``; equal unless ``sub16``) and the offset coefficient ``mu``
    (``"min"``: ``m_b``; ``"const"``: ``s0``, the caller multiplies by ``-c`` once)."""

    @njit(inline="always", fastmath=True)
    def scales(dg, scg, mg, mng, b):
        s = V.vec8(dg, ROWS * (b >> dshift))
        if sub16:
            s0, s1 = V.mul_f32x8(s, V.vec8(scg, 16 * b)), V.mul_f32x8(s, V.vec8(scg, 16 * b + 8))
        elif has_sc:
            s0 = s1 = V.mul_f32x8(s, V.vec8(scg, ROWS * b))
        else:
            s0 = s1 = s
        if offset == OFFSET_MIN:
            mu = V.vec8(mg, ROWS * (b >> mshift))
            if has_mn:
                mu = V.mul_f32x8(mu, V.vec8(mng, ROWS * (b >> mnshift)))
        else:
            mu = s0
        return s0, s1, mu
    return scales


@njit(inline="always")
def _group_rows(g, qs, qh, d, sc, m, mn, has_sc, has_m, has_mn):
    """Group ``g``'s rows of every field (absent fields: their one-element dummy's row 0)."""
    return (qs[g], qh[g], d[g], sc[g] if has_sc else sc[0], m[g] if has_m else m[0], mn[g] if has_mn else mn[0])


@njit(inline="always")
def _store_rows(out, mi, g, v, tmp):
    """Lanes of ``v`` to ``out[mi, 8g + r]`` for the rows that exist."""
    R = out.shape[1]
    if ROWS * g + ROWS <= R:
        V.store_f32x8(out[mi], ROWS * g, v)
    else:
        V.store_f32x8(tmp, 0, v)
        for r in range(R - ROWS * g):
            out[mi, ROWS * g + r] = tmp[r]


def _const_sums(c: int, sub16: bool):
    """``sums(xs, dx, s16, xc)``: for the offset ``"const"``, ``xc[t, 2b + h] = -c Σ x_q``
    over half ``h`` of block ``b`` (``sub16``), or over the whole block (``h = 0``; ``h = 1``
    zero), the integers the kernels start a block's dots from, so that ``Σ (u - c) x_q``
    is summed exactly in int32 and the offset costs no float work. Each sum S is recovered
    from the rounder's ``S·d_x`` (``xs``, or ``s16[1]`` per 16) as the nearest integer of
    ``S·d_x / d_x``: |S| <= 32·127 < 2^12 and both roundings are within 2^-23 relative,
    so the quotient is within 2^-10 of S, for any float32 ``d_x`` (0 when ``d_x`` is 0:
    then every x_q is)."""
    C = np.int32(-c)

    @njit(inline="always", fastmath=True)
    def whole(v, d):
        q = v / (d if d != 0 else np.float32(1))
        return np.int32(np.floor(q + np.float32(0.5))) * C

    @njit(inline="always", fastmath=True)
    def sums(xs, dx, s16, xc):
        for t in range(dx.shape[0]):
            for b in range(dx.shape[1]):
                if sub16:
                    xc[t, 2 * b] = whole(s16[1, t, 2 * b], dx[t, b])
                    xc[t, 2 * b + 1] = whole(s16[1, t, 2 * b + 1], dx[t, b])
                else:
                    xc[t, 2 * b] = whole(xs[t, b], dx[t, b])
                    xc[t, 2 * b + 1] = 0
    return sums


def _token(tier, kind, sub16, offset, has_sc, has_mn, c, dshift, mshift, mnshift, table=None):
    """``token(q, hq, dg, scg, mg, mng, xm, am, dxm, xsm, xcm, s16b) -> F32x8``: one token
    against one group of rows, every block (lane r = y of row r); ``xcm`` its row of
    ``_const_sums`` (the offset ``"const"``), ``s16b`` its S·d_x per 16."""
    PLANES, SIGNED = _kind_consts(kind)
    dots = _dots(tier, PLANES, SIGNED, table)
    scales = _scales(sub16, offset, has_sc, has_mn, dshift, mshift, mnshift)
    CONST = offset == OFFSET_CONST

    LINES = 4 if kind == "s8" else 2      # cache lines of codes per block

    @njit(inline="always", fastmath=True)
    def token(q, hq, dg, scg, mg, mng, xm, am, dxm, xsm, xcm, s16b, ahead):
        nb = dxm.shape[0]
        acc = V.zeros_f32()
        for b in range(nb):
            if ahead:
                for i in range(LINES):
                    V.prefetch(q, 64 * (LINES * b + i) + PREFETCH_BYTES)
            if CONST:
                lo, hi = dots(q, hq, xm, am, b, V.splat_i32(xcm[2 * b]),
                              V.splat_i32(xcm[2 * b + 1]) if sub16 else V.zeros_i32())
            else:
                lo, hi = dots(q, hq, xm, am, b, V.zeros_i32(), V.zeros_i32())
            s0, s1, mu = scales(dg, scg, mg, mng, b)
            if sub16:
                acc = V.fma_vec(acc, lo, V.mul_f32x8(s0, dxm[b]))
                acc = V.fma_vec(acc, hi, V.mul_f32x8(s1, dxm[b]))
            else:
                acc = V.fma_vec(acc, V.add_i32(lo, hi), V.mul_f32x8(s0, dxm[b]))
                if offset == OFFSET_MIN:
                    acc = V.fmadd_f32x8(acc, mu, xsm[b])
        return acc
    return token


# --- the kernels -----------------------------------------------------------------------

def _build(tier: str, kind: str, sub16: bool, offset: int, has_sc: bool, has_mn: bool, c: int,
           dshift: int, mshift: int, mnshift: int, table: tuple | None = None):
    """The one-token (decode) kernel for one tier and one format, all compile-time constants.

    ``kernel(qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)`` writes ``out[M, rows]``; its
    ``chunks(t, nt, ...)`` runs task ``t`` of ``nt``: a contiguous run of row groups, every
    token of a group before the next group (its codes are in L1 again for a second token).
    One float accumulator, the blocks' multiply-adds in order, as the tile kernel sums (so
    a token gives the same bits alone and in a batch: a batched decode keeps every
    sequence's text); the int32 dots of a block start from zero, so consecutive blocks
    overlap, and a block's ~10 cycles of other work cover the multiply-add's latency
    (two accumulators were no faster). With ``TILE_MIN_M``
    tokens or more, ``run`` takes the tile kernel (``tiles``), compiled apart.
    """
    has_m = offset == OFFSET_MIN
    key = ("bytedot", tier, kind, sub16, offset, has_sc, has_mn, c, dshift, mshift, mnshift, table)
    if tier == "numba":
        return _build_numba(kind, sub16, offset, has_sc, has_mn, c, dshift, mshift, mnshift, key, table)
    token = _token(tier, kind, sub16, offset, has_sc, has_mn, c, dshift, mshift, mnshift, table)
    sums = _const_sums(c, sub16)
    CONST = offset == OFFSET_CONST

    @_cache.jit(key + ("rows",), fastmath=True)
    def chunks(task, ntask, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        M = out.shape[0]
        G = qs.shape[0]
        tmp = np.empty(ROWS, np.float32)
        xc = np.zeros((M, 2 * dx.shape[1]) if CONST else (M, 1), np.int32)
        if CONST:
            sums(xs, dx, s16, xc)
        for g in range(G * task // ntask, G * (task + 1) // ntask):
            q, hq, dg, scg, mg, mng = _group_rows(g, qs, qh, d, sc, m, mn, has_sc, has_m, has_mn)
            for mi in range(M):
                v = token(q, hq, dg, scg, mg, mng, xq[mi], xa[mi], dx[mi], xs[mi], xc[mi], s16[1, mi], mi == 0)
                _store_rows(out, mi, g, v, tmp)

    return Kernel(chunks)


def _scale_reader():
    """``scale(a, i)`` -> float32 ``a[i]`` of a 1-D field row: fp16 bit patterns (uint16)
    decoded through ``matvec.F16_TABLE``, other types converted."""
    from refquant.kernels.matvec import F16_TABLE as table

    def scale(a, i):
        raise NotImplementedError  # numba only

    @overload(scale, inline="always")
    def _impl(a, i):
        if a.dtype == types.uint16:
            return lambda a, i: table[a[i]]
        return lambda a, i: np.float32(a[i])
    return scale


def _build_numba(kind, sub16, offset, has_sc, has_mn, c, dshift, mshift, mnshift, key, table=None):
    """The pure-numba tier: the same layout and arithmetic in plain loops (the portable
    reference kernel, one thread: a parallel kernel takes 3x as long to compile, which
    every test process would pay per format)."""
    PLANES = _PLANES[kind]
    RAW8 = kind == "s8"
    has_m = offset == OFFSET_MIN
    scale = _scale_reader()
    C = np.int32(c if offset == OFFSET_CONST else 0)
    LUT = table is not None
    TABLE = np.array(table if LUT else (0,) * 16, np.int32)

    @njit(inline="always")
    def code(q, hq, b, r, j):
        """The weight value ``j`` of block ``b`` of row ``r`` of a group (``Packed``'s byte order)."""
        if RAW8:
            return np.int32(q[256 * b + 32 * (j >> 2) + 4 * r + (j & 3)])
        h, p, k = j >> 4, (j >> 2) & 3, j & 3
        u = (np.int32(q[128 * b + 32 * p + 4 * r + k]) >> (4 * h)) & 15
        bit = 4 * r + k
        for pl in range(PLANES):
            u |= ((np.int32(hq[32 * PLANES * b + 32 * pl + 8 * p + 4 * h + (bit >> 3)]) >> (bit & 7)) & 1) << (4 + pl)
        return TABLE[u] if LUT else u

    @_cache.jit(key, fastmath=True)
    def kernel(qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        M, R = out.shape
        nb = dx.shape[1]
        for row in range(R):
            g, r = row // ROWS, row % ROWS
            q, hq, dg, scg, mg, mng = _group_rows(g, qs, qh, d, sc, m, mn, has_sc, has_m, has_mn)
            for mi in range(M):
                acc = np.float32(0)
                for b in range(nb):
                    lo = np.int32(0)
                    hi = np.int32(0)
                    for j in range(16):     # Σ (u - c) x_q: the offset "const" summed exactly
                        xl, xh = np.int32(xq[mi, 32 * b + j]), np.int32(xq[mi, 32 * b + 16 + j])
                        lo += (code(q, hq, b, r, j) - C) * xl
                        hi += (code(q, hq, b, r, 16 + j) - C) * xh
                    s = scale(dg, ROWS * (b >> dshift) + r)
                    if sub16:
                        s0, s1 = s * scale(scg, 16 * b + r), s * scale(scg, 16 * b + 8 + r)
                        acc += np.float32(lo) * (s0 * dx[mi, b])
                        acc += np.float32(hi) * (s1 * dx[mi, b])
                        continue
                    if has_sc:
                        s *= scale(scg, ROWS * b + r)
                    acc += np.float32(lo + hi) * (s * dx[mi, b])
                    if offset == OFFSET_MIN:
                        mu = scale(mg, ROWS * (b >> mshift) + r)
                        if has_mn:
                            mu *= scale(mng, ROWS * (b >> mnshift) + r)
                        acc += mu * xs[mi, b]
                out[mi, row] = acc
    return kernel
