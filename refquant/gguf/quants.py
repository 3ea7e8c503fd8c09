"""GGML block formats in NumPy, byte-for-byte as llama.cpp's ``ggml-quants.c`` does them.

A GGML tensor row of ``n`` weights is stored as ``n / block_size`` blocks of
``type_size`` bytes. Every function here is vectorized over blocks: a row-major
``float32[..., n]`` array becomes ``uint8[..., n / block_size * type_size]``.

Bit-exactness with ggml rests on reproducing its float32 arithmetic step by step:

* every intermediate is float32, with the same operation order as the C source and no
  fused multiply-add (ggml builds ``ggml-quants.c`` into ``ggml-base`` without
  ``-march`` flags, so the compiler cannot contract ``a*b + c``);
* sums over a block are sequential left-to-right float32 sums (``np.add.accumulate``),
  never NumPy's pairwise ``sum``;
* ``nearest_int`` is ggml's magic-number rounding (add 1.5·2^23, read the mantissa bits),
  i.e. round-half-to-even, emulated bit for bit, also for out-of-range inputs;
* ``roundf`` (Q8_0) rounds half away from zero; C casts ``(int8_t)(x + 8.5f)`` truncate;
* ``max``/``min``/``absmax`` searches keep the *first* element that wins (``argmax``),
  because the sign of the winner feeds the scale;
* float32 → fp16 is round-to-nearest-even (``astype(np.float16)``), fp32 → bf16 is
  ggml's RNE with quiet NaNs.

Quantizers follow ``quantize_row_*_ref`` (what ``ggml_quantize_chunk`` and
``llama-quantize`` use when no importance matrix is given), including the scale searches
``make_qx_quants`` (Q6_K), ``make_q3_quants`` (Q3_K) and ``make_qkx2_quants``
(Q2_K/Q4_K/Q5_K). IQ4_NL follows ``quantize_iq4_nl`` (``ntry = 7``, the function
``ggml_quantize_chunk`` calls), not ``quantize_row_iq4_nl_ref`` (``ntry = -1``), which
reads stale indices for all-zero blocks. Q8_K is the activation format of the K-quant dot
products; it is quantized and dequantized here but is not a storage type.

Block layouts (little-endian, ``d``/``m``/``dmin`` are fp16)::

    Q4_0   d, qs[16]                 q = nibble - 8;  x = q*d;  element j low nibble, j+16 high
    Q4_1   d, m, qs[16]              x = q*d + m
    Q5_0   d, qh u32, qs[16]         5th bit of element j in qh bit j;  q - 16
    Q5_1   d, m, qh u32, qs[16]
    Q8_0   d, qs[32] int8
    Q2_K   scales[16], qs[64], d, dmin        4-bit scale | 4-bit min per 16; 2-bit quants
    Q3_K   hmask[32], qs[64], scales[12], d   6-bit signed scales per 16; 3-bit quants
    Q4_K   d, dmin, scales[12], qs[128]       6-bit scale and min per 32; 4-bit quants
    Q5_K   d, dmin, scales[12], qh[32], qs[128]
    Q6_K   ql[128], qh[64], scales[16] int8, d
    Q8_K   d f32, qs[256] int8, bsums[16] int16
    IQ4_NL d, qs[16]                 x = d * kvalues_iq4nl[nibble]
    IQ4_XS d, scales_h u16, scales_l[4], qs[128]   6-bit scales (ls - 32) per 32
    MXFP4  e (E8M0), qs[16]          x = kvalues_fp4[nibble] * 2^(e-128)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
KVALUES_FP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)  # 2 * e2m1


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: its id in GGUF files, block size (weights) and block bytes."""

    name: str
    id: int
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def can_quantize(self) -> bool:
        return self.name in _QUANTIZERS

    @property
    def can_dequantize(self) -> bool:
        return self.name in _DEQUANTIZERS

    def row_bytes(self, n: int) -> int:
        """Bytes of a row of ``n`` weights (``n`` must be a multiple of the block size)."""
        if n % self.block_size:
            raise ValueError(f"{self.name} rows must hold a multiple of {self.block_size} weights, got {n}")
        return n // self.block_size * self.type_size


# Every type ggml defines (ggml.h, ggml-common.h), so that files holding types refquant
# cannot decode can still be read, listed and copied.
TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2), GGMLType("Q4_0", 2, 32, 18),
        GGMLType("Q4_1", 3, 32, 20), GGMLType("Q5_0", 6, 32, 22), GGMLType("Q5_1", 7, 32, 24),
        GGMLType("Q8_0", 8, 32, 34), GGMLType("Q8_1", 9, 32, 36), GGMLType("Q2_K", 10, 256, 84),
        GGMLType("Q3_K", 11, 256, 110), GGMLType("Q4_K", 12, 256, 144), GGMLType("Q5_K", 13, 256, 176),
        GGMLType("Q6_K", 14, 256, 210), GGMLType("Q8_K", 15, 256, 292), GGMLType("IQ2_XXS", 16, 256, 66),
        GGMLType("IQ2_XS", 17, 256, 74), GGMLType("IQ3_XXS", 18, 256, 98), GGMLType("IQ1_S", 19, 256, 50),
        GGMLType("IQ4_NL", 20, 32, 18), GGMLType("IQ3_S", 21, 256, 110), GGMLType("IQ2_S", 22, 256, 82),
        GGMLType("IQ4_XS", 23, 256, 136), GGMLType("I8", 24, 1, 1), GGMLType("I16", 25, 1, 2),
        GGMLType("I32", 26, 1, 4), GGMLType("I64", 27, 1, 8), GGMLType("F64", 28, 1, 8),
        GGMLType("IQ1_M", 29, 256, 56), GGMLType("BF16", 30, 1, 2), GGMLType("TQ1_0", 34, 256, 54),
        GGMLType("TQ2_0", 35, 256, 66), GGMLType("MXFP4", 39, 32, 17), GGMLType("NVFP4", 40, 64, 36),
        GGMLType("Q1_0", 41, 128, 18), GGMLType("Q2_0", 42, 64, 18),
    )
}
TYPES_BY_ID: dict[int, GGMLType] = {t.id: t for t in TYPES.values()}


