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
``store(k, v, l, seq, pos, row, k_off, v_off, h0, h1, hd)`` writes a token's key and value
heads ``h0 <= h < h1`` from ``row[k_off + h·hd:]`` / ``row[v_off + h·hd:]`` (the members of
a team store their own heads); ``k_dot(k, l, seq, h, j, q, qo, hd)`` is
``q[qo:qo+hd] · K[l, seq, h, j]`` and ``v_acc(v, l, seq, h, j, p, out, qo, hd)`` adds
``p · V[l, seq, h, j]`` to ``out[qo:qo+hd]`` (``v_accs(v, l, seq, h, j, ps, pi, stride, G,
out, hd)``: for ``G`` heads, ``ps[pi + g·stride] · V`` to ``out[g·hd:]``, the row decoded
once): attention touches the cache only through these;
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
into one rounding); ``k_dot`` and ``v_acc`` sum the same values in another order
(``d · Σ q·u + m · Σ q`` per block on the vector path).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

TILE = 16                   # keys per tile of ``k_tile`` / ``v_tile``
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
    x = d·table[u]). ``put()`` returns a numba function ``put(src, off, dst, n)`` writing
    ``encode(src[off:off+n])`` into the storage row ``dst``."""

    name: str
    dtype: np.dtype
    block: int
    block_units: int
    encode: Callable
    decode: Callable
    codec: tuple
    put: Callable | None = None

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
        self.pos = np.zeros(n_seq, np.int64)

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
        for arr, t, rows in ((self.k, self._tk, k_rows), (self.v, self._tv, v_rows)):
            arr[layer, seq, :, pos:pos + T] = t.encode(np.asarray(rows, np.float32).transpose(1, 0, 2))

    def keys(self, seq: int, layer: int, upto: int) -> np.ndarray:
        """Keys of positions 0..upto-1 as float32 (upto, n_kv, head_dim): the stored rows decoded."""
        return self._tk.decode(self.k[layer, seq, :, :upto]).transpose(1, 0, 2)

    def values(self, seq: int, layer: int, upto: int) -> np.ndarray:
        """Values of positions 0..upto-1 as float32 (upto, n_kv, head_dim): the stored rows decoded."""
        return self._tv.decode(self.v[layer, seq, :, :upto]).transpose(1, 0, 2)


def _readers(codec: tuple):
    """``(dot, axpy, axpys, unpack)`` of rows of ``codec`` (``CacheType``) inside numba code, each
    reading row ``a[l, s, h, j]`` of a 5-D storage array in place (a view would cost two
    atomic reference counts per row): ``dot(a, l, s, h, j, q, qo, hd)`` = Σ q[qo+i]·x_i,
    ``axpy(a, l, s, h, j, p, out, qo, hd)``: out[qo+i] += p·x_i, ``unpack(a, l, s, h, j, dst,
    o, stride, hd)``: dst[o + i·stride] = x_i, where x_i is the row's number i as ``decode``
    gives it; ``axpys(a, l, s, h, j, ps, pi, stride, G, out, hd)``: ``axpy`` for ``G`` heads
    at once, out[g·hd + i] += ps[pi + g·stride]·x_i (the vector path decodes the row once
    for all of them)."""
    from numba import njit

    from refquant.kernels.matvec import F16_TABLE
    from refquant.kernels.simd import f32_from_bits

    kind = codec[0]
    if kind in ("f32", "f16") or (kind == "block" and codec[1] in ("s8", "u4") and codec[5] < 0):
        vector = _vector_readers(codec)
    else:
        vector = None
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
        else:
            raise ValueError(f"no compiled reader for a row codec {codec!r}")

        @njit(inline="always")
        def dot(a, l, s, h, j, q, qo, hd):
            acc = np.float32(0)
            for i in range(hd):
                acc += q[qo + i] * val(a, l, s, h, j, i)
            return acc

        @njit(inline="always")
        def axpy(a, l, s, h, j, p, out, qo, hd):
            for i in range(hd):
                out[qo + i] += p * val(a, l, s, h, j, i)

        @njit(inline="always")
        def unpack(a, l, s, h, j, dst, o, stride, hd):
            for i in range(hd):
                dst[o + i * stride] = val(a, l, s, h, j, i)
        if vector is None:
            return dot, axpy, _each_head(axpy), unpack
        (vdot, vaxpy, vaxpys), sdot, saxpy, saxpys = vector, dot, axpy, _each_head(axpy)

        @njit(inline="always")
        def fast_dot(a, l, s, h, j, q, qo, hd):
            if hd % 8 == 0:
                return vdot(a, l, s, h, j, q, qo, hd)
            return sdot(a, l, s, h, j, q, qo, hd)

        @njit(inline="always")
        def fast_axpy(a, l, s, h, j, p, out, qo, hd):
            if hd % 8 == 0:
                vaxpy(a, l, s, h, j, p, out, qo, hd)
            else:
                saxpy(a, l, s, h, j, p, out, qo, hd)

        @njit(inline="always")
        def fast_axpys(a, l, s, h, j, ps, pi, stride, G, out, hd):
            if hd % 8 == 0:
                vaxpys(a, l, s, h, j, ps, pi, stride, G, out, hd)
            else:
                saxpys(a, l, s, h, j, ps, pi, stride, G, out, hd)
        return fast_dot, fast_axpy, fast_axpys, unpack

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
    def dot(a, l, s, h, j, q, qo, hd):
        acc = np.float32(0)
        for b in range(hd // 32):
            d, m, qh = scales(a, l, s, h, j, b * size)
            o = qo + 32 * b
            for i in range(16):
                x0, x1 = pair(a, l, s, h, j, b * size, i, d, m, qh)
                acc += q[o + i] * x0 + q[o + 16 + i] * x1
        return acc

    @njit(inline="always")
    def axpy(a, l, s, h, j, p, out, qo, hd):
        for b in range(hd // 32):
            d, m, qh = scales(a, l, s, h, j, b * size)
            o = qo + 32 * b
            for i in range(16):
                x0, x1 = pair(a, l, s, h, j, b * size, i, d, m, qh)
                out[o + i] += p * x0
                out[o + 16 + i] += p * x1

    @njit(inline="always")
    def unpack(a, l, s, h, j, dst, o, stride, hd):
        for b in range(hd // 32):
            d, m, qh = scales(a, l, s, h, j, b * size)
            for i in range(16):
                x0, x1 = pair(a, l, s, h, j, b * size, i, d, m, qh)
                dst[o + (32 * b + i) * stride] = x0
                dst[o + (32 * b + 16 + i) * stride] = x1
    return (dot, axpy, _each_head(axpy), unpack) if vector is None else (*vector, unpack)


def _each_head(axpy):
    """``axpys(a, l, s, h, j, ps, pi, stride, G, out, hd)``: ``axpy`` of row ``a[l, s, h, j]``
    for each of ``G`` heads, weight ``ps[pi + g·stride]`` into ``out[g·hd:]``."""
    from numba import njit

    @njit(inline="always")
    def axpys(a, l, s, h, j, ps, pi, stride, G, out, hd):
        for g in range(G):
            axpy(a, l, s, h, j, ps[pi + g * stride], out, g * hd, hd)
    return axpys


def _vector_readers(codec: tuple):
    """``(dot, axpy)`` of ``_readers`` in eight-lane float vectors, for f32 and f16 rows (of
    a ``head_dim`` that is a multiple of 8) and for blocks of int8 codes or of nibbles
    without fifth bits or a table (q8_0, q4_0, q4_1). Per block, ``dot`` sums ``q·u`` (and
    ``Σq``) lane-wise and adds ``d·(q·u) + m·Σq`` (``m = −c·d`` for a constant offset) to one
    accumulator, summed across lanes once per row; ``axpy`` adds ``(p·d)·u + p·m``."""
    from numba import njit

    from refquant.kernels import simd as V
    from refquant.kernels.matvec import F16_TABLE

    @njit(inline="always")
    def start(a, l, s, h, j):
        """The flat element number of row ``a[l, s, h, j]``."""
        sh = a.shape
        return (((l * sh[1] + s) * sh[2] + h) * sh[3] + j) * sh[4]

    if codec[0] != "block":
        @njit(inline="always")
        def dot(a, l, s, h, j, q, qo, hd):
            o = start(a, l, s, h, j)
            a0, a1 = V.zeros_f32(), V.zeros_f32()
            for c in range(0, hd - 8, 16):
                a0 = V.fmadd_f32x8(a0, V.vec8(a, o + c), V.load_f32x8(q, qo + c))
                a1 = V.fmadd_f32x8(a1, V.vec8(a, o + c + 8), V.load_f32x8(q, qo + c + 8))
            if hd % 16:
                a0 = V.fmadd_f32x8(a0, V.vec8(a, o + hd - 8), V.load_f32x8(q, qo + hd - 8))
            return V.hsum_f32x8(V.add_f32x8(a0, a1))

        @njit(inline="always")
        def axpy(a, l, s, h, j, p, out, qo, hd):
            o = start(a, l, s, h, j)
            for c in range(0, hd, 8):
                V.store_f32x8(out, qo + c, V.fmadd_f32x8(V.load_f32x8(out, qo + c), V.vec8(a, o + c), p))

        @njit(inline="always")
        def axpys(a, l, s, h, j, ps, pi, stride, G, out, hd):
            o = start(a, l, s, h, j)
            for c in range(0, hd, 8):
                x = V.vec8(a, o + c)
                for g in range(G):
                    V.store_f32x8(out, g * hd + c, V.fmadd_f32x8(V.load_f32x8(out, g * hd + c), x,
                                                                 ps[pi + g * stride]))
        return dot, axpy, axpys

    _, code_kind, size, d_at, m_at, qh_at, qs_at, c, table = codec
    S8, HAS_M = code_kind == "s8", m_at >= 0
    NEG_C = np.float32(-c)

    @njit(inline="always")
    def scales(a, l, s, h, j, o):
        """(d, m) of the block at byte ``o`` of row ``a[l, s, h, j]``."""
        d = F16_TABLE[np.int64(a[l, s, h, j, o + d_at]) | (np.int64(a[l, s, h, j, o + d_at + 1]) << 8)]
        if HAS_M:
            return d, F16_TABLE[np.int64(a[l, s, h, j, o + m_at]) | (np.int64(a[l, s, h, j, o + m_at + 1]) << 8)]
        return d, d * NEG_C

    @njit(inline="always")
    def dot(a, l, s, h, j, q, qo, hd):
        o = start(a, l, s, h, j)
        acc = V.zeros_f32()
        for b in range(hd // 32):
            base, qb = o + b * size, qo + 32 * b
            d, m = scales(a, l, s, h, j, b * size)
            p, sq = V.zeros_f32(), V.zeros_f32()
            if S8:
                for cc in range(0, 32, 8):
                    p = V.fmadd_f32x8(p, V.bytes8(a, base + qs_at + cc, 0), V.load_f32x8(q, qb + cc))
                acc = V.fmadd_f32x8(acc, p, d)
            else:
                for cc in range(0, 16, 8):
                    ql, qh = V.load_f32x8(q, qb + cc), V.load_f32x8(q, qb + 16 + cc)
                    p = V.fmadd_f32x8(p, V.bytes8(a, base + qs_at + cc, 1), ql)
                    p = V.fmadd_f32x8(p, V.bytes8(a, base + qs_at + cc, 2), qh)
                    sq = V.add_f32x8(sq, V.add_f32x8(ql, qh))
                acc = V.fmadd_f32x8(V.fmadd_f32x8(acc, p, d), sq, m)
        return V.hsum_f32x8(acc)

    @njit(inline="always")
    def axpy(a, l, s, h, j, p, out, qo, hd):
        o = start(a, l, s, h, j)
        for b in range(hd // 32):
            base, ob = o + b * size, qo + 32 * b
            d, m = scales(a, l, s, h, j, b * size)
            pd, pm = p * d, p * m
            if S8:
                for cc in range(0, 32, 8):
                    V.store_f32x8(out, ob + cc, V.fmadd_f32x8(V.load_f32x8(out, ob + cc),
                                                              V.bytes8(a, base + qs_at + cc, 0), pd))
            else:
                for cc in range(0, 16, 8):
                    lo = V.add_f32x8(V.load_f32x8(out, ob + cc), V.splat_f32x8(pm))
                    hi = V.add_f32x8(V.load_f32x8(out, ob + 16 + cc), V.splat_f32x8(pm))
                    V.store_f32x8(out, ob + cc, V.fmadd_f32x8(lo, V.bytes8(a, base + qs_at + cc, 1), pd))
                    V.store_f32x8(out, ob + 16 + cc, V.fmadd_f32x8(hi, V.bytes8(a, base + qs_at + cc, 2), pd))

    @njit(inline="always")
    def add_all(out, at, x, ps, pi, stride, G, hd):
        for g in range(G):
            V.store_f32x8(out, g * hd + at, V.fmadd_f32x8(V.load_f32x8(out, g * hd + at), x, ps[pi + g * stride]))

    @njit(inline="always")
    def axpys(a, l, s, h, j, ps, pi, stride, G, out, hd):
        o = start(a, l, s, h, j)
        for b in range(hd // 32):
            base = o + b * size
            d, m = scales(a, l, s, h, j, b * size)
            if S8:
                for cc in range(0, 32, 8):
                    add_all(out, 32 * b + cc, V.mul_f32x8(V.bytes8(a, base + qs_at + cc, 0), d), ps, pi, stride, G, hd)
            else:
                mv = V.splat_f32x8(m)
                for cc in range(0, 16, 8):
                    add_all(out, 32 * b + cc, V.fmadd_f32x8(mv, V.bytes8(a, base + qs_at + cc, 1), d),
                            ps, pi, stride, G, hd)
                    add_all(out, 32 * b + 16 + cc, V.fmadd_f32x8(mv, V.bytes8(a, base + qs_at + cc, 2), d),
                            ps, pi, stride, G, hd)
    return dot, axpy, axpys


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
    k_dot_row, _, _, k_unpack = _readers(tk.codec)
    _, v_axpy, v_axpys, v_unpack = _readers(tv.codec)
    K_LINE, V_LINE = 64 // tk.dtype.itemsize, 64 // tv.dtype.itemsize    # storage elements per cache line

    @njit(inline="always")
    def store(k, v, l, seq, pos, row, k_off, v_off, h0, h1, hd):
        for h in range(h0, h1):
            put_k(row, k_off + h * hd, k[l, seq, h, pos], hd)
            put_v(row, v_off + h * hd, v[l, seq, h, pos], hd)

    @njit(inline="always")
    def k_dot(k, l, seq, h, j, q, qo, hd):
        return k_dot_row(k, l, seq, h, j, q, qo, hd)

    @njit(inline="always")
    def v_acc(v, l, seq, h, j, p, out, qo, hd):
        v_axpy(v, l, seq, h, j, p, out, qo, hd)

    @njit(inline="always")
    def v_accs(v, l, seq, h, j, ps, pi, stride, G, out, hd):
        v_axpys(v, l, seq, h, j, ps, pi, stride, G, out, hd)

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

    return Ops(store, k_dot, v_acc, fetch, k_tile, v_tile, v_accs)


class Ops(NamedTuple):
    """A cache type's operations inside numba code (module docstring)."""

    store: object
    k_dot: object
    v_acc: object
    fetch: object
    k_tile: object
    v_tile: object
    v_accs: object
