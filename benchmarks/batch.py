"""SmolLM2-135M batched decode: aggregate tokens/s of B sequences decoded together.

    python -m benchmarks.batch [--quick]

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

Writes ``benchmarks/results/batch.json`` and ``figures/batch.png`` (aggregate tokens/s
against B); ``python -m benchmarks.report`` puts its table in the README.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from benchmarks.decode import SHIPPED, write_files

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


def run(quick: bool = False, rounds: int = 5) -> dict:
    from minigpt_np import llama

    types = (SHIPPED,) if quick else TYPES
    batches = (1, 4) if quick else BATCHES
    rounds, steps = (1, 2) if quick else (rounds, STEPS)
    src = llama.default_model()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_files(src, Path(tmp), types)
        return _run(quick, types, batches, rounds, steps, paths)


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

    fig, ax = plt.subplots(figsize=(6, 4))
    for t in dict.fromkeys(r["type"] for r in data["results"]):
        rows = [r for r in data["results"] if r["type"] == t]
        ax.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=t)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(data["batches"], [str(b) for b in data["batches"]])
    ax.set_xlabel("sequences decoded together (B)")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_title(f"SmolLM2-135M batched decode, {data['context']}-token contexts ({data['machine']['cpus']} CPUs, "
                 f"{data['tier']})", fontsize=9)
    ax.legend()
    common.finish_figure(fig, ax, path)


def main(argv=None) -> None:
    args = common.quick_args(__doc__).parse_args(argv)
    data = run(quick=args.quick)
    path = common.write_json("batch", data)
    figure(data, common.FIGURES / "batch.png")
    for r in data["results"]:
        print(f"{r['type']:5s} B={r['batch']:2d}  {r['tokens_per_s']:8.1f} tokens/s  x{r['x_b1']:.2f} B=1  "
              f"step {r['step_ms']:.2f} ms")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
