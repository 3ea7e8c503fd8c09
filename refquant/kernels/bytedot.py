"""Byte-dot matvec / small-batch matmul for every integer weight layout, at the memory roof:
the tiers and the entry points.

One kernel covers INT8, INT4 (g32/g64/g128, symmetric and asymmetric), W8A8 and the ggml
types with a ``ByteDotLayout`` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, and IQ4_NL and
IQ4_XS, whose nibbles index a 16-value codebook looked up in the kernel): per block
of 32 weights an integer code times a block scale plus a block offset, multiplied by x
rounded to llama.cpp's Q8_0. The jobs live in their own modules:

* ``layout``: the repacked weights (``Packed``, ``pack_*``), the one Q8_0 rounder of x
  (``quantize_x``) and ``reference``, the plain-loop definition of the result;
* ``rows`` (one token at a time, and the ``numba`` tier) and ``tiles`` (prefill: four
  tokens per pass), both on the 8-row interleaved layout: the kernel builders, one
  compilation per layout and tier;
* ``threads``: the parallel part they share, reached by address.

The result is ``Ŵ x̂`` -- the dequantized weight times the Q8_0-rounded x -- up to float32
rounding of the epilogue: the tests hold every tier to ``Ŵ x̂`` computed in float64 from
``QuantizedTensor.dequantize`` / ``gguf.quants.dequantize`` and ``x̂`` from ``gguf.quants``,
within ``(n_blocks + 30)·2⁻²⁴·Σ|terms|``, to ``layout.reference``, and to the exact ``Ŵ x``
within the Q8_0 rounding bound ``Σ|ŵ_i|(d_x/2 + 127|d_x - fp16(d_x)|)``. W8A8 differs only
in x: one int8 scale per token, passed to the same kernel as equal block scales.

**Tiers.** ``vnni`` and ``avx2`` run the vector code of ``simd``; ``numba`` is the same
arithmetic in plain loops on the same layout (LLVM vectorizes it as it can), the
portable fallback. ``backend()`` names the tier in use; ``REFQUANT_KERNEL_TIER=avx2|numba``
forces a lower one. From ``TILE_MIN_M`` rows of X on, the SIMD tiers run the tile kernel.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from refquant._checks import float_array
from refquant.kernels import MAX_BATCH
from refquant.kernels.layout import (  # noqa: F401  (the kernels' API: layout, packers, x rounding)
    OFFSET_CONST, OFFSET_MIN, OFFSET_NONE, Q8_0_MAX_ABS, ROWS, SIGNED_KINDS, Packed, _log2_blocks, _pad_cols, blocks_of_rows,
    concat_rows, f16_round, pack_affine, pack_codes, pack_fields, quantize_x, quantize_x_q8_0, reference,
)
from refquant.kernels.rows import _build
from refquant.kernels.tiles import TILE_MIN_M, _build_tiles

TIERS = ("vnni", "avx2", "numba")
TIER_ENV = "REFQUANT_KERNEL_TIER"


# --- tiers -----------------------------------------------------------------------------

def available_tiers() -> tuple[str, ...]:
    """Tiers this machine can run, best first (the byte-dot tiers only when numba compiles
    for the host CPU: with ``NUMBA_CPU_NAME`` set, code must run on other CPUs too)."""
    from numba.core import config

    return _tiers(config.CPU_NAME)


@functools.lru_cache(maxsize=None)
def _tiers(cpu_name) -> tuple[str, ...]:
    if cpu_name not in (None, "host"):
        return ("numba",)
    import llvmlite.binding as llvm

    f = llvm.get_host_cpu_features()
    has = lambda k: bool(f.get(k, False))  # noqa: E731
    tiers = []
    if has("avx512vnni") and has("avx512vl") and has("avx2") and has("f16c"):
        tiers.append("vnni")
    if has("avx2") and has("f16c"):
        tiers.append("avx2")
    return tuple(tiers) + ("numba",)


def backend() -> str:
    """The tier the kernels use: the best available, or ``$REFQUANT_KERNEL_TIER`` if set."""
    want = os.environ.get(TIER_ENV, "").strip()
    have = available_tiers()
    if not want:
        return have[0]
    if want not in TIERS:
        raise ValueError(f"{TIER_ENV}={want!r} is not a tier; tiers: {', '.join(TIERS)}")
    if want not in have:
        raise ValueError(f"{TIER_ENV}={want!r}: this machine (or numba's target) only runs {', '.join(have)}")
    return want




def _layout_key(tier: str, p: Packed) -> tuple:
    """What a kernel is compiled for: the tier and every compile-time constant of the layout
    (the arguments of ``_build`` / ``_build_tiles``)."""
    return (tier, p.kind, p.sub16, p.offset, p.sc is not None, p.mn is not None, p.c, p.dshift, p.mshift,
            p.mnshift, p.table)


def kernels_for(tier: str, p: Packed):
    """``(one_token, batch)``: the kernels for ``p``'s layout on ``tier``; ``batch`` takes
    X of ``TILE_MIN_M`` rows or more (the tile kernel on SIMD tiers; the numba tier's one
    kernel takes every M)."""
    k = kernel(tier, p)
    return k, (k if tier == "numba" else tile_kernel(tier, p))


_TILE_KERNELS: dict = {}


def tile_kernel(tier: str, p: Packed):
    """The prefill (tile) kernel of a SIMD tier for ``p``'s layout (built on first use)."""
    if tier == "numba":
        raise ValueError("the numba tier has no tile kernel: its one kernel takes every M")
    key = _layout_key(tier, p)
    if key not in _TILE_KERNELS:
        _TILE_KERNELS[key] = _build_tiles(*key)
    return _TILE_KERNELS[key]


