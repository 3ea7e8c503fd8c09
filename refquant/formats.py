"""Small floating-point formats, bit-exact in pure NumPy.

``encode(x, fmt)`` rounds to the nearest representable value (ties to even) and returns
the bit patterns; ``decode(bits, fmt)`` returns float32. Formats (sign / exponent /
mantissa bits, exponent bias):

=============  =========  =====  ===============================================
fmt            layout     bias   special values
=============  =========  =====  ===============================================
``fp32``       1/8/23     127    IEEE 754 binary32 (identity on float32)
``fp16``       1/5/10     15     IEEE 754 binary16: Inf, NaN; overflow -> Inf
``bf16``       1/8/7      127    bfloat16: Inf, NaN; overflow -> Inf
``fp8_e5m2``   1/5/2      15     IEEE-like: Inf, NaN; overflow -> Inf
``fp8_e4m3fn`` 1/4/3      7      no Inf; only S.1111.111 is NaN; max 448.
                                 Overflow (|x| >= 464, the midpoint to the first
                                 unrepresentable step) and ±Inf -> NaN. No
                                 saturation: that is ml_dtypes' ``astype`` rule;
                                 use ``encode(..., saturate=True)`` to clamp instead.
``fp4_e2m1``   1/2/1      1      no Inf, no NaN; max 6; overflow and ±Inf saturate
                                 to ±6. NaN has no code: as ml_dtypes does, it becomes
                                 a zero whose sign bit is the NaN's sign inverted.
                                 One code per uint8 (low 4 bits).
``e8m0``       0/8/0      127    OCP MX scale: 2^(c-127) for c in 0..254, 0xFF = NaN.
                                 No sign, no zero: zero (either sign), negatives,
                                 Inf, NaN and overflow -> 0xFF. Four roundings,
                                 ``encode(..., rounding=...)``: see "E8M0" below.
=============  =========  =====  ===============================================

Inputs are first converted to float32 (exact for float16 and float32 inputs), so all
rounding is a single rounding from float32, as a cast from float32 does. NaN payloads:
``fp16`` keeps the top mantissa bits (NumPy's rule, never turning NaN into Inf),
``bf16`` gives sign|0x7FC0, the fp8 formats give sign|all-ones-quiet (0x7E / 0x7F).

E8M0 rounding. Its values are the powers of two 2^-127 .. 2^127, so rounding a positive
float32 ``x = 2^e (1 + f)`` (normal) picks 2^e or 2^(e+1); ``rounding=`` names the rule:

* ``"value"`` (the default): the nearer of the two by value, the midpoint ``1.5 * 2^e``
  going up. For a normal float32 that is "mantissa bit 22 set rounds up"; a float32
  subnormal (below 2^-126) goes to 2^-126 from ``1.5 * 2^-127`` on and to 2^-127 (code 0,
  the smallest value) below it. This is ml_dtypes' ``float8_e8m0fnu`` cast from 0.7.0 on.
  Default because it is the cast's own definition (round to nearest) applied to the value,
  with no exception at the bottom of the range, and what the newest oracle does.
* ``"bits"``: ml_dtypes 0.5.1 to 0.6.0, which round on the float32 bit pattern (mantissa
  field >= 0x400000 rounds up, else down). Identical to ``"value"`` on every input except
  the float32 subnormals strictly between 2^-127 and 1.5 * 2^-127 (bit patterns 0x00400001
  to 0x005FFFFF, 2,097,151 of them), which it sends to 2^-126 (code 1) instead of 2^-127:
  a subnormal's mantissa field has no implicit bit, so "half the field" is not the midpoint.
  (Checked over all 2^32 float32 patterns against ml_dtypes 0.5.1, 0.6.0 and 0.7.0; the
  0.7.0 changelog names the change, ml_dtypes #434.) PyTorch's cast
  (``c10/util/Float8_e8m0fnu.h``, ``fp8e8m0fnu_from_fp32_value``: guard/round/sticky bits
  of the float32 pattern) rounds positive values this way too; it differs on what has no
  E8M0 value (it drops the sign, and sends zero to code 0), where refquant gives NaN.
* ``"floor"``: 2^floor(log2 x), the OCP MX v1.0 shared-scale rule (section 6.3:
  ``X = 2^(floor(log2 amax) - emax_elem)``), :func:`refquant.mx.shared_exponent`'s rule,
  CUDA's ``__nv_cvt_float_to_e8m0`` with ``cudaRoundZero`` and torchao's ``FLOOR``; values
  below 2^-127 clamp to code 0, and a finite float32 never overflows (FLT_MAX -> code 254).
  Exact: ggml's ``quantize_row_mxfp4_ref`` computes ``floorf(log2f(amax))``, which returns
  k for some floats just below 2^k (its own row in ``gguf.quants`` reproduces that).
* ``"ceil"``: 2^ceil(log2 x), rounding toward +Inf (CUDA's ``cudaRoundPosInf``, torchao's
  ``RCEIL``); above 2^127 overflows.

Worked edges (code, for value / bits / floor / ceil): 1.0 -> 127 in all four; 1.5 -> 128 /
128 / 127 / 128; 1.4999999 -> 127 / 127 / 127 / 128; 1.25 * 2^-127 (subnormal 0x00500000)
-> 0 / 1 / 0 / 1; 1.5 * 2^-127 -> 1 / 1 / 0 / 1; 2^-127 -> 0 in all four; the smallest
subnormal 2^-149 -> 0 in all four (nothing is smaller than 2^-127); 1.5 * 2^127 and FLT_MAX
-> 0xFF / 0xFF / 254 / 0xFF; +Inf, NaN, +0, -0 and every negative -> 0xFF. With
``saturate=True`` finite overflow and +Inf give 254 instead (NaN, zero, negatives stay 0xFF).

The rounding itself is one formula for every format: with ``emin = 1 - bias``,
``e = max(floor(log2|x|), emin)`` and ``m = round_half_even(|x| / 2^(e - M))``, the
magnitude code is ``((e - emin) << M) + m`` -- a carry out of the mantissa lands in
the next exponent and subnormals (``e = emin``, ``m < 2^M``) fall out with exponent 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refquant._checks import float_array, one_of
from refquant.schemes import Spec, register
from refquant.tensor import QuantizedTensor, register_decoder


@dataclass(frozen=True)
class FloatFormat:
    """Layout of a binary floating-point format (see the module docstring)."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    width: int            # storage bits per code (4-bit codes are stored one per uint8)
    ieee_specials: bool   # all-ones exponent holds Inf (mantissa 0) and NaN
    nan_code: int | None  # magnitude code of the canonical NaN, None if there is no NaN

    @property
    def storage_dtype(self):
        return {32: np.uint32, 16: np.uint16}.get(self.width, np.uint8)

    @property
    def sign_bit(self) -> int:
        return self.exp_bits + self.man_bits

    @property
    def max_code(self) -> int:
        """Magnitude code of the largest finite value."""
        if self.ieee_specials:
            return ((1 << self.exp_bits) - 1 << self.man_bits) - 1
        full = (1 << self.sign_bit) - 1
        return full - 1 if self.nan_code == full else full

    @property
    def max(self) -> float:
        """Largest finite value."""
        return float(_decode_magnitude(np.array([self.max_code]), self)[0])

    @property
    def emin(self) -> int:
        return 1 - self.bias


