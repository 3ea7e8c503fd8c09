"""Error and size metrics for comparing a tensor with its quantized version.

All error metrics are computed in float64. SQNR (signal-to-quantization-noise ratio)
is ``10 log10(Σ w² / Σ (w - ŵ)²)`` dB; each extra bit of a uniform quantizer buys
about 6.02 dB.
"""
from __future__ import annotations

import numpy as np

from refquant._checks import float_array
from refquant.tensor import QuantizedTensor


def _pair(w, w_hat):
    w = float_array(w, "w", min_ndim=0 if np.ndim(w) == 0 else 1).astype(np.float64)
    w_hat = float_array(w_hat, "w_hat", min_ndim=0 if np.ndim(w_hat) == 0 else 1).astype(np.float64)
    if w.shape != w_hat.shape:
        raise ValueError(f"w and w_hat must have the same shape, got {w.shape} and {w_hat.shape}")
    return w, w_hat


def max_abs_error(w, w_hat) -> float:
    """``max |w - ŵ|``."""
    w, w_hat = _pair(w, w_hat)
    return float(np.max(np.abs(w - w_hat)))


def mse(w, w_hat) -> float:
    """``mean (w - ŵ)²``."""
    w, w_hat = _pair(w, w_hat)
    return float(np.mean((w - w_hat) ** 2))


def sqnr_db(w, w_hat) -> float:
    """``10 log10(Σ w² / Σ (w - ŵ)²)`` in dB; ``inf`` when ŵ == w exactly."""
    w, w_hat = _pair(w, w_hat)
    signal = float(np.sum(w * w))
    noise = float(np.sum((w - w_hat) ** 2))
    if signal == 0:
        raise ValueError("w is all zeros: SQNR is undefined")
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)


def bytes_per_weight(qt: QuantizedTensor) -> float:
    """Stored bytes (codes + scales + zeros + codebooks) per logical weight."""
    return qt.nbytes / qt.numel


def bits_per_weight(qt: QuantizedTensor) -> float:
    """``8 * bytes_per_weight``."""
    return 8.0 * bytes_per_weight(qt)


def summary(w, qt: QuantizedTensor) -> dict:
    """All metrics of ``qt`` against the original ``w`` as a JSON-ready dict."""
    w_hat = qt.dequantize()
    return dict(scheme=qt.scheme, shape=list(qt.shape), nbytes=qt.nbytes, bits_per_weight=bits_per_weight(qt),
                max_abs_error=max_abs_error(w, w_hat), mse=mse(w, w_hat), sqnr_db=sqnr_db(w, w_hat))
