"""llama.cpp's KV cache types as ``refquant.kernels.kvcache`` cache types.

llama.cpp stores a cache row (one position, one key/value head, ``head_dim`` numbers) in
any of the types ``common/arg.cpp`` lists in ``kv_cache_types`` (llama.cpp 0c1e570): f32,
f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1, named in lower case by
``--cache-type-k`` / ``--cache-type-v``. A block type's row is ``head_dim / 32`` blocks of
that ggml type, each the bytes ``quantize`` writes (``quantize_row_*_ref`` of
ggml-quants.c; ``quantize_iq4_nl`` for IQ4_NL); f16 and bf16 rows are ggml's conversions.
Each type's ``codec`` is its block layout (``block_q4_1`` of ggml-common.h: fp16 ``d``,
fp16 ``m``, 16 bytes of nibbles; ``block_q5_0``: ``d``, ``qh[4]``, ``qs[16]``; ...), which
``tests/test_compiled.py`` checks against ``dequantize``. f32 is the cache module's own.
"""
from __future__ import annotations

import numpy as np

from refquant.gguf.quants.constants import KVALUES_IQ4NL
from refquant.gguf.quants.core import dequantize, ggml_type, quantize
from refquant.kernels import kvcache

# ggml type -> (code kind, d at, m at, qh at, qs at, c): byte offsets within a block
_BLOCKS = {"Q8_0": ("s8", 0, -1, -1, 2, 0), "Q4_0": ("u4", 0, -1, -1, 2, 8), "Q4_1": ("u4", 0, 2, -1, 4, 0),
           "Q5_0": ("u4", 0, -1, 2, 6, 16), "Q5_1": ("u4", 0, 2, 4, 8, 0), "IQ4_NL": ("l4", 0, -1, -1, 2, 0)}
TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")   # kv_cache_types but f32


def _put(t):
    """The compiled row encoder of ggml type ``t`` (``kvcache.CacheType.put``)."""
    def build():
        from refquant.gguf.quants import compiled
        return compiled.row_putter(t.name, t.type_size)
    return build


def _cache_type(lower: str) -> kvcache.CacheType:
    t = ggml_type(lower.upper())

    def encode(x):
        x = np.asarray(x, np.float32)
        raw = quantize(x, t.name, allow_nonfinite=True, impl="numpy")
        return raw.view(np.uint16) if t.block_size == 1 else raw

    def decode(s):
        s = np.ascontiguousarray(s)
        raw = s.view(np.uint8)
        n = raw.shape[-1] // t.type_size * t.block_size
        return dequantize(raw, t.name, raw.shape[:-1] + (n,), impl="numpy")

    if t.block_size == 1:
        return kvcache.CacheType(lower, np.dtype(np.uint16), 1, 1, encode, decode, (lower,), _put(t))
    kind, d_at, m_at, qh_at, qs_at, c = _BLOCKS[t.name]
    table = tuple(int(v) for v in KVALUES_IQ4NL) if kind == "l4" else None
    codec = ("block", kind, t.type_size, d_at, m_at, qh_at, qs_at, c, table)
    return kvcache.CacheType(lower, np.dtype(np.uint8), t.block_size, t.type_size, encode, decode, codec,
                             _put(t))


for _name in TYPES:
    kvcache.register(_cache_type(_name))
