"""numba kernels for quantized matvec / small-batch matmul (see ``matvec``)."""
from refquant.kernels.matvec import (  # noqa: F401
    MAX_BATCH,
    matmul_int4, matmul_int8, matvec_int4, matvec_int4_ref, matvec_int8, matvec_int8_ref, matvec_w8a8,
    matvec_w8a8_ref, quantize_activation_int8, unpack_int4_ref,
)

__all__ = ["matmul_int4", "matmul_int8", "matvec_int4", "matvec_int4_ref", "matvec_int8", "matvec_int8_ref",
           "matvec_w8a8", "matvec_w8a8_ref", "quantize_activation_int8", "unpack_int4_ref"]
