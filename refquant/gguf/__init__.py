"""GGUF v3 files and llama.cpp's GGML block formats.

``read(path) -> GGUFFile`` (memory-mapped, every offset and size validated, ``GGUFError``
on anything malformed), ``write(path, metadata, tensors)`` (atomic), and
``quants.quantize`` / ``quants.dequantize`` for the block formats, bit-exact with ggml.
"""
from refquant.gguf import quants
from refquant.gguf.file import GGUFError, GGUFFile, GGUFTensor, TensorInfo, read
from refquant.gguf.quants import TYPES, GGMLType, dequantize, ggml_type, quantize
from refquant.gguf.writer import write

__all__ = ["GGUFError", "GGUFFile", "GGUFTensor", "GGMLType", "TYPES", "TensorInfo", "dequantize",
           "ggml_type", "quantize", "quants", "read", "write"]
