"""Affine (uniform integer) quantization, 2..8 bits.

Symmetric, restricted range (default)::

    s = max|w| / (2^(b-1) - 1),   q = clip(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1),   ŵ = s q

so ``|w - ŵ| <= s/2`` for every element and the grid is symmetric around 0.

Symmetric, full range (``full_range=True``, the llama.cpp Q4_0 convention): the element
``m`` of largest magnitude is mapped exactly to ``-2^(b-1)``, i.e. ``s = m / -2^(b-1)``
(``s`` is negative when ``m`` is positive) and ``q`` is clipped to
``[-2^(b-1), 2^(b-1) - 1]``. One more level than the restricted range; an element equal
to ``-m`` is clipped by one step.

Asymmetric (``sym=False``, zero point)::

    lo = min(min w, 0), hi = max(max w, 0),   s = (hi - lo) / (2^b - 1),
    z = round(-lo / s),   q = clip(round(w / s) + z, 0, 2^b - 1),   ŵ = s (q - z)

The range always contains 0 so that zero is exactly representable (as GPTQ does); every
element whose code is not clipped satisfies ``|w - ŵ| <= s/2``.

Granularity: one scale per tensor, per channel (a slice along ``axis``), or per group of
``group_size`` consecutive elements along the last (input) axis. Rounding is NumPy's
round-half-to-even, computed in float64 against the stored scale, so the bounds above
hold for the scales actually stored. A block whose elements are all zero gets scale 0
(and decodes to 0); a nonzero scale that underflows the storage dtype is raised to its
smallest positive value.

Scale choice: absmax (default), or ``clip_search=True``: the MSE-optimal clip ratio p
per block from a grid ``p = 1, 1 - 1/grid, ... > 1 - max_shrink`` (the search in
GPTQ's ``Quantizer.find_params`` and AWQ's ``auto_clip``), scaling the range by p.
"""
from __future__ import annotations

import numpy as np

from refquant import packing
from refquant._checks import float_array, int_in, one_of, positive_int
from refquant.kernels.table import AFFINE
from refquant.schemes import Spec, register
from refquant.tensor import QuantizedTensor, register_decoder

BITS = tuple(range(2, 9))
GRANULARITIES = ("tensor", "channel", "group")
SCALE_DTYPES = (np.float16, np.float32)


def code_range(bits: int, *, sym: bool = True, full_range: bool = False) -> tuple[int, int]:
    """Smallest and largest integer code of a b-bit grid."""
    if not sym:
        return 0, (1 << bits) - 1
    half = 1 << (bits - 1)
    return (-half if full_range else -(half - 1)), half - 1


def _blocked(w: np.ndarray, granularity: str, axis: int, group_size: int | None, pad: bool):
    """View ``w`` as blocks sharing one scale: returns (blocked float64 array, reduce axes, padded shape)."""
    w = w.astype(np.float64)
    if granularity == "tensor":
        return w, tuple(range(w.ndim)), w.shape
    if granularity == "channel":
        return w, tuple(i for i in range(w.ndim) if i != axis), w.shape
    n = w.shape[-1]
    if n % group_size:
        if not pad:
            raise ValueError(
                f"group_size={group_size} does not divide the last axis of w (length {n}); "
                f"pass pad=True to zero-pad each row to {n + (-n) % group_size}"
            )
        w = np.concatenate([w, np.zeros(w.shape[:-1] + ((-n) % group_size,))], axis=-1)
    return w.reshape(w.shape[:-1] + (-1, group_size)), (w.ndim,), w.shape


def _store_scale(s: np.ndarray, nonzero: np.ndarray, scale_dtype) -> np.ndarray:
    """Cast scales to their storage dtype, refusing overflow and avoiding underflow to 0."""
    with np.errstate(over="ignore"):
        stored = s.astype(scale_dtype)
    if not np.isfinite(stored).all():
        worst = float(np.max(np.abs(s)))
        raise ValueError(
            f"a scale of {worst:.6g} overflows scale_dtype={np.dtype(scale_dtype).name}; "
            "use scale_dtype=np.float32 or rescale the weights"
        )
    tiny = np.finfo(scale_dtype).smallest_subnormal
    stored = np.where(nonzero & (stored == 0), np.copysign(tiny, s).astype(scale_dtype), stored)
    return stored


