"""Regenerate ``ggml_golden.npz``: bytes written by ggml's own C quantizers.

Not run by the tests (it needs ggml's source and a C compiler); it records where the
golden bytes came from. Build ggml-quants.c the way llama.cpp builds ``ggml-base``
(no ``-march`` flags, so no fused multiply-add; ``-DNDEBUG`` as release builds, so that
``nearest_int``'s range assert does not abort on the overflowing inputs), with four stub symbols::

    git clone https://github.com/ggml-org/ggml && cd ggml      # commit d99724f2 was used
    cat > stubs.c <<'C'
    #include <stdio.h>
    #include <stdlib.h>
    void ggml_abort(const char *f, int l, const char *fmt, ...) { abort(); }
    size_t ggml_row_size(int t, long long n) { return 0; }
    const char *ggml_type_name(int t) { return "?"; }
    size_t ggml_type_size(int t) { return 0; }
    C
    gcc -O2 -DNDEBUG -fPIC -shared -std=gnu11 -Iinclude -Isrc src/ggml-quants.c stubs.c -lm -o libq.so
    python tests/data/make_ggml_golden.py path/to/libq.so

Quantizers called: ``quantize_row_<type>_ref`` for every type, except IQ4_NL which uses
``quantize_iq4_nl`` (what ``ggml_quantize_chunk`` and llama-quantize call).
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
    main(sys.argv[1])
