"""Peak memory of `python -m refquant quantize/dequantize` on SmolLM2: they stream tensor by tensor.

    python -m benchmarks.cli_memory [--quick]

Runs each command in a fresh interpreter and reads its peak resident set size
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper that runs only that child),
next to the peak of an interpreter that only imports refquant. The budget is that
baseline plus 3x the largest tensor's float32 size (the token embedding). ``--quick``
quantizes to Q8_0 only. Writes ``benchmarks/results/cli_memory.json``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import common
from minigpt_np import llama

_WRAPPER = ("import json, resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "print(json.dumps({'rc': r.returncode, 'err': r.stderr[-500:], "
            "'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")


def peak_mb(args: list[str]) -> float:
    """Peak RSS in MB of ``python args...`` run on its own (fails if it fails)."""
    out = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable, *args], capture_output=True, text=True,
                         cwd=common.ROOT, check=True)
    r = json.loads(out.stdout)
    if r["rc"] != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r['err']}")
    return r["maxrss_kb"] / 1024


def run(quick: bool = False) -> dict:
    from refquant import gguf

    src = llama.default_model()
    with gguf.read(src) as f:
        largest = max(f.tensors.values(), key=lambda t: t.n_elements)
        largest_mb = 4 * largest.n_elements / 2**20
    base = peak_mb(["-c", "import refquant, refquant.gguf, numba"])
    budget = base + 3 * largest_mb
    rows = []
    with tempfile.TemporaryDirectory() as d:
        jobs = [("quantize Q8_0", ["-m", "refquant", "quantize", str(src), str(Path(d) / "q.gguf"), "--type", "Q8_0"])]
        if not quick:
            jobs.append(("dequantize F32", ["-m", "refquant", "dequantize", str(src), str(Path(d) / "f.gguf")]))
        for label, args in jobs:
            mb = peak_mb(args)
            rows.append(dict(command=label, peak_mb=mb, budget_mb=budget, within_budget=mb <= budget))
    return dict(benchmark="cli_memory", quick=quick, model=src.name, largest_tensor=largest.name,
                largest_tensor_f32_mb=largest_mb, interpreter_mb=base, machine=common.machine(), results=rows)


def main(argv=None) -> None:
    args = common.quick_args(__doc__).parse_args(argv)
    data = run(args.quick)
    path = common.write_json("cli_memory", data)
    print(f"interpreter {data['interpreter_mb']:.0f} MB; largest tensor {data['largest_tensor']} "
          f"{data['largest_tensor_f32_mb']:.0f} MB as float32")
    for r in data["results"]:
        print(f"{r['command']:16s} peak {r['peak_mb']:7.0f} MB  (budget {r['budget_mb']:.0f} MB)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
