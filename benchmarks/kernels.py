"""Speed of the numba matvec kernels against NumPy FP32 ``W @ x`` and dequantize-then-matvec.

    python -m benchmarks.kernels [--quick]

For each shape (Llama-7B layers, MiniGPT and SmolLM2-135M layers) and kernel: the output is
first checked against the kernel's NumPy twin, then timed (median of >= 20 runs after
warm-up, cycling through enough weight copies to exceed the last-level cache). Reports ms,
GB/s of weight bytes (codes + scales + zeros), percent of the measured read bandwidth, and
speed-up over NumPy FP32. Writes ``benchmarks/results/kernels.json``.
"""
from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from benchmarks import common
from benchmarks.common import machine
from benchmarks.machine import median_time, read_bandwidth
from refquant import affine, kernels
from refquant.gguf import quants as ggml_quants

SHAPES = {
    "llama7b-attn": (4096, 4096),
    "llama7b-up": (11008, 4096),
    "llama7b-down": (4096, 11008),
    "minigpt-qkv": (768, 256),
    "minigpt-fc": (1024, 256),
    "minigpt-proj": (256, 1024),
    "smollm2-q": (576, 576),
    "smollm2-up": (1536, 576),
    "smollm2-down": (576, 1536),
}
QUICK_SHAPES = {"quick": (256, 512)}
CACHE_BYTES = 96 << 20     # > 2x this machine's 32 MiB L3
# OpenBLAS worker threads spin for a while after a call; a numba kernel timed during that
# window shares the 2 cores with them and ran 3.5x slower (measured). Let them park first.
BLAS_SETTLE_S = 1.0


def _copies(nbytes: int) -> int:
    return int(min(32, max(1, -(-CACHE_BYTES // nbytes))))


def _cases(w: np.ndarray, x: np.ndarray):
    """(name, fn, args, twin output, weight bytes) for every kernel on weight w."""
    q8 = affine.quantize(w, 8, granularity="channel")
    q, s = q8.codes.view(np.int8), q8.scales.reshape(-1)
    yield "int8", kernels.matvec_int8, (q, s), kernels.matvec_int8_ref(q, s, x), q8.nbytes
    yield "w8a8", kernels.matvec_w8a8, (q, s), kernels.matvec_w8a8_ref(q, s, x), q8.nbytes
    yield "numpy-dequant-int8", lambda q, s, x: (q.astype(np.float32) * s[:, None]) @ x, (q, s), \
        kernels.matvec_int8_ref(q, s, x), q8.nbytes
    for g, sym in ((128, True), (128, False), (64, True), (32, True)):
        qt = affine.quantize(w, 4, sym=sym, granularity="group", group_size=g, pad=True, scale_dtype=np.float16)
        fn = (lambda g: lambda p, sc, z, x: kernels.matvec_int4(p, sc, z, x, group_size=g))(g)
        args = (qt.codes, qt.scales, qt.zeros)
        ref = kernels.matvec_int4_ref(*args, x, group_size=g)
        yield f"int4-g{g}" + ("" if sym else "-asym"), fn, args, ref, qt.nbytes
    # llama.cpp's formats, on the GGUF block bytes (x quantized to Q8_0 / Q8_K inside)
    for t, fn in (("Q8_0", kernels.matvec_q8_0), ("Q4_0", kernels.matvec_q4_0), ("Q4_K", kernels.matvec_q4_k)):
        if w.shape[1] % ggml_quants.TYPES[t].block_size == 0:
            raw = ggml_quants.quantize(w, t)
            yield t.lower(), fn, (raw,), kernels.matvec_ggml_ref(raw, x, t), raw.nbytes


def _copy_args(args, n):
    return [tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args) for _ in range(n)]


def measure(shape, repeats: int = 20, seed: int = 0) -> list[dict]:
    """Time every kernel on one (out, in) shape; returns rows with ms, GB/s and x FP32.

    Order matters on a 2-core machine: every check (the twins call BLAS) happens first,
    then NumPy FP32 is timed, then -- after BLAS's threads have parked -- the numba
    kernels, and last the NumPy dequantize-then-matvec baseline, which calls BLAS again.
    """
    out, n = shape
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, n)).astype(np.float32) * 0.02
    x = rng.standard_normal(n).astype(np.float32)
    cases = list(_cases(w, x))
    scale = np.abs(w).astype(np.float64) @ np.abs(x) + 1e-6
    for name, fn, args, ref, _ in cases:
        if np.max(np.abs(fn(*args, x) - ref) / scale) > 1e-3:
            raise AssertionError(f"{name} at {shape}: output differs from its NumPy twin")
    copies = _copy_args((w,), _copies(w.nbytes))
    t_fp32 = median_time(lambda w, x: w @ x, [(c[0], x) for c in copies], repeats)
    rows = [dict(shape=list(shape), kernel="numpy-fp32", ms=t_fp32 * 1e3, weight_bytes=w.nbytes,
                 gbs=w.nbytes / t_fp32 / 1e9, flops=2 * out * n, x_fp32=1.0)]
    time.sleep(BLAS_SETTLE_S)
    for name, fn, args, _, nbytes in sorted(cases, key=lambda c: c[0].startswith("numpy")):
        t = median_time(fn, [a + (x,) for a in _copy_args(args, _copies(nbytes))], repeats)
        rows.append(dict(shape=list(shape), kernel=name, ms=t * 1e3, weight_bytes=nbytes, gbs=nbytes / t / 1e9,
                         flops=2 * out * n, x_fp32=t_fp32 / t))
    return rows


def run(quick: bool = False) -> dict:
    bw = read_bandwidth(64 << 20 if quick else 1 << 30)
    shapes = QUICK_SHAPES if quick else SHAPES
    rows = []
    for label, shape in tqdm(shapes.items(), desc="shapes", unit="shape"):
        for r in measure(shape, repeats=5 if quick else 20):
            r["layer"] = label
            r["pct_of_bandwidth"] = 100 * r["gbs"] / bw["best_gbs"]
            rows.append(r)
    return dict(benchmark="kernels", quick=quick, machine=machine(), read_bandwidth=bw, results=rows)


def print_table(data: dict) -> None:
    print(f"read bandwidth {data['read_bandwidth']['best_gbs']:.1f} GB/s")
    print(f"{'layer':14s} {'shape':>12s} {'kernel':20s} {'ms':>8s} {'GB/s':>7s} {'% roof':>7s} {'x FP32':>7s}")
    for r in data["results"]:
        shp = "x".join(map(str, r["shape"]))
        print(f"{r['layer']:14s} {shp:>12s} {r['kernel']:20s} {r['ms']:8.3f} {r['gbs']:7.1f} "
              f"{r['pct_of_bandwidth']:7.1f} {r['x_fp32']:7.2f}")


def main(argv=None) -> None:
    args = common.quick_args(__doc__).parse_args(argv)
    data = run(args.quick)
    path = common.write_json("kernels", data)
    print_table(data)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
