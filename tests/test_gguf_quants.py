"""GGML block formats: dequantize against gguf-py, quantize against gguf-py and against
bytes written by ggml's own C quantizers, and the nearest-grid-point bound."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from refquant.gguf import quants
from tests.conftest import gguf_py, smollm2_gguf
from tests.strategies import weight_rows

pytestmark = pytest.mark.oracle   # gguf-py is the oracle of the GGML types; the compiled quantizers rely on numba's IR

def gq():
    """gguf-py's quants module (a missing gguf-py fails the cross-checks; conftest.gguf_py)."""
    return gguf_py().quants


def GT(name):
    return gguf_py().constants.GGMLQuantizationType[name]

def _gguf_py_dequantizes(name: str) -> bool:
    """Whether gguf-py decodes ``name`` (it has no Q8_K or Q8_1, ggml's activation types);
    without gguf-py, no type (the tests that need it fail in ``gguf_py()``)."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants as gquants
    except ImportError:
        return False
    t = GGMLQuantizationType[name]
    try:
        gquants.dequantize(np.zeros((1, GGML_QUANT_SIZES[t][1]), np.uint8), t)
    except NotImplementedError:
        return False
    return True


# block types whose bytes gguf-py decodes; the others' decoders are held to the golden bytes'
# round trip and the grid bound
BLOCK_TYPES = [n for n in quants.quantizable() if n not in ("F32", "F16", "BF16") and _gguf_py_dequantizes(n)]
GGUF_PY_QUANTIZES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4"]
GRID_TYPES = quants.grid_types()
GOLDEN = np.load(__file__.rsplit("/", 1)[0] + "/data/ggml_golden.npz")


def same_floats(a, b):
    """Bit-identical, except that any NaN equals any NaN."""
    a, b = np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel()
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    return a.shape == b.shape and np.array_equal(nan_a, nan_b) and np.array_equal(a.view(np.uint32)[~nan_a],
                                                                                  b.view(np.uint32)[~nan_b])


@pytest.mark.parametrize("name", BLOCK_TYPES)
@given(data=st.data())
def test_dequantize_random_blocks_matches_gguf_py(name, data):
    t = quants.TYPES[name]
    nb = data.draw(st.integers(1, 6))
    raw = np.frombuffer(data.draw(st.binary(min_size=nb * t.type_size, max_size=nb * t.type_size)), np.uint8)
    with np.errstate(all="ignore"):
        ref = gq().dequantize(raw.reshape(1, -1), GT(name)).reshape(-1)
    assert same_floats(quants.dequantize(raw, name, (nb * t.block_size,)), ref)


@pytest.mark.parametrize("name", ["F16", "BF16"])
@given(data=st.data())
def test_dequantize_plain_floats_matches_gguf_py(name, data):
    raw = np.frombuffer(data.draw(st.binary(min_size=2, max_size=64).filter(lambda b: len(b) % 2 == 0)), np.uint8)
    with np.errstate(all="ignore"):
        ref = gq().dequantize(raw.view(np.uint16 if name == "BF16" else np.float16).reshape(1, -1)
                            if name == "F16" else raw.reshape(1, -1), GT(name))
    assert same_floats(quants.dequantize(raw, name, (raw.size // 2,)), ref)


@pytest.mark.parametrize("name", GGUF_PY_QUANTIZES)
@given(data=st.data())
def test_quantize_matches_gguf_py(name, data):
    x = data.draw(weight_rows(quants.TYPES[name].block_size))
    with np.errstate(all="ignore"):
        ref = np.asarray(gq().quantize(x, GT(name))).view(np.uint8).reshape(x.shape[0], -1)
    ours = quants.quantize(x, name)
    if name in ("Q4_0", "Q5_0", "Q4_1", "Q5_1"):
        # Signs of zero: gguf-py takes the block minimum with np.min and the absmax with
        # argmax, which may return -0.0 where ggml's scans keep +0.0 (the first of equal zeros
        # for [0, -0, ...]; max = 0 from the start for a block of -0.0, so d = 0/-8 = -0.0;
        # both checked against the C code). Both decode identically; compare the fp16 field
        # (Q4_0/Q5_0: d, Q4_1/Q5_1: m) up to the sign of zero.
        t = quants.TYPES[name]
        at = 2 if name in ("Q4_1", "Q5_1") else 0
        ours, ref = ours.copy(), ref.copy()
        for a in (ours, ref):
            blocks = a.reshape(-1, t.type_size)
            m = blocks[:, at:at + 2].copy().view("<u2")
            blocks[:, at:at + 2] = np.where((m & 0x7FFF) == 0, 0, m).astype("<u2").view(np.uint8)
    np.testing.assert_array_equal(ours, ref)


def test_every_block_type_and_kernel_is_checked_against_ggml_c():
    """The golden set covers every block type refquant quantizes and every compiled quantizer
    (a type added without golden bytes would otherwise never meet ggml's C), on 8 input families."""
    golden = {k.split("/")[0] for k in GOLDEN.files} - {"x"}
    assert set(COMPILED) == golden
    from refquant.gguf.quants import compiled
    assert set(compiled.KERNELS) <= golden and len(compiled.KERNELS) >= 14
    assert sum(k.startswith("x/") for k in GOLDEN.files) == 8


@pytest.mark.parametrize("name", sorted({k.split("/")[0] for k in GOLDEN.files} - {"x"}))
def test_quantize_matches_bytes_from_ggml_c(name):
    """Bytes written by ggml-quants.c itself (tests/data/make_ggml_golden.py says how), by the
    NumPy reference and by the compiled kernels (where the type has one), on every input
    family of the golden set."""
    from refquant.gguf.quants import compiled   # (numba loads here, not at collection)

    for impl in ("numpy", "numba") if name in compiled.KERNELS else ("numpy",):
        for key in GOLDEN.files:
            if key.startswith("x/"):
                family = key[2:]
                ours = quants.quantize(GOLDEN[key], name, impl=impl)
                ref = GOLDEN[f"{name}/{family}"]
                bad = np.argwhere(ours != ref)
                assert bad.size == 0, (f"{name}/{family} ({impl}): {len(bad)} bytes differ, first at (row, byte) "
                                       f"{tuple(bad[0])}")


# every block type refquant quantizes (the registry's, less the float ones) has golden bytes
# from ggml's C and a compiled quantizer (test_every_block_type_and_kernel_is_checked_against_ggml_c)
COMPILED = sorted(set(quants.quantizable()) - {"F32", "F16", "BF16"})


@pytest.mark.parametrize("name", COMPILED)
@settings(max_examples=50)   # an oracle cross-check on top of the C golden bytes (every family, both)
@given(data=st.data())
def test_compiled_quantizer_writes_the_reference_bytes(name, data):
    """The numba kernel against the NumPy reference on rows built to hit the searches'
    branches: subnormals, 1e-30 and 3e37 scales (1/d overflowing, fp16 scales turning
    Inf or subnormal), exact zeros, ties and repeated values. A type without a compiled
    quantizer is refused by ``impl="numba"`` with a message naming it."""
    from refquant.gguf.quants import compiled   # (numba loads here, not at collection)

    x = data.draw(weight_rows(quants.TYPES[name].block_size, max_blocks=2))
    if name not in compiled.KERNELS:
        with pytest.raises(ValueError, match=f"no compiled quantizer for {name}"):
            quants.quantize(x, name, impl="numba")
        return
    np.testing.assert_array_equal(quants.quantize(x, name, impl="numba"), quants.quantize(x, name, impl="numpy"))


@pytest.mark.parametrize("name", COMPILED)
@settings(max_examples=80)
@given(data=st.data())
def test_compiled_dequantizer_gives_the_reference_floats(name, data):
    """Random block bytes (so Inf/NaN and subnormal fp16 scales too) decode to the NumPy
    reference's float32 values bit for bit, with 1 and 2 threads; a type without a
    compiled dequantizer is refused by ``impl="numba"`` with a message naming it."""
    from refquant.gguf.quants import compiled   # (numba loads here, not at collection)

    t = quants.TYPES[name]
    nb = data.draw(st.integers(1, 600 if t.block_size == 32 else 80))
    raw = np.frombuffer(data.draw(st.binary(min_size=nb * t.type_size, max_size=nb * t.type_size)), np.uint8)
    if name not in compiled.DEQUANTIZERS:
        with pytest.raises(ValueError, match=f"no compiled dequantizer for {name}"):
            quants.dequantize(raw, name, (nb * t.block_size,), impl="numba")
        return
    ref = quants.dequantize(raw, name, (nb * t.block_size,), impl="numpy")

    saved = compiled._MIN_CHUNK
    compiled._MIN_CHUNK = t.block_size   # chunks from one block on, so 2 threads split every draw of 2+ blocks
    try:
        for threads in (1, 2):
            assert same_floats(quants.dequantize(raw, name, (nb * t.block_size,), impl="numba", threads=threads), ref)
    finally:
        compiled._MIN_CHUNK = saved


_IR_SNIPPET = """
import json, sys
import numpy as np
from refquant.gguf import quants
from refquant.gguf.quants import compiled
out = {}
for name, fn in compiled.KERNELS.items() if sys.argv[2] == "plain" else ():
    t = quants.TYPES[name]
    fn(np.ones((1, t.block_size), np.float32), np.zeros((1, t.type_size), np.uint8))
    out[name] = ["\\n".join(fn.inspect_llvm().values()), fn.py_func.__name__]
for name, fn in compiled.WEIGHTED.items() if sys.argv[2] == "weighted" else ():   # under an importance matrix
    t = quants.TYPES[name]
    ones = np.ones((1, t.block_size), np.float32)
    fn(ones, ones, np.ones(1, np.float32), np.zeros((1, t.type_size), np.uint8))
    out[name + "+imatrix"] = ["\\n".join(fn.inspect_llvm().values()), fn.py_func.__name__]
json.dump(out, open(sys.argv[1], "w"))
"""


def float32_ir_violations(ir: str, *, allow_double: bool = False) -> list[str]:
    """The lines of an LLVM IR module that break ggml's float semantics: a fused multiply-add
    (``fma``/``fmuladd`` calls, ``contract`` or ``fast`` flags) or, unless ``allow_double``,
    float64 arithmetic or a widening to it."""
    bad = [l for l in ir.splitlines() if re.search(r"\b(fma|fmuladd)\b|\bcontract\b|\bfast\b", l)]
    if not allow_double:
        bad += [l for l in ir.splitlines() if re.search(r"= (fadd|fsub|fmul|fdiv|fpext)\b[^\n]*double", l)]
    return bad


def _float_instructions(ir: str) -> int:
    return len(re.findall(r"= (?:fadd|fsub|fmul|fdiv|fcmp|fptosi|sitofp)\b", ir))


@pytest.mark.parametrize("kind", ["plain", pytest.param("weighted", marks=pytest.mark.slow)])
def test_compiled_kernels_do_only_float32_arithmetic_and_no_fma(tmp_path, kind):
    """numba widens ``float32 op int`` and ``float32 op 0.5`` to float64, which rounds
    differently from ggml's C, and fuses ``a*b + c`` under fast-math flags: neither may be in
    the IR. MXFP4 alone takes float64 (its ``log2``, as the reference does).

    A kernel loaded from numba's disk cache has no IR (``inspect_llvm`` returns an empty
    module), so the kernels are compiled in a subprocess whose cache directory is empty, and
    each IR must hold its kernel's body: the function defined, its float work present.
    ``weighted``: the quantizers under an importance matrix (``compiled.WEIGHTED``; the slow
    tier, as compiling them all again from an empty cache takes a minute)."""
    from refquant.gguf.quants import compiled

    dump = tmp_path / "ir.json"
    r = subprocess.run([sys.executable, "-c", _IR_SNIPPET, str(dump), kind], capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).parents[1], env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "nc")})
    assert r.returncode == 0, r.stderr[-3000:]
    irs = json.loads(dump.read_text())
    assert sorted(irs) == sorted(compiled.KERNELS if kind == "plain" else (n + "+imatrix" for n in compiled.WEIGHTED))
    for name, (ir, fn_name) in irs.items():
        assert re.search(rf"define [^\n]*{fn_name}", ir), f"{name}: the IR does not define {fn_name}"
        assert _float_instructions(ir) >= 10, f"{name}: {_float_instructions(ir)} float instructions, not a kernel's body"
        bad = float32_ir_violations(ir, allow_double=name == "MXFP4")
        assert not bad, f"{name}: {bad[:3]}"


