"""Threading of the SIMD byte-dot kernels, and calls by address that numba can cache.

A layout's kernel is two compiled functions: its chunk loops (``chunks(g, ng, ...)``, a
contiguous run of 16-row chunks) and the parallel part shared by every layout with the
same array types (``par(chunks, ng, width, ...)``: ``chunks`` for g in ``prange(ng)``).
Both are cached on disk (``kernels._cache``), and every caller reaches them through
addresses it receives as *data*, a uint64 array ``(par, chunks)``:

* numba links a function named as a constant into each caller and optimizes it again
  there (seconds per caller);
* a function that calls a ``parallel=True`` one by name crashes when run from numba's
  cache (numba issue #8578);
* an address baked into code as a constant is only valid in the process that compiled
  it, so numba refuses to cache such code.

So ``run_rows`` / ``run_tiles`` (numba only) take ``addrs`` and build first-class function
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


@intrinsic
def _num_threads(typingctx):
    """``numba.get_num_threads()`` without its error path, whose code numba cannot cache
    (it holds a dynamic global): a call of the threading layer's ``get_num_threads``,
    which ``_parallel`` (the only way to an address ``run_*`` takes) has made sure is
    loaded."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(cgutils.intp_t, []), "get_num_threads")
        return builder.call(fn, [])
    return types.intp(), codegen


@njit
def _tasks(rows):
    """Parallel tasks of a SIMD kernel call: one per thread (a contiguous run of 16-row
    chunks each, with its own scratch), fewer for small matrices. Eight tasks on two
    threads made SmolLM2's decode step 1.2x as long (task calls, scratch allocations)."""
    return max(1, min((rows + 15) // 16, _num_threads()))


def _signatures(arrays: tuple, tiles: bool):
    """``(chunk signature, parallel signature)`` for arguments of the numba types ``arrays``
    (qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out); with ``tiles`` the chunks take the
    padded copies of x that ``_tile_inputs`` makes."""
    inner = arrays
    if tiles:
        f32 = types.Array(types.float32, 2, "C")
        xq4 = types.Array(arrays[6].dtype, 2, "C")
        inner = arrays[:6] + (xq4, xq4, f32, f32) + arrays[10:]
    csig = types.void(types.int64, types.int64, *inner)
    return csig, types.void(types.FunctionType(csig), types.int64, types.int64, *arrays)


_PARALLEL: dict = {}


def _parallel(arrays: tuple, tiles: bool) -> int:
    """The address of the parallel part for arguments of the numba types ``arrays``: one
    compilation per tuple of types and ``tiles`` (cached on disk) serves every layout."""
    key = (arrays, tiles)
    if key not in _PARALLEL:
        numba.get_num_threads()   # starts the threading layer: ``_num_threads`` calls into it
        psig = _signatures(arrays, tiles)[1]
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
        _PARALLEL[key] = address(disp, psig)
    return _PARALLEL[key]


def _run_stub(tiles: bool):
    """numba-only ``run(addrs, width, qs, ..., out)``: the parallel part at ``addrs[0]``
    over the chunk loops at ``addrs[1]`` (module docstring), ``width`` units per block."""
    def run(addrs, width, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        raise NotImplementedError("numba only")

    @overload(run)
    def _run(addrs, width, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        csig, psig = _signatures((qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out), tiles)
        par_at, chunks_at = fn_at(types.FunctionType(psig)), fn_at(types.FunctionType(csig))

        def impl(addrs, width, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
            par_at(addrs[0])(chunks_at(addrs[1]), _tasks(out.shape[1]), width, qs, qh, d, sc, m, mn, xq, xa, dx,
                             xs, s16, out)
        return impl
    return run


run_rows = _run_stub(False)
run_tiles = _run_stub(True)


@_cache.jit(None, deps=("refquant/kernels/threads.py",))
def _call(addrs, width, tiles, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
    if tiles:
        run_tiles(addrs, width, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)
    else:
        run_rows(addrs, width, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)


@dataclass(frozen=True, eq=False)
class Kernel:
    """A SIMD byte-dot kernel for one layout: ``chunks`` (the compiled loops) run over the
    threads by the parallel part. ``kernel(qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)``
    from Python; ``addresses(arrays)`` -> the ``addrs`` numba code passes to ``run_rows`` /
    ``run_tiles`` for arguments of those numba types."""

    chunks: object       # the chunk function's dispatcher (the asm test reads its loops)
    tiles: bool
    width: int           # units of x per 32-weight block the tile inputs carry (Q6_K: 2)
    _addrs: dict = field(default_factory=dict, repr=False)

    def addresses(self, arrays: tuple) -> np.ndarray:
        if arrays not in self._addrs:
            csig, _ = _signatures(arrays, self.tiles)
            self._addrs[arrays] = np.array([_parallel(arrays, self.tiles), address(self.chunks, csig)], np.uint64)
        return self._addrs[arrays]

    _by_arrays: dict = field(default_factory=dict, repr=False)

    def __call__(self, qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out):
        args = (qs, qh, d, sc, m, mn, xq, xa, dx, xs, s16, out)
        # what numba's array type holds (numba.typeof takes 50x as long)
        key = tuple((a.dtype, a.ndim, a.flags.c_contiguous, a.flags.f_contiguous, a.flags.writeable, a.flags.aligned)
                    for a in args)
        addrs = self._by_arrays.get(key)
        if addrs is None:
            addrs = self._by_arrays[key] = self.addresses(tuple(numba.typeof(a) for a in args))
        _call(addrs, self.width, self.tiles, *args)
