"""Regenerate ``ggml_golden.npz`` and ``ggml_golden_imatrix.npz``: bytes written by ggml's own
C quantizers, without and with an importance matrix.

Not run by the tests (it needs ggml's source and a C compiler); it records where the
golden bytes came from. Build ggml-quants.c the way llama.cpp builds ``ggml-base``
(no ``-march`` flags, so no fused multiply-add; ``-DNDEBUG`` as release builds, so that
``nearest_int``'s range assert does not abort on the overflowing inputs), with four stub symbols::

    git clone https://github.com/ggml-org/ggml && cd ggml      # commit d99724f2 was used
    # (ggml_golden_imatrix.npz: ggml/ of llama.cpp 0c1e570, as vendored in llama-cpp-python
    # 0.3.36; the files differ from d99724f2's only in IQ1_M)
    cat > stubs.c <<'C'
    #include <stdio.h>
    #include <stdlib.h>
    void ggml_abort(const char *f, int l, const char *fmt, ...) { abort(); }
    const char *ggml_type_name(int t) { return "?"; }
    /* (block size, block bytes) by type id: quantize_*(…, quant_weights) steps rows by ggml_row_size */
    static const int BLK[43][2] = {[2]={32,18},[3]={32,20},[6]={32,22},[7]={32,24},[8]={32,34},
      [10]={256,84},[11]={256,110},[12]={256,144},[13]={256,176},[14]={256,210},[20]={32,18},[23]={256,136}};
    size_t ggml_type_size(int t) { return BLK[t][1]; }
    size_t ggml_row_size(int t, long long n) { return (size_t)(n / BLK[t][0]) * BLK[t][1]; }
    C
    gcc -O2 -DNDEBUG -fPIC -shared -std=gnu11 -Iinclude -Isrc src/ggml-quants.c stubs.c -lm -o libq.so
    python tests/data/make_ggml_golden.py path/to/libq.so [--imatrix]

Quantizers called: ``quantize_row_<type>_ref`` for every type, except IQ4_NL which uses
``quantize_iq4_nl`` (what ``ggml_quantize_chunk`` and llama-quantize call); with an importance
matrix, ``quantize_<type>(src, dst, nrow, n_per_row, quant_weights)`` (what
``ggml_quantize_chunk`` calls) for every type that has one (``WEIGHTED``).
"""
import ctypes
import sys
from pathlib import Path

import numpy as np

from benchmarks.quantize import c_quantizer   # the same ctypes calls the quantize benchmark times
from refquant.gguf import quants

# every block type refquant quantizes: (block size, block bytes) from the type table
TYPES = {n: (quants.TYPES[n].block_size, quants.TYPES[n].type_size)
         for n in quants.quantizable() if n not in ("F32", "F16", "BF16")}


def inputs(rng):
    """Input families that exercise the scale searches' branches."""
    shape = (8, 512)
    yield "normal", rng.standard_normal(shape)
    yield "scaled", rng.standard_normal(shape) * rng.uniform(1e-6, 1e3, (8, 1))
    yield "heavy_tail", rng.standard_t(2, shape)
    x = rng.standard_normal(shape)
    x[x < 0.3] = 0
    yield "sparse", x
    yield "small_ints", rng.integers(-3, 4, shape)
    yield "positive", np.abs(rng.standard_normal(shape)) + 0.5
    x = np.zeros(shape)
    x[1, 5] = 1
    x[2] = -2.5
    x[3, 300:310] = 1e-30
    x[4, :256] = 7.0
    x[5] = np.linspace(-1, 1, 512)
    yield "degenerate", x
    # overflowing and signed-zero corners: the scale searches' sums turn Inf/NaN here
    x = np.zeros(shape)
    x[0] = -0.0
    x[1] = 3e37
    x[2] = -3e37
    x[3] = np.where(np.arange(512) % 2, 3e37, -3e37)
    x[4] = 1e-40 * rng.standard_normal(512)
    x[5, 256:] = 1e-38 * rng.standard_normal(256)
    x[5, :256] = -0.0
    x[6] = 1e30 * rng.standard_normal(512)
    x[7] = rng.standard_normal(512) * np.where(np.arange(512) % 7 == 0, 1e6, 1e-3)
    yield "extreme", x


# every type whose ggml quantizer takes quant_weights (Q8_0 ignores them: checked as such)
WEIGHTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def imatrix_inputs(rng):
    """(label, rows, column importances): weights of the families above against importance
    vectors with zero columns, one dominant column, all equal, and a 576-wide row (SmolLM2's,
    not a multiple of 256: the 32-block types only)."""
    shape = (8, 512)
    chi = rng.chisquare(1, 512)
    families = dict(inputs(rng))
    yield "normal", families["normal"], chi
    yield "heavy_tail", families["heavy_tail"], chi
    zeros = chi.copy()
    zeros[::7] = 0
    zeros[200:260] = 0
    yield "sparse_zero_columns", families["sparse"], zeros
    yield "degenerate", families["degenerate"], chi
    yield "small_ints_equal", families["small_ints"], np.ones(512)
    yield "extreme_zero_columns", families["extreme"], np.where(np.arange(512) % 3 == 0, 0, 1)
    yield "outliers_dominant", rng.standard_normal(shape) * np.where(rng.random(shape) < 0.01, 100, 1), \
        np.where(np.arange(512) == 17, 1e30, 1e-30)
    yield "row576", rng.standard_normal((4, 576)), rng.chisquare(1, 576)


def c_weighted(lib, name, x, qw, out):
    """ggml's ``quantize_<type>`` with quant_weights ``qw``, from ``x`` into ``out``."""
    fn = getattr(lib, "quantize_" + name.lower().replace("_k", "_K"))
    fn(ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(x.shape[0]),
       ctypes.c_int64(x.shape[1]), ctypes.c_void_p(qw.ctypes.data))


def main_imatrix(lib):
    data = {}
    for label, x, qw in imatrix_inputs(np.random.default_rng(20261207)):
        x, qw = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(qw, np.float32)
        data[f"x/{label}"], data[f"qw/{label}"] = x, qw
        for name in WEIGHTED:
            block, size = TYPES[name]
            if x.shape[1] % block:
                continue
            out = np.zeros(x.shape[0] * x.shape[1] // block * size, np.uint8)
            c_weighted(lib, name, x, qw, out)
            data[f"{name}/{label}"] = out.reshape(x.shape[0], -1)
    np.savez_compressed(Path(__file__).with_name("ggml_golden_imatrix.npz"), **data)


def main(lib_path):
    lib = ctypes.CDLL(lib_path)
    rng = np.random.default_rng(20261124)
    data = {}
    for label, x in inputs(rng):
        x = np.ascontiguousarray(x, np.float32)
        data[f"x/{label}"] = x
        for name, (block, size) in TYPES.items():
            out = np.zeros(x.shape[0] * x.shape[1] // block * size, np.uint8)
            c_quantizer(lib, name, x, out)()
            data[f"{name}/{label}"] = out.reshape(x.shape[0], -1)
    np.savez_compressed(Path(__file__).with_name("ggml_golden.npz"), **data)


if __name__ == "__main__":
    if sys.argv[2:] == ["--imatrix"]:
        main_imatrix(ctypes.CDLL(sys.argv[1]))
    else:
        main(sys.argv[1])
