"""The roofline of this machine, with the quantized matvec kernels placed on it.

    python -m benchmarks.roofline [--quick]

Measures the roofs -- sustained read bandwidth (numba streaming sum over 1 GiB on all
cores), peak float32 FLOP/s (NumPy BLAS sgemm) and the int8 dot throughput of the W8A8
kernel on cache-resident data -- then times every kernel on the Llama-7B up-projection
(11008 x 4096) and places each as a dot at x = FLOP per byte of weights, y = GFLOP/s
achieved. Batch-1 decode is a matvec (2 FLOP per weight), so FP32 sits at 0.5 FLOP/B,
INT8 near 2 and INT4 near 4: far left of the ridge point, where speed is bytes moved.

Writes ``benchmarks/results/roofline.json`` and draws ``figures/roofline.png`` from it.
"""
from __future__ import annotations

import numpy as np

from benchmarks import kernels as kbench
from benchmarks import common
from benchmarks.common import machine
from benchmarks.machine import median_time, read_bandwidth, sgemm_peak
from refquant import kernels

SHAPE = (11008, 4096)
QUICK_SHAPE = (512, 1024)


def int8_dot_peak(repeats: int = 50) -> dict:
    """Integer multiply-accumulate throughput of the W8A8 kernel on an L2-resident matrix."""
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(256, 2048)).astype(np.int8)          # 512 KiB: stays in L2
    s = np.ones(256, np.float32)
    x = rng.standard_normal(2048).astype(np.float32)
    if not np.allclose(kernels.matvec_w8a8(q, s, x), kernels.matvec_w8a8_ref(q, s, x), rtol=1e-6):
        raise AssertionError("w8a8 kernel disagrees with its twin")
    t = median_time(kernels.matvec_w8a8, [(q, s, x)], repeats)
    return dict(shape=list(q.shape), gops=2 * q.size / t / 1e9)


def run(quick: bool = False) -> dict:
    bw = read_bandwidth(64 << 20 if quick else 1 << 30)
    peak = sgemm_peak(512 if quick else 2048)
    i8 = int8_dot_peak(10 if quick else 50)
    shape = QUICK_SHAPE if quick else SHAPE
    dots = kbench.measure(shape, repeats=5 if quick else 20)
    for d in dots:
        d["intensity"] = d["flops"] / d["weight_bytes"]
        d["gflops"] = d["flops"] / (d["ms"] * 1e-3) / 1e9
        d["pct_of_bandwidth"] = 100 * d["gbs"] / bw["best_gbs"]
    return dict(benchmark="roofline", quick=quick, machine=machine(), read_bandwidth=bw, sgemm=peak, int8_dot=i8,
                ridge_flop_per_byte=peak["gflops"] / bw["best_gbs"], kernel_shape=list(shape), dots=dots,
                decode_dots=minigpt_decode(10 if quick else 50))


def minigpt_decode(repeats: int) -> list[dict]:
    """MiniGPT batch-1 decode, one token with a 32-token KV cache, Linears FP32 / INT8 / INT4.

    Bytes are every weight a token reads (Linears as stored, the tied FP16/FP32 head); FLOPs
    are 2 per weight. The whole model fits in L3 and each token runs ~30 small NumPy/numba
    calls, so these dots show per-call overhead, not the memory roof.
    """
    from minigpt_np import checkpoint, evaluate
    from minigpt_np.model import decode_step, forward

    params, cfg, _ = checkpoint.load()
    prompt = list(b"the farmers have painted the red box => ")[:32]
    rows = []
    for scheme in ("fp32", "int8_channel", "int4_g128"):
        p, lin = evaluate.prepare(params, cfg, scheme)
        cache = None
        for t in prompt:
            _, cache = decode_step(p, t, cache, cfg=cfg, linears=lin)
        ref, _ = decode_step(p, ord("p"), cache, cfg=cfg, linears=lin)
        full, _ = forward(p, np.array([prompt + [ord("p")]]), cfg=cfg, linears=lin)
        # the kernels agree with the model: a token through the byte-dot kernels sees each
        # Linear's input rounded to Q8_0 (0.4-1.1% of max|y| per layer), the forward does not
        gap = np.abs(ref - full[0, -1]).max() / np.abs(full[0, -1]).max()
        if gap > 0.03 or ref.argmax() != full[0, -1].argmax():
            raise AssertionError(f"{scheme}: decode_step disagrees with forward (max gap {gap:.2%} of max logit)")
        t = median_time(lambda c: decode_step(p, ord("p"), c, cfg=cfg, linears=lin), [(cache,)], repeats)
        head = p["token_embd.weight"].size
        nbytes = lin.nbytes + head * (4 if scheme == "fp32" else 2)
        flops = 2 * (sum(p[n + ".weight"].size for n in lin.layers) + head)
        rows.append(dict(label=f"MiniGPT decode {scheme}: {1e-3 / t:.1f}k tok/s", scheme=scheme, ms=t * 1e3,
                         weight_bytes=nbytes, flops=flops, intensity=flops / nbytes, gflops=flops / t / 1e9))
    return rows


