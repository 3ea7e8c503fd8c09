"""How a ``QuantizedTensor`` runs on the byte-dot kernels: the ``KernelEntry`` a scheme's
family declares when it registers (``schemes.register(..., kernel=...)``).

An entry says how the tensor is repacked (``pack``: ``AFFINE`` for refquant's integer
grids; ``gguf.quants.GGML_KERNEL`` for a ggml type whose row has a ``ByteDotLayout``), how x is rounded
(``round_x``: None for llama.cpp's Q8_0 blocks of 32, else the scheme's own rounder, e.g.
W8A8's one int8 scale per token) and whether x is transformed first (``prepare_x``: AWQ
divides it by the per-input scales it folded into the weight). This module knows no scheme
by name; the registry holds the entries.

The repacked form is computed once per tensor and kept beside it (``qt.kernel_cache``);
the tensor's own bytes never change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def _bytedot():
    from refquant.kernels import bytedot   # numba loads here, on first use, not at import

    return bytedot


@dataclass(frozen=True)
class KernelEntry:
    pack: Callable                        # QuantizedTensor -> bytedot.Packed
    round_x: Callable | None = None       # (X (M, n) float32, nb) -> (x_q, d_x, S·d_x); None: Q8_0
    prepare_x: Callable | None = None     # (qt, X) -> X as the kernel multiplies it

    @property
    def q8_0(self) -> bool:
        """Whether x reaches the kernel only rounded to Q8_0 blocks (what the compiled decode
        step does for every operand)."""
        return self.round_x is None and self.prepare_x is None

    def x_hat(self, qt, X: np.ndarray) -> np.ndarray:
        """The activation the kernel multiplies ``Ŵ`` by, float64 (M, n): ``X`` after
        ``prepare_x``, rounded by ``round_x``."""
        X = np.atleast_2d(np.asarray(X, np.float32))
        if self.prepare_x is not None:
            X = self.prepare_x(qt, X)
        rounder = self.round_x or _bytedot().quantize_x_q8_0
        nb = -(-X.shape[1] // 32)
        xq, dx, _ = rounder(X, nb)
        out = xq.reshape(X.shape[0], nb, 32).astype(np.float64) * dx[:, :, None]
        return out.reshape(X.shape[0], -1)[:, : X.shape[1]]

    def packed(self, qt):
        """The kernel form of ``qt`` (a ``bytedot.Packed``), repacked on first use and cached on the tensor."""
        cache = qt.kernel_cache
        if "bytedot" not in cache:
            cache["bytedot"] = self.pack(qt)
        return cache["bytedot"]

    def matmul(self, qt, X: np.ndarray) -> np.ndarray:
        """``X̂ Ŵᵀ`` (M <= 16) or ``Ŵ x̂`` (1-D x) on the repacked weight."""
        if self.prepare_x is not None:
            X = self.prepare_x(qt, X)
        return _bytedot().matmul(self.packed(qt), X, round_x=self.round_x)


def _affine(qt):
    return _bytedot().pack_affine(qt)


AFFINE = KernelEntry(_affine)   # refquant's INT8 (symmetric) and INT4 group grids, x as Q8_0
