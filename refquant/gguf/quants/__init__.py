"""GGML block formats in NumPy, byte-for-byte as llama.cpp's ``ggml-quants.c`` does them.

``quantize(x, type)`` / ``dequantize(raw, type, shape)`` for every registered type,
``grid`` / ``error_bound`` (what round-to-nearest guarantees), ``block_fields`` (the stored
fields, for kernels that repack), and ``QuantizedTensor`` s of kind ``ggml``
(``quantize_tensor``, ``from_raw``). The shared rules of bit-exactness, the type table and
the helpers live in ``core``; each family registers its types there (``register_format``):

* ``legacy``: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (and BF16);
* ``kquants``: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K;
* ``iq``: IQ4_NL, IQ4_XS;
* ``mx``: MXFP4.

A new type is one file (its quantizer, dequantizer and ``register_format`` call, with a
``ByteDotLayout`` when the byte-dot kernels can multiply it) plus its import below and its
golden bytes in the tests.
"""
from refquant.gguf.quants import legacy, kquants, iq, mx  # noqa: F401,I001  (each registers its types, in this order)
from refquant.gguf.quants import cache  # noqa: F401,I001  (llama.cpp's KV cache types, from the rows above)
from refquant.gguf.quants.core import (  # noqa: F401
    F32, FORMATS, GROUP_MAX_EPS, IMPLS, KVALUES_FP4, KVALUES_IQ4NL, QK_K, TYPES, TYPES_BY_ID, BlockFormat,
    ByteDotLayout, GGMLType, block_fields, byte_dot_types, dequantize, error_bound, from_raw, grid, grid_types,
    ggml_type, nearest_int, pack_ggml, quantize, quantize_tensor, register_format, roundf, seqsum,
)


# llama.cpp (llama-quant.cpp's tensor_type_fallback at 0c1e570; gguf.mixes.fallback) falls back
# to these when a row is not a whole number of blocks (SmolLM2's 576-wide rows, for instance, are
# not a multiple of the K-quants' 256); before 2026 it sent Q2_K and Q3_K to IQ4_NL
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def quantizable() -> list[str]:
    """The ggml types refquant quantizes (and dequantizes)."""
    return list(FORMATS)
