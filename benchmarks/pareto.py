"""Every registered scheme on MiniGPT: bits per weight vs test perplexity and verb-tense accuracy.

    python -m benchmarks.pareto [--quick] [--limit N] [--schemes a,b,...]
    python -m benchmarks.pareto --model smollm2 [--quick] [--schemes a,b,...] [--dask | --scheduler ADDRESS]

(``--model smollm2``: the same study on SmolLM2-135M by KL divergence, one task per scheme,
serially or on dask.distributed: ``benchmarks.pareto_smollm2``.)

For each scheme applied to all 16 Linears of the committed MiniGPT (embeddings FP16, as is
standard; calibrated schemes quantized layer by layer on 128 training sequences): bytes
per weight of the Linears (everything stored: codes, scales, zeros, codebooks, g_idx,
smoothing factors), total model bytes (embeddings at FP16), test perplexity per byte,
verb-tense accuracy (overall, held-out verbs, per tense x aspect) and quantization time.
The test split is the first ``--limit`` lines (1000 by default; the checkpoint's
metadata records the full-split FP32 figures). Writes ``benchmarks/results/pareto.json``
and draws ``figures/pareto_ppl.png`` (perplexity vs bits per weight with the Pareto
frontier), ``figures/pareto_kld.png`` (mean KL divergence from FP32 vs bits per weight,
with its frontier) and ``figures/verb_tense.png`` (accuracy drop vs bits per weight).

KL divergence (``refquant.metrics.kl_divergence``, llama.cpp's ``--kl-divergence``
statistics): at every next-byte position of the test lines' text, the quantized model's
distribution against FP32's on the same lines; mean ± standard error, median, p99, max,
same top byte, perplexity ratio (the ``kl`` entry of each row). It separates schemes
whose perplexities tie: most bytes are predicted almost surely, which hides the
difference in perplexity but not in the distributions.

Every quantized model is also exported to GGUF (GGML types as themselves, other schemes
as their stored parts, see ``minigpt_np.checkpoint.save_quantized``), read back, and
checked: dequantized weights identical, logits within float round-off; the JSON records
file size and the check.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks import common
from minigpt_np import evaluate
from refquant import schemes
from refquant._checks import cli_int

QUICK_SCHEMES = ("fp32", "fp16", "int8_channel", "int4_g128", "q4_k")


def run(quick: bool = False, limit: int | None = None, names=None) -> dict:
    names = list(names or (QUICK_SCHEMES if quick else schemes.names()))
    limit = limit or (60 if quick else 1000)
    rows = []
    export_dir = Path(tempfile.mkdtemp(prefix="refquant-export-"))
    t0 = time.time()
    ref = evaluate.evaluate("fp32", limit=limit, progress=False, keep_logits=True)   # the KLD reference
    ref["seconds"] = time.time() - t0
    for name in tqdm(names, desc="schemes", unit="scheme"):
        t0 = time.time()
        r = dict(ref) if name == "fp32" else evaluate.evaluate(name, limit=limit, progress=False,
                                                                export_dir=export_dir, keep_logits=True)
        r.setdefault("seconds", time.time() - t0)
        r["bits_per_weight"] = 8 * r["linear_bytes"] / r["linear_weights"]
        r["kl"] = common.kl_columns(ref["logits"], r.pop("logits"), r.pop("tokens"))
        rows.append(r)
    shutil.rmtree(export_dir, ignore_errors=True)
    emb = embeddings_pass(names, min(limit, 300))
    sens = sensitivity(min(limit, 300), ("int4_g128",) if quick else ("int4_g128", "int3_g128"))
    mixed = mixed_precision(sens, limit)
    fp32 = next((r for r in rows if r["scheme"] == "fp32"), None)
    # the embeddings pass scores fewer lines, so it has its own FP32 reference
    emb_ref = evaluate.evaluate("fp32", limit=min(limit, 300), progress=False) if emb else None
    for rs, ref in ((rows + [mixed], fp32), (emb, emb_ref)):
        for r in rs if ref else ():
            r["ppl_gap_pct"] = 100 * (r["perplexity"] / ref["perplexity"] - 1)
            r["accuracy_drop_pp"] = 100 * (ref["accuracy"] - r["accuracy"])
    for r in emb:
        r["model_bits_per_weight"] = 8 * r["model_bytes"] / r["model_weights"]
    return dict(benchmark="pareto", quick=quick, limit=limit, machine=common.machine(), results=rows,
                embeddings_quantized=emb, embeddings_limit=min(limit, 300), sensitivity=sens, mixed=mixed)


def embeddings_pass(names, limit: int) -> list[dict]:
    """The weight-only schemes again with the (tied) token embedding quantized too."""
    from minigpt_np import checkpoint

    params, _, _ = checkpoint.load()
    n_weights = sum(v.size for v in params.values())
    todo = common.weight_only(names)
    rows = []
    for name in tqdm(todo, desc="embeddings quantized", unit="scheme"):
        r = evaluate.evaluate(name, quantize_embeddings=True, limit=limit, progress=False)
        r["bits_per_weight"] = 8 * r["linear_bytes"] / r["linear_weights"]
        r["model_weights"] = n_weights
        rows.append(r)
    return rows


def _fp16_embeddings(params):
    p = dict(params)
    for k in ("token_embd.weight", "position_embd.weight"):
        p[k] = p[k].astype(np.float16).astype(np.float32)
    return p


def sensitivity(limit: int, schemes_=("int4_g128", "int3_g128")) -> list[dict]:
    """Perplexity when only one Linear is quantized (RTN), for each layer and scheme."""
    from minigpt_np import checkpoint, corpus
    from minigpt_np.model import Linears, linear_names

    params, cfg, _ = checkpoint.load()
    p = _fp16_embeddings(params)
    test = corpus.make_splits().test[:limit]
    ref = evaluate.score(p, cfg, Linears(p, cfg, "fp32"), test, progress=False)  # the same lines, all FP32
    rows = []
    for s in schemes_:
        for name in tqdm(linear_names(cfg), desc=f"sensitivity {s}", unit="layer"):
            lin = Linears(p, cfg, lambda n, name=name, s=s: s if n == name else "fp32")
            r = evaluate.score(p, cfg, lin, test, progress=False)
            rows.append(dict(scheme=s, layer=name, perplexity=r["perplexity"], accuracy=r["accuracy"],
                             ppl_gap_pct=100 * (r["perplexity"] / ref["perplexity"] - 1), lines=len(test),
                             fp32_perplexity=ref["perplexity"]))
    return rows


def mixed_precision(sens: list[dict], limit: int, k: int = 4, high="int8_channel", low="int4_g128") -> dict:
    """The ``k`` layers most sensitive to ``low`` kept at ``high``, the rest at ``low``."""
    from minigpt_np import checkpoint, corpus
    from minigpt_np.model import Linears

    params, cfg, _ = checkpoint.load()
    p = _fp16_embeddings(params)
    ranked = sorted((r for r in sens if r["scheme"] == low), key=lambda r: -r["perplexity"])
    keep = {r["layer"] for r in ranked[:k]}
    lin = Linears(p, cfg, lambda n: high if n in keep else low)
    r = evaluate.score(p, cfg, lin, corpus.make_splits().test[:limit], progress=False)
    weights = sum(params[n + ".weight"].size for n in lin.layers)
    return dict(scheme=f"mixed: {k} layers {high}, rest {low}", high_layers=sorted(keep), perplexity=r["perplexity"],
                accuracy=r["accuracy"], bits_per_weight=8 * lin.nbytes / weights)


def frontier(points):
    """Indices of the Pareto-optimal points (lower bits and lower perplexity), by bits."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    best, out = np.inf, []
    for i in order:
        if points[i][1] < best:
            best = points[i][1]
            out.append(i)
    return out


