"""`QuantizedTensor`: what every quantizer in refquant returns.

A quantized tensor is stored data (integer ``codes``, float ``scales``, optional integer
``zeros`` and any extra arrays in ``meta`` such as codebooks) plus how to read it back.
``dequantize()`` dispatches on ``meta["kind"]`` to the decoder the producing module
registered, so the dataclass itself stays format-agnostic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

_DECODERS: dict[str, Callable[["QuantizedTensor"], np.ndarray]] = {}


def register_decoder(kind: str):
    """Decorator: ``fn(qt) -> float32 array of qt.shape`` decodes tensors of ``kind``."""

    def deco(fn):
        if kind in _DECODERS:
            raise ValueError(f"a decoder for kind {kind!r} is already registered")
        _DECODERS[kind] = fn
        return fn

    return deco


def _readonly(a):
    if a is None:
        return None
    if not isinstance(a, np.ndarray):
        raise TypeError(f"expected a NumPy array, got {type(a).__name__}")
    v = a.view()
    v.flags.writeable = False
    return v


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Quantized storage of a float tensor of logical shape ``shape``.

    Attributes:
        codes:  packed integer storage (usually uint8, see ``refquant.packing``).
        scales: float scale factors (layout defined by ``meta["kind"]``), or None.
        zeros:  integer zero points for asymmetric formats, or None.
        shape:  logical shape of the float tensor this stands for.
        scheme: name of the scheme that produced it (e.g. ``"int4_g128"``).
        meta:   read-only dict: ``kind`` (decoder key), ``bits``, group size, ...
                Every ndarray value in ``meta`` (codebooks, ``g_idx``) is stored data
                and is counted by ``nbytes``.

    Arrays are exposed as read-only views: a frozen dataclass should not be mutable
    through its arrays either.
    """

    codes: np.ndarray
    scales: np.ndarray | None
    zeros: np.ndarray | None
    shape: tuple[int, ...]
    scheme: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    # derived forms that kernels build from the stored arrays (``refquant.kernels.table``):
    # not stored data, not counted by ``nbytes``, never written to files
    kernel_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "codes", _readonly(self.codes))
        object.__setattr__(self, "scales", _readonly(self.scales))
        object.__setattr__(self, "zeros", _readonly(self.zeros))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        meta = {k: _readonly(v) if isinstance(v, np.ndarray) else v for k, v in dict(self.meta).items()}
        if "kind" not in meta:
            raise ValueError("meta must name the decoder: meta['kind'] is missing")
        object.__setattr__(self, "meta", MappingProxyType(meta))

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def numel(self) -> int:
        """Number of logical weights."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: codes + scales + zeros + arrays in meta."""
        arrays = [self.codes, self.scales, self.zeros]
        arrays += [v for v in self.meta.values() if isinstance(v, np.ndarray)]
        return int(sum(a.nbytes for a in arrays if a is not None))

    @property
    def bits_per_weight(self) -> float:
        """``8 * nbytes / numel``: storage cost per logical weight, overheads included."""
        return 8.0 * self.nbytes / self.numel

    def dequantize(self) -> np.ndarray:
        """Decode to a float32 array of shape ``self.shape``."""
        try:
            decode = _DECODERS[self.kind]
        except KeyError:
            raise ValueError(f"no decoder registered for kind {self.kind!r}; known: {sorted(_DECODERS)}") from None
        out = decode(self)
        assert out.shape == self.shape and out.dtype == np.float32, (out.shape, out.dtype)
        return out

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(scheme={self.scheme!r}, shape={self.shape}, kind={self.kind!r}, "
            f"nbytes={self.nbytes}, bits_per_weight={self.bits_per_weight:.4g})"
        )