def block_params(wb, reduce_axes, bits, sym, full_range, ratio, scale_dtype):
    """Scales (storage dtype) and zero points (int64 or None) for the blocks of ``wb`` that
    ``reduce_axes`` span: absmax (or min/max) times ``ratio``, the round-to-nearest grid
    every affine method shares (RTN, the clip search, GPTQ's and AWQ's groups)."""
    qlo, qhi = code_range(bits, sym=sym, full_range=full_range)
    if sym and full_range:
        # The signed value of largest magnitude (first one on ties, as ggml does).
        moved = np.moveaxis(wb, reduce_axes, tuple(range(-len(reduce_axes), 0)))
        flat = moved.reshape(moved.shape[: wb.ndim - len(reduce_axes)] + (-1,))
        idx = np.argmax(np.abs(flat), axis=-1)[..., None]
        m = np.take_along_axis(flat, idx, axis=-1)[..., 0]
        m = np.expand_dims(m, reduce_axes) * ratio
        s = m / qlo
        return _store_scale(s, m != 0, scale_dtype), None
    if sym:
        amax = np.max(np.abs(wb), axis=reduce_axes, keepdims=True) * ratio
        return _store_scale(amax / qhi, amax > 0, scale_dtype), None
    lo = np.minimum(np.min(wb, axis=reduce_axes, keepdims=True), 0) * ratio
    hi = np.maximum(np.max(wb, axis=reduce_axes, keepdims=True), 0) * ratio
    s = _store_scale((hi - lo) / qhi, hi > lo, scale_dtype)
    s64 = s.astype(np.float64)
    z = np.clip(np.round(-lo / np.where(s64 == 0, 1, s64)), qlo, qhi).astype(np.int64)
    return s, z


def quantize_codes(wb: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, *, sym: bool = True,
                   full_range: bool = False) -> np.ndarray:
    """Integer codes of ``wb`` on the grid given by ``scales`` (and ``zeros``), broadcasting.

    ``q = clip(round(w / s) + z, qmin, qmax)``, with ``q = z`` where ``s == 0``. This is
    the rounding step every affine method (RTN, GPTQ, AWQ) shares.
    """
    qlo, qhi = code_range(bits, sym=sym, full_range=full_range)
    s = np.asarray(scales, dtype=np.float64)
    q = np.round(np.asarray(wb, dtype=np.float64) / np.where(s == 0, np.inf, s))  # w / inf = 0
    if zeros is not None:
        q = q + zeros
    return np.clip(q, qlo, qhi).astype(np.int16)


def dequantize_codes(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None) -> np.ndarray:
    """``ŵ = s (q - z)`` in float32."""
    q = q.astype(np.int32)
    if zeros is not None:
        q = q - zeros
    return (q.astype(np.float32) * np.asarray(scales, dtype=np.float32)).astype(np.float32)


