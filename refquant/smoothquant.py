"""SmoothQuant (Xiao et al. 2022) and plain W8A8.

W8A8: weights int8 per output channel, activations int8 per token computed at run time
(``s_x = max|x| / 127``), products summed exactly in int32, one float multiply per output.
It breaks when a few input channels carry outliers: one large channel sets ``s_x`` for the
whole token and the other channels round to a handful of levels.

SmoothQuant migrates the difficulty from activations to weights with per-input-channel
factors ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (α = 0.5 by default)::

    Y = X Wᵀ = (X diag(s)⁻¹) (W diag(s))ᵀ

which is exact in real arithmetic (``migrate`` is checked to float64 round-off). In a
model ``diag(s)⁻¹`` folds into the preceding LayerNorm's weight and bias when there is
one (MiniGPT's ``attn_qkv`` and ``ffn_up``); refquant keeps ``s`` explicit in the
quantized tensor (``meta["smooth"]``, counted in ``nbytes``), which is the same arithmetic.

Both return a ``QuantizedTensor`` of kind ``"w8a8"`` whose ``dequantize()`` is the
effective weight ``Q(W diag(s)) diag(s)⁻¹`` and whose activation rounding is
``act_quant(qt, X) = Q_token(X diag(s)⁻¹) diag(s)``: the layer computes exactly
``act_quant(X) @ dequantize()ᵀ``.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from refquant._checks import float_array
from refquant.calibration import as_stats
from refquant.kernels.table import AFFINE
from refquant.schemes import Spec, register
from refquant.tensor import QuantizedTensor, register_decoder


def smooth_scales(act_max: np.ndarray, w: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``s_j = max|X_j|^α / max|W_j|^(1-α)`` (float64); channels with zero activity get s = 1."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = np.asarray(act_max, np.float64)
    wmax = np.max(np.abs(np.asarray(w, np.float64)), axis=0)
    s = a ** alpha / np.where(wmax > 0, wmax, 1.0) ** (1 - alpha)
    return np.where((a > 0) & (wmax > 0) & np.isfinite(s) & (s > 0), s, 1.0)


def migrate(X: np.ndarray, w: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(X diag(s)⁻¹, W diag(s))``: the product ``X Wᵀ`` is unchanged."""
    return X / s, w * s


