"""Quantized checkpoints outside GGUF: the GPTQ, AWQ and compressed-tensors layouts
(``layouts``: arrays ↔ ``QuantizedTensor``)."""
from refquant.hf import layouts  # noqa: F401
