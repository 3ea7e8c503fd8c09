"""Speed of every byte-dot kernel against NumPy FP32 ``W @ x``, with 1 and with 2 threads.

    python -m benchmarks.kernels [--quick]

For each thread count a fresh worker process is started with numba's and BLAS's thread
counts set before NumPy loads (OpenBLAS reads them only then). The worker measures the
read bandwidth with that many threads, builds every byte-dot kernel the registry lists (``schemes.kernels()``)
on each layer shape (Llama-7B's up and down projections, SmolLM2-135M's), checks each
result against ``Ŵ x̂`` in float64 from ``dequantize`` and gguf.quants' Q8_0, then times
all of them and NumPy FP32 round robin (``machine.interleaved_times``), >= 31 calls each,
cycling through weight copies larger than the last-level cache: thread CPU time for
one thread (immune to the other vCPU's load), wall time for two. Reports median and p10
ms, GB/s of the bytes a matvec reads, percent of the measured roof and × FP32.
``int4-g128-x16`` is the older INT4 kernel that rounds x to int16 instead of int8
(more accurate, slower): kept for that comparison.
Writes ``benchmarks/results/kernels.json``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks import common
from benchmarks.common import machine

SHAPES = {
    "llama7b-up": (11008, 4096),
    "llama7b-down": (4096, 11008),
    "smollm2-up": (1536, 576),
    "smollm2-down": (576, 1536),
}
QUICK_SHAPES = {"quick": (256, 1024)}
THREADS = (1, 2)
CACHE_BYTES = 96 << 20     # > 2x this machine's 32 MiB L3

def _kernel_schemes() -> tuple:
    """Every scheme of the kernel table but the calibrated ones (GPTQ/AWQ run the same INT4 /
    INT8 kernels on the same layouts, only their codes differ) and INT8 per tensor (the
    per-channel kernel with one repeated scale)."""
    from refquant import schemes

    return tuple(n for n in schemes.kernels() if not schemes.get(n).needs_calib and n != "int8_tensor")


KERNEL_SCHEMES = _kernel_schemes()
QUICK_SCHEMES = ("int8_channel", "w8a8", "int4_g128", "q8_0", "q4_0", "q4_k")   # --quick: the plumbing, fast


def _label(scheme: str) -> str:
    """Row label: ``int8`` for INT8 per channel, INT4 names with dashes, GGML names as they are."""
    return "int8" if scheme == "int8_channel" else scheme.replace("_", "-") if scheme.startswith("int4") else scheme


_TILE_ROWS = 688           # quantize this many rows and tile them: K-quant quantization is slow in NumPy


def _copies(nbytes: int) -> int:
    return int(min(16, max(1, -(-CACHE_BYTES // nbytes))))


def _weight(shape, seed=0):
    rows, n = shape
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((min(rows, _TILE_ROWS), n)) * 0.02).astype(np.float32)


def _cases(shape, x, names=KERNEL_SCHEMES):
    """(label, scheme, quantized tensor, matvec, bytes read) per kernel; the weight is a
    block of rows quantized once and tiled to ``shape`` (speed does not depend on values)."""
    from refquant import affine, kernels, schemes
    from refquant.tensor import QuantizedTensor

    rows, n = shape
    w0 = _weight(shape)
    reps = -(-rows // w0.shape[0])
    for name in names:
        s = schemes.get(name)
        unit = 256 if name.endswith("_k") else 32 if name.startswith("q") else 0
        if name.startswith("int4_g"):
            unit = int(name.split("_g")[1].split("_")[0])
        if unit and n % unit:       # rows must be whole blocks / groups of the format
            continue
        q0 = s.quantize(w0)
        tile = lambda a: None if a is None else np.ascontiguousarray(np.tile(a, (reps, 1))[:rows])  # noqa: E731
        meta = dict(q0.meta)
        if "padded_shape" in meta:
            meta["padded_shape"] = (rows, meta["padded_shape"][1])
        qt = QuantizedTensor(tile(q0.codes), tile(q0.scales) if q0.scales is not None and q0.scales.ndim == 2
                             and q0.scales.shape[0] == w0.shape[0] else q0.scales, tile(q0.zeros), shape, name, meta)
        if name == "w8a8":   # per-row scales of shape (rows,)
            qt = QuantizedTensor(qt.codes, np.tile(q0.scales, reps)[:rows], None, shape, name, meta)
        entry = s.kernel
        yield _label(name), qt, (lambda e: lambda qt, x: e.matmul(qt, x))(entry), entry.packed(qt).nbytes
    qt = affine.quantize(np.tile(w0, (reps, 1))[:rows], 4, granularity="group", group_size=128, scale_dtype=np.float16,
                         pad=True)
    yield "int4-g128-x16", qt, lambda qt, x: kernels.matvec_int4(qt.codes, qt.scales, None, x, group_size=128), qt.nbytes


def _verify(label, qt, fn, x):
    """The kernel's first rows against Ŵ x̂ (float64): within 1e-4 of Σ|ŵ||x̂| (the tests
    hold every kernel to a derived bound; this guards the benchmark's own plumbing)."""
    from refquant import schemes
    from refquant.kernels import bytedot
    from refquant.smoothquant import act_quant

    y = fn(qt, x)
    r = min(64, qt.shape[0])
    w_hat = qt.dequantize()[:r].astype(np.float64)
    if label == "int4-g128-x16":
        from refquant.kernels.matvec import dequantize_activation_int16
        x_hat = dequantize_activation_int16(np.pad(x, (0, -x.size % 128)), 128)[: x.size]
    elif schemes.get(qt.scheme).kernel.round_x is not None:   # W8A8: x per token
        x_hat = act_quant(qt, x[None])[0].astype(np.float64)
    else:
        xq, dx, _ = bytedot.quantize_x_q8_0(x[None], -(-x.size // 32))
        x_hat = (xq.reshape(-1, 32) * dx.reshape(-1, 1)).reshape(-1)[: x.size].astype(np.float64)
    err = np.abs(y[:r] - w_hat @ x_hat)
    if np.any(err > 1e-4 * (np.abs(w_hat) @ np.abs(x_hat)) + 1e-30):
        raise AssertionError(f"{label} at {qt.shape}: result differs from dequantize x rounded x")


def measure(shape, threads: int, repeats: int, quick: bool = False) -> dict:
    """In this process (thread counts already set): roof, then every kernel and FP32 interleaved."""
    from benchmarks.machine import interleaved_times, read_bandwidth
    from refquant.kernels import bytedot

    rows, n = shape
    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    cases = list(_cases(shape, x, QUICK_SCHEMES if quick else KERNEL_SCHEMES))
    for label, qt, fn, _ in cases:
        _verify(label, qt, fn, x)
    w = np.tile(_weight(shape), (-(-rows // _TILE_ROWS), 1))[:rows].copy()
    timed = {"numpy-fp32": (lambda w, x: w @ x, [(w.copy(), x) for _ in range(_copies(w.nbytes))])}
    for label, qt, fn, nbytes in cases:
        copies = [qt] + [_copy_tensor(qt) for _ in range(_copies(nbytes) - 1)]
        for c in copies:
            fn(c, x)     # repack each copy before timing
        timed[label] = (fn, [(c, x) for c in copies])
    roof = read_bandwidth(64 << 20 if rows * n < 1 << 22 else 1 << 30)
    clock = time.thread_time if threads == 1 else time.perf_counter
    times = interleaved_times(timed, repeats, clock)
    roof_after = read_bandwidth(64 << 20 if rows * n < 1 << 22 else 1 << 30)
    if roof_after["best_gbs"] > roof["best_gbs"]:
        roof = roof_after
    nbytes = {"numpy-fp32": w.nbytes, **{label: nb for label, _, _, nb in cases}}
    t_fp32 = float(np.median(times["numpy-fp32"]))
    rows_out = []
    for label, ts in times.items():
        med, p10 = float(np.median(ts)), float(np.percentile(ts, 10))
        rows_out.append(dict(shape=list(shape), kernel=label, threads=threads, ms=med * 1e3, p10_ms=p10 * 1e3,
                             weight_bytes=int(nbytes[label]), gbs=nbytes[label] / med / 1e9,
                             pct_of_bandwidth=100 * nbytes[label] / med / 1e9 / roof["best_gbs"],
                             flops=2 * rows * n, x_fp32=t_fp32 / med, calls=len(ts)))
    return dict(threads=threads, tier=bytedot.backend(), clock=clock.__name__, read_bandwidth=roof, results=rows_out)


def _copy_tensor(qt):
    from refquant.tensor import QuantizedTensor

    c = lambda a: None if a is None else a.copy()  # noqa: E731
    return QuantizedTensor(c(qt.codes), c(qt.scales), c(qt.zeros), qt.shape, qt.scheme,
                           {k: c(v) if isinstance(v, np.ndarray) else v for k, v in qt.meta.items()})


def in_worker(shape, threads: int, repeats: int, extras: tuple = (), quick: bool = False) -> dict:
    """``measure`` in a fresh process whose numba, OpenMP and BLAS thread counts are
    ``threads``, then each ``extras`` function of ``benchmarks.roofline`` (name, args) in the
    same process; their results come back under ``"extras"``.

    Idle worker threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``, OpenBLAS's shortest
    thread timeout): with two threads on two vCPUs, OpenBLAS workers still spinning after
    an FP32 call held a core while numba's parallel region waited at its barrier for a
    whole scheduler slice, so every 2-thread kernel call lasted milliseconds."""
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}
    code = ("import json; from benchmarks.kernels import measure; from benchmarks import roofline; "
            f"out = measure({tuple(shape)}, {threads}, {repeats}, {quick}); "
            f"out['extras'] = {{name: getattr(roofline, name)(*args) for name, args in {list(extras)!r}}}; "
            "print(json.dumps(out))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=common.ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"kernel worker ({threads} threads, {shape}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_process(shape, threads: int, repeats: int) -> dict:
    """``measure`` (quick) in this process: numba limited to ``threads`` at run time, BLAS as it
    is. The smoke run of ``--quick``: it reuses the kernels this process compiled already, where
    a worker would compile each again, but its thread counts are not pinned like a worker's."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        return measure(shape, threads, repeats, True)
    finally:
        numba.set_num_threads(before)


def run(quick: bool = False) -> dict:
    from tqdm import tqdm

    shapes = QUICK_SHAPES if quick else SHAPES
    repeats = 5 if quick else 31
    runs, rows = [], []
    for label, shape in tqdm(shapes.items(), desc="shapes", unit="shape"):
        for threads in THREADS[:1] if quick else THREADS:   # --quick: the roofline's smoke run covers 2
            r = in_process(shape, threads, repeats) if quick else in_worker(shape, threads, repeats)
            for row in r["results"]:
                row["layer"] = label
                rows.append(row)
            runs.append(dict(layer=label, threads=threads, tier=r["tier"], clock=r["clock"],
                             read_bandwidth=r["read_bandwidth"]))
    return dict(benchmark="kernels", quick=quick, machine=machine(), runs=runs, results=rows)


def print_table(data: dict) -> None:
    for run_ in data["runs"]:
        bw = run_["read_bandwidth"]
        print(f"\n{run_['layer']}, {run_['threads']} thread(s), tier {run_['tier']}, {run_['clock']}: "
              f"roof {bw['best_gbs']:.1f} GB/s ({bw['reader']})")
        print(f"{'kernel':16s} {'ms':>8s} {'p10 ms':>8s} {'GB/s':>7s} {'% roof':>7s} {'x FP32':>7s}")
        for r in data["results"]:
            if r["layer"] == run_["layer"] and r["threads"] == run_["threads"]:
                print(f"{r['kernel']:16s} {r['ms']:8.3f} {r['p10_ms']:8.3f} {r['gbs']:7.1f} "
                      f"{r['pct_of_bandwidth']:7.1f} {r['x_fp32']:7.2f}")


def main(argv=None) -> None:
    args = common.quick_args(__doc__).parse_args(argv)
    data = run(args.quick)
    path = common.write_json("kernels", data)
    print_table(data)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
