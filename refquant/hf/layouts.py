"""The three int-packed layouts of quantized Linear weights that vLLM and transformers load,
as arrays: ``QuantizedTensor`` ↔ the tensors a checkpoint stores for one Linear layer.

Read from the packers themselves (the conventions differ in three ways: which dimension
the int32 words run along, whether the zero point is stored off by one, and the order of
the nibbles in a word):

* **GPTQ** (AutoGPTQ ``auto_gptq/nn_modules/qlinear/qlinear_exllama.py`` ``pack``):
  ``qweight`` int32 ``(in·b/32, out)``: the unsigned codes ``u = round(w/s) + z`` packed
  along the *input* dimension, ``32/b`` per word, first code in the lowest bits;
  ``qzeros`` int32 ``(groups, out·b/32)``: the zero points packed along the *output*
  dimension the same way, **stored as z − 1** in the original ("v1", ``checkpoint_format
  "gptq"``) format and as z in ``"gptq_v2"``; ``scales`` fp16 ``(groups, out)``; ``g_idx``
  int32 ``(in,)``: the group of every input column (act-order permutes it).
  ``ŵ[o, i] = scales[g, o] · (u[i, o] − z[g, o])`` with ``g = g_idx[i]``.
* **AWQ** (AutoAWQ ``awq/modules/linear/gemm.py`` ``WQLinear_GEMM.from_linear``): 4-bit only;
  ``qweight`` int32 ``(in, out/8)`` packed along the *output* dimension with the nibbles
  interleaved: nibble ``k`` of word ``c`` holds output column ``8c + [0, 2, 4, 6, 1, 3, 5,
  7][k]``; ``qzeros`` int32 ``(groups, out/8)`` in the same order, z stored as it is;
  ``scales`` fp16 ``(groups, out)``; groups are contiguous (no act-order).
* **compressed-tensors** ``pack-quantized`` (``src/compressed_tensors/compressors/
  quantized_compressors/pack_quantized.py``): codes are signed (``q`` in ``[−2^(b−1),
  2^(b−1))``) and packed as ``q + 2^(b−1)``; ``weight_packed`` int32 ``(out, ⌈in·b/32⌉)``
  along the *input* dimension, zero-padded; ``weight_scale`` ``(out, groups)``;
  ``weight_zero_point`` (asymmetric grids only) signed, packed the same way along the
  *output* dimension: int32 ``(⌈out·b/32⌉, groups)``; ``weight_shape`` int32 ``[out, in]``;
  ``weight_g_idx`` for act-order. ``ŵ = scale · (q − zero_point)``.

refquant's symmetric grids store signed codes with no zero point; in GPTQ and AWQ they are
``u = q + 2^(b−1)`` with every zero point ``2^(b−1)``, in compressed-tensors ``q`` itself.
Its asymmetric grids store ``u`` and ``z`` in ``[0, 2^b)``; compressed-tensors holds them
as ``u − 2^(b−1)`` and ``z − 2^(b−1)``. In every case the dequantized weights are the same
floats: ``dequantize_*`` below compute them by each layout's own definition, and the tests
compare that with ``QuantizedTensor.dequantize()``.
"""
from __future__ import annotations

import numpy as np

from refquant import affine, packing
from refquant.tensor import QuantizedTensor

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])      # nibble k of a word holds column 8c + AWQ_ORDER[k]
GPTQ_FORMATS = ("gptq", "gptq_v2")


