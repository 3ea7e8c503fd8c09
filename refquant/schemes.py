"""The scheme registry: every way refquant can store a weight matrix, by name.

A ``Scheme`` turns a 2-D float weight ``w`` of shape (out, in) into a
``QuantizedTensor`` and multiplies with it::

    s = refquant.schemes.get("int4_g128")
    qt = s.quantize(w)               # calibration-based schemes take calib=...
    y = s.matvec(qt, x)              # x: (in,)   -> (out,)      = W x
    Y = s.matmul(qt, X)              # X: (M, in) -> (M, out)    = X W^T (a Linear layer)

The NumPy reference ``matvec`` / ``matmul`` dequantize and then multiply; faster kernels
plug in per scheme without changing the results beyond float round-off.

Each registration also states, by hand from the format's definition, how many bytes a
tensor of a given shape must take (``expected_nbytes``) and, where one exists, a
per-element error bound; the contract test suite checks every registered scheme against
both, so a new scheme is tested the moment it is registered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from refquant import affine, codebooks, formats, kernels, mx
from refquant.kernels import table as kernel_table
from refquant.gguf import quants as ggml_quants
from refquant._checks import float_array
from refquant.calibration import as_stats
from refquant.tensor import QuantizedTensor


@dataclass(frozen=True)
class Scheme:
    """A registered quantization scheme (see the module docstring)."""

    name: str
    description: str
    quantize_fn: Callable[..., QuantizedTensor]
    expected_nbytes: Callable[[tuple[int, int]], int]
    error_bound: Callable[[np.ndarray, QuantizedTensor], np.ndarray] | None = None
    needs_calib: bool = False
    needs_inputs: bool = False   # calibration must keep the inputs themselves (AWQ), not only statistics
    matvec_fn: Callable[[QuantizedTensor, np.ndarray], np.ndarray] | None = None   # fast kernel, (qt, x)
    matmul_fn: Callable[[QuantizedTensor, np.ndarray], np.ndarray] | None = None   # fast kernel, (qt, X), M <= 16
    # schemes that quantize activations too (W8A8, SmoothQuant, LLM.int8()): X -> X as the
    # layer sees it; the layer computes act_quant(qt, X) @ qt.dequantize().T
    act_quant: Callable[[QuantizedTensor, np.ndarray], np.ndarray] | None = None

    @property
    def any_batch(self) -> bool:
        """Whether ``matmul_fn`` takes any number of rows (the exact-integer W8A8-style
        products do; the byte-dot kernels take ``kernels.MAX_BATCH``)."""
        return self.act_quant is not None and self.name not in kernel_table.KERNELS

    def quantize(self, w: np.ndarray, *, calib=None) -> QuantizedTensor:
        """Quantize a 2-D float weight matrix of shape (out, in)."""
        w = float_array(w, "w", ndim=2)
        if self.needs_calib and calib is None:
            raise ValueError(f"scheme {self.name!r} needs calibration data: pass calib=...")
        return self.quantize_fn(w, calib=calib)

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
        if self.matmul_fn is not None and (X.shape[0] <= kernels.MAX_BATCH or self.any_batch):
            return self.matmul_fn(qt, X)
        if self.act_quant is not None:
            X = self.act_quant(qt, X.astype(np.float32))
        return X.astype(np.float32) @ qt.dequantize().T


_REGISTRY: dict[str, Scheme] = {}


def register(name: str, *, description: str, nbytes: Callable[[tuple[int, int]], int],
             bound: Callable[[np.ndarray, QuantizedTensor], np.ndarray] | None = None, needs_calib: bool = False,
             needs_inputs: bool = False, matvec=None, matmul=None, act_quant=None):
    """Decorator registering ``fn(w, *, calib) -> QuantizedTensor`` as scheme ``name``.

    ``matvec(qt, x)`` / ``matmul(qt, X)``: optional kernels used instead of
    dequantize-then-multiply (inputs already validated). Schemes listed in
    ``refquant.kernels.table.KERNELS`` get the byte-dot kernels from there.
    """

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"scheme {name!r} is already registered")
        mv, mm = matvec, matmul
        entry = kernel_table.KERNELS.get(name)
        if entry is not None:   # the byte-dot kernels (refquant.kernels.table)
            mv = mm = entry.matmul
        _REGISTRY[name] = Scheme(name, description, fn, nbytes, bound, needs_calib, needs_inputs, mv, mm, act_quant)
        return fn

    return deco


def get(name: str) -> Scheme:
    """The scheme registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r}; registered: {', '.join(names())}") from None


