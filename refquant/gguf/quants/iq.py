"""llama.cpp's non-linear 4-bit formats: IQ4_NL (a 16-value codebook, fp16 scale per 32) and
IQ4_XS (the same codebook, 6-bit scales per 32 under an fp16 super-scale per 256), both by
``quantize_row_iq4_nl_impl`` (``ntry = 7``); with an importance matrix its weights are
``qw · sqrt(σ² + x²)``, σ² = 2Σx² over the super-block (32 or 256) / its size, else x²."""
from __future__ import annotations

import numpy as np

from refquant.gguf.quants.core import (
    F32, GROUP_MAX_EPS, KVALUES_IQ4NL, ByteDotLayout, as_u16, best_index, f16_bytes, f16_field, f16_value,
    first_absmax, inv, join_nibbles, nearest_int, register_format, register_scheme, seqsum, split_nibbles,
)


# ----------------------------------------------------------------------------- IQ4

def _iq4_fit(x, ntry=7, w=None):
    """``quantize_row_iq4_nl_impl`` per 32 weights: best scale.

    Start from ``d = max / 127`` (sign so the largest value hits -127 … 113 well), then try
    ``id = (itry - 127) / max`` for itry in -ntry..ntry, keeping the weighted least-squares
    scale ``Σ w q x / Σ w q²`` (w = x², or the importance weights ``w``) with the largest
    ``(Σ w q x)² / Σ w q²``.
    """
    vals = KVALUES_IQ4NL.astype(F32)
    w = x * x if w is None else w
    mx = first_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS

    def sums(idv):
        q = vals[best_index(KVALUES_IQ4NL, idv[:, None] * x)]
        wq = w * q
        return seqsum(wq * x), seqsum(wq * q)

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
    L = best_index(KVALUES_IQ4NL, inv(scale)[:, None] * x)
    return join_nibbles(L[:, :16], L[:, 16:])


def _iq4_weights(x, qw, size):
    """``qw · sqrt(σ² + x²)``, σ² = Σx² · (2 / size) over each super-block of ``size``."""
    sigma2 = seqsum(x.reshape(-1, size) * x.reshape(-1, size)) * F32(2.0 / size)
    return qw * np.sqrt(np.repeat(sigma2, size // 32)[:, None] + x * x)


def _iq4_nl(x, qw=None):
    d = _iq4_fit(x, w=None if qw is None else _iq4_weights(x, qw, 32))
    return np.concatenate([f16_bytes(d), _iq4_codes(x, d)], axis=1)


def _diq4_nl(b):
    return f16_value(b[:, :2])[:, None] * KVALUES_IQ4NL[split_nibbles(b[:, 2:])].astype(F32)


def _iq4_xs(x, qw=None):
    B = x.shape[0]
    xs = x.reshape(B * 8, 32)
    scales = _iq4_fit(xs, w=None if qw is None else _iq4_weights(xs, qw.reshape(B * 8, 32), 256)).reshape(B, 8)
    max_scale = first_absmax(scales)
    d = -max_scale / F32(32)
    l = np.clip(nearest_int(inv(d)[:, None] * scales), -32, 31)
    dl = d[:, None] * l.astype(F32)
    qs = _iq4_codes(xs, dl.reshape(-1)).reshape(B, 128)
    l = (l + 32).astype(np.uint32)
    scales_l = ((l[:, 0::2] & 0xF) | ((l[:, 1::2] & 0xF) << 4)).astype(np.uint8)
    scales_h = np.bitwise_or.reduce((l >> 4) << (2 * np.arange(8, dtype=np.uint32)), axis=1).astype("<u2")
    return np.concatenate([f16_bytes(d), scales_h.view(np.uint8).reshape(B, 2), scales_l, qs], axis=1)


def _diq4_xs(b):
    B = b.shape[0]
    d = f16_value(b[:, :2])
    sh = as_u16(b[:, 2:4])
    sl = b[:, 4:8]
    lo = np.stack([sl & 0xF, sl >> 4], axis=2).reshape(B, 8).astype(np.int32)
    hi = ((sh[:, None] >> (2 * np.arange(8, dtype=np.uint32))) & 3).astype(np.int32)
    dl = d[:, None] * ((lo | (hi << 4)) - 32).astype(F32)
    q = KVALUES_IQ4NL[split_nibbles(b[:, 8:].reshape(B * 8, 16))].astype(F32).reshape(B, 8, 32)
    return (dl[:, :, None] * q).reshape(B, 256)


def _fields_iq4_nl(b):   # codes: the nibbles (indices into the codebook), d per 32
    return {"codes": split_nibbles(b[:, 2:]).astype(np.uint8), "d": f16_field(b, 0)}


def _fields_iq4_xs(b):   # codes: the nibbles, d per 256, sc = ls - 32 (int8) per 32
    B = b.shape[0]
    sh = as_u16(b[:, 2:4])
    sl = b[:, 4:8]
    lo = np.stack([sl & 0xF, sl >> 4], axis=2).reshape(B, 8).astype(np.int32)
    hi = ((sh[:, None] >> (2 * np.arange(8, dtype=np.uint32))) & 3).astype(np.int32)
    codes = split_nibbles(b[:, 8:].reshape(B * 8, 16)).reshape(B, 256)
    return {"codes": codes.astype(np.uint8), "d": f16_field(b, 0), "sc": ((lo | (hi << 4)) - 32).astype(np.int8)}


_LUT = ByteDotLayout("l4", table=tuple(int(v) for v in KVALUES_IQ4NL))
register_format("IQ4_NL", _iq4_nl, _diq4_nl, levels=16, code_fields=[(2, 18, "nibble")], scale_factor=127,
                fields=_fields_iq4_nl, byte_dot=_LUT, weighted=lambda x, qw, _: _iq4_nl(x, qw))
register_format("IQ4_XS", _iq4_xs, _diq4_xs, levels=16, code_fields=[(8, 136, "nibble")], scale_factor=4064,
                fields=_fields_iq4_xs, byte_dot=ByteDotLayout("l4", dshift=3, table=_LUT.table),
                weighted=lambda x, qw, _: _iq4_xs(x, qw))


# the registered schemes (refquant.schemes) of these types
register_scheme("IQ4_NL", "non-linear 4-bit codebook, fp16 scale per 32")
register_scheme("IQ4_XS", "non-linear 4-bit codebook, 6-bit scales per 32, fp16 super-scale per 256")
