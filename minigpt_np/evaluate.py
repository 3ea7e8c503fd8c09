"""Test perplexity and verb-tense accuracy of MiniGPT, FP32 or under any scheme.

    python -m minigpt_np.evaluate [--scheme NAME] [--quantize-embeddings] [--limit N]

A test example ``sentence => label`` is fed as ``[EOT] sentence => `` (the prefix, run
once, its KV cache kept) and each of the 9 labels followed by a newline is scored by its
total log-probability after the prefix, all 9 in one batched pass over the cache; the
prediction is the argmax. Perplexity is per byte over every byte of the test lines
(sentence, ``" => "``, true label and newline), conditioned on the leading EOT, so it
comes out of the same two passes.

Embeddings: FP32 for ``--scheme fp32``; otherwise the token and position embeddings are
rounded to FP16 (the usual practice), or with ``--quantize-embeddings`` the token
embedding (which is also the tied output projection) goes through the scheme too.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from minigpt_np import checkpoint, corpus
from refquant import gguf
from minigpt_np.model import EOT, Config, Linears, forward, log_softmax, quantize_sequential
from refquant._checks import cli_int

CONT = [list((label + "\n").encode()) for label in corpus.LABELS]
CONT_LEN = max(len(c) for c in CONT)


def calibration_sequences(cfg: Config, n: int = 128) -> np.ndarray:
    """The first ``n`` windows of ``n_ctx`` tokens of the training stream (calibration data)."""
    stream = corpus.token_stream(corpus.make_splits().train)
    return stream[: n * cfg.n_ctx].reshape(n, cfg.n_ctx).astype(np.int64)


def _identity_calib(w: np.ndarray) -> np.ndarray:
    """Calibration inputs for the token embedding (a lookup, not a Linear): one-hot rows."""
    return np.eye(w.shape[1], dtype=np.float32)


def prepare(params: dict, cfg: Config, scheme: str = "fp32", quantize_embeddings: bool = False,
            progress: bool = False):
    """``(params, linears)`` for evaluation under ``scheme``: Linear methods + embedding policy.

    Calibrated schemes (GPTQ, AWQ, SmoothQuant, LLM.int8()) are quantized layer by layer
    on 128 training sequences (``model.quantize_sequential``).
    """
    from refquant import schemes

    p = dict(params)
    if scheme != "fp32":
        for k in ("token_embd.weight", "position_embd.weight"):
            p[k] = p[k].astype(np.float16).astype(np.float32)
        if quantize_embeddings:
            emb = params["token_embd.weight"]
            s = schemes.get(scheme)
            p["token_embd.weight"] = s.quantize(emb, calib=_identity_calib(emb) if s.needs_calib else None).dequantize()
    if scheme != "fp32" and schemes.get(scheme).needs_calib:
        return p, quantize_sequential(p, cfg, scheme, calibration_sequences(cfg), progress=progress)
    return p, Linears(p, cfg, scheme)


def score(params, cfg, linears, lines, *, batch: int = 48, progress: bool = True, keep_logits: bool = False) -> dict:
    """Accuracy, per-label accuracy and per-byte perplexity over ``lines``. ``keep_logits``:
    also ``logits`` (N, vocab) float32 and ``tokens`` (N,), the next-byte predictions at
    every position of every line's text (in a fixed order whatever the weights: the input
    of ``refquant.metrics.kl_divergence`` against another model's)."""
    items = []
    for i, ln in enumerate(lines):
        text, label = corpus.parse(ln)
        prefix = [EOT] + list((text + corpus.SEP).encode())
        items.append((len(prefix), i, prefix, corpus.LABELS.index(label)))
    items.sort()
    pred = np.empty(len(lines), np.int64)
    truth = np.empty(len(lines), np.int64)
    nll, nbytes = 0.0, 0
    kept_logits, kept_tokens = [], []
    groups = defaultdict(list)
    for it in items:
        groups[it[0]].append(it)
    chunks = [g[i:i + batch] for g in groups.values() for i in range(0, len(g), batch)]
    for chunk in tqdm(chunks, desc="evaluate", unit="batch", disable=not progress):
        toks = np.array([c[2] for c in chunk])
        B, L = toks.shape
        logits, past = forward(params, toks, cfg=cfg, linears=linears)
        lp = log_softmax(logits.astype(np.float64))
        nll -= np.take_along_axis(lp[:, :-1], toks[:, 1:, None], -1).sum()
        if keep_logits:
            kept_logits.append(logits[:, :-1].reshape(-1, logits.shape[-1]).astype(np.float32))
            kept_tokens.append(toks[:, 1:].reshape(-1))
        nbytes += B * (L - 1)
        # the 9 continuations at once: (B*9, CONT_LEN), padded; padding only follows the label
        cont = np.full((B, 9, CONT_LEN), ord("\n"), np.int64)
        for j, c in enumerate(CONT):
            cont[:, j, :len(c)] = c
        rep = [(np.repeat(k, 9, axis=0), np.repeat(v, 9, axis=0)) for k, v in past]
        clog, _ = forward(params, cont.reshape(B * 9, CONT_LEN), cfg=cfg, linears=linears, past=rep)
        clp = log_softmax(clog.astype(np.float64)).reshape(B, 9, CONT_LEN, -1)
        first = lp[:, -1][:, None, :].repeat(9, 1)  # the prefix's last position predicts token 0
        scores = np.zeros((B, 9))
        for j, c in enumerate(CONT):
            n = len(c)
            s = np.take_along_axis(first[:, j], cont[:, j, :1], -1)[:, 0]
            s += np.take_along_axis(clp[:, j, : n - 1], cont[:, j, 1:n, None], -1)[..., 0].sum(-1)
            scores[:, j] = s
        idx = np.array([c[1] for c in chunk])
        t = np.array([c[3] for c in chunk])
        pred[idx], truth[idx] = scores.argmax(1), t
        nll -= scores[np.arange(B), t].sum()
        nbytes += sum(len(CONT[k]) for k in t)
    correct = pred == truth
    per_label = {lab: float(correct[truth == j].mean()) for j, lab in enumerate(corpus.LABELS) if (truth == j).any()}
    out = dict(accuracy=float(correct.mean()), per_label=per_label, perplexity=float(np.exp(nll / nbytes)),
               n=len(lines), correct=correct)
    if keep_logits:
        out.update(logits=np.concatenate(kept_logits), tokens=np.concatenate(kept_tokens))
    return out


