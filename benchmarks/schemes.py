"""Bits per weight and SQNR of every registered scheme on an N(0, 1) weight matrix.

    python -m benchmarks.schemes [--size 4096] [--quick]

Each scheme quantizes the same matrix; the result is checked (dequantized shape, and
``matvec`` against dequantize-then-multiply) before it is timed and recorded.
Writes ``benchmarks/results/schemes.json`` and draws ``figures/schemes_sqnr.png``
from that JSON.
"""
from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from benchmarks import common
from benchmarks.common import machine
from refquant import metrics, schemes
from refquant._checks import cli_int


def run(size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((size, size)).astype(np.float32)
    x = rng.standard_normal(size).astype(np.float32)
    calib = rng.standard_normal((256, size)).astype(np.float32)
    rows = []
    for name in tqdm(schemes.names(), desc="schemes", unit="scheme"):
        s = schemes.get(name)
        t0 = time.perf_counter()
        qt = s.quantize(w, calib=calib if s.needs_calib else None)
        seconds = time.perf_counter() - t0
        w_hat = qt.dequantize()
        y = s.matvec(qt, x)
        xq = x if s.act_quant is None else s.act_quant(qt, x[None])[0]  # W8A8 types round x too
        ref = w_hat.astype(np.float64) @ xq
        if s.kernel is not None:   # byte-dot kernels multiply by x rounded to int8 (AWQ: by x / s)
            entry = s.kernel
            w_eff = w_hat * qt.meta["awq_scales"] if entry.prepare_x is not None else w_hat
            ref = w_eff.astype(np.float64) @ entry.x_hat(qt, x)[0]
        if w_hat.shape != w.shape or not np.allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max()):
            raise AssertionError(f"{name}: matvec disagrees with dequantize @ x")
        rows.append(dict(scheme=name, description=s.description, bits_per_weight=qt.bits_per_weight,
                         nbytes=qt.nbytes, sqnr_db=metrics.sqnr_db(w, w_hat), mse=metrics.mse(w, w_hat),
                         max_abs_error=metrics.max_abs_error(w, w_hat), quantize_seconds=seconds))
    return dict(benchmark="schemes", shape=[size, size], distribution="N(0,1)", seed=seed, machine=machine(),
                results=rows)


def plot(data: dict, path) -> None:
    """SQNR vs bits per weight, one labelled dot per scheme (reads only the JSON dict)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if np.isfinite(r["sqnr_db"])]
    fig, ax = plt.subplots(figsize=(12, 8))
    bits, sqnr = [r["bits_per_weight"] for r in rows], [r["sqnr_db"] for r in rows]
    ax.scatter(bits, sqnr, s=22, zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 3, 4, 5, 6, 8, 12, 16])
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlim(min(bits) / 1.15, max(bits) * 1.6)
    ax.set_xlabel("bits per weight (codes + scales + zeros)")
    ax.set_ylabel("SQNR [dB]")
    n = data["shape"]
    ax.set_title(f"SQNR of every registered scheme on a {n[0]}×{n[1]} N(0,1) matrix "
                 "(GPTQ/AWQ minimise output error, not weight error)")
    fig.tight_layout()
    common.label_points(ax, bits, sqnr, [r["scheme"] for r in rows], fontsize=6.5)
    common.finish_figure(fig, ax, path)


def main(argv=None) -> None:
    ap = common.quick_args(__doc__)
    ap.add_argument("--size", type=cli_int(1, 1 << 15), default=4096, help="matrix side (default 4096)")
    args = ap.parse_args(argv)
    data = run(256 if args.quick else args.size)
    path = common.write_json("schemes", data)
    plot(common.read_json("schemes"), common.FIGURES / "schemes_sqnr.png")
    print(f"{'scheme':22s} {'bits/w':>7s} {'SQNR dB':>8s} {'quant s':>8s}")
    for r in data["results"]:
        print(f"{r['scheme']:22s} {r['bits_per_weight']:7.3f} {r['sqnr_db']:8.2f} {r['quantize_seconds']:8.2f}")
    print(f"wrote {path} and {common.FIGURES / 'schemes_sqnr.png'}")


if __name__ == "__main__":
    main()
