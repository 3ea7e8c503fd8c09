"""Codebook (lookup-table) 4-bit formats of bitsandbytes: NF4 and FP4, with double quant.

Blockwise absmax quantization (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"; QLoRA, Dettmers et al. 2023, §3): the tensor is flattened and cut into
blocks of ``blocksize`` (64 by default); each block stores ``absmax = max|x|`` in fp32 and
each element the index of the codebook value nearest to ``x / absmax`` (ties go to the
lower value, as bitsandbytes' threshold tree does with its strict ``>`` tests).

NF4 is the 4-bit NormalFloat of QLoRA §3: quantiles of N(0, 1) normalised to [-1, 1], with
an exact zero (7 negative and 8 positive levels). The values below are bitsandbytes'
table (``functional.py``'s ``get_4bit_type("nf4")`` / the CUDA ``dDequantizeNF4``).

FP4 is bitsandbytes' 4-bit float (``get_4bit_type("fp4")``): sign bit plus magnitudes
{0, 0.0625, 8, 12, 4, 6, 2, 3} / 12 for codes 0..7 -- not the OCP E2M1 grid of
``refquant.formats``. Quantization picks the nearest magnitude and sets the sign bit
for negative inputs.

Double quantization (QLoRA §3, "Double Quantization"): the fp32 absmax constants are
themselves quantized: their mean is subtracted, then they are blockwise-quantized to 8
bits in blocks of 256 with bitsandbytes' signed dynamic-tree map
(``create_dynamic_map``). Cost per weight at blocksize 64: 4 + 8/64 + 32/(64*256)
= 4.127 bits (the paper's figure), versus 4 + 32/64 = 4.5 bits without.

Storage: codes packed by ``refquant.packing.pack`` (low nibble first; bitsandbytes puts
the first element in the *high* nibble -- swap nibbles to get its byte layout). The
codebooks bitsandbytes serialises with the tensor (``quant_map``, ``nested_quant_map``)
are stored in ``meta`` and counted by ``nbytes``.
"""
from __future__ import annotations

import math

import numpy as np

from refquant import packing
from refquant._checks import float_array, int_in, positive_int
from refquant.schemes import Spec, register
from refquant.tensor import QuantizedTensor, register_decoder

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

_FP4_MAGNITUDES = np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]) / 12.0
FP4 = np.concatenate([_FP4_MAGNITUDES, -_FP4_MAGNITUDES]).astype(np.float32)   # code = sign << 3 | magnitude

CODEBOOKS = {"nf4": NF4, "fp4": FP4}


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic-tree 8-bit map (``functional.create_dynamic_map``), sorted, float32.

    For each decade ``i`` (``10^(i - max_exponent_bits + 1)``), the midpoints of
    ``2^i + 1`` points evenly spaced on [0.1, 1], both signs; plus 0 and 1. Computed in
    float64 and rounded once to float32 (torch computes the linspace in float32, so an
    entry may differ from bitsandbytes' by one float32 ulp).
    """
    non_sign = total_bits - 1 if signed else total_bits
    data = []
    for i in range(max_exponent_bits):
        n = 2 ** (i + non_sign - max_exponent_bits) + 1 if signed else 2 ** (i + non_sign - max_exponent_bits + 1) + 1
        b = np.linspace(0.1, 1.0, n)
        means = (b[:-1] + b[1:]) / 2
        data += list(10.0 ** (i - max_exponent_bits + 1) * means)
        if signed:
            data += list(-(10.0 ** (i - max_exponent_bits + 1)) * means)
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return np.sort(np.array(data)).astype(np.float32)


def nearest_index(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the value of sorted ``table`` nearest to each ``x``; ties go to the lower value."""
    mid = (table[:-1].astype(np.float64) + table[1:]) / 2
    # x > mid[k] moves past value k; x == mid[k] stays (strict ">" like bitsandbytes)
    return np.searchsorted(mid, x, side="left").astype(np.uint8)


def _blocks(x: np.ndarray, blocksize: int) -> np.ndarray:
    flat = x.reshape(-1).astype(np.float32)
    pad = (-flat.size) % blocksize
    return np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, blocksize)


