"""The KV cache as an operand: one object that allocates the keys and values, stores a
token's rows, and is read by attention -- the compiled decode step and the NumPy
references hold the same thing.

A cache holds ``n_seq`` sequences of up to ``n_ctx`` positions, for ``n_layer`` layers and
``n_kv`` key/value heads of ``head_dim`` numbers: ``k`` and ``v`` are arrays of shape
(n_layer, n_seq, n_kv, n_ctx, units), layer first so that a run of layers is one
contiguous slice, one row of ``units`` storage elements per position and head. ``type_k`` /
``type_v`` name the storage as llama.cpp's ``--cache-type-k`` / ``--cache-type-v`` do; K and
V may differ. ``"f32"`` is float32 rows and is defined here; every other type is a
``CacheType`` that a format module registers (``register``: ``refquant.gguf.quants``
registers llama.cpp's f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 and iq4_nl): its NumPy
``encode`` / ``decode`` of whole rows, and for numba code a ``codec`` (the byte layout of a
row, all this module's readers know) and ``put`` (the compiled encoder of one row, which
writes the bytes ``encode`` does). Both types are part of ``key()``, which a compiled step
includes in its compile key. ``pos[seq]`` is how many positions sequence ``seq`` holds.

Inside numba code (``ops()``, built on first use so that the NumPy side never loads numba):
``store(k, v, ks, vs, l, seq, pos, row, k_off, v_off, h0, h1, hd)`` writes a token's key
and value heads ``h0 <= h < h1`` from ``row[k_off + h·hd:]`` / ``row[v_off + h·hd:]`` (the
members of a team store their own heads; ``ks``/``vs`` the cache's ``k_scale``/``v_scale``,
read by scaled types only, whose readers leave the scale to the caller: the scores of a
key head are multiplied by its ``ks``, the values summed by its ``vs``); ``k_scores(k, l, seq, h, j0, n, q, qo, G, hd, scale, s,
stride)`` writes the scores ``scale · q_g · K[l, seq, h, j]`` of the ``G`` query heads
``q[qo + g·hd:]`` of key head ``h`` against keys ``j0 <= j < j0 + n`` into ``s[g·stride + j −
j0]``, and ``v_sums(v, l, seq, h, j0, n, p, stride, G, out, hd)`` adds ``Σ_j p[g·stride + j −
j0] · V[l, seq, h, j]`` to ``out[g·hd:]``: a decode step's attention touches the cache only
through these, each row read once for the ``G`` heads that share it;
``k_tile(k, l, seq, h, j0, n, kt)`` writes keys ``j0 <= j < j0+n`` of head ``h`` transposed
as float32 into ``kt`` (head_dim, TILE), zeros in its columns from ``n`` on, and
``v_tile(v, l, seq, h, j0, n, vt)`` the values as rows of ``vt`` (TILE, head_dim), zero rows
from ``n`` on: the tiles a prefill's attention reads (``TILE`` keys at a time);
``fetch(k, v, l, seq, h0, h1, j0, j1, parts)`` hints positions ``j0..j1-1`` of heads
``h0 <= h < h1`` into L2 (at most ``FETCH_BYTES / parts`` of them, ``parts`` the sequences
a step fetches for: a step issues it before the weight product that
precedes its attention, so that the cache rows, evicted by the weights of every other
layer, are not read from memory one row at a time). A tile holds the floats ``decode``
gives (bit for bit where the caller is compiled without fastmath's contraction: the
readers compute ``d·u + m`` as the dequantizers do, and a contracting caller may fuse it
into one rounding); ``k_scores`` and ``v_sums`` sum the same values in another order
(``d · Σ q·u + m · Σ q`` per block), the keys of q8_0, q4_0 and q4_1 against the query
rounded to int16 (``_scorer``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

TILE = 16                   # keys per tile of ``k_tile`` / ``v_tile``
AHEAD = 8192                # bytes ahead of the row it reads that a block decoder hints into L1
CHUNK = 32                  # rows of keys or values decoded at a time for a group of query heads
FETCH_BYTES = 1 << 19       # per call: half a Zen 4 core's L2


@dataclass(frozen=True)
class CacheType:
    """How a cache type stores one head's row of ``head_dim`` numbers (module docstring).

    ``block`` numbers are stored as ``block_units`` elements of ``dtype`` (plain floats: 1
    and 1). ``encode(x)``: float32 (..., head_dim) -> storage (..., units); ``decode(s)`` its
    inverse to float32. ``codec``: what the compiled readers need to know of a row --
    ``("f32",)``, ``("f16",)`` (IEEE half bits), ``("bf16",)`` (the top half of a float32), or
    ``("block", kind, size, d_at, m_at, qh_at, qs_at, c, table)`` for blocks of 32 numbers in
    ``size`` bytes: an fp16 scale ``d`` at byte ``d_at``, an fp16 minimum ``m`` at ``m_at``
    (-1: none), 32 fifth bits at ``qh_at`` (-1: none), and from ``qs_at`` either 32 int8
    codes (``kind`` ``"s8"``: x = d·q) or 16 bytes of nibbles, number i in byte i % 16,
    low nibble for i < 16 (``"u4"``: x = d·(u − c) without ``m``, d·u + m with it; ``"l4"``:
    x = d·table[u]), or ``("fp8", table)``: one byte per number, x = table[byte]. ``put()``
    returns a numba function ``put(src, off, dst, n)`` writing ``encode(src[off:off+n])``
    into the storage row ``dst``. A ``scaled`` type stores ``encode(x / scale)`` and reads
    ``decode(s) · scale`` with a float32 scale per layer and key/value head
    (``KVCache.set_scales``; vLLM's ``k_scale`` / ``v_scale``): its ``put(src, off, dst, n,
    scale)`` divides first."""

    name: str
    dtype: np.dtype
    block: int
    block_units: int
    encode: Callable
    decode: Callable
    codec: tuple
    put: Callable | None = None
    scaled: bool = False

    def units(self, head_dim: int) -> int:
        """Storage elements of one row of ``head_dim`` numbers."""
        return head_dim // self.block * self.block_units

    def row_bytes(self, head_dim: int) -> int:
        return self.units(head_dim) * np.dtype(self.dtype).itemsize


def _f32_put():
    from numba import njit

    @njit(inline="always")
    def put(src, off, dst, n):
        for i in range(n):
            dst[i] = src[off + i]
    return put


F32 = CacheType("f32", np.dtype(np.float32), 1, 1, lambda x: np.asarray(x, np.float32),
                lambda s: np.asarray(s, np.float32), ("f32",), _f32_put)
CACHE_TYPES: dict[str, CacheType] = {"f32": F32}


def register(ct: CacheType) -> None:
    """Make ``ct`` a cache type (by its ``name``); the format modules call this."""
    CACHE_TYPES[ct.name] = ct


def cache_type(name: str, what: str = "cache type") -> CacheType:
    """The registered ``CacheType`` called ``name``, or a ValueError naming the known ones."""
    if name not in CACHE_TYPES:
        raise ValueError(f"{what} {name!r} is not a cache type refquant has (known: {', '.join(CACHE_TYPES)})")
    return CACHE_TYPES[name]


class KVCache:
    """Keys and values of ``n_seq`` sequences (module docstring)."""

    def __init__(self, n_layer: int, n_kv: int, head_dim: int, n_ctx: int, *, n_seq: int = 1,
                 type_k: str = "f32", type_v: str = "f32"):
        tk, tv = cache_type(type_k, "type_k"), cache_type(type_v, "type_v")
        for name, v in (("n_layer", n_layer), ("n_kv", n_kv), ("head_dim", head_dim), ("n_ctx", n_ctx),
                        ("n_seq", n_seq)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for side, t in (("type_k", tk), ("type_v", tv)):
            if head_dim % t.block:
                raise ValueError(f"{side} {t.name!r} stores blocks of {t.block} numbers along head_dim; "
                                 f"head_dim {head_dim} is not a multiple of {t.block}")
        self.n_layer, self.n_kv, self.head_dim, self.n_ctx, self.n_seq = n_layer, n_kv, head_dim, n_ctx, n_seq
        self.type_k, self.type_v, self._tk, self._tv = type_k, type_v, tk, tv
        lead = (n_layer, n_seq, n_kv, n_ctx)
        self.k = np.zeros(lead + (tk.units(head_dim),), tk.dtype)
        self.v = np.zeros(lead + (tv.units(head_dim),), tv.dtype)
        self.k_scale = np.ones((n_layer, n_kv), np.float32)
        self.v_scale = np.ones((n_layer, n_kv), np.float32)
        self.pos = np.zeros(n_seq, np.int64)

    def set_scales(self, k_scale=None, v_scale=None) -> None:
        """The scales of a ``scaled`` type (fp8: stored = fp8(x / scale), read fp8 · scale):
        a number, one per layer (n_layer,) or one per layer and key/value head (n_layer,
        n_kv); positive and finite. Set them before storing rows: rows already stored keep
        the scale they were written with."""
        for side, t, new, arr in (("k_scale", self._tk, k_scale, self.k_scale),
                                  ("v_scale", self._tv, v_scale, self.v_scale)):
            if new is None:
                continue
            a = np.asarray(new, np.float64)
            if a.ndim == 1:
                a = a[:, None]
            if a.ndim > 2 or (a.ndim == 2 and a.shape[0] != self.n_layer) or (a.ndim == 2 and a.shape[1] not in (1, self.n_kv)):
                raise ValueError(f"{side} must be a number, ({self.n_layer},) or ({self.n_layer}, {self.n_kv}); "
                                 f"got shape {np.shape(new)}")
            if not (np.isfinite(a).all() and (a > 0).all()):
                raise ValueError(f"{side} must be positive and finite")
            if not t.scaled and (a != 1).any():
                raise ValueError(f"{side}: {t.name!r} rows have no scale (only fp8_e4m3 and fp8_e5m2 do)")
            arr[...] = np.broadcast_to(a, arr.shape).astype(np.float32)

    def key(self) -> tuple:
        """What a compiled reader of this cache depends on: the storage types."""
        return ("kv", self.type_k, self.type_v)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def bytes_per_position(self) -> int:
        """Bytes of keys and values one position of one sequence holds (every layer and head)."""
        return self.n_layer * self.n_kv * (self._tk.row_bytes(self.head_dim) + self._tv.row_bytes(self.head_dim))

    def copy(self) -> "KVCache":
        """An independent cache holding the same rows and positions (to branch a sequence)."""
        c = KVCache(self.n_layer, self.n_kv, self.head_dim, self.n_ctx, n_seq=self.n_seq, type_k=self.type_k,
                    type_v=self.type_v)
        c.k[...], c.v[...], c.pos[...] = self.k, self.v, self.pos
        c.k_scale[...], c.v_scale[...] = self.k_scale, self.v_scale
        return c

    def reset(self, seq: int | None = None) -> None:
        """Forget every position of ``seq`` (of every sequence when None); rows are overwritten."""
        if seq is None:
            self.pos[:] = 0
        else:
            self.pos[seq] = 0

    def store(self, seq: int, layer: int, pos: int, k_rows: np.ndarray, v_rows: np.ndarray) -> None:
        """Keys and values (T, n_kv, head_dim) of T tokens at positions pos..pos+T-1, each
        row encoded as its type's ``encode`` does."""
        T = k_rows.shape[0]
        if not 0 <= pos <= pos + T <= self.n_ctx:
            raise ValueError(f"positions {pos}..{pos + T - 1} are outside this cache's {self.n_ctx}")
        for arr, t, rows, scale in ((self.k, self._tk, k_rows, self.k_scale), (self.v, self._tv, v_rows, self.v_scale)):
            x = np.asarray(rows, np.float32).transpose(1, 0, 2)
            if t.scaled:
                x = x / scale[layer][:, None, None]
            arr[layer, seq, :, pos:pos + T] = t.encode(x)

    def _read(self, arr, t, scale, seq, layer, upto):
        x = t.decode(arr[layer, seq, :, :upto])
        if t.scaled:
            x = x * scale[layer][:, None, None]
        return x.transpose(1, 0, 2)

    def keys(self, seq: int, layer: int, upto: int) -> np.ndarray:
        """Keys of positions 0..upto-1 as float32 (upto, n_kv, head_dim): the stored rows decoded."""
        return self._read(self.k, self._tk, self.k_scale, seq, layer, upto)

    def values(self, seq: int, layer: int, upto: int) -> np.ndarray:
        """Values of positions 0..upto-1 as float32 (upto, n_kv, head_dim): the stored rows decoded."""
        return self._read(self.v, self._tv, self.v_scale, seq, layer, upto)


