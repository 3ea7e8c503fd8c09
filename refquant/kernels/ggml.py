"""numba matvec kernels that run directly on GGML block bytes, as llama.cpp's CPU backend does.

The weight is the bytes a GGUF file stores, ``raw[out, row_bytes]`` (see
``refquant.gguf.quants`` for the block layouts). Like ggml's ``vec_dot_*`` functions, the
activation ``x`` is first quantized to 8-bit blocks (Q8_0 for Q8_0/Q4_0 weights, Q8_K for
Q4_K), so every block's dot product is an exact integer sum and the float work is one
multiply-add per block::

    Q8_0 / Q4_0:  y_r = Σ_b d_w[r,b] d_x[b] Σ_{i∈b} q_w q_x
    Q4_1:         y_r = Σ_b d_x[b] ( d_w Σ_{i∈b} q_w q_x  +  m_w Σ_{i∈b} q_x )
    Q4_K:         y_r = Σ_B d_x[B] ( d_w Σ_j sc_j Σ_{i∈j} q_w q_x  -  dmin_w Σ_j m_j Σ_{i∈j} q_x )

(j runs over the 8 sub-blocks of 32 in a 256-superblock; ``Σ q_x`` per sub-block comes
from Q8_K's ``bsums``). For Q4_1, llama.cpp pairs the weight with Q8_1, which stores
``d_x Σ q_x`` per block as fp16; here x is Q8_0 and the sum is taken exactly, so results
agree with llama.cpp's up to that fp16 rounding. fp16 block scales are decoded through a 65536-entry float32 table.
The results therefore differ from ``dequantize(raw) @ x`` by the activation rounding, as
llama.cpp's do; the NumPy twin ``matvec_ggml_ref`` computes the same integer sums in
int64 and combines them in float64, and the tests hold the kernels to it.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from refquant.gguf import quants
from refquant.kernels.matvec import F16_TABLE as _F16
from refquant.kernels.matvec import _check_array, _check_x

KERNEL_TYPES = {"Q8_0": "Q8_0", "Q4_0": "Q8_0", "Q4_1": "Q8_0", "Q4_K": "Q8_K"}  # weight type -> activation type


def _check_raw(raw, type_name: str, n: int | None = None) -> tuple[np.ndarray, int]:
    """uint8 block bytes (out, row_bytes) of ``type_name``; returns them and the row length."""
    t = quants.TYPES[type_name]
    raw = _check_array(raw, "raw", [np.uint8])
    if raw.ndim != 2 or raw.shape[1] % t.type_size:
        raise ValueError(f"raw must be 2-D (out, row_bytes) with row_bytes a multiple of {type_name}'s "
                         f"{t.type_size}-byte block, got shape {raw.shape}")
    return raw, raw.shape[1] // t.type_size * t.block_size


def quantize_activation(x: np.ndarray, weight_type: str):
    """x quantized as llama.cpp does before a ``weight_type`` dot product.

    Returns ``(qs int8[n], d float32[n_blocks], bsums int32[n/16] or None)``.
    """
    act = KERNEL_TYPES[weight_type]
    raw = quants.quantize(x.reshape(1, -1), act).reshape(-1, quants.TYPES[act].type_size)
    if act == "Q8_0":
        return raw[:, 2:].view(np.int8).reshape(-1).copy(), raw[:, :2].copy().view(np.float16)[:, 0].astype(np.float32), None
    d = raw[:, :4].copy().view(np.float32)[:, 0]
    bsums = raw[:, 260:].copy().view(np.int16).reshape(-1).astype(np.int32)
    return raw[:, 4:260].view(np.int8).reshape(-1).copy(), d, bsums


@njit(cache=False)
def _q8_0_codes(x, qs, d, sums):
    """Q8_0 codes and unrounded scales of x, the float32 operations of quantize_row_q8_0_ref:
    ``d = amax / 127``, ``q = roundf(x * (1/d))`` (0 for an all-zero block); ``sums`` gets
    each block's Σ q (the Q4_1 kernel's min term)."""
    for b in range(d.size):
        amax = np.float32(0)
        for i in range(32):
            amax = max(amax, abs(x[32 * b + i]))
        db = amax / np.float32(127)
        inv = np.float32(1) / db if db != 0 else np.float32(0)
        total = 0
        for i in range(32):
            v = x[32 * b + i] * inv
            t = np.float32(np.trunc(v))
            r = t + (np.float32(1) if v >= 0 else np.float32(-1)) if abs(v - t) >= np.float32(0.5) else t
            qs[32 * b + i] = np.float32(r)
            total += np.int32(r)
        d[b] = db
        sums[b, 0] = np.float32(total)


def quantize_activation_q8_0(x: np.ndarray):
    """``quantize_activation(x, "Q8_0")`` compiled (the decode path calls it per Linear).

    Returns ``(codes as float32 [n], d [n / 32], Σ codes per block float32 [n / 32, 1])``:
    the form the kernels read (codes are small integers, exact in float32)."""
    nb = x.size // 32
    qs, d, sums = np.empty(x.size, np.float32), np.empty(nb, np.float32), np.empty((nb, 1), np.float32)
    _q8_0_codes(x, qs, d, sums)
    return qs, d.astype(np.float16).astype(np.float32), sums


# --- kernels -------------------------------------------------------------------------
# Each row keeps 32 float32 lane accumulators (one per position in a 32-weight block) and
# reduces them once at the end: a horizontal sum per block is what made a first, integer
# per-block version 4x slower (measured). Products of 8-bit codes are exact in float32;
# the block scale multiplies in before accumulation. Blocks are read through a 3-D view
# (rows, blocks, block bytes) of the weight, and fp16 scales through a 65536-entry table.

@njit(fastmath=True, inline="always")
def _f16(u, r, b, at, table):
    return table[np.int32(u[r, b, at]) | (np.int32(u[r, b, at + 1]) << 8)]


def _kernel(fmt: str):
    """The matvec kernel for one weight format (a compile-time constant of the kernel)."""
    Q8_0, Q4_0, Q4_1 = fmt == "Q8_0", fmt == "Q4_0", fmt == "Q4_1"

    @njit(parallel=True, fastmath=True, cache=False)
    def kernel(u, q, xf, xd, xsum, table):
        rows, nb = u.shape[0], u.shape[1]
        out = np.empty(rows, np.float32)
        for r in prange(rows):
            acc = np.zeros(32, np.float32)
            acc_min = np.float32(0)
            for b in range(nb):
                d = _f16(u, r, b, 0, table) * xd[b]
                if Q8_0:    # int8 codes at bytes 2..33
                    for i in range(32):
                        acc[i] += d * (np.float32(q[r, b, 2 + i]) * xf[b, i])
                elif Q4_0:  # element i in the low nibble of byte 2+i, element 16+i in its high nibble
                    for i in range(16):
                        byte = np.int32(u[r, b, 2 + i])
                        acc[i] += d * (np.float32((byte & 15) - 8) * xf[b, i])
                        acc[16 + i] += d * (np.float32((byte >> 4) - 8) * xf[b, 16 + i])
                elif Q4_1:  # d, m, then nibbles as Q4_0 but unsigned; m pairs with Σ q_x of the block
                    acc_min -= _f16(u, r, b, 2, table) * xd[b] * xsum[b, 0]
                    for i in range(16):
                        byte = np.int32(u[r, b, 4 + i])
                        acc[i] += d * (np.float32(byte & 15) * xf[b, i])
                        acc[16 + i] += d * (np.float32(byte >> 4) * xf[b, 16 + i])
                else:       # Q4_K: 8 sub-blocks of 32 with 6-bit (scale, min) pairs in bytes 4..15
                    dmin = _f16(u, r, b, 2, table) * xd[b]
                    for j in range(8):
                        if j < 4:
                            sc = np.int32(u[r, b, 4 + j]) & 63
                            mn = np.int32(u[r, b, 8 + j]) & 63
                        else:
                            sc = (np.int32(u[r, b, 8 + j]) & 15) | ((np.int32(u[r, b, j]) >> 6) << 4)
                            mn = (np.int32(u[r, b, 8 + j]) >> 4) | ((np.int32(u[r, b, 4 + j]) >> 6) << 4)
                        dj = d * np.float32(sc)
                        acc_min += dmin * np.float32(mn) * xsum[b, j]
                        base, shift = 16 + 32 * (j // 2), 4 * (j % 2)
                        for i in range(32):
                            nib = (np.int32(u[r, b, base + i]) >> shift) & 15
                            acc[i] += dj * (np.float32(nib) * xf[b, 32 * j + i])
            out[r] = acc.sum() - acc_min
        return out
    return kernel


_KERNELS = {t: _kernel(t) for t in KERNEL_TYPES}


# --- public --------------------------------------------------------------------------

def _matvec(raw, x, type_name):
    raw, _ = _check_raw(raw, type_name)
    return matvec_checked_raw(raw, x, type_name)


def matvec_checked_raw(raw: np.ndarray, x: np.ndarray, type_name: str) -> np.ndarray:
    """The kernel for ``type_name`` on bytes that already passed ``_check_raw`` (a model
    checks its weights once at load; decode then calls this per token). x is validated."""
    t = quants.TYPES[type_name]
    x = _check_x(x, raw.shape[1] // t.type_size * t.block_size)
    u = raw.reshape(raw.shape[0], -1, t.type_size)
    if KERNEL_TYPES[type_name] == "Q8_0":
        xf, xd, xsum = quantize_activation_q8_0(x)
        return _KERNELS[type_name](u, u.view(np.int8), xf.reshape(-1, 32), xd, xsum, _F16)
    xq, xd, bsums = quantize_activation(x, type_name)
    # Q4_K's min term needs Σ q_x per 32 weights: Q8_K's bsums hold it per 16
    xsum = bsums.reshape(-1, 8, 2).sum(axis=2).astype(np.float32)
    return _KERNELS[type_name](u, u.view(np.int8), xq.astype(np.float32).reshape(-1, 256), xd, xsum, _F16)


def matvec_q8_0(raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``W x`` for a Q8_0 weight given as block bytes (out, in/32*34); x is quantized to Q8_0."""
    return _matvec(raw, x, "Q8_0")


