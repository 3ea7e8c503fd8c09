"""llama.cpp's K-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (super-blocks of 256 with quantized
sub-block scales) and Q8_K, the activation format of their dot products: ``quantize_row_q*_K_ref``
with its scale searches ``make_qkx2_quants``, ``make_qx_quants`` and ``make_q3_quants``; with an
importance matrix, ``quantize_row_q*_K_impl`` (``_weighted``), as ``ggml_quantize_chunk`` calls
them (llama.cpp 0c1e570 / ggml 0.25.3)."""
from __future__ import annotations

import numpy as np

from refquant.gguf.quants.core import (
    F32, GROUP_MAX_EPS, ByteDotLayout, f16_bytes, f16_field, f16_value, first_absmax, join_nibbles, nearest_int,
    pack2, positive_max, register_format, register_scheme, seqsum, unpack2,
)
from refquant.gguf.quants.searches import _make_q3_quants, _make_qkx2_quants, _make_qp_quants, _make_qx_quants


# ----------------------------------------------------------------------------- K-quants

def _requant(x, d, dm, nmax, L):
    """Second pass of the K-quants: ``L = clamp(nearest_int((x + dm) / d))`` where ``d != 0``."""
    with np.errstate(all="ignore"):
        new = np.clip(nearest_int((x + dm[..., None]) / d[..., None]), 0, nmax)
    return np.where((d != 0)[..., None], new, L)


def _q2_k(x):
    B = x.shape[0]
    xs = x.reshape(B * 16, 16)
    scales, mins, L = _make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(B, 16), mins.reshape(B, 16), L.reshape(B, 16, 16)
    max_scale, max_min = positive_max(scales), positive_max(mins)
    with np.errstate(all="ignore"):
        ls = nearest_int((F32(15) / max_scale)[:, None] * scales) & 0xFF
        lm = nearest_int((F32(15) / max_min)[:, None] * mins)
    sc = np.where((max_scale > 0)[:, None], ls, 0)
    sc = (sc | np.where((max_min > 0)[:, None], lm << 4, 0)) & 0xFF
    d = np.where(max_scale > 0, max_scale / F32(15), F32(0))
    dmin = np.where(max_min > 0, max_min / F32(15), F32(0))
    d_b, dmin_b = f16_bytes(d), f16_bytes(dmin)
    dl = f16_value(d_b)[:, None] * (sc & 0xF).astype(F32)
    ml = f16_value(dmin_b)[:, None] * (sc >> 4).astype(F32)
    L = _requant(x.reshape(B, 16, 16), dl, ml, 3, L)
    return np.concatenate([sc.astype(np.uint8), pack2(L.reshape(B, 256)), d_b, dmin_b], axis=1)


