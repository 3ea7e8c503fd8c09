"""Collect an importance matrix as llama-imatrix does, on this package's NumPy forward.

    python -m minigpt_np.imatrix model.gguf --text FILE [-c N] [--chunks N] [--process-output]
        [-o imatrix.gguf] [--output-format gguf|dat]

What ``tools/imatrix/imatrix.cpp`` (llama.cpp 0c1e570) collects and how, here too:

* the text is tokenized by the model's own tokenizer, a BOS in front when the vocabulary
  adds one; it must hold at least ``2 · n_ctx`` tokens, and is cut into
  ``min(--chunks, tokens // n_ctx)`` chunks of ``n_ctx`` tokens (``-c``: 512, or the
  model's context when smaller: MiniGPT's is 128);
* each chunk runs from an empty cache, its first token replaced by BOS when the vocabulary
  adds one;
* for every matrix product whose weight is named ``blk.*`` (and ``output.weight`` with
  ``--process-output``; a model with tied embeddings has none), per input column j,
  ``Σ x_j²`` over all tokens of all chunks, summed in float32 token by token, and one count
  of tokens per weight (``in_sum2``, ``counts``); q, k and v (gate and up) see the same
  input and get the same sums, as llama.cpp's separate products do;
* per chunk, the perplexity of its second half (``[1]12.3456,[2]…``, cumulative), as
  llama-imatrix prints it.

The file is written by ``refquant.gguf.imatrix`` (GGUF by default, the legacy ``.dat`` with
``--output-format dat``), and ``python -m refquant quantize --ftype … --imatrix FILE``
(or llama-quantize) reads it. The sums are not llama-imatrix's bit for bit: its activations
come from ggml's kernels, these from NumPy's; the definition is the same (tested by hand on
a two-layer model, and against llama-imatrix's own file for MiniGPT within float32
tolerance).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from refquant._checks import cli_int

F32 = np.float32


def collect(model, tokens, n_ctx: int, chunks: int | None = None, *, process_output: bool = False,
            progress: bool = True, on_chunk=None):
    """``(IMatrix, perplexities)`` of ``model`` (``gguf_model.Model``) over ``tokens``
    (module docstring); ``on_chunk(i, ppl)`` after each chunk (the running perplexity)."""
    from tqdm import tqdm

    from refquant.gguf.imatrix import IMatrix

    tokens = np.asarray(tokens, np.int64)
    if n_ctx < 16:
        raise ValueError(f"-c {n_ctx}: llama-imatrix collects batches of 16 tokens or more")
    if tokens.size < 2 * n_ctx:
        raise ValueError(f"you need at least {2 * n_ctx} tokens for a context of {n_ctx} tokens; "
                         f"the text tokenizes to only {tokens.size}")
    n_chunk = tokens.size // n_ctx if chunks is None else min(chunks, tokens.size // n_ctx)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def hook(name, x):
        if not (name.startswith("blk.") or (process_output and name == "output.weight")):
            return
        x = np.asarray(x, F32).reshape(-1, x.shape[-1])
        acc = sums.setdefault(name, np.zeros(x.shape[1], F32))
        for row in x:               # float32, token by token, as llama-imatrix accumulates
            acc += row * row
        counts[name] = counts.get(name, 0) + x.shape[0]

    nll, count, ppls = 0.0, 0, []
    for i in tqdm(range(n_chunk), desc="imatrix", unit="chunk", disable=not progress):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if model.bos is not None:
            chunk[0] = model.bos
        logits = model.logits(chunk, hook).astype(np.float64)
        first = n_ctx // 2
        z = logits[first:n_ctx - 1]
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(z)), chunk[first + 1:n_ctx]].sum())
        count += len(z)
        ppls.append(float(np.exp(nll / count)))
        if on_chunk is not None:
            on_chunk(i, ppls[-1])
    im = IMatrix({n: s.reshape(1, -1) for n, s in sums.items()}, {n: np.array([c]) for n, c in counts.items()},
                 [], n_chunk, n_ctx)
    return im, ppls


def main(argv=None) -> int:
    from minigpt_np.gguf_model import open_model
    from refquant.gguf import imatrix as files

    ap = argparse.ArgumentParser(prog="python -m minigpt_np.imatrix", description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--text", "-f", required=True, help="a UTF-8 text file")
    ap.add_argument("-c", "--ctx-size", type=cli_int(16, 1 << 20), default=None,
                    help="tokens per chunk (default 512, or the model's context when smaller)")
    ap.add_argument("--chunks", type=cli_int(1, 1 << 30), default=None, help="at most this many chunks")
    ap.add_argument("--process-output", action="store_true", help="collect output.weight too")
    ap.add_argument("-o", "--output", default="imatrix.gguf")
    ap.add_argument("--output-format", choices=("gguf", "dat"), default="gguf")
    args = ap.parse_args(argv)
    try:
        text = Path(args.text).read_text(encoding="utf-8")
        model = open_model(args.model)
        n_ctx = args.ctx_size or min(512, model.n_ctx)
        if n_ctx > model.n_ctx:
            raise ValueError(f"-c {n_ctx} exceeds the model's context of {model.n_ctx}")
        tokens = model.encode(text)
        print(f"{args.text}: {len(tokens)} tokens; chunks of {n_ctx}", file=sys.stderr)
        im, ppls = collect(model, tokens, n_ctx, args.chunks, process_output=args.process_output,
                           on_chunk=lambda i, p: print(f"[{i + 1}]{p:.4f},", end="", file=sys.stderr, flush=True))
        print(f"\nFinal estimate: PPL = {ppls[-1]:.4f}", file=sys.stderr)
        im.datasets = [args.text]
        (files.write_dat if args.output_format == "dat" else files.write)(args.output, im)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {len(im)} entries over {im.chunk_count} chunks of {n_ctx} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