_KERNELS: dict = {}


def kernel(tier: str, p: Packed):
    """The compiled kernel of tier ``tier`` for ``p``'s layout (built on first use, then kept)."""
    key = _layout_key(tier, p)
    if key not in _KERNELS:
        _KERNELS[key] = _build(*key)
    return _KERNELS[key]


_DUMMY_U8 = np.zeros((1, 1), np.uint8)
_DUMMY_U16 = np.zeros((1, 1), np.uint16)


def run(p: Packed, xq: np.ndarray, dx: np.ndarray, xs: np.ndarray, xs16: np.ndarray | None = None,
        tier: str | None = None) -> np.ndarray:
    """The kernel on already-quantized activations (M, nb·32): ``out[M, rows]`` float32."""
    tier = tier or backend()
    if tier not in available_tiers():
        raise ValueError(f"tier {tier!r} is not available here ({', '.join(available_tiers())})")
    M = xq.shape[0]
    out = np.empty((M, p.shape[0]), np.float32)
    sc = p.sc if p.sc is not None else _DUMMY_U8
    m = p.m if p.m is not None else _DUMMY_U16
    mn = p.mn if p.mn is not None else _DUMMY_U8
    if xs16 is None:
        xs16 = np.zeros((2, M, 8), np.float32)
    xa = np.abs(xq) if p.kind in SIGNED_KINDS else xq   # |x_q|: the unsigned operand of the signed path only
    one, batch = kernels_for(tier, p)
    (batch if M >= TILE_MIN_M else one)(p.qs, p.qh, p.d, sc, m, mn, xq, xa, dx, xs, xs16, out)
    return out


def _check_X(p: Packed, X, name: str) -> np.ndarray:
    if not isinstance(p, Packed):
        raise TypeError(f"p must be a Packed weight (bytedot.pack_*), got {type(p).__name__}")
    X = float_array(X, name)
    if X.ndim not in (1, 2) or X.shape[-1] != p.shape[1]:
        raise ValueError(f"{name} must have shape ({p.shape[1]},) or (M, {p.shape[1]}), got {X.shape}")
    X2 = np.atleast_2d(X)
    if X2.shape[0] > MAX_BATCH:
        raise ValueError(f"{name} has {X2.shape[0]} rows; the small-batch kernels take at most {MAX_BATCH}")
    return np.ascontiguousarray(X2, np.float32)


def matmul(p: Packed, X: np.ndarray, *, round_x=None, tier: str | None = None) -> np.ndarray:
    """``Ŵ x̂`` for x of shape (n,) -> (rows,), or ``X̂ Ŵᵀ`` for X of shape (M <= 16, n) -> (M, rows).

    x is rounded to Q8_0 blocks (``round_x=None``, llama.cpp's) or by ``round_x(X, nb) ->
    (x_q, d_x, S·d_x)`` (e.g. W8A8's one int8 scale per token, ``blocks_of_rows``).
    """
    X2 = _check_X(p, X, "x" if np.ndim(X) == 1 else "X")
    xq, dx, xs = (round_x or quantize_x_q8_0)(X2, p.nb)
    xs16 = None
    if p.sub16:   # Q6_K: d_x per 16 and its offset's d_x Σ x_q per 16
        dx16 = np.repeat(dx, 2, axis=1)
        xs16 = np.stack([dx16, (dx16 * xq.reshape(X2.shape[0], -1, 16).sum(axis=2)).astype(np.float32)])
    out = run(p, xq, dx, xs, xs16, tier)
    return out[0] if np.ndim(X) == 1 else out