FORMATS = {
    f.name: f
    for f in (
        FloatFormat("fp32", 8, 23, 127, 32, True, 0x7FC00000),
        FloatFormat("fp16", 5, 10, 15, 16, True, 0x7E00),
        FloatFormat("bf16", 8, 7, 127, 16, True, 0x7FC0),
        FloatFormat("fp8_e5m2", 5, 2, 15, 8, True, 0x7E),
        FloatFormat("fp8_e4m3fn", 4, 3, 7, 8, False, 0x7F),
        FloatFormat("fp4_e2m1", 2, 1, 1, 4, False, None),
        FloatFormat("e8m0", 8, 0, 127, 8, False, 0xFF),
    )
}


def get_format(fmt: str) -> FloatFormat:
    """The ``FloatFormat`` named ``fmt``."""
    return FORMATS[one_of(fmt, "fmt", FORMATS)]


def _decode_magnitude(code: np.ndarray, f: FloatFormat) -> np.ndarray:
    """Value of magnitude codes (no sign, no specials) as float64."""
    code = code.astype(np.int64)
    e_field = code >> f.man_bits
    mant = code & ((1 << f.man_bits) - 1)
    if f.name == "e8m0":  # no subnormals: every code is a power of two
        return np.ldexp(1.0, (e_field - f.bias).astype(np.int32))
    normal = e_field > 0
    sig = np.where(normal, mant + (1 << f.man_bits), mant)
    exp = np.where(normal, e_field, 1) - f.bias - f.man_bits
    return np.ldexp(sig.astype(np.float64), exp.astype(np.int32))


