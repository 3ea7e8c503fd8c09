"""KL divergence of a quantized model from its base, as ``llama-perplexity --kl-divergence``
measures it (llama.cpp 0c1e570, ``tools/perplexity/perplexity.cpp``).

    python -m minigpt_np.kld --base base.gguf --model quant.gguf [--model other.gguf ...] --text FILE
        [-c N] [--chunks N]
    python -m minigpt_np.kld --base base.gguf --text FILE --save-base base-logits.npz   (once)
    python -m minigpt_np.kld --base base-logits.npz --model quant.gguf ...             (then)

The text is tokenized by the base model's tokenizer and cut into chunks of ``-c`` tokens
(512, or the model's context when smaller), as llama-perplexity does: each chunk from an
empty cache, its first token replaced by BOS when the vocabulary adds one, and only the
second half of each chunk scored (positions ``n_ctx/2 … n_ctx−2``, each predicting the
next token), so every scored token has at least half a context before it. Both models run
on this package's NumPy forward (``minigpt_np.gguf_model``: every tensor dequantized to
float32, the weight error alone). ``refquant.metrics.kl_divergence`` does the arithmetic:
mean KLD ± standard error, its percentiles and maximum, the same-top-token rate ± se, Δp
of the next token, both perplexities and their ratio; printed in llama-perplexity's
words.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from refquant._checks import cli_int


def windows(tokens, n_ctx: int, chunks: int | None = None, bos: int | None = None) -> np.ndarray:
    """(n_chunk, n_ctx) token ids: llama-perplexity's chunks (module docstring)."""
    tokens = np.asarray(tokens, np.int64)
    if tokens.size < 2 * n_ctx:
        raise ValueError(f"you need at least {2 * n_ctx} tokens for a context of {n_ctx} tokens; "
                         f"the text tokenizes to only {tokens.size}")
    n = tokens.size // n_ctx if chunks is None else min(chunks, tokens.size // n_ctx)
    w = tokens[:n * n_ctx].reshape(n, n_ctx).copy()
    if bos is not None:
        w[:, 0] = bos
    return w


def scored_logits(model, wins, progress: bool = True) -> np.ndarray:
    """float32 (n_chunk · (n_ctx/2 − 1), vocab): the logits of the scored positions."""
    from tqdm import tqdm

    first = wins.shape[1] // 2
    return np.concatenate([model.logits(w)[first:-1] for w in tqdm(wins, desc=Path(model.path).name, unit="chunk",
                                                                      disable=not progress, leave=False)])


def next_tokens(wins) -> np.ndarray:
    first = wins.shape[1] // 2
    return wins[:, first + 1:].reshape(-1)


def compare(base_logits, model, wins, progress: bool = True) -> dict:
    """``refquant.metrics.kl_divergence`` of ``model`` (``gguf_model.Model``) against the
    base's scored logits on chunks ``wins``."""
    from refquant import metrics

    return metrics.kl_divergence(base_logits, scored_logits(model, wins, progress), tokens=next_tokens(wins))


def report(r: dict) -> str:
    """The statistics in llama-perplexity's words."""
    k, p = r["kld"], r["same_top"]
    lines = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {r['ppl']['mean']:10.6f} ± {r['ppl']['se']:.6f}",
             f"Mean PPL(base)                : {r['ppl_ref']['mean']:10.6f} ± {r['ppl_ref']['se']:.6f}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * r['cor_nll']:6.2f}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {r['ln_ppl_ratio']['mean']:10.6f} ± {r['ln_ppl_ratio']['se']:.6f}",
             f"Mean PPL(Q)/PPL(base)         : {r['ppl_ratio']['mean']:10.6f} ± {r['ppl_ratio']['se']:.6f}",
             "", "====== KL divergence statistics ======",
             f"Mean    KLD: {k['mean']:10.6f} ± {k['se']:.6f}",
             f"Maximum KLD: {k['max']:10.6f}"]
    lines += [f"{label:<8}KLD: {k[key]:10.6f}" for label, key in (("99.9%", "p99.9"), ("99.0%", "p99"),
                                                                 ("95.0%", "p95"), ("90.0%", "p90")) if key in k]
    lines += [f"Median  KLD: {k['median']:10.6f}", f"Minimum KLD: {k['min']:10.6f}", "",
              "====== Token probability statistics ======",
              f"Mean    Δp: {100 * r['delta_p']['mean']:6.3f} ± {100 * r['delta_p']['se']:.3f} %",
              f"RMS Δp    : {100 * r['delta_p']['rms']:6.3f} ± {100 * r['delta_p']['rms_se']:.3f} %",
              f"Same top p: {100 * p['mean']:6.3f} ± {100 * p['se']:.3f} %", f"({r['n']} positions)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    from minigpt_np.gguf_model import open_model

    ap = argparse.ArgumentParser(prog="python -m minigpt_np.kld", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the base model (.gguf), or logits saved by --save-base (.npz)")
    ap.add_argument("--model", action="append", default=[], help="a quantized model (repeatable)")
    ap.add_argument("--text", "-f", help="a UTF-8 text file (not needed with saved base logits)")
    ap.add_argument("-c", "--ctx-size", type=cli_int(4, 1 << 20), default=None,
                    help="tokens per chunk (default 512, or the model's context when smaller)")
    ap.add_argument("--chunks", type=cli_int(1, 1 << 30), default=None, help="at most this many chunks")
    ap.add_argument("--save-base", metavar="FILE", help="save the base's scored logits and the chunks (.npz)")
    args = ap.parse_args(argv)
    try:
        if args.base.endswith(".npz"):
            with np.load(args.base) as z:
                wins, base = z["windows"], z["logits"]
        else:
            if not args.text:
                raise ValueError("--text is needed to run the base model")
            base_model = open_model(args.base)
            n_ctx = args.ctx_size or min(512, base_model.n_ctx)
            if n_ctx > base_model.n_ctx:
                raise ValueError(f"-c {n_ctx} exceeds the model's context of {base_model.n_ctx}")
            wins = windows(base_model.encode(Path(args.text).read_text(encoding="utf-8")), n_ctx, args.chunks,
                           base_model.bos)
            base = scored_logits(base_model, wins)
            if args.save_base:
                np.savez(args.save_base, windows=wins, logits=base)
                print(f"wrote {args.save_base}: {len(wins)} chunks of {wins.shape[1]} tokens, {base.shape[0]} "
                      f"scored positions")
        if not args.model and not args.save_base:
            raise ValueError("give --model (what to compare with the base) or --save-base")
        for path in args.model:
            m = open_model(path)
            if m.vocab != base.shape[1]:
                raise ValueError(f"{path}: a vocabulary of {m.vocab}, the base's has {base.shape[1]}")
            print(f"\n{path}: {len(wins)} chunks of {wins.shape[1]} tokens")
            print(report(compare(base, m, wins)))
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
