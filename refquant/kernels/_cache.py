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
_SOURCES = ("refquant/kernels/bytedot.py", "refquant/kernels/layout.py", "refquant/kernels/rows.py",
            "refquant/kernels/tiles.py", "refquant/kernels/threads.py", "refquant/kernels/simd.py",
            "refquant/kernels/matvec.py", "refquant/kernels/stacked.py", "refquant/kernels/kvcache.py",
            "refquant/kernels/_cache.py")


@functools.lru_cache(maxsize=None)
def _source_hash(sources: tuple = _SOURCES) -> str:
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for rel in sources:
        p = root / rel
        h.update(rel.encode())
        h.update(p.read_bytes() if p.exists() else b"-")
    return h.hexdigest()


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


@functools.lru_cache(maxsize=1)
def _tolerant_class():
    """A ``FunctionCache`` that takes an entry it cannot read for a miss (None if this numba
    lacks the private API it builds on).

    A truncated or garbled index (``.nbi``) or data file (``.nbc``), as a full disk or a
    copied tree leaves, makes numba's own cache raise (``UnpicklingError``, ``EOFError``...)
    on every later run. Here the damaged index is removed, the function compiles, and the
    entry is written anew; a failure to write (a full disk) leaves the function compiled
    and uncached."""
    try:
        from numba.core.caching import FunctionCache
    except ImportError:   # pragma: no cover - numba moved its private cache API
        return None
    if not all(hasattr(FunctionCache, a) for a in ("_index_key", "load_overload", "save_overload")):
        return None   # pragma: no cover

    class TolerantCache(FunctionCache):
        deps = ""   # a hash of the modules whose constants the function freezes (``jit(deps=...)``)

        def _index_key(self, sig, codegen):
            key = super()._index_key(sig, codegen)
            return key if not self.deps else (*key[:2], (*key[2], self.deps))

        def load_overload(self, sig, target_context):
            try:
                return super().load_overload(sig, target_context)
            except Exception:   # a damaged entry: a miss
                self._drop_index()
                return None

        def save_overload(self, sig, data):
            try:
                super().save_overload(sig, data)
            except Exception:   # cannot write: stays compiled in this process only
                self._drop_index()

        def _drop_index(self):
            try:
                os.unlink(self._cache_file._index_path)
            except (AttributeError, OSError):
                pass

    return TolerantCache


@functools.lru_cache(maxsize=1)
def _cache_class():
    """A tolerant ``FunctionCache`` whose index key is ours (None if numba lacks the hooks)."""
    base = _tolerant_class()
    if base is None:   # pragma: no cover
        return None

    class KeyedCache(base):
        def __init__(self, py_func, key: str):
            super().__init__(py_func)
            self._refquant_key = hashlib.sha256(f"{key}|{_source_hash()}".encode()).hexdigest()

        def _index_key(self, sig, codegen):
            return (sig, codegen.magic_tuple(), (self._refquant_key, self.deps))

    return KeyedCache


def jit(key=None, *, deps: tuple = (), **options):
    """``numba.njit(**options)``, cached on disk under ``key`` (module docstring); ``key=None``:
    under numba's own key (the function's bytecode, the entry dropped when its source file
    changes), for plain module-level functions, plus the contents of ``deps`` (paths from
    the repository root): numba freezes the global arrays a function reads into its code, so
    an edit of the module that defines them must invalidate the entry too. Either way
    through the tolerant cache (``_tolerant_class``). ``REFQUANT_NUMBA_CACHE=0``: no cache."""
    def wrap(fn):
        d = njit(**options)(fn)
        cls = (_tolerant_class() if key is None else _cache_class()) if enabled() else None
        if cls is not None:
            try:
                d._cache = cls(fn) if key is None else cls(fn, repr(key))
                if deps:
                    d._cache.deps = _source_hash(tuple(deps))
            except Exception:   # pragma: no cover - no writable cache directory: compile as before
                pass
        return d
    return wrap