def export_check(path, params, cfg, linears, scheme, lines) -> dict:
    """Write the quantized model to GGUF and read it back: ``{"file_bytes", "ggml_types",
    "max_logit_diff", "weights": [(written, read back) QuantizedTensor or float pairs]}``;
    the caller compares (the benchmark reports, the test asserts bit identity)."""
    from refquant import linear

    out = checkpoint.save_quantized(path, params, cfg, linears, scheme)
    p2, cfg2, qts = checkpoint.load_quantized(out)
    lin2 = Linears(p2, cfg2)
    lin2.layers.update({n: linear.QuantizedLinear(qt) for n, qt in qts.items()})
    pairs = [(getattr(lin, "qt", lin.dequantize()), qts.get(n, p2[n + ".weight"])) for n, lin in linears.layers.items()]
    toks = np.array([[EOT] + list(ln.encode())[: cfg.n_ctx - 1] for ln in lines[:1]])
    a, _ = forward(params, toks, cfg=cfg, linears=linears)
    b, _ = forward(p2, toks, cfg=cfg2, linears=lin2)
    with gguf.read(out) as f:  # the ggml types the Linears were stored as (none: stored as parts)
        ggml = sorted({f.tensors[n + ".weight"].type.name for n in linears.layers if n + ".weight" in f.tensors})
    return dict(file_bytes=out.stat().st_size, max_logit_diff=float(np.abs(a - b).max()), ggml_types=ggml,
                weights=pairs)