def names() -> list[str]:
    """Names of all registered schemes, in registration order."""
    return list(_REGISTRY)


# --- Floating point ----------------------------------------------------------------

def _register_float(name: str, fmt: str, bytes_per: float, description: str, granularity: str = "none"):
    def nbytes(shape):
        out, n = shape
        scale_bytes = {"none": 0, "tensor": 4, "channel": 4 * out}[granularity]
        return int(out * n * bytes_per) + scale_bytes

    def bound(w, qt):
        s = 1.0 if qt.scales is None else qt.scales.astype(np.float64)
        # half an ulp of the format at w/s, plus the float32 rounding of decode * scale
        return formats.error_bound(w / s, fmt) * s + np.abs(w) * 2.0**-23

    register(name, description=description, nbytes=nbytes, bound=bound)(
        lambda w, *, calib=None: formats.quantize(w, fmt, granularity=granularity, scheme=name))


_register_float("fp32", "fp32", 4, "IEEE float32, the unquantized reference")
_register_float("fp16", "fp16", 2, "IEEE float16 (values beyond ±65504 are an error)")
_register_float("bf16", "bf16", 2, "bfloat16, round-to-nearest-even from float32")
_register_float("fp8_e4m3", "fp8_e4m3fn", 1, "FP8 E4M3 (fn), fp32 scale amax/448 per output channel", "channel")
_register_float("fp8_e5m2", "fp8_e5m2", 1, "FP8 E5M2, fp32 scale amax/57344 per output channel", "channel")


# --- Codebooks (bitsandbytes) and microscaling ---------------------------------------

