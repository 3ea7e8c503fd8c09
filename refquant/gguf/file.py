"""GGUF v3 files: a validating, memory-mapped reader (the writer is ``refquant.gguf.writer``).

Layout (little-endian; llama.cpp ``gguf.cpp``, gguf-py ``gguf_writer.py``)::

    "GGUF"  u32 version  u64 n_tensors  u64 n_kv
    n_kv ×      string key, u32 value type, value
    n_tensors × string name, u32 n_dims, u64 ne[n_dims] (ne[0] = row length),
                u32 ggml type, u64 offset (relative to the data section)
    zero padding to ``general.alignment`` (default 32)
    data section: each tensor's bytes, each padded with zeros to the alignment

    string = u64 byte length + UTF-8 bytes;  array = u32 element type, u64 count, elements

Metadata values read back as: numpy scalars of the stored width (``np.uint32`` …,
``np.float32``/``np.float64``), ``bool``, ``str``; arrays as read-only numpy arrays
(numbers, bools), ``list[str]`` or lists of arrays (nested arrays). Writing maps them
back to the same types, so read → write reproduces a file byte for byte. Plain Python
values are written as gguf-py does: ``int`` → INT32 (INT64/UINT64 if it does not fit),
``float`` → FLOAT32. ``general.alignment`` is always written as UINT32, which llama.cpp
requires.

The reader trusts nothing: every count, length, offset, dimension and type is checked
against the file size before anything is allocated or sliced, and any violation raises
``GGUFError`` naming the problem and the byte offset. Tensor data is never copied: each
tensor is a read-only view of the memory map.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refquant.gguf.quants import GGMLType, dequantize, ggml_type

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
INT64_MAX = 2**63 - 1


def _check_extent(name: str, shape) -> None:
    """ggml's rule that an element count stays an int64, applied to every dimension even
    when another is 0 (so a zero-element tensor cannot carry dimensions no array can have)."""
    span = 1
    for d in shape:
        span *= max(int(d), 1)
    if span > INT64_MAX:
        raise GGUFError(f"tensor {name!r}: shape {tuple(shape)} spans more than 2^63 - 1 elements")
MAX_NAME = 64  # GGML_MAX_NAME: tensor names are shorter than this, in bytes
MAX_ARRAY_DEPTH = 8  # nested arrays deeper than this are rejected (recursion bombs)
_U64 = struct.Struct("<Q")

# GGUF value type id -> (name, little-endian numpy dtype or None)
VALUE_TYPES = {
    0: ("UINT8", "<u1"), 1: ("INT8", "<i1"), 2: ("UINT16", "<u2"), 3: ("INT16", "<i2"),
    4: ("UINT32", "<u4"), 5: ("INT32", "<i4"), 6: ("FLOAT32", "<f4"), 7: ("BOOL", "|b1"),
    8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<u8"), 11: ("INT64", "<i8"),
    12: ("FLOAT64", "<f8"),
}
T_BOOL, T_STRING, T_ARRAY = 7, 8, 9
_DTYPE_TO_VT = {np.dtype(dt).newbyteorder("=") if dt != "|b1" else np.dtype(bool): vt
                for vt, (_, dt) in VALUE_TYPES.items() if dt}
# Plain ndarrays written as tensors: numpy dtype -> ggml type
_TENSOR_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
                  np.dtype(np.int8): "I8", np.dtype(np.int16): "I16", np.dtype(np.int32): "I32",
                  np.dtype(np.int64): "I64"}
_PLAIN = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


MAX_MESSAGE = 300   # characters: a hostile file's 200 kB key must not become a 200 kB error line


def shorten(message: str) -> str:
    """``message`` cut to ``MAX_MESSAGE`` characters (the last one an ellipsis when cut)."""
    message = str(message)
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 1] + "…"


class GGUFError(ValueError):
    """A GGUF file (or a request to write one) is malformed; the message says where (cut to
    ``MAX_MESSAGE`` characters, so names and keys read from the file cannot flood it)."""

    def __init__(self, message: str):
        super().__init__(shorten(message))


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives. ``shape`` is NumPy order (last axis = ggml's ne[0], the row)."""

    name: str
    shape: tuple[int, ...]
    type: GGMLType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=object)) if self.shape else 1

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.n_elements if self.n_elements else 0.0