def quantize(
    w: np.ndarray,
    bits: int = 8,
    *,
    sym: bool = True,
    full_range: bool = False,
    granularity: str = "tensor",
    axis: int = 0,
    group_size: int | None = None,
    pad: bool = False,
    clip_search: bool = False,
    grid: int = 100,
    max_shrink: float = 0.8,
    scale_dtype=np.float32,
    scheme: str | None = None,
) -> QuantizedTensor:
    """Quantize ``w`` to ``bits``-bit affine codes (formulas in the module docstring).

    Args:
        w: float16/32/64 array, finite, non-empty.
        bits: 2..8.
        sym: symmetric (no zero point) or asymmetric (uint codes + zero point).
        full_range: symmetric only: use all 2^b levels (llama.cpp Q4_0 convention).
        granularity: "tensor", "channel" (one scale per index of ``axis``) or "group"
            (``group_size`` consecutive elements along the last axis).
        pad: for groups that do not divide the last axis: zero-pad each row instead of
            raising. The padded codes are stored (and counted by ``nbytes``).
        clip_search: MSE-optimal clip-ratio search per block instead of absmax.
        scale_dtype: storage dtype of the scales, np.float32 or np.float16.
        scheme: name recorded in the result (default: derived from the arguments).

    Returns:
        ``QuantizedTensor`` with codes packed by ``refquant.packing.pack`` along the last
        axis, scales (keepdims shape for tensor/channel, ``(..., n_groups)`` for groups),
        zeros (uint8, same shape as scales) or None.
    """
    w = float_array(w, "w")
    bits = int_in(bits, "bits", BITS)
    one_of(granularity, "granularity", GRANULARITIES)
    if full_range and not sym:
        raise ValueError("full_range=True applies to symmetric quantization only (got sym=False)")
    if np.dtype(scale_dtype) not in [np.dtype(d) for d in SCALE_DTYPES]:
        raise ValueError(f"scale_dtype must be float16 or float32, got {np.dtype(scale_dtype).name}")
    if granularity == "channel":
        if not -w.ndim <= axis < w.ndim:
            raise ValueError(f"axis={axis} is out of range for w with {w.ndim} dimension(s)")
        axis %= w.ndim
    if granularity == "group":
        if group_size is None:
            raise ValueError("granularity='group' needs group_size")
        group_size = positive_int(group_size, "group_size")
    elif group_size is not None:
        raise ValueError(f"group_size={group_size} is only meaningful with granularity='group'")
    if clip_search:
        grid = positive_int(grid, "grid")
        if not 0 <= max_shrink < 1:
            raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink}")

    wb, reduce_axes, padded_shape = _blocked(w, granularity, axis, group_size, pad)
    scales, zeros = block_params(wb, reduce_axes, bits, sym, full_range, 1.0, scale_dtype)
    if clip_search:
        scales, zeros = _clip_search(wb, reduce_axes, bits, sym, full_range, scales, zeros, grid, max_shrink,
                                     scale_dtype)
    q = quantize_codes(wb, scales, zeros, bits, sym=sym, full_range=full_range)
    codes = packing.pack(q.reshape(padded_shape), bits, signed=sym)

    if granularity == "group":
        scales, zeros = scales[..., 0], (None if zeros is None else zeros[..., 0])
    if scheme is None:
        gran = {"tensor": "tensor", "channel": f"channel{axis}", "group": f"g{group_size}"}[granularity]
        scheme = f"int{bits}_{gran}" + ("" if sym else "_asym") + ("_full" if full_range else "")
    meta = dict(kind="affine", bits=bits, sym=sym, full_range=full_range, granularity=granularity,
                axis=axis if granularity == "channel" else None, group_size=group_size,
                padded_shape=tuple(padded_shape))
    return QuantizedTensor(codes=codes, scales=scales,
                           zeros=None if zeros is None else zeros.astype(np.uint8),
                           shape=w.shape, scheme=scheme, meta=meta)


def _clip_search(wb, reduce_axes, bits, sym, full_range, scales, zeros, grid, max_shrink, scale_dtype):
    """Per block, keep the clip ratio whose quantization has the smallest squared error."""
    def err(s, z):
        q = quantize_codes(wb, s, z, bits, sym=sym, full_range=full_range)
        d = dequantize_codes(q, s, z).astype(np.float64) - wb
        return np.sum(d * d, axis=reduce_axes, keepdims=True)

    best = err(scales, zeros)
    for i in range(1, int(max_shrink * grid) + 1):
        s, z = block_params(wb, reduce_axes, bits, sym, full_range, 1.0 - i / grid, scale_dtype)
        e = err(s, z)
        better = e < best
        best = np.where(better, e, best)
        scales = np.where(better, s, scales)
        if zeros is not None:
            zeros = np.where(better, z, zeros)
    return scales, zeros


def codes(qt: QuantizedTensor) -> np.ndarray:
    """The integer codes of an affine ``QuantizedTensor`` unpacked, shape ``meta['padded_shape']``."""
    m = qt.meta
    padded = m["padded_shape"]
    return packing.unpack(qt.codes, m["bits"], padded[-1], signed=m["sym"]).reshape(padded)


@register_decoder("affine")
def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """``ŵ = s (q - z)`` broadcast over the blocks, cropped to the logical shape."""
    m = qt.meta
    q = codes(qt)
    scales, zeros = qt.scales, qt.zeros
    if m["granularity"] == "group":
        q = q.reshape(q.shape[:-1] + (-1, m["group_size"]))
        scales = scales[..., None]
        zeros = None if zeros is None else zeros[..., None]
    w = dequantize_codes(q, scales, zeros).reshape(m["padded_shape"])
    return np.ascontiguousarray(w[..., : qt.shape[-1]])


