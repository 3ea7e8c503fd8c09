"""GGUF v3 files written atomically: metadata values typed as gguf-py types them, tensors
aligned (the layout and the value mapping are in ``refquant.gguf.file``'s docstring; read
-> write reproduces a file byte for byte)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from refquant._atomic import atomic_open
from refquant.gguf.file import (
    _DTYPE_TO_VT, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS, MAX_NAME, T_ARRAY, T_BOOL, T_STRING, VALUE_TYPES, GGUFError,
    GGUFTensor, _check_extent,
)


def _int_type(v: int) -> int:
    if -(2**31) <= v < 2**31:
        return 5
    if -(2**63) <= v < 2**63:
        return 11
    if 0 <= v < 2**64:
        return 10
    raise GGUFError(f"integer {v} does not fit in 64 bits")


def _encode_string(s) -> bytes:
    if isinstance(s, (bytes, bytearray)):
        b = bytes(s)
    elif isinstance(s, str):
        b = s.encode("utf-8", errors="surrogateescape")
    else:
        raise GGUFError(f"expected a string, got {type(s).__name__}")
    return np.uint64(len(b)).tobytes() + b


def _array_type(v, key: str) -> int:
    """Element value type of a list (all elements must share it)."""
    if not v:
        return T_STRING
    kinds = {_value_type(e, key) for e in v}
    if kinds <= {5, 11, 10}:  # plain ints of different widths: widen to one that holds them all
        return max(kinds, key=[5, 11, 10].index)
    if len(kinds) != 1:
        names = sorted(VALUE_TYPES[k][0] for k in kinds)
        raise GGUFError(f"metadata {key!r}: array elements must share one type, got {names}")
    return kinds.pop()


def _value_type(v, key: str) -> int:
    if isinstance(v, (bool, np.bool_)):
        return T_BOOL
    if isinstance(v, (str, bytes, bytearray)):
        return T_STRING
    if isinstance(v, np.generic):
        if v.dtype not in _DTYPE_TO_VT:
            raise GGUFError(f"metadata {key!r}: numpy {v.dtype} has no GGUF value type")
        return _DTYPE_TO_VT[v.dtype]
    if isinstance(v, int):
        return _int_type(v)
    if isinstance(v, float):
        return 6
    if isinstance(v, (list, tuple, np.ndarray)):
        return T_ARRAY
    raise GGUFError(f"metadata {key!r}: cannot store a {type(v).__name__} in GGUF")


def _encode_value(v, vtype: int, key: str) -> bytes:
    if vtype == T_STRING:
        return _encode_string(v)
    if vtype == T_ARRAY:
        if isinstance(v, np.ndarray):
            if v.ndim != 1:
                raise GGUFError(f"metadata {key!r}: arrays must be 1-D, got shape {v.shape}")
            if v.dtype not in _DTYPE_TO_VT:
                raise GGUFError(f"metadata {key!r}: numpy {v.dtype} arrays have no GGUF value type")
            et = _DTYPE_TO_VT[v.dtype]
            body = np.ascontiguousarray(v, VALUE_TYPES[et][1]).tobytes()
        else:
            et = _array_type(v, key)
            body = b"".join(_encode_value(e, et, key) for e in v)
        return np.uint32(et).tobytes() + np.uint64(len(v)).tobytes() + body
    dt = VALUE_TYPES[vtype][1]
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and np.dtype(dt).kind in "iu":
        info = np.iinfo(dt)
        if not info.min <= int(v) <= info.max:
            raise GGUFError(f"metadata {key!r}: {v} does not fit in {VALUE_TYPES[vtype][0]}")
    return np.array(v, dtype=dt).tobytes()


def _kv_bytes(key: str, value) -> bytes:
    if not isinstance(key, str) or not key:
        raise GGUFError(f"metadata keys must be non-empty strings, got {key!r}")
    if key == "general.alignment":
        a = int(value)
        if a <= 0 or a & (a - 1) or a >= 2**32:
            raise GGUFError(f"general.alignment must be a power of two below 2^32, got {value}")
        value = np.uint32(a)
    vtype = _value_type(value, key)
    return _encode_string(key) + np.uint32(vtype).tobytes() + _encode_value(value, vtype, key)


def _as_tensor(name: str, t) -> GGUFTensor:
    if isinstance(t, GGUFTensor):
        return t
    if isinstance(t, np.ndarray):
        return GGUFTensor.from_array(t)
    if isinstance(t, tuple) and len(t) == 3:
        return GGUFTensor(*t)
    raise GGUFError(f"tensor {name!r}: expected an ndarray, a GGUFTensor or (type, shape, raw), got {type(t).__name__}")


def write(path, metadata: dict, tensors: dict, *, progress: Callable | None = None) -> Path:
    """Write a GGUF v3 file atomically and return its path.

    ``metadata`` maps keys to values (see the module docstring for the type rules);
    ``tensors`` maps names to ndarrays (written as F32/F16/F64/I8…I64), ``GGUFTensor``
    objects (e.g. from ``read``, or quantized bytes; raw may be a callable) or
    ``(ggml_type, shape, raw)`` tuples. Data goes to a temporary file in the same directory
    that is fsynced and renamed over ``path``; on any error no file is left behind.
    ``progress``, if given, wraps the iteration over ``(name, tensor, nbytes)`` items (e.g.
    ``tqdm``); each item's data is produced and written when the iteration reaches it.
    """
    path = Path(path)
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    header = [MAGIC, np.uint32(3).tobytes(), np.uint64(len(tensors)).tobytes(), np.uint64(len(metadata)).tobytes()]
    header += [_kv_bytes(k, v) for k, v in metadata.items()]
    items = []
    offset = 0
    for name, t in tensors.items():
        t = _as_tensor(name, t)
        if not isinstance(name, str) or not name or len(name.encode("utf-8", "surrogateescape")) >= MAX_NAME:
            raise GGUFError(f"tensor names must be non-empty strings under {MAX_NAME} bytes, got {name!r}")
        if not 1 <= len(t.shape) <= MAX_DIMS or any(s < 0 for s in t.shape):
            raise GGUFError(f"tensor {name!r}: shape {t.shape} must have 1..{MAX_DIMS} non-negative dimensions")
        _check_extent(name, t.shape)
        try:
            nbytes = t.nbytes
        except ValueError as e:
            raise GGUFError(f"tensor {name!r}: {e}") from None
        header.append(_encode_string(name) + np.uint32(len(t.shape)).tobytes()
                      + np.array(t.shape[::-1], "<u8").tobytes() + np.uint32(t.type.id).tobytes()
                      + np.uint64(offset).tobytes())
        items.append((name, t, nbytes))
        offset += -(-nbytes // alignment) * alignment
    head = b"".join(header)

    with atomic_open(path) as f:
        f.write(head)
        f.write(b"\0" * (-len(head) % alignment))
        for name, t, nbytes in progress(items) if progress else items:
            raw = t.raw
            if raw.dtype != np.uint8 or raw.size != nbytes:
                raise GGUFError(
                    f"tensor {name!r}: {t.type.name} {t.shape} needs {nbytes} uint8 bytes, got {raw.size} {raw.dtype}"
                )
            f.write(np.ascontiguousarray(raw).data)
            f.write(b"\0" * (-nbytes % alignment))
    return path