def _same(a, b) -> bool:
    """Whether two QuantizedTensors (or float arrays) hold identical stored data."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):   # a plain F16/BF16 tensor reads back as floats
        floats = lambda q: q if isinstance(q, np.ndarray) else q.dequantize()  # noqa: E731
        return np.array_equal(floats(a), floats(b))
    arrays = lambda q: [q.codes, q.scales, q.zeros] + [q.meta[k] for k in sorted(q.meta)]  # noqa: E731
    return (a.shape == b.shape and a.scheme == b.scheme and sorted(a.meta) == sorted(b.meta)
            and all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(arrays(a), arrays(b))))


def evaluate(scheme: str = "fp32", *, quantize_embeddings: bool = False, limit: int | None = None, path=None,
             progress: bool = True, export_dir=None, keep_logits: bool = False) -> dict:
    """Metrics of the committed checkpoint (or ``path``) on the test split under ``scheme``
    (``keep_logits``: with ``score``'s ``logits`` and ``tokens``)."""
    params, cfg, _ = checkpoint.load(path or checkpoint.DEFAULT)
    splits = corpus.make_splits()
    test, verbs = splits.test[:limit], splits.test_verbs[:limit]
    t0 = time.time()
    p, linears = prepare(params, cfg, scheme, quantize_embeddings, progress)
    quant_s = time.time() - t0
    r = score(p, cfg, linears, test, progress=progress, keep_logits=keep_logits)
    if export_dir is not None and scheme != "fp32":
        from pathlib import Path

        r["export"] = export_check(Path(export_dir) / f"minigpt-{scheme}.gguf", p, cfg, linears, scheme, test)
        pairs = r["export"].pop("weights")
        r["export"]["weights_identical"] = bool(pairs) and all(_same(a, b) for a, b in pairs)
    held = np.array([v in splits.heldout_verbs for v in verbs])
    r["heldout_accuracy"] = float(r["correct"][held].mean()) if held.any() else float("nan")
    r["heldout_n"] = int(held.sum())
    r.update(scheme=scheme, quantize_embeddings=quantize_embeddings, linear_bytes=linears.nbytes,
             model_bytes=model_bytes(params, linears, scheme, quantize_embeddings),
             linear_weights=sum(params[n + ".weight"].size for n in linears.layers), quantize_seconds=quant_s)
    del r["correct"]
    return r


def model_bytes(params: dict, linears, scheme: str, quantize_embeddings: bool = False) -> int:
    """Everything stored: the Linears as quantized, embeddings FP16 (the token embedding
    under ``scheme`` when ``quantize_embeddings``), LayerNorms and biases FP32."""
    from refquant import schemes

    total = linears.nbytes
    for k, v in params.items():
        if k.endswith(".weight") and k[: -len(".weight")] in linears.layers:
            continue  # counted in linears.nbytes
        if scheme == "fp32":
            total += 4 * v.size
        elif k == "token_embd.weight" and quantize_embeddings:   # what prepare() stores for it
            s = schemes.get(scheme)
            total += s.quantize(v, calib=_identity_calib(v) if s.needs_calib else None).nbytes
        elif k in ("token_embd.weight", "position_embd.weight"):
            total += 2 * v.size
        else:
            total += 4 * v.size
    return total


def record_metrics(path, *, limit: int | None = None, subset: int = 300) -> dict:
    """Evaluate the FP32 checkpoint at ``path`` and store the figures in its metadata.

    Records test accuracy / perplexity / held-out-verb accuracy on the first ``limit`` test
    lines (all by default) and, so a test can re-check them quickly, the same on the first
    ``subset`` lines (``minigpt.subset_*``).
    """
    params, cfg, meta = checkpoint.load(path)
    full = evaluate("fp32", limit=limit, path=path, progress=False)
    n = min(subset, full["n"])
    sub = evaluate("fp32", limit=n, path=path, progress=False)
    extra = {k[len("minigpt."):]: v for k, v in meta.items() if k.startswith("minigpt.")}
    extra.update(test_lines=full["n"], test_accuracy=full["accuracy"], test_perplexity=full["perplexity"],
                 heldout_accuracy=full["heldout_accuracy"], subset_n=n, subset_accuracy=sub["accuracy"],
                 subset_perplexity=sub["perplexity"])
    checkpoint.save(path, params, cfg, extra)
    return full


def print_report(r: dict) -> None:
    bpw = 8 * r["linear_bytes"] / r["linear_weights"]
    print(f"scheme {r['scheme']}: {bpw:.3f} bits/weight in the Linears, {r['n']} test lines")
    print(f"test perplexity (per byte): {r['perplexity']:.4f}")
    print(f"verb-tense accuracy: {100 * r['accuracy']:.2f}%   held-out verbs: {100 * r['heldout_accuracy']:.2f}% "
          f"({r['heldout_n']} lines)")
    print(f"{'':10s}" + "".join(f"{a:>13s}" for a in corpus.ASPECTS))
    for t in corpus.TENSES:
        print(f"{t:10s}" + "".join(f"{100 * r['per_label'].get(f'{t} {a}', float('nan')):12.2f}%" for a in corpus.ASPECTS))


def _architecture(path) -> str | None:
    with gguf.read(path) as f:
        return f.metadata.get("general.architecture")


def llama_report(path, n_tokens: int = 4096) -> dict:
    """Perplexity of a llama GGUF on the first ``n_tokens`` tokens of ``pydoc_data.topics``
    (sliding window 512, stride 256; ``minigpt_np.llama.perplexity``)."""
    from minigpt_np import llama
    from minigpt_np.tokenizer import Tokenizer

    params, cfg, meta = llama.load(path)
    ids = Tokenizer(meta).encode(llama.reference_text())[:n_tokens]
    r = llama.perplexity(params, cfg, ids, progress=True)
    from pathlib import Path

    print(f"{Path(path).name}: perplexity {r['perplexity']:.4f} over {r['tokens']} tokens of pydoc_data.topics "
          f"(window {r['window']}, stride {r['stride']}), file {Path(path).stat().st_size / 1e6:.1f} MB")
    return r


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheme", default="fp32")
    ap.add_argument("--quantize-embeddings", action="store_true")
    ap.add_argument("--limit", type=cli_int(1, 1 << 30), default=None, help="evaluate only the first N test lines")
    ap.add_argument("--model", default=None, help="checkpoint path (default: the committed one); a llama-"
                    "architecture GGUF (e.g. SmolLM2) is evaluated by perplexity on real text instead")
    ap.add_argument("--tokens", type=cli_int(2, 1 << 30), default=4096,
                    help="llama models: score the first N tokens of pydoc_data.topics (default 4096)")
    args = ap.parse_args(argv)
    if args.model is not None and _architecture(args.model) == "llama":
        return llama_report(args.model, args.tokens)
    print_report(evaluate(args.scheme, quantize_embeddings=args.quantize_embeddings, limit=args.limit, path=args.model))


if __name__ == "__main__":
    main()
