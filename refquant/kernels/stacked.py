"""Weights of one role stacked over a model's layers, and their product inside numba code.

A compiled decode step (``minigpt_np.compiled``) runs a whole transformer block -- or all
of them -- in one numba call, so it cannot go through ``Linear.__call__`` (a Python call,
an x check and a few NumPy allocations per matrix: about 20 µs each, 120+ times per
SmolLM2 token). Instead, the weights of one role (say every layer's fused q/k/v) become
one ``Operand``: the byte-dot layout of ``bytedot.Packed`` with a leading layer axis, or
a float32 stack, and ``make_part(op)`` returns an ``@njit`` function::

    part(w, l, X, out, fa, sync, slot, chunks)   # out[:T] = X Ŵ_lᵀ, X (T, n)

run by every member of a team of threads (``threads.join``): each rounds X to Q8_0 blocks
with ``bytedot.quantize_x``, the one Q8_0 rounder (the block scale rounded to fp16 by
``f16_round``, tested bit-identical to NumPy's cast), then claims chunks of row groups and
computes them on its own thread with the same compiled kernel ``bytedot.matmul`` calls. So
a model step built from these computes, Linear by Linear, what the NumPy reference
computes with ``Linear`` objects.

Which Linears have an operand (``operand_kind``, which the Linear answers): float32
(``DenseLinear``), and every ``QuantizedLinear`` whose scheme has a byte-dot kernel that
rounds x to Q8_0 blocks with no transform of x first (``KernelEntry.q8_0``: every GGML type
with a kernel, INT8, INT4 RTN and GPTQ). Schemes without a kernel run on their dequantized weight (``dequantized=True``,
what the NumPy reference does for them too); schemes that round x their own way (W8A8,
SmoothQuant, LLM.int8(), AWQ's x transform) have no compiled path and are refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, types

from refquant.kernels import _cache, bytedot, threads
from refquant.kernels import simd as V
from refquant.kernels.bytedot import Packed, f16_round, quantize_x  # noqa: F401  (the step's x rounding)

_ARRAYS = ("qs", "qh", "d", "sc", "m", "mn")
_DUMMY = {"sc": np.uint8, "m": np.uint16, "mn": np.uint8}


@dataclass(frozen=True, eq=False)
class Operand:
    """One weight role over ``L`` layers: ``kind`` ``"f32"`` (``arrays[0]`` float32 (L, rows, n))
    or ``"packed"`` (the six ``Packed`` arrays, each with a leading layer axis; ``template``
    is layer 0's ``Packed``, which fixes the kernel)."""

    kind: str
    shape: tuple[int, int]
    arrays: tuple
    template: Packed | None = None

    @property
    def nbytes(self) -> int:
        """Bytes one pass over every layer reads."""
        return int(sum(a.nbytes for a in self.arrays if a.ndim > 1 and a.shape[-1] > 1))

    def key(self) -> tuple:
        """What fixes the compiled part (equal keys share one): ``part_key`` of its layers."""
        return ("f32",) if self.kind == "f32" else ("packed", layout(self.template))


def layout(p: Packed) -> tuple:
    """``Packed.layout``: weights with equal layouts row-stack, stack over layers and share
    one compiled kernel and part."""
    return p.layout()


def part_key(part: tuple[str, object]) -> tuple:
    """``Operand.key`` of the operand a ``layer_weight`` result would stack into, without
    stacking it."""
    kind, w = part
    return ("f32",) if kind == "f32" else ("packed", layout(w))


def operand_kind(lin) -> str:
    """``"f32"``, ``"packed"`` or ``"dequantized"`` for a ``refquant.linear.Linear`` (module
    docstring): the Linear says (``Linear.operand_kind``); ValueError for a scheme whose
    product the compiled path does not compute."""
    kind = getattr(lin, "operand_kind", None)
    if kind is None:
        raise TypeError(f"expected a refquant.linear Linear, got {type(lin).__name__}")
    return kind()


def layer_weight(lins: list) -> tuple[str, object]:
    """The weight of Linears that share their input (q/k/v, gate/up), row-stacked:
    ``("f32", float32 array)`` or ``("packed", Packed)``. Linears of different kinds or
    layouts cannot stack (ValueError): the caller keeps them apart."""
    g = lins[0].group
    if g is not None and all(lin.group is not None and lin.group[0] is g[0] for lin in lins) \
            and sum(lin.shape[0] for lin in lins) == g[0].shape[0]:
        lins = [g[0]]            # already row-stacked by linear.fuse
    kinds = {operand_kind(lin) for lin in lins}
    if kinds == {"packed"}:
        return "packed", bytedot.concat_rows([lin.packed() for lin in lins])
    if "packed" in kinds:
        raise ValueError("cannot row-stack a kernel weight with a float one")
    ws = [lin.dequantize() for lin in lins]
    return "f32", np.ascontiguousarray(ws[0] if len(ws) == 1 else np.concatenate(ws), np.float32)


def stack(weights: list[tuple[str, object]]) -> Operand:
    """One ``Operand`` from per-layer ``layer_weight`` results of one layout and shape."""
    kinds = {k for k, _ in weights}
    if len(kinds) != 1:
        raise ValueError("layers mix float and kernel weights")
    if kinds == {"f32"}:
        ws = [w for _, w in weights]
        if len({w.shape for w in ws}) != 1:
            raise ValueError("layers' weights differ in shape")
        return Operand("f32", ws[0].shape, (np.stack(ws),))
    ps = [p for _, p in weights]
    p0 = ps[0]
    if len({layout(p) for p in ps}) != 1:
        raise ValueError("layers' weights differ in layout")
    arrays = []
    for f in _ARRAYS:
        parts = [getattr(p, f) for p in ps]
        if any(a is None for a in parts):
            if not all(a is None for a in parts):
                raise ValueError(f"layers differ in their {f!r} field")
            arrays.append(np.zeros((len(ps), 1, 1), _DUMMY[f]))
            continue
        if len({a.shape for a in parts}) != 1 or len({a.dtype for a in parts}) != 1:
            raise ValueError(f"layers' {f!r} fields differ in shape or type")
        arrays.append(np.stack(parts))
    return Operand("packed", p0.shape, tuple(arrays), p0)


_F32 = types.Array(types.float32, 2, "C")


def _arg_types(op: Operand) -> tuple:
    """The numba types of a packed operand's kernel arguments as a part passes them: a
    layer's six arrays, then x_q, |x_q|, d_x, d_x·S, the Q6_K sums and out."""
    i8 = types.Array(types.int8, 2, "C")
    return tuple(numba.typeof(a[0]) for a in op.arrays) + (i8, i8, _F32, _F32, types.Array(types.float32, 3, "C"),
                                                           _F32)


def addresses(op: Operand, tier: str | None = None) -> np.ndarray:
    """The ``fa`` a part of ``op`` takes: uint64 (5,), the addresses of the one-token and the
    batch kernel's chunk loops (``threads.Kernel.addresses``; zeros for float weights, whose
    rows the part computes by name, and for the numba tier, whose kernels are called by
    name), then ``op``'s rows (packed arrays hold whole groups of 8 rows, so their shapes
    do not say)."""
    tier = tier or bytedot.backend()
    fa = np.zeros(5, np.uint64)
    fa[4] = op.shape[0]
    if op.kind != "f32" and tier != "numba":
        one, batch = bytedot.kernels_for(tier, op.template)
        args = _arg_types(op)
        fa[:2], fa[2:4] = one.addresses(args), batch.addresses(args)
    return fa


@njit(inline="always", fastmath=True)
def _tail(w, x, n8, n):
    s = np.float32(0)
    for i in range(n8, n):
        s += w[i] * x[i]
    return s


@njit(inline="always", fastmath=True)
def _dot_f32(w, x, n8, n):
    """``w · x`` as every path of ``matmul_f32_rows`` sums it: one vector chain over the
    first ``n8`` (a multiple of 8), its lanes summed, then the rest in order."""
    a = V.zeros_f32()
    for i in range(0, n8, 8):
        a = V.fmadd_f32x8(a, V.load_f32x8(w, i), V.load_f32x8(x, i))
    return V.hsum_f32x8(a) + _tail(w, x, n8, n)


@_cache.jit(None, fastmath=True)
def matmul_f32_rows(W, X, out, lo, hi):
    """``out[t, r] = Σ_i W[r, i] X[t, i]`` for rows ``lo <= r < hi`` (float32 accumulation,
    the calling thread: a team member's share). Every (token, row) pair is summed alike
    (``_dot_f32``), so a token's result does not depend on the others (a prompt's last row
    equals a one-token call's, bit for bit). Four tokens or more (a prefill block, a
    batch): register tiles of 4 rows x 4 tokens, 16 independent chains that each loaded
    vector of W and of X serves four times; fewer (decode): four rows at a time, four chains
    (a single chain's multiply-add latency would cap the read at ~27 GB/s per core)."""
    T, n = X.shape
    n8 = n - n % 8
    r = lo
    if T < 4:
        for rr in range(lo, hi):
            for t in range(T):
                out[t, rr] = _dot_f32(W[rr], X[t], n8, n)
        return
    while r + 4 <= hi:
        w0, w1, w2, w3 = W[r], W[r + 1], W[r + 2], W[r + 3]
        for t in range(0, T - 3, 4):
            x0, x1, x2, x3 = X[t], X[t + 1], X[t + 2], X[t + 3]
            a00, a01, a02, a03 = V.zeros_f32(), V.zeros_f32(), V.zeros_f32(), V.zeros_f32()
            a10, a11, a12, a13 = V.zeros_f32(), V.zeros_f32(), V.zeros_f32(), V.zeros_f32()
            a20, a21, a22, a23 = V.zeros_f32(), V.zeros_f32(), V.zeros_f32(), V.zeros_f32()
            a30, a31, a32, a33 = V.zeros_f32(), V.zeros_f32(), V.zeros_f32(), V.zeros_f32()
            for i in range(0, n8, 8):
                u0, u1, u2, u3 = V.load_f32x8(w0, i), V.load_f32x8(w1, i), V.load_f32x8(w2, i), V.load_f32x8(w3, i)
                a00, a01, a02, a03 = V.fmadd4(a00, a01, a02, a03, u0, u1, u2, u3, V.load_f32x8(x0, i))
                a10, a11, a12, a13 = V.fmadd4(a10, a11, a12, a13, u0, u1, u2, u3, V.load_f32x8(x1, i))
                a20, a21, a22, a23 = V.fmadd4(a20, a21, a22, a23, u0, u1, u2, u3, V.load_f32x8(x2, i))
                a30, a31, a32, a33 = V.fmadd4(a30, a31, a32, a33, u0, u1, u2, u3, V.load_f32x8(x3, i))
            for k, (b0, b1, b2, b3) in enumerate(((a00, a01, a02, a03), (a10, a11, a12, a13),
                                                  (a20, a21, a22, a23), (a30, a31, a32, a33))):
                xt = X[t + k]
                out[t + k, r] = V.hsum_f32x8(b0) + _tail(w0, xt, n8, n)
                out[t + k, r + 1] = V.hsum_f32x8(b1) + _tail(w1, xt, n8, n)
                out[t + k, r + 2] = V.hsum_f32x8(b2) + _tail(w2, xt, n8, n)
                out[t + k, r + 3] = V.hsum_f32x8(b3) + _tail(w3, xt, n8, n)
        for t in range(T - T % 4, T):
            xt = X[t]
            a0, a1, a2, a3 = V.zeros_f32(), V.zeros_f32(), V.zeros_f32(), V.zeros_f32()
            for i in range(0, n8, 8):
                y = V.load_f32x8(xt, i)
                a0, a1 = V.fmadd_f32x8(a0, V.load_f32x8(w0, i), y), V.fmadd_f32x8(a1, V.load_f32x8(w1, i), y)
                a2, a3 = V.fmadd_f32x8(a2, V.load_f32x8(w2, i), y), V.fmadd_f32x8(a3, V.load_f32x8(w3, i), y)
            out[t, r] = V.hsum_f32x8(a0) + _tail(w0, xt, n8, n)
            out[t, r + 1] = V.hsum_f32x8(a1) + _tail(w1, xt, n8, n)
            out[t, r + 2] = V.hsum_f32x8(a2) + _tail(w2, xt, n8, n)
            out[t, r + 3] = V.hsum_f32x8(a3) + _tail(w3, xt, n8, n)
        r += 4
    for rr in range(r, hi):
        for t in range(T):
            out[t, rr] = _dot_f32(W[rr], X[t], n8, n)


def _x_rounder(n: int, nb: int, signed: bool, sub16: bool):
    """``round_x(X) -> (xq, xa, dx, xs, s16)``: X (T, n) as the kernels' Q8_0 inputs (x_q,
    |x_q| for 8-bit codes, d_x, d_x·S, Q6_K's d_x and d_x·S per 16)."""
    @njit(inline="always")
    def round_x(X):
        T = X.shape[0]
        xq = np.empty((T, 32 * nb), np.int8)
        dx = np.empty((T, nb), np.float32)
        xs = np.empty((T, nb), np.float32)
        quantize_x(X, n, xq, dx, xs)
        s16 = np.zeros((2, T, 2 * nb if sub16 else 8), np.float32)
        if sub16:   # Q6_K: d_x and d_x Σ x_q per 16
            for t in range(T):
                for h in range(2 * nb):
                    tot = 0
                    for i in range(16):
                        tot += np.int64(xq[t, 16 * h + i])
                    s16[0, t, h] = dx[t, h // 2]
                    s16[1, t, h] = np.float32(np.float64(dx[t, h // 2]) * tot)
        xa = np.abs(xq) if signed else xq
        return xq, xa, dx, xs, s16
    return round_x


def _packed_consts(op: Operand, tier: str):
    """What a part of a packed operand is compiled with: ``(the numba tier's
    kernel or None, SIMD tier?, TILE_MIN_M, round_x)``."""
    p = op.template
    return (bytedot.kernel(tier, p) if tier == "numba" else None, tier != "numba", bytedot.TILE_MIN_M,
            _x_rounder(p.shape[1], p.nb, p.kind in bytedot.SIGNED_KINDS, p.sub16))


_PARTS: dict = {}


def make_part(op: Operand, tier: str | None = None):
    """``part(w, l, X, out, fa, sync, slot, chunks)``: a team member's work on ``out[:T] =
    X Ŵ_lᵀ``, on the calling thread -- a member of a team (``threads.join``) that splits
    every product of a step without a parallel call per product. The rows are cut into
    ``min(chunks, groups of 8 rows)`` chunks (chunk c of n: groups ``[G·c//n, G·(c+1)//n)``,
    ``threads.share``), which the members claim one at a time from the counter
    ``sync[slot]`` (``threads.claim``; zero before the product), so a member that runs ahead
    takes more of them. Every member rounds X itself. The numba tier's kernel computes every
    row in chunk 0. Built once per tier and layout (``Operand.key``), then kept, and cached
    on disk: its code holds no address (``threads``)."""
    tier = tier or bytedot.backend()
    key = (tier, "part", op.key())
    if key not in _PARTS:
        _PARTS[key] = _make_part(op, tier)
    return _PARTS[key]


def _part_pieces(op: Operand, tier: str):
    """``(prepare, chunks_of, chunk)`` of ``op``'s part: ``prepare(X)`` -> what the kernel
    reads of X (its Q8_0 rounding, or X for float weights); ``chunks_of(w, l, R, chunks)``
    -> the number of chunks; ``chunk(w, l, rx, out, fa, c, n)`` computes chunk ``c`` of
    ``n`` -> its rows ``(lo, hi)``."""
    if op.kind == "f32":
        @njit(inline="always")
        def prepare_f32(X):
            return X

        @njit(inline="always")
        def chunks_f32(w, l, R, chunks):
            return min(chunks, (R + 7) // 8)

        @njit(inline="always")
        def chunk_f32(w, l, X, out, fa, c, n):
            R = out.shape[1]
            g0, g1 = threads.share((R + 7) // 8, c, n)
            lo, hi = 8 * g0, min(8 * g1, R)
            matmul_f32_rows(w[0][l], X, out, lo, hi)
            return lo, hi
        return prepare_f32, chunks_f32, chunk_f32
    kern, simd, tile_min, round_x = _packed_consts(op, tier)

    @njit(inline="always")
    def chunks_of(w, l, R, chunks):
        return min(chunks, w[0][l].shape[0]) if simd else 1

    @njit(inline="always")
    def chunk(w, l, rx, out, fa, c, n):
        xq, xa, dx, xs, s16 = rx
        if not simd:
            kern(w[0][l], w[1][l], w[2][l], w[3][l], w[4][l], w[5][l], xq, xa, dx, xs, s16, out)
            return 0, out.shape[1]
        threads.chunk(fa[3] if xq.shape[0] >= tile_min else fa[1], c, n, w[0][l], w[1][l], w[2][l], w[3][l],
                      w[4][l], w[5][l], xq, xa, dx, xs, s16, out)
        g0, g1 = threads.share(w[0][l].shape[0], c, n)
        return 8 * g0, min(8 * g1, out.shape[1])
    return round_x, chunks_of, chunk


def _make_part(op: Operand, tier: str):
    prepare, chunks_of, chunk = _part_pieces(op, tier)

    @_cache.jit(("stacked.part", tier, op.key()))
    def part(w, l, X, out, fa, sync, slot, chunks):
        rx = prepare(X)     # every member: one that raised alone would leave the others waiting
        n = chunks_of(w, l, out.shape[1], chunks)
        c = threads.claim(sync, slot)
        while c < n:
            chunk(w, l, rx, out, fa, c, n)
            c = threads.claim(sync, slot)
    return part


def _filler(chunk):
    """``fill(w, l, rx, tmp, out, c0, fa, sync, slot, n)``: claims chunks of ``n`` from
    ``sync[slot]``, computes each into ``tmp`` and copies its rows to ``out``'s columns from
    ``c0``."""
    @njit(inline="always")
    def fill(w, l, rx, tmp, out, c0, fa, sync, slot, n):
        c = threads.claim(sync, slot)
        while c < n:
            lo, hi = chunk(w, l, rx, tmp, fa, c, n)
            for t in range(tmp.shape[0]):
                for r in range(lo, hi):
                    out[t, c0 + r] = tmp[t, r]
            c = threads.claim(sync, slot)
    return fill


def make_concat_part(ops: list[Operand], tier: str | None = None):
    """``part(ws, l, X, out, fas, sync, slot, chunks)``: ``make_part`` for the
    row-concatenation of ``ops`` (1 to 3 parts; ``ws`` the tuple of their ``arrays``,
    ``fas`` the stack of their ``addresses``; part k's chunks counted in ``sync[slot + k]``):
    each chunk's rows go to the part's own columns of ``out``, by the thread that computed
    them (a file mixing types within a role, such as Q4_K_M's Q6_K attn_v, has parts that
    do not row-stack)."""
    tier = tier or bytedot.backend()
    key = (tier, "concat-part", tuple(op.key() for op in ops))
    if key not in _PARTS:
        _PARTS[key] = _make_concat_part(ops, tier)
    return _PARTS[key]


def _make_concat_part(ops: list[Operand], tier: str):
    ckey = ("stacked.concat-part", tier, tuple(op.key() for op in ops))
    if len(ops) == 1:
        p0 = make_part(ops[0], tier)

        @_cache.jit(ckey)
        def part1(ws, l, X, out, fas, sync, slot, chunks):
            p0(ws[0], l, X, out, fas[0], sync, slot, chunks)
        return part1
    if len(ops) > 3:
        raise ValueError("at most 3 parts")
    pieces = [_part_pieces(op, tier) for op in ops]
    (pre0, of0, fill0), (pre1, of1, fill1), (pre2, of2, fill2) = [(pre, of, _filler(ch)) for pre, of, ch in
                                                                  (pieces[0], pieces[1], pieces[-1])]
    three = len(ops) == 3

    @_cache.jit(ckey)
    def part_parts(ws, l, X, out, fas, sync, slot, chunks):   # a part's rows: fas[part, 4]
        T = X.shape[0]
        r0, r1, r2 = int(fas[0, 4]), int(fas[1, 4]), int(fas[-1, 4])
        rx0, rx1, rx2 = pre0(X), pre1(X), pre2(X)      # before any claim (make_part)
        fill0(ws[0], l, rx0, np.empty((T, r0), np.float32), out, 0, fas[0], sync, slot, of0(ws[0], l, r0, chunks))
        fill1(ws[1], l, rx1, np.empty((T, r1), np.float32), out, r0, fas[1], sync, slot + 1,
              of1(ws[1], l, r1, chunks))
        if three:
            fill2(ws[-1], l, rx2, np.empty((T, r2), np.float32), out, r0 + r1, fas[2], sync, slot + 2,
                  of2(ws[-1], l, r2, chunks))
    return part_parts


def layer_parts(lins: list) -> list[tuple[str, object]]:
    """``[layer_weight(lins)]`` when the Linears row-stack, else one part per Linear (a file
    mixing types within a layer, such as llama.cpp's Q4_K_M with its Q6_K attn_v)."""
    try:
        return [layer_weight(lins)]
    except ValueError:
        return [layer_weight([lin]) for lin in lins]


def concat_addresses(ops: list[Operand], tier: str | None = None) -> np.ndarray:
    """The ``fas`` of ``make_concat_part(ops)``: uint64 (parts, 5)."""
    return np.stack([addresses(op, tier) for op in ops])