def test_ir_checker_fails_on_fma_and_float64():
    """The negative control of the IR check: kernels with a fused multiply-add (fast-math or
    contraction) or a float64 operation are caught; the same kernel without them is not."""
    from numba import njit

    def axpy(a, out):   # arrays in and out, as the kernels (a float return is boxed via double)
        out[0] = a[0] * a[1] + a[2]

    def widen(a, out):
        out[0] = a[0] * 0.1

    a, out = np.array([1.5, 2.5, 0.5], np.float32), np.zeros(1, np.float32)
    irs = {}
    for label, opts in {"plain": {}, "fast": {"fastmath": True}, "contract": {"fastmath": {"contract"}}}.items():
        fn = njit(**opts)(axpy)
        fn(a, out)
        irs[label] = "\n".join(fn.inspect_llvm().values())
    wide = njit(widen)
    wide(a, out)
    irs["double"] = "\n".join(wide.inspect_llvm().values())
    assert all(_float_instructions(ir) >= 1 for ir in irs.values())
    assert float32_ir_violations(irs["plain"]) == []
    for label in ("fast", "contract", "double"):
        assert float32_ir_violations(irs[label]), label
    assert float32_ir_violations(irs["double"], allow_double=True) == []


def test_compiled_fp16_conversion_is_round_to_nearest_even():
    """ggml's bit-level fp32 → fp16 against NumPy's on every 251st float32 bit pattern
    (all exponents, subnormals, halfway cases, overflow to Inf, NaN)."""
    from numba import njit

    from refquant.gguf.quants import compiled

    fp16 = compiled._fp16

    @njit
    def convert(v):
        out = np.empty(v.size, np.uint16)
        for i in range(v.size):
            out[i] = fp16(v[i])
        return out

    bits = np.arange(0, 1 << 32, 251, dtype=np.uint64).astype(np.uint32)
    bits = np.concatenate([bits, np.array([0x477FF000, 0x477FEFFF, 0x33000000, 0x33000001, 0x387FC000], np.uint32)])
    v = bits.view(np.float32)
    ours = convert(v)
    with np.errstate(over="ignore"):
        ref = v.astype(np.float16).view(np.uint16)
    nan = np.isnan(v)
    np.testing.assert_array_equal(ours[~nan], ref[~nan])
    assert np.all((ours[nan] & 0x7FFF) == 0x7E00)