class GGUFTensor:
    """One tensor of a GGUF file (or to be written to one): ggml type, shape and raw bytes.

    ``raw`` is a uint8 array (a read-only view of the file's memory map when read).
    Build one yourself to write quantized data: ``GGUFTensor("Q4_K", (rows, n), raw)``;
    ``raw`` may also be a zero-argument callable returning the bytes, called only when the
    writer reaches this tensor (so a whole model never has to sit in memory at once).
    """

    __slots__ = ("type", "shape", "_raw")

    def __init__(self, type, shape, raw):
        self.type = ggml_type(type)
        self.shape = tuple(int(s) for s in shape)
        self._raw = raw

    @property
    def raw(self) -> np.ndarray:
        raw = self._raw() if callable(self._raw) else self._raw
        return np.asarray(raw)

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.shape[:-1], dtype=object)) if len(self.shape) > 1 else 1
        return rows * self.type.row_bytes(self.shape[-1] if self.shape else 1)

    def dequantize(self) -> np.ndarray:
        """float32 values, shape ``self.shape`` (bit-exact with ggml's ``dequantize_row_*``)."""
        return dequantize(self.raw, self.type, self.shape)

    def numpy(self) -> np.ndarray:
        """The data as its own dtype for plain types (F32, F16, F64, I8…I64); else dequantized."""
        if self.type.name in _PLAIN:
            return np.asarray(self.raw).view(_PLAIN[self.type.name]).reshape(self.shape)
        return self.dequantize()

    @classmethod
    def from_array(cls, a: np.ndarray) -> "GGUFTensor":
        """A plain tensor (F32/F16/F64/I8…I64) holding a copy of ``a``'s values."""
        a = np.asarray(a)
        if a.dtype not in _TENSOR_DTYPES:
            raise GGUFError(f"arrays of dtype {a.dtype} have no ggml type; use one of "
                            f"{', '.join(str(d) for d in _TENSOR_DTYPES)} or quantize first")
        t = _TENSOR_DTYPES[a.dtype]
        return cls(t, a.shape if a.ndim else (1,), np.ascontiguousarray(a, _PLAIN[t]).reshape(-1).view(np.uint8))

    def __repr__(self) -> str:
        return f"GGUFTensor({self.type.name}, shape={self.shape}, {self.nbytes} bytes)"


