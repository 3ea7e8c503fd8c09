"""Byte-dot matvec / small-batch matmul for every integer weight layout, at the memory roof.

One kernel covers INT8, INT4 (g32/g64/g128, symmetric and asymmetric), W8A8 and the GGML
types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K, because each of them is, per block
of 32 weights, an unsigned (or, for 8-bit, signed) integer code ``u`` times a block scale
plus a block offset::

    ŵ_i = d_b · u_i + m_b            (i in block b)

with ``d_b``/``m_b`` built from the format's stored fields (fp16 scale, fp16 min, 6-bit
sub-scales, zero points; see ``Packed``). The activation x is rounded once per call to
llama.cpp's Q8_0 (``refquant.gguf.quants`` "Q8_0": per block of 32, ``d_x = max|x|/127``
stored as fp16, ``x_q = roundf(x / d_x)``), so with ``S_b = Σ_{i∈b} x_q,i``::

    y_r = Σ_b d_x,b · ( d_b · Σ_{i∈b} u_i x_q,i  +  m_b · S_b )

The inner sums are exact integers (``vpdpbusd`` or ``vpmaddubsw``/``vpmaddwd``, see
``refquant.kernels.simd``); the float work is one convert and one multiply-add of 8 lanes
per block, plus one scalar multiply-add per block for the offset term, and one horizontal
sum per row. The result is therefore ``Ŵ x̂`` -- the dequantized weight times the
Q8_0-rounded x -- up to float32 rounding of the epilogue: the tests hold every tier to
``Ŵ x̂`` computed in float64 from ``QuantizedTensor.dequantize`` / ``gguf.quants.dequantize``
and ``x̂`` from ``gguf.quants``, within ``(n_blocks + 30)·2⁻²⁴·Σ|terms|``, and to the exact
``Ŵ x`` within the Q8_0 rounding bound ``Σ|ŵ_i|(d_x/2 + 127|d_x - fp16(d_x)|)``.

W8A8 differs only in x: one int8 scale per token (``max|x|/127``, ``refquant.smoothquant``),
passed to the same kernel as equal block scales.

**Repacked weights.** ``pack_*`` turns stored weights into ``Packed`` once (a model does it
at load; schemes cache it on the ``QuantizedTensor``); files and ``QuantizedTensor`` bytes
never change. Codes of two consecutive blocks share 32 bytes -- block 2p in the low
nibbles, block 2p+1 in the high nibbles -- so one 32-byte load, one AND and one shift give
both blocks without shuffles; 5- and 6-bit codes add one or two bit planes of 4 bytes per
block, which expand to bytes with one broadcast/shuffle/compare; 8-bit codes are stored
as they are. Scales stay in their stored width (fp16, uint8 sub-scales), so the bytes a
kernel reads are the format's own bits per weight (Q4_K: 4.625 instead of 4.5, its 12-byte
6-bit scale packing widened to one byte per scale and min).

**Prefill.** From ``TILE_MIN_M`` rows of X on, the SIMD tiers run ``tile_kernel``: per
chunk of 16 rows, the codes are unpacked to bytes and the scales decoded once, then tiles
of 2 rows x 4 tokens share every load (``_tile``, one compilation for every format). Its
float epilogue sums in another order than the one-token kernel's, so a token's result in
a batch differs from its result alone in the last bits; both are held to the same bound.

**Tiers.** ``vnni`` and ``avx2`` run the vector code of ``simd``; ``numba`` is the same
arithmetic in plain loops on the same layout (LLVM vectorizes it as it can), the
portable fallback and the readable reference for the layout. ``backend()`` names the
tier in use; ``REFQUANT_KERNEL_TIER=avx2|numba`` forces a lower one.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from refquant._checks import float_array
from refquant.kernels import MAX_BATCH, _cache

TIERS = ("vnni", "avx2", "numba")
TIER_ENV = "REFQUANT_KERNEL_TIER"
OFFSET_NONE, OFFSET_CONST, OFFSET_MIN = 0, 1, 2
_OFFSETS = {"none": OFFSET_NONE, "const": OFFSET_CONST, "min": OFFSET_MIN}   # ByteDotLayout.offset
# Q8_0 stores d_x = max|x|/127 as fp16: beyond 65504 it would be Inf (llama.cpp's too)
Q8_0_MAX_ABS = 65504.0 * 127
_ROW_SHIFT = 30   # b >> 30 == 0: one scale per row
# Software prefetch distance into the code stream. Q4_0 at 11008x4096, one thread, timed
# interleaved in one process (thread CPU time, median of 31): no prefetch 1.34x, 1 KiB
# 1.11x, 8 KiB 0.92x (p10 0.98x) the time of 4 KiB (Zen 3)
PREFETCH_BYTES = 4096


# --- tiers -----------------------------------------------------------------------------

def available_tiers() -> tuple[str, ...]:
    """Tiers this machine can run, best first (the byte-dot tiers only when numba compiles
    for the host CPU: with ``NUMBA_CPU_NAME`` set, code must run on other CPUs too)."""
    from numba.core import config

    return _tiers(config.CPU_NAME)


@functools.lru_cache(maxsize=None)
def _tiers(cpu_name) -> tuple[str, ...]:
    if cpu_name not in (None, "host"):
        return ("numba",)
    import llvmlite.binding as llvm

    f = llvm.get_host_cpu_features()
    has = lambda k: bool(f.get(k, False))  # noqa: E731
    tiers = []
    if has("avx512vnni") and has("avx512vl") and has("avx2") and has("f16c"):
        tiers.append("vnni")
    if has("avx2") and has("f16c"):
        tiers.append("avx2")
    return tuple(tiers) + ("numba",)


def backend() -> str:
    """The tier the kernels use: the best available, or ``$REFQUANT_KERNEL_TIER`` if set."""
    want = os.environ.get(TIER_ENV, "").strip()
    have = available_tiers()
    if not want:
        return have[0]
    if want not in TIERS:
        raise ValueError(f"{TIER_ENV}={want!r} is not a tier; tiers: {', '.join(TIERS)}")
    if want not in have:
        raise ValueError(f"{TIER_ENV}={want!r}: this machine (or numba's target) only runs {', '.join(have)}")
    return want


# --- the repacked form ---------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Packed:
    """Weights in the kernels' layout (module docstring). Per row ``r`` and block ``b``::

        d_b = d[r, b >> dshift] · (sc[r, b] if sc is given else 1)        (fp16 or float32 d)
        m_b = -c · d_b                                  (offset "const", c = 8, 16, 32)
            =  m[r, b >> mshift] · (mn[r, b >> mnshift] if mn is given)   (offset "min")
        ŵ_i = d_b · u_i + m_b

    ``kind``: ``"s8"`` (int8 codes, ``qs`` int8 (rows, nb·32)), ``"u4"``/``"u5"``/``"u6"``
    (nibbles ``qs`` uint8 (rows, nb·16) plus 1 or 2 bit planes ``qh`` (rows, nb·4·planes)).
    ``sub16``: Q6_K's int8 sub-scale per 16 weights (``sc`` int8 (rows, 2·nb)).
    Rows are zero-padded to ``nb`` blocks: whole block pairs and whole scale groups.
    """

    kind: str
    shape: tuple[int, int]
    nb: int
    qs: np.ndarray
    qh: np.ndarray
    d: np.ndarray
    dshift: int
    offset: int
    c: int = 0
    sc: np.ndarray | None = None
    m: np.ndarray | None = None
    mshift: int = 0
    mn: np.ndarray | None = None
    mnshift: int = 0
    sub16: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes a matvec reads: codes, bit planes and every scale field."""
        arrays = [self.qs, self.qh, self.d, self.sc, self.m, self.mn]
        return int(sum(a.nbytes for a in arrays if a is not None))