def test_compiled_c_conversions():
    """x86 ``cvttss2si`` (INT_MIN for NaN / out of range), ``roundf`` halves away from zero,
    ``nearest_int`` halves to even, and int8 stores wrap (hand-derived values)."""
    from numba import njit

    from refquant.gguf.quants import compiled as c

    @njit
    def run(v):
        return c._cvt(v), c._roundf(v), c._nearest_int(v)

    f = np.float32
    assert run(f(2.5)) == (2, 3, 2) and run(f(-2.5)) == (-2, -3, -2) and run(f(3.5)) == (3, 4, 4)
    assert run(f(0.49999997)) == (0, 0, 0) and run(f(-7.7)) == (-7, -8, -8)
    assert run(f(np.nan))[:2] == (-2**31, -2**31) and run(f(np.inf))[:2] == (-2**31, -2**31)
    assert run(f(3e9))[:2] == (-2**31, -2**31) and run(f(-2.0**31))[:2] == (-2**31, -2**31)
    assert [c._i8(v) for v in (127, 128, 255, 256, -129)] == [127, -128, -1, 0, 127]


def test_compiled_threads_split_blocks_without_changing_bytes():
    x = np.random.default_rng(3).standard_normal((64, 4096)).astype(np.float32)
    for name in ("Q4_0", "Q6_K"):
        one = quants.quantize(x, name, impl="numba", threads=1)
        np.testing.assert_array_equal(quants.quantize(x, name, impl="numba", threads=2), one)
        np.testing.assert_array_equal(quants.quantize(x[:3], name, impl="numpy"), one[:3])


