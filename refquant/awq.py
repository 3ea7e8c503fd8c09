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

from dataclasses import replace

import numpy as np

from refquant import affine, packing
from refquant._checks import float_array
from refquant.calibration import as_stats
from refquant.kernels.table import AFFINE
from refquant.schemes import Spec, register
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


def search_scale(w: np.ndarray, X: np.ndarray, *, bits: int = 4, group_size: int = 128, sym: bool = False,
                 n_grid: int = 20, alpha: float | None = None, scale_dtype=np.float16) -> tuple[np.ndarray, float]:
    """AWQ's input scaling for ``w`` (out, in) on inputs ``X`` (tokens, in), float64:
    ``(s, α)`` minimising ``||X Ŵ(α)ᵀ - X wᵀ||²`` over the grid (module docstring).

    ``w`` may be several Linears that read the same input, stacked by rows (q/k/v after one
    norm): row groups are quantized apart, so the stack's error is the sum of theirs, and
    one ``s`` serves them all, as llm-awq searches it for such a group.
    """
    ref = X @ w.T
    x_mean = np.mean(np.abs(X), axis=0)
    best = (np.inf, 0.0, np.ones(w.shape[1]))
    for a in ([alpha] if alpha is not None else [i / n_grid for i in range(n_grid)]):
        s = np.maximum(x_mean, 1e-4) ** a
        s = s / np.sqrt(s.max() * s.min())
        err = np.mean((X @ (_rtn(w * s, bits, group_size, sym, scale_dtype)[3] / s).T - ref) ** 2)
        if err < best[0]:
            best = (err, a, s)
    return best[2], best[1]


def clip_ranges(w: np.ndarray, X: np.ndarray, *, bits: int = 4, group_size: int = 128, sym: bool = False,
                n_grid: int = 20, max_shrink: float = 0.5, scale_dtype=np.float16) -> np.ndarray:
    """llm-awq's ``auto_clip``: per (row, group) the clip ``max|w| (1 - i/n_grid)``, ``i <
    max_shrink · n_grid``, with the smallest output error of that group on ``X``; (out, groups)."""
    out, n = w.shape
    G = n // group_size
    org_max = np.abs(w).reshape(out, G, group_size).max(axis=2)
    max_abs = org_max.copy()
    best_err = np.full((out, G), np.inf)
    for i in range(int(max_shrink * n_grid)):
        m = org_max * (1 - i / n_grid)
        dq = _rtn(w, bits, group_size, sym, scale_dtype, m)[3]
        for g in range(G):
            sl = slice(g * group_size, (g + 1) * group_size)
            e = np.mean((X[:, sl] @ (dq[:, sl] - w[:, sl]).T) ** 2, axis=0)
            better = e < best_err[:, g]
            best_err[better, g] = e[better]
            max_abs[better, g] = m[better, g]
    return max_abs


