"""AWQ (Lin et al. 2023, "Activation-aware Weight Quantization"), after mit-han-lab/llm-awq.

Salient weights are the input channels with large activations. AWQ protects them by
scaling those columns up before quantization and the activations down by the same factor
(exact in real arithmetic), choosing the per-channel factors from the activation
statistics with a one-parameter search::

    s = mean|X_j|^α,  s /= sqrt(max s · min s),  α ∈ {0, 1/n_grid, …, (n_grid-1)/n_grid}
    Ŵ(α) = Q(W diag(s)) diag(s)⁻¹,   α* = argmin ||X Ŵ(α)ᵀ - X Wᵀ||²

then a clipping search per (output row, group): the group's range is shrunk to
``max|w| (1 - i/n_grid)``, ``i < max_shrink · n_grid``, keeping the ratio with the
smallest output error of that group on the calibration tokens (llm-awq's ``auto_clip``).
The grid is asymmetric INT4 with a zero point per group of 128 (llm-awq's default).

With α = 0 (s = 1) and no clipping AWQ is exactly round-to-nearest. ``s`` is kept
explicit (``meta["awq_scales"]``, counted in ``nbytes``); in a model it folds into the
preceding LayerNorm or Linear where there is one, which is the same arithmetic.
"""
from __future__ import annotations

import numpy as np

from refquant import affine, packing
from refquant._checks import float_array
from refquant.calibration import as_stats
from refquant.schemes import register
from refquant.tensor import QuantizedTensor, register_decoder


def _rtn(w, bits, group_size, sym, scale_dtype, max_abs=None):
    """Group-wise RTN of ``w``; optional per-(row, group) clip ``max_abs`` (out, n_groups)."""
    out, n = w.shape
    wg = w.reshape(out, n // group_size, group_size)
    if max_abs is not None:
        wg = np.clip(wg, -max_abs[..., None], max_abs[..., None])
    s, z = affine.block_params(wg, (2,), bits, sym, False, 1.0, scale_dtype)
    q = affine.quantize_codes(wg, s, z, bits, sym=sym)
    return q, s[..., 0], (None if z is None else z[..., 0]), affine.dequantize_codes(q, s, z).reshape(out, n)


def awq_quantize(w: np.ndarray, X: np.ndarray, *, bits: int = 4, group_size: int = 128, sym: bool = False,
                 n_grid: int = 20, clip: bool = True, max_shrink: float = 0.5, max_tokens: int = 512,
                 alpha: float | None = None, scale_dtype=np.float16, scheme: str = "awq_int4_g128"
                 ) -> QuantizedTensor:
    """AWQ-quantize ``w`` (out, in) with calibration inputs ``X`` (tokens, in).

    ``alpha`` fixes α instead of searching it (``alpha=0, clip=False`` is RTN).
    """
    w = float_array(w, "w", ndim=2).astype(np.float64)
    X = float_array(X, "X", ndim=2).astype(np.float64)
    out, n = w.shape
    if X.shape[1] != n:
        raise ValueError(f"X has {X.shape[1]} features but w has in={n}")
    if n % group_size:
        raise ValueError(f"group_size={group_size} must divide in={n}")
    X = X[:: max(1, X.shape[0] // max_tokens)][:max_tokens]
    ref = X @ w.T
    x_mean = np.mean(np.abs(X), axis=0)

    def scales_for(a):
        s = np.maximum(x_mean, 1e-4) ** a
        return s / np.sqrt(s.max() * s.min())

    best = (np.inf, 0.0, np.ones(n))
    for a in ([alpha] if alpha is not None else [i / n_grid for i in range(n_grid)]):
        s = scales_for(a)
        err = np.mean((X @ (_rtn(w * s, bits, group_size, sym, scale_dtype)[3] / s).T - ref) ** 2)
        if err < best[0]:
            best = (err, a, s)
    _, a, s = best
    ws = w * s
    max_abs = None
    if clip:
        Xs = X / s
        G = n // group_size
        org_max = np.abs(ws).reshape(out, G, group_size).max(axis=2)
        max_abs = org_max.copy()
        best_err = np.full((out, G), np.inf)
        for i in range(int(max_shrink * n_grid)):
            m = org_max * (1 - i / n_grid)
            _, _, _, dq = _rtn(ws, bits, group_size, sym, scale_dtype, m)
            for g in range(G):
                sl = slice(g * group_size, (g + 1) * group_size)
                e = np.mean((Xs[:, sl] @ (dq[:, sl] - ws[:, sl]).T) ** 2, axis=0)
                better = e < best_err[:, g]
                best_err[better, g] = e[better]
                max_abs[better, g] = m[better, g]
    q, sc, z, _ = _rtn(ws, bits, group_size, sym, scale_dtype, max_abs)
    meta = dict(kind="awq", bits=bits, sym=sym, full_range=False, granularity="group", axis=None,
                group_size=group_size, padded_shape=(out, n), awq_scales=s.astype(np.float32), alpha=a)
    return QuantizedTensor(packing.pack(q.reshape(out, n), bits, signed=sym), sc,
                           None if z is None else z.astype(np.uint8), (out, n), scheme, meta)


@register_decoder("awq")
def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """``Q(W diag(s)) diag(s)⁻¹``."""
    return (affine.dequantize(qt) / qt.meta["awq_scales"]).astype(np.float32)


# --- schemes (refquant.schemes) ---------------------------------------------------------------

register("awq_int4_g128", description="AWQ INT4 asymmetric g128: activation-aware scales + clip search",
         needs_calib=True, needs_inputs=True)(lambda w, *, calib=None: awq_quantize(w, as_stats(calib).X))
