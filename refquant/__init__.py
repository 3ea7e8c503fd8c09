"""refquant: a pure-NumPy reference implementation of LLM weight quantization.

Modules: ``affine`` (integer grids), ``formats`` (fp16/bf16/fp8/fp4/e8m0 bit-exact),
``codebooks`` (NF4 / bitsandbytes FP4, double quant), ``mx`` (MXFP4/MXFP8/NVFP4),
``packing`` (bit packing), ``schemes`` (the registry of named schemes), ``metrics``.
Every quantizer returns a ``QuantizedTensor``.
"""
from refquant import schemes  # noqa: I001  (the registry, then the families: registration order is listing order)
from refquant import formats, codebooks, mx, affine, packing, metrics
from refquant.gguf import quants as _ggml  # noqa: F401  (registers the GGML schemes)
from refquant import kvfp8  # noqa: F401,I001  (vLLM's FP8 KV cache types, after llama.cpp's)
from refquant import gptq, awq, smoothquant, llm_int8  # noqa: F401
from refquant.tensor import QuantizedTensor

__all__ = ["QuantizedTensor", "affine", "codebooks", "formats", "metrics", "mx", "packing", "schemes"]
__version__ = "0.1.0"