def absmax_int8(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row (the last axis): the one rounding of every W8A8-style grid.

    ``s = max|x| / 127`` rounded to float32 (at least 2^-149, the smallest float32 step, so
    a row of subnormals keeps its values; an all-zero row gets s = 0), codes
    ``round(x / s)`` (half to even) in [-127, 127]. Returns ``(int8 codes, float32 s of
    shape (rows, 1))``. Computed in float64, which rounds s exactly as a float32 division would.
    """
    X = np.asarray(X, np.float64)
    amax = np.max(np.abs(X), axis=-1, keepdims=True)
    s = np.where(amax > 0, np.maximum(amax / 127, 2.0**-149), 0).astype(np.float32)
    q = np.clip(np.round(X / np.where(s == 0, 1, s)), -127, 127).astype(np.int8)
    return q, s


def exact_int8_products(q: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``q @ codesᵀ`` of int8 matrices (M, K) and (N, K), exactly, as float64: every product
    is at most 127² in magnitude and every partial sum an integer below ``127²·K < 2^53``
    (K < 5·10^11), so float64 BLAS computes the int32 result bit for bit -- at BLAS speed,
    where NumPy's integer matmul has no BLAS and ran minutes per MiniGPT evaluation."""
    if q.shape[-1] >= 2**53 // 127**2:
        raise ValueError(f"K = {q.shape[-1]} is too long for exact float64 sums")
    return q.astype(np.float64) @ codes.astype(np.float64).T


def quantize_tokens(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (row) symmetric int8 activations: ``absmax_int8`` of float32 ``X``."""
    return absmax_int8(np.asarray(X, np.float32))


def quantize(w: np.ndarray, *, smooth: np.ndarray | None = None, scheme: str = "w8a8") -> QuantizedTensor:
    """int8 per-channel weights of ``W diag(smooth)`` (smooth = 1 for plain W8A8)."""
    w = float_array(w, "w", ndim=2).astype(np.float64)
    s = np.ones(w.shape[1]) if smooth is None else np.asarray(smooth, np.float64)
    q, scale = absmax_int8(w * s)
    meta = {"kind": "w8a8"}
    if smooth is not None:
        meta["smooth"] = s.astype(np.float32)
    return QuantizedTensor(q.view(np.uint8), scale[:, 0], None, w.shape, scheme, meta)


@register_decoder("w8a8")
def dequantize(qt: QuantizedTensor) -> np.ndarray:
    w = qt.codes.view(np.int8).astype(np.float32) * qt.scales[:, None]
    if "smooth" in qt.meta:
        w = w / qt.meta["smooth"]
    return w.astype(np.float32)


def act_quant(qt: QuantizedTensor, X: np.ndarray) -> np.ndarray:
    """The activations as the layer sees them: ``Q_token(X / s) * s``."""
    s = qt.meta.get("smooth")
    Xs = X if s is None else X / s
    q, sx = quantize_tokens(Xs)
    out = q.astype(np.float32) * sx
    return out if s is None else out * s


def matmul(qt: QuantizedTensor, X: np.ndarray) -> np.ndarray:
    """``Y = X Ŵᵀ`` with int8 activations: int32-exact integer products, then the two scales."""
    X = np.atleast_2d(np.asarray(X, np.float32))
    s = qt.meta.get("smooth")
    q, sx = quantize_tokens(X if s is None else X / s)
    acc = exact_int8_products(q, qt.codes.view(np.int8))
    return (acc * sx * qt.scales[None, :]).astype(np.float32)


# --- schemes (refquant.schemes) ---------------------------------------------------------------

def int8_bound(w, qt):
    """Per-element error bound of the W8A8 weight grids: round to nearest on a grid of step
    ``scale_r / s_j`` (``s``: SmoothQuant's smoothing factors, 1 without); LLM.int8()'s FP16
    outlier columns: half an fp16 ulp."""
    s = qt.meta.get("smooth", np.float32(1))
    # + half the smallest float32 step: code * scale rounds to a subnormal for tiny rows
    b = np.abs(qt.scales.astype(np.float64))[:, None] / 2 / s * (1 + 2**-20) + 2**-24 * np.abs(w) + 2.0**-150
    if qt.kind == "llm_int8":
        o = qt.meta["outliers"]
        b = np.broadcast_to(b, w.shape).copy()
        b[:, o] = np.abs(w[:, o]) * 2.0**-11 + 2.0**-25
    return b


def _token_blocks(X: np.ndarray, nb: int):
    """x as W8A8 rounds it (``quantize_tokens``), in the byte-dot kernels' block form."""
    from refquant.kernels.bytedot import blocks_of_rows

    q, s = quantize_tokens(np.asarray(X, np.float32))
    return blocks_of_rows(q, s, nb)


register("w8a8", spec=Spec(8, "int", "channel", symmetric=True, scale_dtype="fp32", activations="int8_token"),
         description="int8 per-channel weights x int8 per-token activations, int32 accumulation",
         act_quant=act_quant, bound=int8_bound, kernel=replace(AFFINE, round_x=_token_blocks))(
    lambda w, *, calib=None: quantize(w))
register("smoothquant_w8a8", spec=Spec(8, "int", "channel", symmetric=True, scale_dtype="fp32",
                                      calibration="smoothquant", activations="int8_token"),
         description="SmoothQuant (alpha 0.5) then W8A8", bound=int8_bound,
         act_quant=act_quant, matmul=matmul, matvec=lambda qt, x: matmul(qt, x[None])[0])(
    lambda w, *, calib=None: quantize(w, smooth=smooth_scales(as_stats(calib).max_abs, w), scheme="smoothquant_w8a8"))
