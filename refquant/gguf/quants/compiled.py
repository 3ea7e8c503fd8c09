"""The GGML quantizers compiled with numba: the bytes of the NumPy reference, at C speed.

Each function here is ``quantize_row_*_ref`` of ggml-quants.c (``quantize_iq4_nl`` /
``quantize_iq4_xs`` for the IQ4 types) written again as scalar loops over one block at a
time, in the C source's order of float32 operations. The NumPy modules beside this one stay
the readable reference and the oracle: ``tests/test_gguf_quants.py`` checks these kernels
against them and against bytes written by ggml's C itself. What keeps the bytes identical:

* every float is float32 and every constant is a float32 (``_f``): numba, like NumPy,
  widens ``float32 op int`` or ``float32 op 0.5`` to float64, which rounds differently;
  ``tests`` reads the LLVM IR of every kernel and finds no double arithmetic in it;
* no ``fastmath``: LLVM fuses ``a*b + c`` into an FMA only under fast-math flags, and
  ggml's K-quant searches change their choices when it does (ggml-base is built without
  ``-march``, so its C has no FMA either);
* C's conversions are spelled out: ``(int)f`` is x86's ``cvttss2si`` (``INT_MIN`` for NaN
  and out-of-range values, where LLVM's ``fptosi`` would be undefined), stores into
  ``int8_t``/``uint8_t`` wrap, ``nearest_int`` reads the mantissa of ``f + 1.5·2^23``, fp16
  is ggml's own bit-level RNE conversion;
* ``log2f`` for MXFP4 is float64 ``log2`` rounded to float32, as the NumPy reference does.

Kernels run on blocks ``float32[B, block]`` into ``uint8[B, type_size]`` without the GIL, so
``quantize`` spreads chunks of blocks over threads. numba is imported only when a compiled
quantizer is first used (``import refquant`` does not load it).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from refquant.gguf.quants.constants import GROUP_MAX_EPS, KVALUES_FP4, KVALUES_IQ4NL
from refquant.kernels import _cache

_OPTS = dict(nogil=True, error_model="numpy", boundscheck=False)
# on disk, a damaged entry recompiled, an edit of the constants' module recompiled (kernels._cache)
_kernel = _cache.jit(None, deps=("refquant/gguf/quants/constants.py",), **_OPTS)
KERNELS: dict = {}        # ggml type -> its compiled quantizer (float32 blocks, uint8 out)
DEQUANTIZERS: dict = {}   # ggml type -> its compiled dequantizer


def _quantizer(type_name: str):
    """``@_quantizer("Q4_0")``: compile ``fn(x, out)`` (``_kernel``) as the type's quantizer."""
    def deco(fn):
        KERNELS[type_name] = _kernel(fn)
        return KERNELS[type_name]
    return deco


def _dequantizer(type_name: str):
    """``@_dequantizer("Q4_0")``: compile ``fn(b, out)`` (``_kernel``) as the type's dequantizer."""
    def deco(fn):
        DEQUANTIZERS[type_name] = _kernel(fn)
        return DEQUANTIZERS[type_name]
    return deco
_f = np.float32
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
_KV_IQ4 = KVALUES_IQ4NL.copy()
_KV_FP4 = KVALUES_FP4.copy()
_EPS = _f(GROUP_MAX_EPS)


# ----------------------------------------------------------------------------- C's scalar operations

@njit(inline="always", **_OPTS)
def _cvt(v):
    """C ``(int)v`` as x86 ``cvttss2si`` computes it: truncation, ``INT_MIN`` if NaN or out of range."""
    if v >= _f(-2147483648.0) and v < _f(2147483648.0):
        return np.int64(v)
    return np.int64(-2147483648)


@njit(inline="always", **_OPTS)
def _i8(v):
    """Store into ``int8_t``: keep the low byte, signed."""
    return ((v + 128) & 0xFF) - 128


@njit(inline="always", **_OPTS)
def _nearest_int(v):
    """ggml's ``nearest_int``: the low mantissa bits of ``v + 1.5·2^23`` (float32)."""
    s = np.float32(v + _f(12582912.0))
    return np.int64(np.float32(s).view(np.int32) & 0x007FFFFF) - 0x00400000


@njit(inline="always", **_OPTS)
def _roundf(v):
    """``(int)roundf(v)``: nearest integer, halves away from zero (INT_MIN as ``_cvt``)."""
    t = np.trunc(v)
    if abs(v - t) >= _f(0.5):
        t += np.copysign(_f(1), v)
    return _cvt(t)


@njit(inline="always", **_OPTS)
def _fp16(v):
    """``ggml_compute_fp32_to_fp16``: float32 → fp16 bits, round to nearest even, NaN → 0x7E00."""
    base = (abs(v) * _f(2.0 ** 112)) * _f(2.0 ** -110)
    w = np.int64(np.float32(v).view(np.uint32))
    shl1 = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1 & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = np.uint32((bias >> 1) + 0x07800000).view(np.float32) + base
    bits = np.int64(np.float32(base).view(np.uint32))
    nonsign = ((bits >> 13) & 0x7C00) + (bits & 0x0FFF)
    return ((sign >> 16) | (0x7E00 if shl1 > 0xFF000000 else nonsign)) & 0xFFFF


@njit(inline="always", **_OPTS)
def _put_f16(out, b, at, v):
    """Write ``v`` as fp16 at byte ``at`` of block ``b``; returns its float32 value (``FP16_TO_FP32``)."""
    h = _fp16(v)
    out[b, at] = h & 0xFF
    out[b, at + 1] = h >> 8
    return _F16_TO_F32[h]


@njit(inline="always", **_OPTS)
def _absmax(x, b, lo, hi):
    """The signed element of largest magnitude of ``x[b, lo:hi]``, first on ties (C's ``>``)."""
    amax = _f(0)
    mx = _f(0)
    for j in range(lo, hi):
        a = abs(x[b, j])
        if a > amax:
            amax = a
            mx = x[b, j]
    return mx, amax


@njit(inline="always", **_OPTS)
def _best_index_int8(values, v):
    """``best_index_int8``: index of the nearest codebook value (binary search, ties upward)."""
    n = values.shape[0]
    if v <= _f(values[0]):
        return 0
    if v >= _f(values[n - 1]):
        return n - 1
    ml = 0
    mu = n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if v < _f(values[mav]):
            mu = mav
        else:
            ml = mav
    return mu - 1 if v - _f(values[mu - 1]) < _f(values[mu]) - v else mu


# ----------------------------------------------------------------------------- legacy 32-blocks

