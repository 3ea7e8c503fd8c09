"""SmolLM2-135M decode and prompt speed per GGUF type on the compiled step, against NumPy.

    python -m benchmarks.decode [--quick] [-n 64] [--llama-bench PATH]

The shipped file is Q4_1 (Q8_0 tied embedding/head). ``python -m refquant quantize``
writes it again as F32, Q8_0, Q4_0 and Q4_K (Q4_K falls back to Q5_0 for SmolLM2's
576-wide rows, as llama.cpp does: only ``ffn_down`` is Q4_K), each from the shipped
weights, into a temporary directory. Each file is loaded with ``dtype="stored"`` and run by
``minigpt_np.compiled.Llama`` (one numba call for all layers per token; F32 on a float32
kernel on the same path). Two NumPy engines run beside them: ``numpy`` ``f32`` (the
shipped file dequantized at load, ``llama.forward``: the reference path) and ``numpy``
``Q4_1`` (the same forward on the stored weights through ``Linear``).

Before timing, every compiled model's prompt logits are checked against the NumPy forward
on the same stored weights (within the x-rounding bound of ``tests/test_compiled.py``).
Then five rounds time, interleaved (every engine once per round, so machine-wide
slowdowns hit all alike): a 64-token prompt (prefill, with the logits of its last token
only, as generation asks for them and llama.cpp computes them), timed ``PROMPT_CALLS``
times per engine per round (all calls in ``prompt_rounds``); and greedy decoding of
``-n`` tokens after "The capital of France is" (``--quick``: the shipped file only, 4
tokens), every step timed, the compiled engines stepping in turn token by token
(``lockstep``), each NumPy engine alone. Speeds are medians of wall time over all calls
(decode: over rounds × ``-n`` steps), with the 90th percentile of speed, i.e. the time's
10th, beside them (the kernels run on both cores, so thread CPU time would miss half the
work); ``decode_rounds`` holds each round's tokens/s. Per type, a per-token
breakdown (median of 30 calls each, at the position decoding ended): the weight products
of all layers and the head, the attention over the cache, and the rest of the step
(norms, RoPE, activations, embedding lookup, Python). Last, ``start``: the wall time of a
fresh ``python -m minigpt_np.generate -n 1`` with an empty numba cache and with a warm one
(``fast_start``).

With ``--llama-bench PATH`` (llama.cpp's ``llama-bench``; ``../shared/tools/llama-cpp.sh``
builds it), every round also runs it on each compiled engine's file, interleaved with ours:
``llama-bench -m FILE -p 0 -n 64 -r 1 -t THREADS -o json`` (tg64: 64 tokens decoded after
an empty prompt, one repetition per round, numba's thread count), its tokens/s per round
and their median beside ours in each row (``llama_bench_tokens_per_s``,
``x_llama_bench``), its build and command in ``llama_bench``.

Writes ``benchmarks/results/decode.json``; ``python -m benchmarks.report`` puts its table
in the README and ``python -m benchmarks.roofline`` its dots on the roofline.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from refquant._checks import cli_int

PROMPT = "The capital of France is"
TYPES = ("F32", "Q8_0", "Q4_0", "Q4_1", "Q4_K")    # Q4_1: the shipped file itself
SHIPPED = "Q4_1"
PROMPT_CALLS = 10   # prefills per engine per round: a 64-token prompt is ~0.2 s, noisy alone


def _rms(a) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


def verify(params, cfg, sess, ids) -> dict:
    """The compiled session's logits on ``ids`` against the NumPy forward on the same
    weights (``s``) and on their float dequantization (``f``): RMS gap within
    ``2 RMS(s - f)`` plus the float32 term (``tests/test_compiled.py``)."""
    from minigpt_np import llama
    from refquant import linear

    sess.reset()
    c = sess.prefill(ids)
    sess.reset()
    s, _ = llama.forward(params, cfg, ids)
    f, _ = llama.forward({k: linear.DenseLinear(v.dequantize()) if isinstance(v, linear.Linear) else v
                          for k, v in params.items()}, cfg, ids)
    bound = 2 * _rms(s - f) + 8 * cfg.n_layer * cfg.d_ff * 2.0**-24 * np.abs(s).max()
    gap = _rms(c - s)
    if gap > bound:
        raise AssertionError(f"compiled logits are {gap:.3g} RMS from the NumPy forward (bound {bound:.3g})")
    return dict(rms_gap=gap, bound=float(bound), same_argmax=float((c.argmax(1) == s.argmax(1)).mean()))


def _median_call(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def breakdown(sess, token: int, repeats: int = 30) -> dict:
    """Per-token milliseconds at the session's position: the whole step, the weight
    products, the attention, and the rest (step minus the two)."""
    pos = sess.pos

    def step():
        sess.pos = pos
        sess.step(token)
    total = _median_call(step, repeats)
    sess.pos = pos + 1
    parts = {k: _median_call(fn, repeats) for k, fn in sess.pieces().items()}
    sess.pos = pos
    ms = {k: 1e3 * v for k, v in parts.items()}
    return dict(step=1e3 * total, **ms, rest=max(0.0, 1e3 * total - sum(ms.values())))


def lockstep(sessions: dict, ids, n: int) -> tuple[dict, dict]:
    """Greedy decoding of ``n`` tokens after ``ids`` in every session of ``sessions`` at
    once, one step of each in turn (so that a slowdown of the machine hits them all alike):
    ``(seconds per step, token ids)`` per session. Steps go on past an end-of-text token
    (the work per step is the same)."""
    logits, times, out = {}, {k: [] for k in sessions}, {k: [] for k in sessions}
    for k, sess in sessions.items():
        sess.reset()
        logits[k] = sess.prefill(ids, last_only=True)[-1]
    for _ in range(n):
        for k, sess in sessions.items():
            nxt = int(np.argmax(logits[k]))
            out[k].append(nxt)
            t0 = time.perf_counter()
            logits[k] = sess.step(nxt)
            times[k].append(time.perf_counter() - t0)
    return times, out


def fast_start(repeats: int = 5) -> dict:
    """Wall time of a fresh ``python -m minigpt_np.generate --prompt PROMPT -n 1`` process: once
    with an empty numba cache (``NUMBA_CACHE_DIR`` a new directory: what the first run in a
    new environment costs, every kernel compiled), then ``repeats`` times with that cache warm."""
    import os
    import shlex
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "minigpt_np.generate", "--prompt", PROMPT, "-n", "1"]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        walls = []
        for _ in range(1 + repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            walls.append(time.perf_counter() - t0)
    return dict(command=shlex.join(["python"] + cmd[1:]), cold_wall_s=walls[0], warm_wall_s=float(np.median(walls[1:])),
                warm_wall_s_runs=walls[1:])


def _until(ids: list, stop: set) -> list:
    """``ids`` up to the first stop token."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stop), ids)


