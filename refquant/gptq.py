"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1), in float64 NumPy.

For a Linear ``W`` (out, in) with calibration inputs ``X`` (tokens, in), GPTQ minimizes
``||W X^T - Ŵ X^T||²`` one input column at a time. With the Hessian proxy
``H = 2/n Σ x xᵀ`` and ``U`` the upper Cholesky factor of ``H⁻¹``, column ``j`` is rounded
to the grid and the rounding error, divided by ``U_jj``, is pushed onto the columns not yet
quantized through row ``j`` of ``U``::

    q_j = quant(w_j),   e = (w_j - q_j) / U_jj,   w_{k>j} -= e U_jk,   loss += (w_j - q_j)² / U_jj² / 2

Details follow the reference implementation (IST-DASLab/gptq ``GPTQ.fasterquant``):

* dead inputs (``H_jj = 0``, never active in the calibration data) get ``H_jj = 1`` and
  their weights are zeroed;
* damping ``λ = percdamp · mean(diag H)`` is added to the diagonal before inverting;
* ``H⁻¹`` via Cholesky (``H = L Lᵀ``, ``H⁻¹ = L⁻ᵀ L⁻¹``), then its upper Cholesky factor;
* lazy batch updates: columns are processed in blocks of ``blocksize``; inside a block the
  error feedback is applied to the block's columns only, and to the rest of the matrix once
  per block (``W[:, i2:] -= E U[i1:i2, i2:]``), which is the same arithmetic reordered;
* ``act_order``: columns in order of decreasing ``H_jj``; a group's scale is fitted when the
  group starts, on the (already updated) weights of the next ``group_size`` columns in
  processing order, so groups are contiguous in that order and ``g_idx`` maps each input
  column to its group.
* group statistics: the reference reads them from ``W[:, j:j+g]``, whose columns inside the
  current lazy block have not yet received the block's own error feedback, so its result
  depends on ``blocksize`` when ``g < blocksize``. refquant fits them on the up-to-date
  columns (the block copy) and keeps every group inside one block, so lazy batching gives
  the textbook algorithm's result (tested against it); ``static_groups`` fits all group scales up front on the original
  weights in natural order instead (no ``g_idx`` needed, kernels stay fast);
* the grid is refquant's affine grid (``refquant.affine``): symmetric restricted range or
  asymmetric with a zero point, scales stored as ``scale_dtype``; codes are computed
  against the stored scales.

