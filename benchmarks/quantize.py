"""Quantize speed against ggml's C: every GGML type, GPTQ against one sgemm, and the CLI.

    python -m benchmarks.quantize [--quick] [--ggml-src DIR] [--repeats N]

1. **GGML types.** A ``rows × 4096`` N(0,1) float32 matrix (256 rows; ``--quick``: 16) is
   quantized by refquant's compiled kernels (``quants.quantize(impl="numba")``) and by ggml's
   own ``quantize_row_*_ref`` (``quantize_iq4_nl`` for IQ4_NL, what llama-quantize calls),
   built from ``ggml-quants.c`` as a shared library and called through ctypes. The bytes are
   checked equal first (and equal to the NumPy reference). Both run on one thread, timed
   interleaved in one process with the thread's CPU time; median and p10 of ``--repeats``
   calls (30). Also reported: the compiled kernels over every core (wall time) and the NumPy
   reference (one call).

   ggml's source is looked up in ``--ggml-src``, ``$GGML_SRC`` or ``~/.cache/refquant/ggml``
   (a ggml or llama.cpp checkout: ``git clone https://github.com/ggml-org/ggml``) and built
   with ``cc`` the way ``tests/data/make_ggml_golden.py`` describes. Without source or
   compiler the C columns are null and refquant is reported alone.
2. **GPTQ.** ``gptq_quantize`` of a 4096 × 4096 layer (``--quick``: 256) with INT4 g128,
   Hessian from 2·4096 random tokens, against one ``4096³`` float32 ``@`` in the same run
   (wall time, all cores, median of 3).
3. **CLI.** ``python -m refquant quantize`` of the shipped SmolLM2-135M to Q4_K with
   ``--impl numpy`` (the NumPy reference, as the CLI ran before the compiled kernels) and
   ``--impl auto`` (skipped by ``--quick``).

Results: ``benchmarks/results/quantize.json``.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from benchmarks.machine import interleaved_times
from refquant.gguf import quants
from refquant._checks import cli_int

def types() -> list[str]:
    """Every type with a compiled quantizer but Q8_K (an activation format: nothing stores
    weights in it), in the registry's order."""
    from refquant.gguf.quants import compiled

    return [n for n in quants.quantizable() if n in compiled.KERNELS and n != "Q8_K"]
_STUBS = """#include <stddef.h>
#include <stdlib.h>
void ggml_abort(const char *f, int l, const char *fmt, ...) { abort(); }
size_t ggml_row_size(int t, long long n) { return 0; }
const char *ggml_type_name(int t) { return "?"; }
size_t ggml_type_size(int t) { return 0; }
"""


def find_ggml(src: str | None = None) -> Path | None:
    """The ggml directory (holding ``src/ggml-quants.c`` and ``include/``) of a ggml or
    llama.cpp checkout, from ``src``, ``$GGML_SRC`` or ``~/.cache/refquant/ggml``."""
    for cand in (src, os.environ.get("GGML_SRC"), Path.home() / ".cache" / "refquant" / "ggml"):
        if not cand:
            continue
        for d in (Path(cand), Path(cand) / "ggml"):
            if (d / "src" / "ggml-quants.c").is_file() and (d / "include").is_dir():
                return d
    return None


