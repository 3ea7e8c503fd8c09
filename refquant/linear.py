"""The quantized-Linear seam: one object per weight matrix, whatever stores it.

A model holds each of its weight matrices as a ``Linear`` and calls it; it never asks how
the weight is stored (vLLM's ``LinearMethod`` split, with the method's state kept on the
layer object)::

    lin = refquant.linear.quantize(w, "int4_g128")     # any registered scheme, or "fp32"
    lin = refquant.linear.ggml(raw, "Q4_1", (out, n))  # a GGUF tensor's block bytes, as stored
    y = lin(x)                                          # x (..., n) -> x Wᵀ (..., out), float32
    e = lin.rows(token_ids)                             # rows of W (an embedding lookup)

Two implementations share that protocol:

* ``DenseLinear``: a float32 matrix, multiplied with one 2-D BLAS call.
* ``QuantizedLinear``: a ``QuantizedTensor`` of any registered scheme (GGUF tensors are
  ``QuantizedTensor`` s of kind ``ggml`` holding the file's bytes). Up to
  ``kernels.MAX_BATCH`` rows of x go through the scheme's kernel (``refquant.kernels``:
  x rounded to int8 blocks as llama.cpp does, or the exact-integer W8A8 product); more rows
  go either through the float weight, dequantized once and kept (``prefill="float"``: the
  weight-only error, what an evaluation of the weight format wants), or through the same
  kernel in blocks of ``MAX_BATCH`` rows (``prefill="kernel"``: the weight is never
  expanded to float, what inference on stored weights wants). Schemes that quantize
  activations (W8A8, SmoothQuant, LLM.int8()) round x with their ``act_quant`` on the float
  path too, so both paths compute the scheme's product.

``fuse(linears)`` row-stacks Linears that share their input (q/k/v, gate/up) into one
matrix and returns row views of it; ``apply_shared(x, linears)`` then makes one call for
all of them.
"""
from __future__ import annotations

import numpy as np

from refquant import schemes
from refquant._checks import float_array, one_of
from refquant.calibration import as_stats
from refquant.gguf import quants
from refquant.kernels import MAX_BATCH   # rows of x per kernel call (no numba loaded here)
from refquant.tensor import QuantizedTensor


