"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 with a mixed-precision decomposition.

``X Wᵀ = X_o W_oᵀ + X_r W_rᵀ``: the outlier feature dimensions ``o`` (input channels whose
activations reach ``|x| >= threshold``, 6.0 in the paper) stay in FP16 for both factors;
the rest is vector-wise int8: per-row (token) absmax for ``X_r``, per-output-row absmax
for ``W_r``, integer products summed in int32, scaled by the outer product of the two
scale vectors.

The paper finds the outlier dimensions systematic (the same few channels in every
token), so refquant fixes them from calibration inputs (``max |X_j| >= threshold``) and
stores those weight columns as FP16 next to the int8 rest; bitsandbytes finds them per
batch at run time. With no outliers this is plain vector-wise int8; with every dimension
an outlier it is an FP16 matmul.
"""
from __future__ import annotations

import numpy as np

from refquant._checks import float_array
from refquant.calibration import as_stats
from refquant.schemes import Spec, register
from refquant.smoothquant import absmax_int8, exact_int8_products, int8_bound, quantize_tokens
from refquant.tensor import QuantizedTensor, register_decoder


def quantize(w: np.ndarray, act_max: np.ndarray | None = None, *, threshold: float = 6.0,
             scheme: str = "llm_int8") -> QuantizedTensor:
    """int8 rows for regular columns, FP16 columns where ``act_max >= threshold``."""
    w = float_array(w, "w", ndim=2).astype(np.float32)
    out, n = w.shape
    outl = np.zeros(n, bool) if act_max is None else np.asarray(act_max) >= threshold
    reg = w.copy()
    reg[:, outl] = 0
    q, scale = absmax_int8(reg)
    meta = {"kind": "llm_int8", "outliers": np.flatnonzero(outl).astype(np.int32),
            "outlier_weights": w[:, outl].astype(np.float16), "threshold": float(threshold)}
    return QuantizedTensor(q.view(np.uint8), scale[:, 0], None, w.shape, scheme, meta)


@register_decoder("llm_int8")
def dequantize(qt: QuantizedTensor) -> np.ndarray:
    w = qt.codes.view(np.int8).astype(np.float32) * qt.scales[:, None]
    w[:, qt.meta["outliers"]] = qt.meta["outlier_weights"].astype(np.float32)
    return w


def _split(qt: QuantizedTensor, X: np.ndarray):
    """``(X, outlier columns, int8 codes of the regular columns, per-token scales)``."""
    X = np.atleast_2d(np.asarray(X, np.float32))
    o = qt.meta["outliers"]
    reg = X.copy()
    reg[:, o] = 0
    q, sx = quantize_tokens(reg)
    return X, o, q, sx


def act_quant(qt: QuantizedTensor, X: np.ndarray) -> np.ndarray:
    """Regular dimensions int8 per token (absmax over them only), outlier dimensions FP16."""
    X, o, q, sx = _split(qt, X)
    out = q.astype(np.float32) * sx
    out[:, o] = X[:, o].astype(np.float16).astype(np.float32)
    return out


def matmul(qt: QuantizedTensor, X: np.ndarray) -> np.ndarray:
    """``X Ŵᵀ``: int32-exact int8 part + FP16 outlier part (accumulated in float32)."""
    X, o, q, sx = _split(qt, X)
    acc = exact_int8_products(q, qt.codes.view(np.int8))
    y = acc * sx * qt.scales[None, :]
    if o.size:
        y += X[:, o].astype(np.float16).astype(np.float32) @ qt.meta["outlier_weights"].astype(np.float32).T
    return y.astype(np.float32)


# --- schemes (refquant.schemes) ---------------------------------------------------------------

register("llm_int8", spec=Spec(8, "int", "channel", symmetric=True, scale_dtype="fp32", calibration="outliers",
                              activations="int8_outliers"),
         description="LLM.int8(): vector-wise int8 + FP16 outlier dimensions (|x| >= 6)", act_quant=act_quant, matmul=matmul, bound=int8_bound,
         matvec=lambda qt, x: matmul(qt, x[None])[0])(lambda w, *, calib=None: quantize(w, as_stats(calib).max_abs))