def decode(bits: np.ndarray, fmt: str) -> np.ndarray:
    """Bit patterns of ``fmt`` (unsigned integers) -> float32 values."""
    f = get_format(fmt)
    if not isinstance(bits, np.ndarray) or bits.dtype.kind not in "ui":
        raise TypeError(f"bits must be an unsigned integer array, got {getattr(bits, 'dtype', type(bits).__name__)}")
    if bits.size and (bits.min() < 0 or int(bits.max()) >= 1 << f.width):
        raise ValueError(f"bits must be in [0, {(1 << f.width) - 1}] for {fmt}, got [{bits.min()}, {bits.max()}]")
    if f.name == "fp32":
        return bits.astype(np.uint32).view(np.float32).copy()
    b = bits.astype(np.int64)
    if f.name == "e8m0":
        mag, neg = b, np.zeros(b.shape, bool)
    else:
        mag, neg = b & ((1 << f.sign_bit) - 1), (b >> f.sign_bit) & 1 == 1
    out = _decode_magnitude(mag, f)
    if f.ieee_specials:
        top = mag >> f.man_bits == (1 << f.exp_bits) - 1
        out = np.where(top, np.where(mag & ((1 << f.man_bits) - 1) == 0, np.inf, np.nan), out)
    elif f.nan_code is not None:
        out = np.where(mag == f.nan_code, np.nan, out)
    return np.where(neg, -out, out).astype(np.float32)


E8M0_ROUNDINGS = ("value", "bits", "floor", "ceil")


def encode(x: np.ndarray, fmt: str, *, saturate: bool = False, rounding: str = "value") -> np.ndarray:
    """Float values -> bit patterns of ``fmt``, round-to-nearest-even.

    Returns uint16 for 16-bit formats, uint32 for fp32 and uint8 otherwise. NaN, Inf and
    overflow follow ml_dtypes' casts (module docstring). ``saturate=True`` clamps finite
    overflow and ±Inf to ±max instead (NaN stays NaN where the format has one).
    ``rounding`` chooses E8M0's rule (``"value"``, ``"bits"``, ``"floor"``, ``"ceil"``:
    module docstring); the other formats have one rule and accept only ``"value"``.
    """
    f = get_format(fmt)
    one_of(rounding, "rounding", E8M0_ROUNDINGS if f.name == "e8m0" else ("value",))
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if f.name == "fp32":
        return x.view(np.uint32).copy()
    if f.name == "e8m0":
        return _encode_e8m0(x, rounding, saturate)
    nan, inf = np.isnan(x), np.isinf(x)
    finite = np.abs(np.where(nan | inf, np.float32(0), x)).astype(np.float64)
    _, k = np.frexp(finite)                       # finite = m * 2^k, m in [0.5, 1)
    e = np.maximum(k - 1, f.emin)
    m = np.round(np.ldexp(finite, (f.man_bits - e).astype(np.int32)))  # exact scaling, RNE
    code = ((e - f.emin).astype(np.int64) << f.man_bits) + m.astype(np.int64)
    code = np.where(finite == 0, 0, code)

    overflow = (code > f.max_code) | inf
    if saturate or f.nan_code is None:
        code = np.where(overflow, f.max_code, code)
    elif f.ieee_specials:
        code = np.where(overflow, (1 << f.exp_bits) - 1 << f.man_bits, code)  # Inf
    else:
        code = np.where(overflow, f.nan_code, code)

    sign = np.signbit(x).astype(np.int64)
    if f.nan_code is None:
        sign = np.where(nan, 1 - sign, sign)      # ml_dtypes: NaN -> zero of the opposite sign
        code = np.where(nan, 0, code)
    elif f.name == "fp16":
        payload = np.maximum((x.view(np.uint32).astype(np.int64) & 0x7FFFFF) >> 13, 1)
        code = np.where(nan, 0x7C00 | payload, code)
    else:
        code = np.where(nan, f.nan_code, code)
    return (code | (sign << f.sign_bit)).astype(f.storage_dtype)


