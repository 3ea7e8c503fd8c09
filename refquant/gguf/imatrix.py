"""Importance matrices as llama.cpp keeps them (llama.cpp 0c1e570: ``tools/imatrix/imatrix.cpp``
writes them, ``common/imatrix-loader.cpp`` and ``tools/quantize/quantize.cpp`` read them).

For every weight matrix ``W`` (out × in) that ``llama-imatrix`` watched, the file holds, per
input column j, ``Σ x_j²`` over the activation rows x that met ``W`` (``in_sum2``, float32),
and how many rows that was (``counts``); a 3-D weight (MoE experts) has one row of sums and
one count per matrix. llama-quantize passes ``in_sum2 / count`` per column (1 where a count
is 0) to ggml's quantizers as ``quant_weights`` (``IMatrix.weights``).

Two formats, both read and written here:

* **GGUF** (llama-imatrix's default): ``general.type = "imatrix"``, ``imatrix.datasets``
  (array of strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (uint32); per entry,
  names sorted, ``<name>.in_sum2`` (F32, ggml shape [ne0, n_mat]) then ``<name>.counts`` (F32,
  [1, n_mat]).
* **legacy ``.dat``** (``--output-format dat``), little-endian: int32 entry count; per entry
  (names sorted) int32 name length, the name, int32 ``ncall``, int32 ``nval``,
  ``float32[nval]`` = ``(Σx² / count) · ncall``; then, optionally, int32 chunk count, int32
  length and the dataset's path. llama-quantize divides by ``ncall`` again.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refquant.gguf.file import MAGIC, GGUFError

F32 = np.float32
SUMS, COUNTS = ".in_sum2", ".counts"


@dataclass
class IMatrix:
    """An importance matrix. ``sums[name]``: float32 (n_mat, ne0), Σx² per input column (for a
    legacy file: the stored ``(Σx² / count) · ncall``); ``counts[name]``: int64 (n_mat,), rows
    seen (legacy: ``ncall``, one per entry); ``datasets``, ``chunk_count``, ``chunk_size`` as
    the file says; ``legacy``: read from a ``.dat`` file."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def __post_init__(self):
        if set(self.sums) != set(self.counts):
            raise ValueError(f"entries {sorted(set(self.sums) ^ set(self.counts))} have sums or counts, not both")
        for name in self.sums:
            s = np.asarray(self.sums[name], F32)
            s = s.reshape(1, -1) if s.ndim == 1 else s
            c = np.asarray(self.counts[name]).reshape(-1)
            if s.ndim != 2 or s.shape[1] == 0 or c.size != s.shape[0]:
                raise ValueError(f"imatrix entry {name!r}: sums of shape {s.shape} need one count per matrix, "
                                 f"got {c.size}")
            self.sums[name], self.counts[name] = s, c.astype(np.int64)

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    def __len__(self) -> int:
        return len(self.sums)

    def weights(self, name: str) -> np.ndarray:
        """The ``quant_weights`` llama-quantize gives ggml for tensor ``name``: float32
        (n_mat, ne0), ``in_sum2 / count`` per matrix in float32 (1 where its count is 0);
        from a legacy file, the stored values ``/ ncall`` (as they are when ncall is 0)."""
        s, c = self.sums[name], self.counts[name]
        if self.legacy:
            return s / F32(c[0]) if c[0] > 0 else s.copy()
        out = np.ones_like(s)
        live = c > 0
        out[live] = s[live] / c[live].astype(F32)[:, None]
        return out

    def check(self, name: str, n_per_row: int, n_mat: int = 1) -> np.ndarray:
        """``weights(name)`` for a tensor of ``n_mat`` matrices of rows of ``n_per_row``,
        refusing (ValueError naming the tensor) sizes that disagree, as llama-quantize does."""
        w = self.weights(name)
        if w.size != n_per_row * n_mat:
            raise ValueError(f"imatrix size {w.size} of {name!r} is different from the tensor's "
                             f"{n_per_row} x {n_mat} (rows of {n_per_row} columns)")
        return w.reshape(n_mat, n_per_row)


