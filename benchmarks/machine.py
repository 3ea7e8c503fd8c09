"""This machine's roofs: sustained read bandwidth and peak FLOP/s, measured.

The streaming kernel is compiled fresh each run (no numba disk cache): code loaded from
the cache ran about 2x slower here (see refquant/kernels/matvec.py).
"""
from __future__ import annotations

import time

import numba
import numpy as np
from numba import njit, prange


@njit(fastmath=True, cache=False)
def _row_sum(r):
    acc = np.float32(0)
    for i in range(r.size):
        acc += r[i]
    return acc


@njit(parallel=True, fastmath=True, cache=False)
def _stream_sum(a2):
    parts = np.zeros(a2.shape[0], np.float32)
    for t in prange(a2.shape[0]):
        parts[t] = _row_sum(a2[t])
    return parts.sum()


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Sustained read bandwidth over ``nbytes`` on all cores (best of runs), by two readers:
    a vectorized numba float32 sum and NumPy BLAS's float32 matvec (``a @ ones``). The roof
    is the faster of the two: on one machine here BLAS's matvec moved 15% more bytes per
    second than the numba sum, and a roof that a kernel beats is not a roof."""
    a = np.ones(nbytes // 4, np.float32).reshape(256, -1)
    ones = np.ones(a.shape[1], np.float32)
    readers = {"numba_sum": lambda: _stream_sum(a), "blas_matvec": lambda: a @ ones}
    if _stream_sum(a) != a.size:       # verify before timing (exact: sums of ones below 2^24 per row)
        raise AssertionError("streaming sum returned a wrong result")
    if not np.all(a @ ones == a.shape[1]):
        raise AssertionError("BLAS matvec returned a wrong result")
    gbs = {}
    for name, fn in readers.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        gbs[name] = (a.nbytes / min(times) / 1e9, a.nbytes / float(np.median(times)) / 1e9)
    best = max(gbs, key=lambda k: gbs[k][0])
    return dict(bytes=a.nbytes, best_gbs=gbs[best][0], median_gbs=gbs[best][1], reader=best,
                by_reader={k: v[0] for k, v in gbs.items()}, threads=numba.get_num_threads())


def sgemm_peak(n: int = 2048, repeats: int = 5) -> dict:
    """Peak float32 FLOP/s of NumPy's BLAS on an n x n x n product (best of runs)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    c = a @ b
    if not np.allclose(c[:4, :4], a[:4].astype(np.float64) @ b[:, :4], rtol=1e-3, atol=1e-2):
        raise AssertionError("sgemm result is wrong")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return dict(n=n, gflops=2 * n**3 / min(times) / 1e9)


def median_time(fn, args_list, repeats: int) -> float:
    """Median seconds of ``fn(*args)`` over ``repeats`` calls, cycling through ``args_list``.

    Cycling through several copies of the weights larger than the last-level cache
    together keeps the measurement about memory, not cache.
    """
    fn(*args_list[0])
    times = []
    for k in range(repeats):
        args = args_list[k % len(args_list)]
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