def _bits_axis(ax, bits, ticks) -> None:
    """The x axis every Pareto figure shares: bits per weight on a log2 scale."""
    import matplotlib

    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlim(min(bits) / 1.15, max(bits) * 1.6)
    ax.set_xlabel("bits per weight of the Linears (everything stored)")


def plot(data: dict, fig_dir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if r["scheme"] != "fp32"]
    fp32 = next((r for r in data["results"] if r["scheme"] == "fp32"), None)
    bits = [r["bits_per_weight"] for r in rows]
    for key, fname, ylabel in (
        ("ppl_gap_pct", "pareto_ppl.png", "test perplexity gap to FP32 [%] (per-byte perplexity)"),
        ("accuracy_drop_pp", "verb_tense.png", "verb-tense accuracy drop vs FP32 [pp]"),
    ):
        fig, ax = plt.subplots(figsize=(12, 8))
        ys = [r.get(key, np.nan) for r in rows]
        ax.scatter(bits, ys, s=22, zorder=3)
        if key == "ppl_gap_pct":
            f = frontier(list(zip(bits, ys)))
            ax.plot([bits[i] for i in f], [ys[i] for i in f], "r-", lw=1, label="Pareto frontier")
        ax.axhline(0.0, color="k", ls="--", lw=1, label=f"FP32 (perplexity {fp32['perplexity']:.4f}, accuracy "
                   f"{100 * fp32['accuracy']:.1f}%)" if fp32 else "FP32")
        mixed = data.get("mixed")
        if mixed and key in mixed:
            ax.scatter([mixed["bits_per_weight"]], [mixed[key]], marker="*", s=140, color="tab:red", zorder=4,
                       label=mixed["scheme"])
        _bits_axis(ax, bits, [2, 3, 4, 5, 6, 8, 12, 16, 32])
        lo, hi = np.nanmin(ys + [0.0]), np.nanmax(ys + [0.0])
        pad = 0.08 * (hi - lo) or 0.1  # all points on the FP32 line: any visible range
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_ylabel(ylabel if key != "accuracy_drop_pp" else f"{ylabel} (one test line = {100 / data['limit']:.2g} pp)")
        ax.set_title(f"MiniGPT, every scheme: first {data['limit']} test lines, embeddings FP16")
        ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        common.label_points(ax, bits, ys, [r["scheme"] for r in rows], fontsize=6.5)
        common.finish_figure(fig, ax, fig_dir / fname)