def _importance(x, qw, n, factor):
    """The K and IQ4 types' element weights under an importance matrix, per sub-block of
    ``n``: ``qw · sqrt(σ² + x²)`` with σ² = ``factor`` · Σx² / 256 over the super-block,
    and their sums (``sw``). Returns ``(x, weights, sw)`` with x and the weights as
    ``[B · 256/n, n]``."""
    B = x.shape[0]
    sigma2 = F32(factor) * seqsum(x * x) / F32(256)
    xs = x.reshape(-1, n)
    w = qw.reshape(-1, n) * np.sqrt(np.repeat(sigma2, 256 // n)[:, None] + xs * xs)
    return xs, w, seqsum(w).reshape(B, -1)


def _q2_k_weighted(x, qw, _sigma2_row):
    """``quantize_row_q2_K_impl``: per 16, ``make_qkx3_quants(16, 3, …, -0.9, 0.05, 36)`` on
    weights ``qw · sqrt(Σx²/256 + x²)``; the 16 scales and the 16 mins each by
    ``make_qp_quants(16, 15, …, sw)``; then the ref's second pass."""
    B = x.shape[0]
    xs, w, sw = _importance(x, qw, 16, 1)
    scales, mins, L = _make_qkx2_quants(xs, w, 3, -0.9, 0.05, 36, False)
    dm, Ls = _make_qp_quants(scales.reshape(B, 16), 15, sw)
    mm, Lm = _make_qp_quants(mins.reshape(B, 16), 15, sw)
    sc = (Ls | (Lm << 4)) & 0xFF
    d_b, dmin_b = f16_bytes(dm), f16_bytes(mm)
    dl = f16_value(d_b)[:, None] * (sc & 0xF).astype(F32)
    ml = f16_value(dmin_b)[:, None] * (sc >> 4).astype(F32)
    L = _requant(x.reshape(B, 16, 16), dl, ml, 3, L.reshape(B, 16, 16))
    return np.concatenate([sc.astype(np.uint8), pack2(L.reshape(B, 256)), d_b, dmin_b], axis=1)


def _dq2_k(b):
    sc = b[:, :16]
    d, dmin = f16_value(b[:, 80:82]), f16_value(b[:, 82:84])
    dl = d[:, None] * (sc & 0xF).astype(F32)
    ml = dmin[:, None] * (sc >> 4).astype(F32)
    q = unpack2(b[:, 16:80]).reshape(-1, 16, 16).astype(F32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(-1, 256)


def _q3_k(x):
    B = x.shape[0]
    scales, L = _make_q3_quants(x.reshape(B * 16, 16), 4)
    scales, L = scales.reshape(B, 16), L.reshape(B, 16, 16)
    max_scale = first_absmax(scales)
    with np.errstate(all="ignore"):
        iscale = F32(-32) / max_scale
        l = np.clip(nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31).astype(np.int32) + 32
    nz = max_scale != 0
    with np.errstate(all="ignore"):
        d = np.where(nz, F32(1) / iscale, F32(0))
    return _q3_k_finish(x, L, np.where(nz[:, None], l, 0), d)


def _q3_k_weighted(x, qw, _sigma2_row):
    """``quantize_row_q3_K_impl``: per 16, ``make_qx_quants(16, 4, …, qw · sqrt(2Σx²/256 +
    x²))``; the 16 scales by ``make_qx_quants(16, 32, …, sw)``; then the ref's second pass."""
    B = x.shape[0]
    xs, w, sw = _importance(x, qw, 16, 2)
    scales, L = _make_qx_quants(xs, 4, w)
    d, l = _make_qx_quants(scales.reshape(B, 16), 32, sw)
    return _q3_k_finish(x, L.reshape(B, 16, 16), l, d)


def _q3_k_finish(x, L, l, d):
    """Q3_K's second pass and bytes: codes ``L`` (B, 16, 16, offset by 4) requantized on the
    stored scales ``d · (l − 32)`` (``l``: 6-bit, 0..63) where they are not 0."""
    B = x.shape[0]
    packed = np.zeros((B, 12), np.uint8)
    packed[:, :8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    hi = (l >> 4).reshape(B, 4, 4)  # [j // 4, j % 4]
    packed[:, 8:] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    d_b = f16_bytes(d)
    dl = f16_value(d_b)[:, None] * (l - 32).astype(F32)
    with np.errstate(all="ignore"):
        new = np.clip(nearest_int(x.reshape(B, 16, 16) / dl[:, :, None]), -4, 3) + 4
    L = np.where((dl != 0)[:, :, None], new, L).reshape(B, 256)
    high = L > 3
    hmask = np.packbits(high.reshape(B, 8, 32).transpose(0, 2, 1), axis=2, bitorder="little")[:, :, 0]
    L = np.where(high, L - 4, L)
    return np.concatenate([hmask, pack2(L), packed, d_b], axis=1)


def _q3_k_scales(packed):
    """The 16 six-bit scales of a Q3_K block, as signed ints (stored value - 32)."""
    lo = np.concatenate([packed[:, :8] & 0xF, packed[:, :8] >> 4], axis=1).astype(np.int32)
    hi = (packed[:, 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3  # [j % 4, j // 4]
    hi = hi.transpose(0, 2, 1).reshape(-1, 16).astype(np.int32)
    return (lo | (hi << 4)) - 32


def _dq3_k(b):
    B = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = f16_value(b[:, 108:110])
    dl = d[:, None] * _q3_k_scales(packed).astype(F32)
    high = np.unpackbits(hmask, axis=1, bitorder="little").reshape(B, 32, 8).transpose(0, 2, 1).reshape(B, 256)
    q = unpack2(qs).astype(np.int32) - np.where(high, 0, 4)
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


def _kx_fit(x, nmax, rmin, nstep, qw=None):
    """Q4_K / Q5_K first pass (``nmax`` 15 / 31). The ref: per 32 weights, weights
    ``sqrt(mean x²) + |x|``, ``make_qkx2_quants(rmin, 0.1, nstep)``, 6-bit scales and mins
    against their largest. With importance weights ``qw`` (``quantize_row_q*_K_impl``):
    weights ``qw · sqrt(2Σx²/256 + x²)``, ``make_qkx3_quants(-0.9, 0.05, 36)``, the scales
    and the mins each by ``make_qp_quants(8, 63, …, sw)`` (Q5_K clamps their codes to 63,
    Q4_K stores them as they are). Returns (d, dmin, scales: 16 bytes) and the codes."""
    B = x.shape[0]
    if qw is None:
        xs = x.reshape(B * 8, 32)
        av_x = np.sqrt(seqsum(xs * xs) / F32(32))
        scales, mins, L = _make_qkx2_quants(xs, av_x[:, None] + np.abs(xs), nmax, rmin, 0.1, nstep, False)
        scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
        max_scale, max_min = positive_max(scales), positive_max(mins)
        with np.errstate(all="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF)
        lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF)
        d, dmin = max_scale / F32(63), max_min / F32(63)
    else:
        xs, w, sw = _importance(x, qw, 32, 2)
        scales, mins, L = _make_qkx2_quants(xs, w, nmax, -0.9, 0.05, 36, False)
        d, ls = _make_qp_quants(scales.reshape(B, 8), 63, sw)
        dmin, lm = _make_qp_quants(mins.reshape(B, 8), 63, sw)
        if nmax == 31:
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
    head = np.concatenate([f16_bytes(d), f16_bytes(dmin), _pack_k4_scales(ls.astype(np.uint8), lm.astype(np.uint8))],
                          axis=1)
    sc, mn = _unpack_k4_scales(head[:, 4:16])      # get_scale_min_k4, as the second pass reads them
    dl = f16_value(head[:, 0:2])[:, None] * sc
    dm = f16_value(head[:, 2:4])[:, None] * mn
    return head, _requant(x.reshape(B, 8, 32), dl, dm, nmax, L.reshape(B, 8, 32)).reshape(B, 256)


def _dq_kx(b, q):
    d, dmin = f16_value(b[:, 0:2]), f16_value(b[:, 2:4])
    sc, mn = _unpack_k4_scales(b[:, 4:16])
    dl, ml = d[:, None] * sc, dmin[:, None] * mn
    return (dl[:, :, None] * q.reshape(-1, 8, 32).astype(F32) - ml[:, :, None]).reshape(-1, 256)


def _q4_k(x, qw=None):
    head, L = _kx_fit(x, 15, -1.0, 20, qw)
    L = L.reshape(-1, 4, 2, 32)
    return np.concatenate([head, join_nibbles(L[:, :, 0], L[:, :, 1]).reshape(-1, 128)], axis=1)


def _k4_nibbles(qs):
    """128 bytes → 256 values: per 64 weights, 32 low nibbles then 32 high nibbles."""
    q = qs.reshape(-1, 4, 32)
    return np.stack([q & 0xF, q >> 4], axis=2).reshape(-1, 256)


def _dq4_k(b):
    return _dq_kx(b, _k4_nibbles(b[:, 16:144]))


def _q5_k(x, qw=None):
    head, L = _kx_fit(x, 31, -0.5, 15, qw)
    B = x.shape[0]
    L4 = L.reshape(B, 4, 2, 32)
    qh = ((L4 >> 4) & 1).transpose(0, 3, 1, 2).reshape(B, 32, 8)  # bit 2*n + half of byte j
    qh = np.packbits(qh.astype(np.uint8), axis=2, bitorder="little")[:, :, 0]
    qs = join_nibbles(L4[:, :, 0] & 0xF, L4[:, :, 1] & 0xF).reshape(B, 128)
    return np.concatenate([head, qh, qs], axis=1)


def _dq5_k(b):
    B = b.shape[0]
    high = np.unpackbits(b[:, 16:48], axis=1, bitorder="little").reshape(B, 32, 8).transpose(0, 2, 1)
    return _dq_kx(b, _k4_nibbles(b[:, 48:176]) | (high.reshape(B, 256).astype(np.uint8) << 4))


def _q6_k(x, qw=None):
    """``quantize_row_q6_K_ref``; with importance weights ``qw`` (``quantize_row_q6_K_impl``)
    its ``make_qx_quants(16, 32, …)`` weighs by ``qw`` itself, nothing else changes."""
    B = x.shape[0]
    scales, L = _make_qx_quants(x.reshape(B * 16, 16), 32, None if qw is None else qw.reshape(B * 16, 16))
    scales, L = scales.reshape(B, 16), L.reshape(B, 16, 16)
    max_scale = first_absmax(scales)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = F32(-128) / max_scale
        d = F32(1) / iscale
        sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
    d_b = f16_bytes(d)
    dl = f16_value(d_b)[:, None] * sc.astype(F32)
    with np.errstate(all="ignore"):
        new = np.clip(nearest_int(x.reshape(B, 16, 16) / dl[:, :, None]), -32, 31) + 32
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
    d = f16_value(b[:, 208:210])
    low = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = (low | (high << 4)).astype(np.int32).reshape(B, 16, 16) - 32
    return ((d[:, None] * sc)[:, :, None] * q.astype(F32)).reshape(B, 256)


def _q8_k(x):
    mx = first_absmax(x)
    with np.errstate(all="ignore"):
        iscale = F32(-127) / mx
        q = np.minimum(127, nearest_int(iscale[:, None] * x)).astype(np.int8)
        d = F32(1) / iscale
    nz = mx != 0
    q = np.where(nz[:, None], q, 0).astype(np.int8)
    d = np.where(nz, d, F32(0)).astype("<f4")
    bsums = q.reshape(-1, 16, 16).astype(np.int32).sum(axis=2).astype("<i2")
    return np.concatenate([d.view(np.uint8).reshape(-1, 4), q.view(np.uint8), bsums.view(np.uint8)], axis=1)


def _dq8_k(b):
    d = np.ascontiguousarray(b[:, :4]).view("<f4")[:, 0]
    return d[:, None] * b[:, 4:260].view(np.int8).astype(F32)


def _fields_k45(b):   # Q4_K / Q5_K: codes 0..15 / 0..31, d and dmin per 256, 6-bit sc and mn per 32
    if b.shape[1] == 144:
        q = _k4_nibbles(b[:, 16:144])
    else:
        high = np.unpackbits(b[:, 16:48], axis=1, bitorder="little").reshape(-1, 32, 8).transpose(0, 2, 1)
        q = _k4_nibbles(b[:, 48:176]) | (high.reshape(-1, 256).astype(np.uint8) << 4)
    sc, mn = _unpack_k4_scales(b[:, 4:16])
    return {"codes": q.astype(np.uint8), "d": f16_field(b, 0), "dmin": f16_field(b, 2),
            "sc": sc.astype(np.uint8), "mn": mn.astype(np.uint8)}


def _fields_q6_k(b):   # codes q + 32 (0..63), d per 256, int8 sc per 16
    ql = b[:, :128].reshape(-1, 2, 2, 32)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    low = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    return {"codes": (low | (high << 4)).astype(np.uint8).reshape(len(b), 256), "d": f16_field(b, 208),
            "sc": np.ascontiguousarray(b[:, 192:208]).view(np.int8)}


register_format("Q2_K", _q2_k, _dq2_k, levels=4, code_fields=[(16, 80, "crumb0")], scale_factor=60,
                weighted=_q2_k_weighted)
register_format("Q3_K", _q3_k, _dq3_k,
                levels=8, code_fields=[(0, 32, "bit2"), (32, 96, "crumb0")], scale_factor=128,
                weighted=_q3_k_weighted)
register_format("Q4_K", _q4_k, _dq4_k,
                levels=16, code_fields=[(16, 144, "nibble")], scale_factor=1008, fields=_fields_k45,
                weighted=lambda x, qw, _: _q4_k(x, qw),
                byte_dot=ByteDotLayout("u4", "min", dshift=3, m="dmin", negate_m=True, mshift=3))
register_format("Q5_K", _q5_k, _dq5_k,
                levels=32, code_fields=[(16, 48, "bit4"), (48, 176, "nibble")], scale_factor=2016, fields=_fields_k45,
                weighted=lambda x, qw, _: _q5_k(x, qw),
                byte_dot=ByteDotLayout("u5", "min", dshift=3, m="dmin", negate_m=True, mshift=3))
register_format("Q6_K", _q6_k, _dq6_k,
                levels=64, code_fields=[(0, 128, "nibble"), (128, 192, "crumb4")], scale_factor=4096,
                fields=_fields_q6_k, weighted=lambda x, qw, _: _q6_k(x, qw),
                byte_dot=ByteDotLayout("u6", "const", c=32, dshift=3, sub16=True))
register_format("Q8_K", _q8_k, _dq8_k)


# the registered schemes (refquant.schemes) of these types
register_scheme("Q2_K", "2-bit, 4-bit scales/mins per 16, fp16 super-scales per 256")
register_scheme("Q3_K", "3-bit, 6-bit scales per 16, fp16 super-scale per 256")
register_scheme("Q4_K", "4-bit, 6-bit scales/mins per 32, fp16 super-scales per 256")
register_scheme("Q5_K", "5-bit, 6-bit scales/mins per 32, fp16 super-scales per 256")
register_scheme("Q6_K", "6-bit, int8 scales per 16, fp16 super-scale per 256")