class Linear:
    """``x ↦ x Wᵀ`` for a weight ``W`` of shape ``(out, in)`` (see the module docstring).

    ``group``: ``(stacked, start, stop)`` when this Linear is rows ``start:stop`` of the
    row-stacked ``stacked`` (``fuse``), else None.
    """

    shape: tuple[int, int]
    group: tuple | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight."""
        raise NotImplementedError

    def dequantize(self) -> np.ndarray:
        """``W`` as float32 (out, in)."""
        raise NotImplementedError

    def rows(self, idx) -> np.ndarray:
        """Rows ``idx`` of ``W`` as float32 (an embedding lookup)."""
        raise NotImplementedError

    def _matmul(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def operand_kind(self) -> str:
        """How a compiled step (``refquant.kernels.stacked``) multiplies by this weight:
        ``"f32"`` (a float32 matrix), ``"packed"`` (the byte-dot layout, x as Q8_0 blocks) or
        ``"dequantized"`` (its float32 dequantization, as the NumPy reference does);
        ValueError for a weight whose product rounds or transforms x its own way."""
        raise ValueError(f"a {type(self).__name__} has no compiled operand")

    def __call__(self, x) -> np.ndarray:
        x = float_array(x, "x")
        if x.ndim == 0 or x.shape[-1] != self.shape[1]:
            raise ValueError(f"x has shape {x.shape}; the weight {self.shape} needs {self.shape[1]} features last")
        X = x.reshape(-1, self.shape[1]).astype(np.float32, copy=False)
        return self._matmul(X).reshape(*x.shape[:-1], self.shape[0])


class DenseLinear(Linear):
    """A float32 weight (the unquantized reference)."""

    def __init__(self, w):
        self.w = np.ascontiguousarray(float_array(w, "w", ndim=2), np.float32)
        self.shape = self.w.shape

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def dequantize(self) -> np.ndarray:
        return self.w

    def rows(self, idx) -> np.ndarray:
        return self.w[idx]

    def _matmul(self, X):
        return X @ self.w.T   # 2-D: one BLAS call (a 3-D @ transposed 2-D ran ~10x slower here)

    def _slice(self, start: int, stop: int) -> "DenseLinear":
        return DenseLinear(self.w[start:stop])

    def operand_kind(self) -> str:
        return "f32"


class QuantizedLinear(Linear):
    """A ``QuantizedTensor`` of any registered scheme; ``prefill`` is ``"float"`` or
    ``"kernel"`` (how more than ``MAX_BATCH`` rows of x are multiplied; module docstring)."""

    def __init__(self, qt: QuantizedTensor, *, prefill: str = "float"):
        if not isinstance(qt, QuantizedTensor):
            raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
        if len(qt.shape) != 2:
            raise ValueError(f"a Linear weight is 2-D, got shape {qt.shape}")
        self.qt, self.shape, self.prefill = qt, qt.shape, one_of(prefill, "prefill", ("float", "kernel"))
        self.scheme = schemes.get(qt.scheme)
        self._w = None

    @property
    def nbytes(self) -> int:
        return self.qt.nbytes

    @property
    def weight(self) -> np.ndarray:
        """The dequantized weight, computed once and kept."""
        if self._w is None:
            self._w = self.qt.dequantize()
        return self._w

    def dequantize(self) -> np.ndarray:
        return self._w if self._w is not None else self.qt.dequantize()

    def rows(self, idx) -> np.ndarray:
        if self._w is not None:
            return self._w[idx]
        if self.qt.kind == "ggml":   # decode only the rows asked for
            raw = self.qt.codes[np.asarray(idx).reshape(-1)]
            out = quants.dequantize(raw, self.qt.meta["ggml_type"], (raw.shape[0], self.shape[1]))
            return out.reshape(*np.shape(idx), self.shape[1])
        return self.weight[idx]

    def _matmul(self, X):   # X already checked by __call__: the scheme's product functions directly
        s = self.scheme
        if s.matmul_fn is not None:
            if s.fast(X.shape[0]):
                return s.matmul_fn(self.qt, X)
            if self.prefill == "kernel":
                return np.concatenate([s.matmul_fn(self.qt, X[i:i + MAX_BATCH]) for i in range(0, len(X), MAX_BATCH)])
        if s.act_quant is not None:
            X = s.act_quant(self.qt, X)
        return X @ self.weight.T

    def operand_kind(self) -> str:
        entry = self.scheme.kernel
        if entry is not None and entry.q8_0:
            return "packed"
        if self.scheme.act_quant is not None or entry is not None:
            raise ValueError(f"scheme {self.qt.scheme!r} rounds or transforms x its own way; the compiled step "
                             "covers float32, schemes without a kernel, and kernels with Q8_0 activations")
        return "dequantized"

    def packed(self):
        """The byte-dot kernels' form of the weight (``bytedot.Packed``; ``operand_kind`` "packed")."""
        return self.scheme.kernel.packed(self.qt)

    def _slice(self, start: int, stop: int) -> "QuantizedLinear":
        q = self.qt
        part = QuantizedTensor(q.codes[start:stop], None, None, (stop - start, q.shape[1]), q.scheme, q.meta)
        return QuantizedLinear(part, prefill=self.prefill)


class PaddedLinear(Linear):
    """A Linear of width ``n`` stored with its rows zero-padded to a wider ``inner`` Linear
    (``quantize(..., pad=g)``: a group size ``g`` that does not divide the width, stored as
    whole groups, the last one short of real weights). x is zero-padded to the stored
    width, so the product is that of the first ``n`` columns."""

    def __init__(self, inner: Linear, n: int):
        if not 0 < n <= inner.shape[1]:
            raise ValueError(f"width {n} must be in 1..{inner.shape[1]} (the stored width)")
        self.inner, self.shape = inner, (inner.shape[0], int(n))

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes   # the padding is stored

    def dequantize(self) -> np.ndarray:
        return self.inner.dequantize()[:, :self.shape[1]]

    def rows(self, idx) -> np.ndarray:
        return self.inner.rows(idx)[..., :self.shape[1]]

    def _matmul(self, X):
        return self.inner._matmul(np.pad(X, ((0, 0), (0, self.inner.shape[1] - self.shape[1]))))