def _grid(qt: QuantizedTensor):
    """``(u, z, g_idx, bits, sym, group_size)`` of an affine or GPTQ ``QuantizedTensor``:
    unsigned codes ``u`` (out, in), zero points ``z`` (out, groups), group of every input."""
    m = qt.meta
    if qt.kind not in ("affine", "gptq"):
        raise ValueError(f"only affine and GPTQ tensors have an int-packed layout, got kind {qt.kind!r}")
    if qt.kind == "affine" and (m["granularity"] not in ("group", "channel") or m.get("full_range")):
        raise ValueError("the int-packed layouts hold per-group or per-channel grids of restricted range; "
                         f"got granularity {m['granularity']!r}, full_range {m.get('full_range')}")
    if qt.scales.dtype != np.float16:
        raise ValueError(f"the int-packed layouts store fp16 scales, got {qt.scales.dtype}")
    out, n = qt.shape
    bits, sym = m["bits"], m["sym"]
    if qt.kind == "gptq":
        q = packing.unpack(qt.codes, bits, n, signed=sym).reshape(out, n).astype(np.int64)
        g_idx, gs = np.asarray(m["g_idx"], np.int32), m["group_size"]
    else:
        if m["padded_shape"] != (out, n):
            raise ValueError(f"a padded tensor ({m['padded_shape']} for {qt.shape}) has no int-packed layout")
        q = affine.codes(qt).astype(np.int64)
        gs = n if m["granularity"] == "channel" else m["group_size"]
        g_idx = (np.arange(n) // gs).astype(np.int32)
    half = 1 << (bits - 1)
    if sym:
        return q + half, np.full(qt.scales.shape, half, np.int64), g_idx, bits, sym, gs
    return q, qt.zeros.astype(np.int64), g_idx, bits, sym, gs


def _unpack(layout: str, name: str, arr, bits: int, n: int, axis: int) -> np.ndarray:
    """``packing.unpack_int32`` with errors that name the layout and the tensor."""
    try:
        return packing.unpack_int32(np.asarray(arr), bits, n, axis=axis).astype(np.int64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{layout} tensors disagree: {name}: {e}") from None


def _tensor(u, z, scales, g_idx, bits: int, sym: bool, gs: int, scheme: str) -> QuantizedTensor:
    """A refquant ``QuantizedTensor`` from unsigned codes ``u`` (out, in), zeros (out, groups)."""
    out, n = u.shape
    half = 1 << (bits - 1)
    if sym and not np.all(z == half):
        raise ValueError(f"a symmetric grid has every zero point at {half}; found {np.unique(z)[:8]}")
    codes = packing.pack((u - half if sym else u).astype(np.int16), bits, signed=sym)
    zeros = None if sym else z.astype(np.uint8)
    scales = np.ascontiguousarray(scales, np.float16)
    natural = n % gs == 0 and np.array_equal(g_idx, np.arange(n) // gs)
    if not natural:   # act-order, or a short last group: the general form, a group per input
        meta = dict(kind="gptq", bits=bits, sym=sym, group_size=gs, g_idx=np.asarray(g_idx, np.int32))
        return QuantizedTensor(codes, scales, zeros, (out, n), scheme, meta)
    channel = scales.shape[1] == 1 and gs == n
    meta = dict(kind="affine", bits=bits, sym=sym, full_range=False, granularity="channel" if channel else "group",
                axis=0 if channel else None, group_size=None if channel else gs, padded_shape=(out, n))
    return QuantizedTensor(codes, scales, zeros, (out, n), scheme, meta)


# ----------------------------------------------------------------------------- GPTQ

def to_gptq(qt: QuantizedTensor, checkpoint_format: str = "gptq") -> dict:
    """``{qweight, qzeros, scales, g_idx}`` of AutoGPTQ's layout (v1 ``"gptq"`` stores z − 1)."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {GPTQ_FORMATS}, got {checkpoint_format!r}")
    u, z, g_idx, bits, _, _ = _grid(qt)
    if bits not in packing.INT32_BITS:
        raise ValueError(f"GPTQ's int32 words hold 2, 4 or 8-bit codes here, got {bits} bits")
    stored = (z - 1) & ((1 << bits) - 1) if checkpoint_format == "gptq" else z
    return dict(qweight=packing.pack_int32(u.T, bits, axis=0), qzeros=packing.pack_int32(stored.T, bits, axis=1),
                scales=np.ascontiguousarray(qt.scales.T, np.float16), g_idx=g_idx)


def _gptq_fields(t: dict, bits: int, checkpoint_format: str):
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {GPTQ_FORMATS}, got {checkpoint_format!r}")
    scales = np.asarray(t["scales"])
    groups, out = scales.shape
    n = len(t["g_idx"])
    u = _unpack("GPTQ", "qweight", t["qweight"], bits, n, 0).T      # (out, in)
    z = _unpack("GPTQ", "qzeros", t["qzeros"], bits, out, 1)         # (groups, out)
    if checkpoint_format == "gptq":
        z = z + 1   # v1 stores z - 1; a stored 15 (z = 0 written as -1) reads back as 16, as AutoGPTQ does
    g_idx = np.asarray(t["g_idx"], np.int64)
    if u.shape != (out, n) or g_idx.min() < 0 or g_idx.max() + 1 != groups:
        raise ValueError(f"GPTQ tensors disagree: qweight gives {u.shape}, scales {scales.shape}, "
                         f"g_idx of {n} inputs in groups {g_idx.min()}..{g_idx.max()}")
    return u, z, scales, g_idx


def dequantize_gptq(t: dict, bits: int = 4, checkpoint_format: str = "gptq") -> np.ndarray:
    """``ŵ[o, i] = scales[g_idx[i], o] · (u[i, o] − z[g_idx[i], o])`` (float32, (out, in))."""
    u, z, scales, g_idx = _gptq_fields(t, bits, checkpoint_format)
    return ((u - z[g_idx].T).astype(np.float32) * scales[g_idx].T.astype(np.float32)).astype(np.float32)


def from_gptq(t: dict, bits: int = 4, *, sym: bool = True, checkpoint_format: str = "gptq",
              scheme: str | None = None) -> QuantizedTensor:
    """A ``QuantizedTensor`` from AutoGPTQ tensors (``quantize_config.json``'s bits, sym and
    checkpoint_format). Act-order ``g_idx`` gives kind ``gptq``; natural order an affine one."""
    u, z, scales, g_idx = _gptq_fields(t, bits, checkpoint_format)
    # the group width is the largest group's: AutoGPTQ gives a row of n inputs ceil(n / g)
    # groups, the last one short when g does not divide n (SmolLM2's 576 inputs at g 128: 4 x 128 + 64)
    gs = int(np.bincount(g_idx).max())
    # (an asymmetric v1 zero point of 0 reads back as 2^b, as AutoGPTQ decodes it; uint8 holds it)
    return _tensor(u, z.T, scales.T, g_idx, bits, sym, gs, scheme or f"gptq_int{bits}_g{gs}")


# ----------------------------------------------------------------------------- AWQ

def _awq_pack(v: np.ndarray) -> np.ndarray:
    """(rows, cols) codes in [0, 16) → int32 (rows, cols/8), nibble k ← column 8c + AWQ_ORDER[k]."""
    rows, cols = v.shape
    if cols % 8:
        raise ValueError(f"AWQ packs 8 output columns per int32; {cols} is not a multiple of 8")
    v = v.reshape(rows, cols // 8, 8)[:, :, AWQ_ORDER].astype(np.uint32)
    return np.bitwise_or.reduce(v << (4 * np.arange(8, dtype=np.uint32)), axis=-1).view(np.int32)


def _awq_unpack(w: np.ndarray) -> np.ndarray:
    words = np.asarray(w).view(np.uint32)
    nib = (words[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF     # [.., c, k]
    out = np.empty_like(nib)
    out[..., AWQ_ORDER] = nib                                                  # column 8c + ORDER[k] = nibble k
    return out.reshape(words.shape[0], -1).astype(np.int64)


def to_awq(qt: QuantizedTensor) -> dict:
    """``{qweight, qzeros, scales}`` of AutoAWQ's GEMM layout (4-bit, contiguous groups)."""
    u, z, g_idx, bits, _, gs = _grid(qt)
    if bits != 4:
        raise ValueError(f"AWQ's GEMM layout holds 4-bit codes, got {bits} bits")
    if not np.array_equal(g_idx, np.arange(len(g_idx)) // gs):
        raise ValueError("AWQ has no act-order: groups must be contiguous runs of input columns")
    if len(g_idx) % gs:
        raise ValueError(f"AWQ's groups divide the row: group size {gs} does not divide {len(g_idx)} inputs")
    return dict(qweight=_awq_pack(u.T), qzeros=_awq_pack(z.T), scales=np.ascontiguousarray(qt.scales.T, np.float16))


def _awq_fields(t: dict, group_size: int):
    for name in ("qweight", "qzeros"):
        if np.asarray(t[name]).dtype != np.int32:
            raise ValueError(f"AWQ tensors disagree: {name} must be int32, got {np.asarray(t[name]).dtype}")
    scales = np.asarray(t["scales"])
    u, z = _awq_unpack(t["qweight"]), _awq_unpack(t["qzeros"])          # (in, out), (groups, out)
    n = u.shape[0]
    if z.shape != scales.shape or u.shape[1] != scales.shape[1] or n != scales.shape[0] * group_size:
        raise ValueError(f"AWQ tensors disagree: qweight {u.shape}, qzeros {z.shape}, scales {scales.shape}, "
                         f"group_size {group_size}")
    return u, z, scales


def dequantize_awq(t: dict, group_size: int) -> np.ndarray:
    """``ŵ[o, i] = scales[i // g, o] · (u[i, o] − z[i // g, o])`` (float32, (out, in))."""
    u, z, scales = _awq_fields(t, group_size)
    g = np.arange(u.shape[0]) // group_size
    return ((u - z[g]).T.astype(np.float32) * scales[g].T.astype(np.float32)).astype(np.float32)


def from_awq(t: dict, group_size: int, *, scheme: str | None = None) -> QuantizedTensor:
    """A ``QuantizedTensor`` (asymmetric 4-bit groups) from AutoAWQ GEMM tensors."""
    u, z, scales = _awq_fields(t, group_size)
    n = u.shape[0]
    return _tensor(u.T, z.T, scales.T, np.arange(n) // group_size, 4, False, group_size,
                   scheme or f"awq_int4_g{group_size}")


# ----------------------------------------------------------------------------- compressed-tensors

def to_compressed(qt: QuantizedTensor) -> dict:
    """``{weight_packed, weight_scale, weight_shape[, weight_zero_point][, weight_g_idx]}`` of
    compressed-tensors' ``pack-quantized`` format."""
    u, z, g_idx, bits, sym, gs = _grid(qt)
    if bits not in packing.INT32_BITS:
        raise ValueError(f"pack-quantized words hold 2, 4 or 8-bit codes here, got {bits} bits")
    if len(g_idx) % gs:   # its reader takes the group width as inputs // groups
        raise ValueError(f"pack-quantized groups divide the row: group size {gs} does not divide {len(g_idx)} inputs")
    out = dict(weight_packed=packing.pack_int32(u, bits, axis=1),   # q + 2^(b-1) = u in both grids
               weight_scale=np.ascontiguousarray(qt.scales, np.float16),
               weight_shape=np.array(qt.shape, np.int32))
    if not sym:
        out["weight_zero_point"] = packing.pack_int32(z, bits, axis=0)
    if not np.array_equal(g_idx, np.arange(len(g_idx)) // gs):
        out["weight_g_idx"] = g_idx
    return out


def _compressed_fields(t: dict, bits: int, sym: bool):
    out, n = (int(v) for v in np.asarray(t["weight_shape"]))
    scale = np.asarray(t["weight_scale"])
    u = _unpack("compressed-tensors", "weight_packed", t["weight_packed"], bits, n, 1)
    if u.shape[0] != out or scale.shape[0] != out or n % scale.shape[1]:
        raise ValueError(f"compressed-tensors tensors disagree: weight_shape {(out, n)}, weight_packed gives "
                         f"{u.shape}, weight_scale {scale.shape}")
    half = 1 << (bits - 1)
    if sym:
        if "weight_zero_point" in t and np.any(np.asarray(t["weight_zero_point"]) != 0):
            raise ValueError("a symmetric grid has zero points of 0")
        z = np.full(scale.shape, half, np.int64)
    else:
        if "weight_zero_point" not in t:
            raise ValueError("compressed-tensors tensors disagree: an asymmetric grid needs weight_zero_point")
        z = _unpack("compressed-tensors", "weight_zero_point", t["weight_zero_point"], bits, out, 0)
    gs = n // scale.shape[1]
    g_idx = np.asarray(t["weight_g_idx"], np.int64) if "weight_g_idx" in t else np.arange(n) // gs
    return u, z, scale, g_idx, gs


def dequantize_compressed(t: dict, bits: int = 4, sym: bool = True) -> np.ndarray:
    """``ŵ = scale · (q − zero_point)`` with ``q = stored − 2^(b−1)`` (and the zero point too)."""
    u, z, scale, g_idx, _ = _compressed_fields(t, bits, sym)
    return ((u - z[:, g_idx]).astype(np.float32) * scale[:, g_idx].astype(np.float32)).astype(np.float32)


def from_compressed(t: dict, bits: int = 4, *, sym: bool = True, scheme: str | None = None) -> QuantizedTensor:
    """A ``QuantizedTensor`` from compressed-tensors ``pack-quantized`` tensors."""
    u, z, scale, g_idx, gs = _compressed_fields(t, bits, sym)
    return _tensor(u, z, scale, g_idx, bits, sym, gs, scheme or f"int{bits}_g{gs}")
