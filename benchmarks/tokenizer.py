"""SmolLM2 tokenizer encode speed per MB, by kind of input.

    python -m benchmarks.tokenizer [--quick] [--mb 1.0]

The inputs that made the old quadratic BPE take minutes: prose (CPython's help topics),
code (this repository's Python), CJK text without spaces, one character repeated and
spaces only, each ``--mb`` MB of UTF-8. After checking that decoding gives each input
back, the inputs are encoded in turn, from an empty piece cache, in 5 interleaved rounds
(thread CPU time); reports the shortest and the median seconds per MB and the ratio of
the shortest to prose's, all from the same rounds. Writes ``benchmarks/results/tokenizer.json``.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks import common
from minigpt_np import llama
from minigpt_np.tokenizer import Tokenizer


def _take(text: str, nbytes: int) -> str:
    """The first ``nbytes`` UTF-8 bytes of ``text`` repeated as needed, cut at a character."""
    reps = -(-nbytes // max(1, len(text.encode())))
    return (text * reps).encode()[:nbytes].decode("utf-8", errors="ignore")


def inputs(nbytes: int) -> dict[str, str]:
    code = "\n".join(p.read_text() for p in sorted((Path(__file__).parent.parent / "refquant").rglob("*.py")))
    cjk = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(nbytes // 3 + 1))   # no spaces
    return {"prose": _take(llama.reference_text(), nbytes), "code": _take(code, nbytes), "cjk": _take(cjk, nbytes),
            "one character": "a" * nbytes, "spaces": " " * nbytes}


def run(quick: bool = False, mb: float = 1.0) -> dict:
    from refquant import gguf

    nbytes = int((0.05 if quick else mb) * 2**20)
    with gguf.read(llama.default_model()) as f:
        tok = Tokenizer(f.metadata)
    texts = inputs(nbytes)
    counts = {}
    for kind, text in texts.items():   # verify first
        tok._cache.clear()
        ids = tok.encode(text)
        if tok.representable(text) and tok.decode(ids) != text:
            raise AssertionError(f"{kind}: decode(encode(text)) != text")
        counts[kind] = len(ids)
    times = {kind: [] for kind in texts}
    for _ in range(3 if quick else 5):   # interleaved: every round encodes every kind once, in turn
        for kind, text in texts.items():
            tok._cache.clear()
            t0 = time.thread_time()
            tok.encode(text)
            times[kind].append(time.thread_time() - t0)
    rows = []
    for kind, text in texts.items():
        mbytes = len(text.encode()) / 2**20
        rows.append(dict(kind=kind, mb=mbytes, tokens=counts[kind], seconds=min(times[kind]),
                         s_per_mb=min(times[kind]) / mbytes, median_s_per_mb=float(np.median(times[kind])) / mbytes))
    prose = rows[0]["s_per_mb"]
    for r in rows:
        r["x_prose"] = r["s_per_mb"] / prose
    return dict(benchmark="tokenizer", quick=quick, machine=common.machine(), results=rows)


def main(argv=None) -> None:
    data, path = common.run_and_save(__doc__, "tokenizer", run, argv, "--mb", type=float, default=1.0)
    print(f"{'input':14s} {'MB':>6s} {'tokens':>9s} {'s/MB':>7s} {'x prose':>8s}")
    for r in data["results"]:
        print(f"{r['kind']:14s} {r['mb']:6.2f} {r['tokens']:9d} {r['s_per_mb']:7.2f} {r['x_prose']:8.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
