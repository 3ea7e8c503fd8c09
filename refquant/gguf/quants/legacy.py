"""llama.cpp's first block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 (blocks of 32, fp16
scales; ``quantize_row_q*_ref`` in ggml-quants.c), and the plain BF16 conversion.

Q8_1 is ggml's activation type for Q4_1/Q5_1 dots: Q8_0's codes plus ``s = fp16(d · Σq)``
(block ``d, s, qs[32]``). ggml defines no decoder for it (no ``to_float`` in its type
traits); ours is Q8_0's, ``ŵ = d·q``, as the stored fields mean.

With an importance matrix (``quantize_row_q*_impl``, llama.cpp 0c1e570): every element
weighs ``qw · sqrt(σ² + x²)``, σ² = Σx²/n over the whole row; Q4_0/Q5_0 take
``make_qx_quants(32, 8 or 16, …)``, Q4_1/Q5_1 ``make_qkx3_quants(32, 15 or 31, …, -0.9,
0.05, 36)``; Q8_0 ignores it."""
from __future__ import annotations

import numpy as np

from refquant.gguf.quants.core import (
    F32, ByteDotLayout, bit_planes, f16_bytes, f16_field, f16_value, inv, join_nibbles, min_codes, register_format,
    register_scheme, roundf, split_nibbles, sym_codes,
)
from refquant.gguf.quants.searches import _make_qkx2_quants, _make_qx_quants


def _q4_0(x):
    d, q = sym_codes(x, 8)
    return np.concatenate([f16_bytes(d), join_nibbles(q[:, :16], q[:, 16:])], axis=1)


def _dq4_0(b):
    d = f16_value(b[:, :2])
    q = split_nibbles(b[:, 2:]).astype(np.int32) - 8
    return q * d[:, None]


def _q4_1(x):
    dm, q = min_codes(x, 15)
    q = np.minimum(15, q)
    return np.concatenate([dm, join_nibbles(q[:, :16], q[:, 16:])], axis=1)


def _dq4_1(b):
    d, m = f16_value(b[:, 0:2]), f16_value(b[:, 2:4])
    return split_nibbles(b[:, 4:]).astype(np.int32) * d[:, None] + m[:, None]


def _q5_pack(d_bytes, q):
    qh = np.packbits((q >> 4).astype(np.uint8) & 1, axis=1, bitorder="little")  # 4 bytes = u32 LE
    return np.concatenate([d_bytes, qh, join_nibbles(q[:, :16], q[:, 16:])], axis=1)


def _q5_unpack(b):
    hi = bit_planes(b[:, :4], 32).astype(np.int32) << 4
    return split_nibbles(b[:, 4:]).astype(np.int32) | hi


def _q5_0(x):
    d, q = sym_codes(x, 16)
    return _q5_pack(f16_bytes(d), q)


def _dq5_0(b):
    return (_q5_unpack(b[:, 2:]) - 16) * f16_value(b[:, :2])[:, None]


def _q5_1(x):
    dm, q = min_codes(x, 31)
    return _q5_pack(dm, q & 0xFF)  # C's (uint8_t) cast, no clamp


def _dq5_1(b):
    d, m = f16_value(b[:, 0:2]), f16_value(b[:, 2:4])
    return _q5_unpack(b[:, 4:]) * d[:, None] + m[:, None]


def _row_weights(x, qw, sigma2):
    """``qw · sqrt(σ² + x²)`` per element, σ² the row's Σx²/n (one per block)."""
    return qw * np.sqrt(sigma2[:, None] + x * x)


def _q4_0_weighted(x, qw, sigma2):
    d, L = _make_qx_quants(x, 8, _row_weights(x, qw, sigma2))
    return np.concatenate([f16_bytes(d), join_nibbles(L[:, :16], L[:, 16:])], axis=1)


def _q5_0_weighted(x, qw, sigma2):
    d, L = _make_qx_quants(x, 16, _row_weights(x, qw, sigma2))
    return _q5_pack(f16_bytes(d), L)


def _affine_weighted(x, qw, sigma2, nmax):
    """Q4_1 / Q5_1: d and m = −the_min of ``make_qkx3_quants``, as fp16 bytes, and the codes."""
    d, the_min, L = _make_qkx2_quants(x, _row_weights(x, qw, sigma2), nmax, -0.9, 0.05, 36, False)
    return np.concatenate([f16_bytes(d), f16_bytes(-the_min)], axis=1), L


def _q4_1_weighted(x, qw, sigma2):
    dm, L = _affine_weighted(x, qw, sigma2, 15)
    return np.concatenate([dm, join_nibbles(L[:, :16], L[:, 16:])], axis=1)


