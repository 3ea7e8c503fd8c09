"""numba kernels for quantized matvec / small-batch matmul (see ``matvec`` and ``ggml``)."""
from refquant.kernels.ggml import matvec_ggml_ref, matvec_q4_0, matvec_q4_1, matvec_q4_k, matvec_q8_0  # noqa: F401
from refquant.kernels.matvec import (  # noqa: F401
    MAX_BATCH,
    matmul_int4, matmul_int8, matvec_int4, matvec_int4_ref, matvec_int8, matvec_int8_ref, matvec_w8a8,
    matvec_w8a8_ref, quantize_activation_int8, unpack_int4_ref,
)

__all__ = ["matmul_int4", "matmul_int8", "matvec_ggml_ref", "matvec_int4", "matvec_int4_ref", "matvec_int8",
           "matvec_int8_ref", "matvec_q4_0", "matvec_q4_1", "matvec_q4_k", "matvec_q8_0", "matvec_w8a8", "matvec_w8a8_ref",
           "quantize_activation_int8", "unpack_int4_ref"]
