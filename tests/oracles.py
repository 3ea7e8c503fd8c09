"""Oracles shared by the kernel tests: what a byte-dot kernel must compute, built only
from references independent of the kernels (``gguf.quants``' Q8_0, checked against
gguf-py, and ``QuantizedTensor.dequantize``)."""
import numpy as np

from refquant.gguf import quants


def q8_0_round_trip(X: np.ndarray) -> np.ndarray:
    """X (M, n) as llama.cpp's Q8_0 dequantizes it (rows zero-padded to blocks of 32), float64."""
    X = np.atleast_2d(np.asarray(X, np.float32))
    n = X.shape[1]
    Xp = np.pad(X, ((0, 0), (0, -n % 32)))
    return quants.dequantize(quants.quantize(Xp, "Q8_0"), "Q8_0", Xp.shape)[:, :n].astype(np.float64)


def kernel_x_hat(entry, qt, X, act_quant=None):
    """The activation a byte-dot kernel multiplies by, from oracles independent of it:
    llama.cpp's Q8_0 (``gguf.quants``, checked against gguf-py) or the scheme's own
    per-token rounding (W8A8), after AWQ's division by its per-input scales."""
    X = np.atleast_2d(np.asarray(X, np.float32))
    if entry.prepare_x is not None:
        X = (X / qt.meta["awq_scales"]).astype(np.float32)
    if entry.round_x is not None:   # the scheme's own rounding (W8A8: per token), which act_quant also is
        return act_quant(qt, X).astype(np.float64)
    return q8_0_round_trip(X)


def kernel_bound(w_hat, x_hat):
    """|kernel - Ŵ x̂| for the byte-dot kernels: their float32 epilogue sums one term per block
    of 32 per lane (nb of them) plus a horizontal sum and the offset sum, each term within
    a few roundings: (nb + 30)·2⁻²⁴ of Σ|terms|. A term d_b·u_i or m_b is at most 4 times
    its block's largest |ŵ| for every format here (u ≤ 2·|code offset|, |m_b| ≲ max|ŵ|)."""
    n = w_hat.shape[1]
    nb = -(-n // 32)
    a = np.abs(np.pad(w_hat, ((0, 0), (0, -n % 32)))).reshape(w_hat.shape[0], nb, 32).max(axis=2)
    amax = np.repeat(a, 32, axis=1)[:, :n]
    return (nb + 30) * 2.0**-24 * (4 * amax) @ np.abs(x_hat).T


def refused(case, exc, match, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises ``exc`` with a message matching ``match`` (``re.search``);
    otherwise an AssertionError naming ``case`` (for tests that loop over bad inputs)."""
    import re

    try:
        fn(*args, **kwargs)
    except exc as e:
        assert re.search(match, str(e)), f"{case}: {type(e).__name__}({e}) does not match {match!r}"
        return e
    raise AssertionError(f"{case}: did not raise {exc.__name__}")