def _blocks_padded(n: int, dshift: int) -> int:
    """Blocks of 32 per row, padded to a whole number of block pairs and of scale groups."""
    unit = 2 if dshift >= _ROW_SHIFT else max(2, 1 << dshift)
    return -(-n // (32 * unit)) * unit


def _pad_cols(a: np.ndarray, cols: int) -> np.ndarray:
    if a.shape[1] == cols:
        return np.ascontiguousarray(a)
    out = np.zeros((a.shape[0], cols), a.dtype)
    out[:, : a.shape[1]] = a
    return out


def _scale_cols(nb: int, shift: int) -> int:
    return 1 if shift >= _ROW_SHIFT else -(-nb // (1 << shift))


def _f16_bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float16).view(np.uint16)


def pack_codes(codes: np.ndarray, kind: str, n: int, *, d, dshift: int, offset: int, c: int = 0, sc=None,
               m=None, mshift: int = 0, mn=None, mnshift: int = 0, sub16: bool = False) -> Packed:
    """Repack integer codes ``uint8[rows, ≥n]`` (``int8`` for ``"s8"``) with their scale fields."""
    rows = codes.shape[0]
    nb = _blocks_padded(n, dshift)
    if m is not None and mshift != dshift or mn is not None and mnshift not in (0, dshift):
        raise ValueError("the min field must share the scale's blocks (mshift == dshift, mnshift 0 or dshift)")
    if kind == "s8":
        qs = _pad_cols(np.ascontiguousarray(codes[:, :n]).view(np.int8), nb * 32)
        if np.any(qs == -128):   # w·sign(x) must not wrap: ggml's Q8_0 and INT8 codes lie in [-127, 127]
            raise ValueError("int8 code -128 found: the byte-dot kernels take 8-bit codes in [-127, 127] "
                             "(what ggml's Q8_0 and refquant's INT8 quantizers write)")
        qh = np.zeros((rows, 0), np.uint8)
    else:
        bits = {"u4": 4, "u5": 5, "u6": 6}[kind]
        u = _pad_cols(np.ascontiguousarray(codes[:, :n], np.uint8), nb * 32).reshape(rows, nb // 2, 2, 32)
        qs = ((u[:, :, 0] & 15) | ((u[:, :, 1] & 15) << 4)).reshape(rows, nb * 16)
        planes = [np.packbits((u >> k) & 1, axis=-1, bitorder="little").reshape(rows, nb, 1, 4)
                  for k in range(4, bits)]
        qh = np.concatenate(planes, axis=2).reshape(rows, -1) if planes else np.zeros((rows, 0), np.uint8)
    scols = lambda a, sh, per=1: None if a is None else _pad_cols(a, per * _scale_cols(nb, sh))  # noqa: E731
    return Packed(kind, (rows, n), nb, np.ascontiguousarray(qs), np.ascontiguousarray(qh), scols(d, dshift),
                  int(dshift), int(offset), int(c), scols(sc, 0, 2 if sub16 else 1), scols(m, mshift),
                  int(mshift), scols(mn, mnshift), int(mnshift), bool(sub16))


def _log2_blocks(group: int) -> int:
    if group % 32 or group & (group - 1):
        raise ValueError(f"group size {group} is not a power-of-two multiple of 32; the byte-dot kernels need one")
    return group.bit_length() - 6


def pack_fields(f: dict, layout, n: int) -> Packed:
    """Repack a ggml type's stored fields (``gguf.quants.block_fields``: ``codes``, ``d`` and
    ``sc``/``m``/``mn`` where the type has them) as its ``layout`` says (a
    ``gguf.quants.ByteDotLayout``: code kind, offset, scale sharing)."""
    m = None if layout.m is None else f[layout.m]
    if m is not None and layout.negate_m:   # fp16 sign flip: exact
        m = m ^ np.uint16(0x8000)
    return pack_codes(f["codes"], layout.kind, n, d=f["d"], dshift=layout.dshift, offset=_OFFSETS[layout.offset],
                      c=layout.c, sc=f.get("sc"), m=m, mshift=layout.mshift, mn=f.get("mn"), mnshift=layout.mnshift,
                      sub16=layout.sub16)


def pack_affine(qt) -> Packed:
    """Repack an ``affine`` INT8 (symmetric, per tensor/channel) or INT4 (group) tensor."""
    bits, n, rows = qt.meta.get("bits", 8 if qt.kind == "w8a8" else None), qt.shape[1], qt.shape[0]
    if bits == 8 and qt.zeros is None:
        s = np.broadcast_to(np.asarray(qt.scales, np.float32).reshape(-1, 1), (rows, 1))
        return pack_codes(qt.codes.view(np.int8), "s8", n, d=np.ascontiguousarray(s), dshift=_ROW_SHIFT,
                          offset=OFFSET_NONE)
    if bits != 4 or qt.meta.get("granularity") != "group" or qt.scales.dtype != np.float16:
        raise ValueError(f"no byte-dot kernel for {qt.scheme!r} (bits {bits}, {qt.meta.get('granularity')})")
    g = _log2_blocks(qt.meta["group_size"])
    b = qt.codes.view(np.uint8)
    u = np.empty((rows, 2 * b.shape[1]), np.uint8)
    u[:, 0::2], u[:, 1::2] = b & 15, b >> 4
    d = _f16_bits(qt.scales)
    if qt.zeros is None:    # two's complement nibble n holds q; n ^ 8 = q + 8
        return pack_codes(u ^ 8, "u4", n, d=d, dshift=g, offset=OFFSET_CONST, c=8)
    # ŵ = s (u - z) = s·u + (-s)·z
    return pack_codes(u, "u4", n, d=d, dshift=g, offset=OFFSET_MIN, m=d ^ np.uint16(0x8000), mshift=g,
                      mn=np.asarray(qt.zeros, np.uint8), mnshift=g)


# --- activation quantization ---------------------------------------------------------

@njit(inline="always")
def f16_round(v):
    """float32 ``v`` rounded to the nearest fp16 value (ties to even; Inf beyond 65504),
    as float32: ``np.float32(np.float16(v))`` in numba code. An fp16 number has 11
    significant bits, so its spacing in [2^(e-1), 2^e) is 2^(e-11), and never below the
    subnormal spacing 2^-24; scaling by a power of two is exact, so ``rint`` does the
    rounding."""
    a = abs(np.float64(v))
    if a == 0.0 or not np.isfinite(a):
        return v
    e = math.frexp(a)[1]
    ue = max(e - 11, -24)
    r = math.ldexp(np.rint(math.ldexp(a, -ue)), ue)
    if r > 65504.0:
        r = np.inf
    return np.float32(math.copysign(r, v))


@_cache.jit(None, error_model="numpy")   # on disk, a damaged entry recompiled (kernels._cache)
def quantize_x(X, n, xq, dx, xs):
    """Rows of ``X[:, :n]`` as Q8_0 blocks into ``xq`` (T, nb·32) int8 (zero-padded),
    ``dx`` (T, nb) fp16-rounded scales and ``xs`` = ``dx · Σ x_q`` per block. Per block,
    ``quantize_row_q8_0_ref``: ``d = amax/127``, ``q = roundf(x·(1/d))`` (ties away from
    zero), d stored as fp16. The one Q8_0 rounder: ``quantize_x_q8_0`` and the compiled step
    (``stacked``) both call it. |x| above ``Q8_0_MAX_ABS`` (the fp16 overflow of the scale)
    raises ValueError. The rounding is written without branches (select), so LLVM
    vectorizes it (numpy error model: no division check)."""
    T = X.shape[0]
    nb = dx.shape[1]
    v = np.zeros(32, np.float32)
    half, one = np.float32(0.5), np.float32(1)
    for t in range(T):
        for b in range(nb):
            lo = 32 * b
            m = min(32, n - lo) if lo < n else 0
            for i in range(32):
                v[i] = X[t, lo + i] if i < m else np.float32(0)
            amax = np.float32(0)
            for i in range(32):
                amax = max(amax, abs(v[i]))
            if amax > np.float32(65504.0 * 127):
                raise ValueError("x exceeds the byte-dot kernels' Q8_0 range (|x| <= 65504 * 127)")
            db = amax / np.float32(127)
            inv = one / db if db != 0 else np.float32(0)
            total = 0
            for i in range(32):
                w = v[i] * inv
                q = np.float32(np.trunc(w))
                q += (one if w >= 0 else -one) if abs(w - q) >= half else np.float32(0)
                xq[t, lo + i] = np.int8(q)
                total += np.int32(q)
            d16 = f16_round(db)
            dx[t, b] = d16
            xs[t, b] = d16 * np.float32(total)


def quantize_x_q8_0(X: np.ndarray, nb: int):
    """X (M, n) float32 as Q8_0 blocks over ``nb`` blocks (zero-padded): ``(x_q int8 (M, nb·32),
    d_x float32 (M, nb) fp16-rounded, S·d_x float32 (M, nb))`` (``quantize_x``). Bit-identical
    to ``gguf.quants.quantize(X, "Q8_0")`` (tested), so with llama.cpp's limits: blocks whose
    max|x| is below ~7.6e-6 (fp16's smallest subnormal times 127 / 2) round to zero, and
    |x| beyond 8.3e6 is refused (ValueError) rather than turned into Inf."""
    M, n = X.shape
    amax = float(np.max(np.abs(X)))
    if amax / 127 > 65504.0:
        raise ValueError(f"x reaches |x| = {amax:.3g}: its Q8_0 block scale max|x|/127 overflows fp16 "
                         f"(the byte-dot kernels take |x| <= {Q8_0_MAX_ABS:.4g})")
    xq = np.empty((M, nb * 32), np.int8)
    dx = np.empty((M, nb), np.float32)
    xs = np.empty((M, nb), np.float32)
    quantize_x(np.ascontiguousarray(X, np.float32), n, xq, dx, xs)
    return xq, dx, xs


def blocks_of_rows(xq: np.ndarray, scale: np.ndarray, nb: int):
    """Int8 rows ``xq`` (M, n) with one scale per row, in the block form the kernels read:
    ``(x_q (M, nb·32) zero-padded, d_x (M, nb), S·d_x (M, nb))`` (a per-token rounder's output)."""
    M = xq.shape[0]
    xq = _pad_cols(np.asarray(xq, np.int8), nb * 32)
    dx = np.repeat(np.asarray(scale, np.float32).reshape(M, 1), nb, axis=1)
    sums = xq.reshape(M, nb, 32).sum(axis=2, dtype=np.int32)
    return xq, dx, (dx * sums.astype(np.float32)).astype(np.float32)


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

    @njit
    def kernel(qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        _parallel_rows(rows, _tasks(out.shape[1]), 0, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)
    kernel.chunks = rows      # the compiled loops (the asm test reads them)
    return kernel


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


# --- the prefill path: rows unpacked once, tiles of 2 rows x 4 tokens ------------------

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


@_cache.jit("bytedot.tile_inputs")
def _tile_inputs(xq, xa, dx, xs, s16, width):
    """The tile kernels' views of the rounded x: x_q and |x_q| zero-padded to a multiple of
    4 tokens, ``DX`` = d_x per unit, ``XST`` = d_x S per unit with the tokens last (16
    columns: M <= 16); ``width`` 2 (Q6_K, units of 16 weights, ``s16[1]``) or 1 (``xs``)."""
    M = xq.shape[0]
    nu = width * dx.shape[1]
    T4 = (M + 3) // 4 * 4
    xq4 = np.zeros((T4, xq.shape[1]), xq.dtype)
    xa4 = np.zeros((T4, xq.shape[1]), xq.dtype)
    for t in range(M):        # loops, not slice assignments: numba compiles those with a
        for i in range(xq.shape[1]):   # shape-mismatch error path whose formatting costs seconds
            xq4[t, i] = xq[t, i]
            xa4[t, i] = xa[t, i]
    DX = np.zeros((T4, nu), np.float32)
    XST = np.zeros((nu, 16), np.float32)
    for t in range(M):
        for u in range(nu):
            DX[t, u] = dx[t, u // width]
            XST[u, t] = s16[1, t, u] if width == 2 else xs[t, u]
    return xq4, xa4, DX, XST


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

    @njit
    def kernel(qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        _parallel_tiles(chunks, _tasks(out.shape[1]), WIDTH, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)
    kernel.chunks = chunks
    return kernel


@njit
def _tasks(rows):
    """Parallel tasks of a SIMD kernel call: one per thread (a contiguous run of 16-row
    chunks each, with its own scratch), fewer for small matrices. Eight tasks on two
    threads made SmolLM2's decode step 1.2x as long (task calls, scratch allocations)."""
    return max(1, min((rows + 15) // 16, numba.get_num_threads()))


_PARALLEL: dict = {}


def _parallel(arrays: tuple, tiles: bool):
    """``(chunk signature, par)``: the parallel part of the SIMD kernels for arguments of the
    numba types ``arrays`` (qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out), by its address.

    ``par(chunks, ng, width, *arrays)`` runs ``chunks(g, ng, ...)`` for g in ``prange(ng)``;
    with ``tiles`` it first pads x for the tile kernel (``_tile_inputs``, ``width`` units
    per block) and hands the chunks those copies. One compilation per tuple of types (and
    cached on disk) serves every layout: ``chunks`` is a first-class function argument."""
    key = (arrays, tiles)
    if key not in _PARALLEL:
        inner = arrays
        if tiles:
            f32 = types.Array(types.float32, 2, "C")
            xq4 = types.Array(arrays[6].dtype, 2, "C")
            inner = arrays[:6] + (xq4, xq4, f32, f32) + arrays[10:]
        csig = types.void(types.int64, types.int64, *inner)
        psig = types.void(types.FunctionType(csig), types.int64, types.int64, *arrays)
        if tiles:
            def par(chunks, ng, width, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
                xq4, xa4, DX, XST = _tile_inputs(xq, xa, dx, xs, s16, width)
                for g in prange(ng):
                    chunks(np.int64(g), ng, qs, qh, d, sc, m, mn, xq4, xa4, DX, XST, s16, out)
        else:
            def par(chunks, ng, width, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
                for g in prange(ng):
                    chunks(np.int64(g), ng, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)
        disp = _cache.jit(("bytedot.parallel", tiles, str(psig)), parallel=True)(par)
        _PARALLEL[key] = csig, _by_address(disp, psig)
    return _PARALLEL[key]


def _by_address(disp, sig):
    """``disp`` compiled for ``sig`` as a numba first-class function value that callers
    reach by its address (``CompileResultWAP``), so its code is never linked into them."""
    from numba.core.types.function_type import CompileResultWAP

    disp.compile(sig.args)
    return CompileResultWAP(disp.overloads[sig.args])


def _parallel_stub(tiles: bool):
    """A numba-only function ``f(chunks, ng, width, qs, ..., out)`` that calls ``_parallel``'s
    ``par`` with ``chunks``, both by address: a function named as a constant would link its
    code into every caller (the thin kernels, the stacked applies, the compiled step), which
    numba then optimizes again, seconds per caller."""
    def f(chunks, ng, width, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        raise NotImplementedError("numba only")

    @overload(f)
    def _f(chunks, ng, width, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        csig, par = _parallel((qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out), tiles)
        fn = _by_address(chunks.dispatcher, csig)

        def impl(chunks, ng, width, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
            par(fn, ng, width, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)
        return impl
    return f


_parallel_rows = _parallel_stub(False)
_parallel_tiles = _parallel_stub(True)


def _layout_key(tier: str, p: Packed) -> tuple:
    """What a kernel is compiled for: the tier and every compile-time constant of the layout
    (the arguments of ``_build`` / ``_build_tiles``)."""
    return (tier, p.kind, p.sub16, p.offset, p.sc is not None, p.mn is not None, p.c, p.dshift, p.mshift,
            p.mnshift)


def kernels_for(tier: str, p: Packed):
    """``(one_token, batch)``: the kernels for ``p``'s layout on ``tier``; ``batch`` takes
    X of ``TILE_MIN_M`` rows or more (the tile kernel on SIMD tiers; the numba tier's one
    kernel takes every M)."""
    k = kernel(tier, p)
    return k, (k if tier == "numba" else tile_kernel(tier, p))


_TILE_KERNELS: dict = {}


def tile_kernel(tier: str, p: Packed):
    """The prefill (tile) kernel of a SIMD tier for ``p``'s layout (built on first use)."""
    if tier == "numba":
        raise ValueError("the numba tier has no tile kernel: its one kernel takes every M")
    key = _layout_key(tier, p)
    if key not in _TILE_KERNELS:
        _TILE_KERNELS[key] = _build_tiles(*key)
    return _TILE_KERNELS[key]


_KERNELS: dict = {}


def kernel(tier: str, p: Packed):
    """The compiled kernel of tier ``tier`` for ``p``'s layout (built on first use, then kept)."""
    key = _layout_key(tier, p)
    if key not in _KERNELS:
        _KERNELS[key] = _build(*key)
    return _KERNELS[key]


_DUMMY_U8 = np.zeros((1, 1), np.uint8)
_DUMMY_U16 = np.zeros((1, 1), np.uint16)


def run(p: Packed, xq: np.ndarray, dx: np.ndarray, xs: np.ndarray, xs16: np.ndarray | None = None,
        tier: str | None = None) -> np.ndarray:
    """The kernel on already-quantized activations (M, nb·32): ``out[M, rows]`` float32."""
    tier = tier or backend()
    if tier not in available_tiers():
        raise ValueError(f"tier {tier!r} is not available here ({', '.join(available_tiers())})")
    M = xq.shape[0]
    out = np.empty((M, p.shape[0]), np.float32)
    sc = p.sc if p.sc is not None else _DUMMY_U8
    m = p.m if p.m is not None else _DUMMY_U16
    mn = p.mn if p.mn is not None else _DUMMY_U8
    if xs16 is None:
        xs16 = np.zeros((2, M, 8), np.float32)
    xa = np.abs(xq) if p.kind == "s8" else xq   # |x_q|: the unsigned operand of the signed (8-bit) path only
    one, batch = kernels_for(tier, p)
    (batch if M >= TILE_MIN_M else one)(p.qs, p.qh, p.d, sc, m, mn, xq, xa, dx, xs, xs16, out)
    return out


def _check_X(p: Packed, X, name: str) -> np.ndarray:
    if not isinstance(p, Packed):
        raise TypeError(f"p must be a Packed weight (bytedot.pack_*), got {type(p).__name__}")
    X = float_array(X, name)
    if X.ndim not in (1, 2) or X.shape[-1] != p.shape[1]:
        raise ValueError(f"{name} must have shape ({p.shape[1]},) or (M, {p.shape[1]}), got {X.shape}")
    X2 = np.atleast_2d(X)
    if X2.shape[0] > MAX_BATCH:
        raise ValueError(f"{name} has {X2.shape[0]} rows; the small-batch kernels take at most {MAX_BATCH}")
    return np.ascontiguousarray(X2, np.float32)


def matmul(p: Packed, X: np.ndarray, *, round_x=None, tier: str | None = None) -> np.ndarray:
    """``Ŵ x̂`` for x of shape (n,) -> (rows,), or ``X̂ Ŵᵀ`` for X of shape (M <= 16, n) -> (M, rows).

    x is rounded to Q8_0 blocks (``round_x=None``, llama.cpp's) or by ``round_x(X, nb) ->
    (x_q, d_x, S·d_x)`` (e.g. W8A8's one int8 scale per token, ``blocks_of_rows``).
    """
    X2 = _check_X(p, X, "x" if np.ndim(X) == 1 else "X")
    xq, dx, xs = (round_x or quantize_x_q8_0)(X2, p.nb)
    xs16 = None
    if p.sub16:   # Q6_K: d_x per 16 and its offset's d_x Σ x_q per 16
        dx16 = np.repeat(dx, 2, axis=1)
        xs16 = np.stack([dx16, (dx16 * xq.reshape(X2.shape[0], -1, 16).sum(axis=2)).astype(np.float32)])
    out = run(p, xq, dx, xs, xs16, tier)
    return out[0] if np.ndim(X) == 1 else out
