"""safetensors files in NumPy: read (memory-mapped, every field validated) and write (atomic).

The format (huggingface/safetensors ``README.md``, "Format"): an unsigned little-endian
64-bit header size ``N``; ``N`` bytes of UTF-8 JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the byte after
the header), plus an optional ``"__metadata__"`` map of strings to strings; then the data,
little-endian, C order. Tensors may not overlap and must cover the data without holes.

A file is read iff the reference reader reads it: ``SafeTensors::read_metadata`` of the
``safetensors`` package (0.8, ``safetensors/src/tensor.rs``), whose header is a serde
deserialization by serde_json, so its rules are serde's as much as the README's. Anything
else is refused with one ``SafetensorsError`` naming the file and the field:

* size: 8 bytes for ``N``; ``N <= 100,000,000``; ``8 + N`` bytes at most the file's.
* JSON (serde_json): strict UTF-8; no ``NaN``/``Infinity`` and no number beyond float64's
  range, even in an ignored field; no lone surrogate escape (``"\\ud800"``); arrays and
  objects nested at most 127 deep (serde_json's recursion limit of 128); one object.
* ``__metadata__``: absent, ``null`` or an object of strings, given once (a key given twice
  keeps its last value).
* every other key names a tensor; a name given twice keeps its last entry, though every entry
  must parse. An entry is an object with ``dtype``, ``shape`` and ``data_offsets`` once each
  (other keys are ignored), or those three as a list: serde reads a struct from either. A
  dtype is one of ``BITS`` or ``{"NAME": null}`` (serde's map form of an enum variant). A shape
  is a list of integers in [0, 2^64), serde's ``usize``, which ``-0``, ``2.0`` and ``true``
  are not; ``data_offsets`` is two of them.
* sizes: the element count is the product of the shape taken left to right, every partial
  product below 2^64 (``[2^32, 2^32, 0]`` is refused, ``[0, 2^32, 2^32]`` is not: the
  reference's checked multiply); its bit count, below 2^64 too, is a whole number of bytes.
* layout: in order of offsets, each tensor starts where the previous ended (the first at 0)
  and spans its byte count; the last ends at the end of the file.

Not reproduced: serde_json's float parser is not correctly rounded at the top of float64's
range and refuses a few numbers within an ulp of the maximum that Python rounds to it.

Written here rather than taken from the ``safetensors`` package because its NumPy API
cannot read BF16 (NumPy has no bfloat16), the dtype llm-compressor stores its scales in.
The package is the tests' oracle: files either writes are read back by the other, and
mutated files are read by both or by neither (``tests/test_hf_safetensors.py``).
"""
from __future__ import annotations

import json
import math
import mmap
import re
from pathlib import Path

import numpy as np

from refquant import formats
from refquant._atomic import atomic_open

