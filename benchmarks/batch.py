"""SmolLM2-135M with more than one token per weight read: prompts, and B sequences decoded together.

    python -m benchmarks.batch [--quick] [--llama-bench PATH]

**Prompts.** Per type of ``PROMPT_TYPES`` (the files ``benchmarks.decode`` times), one
``minigpt_np.compiled.Llama`` session, checked first against the NumPy forward on a
``VERIFY_PROMPT``-token prompt (``decode.verify``). Then ``rounds`` interleaved rounds: every type and
prompt length of ``PROMPTS`` once per round, a prompt of random tokens prefilled from an
empty cache with the logits of its last token only (what generation needs, and what
llama.cpp computes); its tokens/s over the median of the rounds. Useful work of a prompt
of T tokens: 2 x (the layers' Linear weights) x T, plus 2 x the output head once
(``prompt_ops``); ``pct_of_peak`` holds its GOP/s against the byte-dot instructions' peak
measured in the same run on one thread (``benchmarks.machine.int8_instruction_peak``)
times numba's thread count. With ``--llama-bench PATH``, each round also runs
``llama-bench -p 64,512,2048 -n 0 -r 1`` on the same file and threads
(``llama_bench_tokens_per_s``, ``x_llama_bench``: medians over the rounds).

The seeds' other claim (seed 002): batching improves throughput, because B sequences
decoded together read each weight once per step for all of them (the products become
M = B matrix products on the byte-dot tile kernel; the attention stays per sequence).

Per type (the shipped Q4_1 file, and Q8_0 and Q4_0 written from it by ``python -m refquant
quantize``, as ``benchmarks.decode`` does): one ``minigpt_np.compiled.Llama`` session with
``max(BATCHES)`` sequences in its ``KVCache``, each prefilled with its own ``CONTEXT``
random tokens. Before timing, ``VERIFY_B`` sequences decoded together for ``VERIFY_STEPS``
greedy steps must give each the tokens it gets alone (a session of one sequence; raises
otherwise). Then ``rounds`` rounds, every B of ``BATCHES`` once per round (interleaved, so
that a slowdown of the machine hits them all alike): the first B sequences are rewound to
position ``CONTEXT`` and ``step_batch`` runs ``STEPS`` steps of one token each; a B's
aggregate tokens/s is B over the median step time (over all rounds), ``x_b1`` its ratio to
B = 1 of the same type in the same run. Wall time (both threads work).

Writes ``benchmarks/results/batch.json`` and ``figures/batch.png`` (prompt tokens/s against
length, ours and llama.cpp's; aggregate decode tokens/s against B); ``python -m
benchmarks.report`` puts both tables in the README.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from benchmarks.decode import SHIPPED, write_files

PROMPT_TYPES = ("F32", "Q8_0", "Q4_0", "Q4_1", "Q4_K")
PROMPTS = (64, 512, 2048)
PROMPT_ROUNDS = 3
VERIFY_PROMPT = 64      # tokens of the prompt each file's logits are checked on (one block)
TYPES = ("Q8_0", "Q4_0", "Q4_1")
BATCHES = (1, 2, 4, 8, 16)
CONTEXT = 64
STEPS = 8
VERIFY_B, VERIFY_STEPS = 8, 6


def verify(params, cfg, contexts, B: int, steps: int) -> None:
    """``B`` sequences decoded together keep each one's greedy tokens alone (module docstring)."""
    from minigpt_np import compiled

    batch = compiled.Llama(params, cfg, n_ctx=CONTEXT + steps + 1, n_seq=B)
    nxt = [int(np.argmax(batch.prefill(contexts[q], last_only=True, seq=q)[-1])) for q in range(B)]
    got = [[t] for t in nxt]
    for _ in range(steps - 1):
        logits = batch.step_batch([g[-1] for g in got])
        for q in range(B):
            got[q].append(int(np.argmax(logits[q])))
    for q in range(B):
        alone = compiled.Llama(params, cfg, n_ctx=CONTEXT + steps + 1)
        want = [int(np.argmax(alone.prefill(contexts[q], last_only=True)[-1]))]
        for _ in range(steps - 1):
            want.append(int(np.argmax(alone.step(want[-1]))))
        if got[q] != want:
            raise AssertionError(f"sequence {q} in a batch of {B} decoded {got[q]}, alone {want}")


