"""The scheme registry: every way refquant can store a weight matrix, by name.

A ``Scheme`` turns a 2-D float weight ``w`` of shape (out, in) into a
``QuantizedTensor`` and multiplies with it::

    s = refquant.schemes.get("int4_g128")
    qt = s.quantize(w)               # calibration-based schemes take calib=...
    y = s.matvec(qt, x)              # x: (in,)   -> (out,)      = W x
    Y = s.matmul(qt, X)              # X: (M, in) -> (M, out)    = X W^T (a Linear layer)

The NumPy reference ``matvec`` / ``matmul`` dequantize and then multiply. A scheme with a
byte-dot kernel multiplies ``Ŵ`` by x rounded as the kernel rounds it (llama.cpp's Q8_0
blocks, or the scheme's own rounding): ``KernelEntry.x_hat`` is that x, and the contract
suite checks the kernel against ``x_hat`` times the dequantized weight.

Schemes register themselves where they are implemented, one module per family (as
gguf-py's block types do): ``formats`` (fp32 … fp8), ``codebooks`` (NF4, FP4), ``mx``
(MXFP4, MXFP8, NVFP4), ``affine`` (INT8/INT4/INT3 RTN), ``gguf.quants`` (the GGML types),
``gptq``, ``awq``, ``smoothquant`` (W8A8), ``llm_int8``; ``import refquant`` loads them in
that order. A registration states, where one exists, a per-element error bound; bytes are
what the stored arrays take (``QuantizedTensor.nbytes``). The contract suite
(``tests/test_schemes.py``) checks every registered scheme against its bound and against
byte counts written out by hand per format, so a new scheme is tested the moment it is
registered (and fails until its byte count is written down). A family that gives a scheme
a byte-dot kernel says so when it registers it (``kernel=``, a
``refquant.kernels.table.KernelEntry``); ``kernels()`` lists them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from refquant._checks import float_array
from refquant.calibration import as_stats
from refquant.tensor import QuantizedTensor


@dataclass(frozen=True)
class Scheme:
    """A registered quantization scheme (see the module docstring)."""

    name: str
    description: str
    quantize_fn: Callable[..., QuantizedTensor]
    error_bound: Callable[[np.ndarray, QuantizedTensor], np.ndarray] | None = None
    needs_calib: bool = False
    needs_inputs: bool = False   # calibration must keep the inputs themselves (AWQ), not only statistics
    matvec_fn: Callable[[QuantizedTensor, np.ndarray], np.ndarray] | None = None   # fast kernel, (qt, x)
    matmul_fn: Callable[[QuantizedTensor, np.ndarray], np.ndarray] | None = None   # fast kernel, (qt, X)
    max_batch: int | None = None   # rows of X matmul_fn takes (None: any; the byte-dot kernels: 16)
    kernel: object | None = None   # the byte-dot kernels' entry (refquant.kernels.table.KernelEntry), if any
    group_size: int | None = None  # inputs per scale along a row, for grouped grids (None: not grouped so)
    # schemes that quantize activations too (W8A8, SmoothQuant, LLM.int8()): X -> X as the
    # layer sees it; the layer computes act_quant(qt, X) @ qt.dequantize().T
    act_quant: Callable[[QuantizedTensor, np.ndarray], np.ndarray] | None = None

    def fast(self, rows: int) -> bool:
        """Whether ``matmul_fn`` takes ``rows`` rows of X (the exact-integer W8A8-style
        products take any number, the byte-dot kernels ``kernels.MAX_BATCH``)."""
        return self.matmul_fn is not None and (self.max_batch is None or rows <= self.max_batch)

    def quantize(self, w: np.ndarray, *, calib=None) -> QuantizedTensor:
        """Quantize a 2-D float weight matrix of shape (out, in)."""
        w = float_array(w, "w", ndim=2)
        if w.dtype == np.float64 and np.abs(w).max() > np.finfo(np.float32).max:
            raise ValueError(f"w has |values| up to {float(np.abs(w).max()):.3g}, beyond float32 "
                             f"(max {float(np.finfo(np.float32).max):.3g}): no scheme stores it")
        if self.needs_calib:
            if calib is None:
                raise ValueError(f"scheme {self.name!r} needs calibration data: pass calib=...")
            calib = as_stats(calib)
            width = calib.xtx.shape[0] if calib.xtx is not None else None
            if width != w.shape[1]:
                raise ValueError(f"calibration inputs have {width} features but w has in={w.shape[1]} "
                                 f"(w shape {w.shape})")
        qt = self.quantize_fn(w, calib=calib)
        # finite in, finite out: a format whose stored scales overflow (a GGML fp16 block
        # scale beyond 65504, an int8 scale at the float32 maximum) is an error, not Inf
        with np.errstate(all="ignore"):
            bad = ~np.isfinite(qt.dequantize())
        if bad.any():
            r, c = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"scheme {self.name!r} cannot represent w: {int(bad.sum())} weights decode to Inf/NaN, "
                             f"the first at row {r}, column {c} (w = {float(w[r, c]):.3g}, max |w| of the row "
                             f"{float(np.abs(w[r]).max()):.3g}): its stored scales overflow at this magnitude "
                             "(gguf.quants.quantize writes ggml's bytes, Inf scales included, if that is wanted)")
        return qt

    def _check(self, qt: QuantizedTensor, x, name: str, ndim: int) -> np.ndarray:
        if not isinstance(qt, QuantizedTensor):
            raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
        x = float_array(x, name, ndim=ndim)
        if x.shape[-1] != qt.shape[1]:
            raise ValueError(f"{name} has {x.shape[-1]} features but the weight has in={qt.shape[1]} (shape {qt.shape})")
        return x

    def matvec(self, qt: QuantizedTensor, x: np.ndarray) -> np.ndarray:
        """``W x`` for x of shape (in,), float32 result of shape (out,)."""
        x = self._check(qt, x, "x", 1)
        if self.matvec_fn is not None:
            return self.matvec_fn(qt, x)
        if self.act_quant is not None:
            x = self.act_quant(qt, x[None].astype(np.float32))[0]
        return qt.dequantize() @ x.astype(np.float32)

    def matmul(self, qt: QuantizedTensor, X: np.ndarray) -> np.ndarray:
        """``X W^T`` for X of shape (M, in), float32 result of shape (M, out)."""
        X = self._check(qt, X, "X", 2)
        if self.fast(X.shape[0]):
            return self.matmul_fn(qt, X)
        if self.act_quant is not None:
            X = self.act_quant(qt, X.astype(np.float32))
        return X.astype(np.float32) @ qt.dequantize().T


_REGISTRY: dict[str, Scheme] = {}


def register(name: str, *, description: str, bound: Callable[[np.ndarray, QuantizedTensor], np.ndarray] | None = None,
             needs_calib: bool = False, needs_inputs: bool = False, matvec=None, matmul=None, act_quant=None,
             kernel=None, group_size: int | None = None):
    """Decorator registering ``fn(w, *, calib) -> QuantizedTensor`` as scheme ``name``.

    ``matvec(qt, x)`` / ``matmul(qt, X)``: optional exact products used instead of
    dequantize-then-multiply, for any number of rows (inputs already validated).
    ``kernel``: the family's ``refquant.kernels.table.KernelEntry``, which then computes
    ``matvec`` and ``matmul`` of up to ``kernels.MAX_BATCH`` rows (x rounded as it says).
    ``group_size``: the inputs that share a scale along a row, for grouped integer grids
    (read by tools that fit a grid to a width, never parsed from the name).
    An entry is complete when registered: the registry is never changed afterwards.
    """
    if kernel is not None and (matvec is not None or matmul is not None):
        raise ValueError(f"scheme {name!r}: a byte-dot kernel or exact products, not both")

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"scheme {name!r} is already registered")
        from refquant.kernels import MAX_BATCH

        fast = {} if kernel is None else dict(matvec_fn=kernel.matmul, matmul_fn=kernel.matmul, max_batch=MAX_BATCH)
        _REGISTRY[name] = Scheme(name, description, fn, bound, needs_calib, needs_inputs,
                                 **({"matvec_fn": matvec, "matmul_fn": matmul} | fast), act_quant=act_quant,
                                 kernel=kernel, group_size=group_size)
        return fn

    return deco


def kernels() -> dict:
    """``{name: KernelEntry}`` of every registered scheme the byte-dot kernels multiply."""
    return {n: s.kernel for n, s in _REGISTRY.items() if s.kernel is not None}


def get(name: str) -> Scheme:
    """The scheme registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r}; registered: {', '.join(names())}") from None


def names() -> list[str]:
    """Names of all registered schemes, in registration order."""
    return list(_REGISTRY)