def _encode_e8m0(x: np.ndarray, rounding: str, saturate: bool) -> np.ndarray:
    """E8M0 codes from float32 ``x`` by ``rounding`` (module docstring), read off the bit
    pattern: code = biased exponent field, plus one where the rule rounds up."""
    bits = x.view(np.uint32).astype(np.int64)
    e_field, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    sub = e_field == 0                     # x < 2^-126: x = mant * 2^-149, 2^-127 is mant 0x400000
    if rounding == "value":
        up = np.where(sub, mant >= 0x600000, mant >= 0x400000)
    elif rounding == "bits":
        up = np.where(sub, mant > 0x400000, mant >= 0x400000)
    elif rounding == "ceil":
        up = np.where(sub, mant > 0x400000, mant > 0)
    else:   # floor
        up = np.zeros(bits.shape, bool)
    code = np.where(sub, 0, e_field) + up
    over = (code > 0xFE) | np.isposinf(x)
    bad = np.isnan(x) | (x <= 0) | (over & ~saturate)
    return np.where(bad, 0xFF, np.where(over, 0xFE, code)).astype(np.uint8)


def round_to(x: np.ndarray, fmt: str, *, saturate: bool = False) -> np.ndarray:
    """``decode(encode(x, fmt), fmt)``: x rounded to the nearest value of ``fmt`` (float32)."""
    return decode(encode(x, fmt, saturate=saturate), fmt)


fake_quant = round_to


def representable_values(fmt: str) -> np.ndarray:
    """Every finite value of ``fmt`` (sorted, float32, +0 once): handy for tests and codebooks."""
    f = get_format(fmt)
    if f.width > 16:
        raise ValueError(f"{fmt} has too many values to list")
    v = decode(np.arange(1 << f.width, dtype=f.storage_dtype), fmt)
    v = np.unique(v[np.isfinite(v)])
    return v


def check_weights(w, fmt: str) -> np.ndarray:
    """Validate weights for storage in ``fmt``: finite, and within its range unless saturating formats."""
    w = float_array(w, "w")
    f = get_format(fmt)
    amax = float(np.max(np.abs(w)))
    # Largest value that still rounds to a finite code.
    if f.name != "fp32" and f.nan_code is not None and amax > f.max:
        if encode(np.array([amax], np.float32), fmt).item() & ((1 << f.sign_bit) - 1) > f.max_code:
            raise ValueError(f"w has |values| up to {amax:.6g}, beyond the {fmt} range (max {f.max:.6g})")
    return w


# --- Float formats as quantized tensors ---------------------------------------------