def build_c(ggml: Path | None) -> tuple[ctypes.CDLL | None, str]:
    """ggml-quants.c as a shared library (no ``-march``: no FMA, as llama.cpp builds
    ggml-base; ``-DNDEBUG`` as release builds), or ``(None, why not)``."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if ggml is None:
        return None, "no ggml source (--ggml-src, $GGML_SRC or ~/.cache/refquant/ggml)"
    if cc is None:
        return None, "no C compiler"
    out = Path(tempfile.mkdtemp(prefix="refquant-ggml-"))
    (out / "stubs.c").write_text(_STUBS)
    lib = out / "libggml_quants.so"
    cmd = [cc, "-O2", "-DNDEBUG", "-fPIC", "-shared", "-std=gnu11", f"-I{ggml / 'include'}", f"-I{ggml / 'src'}",
           str(ggml / "src" / "ggml-quants.c"), str(out / "stubs.c"), "-lm", "-o", str(lib)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return None, f"build failed: {r.stderr.strip()[-300:]}"
    return ctypes.CDLL(str(lib)), f"{Path(cc).name} -O2 -DNDEBUG -fPIC -shared ggml-quants.c"


def c_quantizer(lib, name: str, x: np.ndarray, out: np.ndarray):
    """A no-argument call of ggml's quantizer of ``name`` from ``x`` into ``out``."""
    src, dst = ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data)
    if name == "IQ4_NL":
        fn, args = lib.quantize_iq4_nl, (src, dst, ctypes.c_int64(x.shape[0]), ctypes.c_int64(x.shape[1]), None)
    else:
        fn, args = getattr(lib, f"quantize_row_{name.lower().replace('_k', '_K')}_ref"), (src, dst, ctypes.c_int64(x.size))
    return lambda: fn(*args)


