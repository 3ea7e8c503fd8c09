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
    # eight independent accumulators: the sum's add latency never limits the stream
    acc = np.zeros(8, np.float32)
    for i in range(0, r.size - 7, 8):
        for k in range(8):
            acc[k] += r[i + k]
    return acc.sum()


@njit(parallel=True, fastmath=True, cache=False)
def _stream_sum(a2):
    parts = np.zeros(a2.shape[0], np.float32)
    for t in prange(a2.shape[0]):
        parts[t] = _row_sum(a2[t])
    return parts.sum()


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Sustained read bandwidth over ``nbytes`` with the threads this process runs (numba's
    and BLAS's counts), best of ``repeats`` runs of three readers: a numba float32 sum
    with eight accumulators per row, BLAS's float32 matvec (``a @ ones``) and NumPy's
    ``np.add.reduce``. The roof is the fastest of them: on this machine kind one reader
    alone under-measured by up to 44% (BLAS's sgemv beat a one-accumulator numba sum),
    and a roof that a kernel beats is not a roof."""
    a = np.ones(nbytes // 4, np.float32).reshape(256, -1)
    ones = np.ones(a.shape[1], np.float32)
    flat = a.reshape(-1)
    readers = {"numba_sum": lambda: _stream_sum(a), "blas_matvec": lambda: a @ ones,
               "numpy_add_reduce": lambda: np.add.reduce(flat)}
    if _stream_sum(a) != a.size:       # verify before timing (exact: sums of ones below 2^24 per row)
        raise AssertionError("streaming sum returned a wrong result")
    if not np.all(a @ ones == a.shape[1]):
        raise AssertionError("BLAS matvec returned a wrong result")
    if np.add.reduce(flat) != a.size:
        raise AssertionError("np.add.reduce returned a wrong result")
    gbs = {name: [] for name in readers}
    for _ in range(repeats):            # interleaved, so a slow minute hits every reader
        for name, fn in readers.items():
            t0 = time.perf_counter()
            fn()
            gbs[name].append(a.nbytes / (time.perf_counter() - t0) / 1e9)
    best = max(gbs, key=lambda k: max(gbs[k]))
    return dict(bytes=a.nbytes, best_gbs=max(gbs[best]), median_gbs=float(np.median(gbs[best])), reader=best,
                by_reader={k: max(v) for k, v in gbs.items()}, threads=numba.get_num_threads())


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


def interleaved_times(cases: dict, repeats: int, clock=time.perf_counter) -> dict:
    """``{name: [seconds per call]}`` for ``cases = {name: (fn, [args, ...])}``, timed round
    robin: call k of every case runs before call k + 1 of any, so a machine that slows
    down for a minute slows every case alike. Each case cycles through its argument copies.
    ``clock``: ``time.thread_time`` for one-thread runs (immune to the other vCPU's load),
    ``time.perf_counter`` when the work spans threads."""
    for fn, args_list in cases.values():
        fn(*args_list[0])
    times = {name: [] for name in cases}
    for k in range(repeats):
        for name, (fn, args_list) in cases.items():
            args = args_list[k % len(args_list)]
            t0 = clock()
            fn(*args)
            times[name].append(clock() - t0)
    return times


def _int8_dot_loop(tier: str):
    """``loop(buf, n)``: ``n`` rounds of eight independent byte dots of the tier (``vpdpbusd``
    ymm, or ``vpmaddubsw`` + ``vpmaddwd``) on 32 code bytes held in registers and 4-byte
    activations broadcast from ``buf`` (L1), 32 multiply-adds each."""
    from refquant.kernels import simd as V

    dot = V.DOTS[tier]

    @njit(cache=False)
    def loop(buf, n):
        a0, a1, a2, a3 = V.zeros_i32(), V.zeros_i32(), V.zeros_i32(), V.zeros_i32()
        a4, a5, a6, a7 = V.zeros_i32(), V.zeros_i32(), V.zeros_i32(), V.zeros_i32()
        w0, w1 = V.load32(buf, 0), V.load32(buf, 32)
        for i in range(n):
            o = (i & 7) * 4
            x0, x1 = V.bcast4(buf, 64 + o), V.bcast4(buf, 96 + o)
            x2, x3 = V.bcast4(buf, 128 + o), V.bcast4(buf, 160 + o)
            a0, a1, a2, a3 = dot(a0, w0, x0), dot(a1, w1, x0), dot(a2, w0, x1), dot(a3, w1, x1)
            a4, a5, a6, a7 = dot(a4, w0, x2), dot(a5, w1, x2), dot(a6, w0, x3), dot(a7, w1, x3)
        s = V.add_i32(V.add_i32(V.add_i32(a0, a1), V.add_i32(a2, a3)), V.add_i32(V.add_i32(a4, a5), V.add_i32(a6, a7)))
        out = np.empty(8, np.float32)
        V.store_f32x8(out, 0, V.fma_vec(V.zeros_f32(), s, V.load_f32x8(np.ones(8, np.float32), 0)))
        return out
    return loop


def int8_instruction_peak(tier: str, rounds: int = 2_000_000, repeats: int = 7) -> dict:
    """The byte-dot instructions' throughput on one thread (``_int8_dot_loop``), 2 ops per
    multiply-add, median of ``repeats`` timings by thread CPU time: the int8 ceiling a
    prompt's products are held against (times the threads that run them). Checked first:
    the loop's sum on a buffer of ones is 8 dots x 32 x ``rounds``."""
    loop = _int8_dot_loop(tier)
    buf = np.ones(256, np.int8)
    got = loop(buf, 1000)
    if not np.all(got == 8 * 4 * 1000):     # 8 accumulators x 4 bytes per lane
        raise AssertionError(f"the {tier} dot loop summed {got[0]}, not {8 * 4 * 1000}")
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        loop(buf, rounds)
        times.append(time.thread_time() - t0)
    t = float(np.median(times))
    return dict(tier=tier, gops_per_thread=8 * rounds * 32 * 2 / t / 1e9, rounds=rounds)