def quantize(w: np.ndarray, fmt: str, *, granularity: str = "none", axis: int = 0, scheme: str | None = None):
    """Store ``w`` in float format ``fmt``, optionally with an fp32 scale.

    ``granularity="none"``: codes are ``encode(w)`` directly (values beyond the format's
    range are an error). ``"tensor"`` / ``"channel"``: scaled FP8 as in vLLM / Transformer
    Engine: ``scale = amax / fmt.max`` per tensor or per slice along ``axis``, codes
    ``encode(w / scale)`` (never overflows), ``ŵ = decode(codes) * scale``.
    """
    f = get_format(fmt)
    one_of(granularity, "granularity", ("none", "tensor", "channel"))
    if granularity == "none":
        w = check_weights(w, fmt)
        scales, x = None, w
    else:
        w = float_array(w, "w")
        if granularity == "channel" and not -w.ndim <= axis < w.ndim:
            raise ValueError(f"axis={axis} is out of range for w with {w.ndim} dimension(s)")
        red = tuple(range(w.ndim)) if granularity == "tensor" else tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        amax = np.max(np.abs(w.astype(np.float64)), axis=red, keepdims=True)
        # amax / max underflows to 0 for subnormal amax: the smallest float32 step still scales it
        scales = np.where(amax > 0, np.maximum(amax / f.max, 2.0**-149), 1.0).astype(np.float32)
        x = w.astype(np.float64) / scales
    codes = encode(x, fmt, saturate=granularity != "none")
    meta = dict(kind="float", fmt=fmt, granularity=granularity, axis=axis if granularity == "channel" else None)
    return QuantizedTensor(codes=codes, scales=scales, zeros=None, shape=w.shape,
                           scheme=scheme or (fmt if granularity == "none" else f"{fmt}_{granularity}"), meta=meta)


@register_decoder("float")
def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """``decode(codes)``, times the scale when there is one."""
    v = decode(qt.codes, qt.meta["fmt"])
    return v if qt.scales is None else (v * qt.scales).astype(np.float32)


def error_bound(x: np.ndarray, fmt: str) -> np.ndarray:
    """Per-element bound on ``|x - round_to(x, fmt)|`` for x within range.

    Half a unit in the last place: ``2^(e - M - 1)`` with ``e = max(floor(log2|x|), emin)``,
    i.e. relative ``2^-(M+1)`` in the normal range and half the subnormal step below it.
    """
    f = get_format(fmt)
    a = np.abs(np.asarray(x, dtype=np.float64))
    _, k = np.frexp(a)
    e = np.where(a == 0, f.emin, np.maximum(k - 1, f.emin))   # frexp(0) has exponent 0, not -inf
    return np.ldexp(1.0, (e - f.man_bits - 1).astype(np.int32))


# --- schemes (refquant.schemes) ---------------------------------------------------------------

def _register_scheme(name: str, fmt: str, description: str, granularity: str = "none"):  # pragma: no mutate block
    bits = FORMATS[fmt].width
    def bound(w, qt):
        s = 1.0 if qt.scales is None else qt.scales.astype(np.float64)
        # half an ulp of the format at w/s, plus the float32 rounding of decode * scale
        # (relative, or half the smallest float32 step when the product is subnormal)
        return error_bound(w / s, fmt) * s + np.abs(w) * 2.0**-23 + 2.0**-150

    spec = Spec(bits, "float", granularity, scale_dtype=None if granularity == "none" else "fp32")
    register(name, spec=spec, description=description, bound=bound)(
        lambda w, *, calib=None: quantize(w, fmt, granularity=granularity, scheme=name))


_register_scheme("fp32", "fp32", "IEEE float32, the unquantized reference")
_register_scheme("fp16", "fp16", "IEEE float16 (values beyond ±65504 are an error)")
_register_scheme("bf16", "bf16", "bfloat16, round-to-nearest-even from float32")
_register_scheme("fp8_e4m3", "fp8_e4m3fn", "FP8 E4M3 (fn), fp32 scale amax/448 per output channel", "channel")
_register_scheme("fp8_e5m2", "fp8_e5m2", "FP8 E5M2, fp32 scale amax/57344 per output channel", "channel")
