"""The roofline of this machine, with the quantized matvec kernels placed on it.

    python -m benchmarks.roofline [--quick]

Measures the roofs -- sustained read bandwidth with one and with two threads (the fastest
of three streaming readers, ``machine.read_bandwidth``), peak float32 FLOP/s (NumPy BLAS
sgemm) and the int8 byte-dot throughput of the Q8_0 kernel on an L3-resident matrix --
then times every kernel on the Llama-7B up-projection (11008 x 4096) interleaved with
NumPy FP32, once per thread count (``benchmarks.kernels``), and places each as a dot at
x = FLOP per byte the kernel reads, y = GFLOP/s achieved. Batch-1 decode is a matvec
(2 FLOP per weight), so FP32 sits at 0.5 FLOP/B, INT8 near 2 and INT4 near 4: far left
of the ridge point, where speed is bytes moved.

Whole-model dots join them: SmolLM2-135M's decode per GGUF type on the compiled step,
measured in this run (``smollm2_decode``; ``--quick``: read from
``benchmarks/results/decode.json`` and marked when that file comes from another CPU), and
llama.cpp's tg64 on the same files from ``decode.json`` when it was measured on this CPU
(``benchmarks.decode --llama-bench``): FLOPs per token over the weight bytes a token
reads, at the measured tokens/s. The 2-thread roof is the fastest reader of the run,
these decode steps included. MiniGPT's compiled decode (one thread, FP32 / INT8 / INT4
Linears) is measured too (``decode_dots`` in the JSON) but not drawn: its 13 MB of weights
fit in L3, so it reads faster than any memory roof and would sit above it.

Writes ``benchmarks/results/roofline.json`` and draws ``figures/roofline.png`` from it.
"""
from __future__ import annotations

import numpy as np

from benchmarks import common
from benchmarks import kernels as kbench
from benchmarks.common import machine
from benchmarks.machine import median_time, sgemm_peak  # noqa: F401 (sgemm_peak runs in a worker)

SHAPE = (11008, 4096)
QUICK_SHAPE = (512, 1024)


def int8_dot_peak(repeats: int = 50) -> dict:
    """Byte-dot throughput (2 ops per weight) of the Q8_0 kernel on a 1024 x 4096 matrix that
    stays in L3 (4.25 MB), one thread, the compiled kernel called directly (the Python
    wrapper's ~25 us per call would otherwise dominate): the int8 ceiling the kernels reach."""
    from refquant.gguf import quants
    from refquant.kernels import bytedot

    rng = np.random.default_rng(0)
    w = rng.standard_normal((1024, 4096)).astype(np.float32)
    x = rng.standard_normal(4096).astype(np.float32)
    raw = quants.quantize(w, "Q8_0")
    p = quants.pack_ggml(raw, "Q8_0", 4096)
    xq, dx, xs = bytedot.quantize_x_q8_0(x[None], p.nb)
    ref = quants.dequantize(raw, "Q8_0", w.shape).astype(np.float64) @ (xq.reshape(-1, 32) * dx.reshape(-1, 1)).reshape(-1)
    if not np.allclose(bytedot.run(p, xq, dx, xs)[0], ref, rtol=1e-4, atol=1e-3):
        raise AssertionError("Q8_0 kernel disagrees with dequantize")
    tier = bytedot.backend()
    kernel = bytedot.kernel(tier, p)
    out = np.empty((1, w.shape[0]), np.float32)
    args = (p.qs, p.qh, p.d, bytedot._DUMMY_U8, bytedot._DUMMY_U16, bytedot._DUMMY_U8, xq, np.abs(xq), dx, xs,
            np.zeros((2, 1, 8), np.float32), out)
    t = median_time(kernel, [args], repeats)
    from benchmarks.machine import int8_instruction_peak

    return dict(shape=[1024, 4096], gops=2 * w.size / t / 1e9, tier=tier,
                instruction=int8_instruction_peak(tier, rounds=200_000 if repeats < 50 else 2_000_000))


