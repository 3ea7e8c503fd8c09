"""Long context on SmolLM2-135M: what each KV cache type costs in speed and quality.

    python -m benchmarks.context [--quick] [--llama-bench PATH]

Seed 003 calls the KV cache "a separate axis" (an FP8 cache halves KV bytes and roughly
doubles concurrency); seed 004 asks what the cache costs. The model is the shipped file
re-written as Q4_0 by ``python -m refquant quantize`` (``benchmarks.decode.write_files``),
its cache one of llama.cpp's types (``refquant.kernels.kvcache``; K and V alike here).

* **Bytes** (the seed's table, arithmetic): KV bytes per token of every cache type
  (30 layers x 2 x 3 KV heads x 64 numbers in the type's row bytes), how many
  ``BUDGET_SEQ``-token sequences fit in ``BUDGET_BYTES`` (2 GiB), and the ratio to f16.
* **Decode** at depth ``DEPTHS`` per type of ``DECODE_TYPES``: one compiled session per
  type, prefilled once with ``max(DEPTHS)`` random tokens (that prefill's tokens/s is the
  prompt figure at that length); then ``rounds`` interleaved rounds, each type and depth
  once per round: the sequence is rewound to the depth and ``STEPS`` steps are timed one
  by one. tokens/s over the median step; bytes read per token = the weights plus K and V
  of every position before it; the roof is the F32 file's decode step's weight GB/s,
  measured in the same run at depth 0 (the memory roof: ``benchmarks.decode``), divided by
  those bytes.
* **Quality** against the f32 cache, on windows of real text (``llama.reference_text``),
  ``QUALITY_WINDOWS`` tokens long: the logits of every position of a window, prefilled
  from an empty cache of each type, against the f32 cache's (``common.kl_columns``: mean
  KLD ± se, p99, same top token), ``QUALITY_COUNT`` windows per length. On the file's
  weights dequantized to float32 (``dtype="f32"``): the byte-dot kernels round x to Q8_0,
  and any float32 difference upstream flips some of those roundings, which alone gives a
  mean KLD near 4e-3 on SmolLM2 (an f16 cache, or the NumPy forward against the compiled
  one, measured on 256 tokens); on float weights the f16 cache's is 5e-7, so the figure
  is the cache's own. vLLM's FP8 types too, with scale 1 (its default) and with
  llm-compressor's per-layer scales (absmax / the format's max) from ``CALIBRATION``, a
  text the windows do not include.
* With ``--llama-bench PATH``: ``llama-bench -p 0 -n 16 -d DEPTHS -ctk T -ctv T`` on the
  same file and threads, flash attention off (f16 only: llama.cpp needs it on for a
  quantized V cache) and on.

Writes ``benchmarks/results/context.json`` and ``figures/context.png``; ``python -m
benchmarks.report`` puts the tables in the README.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from benchmarks.decode import write_files

MODEL_TYPE = "Q4_0"
DECODE_TYPES = ("f32", "f16", "q8_0", "q4_0")
DEPTHS = (0, 512, 2048, 8000)
STEPS = 8
QUALITY_WINDOWS = (512, 2048)
QUALITY_COUNT = 2
QUALITY_EXTRA = ("fp8_e4m3", "fp8_e5m2")     # vLLM's: quality only (their compiled reads are scalar)
CALIBRATION = (100_000, 2048)               # (first token, length) of the FP8 scales' calibration text
BUDGET_BYTES, BUDGET_SEQ = 2 << 30, 8000


def seed_table(cfg) -> list[dict]:
    """KV bytes per token of every cache type and what a 2 GiB budget holds (module docstring)."""
    from refquant.kernels.kvcache import CACHE_TYPES

    rows = []
    for name, ct in CACHE_TYPES.items():
        per = 2 * cfg.n_layer * cfg.n_head_kv * ct.row_bytes(cfg.head_dim)
        rows.append(dict(type=name, bytes_per_token=per, sequences_in_budget=BUDGET_BYTES // (per * BUDGET_SEQ)))
    f16 = next(r["bytes_per_token"] for r in rows if r["type"] == "f16")
    for r in rows:
        r["x_f16_bytes"] = r["bytes_per_token"] / f16
    return rows


def llama_bench_depths(exe: str, path, threads: int, cache: str, depths, fa: str) -> tuple[dict, list]:
    """``{depth: tokens/s}`` of one ``llama-bench`` tg16 run per depth (module docstring)."""
    cmd = [exe, "-m", str(path), "-p", "0", "-n", "16", "-d", ",".join(map(str, depths)), "-r", "1",
           "-t", str(threads), "-ctk", cache, "-ctv", cache, "-fa", fa, "-o", "json"]
    return {int(r["n_depth"]): float(r["avg_ts"]) for r in _llama_bench(cmd)}, cmd


def _llama_bench(cmd: list) -> list:
    """The JSON rows one ``llama-bench`` command prints, or a RuntimeError with its stderr."""
    import json
    import subprocess

    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


def llama_bench_prompt(exe: str, path, threads: int, cache: str, tokens: int, fa: str) -> tuple[float, list]:
    """Tokens/s of one ``llama-bench`` pp run of ``tokens`` tokens (``-p tokens -n 0``)."""
    cmd = [exe, "-m", str(path), "-p", str(tokens), "-n", "0", "-r", "1", "-t", str(threads), "-ctk", cache,
           "-ctv", cache, "-fa", fa, "-o", "json"]
    return float(_llama_bench(cmd)[0]["avg_ts"]), cmd


def calibrate(params, cfg, ids) -> tuple[np.ndarray, np.ndarray]:
    """The absolute maximum of the keys and of the values per layer (n_layer,) over
    ``ids`` (one prefill into an f32 cache): llm-compressor's statistic for vLLM's FP8
    ``k_scale`` / ``v_scale`` (``refquant.kvfp8.calibrated_scales``)."""
    from minigpt_np import compiled

    sess = compiled.Llama(params, cfg, n_ctx=len(ids))
    sess.prefill(ids, last_only=True)
    n = len(ids)
    k, v = sess.cache.k[:, 0, :, :n], sess.cache.v[:, 0, :, :n]
    return np.abs(k).reshape(cfg.n_layer, -1).max(1), np.abs(v).reshape(cfg.n_layer, -1).max(1)


def quality(params, cfg, ids, types, windows, count, calibration=None) -> list[dict]:
    """Each type's logits against the f32 cache's on ``count`` windows per length; the FP8
    types with scale 1 and, given ``calibration`` (token ids disjoint from the windows),
    also with its per-layer scales (``"<type> calibrated"``)."""
    from tqdm import tqdm

    from minigpt_np import compiled
    from refquant import kvfp8

    absmax = calibrate(params, cfg, calibration) if calibration is not None else None
    out = []
    for W in windows:
        starts = [i * W for i in range(count)]
        sessions = {t: compiled.Llama(params, cfg, n_ctx=W, cache_type_k=t, cache_type_v=t)
                    for t in ("f32", *types)}
        for t in types:
            if t in kvfp8.FORMATS and absmax is not None:
                sess = compiled.Llama(params, cfg, n_ctx=W, cache_type_k=t, cache_type_v=t)
                sess.cache.set_scales(k_scale=kvfp8.calibrated_scales(absmax[0], t),
                                      v_scale=kvfp8.calibrated_scales(absmax[1], t))
                sessions[f"{t} calibrated"] = sess
        names = [t for t in sessions if t != "f32"]
        ref, got = [], {t: [] for t in names}
        for s in tqdm(starts, desc=f"quality, {W}-token windows", unit="window"):
            win = ids[s:s + W + 1]
            for t, sess in sessions.items():
                sess.reset()
                logits = sess.prefill(win[:W])
                (ref if t == "f32" else got[t]).append(logits)
        tokens = np.concatenate([ids[s + 1:s + W + 1] for s in starts])
        r = np.concatenate(ref)
        for t in names:
            out.append(dict(type=t, window=W, windows=count, **common.kl_columns(r, np.concatenate(got[t]), tokens)))
    return out


def run(quick: bool = False, rounds: int = 3, llama_bench_exe: str | None = None) -> dict:
    from minigpt_np import llama

    src = llama.default_model()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_files(src, Path(tmp), ("F32", MODEL_TYPE))
        return _run(quick, 1 if quick else rounds, paths, llama_bench_exe)


def _run(quick, rounds, paths, llama_bench_exe) -> dict:
    import numba
    from tqdm import tqdm

    from benchmarks import decode
    from minigpt_np import compiled, llama
    from minigpt_np.tokenizer import Tokenizer
    from refquant.kernels import bytedot

    types = ("f32", "q8_0") if quick else DECODE_TYPES
    depths = (0, 64) if quick else DEPTHS
    steps = 2 if quick else STEPS
    params, cfg, meta = llama.load(paths[MODEL_TYPE], dtype="stored")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab, max(depths))
    n_ctx = max(depths) + steps + 1
    sessions, prompt_rate = {}, {}
    for t in tqdm(types, desc="prefill each cache type", unit="type"):
        sess = compiled.Llama(params, cfg, n_ctx=n_ctx, cache_type_k=t, cache_type_v=t)
        if t == "f32":      # the cache checked against the NumPy forward first
            check = decode.verify(params, cfg, sess, Tokenizer(meta).encode(llama.reference_text())[:16])
        else:               # compiled before the prompt is timed
            sess.prefill(prompt[:16], last_only=True)
        sess.reset()
        t0 = time.perf_counter()
        sess.prefill(prompt, last_only=True)
        prompt_rate[t] = len(prompt) / (time.perf_counter() - t0)
        sessions[t] = sess
    fparams, fcfg, _ = llama.load(paths["F32"], dtype="stored")
    roof_sess = compiled.Llama(fparams, fcfg, n_ctx=steps + 1)
    roof_sess.step(1)
    times = {(t, D): [] for t in types for D in depths}
    roof_times = []
    for _ in tqdm(range(rounds), desc="decode rounds", unit="round"):
        for _ in range(steps):
            roof_sess.pos = 0
            t0 = time.perf_counter()
            roof_sess.step(1)
            roof_times.append(time.perf_counter() - t0)
        for t in types:
            sess = sessions[t]
            for D in depths:
                sess.pos = D
                for i in range(steps):
                    t0 = time.perf_counter()
                    sess.step(int(prompt[i]))
                    times[t, D].append(time.perf_counter() - t0)
    roof_gbs = roof_sess.weight_bytes / float(np.median(roof_times)) / 1e9
    weights = sessions[types[0]].weight_bytes
    results = []
    for t in types:
        per_pos = sessions[t].cache.bytes_per_position
        for D in depths:
            med = float(np.median(times[t, D]))
            read = weights + (D + 1) * per_pos
            roof = roof_gbs * 1e9 / read
            results.append(dict(type=t, depth=D, tokens_per_s=1 / med, step_ms=1e3 * med, bytes_per_token=read,
                                gbs=read / med / 1e9, roof_tokens_per_s=roof, pct_of_roof=100 / med / roof,
                                steps=len(times[t, D])))
    lb, lb_prompt, commands = [], [], []
    if llama_bench_exe:
        threads = numba.get_num_threads()
        for t in tqdm(types, desc="llama-bench", unit="type"):
            if t == "f32":
                continue
            for fa in (("off", "on") if t == "f16" else ("on",)):
                got, cmd = llama_bench_depths(llama_bench_exe, paths[MODEL_TYPE], threads, t, depths, fa)
                commands.append(cmd)
                lb += [dict(type=t, flash_attn=fa, depth=D, tokens_per_s=v) for D, v in got.items()]
                if t == "f16":      # its quantized caches prefill slower (q8_0, q4_0: 8-10 min for 8000 tokens)
                    rate, cmd = llama_bench_prompt(llama_bench_exe, paths[MODEL_TYPE], threads, t, len(prompt), fa)
                    commands.append(cmd)
                    lb_prompt.append(dict(type=t, flash_attn=fa, tokens=len(prompt), tokens_per_s=rate))
    ids = np.array(Tokenizer(meta).encode(llama.reference_text()))
    windows = (64,) if quick else QUALITY_WINDOWS
    fweights, _, _ = llama.load(paths[MODEL_TYPE], dtype="f32")
    qual = quality(fweights, cfg, ids, [t for t in types if t != "f32"] + list(QUALITY_EXTRA), windows,
                   1 if quick else QUALITY_COUNT, ids[CALIBRATION[0]:CALIBRATION[0] + (64 if quick else CALIBRATION[1])])
    return dict(benchmark="context", quick=quick, model=f"SmolLM2-135M {MODEL_TYPE}", rounds=rounds,
                steps_per_round=steps, depths=list(depths), types=list(types), machine=common.machine(),
                tier=bytedot.backend(), threads=numba.get_num_threads(), check=check,
                roof=dict(f32_weight_gbs=roof_gbs, f32_step_ms=1e3 * float(np.median(roof_times))),
                weight_bytes=weights, prompt=[dict(type=t, tokens=len(prompt), tokens_per_s=v)
                                              for t, v in prompt_rate.items()],
                results=results, llama_bench=dict(results=lb, prompt=lb_prompt, commands=commands) if lb else None,
                quality=qual, seed_table=seed_table(cfg), budget=dict(bytes=BUDGET_BYTES, sequence=BUDGET_SEQ))


def figure(data: dict, path: Path) -> None:
    """Decode tokens/s against depth per cache type (ours solid, each type's roof dotted,
    llama.cpp's best dashed) and each type's KLD against the f32 cache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, aq) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(data["types"], plt.get_cmap("tab10").colors))
    lb = (data["llama_bench"] or {}).get("results", [])
    for t in data["types"]:
        rows = [r for r in data["results"] if r["type"] == t]
        d = [max(r["depth"], 1) for r in rows]
        ax.plot(d, [r["tokens_per_s"] for r in rows], "o-", color=colors[t], label=f"{t} cache")
        ax.plot(d, [r["roof_tokens_per_s"] for r in rows], ":", color=colors[t], lw=1)
        theirs = {}
        for r in lb:
            if r["type"] == t:
                theirs[r["depth"]] = max(theirs.get(r["depth"], 0), r["tokens_per_s"])
        if theirs:
            ds = sorted(theirs)
            ax.plot([max(x, 1) for x in ds], [theirs[x] for x in ds], "x--", color=colors[t], lw=1,
                    label=f"{t}, llama.cpp")
    ax.set_xscale("symlog", linthresh=100)
    ax.set_yscale("log")
    ax.set_xticks(data["depths"], [str(x) for x in data["depths"]])
    ax.set_xlabel("positions in the cache (depth)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{data['model']}, {data['threads']} threads, {data['tier']}: refquant (solid), "
                 "its roof (dotted), llama.cpp best of flash attention on/off (dashed)", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    windows = sorted({q["window"] for q in data["quality"]})
    qtypes = list(dict.fromkeys(q["type"] for q in data["quality"]))
    width = 0.8 / max(len(windows), 1)
    for i, W in enumerate(windows):
        vals = {q["type"]: q for q in data["quality"] if q["window"] == W}
        xs = [k + i * width for k in range(len(qtypes))]
        aq.bar(xs, [vals[t]["kld_mean"] for t in qtypes], width, yerr=[vals[t]["kld_se"] for t in qtypes],
               label=f"{W}-token windows", alpha=0.8)
    aq.set_xticks([k + width * (len(windows) - 1) / 2 for k in range(len(qtypes))],
                  [t.replace(" calibrated", "\ncalibrated") for t in qtypes], fontsize=8)
    aq.set_yscale("log")
    aq.set_ylabel("mean KLD against the f32 cache (float weights)")
    aq.set_title("what the cache type costs in quality", fontsize=9)
    aq.legend(fontsize=7)
    aq.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle("SmolLM2-135M: KV cache types at long context", fontsize=10)
    common.finish_figure(fig, aq, path)


def main(argv=None) -> None:
    ap = common.quick_args(__doc__)
    ap.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench, run on the same file")
    args = ap.parse_args(argv)
    data = run(quick=args.quick, llama_bench_exe=args.llama_bench)
    path = common.write_json("context", data)
    figure(data, common.FIGURES / "context.png")
    print(f"roof: the F32 step reads {data['roof']['f32_weight_gbs']:.1f} GB/s")
    for r in data["results"]:
        print(f"{r['type']:6s} depth {r['depth']:5d}  {r['tokens_per_s']:7.1f} tokens/s  {r['gbs']:5.1f} GB/s  "
              f"{r['pct_of_roof']:4.0f}% of its roof ({r['roof_tokens_per_s']:.0f} tokens/s)")
    for r in data["prompt"]:
        print(f"{r['type']:6s} prompt of {r['tokens']} tokens: {r['tokens_per_s']:.1f} tokens/s")
    for r in (data["llama_bench"] or {}).get("results", []):
        print(f"llama.cpp {r['type']:6s} flash attention {r['flash_attn']:3s} depth {r['depth']:5d}  {r['tokens_per_s']:7.1f} tokens/s")
    for r in (data["llama_bench"] or {}).get("prompt", []):
        print(f"llama.cpp {r['type']:6s} flash attention {r['flash_attn']:3s} prompt of {r['tokens']} tokens: "
              f"{r['tokens_per_s']:.1f} tokens/s")
    for r in data["quality"]:
        print(f"{r['type']:6s} {r['window']:5d}-token windows: KLD {r['kld_mean']:.2e} ± {r['kld_se']:.1e}, "
              f"p99 {r['kld_p99']:.2e}, same top {100 * r['same_top']:.2f}%")
    for r in data["seed_table"]:
        print(f"{r['type']:6s} {r['bytes_per_token']:6d} KV bytes per token, {r['sequences_in_budget']:3d} sequences "
              f"of {BUDGET_SEQ} in 2 GiB, x{r['x_f16_bytes']:.2f} f16")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
