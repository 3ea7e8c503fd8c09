"""GGML block formats in NumPy, byte-for-byte as llama.cpp's ``ggml-quants.c`` does them.

A GGML tensor row of ``n`` weights is stored as ``n / block_size`` blocks of
``type_size`` bytes. Every function here is vectorized over blocks: a row-major
``float32[..., n]`` array becomes ``uint8[..., n / block_size * type_size]``.

Bit-exactness with ggml rests on reproducing its float32 arithmetic step by step:

* every intermediate is float32, with the same operation order as the C source and no
  fused multiply-add (ggml builds ``ggml-quants.c`` into ``ggml-base`` without
  ``-march`` flags, so the compiler cannot contract ``a*b + c``);
* sums over a block are sequential left-to-right float32 sums (``np.add.accumulate``),
  never NumPy's pairwise ``sum``;
* ``nearest_int`` is ggml's magic-number rounding (add 1.5·2^23, read the mantissa bits),
  i.e. round-half-to-even, emulated bit for bit, also for out-of-range inputs;
* ``roundf`` (Q8_0) rounds half away from zero; C casts ``(int8_t)(x + 8.5f)`` truncate;
* ``max``/``min``/``absmax`` searches keep the *first* element that wins (``argmax``),
  because the sign of the winner feeds the scale;
* float32 → fp16 is round-to-nearest-even (``astype(np.float16)``), fp32 → bf16 is
  ggml's RNE with quiet NaNs.

Quantizers follow ``quantize_row_*_ref`` (what ``ggml_quantize_chunk`` and
``llama-quantize`` use when no importance matrix is given), including the scale searches
``make_qx_quants`` (Q6_K), ``make_q3_quants`` (Q3_K) and ``make_qkx2_quants``
(Q2_K/Q4_K/Q5_K). IQ4_NL follows ``quantize_iq4_nl`` (``ntry = 7``, the function
``ggml_quantize_chunk`` calls), not ``quantize_row_iq4_nl_ref`` (``ntry = -1``), which
reads stale indices for all-zero blocks. Q8_K is the activation format of the K-quant dot
products; it is quantized and dequantized here but is not a storage type.

Block layouts (little-endian, ``d``/``m``/``dmin`` are fp16)::

    Q4_0   d, qs[16]                 q = nibble - 8;  x = q*d;  element j low nibble, j+16 high
    Q4_1   d, m, qs[16]              x = q*d + m
    Q5_0   d, qh u32, qs[16]         5th bit of element j in qh bit j;  q - 16
    Q5_1   d, m, qh u32, qs[16]
    Q8_0   d, qs[32] int8
    Q2_K   scales[16], qs[64], d, dmin        4-bit scale | 4-bit min per 16; 2-bit quants
    Q3_K   hmask[32], qs[64], scales[12], d   6-bit signed scales per 16; 3-bit quants
    Q4_K   d, dmin, scales[12], qs[128]       6-bit scale and min per 32; 4-bit quants
    Q5_K   d, dmin, scales[12], qh[32], qs[128]
    Q6_K   ql[128], qh[64], scales[16] int8, d
    Q8_K   d f32, qs[256] int8, bsums[16] int16
    IQ4_NL d, qs[16]                 x = d * kvalues_iq4nl[nibble]
    IQ4_XS d, scales_h u16, scales_l[4], qs[128]   6-bit scales (ls - 32) per 32
    MXFP4  e (E8M0), qs[16]          x = kvalues_fp4[nibble] * 2^(e-128)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from refquant._checks import float_array
from refquant.gguf.quants.constants import GROUP_MAX_EPS, KVALUES_FP4, KVALUES_IQ4NL  # noqa: F401 (re-exported)
from refquant.gguf.quants.ops import (  # noqa: F401  (the families' helpers, re-exported)
    nearest_int, roundf, seqsum, first_absmax, positive_max, first_winner, f16_bytes, f16_value, f16_field, as_u16,
    as_u32, le_bytes, best_index, join_nibbles, split_nibbles, bit_planes, pack2, unpack2, inv, sym_codes, min_codes,
)
from refquant.kernels.table import KernelEntry
from refquant.tensor import QuantizedTensor, register_decoder

F32 = np.float32
QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: its id in GGUF files, block size (weights) and block bytes."""

    name: str
    id: int
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def can_quantize(self) -> bool:
        return self.name in FORMATS

    @property
    def can_dequantize(self) -> bool:
        return self.name in FORMATS

    def row_bytes(self, n: int) -> int:
        """Bytes of a row of ``n`` weights (``n`` must be a multiple of the block size)."""
        if n % self.block_size:
            raise ValueError(f"{self.name} rows must hold a multiple of {self.block_size} weights, got {n}")
        return n // self.block_size * self.type_size