def quantize(w, scheme: str = "fp32", *, calib=None, prefill: str = "float", pad: int | None = None) -> Linear:
    """``w`` (out, in) quantized by the registered ``scheme`` (``"fp32"``: kept as float32).

    ``calib``: what a calibrated scheme needs (inputs X (tokens, in), or a
    ``refquant.calibration.LayerStats``). ``pad``: when ``in`` is not a multiple of
    ``pad``, zero-pad every row (and the calibration inputs) to the next multiple and
    return a ``PaddedLinear`` -- how a group size that does not divide the width (SmolLM2's
    576 = 4.5 x 128) gets a short last group: the zeros never change a symmetric group's
    scale, and GPTQ sees them as dead inputs."""
    w = float_array(w, "w", ndim=2)
    if scheme == "fp32":
        return DenseLinear(w)
    n = w.shape[1]
    extra = 0 if pad is None else (-n) % int(pad)
    if extra:
        w = np.pad(w, ((0, 0), (0, extra)))
        calib = None if calib is None else as_stats(calib).padded(n + extra)
    lin = QuantizedLinear(schemes.get(scheme).quantize(w, calib=calib), prefill=prefill)
    return PaddedLinear(lin, n) if extra else lin


def ggml(raw, type_name: str, shape, *, prefill: str = "kernel") -> Linear:
    """A GGUF tensor's block bytes ``raw`` of ggml type ``type_name`` as a Linear, kept as stored."""
    return QuantizedLinear(quants.from_raw(raw, type_name, shape), prefill=prefill)


def fuse(linears: list[Linear]) -> list[Linear]:
    """Row-stack Linears that share their input into one matrix and return them as row
    views of it (``group`` set), so ``apply_shared`` makes one call for all of them.

    Only Linears whose rows are independent of each other's storage stack: float32
    matrices, and GGML block tensors of one type (every row is whole blocks). Anything
    else (different widths or types, per-tensor scales, already fused) is returned as is.
    """
    first = linears[0]
    if any(lin.group is not None or lin.shape[1] != first.shape[1] for lin in linears):
        return linears
    if all(isinstance(lin, DenseLinear) for lin in linears):
        stacked = DenseLinear(np.concatenate([lin.w for lin in linears]))
    elif (all(isinstance(lin, QuantizedLinear) and lin.qt.kind == "ggml" for lin in linears)
          and len({(lin.qt.meta["ggml_type"], lin.qt.scheme) for lin in linears}) == 1):
        q = first.qt
        codes = np.concatenate([lin.qt.codes for lin in linears])
        stacked = QuantizedLinear(QuantizedTensor(codes, None, None, (codes.shape[0], q.shape[1]), q.scheme, q.meta),
                                  prefill=first.prefill)
    else:
        return linears
    out, start = [], 0
    for lin in linears:
        part = stacked._slice(start, start + lin.shape[0])
        part.group = (stacked, start, start + lin.shape[0])
        out.append(part)
        start += lin.shape[0]
    return out


def apply_shared(x, linears: list[Linear]) -> list[np.ndarray]:
    """``[lin(x) for lin in linears]``, as one product when they are all the row views of one
    stacked matrix (``fuse``)."""
    g = linears[0].group
    if g is not None and all(lin.group is not None and lin.group[0] is g[0] for lin in linears) \
            and sum(lin.shape[0] for lin in linears) == g[0].shape[0]:
        y = g[0](x)
        return [y[..., lin.group[1]:lin.group[2]] for lin in linears]
    return [lin(x) for lin in linears]