@_quantizer("Q4_0")
def q4_0(x, out):
    for b in range(x.shape[0]):
        mx, _ = _absmax(x, b, 0, 32)
        d = mx / _f(-8)
        idv = _f(1) / d if d != 0 else _f(0)
        _put_f16(out, b, 0, d)
        for j in range(16):
            q0 = min(15, _i8(_cvt(x[b, j] * idv + _f(8.5)))) & 0xFF
            q1 = min(15, _i8(_cvt(x[b, j + 16] * idv + _f(8.5)))) & 0xFF
            out[b, 2 + j] = (q0 | (q1 << 4)) & 0xFF


@njit(inline="always", **_OPTS)
def _minmax(x, b):
    mn = _f(3.4028234663852886e38)
    mx = -mn
    for j in range(32):
        v = x[b, j]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    return mn, mx


@_quantizer("Q4_1")
def q4_1(x, out):
    for b in range(x.shape[0]):
        mn, mx = _minmax(x, b)
        d = (mx - mn) / _f(15)
        idv = _f(1) / d if d != 0 else _f(0)
        _put_f16(out, b, 0, d)
        _put_f16(out, b, 2, mn)
        for j in range(16):
            q0 = min(15, _i8(_cvt((x[b, j] - mn) * idv + _f(0.5)))) & 0xFF
            q1 = min(15, _i8(_cvt((x[b, j + 16] - mn) * idv + _f(0.5)))) & 0xFF
            out[b, 4 + j] = (q0 | (q1 << 4)) & 0xFF


@njit(inline="always", **_OPTS)
def _put_q5(out, b, at, q0, q1, j, qh):
    out[b, at + j] = ((q0 & 0x0F) | ((q1 & 0x0F) << 4)) & 0xFF
    return qh | (((q0 & 0x10) >> 4) << j) | (((q1 & 0x10) >> 4) << (j + 16))


@njit(inline="always", **_OPTS)
def _put_u32(out, b, at, v):
    for k in range(4):
        out[b, at + k] = (v >> (8 * k)) & 0xFF


@_quantizer("Q5_0")
def q5_0(x, out):
    for b in range(x.shape[0]):
        mx, _ = _absmax(x, b, 0, 32)
        d = mx / _f(-16)
        idv = _f(1) / d if d != 0 else _f(0)
        _put_f16(out, b, 0, d)
        qh = 0
        for j in range(16):
            q0 = min(31, _i8(_cvt(x[b, j] * idv + _f(16.5)))) & 0xFF
            q1 = min(31, _i8(_cvt(x[b, j + 16] * idv + _f(16.5)))) & 0xFF
            qh = _put_q5(out, b, 6, q0, q1, j, qh)
        _put_u32(out, b, 2, qh)


@_quantizer("Q5_1")
def q5_1(x, out):
    for b in range(x.shape[0]):
        mn, mx = _minmax(x, b)
        d = (mx - mn) / _f(31)
        idv = _f(1) / d if d != 0 else _f(0)
        _put_f16(out, b, 0, d)
        _put_f16(out, b, 2, mn)
        qh = 0
        for j in range(16):
            q0 = _cvt((x[b, j] - mn) * idv + _f(0.5)) & 0xFF
            q1 = _cvt((x[b, j + 16] - mn) * idv + _f(0.5)) & 0xFF
            qh = _put_q5(out, b, 8, q0, q1, j, qh)
        _put_u32(out, b, 4, qh)


@_quantizer("Q8_0")
def q8_0(x, out):
    for b in range(x.shape[0]):
        amax = _f(0)
        for j in range(32):
            a = abs(x[b, j])
            amax = amax if amax > a else a
        d = amax / _f(127)
        idv = _f(1) / d if d != 0 else _f(0)
        _put_f16(out, b, 0, d)
        for j in range(32):
            out[b, 2 + j] = _roundf(x[b, j] * idv) & 0xFF


@_quantizer("MXFP4")
def mxfp4(x, out):
    for b in range(x.shape[0]):
        amax = _f(0)
        for j in range(32):
            a = abs(x[b, j])
            if amax < a:
                amax = a
        e = 0
        if amax > _f(0):
            lg = np.float32(math.log2(np.float64(amax)))
            e = _cvt(np.float32(math.floor(lg)) - _f(2) + _f(127)) & 0xFF
        bits = (0x00200000 << e) if e < 2 else ((e - 1) << 23)
        d = np.uint32(bits).view(np.float32)
        out[b, 0] = e
        for j in range(16):
            lo = _best_fp4(x[b, j], d)
            hi = _best_fp4(x[b, j + 16], d)
            out[b, 1 + j] = lo | (hi << 4)


@njit(inline="always", **_OPTS)
def _best_fp4(v, d):
    best = 0
    err = abs(_f(_KV_FP4[0]) * d - v)
    for i in range(1, 16):
        e = abs(_f(_KV_FP4[i]) * d - v)
        if e < err:
            best = i
            err = e
    return best


# ----------------------------------------------------------------------------- K-quant scale searches

