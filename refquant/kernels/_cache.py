"""numba's on-disk cache for kernels that factories build, keyed by what built them.

numba caches a jitted function under a hash of its bytecode and, for a closure, of its
pickled cell contents. The kernels here are closures over other jitted functions and
intrinsics, whose pickles differ from one process to the next, so ``cache=True`` writes
a new entry per process and never reads one back (seen: every process compiled again).
``jit(key, **options)`` instead keys the entry by the factory's arguments (``key``, its
``repr`` must name everything that changes the code) and by a hash of the source of every
module the kernels are built from, so editing any of them invalidates every entry.

Only leaves are cached: the byte-dot kernels' chunk functions, their shared parallel
function (it calls a chunk function by address, not by name) and the module-level
helpers; never a function that calls a ``parallel=True`` one by name (``stacked``'s
applies, the compiled decode step). numba segfaults running such a caller from its cache
(numba issue #8578, open; seen here too: the cached ``stacked`` apply crashed on its
first call). The thin per-layout kernels could not be cached anyway: they hold the chunk
function's address, which numba does not cache.

A kernel costs 1-5 s to compile (the parallel ones most); loaded, ~50 ms. Set
``REFQUANT_NUMBA_CACHE=0`` to compile everything afresh. The cache lives where numba puts
it (``__pycache__`` beside the source, or ``NUMBA_CACHE_DIR``).
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from numba import njit

ENV = "REFQUANT_NUMBA_CACHE"
# every module whose code ends up inside a kernel built with ``jit`` (the byte-dot kernels:
# their intrinsics, and the numba tier's fp16 table in matvec)
_SOURCES = ("refquant/kernels/bytedot.py", "refquant/kernels/simd.py", "refquant/kernels/matvec.py",
            "refquant/kernels/_cache.py")


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for rel in _SOURCES:
        p = root / rel
        h.update(rel.encode())
        h.update(p.read_bytes() if p.exists() else b"-")
    return h.hexdigest()


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


@functools.lru_cache(maxsize=1)
def _cache_class():
    """A ``FunctionCache`` whose index key is ours (None if this numba lacks the hook)."""
    try:
        from numba.core.caching import FunctionCache
    except ImportError:   # pragma: no cover - numba moved its private cache API
        return None
    if not hasattr(FunctionCache, "_index_key"):   # pragma: no cover
        return None

    class KeyedCache(FunctionCache):
        def __init__(self, py_func, key: str):
            super().__init__(py_func)
            self._refquant_key = hashlib.sha256(f"{key}|{_source_hash()}".encode()).hexdigest()

        def _index_key(self, sig, codegen):
            return (sig, codegen.magic_tuple(), (self._refquant_key, ""))

    return KeyedCache


def jit(key, **options):
    """``numba.njit(**options)``, cached on disk under ``key`` (module docstring)."""
    def wrap(fn):
        d = njit(**options)(fn)
        cls = _cache_class() if enabled() else None
        if cls is not None:
            try:
                d._cache = cls(fn, repr(key))
            except Exception:   # pragma: no cover - no writable cache directory: compile as before
                pass
        return d
    return wrap