# Every type ggml defines (ggml.h, ggml-common.h), so that files holding types refquant
# cannot decode can still be read, listed and copied.
TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2), GGMLType("Q4_0", 2, 32, 18),
        GGMLType("Q4_1", 3, 32, 20), GGMLType("Q5_0", 6, 32, 22), GGMLType("Q5_1", 7, 32, 24),
        GGMLType("Q8_0", 8, 32, 34), GGMLType("Q8_1", 9, 32, 36), GGMLType("Q2_K", 10, 256, 84),
        GGMLType("Q3_K", 11, 256, 110), GGMLType("Q4_K", 12, 256, 144), GGMLType("Q5_K", 13, 256, 176),
        GGMLType("Q6_K", 14, 256, 210), GGMLType("Q8_K", 15, 256, 292), GGMLType("IQ2_XXS", 16, 256, 66),
        GGMLType("IQ2_XS", 17, 256, 74), GGMLType("IQ3_XXS", 18, 256, 98), GGMLType("IQ1_S", 19, 256, 50),
        GGMLType("IQ4_NL", 20, 32, 18), GGMLType("IQ3_S", 21, 256, 110), GGMLType("IQ2_S", 22, 256, 82),
        GGMLType("IQ4_XS", 23, 256, 136), GGMLType("I8", 24, 1, 1), GGMLType("I16", 25, 1, 2),
        GGMLType("I32", 26, 1, 4), GGMLType("I64", 27, 1, 8), GGMLType("F64", 28, 1, 8),
        GGMLType("IQ1_M", 29, 256, 56), GGMLType("BF16", 30, 1, 2), GGMLType("TQ1_0", 34, 256, 54),
        GGMLType("TQ2_0", 35, 256, 66), GGMLType("MXFP4", 39, 32, 17), GGMLType("NVFP4", 40, 64, 36),
        GGMLType("Q1_0", 41, 128, 18), GGMLType("Q2_0", 42, 64, 18),
    )
}
TYPES_BY_ID: dict[int, GGMLType] = {t.id: t for t in TYPES.values()}


def ggml_type(t) -> GGMLType:
    """Look a type up by name (any case, e.g. ``"q4_k"``), id, or pass a ``GGMLType`` through."""
    if isinstance(t, GGMLType):
        return t
    if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
        if int(t) in TYPES_BY_ID:
            return TYPES_BY_ID[int(t)]
        raise ValueError(f"unknown ggml type id {t}; known ids: {sorted(TYPES_BY_ID)}")
    if isinstance(t, str) and t.upper() in TYPES:
        return TYPES[t.upper()]
    raise ValueError(f"unknown ggml type {t!r}; known: {', '.join(TYPES)}")


# ----------------------------------------------------------------------------- the format registry

@dataclass(frozen=True)
class ByteDotLayout:
    """How the byte-dot kernels read a type's blocks (``refquant.kernels.bytedot.pack_codes``):
    integer codes ``u`` of ``kind`` (``"s8"``, ``"u4"``, ``"u5"``, ``"u6"``; ``"l4"``: a nibble
    that indexes ``table``, 16 signed values, so ŵ = d·table[u]) per block of 32,
    its scale ``d`` shared by ``2^dshift`` blocks (times ``sc``, when the type's fields have
    one), and the offset: ``"none"`` (ŵ = d·u), ``"const"`` (ŵ = d·(u − c)) or ``"min"``
    (ŵ = d·u + m·mn, ``m`` the fields entry named, negated when ``negate_m``: the K types
    store ``dmin`` and subtract it). The codes and scales come from the type's ``fields``."""

    kind: str
    offset: str = "none"
    c: int = 0
    dshift: int = 0
    m: str | None = None
    negate_m: bool = False
    mshift: int = 0
    mnshift: int = 0
    sub16: bool = False     # Q6_K: an int8 sub-scale per 16 weights
    table: tuple | None = None   # "l4": the 16 int8 values a nibble indexes


