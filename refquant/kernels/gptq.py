"""GPTQ's per-column loop compiled (numba): the inner part of ``refquant.gptq``'s lazy batch.

``columns`` runs columns ``a..b-1`` of one lazy block exactly as the NumPy loop in
``refquant.gptq.gptq_quantize`` does, in float64 with the same operations in the same order
per element (so the codes are identical, which the tests check): round to the stored grid,
dequantize in float32, divide the error by ``U_jj`` and push it onto the block's later
columns. Rows are independent once the group scales are fixed, so the block is held
transposed (``[column, row]``) and cut into chunks of rows that run in parallel; in a chunk
the error feedback of column ``i`` onto column ``c`` is one contiguous ``axpy`` over the
chunk's rows, which vectorizes, and the chunk stays in L2 for the whole block.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from refquant.kernels import _cache

CHUNK = 256  # rows per parallel task: 128 columns x 256 rows x 8 bytes = 256 KiB, in L2


@_cache.jit(None, parallel=True, error_model="numpy")
def columns(WT, U, a, b, col_group, s64, s32, z, qlo, qhi, codes, ET, row_loss):  # pragma: no cover (numba)
    """Process block columns ``a..b-1``. ``WT`` (bs, out) float64: the block transposed,
    updated in place; ``U`` the block's (bs, bs) part of the upper Cholesky factor of H⁻¹;
    ``col_group[i]`` the group of block column ``i``; ``s64``/``s32`` (groups, out) the
    stored scales as float64 / float32; ``z`` (groups, out) int64 zero points (zero for
    symmetric grids). Writes ``codes[i, :]``, the scaled errors ``ET[i, :]``, and adds each
    row's loss terms to ``row_loss``."""
    bs, out = WT.shape
    for ch in prange((out + CHUNK - 1) // CHUNK):
        r0 = ch * CHUNK
        r1 = min(out, r0 + CHUNK)
        for i in range(a, b):
            g = col_group[i]
            d = U[i, i]
            for r in range(r0, r1):
                s = s64[g, r]
                w = WT[i, r]
                q = np.rint(w / s) if s != 0 else 0.0
                q += z[g, r]
                q = min(max(q, qlo), qhi)
                qi = np.int64(q)
                codes[i, r] = qi
                dq = np.float64(np.float32(qi - z[g, r]) * s32[g, r])
                row_loss[r] += (w - dq) * (w - dq) / (d * d) / 2.0
                ET[i, r] = (w - dq) / d
            ei = ET[i, r0:r1]   # 1-D views with a 0-based index: the form LLVM vectorizes
            for c in range(i + 1, bs):
                u = U[i, c]
                wc = WT[c, r0:r1]
                for k in range(wc.shape[0]):
                    wc[k] -= ei[k] * u