def matvec_q4_0(raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``W x`` for a Q4_0 weight given as block bytes (out, in/32*18); x is quantized to Q8_0."""
    return _matvec(raw, x, "Q4_0")


def matvec_q4_1(raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``W x`` for a Q4_1 weight given as block bytes (out, in/32*20); x is quantized to Q8_0."""
    return _matvec(raw, x, "Q4_1")


def matvec_q4_k(raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``W x`` for a Q4_K weight given as block bytes (out, in/256*144); x is quantized to Q8_K."""
    return _matvec(raw, x, "Q4_K")


def matvec_ggml_ref(raw: np.ndarray, x: np.ndarray, weight_type: str) -> np.ndarray:
    """NumPy twin of the kernels: the same integer block sums, combined in float64.

    Uses the decoded codes from ``refquant.gguf.quants`` rather than the kernels' byte
    arithmetic: per block, ``(ŵ / d_w)`` are the integer codes (minus the min term for Q4_K).
    """
    raw, n = _check_raw(raw, weight_type)
    x = _check_x(x, n)
    xq, xd, _ = quantize_activation(x, weight_type)
    t = quants.TYPES[weight_type]
    rows = raw.shape[0]
    blocks = raw.reshape(-1, t.type_size)
    xq = xq.astype(np.int64)
    if weight_type in ("Q8_0", "Q4_0", "Q4_1"):
        d = blocks[:, :2].copy().view(np.float16)[:, 0].astype(np.float64).reshape(rows, -1)
        unit = blocks.copy()
        unit[:, 0], unit[:, 1] = 0x00, 0x3C  # fp16 1.0: dequantize then yields the integer codes
        mins = 0.0
        if weight_type == "Q4_1":
            mins = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float64).reshape(rows, -1)
            unit[:, 2], unit[:, 3] = 0, 0  # min 0: codes only
        codes = quants.dequantize(unit, weight_type, (rows, n)).astype(np.int64)
        sums = (codes.reshape(rows, -1, 32) * xq.reshape(-1, 32)).sum(axis=2)
        xs = xq.reshape(-1, 32).sum(axis=1)
        return (xd.astype(np.float64) * (d * sums + mins * xs)).sum(axis=1).astype(np.float32)
    # Q4_K: sub-block codes and (scale, min) pairs
    d = blocks[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float64).reshape(rows, -1)
    dmin = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float64).reshape(rows, -1)
    sc, mn = quants._unpack_k4_scales(blocks[:, 4:16])
    q = quants._k4_nibbles(blocks[:, 16:144]).astype(np.int64).reshape(rows, -1, 8, 32)
    xs = xq.reshape(-1, 8, 32)
    sum_q = (sc.reshape(rows, -1, 8).astype(np.int64) * (q * xs).sum(axis=3)).sum(axis=2)
    sum_m = (mn.reshape(rows, -1, 8).astype(np.int64) * xs.sum(axis=2)).sum(axis=2)
    return (xd.astype(np.float64) * (d * sum_q - dmin * sum_m)).sum(axis=1).astype(np.float32)
