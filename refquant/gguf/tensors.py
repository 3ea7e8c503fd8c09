"""``QuantizedTensor`` s in GGUF files, written so that llama.cpp reads what it can.

* A tensor of kind ``ggml`` (Q8_0, Q4_K, IQ4_NL, …) is written as that ggml type: its
  ``codes`` are already the block bytes.
* An unscaled FP16/BF16 tensor is written as F16/BF16 (its codes are those bytes).
* Any other scheme (GPTQ with act-order, NF4, AWQ, W8A8, …) is written as its parts:
  ``KEY.codes`` / ``.scales`` / ``.zeros`` and ``.meta.<name>`` for every array in
  ``QuantizedTensor.meta``, the bytes kept bit for bit (unsigned data as the signed GGUF
  type of the same width); the other meta values, the dtypes and the shape go to the
  metadata key ``refquant.KEY`` as JSON. llama.cpp ignores keys and tensors it does not use.

``to_gguf(key, qt)`` gives the tensors and metadata to write; ``read_quantized(f)``
rebuilds every ``QuantizedTensor`` of an open ``GGUFFile`` (ggml-typed tensors included),
bit-identical to what was written (tested).
"""
from __future__ import annotations

import json

import numpy as np

from refquant.gguf.file import GGUFError, GGUFFile, GGUFTensor
from refquant.gguf.quants import from_raw
from refquant.gguf.quants.core import f16_bytes, join_nibbles
from refquant.tensor import QuantizedTensor

_FLOAT_GGML = {"fp16": "F16", "bf16": "BF16"}   # unscaled float schemes whose codes are a ggml type's bytes
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")     # read back as plain float arrays, not QuantizedTensors
_PREFIX = "refquant."


def _storable(a: np.ndarray) -> np.ndarray:
    """``a`` as a GGUF-storable array with the same bytes (unsigned → signed view)."""
    a = np.ascontiguousarray(a)
    if a.ndim == 0:
        a = a.reshape(1)
    return a.view(a.dtype.str.replace("u", "i")) if a.dtype.kind == "u" else a


def to_gguf(key: str, qt: QuantizedTensor) -> tuple[dict, dict]:
    """``(tensors, metadata)`` that store ``qt`` under the tensor name ``key``."""
    if qt.kind == "ggml":
        return {key: GGUFTensor(qt.meta["ggml_type"], qt.shape, qt.codes)}, {}
    if qt.meta.get("granularity") == "none" and qt.meta.get("fmt") in _FLOAT_GGML:
        raw = np.ascontiguousarray(qt.codes).view(np.uint8).reshape(-1)
        return {key: GGUFTensor(_FLOAT_GGML[qt.meta["fmt"]], qt.shape, raw)}, {}
    parts = {"codes": qt.codes, "scales": qt.scales, "zeros": qt.zeros}
    parts.update({f"meta.{k}": v for k, v in qt.meta.items() if isinstance(v, np.ndarray)})
    info = {"shape": list(qt.shape), "scheme": qt.scheme, "dtypes": {}, "shapes": {},
            "meta": {k: v for k, v in qt.meta.items() if not isinstance(v, np.ndarray)}}
    tensors = {}
    for part, arr in parts.items():
        if arr is not None:
            info["dtypes"][part], info["shapes"][part] = arr.dtype.name, list(arr.shape)
            tensors[f"{key}.{part}"] = _storable(arr)
    meta = {_PREFIX + key: json.dumps(info, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))}
    return tensors, meta


def part_names(f: GGUFFile) -> set[str]:
    """Names of the tensors in ``f`` that are parts of a stored ``QuantizedTensor``."""
    out = set()
    for k in f.metadata:
        if k.startswith(_PREFIX):
            out.update(f"{k[len(_PREFIX):]}.{p}" for p in json.loads(f.metadata[k])["dtypes"])
    return out


def read_quantized(f: GGUFFile) -> dict[str, QuantizedTensor]:
    """Every quantized tensor of ``f`` by tensor name: 2-D ggml-typed tensors (not F32/F16)
    and the ``QuantizedTensor`` s stored as parts (``to_gguf``)."""
    out = {}
    for n, info in f.tensors.items():
        if len(info.shape) == 2 and info.type.name not in _FLOAT_TYPES and info.type.can_dequantize:
            out[n] = from_raw(np.array(f.tensor(n).raw), info.type.name, info.shape)
    for k in [k for k in f.metadata if k.startswith(_PREFIX)]:
        key = k[len(_PREFIX):]
        try:
            info = json.loads(f.metadata[k])
            arrays = {part: np.array(f.tensor(f"{key}.{part}").numpy()).view(np.dtype(dt)).reshape(info["shapes"][part])
                      for part, dt in info["dtypes"].items()}
            meta = {m: tuple(v) if isinstance(v, list) else v for m, v in info["meta"].items()}
            meta.update({p[5:]: a for p, a in arrays.items() if p.startswith("meta.")})
            out[key] = QuantizedTensor(arrays["codes"], arrays.get("scales"), arrays.get("zeros"),
                                       tuple(info["shape"]), info["scheme"], meta)
        except (KeyError, ValueError, TypeError) as e:
            raise GGUFError(f"{f.path}: stored tensor {key!r} is malformed: {e}") from e
    return out