# dtypes ``read`` returns in place, as the NumPy dtype of the same bytes
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?", "C64": "<c8"}
# dtypes NumPy lacks, which ``read`` decodes to float32 (exactly: every value is a float32)
DECODED = {"BF16": "bf16", "F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2", "F8_E8M0": "e8m0"}
# valid dtypes ``read`` refuses: sub-byte packings the format does not specify, FP8 variants
# refquant.formats does not define
UNSUPPORTED = ("F4", "F6_E2M3", "F6_E3M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ")
BITS = {**{k: np.dtype(v).itemsize * 8 for k, v in DTYPES.items()},
        **{k: formats.get_format(f).width for k, f in DECODED.items()},
        "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8}   # every dtype of the reference
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000   # the reference's limit (``MAX_HEADER_SIZE``)
MAX_DEPTH = 127            # serde_json refuses the 128th level of nesting
FIELDS = ("dtype", "shape", "data_offsets")
USIZE = 2**64

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_SURROGATE = re.compile("[\ud800-\udfff]")


class SafetensorsError(ValueError):
    """A malformed or truncated safetensors file (the message says what and where)."""


def _show(x, limit=80) -> str:
    """``repr(x)``, cut short: a header can be 100 MB."""
    r = repr(x)
    return r if len(r) <= limit else r[:limit] + "..."


class _Object(dict):
    """A JSON object that keeps its pairs as written: serde refuses a struct field given twice,
    and parses every value, even one a later repeat of its key replaces."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.pairs = pairs
        for k, v in pairs:
            _no_lone_surrogate(k)
            _no_lone_surrogate(v)


def _no_lone_surrogate(x):
    """serde_json refuses a ``\\uD800``-``\\uDFFF`` escape that is not half of a pair (Python keeps
    it). Objects inside ``x`` were checked when they were parsed."""
    if isinstance(x, str) and _SURROGATE.search(x):
        raise ValueError(f"string {_show(x)} holds a lone surrogate escape")
    if isinstance(x, list):
        for v in x:
            _no_lone_surrogate(v)


def _int(s: str):
    """serde_json's integers: exact from -2^63 to 2^64 - 1; others, and ``-0``, are float64s,
    which must be finite. Checked by length first: Python's ``int`` refuses 4,300 digits."""
    if s == "-0":
        return -0.0
    if len(s.lstrip("-")) > 310:   # >= 10^310, past float64's maximum (1.8e308)
        raise ValueError(f"number {_show(s, 20)} ({len(s)} characters) is out of range for float64")
    v = int(s)
    return v if -(2**63) <= v < USIZE else _float(s)


def _float(s: str) -> float:
    v = float(s)
    if math.isinf(v):
        raise ValueError(f"number {_show(s, 20)} is out of range for float64")
    return v


def _constant(s: str):
    raise ValueError(f"{s} is not JSON")


def _depth(text: str) -> int:
    """How deep arrays and objects nest in JSON ``text`` (brackets inside strings do not count).
    Exact for valid JSON; whatever it says of invalid JSON, that is refused either way."""
    b = np.frombuffer(_STRING.sub("", text).encode(), np.uint8)
    step = np.isin(b, np.frombuffer(b"[{", np.uint8)).astype(np.int64) - np.isin(b, np.frombuffer(b"]}", np.uint8))
    return int(np.cumsum(step).max(initial=0))


def _parse(path, raw: bytes) -> _Object:
    """The header bytes as serde_json reads them (strict UTF-8, nesting, numbers, surrogates)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{path}: the header is not UTF-8 ({e})") from None
    depth = _depth(text)
    if depth > MAX_DEPTH:
        raise SafetensorsError(f"{path}: the header nests {depth} deep; the reference's JSON parser stops at "
                               f"{MAX_DEPTH}")
    try:
        header = json.loads(text, object_pairs_hook=_Object, parse_int=_int, parse_float=_float,
                            parse_constant=_constant)
    except ValueError as e:   # json.JSONDecodeError, and the hooks' refusals
        raise SafetensorsError(f"{path}: the header is not JSON as the reference reads it: {e}") from None
    if not isinstance(header, _Object):
        raise SafetensorsError(f"{path}: the header must be a JSON object, got {_show(header)}")
    return header


def _usize(x) -> bool:
    return type(x) is int and 0 <= x < USIZE   # not bool: serde reads no usize from true


def _entry(where: str, t) -> dict:
    """One tensor's entry, in either of serde's struct forms, as ``{"dtype", "shape", "data_offsets"}``."""
    if isinstance(t, list):
        if len(t) != 3:
            raise SafetensorsError(f"{where}: a list entry must be [dtype, shape, data_offsets], got {_show(t)}")
        t = dict(zip(FIELDS, t))
    elif isinstance(t, _Object):
        given = [k for k, _ in t.pairs if k in FIELDS]
        twice = sorted({k for k in given if given.count(k) > 1})
        missing = [k for k in FIELDS if k not in t]
        if twice or missing:
            raise SafetensorsError(f"{where}: needs dtype, shape and data_offsets once each; "
                                   + (f"{', '.join(twice)} given twice" if twice else f"no {', '.join(missing)}"))
    else:
        raise SafetensorsError(f"{where}: needs dtype, shape and data_offsets, got {_show(t)}")
    dtype, shape, off = t["dtype"], t["shape"], t["data_offsets"]
    if isinstance(dtype, _Object) and len(dtype.pairs) == 1 and dtype.pairs[0][1] is None:
        dtype = dtype.pairs[0][0]   # {"F32": null}: serde's map form of a unit variant
    if not (isinstance(dtype, str) and dtype in BITS):
        raise SafetensorsError(f"{where}: unknown dtype {_show(t['dtype'])}; known: {', '.join(BITS)}")
    if not (isinstance(shape, list) and all(_usize(d) for d in shape)):
        raise SafetensorsError(f"{where}: shape must be a list of non-negative integers below 2^64, got {_show(shape)}")
    if not (isinstance(off, list) and len(off) == 2 and all(_usize(o) for o in off)):
        raise SafetensorsError(f"{where}: data_offsets must be two non-negative integers below 2^64, got {_show(off)}")
    return {"dtype": dtype, "shape": shape, "data_offsets": off}


def _nbytes(where: str, dtype: str, shape: list) -> int:
    """Bytes of a ``dtype`` tensor of ``shape``, refused where the reference's usize arithmetic
    overflows: each partial product of the shape, and the bit count, stays below 2^64."""
    count = 1
    for i, d in enumerate(shape):
        count *= d
        if count >= USIZE:
            raise SafetensorsError(f"{where}: shape {_show(shape)} has 2^64 elements or more by dimension {i}")
    bits = count * BITS[dtype]
    if bits >= USIZE:
        raise SafetensorsError(f"{where}: {count} {dtype} elements are 2^64 bits or more")
    if bits % 8:
        raise SafetensorsError(f"{where}: {count} {dtype} elements are {bits} bits, not a whole number of bytes")
    return bits // 8


def read_header(path) -> tuple[dict, dict, int]:
    """``(tensors, metadata, data_offset)`` of a safetensors file, validated against its size by
    the module's rules. ``tensors`` maps each name to ``{"dtype", "shape", "data_offsets"}``
    (entries in serde's other forms rewritten so); ``metadata`` is ``{}`` when absent or null."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short for the 8-byte header size")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: header of {n} bytes does not fit in the file ({size} bytes) or "
                                   f"exceeds {MAX_HEADER}")
        header = _parse(path, f.read(n))
    given = [v for k, v in header.pairs if k == "__metadata__"]
    if len(given) > 1:
        raise SafetensorsError(f"{path}: __metadata__ is given {len(given)} times")
    meta = given[0] if given else None
    if not (meta is None or (isinstance(meta, _Object) and all(isinstance(v, str) for _, v in meta.pairs))):
        raise SafetensorsError(f"{path}: __metadata__ must be null or map strings to strings, got {_show(meta)}")
    tensors = {name: _entry(f"{path}: tensor {_show(name)}", t) for name, t in header.pairs if name != "__metadata__"}
    data = size - 8 - n
    spans = []
    for name, t in tensors.items():
        where, (begin, end) = f"{path}: tensor {_show(name)}", t["data_offsets"]
        if not begin <= end <= data:
            raise SafetensorsError(f"{where}: data_offsets {t['data_offsets']} outside the {data} data bytes")
        need = _nbytes(where, t["dtype"], t["shape"])
        if end - begin != need:
            raise SafetensorsError(f"{where}: {t['dtype']} {_show(t['shape'])} needs {need} bytes, data_offsets "
                                   f"span {end - begin}")
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise SafetensorsError(f"{path}: tensor {_show(name)} starts at data byte {begin}, expected {pos} "
                                   "(tensors must not overlap or leave holes)")
        pos = end
    if pos != data:
        raise SafetensorsError(f"{path}: the tensors cover {pos} of {data} data bytes")
    return tensors, dict(meta or {}), 8 + n


def read(path) -> tuple[dict, dict]:
    """``({name: ndarray}, metadata)``. Tensors are read-only views of a memory map; the dtypes
    of ``DECODED`` are float32 copies. Refuses a valid file holding an ``UNSUPPORTED`` dtype or a
    shape NumPy cannot hold (over 64 dimensions, a side or size past its int64 range)."""
    header, meta, start = read_header(path)
    out = {}
    if not header:
        return out, meta
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = np.frombuffer(mm, np.uint8)
    for name, t in header.items():
        (b, e), dtype, where = t["data_offsets"], t["dtype"], f"{path}: tensor {_show(name)}"
        raw = buf[start + b:start + e]
        if dtype in UNSUPPORTED:
            raise SafetensorsError(f"{where}: unsupported dtype {dtype} (valid, but refquant reads only "
                                   f"{', '.join([*DTYPES, *DECODED])})")
        if dtype == "BF16":   # the bf16 bits are the float32's high half
            a = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in DECODED:
            a = formats.decode(np.arange(256, dtype=np.uint8), DECODED[dtype])[raw]
        else:
            a = raw.view(DTYPES[dtype])
        try:
            out[name] = a.reshape(t["shape"])
        except ValueError as err:
            raise SafetensorsError(f"{where}: NumPy cannot hold shape {_show(t['shape'])} ({err})") from None
    return out, meta


def write(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Write ``{name: ndarray}`` (C order, little-endian; a dtype of ``DTYPES``) atomically."""
    header, arrays, pos = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in NAMES:
            raise TypeError(f"tensor {_show(name)}: dtype {a.dtype} has no safetensors name; supported: "
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
