"""The KV cache as an operand: one object that allocates the keys and values, stores a
token's rows, and is read by attention -- the compiled decode step and the NumPy
references hold the same thing.

A cache holds ``n_seq`` sequences of up to ``n_ctx`` positions, for ``n_layer`` layers and
``n_kv`` key/value heads of ``head_dim`` numbers: ``k`` and ``v`` are arrays of shape
(n_layer, n_seq, n_kv, n_ctx, head_dim), layer first so that a run of layers is one
contiguous slice. ``type_k`` / ``type_v`` name the storage (llama.cpp's ``--cache-type-k``,
``--cache-type-v``); only ``"f32"`` exists today, and both are part of ``key()``, which a
compiled step includes in its compile key. ``pos[seq]`` is how many positions sequence
``seq`` holds.

Inside numba code (``ops()``, built on first use so that the NumPy side never loads numba):
``store(k, v, l, seq, pos, row, k_off, v_off, h0, h1, hd)`` writes a token's key and value
heads ``h0 <= h < h1`` from ``row[k_off + h·hd:]`` / ``row[v_off + h·hd:]`` (the members of
a team store their own heads); ``k_dot(k, l, seq, h, j, q, qo, hd)`` is
``q[qo:qo+hd] · K[l, seq, h, j]`` and ``v_acc(v, l, seq, h, j, p, out, qo, hd)`` adds
``p · V[l, seq, h, j]`` to ``out[qo:qo+hd]``: attention touches the cache only through these;
``k_tile(k, l, seq, h, j0, n, kt)`` writes keys ``j0 <= j < j0+n`` of head ``h`` transposed
as float32 into ``kt`` (head_dim, TILE), zeros in its columns from ``n`` on, and
``v_tile(v, l, seq, h, j0, n, vt)`` the values as rows of ``vt`` (TILE, head_dim), zero rows
from ``n`` on: the tiles a prefill's attention reads (``TILE`` keys at a time);
``fetch(k, v, l, seq, h0, h1, upto, parts)`` hints positions ``0..upto-1`` of heads
``h0 <= h < h1`` into L2 (at most ``FETCH_BYTES / parts`` of them, ``parts`` the sequences
a step fetches for: a step issues it before the weight product that
precedes its attention, so that the cache rows, evicted by the weights of every other
layer, are not read from memory one row at a time).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

TYPES = ("f32",)
TILE = 16                   # keys per tile of ``k_tile`` / ``v_tile``
FETCH_BYTES = 1 << 19       # per call: half a Zen 4 core's L2


class KVCache:
    """Keys and values of ``n_seq`` sequences (module docstring)."""

    def __init__(self, n_layer: int, n_kv: int, head_dim: int, n_ctx: int, *, n_seq: int = 1,
                 type_k: str = "f32", type_v: str = "f32"):
        for name, t in (("type_k", type_k), ("type_v", type_v)):
            if t not in TYPES:
                raise ValueError(f"{name} {t!r} is not a cache type refquant has (known: {', '.join(TYPES)})")
        for name, v in (("n_layer", n_layer), ("n_kv", n_kv), ("head_dim", head_dim), ("n_ctx", n_ctx),
                        ("n_seq", n_seq)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.n_layer, self.n_kv, self.head_dim, self.n_ctx, self.n_seq = n_layer, n_kv, head_dim, n_ctx, n_seq
        self.type_k, self.type_v = type_k, type_v
        self.k = np.zeros((n_layer, n_seq, n_kv, n_ctx, head_dim), np.float32)
        self.v = np.zeros_like(self.k)
        self.pos = np.zeros(n_seq, np.int64)

    def key(self) -> tuple:
        """What a compiled reader of this cache depends on: the storage types."""
        return ("kv", self.type_k, self.type_v)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

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
        """Keys and values (T, n_kv, head_dim) of T tokens at positions pos..pos+T-1."""
        T = k_rows.shape[0]
        if not 0 <= pos <= pos + T <= self.n_ctx:
            raise ValueError(f"positions {pos}..{pos + T - 1} are outside this cache's {self.n_ctx}")
        self.k[layer, seq, :, pos:pos + T] = np.asarray(k_rows, np.float32).transpose(1, 0, 2)
        self.v[layer, seq, :, pos:pos + T] = np.asarray(v_rows, np.float32).transpose(1, 0, 2)

    def keys(self, seq: int, layer: int, upto: int) -> np.ndarray:
        """Keys of positions 0..upto-1 as float32 (upto, n_kv, head_dim)."""
        return self.k[layer, seq, :, :upto].transpose(1, 0, 2)

    def values(self, seq: int, layer: int, upto: int) -> np.ndarray:
        """Values of positions 0..upto-1 as float32 (upto, n_kv, head_dim)."""
        return self.v[layer, seq, :, :upto].transpose(1, 0, 2)


@functools.lru_cache(maxsize=None)
def ops(type_k: str = "f32", type_v: str = "f32") -> "Ops":
    """The ``Ops`` of caches of these types, numba functions inlined into their callers
    (module docstring)."""
    from numba import njit

    from refquant.kernels.simd import prefetch_l2

    if (type_k, type_v) != ("f32", "f32"):
        raise ValueError(f"no compiled cache operations for ({type_k}, {type_v})")

    @njit(inline="always")
    def store(k, v, l, seq, pos, row, k_off, v_off, h0, h1, hd):
        for h in range(h0, h1):
            for i in range(hd):
                k[l, seq, h, pos, i] = row[k_off + h * hd + i]
                v[l, seq, h, pos, i] = row[v_off + h * hd + i]

    @njit(inline="always")
    def k_dot(k, l, seq, h, j, q, qo, hd):
        a = np.float32(0)
        for i in range(hd):
            a += q[qo + i] * k[l, seq, h, j, i]
        return a

    @njit(inline="always")
    def v_acc(v, l, seq, h, j, p, out, qo, hd):
        for i in range(hd):
            out[qo + i] += p * v[l, seq, h, j, i]

    @njit(inline="always")
    def fetch(k, v, l, seq, h0, h1, upto, parts):
        lines = min(upto * k.shape[-1] * 4, FETCH_BYTES // (2 * max(h1 - h0, 1) * parts)) // 64   # float32 rows
        for h in range(h0, h1):
            kr, vr = k[l, seq, h].reshape(-1), v[l, seq, h].reshape(-1)
            for i in range(lines):
                prefetch_l2(kr, 16 * i)
                prefetch_l2(vr, 16 * i)

    @njit(inline="always")
    def k_tile(k, l, seq, h, j0, n, kt):
        for c in range(n):
            for i in range(kt.shape[0]):
                kt[i, c] = k[l, seq, h, j0 + c, i]
        for i in range(kt.shape[0]):
            for c in range(n, TILE):
                kt[i, c] = 0

    @njit(inline="always")
    def v_tile(v, l, seq, h, j0, n, vt):
        for c in range(n):
            for i in range(vt.shape[1]):
                vt[c, i] = v[l, seq, h, j0 + c, i]
        for c in range(n, TILE):
            for i in range(vt.shape[1]):
                vt[c, i] = 0

    return Ops(store, k_dot, v_acc, fetch, k_tile, v_tile)


class Ops(NamedTuple):
    """A cache type's operations inside numba code (module docstring)."""

    store: object
    k_dot: object
    v_acc: object
    fetch: object
    k_tile: object
    v_tile: object
