"""vLLM's FP8 KV cache types, ``fp8_e4m3`` and ``fp8_e5m2``, as ``refquant.kernels.kvcache``
cache types.

vLLM (``--kv-cache-dtype fp8_e4m3`` / ``fp8_e5m2``) stores a cache number ``x`` of layer
``l`` as ``fp8(x / k_scale[l])`` and reads it as ``fp8 · k_scale[l]`` (``v_scale`` for
values): ``reshape_and_cache`` converts with ``__nv_cvt_float_to_fp8(float(x) / scale,
__NV_SATFINITE, E4M3 | E5M2)``, an IEEE float32 division, rounding to nearest (ties to
even) and saturating: a finite overflow or an infinity becomes the largest finite value of
its sign (448, 57344), NaN stays NaN. That is ``refquant.formats.encode(x / scale, fmt,
saturate=True)`` with ``fmt`` ``fp8_e4m3fn`` or ``fp8_e5m2``. One byte per number, no block.

The scales are 1.0 unless set (``KVCache.set_scales``), vLLM's default when a checkpoint
carries none; ``calibrated_scales`` computes llm-compressor's: the absolute maximum over a
calibration text divided by the format's largest value, per layer (optionally per
key/value head).
"""
from __future__ import annotations

import numpy as np

from refquant import formats
from refquant.kernels import kvcache

# cache type name -> refquant.formats format
FORMATS = {"fp8_e4m3": "fp8_e4m3fn", "fp8_e5m2": "fp8_e5m2"}


def calibrated_scales(absmax, cache_type: str) -> np.ndarray:
    """llm-compressor's KV scale: ``absmax / max`` of the cache type's format (448 for
    e4m3, 57344 for e5m2), float32, for any shape of ``absmax`` (the absolute maximum of
    the keys or the values a layer, or a layer's head, produced over calibration text); an
    all-zero input gets scale 1."""
    if cache_type not in FORMATS:
        raise ValueError(f"cache_type {cache_type!r} has no scale (scaled types: {', '.join(FORMATS)})")
    fmax = formats.get_format(FORMATS[cache_type]).max
    a = np.asarray(absmax, np.float64)
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError("absmax must be finite and non-negative")
    return np.where(a > 0, a / fmax, 1.0).astype(np.float32)


def _put(fmt: str):
    """The compiled ``put(src, off, dst, n, scale)``: ``encode(src[off:off+n] / scale)`` as
    ``formats.encode`` computes it (the exponent from ``frexp``, the significand scaled
    exactly and rounded half to even), one byte per number. Not inlined: the division must
    stay a division (a caller's fastmath could turn it into a product by the reciprocal)."""
    f = formats.get_format(fmt)
    MAN, EMIN, MAXC, NANC, SIGN = f.man_bits, f.emin, f.max_code, f.nan_code, f.sign_bit

    def build():
        import math

        from numba import njit

        @njit(nogil=True, error_model="numpy")
        def put(src, off, dst, n, scale):
            for i in range(n):
                x = np.float32(src[off + i] / scale)
                sign = 1 if math.copysign(1.0, x) < 0 else 0
                if x != x:
                    code = NANC
                elif math.isinf(x):
                    code = MAXC
                else:
                    a = abs(np.float64(x))
                    if a == 0:
                        code = 0
                    else:
                        e = max(math.frexp(a)[1] - 1, EMIN)
                        code = ((e - EMIN) << MAN) + np.int64(np.rint(math.ldexp(a, MAN - e)))
                        code = min(code, MAXC)
                dst[i] = np.uint8(code | (sign << SIGN))
        return put
    return build


def _cache_type(name: str) -> kvcache.CacheType:
    fmt = FORMATS[name]

    def encode(x):
        return formats.encode(np.asarray(x, np.float32), fmt, saturate=True)

    def decode(s):
        return formats.decode(np.asarray(s, np.uint8), fmt).astype(np.float32)

    table = tuple(float(v) for v in formats.decode(np.arange(256, dtype=np.uint8), fmt))
    return kvcache.CacheType(name, np.dtype(np.uint8), 1, 1, encode, decode, ("fp8", table), _put(fmt), scaled=True)


for _name in FORMATS:
    kvcache.register(_cache_type(_name))
