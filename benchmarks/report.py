"""Write the README's results section from the benchmark JSON (never by hand).

    python -m benchmarks.report

Replaces everything between ``<!-- results:start -->`` and ``<!-- results:end -->`` in
README.md with tables generated from ``benchmarks/results/pareto.json`` (every scheme on
MiniGPT, with the seeds' targets beside the measured values) and the figures.
``tests/test_readme.py`` checks that the README matches what this script generates.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks import common
from refquant._atomic import atomic_open

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
TARGETS = {  # scheme: (our bar on the perplexity gap in %, the seed's bar or None)
    "int8_tensor": (0.5, 5.0), "int8_channel": (0.5, 5.0), "int4_g128": (15.0, None), "gptq_int4_g128": (3.0, None),
}
ACC_TARGETS = {"int8_tensor": (0.5, 2.0), "int8_channel": (0.5, 2.0)}  # accuracy drop in pp


def _target(bar, seed, value, unit) -> str:
    mark = "✓" if value < bar else "✗ missed"
    return f"< {bar}{unit}" + (f" (seed: < {seed}{unit})" if seed else "") + f" {mark}"


def section(data: dict) -> str:
    rows = sorted(data["results"], key=lambda r: (r["bits_per_weight"], r["perplexity"]))
    by = {r["scheme"]: r for r in rows}
    fp32 = by["fp32"]
    out = [f"MiniGPT (4 layers, d 256; FP32 test perplexity {fp32['perplexity']:.4f} per byte, verb-tense "
           f"accuracy {100 * fp32['accuracy']:.2f}%), first {data['limit']} test lines, embeddings FP16, "
           "from `python -m benchmarks.pareto` (`python -m benchmarks.report` writes this section):", "",
           "| scheme | bits/weight | model MB | test ppl | ppl gap | target | verb-tense acc | drop (pp) | target | "
           "held-out verbs | quantize + eval s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, a = TARGETS.get(r["scheme"]), ACC_TARGETS.get(r["scheme"])
        gap, drop = r.get("ppl_gap_pct", 0), r.get("accuracy_drop_pp", 0)
        out.append(f"| {r['scheme']} | {r['bits_per_weight']:.3f} | {r['model_bytes'] / 1e6:.2f} | "
                   f"{r['perplexity']:.4f} | {gap:+.3f}% | {_target(*t, gap, '%') if t else ''} | "
                   f"{100 * r['accuracy']:.2f}% | {drop:+.2f} | {_target(*a, drop, ' pp') if a else ''} | "
                   f"{100 * r['heldout_accuracy']:.2f}% | {r['seconds']:.0f} |")
    m = data["mixed"]
    out += ["", f"Sensitivity-driven mixed precision ({m['scheme']}; INT8 layers: {', '.join(m['high_layers'])}): "
            f"{m['bits_per_weight']:.3f} bits/weight, perplexity {m['perplexity']:.4f} "
            f"({m.get('ppl_gap_pct', 0):+.3f}%), accuracy {100 * m['accuracy']:.2f}%."]
    pairs = [(g, b) for g, b in (("gptq_int4_g128", "int4_g128"), ("gptq_int3_g128", "int3_g128")) if g in by and b in by]
    if pairs:
        out += ["", "GPTQ against round-to-nearest at the same format (perplexity gap to FP32):", ""]
        out += [f"- {g}: {by[g]['ppl_gap_pct']:+.3f}% vs {b} {by[b]['ppl_gap_pct']:+.3f}%" for g, b in pairs]
    emb = sorted(data.get("embeddings_quantized", []), key=lambda r: r["model_bytes"])
    if emb:
        out += ["", f"The same weight-only schemes with the tied token embedding (also the output head) quantized "
                f"too, first {data['embeddings_limit']} test lines, gaps against FP32 on those lines:", "",
                "| scheme | model MB | model bits/weight | ppl gap | accuracy drop (pp) |", "|---|---|---|---|---|"]
        out += [f"| {r['scheme']} | {r['model_bytes'] / 1e6:.2f} | {r['model_bits_per_weight']:.2f} | "
                f"{r['ppl_gap_pct']:+.3f}% | {r['accuracy_drop_pp']:+.2f} |" for r in emb]
    out += ["", f"Reading the tables: one test line is {100 / data['limit']:.2g} pp of accuracy, so accuracy "
            "differences of a few tenths are a few lines and within noise; perplexity is per byte over whole "
            "lines, most of whose bytes the model predicts almost surely, so gaps are small in absolute terms "
            "and the ranking is what carries information. Quantizing the tied token embedding (the output "
            "head) costs far more than quantizing all 16 Linears.",
            "", "![perplexity vs bits](figures/pareto_ppl.png)", "",
            "![verb-tense accuracy drop](figures/verb_tense.png)", "",
            "![per-layer sensitivity](figures/sensitivity.png)", "",
            "![W8A8 outlier cliff](figures/outliers.png)", "",
            "![MiniGPT training curve](figures/minigpt_loss.png)", ""]
    return "\n".join(out)


def render(readme: str, data: dict) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README.md has no {START} ... {END} section")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{section(data)}\n{END}{tail}"


def main(argv=None) -> None:
    common.quick_args(__doc__).parse_args(argv)
    text = render(README.read_text(), common.read_json("pareto"))
    with atomic_open(README, "w") as f:
        f.write(text)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