def _q5_1_weighted(x, qw, sigma2):
    return _q5_pack(*_affine_weighted(x, qw, sigma2, 31))


def _q8_0(x):
    d = np.abs(x).max(axis=1) / F32(127)
    q = roundf(x * inv(d)[:, None]).astype(np.int8)
    return np.concatenate([f16_bytes(d), q.view(np.uint8)], axis=1)


def _dq8_0(b):
    return b[:, 2:].view(np.int8).astype(np.int32) * f16_value(b[:, :2])[:, None]


def _q8_1(x):
    d = np.abs(x).max(axis=1) / F32(127)
    q = roundf(x * inv(d)[:, None]).astype(np.int8)
    s = q.astype(np.int32).sum(axis=1).astype(F32) * d     # C: int sum times float d, in float32
    return np.concatenate([f16_bytes(d), f16_bytes(s), q.view(np.uint8)], axis=1)


def _dq8_1(b):
    return b[:, 4:].view(np.int8).astype(np.int32) * f16_value(b[:, :2])[:, None]


# ----------------------------------------------------------------------------- plain floats

def _bf16(x):
    u = x.astype(F32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rne = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    return np.where(nan, (u >> 16) | 64, rne).astype("<u2").view(np.uint8)


def _dbf16(b):
    return (np.ascontiguousarray(b).view("<u2").astype(np.uint32) << 16).view(F32)


def _fields_q8_0(b):
    return {"codes": b[:, 2:], "d": f16_field(b, 0)}


def _fields_q8_1(b):   # s (bytes 2-3) is d·Σq, derived: the product does not read it
    return {"codes": b[:, 4:], "d": f16_field(b, 0)}


def _fields_q4(b):   # Q4_0 (d, qs) or Q4_1 (d, m, qs): codes as stored, q + 8 for Q4_0
    if b.shape[1] == 18:
        return {"codes": split_nibbles(b[:, 2:]), "d": f16_field(b, 0)}
    return {"codes": split_nibbles(b[:, 4:]), "d": f16_field(b, 0), "m": f16_field(b, 2)}


def _fields_q5(b):   # Q5_0 (d, qh, qs) or Q5_1 (d, m, qh, qs): codes as stored, q + 16 for Q5_0
    if b.shape[1] == 22:
        return {"codes": _q5_unpack(b[:, 2:]).astype(np.uint8), "d": f16_field(b, 0)}
    return {"codes": _q5_unpack(b[:, 4:]).astype(np.uint8), "d": f16_field(b, 0), "m": f16_field(b, 2)}


register_format("BF16", _bf16, _dbf16)
register_format("Q4_0", _q4_0, _dq4_0,
                levels=16, code_fields=[(2, 18, "nibble")], scale_factor=8, fields=_fields_q4, weighted=_q4_0_weighted,
                byte_dot=ByteDotLayout("u4", "const", c=8))
register_format("Q4_1", _q4_1, _dq4_1,
                levels=16, code_fields=[(4, 20, "nibble")], scale_factor=16, fields=_fields_q4, weighted=_q4_1_weighted,
                byte_dot=ByteDotLayout("u4", "min", m="m"))
register_format("Q5_0", _q5_0, _dq5_0,
                levels=32, code_fields=[(2, 6, "bit4"), (6, 22, "nibble")], scale_factor=16, fields=_fields_q5, weighted=_q5_0_weighted,
                byte_dot=ByteDotLayout("u5", "const", c=16))
register_format("Q5_1", _q5_1, _dq5_1,
                levels=32, code_fields=[(4, 8, "bit4"), (8, 24, "nibble")], scale_factor=32, fields=_fields_q5, weighted=_q5_1_weighted,
                byte_dot=ByteDotLayout("u5", "min", m="m"))
register_format("Q8_0", _q8_0, _dq8_0,
                levels=256, code_fields=[(2, 34, "byte")], scale_factor=128, fields=_fields_q8_0,
                byte_dot=ByteDotLayout("s8"))
register_format("Q8_1", _q8_1, _dq8_1,
                levels=256, code_fields=[(4, 36, "byte")], scale_factor=128, fields=_fields_q8_1,
                byte_dot=ByteDotLayout("s8"))


# the registered schemes (refquant.schemes) of these types
register_scheme("Q8_0", "int8, fp16 absmax scale per 32")
register_scheme("Q4_0", "int4, fp16 scale per 32 (absmax -> -8)")
register_scheme("Q4_1", "uint4, fp16 scale and min per 32")
register_scheme("Q5_0", "int5, fp16 scale per 32")
register_scheme("Q5_1", "uint5, fp16 scale and min per 32")
register_scheme("Q8_1", "int8, fp16 absmax scale and fp16 d·Σq per 32")