def types_row(name: str, x: np.ndarray, lib, repeats: int) -> dict:
    t = quants.TYPES[name]
    blocks = x.reshape(-1, t.block_size)
    ours = quants.quantize(x, name, impl="numba", threads=1)
    t0 = time.perf_counter()
    ref_np = quants.quantize(x, name, impl="numpy")
    numpy_s = time.perf_counter() - t0
    if not np.array_equal(ours, ref_np):
        raise AssertionError(f"{name}: compiled bytes differ from the NumPy reference")
    from refquant.gguf.quants import compiled

    out = np.empty((len(blocks), t.type_size), np.uint8)
    cases = {"numba": (compiled.KERNELS[name], [(blocks, out)])}
    if lib is not None:
        c_out = np.zeros(x.size // t.block_size * t.type_size, np.uint8)
        call = c_quantizer(lib, name, x, c_out)
        call()
        if not np.array_equal(c_out.reshape(ours.shape), ours):
            raise AssertionError(f"{name}: refquant's bytes differ from ggml's C")
        cases["c"] = (call, [()])
    times = interleaved_times(cases, repeats, clock=time.thread_time)
    med = {k: float(np.median(v)) for k, v in times.items()}
    p10 = {k: float(np.percentile(v, 10)) for k, v in times.items()}
    wall = []
    for _ in range(max(3, repeats // 3)):
        t0 = time.perf_counter()
        quants.quantize(x, name, impl="numba")
        wall.append(time.perf_counter() - t0)
    row = dict(type=name, weights=int(x.size), numba_ms=med["numba"] * 1e3, numba_p10_ms=p10["numba"] * 1e3,
               numba_all_cores_ms=float(np.median(wall)) * 1e3, numpy_ms=numpy_s * 1e3, bytes_equal_numpy=True,
               c_ms=None, c_p10_ms=None, ratio=None, bytes_equal_c=None)
    if "c" in med:
        row.update(c_ms=med["c"] * 1e3, c_p10_ms=p10["c"] * 1e3, ratio=med["numba"] / med["c"], bytes_equal_c=True)
    return row


def gptq_row(n: int, repeats: int = 3) -> dict:
    from refquant import affine
    from refquant.gptq import gptq_quantize, hessian

    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, n)).astype(np.float32)
    # correlated inputs (a rank-16 common part), so that GPTQ's error feedback has work to do
    X = (rng.standard_normal((2 * n, n)) + rng.standard_normal((2 * n, 16)) @ rng.standard_normal((16, n))
         ).astype(np.float32)
    H = hessian(X)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    c = a @ b
    if not np.allclose(c[:4, :4], a[:4].astype(np.float64) @ b[:, :4], rtol=1e-3, atol=1e-2 * np.sqrt(n)):
        raise AssertionError("sgemm result is wrong")
    qt, loss = gptq_quantize(w, H, bits=4, group_size=min(128, n))
    rtn = affine.quantize(w, 4, granularity="group", group_size=min(128, n), scale_dtype=np.float16)
    Xs = X[:512].astype(np.float64)
    e_gptq, e_rtn = (float(np.sum(((q.dequantize() - w) @ Xs.T) ** 2)) for q in (qt, rtn))
    if not e_gptq < e_rtn:   # what GPTQ is for: a smaller layer-output error than rounding
        raise AssertionError(f"GPTQ output error {e_gptq:.4g} is not below round-to-nearest's {e_rtn:.4g}")
    tg, ts = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gptq_quantize(w, H, bits=4, group_size=min(128, n))
        tg.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    g, s = float(np.median(tg)), float(np.median(ts))
    return dict(n=n, gptq_s=g, sgemm_s=s, ratio=g / s, loss=float(loss), output_error_gptq=e_gptq,
                output_error_rtn=e_rtn)


def cli_row() -> dict:
    from minigpt_np.llama import default_model
    from refquant.__main__ import main as cli

    src = default_model()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for impl in ("numpy", "auto"):
            t0 = time.perf_counter()
            rc = cli(["quantize", str(src), f"{d}/{impl}.gguf", "--type", "Q4_K", "--impl", impl])
            out[impl] = time.perf_counter() - t0
            if rc != 0:
                raise AssertionError(f"quantize --impl {impl} exited {rc}")
        same = Path(f"{d}/numpy.gguf").read_bytes() == Path(f"{d}/auto.gguf").read_bytes()
    if not same:
        raise AssertionError("the CLI wrote different files with --impl numpy and auto")
    return dict(model=Path(src).name, type="Q4_K", numpy_s=out["numpy"], auto_s=out["auto"],
                speedup=out["numpy"] / out["auto"], files_identical=same)


def run(quick: bool = False, ggml_src: str | None = None, repeats: int = 30) -> dict:
    from tqdm import tqdm

    rows = 16 if quick else 256
    repeats = 3 if quick else repeats
    x = np.random.default_rng(1).standard_normal((rows, 4096)).astype(np.float32)
    lib, how = build_c(find_ggml(ggml_src))
    print(f"ggml C: {how}")
    results = [types_row(n, x, lib, repeats) for n in tqdm(types(), desc="types", disable=None)]
    gptq = gptq_row(256 if quick else 4096, 1 if quick else 3)
    cli = None if quick else cli_row()
    return dict(quick=quick, shape=list(x.shape), repeats=repeats, c_build=how, c=lib is not None,
                types=results, gptq=gptq, cli=cli, machine=common.machine())


def print_table(data: dict) -> None:
    print(f"{'type':7s} {'C ms':>9s} {'numba ms':>9s} {'numba/C':>8s} {'all cores':>9s} {'NumPy ms':>9s}")
    for r in data["types"]:
        c = f"{r['c_ms']:9.2f}" if r["c_ms"] is not None else f"{'-':>9s}"
        ratio = f"{r['ratio']:8.2f}" if r["ratio"] is not None else f"{'-':>8s}"
        print(f"{r['type']:7s} {c} {r['numba_ms']:9.2f} {ratio} {r['numba_all_cores_ms']:9.2f} {r['numpy_ms']:9.1f}")
    g = data["gptq"]
    print(f"GPTQ {g['n']}x{g['n']}: {g['gptq_s']:.2f} s = {g['ratio']:.2f}x one {g['n']}^3 sgemm ({g['sgemm_s']:.3f} s)")
    if data["cli"]:
        c = data["cli"]
        print(f"CLI quantize {c['model']} -> {c['type']}: NumPy {c['numpy_s']:.1f} s, compiled {c['auto_s']:.1f} s "
              f"({c['speedup']:.1f}x)")


def main(argv=None) -> None:
    ap = common.quick_args(__doc__)
    ap.add_argument("--ggml-src", help="ggml or llama.cpp checkout to build ggml-quants.c from")
    ap.add_argument("--repeats", type=cli_int(1, 10**5), default=30, help="timed calls per type and implementation")
    args = ap.parse_args(argv)
    data = run(args.quick, args.ggml_src, args.repeats)
    path = common.write_json("quantize", data)
    print_table(data)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
