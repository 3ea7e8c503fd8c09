"""numba matvec / small-batch matmul kernels for integer weights, each with a NumPy twin.

Batch-1 decode is ``y = W x``: two FLOPs per weight read once, so the speed of these
kernels is the speed at which weight bytes can be pulled through the cores. Each public
function validates its inputs and calls a private ``@njit`` kernel; ``*_ref`` is the
NumPy twin that the tests compare it with.

Weight layouts are those of ``refquant.affine``:

* ``matvec_int4``: codes packed two per byte along ``in`` (element 2k in the low
  nibble of byte k; signed two's complement when symmetric, unsigned with per-group
  zero points when asymmetric), scales (and zeros) per (row, group of ``g`` inputs)::

      y_r = Σ_groups s_rg (Σ_{i∈g} q_ri x_i - z_rg Σ_{i∈g} x_i)

  Nibbles are unpacked in registers; the dequantized matrix is never built. x is first
  rounded to int16 per group (``s_g = max|x_g| / 32767``; each element moves by at most
  ``s_g / 2``, 2^-16 of the group's largest value, far below the weight's 4-bit error), so
  the kernels compute ``Ŵ x̂`` and the twin does the same. For g = 128 the products run
  as integers: nibble × int16 in int32 sums (LLVM emits ``vpmaddwd``), one float
  multiply-add per group, signed nibbles through the unsigned path (``b ^ 0x88`` holds
  ``n + 8``; ``8 Σ x_q`` is taken back exactly). At 11008x4096 this took 1.9-2.4 ms
  against 2.9 ms for the float path it replaced. Shorter groups keep the float path,
  where one horizontal reduction per 32 or 64 weights does not pay: it splits x once into
  even / odd elements so each byte meets two contiguous x streams, reads each nibble
  times 16 (``b << 4`` and ``b & 0xF0`` as int8, exact, scaled back once per row), handles
  two rows per iteration so they share the x loads, and decodes fp16 scales through a
  table inside the kernel.

Kernels are compiled on first use and not cached on disk (``cache=False``): on this
machine the same kernel loaded from numba's cache ran 2.2x slower than freshly compiled
(0.89 vs 1.95 ms for int8 at 11008x4096, measured repeatedly), which costs far more than
the ~0.5 s compile per kernel.

The group length is a compile-time constant of each int4 kernel (one specialization per
group size and signedness): with a constant trip count LLVM vectorizes the nibble
unpacking, with a run-time one it did not (5x slower, measured).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from refquant._checks import float_array
from refquant.kernels import MAX_BATCH

INT4_GROUPS = (32, 64, 128)
# int16 activations in int32 sums pay one horizontal reduction per group: worth it from
# g128 on (1.9-2.4 vs 2.9 ms at 11008x4096), not below (g64 3.6 vs 3.0 ms)
INT4_INTEGER_MIN_GROUP = 128
# fp16 bit pattern -> float32: kernels read fp16 scales through this table (converting a
# 11008x32 fp16 scale array with NumPy on every call cost 0.4 ms, a third of the matvec)
F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _scale(v, table):
    """A scale as float32: fp16 scales arrive as their uint16 bit patterns."""
    raise NotImplementedError  # only called from numba code, see the overload below


@overload(_scale, inline="always")
def _scale_impl(v, table):
    if isinstance(v, types.Integer):
        return lambda v, table: table[v]
    return lambda v, table: np.float32(v)


# --- validation ----------------------------------------------------------------------

def _check_x(x, n: int, name: str = "x", ndim: int = 1) -> np.ndarray:
    x = float_array(x, name, ndim=ndim)
    if x.shape[-1] != n:
        raise ValueError(f"{name} has {x.shape[-1]} features but the weight has in={n}")
    if ndim == 2 and x.shape[0] > MAX_BATCH:
        raise ValueError(f"{name} has {x.shape[0]} rows; the small-batch kernels take at most {MAX_BATCH}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_array(a, name: str, dtypes, shape=None) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
    if a.dtype not in [np.dtype(d) for d in dtypes]:
        raise TypeError(f"{name} must have dtype {' or '.join(np.dtype(d).name for d in dtypes)}, got {a.dtype}")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    return np.ascontiguousarray(a)


# --- INT4 ----------------------------------------------------------------------------

def _int4_kernel(group: int, signed: bool, batched: bool):
    """Build the kernel for one group size (a compile-time constant) and nibble signedness."""
    HG = group // 2
    LANES = HG <= 16  # short groups: per-lane accumulators instead of a reduction per group
    INTEGER = group >= INT4_INTEGER_MIN_GROUP

    @njit(fastmath=True, inline="always")
    def group_dot(row, base, xe, xo):
        acc = np.float32(0)
        for j in range(HG):
            b = row[base + j]
            if signed:   # row is int8: arithmetic shifts sign-extend each nibble
                lo = np.float32(np.int8(b << 4) >> 4)
                hi = np.float32(b >> 4)
            else:        # row is uint8
                lo = np.float32(b & 15)
                hi = np.float32(b >> 4)
            acc += lo * xe[base + j] + hi * xo[base + j]
        return acc

    if not batched and INTEGER:
        # Integer path (see the module docstring): nibbles meet int16 activations in int32
        # sums, which LLVM turns into vpmaddwd; one float multiply-add per group. Signed
        # nibbles go through the unsigned path: (b ^ 0x88) holds n + 8 in each nibble, and
        # the 8 * Σ x_q of the group is taken back exactly in the integer sum.
        flip = np.uint8(0x88 if signed else 0)

        @njit(parallel=True, fastmath=True, cache=False)
        def kernel(p, s, z, xe, xo, gsum, sx, table):
            R, ng = p.shape[0], s.shape[1]
            out = np.empty(R, np.float32)
            for r in prange(R):
                a = p[r]
                t = np.float32(0)
                for g in range(ng):
                    base = g * HG
                    c = np.int32(0)
                    for j in range(HG):
                        v = np.int16(a[base + j] ^ flip)
                        c = np.int32(c + np.int32(np.int16(v & np.int16(15))) * np.int32(xe[base + j])
                                     + np.int32(np.int16(v >> np.int16(4))) * np.int32(xo[base + j]))
                    if signed:
                        cf = np.float32(np.int32(c - np.int32(8) * gsum[g]))
                    else:
                        cf = np.float32(c) - np.float32(z[r, g]) * np.float32(gsum[g])
                    t += cf * (_scale(s[r, g], table) * sx[g])
                out[r] = t
            return out
        return kernel

    # Two rows per iteration share every x load: the kernels are bound by instructions per
    # weight, not by memory (11008x4096 g128, L3-resident: 1.27 -> 0.71 ms; 0.62 with the x16 read).
    if not batched and not LANES:  # g64: the float path below beat the integer one (3.0 vs 3.6 ms)
        # Both nibbles are read times 16 with no shift back -- (b << 4) and (b & 0xF0) as int8
        # -- and the sum is scaled by 1/16 at the end (exact). Unsigned nibbles n take the
        # same path: (b ^ 0x88) holds n - 8 in each signed nibble, so the zero point becomes
        # z - 8 (0.62 vs 1.15 ms for the direct unsigned loop at 11008x4096, g128).
        @njit(parallel=True, fastmath=True, cache=False)
        def kernel(p, s, z, xe, xo, gsum, table):
            R, ng = p.shape[0], s.shape[1]
            out = np.empty(R, np.float32)
            flip = np.int8(0 if signed else -120)  # 0x88 as int8
            for rr in prange((R + 1) // 2):
                r0 = 2 * rr
                r1 = min(r0 + 1, R - 1)  # an odd last row is computed twice
                a, b = p[r0].view(np.int8), p[r1].view(np.int8)
                t0 = np.float32(0)
                t1 = np.float32(0)
                for g in range(ng):
                    base = g * HG
                    c0 = np.float32(0)
                    c1 = np.float32(0)
                    for j in range(HG):
                        xa, xb = xe[base + j], xo[base + j]
                        u, v = a[base + j] ^ flip, b[base + j] ^ flip
                        c0 += np.float32(np.int8(u << 4)) * xa + np.float32(np.int8(u & -16)) * xb
                        c1 += np.float32(np.int8(v << 4)) * xa + np.float32(np.int8(v & -16)) * xb
                    if not signed:
                        c0 -= np.float32(16) * (np.float32(z[r0, g]) - np.float32(8)) * gsum[g]
                        c1 -= np.float32(16) * (np.float32(z[r1, g]) - np.float32(8)) * gsum[g]
                    t0 += c0 * _scale(s[r0, g], table)
                    t1 += c1 * _scale(s[r1, g], table)
                out[r0] = t0 * np.float32(0.0625)  # undo the x16 of the nibbles (exact)
                out[r1] = t1 * np.float32(0.0625)
            return out
        return kernel

    if not batched:  # short groups: per-lane accumulators, no reduction per group
        @njit(parallel=True, fastmath=True, cache=False)
        def kernel_lanes(p, s, z, xe, xo, gsum, table):
            R, ng = p.shape[0], s.shape[1]
            out = np.empty(R, np.float32)
            flip = np.int8(0 if signed else -120)  # as in the kernel above
            for rr in prange((R + 1) // 2):
                r0 = 2 * rr
                r1 = min(r0 + 1, R - 1)
                a, b = p[r0].view(np.int8), p[r1].view(np.int8)
                lane0 = np.zeros(HG, np.float32)
                lane1 = np.zeros(HG, np.float32)
                t0 = np.float32(0)
                t1 = np.float32(0)
                for g in range(ng):
                    base = g * HG
                    s0, s1 = _scale(s[r0, g], table), _scale(s[r1, g], table)
                    for j in range(HG):
                        xa, xb = xe[base + j], xo[base + j]
                        u, v = a[base + j] ^ flip, b[base + j] ^ flip
                        lane0[j] += s0 * (np.float32(np.int8(u << 4)) * xa + np.float32(np.int8(u & -16)) * xb)
                        lane1[j] += s1 * (np.float32(np.int8(v << 4)) * xa + np.float32(np.int8(v & -16)) * xb)
                    if not signed:
                        t0 -= s0 * np.float32(16) * (np.float32(z[r0, g]) - np.float32(8)) * gsum[g]
                        t1 -= s1 * np.float32(16) * (np.float32(z[r1, g]) - np.float32(8)) * gsum[g]
                out[r0] = (t0 + lane0.sum()) * np.float32(0.0625)
                out[r1] = (t1 + lane1.sum()) * np.float32(0.0625)
            return out
        return kernel_lanes

    @njit(parallel=True, fastmath=True, cache=False)
    def kernel_mm(p, s, z, xe, xo, gsum, table):
        M = xe.shape[0]
        out = np.empty((M, p.shape[0]), np.float32)
        for r in prange(p.shape[0]):
            row = p[r]
            for m in range(M):
                total = np.float32(0)
                for g in range(s.shape[1]):
                    acc = group_dot(row, g * HG, xe[m], xo[m])
                    if not signed:
                        acc -= np.float32(z[r, g]) * gsum[m, g]
                    total += acc * _scale(s[r, g], table)
                out[m, r] = total
        return out
    return kernel_mm


_INT4 = {(g, sg, b): _int4_kernel(g, sg, b) for g in INT4_GROUPS for sg in (True, False) for b in (False, True)}


def _check_int4(packed, scales, zeros, group_size):
    if group_size not in INT4_GROUPS:
        raise ValueError(f"group_size must be one of {INT4_GROUPS}, got {group_size}")
    p = _check_array(packed, "packed", [np.uint8, np.int8])
    if p.ndim != 2 or (2 * p.shape[1]) % group_size:
        raise ValueError(f"packed must be 2-D (out, in_padded / 2) with in_padded a multiple of "
                         f"group_size={group_size}, got shape {getattr(p, 'shape', None)}")
    s = _check_array(scales, "scales", [np.float32, np.float16], (p.shape[0], 2 * p.shape[1] // group_size))
    if s.dtype == np.float16:
        s = s.view(np.uint16)  # decoded in the kernel through F16_TABLE
    signed = zeros is None
    if signed:
        z = np.zeros((1, 1), np.float32)
    else:
        z = _check_array(zeros, "zeros", [np.uint8, np.int32, np.float32], s.shape)
    return p.view(np.int8 if signed else np.uint8), s, z, signed


def _pad_x(x, n_padded: int, group_size: int, name: str) -> np.ndarray:
    """x may be shorter than the padded rows by less than a group: pad it with zeros."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
    n = x.shape[-1] if x.ndim else 0
    if not n_padded - group_size < n <= n_padded:
        raise ValueError(f"{name} has {n} features but the packed weight holds {n_padded} "
                         f"(rows padded to a multiple of group_size={group_size})")
    x = _check_x(x, n, name, x.ndim if x.ndim in (1, 2) else 1)
    if n < n_padded:
        x = np.concatenate([x, np.zeros(x.shape[:-1] + (n_padded - n,), np.float32)], axis=-1)
    return x