def test_quantize_impl_choices():
    x = np.ones((1, 32), np.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        quants.quantize(x, "Q8_0", impl="c")
    with pytest.raises(ValueError, match="finite input only"):
        quants.quantize(x, "Q8_0", impl="numba", allow_nonfinite=True)
    with pytest.raises(ValueError, match="no compiled quantizer for BF16"):
        quants.quantize(x, "BF16", impl="numba")
    with pytest.raises(ValueError, match="no compiled dequantizer for Q2_K"):
        quants.dequantize(np.zeros(84, np.uint8), "Q2_K", (256,), impl="numba")
    with pytest.raises(ValueError, match="impl must be one of"):
        quants.dequantize(np.zeros(34, np.uint8), "Q8_0", (32,), impl="C")
    np.testing.assert_array_equal(quants.quantize(x, "BF16"), quants.quantize(x, "BF16", impl="numpy"))


@pytest.mark.parametrize("name", GRID_TYPES)
@given(data=st.data())
def test_every_weight_lands_on_the_nearest_point_of_its_block_grid(name, data):
    """The bound the format's scale grid implies: |x - x̂| <= distance to the nearest grid
    point of the block (+ fp16 rounding of the stored scale). An off-by-one code, a wrong
    scale or a mis-packed nibble breaks it."""
    t = quants.TYPES[name]
    x = data.draw(weight_rows(t.block_size, max_blocks=2 if t.block_size == 256 else 4))
    x = np.clip(x, -6e4, 6e4)  # fp16 scales: beyond this ggml's block scales overflow to Inf
    raw = quants.quantize(x, name)
    err = np.abs(x.astype(np.float64) - quants.dequantize(raw, name, x.shape))
    bound = quants.error_bound(x, raw, name)
    assert np.all(err <= bound), f"worst excess {np.max(err - bound)}"


def test_grid_decodes_through_gguf_py_too():
    """The grid's level v decoded by gguf-py equals ours (the fill is layout, not our decoder)."""
    x = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    for name in [n for n in GRID_TYPES if n in BLOCK_TYPES]:   # the types gguf-py decodes
        raw = quants.quantize(x, name)
        g = quants.grid(raw, name, x.shape)
        fmt = quants.FORMATS[name]
        for v in (0, fmt.levels // 3, fmt.levels - 1):
            b = raw.reshape(-1, quants.TYPES[name].type_size).copy()
            for lo, hi, kind in fmt.code_fields:
                b[:, lo:hi] = quants.core.fill_byte(kind, v)
            assert same_floats(gq().dequantize(b.reshape(1, -1), GT(name)).reshape(x.shape), g[v])


def test_every_tensor_of_smollm2_dequantizes_like_gguf_py():
    from gguf import GGUFReader

    from refquant import gguf

    path = smollm2_gguf()
    reader = GGUFReader(path)
    theirs = {t.name: t for t in reader.tensors}
    with gguf.read(path) as f:
        assert set(f.tensors) == set(theirs)
        for name in f.tensors:
            t = f.tensor(name)
            ref = gq().dequantize(theirs[name].data, theirs[name].tensor_type)
            assert same_floats(t.dequantize(), ref), name
            assert t.dequantize().shape == tuple(int(d) for d in theirs[name].shape[::-1])


def test_bits_per_weight_match_ggml_comments():
    """Hand-derived from ggml-common.h's block structs."""
    expected = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5, "Q8_1": 9.0, "Q2_K": 2.625,
                "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_K": 9.125, "IQ4_NL": 4.5, "IQ4_XS": 4.25,
                "MXFP4": 4.25}
    assert {n: quants.TYPES[n].bits_per_weight for n in expected} == expected
    assert set(expected) == set(quants.quantizable()) - {"F32", "F16", "BF16"}   # every block type, by hand


def test_q8_k_bsums_and_scale():
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    raw = quants.quantize(x, "Q8_K")
    q = raw[:, 4:260].view(np.int8)
    d = raw[:, :4].copy().view(np.float32)[:, 0]
    np.testing.assert_array_equal(raw[:, 260:].copy().view(np.int16), q.reshape(3, 16, 16).sum(axis=2))
    amax_idx = np.abs(x).argmax(axis=1)
    assert np.all(np.abs(q[np.arange(3), amax_idx]) == 127)  # the largest weight maps to ±127
    np.testing.assert_allclose(quants.dequantize(raw, "Q8_K", x.shape), x, atol=float(d.max()) / 2 * 1.001)


def test_helpers_are_the_c_operations():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 0.49999997, 3.7, -3.7], np.float32)
    np.testing.assert_array_equal(quants.nearest_int(v), [0, 2, 2, 0, -2, 0, 4, -4])  # half to even
    np.testing.assert_array_equal(quants.roundf(v), [1, 2, 3, -1, -2, 0, 4, -4])  # half away from zero
    terms = np.array([[1e8, 1.0, -1e8, 1.0]], np.float32)
    acc = np.float32(0)
    for t in terms[0]:
        acc = np.float32(acc + t)
    assert quants.seqsum(terms)[0] == acc == np.float32(1.0)  # left to right, not pairwise


