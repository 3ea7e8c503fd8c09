"""Batch-1 decode speed of SmolLM2-135M: GGUF-typed weights with refquant's kernels vs FP32.

    python -m benchmarks.decode [--quick] [-n 64]

Loads the shipped file twice -- ``dtype="stored"`` (Q4_1 Linears and the Q8_0 tied head run
the numba kernels on their block bytes) and ``dtype="f32"`` (everything dequantized, NumPy
BLAS) -- checks that the first decode step of both agrees (same argmax, logits within 5% of
their range: the kernels round x to 8-bit blocks), then times greedy decoding of ``-n``
tokens after a fixed prompt. Writes ``benchmarks/results/decode.json``.
"""
from __future__ import annotations

import numpy as np

from benchmarks import common
from minigpt_np import generate, llama
from minigpt_np.tokenizer import Tokenizer

PROMPT = "The capital of France is"


def run(quick: bool = False, n: int = 64) -> dict:
    n = 4 if quick else n
    src = llama.default_model()
    models = {dt: llama.load(src, dtype=dt) for dt in ("stored", "f32")}
    tok = Tokenizer(models["f32"][2])
    ids = tok.encode(PROMPT)
    first = {}
    for dt, (params, cfg, _) in models.items():
        logits, cache = llama.forward(params, cfg, ids[:-1])
        first[dt], _ = llama.forward(params, cfg, ids[-1:], cache)
    a, b = first["f32"][0], first["stored"][0]
    if np.argmax(a) != np.argmax(b) or np.abs(a - b).max() > 0.05 * np.abs(a).max():
        raise AssertionError("the kernel path's first decode step disagrees with the FP32 path")
    rows = []
    for dt, (params, cfg, _) in models.items():
        generate.generate(params, cfg, tok, ids, 2)  # warm-up: compile the kernels
        out, st = generate.generate(params, cfg, tok, ids, n)
        rows.append(dict(dtype=dt, text=PROMPT + tok.decode(out), **st))
    speed = {r["dtype"]: r["tokens_per_s"] for r in rows}
    return dict(benchmark="decode", quick=quick, model=src.name, prompt=PROMPT, machine=common.machine(),
                results=rows, stored_over_f32=speed["stored"] / speed["f32"])


def main(argv=None) -> None:
    data, path = common.run_and_save(__doc__, "decode", run, argv, "-n", type=int, default=64)
    for r in data["results"]:
        print(f"{r['dtype']:7s} {r['tokens_per_s']:7.1f} tokens/s  {r['text']!r}")
    print(f"stored / f32: {data['stored_over_f32']:.2f}x; wrote {path}")


if __name__ == "__main__":
    main()
