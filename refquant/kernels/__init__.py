"""numba kernels for quantized matvec / small-batch matmul.

``bytedot``: the byte-dot kernels the integer schemes and GGML types run on (a family
declares a scheme's ``table.KernelEntry`` when it registers it), x rounded to int8 as
llama.cpp does; ``simd``: the vector
intrinsics they are built from; ``stacked``: weights of one role stacked over a model's
layers and their product inside numba code (the compiled decode step); ``matvec``: the INT4 kernel that rounds x to int16 instead
(more accurate, slower), kept for that comparison.

Importing this package does not import numba: the names below load their module on first
use, so ``import refquant`` stays a NumPy-only import.
"""
import importlib

MAX_BATCH = 16   # rows of X the small-batch kernels take

_LAZY = {"Packed": "bytedot", "available_tiers": "bytedot", "backend": "bytedot", "matmul_int4": "matvec",
         "matvec_int4": "matvec", "matvec_int4_ref": "matvec", "unpack_int4_ref": "matvec"}

__all__ = ["MAX_BATCH", *_LAZY]


_SUBMODULES = ("bytedot", "kvcache", "layout", "matvec", "rows", "simd", "stacked", "table", "threads", "tiles")


def __getattr__(name):
    if name in _SUBMODULES:   # ``kernels.bytedot`` imports the submodule (and numba) on first use
        return importlib.import_module(f"refquant.kernels.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"refquant.kernels.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'refquant.kernels' has no attribute {name!r}")
