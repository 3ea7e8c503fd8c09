"""Regenerate ``mix_tables.json.gz``: the ggml type llama-quantize gives every tensor of SmolLM2
and MiniGPT, per file type, with and without an importance matrix, and for a few switches.

Not run by the tests (it needs llama.cpp's tools); it records where the tables came from::

    ../shared/tools/llama-cpp.sh      # llama-quantize of llama.cpp 0c1e570 (llama-cpp-python 0.3.36)
    python -m refquant quantize SmolLM2-135M-Instruct.Q4_1.gguf smollm2-F32.gguf --type F32
    llama-imatrix -m SmolLM2-135M-Instruct.Q4_1.gguf -f TEXT -c 128 --chunks 2 -o smollm2-imatrix.gguf
    python tests/data/make_mix_tables.py LLAMA_QUANTIZE smollm2-F32.gguf smollm2-imatrix.gguf

``llama-quantize --dry-run`` prints, per tensor in its order, the type it would write
(``... -> 0.05 MiB (q6_K)``; a tensor it leaves alone has no arrow), kept as the tensor names
in that order (once per model) and, per run, their types; ``{"error": ...}`` where it refuses. The MiniGPT rows use
``minigpt_np/checkpoints/minigpt.gguf`` and ``tests/data/minigpt_imatrix.gguf``.
"""
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from refquant import gguf
from refquant.gguf import mixes

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*\], type =\s+(\w+),.*?(?:\((\w+)\))?\s*$")
# switch sets run on Q4_K_M (and Q2_K for the tied output's --output-tensor-type)
FILES = [("Q4_K_M", True), ("Q3_K_S", True), ("Q2_K_S", True), ("IQ4_XS", True), ("Q4_0", True),
         ("Q4_K_M", False), ("Q2_K", False), ("Q5_K_S", False)]
SWITCHES = {"pure": ["--pure"], "output_q8_0": ["--output-tensor-type", "q8_0"],
            "token_embd_q5_k": ["--token-embedding-type", "q5_k"],
            "tensor_types": ["--tensor-type", "attn_v=q8_0", "--tensor-type", r"blk\.1[0-9]\.ffn=iq4_nl"],
            "leave_output": ["--leave-output-tensor"]}


def dry_run(exe, model, ftype, extra=()) -> list:
    out = subprocess.run([exe, "--dry-run", *extra, str(model), ftype], capture_output=True, text=True, timeout=600)
    refused = re.search(r"failed to quantize: (.*)", out.stdout + out.stderr)
    if out.returncode != 0 and refused:        # e.g. Q1_0 on 576-wide rows: no fallback
        return {"error": refused.group(1).strip()}
    if out.returncode != 0:
        raise RuntimeError(f"{exe} {ftype} {extra}: {out.stderr[-400:]}")
    names, types = [], []
    for line in (out.stdout + out.stderr).splitlines():
        m = LINE.match(line.strip())
        if m:
            name, cur, new = m.groups()
            names.append(name)
            types.append(gguf.ggml_type((new or cur).upper()).name)
    if not names:
        raise RuntimeError(f"no tensor lines from {exe} --dry-run {model} {ftype}")
    return {"tensors": names, "types": " ".join(types)}


def main(exe, smollm2_f32, smollm2_imatrix):
    models = {"smollm2": (Path(smollm2_f32), Path(smollm2_imatrix)),
              "minigpt": (ROOT / "minigpt_np/checkpoints/minigpt.gguf", ROOT / "tests/data/minigpt_imatrix.gguf")}
    tables = {"llama.cpp": "0c1e570", "models": {}}
    for key, (model, imatrix) in models.items():
        t = tables["models"][key] = {"file": model.name, "plain": {}, "imatrix": {}, "switches": {}}
        for ft in mixes.FTYPES:
            if not mixes.requires_imatrix("blk.0.ffn_down.weight", mixes.FTYPES[ft][1], ft):
                t["plain"][ft] = dry_run(exe, model, ft)
            t["imatrix"][ft] = dry_run(exe, model, ft, ["--imatrix", str(imatrix)])
        for label, extra in SWITCHES.items():
            t["switches"][label] = dry_run(exe, model, "Q4_K_M", extra)
        # every run lists the tensors in one order: kept once per model
        runs = [r for part in ("plain", "imatrix", "switches") for r in t[part].values() if "tensors" in r]
        t["tensors"] = runs[0]["tensors"]
        for r in runs:
            assert r.pop("tensors") == t["tensors"], model
    # whole files llama-quantize writes from MiniGPT (run from the repository's root, so that
    # quantize.imatrix.file reads tests/data/minigpt_imatrix.gguf): their sha256
    tables["files"] = {}
    for ft, with_imatrix in FILES:
        extra = ["--imatrix", "tests/data/minigpt_imatrix.gguf"] if with_imatrix else []
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.gguf"
            subprocess.run([exe, *extra, "minigpt_np/checkpoints/minigpt.gguf", str(out), ft], cwd=ROOT, check=True,
                           capture_output=True, timeout=600)
            tables["files"][f"{ft}{'+imatrix' if with_imatrix else ''}"] = hashlib.sha256(out.read_bytes()).hexdigest()
    with gzip.open(Path(__file__).with_name("mix_tables.json.gz"), "wt") as f:
        json.dump(tables, f, separators=(",", ":"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
