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
that order. A registration states the scheme as data -- a ``Spec`` (bits, what the codes
stand for, granularity, group size, symmetry, scale type, calibration, how the product
rounds x; ``find(**fields)`` selects by them; families keep their presets in a table of
specs) -- and, where one exists, a per-element error bound; bytes are
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


GRANULARITIES = ("none", "tensor", "channel", "group", "block")
VALUES = ("float", "int", "codebook", "ggml")
CALIBRATIONS = (None, "gptq", "gptq_actorder", "awq", "smoothquant", "outliers")
ACTIVATIONS = ("float", "q8_0", "int8_token", "int8_outliers")


@dataclass(frozen=True)
class Spec:
    """What a scheme stores and computes, as data (compressed-tensors' ``QuantizationArgs``):
    tools read these fields, never the scheme's name.

    ``bits``: bits of one weight's code. ``values``: what the codes stand for -- ``"float"``
    (a float format), ``"int"`` (an affine integer grid), ``"codebook"`` (a table of
    levels: NF4, FP4), ``"ggml"`` (a ggml block type, ``ggml_type``). ``granularity``: how
    weights share a scale -- ``"none"`` (no scale), ``"tensor"``, ``"channel"`` (per output
    row), ``"group"`` (``group_size`` consecutive inputs of a row), ``"block"`` (the fixed
    blocks of a block format: MX, NVFP4, codebooks, ggml). ``symmetric``: integer grids
    only -- no zero point. ``scale_dtype``: how scales are stored (``"fp32"``, ``"fp16"``,
    ``"e8m0"``, ``"e4m3"``, ``"ggml"``: the type's own fields). ``calibration``: the method
    that needs data (None: round to nearest). ``activations``: the x the product
    multiplies -- ``"float"``; ``"q8_0"`` (rounded to llama.cpp's Q8_0 blocks by the
    byte-dot kernels); ``"int8_token"`` (W8A8's int8 per token); ``"int8_outliers"``
    (LLM.int8(): int8 per token but the outlier features)."""

    bits: int
    values: str
    granularity: str
    group_size: int | None = None
    symmetric: bool | None = None
    scale_dtype: str | None = None
    calibration: str | None = None
    activations: str = "float"
    ggml_type: str | None = None

    def __post_init__(self):
        for field, allowed in (("values", VALUES), ("granularity", GRANULARITIES), ("calibration", CALIBRATIONS),
                               ("activations", ACTIVATIONS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"Spec.{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if not (isinstance(self.bits, int) and 1 <= self.bits <= 32):
            raise ValueError(f"Spec.bits must be an integer in 1..32, got {self.bits!r}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise ValueError("Spec.group_size is given exactly for granularity 'group'")
        if self.group_size is not None and not (isinstance(self.group_size, int) and self.group_size > 0):
            raise ValueError(f"Spec.group_size must be a positive integer, got {self.group_size!r}")
        if (self.values == "int") != (self.symmetric is not None):
            raise ValueError("Spec.symmetric is given exactly for integer grids (values 'int')")
        if (self.values == "ggml") != (self.ggml_type is not None):
            raise ValueError("Spec.ggml_type is given exactly for values 'ggml'")


@dataclass(frozen=True)
class Scheme:
    """A registered quantization scheme (see the module docstring): its ``spec`` (data) and
    the functions that implement it."""

    name: str
    description: str
    spec: Spec
    quantize_fn: Callable[..., QuantizedTensor]
    error_bound: Callable[[np.ndarray, QuantizedTensor], np.ndarray] | None = None
    matvec_fn: Callable[[QuantizedTensor, np.ndarray], np.ndarray] | None = None   # fast kernel, (qt, x)
    matmul_fn: Callable[[QuantizedTensor, np.ndarray], np.ndarray] | None = None   # fast kernel, (qt, X)
    max_batch: int | None = None   # rows of X matmul_fn takes (None: any; the byte-dot kernels: 16)
    kernel: object | None = None   # the byte-dot kernels' entry (refquant.kernels.table.KernelEntry), if any
    # schemes that quantize activations too (W8A8, SmoothQuant, LLM.int8()): X -> X as the
    # layer sees it; the layer computes act_quant(qt, X) @ qt.dequantize().T
    act_quant: Callable[[QuantizedTensor, np.ndarray], np.ndarray] | None = None

    @property
    def needs_calib(self) -> bool:
        """Whether ``quantize`` needs calibration data (``spec.calibration``)."""
        return self.spec.calibration is not None

    @property
    def needs_inputs(self) -> bool:
        """Whether calibration must keep the inputs themselves (AWQ), not only statistics."""
        return self.spec.calibration == "awq"

    @property
    def group_size(self) -> int | None:
        """Inputs per scale along a row, for grouped integer grids (``spec.group_size``)."""
        return self.spec.group_size

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


def register(name: str, *, spec: Spec, description: str,
             bound: Callable[[np.ndarray, QuantizedTensor], np.ndarray] | None = None, matvec=None, matmul=None,
             act_quant=None, kernel=None):
    """Decorator registering ``fn(w, *, calib) -> QuantizedTensor`` as scheme ``name``,
    described by ``spec``.

    ``matvec(qt, x)`` / ``matmul(qt, X)``: optional exact products used instead of
    dequantize-then-multiply, for any number of rows (inputs already validated).
    ``kernel``: the family's ``refquant.kernels.table.KernelEntry``, which then computes
    ``matvec`` and ``matmul`` of up to ``kernels.MAX_BATCH`` rows (x rounded as it says).
    ``spec.activations`` must say how the product rounds x (checked here).
    An entry is complete when registered: the registry is never changed afterwards.
    """
    if kernel is not None and (matvec is not None or matmul is not None):
        raise ValueError(f"scheme {name!r}: a byte-dot kernel or exact products, not both")
    if not isinstance(spec, Spec):
        raise TypeError(f"scheme {name!r}: spec must be a schemes.Spec, got {type(spec).__name__}")
    rounds = "q8_0" if kernel is not None and kernel.round_x is None else None
    if act_quant is not None:
        rounds = spec.activations if spec.activations in ("int8_token", "int8_outliers") else "int8_token"
    if spec.activations != (rounds or "float"):
        raise ValueError(f"scheme {name!r}: its products take x as {rounds or 'float'!r}, its spec says "
                         f"{spec.activations!r}")

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"scheme {name!r} is already registered")
        from refquant.kernels import MAX_BATCH

        fast = {} if kernel is None else dict(matvec_fn=kernel.matmul, matmul_fn=kernel.matmul, max_batch=MAX_BATCH)
        _REGISTRY[name] = Scheme(name, description, spec, fn, bound,
                                 **({"matvec_fn": matvec, "matmul_fn": matmul} | fast), act_quant=act_quant,
                                 kernel=kernel)
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


def find(**fields) -> list[str]:
    """Names of the registered schemes whose ``spec`` has every given field value, e.g.
    ``find(calibration="gptq", bits=4, group_size=64)``."""
    bad = set(fields) - set(Spec.__dataclass_fields__)
    if bad:
        raise ValueError(f"Spec has no field {', '.join(sorted(bad))}; fields: {', '.join(Spec.__dataclass_fields__)}")
    return [n for n, s in _REGISTRY.items() if all(getattr(s.spec, k) == v for k, v in fields.items())]