def run(quick: bool = False) -> dict:
    from tqdm import tqdm

    shape = QUICK_SHAPE if quick else SHAPE
    # everything is measured inside the workers, each with fixed thread counts: the byte-dot
    # ceiling and MiniGPT's decode with one thread, sgemm's peak with all of them
    # --quick leaves MiniGPT out (its compiled steps take ~20 s to build; the README's main
    # job, which CI runs, draws them, and tests/test_compiled.py checks that path)
    # and runs one worker (one thread) only: each worker compiles every kernel again
    minigpt = (10, ()) if quick else (50,)
    extras = {1: (("int8_dot_peak", (10 if quick else 50,)), ("minigpt_decode", minigpt)),
              2: (("sgemm_peak", (512 if quick else 2048,)),)}
    thread_counts = kbench.THREADS[:1] if quick else kbench.THREADS
    if quick:
        extras = {1: extras[1] + extras[2]}
    runs, dots, found = [], [], {}
    for threads in tqdm(thread_counts, desc="kernels", unit="thread count"):
        r = kbench.in_worker(shape, threads, 5 if quick else 31, extras.get(threads, ()), quick=quick)
        found.update(r["extras"])
        runs.append(dict(threads=threads, tier=r["tier"], clock=r["clock"], read_bandwidth=r["read_bandwidth"]))
        for d in r["results"]:
            d["intensity"] = d["flops"] / d["weight_bytes"]
            d["gflops"] = d["flops"] / (d["ms"] * 1e-3) / 1e9
            dots.append(d)
    smol = smollm2_dots() if quick else smollm2_decode()
    lbench = llama_bench_dots()
    two = max(runs, key=lambda r: r["threads"])
    for d in smol + lbench:     # the roof is the fastest reader: the decode steps' own read rates too
        gbs = d["gflops"] / d["intensity"]
        if gbs > two["read_bandwidth"]["best_gbs"] and not d.get("other_host"):
            two["read_bandwidth"] = dict(two["read_bandwidth"], best_gbs=gbs, reader=d["reader"])
    bw = max(runs, key=lambda r: r["read_bandwidth"]["best_gbs"])["read_bandwidth"]
    peak = found["sgemm_peak"]
    return dict(benchmark="roofline", quick=quick, machine=machine(), runs=runs, read_bandwidth=bw, sgemm=peak,
                int8_dot=found["int8_dot_peak"], ridge_flop_per_byte=peak["gflops"] / bw["best_gbs"],
                kernel_shape=list(shape), dots=dots, decode_dots=found["minigpt_decode"],
                smollm2_dots=smol, llama_bench_dots=lbench)


def smollm2_decode(n: int = 16, rounds: int = 3) -> list[dict]:
    """SmolLM2 decode per type measured here, in this run (``benchmarks.decode``'s files,
    check and lockstep: ``n`` tokens after its prompt, ``rounds`` rounds, all threads): the
    dots ``smollm2_dots`` reads from ``decode.json`` otherwise."""
    import tempfile
    from pathlib import Path

    import numba

    from benchmarks import decode
    from minigpt_np import compiled, llama
    from minigpt_np.tokenizer import Tokenizer

    src = llama.default_model()
    sessions, bytes_ = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = decode.write_files(src, Path(tmp), decode.TYPES)
        for t, path in paths.items():
            params, cfg, meta = llama.load(path, dtype="stored")
            sess = compiled.Llama(params, cfg, n_ctx=128)
            tok = Tokenizer(meta)
            decode.verify(params, cfg, sess, tok.encode(llama.reference_text())[:16])
            sessions[t], bytes_[t] = sess, sess.weight_bytes
        ids = tok.encode(decode.PROMPT)
        times = {t: [] for t in sessions}
        for _ in range(rounds):
            got, _ = decode.lockstep(sessions, ids, n)
            for t in sessions:
                times[t] += got[t]
    flops = decode.flops_per_token(params)
    out = []
    for t, ts in times.items():
        tps = 1 / float(np.median(ts))
        gbs = bytes_[t] * tps / 1e9
        out.append(dict(label=f"SmolLM2 {t}: {tps:.0f} tok/s, {gbs:.1f} GB/s", type=t, tokens_per_s=tps,
                        weight_bytes=bytes_[t], intensity=flops / bytes_[t], gflops=flops * tps / 1e9,
                        other_host=False, host=machine().get("cpu"), threads=numba.get_num_threads(),
                        reader=f"SmolLM2 {t} decode step"))
    return out