@dataclass(frozen=True)
class BlockFormat:
    """What refquant implements for one ggml type (registered by the family modules)."""

    name: str
    quantize: Callable[[np.ndarray], np.ndarray]      # float32 blocks (B, block) -> uint8 (B, type_size)
    dequantize: Callable[[np.ndarray], np.ndarray]    # uint8 (B, type_size) -> float32 (B, block)
    levels: int | None = None          # code levels per weight (for ``grid``)
    code_fields: tuple = ()            # (first byte, end byte, kind) of each code field of a block
    scale_factor: int | None = None    # largest factor an fp16 scale is multiplied by when decoding
    fields: Callable | None = None     # uint8 (B, type_size) -> stored fields per block (``block_fields``)
    byte_dot: ByteDotLayout | None = None   # the byte-dot kernels' reading of ``fields`` (None: no kernel)
    # with an importance matrix: (float32 blocks, their columns' importances, the row's Σx²/n per
    # block) -> uint8 blocks; None: the type ignores one, as ggml's quantizer does (Q8_0, MXFP4)
    weighted: Callable | None = None


FORMATS: dict[str, BlockFormat] = {}


def register_format(name: str, quantize, dequantize, *, levels=None, code_fields=(), scale_factor=None,
                    fields=None, byte_dot: ByteDotLayout | None = None, weighted=None) -> None:
    """Register ggml type ``name``'s quantizer and dequantizer (and, for ``grid`` and
    ``error_bound``, its code fields; for the kernels, its ``block_fields`` decoder and the
    ``ByteDotLayout`` they read it by: the type's scheme then multiplies on them; ``weighted``:
    its quantizer under an importance matrix, ``BlockFormat.weighted``)."""
    if name not in TYPES:
        raise ValueError(f"{name} is not a ggml type")
    if name in FORMATS:
        raise ValueError(f"ggml type {name} is already registered")
    if byte_dot is not None and fields is None:
        raise ValueError(f"ggml type {name}: a byte-dot layout reads the type's fields; give fields=")
    FORMATS[name] = BlockFormat(name, quantize, dequantize, levels, tuple(code_fields), scale_factor, fields,
                                byte_dot, weighted)


def byte_dot_types() -> tuple[str, ...]:
    """The ggml types the byte-dot kernels multiply (a ``ByteDotLayout`` in their row)."""
    return tuple(n for n, f in FORMATS.items() if f.byte_dot is not None)


register_format("F32", lambda x: x.astype("<f4").view(np.uint8),
                lambda b: np.ascontiguousarray(b).view("<f4").astype(F32))
register_format("F16", lambda x: x.astype("<f2").view(np.uint8),
                lambda b: np.ascontiguousarray(b).view("<f2").astype(F32))


_CHUNK_BLOCKS = 1 << 14  # blocks per vectorized step: bounds temporaries at a few MB


IMPLS = ("auto", "numpy", "numba")


