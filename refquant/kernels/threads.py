"""Threading of the SIMD byte-dot kernels, and calls by address that numba can cache.

A layout's kernel is two compiled functions: its chunk loops (``chunks(g, ng, ...)``, a
contiguous run of 8-row groups) and the parallel part shared by every layout with the
same array types (``par(chunks, ng, ...)``: ``chunks`` for g in ``prange(ng)``).
Both are cached on disk (``kernels._cache``), and every caller reaches them through
addresses it receives as *data*, a uint64 array ``(par, chunks)``:

* numba links a function named as a constant into each caller and optimizes it again
  there (seconds per caller);
* a function that calls a ``parallel=True`` one by name crashes when run from numba's
  cache (numba issue #8578);
* an address baked into code as a constant is only valid in the process that compiled
  it, so numba refuses to cache such code.

So ``run`` (numba only) takes ``addrs`` and builds first-class function
values from them (``fn_at``) at run time: their callers -- the Python entry ``Kernel``,
``stacked``'s applies, the compiled decode step -- hold no address and no parallel code,
and are cached like any other function.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from refquant.kernels import _cache


def fn_at(fnty: types.FunctionType):
    """A numba-only ``at(addr) -> fnty`` value: the first-class function of type ``fnty``
    whose C entry (numba's cfunc wrapper) is at ``addr`` (an integer), called like any
    function value. The caller guarantees that ``addr`` holds a function of that type."""
    @intrinsic
    def at(typingctx, addr):
        if not isinstance(addr, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            f = cgutils.create_struct_proxy(fnty)(context, builder)
            f.c_addr = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
            return f._getvalue()
        return fnty(addr), codegen
    return at


def address(disp, sig) -> int:
    """The address of ``disp`` compiled for ``sig`` (its C entry), for ``fn_at``."""
    from numba.core.types.function_type import CompileResultWAP

    disp.compile(sig.args)
    return CompileResultWAP(disp.overloads[sig.args]).__wrapper_address__()


@intrinsic
def num_threads(typingctx):
    """numba-only: ``numba.get_num_threads()`` without its error path, whose code numba
    cannot cache (it holds a dynamic global): a call of the threading layer's
    ``get_num_threads``, which must be loaded (``_parallel``, the only way to an address
    ``run`` takes, loads it; so does any ``parallel=True`` function's first call)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(cgutils.intp_t, []), "get_num_threads")
        return builder.call(fn, [])
    return types.intp(), codegen


@njit
def _tasks(rows):
    """Parallel tasks of a SIMD kernel call: one per thread (a contiguous run of 8-row
    groups each, with its own scratch), fewer for small matrices (16 rows or more per
    task). Eight tasks on two threads made SmolLM2's decode step 1.2x as long (task calls,
    scratch allocations)."""
    return max(1, min((rows + 15) // 16, num_threads()))


def _signatures(arrays: tuple):
    """``(chunk signature, parallel signature)`` for arguments of the numba types ``arrays``
    (qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)."""
    csig = types.void(types.int64, types.int64, *arrays)
    return csig, types.void(types.FunctionType(csig), types.int64, *arrays)


_PARALLEL: dict = {}


def _parallel(arrays: tuple) -> int:
    """The address of the parallel part for arguments of the numba types ``arrays``: one
    compilation per tuple of types (cached on disk) serves every layout and both kernels."""
    if arrays not in _PARALLEL:
        numba.get_num_threads()   # starts the threading layer: ``num_threads`` calls into it
        psig = _signatures(arrays)[1]

        def par(chunks, ng, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
            for g in prange(ng):
                chunks(np.int64(g), ng, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)
        disp = _cache.jit(("bytedot.parallel", str(psig)), parallel=True)(par)
        _PARALLEL[arrays] = address(disp, psig)
    return _PARALLEL[arrays]


def run(addrs, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
    """numba-only: the parallel part at ``addrs[0]`` over the chunk loops at ``addrs[1]``
    (module docstring)."""
    raise NotImplementedError("numba only")


@overload(run)
def _run(addrs, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
    csig, psig = _signatures((qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out))
    par_at, chunks_at = fn_at(types.FunctionType(psig)), fn_at(types.FunctionType(csig))

    def impl(addrs, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        par_at(addrs[0])(chunks_at(addrs[1]), _tasks(out.shape[1]), qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)
    return impl


@_cache.jit(None, deps=("refquant/kernels/threads.py",))
def _call(addrs, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
    run(addrs, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)


@dataclass(frozen=True, eq=False)
class Kernel:
    """A SIMD byte-dot kernel for one layout: ``chunks`` (the compiled loops over a task's
    row groups) run over the threads by the parallel part. ``kernel(qs, qh, d, sc, m, mn,
    xq, xa, dx, xs, s16, out)`` from Python; ``addresses(arrays)`` -> the ``addrs`` numba
    code passes to ``run`` for arguments of those numba types."""

    chunks: object       # the chunk function's dispatcher (the asm test reads its loops)
    _addrs: dict = field(default_factory=dict, repr=False)
    _by_arrays: dict = field(default_factory=dict, repr=False)

    def addresses(self, arrays: tuple) -> np.ndarray:
        if arrays not in self._addrs:
            csig, _ = _signatures(arrays)
            self._addrs[arrays] = np.array([_parallel(arrays), address(self.chunks, csig)], np.uint64)
        return self._addrs[arrays]

    def __call__(self, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        args = (qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)
        # what numba's array type holds (numba.typeof takes 50x as long)
        key = tuple((a.dtype, a.ndim, a.flags.c_contiguous, a.flags.f_contiguous, a.flags.writeable, a.flags.aligned)
                    for a in args)
        addrs = self._by_arrays.get(key)
        if addrs is None:
            addrs = self._by_arrays[key] = self.addresses(tuple(numba.typeof(a) for a in args))
        _call(addrs, *args)


# --- a team of threads for a whole step: barriers instead of one parallel call per product --

_I64 = ir.IntType(64)


def _i64_ptr(context, builder, arrty, arr, idx):
    a = context.make_array(arrty)(context, builder, arr)
    return builder.gep(a.data, [idx])


def _i64_vector(arr) -> bool:
    return isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1


def _cell_op(emit, doc: str):
    """An intrinsic ``op(arr, idx) -> int64`` on element ``idx`` of a 1-D int64 array:
    ``emit(builder, pointer)``."""
    def op(typingctx, arr, idx):
        if not _i64_vector(arr):
            return None

        def codegen(context, builder, sig, args):
            return emit(builder, _i64_ptr(context, builder, sig.args[0], args[0], args[1]))
        return types.int64(arr, types.intp), codegen
    op.__doc__ = doc
    return intrinsic(op)


_atomic_add = _cell_op(lambda b, p: b.atomic_rmw("add", p, _I64(1), "seq_cst"),
                       "``arr[idx] += 1`` atomically (sequentially consistent); returns the old value.")
_atomic_load = _cell_op(lambda b, p: b.load_atomic(p, "seq_cst", 8),
                        "``arr[idx]``, an atomic (sequentially consistent) load.")


@intrinsic
def _atomic_cas(typingctx, arr, idx, old, new):
    """``arr[idx] = new`` if it holds ``old`` (atomically); returns the value it held."""
    if not _i64_vector(arr):
        return None

    def codegen(context, builder, sig, args):
        p = _i64_ptr(context, builder, sig.args[0], args[0], args[1])
        pair = builder.cmpxchg(p, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)
    return types.int64(arr, types.intp, types.int64, types.int64), codegen


@intrinsic
def _pause(typingctx):
    """A spin-wait hint (``pause``)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


_CLOSED = 1 << 40
JOIN_SPINS = 1 << 16     # how long the first thread waits for the others (pauses: ~1-3 ms)


def team_sync(counters: int = 0) -> np.ndarray:
    """Fresh synchronization words for one ``team`` run: team membership, barrier count,
    then ``counters`` work counters (``claim``)."""
    return np.zeros(2 + counters, np.int64)


@njit
def join(sync, want):
    """Joins the team of a parallel region: ``(tid, members)``, or ``(-1, 0)`` for a thread
    that came after the team closed. The first thread waits (``JOIN_SPINS``) for ``want``
    members, then closes the team: every member is running when it closes, so the barriers
    below cannot wait for a thread that a scheduler has not started (a region whose
    iterations run one after another just runs with a team of one)."""
    while True:
        w = _atomic_load(sync, 0)
        if w & _CLOSED:
            return -1, 0
        if _atomic_cas(sync, 0, w, w + 1) == w:
            tid = w
            break
    if tid == 0:
        spins = 0
        while _atomic_load(sync, 0) < want and spins < JOIN_SPINS:
            _pause()
            spins += 1
        while True:
            w = _atomic_load(sync, 0)
            if _atomic_cas(sync, 0, w, w | _CLOSED) == w:
                break
    else:
        while not _atomic_load(sync, 0) & _CLOSED:
            _pause()
    return tid, _atomic_load(sync, 0) & (_CLOSED - 1)


@njit(inline="always")
def claim(sync, slot):
    """The next unit of work from the counter ``sync[slot]`` (atomically: each value goes to
    one member); the counter holds 0 before the first claim."""
    return _atomic_add(sync, slot)


@njit
def barrier(sync, members, k):
    """The ``k``-th barrier of a team (every member counts its own): returns ``k + 1`` once
    all ``members`` have arrived. What a member wrote before it is visible after it."""
    _atomic_add(sync, 1)
    target = members * (k + 1)
    while _atomic_load(sync, 1) < target:
        _pause()
    return k + 1


@njit(inline="always")
def share(n, task, ntask):
    """``[lo, hi)``: task ``task`` of ``ntask``'s part of ``n`` units -- the split every
    kernel's ``chunks`` makes of its row groups."""
    return n * task // ntask, n * (task + 1) // ntask


def chunk(addr, task, ntask, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
    """numba-only: the chunk loops at ``addr`` (``Kernel.addresses(...)[1]``) for task
    ``task`` of ``ntask``, on the calling thread."""
    raise NotImplementedError("numba only")


@overload(chunk)
def _chunk(addr, task, ntask, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
    csig, _ = _signatures((qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out))
    chunks_at = fn_at(types.FunctionType(csig))

    def impl(addr, task, ntask, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        chunks_at(addr)(np.int64(task), np.int64(ntask), qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)
    return impl