def write_files(src: Path, out_dir: Path, types) -> dict:
    """The shipped model re-written by ``python -m refquant quantize`` per type."""
    from refquant.__main__ import main as cli

    paths = {}
    for t in types:
        if t == SHIPPED:
            paths[t] = src
            continue
        paths[t] = out_dir / f"smollm2-{t}.gguf"
        if cli(["quantize", str(src), str(paths[t]), "--type", t]) != 0:
            raise RuntimeError(f"refquant quantize --type {t} failed")
    return paths


def flops_per_token(params) -> int:
    """2 per weight of every Linear a token multiplies by (the tied head once)."""
    from refquant.linear import Linear

    return 2 * sum({id(v): v.shape[0] * v.shape[1] for v in params.values() if isinstance(v, Linear)}.values())


def llama_bench(exe: str, path, threads: int, n: int = 64) -> dict:
    """One ``llama-bench`` tg``n`` run on ``path`` (module docstring): its JSON record."""
    import json
    import subprocess

    cmd = [exe, "-m", str(path), "-p", "0", "-n", str(n), "-r", "1", "-t", str(threads), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    rec = json.loads(out.stdout)[0]
    return dict(tokens_per_s=float(rec["avg_ts"]), build_commit=rec.get("build_commit"),
                model_size=rec.get("model_size"), command=cmd)


def run(quick: bool = False, n: int = 64, rounds: int = 5, llama_bench_exe: str | None = None) -> dict:
    n, rounds = (4, 1) if quick else (n, rounds)
    types = (SHIPPED,) if quick else TYPES
    from minigpt_np import llama

    src = llama.default_model()
    with tempfile.TemporaryDirectory() as tmp:   # the files live until llama-bench has run on them
        return _run(quick, n, rounds, llama_bench_exe, src, types, write_files(src, Path(tmp), types))


def _run(quick, n, rounds, llama_bench_exe, src, types, paths) -> dict:
    import numba
    from tqdm import tqdm

    from minigpt_np import compiled, generate, llama
    from minigpt_np.tokenizer import Tokenizer
    from refquant.kernels import bytedot

    prompt_calls = 2 if quick else PROMPT_CALLS
    engines = {}
    for t in tqdm(types, desc="load", unit="model"):
        params, cfg, meta = llama.load(paths[t], dtype="stored")
        engines[("compiled", t)] = (params, cfg, compiled.Llama(params, cfg, n_ctx=256), Path(paths[t]).stat().st_size)
    tok = Tokenizer(meta)
    pf, cfg, _ = llama.load(src, dtype="f32")
    engines[("numpy", "f32")] = (pf, cfg, llama.Session(pf, cfg), None)
    ps = engines[("compiled", SHIPPED)][0]
    engines[("numpy", SHIPPED)] = (ps, cfg, llama.Session(ps, cfg), None)
    ids = tok.encode(PROMPT)
    long_prompt = tok.encode(llama.reference_text())[:16 if quick else 64]
    checks = {t: verify(params, cfg, sess, long_prompt) for (e, t), (params, cfg, sess, _) in engines.items()
              if e == "compiled"}

    decode = {k: [] for k in engines}
    prompt = {k: [] for k in engines}
    rounds_tps = {k: [] for k in engines}
    texts = {}
    stop = generate.stop_ids(tok)
    # the compiled engines share numba's thread pool and step in turn; each NumPy engine
    # steps alone (OpenBLAS's spinning threads would slow whatever ran next)
    groups = [[k for k in engines if k[0] == "compiled"]] + [[k] for k in engines if k[0] != "compiled"]
    lb = {k: [] for k in engines if k[0] == "compiled"}
    lb_info = None
    for _ in tqdm(range(rounds), desc="rounds", unit="round"):
        for k, (_, _, sess, _) in engines.items():
            for _ in range(prompt_calls):
                sess.reset()
                t0 = time.perf_counter()
                sess.prefill(long_prompt, last_only=True)
                prompt[k].append(len(long_prompt) / (time.perf_counter() - t0))
        for group in groups:
            times, out = lockstep({k: engines[k][2] for k in group}, ids, n)
            for k in group:
                decode[k] += times[k]
                rounds_tps[k].append(n / sum(times[k]))
                texts[k] = PROMPT + tok.decode(_until(out[k], stop))
        if llama_bench_exe:    # llama.cpp on the same files and threads, in the same round
            for k in lb:
                lb_info = llama_bench(llama_bench_exe, paths[k[1]], numba.get_num_threads(), n)
                lb[k].append(lb_info["tokens_per_s"])
    rows = []
    for k, (params, cfg, sess, file_bytes) in engines.items():
        row = dict(engine=k[0], type=k[1], decode_tokens_per_s=1 / float(np.median(decode[k])),
                   decode_p90_tokens_per_s=1 / float(np.percentile(decode[k], 10)), decode_rounds=rounds_tps[k],
                   decode_steps=len(decode[k]), prompt_tokens_per_s=float(np.median(prompt[k])),
                   prompt_p90_tokens_per_s=float(np.percentile(prompt[k], 90)), prompt_rounds=prompt[k],
                   text=texts[k])
        if k[0] == "compiled" and lb.get(k):
            med = float(np.median(lb[k]))
            row.update(llama_bench_tokens_per_s=med, llama_bench_rounds=lb[k],
                       x_llama_bench=row["decode_tokens_per_s"] / med)
        if k[0] == "compiled":
            row.update(file_bytes=file_bytes, weight_bytes=sess.weight_bytes,
                       gbs=sess.weight_bytes * row["decode_tokens_per_s"] / 1e9,
                       breakdown_ms=breakdown(sess, ids[-1], 10 if quick else 30), check=checks[k[1]],
                       source="shipped" if k[1] == SHIPPED else "python -m refquant quantize")
        rows.append(row)
    speed = {(r["engine"], r["type"]): r["decode_tokens_per_s"] for r in rows}
    f32 = speed.get(("compiled", "F32"))    # --quick: the shipped file only
    f32_gbs = next((r["gbs"] for r in rows if (r["engine"], r["type"]) == ("compiled", "F32")), None)
    for r in rows:
        r["x_compiled_f32"] = r["decode_tokens_per_s"] / f32 if f32 else None
        r["x_numpy_f32"] = r["decode_tokens_per_s"] / speed[("numpy", "f32")]
        if "gbs" in r and f32_gbs:   # the share of the F32 step's read rate (issue 39: >= 75% each)
            r["gbs_share_of_f32"] = r["gbs"] / f32_gbs
    return dict(benchmark="decode", quick=quick, model=src.name, prompt=PROMPT, prompt_tokens=len(long_prompt),
                new_tokens=n, rounds=rounds, machine=common.machine(), tier=bytedot.backend(),
                flops_per_token=flops_per_token(pf), start=fast_start(2 if quick else 5), results=rows,
                llama_bench=None if lb_info is None else dict(
                    exe=llama_bench_exe, build_commit=lb_info["build_commit"], threads=numba.get_num_threads(),
                    command=" ".join(["llama-bench"] + lb_info["command"][1:2] + ["FILE"] + lb_info["command"][3:]),
                    test=f"tg{n}"))


def main(argv=None) -> None:
    ap = common.quick_args(__doc__)
    ap.add_argument("-n", type=cli_int(1, 4096), default=64, help="tokens decoded per round (default 64)")
    ap.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench, run beside ours on the same files")
    args = ap.parse_args(argv)
    if args.llama_bench and not Path(args.llama_bench).is_file():
        raise SystemExit(f"--llama-bench {args.llama_bench}: no such file")
    data = run(args.quick, args.n, llama_bench_exe=args.llama_bench)
    path = common.write_json("decode", data)
    for r in data["results"]:
        vs_f32 = f"x{r['x_compiled_f32']:.2f} compiled F32, " if r["x_compiled_f32"] else ""
        vs_lb = f", x{r['x_llama_bench']:.2f} llama.cpp" if r.get("x_llama_bench") else ""
        print(f"{r['engine']:8s} {r['type']:5s} decode {r['decode_tokens_per_s']:7.1f} tokens/s "
              f"({vs_f32}x{r['x_numpy_f32']:.2f} NumPy f32{vs_lb})  prompt "
              f"{r['prompt_tokens_per_s']:7.1f} tokens/s  {r['text'][:60]!r}")
    st = data["start"]
    print(f"start: {st['command']}: {st['cold_wall_s']:.1f} s with an empty numba cache, "
          f"{st['warm_wall_s']:.2f} s warm (median of {len(st['warm_wall_s_runs'])})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