def llama_bench_dots(here: dict | None = None) -> list[dict]:
    """llama.cpp's tg64 per type from ``decode.json`` (``benchmarks.decode --llama-bench``),
    on SmolLM2's weight bytes, when that file was measured on this CPU (else none: another
    host's llama.cpp says nothing about this roof)."""
    try:
        data = common.read_json("decode")
    except FileNotFoundError:
        return []
    flops = data.get("flops_per_token")
    if not data.get("llama_bench") or not flops or data.get("machine", {}).get("cpu") != (here or machine()).get("cpu"):
        return []
    return [dict(label=f"llama.cpp {r['type']}: {r['llama_bench_tokens_per_s']:.0f} tok/s", type=r["type"],
                 tokens_per_s=r["llama_bench_tokens_per_s"], intensity=flops / r["weight_bytes"],
                 gflops=flops * r["llama_bench_tokens_per_s"] / 1e9, reader=f"llama.cpp {r['type']} tg64")
            for r in data["results"] if r.get("engine") == "compiled" and r.get("llama_bench_tokens_per_s")]


def minigpt_decode(repeats: int, schemes=("fp32", "int8_channel", "int4_g128")) -> list[dict]:
    """MiniGPT batch-1 decode on the compiled step (``minigpt_np.compiled.MiniGPT``), one
    token after a 40-token prompt, Linears FP32 / INT8 / INT4, checked against the NumPy
    forward first (kernel Linears: within the x-rounding bound of ``tests/test_compiled.py``).

    Bytes are every weight a token reads (Linears as stored, the tied head in float32);
    FLOPs are 2 per weight. The whole model fits in L3, so these dots are not about the
    memory roof (README)."""
    from minigpt_np import checkpoint, compiled, evaluate
    from minigpt_np.model import forward

    params, cfg, _ = checkpoint.load()
    prompt = list(b"the farmers have painted the red box => ")[:40]
    rows = []
    for scheme in schemes:
        p, lin = evaluate.prepare(params, cfg, scheme)
        sess = compiled.MiniGPT(p, cfg, lin)
        got = sess.prefill(prompt[:16])
        ref, _ = forward(p, np.array([prompt[:16]]), cfg=cfg, linears=lin)   # <= 16 tokens: the same kernels
        if (got.argmax(1) != ref[0].argmax(1)).mean() > 0.1 or np.abs(got - ref[0]).max() > 0.05 * np.abs(ref).max():
            raise AssertionError(f"{scheme}: the compiled MiniGPT disagrees with forward")
        sess.prefill(prompt[16:])
        pos = sess.pos

        def step():
            sess.pos = pos
            sess.step(ord("p"))
        t = median_time(step, [()], repeats)
        flops = 2 * (sum(p[n + ".weight"].size for n in lin.layers) + p["token_embd.weight"].size)
        rows.append(dict(label=f"MiniGPT compiled decode {scheme}: {1e-3 / t:.1f}k tok/s", scheme=scheme,
                         ms=t * 1e3, weight_bytes=sess.weight_bytes, flops=flops,
                         intensity=flops / sess.weight_bytes, gflops=flops / t / 1e9))
    return rows


