"""ggml's scale searches (``ggml-quants.c``, llama.cpp 0c1e570 / ggml 0.25.3), row-wise over
``x[B, n]`` in ggml's float32 operation order (``core``'s rules): ``make_qx_quants``
(symmetric), ``make_q3_quants`` (Q3_K's coordinate descent), ``make_qkx2_quants`` /
``make_qkx3_quants`` (affine: scale and min) and ``make_qp_quants`` (positive values, the
K types' sub-block scales under an importance matrix). The legacy, K and IQ4 families
quantize with them."""
from __future__ import annotations

import numpy as np

from refquant.gguf.quants.ops import F32, first_absmax, first_winner, nearest_int, seqsum
from refquant.gguf.quants.constants import GROUP_MAX_EPS


def _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """``make_qkx2_quants``: weighted affine fit (scale, min) over a grid of ``nstep`` scales.
    Also ``make_qkx3_quants`` given its weights (what every caller with an importance matrix
    does): the same arithmetic, its ``max <= min`` test equal to ``max == min`` once min is
    clamped to <= 0.

    Returns ``(scale, the_min, L)`` with ``x ≈ scale*L - the_min``. Row-wise over ``x[B, n]``.
    """
    mn = first_winner(x, np.argmin)
    mn = np.where(mn > 0, F32(0), mn)         # C: if (min > 0) min = 0 (a -0.0 min stays -0.0)
    mx = first_winner(x, np.argmax)
    sum_w = seqsum(w)
    sum_x = seqsum(w * x)
    flat = mx == mn
    mn0 = mn

    def err(scale, L, mins):
        diff = scale[:, None] * L + mins[:, None] - x
        return seqsum(w * (np.abs(diff) if use_mad else diff * diff))

    with np.errstate(all="ignore"):
        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        L = np.clip(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)
        best = err(scale, L, mn)
        for step in range(nstep + 1):
            # C reuses the running ``min`` here: it moves whenever a step improves the fit
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
            La = np.clip(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)
            wl = w * La
            sum_l, sum_l2, sum_xl = seqsum(wl), seqsum(wl * La), seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_min = np.where(clamp, F32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            cur = err(this_scale, La, this_min)
            better = (D > 0) & (cur < best)
            L = np.where(better[:, None], La, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L = np.where(flat[:, None], 0, L).astype(np.int32)
    return np.where(flat, F32(0), scale), -np.where(flat, mn0, mn), L


def _make_qx_quants(x, nmax, qw=None):
    """``make_qx_quants`` with ``rmse_type = 1``: symmetric scale, 18-point search, each
    element weighted by ``qw`` (importance weights) or, without them, by x².

    Returns ``(scale, L)`` with ``L`` offset by ``nmax`` (0 for all-zero rows).
    """
    mx = first_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    w = x * x if qw is None else qw
    nm = F32(nmax)

    def fit(iscale):
        l = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
        return l, seqsum(w * x * l), seqsum(w * l * l)

    with np.errstate(all="ignore"):
        l, sumlx, suml2 = fit(-nm / mx)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        L = l
        for step in range(-9, 10):
            if step == 0:
                continue
            l, sumlx, suml2 = fit(-(nm + F32(0.1) * F32(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], l, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    L = np.where(zero[:, None], 0, L.astype(np.int32) + nmax)
    return np.where(zero, F32(0), scale), L


def _make_q3_quants(x, nmax):
    """``make_q3_quants`` with ``do_rmse``: coordinate descent on the weighted (x²) error.

    Each of 5 sweeps visits the elements in order and moves one code if that raises
    ``sumlx²/suml2``. A sweep with no move leaves the state unchanged, so running all 5
    sweeps equals C's early ``break``. Returns ``(scale, L + nmax)``; L = 0 for zero rows.
    """
    mx = first_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    w = x * x
    with np.errstate(all="ignore"):
        iscale = F32(-nmax) / mx
        L = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        Lf = L.astype(F32)
        sumlx, suml2 = seqsum(w * x * Lf), seqsum(w * Lf * Lf)
        for _ in range(5):
            for i in range(x.shape[1]):
                wi, xi, li = w[:, i], x[:, i], L[:, i].astype(F32)
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new = np.clip(nearest_int(xi * sl2 / slx), -nmax, nmax - 1)
                nf = new.astype(F32)
                slx2 = slx + wi * xi * nf
                sl22 = sl2 + wi * nf * nf
                take = (slx > 0) & (new != L[:, i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[:, i] = np.where(take, new, L[:, i])
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L = np.where(zero[:, None], 0, L + nmax)
    return np.where(zero, F32(0), scale), L


def _make_qp_quants(x, nmax, w):
    """``make_qp_quants``: a scale for positive values ``x`` (sub-block scales or mins), codes
    ``0..nmax``, weighted by ``w`` (the sub-blocks' summed importance): the best of 9 scales
    ``(nmax + 0.1 is) / max`` by weighted squared error, then up to 5 sweeps of coordinate
    descent on ``sumlx² / suml2`` (a sweep with no move changes nothing, so running all 5
    equals C's early ``break``). Codes are C's ``uint8_t`` (``& 0xFF``); the sums take the
    integer before that store, as C does. Returns ``(scale, L)``; 0 and zeros when max <
    ``GROUP_MAX_EPS``."""
    B, n = x.shape
    mx = np.zeros(B, F32)
    for i in range(n):                  # C's MAX(max, x[i]): a NaN x[i] is taken
        mx = np.where(mx > x[:, i], mx, x[:, i])
    zero = mx < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = F32(nmax) / mx
        L0 = (nearest_int(iscale[:, None] * x) & 0xFF).astype(F32)
        diff = x - (F32(1) / iscale)[:, None] * L0
        best = seqsum(w * diff * diff)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / mx
            l = np.minimum(nmax, nearest_int(iscale_is[:, None] * x)).astype(F32)
            diff = x - (F32(1) / iscale_is)[:, None] * l
            mse = seqsum(w * diff * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale)
        l = np.minimum(nmax, nearest_int(iscale[:, None] * x))
        lf = l.astype(F32)
        sumlx, suml2 = seqsum(w * x * lf), seqsum(w * lf * lf)
        L = l & 0xFF
        for _ in range(5):
            for i in range(n):
                wi, xi, li = w[:, i], x[:, i], L[:, i].astype(F32)
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new = np.minimum(nmax, nearest_int(xi * sl2 / slx))
                nf = new.astype(F32)
                slx2 = slx + wi * xi * nf
                sl22 = sl2 + wi * nf * nf
                take = (slx > 0) & (sl2 > 0) & (new != L[:, i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[:, i] = np.where(take, new & 0xFF, L[:, i])
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero[:, None], 0, L)