Without ``g_idx`` the result is an ordinary affine ``QuantizedTensor`` (same layout as
``affine.quantize(..., granularity="group")``), so dequantize and the INT4 kernels apply
unchanged; with ``g_idx`` it is kind ``"gptq"`` and ``g_idx`` is stored (and counted).
"""
from __future__ import annotations

import numpy as np

from refquant import affine, packing
from refquant._checks import float_array, int_in
from refquant.calibration import as_stats
from refquant.kernels.table import AFFINE
from refquant.schemes import Spec, register
from refquant.tensor import QuantizedTensor, register_decoder


def hessian(X: np.ndarray) -> np.ndarray:
    """``H = 2/n Σ x xᵀ`` (float64) from calibration inputs ``X`` (n, in)
    (``refquant.calibration.LayerStats`` accumulates it batch by batch)."""
    return as_stats(X).H


def _group_params(wg: np.ndarray, bits: int, sym: bool, scale_dtype):
    """Scale (out,) and zero (out,) or None for one group of columns ``wg`` (out, g)."""
    s, z = affine.block_params(wg, (1,), bits, sym, False, 1.0, scale_dtype)
    return s[:, 0], (None if z is None else z[:, 0])


def gptq_quantize(w: np.ndarray, H: np.ndarray, *, bits: int = 4, group_size: int = 128, sym: bool = True,
                  act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01,
                  blocksize: int = 128, scale_dtype=np.float16, scheme: str | None = None, impl: str = "numba"
                  ) -> tuple[QuantizedTensor, float]:
    """GPTQ-quantize ``w`` (out, in) given the Hessian ``H`` (in, in); returns ``(qt, loss)``.

    ``group_size=-1`` uses one scale per output row. ``loss`` is GPTQ's
    ``Σ (w - q)² / U_jj² / 2`` summed over the matrix. ``impl="numpy"`` runs the per-column
    loop below in NumPy (the readable reference), ``"numba"`` (default) the same loop compiled
    (``refquant.kernels.gptq``, rows in parallel): the same codes, the loss summed in another
    order.
    """
    if impl not in ("numpy", "numba"):
        raise ValueError(f"impl must be 'numpy' or 'numba', got {impl!r}")
    w = float_array(w, "w", ndim=2)
    H = float_array(H, "H", ndim=2)
    out, n = w.shape
    if H.shape != (n, n):
        raise ValueError(f"H must be ({n}, {n}) for w of shape {w.shape}, got {H.shape}")
    bits = int_in(bits, "bits", range(2, 9))
    gs = n if group_size == -1 else int(group_size)
    if gs <= 0 or n % gs:
        raise ValueError(f"group_size={group_size} must be -1 or a positive divisor of in={n}")
    if not 0 <= percdamp < 1:
        raise ValueError(f"percdamp must be in [0, 1), got {percdamp}")
    W = w.astype(np.float64)   # (astype copies: the caller's arrays stay untouched)
    H = H.astype(np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    n_groups = n // gs
    scales = np.zeros((out, n_groups), np.dtype(scale_dtype))
    zeros = None if sym else np.zeros((out, n_groups), np.int64)
    if static_groups:
        for g in range(n_groups):
            s, z = _group_params(W[:, g * gs:(g + 1) * gs], bits, sym, scale_dtype)
            scales[:, g] = s
            if zeros is not None:
                zeros[:, g] = z

    if gs < blocksize and blocksize % gs:
        blocksize -= blocksize % gs  # keep every group inside one lazy block
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)
    if act_order:
        W, H = np.ascontiguousarray(W[:, perm]), H[np.ix_(perm, perm)]  # (fancy indexing returns F order)
    H[np.diag_indices(n)] += percdamp * np.mean(np.diag(H))
    U = inverse_cholesky_upper(H)

    codes = np.zeros((out, n), np.int16)
    if impl == "numba":
        loss = _compiled_loop(W, U, perm, scales, zeros, bits, sym, gs, static_groups, blocksize, scale_dtype, codes)
        return _result(codes, scales, zeros, out, n, bits, sym, gs, group_size, act_order, static_groups, perm,
                       scheme), loss
    loss = 0.0
    g_cur = -1
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].copy()
        E = np.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if static_groups:
                g_cur = perm[j] // gs
            elif j % gs == 0:  # fitted on the group's columns as they stand now (see below)
                g_cur = j // gs
                cols = W1[:, i:i + gs] if gs <= blocksize else W[:, j:j + gs]
                s, z = _group_params(cols, bits, sym, scale_dtype)
                scales[:, g_cur] = s
                if zeros is not None:
                    zeros[:, g_cur] = z
            s = scales[:, g_cur]
            z = None if zeros is None else zeros[:, g_cur]
            col = W1[:, i]
            q = affine.quantize_codes(col, s, z, bits, sym=sym)
            dq = affine.dequantize_codes(q, s, z).astype(np.float64)
            codes[:, perm[j]] = q
            d = U[j, j]
            loss += float(np.sum((col - dq) ** 2)) / d**2 / 2
            err = (col - dq) / d
            W1[:, i:] -= np.outer(err, U[j, i1 + i:i2])
            E[:, i] = err
        W[:, i2:] -= E @ U[i1:i2, i2:]
    return _result(codes, scales, zeros, out, n, bits, sym, gs, group_size, act_order, static_groups, perm,
                   scheme), loss


def inverse_cholesky_upper(H: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``) from one Cholesky and one
    triangular inverse: with ``J`` the order reversal, ``J H J = L Lᵀ`` gives ``H = M Mᵀ``
    with ``M = J L J`` upper triangular, so ``H⁻¹ = M⁻ᵀ M⁻¹`` and ``U = M⁻¹`` (upper, with a
    positive diagonal: the unique factor). About n³/2 flops where inverting H and factoring
    the inverse again (the reference's ``cholesky_inverse`` then ``cholesky``) take ~2n³."""
    L = np.linalg.cholesky(H[::-1, ::-1])
    return _upper_inverse(np.ascontiguousarray(L[::-1, ::-1]))


