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


# --- next-token distributions: llama.cpp's `llama-perplexity --kl-divergence` ------------

KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0)
DP_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)


def log_softmax(z, axis=-1) -> np.ndarray:
    """``log softmax`` along ``axis`` in z's own dtype, stable: ``z - max z - log Σ exp(z - max z)``
    (the statistics below pass float64; MiniGPT's training and evaluation use it too)."""
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def _mean_se(v: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error ``sqrt((⟨v²⟩ - ⟨v⟩²) / (N - 1))`` (0 for N <= 10, as
    llama.cpp's ``mean_and_uncertainty``)."""
    n = v.size
    m = float(v.mean())
    var = float(np.mean(v * v)) - m * m
    return m, (float(np.sqrt(var / (n - 1))) if var > 0 and n > 10 else 0.0)


def _percentiles(v: np.ndarray, ps) -> dict:
    # numpy's default ("linear": rank p/100·(N-1), interpolated) is llama.cpp's ``percentile``
    return {f"p{p:g}": float(np.percentile(v, p)) for p in ps}


def _kld(lp, lq) -> np.ndarray:
    """``KL(P‖Q)`` per row of log-probabilities (float64), clipped at 0 (rounding)."""
    return np.maximum(np.sum(np.exp(lp) * (lp - lq), axis=1), 0.0)


def kld_per_position(ref_logits, logits) -> np.ndarray:
    """float64 (N,): ``KL(P‖Q)`` at each of N positions, P = softmax(``ref_logits``) (the
    values ``kl_divergence`` summarizes; paired differences between two models need them)."""
    ref = float_array(ref_logits, "ref_logits", ndim=2)
    q = float_array(logits, "logits", ndim=2)
    if ref.shape != q.shape:
        raise ValueError(f"ref_logits and logits must have the same shape, got {ref.shape} and {q.shape}")
    return _kld(log_softmax(ref.astype(np.float64)), log_softmax(q.astype(np.float64)))


def kl_divergence(ref_logits, logits, tokens=None) -> dict:
    """How far ``logits`` (N, vocab) moved from ``ref_logits`` (N, vocab) -- the next-token
    distributions of a quantized model and of its full-precision reference at N positions
    -- as llama.cpp's ``llama-perplexity --kl-divergence`` reports it
    (``tools/perplexity/perplexity.cpp``: ``log_softmax``, ``kl_divergence``,
    ``mean_and_uncertainty``, ``percentile``):

    * ``kld``: per position ``KL(P‖Q) = Σ_v P_v (log P_v - log Q_v)``, P the reference:
      mean ± standard error, median, percentiles (``KLD_PERCENTILES``), min, max;
    * ``same_top``: the fraction of positions whose arg-max token agrees, ± ``sqrt(p(1-p)/(N-1))``;
    * ``delta_p``: ``Q(t) - P(t)`` of token t per position: mean ± se, RMS ± se,
      percentiles (``DP_PERCENTILES``), min, max. llama.cpp takes t = the text's next token
      (pass ``tokens``, (N,) ids); without ``tokens``, t is the reference's top token;
    * with ``tokens``: ``ppl`` and ``ppl_ref`` (``exp`` of the mean negative log-likelihood,
      ± ``ppl·se``), ``ln_ppl_ratio`` (mean of ``nll - nll_ref`` ± se), ``ppl_ratio``
      (its ``exp``) and ``cor_nll`` (correlation of the two nll per position).

    Everything is float64 from a stable log-softmax. Two differences from llama.cpp, both
    its storage shortcuts: it keeps the reference's log-probabilities as 16-bit integers
    and skips vocabulary terms with ``log P < -16``; here both are exact.
    """
    ref = float_array(ref_logits, "ref_logits", ndim=2)
    q = float_array(logits, "logits", ndim=2)
    if ref.shape != q.shape:
        raise ValueError(f"ref_logits and logits must have the same shape, got {ref.shape} and {q.shape}")
    n, vocab = ref.shape
    if n < 2:
        raise ValueError(f"need at least 2 positions for the statistics, got {n}")
    lp, lq = log_softmax(ref.astype(np.float64)), log_softmax(q.astype(np.float64))
    kld = _kld(lp, lq)
    top_ref, top_q = lp.argmax(axis=1), lq.argmax(axis=1)
    same = float(np.mean(top_ref == top_q))
    if tokens is None:
        t = top_ref
    else:
        t = np.asarray(tokens)
        if t.shape != (n,) or t.dtype.kind not in "iu":
            raise ValueError(f"tokens must be {n} integer ids, got {t.dtype} array of shape {t.shape}")
        if t.min() < 0 or t.max() >= vocab:
            raise ValueError(f"tokens must be in [0, {vocab}), got {t.min()}..{t.max()}")
    rows = np.arange(n)
    dp = np.exp(lq[rows, t]) - np.exp(lp[rows, t])
    dp2 = dp * dp
    ms, ms_se = _mean_se(dp2)
    rms = float(np.sqrt(ms))
    out = dict(
        n=n,
        kld=dict(zip(("mean", "se"), _mean_se(kld)), median=float(np.median(kld)), min=float(kld.min()),
                 max=float(kld.max()), **_percentiles(kld, KLD_PERCENTILES)),
        same_top=dict(mean=same, se=float(np.sqrt(same * (1 - same) / (n - 1)))),
        delta_p=dict(zip(("mean", "se"), _mean_se(dp)), rms=rms, rms_se=ms_se / (2 * rms) if rms > 0 else 0.0,
                     min=float(dp.min()), max=float(dp.max()), **_percentiles(dp, DP_PERCENTILES)),
        delta_p_token="next" if tokens is not None else "reference_top",
    )
    if tokens is not None:
        nll, nll_ref = -lq[rows, t], -lp[rows, t]
        m, se = _mean_se(nll)
        m0, se0 = _mean_se(nll_ref)
        r, rse = _mean_se(nll - nll_ref)
        sd, sd0 = nll.std(), nll_ref.std()
        cor = float(np.mean((nll - m) * (nll_ref - m0)) / (sd * sd0)) if sd > 0 and sd0 > 0 else float("nan")
        with np.errstate(over="ignore"):   # a perplexity beyond 1e308 is Inf
            out.update(ppl=dict(mean=float(np.exp(m)), se=float(np.exp(m) * se)),
                       ppl_ref=dict(mean=float(np.exp(m0)), se=float(np.exp(m0) * se0)),
                       ln_ppl_ratio=dict(mean=r, se=rse),
                       ppl_ratio=dict(mean=float(np.exp(r)), se=float(np.exp(r) * rse)), cor_nll=cor)
    return out
