"""Input validation shared by every quantizer.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(right kind, bad value) with a message that names the argument, shows the value
and says what was expected, so a caller never gets garbage back for NaN, empty or
mis-shaped input.
"""
from __future__ import annotations

import numbers

import numpy as np


def float_array(x, name: str, *, ndim: int | None = None, min_ndim: int = 1, finite: bool = True) -> np.ndarray:
    """Return ``x`` as a finite (unless ``finite=False``), non-empty floating-point ndarray or raise.

    Float16/32/64 are accepted as they are (no copy); integers, bools and objects are a
    ``TypeError`` because silently casting codes to weights hides bugs.
    """
    if not isinstance(x, np.ndarray):
        if isinstance(x, (list, tuple)):
            x = np.asarray(x)
        else:
            raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array (float16/32/64), got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {x.ndim}-D array of shape {x.shape}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); there is nothing to quantize")
    ok = np.isfinite(x) if finite else None
    if ok is not None and not ok.all():
        bad = np.argwhere(~ok)
        first = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"{name} contains {len(bad)} non-finite value(s) (NaN or Inf); first at index {first}: {x[first]}"
        )
    return x


def int_in(value, name: str, allowed) -> int:
    """Return ``value`` as an int if it is an integer in ``allowed``, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if int(value) not in allowed:
        lo, hi = min(allowed), max(allowed)
        shown = f"{lo}..{hi}" if list(allowed) == list(range(lo, hi + 1)) else sorted(allowed)
        raise ValueError(f"{name} must be one of {shown}, got {value}")
    return int(value)


def positive_int(value, name: str) -> int:
    """Return ``value`` as an int if it is a positive integer, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def one_of(value, name: str, allowed) -> str:
    """Return ``value`` if it is one of the strings in ``allowed``, else raise."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")
    return value


# --- command-line numbers (argparse ``type=`` callables) ----------------------------------
# Every numeric option of every CLI (refquant, minigpt_np, benchmarks) goes through these,
# so 0, a negative, NaN or a huge value ends in argparse's one-line usage error, not a
# traceback or a silent reinterpretation.

def cli_int(lo: int, hi: int, *, also=()):
    """An argparse ``type``: an integer in ``[lo, hi]`` (or one of ``also``, e.g. -1)."""
    import argparse

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not (lo <= v <= hi or v in also):
            extra = "".join(f" or {a}" for a in also)
            raise argparse.ArgumentTypeError(f"{v} is not in [{lo}, {hi}]{extra}")
        return v

    parse.__name__ = "integer"   # argparse names the type in its messages
    return parse


def cli_float(lo: float, hi: float, *, lo_open: bool = False):
    """An argparse ``type``: a finite float in ``[lo, hi]`` (``(lo, hi]`` if ``lo_open``)."""
    import argparse
    import math

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            raise argparse.ArgumentTypeError(f"{text} is not in {'(' if lo_open else '['}{lo}, {hi}]")
        return v

    parse.__name__ = "number"
    return parse


def check_tensors(tensors, want: dict, source, *, optional=()) -> None:
    """The tensors a model reads, against the shapes its config implies, before any kernel
    sees them or a file is written: every name of ``want`` present (unless in ``optional``)
    with exactly that shape (``.shape`` of an array, a ``QuantizedTensor``, a Linear or a
    GGUF tensor entry: rows first), and no tensor the model would ignore. ``ValueError`` naming
    ``source`` (the file, or "params"), the tensor, the expected and the found shape."""
    for name, shape in want.items():
        if name not in tensors:
            if name in optional:
                continue
            raise ValueError(f"{source}: tensor {name} is missing (the config needs shape {shape})")
        found = tuple(int(n) for n in tensors[name].shape)
        if found != tuple(shape):
            raise ValueError(f"{source}: tensor {name} has shape {found}, the config needs {tuple(shape)}")
    unknown = sorted(set(tensors) - set(want))
    if unknown:
        raise ValueError(f"{source}: tensor {unknown[0]} is not one this model reads"
                         + (f" ({len(unknown)} such tensors)" if len(unknown) > 1 else ""))


def first_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in ``text`` (it has no UTF-8 encoding), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start