def _codebook_nbytes(double_quant: bool, blocksize: int = 64):
    def nbytes(shape):
        n = shape[0] * shape[1]
        blocks = -(-n // blocksize)
        codes = -(-blocks * blocksize // 2)
        quant_map = 16 * 4
        if not double_quant:
            return codes + 4 * blocks + quant_map
        # uint8 absmax codes, fp32 absmax per 256 of them, fp32 mean offset, 256-entry fp32 dynamic map
        return codes + blocks + 4 * -(-blocks // 256) + 4 + quant_map + 256 * 4
    return nbytes


for _cb, _dq, _desc in (("nf4", False, "NF4 (QLoRA), fp32 absmax per block of 64"),
                        ("nf4", True, "NF4 + double quantization: absmax as 8-bit dynamic map per 256 blocks"),
                        ("fp4", False, "bitsandbytes FP4, fp32 absmax per block of 64")):
    _name = _cb + ("_dq" if _dq else "")
    register(_name, description=_desc, nbytes=_codebook_nbytes(_dq), bound=codebooks.error_bound)(
        lambda w, *, calib=None, _cb=_cb, _dq=_dq, _name=_name: codebooks.quantize(w, _cb, double_quant=_dq,
                                                                                    scheme=_name))

register("mxfp4", description="OCP MXFP4: E2M1 elements, E8M0 scale per 32", bound=mx.error_bound,
         nbytes=lambda s: s[0] * s[1] // 2 + s[0] * s[1] // 32)(
    lambda w, *, calib=None: mx.quantize_mx(w, "mxfp4"))
register("mxfp8", description="OCP MXFP8: E4M3 elements, E8M0 scale per 32", bound=mx.error_bound,
         nbytes=lambda s: s[0] * s[1] + s[0] * s[1] // 32)(
    lambda w, *, calib=None: mx.quantize_mx(w, "mxfp8"))
register("nvfp4", description="NVFP4: E2M1 elements, E4M3 scale per 16, fp32 tensor scale", bound=mx.error_bound,
         nbytes=lambda s: s[0] * s[1] // 2 + s[0] * s[1] // 16 + 4)(
    lambda w, *, calib=None: mx.quantize_nvfp4(w))


# --- Integer affine ----------------------------------------------------------------

def _register_affine(name: str, description: str, **kw):
    bits, gran, sym = kw["bits"], kw["granularity"], kw.get("sym", True)
    scale_bytes = np.dtype(kw.get("scale_dtype", np.float32)).itemsize

    def nbytes(shape):
        out, n = shape
        codes = out * -(-n * bits // 8)
        blocks = {"tensor": 1, "channel": out, "group": out * (n // kw.get("group_size", 1))}[gran]
        return codes + blocks * (scale_bytes + (0 if sym else 1))

    register(name, description=description, nbytes=nbytes, bound=lambda w, qt: affine.error_bound(qt) * (1 + 2**-20))(
        lambda w, *, calib=None: affine.quantize(w, scheme=name, **kw))


for _sym, _suffix in ((True, ""), (False, "_asym")):
    _kind = "symmetric" if _sym else "asymmetric (uint8 zero point)"
    _register_affine(f"int8_tensor{_suffix}", f"INT8 {_kind}, one fp32 scale per tensor",
                     bits=8, granularity="tensor", sym=_sym)
    _register_affine(f"int8_channel{_suffix}", f"INT8 {_kind}, one fp32 scale per output channel",
                     bits=8, granularity="channel", axis=0, sym=_sym)
    for _g in (128, 64, 32):
        _register_affine(f"int4_g{_g}{_suffix}", f"INT4 {_kind}, fp16 scale per group of {_g} inputs",
                         bits=4, granularity="group", group_size=_g, sym=_sym, scale_dtype=np.float16)
_register_affine("int3_g128", "INT3 symmetric, fp16 scale per group of 128 inputs (RTN baseline for GPTQ INT3)",
                 bits=3, granularity="group", group_size=128, scale_dtype=np.float16)


# --- llama.cpp GGML block formats ------------------------------------------------------

def _register_ggml(type_name: str, description: str):
    t = ggml_quants.TYPES[type_name]
    register(type_name.lower(), description=f"GGML {type_name} ({t.bits_per_weight:g} bpw): {description}",
             nbytes=lambda shape: shape[0] * (shape[1] // t.block_size) * t.type_size,
             bound=lambda w, qt: ggml_quants.error_bound(w, qt.codes, type_name))(
        lambda w, *, calib=None: ggml_quants.quantize_tensor(w, type_name))


for _t, _d in (
    ("Q8_0", "int8, fp16 absmax scale per 32"),
    ("Q4_0", "int4, fp16 scale per 32 (absmax -> -8)"),
    ("Q4_1", "uint4, fp16 scale and min per 32"),
    ("Q5_0", "int5, fp16 scale per 32"),
    ("Q5_1", "uint5, fp16 scale and min per 32"),
    ("Q2_K", "2-bit, 4-bit scales/mins per 16, fp16 super-scales per 256"),
    ("Q3_K", "3-bit, 6-bit scales per 16, fp16 super-scale per 256"),
    ("Q4_K", "4-bit, 6-bit scales/mins per 32, fp16 super-scales per 256"),
    ("Q5_K", "5-bit, 6-bit scales/mins per 32, fp16 super-scales per 256"),
    ("Q6_K", "6-bit, int8 scales per 16, fp16 super-scale per 256"),
    ("IQ4_NL", "non-linear 4-bit codebook, fp16 scale per 32"),
    ("IQ4_XS", "non-linear 4-bit codebook, 6-bit scales per 32, fp16 super-scale per 256"),
):
    _register_ggml(_t, _d)


# --- GPTQ (calibrated: calib = inputs X of shape (tokens, in)) ----------------------------

def _register_gptq(name: str, description: str, **kw):
    from refquant import gptq

    def nbytes(shape):
        out, n = shape
        g = kw.get("group_size", 128)
        groups = out * (1 if g == -1 else n // g)
        extra = 4 * n if (kw.get("act_order") and not kw.get("static_groups")) else 0  # int32 g_idx
        return out * -(-n * kw.get("bits", 4) // 8) + groups * (2 + (0 if kw.get("sym", True) else 1)) + extra

    register(name, description=description, nbytes=nbytes, needs_calib=True)(
        lambda w, *, calib=None: gptq.gptq_quantize(w, gptq.hessian(calib), scheme=name, **kw)[0])


_register_gptq("gptq_int4_g128", "GPTQ INT4 symmetric, fp16 scale per 128 inputs", bits=4, group_size=128)
_register_gptq("gptq_int4_g64", "GPTQ INT4 symmetric, fp16 scale per 64 inputs", bits=4, group_size=64)
_register_gptq("gptq_int4_g128_actorder", "GPTQ INT4 g128 with act-order (g_idx stored)", bits=4,
               group_size=128, act_order=True)
_register_gptq("gptq_int3_g128", "GPTQ INT3 symmetric, fp16 scale per 128 inputs", bits=3, group_size=128)
_register_gptq("gptq_int8_channel", "GPTQ INT8 symmetric, fp16 scale per output channel", bits=8, group_size=-1)


# --- AWQ, W8A8, SmoothQuant, LLM.int8() ---------------------------------------------------

def _register_activation_aware():
    from refquant import awq, llm_int8, smoothquant

    def awq_nbytes(shape):
        out, n = shape
        return out * n // 2 + out * (n // 128) * 3 + 4 * n  # codes, fp16 scale + uint8 zero, fp32 AWQ scales

    register("awq_int4_g128", description="AWQ INT4 asymmetric g128: activation-aware scales + clip search",
             nbytes=awq_nbytes, needs_calib=True, needs_inputs=True)(
        lambda w, *, calib=None: awq.awq_quantize(w, as_stats(calib).X))

    w8a8_bytes = lambda shape: shape[0] * shape[1] + 4 * shape[0]  # noqa: E731
    def int8_bound(w, qt):  # round-to-nearest on a grid of step scale_r / s_j (s = smoothing factors)
        s = qt.meta.get("smooth", np.float32(1))
        b = np.abs(qt.scales.astype(np.float64))[:, None] / 2 / s * (1 + 2**-20) + 2**-24 * np.abs(w)
        if qt.kind == "llm_int8":  # FP16 outlier columns: half an fp16 ulp
            o = qt.meta["outliers"]
            b = np.broadcast_to(b, w.shape).copy()
            b[:, o] = np.abs(w[:, o]) * 2.0**-11 + 2.0**-25
        return b

    register("w8a8", description="int8 per-channel weights x int8 per-token activations, int32 accumulation",
             nbytes=w8a8_bytes, act_quant=smoothquant.act_quant, bound=int8_bound)(
        lambda w, *, calib=None: smoothquant.quantize(w))
    register("smoothquant_w8a8", description="SmoothQuant (alpha 0.5) then W8A8",
             nbytes=lambda shape: w8a8_bytes(shape) + 4 * shape[1], needs_calib=True, bound=int8_bound,
             act_quant=smoothquant.act_quant, matmul=smoothquant.matmul,
             matvec=lambda qt, x: smoothquant.matmul(qt, x[None])[0])(
        lambda w, *, calib=None: smoothquant.quantize(
            w, smooth=smoothquant.smooth_scales(as_stats(calib).max_abs, w), scheme="smoothquant_w8a8"))

    def int8_nbytes(shape):  # plus 2 bytes per weight and 4 per index for each outlier column (data dependent)
        return shape[0] * shape[1] + 4 * shape[0]

    register("llm_int8", description="LLM.int8(): vector-wise int8 + FP16 outlier dimensions (|x| >= 6)",
             nbytes=int8_nbytes, needs_calib=True, act_quant=llm_int8.act_quant, matmul=llm_int8.matmul,
             bound=int8_bound,
             matvec=lambda qt, x: llm_int8.matmul(qt, x[None])[0])(
        lambda w, *, calib=None: llm_int8.quantize(w, as_stats(calib).max_abs))


_register_activation_aware()
