"""safetensors files in NumPy: read (memory-mapped, every field validated) and write (atomic).

The format (huggingface/safetensors ``README.md``, "Format"): an unsigned little-endian
64-bit header size ``N``; ``N`` bytes of UTF-8 JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the byte after
the header), plus an optional ``"__metadata__"`` map of strings to strings; then the data,
little-endian, C order. Tensors may not overlap and must cover the data without holes.

Written here rather than taken from the ``safetensors`` package because its NumPy API
cannot read BF16 (NumPy has no bfloat16), the dtype llm-compressor stores its scales in:
``read`` returns BF16 tensors as float32 (exact: the bf16 bits are the float32's high
half). The package is the tests' oracle: files either writes are read back by the other.
"""
from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np

from refquant._atomic import atomic_open

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?", "BF16": "<u2"}
NAMES = {np.dtype(v): k for k, v in DTYPES.items() if k != "BF16"}
MAX_HEADER = 100 << 20   # the reference implementation's limit (100 MB)


class SafetensorsError(ValueError):
    """A malformed or truncated safetensors file (the message says what and where)."""


def read_header(path) -> tuple[dict, dict, int]:
    """``(tensors, metadata, data_offset)`` of a safetensors file, validated against its size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short for the 8-byte header size")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: header of {n} bytes does not fit in the file ({size} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: the header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header must be a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    data = size - 8 - n
    spans = []
    for name, t in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{where}: needs exactly dtype, shape and data_offsets, got {t!r}")
        if t["dtype"] not in DTYPES:
            raise SafetensorsError(f"{where}: unknown dtype {t['dtype']!r}; known: {', '.join(DTYPES)}")
        shape, off = t["shape"], t["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SafetensorsError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
        if not (isinstance(off, list) and len(off) == 2 and all(isinstance(o, int) for o in off)
                and 0 <= off[0] <= off[1] <= data):
            raise SafetensorsError(f"{where}: data_offsets {off!r} outside the {data} data bytes")
        need = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[t["dtype"]]).itemsize
        if off[1] - off[0] != need:
            raise SafetensorsError(f"{where}: {t['dtype']} {shape} needs {need} bytes, data_offsets span "
                                   f"{off[1] - off[0]}")
        spans.append((off[0], off[1], name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise SafetensorsError(f"{path}: tensor {name!r} starts at data byte {begin}, expected {pos} "
                                   "(tensors must not overlap or leave holes)")
        pos = end
    if pos != data:
        raise SafetensorsError(f"{path}: the tensors cover {pos} of {data} data bytes")
    return header, meta, 8 + n


def read(path) -> tuple[dict, dict]:
    """``({name: ndarray}, metadata)``. Tensors are read-only views of a memory map (BF16:
    float32 copies)."""
    header, meta, start = read_header(path)
    out = {}
    if not header:
        return out, meta
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = np.frombuffer(mm, np.uint8)
    for name, t in header.items():
        b, e = t["data_offsets"]
        raw = buf[start + b:start + e]
        a = raw.view(DTYPES[t["dtype"]]).reshape(t["shape"])
        out[name] = (a.astype(np.uint32) << 16).view(np.float32) if t["dtype"] == "BF16" else a
    return out, meta


def write(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Write ``{name: ndarray}`` (C order, little-endian; every dtype above but BF16) atomically."""
    header, arrays, pos = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in NAMES:
            raise TypeError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name; supported: "
                            f"{', '.join(str(d) for d in NAMES)}")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [pos, pos + a.nbytes]}
        arrays.append(a)
        pos += a.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)   # align the data to 8 bytes, as the reference writer does
    path = Path(path)
    with atomic_open(path) as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for a in arrays:
            f.write(a.tobytes())
    return path
