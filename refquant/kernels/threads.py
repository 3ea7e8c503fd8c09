"""Threading of the SIMD byte-dot kernels: one parallel function per tuple of array types,
reached by address, that runs a kernel's chunk function over ``prange``.

numba links a function named as a constant into every caller and optimizes it again
there (seconds per caller); so the parallel part and the chunk functions are first-class
function values called through their addresses (``_by_address``), compiled once and
cached on disk (``kernels._cache``), whatever the layout.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from refquant.kernels import _cache


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
