"""Quantized checkpoints outside GGUF: the GPTQ, AWQ and compressed-tensors layouts
(``layouts``: arrays ↔ ``QuantizedTensor``), safetensors files (``safetensors``) and whole
checkpoints with their configs (``checkpoint``)."""
from refquant.hf import checkpoint, layouts, safetensors  # noqa: F401