def run(quick: bool = False, rounds: int = 5, llama_bench_exe: str | None = None) -> dict:
    from minigpt_np import llama

    types = (SHIPPED,) if quick else TYPES
    ptypes = (SHIPPED,) if quick else PROMPT_TYPES
    batches = (1, 4) if quick else BATCHES
    rounds, steps = (1, 2) if quick else (rounds, STEPS)
    src = llama.default_model()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_files(src, Path(tmp), tuple(dict.fromkeys(ptypes + types)))
        prompt = prompts(paths, ptypes, (16,) if quick else PROMPTS, 1 if quick else PROMPT_ROUNDS, llama_bench_exe,
                         verify_tokens=16 if quick else VERIFY_PROMPT)
        return dict(_run(quick, types, batches, rounds, steps, paths), prompt=prompt)


def prompt_ops(params, tokens: int) -> int:
    """Useful operations of a ``tokens``-long prompt (module docstring)."""
    from benchmarks.decode import flops_per_token

    head = 2 * int(np.prod(params["output.weight"].shape))
    return tokens * (flops_per_token(params) - head) + head


def llama_bench_pp(exe: str, path, threads: int, lengths) -> dict:
    """``{length: tokens/s}`` of one ``llama-bench`` prompt run (pp) on ``path``."""
    import json
    import subprocess

    cmd = [exe, "-m", str(path), "-p", ",".join(map(str, lengths)), "-n", "0", "-r", "1", "-t", str(threads),
           "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return {int(r["n_prompt"]): float(r["avg_ts"]) for r in json.loads(out.stdout)}, cmd


def prompts(paths, types, lengths, rounds: int, llama_bench_exe: str | None, verify_tokens: int = VERIFY_PROMPT) -> dict:
    """Prompt tokens/s per type and length (module docstring); each file checked on a
    ``verify_tokens``-token prompt first."""
    import numba
    from tqdm import tqdm

    from benchmarks import decode, machine
    from minigpt_np import compiled, llama
    from minigpt_np.tokenizer import Tokenizer
    from refquant.kernels import bytedot

    rng = np.random.default_rng(1)
    sessions, checks, ops = {}, {}, {}
    for t in tqdm(types, desc="prompt: load and check", unit="model"):
        params, cfg, meta = llama.load(paths[t], dtype="stored")
        sess = compiled.Llama(params, cfg, n_ctx=max(*lengths, verify_tokens))
        checks[t] = decode.verify(params, cfg, sess, Tokenizer(meta).encode(llama.reference_text())[:verify_tokens])
        sessions[t] = sess
        ops.update({(t, L): prompt_ops(params, L) for L in lengths})
    ids = {L: rng.integers(0, cfg.vocab, L) for L in lengths}
    tier = bytedot.backend()
    peak = machine.int8_instruction_peak(tier, rounds=200_000 if rounds < 2 else 2_000_000)
    threads = numba.get_num_threads()
    times = {(t, L): [] for t in types for L in lengths}
    lb, command = {(t, L): [] for t in types for L in lengths}, None
    for _ in tqdm(range(rounds), desc="prompt rounds", unit="round"):
        for t in types:
            for L in lengths:
                sessions[t].reset()
                t0 = time.perf_counter()
                sessions[t].prefill(ids[L], last_only=True)
                times[t, L].append(time.perf_counter() - t0)
            if llama_bench_exe:
                got, command = llama_bench_pp(llama_bench_exe, paths[t], threads, lengths)
                for L in lengths:
                    lb[t, L].append(got[L])
    results = []
    for t in types:
        for L in lengths:
            med = float(np.median(times[t, L]))
            gops = ops[t, L] / med / 1e9
            r = dict(type=t, tokens=L, tokens_per_s=L / med, seconds=med, gops=gops,
                     pct_of_peak=100 * gops / (peak["gops_per_thread"] * threads), rounds=times[t, L])
            if lb[t, L]:
                r["llama_bench_tokens_per_s"] = float(np.median(lb[t, L]))
                r["x_llama_bench"] = r["tokens_per_s"] / r["llama_bench_tokens_per_s"]
            results.append(r)
    return dict(types=list(types), lengths=list(lengths), rounds=rounds, threads=threads, tier=tier,
                prefill_block=compiled.PREFILL_BLOCK,
                int8_peak=peak, checks=checks, llama_bench=dict(command=command) if command else None,
                results=results)


def _run(quick, types, batches, rounds, steps, paths) -> dict:
    from tqdm import tqdm

    from minigpt_np import compiled, llama

    rng = np.random.default_rng(0)
    sessions, sizes = {}, {}
    for t in tqdm(types, desc="load", unit="model"):
        params, cfg, _ = llama.load(paths[t], dtype="stored")
        contexts = [rng.integers(0, cfg.vocab, CONTEXT).tolist() for _ in range(max(batches))]
        verify(params, cfg, contexts, min(VERIFY_B, max(batches)), 2 if quick else VERIFY_STEPS)
        sess = compiled.Llama(params, cfg, n_ctx=CONTEXT + steps + 1, n_seq=max(batches))
        for q, ctx in enumerate(contexts):
            sess.prefill(ctx, last_only=True, seq=q)
        sessions[t], sizes[t] = sess, sess.weight_bytes
    times = {(t, B): [] for t in types for B in batches}
    for _ in tqdm(range(rounds), desc="rounds", unit="round"):
        for t in types:
            sess = sessions[t]
            for B in batches:
                toks = list(range(1, B + 1))
                sess.cache.pos[:B] = CONTEXT
                for _ in range(steps):
                    t0 = time.perf_counter()
                    sess.step_batch(toks)
                    times[t, B].append(time.perf_counter() - t0)
    results = []
    for t in types:
        base = 1 / float(np.median(times[t, batches[0]]))
        for B in batches:
            med = float(np.median(times[t, B]))
            results.append(dict(type=t, batch=B, step_ms=1e3 * med, tokens_per_s=B / med,
                                x_b1=(B / med) / base, weight_gbs=sizes[t] / med / 1e9,
                                steps=len(times[t, B])))
    from refquant.kernels import bytedot

    return dict(benchmark="batch", quick=quick, model="SmolLM2-135M", context=CONTEXT, rounds=rounds,
                steps_per_round=steps, batches=list(batches), verified=dict(batch=min(VERIFY_B, max(batches)),
                                                                           steps=2 if quick else VERIFY_STEPS),
                machine=common.machine(), tier=bytedot.backend(), results=results)


def figure(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ap, ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    pr = data["prompt"]
    colors = dict(zip(dict.fromkeys(pr["types"] + [r["type"] for r in data["results"]]), plt.get_cmap("tab10").colors))
    for t in pr["types"]:
        rows = [r for r in pr["results"] if r["type"] == t]
        ap.plot([r["tokens"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", color=colors[t], label=t)
        lb = [r for r in rows if "llama_bench_tokens_per_s" in r]
        if lb:
            ap.plot([r["tokens"] for r in lb], [r["llama_bench_tokens_per_s"] for r in lb], "x--", color=colors[t],
                    label=f"{t}, llama.cpp")
    ap.set_xscale("log", base=2)
    ap.set_yscale("log")
    ap.set_xticks(pr["lengths"], [str(L) for L in pr["lengths"]])
    ap.set_xlabel("prompt tokens")
    ap.set_ylabel("prompt tokens/s (last token's logits)")
    ap.set_title(f"prompt: refquant compiled (solid) vs llama.cpp llama-bench pp (dashed), {pr['threads']} threads",
                 fontsize=9)
    ap.legend(fontsize=7, ncol=2)
    ap.grid(True, which="both", alpha=0.3)
    for t in dict.fromkeys(r["type"] for r in data["results"]):
        rows = [r for r in data["results"] if r["type"] == t]
        ax.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", color=colors[t], label=t)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(data["batches"], [str(b) for b in data["batches"]])
    ax.set_xlabel("sequences decoded together (B)")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_title(f"batched decode, {data['context']}-token contexts ({data['machine']['cpus']} CPUs, "
                 f"{data['tier']})", fontsize=9)
    ax.legend()
    fig.suptitle("SmolLM2-135M: more than one token per weight read", fontsize=10)
    common.finish_figure(fig, ax, path)


def main(argv=None) -> None:
    ap = common.quick_args(__doc__)
    ap.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench, run on the same files")
    args = ap.parse_args(argv)
    data = run(quick=args.quick, llama_bench_exe=args.llama_bench)
    path = common.write_json("batch", data)
    figure(data, common.FIGURES / "batch.png")
    for r in data["prompt"]["results"]:
        lb = f"  x{r['x_llama_bench']:.2f} llama.cpp" if "x_llama_bench" in r else ""
        print(f"{r['type']:5s} prompt {r['tokens']:5d}  {r['tokens_per_s']:8.1f} tokens/s  {r['gops']:6.1f} GOP/s "
              f"({r['pct_of_peak']:.0f}% of the int8 peak){lb}")
    for r in data["results"]:
        print(f"{r['type']:5s} B={r['batch']:2d}  {r['tokens_per_s']:8.1f} tokens/s  x{r['x_b1']:.2f} B=1  "
              f"step {r['step_ms']:.2f} ms")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