def _normalize(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks scaled into [-1, 1] and their absmax. Multiplies by ``1 / absmax`` in float32 as
    bitsandbytes does; where that reciprocal overflows (absmax < 2^-128) it divides instead."""
    absmax = np.max(np.abs(b), axis=1)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.float32(1) / absmax
    scaled = b * np.where(np.isfinite(inv), inv, 0)[:, None]
    tiny = (absmax > 0) & ~np.isfinite(inv)
    if tiny.any():
        scaled[tiny] = b[tiny] / absmax[tiny, None]
    return scaled, absmax


def quantize_blockwise(x: np.ndarray, table: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax quantization to a sorted ``table`` over [-1, 1].

    Returns ``(indices (nblocks, blocksize) uint8, absmax (nblocks,) float32)``; the last
    block is zero-padded. Normalisation is ``x * (1 / absmax)`` in float32 as bitsandbytes'
    kernel does; an all-zero block has absmax 0 and maps to the code of 0.
    """
    scaled, absmax = _normalize(_blocks(x, blocksize))
    return nearest_index(scaled, table), absmax


def _double_quantize(absmax: np.ndarray, blocksize2: int = 256):
    offset = np.float32(absmax.mean(dtype=np.float64))
    dmap = dynamic_map()
    idx, absmax2 = quantize_blockwise(absmax - offset, dmap, blocksize2)
    return idx.reshape(-1)[: absmax.size], absmax2, offset, dmap


def quantize(w: np.ndarray, codebook: str = "nf4", *, blocksize: int = 64, double_quant: bool = False,
             scheme: str | None = None) -> QuantizedTensor:
    """Quantize ``w`` to NF4 or bitsandbytes FP4 (module docstring), optionally double-quantized."""
    w = float_array(w, "w")
    if codebook not in CODEBOOKS:
        raise ValueError(f"codebook must be one of {sorted(CODEBOOKS)}, got {codebook!r}")
    blocksize = positive_int(blocksize, "blocksize")
    table = CODEBOOKS[codebook]
    if codebook == "nf4":
        idx, absmax = quantize_blockwise(w, table, blocksize)
    else:  # nearest magnitude, sign bit from the sign of x (so tiny negatives become -0)
        scaled, absmax = _normalize(_blocks(w, blocksize))
        order = np.argsort(_FP4_MAGNITUDES.astype(np.float32))
        mag_code = order[nearest_index(np.abs(scaled), _FP4_MAGNITUDES.astype(np.float32)[order])]
        idx = (mag_code | (np.signbit(scaled) << 3)).astype(np.uint8)
    codes = packing.pack(idx.reshape(-1), 4)
    meta = dict(kind="codebook", codebook=codebook, blocksize=blocksize, quant_map=table)
    scheme = scheme or (codebook + ("_dq" if double_quant else ""))
    if not double_quant:
        return QuantizedTensor(codes=codes, scales=absmax, zeros=None, shape=w.shape, scheme=scheme, meta=meta)
    q_absmax, absmax2, offset, dmap = _double_quantize(absmax)
    meta.update(double_quant=True, absmax2=absmax2, offset=np.array([offset], np.float32), nested_quant_map=dmap,
                blocksize2=256)
    return QuantizedTensor(codes=codes, scales=q_absmax, zeros=None, shape=w.shape, scheme=scheme, meta=meta)


def absmax(qt: QuantizedTensor) -> np.ndarray:
    """The per-block absmax constants, dequantized from the second level when double-quantized."""
    m = qt.meta
    if not m.get("double_quant"):
        return qt.scales
    bs2 = m["blocksize2"]
    idx = np.concatenate([qt.scales, np.zeros((-qt.scales.size) % bs2, np.uint8)]).reshape(-1, bs2)
    vals = m["nested_quant_map"][idx] * m["absmax2"][:, None]
    return (vals.reshape(-1)[: qt.scales.size] + m["offset"][0]).astype(np.float32)


@register_decoder("codebook")
def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """``ŵ = table[index] * absmax`` per block, cropped to the logical shape."""
    m = qt.meta
    n = math.prod(qt.shape)
    nblocks = -(-n // m["blocksize"])
    idx = packing.unpack(qt.codes, 4, nblocks * m["blocksize"]).reshape(nblocks, m["blocksize"])
    w = m["quant_map"][idx] * absmax(qt)[:, None]
    return np.ascontiguousarray(w.reshape(-1)[:n].reshape(qt.shape), dtype=np.float32)


def max_gap(codebook: str) -> float:
    """Largest distance between adjacent values of the codebook (the error bound is half of it)."""
    t = np.sort(CODEBOOKS[codebook])
    return float(np.max(np.diff(t)))


def error_bound(w: np.ndarray, qt: QuantizedTensor) -> np.ndarray:
    """Per-element bound ``max_gap/2 * absmax`` (+ the absmax's own double-quant error)."""
    m = qt.meta
    bs = m["blocksize"]
    a = absmax(qt).astype(np.float64)
    half_gap = max_gap(m["codebook"]) / 2
    bound = half_gap * np.abs(a)
    if m.get("double_quant"):
        # ŵ = t·a with the dequantized absmax a (which can even be negative for a tiny block
        # below the offset): |w - t·a| <= half_gap·|true| + |t|·|true - a|, |t| <= 1
        true_absmax = np.max(np.abs(_blocks(np.asarray(w), bs)), axis=1).astype(np.float64)
        bound = bound + (1 + half_gap) * np.abs(true_absmax - a) + 1e-7 * true_absmax
        bound = bound * (1 + 2.0**-20)
    flat = np.repeat(bound, bs)[: math.prod(qt.shape)]
    return flat.reshape(qt.shape) * (1 + 2.0**-20)


# --- schemes (refquant.schemes) ---------------------------------------------------------------

def _register_scheme(name: str, codebook: str, double_quant: bool, description: str) -> None:
    spec = Spec(4, "codebook", "block", scale_dtype="dq8" if double_quant else "fp32")
    register(name, spec=spec, description=description, bound=error_bound)(
        lambda w, *, calib=None: quantize(w, codebook, double_quant=double_quant, scheme=name))


_register_scheme("nf4", "nf4", False, "NF4 (QLoRA), fp32 absmax per block of 64")
_register_scheme("nf4_dq", "nf4", True, "NF4 + double quantization: absmax as 8-bit dynamic map per 256 blocks")
_register_scheme("fp4", "fp4", False, "bitsandbytes FP4, fp32 absmax per block of 64")