def step_sizes(qt: QuantizedTensor) -> np.ndarray:
    """``|s|`` of every element's block, broadcast to the logical shape (float64)."""
    m = qt.meta
    s = np.abs(qt.scales.astype(np.float64))
    if m["granularity"] == "group":
        s = np.repeat(s, m["group_size"], axis=-1)[..., : qt.shape[-1]]
    return np.broadcast_to(s, qt.shape)


def error_bound(qt: QuantizedTensor) -> np.ndarray:
    """Per-element bound on ``|w - ŵ|`` that holds for *every* element, clipped or not.

    Symmetric restricted range: ``|s|/2`` (absmax scaling never clips). Full range and
    asymmetric: ``|s|``, since the extreme element may be clipped by at most one step.
    With clip search the clipped elements have no such bound and this is not valid.
    """
    m = qt.meta
    half = m["sym"] and not m["full_range"]
    return step_sizes(qt) * (0.5 if half else 1.0)


# --- schemes (refquant.schemes) ---------------------------------------------------------------

def _scheme_bound(w, qt):  # pragma: no mutate block
    """``error_bound`` (with slack for the float32 division that picks the code) plus the
    float32 rounding of ``ŵ = s·q`` itself, up to half an ulp of ``ŵ``: at an exact tie
    (w = (q + ½)·s) the two add up."""
    return error_bound(qt) * (1 + 2**-20) + np.abs(dequantize(qt)) * 2.0**-24


def _int(bits, granularity, sym, group_size=None, kernel=True):  # pragma: no mutate block
    """The spec of an RTN integer preset: fp16 scales for groups, fp32 otherwise; the byte-dot
    kernels take symmetric INT8 (w·sign(x) needs no zero point) and every INT4 group grid."""
    return Spec(bits, "int", granularity, group_size, symmetric=sym, scale_dtype="fp16" if group_size else "fp32",
                activations="q8_0" if kernel else "float")


# the presets: name -> spec (the quantizer's arguments are read from it)
PRESETS = {
    "int8_tensor": _int(8, "tensor", True),
    "int8_channel": _int(8, "channel", True),
    **{f"int4_g{g}": _int(4, "group", True, g) for g in (128, 64, 32)},
    "int8_tensor_asym": _int(8, "tensor", False, kernel=False),
    "int8_channel_asym": _int(8, "channel", False, kernel=False),
    **{f"int4_g{g}_asym": _int(4, "group", False, g) for g in (128, 64, 32)},
    "int3_g128": _int(3, "group", True, 128, kernel=False),   # the RTN baseline of GPTQ INT3
}


def quantize_spec(w: np.ndarray, spec: Spec, *, scheme: str | None = None) -> QuantizedTensor:
    """``quantize`` with the arguments an integer ``Spec`` states."""
    if spec.values != "int" or spec.granularity not in GRANULARITIES:
        raise ValueError(f"not an affine integer spec: {spec}")
    return quantize(w, spec.bits, sym=spec.symmetric, granularity=spec.granularity, axis=0,
                    group_size=spec.group_size, scale_dtype={"fp16": np.float16, "fp32": np.float32}[spec.scale_dtype],
                    scheme=scheme)


def describe(spec: Spec) -> str:  # pragma: no mutate block
    """A one-line description of an integer spec."""
    kind = "symmetric" if spec.symmetric else "asymmetric (uint8 zero point)"
    where = {"tensor": "one fp32 scale per tensor", "channel": "one fp32 scale per output channel",
             "group": f"fp16 scale per group of {spec.group_size} inputs"}[spec.granularity]
    return f"INT{spec.bits} {kind}, {where}"


def _register(name: str, spec: Spec):  # pragma: no mutate block
    register(name, spec=spec, description=describe(spec), bound=_scheme_bound,
             kernel=AFFINE if spec.activations == "q8_0" else None)(
        lambda w, *, calib=None: quantize_spec(w, spec, scheme=name))


for _name, _spec in PRESETS.items():
    _register(_name, _spec)