def quantize(x, type_name, *, imatrix=None, allow_nonfinite: bool = False, impl: str = "auto",
             threads: int | None = None) -> np.ndarray:
    """Quantize ``x[..., n]`` row by row to ggml blocks: ``uint8[..., n / block * type_size]``.

    ``x`` is converted to float32 first (ggml quantizes float32 rows); it must be finite
    (``allow_nonfinite=True``: NaN/Inf go through the same float arithmetic, unchecked
    against ggml) and ``n`` a multiple of the type's block size. The bytes equal what ggml's reference
    quantizer writes for the same float32 input.

    ``imatrix``: the importance of each of the ``n`` columns (float32, finite, >= 0; what
    llama-quantize passes: an importance matrix's ``Σx² / count`` per input column), the
    ``quant_weights`` of ``ggml_quantize_chunk``. The bytes then equal ggml's
    ``quantize_<type>(…, quant_weights)`` (llama.cpp 0c1e570), each type weighing its
    elements its own way (the family modules' ``_weighted`` quantizers): Q4_0/Q5_0/Q4_1/Q5_1
    ``qw · sqrt(σ² + x²)`` with σ² = Σx²/n over the whole row; Q2_K the same with σ² over
    its 256; Q3_K/Q4_K/Q5_K/IQ4_NL/IQ4_XS with 2Σx² over their super-block; Q6_K ``qw``
    itself. Types whose ggml quantizer ignores it (Q8_0, MXFP4, the float types) ignore it.

    ``impl``: ``"numpy"`` is the readable reference in this package's family modules;
    ``"numba"`` the compiled kernels of ``quants.compiled`` (same bytes, C speed, blocks
    spread over ``threads`` threads, default all cores); ``"auto"`` takes the compiled
    kernel when the type has one and the input is finite, else the reference.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    t = ggml_type(type_name)
    if t.name not in FORMATS:
        raise ValueError(f"refquant cannot quantize to {t.name}; quantizable types: {', '.join(FORMATS)}")
    x = float_array(x, "x", finite=not allow_nonfinite)
    if x.shape[-1] % t.block_size:
        raise ValueError(
            f"{t.name} needs rows whose length is a multiple of {t.block_size}; x has shape {x.shape}"
        )
    blocks = np.ascontiguousarray(x, dtype=F32).reshape(-1, t.block_size)
    if impl == "numba" and allow_nonfinite:
        raise ValueError("the compiled quantizers take finite input only; use impl='numpy' with allow_nonfinite")
    qw = None if imatrix is None else importance(imatrix, x.shape[-1])
    if qw is not None and FORMATS[t.name].weighted is not None:
        out = _quantize_weighted(blocks, qw, t, impl="numpy" if allow_nonfinite else impl, threads=threads)
        return out.reshape(*x.shape[:-1], x.shape[-1] // t.block_size * t.type_size)
    if impl == "numba" or (impl == "auto" and not allow_nonfinite and t.block_size > 1):
        from refquant.gguf.quants import compiled

        if t.name in compiled.KERNELS:
            out = compiled.quantize_blocks(blocks, t.name, t.type_size, threads)
            return out.reshape(*x.shape[:-1], x.shape[-1] // t.block_size * t.type_size)
        if impl == "numba":
            raise ValueError(f"no compiled quantizer for {t.name}; compiled: {', '.join(compiled.KERNELS)}")
    # fp16 scales overflow to Inf for |x| beyond ~65504 * code range, exactly as in ggml
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if t.block_size == 1:
            out = FORMATS[t.name].quantize(blocks[:, 0])
        else:  # chunk by chunk into one preallocated output: memory stays near the input's size
            out = np.empty((len(blocks), t.type_size), np.uint8)
            for i in range(0, len(blocks), _CHUNK_BLOCKS):
                out[i : i + _CHUNK_BLOCKS] = FORMATS[t.name].quantize(blocks[i : i + _CHUNK_BLOCKS])
    return out.reshape(*x.shape[:-1], x.shape[-1] // t.block_size * t.type_size)


def importance(imatrix, n: int) -> np.ndarray:
    """An importance vector checked for rows of ``n`` columns: float32[n], finite, >= 0."""
    w = np.asarray(imatrix)
    if w.dtype.kind not in "fiu":
        raise TypeError(f"imatrix must be a float array of {n} column importances, got dtype {w.dtype}")
    if w.shape != (n,):
        raise ValueError(f"imatrix has shape {w.shape}; rows of {n} columns need one importance per column, ({n},)")
    w = w.astype(F32)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("imatrix holds NaN, Inf or negative importances")
    return w


def _row_terms(blocks, qw, block: int):
    """Per block of whole rows of ``qw.size`` weights: its row's Σx²/n (C: ``Σ x[j]*x[j] /
    n_per_row``, float32, in order; Inf for huge rows, as in C) and its columns' importances."""
    n = qw.size
    x = blocks.reshape(-1, n)
    with np.errstate(over="ignore", invalid="ignore"):
        s2 = np.repeat(seqsum(x * x) / F32(n), n // block).astype(F32)
    return s2, np.broadcast_to(qw.reshape(1, -1, block), (len(x), n // block, block)).reshape(-1, block)


def _quantize_weighted(blocks, qw, t: GGMLType, impl: str = "auto", threads: int | None = None) -> np.ndarray:
    """Blocks of rows of ``qw.size`` weights under importances ``qw`` (``quantize``), chunk by
    chunk of whole rows; every block gets its columns' importances and its row's Σx²/n. The
    compiled kernel (``compiled.WEIGHTED``) unless ``impl="numpy"``."""
    n = qw.size
    per_row = n // t.block_size
    rows = len(blocks) // per_row
    if impl != "numpy":
        from refquant.gguf.quants import compiled

        if t.name in compiled.WEIGHTED:
            s2, w = _row_terms(blocks, qw, t.block_size)
            return compiled.quantize_weighted(blocks, s2=s2, qw=np.ascontiguousarray(w), name=t.name,
                                              type_size=t.type_size, threads=threads)
        if impl == "numba":
            raise ValueError(f"no compiled quantizer for {t.name} with an importance matrix; use impl='numpy'")
    out = np.empty((len(blocks), t.type_size), np.uint8)
    step = max(1, _CHUNK_BLOCKS // per_row)
    fn = FORMATS[t.name].weighted
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for r in range(0, rows, step):
            x = blocks[r * per_row:(r + step) * per_row]
            s2, w = _row_terms(x, qw, t.block_size)
            out[r * per_row:r * per_row + len(x)] = fn(x, w, s2)
    return out


def dequantize(raw, type_name, shape, *, impl: str = "auto", threads: int | None = None) -> np.ndarray:
    """Decode ggml block bytes to ``float32`` of ``shape`` (NumPy order, last axis = row).

    ``raw`` is any uint8 buffer holding exactly ``prod(shape[:-1]) * row_bytes`` bytes.
    ``impl`` as in ``quantize``: the compiled decoders (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
    Q5_K, Q6_K) give the NumPy reference's floats bit for bit, also for Inf/NaN scales.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    t = ggml_type(type_name)
    if t.name not in FORMATS:
        raise ValueError(f"refquant cannot dequantize {t.name}; supported: {', '.join(FORMATS)}")
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise TypeError(f"raw must be a uint8 array of block bytes, got dtype {raw.dtype}")
    n = shape[-1] if shape else 1
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    need = rows * t.row_bytes(n)
    if raw.size != need:
        raise ValueError(f"{t.name} tensor of shape {shape} needs {need} bytes, got {raw.size}")
    blocks = raw.reshape(-1, t.type_size)
    if len(blocks) == 0:
        return np.zeros(shape, F32)
    if impl != "numpy" and t.block_size > 1:
        from refquant.gguf.quants import compiled

        if t.name in compiled.DEQUANTIZERS:
            return compiled.dequantize_blocks(blocks, t.name, t.block_size, threads).reshape(shape)
        if impl == "numba":
            raise ValueError(f"no compiled dequantizer for {t.name}; compiled: {', '.join(compiled.DEQUANTIZERS)}")
    fn = FORMATS[t.name].dequantize
    with np.errstate(all="ignore"):  # crafted scales may be Inf/NaN; decode them as ggml does
        if t.block_size == 1:
            out = fn(blocks.reshape(-1))
        else:
            out = np.empty((len(blocks), t.block_size), F32)
            for i in range(0, len(blocks), _CHUNK_BLOCKS):
                out[i : i + _CHUNK_BLOCKS] = fn(blocks[i : i + _CHUNK_BLOCKS])
    return out.astype(F32, copy=False).reshape(shape)


# ----------------------------------------------------------------------------- code grids

def fill_byte(kind: str, v: int) -> int:
    """Byte value that sets every code of a field of ``kind`` to level ``v``: ``nibble`` (both
    nibbles), ``crumb0``/``crumb4`` (2-bit fields holding bits 0-1 / 4-5 of the level),
    ``bit2``/``bit4`` (single bits holding bit 2 / 4 of the level) or ``byte``."""
    if kind == "nibble":
        return (v & 15) * 0x11
    if kind.startswith("crumb"):
        return ((v >> int(kind[5:])) & 3) * 0x55
    if kind.startswith("bit"):
        return 0xFF if (v >> int(kind[3:])) & 1 else 0
    return v & 0xFF


def grid_types() -> list[str]:
    """The ggml types ``grid`` and ``error_bound`` cover."""
    return [n for n, f in FORMATS.items() if f.levels is not None]


def grid(raw, type_name, shape) -> np.ndarray:
    """Every value each weight can decode to, given its block's stored scales.

    Returns ``float32[levels, *shape]``: entry ``[v]`` is the tensor decoded with every code
    set to level ``v`` (scales, minima and super-block scales untouched). A ggml quantizer
    that rounds to nearest puts each weight on the grid point closest to it (up to the
    fp16 rounding of a scale it divided by), which is what the error bound tests check.
    """
    t = ggml_type(type_name)
    fmt = FORMATS.get(t.name)
    if fmt is None or fmt.levels is None:
        raise ValueError(f"no code grid for {t.name}; types with one: {', '.join(grid_types())}")
    levels, fields = fmt.levels, fmt.code_fields
    blocks = np.asarray(raw, np.uint8).reshape(-1, t.type_size)
    out = np.empty((levels, *shape), F32)
    for v in range(levels):
        b = blocks.copy()
        for lo, hi, kind in fields:
            b[:, lo:hi] = fill_byte(kind, v)
        out[v] = dequantize(b, t, shape)
    return out


def error_bound(w, raw, type_name) -> np.ndarray:
    """Per-element bound on ``|w - dequantize(raw)|``: distance to the nearest grid point,
    plus 2^-9 of the block's largest grid magnitude (fp16 rounding of scale and min, normal
    range) plus ``2 * factor * 2^-25`` (their rounding when the fp16 scale is subnormal).

    Both rounding terms count twice: ggml picks each code on the grid of the *unrounded*
    scale, so the code it picks can be the nearest there and not on the stored grid; the
    chosen point moves by the rounding one way and the nearest stored one the other way."""
    w = np.asarray(w, np.float64)
    g = grid(raw, type_name, w.shape).astype(np.float64)
    t = ggml_type(type_name)
    mag = np.abs(g).max(axis=0).reshape(-1, t.block_size).max(axis=1, keepdims=True)
    mag = np.broadcast_to(mag, (mag.shape[0], t.block_size)).reshape(w.shape)
    return np.abs(g - w).min(axis=0) + mag * 2.0**-9 + np.abs(w) * 2.0**-20 + FORMATS[t.name].scale_factor * 2.0**-24


# ----------------------------------------------------------------------------- fields

def block_fields(raw, type_name: str, n: int) -> dict:
    """The stored fields of ggml blocks, decoded but not combined, for kernels that repack.

    ``raw`` is ``uint8[rows, row_bytes]`` of rows of ``n`` weights. Returns ``codes``:
    ``uint8[rows, n]`` as stored (unsigned: Q4_0's ``q + 8``, Q5_0's ``q + 16``, Q6_K's
    ``q + 32``; Q8_0's int8 codes as their uint8 bit patterns) and the scale fields as raw
    fp16 bit patterns (``uint16``) or small integers, one column per block:

    * Q8_0, Q4_0, Q5_0: ``d`` per 32.  Q4_1, Q5_1: ``d`` and ``m`` per 32.
    * Q4_K, Q5_K: ``d`` and ``dmin`` per 256, ``sc`` and ``mn`` (uint8, 6-bit) per 32.
    * Q6_K: ``d`` per 256, ``sc`` (int8) per 16.
    * IQ4_NL: ``d`` per 32, codes the nibbles (indices into ``KVALUES_IQ4NL``).  IQ4_XS:
      ``d`` per 256, ``sc`` (int8, ls − 32) per 32.

    Each type's dequantization is ``d·(codes - offset)``, ``d·codes + m`` or
    ``d·sc·codes - dmin·mn`` per element, exactly as ``dequantize`` computes it.
    """
    t = ggml_type(type_name)
    fmt = FORMATS.get(t.name)
    if fmt is None or fmt.fields is None:
        kinds = ", ".join(n for n, f in FORMATS.items() if f.fields is not None)
        raise ValueError(f"block_fields does not decode {t.name}; it covers {kinds}")
    raw = np.ascontiguousarray(raw, np.uint8)
    rows = raw.shape[0]
    return {k: v.reshape(rows, -1) for k, v in fmt.fields(raw.reshape(-1, t.type_size)).items()}


# ----------------------------------------------------------------------------- QuantizedTensor

def quantize_tensor(w, type_name, scheme: str | None = None):
    """Quantize a 2-D ``w`` (out, in) to a ``QuantizedTensor`` holding the ggml block bytes.

    ``codes`` is ``uint8[out, row_bytes]``, exactly what a GGUF file stores for the tensor;
    scales and minima live inside the blocks, so ``scales`` and ``zeros`` are None.
    """
    t = ggml_type(type_name)
    return from_raw(quantize(w, t), t, w.shape, scheme)


def from_raw(raw, type_name, shape, scheme: str | None = None):
    """A 2-D tensor's block bytes (as a GGUF file stores them) as a ``QuantizedTensor`` of kind
    ``ggml``: ``codes`` is ``uint8[out, row_bytes]``, scheme the type's lower-case name."""
    t = ggml_type(type_name)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise ValueError(f"a ggml matrix is 2-D, got shape {shape}")
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if raw.size != shape[0] * t.row_bytes(shape[1]):
        raise ValueError(f"{t.name} {shape} needs {shape[0] * t.row_bytes(shape[1])} bytes, got {raw.size}")
    return QuantizedTensor(raw.reshape(shape[0], -1), None, None, shape, scheme or t.name.lower(),
                           {"kind": "ggml", "ggml_type": t.name})


def pack_ggml(raw, type_name: str, n: int):
    """Block bytes ``uint8[rows, row_bytes]`` of rows of ``n`` weights in the byte-dot kernels'
    layout (``kernels.bytedot.Packed``), as the type's ``ByteDotLayout`` says."""
    from refquant.kernels import bytedot   # numba loads here

    t = ggml_type(type_name).name
    layout = FORMATS[t].byte_dot if t in FORMATS else None
    if layout is None:
        raise ValueError(f"no byte-dot kernel for {t}; kernels exist for {', '.join(byte_dot_types())}")
    return bytedot.pack_fields(block_fields(raw, t, n), layout, n)


GGML_KERNEL = KernelEntry(lambda qt: pack_ggml(qt.codes, qt.meta["ggml_type"], qt.shape[1]))


def register_scheme(type_name: str, description: str) -> None:
    """Register ggml type ``type_name`` as the scheme ``type_name.lower()`` (``refquant.schemes``):
    ``quantize_tensor`` with ``error_bound`` as its bound, multiplied on the byte-dot kernels
    when its row has a ``ByteDotLayout``."""
    from refquant.schemes import Spec, register

    bpw = TYPES[type_name].bits_per_weight
    fmt = FORMATS[type_name]
    kernel = GGML_KERNEL if fmt.byte_dot is not None else None
    spec = Spec(int(fmt.levels - 1).bit_length(), "ggml", "block", scale_dtype="ggml",
                activations="q8_0" if kernel else "float", ggml_type=type_name)
    register(type_name.lower(), spec=spec, description=f"GGML {type_name} ({bpw:g} bpw): {description}",
             bound=lambda w, qt: error_bound(w, qt.codes, type_name), kernel=kernel)(
        lambda w, *, calib=None: quantize_tensor(w, type_name))


@register_decoder("ggml")
def _decode_ggml(qt):
    return dequantize(qt.codes, qt.meta["ggml_type"], qt.shape)