def smollm2_dots(here: dict | None = None) -> list[dict]:
    """SmolLM2 decode per GGUF type on the compiled step, from ``benchmarks/results/decode.json``
    (``python -m benchmarks.decode``; both cores): weight bytes read per token and GFLOP/s.
    A file measured on another CPU than ``here`` (``machine()``) gives dots marked
    ``other_host`` and labelled with that CPU: they do not belong under this machine's roof."""
    try:
        data = common.read_json("decode")
    except FileNotFoundError:
        return []
    flops = data.get("flops_per_token")
    cpu = data.get("machine", {}).get("cpu") or "an unrecorded CPU"
    other = cpu != (here or machine()).get("cpu")
    where = " (other host)" if other else ""
    return [dict(label=f"SmolLM2 {r['type']}: {r['decode_tokens_per_s']:.0f} tok/s, {r['gbs']:.1f} GB/s{where}",
                 type=r["type"], tokens_per_s=r["decode_tokens_per_s"], weight_bytes=r["weight_bytes"],
                 intensity=flops / r["weight_bytes"], gflops=flops * r["decode_tokens_per_s"] / 1e9,
                 other_host=other, host=cpu)
            for r in data.get("results", []) if r.get("engine") == "compiled" and flops]


def plot(data: dict, path) -> None:
    """Log-log roofline from the JSON dict only: one roof per thread count, the kernels'
    one-thread dots filled, their two-thread dots hollow, the same colour per kernel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = data["sgemm"]["gflops"]
    i8 = data["int8_dot"]["gops"]
    x = np.logspace(-2, 3, 200)
    fig, ax = plt.subplots(figsize=(16, 7.5))
    for run, ls in zip(data["runs"], ("-", "--")):
        bw = run["read_bandwidth"]["best_gbs"]
        ax.plot(x, np.minimum(bw * x, peak), "k", ls=ls, lw=1.8,
                label=f"roof, {run['threads']} thread(s): {bw:.1f} GB/s read ({run['read_bandwidth']['reader']}), "
                      f"{peak:.0f} GFLOP/s sgemm")
    ax.axhline(i8, color="tab:purple", ls=":", lw=1,
               label=f"int8 byte dot (Q8_0 kernel, L3-resident, 1 thread, {data['int8_dot']['tier']}): {i8:.0f} GOP/s")
    ins = data["int8_dot"].get("instruction")
    if ins:     # the byte-dot instructions' own ceiling: what a prompt's products are held against
        top = ins["gops_per_thread"] * max(r["threads"] for r in data["runs"])
        ax.axhline(ins["gops_per_thread"], color="tab:purple", ls="-", lw=1,
                   label=f"int8 dot instructions' peak ({ins['tier']}, operands in L1/registers), 1 thread: "
                         f"{ins['gops_per_thread']:.0f} GOP/s")
        ax.axhline(top, color="tab:purple", ls="--", lw=1,
                   label=f"the same x {max(r['threads'] for r in data['runs'])} threads: {top:.0f} GOP/s (prompts: benchmarks.batch)")
    kinds = list(dict.fromkeys(d["kernel"] for d in data["dots"]))
    colors = plt.get_cmap("tab20").colors
    markers = "osD^vP<>Xph*"
    for i, k in enumerate(kinds):
        c, mk = colors[i % 20], markers[i % len(markers)]
        ds = {d["threads"]: d for d in data["dots"] if d["kernel"] == k}
        one, two = ds.get(1), ds.get(2)
        label = k
        if one:
            ax.scatter(one["intensity"], one["gflops"], s=50, marker=mk, color=c, edgecolor="k", lw=0.4, zorder=3)
            label += f": 1T {one['x_fp32']:.1f}x FP32 ({one['pct_of_bandwidth']:.0f}% roof)"
        if two:
            ax.scatter(two["intensity"], two["gflops"], s=50, marker=mk, facecolor="none", edgecolor=c, lw=1.2,
                       zorder=3)
            label += f", 2T {two['x_fp32']:.1f}x ({two['pct_of_bandwidth']:.0f}%)"
        ax.scatter([], [], marker=mk, color=c, edgecolor="k", lw=0.4, label=label)
    smol = sorted(data.get("smollm2_dots", []), key=lambda d: -d["gflops"])
    for i, d in enumerate(smol):   # labels stacked in a column to the right of the kernels' dots
        ax.scatter(d["intensity"], d["gflops"], marker="P", s=90, zorder=4, lw=0.5 if not d.get("other_host") else 1.2,
                   color="tab:red" if not d.get("other_host") else "none", edgecolor="k" if not d.get("other_host")
                   else "tab:red")   # hollow: measured on another host
        ax.annotate(d["label"], (d["intensity"], d["gflops"]), xytext=(7, 220 / 1.3 ** i), textcoords="data",
                    fontsize=7, color="tab:red", arrowprops=dict(arrowstyle="-", color="tab:red", lw=0.4, alpha=0.6))
    if data.get("smollm2_dots"):
        away = smol[0].get("other_host")
        ax.scatter([], [], marker="P", color="none" if away else "tab:red", edgecolor="tab:red" if away else "k",
                   lw=0.5, label="SmolLM2-135M decode, compiled step, 2 threads ("
                   + ("decode.json" if data.get("quick") else "measured in this run") + "): GB/s = weight "
                                 "bytes per token x tokens/s" + (f"; hollow: measured on another host, "
                                                                 f"{smol[0]['host']}" if away else ""))
    for d in data.get("llama_bench_dots", []):
        ax.scatter(d["intensity"], d["gflops"], marker="x", s=60, color="tab:blue", zorder=4, lw=1.2)
    if data.get("llama_bench_dots"):
        ax.scatter([], [], marker="x", color="tab:blue", lw=1.2,
                   label="llama.cpp llama-bench tg64 on the same SmolLM2 files, 2 threads (decode.json, this CPU): "
                         + ", ".join(f"{d['type']} {d['tokens_per_s']:.0f}" for d in data["llama_bench_dots"])
                         + " tok/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.05, 200)
    ins = data["int8_dot"].get("instruction")
    ax.set_ylim(1, 3 * max(peak, ins["gops_per_thread"] * max(r["threads"] for r in data["runs"]) if ins else 0))
    ax.set_xlabel("arithmetic intensity [FLOP per byte the matvec reads]")
    ax.set_ylabel("GFLOP/s")
    shp = "×".join(map(str, data["kernel_shape"]))
    ax.set_title(f"Roofline, {data['machine']['cpus']} cores: batch-1 matvec at {shp} "
                 f"(filled: 1 thread, hollow: 2 threads)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6.5, ncol=1, framealpha=0.9)
    common.finish_figure(fig, ax, path)


def main(argv=None) -> None:
    args = common.quick_args(__doc__).parse_args(argv)
    data = run(args.quick)
    path = common.write_json("roofline", data)
    plot(common.read_json("roofline"), common.FIGURES / "roofline.png")
    print(f"sgemm {data['sgemm']['gflops']:.0f} GFLOP/s, int8 dot {data['int8_dot']['gops']:.0f} GOP/s, "
          f"ridge {data['ridge_flop_per_byte']:.1f} FLOP/B")
    for r in data["runs"]:
        bw = r["read_bandwidth"]
        print(f"\n{r['threads']} thread(s), tier {r['tier']}: roof {bw['best_gbs']:.1f} GB/s ({bw['reader']})")
        print(f"{'kernel':16s} {'ms':>8s} {'GB/s':>7s} {'% roof':>7s} {'x FP32':>7s}")
        for d in data["dots"]:
            if d["threads"] == r["threads"]:
                print(f"{d['kernel']:16s} {d['ms']:8.3f} {d['gbs']:7.1f} {d['pct_of_bandwidth']:7.1f} {d['x_fp32']:7.2f}")
    for d in data["decode_dots"]:
        print(f"{d['label']:40s} {d['intensity']:7.2f} {d['gflops']:8.2f}  ({d['ms']:.3f} ms/token)")
    print(f"wrote {path} and {common.FIGURES / 'roofline.png'}")


if __name__ == "__main__":
    main()