def _checked(w, X, group_size: int, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``w`` (out, in) and ``X`` (tokens, in) as float64, checked, X thinned to ``max_tokens`` rows."""
    w = float_array(w, "w", ndim=2).astype(np.float64)
    X = float_array(X, "X", ndim=2).astype(np.float64)
    n = w.shape[1]
    if X.shape[1] != n:
        raise ValueError(f"X has {X.shape[1]} features but w has in={n}")
    if n % group_size:
        raise ValueError(f"group_size={group_size} must divide in={n}")
    return w, X[:: max(1, X.shape[0] // max_tokens)][:max_tokens]


def _clipped(ws, Xs, *, bits, group_size, sym, n_grid, clip, max_shrink, scale_dtype, scheme, **meta
             ) -> QuantizedTensor:
    """The clip search of the (scaled) weight ``ws`` on its inputs ``Xs``, then its group
    codes, as a ``QuantizedTensor`` of ``scheme`` with ``meta`` (its ``kind`` and extras)."""
    out, n = ws.shape
    max_abs = clip_ranges(ws, Xs, bits=bits, group_size=group_size, sym=sym, n_grid=n_grid,
                          max_shrink=max_shrink, scale_dtype=scale_dtype) if clip else None
    q, sc, z, _ = _rtn(ws, bits, group_size, sym, scale_dtype, max_abs)
    meta = dict(bits=bits, sym=sym, full_range=False, granularity="group", axis=None, group_size=group_size,
                padded_shape=(out, n), **meta)
    return QuantizedTensor(packing.pack(q.reshape(out, n), bits, signed=sym), sc,
                           None if z is None else z.astype(np.uint8), (out, n), scheme, meta)


def awq_quantize(w: np.ndarray, X: np.ndarray, *, bits: int = 4, group_size: int = 128, sym: bool = False,
                 n_grid: int = 20, clip: bool = True, max_shrink: float = 0.5, max_tokens: int = 512,
                 alpha: float | None = None, scale_dtype=np.float16, scheme: str = "awq_int4_g128"
                 ) -> QuantizedTensor:
    """AWQ-quantize ``w`` (out, in) with calibration inputs ``X`` (tokens, in).

    ``alpha`` fixes α instead of searching it (``alpha=0, clip=False`` is RTN).
    """
    w, X = _checked(w, X, group_size, max_tokens)
    s, a = search_scale(w, X, bits=bits, group_size=group_size, sym=sym, n_grid=n_grid, alpha=alpha,
                        scale_dtype=scale_dtype)
    return _clipped(w * s, X / s, bits=bits, group_size=group_size, sym=sym, n_grid=n_grid, clip=clip,
                    max_shrink=max_shrink, scale_dtype=scale_dtype, scheme=scheme, kind="awq",
                    awq_scales=s.astype(np.float32), alpha=a)


def folded_quantize(w: np.ndarray, X: np.ndarray, *, group_size: int = 128, sym: bool = False, clip: bool = True,
                    n_grid: int = 20, max_shrink: float = 0.5, max_tokens: int = 512) -> QuantizedTensor:
    """The last step of AWQ on a weight whose input scaling is already folded in (``w·diag(s)``
    with ``s`` divided out of the op before it, as llm-awq applies it): the clip search on
    ``X`` (the inputs as the folded model sees them, ``X / s``), then INT4 with an fp16 scale
    per group. Nothing of AWQ is left to undo at run time, so the result is a plain
    group-affine tensor of scheme ``int4_g{group_size}`` (``_asym`` when not ``sym``): the
    grid of round-to-nearest, with AWQ's ranges. This is what a GGUF can hold
    (``refquant.gguf.tensors.as_ggml``)."""
    from refquant import schemes

    name = f"int4_g{group_size}" + ("" if sym else "_asym")
    schemes.get(name)    # raises for a group size with no registered grid
    w, X = _checked(w, X, group_size, max_tokens)
    return _clipped(w, X, bits=4, group_size=group_size, sym=sym, n_grid=n_grid, clip=clip, max_shrink=max_shrink,
                    scale_dtype=np.float16, scheme=name, kind="affine")


@register_decoder("awq")
def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """``Q(W diag(s)) diag(s)⁻¹``."""
    return (affine.dequantize(qt) / qt.meta["awq_scales"]).astype(np.float32)


# --- schemes (refquant.schemes) ---------------------------------------------------------------

def _divide_x(qt: QuantizedTensor, X: np.ndarray) -> np.ndarray:
    """x as the folded weight ``Q(W diag(s))`` multiplies it: ``x / s``."""
    return (np.asarray(X, np.float32) / qt.meta["awq_scales"]).astype(np.float32)


register("awq_int4_g128", spec=Spec(4, "int", "group", 128, symmetric=False, scale_dtype="fp16", calibration="awq",
                                   activations="q8_0"),
         description="AWQ INT4 asymmetric g128: activation-aware scales + clip search",
         kernel=replace(AFFINE, prepare_x=_divide_x))(
    lambda w, *, calib=None: awq_quantize(w, as_stats(calib).X))
