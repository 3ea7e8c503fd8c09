"""The one kernel table: which registered scheme runs on which byte-dot kernel, and how.

``KERNELS[scheme]`` says how a ``QuantizedTensor`` of that scheme is repacked
(``bytedot.pack_*``), how x is rounded (``"q8_0"`` blocks of 32 as llama.cpp, or
``"per_token"`` int8 for W8A8) and whether x is transformed first (AWQ divides it by the
per-input scales it folded into the weight). Importing this module wires every entry into
its scheme's ``matvec``/``matmul`` (``schemes.set_kernel``; ``import refquant`` does it,
after the schemes have registered); the tests and ``benchmarks.kernels`` iterate over it.

The repacked form is computed once per tensor and kept beside it (``packed``); the
tensor's own bytes never change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from refquant import schemes
from refquant.kernels import MAX_BATCH

def _bytedot():
    from refquant.kernels import bytedot   # numba loads here, on first use, not at import

    return bytedot


@dataclass(frozen=True)
class KernelEntry:
    pack: Callable            # QuantizedTensor -> bytedot.Packed
    activation: str = "q8_0"  # or "per_token"
    prepare_x: Callable | None = None   # (qt, X) -> X as the kernel multiplies it

    def x_hat(self, qt, X: np.ndarray) -> np.ndarray:
        """The activation the kernel multiplies ``Ŵ`` by, float64 (M, n): ``X`` after
        ``prepare_x``, rounded as ``activation`` says (``kernels.bytedot``)."""
        X = np.atleast_2d(np.asarray(X, np.float32))
        if self.prepare_x is not None:
            X = self.prepare_x(qt, X)
        bd = _bytedot()
        rounder = bd.quantize_x_per_token if self.activation == "per_token" else bd.quantize_x_q8_0
        nb = -(-X.shape[1] // 32)
        xq, dx, _ = rounder(X, nb)
        out = xq.reshape(X.shape[0], nb, 32).astype(np.float64) * dx[:, :, None]
        return out.reshape(X.shape[0], -1)[:, : X.shape[1]]

    def matmul(self, qt, X: np.ndarray) -> np.ndarray:
        """``X̂ Ŵᵀ`` (M <= 16) or ``Ŵ x̂`` (1-D x) on the repacked weight."""
        if self.prepare_x is not None:
            X = self.prepare_x(qt, X)
        return _bytedot().matmul(packed(qt), X, per_token=self.activation == "per_token")


def _ggml(qt):
    return _bytedot().pack_ggml(qt.codes, qt.meta["ggml_type"], qt.shape[1])


def _affine(qt):
    return _bytedot().pack_affine(qt)


def _awq_x(qt, X):
    return (np.asarray(X, np.float32) / qt.meta["awq_scales"]).astype(np.float32)


_AFFINE = KernelEntry(_affine)
_GGML = KernelEntry(_ggml)

KERNELS: dict[str, KernelEntry] = {
    "int8_tensor": _AFFINE,
    "int8_channel": _AFFINE,
    "gptq_int8_channel": _AFFINE,
    "w8a8": KernelEntry(_affine, activation="per_token"),
    **{f"int4_g{g}{a}": _AFFINE for g in (32, 64, 128) for a in ("", "_asym")},
    "gptq_int4_g128": _AFFINE,
    "gptq_int4_g64": _AFFINE,
    "gptq_int4_g32": _AFFINE,
    "awq_int4_g128": KernelEntry(_affine, prepare_x=_awq_x),
    **{t: _GGML for t in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")},
}


def packed(qt):
    """The kernel form of ``qt`` (a ``bytedot.Packed``), repacked on first use and cached on the tensor."""
    cache = qt.kernel_cache
    if "bytedot" not in cache:
        cache["bytedot"] = KERNELS[qt.scheme].pack(qt)
    return cache["bytedot"]


for _name, _entry in KERNELS.items():
    schemes.set_kernel(_name, _entry.matmul, max_batch=MAX_BATCH)
