"""The one-token byte-dot kernels: per layout and tier, rows over threads, each row's
blocks against every token (``_build``: SIMD tiers; ``_build_numba``: plain loops).

The arithmetic is ``layout.reference``'s; the inner sums are exact integers
(``vpdpbusd`` or ``vpmaddubsw``/``vpmaddwd``, see ``refquant.kernels.simd``), the float
work one convert and one multiply-add of 8 lanes per block, one scalar multiply-add per
block for the offset term and one horizontal sum per row.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from refquant.kernels import _cache
from refquant.kernels.layout import _ROW_SHIFT, OFFSET_CONST, OFFSET_MIN
from refquant.kernels.threads import Kernel

# Software prefetch distance into the code stream. Q4_0 at 11008x4096, one thread, timed
# interleaved in one process (thread CPU time, median of 31): no prefetch 1.34x, 1 KiB
# 1.11x, 8 KiB 0.92x (p10 0.98x) the time of 4 KiB (Zen 3)
PREFETCH_BYTES = 4096


# --- kernels -------------------------------------------------------------------------

def _scale_reader(read_f16):
    """``scale(a, r, i)`` -> float32 ``a[r, i]``, decoding fp16 bit patterns (uint16) with
    ``read_f16`` and passing float32 through (chosen by the array's type at compile time)."""
    def scale(a, r, i):
        raise NotImplementedError  # numba only

    f16 = njit(inline="always")(read_f16)

    @overload(scale, inline="always")
    def _impl(a, r, i):
        if a.dtype == types.uint16:
            return lambda a, r, i: f16(a, r, i)
        return lambda a, r, i: np.float32(a[r, i])
    return scale


def _build(tier: str, kind: str, sub16: bool, offset: int, has_sc: bool, has_mn: bool, c: int,
           dshift: int, mshift: int, mnshift: int):
    """The kernel for one tier and one format (all compile-time constants: run-time flags
    per block left branches and stack spills in the inner loop, seen in its asm).

    ``kernel(qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)`` writes ``out[M, rows]``.
    Per row, a first pass puts every block's ``d_b·d_x,b`` in a scratch vector and sums
    the offset term ``Σ m_b·d_x,b S_b`` (LLVM vectorizes it); the main loop is then only
    loads, unpacking, dots and one multiply-add per block, in two accumulators (even and
    odd blocks) to hide the add latency. 8-bit codes are signed: they take
    ``dot(|x|, w·sign(x))`` with ``|x|`` computed once per call. Two rows per iteration
    sharing the x loads took 1.8x *as long* here (Zen 3, interleaved in one process), so
    rows go one at a time, in chunks of 16 (a contiguous run of chunks and one scratch
    buffer per thread, ``_tasks``), prefetching the codes ``PREFETCH_BYTES`` ahead. Tokens
    loop outside the rows of a chunk (its codes are in L1 again for the second token): with
    the token loop inside the row loop instead, the one-token path carried it per row and took
    1.03-1.15x as long on 576-wide rows (Q4_0, Q4_1, Q8_0) and 1.01-1.12x on 4096-wide ones,
    except Q4_0 there (0.96-0.97x) (Zen 5, tiers vnni and avx2, one and two threads,
    interleaved in one process, bit-identical results). Tokens go one at a time too: four per pass sharing each
    block's unpacked codes (eight accumulator chains) took 0.73-1.00x the time at M=16 but
    made the one-token (decode) path of the same kernel 1.10-1.17x slower (Q4_0, Q4_1,
    Q8_0, Q4_K, Q6_K; one thread, interleaved); splitting the scale pass into a per-row
    decode and a per-token multiply cost the one-token path 1.2x as well, and so did the
    8-lane scale pass of ``scale_pass_groups`` for one block per scale (Q4_0/Q4_1 on
    576-wide rows: 1.16-1.19x). Batches of ``TILE_MIN_M`` tokens or more therefore take a
    separate kernel (``tile_kernel``), compiled apart so that it cannot slow this one.
    """
    PLANES, SIGNED = _kind_consts(kind)
    scale_pass = _scale_pass(tier, sub16, offset, has_sc, has_mn, c, dshift, mshift, mnshift)
    key = ("bytedot", tier, kind, sub16, offset, has_sc, has_mn, c, dshift, mshift, mnshift)
    if tier == "numba":
        return _build_numba(PLANES, SIGNED, sub16, scale_pass, key)
    from refquant.kernels import simd as V

    codes2 = _codes2(PLANES, SIGNED)
    bdot = _bdot(tier, SIGNED)

    @njit(inline="always")
    def acc_block(acc, v, ds, b):
        if sub16:   # Q6_K: lanes 0-3 hold weights 0-15, lanes 4-7 weights 16-31
            return V.fma_lanes2(acc, v, ds[2 * b], ds[2 * b + 1])
        return V.fma_lanes(acc, v, ds[b])

    WIDTH = 2 if sub16 else 1
    CODE_BYTES = 64 if SIGNED else 32     # code bytes per block pair

    @_cache.jit(key + ("rows",), fastmath=True)
    def rows(g, ng, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        """Group g of ng: its contiguous run of 16-row chunks."""
        M, R = out.shape
        nb = dx.shape[1]
        flat = qs.reshape(-1)
        last = flat.size - 1
        ds = np.empty(WIDTH * nb, np.float32)
        nch = (R + 15) // 16
        for ch in range(nch * g // ng, nch * (g + 1) // ng):
            for mi in range(M):     # tokens outside rows (docstring)
                xm, am = xq[mi], xa[mi]
                for r in range(16 * ch, min(16 * ch + 16, R)):
                    row, hrow = qs[r], qh[r]
                    ahead = r * qs.shape[1] + PREFETCH_BYTES
                    t = scale_pass(ds, r, mi, d, sc, m, mn, dx, xs, s16)
                    a0 = V.zeros_f32()
                    a1 = V.zeros_f32()
                    for p in range(nb // 2):
                        if mi == 0 and (SIGNED or (p & 1) == 0):   # one prefetch per 64 bytes of codes
                            V.prefetch(flat, min(ahead + CODE_BYTES * p, last))
                        lo, hi = codes2(row, hrow, p)
                        a0 = acc_block(a0, bdot(lo, V.load32(xm, 64 * p), V.load32(am, 64 * p)), ds, 2 * p)
                        a1 = acc_block(a1, bdot(hi, V.load32(xm, 64 * p + 32), V.load32(am, 64 * p + 32)), ds,
                                       2 * p + 1)
                    out[mi, r] = (V.hsum_f32(a0) + V.hsum_f32(a1)) + t

    return Kernel(rows, tiles=False, width=1)


def _kind_consts(kind: str) -> tuple[int, bool]:
    """``(PLANES, SIGNED)`` of a code kind: bit planes beyond the nibble, 8-bit signed codes."""
    return {"s8": 0, "u4": 0, "u5": 1, "u6": 2}[kind], kind == "s8"


def _codes2(PLANES: int, SIGNED: bool):
    """``codes2(row, hrow, p)``: the two blocks 2p, 2p+1 of a row as 32 unsigned bytes each
    (signed for 8-bit codes): nibbles, plus ``PLANES`` bit planes for 5/6-bit codes."""
    from refquant.kernels import simd as V

    @njit(inline="always")
    def codes2(row, hrow, p):
        if SIGNED:
            return V.load32(row, 64 * p), V.load32(row, 64 * p + 32)
        w = V.load32(row, 32 * p)
        lo, hi = V.low_nibbles(w), V.high_nibbles(w)
        if PLANES >= 1:
            lo = V.or_shifted(lo, V.load_bits32(hrow, 8 * PLANES * p), 4)
            hi = V.or_shifted(hi, V.load_bits32(hrow, 8 * PLANES * p + 4 * PLANES), 4)
        if PLANES == 2:
            lo = V.or_shifted(lo, V.load_bits32(hrow, 16 * p + 4), 5)
            hi = V.or_shifted(hi, V.load_bits32(hrow, 16 * p + 12), 5)
        return lo, hi
    return codes2


def _bdot(tier: str, SIGNED: bool):
    """``bdot(w, x, ax)``: the 8 int32 lanes of a 32-byte block dot (``Σ₄ w·x``); signed
    codes take ``dot(|x|, w·sign(x))`` with ``ax = |x|``."""
    from refquant.kernels import simd as V

    dot = V.DOTS[tier]

    @njit(inline="always")
    def bdot(w, x, ax):
        if SIGNED:
            return dot(V.zeros_i32(), ax, V.sign_apply(w, x))
        return dot(V.zeros_i32(), w, x)
    return bdot


def _scale_pass(tier, sub16, offset, has_sc, has_mn, c, dshift, mshift, mnshift):
    """``scale_pass(ds, r, mi, d, sc, m, mn, dx, xs, s16) -> t``: fills ``ds`` with every
    block's ``d_b·d_x,b`` (Q6_K: two per block, one per 16) and returns the row's offset
    term ``Σ_b m_b·d_x,b S_b`` (``s16``: Q6_K's ``d_x S`` per 16)."""
    if tier == "numba":
        from refquant.kernels.matvec import F16_TABLE as table

        scale = _scale_reader(lambda a, r, i: table[a[r, i]])
    else:
        from refquant.kernels import simd as V

        scale = _scale_reader(lambda a, r, i: V.f16_at(a[r], i))

    G = 1 if dshift >= _ROW_SHIFT else 1 << dshift     # blocks per stored scale (a constant)
    MN_PER_BLOCK = mnshift == 0

    if tier != "numba" and has_sc and not sub16 and G == 8 and offset == OFFSET_MIN and has_mn and MN_PER_BLOCK:
        # K-quants: one 8-lane step per superblock (LLVM left the u8 -> float loop scalar)
        @njit(inline="always", fastmath=True)
        def scale_pass_k(ds, r, mi, d, sc, m, mn, dx, xs, s16):
            nb = dx.shape[1]
            scr, mnr, dxm, xsm = sc[r], mn[r], dx[mi], xs[mi]
            tv = V.zeros_f32()
            for gi in range(nb // 8):
                b = 8 * gi
                V.store_f32x8(ds, b, V.mul_f32x8(V.mul_f32x8(V.bytes8_f32(scr, b), scale(d, r, gi)),
                                                 V.load_f32x8(dxm, b)))
                tv = V.add_f32x8(tv, V.mul_f32x8(V.mul_f32x8(V.bytes8_f32(mnr, b), scale(m, r, gi)),
                                                 V.load_f32x8(xsm, b)))
            return V.hsum_f32(tv)
        return scale_pass_k

    if tier != "numba" and sub16 and G == 8:
        # Q6_K: 16 int8 sub-scales per superblock, two 8-lane steps (s16[0] = d_x per 16,
        # s16[1] = d_x S per 16)
        @njit(inline="always", fastmath=True)
        def scale_pass_q6(ds, r, mi, d, sc, m, mn, dx, xs, s16):
            nb = dx.shape[1]
            scr, dxm, sm = sc[r], s16[0, mi], s16[1, mi]
            tv = V.zeros_f32()
            for gi in range(nb // 8):
                dg = scale(d, r, gi)
                for h in range(2):
                    b = 16 * gi + 8 * h
                    s = V.mul_f32x8(V.bytes8_f32(scr, b), dg)
                    V.store_f32x8(ds, b, V.mul_f32x8(s, V.load_f32x8(dxm, b)))
                    tv = V.add_f32x8(tv, V.mul_f32x8(s, V.load_f32x8(sm, b)))
            return V.hsum_f32(tv) * -np.float32(c)
        return scale_pass_q6

    if tier != "numba" and G in (2, 4) and not has_sc and not sub16 and (not has_mn or mnshift == dshift):
        # INT4 g64/g128: eight blocks per step, their group scales expanded to lanes
        # (LLVM left the per-group loop scalar, seen in the asm)
        lanes = V.make_group_lanes(G)

        @njit(inline="always", fastmath=True)
        def scale_pass_groups(ds, r, mi, d, sc, m, mn, dx, xs, s16):
            nb = dx.shape[1]
            dr, dxm, xsm = d[r], dx[mi], xs[mi]
            tv = V.zeros_f32()
            for v in range(nb // 8):
                b = 8 * v
                dv = lanes(dr, b // G)
                V.store_f32x8(ds, b, V.mul_f32x8(dv, V.load_f32x8(dxm, b)))
                if offset == OFFSET_CONST:
                    tv = V.add_f32x8(tv, V.mul_f32x8(dv, V.load_f32x8(xsm, b)))
                elif offset == OFFSET_MIN:
                    mv = lanes(m[r], b // G)
                    if has_mn:
                        mv = V.mul_f32x8(mv, lanes(mn[r], b // G))
                    tv = V.add_f32x8(tv, V.mul_f32x8(mv, V.load_f32x8(xsm, b)))
            t = V.hsum_f32(tv)
            for b in range(nb - nb % 8, nb):      # the last blocks, fewer than 8
                db = scale(d, r, b // G)
                ds[b] = db * dxm[b]
                if offset == OFFSET_CONST:
                    t += db * xsm[b]
                elif offset == OFFSET_MIN:
                    mb = scale(m, r, b // G)
                    if has_mn:
                        mb *= np.float32(mn[r, b // G])
                    t += mb * xsm[b]
            if offset == OFFSET_CONST:
                t *= -np.float32(c)
            return t
        return scale_pass_groups

    @njit(inline="always", fastmath=True)
    def scale_pass(ds, r, mi, d, sc, m, mn, dx, xs, s16):
        nb = dx.shape[1]
        t = np.float32(0)
        per_row = dshift >= _ROW_SHIFT
        ng = 1 if per_row else nb // G
        span = nb if per_row else G       # blocks per stored scale (a constant unless per row)
        for gi in range(ng):
            dg = scale(d, r, gi)
            if offset == OFFSET_MIN:
                mg = scale(m, r, gi)
                if has_mn and not MN_PER_BLOCK:
                    mg *= np.float32(mn[r, gi])
            for k in range(span):
                b = gi * G + k
                if sub16:
                    s0, s1 = dg * np.float32(sc[r, 2 * b]), dg * np.float32(sc[r, 2 * b + 1])
                    ds[2 * b] = s0 * dx[mi, b]
                    ds[2 * b + 1] = s1 * dx[mi, b]
                    t += s0 * s16[1, mi, 2 * b] + s1 * s16[1, mi, 2 * b + 1]
                    continue
                db = dg * np.float32(sc[r, b]) if has_sc else dg
                ds[b] = db * dx[mi, b]
                if offset == OFFSET_CONST:
                    t += db * xs[mi, b]
                elif offset == OFFSET_MIN:
                    mb = mg * np.float32(mn[r, b]) if (has_mn and MN_PER_BLOCK) else mg
                    t += mb * xs[mi, b]
        if offset == OFFSET_CONST:
            t *= -np.float32(c)
        return t
    return scale_pass


def _build_numba(PLANES: int, SIGNED: bool, sub16: bool, scale_pass, key):
    """The pure-numba tier: the same layout and arithmetic in plain loops (reference kernel,
    one thread)."""

    @njit(inline="always")
    def code(row, hrow, b, j):
        """Code j of block b (u4/u5/u6: pair-of-blocks nibbles + bit planes; s8: the byte)."""
        if SIGNED:
            return np.int32(row[32 * b + j])
        u = (np.int32(row[16 * (b - (b & 1)) + j]) >> (4 * (b & 1))) & 15
        for k in range(PLANES):
            u |= ((np.int32(hrow[4 * PLANES * b + 4 * k + (j >> 3)]) >> (j & 7)) & 1) << (4 + k)
        return u

    # one thread: this tier is the portable reference, and a parallel kernel takes 3x as
    # long to compile (timed in one process), which every test process pays per format
    @_cache.jit(key, fastmath=True)
    def kernel(qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        M, R = out.shape
        nb = dx.shape[1]
        ds = np.empty(2 * nb, np.float32)
        for r in range(R):
            row, hrow = qs[r], qh[r]
            for mi in range(M):
                t = scale_pass(ds, r, mi, d, sc, m, mn, dx, xs, s16)
                acc = np.float32(0)
                for b in range(nb):
                    lo = np.int32(0)
                    hi = np.int32(0)
                    for j in range(16):
                        lo += code(row, hrow, b, j) * np.int32(xq[mi, 32 * b + j])
                        hi += code(row, hrow, b, 16 + j) * np.int32(xq[mi, 32 * b + 16 + j])
                    if sub16:
                        acc += np.float32(lo) * ds[2 * b] + np.float32(hi) * ds[2 * b + 1]
                    else:
                        acc += np.float32(lo + hi) * ds[b]
                out[mi, r] = acc + t
    return kernel