@functools.lru_cache(maxsize=None)
def _row_index():
    """``(start, hint)`` inside numba code: ``start(a, l, s, h, j)`` the flat element number
    of row ``a[l, s, h, j]`` of a 5-D storage array; ``hint(a, row, ahead, units)`` hints
    the row of ``units`` bytes ``ahead`` bytes past element ``row`` into L1 (its first and
    last byte: a block row may straddle two lines)."""
    from numba import njit

    from refquant.kernels import simd as V

    @njit(inline="always")
    def start(a, l, s, h, j):
        return (((l * a.shape[1] + s) * a.shape[2] + h) * a.shape[3] + j) * a.shape[4]

    @njit(inline="always")
    def hint(a, row, ahead, units):
        V.prefetch(a, row + ahead)
        V.prefetch(a, row + ahead + units - 1)
    return start, hint


def _unpacker(codec: tuple):
    """``unpack(a, l, s, h, j, dst, o, stride, hd)``: dst[o + i·stride] = x_i for the numbers
    x_i of row ``a[l, s, h, j]`` of a 5-D storage array (``codec``: ``CacheType``) as
    ``decode`` gives them, read in place (a view would cost two atomic reference counts per
    row), one number at a time: the tiles of a prefill's attention and the rows of types
    the vector decoders of ``_rows`` do not know."""
    from numba import njit

    from refquant.kernels.matvec import F16_TABLE
    from refquant.kernels.simd import f32_from_bits

    kind = codec[0]
    if kind != "block":
        if kind == "f32":
            @njit(inline="always")
            def val(a, l, s, h, j, i):
                return a[l, s, h, j, i]
        elif kind == "f16":
            @njit(inline="always")
            def val(a, l, s, h, j, i):
                return F16_TABLE[a[l, s, h, j, i]]
        elif kind == "bf16":
            @njit(inline="always")
            def val(a, l, s, h, j, i):
                return f32_from_bits(np.int32(np.int64(a[l, s, h, j, i]) << 16))
        elif kind == "fp8":
            TABLE8 = np.array(codec[1], np.float32)

            @njit(inline="always")
            def val(a, l, s, h, j, i):
                return TABLE8[a[l, s, h, j, i]]
        else:
            raise ValueError(f"no compiled reader for a row codec {codec!r}")

        @njit(inline="always")
        def unpack(a, l, s, h, j, dst, o, stride, hd):
            for i in range(hd):
                dst[o + i * stride] = val(a, l, s, h, j, i)
        return unpack

    _, code_kind, size, d_at, m_at, qh_at, qs_at, c, table = codec
    S8, LUT, HAS_M, HAS_QH = code_kind == "s8", code_kind == "l4", m_at >= 0, qh_at >= 0
    if code_kind not in ("s8", "u4", "l4"):
        raise ValueError(f"no compiled reader for a row codec {codec!r}")
    TABLE = np.array(table if LUT else (0,) * 16, np.float32)
    C = np.int32(c)

    @njit(inline="always")
    def f16(a, l, s, h, j, at):
        return F16_TABLE[np.int64(a[l, s, h, j, at]) | (np.int64(a[l, s, h, j, at + 1]) << 8)]

    @njit(inline="always")
    def scales(a, l, s, h, j, base):
        """The block at byte ``base``: (d, m, its 32 fifth bits)."""
        d = f16(a, l, s, h, j, base + d_at)
        m = f16(a, l, s, h, j, base + m_at) if HAS_M else np.float32(0)
        qh = np.int64(0)
        if HAS_QH:
            for t in range(4):
                qh |= np.int64(a[l, s, h, j, base + qh_at + t]) << (8 * t)
        return d, m, qh

    @njit(inline="always")
    def pair(a, l, s, h, j, base, i, d, m, qh):
        """Numbers i and i + 16 of the block at ``base`` (i < 16), as the dequantizer gives them."""
        if S8:
            lo = np.int32(a[l, s, h, j, base + qs_at + i])
            hi = np.int32(a[l, s, h, j, base + qs_at + 16 + i])
            return np.float32((lo ^ 128) - 128) * d, np.float32((hi ^ 128) - 128) * d
        byte = np.int32(a[l, s, h, j, base + qs_at + i])
        ulo, uhi = byte & 15, byte >> 4
        if HAS_QH:
            ulo |= np.int32((qh >> i) & 1) << 4
            uhi |= np.int32((qh >> (i + 16)) & 1) << 4
        if LUT:
            return d * TABLE[ulo], d * TABLE[uhi]
        if HAS_M:
            return np.float32(ulo) * d + m, np.float32(uhi) * d + m
        return np.float32(ulo - C) * d, np.float32(uhi - C) * d

    @njit(inline="always")
    def unpack(a, l, s, h, j, dst, o, stride, hd):
        for b in range(hd // 32):
            d, m, qh = scales(a, l, s, h, j, b * size)
            for i in range(16):
                x0, x1 = pair(a, l, s, h, j, b * size, i, d, m, qh)
                dst[o + (32 * b + i) * stride] = x0
                dst[o + (32 * b + 16 + i) * stride] = x1
    return unpack


def _rows(codec: tuple, unpack):
    """``rows(a, l, s, h, j0, n, dst, hd) -> (src, o)``: rows ``j0 <= j < j0 + n`` of
    ``a[l, s, h]`` as ``decode`` gives them, row r at ``src[o + r·hd:]`` (a flat float32
    array): the keys or values a chunk of attention reads, decoded once for every query
    head of their group. f32 rows are read where they are (``src`` the cache itself); the
    others are decoded into ``dst`` (``o = 0``): f16 eight lanes at a time (each line
    hinted into L1 just before it is read: on 128-byte rows that ran up to 1.4× faster
    than the hardware's prefetcher alone, Intel Xeon, 1 thread, depth 8000), the rest, and
    a ``hd`` not a multiple of 8, by ``unpack``. (q8_0, q4_0 and q4_1 rows are never
    decoded to floats: ``_scorer``, ``_weigher``.)"""
    from numba import njit

    from refquant.kernels import simd as V

    start, _ = _row_index()

    kind = codec[0]

    @njit(inline="always")
    def scalar_rows(a, l, s, h, j0, n, dst, hd):
        for r in range(n):
            unpack(a, l, s, h, j0 + r, dst, r * hd, 1, hd)
        return dst, 0
    if kind == "f32":
        @njit(inline="always")
        def rows(a, l, s, h, j0, n, dst, hd):
            return a.reshape(-1), start(a, l, s, h, j0)
        return rows
    if kind != "f16":
        return scalar_rows

    @njit(inline="always")
    def rows(a, l, s, h, j0, n, dst, hd):
        if hd % 8:
            return scalar_rows(a, l, s, h, j0, n, dst, hd)
        o = start(a, l, s, h, j0)
        for r in range(n):
            for c in range(0, hd, 32):
                V.prefetch(a, o + r * hd + c)
            for c in range(0, hd, 8):
                V.store_f32x8(dst, r * hd + c, V.vec8(a, o + r * hd + c))
        return dst, 0
    return rows


@functools.lru_cache(maxsize=None)
def _float_kernels():
    """``(dots, weigh)`` over decoded rows (``_rows``), for every cache type."""
    from numba import njit

    from refquant.kernels import simd as V

    @njit(inline="always")
    def dots(buf, bo, m, q, qo, hd, scale, s, so):
        """``s[so + r] = scale · q[qo:qo+hd] · buf[bo + r·hd:][:hd]`` for rows ``r < m``: eight
        rows at a time, eight accumulators summed across lanes together (``hsum8_f32x8``), the
        last rows one at a time."""
        r0 = 0
        if hd % 8 == 0:
            while r0 + 8 <= m:
                b = bo + r0 * hd
                a0, a1, a2, a3 = V.zeros_f32(), V.zeros_f32(), V.zeros_f32(), V.zeros_f32()
                a4, a5, a6, a7 = V.zeros_f32(), V.zeros_f32(), V.zeros_f32(), V.zeros_f32()
                for i in range(0, hd, 8):
                    x = V.load_f32x8(q, qo + i)
                    a0 = V.fmadd_f32x8(a0, V.load_f32x8(buf, b + i), x)
                    a1 = V.fmadd_f32x8(a1, V.load_f32x8(buf, b + hd + i), x)
                    a2 = V.fmadd_f32x8(a2, V.load_f32x8(buf, b + 2 * hd + i), x)
                    a3 = V.fmadd_f32x8(a3, V.load_f32x8(buf, b + 3 * hd + i), x)
                    a4 = V.fmadd_f32x8(a4, V.load_f32x8(buf, b + 4 * hd + i), x)
                    a5 = V.fmadd_f32x8(a5, V.load_f32x8(buf, b + 5 * hd + i), x)
                    a6 = V.fmadd_f32x8(a6, V.load_f32x8(buf, b + 6 * hd + i), x)
                    a7 = V.fmadd_f32x8(a7, V.load_f32x8(buf, b + 7 * hd + i), x)
                V.store_f32x8(s, so + r0, V.mul_f32x8(V.hsum8_f32x8(a0, a1, a2, a3, a4, a5, a6, a7), scale))
                r0 += 8
        for r in range(r0, m):
            a = np.float32(0)
            for i in range(hd):
                a += q[qo + i] * buf[bo + r * hd + i]
            s[so + r] = a * scale

    @njit(inline="always")
    def weigh(buf, bo, m, s, so, acc, ao, hd):
        """``acc[ao + i] += Σ_{r < m} s[so + r] · buf[bo + r·hd + i]`` for ``i < hd``: 32 columns
        at a time in four accumulators, the rest eight and one at a time."""
        c = 0
        while c + 32 <= hd:
            b0, b1, b2, b3 = V.load4(acc, ao + c, np.float32(1))
            for r in range(m):
                b0, b1, b2, b3 = V.fmadd4(b0, b1, b2, b3, V.load_f32x8(buf, bo + r * hd + c), V.load_f32x8(buf, bo + r * hd + c + 8),
                                          V.load_f32x8(buf, bo + r * hd + c + 16), V.load_f32x8(buf, bo + r * hd + c + 24),
                                          s[so + r])
            V.store4(acc, ao + c, b0, b1, b2, b3)
            c += 32
        while c + 8 <= hd:
            b0 = V.load_f32x8(acc, ao + c)
            for r in range(m):
                b0 = V.fmadd_f32x8(b0, V.load_f32x8(buf, bo + r * hd + c), s[so + r])
            V.store_f32x8(acc, ao + c, b0)
            c += 8
        for i in range(c, hd):
            a = acc[ao + i]
            for r in range(m):
                a += s[so + r] * buf[bo + r * hd + i]
            acc[ao + i] = a
    return dots, weigh


def _scorer(codec: tuple, rows):
    """``k_scores(k, l, seq, h, j0, n, q, qo, G, hd, scale, s, stride)``: ``s[g·stride + r] =
    scale · q[qo + g·hd:][:hd] · K[l, seq, h, j0 + r]`` for the ``G`` query heads of key head
    ``h`` and ``r < n``, the keys read ``CHUNK`` rows at a time, each chunk decoded once
    for the ``G`` heads.

    Blocks of int8 codes or of nibbles without fifth bits or a table (q8_0, q4_0, q4_1)
    are not decoded to floats: their codes are widened to int16 and multiplied with the
    query rounded to int16 (one scale per head, ``q ≈ qd·qi``, |qi| <= 32767: a relative
    error of at most 2^-16 of the head's largest number, where Q8_0 activations, llama.cpp's
    choice for its quantized caches, have 2^-8) in ``vpmaddwd`` / ``vpdpwssd``:
    ``q·x = qd · Σ_b (d_b · Σ_{i∈b} u_i qi_i + m_b · Σ_{i∈b} qi_i)``, the offset ``−c·Σ qi``
    of q4_0's ``u − c`` in the integer sum's initial lanes. Three heads at a time, each
    row's codes widened once for them and their lanes summed eight rows at a time. On
    SmolLM2's keys at depth 8000 (1 thread, interleaved with decoding to floats): q8_0 8.7
    -> 6.3 ns, q4_0 9.0 -> 6.5 ns per position and key head."""
    from numba import njit

    from refquant.kernels import simd as V

    start, hint = _row_index()

    dots, _ = _float_kernels()

    @njit(inline="always")
    def float_scores(k, l, seq, h, j0, n, q, qo, G, hd, scale, s, stride):
        buf = np.empty(CHUNK * hd, np.float32)
        for c0 in range(0, n, CHUNK):
            m = min(CHUNK, n - c0)
            src, so = rows(k, l, seq, h, j0 + c0, m, buf, hd)
            for g in range(G):
                dots(src, so, m, q, qo + g * hd, hd, scale, s, g * stride + c0)
    if not (codec[0] == "block" and codec[1] in ("s8", "u4") and codec[5] < 0):
        return float_scores
    _, code_kind, size, d_at, m_at, qh_at, qs_at, c, table = codec
    S8, HAS_M = code_kind == "s8", m_at >= 0
    OFFSET = not HAS_M and c != 0
    NEG_C16 = np.full(16, -c, np.int16)
    QMAX = np.float32(32767)

    @njit(inline="always")
    def k_scores(k, l, seq, h, j0, n, q, qo, G, hd, scale, s, stride):
        nb = hd // 32
        qi = np.empty(G * hd, np.int16)
        qf = np.empty(G, np.float32)
        qs = np.empty(G * nb, np.float32)
        qc = np.zeros(G * nb * 8, np.int32)
        for g in range(G):
            amax = np.float32(0)
            finite = True
            for i in range(hd):
                a = abs(q[qo + g * hd + i])
                finite = finite and a < np.inf     # NaN too
                amax = max(amax, a)
            if not finite:                  # scores NaN, as the float product gives them
                amax = np.float32(np.nan)
            inv = QMAX / amax if amax > 0 else np.float32(0)
            qf[g] = amax / QMAX * scale
            for b in range(nb):
                t = 0
                for i in range(32 * b, 32 * b + 32):
                    v = np.int16(round(q[qo + g * hd + i] * inv))
                    qi[g * hd + i] = v
                    t += v
                qs[g * nb + b] = np.float32(t) * np.float32(0.125)    # eight lanes sum to Σ qi
                if OFFSET:      # int32 lanes that sum to −c·Σ qi: the offset of u − c, summed exactly
                    V.store_i32x8(qc, (g * nb + b) * 8, V.madd_i16x16(V.madd_i16x16(
                        V.zeros_i32(), V.load_i16x16(NEG_C16, 0), V.load_i16x16(qi, g * hd + 32 * b)),
                        V.load_i16x16(NEG_C16, 0), V.load_i16x16(qi, g * hd + 32 * b + 16)))
        f = np.empty(3 * 64, np.float32)      # eight rows' lanes per head, summed eight rows at a time
        o, units = start(k, l, seq, h, j0), k.shape[4]
        ahead = AHEAD // units * units
        for g0 in range(0, G, 3):       # three query heads at a time (the last of them repeated)
            ga, gb, gc = g0, min(g0 + 1, G - 1), min(g0 + 2, G - 1)
            for r0 in range(0, n, 8):
                m = min(8, n - r0)
                for t in range(m):
                    row = o + (r0 + t) * units
                    hint(k, row, ahead, units)
                    fa, fb, fc = V.zeros_f32(), V.zeros_f32(), V.zeros_f32()
                    for b in range(nb):
                        base = row + b * size
                        d = V.splat_f32x8(V.half_at(k, base + d_at))
                        if S8:
                            k0, k1 = V.widen16(k, base + qs_at, 0), V.widen16(k, base + qs_at + 16, 0)
                        else:
                            k0, k1 = V.widen16(k, base + qs_at, 1), V.widen16(k, base + qs_at, 2)
                        qa, qb, qc_ = ga * hd + 32 * b, gb * hd + 32 * b, gc * hd + 32 * b
                        if OFFSET:
                            ia0, ib0 = V.load_i32x8(qc, (ga * nb + b) * 8), V.load_i32x8(qc, (gb * nb + b) * 8)
                            ic0 = V.load_i32x8(qc, (gc * nb + b) * 8)
                        else:
                            ia0, ib0, ic0 = V.zeros_i32(), V.zeros_i32(), V.zeros_i32()
                        ia = V.madd_i16x16(V.madd_i16x16(ia0, k0, V.load_i16x16(qi, qa)), k1, V.load_i16x16(qi, qa + 16))
                        ib = V.madd_i16x16(V.madd_i16x16(ib0, k0, V.load_i16x16(qi, qb)), k1, V.load_i16x16(qi, qb + 16))
                        ic = V.madd_i16x16(V.madd_i16x16(ic0, k0, V.load_i16x16(qi, qc_)), k1, V.load_i16x16(qi, qc_ + 16))
                        fa, fb, fc = V.fma_vec(fa, ia, d), V.fma_vec(fb, ib, d), V.fma_vec(fc, ic, d)
                        if HAS_M:
                            mb = V.splat_f32x8(V.half_at(k, base + m_at))
                            fa = V.fmadd_f32x8(fa, mb, qs[ga * nb + b])
                            fb = V.fmadd_f32x8(fb, mb, qs[gb * nb + b])
                            fc = V.fmadd_f32x8(fc, mb, qs[gc * nb + b])
                    V.store_f32x8(f, 8 * t, fa)
                    V.store_f32x8(f, 64 + 8 * t, fb)
                    V.store_f32x8(f, 128 + 8 * t, fc)
                for i in range(3):
                    g = min(g0 + i, G - 1)
                    if m == 8:
                        V.store_f32x8(s, g * stride + r0, V.mul_f32x8(V.hsum8_f32x8(
                            V.load_f32x8(f, 64 * i), V.load_f32x8(f, 64 * i + 8), V.load_f32x8(f, 64 * i + 16),
                            V.load_f32x8(f, 64 * i + 24), V.load_f32x8(f, 64 * i + 32), V.load_f32x8(f, 64 * i + 40),
                            V.load_f32x8(f, 64 * i + 48), V.load_f32x8(f, 64 * i + 56)), qf[g]))
                    else:
                        for t in range(m):
                            s[g * stride + r0 + t] = V.hsum_f32x8(V.load_f32x8(f, 64 * i + 8 * t)) * qf[g]
    return k_scores


def _weigher(codec: tuple, rows):
    """``v_sums(v, l, seq, h, j0, n, p, stride, G, out, hd)``: ``out[g·hd + i] += Σ_{r < n}
    p[g·stride + r] · V[l, seq, h, j0 + r, i]`` for the ``G`` query heads of value head
    ``h``, each row decoded once for all of them: rows of q8_0, q4_0 and q4_1 blocks in
    registers, three heads at a time (block by block: twelve accumulators, the codes
    converted to floats and each head's weight times the block's ``d``; a minimum ``m``
    adds ``Σ p·m`` to every number of its block, summed apart), other types ``CHUNK``
    rows at a time through ``rows``."""
    from numba import njit

    from refquant.kernels import simd as V

    start, hint = _row_index()

    _, weigh = _float_kernels()

    @njit(inline="always")
    def float_sums(v, l, seq, h, j0, n, p, stride, G, out, hd):
        buf = np.empty(CHUNK * hd, np.float32)
        for c0 in range(0, n, CHUNK):
            m = min(CHUNK, n - c0)
            src, so = rows(v, l, seq, h, j0 + c0, m, buf, hd)
            for g in range(G):
                weigh(src, so, m, p, g * stride + c0, out, g * hd, hd)
    if not (codec[0] == "block" and codec[1] in ("s8", "u4") and codec[5] < 0):
        return float_sums
    _, code_kind, size, d_at, m_at, qh_at, qs_at, c, table = codec
    S8, HAS_M = code_kind == "s8", m_at >= 0
    NEG_C = np.float32(-c)

    @njit(inline="always")
    def v_sums(v, l, seq, h, j0, n, p, stride, G, out, hd):
        o, units = start(v, l, seq, h, j0), v.shape[4]
        ahead = AHEAD // units * units
        for g0 in range(0, G, 3):       # three query heads at a time (the last of them repeated)
            ga, gb, gc = g0, min(g0 + 1, G - 1), min(g0 + 2, G - 1)
            for c0 in range(0, n, CHUNK):   # the chunk's rows read again from L1 for each block
                m = min(CHUNK, n - c0)
                pa, pb, pc = ga * stride + c0, gb * stride + c0, gc * stride + c0
                for b in range(hd // 32):
                    oa, ob, oc = ga * hd + 32 * b, gb * hd + 32 * b, gc * hd + 32 * b
                    one = np.float32(1)
                    a0, a1, a2, a3 = V.load4(out, oa, one)
                    b0, b1, b2, b3 = V.load4(out, ob, one)
                    c0_, c1, c2, c3 = V.load4(out, oc, one)
                    ma, mb, mc = np.float32(0), np.float32(0), np.float32(0)
                    for r in range(m):
                        row = o + (c0 + r) * units
                        base = row + b * size
                        if b == 0:
                            hint(v, row, ahead, units)
                        d = V.half_at(v, base + d_at)
                        if S8:
                            x0, x1 = V.bytes8(v, base + qs_at, 0), V.bytes8(v, base + qs_at + 8, 0)
                            x2, x3 = V.bytes8(v, base + qs_at + 16, 0), V.bytes8(v, base + qs_at + 24, 0)
                        else:
                            x0, x1 = V.bytes8(v, base + qs_at, 1), V.bytes8(v, base + qs_at + 8, 1)
                            x2, x3 = V.bytes8(v, base + qs_at, 2), V.bytes8(v, base + qs_at + 8, 2)
                        wa, wb, wc = p[pa + r] * d, p[pb + r] * d, p[pc + r] * d
                        if HAS_M:
                            mm = V.half_at(v, base + m_at)
                            ma += p[pa + r] * mm
                            mb += p[pb + r] * mm
                            mc += p[pc + r] * mm
                        elif not S8:            # Σ p·d, times −c below
                            ma += wa
                            mb += wb
                            mc += wc
                        a0, a1, a2, a3 = V.fmadd4(a0, a1, a2, a3, x0, x1, x2, x3, wa)
                        b0, b1, b2, b3 = V.fmadd4(b0, b1, b2, b3, x0, x1, x2, x3, wb)
                        c0_, c1, c2, c3 = V.fmadd4(c0_, c1, c2, c3, x0, x1, x2, x3, wc)
                    if not S8:
                        if not HAS_M:
                            ma, mb, mc = ma * NEG_C, mb * NEG_C, mc * NEG_C
                        a0, a1, a2, a3 = V.add4(a0, a1, a2, a3, ma)
                        b0, b1, b2, b3 = V.add4(b0, b1, b2, b3, mb)
                        c0_, c1, c2, c3 = V.add4(c0_, c1, c2, c3, mc)
                    if g0 + 2 < G:          # stored last to first: a repeated head keeps its own sums
                        V.store4(out, oc, c0_, c1, c2, c3)
                    if g0 + 1 < G:
                        V.store4(out, ob, b0, b1, b2, b3)
                    V.store4(out, oa, a0, a1, a2, a3)
    return v_sums


@functools.lru_cache(maxsize=None)
def ops(type_k: str = "f32", type_v: str = "f32") -> "Ops":
    """The ``Ops`` of caches of these types, numba functions inlined into their callers
    (module docstring)."""
    from numba import njit

    from refquant.kernels.simd import prefetch_l2

    tk, tv = cache_type(type_k, "type_k"), cache_type(type_v, "type_v")
    if tk.put is None or tv.put is None:
        raise ValueError(f"no compiled cache operations for ({type_k}, {type_v})")
    put_k, put_v = tk.put(), tv.put()
    k_unpack, v_unpack = _unpacker(tk.codec), _unpacker(tv.codec)
    k_scores_of = _scorer(tk.codec, _rows(tk.codec, k_unpack))
    v_sums_of = _weigher(tv.codec, _rows(tv.codec, v_unpack))
    K_LINE, V_LINE = 64 // tk.dtype.itemsize, 64 // tv.dtype.itemsize    # storage elements per cache line

    K_SCALED, V_SCALED = tk.scaled, tv.scaled

    @njit(inline="always")
    def store(k, v, ks, vs, l, seq, pos, row, k_off, v_off, h0, h1, hd):
        for h in range(h0, h1):
            if K_SCALED:
                put_k(row, k_off + h * hd, k[l, seq, h, pos], hd, ks[l, h])
            else:
                put_k(row, k_off + h * hd, k[l, seq, h, pos], hd)
            if V_SCALED:
                put_v(row, v_off + h * hd, v[l, seq, h, pos], hd, vs[l, h])
            else:
                put_v(row, v_off + h * hd, v[l, seq, h, pos], hd)

    @njit(inline="always")
    def k_scores(k, l, seq, h, j0, n, q, qo, G, hd, scale, s, stride):
        k_scores_of(k, l, seq, h, j0, n, q, qo, G, hd, scale, s, stride)

    @njit(inline="always")
    def v_sums(v, l, seq, h, j0, n, p, stride, G, out, hd):
        v_sums_of(v, l, seq, h, j0, n, p, stride, G, out, hd)

    @njit(inline="always")
    def fetch(k, v, l, seq, h0, h1, j0, j1, parts):
        budget = FETCH_BYTES // (2 * max(h1 - h0, 1) * parts)
        k_lines = min((j1 - j0) * k.shape[-1] // K_LINE, budget // 64)
        v_lines = min((j1 - j0) * v.shape[-1] // V_LINE, budget // 64)
        for h in range(h0, h1):
            kr, vr = k[l, seq, h].reshape(-1), v[l, seq, h].reshape(-1)
            for i in range(k_lines):
                prefetch_l2(kr, j0 * k.shape[-1] + K_LINE * i)
            for i in range(v_lines):
                prefetch_l2(vr, j0 * v.shape[-1] + V_LINE * i)

    @njit(inline="always")
    def k_tile(k, l, seq, h, j0, n, kt):
        ktf = kt.reshape(-1)
        for c in range(n):
            k_unpack(k, l, seq, h, j0 + c, ktf, c, TILE, kt.shape[0])
        for i in range(kt.shape[0]):
            for c in range(n, TILE):
                kt[i, c] = 0

    @njit(inline="always")
    def v_tile(v, l, seq, h, j0, n, vt):
        vtf = vt.reshape(-1)
        for c in range(n):
            v_unpack(v, l, seq, h, j0 + c, vtf, c * vt.shape[1], 1, vt.shape[1])
        for c in range(n, TILE):
            for i in range(vt.shape[1]):
                vt[c, i] = 0

    return Ops(store, fetch, k_tile, v_tile, k_scores, v_sums)


class Ops(NamedTuple):
    """A cache type's operations inside numba code (module docstring)."""

    store: object
    fetch: object
    k_tile: object
    v_tile: object
    k_scores: object
    v_sums: object