def plot(data: dict, path) -> None:
    """Log-log roofline from the JSON dict only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bw = data["read_bandwidth"]["best_gbs"]
    peak = data["sgemm"]["gflops"]
    i8 = data["int8_dot"]["gops"]
    x = np.logspace(-2, 3, 200)
    fig, ax = plt.subplots(figsize=(10, 7))
    ax.plot(x, np.minimum(bw * x, peak), "k-", lw=2, label=f"roof: {bw:.0f} GB/s read, {peak:.0f} GFLOP/s sgemm")
    ax.axhline(i8, color="tab:purple", ls="--", lw=1, label=f"int8 dot (W8A8 kernel, L2-resident): {i8:.0f} GOP/s")
    ridge = data["ridge_flop_per_byte"]
    ax.axvline(ridge, color="0.6", ls=":", lw=1)
    ax.annotate(f"ridge {ridge:.1f} FLOP/B", (ridge, peak), xytext=(5, -15), textcoords="offset points", fontsize=8)
    # kernels cluster at 2-4 FLOP/B: a distinct marker + colour each, named in the legend
    markers = "osD^vP<>Xph*"
    colors = plt.get_cmap("tab20").colors
    for i, d in enumerate(data["dots"]):
        ax.scatter(d["intensity"], d["gflops"], s=45, zorder=3, marker=markers[i % len(markers)],
                   color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], edgecolor="k", linewidth=0.4,
                   label=f"{d['kernel']}: {d['gbs']:.0f} GB/s ({d['pct_of_bandwidth']:.0f}% BW), "
                         f"{d['x_fp32']:.2f}x FP32")
    for i, d in enumerate(data.get("decode_dots", [])):
        ax.scatter(d["intensity"], d["gflops"], marker="*", s=80, zorder=3)
        ax.annotate(d["label"], (d["intensity"], d["gflops"]), fontsize=7, textcoords="offset points",
                    xytext=(6, 4 if i % 2 == 0 else -12))  # alternate sides: the dots sit at one height
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.05, 200)
    ax.set_ylim(1, peak * 3)
    ax.set_xlabel("arithmetic intensity [FLOP per byte of weights]")
    ax.set_ylabel("GFLOP/s")
    shp = "×".join(map(str, data["kernel_shape"]))
    ax.set_title(f"Roofline, {data['machine']['cpus']} cores: batch-1 matvec kernels at {shp}")
    ax.legend(loc="upper left", fontsize=7, ncol=1, framealpha=0.9)
    common.finish_figure(fig, ax, path)


def main(argv=None) -> None:
    args = common.quick_args(__doc__).parse_args(argv)
    data = run(args.quick)
    path = common.write_json("roofline", data)
    plot(common.read_json("roofline"), common.FIGURES / "roofline.png")
    print(f"read bandwidth {data['read_bandwidth']['best_gbs']:.1f} GB/s, sgemm {data['sgemm']['gflops']:.0f} GFLOP/s, "
          f"int8 dot {data['int8_dot']['gops']:.0f} GOP/s, ridge {data['ridge_flop_per_byte']:.1f} FLOP/B")
    print(f"{'kernel':20s} {'FLOP/B':>7s} {'GFLOP/s':>8s} {'GB/s':>7s} {'% BW':>6s} {'x FP32':>7s}")
    for d in data["dots"]:
        print(f"{d['kernel']:20s} {d['intensity']:7.2f} {d['gflops']:8.1f} {d['gbs']:7.1f} {d['pct_of_bandwidth']:6.1f} "
              f"{d['x_fp32']:7.2f}")
    for d in data["decode_dots"]:
        print(f"{d['label']:40s} {d['intensity']:7.2f} {d['gflops']:8.2f}  ({d['ms']:.3f} ms/token)")
    print(f"wrote {path} and {common.FIGURES / 'roofline.png'}")


if __name__ == "__main__":
    main()