def ggml_type(t) -> GGMLType:
    """Look a type up by name (any case, e.g. ``"q4_k"``), id, or pass a ``GGMLType`` through."""
    if isinstance(t, GGMLType):
        return t
    if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
        if int(t) in TYPES_BY_ID:
            return TYPES_BY_ID[int(t)]
        raise ValueError(f"unknown ggml type id {t}; known ids: {sorted(TYPES_BY_ID)}")
    if isinstance(t, str) and t.upper() in TYPES:
        return TYPES[t.upper()]
    raise ValueError(f"unknown ggml type {t!r}; known: {', '.join(TYPES)}")


# ----------------------------------------------------------------------------- helpers

def _nearest_int(v) -> np.ndarray:
    """ggml's ``nearest_int``: add 1.5·2^23 in float32 and read the low mantissa bits."""
    val = np.asarray(v, F32) + F32(12582912.0)
    return (val.view(np.int32) & 0x007FFFFF) - 0x00400000


def _roundf(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: nearest integer, halves away from zero (exact: ``v - trunc(v)`` is exact)."""
    t = np.trunc(v)
    return t + np.copysign((np.abs(v - t) >= F32(0.5)).astype(F32), v)


def _seqsum(terms: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over the last axis, as a C ``for`` loop accumulates."""
    return np.add.accumulate(terms.astype(F32, copy=False), axis=-1, dtype=F32)[..., -1]


def _first_absmax(x: np.ndarray) -> np.ndarray:
    """The signed element of largest magnitude, first one on ties (C's strict ``>`` scan)."""
    idx = np.argmax(np.abs(x), axis=-1)
    return np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]


def _first(x: np.ndarray, fn) -> np.ndarray:
    return np.take_along_axis(x, fn(x, axis=-1)[..., None], axis=-1)[..., 0]


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """fp16 bytes (little-endian) of float32 values, one ``(…, 2)`` uint8 pair per value."""
    return np.asarray(v, F32).astype("<f2").view(np.uint8).reshape(*np.shape(v), 2)


def _f16_value(raw: np.ndarray) -> np.ndarray:
    """float32 values of fp16 bytes ``raw[..., 2]``."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(F32)


def _u16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<u2")[..., 0].astype(np.uint32)


def _u32(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<u4")[..., 0]


def _le_bytes(v: np.ndarray, dtype: str) -> np.ndarray:
    a = np.asarray(v).astype(dtype)
    return a.view(np.uint8).reshape(*a.shape[:-1], -1) if a.ndim > 1 else a.view(np.uint8).reshape(-1, a.itemsize)


def _best_index(values: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``best_index_int8``: index of the nearest table value (ties go to the upper one)."""
    vals = values.astype(F32)
    mu = np.clip(np.searchsorted(vals, v, side="right"), 1, len(vals) - 1)
    lo, hi = vals[mu - 1], vals[mu]
    idx = np.where((v - lo) < (hi - v), mu - 1, mu)
    idx = np.where(v <= vals[0], 0, idx)
    return np.where(v >= vals[-1], len(vals) - 1, idx)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0xF) | (hi.astype(np.uint8) << 4)


def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes ``qs[..., k]`` → ``[..., 2k]``: low nibbles of all bytes, then the high ones."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _bits(qh: np.ndarray, nbits: int) -> np.ndarray:
    """Bit ``j`` of a little-endian integer stored as ``qh[..., nbits // 8]`` bytes."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[..., :nbits]


def _pack2(L: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K 2-bit layout: per 128 weights, byte l holds l, l+32, l+64, l+96."""
    L = L.reshape(*L.shape[:-1], -1, 4, 32).astype(np.uint8)
    out = L[..., 0, :] | (L[..., 1, :] << 2) | (L[..., 2, :] << 4) | (L[..., 3, :] << 6)
    return out.reshape(*L.shape[:-3], -1)


