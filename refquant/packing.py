"""Bit packing of small integer codes.

Byte packing (``pack`` / ``unpack``)
    The codes along the last axis form a little-endian bit stream: code ``i`` occupies
    bits ``[i*b, (i+1)*b)`` of the row, bit 0 being the least significant bit of byte 0.
    For b = 4 this is "two nibbles per byte, low nibble first" (element 2k in the low
    nibble of byte k, element 2k+1 in the high nibble); for b = 2, four codes per byte
    from the low bits up; for b = 3, eight codes fill three bytes. A row of n codes takes
    ``ceil(n*b/8)`` bytes, the unused high bits of the last byte are zero. Each row is
    packed on its own, so row r of a matrix starts at byte ``r * ceil(n*b/8)``.
    Signed codes are stored as their b-bit two's complement.

Int32 packing (``pack_int32`` / ``unpack_int32``)
    The GPTQ / AutoGPTQ layout: ``32 // b`` consecutive codes along ``axis`` share one
    32-bit word, the first code in the lowest bits. A GPTQ ``qweight`` is
    ``pack_int32(q.T, 4, axis=0)`` for codes ``q`` of shape (out, in): shape
    (in // 8, out), 8 nibbles per int32 along the input dimension. ``qzeros`` is
    ``pack_int32(zeros, 4, axis=1)`` for zeros of shape (groups, out).
"""
from __future__ import annotations

import numpy as np

from refquant._checks import int_in

BYTE_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
INT32_BITS = (2, 4, 8)


def packed_length(n: int, bits: int) -> int:
    """Bytes taken by ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    return -(-n * bits // 8)


def _code_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _check_codes(q, bits: int, signed: bool) -> np.ndarray:
    if not isinstance(q, np.ndarray):
        raise TypeError(f"q must be a NumPy integer array, got {type(q).__name__}")
    if q.dtype.kind not in "iu":
        raise TypeError(f"q must be an integer array, got dtype {q.dtype}")
    if q.ndim == 0:
        raise ValueError("q must have at least one dimension, got a 0-d array")
    lo, hi = _code_range(bits, signed)
    if q.size and (q.min() < lo or q.max() > hi):
        kind = "signed" if signed else "unsigned"
        raise ValueError(
            f"q holds values in [{q.min()}, {q.max()}], outside the {kind} {bits}-bit range [{lo}, {hi}]"
        )
    return q


def pack(q: np.ndarray, bits: int, *, signed: bool = False) -> np.ndarray:
    """Pack integer codes along the last axis into uint8 (layout in the module docstring).

    Returns shape ``q.shape[:-1] + (ceil(n*bits/8),)``.
    """
    bits = int_in(bits, "bits", BYTE_BITS)
    q = _check_codes(q, bits, signed)
    n = q.shape[-1]
    u = (q.astype(np.int64) & ((1 << bits) - 1)).astype(np.uint8)
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-n) % per
        if pad:
            u = np.concatenate([u, np.zeros(u.shape[:-1] + (pad,), np.uint8)], axis=-1)
        u = u.reshape(u.shape[:-1] + (-1, per))
        shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
        return np.bitwise_or.reduce(u << shifts, axis=-1).astype(np.uint8)
    # Widths that straddle bytes: spell out every bit, then let packbits build bytes.
    bitplanes = (u[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(bitplanes.reshape(u.shape[:-1] + (n * bits,)), axis=-1, bitorder="little")


def unpack(packed: np.ndarray, bits: int, n: int, *, signed: bool = False) -> np.ndarray:
    """Inverse of ``pack``: the first ``n`` codes of each row, as int8 (signed) or uint8."""
    bits = int_in(bits, "bits", BYTE_BITS)
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8:
        raise TypeError(f"packed must be a uint8 array, got {getattr(packed, 'dtype', type(packed).__name__)}")
    if packed.ndim == 0:
        raise ValueError("packed must have at least one dimension")
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(
            f"packed rows have {packed.shape[-1]} bytes but {n} codes of {bits} bits need {packed_length(n, bits)}"
        )
    if 8 % bits == 0:
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
        u = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
        u = u.reshape(packed.shape[:-1] + (-1,))[..., :n]
    else:
        flat = np.unpackbits(packed, axis=-1, bitorder="little")[..., : n * bits]
        planes = flat.reshape(packed.shape[:-1] + (n, bits))
        u = np.bitwise_or.reduce(planes << np.arange(bits, dtype=np.uint8), axis=-1).astype(np.uint8)
    if not signed:
        return np.ascontiguousarray(u, dtype=np.uint8)
    # Sign-extend the b-bit two's complement.
    s = u.astype(np.int16)
    s -= (s >> (bits - 1) & 1) << bits
    return s.astype(np.int8)


def pack_int32(q: np.ndarray, bits: int, *, axis: int = 0) -> np.ndarray:
    """GPTQ-style packing: ``32 // bits`` codes along ``axis`` per int32, first code lowest.

    ``q`` holds unsigned codes in ``[0, 2**bits)``; the length along ``axis`` is padded
    with zero codes to a multiple of ``32 // bits``. Returns int32 (the bit pattern of
    the packed uint32 words, as AutoGPTQ stores them).
    """
    bits = int_in(bits, "bits", INT32_BITS)
    q = _check_codes(q, bits, signed=False)
    per = 32 // bits
    q = np.moveaxis(q, axis, -1).astype(np.uint32)
    pad = (-q.shape[-1]) % per
    if pad:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (pad,), np.uint32)], axis=-1)
    q = q.reshape(q.shape[:-1] + (-1, per))
    words = np.bitwise_or.reduce(q << (np.arange(per, dtype=np.uint32) * bits), axis=-1).astype(np.uint32)
    return np.moveaxis(words.view(np.int32), -1, axis)


def unpack_int32(packed: np.ndarray, bits: int, n: int, *, axis: int = 0) -> np.ndarray:
    """Inverse of ``pack_int32``: the first ``n`` codes along ``axis``, as uint8."""
    bits = int_in(bits, "bits", INT32_BITS)
    if not isinstance(packed, np.ndarray) or packed.dtype not in (np.int32, np.uint32):
        raise TypeError(f"packed must be an int32 array, got {getattr(packed, 'dtype', type(packed).__name__)}")
    per = 32 // bits
    words = np.moveaxis(packed.view(np.uint32), axis, -1)
    if words.shape[-1] != -(-n // per):
        raise ValueError(f"packed has {words.shape[-1]} words along axis {axis}, {n} codes need {-(-n // per)}")
    u = (words[..., None] >> (np.arange(per, dtype=np.uint32) * bits)) & np.uint32((1 << bits) - 1)
    u = u.reshape(words.shape[:-1] + (-1,))[..., :n].astype(np.uint8)
    return np.moveaxis(u, -1, axis)