class _Cursor:
    """Bounds-checked little-endian reads from a bytes-like buffer."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(
                f"{what} at byte {self.pos} needs {n} bytes but only {self.size - self.pos} remain "
                f"(file size {self.size}); the file is truncated or the field is corrupt"
            )

    def scalar(self, dtype: str, what: str):
        dt = np.dtype(dtype)
        self.need(dt.itemsize, what)
        v = np.frombuffer(self.buf, dt, 1, self.pos)[0]
        self.pos += dt.itemsize
        return v

    def u32(self, what: str) -> int:
        return int(self.scalar("<u4", what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<u8", what))

    def string(self, what: str) -> str:
        start = self.pos
        n = self.u64(f"length of {what}")
        self.need(n, f"{what} ({n} bytes, length read at byte {start})")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="surrogateescape")
        self.pos += n
        return s

    def value(self, vtype: int, what: str, depth: int = 0):
        at = self.pos
        if vtype not in VALUE_TYPES:
            raise GGUFError(f"{what}: unknown GGUF value type {vtype} (byte {at - 4}); known: 0..12")
        if vtype == T_STRING:
            return self.string(what)
        if vtype == T_ARRAY:
            return self.array(what, depth + 1)
        v = self.scalar(VALUE_TYPES[vtype][1], what)
        if vtype == T_BOOL:
            return self._bool(v, at, what)
        return v

    @staticmethod
    def _bool(v, at, what):
        b = int(np.asarray(v).view(np.uint8))
        if b > 1:
            raise GGUFError(f"{what}: bool value {b} at byte {at} is neither 0 nor 1")
        return bool(b)

    def array(self, what: str, depth: int):
        if depth > MAX_ARRAY_DEPTH:
            raise GGUFError(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH} at byte {self.pos}")
        etype = self.u32(f"element type of array {what}")
        count_at = self.pos
        count = self.u64(f"element count of array {what}")
        if etype not in VALUE_TYPES:
            raise GGUFError(f"{what}: unknown array element type {etype} at byte {count_at - 4}")
        dt = VALUE_TYPES[etype][1]
        # the least bytes one element can take: a string is a u64 length, an array a u32+u64 header
        least = np.dtype(dt).itemsize if dt else (8 if etype == T_STRING else 12)
        if count > (self.size - self.pos) // least:
            raise GGUFError(
                f"{what}: array count {count} (byte {count_at}) needs at least {count * least} bytes, "
                f"only {self.size - self.pos} remain in the file"
            )
        if dt:
            a = np.frombuffer(self.buf, dt, count, self.pos).copy()
            if etype == T_BOOL and a.size and a.view(np.uint8).max() > 1:
                raise GGUFError(f"{what}: bool array at byte {self.pos} holds a byte other than 0/1")
            self.pos += a.nbytes
            a.flags.writeable = False
            return a
        if etype == T_STRING:
            return self._strings(count, what)
        return [self.value(etype, f"{what}[{i}]", depth) for i in range(count)]

    def _strings(self, count: int, what: str) -> list[str]:
        """``count`` strings (a vocabulary: ~100k), read as ``string`` reads them, with the
        per-element checks inlined; a bad element goes through ``string`` for its error."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        length = _U64.unpack_from
        for i in range(count):
            n = length(buf, pos)[0] if pos + 8 <= size else -1
            if n < 0 or n > size - pos - 8:
                self.pos = pos
                self.string(f"{what}[{i}]")   # raises
            out.append(bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", errors="surrogateescape"))
            pos += 8 + n
        self.pos = pos
        return out


class GGUFFile:
    """A GGUF file opened read-only through a memory map. Use as a context manager.

    Attributes: ``path``, ``version``, ``alignment``, ``metadata`` (key -> value, file
    order), ``tensors`` (name -> ``TensorInfo``, file order), ``data_offset``.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size == 0:
                raise GGUFError(f"{self.path}: empty file, not GGUF")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse(size)
        except BaseException:
            self.close()
            raise

    def _parse(self, size: int) -> None:
        c = _Cursor(self._map, size)
        c.need(4, "magic")
        magic = bytes(self._map[0:4])
        if magic != MAGIC:
            raise GGUFError(f"{self.path}: bad magic {magic!r} at byte 0, expected {MAGIC!r}")
        c.pos = 4
        self.version = c.u32("version")
        if self.version not in (2, 3):
            hint = " (a big-endian file?)" if self.version & 0xFFFF == 0 else ""
            raise GGUFError(f"unsupported GGUF version {self.version} at byte 4{hint}; refquant reads v2 and v3")
        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata count")
        # each kv takes >= 8 (key length) + 1 (key) + 4 (type) + 1 bytes; each tensor info >= 8+1+4+4+8
        if n_kv > (size - c.pos) // 14:
            raise GGUFError(f"metadata count {n_kv} at byte 16 cannot fit in a {size}-byte file")
        if n_tensors > (size - c.pos) // 25:
            raise GGUFError(f"tensor count {n_tensors} at byte 8 cannot fit in a {size}-byte file")

        self.metadata: dict[str, object] = {}
        for i in range(n_kv):
            at = c.pos
            key = c.string(f"key of metadata entry {i}")
            if not key:
                raise GGUFError(f"metadata entry {i} at byte {at} has an empty key")
            if key in self.metadata:
                raise GGUFError(f"duplicate metadata key {key!r} at byte {at}")
            vtype = c.u32(f"value type of {key!r}")
            self.metadata[key] = c.value(vtype, repr(key))

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            a = self.metadata["general.alignment"]
            if not isinstance(a, np.uint32):
                raise GGUFError(f"general.alignment must be a UINT32, got {type(a).__name__}")
            if a == 0 or a & (a - 1):
                raise GGUFError(f"general.alignment {int(a)} is not a power of two")
            self.alignment = int(a)

        infos = []
        names = set()
        for i in range(n_tensors):
            at = c.pos
            name = c.string(f"name of tensor {i}")
            if name in names:
                raise GGUFError(f"duplicate tensor name {name!r} at byte {at}")
            if len(name.encode("utf-8", "surrogateescape")) >= MAX_NAME:
                raise GGUFError(f"tensor {i} name {name[:80]!r} at byte {at} is {MAX_NAME} bytes or longer")
            names.add(name)
            n_dims = c.u32(f"n_dims of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise GGUFError(f"tensor {name!r} has {n_dims} dimensions (byte {c.pos - 4}); ggml allows {MAX_DIMS}")
            ne = [int(c.scalar("<i8", f"dimension {j} of tensor {name!r}")) for j in range(n_dims)]
            if any(d < 0 for d in ne):
                raise GGUFError(f"tensor {name!r} has a negative dimension {ne} (before byte {c.pos})")
            _check_extent(name, ne[::-1])
            tid = c.u32(f"type of tensor {name!r}")
            try:
                t = ggml_type(tid)
            except ValueError:
                raise GGUFError(f"tensor {name!r} has unknown ggml type id {tid} at byte {c.pos - 4}") from None
            row = ne[0] if ne else 1
            if row % t.block_size:
                raise GGUFError(f"tensor {name!r}: row length {row} is not a multiple of {t.name}'s block size {t.block_size}")
            n_el = int(np.prod(ne, dtype=object)) if ne else 1
            nbytes = n_el // t.block_size * t.type_size  # Python ints: no overflow
            if nbytes > size:
                raise GGUFError(f"tensor {name!r} of shape {ne[::-1]} ({t.name}) needs {nbytes} bytes; the file has {size}")
            off = c.u64(f"data offset of tensor {name!r}")
            infos.append((name, tuple(ne[::-1]), t, off, nbytes, at))

        self.data_offset = -(-c.pos // self.alignment) * self.alignment if infos else c.pos
        self.tensors: dict[str, TensorInfo] = {}
        expected = 0
        for name, shape, t, off, nbytes, at in infos:
            if off != expected:  # llama.cpp accepts only this gap-free layout
                raise GGUFError(f"tensor {name!r} (info at byte {at}) has data offset {off}, expected {expected}")
            start = self.data_offset + off
            if start + nbytes > size:
                raise GGUFError(
                    f"tensor {name!r} data [{start}, {start + nbytes}) runs past the end of the {size}-byte file"
                )
            self.tensors[name] = TensorInfo(name, shape, t, start, nbytes)
            expected += -(-nbytes // self.alignment) * self.alignment

    def tensor(self, name: str) -> GGUFTensor:
        """The tensor ``name`` as a ``GGUFTensor`` whose ``raw`` is a read-only view of the map."""
        if name not in self.tensors:
            raise KeyError(f"no tensor {name!r} in {self.path}")
        info = self.tensors[name]
        raw = np.frombuffer(self._map, np.uint8, info.nbytes, info.offset)
        return GGUFTensor(info.type, info.shape, raw)

    def close(self) -> None:
        m = getattr(self, "_map", None)
        if m is not None:
            try:
                m.close()
            except BufferError:  # views still alive; the map closes when they are gone
                pass
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


def read(path) -> GGUFFile:
    """Open a GGUF file (memory-mapped, validated). Raises ``GGUFError`` if it is malformed."""
    return GGUFFile(path)
