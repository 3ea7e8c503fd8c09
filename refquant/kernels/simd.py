"""256-bit vector values and byte-dot instructions for numba, emitted as LLVM IR.

numba's autovectorizer turns byte × byte dot products into widening moves and word dots
(``vpmovzxbw`` + ``vpmaddwd``): a quarter of the products per instruction that the byte-dot
instructions do. ``numba.extending.intrinsic`` lets a function supply its own LLVM IR,
which LLVM inlines into the surrounding ``@njit`` loop, so this module defines:

* three numba types backed by LLVM vectors, which live in ymm registers once inlined:
  ``<32 x i8>`` (32 weight codes or 32 int8 activations), ``<8 x i32>`` (integer dot lanes,
  each the sum of 4 adjacent byte products) and ``<8 x float>`` (a float accumulator);
* loads of 32 bytes from a uint8/int8 array, nibble and bit-plane unpacking, and the
  u8 × s8 dot in one of two instruction sequences (the CPU *tier*):

  ``vnni``  ``vpdpbusd`` (AVX512-VNNI with AVX512-VL, 256-bit form): 32 products summed
            into 8 int32 lanes by one instruction, no intermediate saturation;
  ``avx2``  ``vpmaddubsw`` then ``vpmaddwd`` by ones: u8 × s8 products summed in pairs
            to int16 (saturating), then pairs of those to int32. Saturation cannot
            happen for the codes used here: u <= 63 (or |x| <= 127 against w·sign(x),
            |w| <= 127, for 8-bit codes) give pair sums within ±32,258.

Everything but the dot itself is target-independent IR (and, shift, compare, select,
convert, multiply-add), lowered by LLVM to whatever the target has. The two tiers are
only valid while numba compiles for the host CPU (``NUMBA_CPU_NAME`` unset): the tier is
chosen from llvmlite's host CPU features (``refquant.kernels.backend``).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba import njit
from numba.extending import intrinsic, models, register_model

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_V32I8, _V16I16, _V8I32, _V8F32 = (ir.VectorType(_I8, 32), ir.VectorType(_I16, 16), ir.VectorType(_I32, 8),
                                   ir.VectorType(_F32, 8))


class _Vector(types.Type):
    def __init__(self, name: str, llvm_type):
        self.llvm_type = llvm_type
        super().__init__(name=name)


I8x32 = _Vector("I8x32", _V32I8)
I16x16 = _Vector("I16x16", _V16I16)
I32x8 = _Vector("I32x8", _V8I32)
F32x8 = _Vector("F32x8", _V8F32)



@register_model(_Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm_type)


def _broadcast(builder, value, vtype=_V8F32):
    """A scalar in all eight lanes of ``vtype`` (``<8 x float>``, or ``<8 x i32>``)."""
    v = builder.insert_element(ir.Constant(vtype, ir.Undefined), value, _I32(0))
    return builder.shuffle_vector(v, ir.Constant(vtype, ir.Undefined), ir.Constant(_V8I32, [0] * 8))


def _splat(vtype, value):
    return ir.Constant(vtype, [ir.Constant(vtype.element, value)] * vtype.count)


def _c_vector(arr, *dtypes) -> bool:
    """``arr`` is a C-contiguous 1-D array (of one of ``dtypes``, if given)."""
    return (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"
            and (not dtypes or arr.dtype in dtypes))


def _c_flat(arr, *dtypes) -> bool:
    """``arr`` is a C-contiguous array of any rank (indexed by flat element number)."""
    return (isinstance(arr, types.Array) and arr.ndim >= 1 and arr.layout == "C"
            and (not dtypes or arr.dtype in dtypes))


def _element_ptr(context, builder, arrty, arr, idx, pointee=_I8):
    """Pointer to ``arr[idx]`` of a C-contiguous 1-D array, cast to ``pointee*``."""
    a = context.make_array(arrty)(context, builder, arr)
    return builder.bitcast(builder.gep(a.data, [idx]), pointee.as_pointer())


# --- loads ---------------------------------------------------------------------------

@intrinsic
def load32(typingctx, arr, idx):
    """32 bytes of a 1-D uint8/int8 array from element ``idx`` (unaligned ``vmovdqu``)."""
    if not _c_vector(arr, types.uint8, types.int8):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1], _V32I8), align=1)
    return I8x32(arr, types.intp), codegen


@intrinsic
def bcast4(typingctx, arr, idx):
    """The 4 bytes at ``arr[idx]`` of a 1-D uint8/int8 array repeated over 32 bytes
    (``vpbroadcastd``; a memory operand ``{1to8}`` of ``vpdpbusd`` on AVX-512)."""
    if not _c_vector(arr, types.uint8, types.int8):
        return None

    def codegen(context, builder, sig, args):
        w = builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1], _I32), align=1)
        v = builder.insert_element(ir.Constant(_V8I32, ir.Undefined), w, _I32(0))
        v = builder.shuffle_vector(v, ir.Constant(_V8I32, ir.Undefined), ir.Constant(_V8I32, [0] * 8))
        return builder.bitcast(v, _V32I8)
    return I8x32(arr, types.intp), codegen


@intrinsic
def half_at(typingctx, arr, idx):
    """The IEEE half at bytes ``idx``, ``idx + 1`` (little-endian) of a C-contiguous
    uint8/int8 array of any rank (flat element ``idx``), as float32 (``vcvtph2ps``: no
    65536-entry table to keep in cache)."""
    if not _c_flat(arr, types.uint8, types.int8):
        return None

    def codegen(context, builder, sig, args):
        h = builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1], ir.HalfType()), align=1)
        return builder.fpext(h, _F32)
    return types.float32(arr, types.intp), codegen


@intrinsic
def load_bits32(typingctx, arr, idx):
    """4 bytes at ``arr[idx]`` as 32 bits, bit j -> byte j as 0 or 1 (``vpbroadcastd``/``vpshufb``/``vpcmpeqb`` on AVX2)."""
    if not _c_vector(arr, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        word = builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1], _I32), align=1)
        mask = builder.bitcast(word, ir.VectorType(ir.IntType(1), 32))
        return builder.zext(mask, _V32I8)
    return I8x32(arr, types.intp), codegen


def _prefetcher(locality: int, doc: str):
    def prefetch(typingctx, arr, idx):
        if not _c_flat(arr):
            return None

        def codegen(context, builder, sig, args):
            p = _element_ptr(context, builder, sig.args[0], args[0], args[1])
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]), "llvm.prefetch.p0")
            builder.call(fn, [p, _I32(0), _I32(locality), _I32(1)])
            return context.get_dummy_value()
        return types.none(arr, types.intp), codegen
    prefetch.__doc__ = doc
    return intrinsic(prefetch)


prefetch = _prefetcher(3, """Hint the cache line holding ``arr[idx]`` (a C-contiguous array of any rank, flat
    element ``idx``) into L1 (``prefetcht0``);
    no bounds check is needed: a prefetch never faults.""")
prefetch_l2 = _prefetcher(2, """``prefetch`` into L2 (``prefetcht1``): data read a little later, more than L1 holds.""")


# --- byte arithmetic -------------------------------------------------------------------

def _binary_const(op, value):
    def make(typingctx, v):
        if v != I8x32:
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], _splat(_V32I8, value))
        return I8x32(I8x32), codegen
    return make


low_nibbles = intrinsic(_binary_const("and_", 0x0F))
low_nibbles.__doc__ = "Each byte & 0x0F (``vpand``)."


@intrinsic
def high_nibbles(typingctx, v):
    """Each byte >> 4, as unsigned (``vpsrlw`` + ``vpand`` on AVX2)."""
    if v != I8x32:
        return None

    def codegen(context, builder, sig, args):
        return builder.lshr(args[0], _splat(_V32I8, 4))
    return I8x32(I8x32), codegen


@intrinsic
def or_shifted(typingctx, a, b, shift):
    """``a | (b << shift)`` per byte (``vpsllw``/``vpaddb`` + ``vpor``); shift a literal int."""
    if a != I8x32 or b != I8x32 or not isinstance(shift, types.IntegerLiteral):
        return None
    s = shift.literal_value

    def codegen(context, builder, sig, args):
        return builder.or_(args[0], builder.shl(args[1], _splat(_V32I8, s)))
    return I8x32(I8x32, I8x32, shift), codegen


@intrinsic
def sign_apply(typingctx, w, x):
    """``w · sign(x)`` per byte (``vpsignb``): with ``|x|`` precomputed, a signed × signed
    byte dot runs on the u8 × s8 instructions. Exact for w in [-127, 127]."""
    if w != I8x32 or x != I8x32:
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32I8, [_V32I8, _V32I8]),
                                            "llvm.x86.avx2.psign.b")
        return builder.call(fn, list(args))
    return I8x32(I8x32, I8x32), codegen


def make_lookup(table):
    """An intrinsic ``lut(v) -> I8x32``: each byte of ``v`` (0..15) replaced by ``table``'s
    value at it (16 int8 values, ``vpshufb`` with the table in both 128-bit lanes)."""
    const = ir.Constant(_V32I8, [ir.Constant(_I8, int(t) & 0xFF) for t in tuple(table) * 2])

    def lut(typingctx, v):
        if v != I8x32:
            return None

        def codegen(context, builder, sig, args):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32I8, [_V32I8, _V32I8]),
                                                "llvm.x86.avx2.pshuf.b")
            return builder.call(fn, [const, args[0]])
        return I8x32(I8x32), codegen
    return intrinsic(lut)


# --- the dot (the only tier-specific instructions) -------------------------------------

def _dot_vnni(builder, acc, u, s):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I32, [_V8I32, _V32I8, _V32I8]),
                                        "llvm.x86.avx512.vpdpbusd.256")
    return builder.call(fn, [acc, u, s])


def _dot_avx2(builder, acc, u, s):
    maddubs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16I16, [_V32I8, _V32I8]),
                                             "llvm.x86.avx2.pmadd.ub.sw")
    maddwd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I32, [_V16I16, _V16I16]),
                                            "llvm.x86.avx2.pmadd.wd")
    pairs = builder.call(maddubs, [u, s])
    return builder.add(acc, builder.call(maddwd, [pairs, _splat(_V16I16, 1)]))


def _make_dot(emit, doc):
    def dot(typingctx, acc, u, s):
        if acc != I32x8 or u != I8x32 or s != I8x32:
            return None

        def codegen(context, builder, sig, args):
            return emit(builder, *args)
        return I32x8(I32x8, I8x32, I8x32), codegen
    dot.__doc__ = doc
    return intrinsic(dot)


DOTS = {
    "vnni": _make_dot(_dot_vnni, "acc + Σ₄ u·s: u unsigned bytes, s signed bytes, 8 int32 lanes (``vpdpbusd`` ymm)."),
    "avx2": _make_dot(_dot_avx2, "acc + Σ₄ u·s (``vpmaddubsw`` + ``vpmaddwd`` by ones + ``vpaddd``)."),
}


# --- lanes ---------------------------------------------------------------------------

# --- Q8_0 rounding of 32 floats (the activations' blocks) -----------------------------

_V32F32, _V32I32 = ir.VectorType(_F32, 32), ir.VectorType(_I32, 32)


def _llvm_fn(builder, name, ret, *args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, list(args)), name)


def _load_f32x32(context, builder, arrty, arr, idx):
    return builder.load(_element_ptr(context, builder, arrty, arr, idx, _V32F32), align=4)


@intrinsic
def absmax32(typingctx, arr, idx):
    """``max |arr[idx:idx+32]|`` of a 1-D float32 array, NaN if one of them is NaN: the
    unsigned maximum of the bits with the sign cleared (non-negative floats order as their
    bits, NaN above Inf), one vector reduction."""
    if not _c_vector(arr, types.float32):
        return None

    def codegen(context, builder, sig, args):
        v = builder.bitcast(_load_f32x32(context, builder, sig.args[0], args[0], args[1]), _V32I32)
        m = builder.and_(v, _splat(_V32I32, 0x7FFFFFFF))
        top = builder.call(_llvm_fn(builder, "llvm.vector.reduce.umax.v32i32", _I32, _V32I32), [m])
        return builder.bitcast(top, _F32)
    return types.float32(arr, types.intp), codegen


@intrinsic
def round32(typingctx, arr, idx, inv, out, oidx):
    """``out[oidx:oidx+32] = roundf(arr[idx:idx+32] · inv)`` as int8 (ties away from zero:
    ``q = trunc(w)``, plus ``sign(w)`` where ``|w - q| >= 1/2``, the select ``quantize_x``
    writes in scalar code; |w| <= 127 is the caller's to ensure); returns the codes' sum
    (int32)."""
    if not (_c_vector(arr, types.float32) and inv == types.float32 and _c_vector(out, types.int8)):
        return None

    def codegen(context, builder, sig, args):
        splat = builder.shuffle_vector(builder.insert_element(ir.Constant(_V32F32, ir.Undefined), args[2], _I32(0)),
                                       ir.Constant(_V32F32, ir.Undefined), ir.Constant(_V32I32, [0] * 32))
        w = builder.fmul(_load_f32x32(context, builder, sig.args[0], args[0], args[1]), splat)
        q = builder.call(_llvm_fn(builder, "llvm.trunc.v32f32", _V32F32, _V32F32), [w])
        frac = builder.call(_llvm_fn(builder, "llvm.fabs.v32f32", _V32F32, _V32F32), [builder.fsub(w, q)])
        step = builder.select(builder.fcmp_ordered(">=", w, _splat(_V32F32, 0.0)), _splat(_V32F32, 1.0),
                              _splat(_V32F32, -1.0))
        q = builder.fadd(q, builder.select(builder.fcmp_ordered(">=", frac, _splat(_V32F32, 0.5)), step,
                                           _splat(_V32F32, 0.0)))
        codes = builder.fptosi(q, ir.VectorType(_I8, 32))
        builder.store(codes, _element_ptr(context, builder, sig.args[3], args[3], args[4], ir.VectorType(_I8, 32)),
                      align=1)
        wide = builder.sext(codes, _V32I32)
        return builder.call(_llvm_fn(builder, "llvm.vector.reduce.add.v32i32", _I32, _V32I32), [wide])
    return types.int32(arr, types.intp, types.float32, out, types.intp), codegen


@intrinsic
def f32_bits(typingctx, v):
    """The int32 bit pattern of a float32 (a bitcast)."""
    if v != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _I32)
    return types.int32(types.float32), codegen


@intrinsic
def f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits`` (a bitcast, which vectorizes
    with the loop around it)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _F32)
    return types.float32(types.int32), codegen


@intrinsic
def zeros_i32(typingctx):
    """Eight int32 zeros."""
    def codegen(context, builder, sig, args):
        return _splat(_V8I32, 0)
    return I32x8(), codegen


@intrinsic
def add_i32(typingctx, a, b):
    """Lane-wise int32 sum (``vpaddd``)."""
    if a != I32x8 or b != I32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])
    return I32x8(I32x8, I32x8), codegen


@intrinsic
def zeros_f32(typingctx):
    """Eight float32 zeros."""
    def codegen(context, builder, sig, args):
        return _splat(_V8F32, 0.0)
    return F32x8(), codegen


@intrinsic
def fma_vec(typingctx, acc, v, s):
    """``acc + float(v) · s`` for a vector ``s`` of eight scales (``vcvtdq2ps`` + ``vfmadd231ps``)."""
    if acc != F32x8 or v != I32x8 or s != F32x8:
        return None

    def codegen(context, builder, sig, args):
        f = builder.sitofp(args[1], _V8F32)
        return builder.fadd(args[0], builder.fmul(f, args[2], flags=("contract",)), flags=("contract",))
    return F32x8(F32x8, I32x8, F32x8), codegen


def _loader(vec, llvm_vec, dtype, doc):
    def load(typingctx, arr, idx):
        if not _c_vector(arr, dtype):
            return None

        def codegen(context, builder, sig, args):
            return builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1], llvm_vec), align=4)
        return vec(arr, types.intp), codegen
    load.__doc__ = doc
    return intrinsic(load)


def _storer(vec, llvm_vec, dtypes, doc):
    def store(typingctx, arr, idx, v):
        if not _c_vector(arr, *dtypes) or v != vec:
            return None

        def codegen(context, builder, sig, args):
            builder.store(args[2], _element_ptr(context, builder, sig.args[0], args[0], args[1], llvm_vec), align=1)
            return context.get_dummy_value()
        return types.none(arr, types.intp, vec), codegen
    store.__doc__ = doc
    return intrinsic(store)


load_f32x8 = _loader(F32x8, _V8F32, types.float32, "Eight float32 from ``arr[idx]`` (``vmovups``).")
store_f32x8 = _storer(F32x8, _V8F32, (types.float32,), "Store eight float32 at ``arr[idx]`` (``vmovups``).")


@intrinsic
def vec8(typingctx, arr, idx):
    """Eight consecutive values of a C-contiguous array from element ``idx`` (of any rank:
    the flat element number) as float32 lanes: fp16 bit patterns (uint16, ``vcvtph2ps``),
    float32 (``vmovups``), uint8 or int8 integers (``vpmovzxbd``/``vpmovsxbd`` + ``vcvtdq2ps``)."""
    if not _c_flat(arr, types.uint16, types.float32, types.uint8, types.int8):
        return None
    dt = arr.dtype

    def codegen(context, builder, sig, args):
        if dt == types.float32:
            return builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1], _V8F32), align=4)
        if dt == types.uint16:
            v = builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1],
                                          ir.VectorType(ir.HalfType(), 8)), align=2)
            return builder.fpext(v, _V8F32)
        v = builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(_I8, 8)), align=1)
        w = builder.sext(v, _V8I32) if dt == types.int8 else builder.zext(v, _V8I32)
        return builder.sitofp(w, _V8F32)
    return F32x8(arr, types.intp), codegen


def _byte_parts(arr, part) -> bool:
    """Typing of ``bytes8`` / ``widen16``: a C-contiguous uint8/int8 array and a literal part."""
    return (_c_flat(arr, types.uint8, types.int8) and isinstance(part, types.IntegerLiteral)
            and part.literal_value in (0, 1, 2))


def _widen(context, builder, arrty, arr, idx, n, vtype, mode):
    """``n`` bytes at flat element ``idx`` widened to the integer lanes of ``vtype``: mode 0
    sign-extended, 1 their low nibbles, 2 their high nibbles."""
    v = builder.load(_element_ptr(context, builder, arrty, arr, idx, ir.VectorType(_I8, n)), align=1)
    if mode == 0:
        return builder.sext(v, vtype)
    w = builder.zext(v, vtype)
    return builder.and_(w, _splat(vtype, 15)) if mode == 1 else builder.lshr(w, _splat(vtype, 4))


@intrinsic
def bytes8(typingctx, arr, idx, part):
    """Eight bytes of a C-contiguous uint8/int8 array (any rank, flat element ``idx``) as
    float32 lanes; ``part`` (a literal): 0 the bytes as int8, 1 their low nibbles, 2 their
    high nibbles (``vpmovsxbd``/``vpmovzxbd``, ``vpand``/``vpsrld``, ``vcvtdq2ps``)."""
    if not _byte_parts(arr, part):
        return None
    mode = part.literal_value

    def codegen(context, builder, sig, args):
        return builder.sitofp(_widen(context, builder, sig.args[0], args[0], args[1], 8, _V8I32, mode), _V8F32)
    return F32x8(arr, types.intp, part), codegen


@intrinsic
def widen16(typingctx, arr, idx, part):
    """Sixteen bytes of a C-contiguous uint8/int8 array (any rank, flat element ``idx``) as
    int16 lanes; ``part`` (a literal): 0 the bytes as int8, 1 their low nibbles, 2 their
    high nibbles (``vpmovsxbw``/``vpmovzxbw``, ``vpand``/``vpsrlw``)."""
    if not _byte_parts(arr, part):
        return None
    mode = part.literal_value

    def codegen(context, builder, sig, args):
        return _widen(context, builder, sig.args[0], args[0], args[1], 16, _V16I16, mode)
    return I16x16(arr, types.intp, part), codegen


@intrinsic
def madd_i16x16(typingctx, acc, a, b):
    """``acc`` plus the products of ``a`` and ``b`` (sixteen int16 lanes each) summed in
    adjacent pairs to eight int32 lanes (``vpmaddwd`` + ``vpaddd``, or ``vpdpwssd`` where
    the CPU has it: LLVM matches the pattern). No overflow for |a|, |b| <= 32767."""
    if acc != I32x8 or a != I16x16 or b != I16x16:
        return None
    v16i32 = ir.VectorType(_I32, 16)

    def codegen(context, builder, sig, args):
        p = builder.mul(builder.sext(args[1], v16i32), builder.sext(args[2], v16i32))
        even = builder.shuffle_vector(p, p, ir.Constant(_V8I32, list(range(0, 16, 2))))
        odd = builder.shuffle_vector(p, p, ir.Constant(_V8I32, list(range(1, 16, 2))))
        return builder.add(args[0], builder.add(even, odd))
    return I32x8(I32x8, I16x16, I16x16), codegen


@intrinsic
def mul_f32x8(typingctx, a, b):
    """Lane-wise product; ``b`` a vector or a float32 broadcast to all lanes (``vmulps``)."""
    if a != F32x8 or not (b == F32x8 or isinstance(b, types.Float)):
        return None
    scalar = b != F32x8

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], _broadcast(builder, args[1]) if scalar else args[1])
    return F32x8(F32x8, b if not scalar else types.float32), codegen


@intrinsic
def add_f32x8(typingctx, a, b):
    """Lane-wise sum (``vaddps``)."""
    if a != F32x8 or b != F32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])
    return F32x8(F32x8, F32x8), codegen




@intrinsic
def fmadd_f32x8(typingctx, acc, a, b):
    """``acc + a · b`` lane-wise; ``b`` a vector or a float32 broadcast to all lanes
    (``vfmadd231ps``)."""
    if acc != F32x8 or a != F32x8 or not (b == F32x8 or b == types.float32):
        return None
    scalar = b != F32x8

    def codegen(context, builder, sig, args):
        bv = _broadcast(builder, args[2]) if scalar else args[2]
        return builder.fadd(args[0], builder.fmul(args[1], bv, flags=("contract",)), flags=("contract",))
    return F32x8(F32x8, F32x8, b), codegen


@intrinsic
def max_f32x8(typingctx, a, b):
    """Lane-wise maximum (``vmaxps``; of a NaN and a number, the number)."""
    if a != F32x8 or b != F32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])
    return F32x8(F32x8, F32x8), codegen


def _reducer(combine, doc):
    def reduce(typingctx, a):
        if a != F32x8:
            return None

        def codegen(context, builder, sig, args):
            v = args[0]
            for perm in ([4, 5, 6, 7, 0, 1, 2, 3], [2, 3, 0, 1, 6, 7, 4, 5], [1, 0, 3, 2, 5, 4, 7, 6]):
                v = combine(builder, v, builder.shuffle_vector(v, ir.Constant(_V8F32, ir.Undefined),
                                                               ir.Constant(_V8I32, perm)))
            return builder.extract_element(v, _I32(0))
        return types.float32(F32x8), codegen
    reduce.__doc__ = doc
    return intrinsic(reduce)


hmax_f32x8 = _reducer(lambda b, v, w: b.select(b.fcmp_ordered(">", v, w), v, w),
                      "The largest of the eight lanes (three shuffle-and-maximum steps).")


@intrinsic
def keep_first(typingctx, a, k, fill):
    """``a`` with lanes ``k`` and up replaced by ``fill`` (every lane when k <= 0, none
    when k >= 8)."""
    if a != F32x8 or not isinstance(k, types.Integer) or fill != types.float32:
        return None

    def codegen(context, builder, sig, args):
        kk = context.cast(builder, args[1], sig.args[1], types.int32)
        lanes = ir.Constant(_V8I32, list(range(8)))
        kv = builder.insert_element(ir.Constant(_V8I32, ir.Undefined), kk, _I32(0))
        kv = builder.shuffle_vector(kv, ir.Constant(_V8I32, ir.Undefined), ir.Constant(_V8I32, [0] * 8))
        return builder.select(builder.icmp_signed("<", lanes, kv), args[0], _broadcast(builder, args[2]))
    return F32x8(F32x8, k, types.float32), codegen


hsum_f32x8 = _reducer(lambda b, v, w: b.fadd(v, w), "The sum of the eight lanes (three shuffle-and-add steps).")


@intrinsic
def hsum8_f32x8(typingctx, a0, a1, a2, a3, a4, a5, a6, a7):
    """The lane sums of eight vectors as one vector, lane k the sum of ``a_k`` (pairwise
    horizontal adds, ``vhaddps``-like: 14 shuffles and 7 adds for eight sums against 24 and
    24 for eight ``hsum_f32x8``)."""
    if any(a != F32x8 for a in (a0, a1, a2, a3, a4, a5, a6, a7)):
        return None

    def codegen(context, builder, sig, args):
        def hadd(x, y, even, odd):
            return builder.fadd(builder.shuffle_vector(x, y, ir.Constant(_V8I32, even)),
                                builder.shuffle_vector(x, y, ir.Constant(_V8I32, odd)))
        pairs = ([0, 2, 8, 10, 4, 6, 12, 14], [1, 3, 9, 11, 5, 7, 13, 15])
        s = [hadd(args[i], args[i + 1], *pairs) for i in range(0, 8, 2)]    # [x01 x23 y01 y23 | x45 x67 y45 y67]
        u = [hadd(s[0], s[1], *pairs), hadd(s[2], s[3], *pairs)]           # [a0 a1 a2 a3 | a0 a1 a2 a3] halves
        return hadd(u[0], u[1], [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])
    return F32x8(*([F32x8] * 8)), codegen


@intrinsic
def exp_f32x8(typingctx, x):
    """Lane-wise float32 ``exp``, the arithmetic of ``minigpt_np.compiled._exp`` (Cephes
    ``expf``: x clamped to [-87.3, 88.3], ``x = n ln 2 + r``, a degree-7 polynomial in r,
    times ``2^n`` built from its exponent bits) on eight lanes at once."""
    if x != F32x8:
        return None

    def codegen(context, builder, sig, args):
        def c(v):
            return _splat(_V8F32, v)

        def fma(a, b, d):   # a * b + d
            return builder.fadd(builder.fmul(a, b, flags=("contract",)), d, flags=("contract",))
        v = args[0]
        v = builder.select(builder.fcmp_ordered("<", v, c(-87.3)), c(-87.3), v)
        v = builder.select(builder.fcmp_ordered(">", v, c(88.3)), c(88.3), v)
        floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8F32, [_V8F32]), "llvm.floor.v8f32")
        n = builder.call(floor, [fma(v, c(1.44269504088896341), c(0.5))])
        r = builder.fadd(builder.fsub(v, builder.fmul(n, c(0.693359375))), builder.fmul(n, c(2.12194440e-4)))
        p = c(1.9875691500e-4)
        for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = fma(p, r, c(k))
        p = builder.fadd(fma(builder.fmul(p, r), r, r), c(1.0))
        e = builder.shl(builder.add(builder.fptosi(n, _V8I32), _splat(_V8I32, 127)), _splat(_V8I32, 23))
        return builder.fmul(p, builder.bitcast(e, _V8F32))
    return F32x8(F32x8), codegen


@intrinsic
def splat_f32x8(typingctx, s):
    """A float32 in all eight lanes (``vbroadcastss``)."""
    if s != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return _broadcast(builder, args[0])
    return F32x8(types.float32), codegen


@intrinsic
def splat_i32(typingctx, s):
    """An int32 in all eight lanes (``vpbroadcastd``)."""
    if s != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return _broadcast(builder, args[0], _V8I32)
    return I32x8(types.int32), codegen


@intrinsic
def sub_i32(typingctx, a, b):
    """Lane-wise int32 difference (``vpsubd``)."""
    if a != I32x8 or b != I32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.sub(args[0], args[1])
    return I32x8(I32x8, I32x8), codegen


store32 = _storer(I8x32, _V32I8, (types.uint8, types.int8),
                  "Store 32 bytes at ``arr[idx]`` of a 1-D uint8/int8 array (unaligned ``vmovdqu``).")
load_i16x16 = _loader(I16x16, _V16I16, types.int16, "Sixteen int16 from ``arr[idx]`` of a 1-D int16 array (``vmovdqu``).")
store_i16x16 = _storer(I16x16, _V16I16, (types.int16,), "Store sixteen int16 at ``arr[idx]`` of a 1-D int16 array (``vmovdqu``).")
load_i32x8 = _loader(I32x8, _V8I32, types.int32, "Eight int32 from ``arr[idx]`` of a 1-D int32 array (``vmovdqu``).")
store_i32x8 = _storer(I32x8, _V8I32, (types.int32,), "Store eight int32 at ``arr[idx]`` of a 1-D int32 array (``vmovdqu``).")


# --- helpers over the intrinsics (numba code) ------------------------------------------

@njit(inline="always")
def fmadd4(a0, a1, a2, a3, u0, u1, u2, u3, y):
    """``a_k + u_k · y`` for k < 4: four chains sharing ``y`` (a vector or a float32)."""
    return fmadd_f32x8(a0, u0, y), fmadd_f32x8(a1, u1, y), fmadd_f32x8(a2, u2, y), fmadd_f32x8(a3, u3, y)


@njit(inline="always")
def load4(arr, o, f):
    """Four vectors from ``arr[o:o+32]``, each times the float32 ``f``."""
    return (mul_f32x8(load_f32x8(arr, o), f), mul_f32x8(load_f32x8(arr, o + 8), f),
            mul_f32x8(load_f32x8(arr, o + 16), f), mul_f32x8(load_f32x8(arr, o + 24), f))


@njit(inline="always")
def add4(a0, a1, a2, a3, f):
    """Four vectors, each plus the float32 ``f`` in every lane."""
    y = splat_f32x8(f)
    return add_f32x8(a0, y), add_f32x8(a1, y), add_f32x8(a2, y), add_f32x8(a3, y)


@njit(inline="always")
def store4(arr, o, a0, a1, a2, a3):
    """Four vectors to ``arr[o:o+32]``."""
    store_f32x8(arr, o, a0)
    store_f32x8(arr, o + 8, a1)
    store_f32x8(arr, o + 16, a2)
    store_f32x8(arr, o + 24, a3)