def _upper_inverse(M: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of an upper-triangular ``M`` by halves: ``[[A, B], [0, C]]⁻¹ =
    [[A⁻¹, -A⁻¹ B C⁻¹], [0, C⁻¹]]``, so the work is matrix products (into ``out``), those
    with a triangular factor split again so that its zero half is skipped."""
    n = M.shape[0]
    if out is None:
        out = np.zeros_like(M)
    if n <= 128:
        out[:] = np.triu(np.linalg.inv(M))
        return out
    k = n // 2
    Ai, Ci = _upper_inverse(M[:k, :k], out[:k, :k]), _upper_inverse(M[k:, k:], out[k:, k:])
    out[:k, k:] = -_times_upper(_upper_times(Ai, M[:k, k:]), Ci)
    return out


def _upper_times(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A @ B`` for upper-triangular ``A``: ``[[A1, A2], [0, A3]] B`` by halves."""
    k = A.shape[0]
    if k <= 256:
        return A @ B
    h = k // 2
    return np.concatenate([_upper_times(A[:h, :h], B[:h]) + A[:h, h:] @ B[h:], _upper_times(A[h:, h:], B[h:])])


def _times_upper(B: np.ndarray, C: np.ndarray) -> np.ndarray:
    """``B @ C`` for upper-triangular ``C``: ``B [[C1, C2], [0, C3]]`` by halves."""
    k = C.shape[0]
    if k <= 256:
        return B @ C
    h = k // 2
    return np.concatenate([_times_upper(B[:, :h], C[:h, :h]), B[:, :h] @ C[:h, h:] + _times_upper(B[:, h:], C[h:, h:])],
                          axis=1)


def _compiled_loop(W, U, perm, scales, zeros, bits, sym, gs, static_groups, blocksize, scale_dtype, codes):
    """The lazy-batch loop with the per-column work in ``refquant.kernels.gptq.columns``: the
    same arithmetic per element as the NumPy loop above (same codes), rows in parallel, the
    block held transposed. The earlier blocks' feedback reaches each block in one product
    (left-looking) instead of updating every later column after each block. Group scales are
    still fitted here, between the kernel's runs, when a group starts."""
    from refquant.kernels import gptq as kernel

    out, n = W.shape
    qlo, qhi = affine.code_range(bits, sym=sym, full_range=False)
    s64, s32 = scales.T.astype(np.float64), scales.T.astype(np.float32)   # (groups, out)
    z64 = np.zeros(s64.shape, np.int64) if zeros is None else zeros.T.astype(np.int64)
    row_loss = np.zeros(out)
    ET = np.zeros((n, out))   # scaled errors, transposed
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        WT = np.ascontiguousarray(W[:, i1:i2].T)
        if i1:
            WT -= U[:i1, i1:i2].T @ ET[:i1]
        CT = np.zeros(WT.shape, np.int64)
        Ub = np.ascontiguousarray(U[i1:i2, i1:i2])
        col_group = (perm[i1:i2] if static_groups else np.arange(i1, i2)) // gs
        starts = [] if static_groups else [i for i in range(i2 - i1) if (i1 + i) % gs == 0]
        bounds = sorted({0, i2 - i1, *starts})
        for a, b in zip(bounds[:-1], bounds[1:]):
            j = i1 + a
            if not static_groups and j % gs == 0:
                g = j // gs
                if gs <= blocksize:
                    cols = WT[a:a + gs].T
                else:   # the group reaches past this block: its columns with all feedback so far
                    cols = W[:, j:j + gs] - (U[:j, j:j + gs].T @ ET[:j]).T if j else W[:, j:j + gs]
                s, z = _group_params(cols, bits, sym, scale_dtype)
                scales[:, g], s64[g], s32[g] = s, s.astype(np.float64), s.astype(np.float32)
                if zeros is not None:
                    zeros[:, g] = z64[g] = z
            kernel.columns(WT, Ub, a, b, col_group, s64, s32, z64, float(qlo), float(qhi), CT, ET[i1:i2], row_loss)
        codes[:, perm[i1:i2]] = CT.T
    return float(row_loss.sum())


def _result(codes, scales, zeros, out, n, bits, sym, gs, group_size, act_order, static_groups, perm, scheme):
    zeros_u8 = None if zeros is None else zeros.astype(np.uint8)
    packed = packing.pack(codes, bits, signed=sym)
    name = scheme or f"gptq_int{bits}_g{group_size}" + ("" if sym else "_asym") + ("_act" if act_order else "")
    if act_order and not static_groups:
        g_idx = np.empty(n, np.int32)
        g_idx[perm] = np.arange(n) // gs
        meta = dict(kind="gptq", bits=bits, sym=sym, group_size=gs, g_idx=g_idx)
        return QuantizedTensor(packed, scales, zeros_u8, (out, n), name, meta)
    if group_size == -1:
        meta = dict(kind="affine", bits=bits, sym=sym, full_range=False, granularity="channel", axis=0,
                    group_size=None, padded_shape=(out, n))
        return QuantizedTensor(packed, scales, zeros_u8, (out, n), name, meta)
    meta = dict(kind="affine", bits=bits, sym=sym, full_range=False, granularity="group", axis=None,
                group_size=gs, padded_shape=(out, n))
    return QuantizedTensor(packed, scales, zeros_u8, (out, n), name, meta)


@register_decoder("gptq")
def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """``ŵ[:, j] = s[:, g_idx[j]] (q[:, j] - z[:, g_idx[j]])`` (act-order groups)."""
    m = qt.meta
    q = packing.unpack(qt.codes, m["bits"], qt.shape[1], signed=m["sym"]).reshape(qt.shape)
    g = m["g_idx"]
    z = None if qt.zeros is None else qt.zeros[:, g]
    return affine.dequantize_codes(q, qt.scales[:, g], z)


# --- schemes (refquant.schemes; calib = inputs X (tokens, in) or LayerStats) -------------------

def _gptq(bits, group_size=None, act_order=False):  # pragma: no mutate block
    """The spec of a GPTQ preset (symmetric, fp16 scales; ``group_size`` None: one per row).
    Without act-order the codes are plain affine groups: the byte-dot kernels multiply them."""
    return Spec(bits, "int", "group" if group_size else "channel", group_size, symmetric=True, scale_dtype="fp16",
                calibration="gptq_actorder" if act_order else "gptq",
                activations="q8_0" if bits in (4, 8) and not act_order else "float")


# the presets: name -> (spec, description); the quantizer's arguments are read from the spec
PRESETS = {
    "gptq_int4_g128": (_gptq(4, 128), "GPTQ INT4 symmetric, fp16 scale per 128 inputs"),
    "gptq_int4_g64": (_gptq(4, 64), "GPTQ INT4 symmetric, fp16 scale per 64 inputs"),
    "gptq_int4_g32": (_gptq(4, 32), "GPTQ INT4 symmetric, fp16 scale per 32 inputs (ggml's block: exactly Q4_0)"),
    "gptq_int4_g128_actorder": (_gptq(4, 128, act_order=True), "GPTQ INT4 g128 with act-order (g_idx stored)"),
    "gptq_int3_g128": (_gptq(3, 128), "GPTQ INT3 symmetric, fp16 scale per 128 inputs"),
    "gptq_int8_channel": (_gptq(8), "GPTQ INT8 symmetric, fp16 scale per output channel"),
}


def _register(name: str, spec: Spec, description: str):  # pragma: no mutate block
    kw = dict(bits=spec.bits, group_size=spec.group_size or -1, sym=spec.symmetric,
              act_order=spec.calibration == "gptq_actorder")
    register(name, spec=spec, description=description, kernel=AFFINE if spec.activations == "q8_0" else None)(
        lambda w, *, calib=None: gptq_quantize(w, as_stats(calib).H, scheme=name, **kw)[0])


for _name, (_spec, _description) in PRESETS.items():
    _register(_name, _spec, _description)