def quantize_activation_int16(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """x in blocks of ``block`` as int16: ``s_b = max|x_b| / 32767``, ``x_q = round(x / s_b)``.

    Returns ``(x_q int16 (..., n), s float32 (..., n / block))``; an all-zero block has
    scale 0 and codes 0. Each element moves by at most ``s_b / 2`` (2^-16 of the block's
    largest magnitude): far below the error of any 4- or 8-bit weight it meets.
    """
    xb = x.reshape(x.shape[:-1] + (-1, block))
    s = (np.abs(xb).max(axis=-1) / np.float32(32767)).astype(np.float32)
    safe = np.where(s > 0, s, np.float32(1))[..., None]
    q = np.clip(np.round(xb / safe), -32767, 32767).astype(np.int16)
    return q.reshape(x.shape), s


def dequantize_activation_int16(x: np.ndarray, block: int) -> np.ndarray:
    """The activation the integer kernels see: ``x_q * s_b`` (float64)."""
    q, s = quantize_activation_int16(np.asarray(x, np.float32), block)
    return (q.reshape(q.shape[:-1] + (-1, block)).astype(np.float64) * s[..., None]).reshape(q.shape)


def matvec_int4(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, x: np.ndarray, *,
                group_size: int = 128) -> np.ndarray:
    """Group-wise INT4 matvec on packed nibbles (layout in the module docstring).

    ``zeros=None``: symmetric signed nibbles; otherwise unsigned nibbles with zero points.
    Rows may be zero-padded to a whole group (``affine.quantize(..., pad=True)``): x then
    has the unpadded length. x is quantized to int16 per group
    (``quantize_activation_int16``), so the result is ``Ŵ x̂`` with ``|x̂ - x| <= s_g / 2``.
    """
    p, s, z, signed = _check_int4(packed, scales, zeros, group_size)
    if isinstance(x, np.ndarray) and x.ndim != 1:
        raise ValueError(f"x must be 1-D, got shape {x.shape}")
    x = _pad_x(x, 2 * p.shape[1], group_size, "x")
    xq, sx = quantize_activation_int16(x, group_size)
    kernel = _INT4[(group_size, signed, False)]
    if group_size >= INT4_INTEGER_MIN_GROUP:
        xe, xo = np.ascontiguousarray(xq[0::2]), np.ascontiguousarray(xq[1::2])
        gsum = xq.reshape(-1, group_size).sum(axis=1, dtype=np.int32)
        return kernel(p.view(np.uint8), s, z, xe, xo, gsum, sx, F16_TABLE)
    x_hat = (xq.reshape(-1, group_size) * sx[:, None]).reshape(-1)   # the same x̂, float kernels
    xe, xo = np.ascontiguousarray(x_hat[0::2]), np.ascontiguousarray(x_hat[1::2])
    gsum = x_hat.reshape(-1, group_size).sum(axis=1, dtype=np.float32)
    return kernel(p, s, z, xe, xo, gsum, F16_TABLE)


def matmul_int4(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, X: np.ndarray, *,
                group_size: int = 128) -> np.ndarray:
    """``Y = X Ŵᵀ`` for a small batch X (M <= 16, in) on packed INT4 weights."""
    p, s, z, signed = _check_int4(packed, scales, zeros, group_size)
    if isinstance(X, np.ndarray) and X.ndim != 2:
        raise ValueError(f"X must be 2-D (M, in), got shape {X.shape}")
    X = _pad_x(X, 2 * p.shape[1], group_size, "X")
    xe, xo = np.ascontiguousarray(X[:, 0::2]), np.ascontiguousarray(X[:, 1::2])
    gsum = X.reshape(X.shape[0], -1, group_size).sum(axis=2, dtype=np.float32)
    return _INT4[(group_size, signed, True)](p, s, z, xe, xo, gsum, F16_TABLE)


def unpack_int4_ref(packed: np.ndarray, signed: bool) -> np.ndarray:
    """Nibbles -> int codes (out, in), element 2k from the low nibble of byte k."""
    b = packed.view(np.uint8).astype(np.int16)
    lo, hi = b & 15, b >> 4
    if signed:
        lo, hi = lo - ((lo & 8) << 1), hi - ((hi & 8) << 1)
    q = np.empty((b.shape[0], b.shape[1] * 2), np.int16)
    q[:, 0::2], q[:, 1::2] = lo, hi
    return q


def matvec_int4_ref(packed, scales, zeros, x, *, group_size: int = 128) -> np.ndarray:
    """NumPy twin of ``matvec_int4``: dequantize in float64 and multiply by the same int16-rounded x."""
    n = x.shape[-1]
    xp = np.zeros(2 * packed.shape[1], np.float32)
    xp[:n] = x
    x = dequantize_activation_int16(xp, group_size)[:n]
    q = unpack_int4_ref(packed, zeros is None).astype(np.float64)[:, : x.shape[-1]]
    s = np.repeat(scales.astype(np.float64), group_size, axis=1)
    z = 0 if zeros is None else np.repeat(zeros.astype(np.float64), group_size, axis=1)[:, : x.shape[-1]]
    s = s[:, : x.shape[-1]]
    return (((q - z) * s) @ np.asarray(x, np.float64).T).T.astype(np.float32)
