"""The byte-dot kernels' weight layout and x rounding, and the plain-loop reference of what
every kernel computes.

Every integer weight layout here (INT8, INT4 groups, W8A8, and the ggml types whose rows
carry a ``ByteDotLayout``) is, per block of 32 weights, an unsigned (for 8-bit: signed)
code ``u`` times a block scale plus a block offset::

    ŵ_i = d_b · u_i + m_b            (i in block b)

and x is rounded once per call to llama.cpp's Q8_0 (``quantize_x``: per block of 32,
``d_x = max|x|/127`` stored as fp16, ``x_q = roundf(x / d_x)``), so with
``S_b = Σ_{i∈b} x_q,i``::

    y_r = Σ_b d_x,b · ( d_b · Σ_{i∈b} u_i x_q,i  +  m_b · S_b )

``reference`` is that sum in plain loops (float64), the readable twin every tier is tested
against. ``Packed`` holds the repacked weights, **eight rows interleaved** (``Packed``'s
docstring has the byte order): one 32-byte load holds four consecutive codes of each of
eight rows, so a byte dot against four bytes of x broadcast to every lane gives each of
eight int32 lanes one row's partial sum. A block of eight rows is then eight byte dots,
one convert and one multiply-add by the eight rows' scales (one load), and a row's result
is a lane: no horizontal sum, no per-row scale pass. (llama.cpp repacks Q4_0 and Q4_K
into 8-row blocks for the same reason: ``ggml-cpu/repack.cpp``.) Scales stay in their
stored width (fp16, uint8 sub-scales), so a kernel reads the format's own bits per weight.
``pack_*`` build it once per tensor; stored bytes never change.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from refquant.kernels import _cache
from refquant.kernels.simd import absmax32, f32_bits, f32_from_bits, round32

OFFSET_NONE, OFFSET_CONST, OFFSET_MIN = 0, 1, 2
_OFFSETS = {"none": OFFSET_NONE, "const": OFFSET_CONST, "min": OFFSET_MIN}   # ByteDotLayout.offset
# Q8_0 stores d_x = max|x|/127 as fp16: beyond 65504 it would be Inf (llama.cpp's too)
Q8_0_MAX_ABS = 65504.0 * 127
_ROW_SHIFT = 30   # b >> 30 == 0: one scale per row
ROWS = 8          # rows interleaved per group
_PLANES = {"s8": 0, "u4": 0, "u5": 1, "u6": 2, "l4": 0}
SIGNED_KINDS = ("s8", "l4")   # weights that are signed bytes once read: the dot takes |x| and w·sign(x)


# --- the repacked form ---------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Packed:
    """Weights in the kernels' layout (module docstring). Per row ``r`` and block ``b``::

        d_b = d[r, b >> dshift] · (sc[r, b] if sc is given else 1)        (fp16 or float32 d)
        m_b = -c · d_b                                  (offset "const", c = 8, 16, 32)
            =  m[r, b >> mshift] · (mn[r, b >> mnshift] if mn is given)   (offset "min")
        ŵ_i = d_b · u_i + m_b

    ``kind``: ``"s8"`` (int8 codes), ``"u4"``/``"u5"``/``"u6"`` (nibbles plus 1 or 2 bit
    planes), ``"l4"`` (nibbles that index ``table``, 16 int8 values: ŵ = d_b·table[u]; IQ4_NL,
    IQ4_XS; the kernels look them up with one byte shuffle per 32). ``sub16``: Q6_K's int8
    sub-scale per 16 weights (``sc`` has ``2·nb`` columns).
    Rows are zero-padded to whole groups of ``ROWS`` = 8 and to ``nb`` blocks (whole scale
    groups); ``logical()`` gives the fields above as (rows, columns) arrays.

    Stored per group ``g`` of rows 8g..8g+7 (``r`` below is the row within the group):

    * ``qs[g]``, u4/u5/u6: 128 bytes per block ``b``; byte ``128b + 32p + 4r + k``
      (p, k < 4) holds weight ``4p + k`` of the block in its low nibble and weight
      ``16 + 4p + k`` in its high one. s8: 256 bytes per block, byte ``256b + 32j + 4r + k``
      (j < 8) is weight ``4j + k``.
    * ``qh[g]``: per block ``32·planes`` bytes; the 4 bytes at ``32·planes·b + 32q + 8p + 4h``
      are bit ``4 + q`` of the 32 codes whose nibbles load ``p`` holds in its low (h = 0) or
      high (h = 1) nibbles, in byte order (bit ``4r + k``).
    * ``d``, ``sc``, ``m``, ``mn``: column ``j`` of the eight rows at ``[g, 8j : 8j + 8]``.
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
    table: tuple | None = None

    @property
    def nbytes(self) -> int:
        """Bytes a matvec reads: codes, bit planes and every scale field."""
        arrays = [self.qs, self.qh, self.d, self.sc, self.m, self.mn]
        return int(sum(a.nbytes for a in arrays if a is not None))

    def layout(self) -> tuple:
        """Everything about the weight but its rows and values: weights with equal layouts
        row-stack, stack over layers and share one compiled kernel."""
        return (self.kind, self.shape[1], self.nb, self.sub16, self.offset, self.c, self.dshift, self.mshift,
                self.mnshift, self.sc is None, self.m is None, self.mn is None, self.d.dtype.str, self.table)

    def logical(self) -> dict:
        """The fields of the docstring's formulas as (rows, columns) arrays: ``codes``
        (rows, nb·32; int8 for s8, else uint8) and ``d``, ``sc``, ``m``, ``mn`` (None
        where absent) -- what ``pack_codes`` took, zero-padded to ``nb`` blocks."""
        rows = self.shape[0]
        out = {f: None if getattr(self, f) is None else _from_groups(getattr(self, f), rows)
               for f in ("d", "sc", "m", "mn")}
        out["codes"] = _codes(self)
        return out


