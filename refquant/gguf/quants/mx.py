"""MXFP4 as ggml stores it: an E8M0 exponent and 32 FP4 (E2M1) nibbles per block."""
from __future__ import annotations

import numpy as np

from refquant.gguf.quants.core import (
    F32, KVALUES_FP4, join_nibbles, register_format, split_nibbles,
)


def _mxfp4(x):
    amax = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        # log2f correctly rounded to float32, then floorf; the (uint8_t) cast wraps like C on x86
        lg = np.floor(np.log2(amax.astype(np.float64)).astype(F32))
    e = np.where(amax > 0, np.nan_to_num(lg, neginf=0) - 2 + 127, 0).astype(np.int64) & 0xFF
    d = _e8m0_half(e.astype(np.uint8))
    errs = np.abs(KVALUES_FP4.astype(F32)[None, None, :] * d[:, None, None] - x[:, :, None])
    q = np.argmin(errs, axis=-1)
    return np.concatenate([e.astype(np.uint8)[:, None], join_nibbles(q[:, :16], q[:, 16:])], axis=1)


def _e8m0_half(e: np.ndarray) -> np.ndarray:
    """``ggml_e8m0_to_fp32_half``: 2^(e-128) as float32 bits (subnormal for e < 2)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32)
    return bits.view(F32)


def _dmxfp4(b):
    d = _e8m0_half(b[:, 0])
    return KVALUES_FP4[split_nibbles(b[:, 1:])].astype(F32) * d[:, None]


register_format("MXFP4", _mxfp4, _dmxfp4, levels=16, code_fields=[(1, 17, "nibble")], scale_factor=0)