@_kernel
def _make_qkx2_quants(x, b, lo, n, nmax, w, L, Laux, rmin, rdelta, nstep, use_mad):
    """``make_qkx2_quants`` on ``x[b, lo:lo+n]`` with weights ``w[:n]``, codes into ``L[lo:lo+n]``.
    Returns ``(scale, the_min)``."""
    mn = x[b, lo]
    mx = x[b, lo]
    sum_w = w[0]
    sum_x = sum_w * x[b, lo]
    for i in range(1, n):
        v = x[b, lo + i]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
        sum_w += w[i]
        sum_x += w[i] * v
    if mn > _f(0):
        mn = _f(0)
    if mx == mn:
        for i in range(n):
            L[lo + i] = 0
        return _f(0), -mn
    iscale = _f(nmax) / (mx - mn)
    scale = _f(1) / iscale
    best_error = _f(0)
    for i in range(n):
        l = max(0, min(nmax, _nearest_int(iscale * (x[b, lo + i] - mn))))
        L[lo + i] = l
        diff = scale * _f(l) + mn - x[b, lo + i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += w[i] * diff
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * _f(step) + _f(nmax)) / (mx - mn)
        sum_l = _f(0)
        sum_l2 = _f(0)
        sum_xl = _f(0)
        for i in range(n):
            l = max(0, min(nmax, _nearest_int(iscale * (x[b, lo + i] - mn))))
            Laux[i] = l
            fl = _f(l)
            sum_l += w[i] * fl
            sum_l2 += w[i] * fl * fl
            sum_xl += w[i] * fl * x[b, lo + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > _f(0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > _f(0):
                this_min = _f(0)
                this_scale = sum_xl / sum_l2
            cur_error = _f(0)
            for i in range(n):
                diff = this_scale * _f(Laux[i]) + this_min - x[b, lo + i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += w[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[lo + i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@_kernel
def _sym_first_fit(x, b, lo, n, nmax, L, offset):
    """The start of ``make_q3_quants``: the signed absmax ``mx``; an all-zero block gets
    ``L = 0`` and ``ok = False``; else ``L = l + offset`` for ``l = clamp(nearest_int(-nmax/mx
    · x))`` and the weighted (x²) sums ``Σ w x l``, ``Σ w l²``."""
    mx, amax = _absmax(x, b, lo, lo + n)
    if amax < _EPS:
        for i in range(n):
            L[lo + i] = 0
        return False, mx, _f(0), _f(0)
    iscale = _f(-nmax) / mx
    sumlx = _f(0)
    suml2 = _f(0)
    for i in range(n):
        v = x[b, lo + i]
        l = max(-nmax, min(nmax - 1, _nearest_int(iscale * v)))
        L[lo + i] = l + offset
        w = v * v
        sumlx += w * v * _f(l)
        suml2 += w * _f(l) * _f(l)
    return True, mx, sumlx, suml2


@_kernel
def _make_q3_quants(x, b, lo, n, nmax, L):
    """``make_q3_quants`` with ``do_rmse``: coordinate descent; codes ``l + nmax``."""
    ok, mx, sumlx, suml2 = _sym_first_fit(x, b, lo, n, nmax, L, 0)
    if not ok:
        return _f(0)
    for _ in range(5):
        changed = 0
        for i in range(n):
            v = x[b, lo + i]
            w = v * v
            li = _f(L[lo + i])
            slx = sumlx - w * v * li
            if slx > _f(0):
                sl2 = suml2 - w * li * li
                new = max(-nmax, min(nmax - 1, _nearest_int(v * sl2 / slx)))
                if new != L[lo + i]:
                    slx += w * v * _f(new)
                    sl2 += w * _f(new) * _f(new)
                    if sl2 > _f(0) and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[lo + i] = new
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    for i in range(n):
        L[lo + i] += nmax
    return sumlx / suml2 if suml2 > _f(0) else _f(0)


@_kernel
def _pack2(out, b, at, L):
    """Q2_K/Q3_K 2-bit codes: per 128 weights, byte l holds l, l+32, l+64, l+96."""
    for j in range(0, 256, 128):
        for l in range(32):
            out[b, at + j // 4 + l] = (L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4)
                                       | (L[j + l + 96] << 6)) & 0xFF


# ----------------------------------------------------------------------------- K-quants

@_quantizer("Q2_K")
def q2_k(x, out):
    L = np.zeros(256, np.int64)
    Laux = np.zeros(16, np.int64)
    w = np.zeros(16, np.float32)
    scales = np.zeros(16, np.float32)
    mins = np.zeros(16, np.float32)
    sc = np.zeros(16, np.int64)
    for b in range(x.shape[0]):
        max_scale = _f(0)
        max_min = _f(0)
        for j in range(16):
            for l in range(16):
                w[l] = abs(x[b, 16 * j + l])
            scales[j], mins[j] = _make_qkx2_quants(x, b, 16 * j, 16, 3, w, L, Laux, _f(-0.5), _f(0.1), 15, True)
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        if max_scale > _f(0):
            iscale = _f(15) / max_scale
            for j in range(16):
                sc[j] = _nearest_int(iscale * scales[j]) & 0xFF
            d = _put_f16(out, b, 80, max_scale / _f(15))
        else:
            for j in range(16):
                sc[j] = 0
            d = _put_f16(out, b, 80, _f(0))
        if max_min > _f(0):
            iscale = _f(15) / max_min
            for j in range(16):
                sc[j] = (sc[j] | (_nearest_int(iscale * mins[j]) << 4)) & 0xFF
            dmin = _put_f16(out, b, 82, max_min / _f(15))
        else:
            dmin = _put_f16(out, b, 82, _f(0))
        _q2_tail(x, out, b, L, sc, d, dmin)


@_kernel
def _q2_tail(x, out, b, L, sc, d, dmin):
    """Q2_K's second pass on the stored scales and mins (``sc``; ``d``, ``dmin``: the fp16
    values), and the bytes."""
    for j in range(16):
        out[b, j] = sc[j]
        dl = d * _f(sc[j] & 0xF)
        if dl == 0:
            continue
        dm = dmin * _f(sc[j] >> 4)
        for i in range(16):
            L[16 * j + i] = max(0, min(3, _nearest_int((x[b, 16 * j + i] + dm) / dl)))
    _pack2(out, b, 16, L)


@_quantizer("Q3_K")
def q3_k(x, out):
    L = np.zeros(256, np.int64)
    scales = np.zeros(16, np.float32)
    ps = np.zeros(12, np.int64)
    hm = np.zeros(32, np.int64)
    for b in range(x.shape[0]):
        max_scale = _f(0)
        amax = _f(0)
        for j in range(16):
            scales[j] = _make_q3_quants(x, b, 16 * j, 16, 4, L)
            a = abs(scales[j])
            if a > amax:
                amax = a
                max_scale = scales[j]
        ps[:] = 0
        if max_scale != 0:
            iscale = _f(-32) / max_scale
            for j in range(16):
                _q3_scale(ps, j, max(-32, min(31, _i8(_nearest_int(iscale * scales[j])))) + 32)
            d_all = _put_f16(out, b, 108, _f(1) / iscale)
        else:
            d_all = _put_f16(out, b, 108, _f(0))
        _q3_tail(x, out, b, L, ps, d_all, hm)


@njit(inline="always", **_OPTS)
def _q3_scale(ps, j, l):
    """Q3_K's 6-bit scale ``l`` (0..63) of sub-block ``j`` into the 12 packed bytes ``ps``."""
    if j < 8:
        ps[j] = l & 0xF
    else:
        ps[j - 8] |= (l & 0xF) << 4
    ps[j % 4 + 8] |= (l >> 4) << (2 * (j // 4))


@_kernel
def _q3_tail(x, out, b, L, ps, d_all, hm):
    """Q3_K's second pass on the stored scales (``ps``, ``d_all``: the fp16 value) and bytes."""
    for j in range(16):
        s = (ps[j] & 0xF) if j < 8 else (ps[j - 8] >> 4)
        s = (s | (((ps[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
        dl = d_all * _f(s)
        if dl == 0:
            continue
        for i in range(16):
            L[16 * j + i] = max(-4, min(3, _nearest_int(x[b, 16 * j + i] / dl))) + 4
    hm[:] = 0
    for j in range(256):
        if L[j] > 3:
            hm[j % 32] |= 1 << (j // 32)
            L[j] -= 4
    for j in range(32):
        out[b, j] = hm[j]
    for j in range(12):
        out[b, 96 + j] = ps[j]
    _pack2(out, b, 32, L)


@_kernel
def _kx(x, out, b, nmax, rmin, nstep, L, Laux, w, scales, mins, q):
    """Q4_K / Q5_K up to the codes: head (d, dmin, 12 scale bytes) written, ``L[256]`` filled."""
    max_scale = _f(0)
    max_min = _f(0)
    for j in range(8):
        sum_x2 = _f(0)
        for l in range(32):
            v = x[b, 32 * j + l]
            sum_x2 += v * v
        av_x = np.sqrt(sum_x2 / _f(32))
        for l in range(32):
            w[l] = av_x + abs(x[b, 32 * j + l])
        scales[j], mins[j] = _make_qkx2_quants(x, b, 32 * j, 32, nmax, w, L, Laux, rmin, _f(0.1), nstep, False)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = _f(63) / max_scale if max_scale > _f(0) else _f(0)
    inv_min = _f(63) / max_min if max_min > _f(0) else _f(0)
    q[:] = 0
    for j in range(8):
        _k4_scale(q, j, min(63, _nearest_int(inv_scale * scales[j]) & 0xFF),
                  min(63, _nearest_int(inv_min * mins[j]) & 0xFF))
    _kx_tail(x, out, b, nmax, L, q, max_scale / _f(63), max_min / _f(63))


@njit(inline="always", **_OPTS)
def _k4_scale(q, j, ls, lm):
    """Q4_K/Q5_K: scale ``ls`` and min ``lm`` (uint8 as stored) of sub-block ``j`` into ``q``."""
    if j < 4:
        q[j] = ls & 0xFF
        q[j + 4] = lm & 0xFF
    else:
        q[j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
        q[j - 4] = (q[j - 4] | ((ls >> 4) << 6)) & 0xFF
        q[j] = (q[j] | ((lm >> 4) << 6)) & 0xFF


@_kernel
def _kx_tail(x, out, b, nmax, L, q, d_block, m_block):
    """Q4_K/Q5_K: the 12 scale bytes ``q`` and the fp16 d, dmin written, then the second
    pass on the scales as stored (``get_scale_min_k4``)."""
    for j in range(12):
        out[b, 4 + j] = q[j]
    d = _put_f16(out, b, 0, d_block)
    dmin = _put_f16(out, b, 2, m_block)
    for j in range(8):
        if j < 4:
            sc = q[j] & 63
            m = q[j + 4] & 63
        else:
            sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)
            m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4)
        dl = d * _f(sc)
        if dl == 0:
            continue
        dm = dmin * _f(m)
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, _nearest_int((x[b, 32 * j + i] + dm) / dl)))


@_quantizer("Q4_K")
def q4_k(x, out):
    L = np.zeros(256, np.int64)
    Laux = np.zeros(32, np.int64)
    w = np.zeros(32, np.float32)
    scales = np.zeros(8, np.float32)
    mins = np.zeros(8, np.float32)
    q = np.zeros(12, np.int64)
    for b in range(x.shape[0]):
        _kx(x, out, b, 15, _f(-1.0), 20, L, Laux, w, scales, mins, q)
        _q4_k_codes(out, b, L)


@njit(inline="always", **_OPTS)
def _q4_k_codes(out, b, L):
    for j in range(0, 256, 64):
        for l in range(32):
            out[b, 16 + j // 2 + l] = L[j + l] | (L[j + l + 32] << 4)


@_quantizer("Q5_K")
def q5_k(x, out):
    L = np.zeros(256, np.int64)
    Laux = np.zeros(32, np.int64)
    w = np.zeros(32, np.float32)
    scales = np.zeros(8, np.float32)
    mins = np.zeros(8, np.float32)
    q = np.zeros(12, np.int64)
    qh = np.zeros(32, np.int64)
    for b in range(x.shape[0]):
        _kx(x, out, b, 31, _f(-0.5), 15, L, Laux, w, scales, mins, q)
        _q5_k_codes(out, b, L, qh)


@njit(inline="always", **_OPTS)
def _q5_k_codes(out, b, L, qh):
    qh[:] = 0
    m1 = 1
    m2 = 2
    for n in range(0, 256, 64):
        for j in range(32):
            l1 = L[n + j]
            if l1 > 15:
                l1 -= 16
                qh[j] |= m1
            l2 = L[n + j + 32]
            if l2 > 15:
                l2 -= 16
                qh[j] |= m2
            out[b, 48 + n // 2 + j] = l1 | (l2 << 4)
        m1 <<= 2
        m2 <<= 2
    for j in range(32):
        out[b, 16 + j] = qh[j]


@_quantizer("Q6_K")
def q6_k(x, out):
    L = np.zeros(256, np.int64)
    scales = np.zeros(16, np.float32)
    w = np.zeros(256, np.float32)
    for b in range(x.shape[0]):
        max_scale = _f(0)
        max_abs = _f(0)
        for i in range(256):        # make_qx_quants' rmse_type 1 without importances: w = x²
            w[i] = x[b, i] * x[b, i]
        for j in range(16):
            scales[j] = _make_qx_quants_w(x[b], 16 * j, 16, 32, w, 16 * j, L, 16 * j)
            a = abs(scales[j])
            if a > max_abs:
                max_abs = a
                max_scale = scales[j]
        _q6_tail(x, out, b, L, scales, max_scale, max_abs)


@_kernel
def _q6_tail(x, out, b, L, scales, max_scale, max_abs):
    """Q6_K from its 16 sub-block scales: the int8 scales against their largest, the
    second pass, the bytes (all zero when the largest is below GROUP_MAX_EPS)."""
    if max_abs < _EPS:
        out[b, :] = 0
        return
    iscale = _f(-128) / max_scale
    d = _put_f16(out, b, 208, _f(1) / iscale)
    for j in range(16):
        out[b, 192 + j] = min(127, _nearest_int(iscale * scales[j])) & 0xFF
    for j in range(16):
        dl = d * _f(_i8(np.int64(out[b, 192 + j])))
        if dl == 0:
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, _nearest_int(x[b, 16 * j + i] / dl))) + 32
    for j in range(0, 256, 128):
        ql = j // 2
        qh = 128 + j // 4
        for l in range(32):
            q1 = L[j + l] & 0xF
            q2 = L[j + l + 32] & 0xF
            q3 = L[j + l + 64] & 0xF
            q4 = L[j + l + 96] & 0xF
            out[b, ql + l] = q1 | (q3 << 4)
            out[b, ql + l + 32] = q2 | (q4 << 4)
            out[b, qh + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                              | ((L[j + l + 96] >> 4) << 6)) & 0xFF


@_quantizer("Q8_K")
def q8_k(x, out):
    for b in range(x.shape[0]):
        mx, amax = _absmax(x, b, 0, 256)
        if amax == 0:
            out[b, :] = 0
            continue
        iscale = _f(-127) / mx
        for j in range(256):
            out[b, 4 + j] = min(127, _nearest_int(iscale * x[b, j])) & 0xFF
        for j in range(16):
            s = 0
            for i in range(16):
                s += _i8(np.int64(out[b, 4 + 16 * j + i]))
            out[b, 260 + 2 * j] = s & 0xFF
            out[b, 261 + 2 * j] = (s >> 8) & 0xFF
        _put_u32(out, b, 0, np.int64(np.float32(_f(1) / iscale).view(np.uint32)))


# ----------------------------------------------------------------------------- IQ4

@njit(inline="always", **_OPTS)
def _iq4_scale(x, b, lo, w):
    """The scale search without importance weights: ``w = x²`` (``_iq4_scale_w``)."""
    for j in range(32):
        w[j] = x[b, lo + j] * x[b, lo + j]
    return _iq4_scale_w(x, b, lo, w)


@_kernel
def _iq4_codes(x, b, lo, idv, out, at):
    for j in range(16):
        l0 = _best_index_int8(_KV_IQ4, idv * x[b, lo + j])
        l1 = _best_index_int8(_KV_IQ4, idv * x[b, lo + 16 + j])
        out[b, at + j] = l0 | (l1 << 4)


@_quantizer("IQ4_NL")
def iq4_nl(x, out):
    w = np.zeros(32, np.float32)
    for b in range(x.shape[0]):
        d = _iq4_scale(x, b, 0, w)
        _put_f16(out, b, 0, d)
        _iq4_codes(x, b, 0, _f(1) / d if d != 0 else _f(0), out, 2)


@_quantizer("IQ4_XS")
def iq4_xs(x, out):
    scales = np.zeros(8, np.float32)
    w = np.zeros(32, np.float32)
    for b in range(x.shape[0]):
        for ib in range(8):
            scales[ib] = _iq4_scale(x, b, 32 * ib, w)
        _iq4_xs_tail(x, out, b, scales)


@_kernel
def _iq4_xs_tail(x, out, b, scales):
    """IQ4_XS from its 8 block scales: 6-bit scales against the largest, the codes, the bytes."""
    max_scale = _f(0)
    amax = _f(0)
    for ib in range(8):
        a = abs(scales[ib])
        if a > amax:
            amax = a
            max_scale = scales[ib]
    d = -max_scale / _f(32)
    _put_f16(out, b, 0, d)
    idv = _f(1) / d if d != 0 else _f(0)
    sh = 0
    lo = 0
    for ib in range(8):
        l = max(-32, min(31, _nearest_int(idv * scales[ib])))
        dl = d * _f(l)
        _iq4_codes(x, b, 32 * ib, _f(1) / dl if dl != 0 else _f(0), out, 8 + 16 * ib)
        l += 32
        if ib % 2 == 0:
            lo = l & 0xF
        else:
            out[b, 4 + ib // 2] = lo | ((l & 0xF) << 4)
        sh |= (l >> 4) << (2 * ib)
    out[b, 2] = sh & 0xFF
    out[b, 3] = (sh >> 8) & 0xFF


# ----------------------------------------------------------------------------- with an importance matrix
# ``quantize_<type>(…, quant_weights)``: fn(x, qw, s2, out) on blocks x (B, block), the
# importances of their columns qw (B, block) and, per block, its row's Σx²/n (s2: what the
# legacy types weigh by; the K and IQ4 types take their σ² from the super-block itself)

WEIGHTED: dict = {}     # ggml type -> its compiled quantizer under an importance matrix


def _weighted(type_name: str):
    def deco(fn):
        WEIGHTED[type_name] = _kernel(fn)
        return WEIGHTED[type_name]
    return deco


@_kernel
def _make_qx_quants_w(xs, lo, n, nmax, w, wlo, L, llo):
    """``make_qx_quants(n, nmax, xs + lo, L + llo, 1, w + wlo)`` (``rmse_type = 1``; without
    importances its weights are x², which the caller passes); codes ``l + nmax``."""
    mx = _f(0)
    amax = _f(0)
    for i in range(n):
        a = abs(xs[lo + i])
        if a > amax:
            amax = a
            mx = xs[lo + i]
    if amax < _EPS:
        for i in range(n):
            L[llo + i] = 0
        return _f(0)
    iscale = _f(-nmax) / mx
    sumlx = _f(0)
    suml2 = _f(0)
    for i in range(n):
        v = xs[lo + i]
        l = max(-nmax, min(nmax - 1, _nearest_int(iscale * v)))
        L[llo + i] = l + nmax
        sumlx += w[wlo + i] * v * _f(l)
        suml2 += w[wlo + i] * _f(l) * _f(l)
    scale = sumlx / suml2 if suml2 != 0 else _f(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(_f(nmax) + _f(0.1) * _f(step)) / mx
        sumlx = _f(0)
        suml2 = _f(0)
        for i in range(n):
            v = xs[lo + i]
            l = max(-nmax, min(nmax - 1, _nearest_int(iscale * v)))
            sumlx += w[wlo + i] * v * _f(l)
            suml2 += w[wlo + i] * _f(l) * _f(l)
        if suml2 > _f(0) and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[llo + i] = nmax + max(-nmax, min(nmax - 1, _nearest_int(iscale * xs[lo + i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@_kernel
def _make_qp_quants(n, nmax, xs, L, w):
    """``make_qp_quants``: codes 0..nmax (C's uint8_t: ``& 0xFF``) for positive ``xs[:n]``,
    weights ``w``; returns the scale (quants.searches._make_qp_quants says how)."""
    mx = _f(0)
    for i in range(n):
        mx = mx if mx > xs[i] else xs[i]       # C's MAX(max, x[i])
    if mx < _EPS:
        for i in range(n):
            L[i] = 0
        return _f(0)
    iscale = _f(nmax) / mx
    for i in range(n):
        L[i] = _nearest_int(iscale * xs[i]) & 0xFF
    scale = _f(1) / iscale
    best = _f(0)
    for i in range(n):
        diff = xs[i] - scale * _f(L[i])
        best += w[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (_f(0.1) * _f(step) + _f(nmax)) / mx
        scale_is = _f(1) / iscale_is
        mse = _f(0)
        for i in range(n):
            l = min(nmax, _nearest_int(iscale_is * xs[i]))
            diff = xs[i] - scale_is * _f(l)
            mse += w[i] * diff * diff
        if mse < best:
            best = mse
            iscale = iscale_is
    sumlx = _f(0)
    suml2 = _f(0)
    for i in range(n):
        l = min(nmax, _nearest_int(iscale * xs[i]))
        L[i] = l & 0xFF
        sumlx += w[i] * xs[i] * _f(l)
        suml2 += w[i] * _f(l) * _f(l)
    for _ in range(5):
        changed = 0
        for i in range(n):
            li = _f(L[i])
            slx = sumlx - w[i] * xs[i] * li
            sl2 = suml2 - w[i] * li * li
            if slx > _f(0) and sl2 > _f(0):
                new = min(nmax, _nearest_int(xs[i] * sl2 / slx))
                if new != L[i]:
                    slx += w[i] * xs[i] * _f(new)
                    sl2 += w[i] * _f(new) * _f(new)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > _f(0) else _f(0)


@njit(inline="always", **_OPTS)
def _row_weights(x, qw, b, lo, n, sigma2, w):
    """``w[i] = qw · sqrt(σ² + x²)`` for the ``n`` weights at ``x[b, lo:]``."""
    for i in range(n):
        v = x[b, lo + i]
        w[i] = qw[b, lo + i] * np.sqrt(sigma2 + v * v)


@njit(inline="always", **_OPTS)
def _sub_weights(x, qw, b, lo, n, sigma2, w):
    """``_row_weights`` for a sub-block, returning their sum (C's ``sw[j]``, summed from 0)."""
    _row_weights(x, qw, b, lo, n, sigma2, w)
    s = _f(0)
    for i in range(n):
        s += w[i]
    return s


@njit(inline="always", **_OPTS)
def _sum_sq(x, b, n):
    s = _f(0)
    for i in range(n):
        s += x[b, i] * x[b, i]
    return s


@_weighted("Q4_0")
def q4_0_w(x, qw, s2, out):
    L = np.zeros(32, np.int64)
    w = np.zeros(32, np.float32)
    for b in range(x.shape[0]):
        _row_weights(x, qw, b, 0, 32, s2[b], w)
        _put_f16(out, b, 0, _make_qx_quants_w(x[b], 0, 32, 8, w, 0, L, 0))
        for j in range(16):
            out[b, 2 + j] = (L[j] | (L[j + 16] << 4)) & 0xFF


@_weighted("Q5_0")
def q5_0_w(x, qw, s2, out):
    L = np.zeros(32, np.int64)
    w = np.zeros(32, np.float32)
    for b in range(x.shape[0]):
        _row_weights(x, qw, b, 0, 32, s2[b], w)
        _put_f16(out, b, 0, _make_qx_quants_w(x[b], 0, 32, 16, w, 0, L, 0))
        qh = 0
        for j in range(16):
            qh = _put_q5(out, b, 6, L[j], L[j + 16], j, qh)
        _put_u32(out, b, 2, qh)


@njit(inline="always", **_OPTS)
def _affine_w(x, qw, s2, out, b, nmax, w, L, Laux):
    """Q4_1/Q5_1: ``make_qkx3_quants(32, nmax, …, -0.9, 0.05, 36)``; d and m = −the_min written."""
    _row_weights(x, qw, b, 0, 32, s2[b], w)
    scale, the_min = _make_qkx2_quants(x, b, 0, 32, nmax, w, L, Laux, _f(-0.9), _f(0.05), 36, False)
    _put_f16(out, b, 0, scale)
    _put_f16(out, b, 2, -the_min)


@_weighted("Q4_1")
def q4_1_w(x, qw, s2, out):
    L = np.zeros(32, np.int64)
    Laux = np.zeros(32, np.int64)
    w = np.zeros(32, np.float32)
    for b in range(x.shape[0]):
        _affine_w(x, qw, s2, out, b, 15, w, L, Laux)
        for j in range(16):
            out[b, 4 + j] = (L[j] | (L[j + 16] << 4)) & 0xFF


@_weighted("Q5_1")
def q5_1_w(x, qw, s2, out):
    L = np.zeros(32, np.int64)
    Laux = np.zeros(32, np.int64)
    w = np.zeros(32, np.float32)
    for b in range(x.shape[0]):
        _affine_w(x, qw, s2, out, b, 31, w, L, Laux)
        qh = 0
        for j in range(16):
            qh = _put_q5(out, b, 8, L[j], L[j + 16], j, qh)
        _put_u32(out, b, 4, qh)


@_weighted("Q2_K")
def q2_k_w(x, qw, s2, out):
    L = np.zeros(256, np.int64)
    Laux = np.zeros(16, np.int64)
    w = np.zeros(16, np.float32)
    sw = np.zeros(16, np.float32)
    scales = np.zeros(16, np.float32)
    mins = np.zeros(16, np.float32)
    Ls = np.zeros(16, np.int64)
    Lm = np.zeros(16, np.int64)
    sc = np.zeros(16, np.int64)
    for b in range(x.shape[0]):
        sigma2 = _sum_sq(x, b, 256) / _f(256)
        for j in range(16):
            sw[j] = _sub_weights(x, qw, b, 16 * j, 16, sigma2, w)
            scales[j], mins[j] = _make_qkx2_quants(x, b, 16 * j, 16, 3, w, L, Laux, _f(-0.9), _f(0.05), 36, False)
        d = _put_f16(out, b, 80, _make_qp_quants(16, 15, scales, Ls, sw))
        dmin = _put_f16(out, b, 82, _make_qp_quants(16, 15, mins, Lm, sw))
        for j in range(16):
            sc[j] = (Ls[j] | (Lm[j] << 4)) & 0xFF
        _q2_tail(x, out, b, L, sc, d, dmin)


@_weighted("Q3_K")
def q3_k_w(x, qw, s2, out):
    L = np.zeros(256, np.int64)
    w = np.zeros(16, np.float32)
    sw = np.zeros(16, np.float32)
    scales = np.zeros(16, np.float32)
    Ls = np.zeros(16, np.int64)
    ps = np.zeros(12, np.int64)
    hm = np.zeros(32, np.int64)
    for b in range(x.shape[0]):
        sigma2 = _f(2) * _sum_sq(x, b, 256) / _f(256)
        for j in range(16):
            sw[j] = _sub_weights(x, qw, b, 16 * j, 16, sigma2, w)
            scales[j] = _make_qx_quants_w(x[b], 16 * j, 16, 4, w, 0, L, 16 * j)
        d_block = _make_qx_quants_w(scales, 0, 16, 32, sw, 0, Ls, 0)
        ps[:] = 0
        for j in range(16):
            _q3_scale(ps, j, Ls[j])
        _q3_tail(x, out, b, L, ps, _put_f16(out, b, 108, d_block), hm)


@_kernel
def _kx_w(x, qw, out, b, nmax, L, Laux, w, sw, scales, mins, Ls, Lm, q):
    """Q4_K/Q5_K under an importance matrix up to the codes (``quantize_row_q*_K_impl``)."""
    sigma2 = _f(2) * _sum_sq(x, b, 256) / _f(256)
    for j in range(8):
        sw[j] = _sub_weights(x, qw, b, 32 * j, 32, sigma2, w)
        scales[j], mins[j] = _make_qkx2_quants(x, b, 32 * j, 32, nmax, w, L, Laux, _f(-0.9), _f(0.05), 36, False)
    d_block = _make_qp_quants(8, 63, scales, Ls, sw)
    m_block = _make_qp_quants(8, 63, mins, Lm, sw)
    q[:] = 0
    for j in range(8):
        if nmax == 31:      # Q5_K clamps its 6-bit codes, Q4_K stores them as they are
            _k4_scale(q, j, min(63, Ls[j]), min(63, Lm[j]))
        else:
            _k4_scale(q, j, Ls[j], Lm[j])
    _kx_tail(x, out, b, nmax, L, q, d_block, m_block)


@_weighted("Q4_K")
def q4_k_w(x, qw, s2, out):
    L, Laux, w, sw = np.zeros(256, np.int64), np.zeros(32, np.int64), np.zeros(32, np.float32), np.zeros(8, np.float32)
    scales, mins = np.zeros(8, np.float32), np.zeros(8, np.float32)
    Ls, Lm, q = np.zeros(8, np.int64), np.zeros(8, np.int64), np.zeros(12, np.int64)
    for b in range(x.shape[0]):
        _kx_w(x, qw, out, b, 15, L, Laux, w, sw, scales, mins, Ls, Lm, q)
        _q4_k_codes(out, b, L)


@_weighted("Q5_K")
def q5_k_w(x, qw, s2, out):
    L, Laux, w, sw = np.zeros(256, np.int64), np.zeros(32, np.int64), np.zeros(32, np.float32), np.zeros(8, np.float32)
    scales, mins = np.zeros(8, np.float32), np.zeros(8, np.float32)
    Ls, Lm, q, qh = np.zeros(8, np.int64), np.zeros(8, np.int64), np.zeros(12, np.int64), np.zeros(32, np.int64)
    for b in range(x.shape[0]):
        _kx_w(x, qw, out, b, 31, L, Laux, w, sw, scales, mins, Ls, Lm, q)
        _q5_k_codes(out, b, L, qh)


@_weighted("Q6_K")
def q6_k_w(x, qw, s2, out):
    L = np.zeros(256, np.int64)
    scales = np.zeros(16, np.float32)
    for b in range(x.shape[0]):
        max_scale = _f(0)
        max_abs = _f(0)
        for j in range(16):
            scales[j] = _make_qx_quants_w(x[b], 16 * j, 16, 32, qw[b], 16 * j, L, 16 * j)
            a = abs(scales[j])
            if a > max_abs:
                max_abs = a
                max_scale = scales[j]
        _q6_tail(x, out, b, L, scales, max_scale, max_abs)


@_kernel
def _iq4_scale_w(x, b, lo, w):
    """``quantize_row_iq4_nl_impl``'s scale search (``ntry = 7``, what ``quantize_iq4_nl`` /
    ``quantize_iq4_xs`` pass) for the 32 weights at ``x[b, lo:]`` with element weights
    ``w[:32]``; 0 for an all-zero block."""
    mx, amax = _absmax(x, b, lo, lo + 32)
    if amax < _EPS:
        return _f(0)
    v0 = _f(_KV_IQ4[0])
    d = -mx / v0
    idv = _f(1) / d
    sumqx = _f(0)
    sumq2 = _f(0)
    for j in range(32):
        v = x[b, lo + j]
        q = _f(_KV_IQ4[_best_index_int8(_KV_IQ4, idv * v)])
        sumqx += w[j] * q * v
        sumq2 += w[j] * q * q
    d = sumqx / sumq2 if sumq2 > _f(0) else _f(0)
    best = d * sumqx
    for itry in range(-7, 8):
        idv = _f(itry + _KV_IQ4[0]) / mx
        sumqx = _f(0)
        sumq2 = _f(0)
        for j in range(32):
            v = x[b, lo + j]
            q = _f(_KV_IQ4[_best_index_int8(_KV_IQ4, idv * v)])
            sumqx += w[j] * q * v
            sumq2 += w[j] * q * q
        if sumq2 > _f(0) and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@_weighted("IQ4_NL")
def iq4_nl_w(x, qw, s2, out):
    w = np.zeros(32, np.float32)
    for b in range(x.shape[0]):
        _row_weights(x, qw, b, 0, 32, _sum_sq(x, b, 32) * _f(2.0 / 32), w)
        d = _iq4_scale_w(x, b, 0, w)
        _put_f16(out, b, 0, d)
        _iq4_codes(x, b, 0, _f(1) / d if d != 0 else _f(0), out, 2)


@_weighted("IQ4_XS")
def iq4_xs_w(x, qw, s2, out):
    w = np.zeros(32, np.float32)
    scales = np.zeros(8, np.float32)
    for b in range(x.shape[0]):
        sigma2 = _sum_sq(x, b, 256) * _f(2.0 / 256)
        for ib in range(8):
            _row_weights(x, qw, b, 32 * ib, 32, sigma2, w)
            scales[ib] = _iq4_scale_w(x, b, 32 * ib, w)
        _iq4_xs_tail(x, out, b, scales)


_MIN_CHUNK = 1 << 16  # weights per thread task: below this, threads cost more than they save
_POOL: dict[int, ThreadPoolExecutor] = {}


def quantize_blocks(blocks: np.ndarray, name: str, type_size: int, threads: int | None = None) -> np.ndarray:
    """Quantize ``float32[B, block]`` (C-contiguous) to ``uint8[B, type_size]`` with ``name``'s
    kernel, in chunks of blocks over ``threads`` threads (default: every core)."""
    return _run_chunks(KERNELS[name], blocks, np.empty((len(blocks), type_size), np.uint8), blocks.shape[1], threads)


def quantize_weighted(blocks: np.ndarray, qw: np.ndarray, s2: np.ndarray, name: str, type_size: int,
                      threads: int | None = None) -> np.ndarray:
    """``name``'s quantizer under an importance matrix (``WEIGHTED``) on ``float32[B, block]``
    blocks, their columns' importances ``qw`` (B, block) and their rows' Σx²/n ``s2`` (B,)."""
    return _run_chunks(WEIGHTED[name], (blocks, qw, s2), np.empty((len(blocks), type_size), np.uint8),
                       blocks.shape[1], threads)


def _run_chunks(fn, src, out: np.ndarray, block_size: int, threads: int | None) -> np.ndarray:
    """``fn(*src, out)`` over chunks of blocks (at least ``_MIN_CHUNK`` weights each) spread
    over ``threads`` threads (default: every core); ``src`` an array of blocks or a tuple of
    arrays cut along their first axis together. The kernels release the GIL."""
    srcs = src if isinstance(src, tuple) else (src,)
    threads = max(1, int(threads or os.cpu_count() or 1))
    n = len(srcs[0])
    step = max(-(-_MIN_CHUNK // block_size), -(-n // (4 * threads)))
    if threads == 1 or n <= step:
        fn(*srcs, out)
        return out
    pool = _POOL.get(threads) or _POOL.setdefault(threads, ThreadPoolExecutor(threads, "refquant-quantize"))
    for f in [pool.submit(fn, *(a[i:i + step] for a in srcs), out[i:i + step]) for i in range(0, n, step)]:
        f.result()
    return out


# ----------------------------------------------------------------------------- dequantizers
# Each equals the NumPy reference's ``_dq*`` bit for bit (tests): the legacy types compute
# ``q·d (+ m)`` in float64 and round once to float32, as NumPy's int32 × float32 promotion
# does there; the K-quants multiply in float32, as their references do.

@njit(inline="always", **_OPTS)
def _f16_at(b, k, at):
    return _F16_TO_F32[np.int64(b[k, at]) | (np.int64(b[k, at + 1]) << 8)]


@_dequantizer("Q8_0")
def dq8_0(b, out):
    for k in range(b.shape[0]):
        d = np.float64(_f16_at(b, k, 0))
        for j in range(32):
            out[k, j] = np.float32(np.float64(_i8(np.int64(b[k, 2 + j]))) * d)


@njit(inline="always", **_OPTS)
def _legacy(b, out, k, at, qh_at, offset, has_m):
    """Q4_0/Q4_1/Q5_0/Q5_1: nibbles at ``at`` (element j low, j + 16 high), 5th bits in the
    u32 at ``qh_at`` (or none: -1), codes minus ``offset``, plus ``m`` when ``has_m``."""
    d = np.float64(_f16_at(b, k, 0))
    m = np.float64(_f16_at(b, k, 2)) if has_m else 0.0
    qh = 0
    if qh_at >= 0:
        qh = (np.int64(b[k, qh_at]) | (np.int64(b[k, qh_at + 1]) << 8) | (np.int64(b[k, qh_at + 2]) << 16)
              | (np.int64(b[k, qh_at + 3]) << 24))
    for j in range(16):
        v = np.int64(b[k, at + j])
        lo = (v & 0xF) | (((qh >> j) & 1) << 4)
        hi = (v >> 4) | (((qh >> (j + 16)) & 1) << 4)
        if has_m:
            out[k, j] = np.float32(np.float64(lo) * d + m)
            out[k, j + 16] = np.float32(np.float64(hi) * d + m)
        else:
            out[k, j] = np.float32(np.float64(lo - offset) * d)
            out[k, j + 16] = np.float32(np.float64(hi - offset) * d)


@_dequantizer("Q4_0")
def dq4_0(b, out):
    for k in range(b.shape[0]):
        _legacy(b, out, k, 2, -1, 8, False)


@_dequantizer("Q4_1")
def dq4_1(b, out):
    for k in range(b.shape[0]):
        _legacy(b, out, k, 4, -1, 0, True)


@_dequantizer("Q5_0")
def dq5_0(b, out):
    for k in range(b.shape[0]):
        _legacy(b, out, k, 6, 2, 16, False)


@_dequantizer("Q5_1")
def dq5_1(b, out):
    for k in range(b.shape[0]):
        _legacy(b, out, k, 8, 4, 0, True)


@njit(inline="always", **_OPTS)
def _dq_kx(b, out, k, nmax_bits):
    """Q4_K (``nmax_bits`` 4) / Q5_K (5): ``d·sc·q - dmin·mn`` per 32, in float32."""
    d = _f16_at(b, k, 0)
    dmin = _f16_at(b, k, 2)
    for j in range(8):
        if j < 4:
            sc = np.int64(b[k, 4 + j]) & 63
            mn = np.int64(b[k, 8 + j]) & 63
        else:
            sc = (np.int64(b[k, 8 + j]) & 0xF) | ((np.int64(b[k, j]) >> 6) << 4)
            mn = (np.int64(b[k, 8 + j]) >> 4) | ((np.int64(b[k, 4 + j]) >> 6) << 4)
        dl = d * _f(sc)
        ml = dmin * _f(mn)
        base = 48 if nmax_bits == 5 else 16
        for i in range(32):
            v = np.int64(b[k, base + (j // 2) * 32 + i])
            q = (v >> 4) if j % 2 else (v & 0xF)
            if nmax_bits == 5:
                q |= ((np.int64(b[k, 16 + i]) >> j) & 1) << 4
            out[k, 32 * j + i] = dl * _f(q) - ml


@_dequantizer("Q4_K")
def dq4_k(b, out):
    for k in range(b.shape[0]):
        _dq_kx(b, out, k, 4)


@_dequantizer("Q5_K")
def dq5_k(b, out):
    for k in range(b.shape[0]):
        _dq_kx(b, out, k, 5)


@_dequantizer("Q6_K")
def dq6_k(b, out):
    for k in range(b.shape[0]):
        d = _f16_at(b, k, 208)
        for h in range(2):
            for l in range(32):
                qh = np.int64(b[k, 128 + 32 * h + l])
                for part in range(4):
                    ql = np.int64(b[k, 64 * h + 32 * (part % 2) + l])
                    lo = (ql >> 4) if part >= 2 else (ql & 0xF)
                    q = (lo | (((qh >> (2 * part)) & 3) << 4)) - 32
                    idx = 128 * h + 32 * part + l
                    sc = _f(_i8(np.int64(b[k, 192 + idx // 16])))
                    out[k, idx] = (d * sc) * _f(q)


def dequantize_blocks(blocks: np.ndarray, name: str, block_size: int, threads: int | None = None) -> np.ndarray:
    """Decode ``uint8[B, type_size]`` to ``float32[B, block_size]`` with ``name``'s kernel, in
    chunks over threads as ``quantize_blocks``."""
    return _run_chunks(DEQUANTIZERS[name], np.ascontiguousarray(blocks), np.empty((len(blocks), block_size), np.float32),
                       block_size, threads)


# ----------------------------------------------------------------------------- KV cache rows

@njit(inline="always", **_OPTS)
def _bf16(v):
    """``GGML_FP32_TO_BF16``: the top half of a float32, rounded to nearest even; NaN quieted."""
    u = np.int64(np.float32(v).view(np.uint32))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 64
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF


def row_putter(name: str, type_size: int):
    """``put(src, off, dst, n)``: ``src[off:off+n]`` (float32) written into the storage row
    ``dst`` as ggml type ``name`` (blocks of ``type_size`` bytes) stores it (uint16 for
    F16/BF16, block bytes otherwise): what ``quantize`` writes, inlined into a KV cache's
    ``store``."""
    if name in ("F16", "BF16"):
        conv = _fp16 if name == "F16" else _bf16

        @njit(inline="always", **_OPTS)
        def put(src, off, dst, n):
            for i in range(n):
                dst[i] = conv(src[off + i])
        return put
    kernel, size = KERNELS[name], type_size

    @njit(inline="always", **_OPTS)
    def put(src, off, dst, n):
        kernel(src[off:off + n].reshape(n // 32, 32), dst.reshape(n // 32, size))
    return put