@pytest.mark.parametrize("bad, name, exc, match", [
    (np.full((1, 32), np.nan, np.float32), "Q8_0", ValueError, "non-finite"),
    (np.ones((1, 48), np.float32), "Q4_0", ValueError, "multiple of 32"),
    (np.ones((1, 128), np.float32), "Q4_K", ValueError, "multiple of 256"),
    (np.ones((1, 32), np.int32), "Q8_0", TypeError, "floating-point"),
    (np.ones((1, 32), np.float32), "Q7_0", ValueError, "unknown ggml type"),
    (np.ones((1, 256), np.float32), "IQ2_XXS", ValueError, "cannot quantize to IQ2_XXS"),
])
def test_quantize_rejects_bad_input(bad, name, exc, match):
    with pytest.raises(exc, match=match):
        quants.quantize(bad, name)


def test_dequantize_rejects_bad_input():
    with pytest.raises(ValueError, match="needs 34 bytes, got 33"):
        quants.dequantize(np.zeros(33, np.uint8), "Q8_0", (32,))
    with pytest.raises(TypeError, match="uint8"):
        quants.dequantize(np.zeros(34, np.int8), "Q8_0", (32,))
    with pytest.raises(ValueError, match="cannot dequantize IQ2_XXS"):
        quants.dequantize(np.zeros(66, np.uint8), "IQ2_XXS", (256,))
