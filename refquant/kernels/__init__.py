"""numba kernels for quantized matvec / small-batch matmul.

``bytedot``: the byte-dot kernels every registered integer scheme and GGML type runs on
(``table.KERNELS`` wires them), x rounded to int8 as llama.cpp does; ``simd``: the vector
intrinsics they are built from; ``matvec``: the INT4 kernel that rounds x to int16 instead
(more accurate, slower), kept for that comparison.
"""
from refquant.kernels.bytedot import MAX_BATCH, Packed, available_tiers, backend  # noqa: F401
from refquant.kernels.matvec import matmul_int4, matvec_int4, matvec_int4_ref, unpack_int4_ref  # noqa: F401

__all__ = ["MAX_BATCH", "Packed", "available_tiers", "backend", "matmul_int4", "matvec_int4", "matvec_int4_ref",
           "unpack_int4_ref"]
