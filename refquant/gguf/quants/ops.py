"""ggml's float32 arithmetic, step by step: the rounding, search, fp16 and bit-field helpers
every block format here is written with (the rules are in ``core``'s docstring)."""
from __future__ import annotations

import numpy as np

F32 = np.float32


def nearest_int(v) -> np.ndarray:
    """ggml's ``nearest_int``: add 1.5·2^23 in float32 and read the low mantissa bits."""
    val = np.asarray(v, F32) + F32(12582912.0)
    return (val.view(np.int32) & 0x007FFFFF) - 0x00400000


def roundf(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: nearest integer, halves away from zero (exact: ``v - trunc(v)`` is exact)."""
    t = np.trunc(v)
    return t + np.copysign((np.abs(v - t) >= F32(0.5)).astype(F32), v)


def seqsum(terms: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over the last axis, as a C ``for`` loop accumulates."""
    return np.add.accumulate(terms.astype(F32, copy=False), axis=-1, dtype=F32)[..., -1]


def first_absmax(x: np.ndarray) -> np.ndarray:
    """The signed element of largest magnitude, first one on ties: C's scan ``if (fabsf(v) >
    amax)`` from ``amax = max = 0``, so NaN never wins and a block of zeros (or of NaN, as
    overflowing scale searches produce) gives +0.0, also when its zeros are -0.0."""
    a = np.abs(x)
    a = np.where(np.isnan(a), np.zeros_like(a), a)
    idx = np.argmax(a, axis=-1)[..., None]
    v = np.take_along_axis(x, idx, axis=-1)[..., 0]
    return np.where(np.take_along_axis(a, idx, axis=-1)[..., 0] > 0, v, np.zeros_like(v))


def positive_max(x: np.ndarray) -> np.ndarray:
    """C's ``if (v > max) max = v`` from ``max = 0`` over the last axis: NaN never wins."""
    m = np.fmax.reduce(x, axis=-1)
    return np.where(m > 0, m, np.zeros_like(m))


def first_winner(x: np.ndarray, fn) -> np.ndarray:
    return np.take_along_axis(x, fn(x, axis=-1)[..., None], axis=-1)[..., 0]


def f16_bytes(v: np.ndarray) -> np.ndarray:
    """fp16 bytes (little-endian) of float32 values, one ``(…, 2)`` uint8 pair per value."""
    return np.asarray(v, F32).astype("<f2").view(np.uint8).reshape(*np.shape(v), 2)


def f16_value(raw: np.ndarray) -> np.ndarray:
    """float32 values of fp16 bytes ``raw[..., 2]``."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(F32)


def f16_field(b: np.ndarray, at: int) -> np.ndarray:
    """The raw fp16 bit patterns (uint16) of the 2-byte field at byte ``at`` of each block."""
    return np.ascontiguousarray(b[:, at:at + 2]).view("<u2")[:, 0]


def as_u16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<u2")[..., 0].astype(np.uint32)


def as_u32(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<u4")[..., 0]


def le_bytes(v: np.ndarray, dtype: str) -> np.ndarray:
    a = np.asarray(v).astype(dtype)
    return a.view(np.uint8).reshape(*a.shape[:-1], -1) if a.ndim > 1 else a.view(np.uint8).reshape(-1, a.itemsize)


def best_index(values: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``best_index_int8``: index of the nearest table value (ties go to the upper one)."""
    vals = values.astype(F32)
    mu = np.clip(np.searchsorted(vals, v, side="right"), 1, len(vals) - 1)
    lo, hi = vals[mu - 1], vals[mu]
    idx = np.where((v - lo) < (hi - v), mu - 1, mu)
    idx = np.where(v <= vals[0], 0, idx)
    return np.where(v >= vals[-1], len(vals) - 1, idx)


def join_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0xF) | (hi.astype(np.uint8) << 4)


def split_nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes ``qs[..., k]`` → ``[..., 2k]``: low nibbles of all bytes, then the high ones."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def bit_planes(qh: np.ndarray, nbits: int) -> np.ndarray:
    """Bit ``j`` of a little-endian integer stored as ``qh[..., nbits // 8]`` bytes."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[..., :nbits]


def pack2(L: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K 2-bit layout: per 128 weights, byte l holds l, l+32, l+64, l+96."""
    L = L.reshape(*L.shape[:-1], -1, 4, 32).astype(np.uint8)
    out = L[..., 0, :] | (L[..., 1, :] << 2) | (L[..., 2, :] << 4) | (L[..., 3, :] << 6)
    return out.reshape(*L.shape[:-3], -1)


def unpack2(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(*qs.shape[:-1], -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    return (q & 3).reshape(*qs.shape[:-1], -1)


# ----------------------------------------------------------------------------- legacy 32-blocks

def inv(d):
    """C's ``d ? 1.0f/d : 0.0f``."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


def sym_codes(x, half):
    """Q4_0 / Q5_0: ``d = max / -half`` (signed absmax), ``q = min(2 half - 1, (int)(x/d + half + 0.5))``."""
    d = first_absmax(x) / F32(-half)
    q = np.trunc(x * inv(d)[:, None] + F32(half + 0.5)).astype(np.int32)
    return d, np.minimum(2 * half - 1, q)


def min_codes(x, nmax):
    """Q4_1 / Q5_1: ``d = (max - min) / nmax``, ``q = (int)((x - min)/d + 0.5)`` (not clamped)."""
    mn, mx = first_winner(x, np.argmin), first_winner(x, np.argmax)
    d = (mx - mn) / F32(nmax)
    q = np.trunc((x - mn[:, None]) * inv(d)[:, None] + F32(0.5)).astype(np.int32)
    return np.concatenate([f16_bytes(d), f16_bytes(mn)], axis=1), q