def read(path) -> IMatrix:
    """An importance matrix file, GGUF or legacy ``.dat`` (told apart by the GGUF magic).
    Raises ``GGUFError`` (a ValueError) on a malformed or truncated file, or a GGUF that is
    not an importance matrix."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    return _read_gguf(path) if head == MAGIC else _read_dat(path)


def _read_gguf(path: Path) -> IMatrix:
    from refquant.gguf.file import read as read_gguf

    with read_gguf(path) as g:
        kind = g.metadata.get("general.type")
        missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in g.metadata]
        if kind != "imatrix" and missing:
            raise GGUFError(f"{path} is not an importance matrix: general.type is {kind!r} and it has no "
                            f"{', '.join(missing)} (llama-quantize: missing imatrix metadata)")
        pairs: dict[str, dict] = {}
        for name in g.tensors:
            for suffix in (SUMS, COUNTS):
                if name.endswith(suffix) and len(name) > len(suffix):
                    pairs.setdefault(name[:-len(suffix)], {})[suffix] = name
        if not pairs:
            raise GGUFError(f"{path}: no <name>.in_sum2 / <name>.counts tensors: not an importance matrix")
        sums, counts = {}, {}
        for entry, p in sorted(pairs.items()):
            if len(p) != 2:
                raise GGUFError(f"{path}: mismatched sums and counts for {entry!r}")
            ts, tc = g.tensor(p[SUMS]), g.tensor(p[COUNTS])
            if ts.type.name != "F32" or tc.type.name != "F32":
                raise GGUFError(f"{path}: sums and counts for {entry!r} must be F32, got {ts.type.name}, "
                                f"{tc.type.name}")
            s = ts.numpy().reshape(-1)
            c = tc.numpy().reshape(-1)
            if c.size == 0 or s.size == 0 or s.size % c.size or not np.all(np.isfinite(c)) or np.any(c < 0):
                raise GGUFError(f"{path}: entry {entry!r} has {s.size} sums for {c.size} counts {c[:4]}")
            sums[entry] = s.reshape(c.size, -1).copy()
            counts[entry] = np.round(c).astype(np.int64)       # C's lround (counts are whole numbers)
        datasets = g.metadata.get("imatrix.datasets", [])
        if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
            raise GGUFError(f"{path}: imatrix.datasets must be an array of strings")
        return IMatrix(sums, counts, list(datasets), int(g.metadata.get("imatrix.chunk_count", 0)),
                       int(g.metadata.get("imatrix.chunk_size", 0)))


def _read_dat(path: Path) -> IMatrix:
    data = path.read_bytes()
    at = 0

    def take(n: int, what: str) -> bytes:
        nonlocal at
        if at + n > len(data):
            raise GGUFError(f"{path}: truncated legacy imatrix: {what} needs {n} bytes at byte {at}, "
                            f"the file has {len(data)}")
        at += n
        return data[at - n:at]

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n = i32("the entry count")
    if n < 1:
        raise GGUFError(f"{path}: no data in a legacy imatrix ({n} entries), and not GGUF")
    sums, counts = {}, {}
    for i in range(n):
        length = i32(f"entry {i}'s name length")
        if length <= 0:
            raise GGUFError(f"{path}: entry {i}'s name length {length} at byte {at - 4} is impossible")
        try:
            name = take(length, f"entry {i}'s name").decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{path}: entry {i}'s name is not UTF-8 ({e})") from None
        ncall = i32(f"{name}'s ncall")
        nval = i32(f"{name}'s value count")
        if nval < 1:
            raise GGUFError(f"{path}: entry {name!r} has {nval} values")
        sums[name] = np.frombuffer(take(4 * nval, f"{name}'s {nval} values"), "<f4").astype(F32).reshape(1, -1)
        counts[name] = np.array([ncall], np.int64)
    chunks, datasets = 0, []
    if at < len(data):      # optional: chunk count, then the dataset's path
        chunks = i32("the chunk count")
        if at < len(data):
            length = i32("the dataset name's length")
            if length > 0:
                datasets.append(take(length, "the dataset name").decode("utf-8", "surrogateescape"))
    return IMatrix(sums, counts, datasets, chunks, 0, legacy=True)


def write(path, imatrix: IMatrix) -> Path:
    """Write ``imatrix`` as llama-imatrix's GGUF (atomically; module docstring)."""
    from refquant.gguf.writer import write as write_gguf

    if imatrix.legacy:
        raise ValueError("a legacy imatrix holds (Σx²/count)·ncall, not Σx² and counts; write it with write_dat")
    if not len(imatrix):
        raise ValueError("an importance matrix needs at least one entry")
    meta = {"general.type": "imatrix", "imatrix.datasets": list(imatrix.datasets),
            "imatrix.chunk_count": np.uint32(imatrix.chunk_count), "imatrix.chunk_size": np.uint32(imatrix.chunk_size)}
    tensors = {}
    for name in sorted(imatrix.sums):
        s, c = np.ascontiguousarray(imatrix.sums[name], F32), imatrix.counts[name].astype(F32).reshape(-1, 1)
        # ggml writes ggml_n_dims dimensions: trailing 1s of ne (leading ones here) dropped
        tensors[name + SUMS], tensors[name + COUNTS] = (s.reshape(-1), c.reshape(-1)) if len(c) == 1 else (s, c)
    return write_gguf(path, meta, tensors)


def write_dat(path, imatrix: IMatrix) -> Path:
    """Write ``imatrix`` as llama-imatrix's legacy ``.dat`` (atomically): per entry, ``ncall``
    = ⌈largest count / chunk_size⌉ and ``(Σx² / count) · ncall`` in float32 (1 · ncall where
    a count is 0), as ``save_imatrix_legacy`` computes them."""
    from refquant._atomic import atomic_open

    if not len(imatrix):
        raise ValueError("an importance matrix needs at least one entry")
    if imatrix.chunk_size < 1 and not imatrix.legacy:
        raise ValueError("a legacy imatrix needs chunk_size >= 1 (it stores ncall = counts / chunk_size)")
    # entries without data are skipped, as save_imatrix_legacy does
    names = sorted(n for n in imatrix.sums if imatrix.legacy or imatrix.counts[n].max() > 0)
    out = [struct.pack("<i", len(names))]
    for name in names:
        s, c = imatrix.sums[name], imatrix.counts[name]
        if imatrix.legacy:
            ncall, vals = int(c[0]), s.reshape(-1)
        else:
            ncall = int((c.max() + imatrix.chunk_size - 1) // imatrix.chunk_size)
            count = np.repeat(c.astype(F32), s.shape[1])
            v = s.reshape(-1)
            zero = count == 0
            vals = (np.where(zero, F32(1), v) / np.where(zero, F32(1), count)) * F32(ncall)
        b = name.encode("utf-8")
        out += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, vals.size), vals.astype("<f4").tobytes()]
    ds = (imatrix.datasets[-1] if imatrix.datasets else "").encode("utf-8")
    out += [struct.pack("<i", imatrix.chunk_count), struct.pack("<i", len(ds)), ds]
    path = Path(path)
    with atomic_open(path) as f:
        f.write(b"".join(out))
    return path