def _blocks_padded(n: int, dshift: int) -> int:
    """Blocks of 32 per row, padded to a whole number of scale groups."""
    unit = 1 if dshift >= _ROW_SHIFT else 1 << dshift
    return -(-n // (32 * unit)) * unit


def _pad_cols(a: np.ndarray, cols: int) -> np.ndarray:
    if a.shape[1] == cols:
        return np.ascontiguousarray(a)
    out = np.zeros((a.shape[0], cols), a.dtype)
    out[:, : a.shape[1]] = a
    return out


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    if a.shape[0] == rows:
        return a
    out = np.zeros((rows,) + a.shape[1:], a.dtype)
    out[: a.shape[0]] = a
    return out


def _to_groups(a: np.ndarray) -> np.ndarray:
    """(rows, cols) -> (groups, cols·8): column j of rows 8g..8g+7 at ``[g, 8j : 8j+8]``."""
    G = -(-a.shape[0] // ROWS)
    a = _pad_rows(a, ROWS * G)
    return np.ascontiguousarray(a.reshape(G, ROWS, -1).transpose(0, 2, 1).reshape(G, -1))


def _from_groups(a: np.ndarray, rows: int) -> np.ndarray:
    G = a.shape[0]
    return np.ascontiguousarray(a.reshape(G, -1, ROWS).transpose(0, 2, 1).reshape(G * ROWS, -1)[:rows])


def _scale_cols(nb: int, shift: int) -> int:
    return 1 if shift >= _ROW_SHIFT else -(-nb // (1 << shift))


def _f16_bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float16).view(np.uint16)


def pack_codes(codes: np.ndarray, kind: str, n: int, *, d, dshift: int, offset: int, c: int = 0, sc=None,
               m=None, mshift: int = 0, mn=None, mnshift: int = 0, sub16: bool = False, table=None) -> Packed:
    """Repack integer codes ``uint8[rows, ≥n]`` (``int8`` for ``"s8"``) with their scale fields
    (each ``[rows, columns]``, as the ``Packed`` docstring's formulas index them)."""
    rows = codes.shape[0]
    nb = _blocks_padded(n, dshift)
    if sub16 and offset != OFFSET_CONST:
        raise ValueError("a scale per 16 weights (sub16) takes the offset 'const' only (Q6_K's)")
    if m is not None and mshift != dshift or mn is not None and mnshift not in (0, dshift):
        raise ValueError("the min field must share the scale's blocks (mshift == dshift, mnshift 0 or dshift)")
    G = -(-rows // ROWS)
    if (kind == "l4") != (table is not None) or table is not None and (
            len(table) != 16 or any(not -127 <= int(v) <= 127 for v in table)):
        raise ValueError("kind 'l4' takes a table of 16 values in [-127, 127], and only it")
    if kind == "s8":
        q = _pad_rows(_pad_cols(np.ascontiguousarray(codes[:, :n]).view(np.int8), nb * 32), ROWS * G)
        if np.any(q == -128):   # w·sign(x) must not wrap: ggml's Q8_0 and INT8 codes lie in [-127, 127]
            raise ValueError("int8 code -128 found: the byte-dot kernels take 8-bit codes in [-127, 127] "
                             "(what ggml's Q8_0 and refquant's INT8 quantizers write)")
        # [g, r, b, j, k] -> [g, b, j, r, k]
        qs = q.reshape(G, ROWS, nb, 8, 4).transpose(0, 2, 3, 1, 4).reshape(G, nb * 256)
        qh = np.zeros((G, 0), np.uint8)
    else:
        planes = _PLANES[kind]
        u = _pad_rows(_pad_cols(np.ascontiguousarray(codes[:, :n], np.uint8), nb * 32), ROWS * G)
        u = u.reshape(G, ROWS, nb, 2, 4, 4).transpose(0, 2, 4, 3, 1, 5)     # [g, b, p, h, r, k]
        qs = ((u[:, :, :, 0] & 15) | ((u[:, :, :, 1] & 15) << 4)).reshape(G, nb * 128)
        bits = [np.packbits(((u >> (4 + q)) & 1).reshape(G, nb, 4, 2, 32), axis=-1, bitorder="little")
                .reshape(G, nb, 1, 4, 2, 4) for q in range(planes)]          # [g, b, q, p, h, 4 bytes]
        qh = np.concatenate(bits, axis=2).reshape(G, -1) if bits else np.zeros((G, 0), np.uint8)

    def scales(a, sh, per=1):
        return None if a is None else _to_groups(_pad_cols(np.asarray(a), per * _scale_cols(nb, sh)))
    return Packed(kind, (rows, n), nb, np.ascontiguousarray(qs), np.ascontiguousarray(qh), scales(d, dshift),
                  int(dshift), int(offset), int(c), scales(sc, 0, 2 if sub16 else 1), scales(m, mshift),
                  int(mshift), scales(mn, mnshift), int(mnshift), bool(sub16),
                  None if table is None else tuple(int(v) for v in table))


def concat_rows(parts: list[Packed]) -> Packed:
    """Row-stack ``Packed`` weights of one layout (rows are independent in every layout):
    their groups when every part's rows fill whole groups, else repacked."""
    import dataclasses

    p0 = parts[0]
    if len(parts) == 1:
        return p0
    if len({p.layout() for p in parts}) != 1:
        raise ValueError("cannot row-stack weights of different layouts")
    rows = sum(p.shape[0] for p in parts)
    if all(p.shape[0] % ROWS == 0 for p in parts):
        cat = {f: None if getattr(p0, f) is None else np.concatenate([getattr(p, f) for p in parts])
               for f in ("qs", "qh", "d", "sc", "m", "mn")}
        return dataclasses.replace(p0, shape=(rows, p0.shape[1]), **cat)
    logical = [p.logical() for p in parts]
    cat = {f: None if logical[0][f] is None else np.concatenate([lg[f] for lg in logical])
           for f in ("codes", "d", "sc", "m", "mn")}
    return pack_codes(cat.pop("codes"), p0.kind, p0.shape[1], dshift=p0.dshift, offset=p0.offset, c=p0.c,
                      mshift=p0.mshift, mnshift=p0.mnshift, sub16=p0.sub16, table=p0.table, **cat)


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
                      sub16=layout.sub16, table=getattr(layout, "table", None))


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
    significant bits, so its spacing in [2^E, 2^(E+1)) is s = 2^(E-10), and never below the
    subnormal spacing 2^-24. Adding ``magic = s·2^23`` and subtracting it again rounds |v|
    to a multiple of s in float32's own round-to-nearest-even (the sum's last mantissa bit
    is worth s, and magic/s is even), with no library call. Not under fastmath, which
    would fold the two operations away."""
    a = abs(v)
    if not a < np.float32(np.inf):
        return v
    e = min(max(f32_bits(a) >> 23, np.int32(113)), np.int32(142))   # 2^-14 <= 2^(e-127) <= 2^15
    magic = f32_from_bits(np.int32((e + 13) << 23))
    r = (a + magic) - magic
    if r > np.float32(65504.0):
        r = np.float32(np.inf)
    return r if f32_bits(v) >= 0 else -r        # the sign bit: -0.0 stays -0.0


@_cache.jit(None, error_model="numpy")   # on disk, a damaged entry recompiled (kernels._cache)
def quantize_x(X, n, xq, dx, xs):
    """Rows of ``X[:, :n]`` as Q8_0 blocks into ``xq`` (T, nb·32) int8 (zero-padded),
    ``dx`` (T, nb) fp16-rounded scales and ``xs`` = ``dx · Σ x_q`` per block. Per block,
    ``quantize_row_q8_0_ref``: ``d = amax/127``, ``q = roundf(x·(1/d))`` (ties away from
    zero), d stored as fp16. The one Q8_0 rounder: ``quantize_x_q8_0`` and the compiled step
    (``stacked``) both call it. NaN, or |x| above ``Q8_0_MAX_ABS`` (the fp16 overflow of
    the scale), raises ValueError. A block is two vector operations (``simd.absmax32``,
    ``simd.round32``): LLVM left the scalar loops they replace unvectorized (0.72 µs per
    576 numbers on Zen 4, for every product of a decode step)."""
    T = X.shape[0]
    nb = dx.shape[1]
    full = min(n // 32, nb)
    v = np.zeros(32, np.float32)
    for t in range(T):
        row, out = np.ascontiguousarray(X[t]), xq[t]
        for b in range(nb):
            lo = 32 * b
            tail = b >= full
            if tail:            # zero-padded
                m = min(32, n - lo) if lo < n else 0
                for i in range(32):
                    v[i] = row[lo + i] if i < m else np.float32(0)
            amax = absmax32(v, 0) if tail else absmax32(row, lo)
            if not amax <= np.float32(65504.0 * 127):
                raise ValueError("x holds NaN or exceeds the byte-dot kernels' Q8_0 range (|x| <= 65504 * 127)")
            db = amax / np.float32(127)
            inv = np.float32(1) / db if db != 0 else np.float32(0)
            total = round32(v, 0, inv, out, lo) if tail else round32(row, lo, inv, out, lo)
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


def _codes(p: Packed) -> np.ndarray:
    """The codes ``u`` (rows, nb·32) of ``p`` (int8 for s8, else uint8): the ``Packed``
    docstring's byte order undone."""
    rows, nb = p.shape[0], p.nb
    G = p.qs.shape[0]
    if p.kind == "s8":
        u = p.qs.reshape(G, nb, 8, ROWS, 4).transpose(0, 3, 1, 2, 4)       # [g, r, b, j, k]
        return np.ascontiguousarray(u.reshape(G * ROWS, nb * 32)[:rows])
    planes = _PLANES[p.kind]
    by = p.qs.reshape(G, nb, 4, ROWS, 4)                                # [g, b, p, r, k]
    u = np.stack([by & 15, by >> 4], axis=3)                            # [g, b, p, h, r, k]
    if planes:
        bits = np.unpackbits(p.qh.reshape(G, nb, planes, 4, 2, 4), axis=-1, bitorder="little")
        for q in range(planes):                                         # [g, b, p, h, (r, k)]
            u |= bits[:, :, q].reshape(G, nb, 4, 2, ROWS, 4) << (4 + q)
    u = u.transpose(0, 4, 1, 3, 2, 5)                                   # [g, r, b, h, p, k]
    return np.ascontiguousarray(u.reshape(G * ROWS, nb * 32)[:rows])


def _f16(a) -> np.ndarray:
    a = np.asarray(a)
    return (a.view(np.float16) if a.dtype == np.uint16 else a).astype(np.float64)


def reference(p: Packed, xq: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """``y[t, r] = Σ_b d_x,b (d_b Σ_{i∈b} u_i x_q,i + m_b S_b)`` in plain loops over blocks,
    float64, from the ``Packed`` fields as its docstring defines them (``logical()``; Q6_K:
    ``d_b`` per 16 weights). ``xq`` (M, nb·32) int8 and ``dx`` (M, nb): ``quantize_x_q8_0``'s
    first two."""
    rows, nb = p.shape[0], p.nb
    f = p.logical()
    u = f["codes"].astype(np.int64)
    if p.table is not None:
        u = np.asarray(p.table, np.int64)[u]
    d = _f16(f["d"])
    m = None if f["m"] is None else _f16(f["m"])
    unit = 16 if p.sub16 else 32
    per = 32 // unit
    y = np.zeros((xq.shape[0], rows))
    for t in range(xq.shape[0]):
        for r in range(rows):
            for b in range(nb):
                for h in range(per):
                    s = slice(32 * b + unit * h, 32 * b + unit * (h + 1))
                    dot = float(np.dot(u[r, s], xq[t, s].astype(np.int64)))
                    db = d[r, b >> p.dshift] * (float(f["sc"][r, per * b + h]) if f["sc"] is not None else 1.0)
                    if p.offset == OFFSET_NONE:
                        mb = 0.0
                    elif p.offset == OFFSET_CONST:
                        mb = -p.c * db
                    else:
                        mb = m[r, b >> p.mshift] * (float(f["mn"][r, b >> p.mnshift]) if f["mn"] is not None else 1.0)
                    S = float(xq[t, s].astype(np.int64).sum())
                    y[t, r] += float(dx[t, b]) * (db * dot + mb * S)
    return y