def as_ggml(qt: QuantizedTensor) -> tuple[np.ndarray, str, float]:
    """A 4-bit group-affine tensor (RTN, GPTQ, AWQ codes) as llama.cpp blocks, without
    re-rounding the weights: ``(raw, type_name, m_error)``.

    A group of ``g`` (a multiple of 32) input columns with fp16 scale ``s`` is ``g/32``
    blocks of 32 that all take ``d = s`` (a per-row scale: one group as wide as the row; a
    short last group, as AutoGPTQ writes: fewer blocks):

    * symmetric codes ``q`` in [-8, 7] are **Q4_0** with nibble ``q + 8``: ggml's
      ``(nibble - 8)·d`` is the same float32 product as ``s·q``, so it dequantizes bit for
      bit as ``qt`` does;
    * asymmetric codes ``u`` in [0, 15] with zero point ``z`` are **Q4_1** with nibble ``u``
      and ``m = fp16(-z·s)``: ``u·d + m`` against ``s·(u - z)``. ``-z·s`` has up to 15
      significant bits and fp16 keeps 11, so m rounds; ``m_error`` is the largest
      ``|m - (-z·s)|`` over the tensor (0 for Q4_0), and every weight moves by at most
      that plus the float32 rounding of the sum.

    Groups must be contiguous (no act-order permutation: GGUF has no ``g_idx``) and scales
    fp16; anything else raises ValueError (requantize it from the dequantized weight). AWQ
    codes carry an input scaling ``s`` a GGUF tensor has no place for: fold it into the op
    before first (``minigpt_np.llama.awq_model``), which leaves plain group-affine codes.
    """
    from refquant import packing

    m = qt.meta
    kind = m.get("kind")
    if kind == "awq":
        raise ValueError(f"{qt.scheme!r}: AWQ's input scaling s has no place in a GGUF tensor; fold it into "
                         "the preceding op and quantize the folded weight (minigpt_np.llama.awq_model)")
    if kind not in ("affine", "gptq") or m.get("bits") != 4:
        raise ValueError(f"{qt.scheme!r}: only 4-bit affine / GPTQ codes map to Q4_0 / Q4_1 exactly")
    out, n = qt.shape
    if kind == "affine":
        if m.get("granularity") not in ("group", "channel") or (m["granularity"] == "channel" and m.get("axis") != 0):
            raise ValueError(f"{qt.scheme!r}: needs group-wise or per-row scales, got granularity "
                             f"{m.get('granularity')!r}")
        if tuple(m["padded_shape"]) != (out, n):
            raise ValueError(f"{qt.scheme!r}: padded rows ({m['padded_shape']}) have no GGUF form")
    gs = n if m.get("granularity") == "channel" else int(m["group_size"])   # per row: one group of n
    if kind == "gptq":
        if not np.array_equal(m["g_idx"], np.arange(n) // gs):
            raise ValueError(f"{qt.scheme!r}: act-order groups (a permuted g_idx) have no GGUF form")
    if gs % 32:
        raise ValueError(f"{qt.scheme!r}: group size {gs} is not a multiple of 32 (a ggml block)")
    if n % 32:
        raise ValueError(f"{qt.scheme!r}: row width {n} is not a multiple of 32 (a ggml block)")
    if qt.scales.dtype != np.float16:
        raise ValueError(f"{qt.scheme!r}: scales are {qt.scales.dtype}, not fp16; the blocks would round them")
    sym = bool(m["sym"])
    q = packing.unpack(qt.codes, 4, n, signed=sym).reshape(out, n).astype(np.int16)
    # one scale per block of 32 (a block lies in one group: gs % 32 == 0); a short last group
    # (AutoGPTQ's ceil(n / gs) groups) has fewer blocks than the others
    group = np.arange(0, n, 32) // gs                                   # the group of every block
    d = qt.scales.astype(np.float32)[:, group].reshape(-1)
    blocks = (q + 8 if sym else q).reshape(-1, 32)
    if sym and blocks.min() < 0:
        raise ValueError(f"{qt.scheme!r}: symmetric codes below -8 do not fit a Q4_0 nibble")
    qs = join_nibbles(blocks[:, :16], blocks[:, 16:])      # ggml: element j low, j + 16 high
    d_bytes = f16_bytes(d)
    if sym:
        raw = np.concatenate([d_bytes, qs], axis=1)
        return raw.reshape(out, -1), "Q4_0", 0.0
    z = qt.zeros.astype(np.float64)[:, group].reshape(-1)
    exact = -z * d.astype(np.float64)
    mins = exact.astype(np.float16)
    raw = np.concatenate([d_bytes, f16_bytes(mins), qs], axis=1)
    return raw.reshape(out, -1), "Q4_1", float(np.max(np.abs(mins.astype(np.float64) - exact)))