def _unpack2(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(*qs.shape[:-1], -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    return (q & 3).reshape(*qs.shape[:-1], -1)


# ----------------------------------------------------------------------------- legacy 32-blocks

def _inv(d):
    """C's ``d ? 1.0f/d : 0.0f``."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


def _sym_codes(x, half):
    """Q4_0 / Q5_0: ``d = max / -half`` (signed absmax), ``q = min(2 half - 1, (int)(x/d + half + 0.5))``."""
    d = _first_absmax(x) / F32(-half)
    q = np.trunc(x * _inv(d)[:, None] + F32(half + 0.5)).astype(np.int32)
    return d, np.minimum(2 * half - 1, q)


def _min_codes(x, nmax):
    """Q4_1 / Q5_1: ``d = (max - min) / nmax``, ``q = (int)((x - min)/d + 0.5)`` (not clamped)."""
    mn, mx = _first(x, np.argmin), _first(x, np.argmax)
    d = (mx - mn) / F32(nmax)
    q = np.trunc((x - mn[:, None]) * _inv(d)[:, None] + F32(0.5)).astype(np.int32)
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn)], axis=1), q


def _q4_0(x):
    d, q = _sym_codes(x, 8)
    return np.concatenate([_f16_bytes(d), _nibbles(q[:, :16], q[:, 16:])], axis=1)


def _dq4_0(b):
    d = _f16_value(b[:, :2])
    q = _split_nibbles(b[:, 2:]).astype(np.int32) - 8
    return q * d[:, None]


def _q4_1(x):
    dm, q = _min_codes(x, 15)
    q = np.minimum(15, q)
    return np.concatenate([dm, _nibbles(q[:, :16], q[:, 16:])], axis=1)


def _dq4_1(b):
    d, m = _f16_value(b[:, 0:2]), _f16_value(b[:, 2:4])
    return _split_nibbles(b[:, 4:]).astype(np.int32) * d[:, None] + m[:, None]


def _q5_pack(d_bytes, q):
    qh = np.packbits((q >> 4).astype(np.uint8) & 1, axis=1, bitorder="little")  # 4 bytes = u32 LE
    return np.concatenate([d_bytes, qh, _nibbles(q[:, :16], q[:, 16:])], axis=1)


def _q5_unpack(b):
    hi = _bits(b[:, :4], 32).astype(np.int32) << 4
    return _split_nibbles(b[:, 4:]).astype(np.int32) | hi


def _q5_0(x):
    d, q = _sym_codes(x, 16)
    return _q5_pack(_f16_bytes(d), q)


def _dq5_0(b):
    return (_q5_unpack(b[:, 2:]) - 16) * _f16_value(b[:, :2])[:, None]


def _q5_1(x):
    dm, q = _min_codes(x, 31)
    return _q5_pack(dm, q & 0xFF)  # C's (uint8_t) cast, no clamp


def _dq5_1(b):
    d, m = _f16_value(b[:, 0:2]), _f16_value(b[:, 2:4])
    return _q5_unpack(b[:, 4:]) * d[:, None] + m[:, None]


def _q8_0(x):
    d = np.abs(x).max(axis=1) / F32(127)
    q = _roundf(x * _inv(d)[:, None]).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


def _dq8_0(b):
    return b[:, 2:].view(np.int8).astype(np.int32) * _f16_value(b[:, :2])[:, None]


def _mxfp4(x):
    amax = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        # log2f correctly rounded to float32, then floorf; the (uint8_t) cast wraps like C on x86
        lg = np.floor(np.log2(amax.astype(np.float64)).astype(F32))
    e = np.where(amax > 0, np.nan_to_num(lg, neginf=0) - 2 + 127, 0).astype(np.int64) & 0xFF
    d = _e8m0_half(e.astype(np.uint8))
    errs = np.abs(KVALUES_FP4.astype(F32)[None, None, :] * d[:, None, None] - x[:, :, None])
    q = np.argmin(errs, axis=-1)
    return np.concatenate([e.astype(np.uint8)[:, None], _nibbles(q[:, :16], q[:, 16:])], axis=1)


def _e8m0_half(e: np.ndarray) -> np.ndarray:
    """``ggml_e8m0_to_fp32_half``: 2^(e-128) as float32 bits (subnormal for e < 2)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32)
    return bits.view(F32)


def _dmxfp4(b):
    d = _e8m0_half(b[:, 0])
    return KVALUES_FP4[_split_nibbles(b[:, 1:])].astype(F32) * d[:, None]


# ----------------------------------------------------------------------------- scale searches

def _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """``make_qkx2_quants``: weighted affine fit (scale, min) over a grid of ``nstep`` scales.

    Returns ``(scale, the_min, L)`` with ``x ≈ scale*L - the_min``. Row-wise over ``x[B, n]``.
    """
    mn = np.minimum(_first(x, np.argmin), F32(0))
    mx = _first(x, np.argmax)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = mx == mn
    mn0 = mn

    def err(scale, L, mins):
        diff = scale[:, None] * L + mins[:, None] - x
        return _seqsum(w * (np.abs(diff) if use_mad else diff * diff))

    with np.errstate(all="ignore"):
        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        L = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)
        best = err(scale, L, mn)
        for step in range(nstep + 1):
            # C reuses the running ``min`` here: it moves whenever a step improves the fit
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
            La = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)
            wl = w * La
            sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * La), _seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_min = np.where(clamp, F32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            cur = err(this_scale, La, this_min)
            better = (D > 0) & (cur < best)
            L = np.where(better[:, None], La, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L = np.where(flat[:, None], 0, L).astype(np.int32)
    return np.where(flat, F32(0), scale), -np.where(flat, mn0, mn), L


def _make_qx_quants(x, nmax):
    """``make_qx_quants`` with ``rmse_type = 1`` (weights x²): symmetric scale, 18-point search.

    Returns ``(scale, L)`` with ``L`` offset by ``nmax`` (0 for all-zero rows).
    """
    mx = _first_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    w = x * x
    nm = F32(nmax)

    def fit(iscale):
        l = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
        return l, _seqsum(w * x * l), _seqsum(w * l * l)

    with np.errstate(all="ignore"):
        l, sumlx, suml2 = fit(-nm / mx)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        L = l
        for step in range(-9, 10):
            if step == 0:
                continue
            l, sumlx, suml2 = fit(-(nm + F32(0.1) * F32(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], l, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    L = np.where(zero[:, None], 0, L.astype(np.int32) + nmax)
    return np.where(zero, F32(0), scale), L


def _make_q3_quants(x, nmax):
    """``make_q3_quants`` with ``do_rmse``: coordinate descent on the weighted (x²) error.

    Each of 5 sweeps visits the elements in order and moves one code if that raises
    ``sumlx²/suml2``. A sweep with no move leaves the state unchanged, so running all 5
    sweeps equals C's early ``break``. Returns ``(scale, L + nmax)``; L = 0 for zero rows.
    """
    mx = _first_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    w = x * x
    with np.errstate(all="ignore"):
        iscale = F32(-nmax) / mx
        L = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        Lf = L.astype(F32)
        sumlx, suml2 = _seqsum(w * x * Lf), _seqsum(w * Lf * Lf)
        for _ in range(5):
            for i in range(x.shape[1]):
                wi, xi, li = w[:, i], x[:, i], L[:, i].astype(F32)
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new = np.clip(_nearest_int(xi * sl2 / slx), -nmax, nmax - 1)
                nf = new.astype(F32)
                slx2 = slx + wi * xi * nf
                sl22 = sl2 + wi * nf * nf
                take = (slx > 0) & (new != L[:, i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[:, i] = np.where(take, new, L[:, i])
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L = np.where(zero[:, None], 0, L + nmax)
    return np.where(zero, F32(0), scale), L


# ----------------------------------------------------------------------------- K-quants

def _requant(x, d, dm, nmax, L):
    """Second pass of the K-quants: ``L = clamp(nearest_int((x + dm) / d))`` where ``d != 0``."""
    with np.errstate(all="ignore"):
        new = np.clip(_nearest_int((x + dm[..., None]) / d[..., None]), 0, nmax)
    return np.where((d != 0)[..., None], new, L)


def _q2_k(x):
    B = x.shape[0]
    xs = x.reshape(B * 16, 16)
    scales, mins, L = _make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(B, 16), mins.reshape(B, 16), L.reshape(B, 16, 16)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(all="ignore"):
        ls = _nearest_int((F32(15) / max_scale)[:, None] * scales) & 0xFF
        lm = _nearest_int((F32(15) / max_min)[:, None] * mins)
    sc = np.where((max_scale > 0)[:, None], ls, 0)
    sc = (sc | np.where((max_min > 0)[:, None], lm << 4, 0)) & 0xFF
    d = np.where(max_scale > 0, max_scale / F32(15), F32(0))
    dmin = np.where(max_min > 0, max_min / F32(15), F32(0))
    d_b, dmin_b = _f16_bytes(d), _f16_bytes(dmin)
    dl = _f16_value(d_b)[:, None] * (sc & 0xF).astype(F32)
    ml = _f16_value(dmin_b)[:, None] * (sc >> 4).astype(F32)
    L = _requant(x.reshape(B, 16, 16), dl, ml, 3, L)
    return np.concatenate([sc.astype(np.uint8), _pack2(L.reshape(B, 256)), d_b, dmin_b], axis=1)


def _dq2_k(b):
    sc = b[:, :16]
    d, dmin = _f16_value(b[:, 80:82]), _f16_value(b[:, 82:84])
    dl = d[:, None] * (sc & 0xF).astype(F32)
    ml = dmin[:, None] * (sc >> 4).astype(F32)
    q = _unpack2(b[:, 16:80]).reshape(-1, 16, 16).astype(F32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(-1, 256)


def _q3_k(x):
    B = x.shape[0]
    scales, L = _make_q3_quants(x.reshape(B * 16, 16), 4)
    scales, L = scales.reshape(B, 16), L.reshape(B, 16, 16)
    max_scale = _first_absmax(scales)
    with np.errstate(all="ignore"):
        iscale = F32(-32) / max_scale
        l = np.clip(_nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31).astype(np.int32) + 32
    nz = max_scale != 0
    l = np.where(nz[:, None], l, 0)
    packed = np.zeros((B, 12), np.uint8)
    packed[:, :8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    hi = (l >> 4).reshape(B, 4, 4)  # [j // 4, j % 4]
    packed[:, 8:] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    with np.errstate(all="ignore"):
        d = np.where(nz, F32(1) / iscale, F32(0))
    d_b = _f16_bytes(d)
    dl = _f16_value(d_b)[:, None] * np.where(nz[:, None], l - 32, -32).astype(F32)
    with np.errstate(all="ignore"):
        new = np.clip(_nearest_int(x.reshape(B, 16, 16) / dl[:, :, None]), -4, 3) + 4
    L = np.where((dl != 0)[:, :, None], new, L).reshape(B, 256)
    high = L > 3
    hmask = np.packbits(high.reshape(B, 8, 32).transpose(0, 2, 1), axis=2, bitorder="little")[:, :, 0]
    L = np.where(high, L - 4, L)
    return np.concatenate([hmask, _pack2(L), packed, d_b], axis=1)


def _q3_k_scales(packed):
    """The 16 six-bit scales of a Q3_K block, as signed ints (stored value - 32)."""
    lo = np.concatenate([packed[:, :8] & 0xF, packed[:, :8] >> 4], axis=1).astype(np.int32)
    hi = (packed[:, 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3  # [j % 4, j // 4]
    hi = hi.transpose(0, 2, 1).reshape(-1, 16).astype(np.int32)
    return (lo | (hi << 4)) - 32


def _dq3_k(b):
    B = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16_value(b[:, 108:110])
    dl = d[:, None] * _q3_k_scales(packed).astype(F32)
    high = np.unpackbits(hmask, axis=1, bitorder="little").reshape(B, 32, 8).transpose(0, 2, 1).reshape(B, 256)
    q = _unpack2(qs).astype(np.int32) - np.where(high, 0, 4)
    return (dl[:, :, None] * q.reshape(B, 16, 16).astype(F32)).reshape(B, 256)


def _pack_k4_scales(ls, lm):
    """Q4_K/Q5_K: eight 6-bit scales and mins in 12 bytes (``get_scale_min_k4`` inverse)."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _unpack_k4_scales(q):
    q = q.astype(np.uint8)
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(F32), mn.astype(F32)


def _kx_fit(x, nmax, rmin, nstep):
    """Q4_K / Q5_K first pass: per 32 weights, weights ``sqrt(mean x²) + |x|`` and qkx2 fit."""
    B = x.shape[0]
    xs = x.reshape(B * 8, 32)
    av_x = np.sqrt(_seqsum(xs * xs) / F32(32))
    w = av_x[:, None] + np.abs(xs)
    scales, mins, L = _make_qkx2_quants(xs, w, nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(all="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales) & 0xFF).astype(np.uint8)
    lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins) & 0xFF).astype(np.uint8)
    head = np.concatenate([_f16_bytes(max_scale / F32(63)), _f16_bytes(max_min / F32(63))], axis=1)
    d = _f16_value(head[:, 0:2])[:, None] * ls.astype(F32)
    dm = _f16_value(head[:, 2:4])[:, None] * lm.astype(F32)
    L = _requant(x.reshape(B, 8, 32), d, dm, nmax, L.reshape(B, 8, 32)).reshape(B, 256)
    return np.concatenate([head, _pack_k4_scales(ls, lm)], axis=1), L


def _dq_kx(b, q):
    d, dmin = _f16_value(b[:, 0:2]), _f16_value(b[:, 2:4])
    sc, mn = _unpack_k4_scales(b[:, 4:16])
    dl, ml = d[:, None] * sc, dmin[:, None] * mn
    return (dl[:, :, None] * q.reshape(-1, 8, 32).astype(F32) - ml[:, :, None]).reshape(-1, 256)


def _q4_k(x):
    head, L = _kx_fit(x, 15, -1.0, 20)
    L = L.reshape(-1, 4, 2, 32)
    return np.concatenate([head, _nibbles(L[:, :, 0], L[:, :, 1]).reshape(-1, 128)], axis=1)


def _k4_nibbles(qs):
    """128 bytes → 256 values: per 64 weights, 32 low nibbles then 32 high nibbles."""
    q = qs.reshape(-1, 4, 32)
    return np.stack([q & 0xF, q >> 4], axis=2).reshape(-1, 256)


def _dq4_k(b):
    return _dq_kx(b, _k4_nibbles(b[:, 16:144]))


def _q5_k(x):
    head, L = _kx_fit(x, 31, -0.5, 15)
    B = x.shape[0]
    L4 = L.reshape(B, 4, 2, 32)
    qh = ((L4 >> 4) & 1).transpose(0, 3, 1, 2).reshape(B, 32, 8)  # bit 2*n + half of byte j
    qh = np.packbits(qh.astype(np.uint8), axis=2, bitorder="little")[:, :, 0]
    qs = _nibbles(L4[:, :, 0] & 0xF, L4[:, :, 1] & 0xF).reshape(B, 128)
    return np.concatenate([head, qh, qs], axis=1)


def _dq5_k(b):
    B = b.shape[0]
    high = np.unpackbits(b[:, 16:48], axis=1, bitorder="little").reshape(B, 32, 8).transpose(0, 2, 1)
    return _dq_kx(b, _k4_nibbles(b[:, 48:176]) | (high.reshape(B, 256).astype(np.uint8) << 4))


def _q6_k(x):
    B = x.shape[0]
    scales, L = _make_qx_quants(x.reshape(B * 16, 16), 32)
    scales, L = scales.reshape(B, 16), L.reshape(B, 16, 16)
    max_scale = _first_absmax(scales)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = F32(-128) / max_scale
        d = F32(1) / iscale
        sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    d_b = _f16_bytes(d)
    dl = _f16_value(d_b)[:, None] * sc.astype(F32)
    with np.errstate(all="ignore"):
        new = np.clip(_nearest_int(x.reshape(B, 16, 16) / dl[:, :, None]), -32, 31) + 32
    L = np.where((dl != 0)[:, :, None], new, L).reshape(B, 2, 4, 32).astype(np.uint8)
    ql = np.stack([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4), L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], axis=2)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(B, 128), qh.reshape(B, 64), sc.view(np.uint8), d_b], axis=1)
    out[zero] = 0
    return out


def _dq6_k(b):
    B = b.shape[0]
    ql = b[:, :128].reshape(B, 2, 2, 32)
    qh = b[:, 128:192].reshape(B, 2, 1, 32)
    sc = b[:, 192:208].view(np.int8).astype(F32)
    d = _f16_value(b[:, 208:210])
    low = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = (low | (high << 4)).astype(np.int32).reshape(B, 16, 16) - 32
    return ((d[:, None] * sc)[:, :, None] * q.astype(F32)).reshape(B, 256)


def _q8_k(x):
    mx = _first_absmax(x)
    with np.errstate(all="ignore"):
        iscale = F32(-127) / mx
        q = np.minimum(127, _nearest_int(iscale[:, None] * x)).astype(np.int8)
        d = F32(1) / iscale
    nz = mx != 0
    q = np.where(nz[:, None], q, 0).astype(np.int8)
    d = np.where(nz, d, F32(0)).astype("<f4")
    bsums = q.reshape(-1, 16, 16).astype(np.int32).sum(axis=2).astype("<i2")
    return np.concatenate([d.view(np.uint8).reshape(-1, 4), q.view(np.uint8), bsums.view(np.uint8)], axis=1)


def _dq8_k(b):
    d = np.ascontiguousarray(b[:, :4]).view("<f4")[:, 0]
    return d[:, None] * b[:, 4:260].view(np.int8).astype(F32)


# ----------------------------------------------------------------------------- IQ4

def _iq4_fit(x, ntry=7):
    """``quantize_row_iq4_nl_impl`` per 32 weights (no importance weights): best scale.

    Start from ``d = max / 127`` (sign so the largest value hits -127 … 113 well), then try
    ``id = (itry - 127) / max`` for itry in -ntry..ntry, keeping the weighted least-squares
    scale ``Σ w q x / Σ w q²`` (w = x²) with the largest ``(Σ w q x)² / Σ w q²``.
    """
    vals = KVALUES_IQ4NL.astype(F32)
    w = x * x
    mx = _first_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS

    def sums(idv):
        q = vals[_best_index(KVALUES_IQ4NL, idv[:, None] * x)]
        wq = w * q
        return _seqsum(wq * x), _seqsum(wq * q)

    with np.errstate(all="ignore"):
        d = -mx / vals[0]
        sumqx, sumq2 = sums(F32(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            sumqx, sumq2 = sums(F32(itry - 127) / mx)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d)
            best = np.where(better, d * sumqx, best)
    return np.where(zero, F32(0), d)


def _iq4_codes(x, scale):
    L = _best_index(KVALUES_IQ4NL, _inv(scale)[:, None] * x)
    return _nibbles(L[:, :16], L[:, 16:])


def _iq4_nl(x):
    d = _iq4_fit(x)
    return np.concatenate([_f16_bytes(d), _iq4_codes(x, d)], axis=1)


def _diq4_nl(b):
    return _f16_value(b[:, :2])[:, None] * KVALUES_IQ4NL[_split_nibbles(b[:, 2:])].astype(F32)


def _iq4_xs(x):
    B = x.shape[0]
    xs = x.reshape(B * 8, 32)
    scales = _iq4_fit(xs).reshape(B, 8)
    max_scale = _first_absmax(scales)
    d = -max_scale / F32(32)
    l = np.clip(_nearest_int(_inv(d)[:, None] * scales), -32, 31)
    dl = d[:, None] * l.astype(F32)
    qs = _iq4_codes(xs, dl.reshape(-1)).reshape(B, 128)
    l = (l + 32).astype(np.uint32)
    scales_l = ((l[:, 0::2] & 0xF) | ((l[:, 1::2] & 0xF) << 4)).astype(np.uint8)
    scales_h = np.bitwise_or.reduce((l >> 4) << (2 * np.arange(8, dtype=np.uint32)), axis=1).astype("<u2")
    return np.concatenate([_f16_bytes(d), scales_h.view(np.uint8).reshape(B, 2), scales_l, qs], axis=1)


def _diq4_xs(b):
    B = b.shape[0]
    d = _f16_value(b[:, :2])
    sh = _u16(b[:, 2:4])
    sl = b[:, 4:8]
    lo = np.stack([sl & 0xF, sl >> 4], axis=2).reshape(B, 8).astype(np.int32)
    hi = ((sh[:, None] >> (2 * np.arange(8, dtype=np.uint32))) & 3).astype(np.int32)
    dl = d[:, None] * ((lo | (hi << 4)) - 32).astype(F32)
    q = KVALUES_IQ4NL[_split_nibbles(b[:, 8:].reshape(B * 8, 16))].astype(F32).reshape(B, 8, 32)
    return (dl[:, :, None] * q).reshape(B, 256)


# ----------------------------------------------------------------------------- plain floats

def _bf16(x):
    u = x.astype(F32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rne = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    return np.where(nan, (u >> 16) | 64, rne).astype("<u2").view(np.uint8)


def _dbf16(b):
    return (np.ascontiguousarray(b).view("<u2").astype(np.uint32) << 16).view(F32)


_QUANTIZERS = {
    "F32": lambda x: x.astype("<f4").view(np.uint8),
    "F16": lambda x: x.astype("<f2").view(np.uint8),
    "BF16": _bf16,
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "Q8_K": _q8_k,
    "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs, "MXFP4": _mxfp4,
}
_DEQUANTIZERS = {
    "F32": lambda b: np.ascontiguousarray(b).view("<f4").astype(F32),
    "F16": lambda b: np.ascontiguousarray(b).view("<f2").astype(F32),
    "BF16": _dbf16,
    "Q4_0": _dq4_0, "Q4_1": _dq4_1, "Q5_0": _dq5_0, "Q5_1": _dq5_1, "Q8_0": _dq8_0,
    "Q2_K": _dq2_k, "Q3_K": _dq3_k, "Q4_K": _dq4_k, "Q5_K": _dq5_k, "Q6_K": _dq6_k, "Q8_K": _dq8_k,
    "IQ4_NL": _diq4_nl, "IQ4_XS": _diq4_xs, "MXFP4": _dmxfp4,
}
QUANTIZABLE = tuple(_QUANTIZERS)
DEQUANTIZABLE = tuple(_DEQUANTIZERS)
_CHUNK_BLOCKS = 1 << 14  # blocks per vectorized step: bounds temporaries at a few MB


def quantize(x, type_name) -> np.ndarray:
    """Quantize ``x[..., n]`` row by row to ggml blocks: ``uint8[..., n / block * type_size]``.

    ``x`` is converted to float32 first (ggml quantizes float32 rows); it must be finite and
    ``n`` a multiple of the type's block size. The bytes equal what ggml's reference
    quantizer writes for the same float32 input.
    """
    t = ggml_type(type_name)
    if t.name not in _QUANTIZERS:
        raise ValueError(f"refquant cannot quantize to {t.name}; quantizable types: {', '.join(QUANTIZABLE)}")
    from refquant._checks import float_array

    x = float_array(x, "x")
    if x.shape[-1] % t.block_size:
        raise ValueError(
            f"{t.name} needs rows whose length is a multiple of {t.block_size}; x has shape {x.shape}"
        )
    blocks = np.ascontiguousarray(x, dtype=F32).reshape(-1, t.block_size)
    # fp16 scales overflow to Inf for |x| beyond ~65504 * code range, exactly as in ggml
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if t.block_size == 1:
            out = _QUANTIZERS[t.name](blocks[:, 0])
        else:  # chunk by chunk into one preallocated output: memory stays near the input's size
            out = np.empty((len(blocks), t.type_size), np.uint8)
            for i in range(0, len(blocks), _CHUNK_BLOCKS):
                out[i : i + _CHUNK_BLOCKS] = _QUANTIZERS[t.name](blocks[i : i + _CHUNK_BLOCKS])
    return out.reshape(*x.shape[:-1], x.shape[-1] // t.block_size * t.type_size)


def dequantize(raw, type_name, shape) -> np.ndarray:
    """Decode ggml block bytes to ``float32`` of ``shape`` (NumPy order, last axis = row).

    ``raw`` is any uint8 buffer holding exactly ``prod(shape[:-1]) * row_bytes`` bytes.
    """
    t = ggml_type(type_name)
    if t.name not in _DEQUANTIZERS:
        raise ValueError(f"refquant cannot dequantize {t.name}; supported: {', '.join(DEQUANTIZABLE)}")
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise TypeError(f"raw must be a uint8 array of block bytes, got dtype {raw.dtype}")
    n = shape[-1] if shape else 1
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    need = rows * t.row_bytes(n)
    if raw.size != need:
        raise ValueError(f"{t.name} tensor of shape {shape} needs {need} bytes, got {raw.size}")
    blocks = raw.reshape(-1, t.type_size)
    if len(blocks) == 0:
        return np.zeros(shape, F32)
    fn = _DEQUANTIZERS[t.name]
    with np.errstate(all="ignore"):  # crafted scales may be Inf/NaN; decode them as ggml does
        if t.block_size == 1:
            out = fn(blocks.reshape(-1))
        else:
            out = np.empty((len(blocks), t.block_size), F32)
            for i in range(0, len(blocks), _CHUNK_BLOCKS):
                out[i : i + _CHUNK_BLOCKS] = fn(blocks[i : i + _CHUNK_BLOCKS])
    return out.astype(F32, copy=False).reshape(shape)


# ----------------------------------------------------------------------------- code grids

def _fill(nibble=None, crumb=None, bit=None, byte=None):
    """Byte value filling a code field with level ``v``: nibbles, 2-bit crumbs, single bits or bytes."""
    def f(v):
        if nibble is not None:
            return (v & 15) * 0x11
        if crumb is not None:
            return ((v >> crumb) & 3) * 0x55
        if bit is not None:
            return 0xFF if (v >> bit) & 1 else 0
        return v & 0xFF
    return f


# type: (number of levels, [(first byte, end byte, byte value for level v)]) — the code fields of a block
_CODE_FIELDS = {
    "Q4_0": (16, [(2, 18, _fill(nibble=1))]),
    "Q4_1": (16, [(4, 20, _fill(nibble=1))]),
    "Q5_0": (32, [(2, 6, _fill(bit=4)), (6, 22, _fill(nibble=1))]),
    "Q5_1": (32, [(4, 8, _fill(bit=4)), (8, 24, _fill(nibble=1))]),
    "Q8_0": (256, [(2, 34, _fill(byte=1))]),
    "Q2_K": (4, [(16, 80, _fill(crumb=0))]),
    "Q3_K": (8, [(0, 32, _fill(bit=2)), (32, 96, _fill(crumb=0))]),
    "Q4_K": (16, [(16, 144, _fill(nibble=1))]),
    "Q5_K": (32, [(16, 48, _fill(bit=4)), (48, 176, _fill(nibble=1))]),
    "Q6_K": (64, [(0, 128, _fill(nibble=1)), (128, 192, _fill(crumb=4))]),
    "IQ4_NL": (16, [(2, 18, _fill(nibble=1))]),
    "IQ4_XS": (16, [(8, 136, _fill(nibble=1))]),
    "MXFP4": (16, [(1, 17, _fill(nibble=1))]),
}


def grid(raw, type_name, shape) -> np.ndarray:
    """Every value each weight can decode to, given its block's stored scales.

    Returns ``float32[levels, *shape]``: entry ``[v]`` is the tensor decoded with every code
    set to level ``v`` (scales, minima and super-block scales untouched). A ggml quantizer
    that rounds to nearest puts each weight on the grid point closest to it (up to the
    fp16 rounding of a scale it divided by), which is what the error bound tests check.
    """
    t = ggml_type(type_name)
    if t.name not in _CODE_FIELDS:
        raise ValueError(f"no code grid for {t.name}; types with one: {', '.join(_CODE_FIELDS)}")
    levels, fields = _CODE_FIELDS[t.name]
    blocks = np.asarray(raw, np.uint8).reshape(-1, t.type_size)
    out = np.empty((levels, *shape), F32)
    for v in range(levels):
        b = blocks.copy()
        for lo, hi, fill in fields:
            b[:, lo:hi] = fill(v)
        out[v] = dequantize(b, t, shape)
    return out


# Largest factor an fp16 scale is multiplied by when decoding (code × sub-block scale, + min
# term): an fp16 scale in the subnormal range is off by up to 2^-25, times this factor.
_SCALE_FACTOR = {"Q4_0": 8, "Q4_1": 16, "Q5_0": 16, "Q5_1": 32, "Q8_0": 128, "Q2_K": 60, "Q3_K": 128,
                 "Q4_K": 1008, "Q5_K": 2016, "Q6_K": 4096, "IQ4_NL": 127, "IQ4_XS": 4064, "MXFP4": 0}


def error_bound(w, raw, type_name) -> np.ndarray:
    """Per-element bound on ``|w - dequantize(raw)|``: distance to the nearest grid point,
    plus 2^-9 of the block's largest grid magnitude (fp16 rounding of scale and min, normal
    range) plus ``factor * 2^-25`` (their rounding when the fp16 scale is subnormal)."""
    w = np.asarray(w, np.float64)
    g = grid(raw, type_name, w.shape).astype(np.float64)
    t = ggml_type(type_name)
    mag = np.abs(g).max(axis=0).reshape(-1, t.block_size).max(axis=1, keepdims=True)
    mag = np.broadcast_to(mag, (mag.shape[0], t.block_size)).reshape(w.shape)
    return np.abs(g - w).min(axis=0) + mag * 2.0**-9 + np.abs(w) * 2.0**-20 + _SCALE_FACTOR[t.name] * 2.0**-25


# ----------------------------------------------------------------------------- fields

def block_fields(raw, type_name: str, n: int) -> dict:
    """The stored fields of ggml blocks, decoded but not combined, for kernels that repack.

    ``raw`` is ``uint8[rows, row_bytes]`` of rows of ``n`` weights. Returns ``codes``:
    ``uint8[rows, n]`` as stored (unsigned: Q4_0's ``q + 8``, Q5_0's ``q + 16``, Q6_K's
    ``q + 32``; Q8_0's int8 codes as their uint8 bit patterns) and the scale fields as raw
    fp16 bit patterns (``uint16``) or small integers, one column per block:

    * Q8_0, Q4_0, Q5_0: ``d`` per 32.  Q4_1, Q5_1: ``d`` and ``m`` per 32.
    * Q4_K, Q5_K: ``d`` and ``dmin`` per 256, ``sc`` and ``mn`` (uint8, 6-bit) per 32.
    * Q6_K: ``d`` per 256, ``sc`` (int8) per 16.

    Each type's dequantization is ``d·(codes - offset)``, ``d·codes + m`` or
    ``d·sc·codes - dmin·mn`` per element, exactly as ``dequantize`` computes it.
    """
    t = ggml_type(type_name)
    raw = np.ascontiguousarray(raw, np.uint8)
    rows = raw.shape[0]
    b = raw.reshape(-1, t.type_size)

    def f16(lo):
        return np.ascontiguousarray(b[:, lo:lo + 2]).view("<u2")[:, 0].reshape(rows, -1)

    name = t.name
    if name == "Q8_0":
        codes = b[:, 2:]
        return {"codes": codes.reshape(rows, n), "d": f16(0)}
    if name in ("Q4_0", "Q4_1"):
        at = 2 if name == "Q4_0" else 4
        out = {"codes": _split_nibbles(b[:, at:]).reshape(rows, n), "d": f16(0)}
    elif name in ("Q5_0", "Q5_1"):
        at = 2 if name == "Q5_0" else 4
        out = {"codes": _q5_unpack(b[:, at:]).astype(np.uint8).reshape(rows, n), "d": f16(0)}
    elif name in ("Q4_K", "Q5_K"):
        q = _k4_nibbles(b[:, 16:144]) if name == "Q4_K" else None
        if name == "Q5_K":
            high = np.unpackbits(b[:, 16:48], axis=1, bitorder="little").reshape(-1, 32, 8).transpose(0, 2, 1)
            q = _k4_nibbles(b[:, 48:176]) | (high.reshape(-1, 256).astype(np.uint8) << 4)
        sc, mn = _unpack_k4_scales(b[:, 4:16])
        return {"codes": q.astype(np.uint8).reshape(rows, n), "d": f16(0), "dmin": f16(2),
                "sc": sc.astype(np.uint8).reshape(rows, -1), "mn": mn.astype(np.uint8).reshape(rows, -1)}
    elif name == "Q6_K":
        ql = b[:, :128].reshape(-1, 2, 2, 32)
        qh = b[:, 128:192].reshape(-1, 2, 1, 32)
        low = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
        high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
        return {"codes": (low | (high << 4)).astype(np.uint8).reshape(rows, n), "d": f16(208),
                "sc": np.ascontiguousarray(b[:, 192:208]).view(np.int8).reshape(rows, -1)}
    else:
        raise ValueError(f"block_fields does not decode {name}; it covers Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, "
                         "Q4_K, Q5_K and Q6_K")
    if name in ("Q4_1", "Q5_1"):
        out["m"] = f16(2)
    return out


# ----------------------------------------------------------------------------- QuantizedTensor

def quantize_tensor(w, type_name, scheme: str | None = None):
    """Quantize a 2-D ``w`` (out, in) to a ``QuantizedTensor`` holding the ggml block bytes.

    ``codes`` is ``uint8[out, row_bytes]``, exactly what a GGUF file stores for the tensor;
    scales and minima live inside the blocks, so ``scales`` and ``zeros`` are None.
    """
    t = ggml_type(type_name)
    return from_raw(quantize(w, t), t, w.shape, scheme)


def from_raw(raw, type_name, shape, scheme: str | None = None):
    """A 2-D tensor's block bytes (as a GGUF file stores them) as a ``QuantizedTensor`` of kind
    ``ggml``: ``codes`` is ``uint8[out, row_bytes]``, scheme the type's lower-case name."""
    from refquant.tensor import QuantizedTensor

    t = ggml_type(type_name)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise ValueError(f"a ggml matrix is 2-D, got shape {shape}")
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if raw.size != shape[0] * t.row_bytes(shape[1]):
        raise ValueError(f"{t.name} {shape} needs {shape[0] * t.row_bytes(shape[1])} bytes, got {raw.size}")
    return QuantizedTensor(raw.reshape(shape[0], -1), None, None, shape, scheme or t.name.lower(),
                           {"kind": "ggml", "ggml_type": t.name})


def _decode_ggml(qt):
    return dequantize(qt.codes, qt.meta["ggml_type"], qt.shape)


def _register():
    from refquant.tensor import register_decoder

    register_decoder("ggml")(_decode_ggml)


_register()