def plot_kld(path, minigpt: dict | None = None, smollm2: dict | None = None) -> None:
    """Mean KLD from the reference (log scale, ± se) against bits per weight, with the
    Pareto frontier: one panel per model that has results (given, or read from
    ``pareto.json`` / ``pareto_smollm2.json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name, data in (("pareto", minigpt), ("pareto_smollm2", smollm2)):
        if data is None and (common.RESULTS / f"{name}.json").is_file():
            data = common.read_json(name)
        every = [r for r in (data or {}).get("results", ()) if r["scheme"] != "fp32" and r.get("kl")]
        rows = [r for r in every if r["kl"]["kld_mean"] > 0]
        if rows:
            panels.append((name, data, rows, [r["scheme"] for r in every if r["kl"]["kld_mean"] == 0]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(11 * len(panels), 8), squeeze=False)
    for ax, (name, data, rows, zero) in zip(axes[0], panels):
        bits = [r["bits_per_weight"] for r in rows]
        ys = [r["kl"]["kld_mean"] for r in rows]
        ax.errorbar(bits, ys, yerr=[r["kl"]["kld_se"] for r in rows], fmt="o", ms=4, capsize=2, zorder=3)
        f = frontier(list(zip(bits, ys)))
        ax.plot([bits[i] for i in f], [ys[i] for i in f], "r-", lw=1, label="Pareto frontier (registered schemes)")
        files = [r for r in data.get("files", ()) if r.get("kl")]
        if files:   # GPTQ / AWQ written as GGUF files and read back (benchmarks.pareto_smollm2.gguf_task)
            ax.errorbar([r["bits_per_weight"] for r in files], [r["kl"]["kld_mean"] for r in files],
                        yerr=[r["kl"]["kld_se"] for r in files], fmt="*", ms=10, color="tab:red", capsize=2,
                        zorder=4, label="GGUF files llama.cpp runs, read back")
        _bits_axis(ax, bits, [2, 3, 4, 5, 6, 8, 12, 16])
        ax.set_yscale("log")
        n = rows[0]["kl"]["n"]
        if name == "pareto":
            ax.set_ylabel("mean KL divergence from the reference per position [nats] (± se)")
            ax.set_title(f"MiniGPT: KLD from FP32 over {n} next-byte positions\n"
                         f"(first {data['limit']} test lines, embeddings FP16)")
        else:
            ax.set_title(f"SmolLM2-135M: KLD from the shipped Q4_1 model (dequantized) over {n} tokens\n"
                         f"of pydoc_data.topics, calibration on {data['calib_sequences']} x {data['calib_length']} "
                         "later tokens, embeddings as shipped")
        if zero:   # a log axis has no 0: say which schemes reproduce the reference exactly
            ax.text(0.01, 0.02, f"KLD exactly 0 (the reference's own grid): {', '.join(zero)}", ha="left",
                    va="bottom", transform=ax.transAxes, fontsize=8)
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    for ax, (_, data, rows, _) in zip(axes[0], panels):
        rows = rows + [dict(r, scheme=f"{r['method']} -> {r['type']} file") for r in data.get("files", ()) if r.get("kl")]
        common.label_points(ax, [r["bits_per_weight"] for r in rows], [r["kl"]["kld_mean"] for r in rows],
                            [r["scheme"] for r in rows], fontsize=6.5)
    common.finish_figure(fig, axes[0][-1], path)


def plot_sensitivity(data: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sens = data["sensitivity"]
    layers = list(dict.fromkeys(r["layer"] for r in sens))
    fig, ax = plt.subplots(figsize=(10, 5))
    kinds = list(dict.fromkeys(r["scheme"] for r in sens))
    width = 0.8 / len(kinds)
    for i, k in enumerate(kinds):
        vals = [next(r["ppl_gap_pct"] for r in sens if r["scheme"] == k and r["layer"] == lay) for lay in layers]
        ax.bar(np.arange(len(layers)) + i * width, vals, width, label=f"only this layer {k} (RTN)")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(layers)) + width * (len(kinds) - 1) / 2)
    ax.set_xticklabels([lay.replace("blk.", "") for lay in layers], rotation=60, fontsize=7)
    ax.set_ylabel("test perplexity gap to FP32 [%]")
    ax.set_title(f"Per-layer sensitivity: one Linear quantized, the rest FP32 (first {sens[0]['lines']} test lines, "
                 f"FP32 perplexity {sens[0]['fp32_perplexity']:.4f})")
    ax.legend(fontsize=8)
    common.finish_figure(fig, ax, path)


def print_table(data: dict) -> None:
    print(f"{'scheme':24s} {'bpw':>7s} {'ppl':>8s} {'gap %':>7s} {'KLD':>9s} {'se':>8s} {'acc %':>7s} {'held %':>7s} "
          f"{'s':>6s}")
    for r in sorted(data["results"], key=lambda r: r["bits_per_weight"]):
        print(f"{r['scheme']:24s} {r['bits_per_weight']:7.3f} {r['perplexity']:8.4f} {r.get('ppl_gap_pct', 0):7.2f} "
              f"{r['kl']['kld_mean']:9.2e} {r['kl']['kld_se']:8.1e} "
              f"{100 * r['accuracy']:7.2f} {100 * r['heldout_accuracy']:7.2f} {r['seconds']:6.1f}")


def main(argv=None) -> None:
    ap = common.quick_args(__doc__)
    ap.add_argument("--model", default="minigpt", choices=["minigpt", "smollm2"],
                    help="smollm2: benchmarks.pareto_smollm2 (KL divergence on the real model)")
    ap.add_argument("--limit", type=cli_int(1, 1 << 30), default=None, help="MiniGPT: the first N test lines")
    ap.add_argument("--schemes", default=None, help="comma-separated scheme names (default: all)")
    ap.add_argument("--scheduler", default=None, help="SmolLM2: a dask.distributed scheduler address")
    ap.add_argument("--dask", action="store_true", help="SmolLM2: one task per scheme on a dask LocalCluster")
    ap.add_argument("--workdir", default=None, help="SmolLM2: where the reference logits go (remote workers "
                    "must see it, and the model, at the same path)")
    args = ap.parse_args(argv)
    names = args.schemes.split(",") if args.schemes else None
    if args.model == "smollm2":
        from benchmarks import pareto_smollm2

        data = pareto_smollm2.run(args.quick, names, scheduler=args.scheduler, dask=args.dask, workdir=args.workdir)
        path = common.write_json("pareto_smollm2", data)
        plot_kld(common.FIGURES / "pareto_kld.png", smollm2=data)
        pareto_smollm2.print_table(data)
        print(f"{len(data['results']) + len(data['embeddings_quantized'])} tasks in {data['seconds_total']:.0f} s; "
              f"wrote {path}")
        return
    data = run(args.quick, args.limit, names)
    path = common.write_json("pareto", data)
    plot(data, common.FIGURES)
    plot_kld(common.FIGURES / "pareto_kld.png", minigpt=data)
    plot_sensitivity(data, common.FIGURES / "sensitivity.png")
    print_table(data)
    m = data["mixed"]
    print(f"{m['scheme']}: {m['bits_per_weight']:.3f} bpw, ppl {m['perplexity']:.4f}, "
          f"acc {100 * m['accuracy']:.2f}% (int8 layers: {', '.join(m['high_layers'])})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
