"""The byte-dot kernels (``refquant.kernels.bytedot``) under every tier this machine runs.

Oracles: ``QuantizedTensor.dequantize`` / ``gguf.quants.dequantize`` for Ŵ (bit-exact with
ggml and gguf-py, tested elsewhere), ``gguf.quants``' Q8_0 for x̂, float64 products, and
hand-derived layouts. Tiers the machine lacks are compiled (not run) for a CPU that has
them, in a subprocess, and their instructions counted.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refquant import schemes
from refquant.gguf import quants
from refquant import kernels   # kernels.bytedot loads numba on first use (refquant.kernels.__getattr__)
from tests.oracles import kernel_bound, kernel_x_hat, q8_0_round_trip

pytestmark = pytest.mark.oracle   # the byte-dot kernels rely on numba/llvmlite (intrinsics, first-class functions, the cache API)


def _tiers() -> list[str]:
    """The tiers this machine runs, for parametrizing; a missing numba/llvmlite fails the tests
    (on their first use of the kernels), not the collection of the whole suite."""
    try:
        return kernels.bytedot.available_tiers()
    except ImportError:
        return ["numba"]


TIERS = _tiers()
# the default run checks the tier this machine uses (the best it has); `pytest -m slow` the others
TIER_PARAMS = [pytest.param(t, marks=[pytest.mark.slow] if i else []) for i, t in enumerate(TIERS)]
KERNELS = schemes.kernels()   # the registry's view: every scheme whose family declared a kernel
SCHEMES = sorted(KERNELS)
# layouts the default tier already covers through another scheme (GPTQ and AWQ store the
# INT4/INT8 groups of int4_g*/int8_channel; g64 lies between g32 and g128): slow tier only
_COVERED = {"awq_int4_g128", "gptq_int4_g128", "gptq_int4_g32", "gptq_int4_g64", "gptq_int8_channel", "int4_g64",
            "int4_g64_asym"}
SCHEME_PARAMS = [pytest.param(n, marks=[pytest.mark.slow] if n in _COVERED else []) for n in SCHEMES]


def packed(qt):
    return KERNELS[qt.scheme].packed(qt)
# in-features per scheme family: whole blocks of the format (K-quants: 256), groups of the
# INT4 schemes; the affine INT8 ones take any length (the kernel pads to whole blocks)
def _unit(name: str) -> int:
    t = schemes.get(name).spec.ggml_type
    if t is not None:     # a GGML type: its block
        from refquant.gguf.quants import ggml_type

        return ggml_type(t).block_size
    if name.startswith(("q", "int4_g", "gptq_int4", "awq")):
        return {"int4_g32": 32, "int4_g64": 64}.get(name.replace("_asym", ""), 128 if "int4" in name else 32)
    return 1


@st.composite
def kernel_case(draw, name):
    """A weight and activations for scheme ``name``: drawn sizes, magnitudes, zero rows and
    blocks, exact ties in x, and (for tiers) M from 1 to 16."""
    unit = _unit(name)
    n = unit * draw(st.integers(1, max(1, 640 // unit))) if unit > 1 else draw(st.integers(1, 300))
    rows = draw(st.integers(1, 9))
    M = draw(st.integers(1, 16))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = rng.standard_normal((rows, n)) * draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    if draw(st.booleans()):
        w[0] = 0.0                                            # a zero row
    if n >= 32 and draw(st.booleans()):
        w[:, :32] = 0.0                                       # a zero block
    X = rng.standard_normal((M, n)) * draw(st.sampled_from([1e-30, 1e-2, 1.0, 1e3, 1e5]))
    if draw(st.booleans()):
        X[:, ::5] = np.round(X[:, ::5] * 8) / 8               # ties after rounding
    if draw(st.booleans()):
        X[0] = 0.0
    return w.astype(np.float32), X.astype(np.float32)


def _quantize(name, w):
    s = schemes.get(name)
    calib = None
    if s.needs_calib:
        calib = np.random.default_rng(1).standard_normal((64, w.shape[1])).astype(np.float32)
    return s, s.quantize(w, calib=calib)


@pytest.mark.parametrize("tier", TIER_PARAMS)
@pytest.mark.parametrize("name", SCHEME_PARAMS)
@settings(max_examples=30)   # x 17 schemes x every tier (M >= 4: the tile kernel, else the one-token one)
@given(data=st.data())
def test_kernel_is_dequantized_weight_times_rounded_x(name, tier, data):
    """``Ŵ x̂`` within the float32 epilogue bound, for matvec (1-D x) and small-batch matmul."""
    w, X = data.draw(kernel_case(name))
    s, qt = _quantize(name, w)
    entry = KERNELS[name]
    w_hat = qt.dequantize().astype(np.float64)
    if entry.prepare_x is not None:
        w_hat = w_hat * qt.meta["awq_scales"]
    x_hat = kernel_x_hat(entry, qt, X, s.act_quant)
    before = os.environ.get(kernels.bytedot.TIER_ENV)
    os.environ[kernels.bytedot.TIER_ENV] = tier
    try:
        Y = entry.matmul(qt, X)
        y = entry.matmul(qt, X[0])
    finally:   # (not monkeypatch: a function-scoped fixture would span every Hypothesis example)
        if before is None:
            del os.environ[kernels.bytedot.TIER_ENV]
        else:
            os.environ[kernels.bytedot.TIER_ENV] = before
    assert Y.shape == (X.shape[0], w.shape[0]) and Y.dtype == np.float32
    assert y.shape == (w.shape[0],)
    bound = kernel_bound(w_hat, x_hat).T + 1e-300
    err = np.abs(Y - x_hat @ w_hat.T)
    assert np.all(err <= bound), (err / bound).max()
    assert np.all(np.abs(y - x_hat[0] @ w_hat.T) <= bound[0])
    # a token alone and in a batch (M >= TILE_MIN_M: the tile kernel) are computed alike
    np.testing.assert_array_equal(y, Y[0])


@pytest.mark.parametrize("tier", TIER_PARAMS)
@pytest.mark.parametrize("name", SCHEMES)
def test_the_plain_loop_reference_is_the_dequantized_product_and_every_tier_is_it(name, tier):
    """``layout.reference`` (y = Σ_b d_x,b (d_b Σ u·x_q + m_b S_b) in loops over blocks, from
    the repacked fields) equals x̂ Ŵᵀ from ``dequantize`` and gguf.quants' Q8_0 in float64,
    and every tier's kernel, one token and a batch of 6, is within the epilogue bound of it."""
    from refquant.kernels import layout

    rng = np.random.default_rng(11)
    n = 512 if _unit(name) > 1 else 200
    w = rng.standard_normal((5, n)).astype(np.float32)
    X = rng.standard_normal((6, n)).astype(np.float32)
    s, qt = _quantize(name, w)
    entry = KERNELS[name]
    Xk = entry.prepare_x(qt, X) if entry.prepare_x is not None else X
    p = packed(qt)
    xq, dx, _ = (entry.round_x or kernels.bytedot.quantize_x_q8_0)(Xk, p.nb)
    ref = layout.reference(p, xq, dx)
    w_hat = qt.dequantize().astype(np.float64) * (qt.meta["awq_scales"] if entry.prepare_x is not None else 1)
    x_hat = kernel_x_hat(entry, qt, X, s.act_quant)
    np.testing.assert_allclose(ref, x_hat @ w_hat.T, rtol=1e-9, atol=1e-9 * np.abs(x_hat).max() * np.abs(w_hat).sum())
    bound = kernel_bound(w_hat, x_hat).T + 1e-300
    for M in (1, 6):
        y = kernels.bytedot.matmul(p, Xk[:M], round_x=entry.round_x, tier=tier)
        assert np.all(np.abs(y - ref[:M]) <= bound[:M]), M


@pytest.mark.parametrize("tier", TIER_PARAMS)
def test_const_offset_sums_are_exact_for_fp16_and_float32_x_scales(tier):
    """Q4_0's ``u - 8`` is summed in int32: the kernels start a block's dots from ``-8 Σ x_q``,
    recovered from ``S·d_x / d_x`` (``rows._const_sums``). That holds for the Q8_0 rounder's
    fp16 scales and for any float32 scale (a per-token rounder's, ``blocks_of_rows``): the
    one-token and tile kernels (M = 1, 5, 20: the tile kernel's pairs of groups, a group
    left over, tokens past a multiple of four) equal ``layout.reference`` within the
    epilogue bound, which a sum off by one would exceed (checked)."""
    from refquant.kernels import layout

    rng = np.random.default_rng(12)
    n, rows = 96, 24     # 3 blocks, 3 groups of 8 rows
    w = rng.standard_normal((rows, n)).astype(np.float32)
    p = quants.pack_ggml(quants.quantize(w, "Q4_0"), "Q4_0", n)
    w_hat = quants.dequantize(quants.quantize(w, "Q4_0"), "Q4_0", (rows, n)).astype(np.float64)
    d_min = np.abs(w_hat).reshape(rows, 3, 32).max(axis=2).min(axis=1) / 8     # each row's smallest block scale
    for M in (1, 5, 20):
        x = rng.standard_normal((M, n)).astype(np.float32)
        fp16 = kernels.bytedot.quantize_x_q8_0(x, p.nb)
        codes = rng.integers(-127, 128, (M, n)).astype(np.int8)
        scale = (rng.uniform(0.5, 2, M) * np.float32(0.0137)).astype(np.float32)   # not fp16 values
        f32 = kernels.bytedot.blocks_of_rows(codes, scale, p.nb)
        for xq, dx, xs in (fp16, f32):
            ref = layout.reference(p, xq, dx)
            y = kernels.bytedot.run(p, xq, dx, xs, tier=tier)
            x_hat = xq.astype(np.float64) * np.repeat(dx.astype(np.float64), 32, axis=1)
            bound = kernel_bound(w_hat, x_hat).T
            assert np.all(np.abs(y - ref) <= bound), (M, (np.abs(y - ref) / bound).max())
            assert np.all(8 * np.outer(dx.min(axis=1), d_min) > 2 * bound)     # what a sum off by one would add


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "int4_g128_asym", "int8_channel", "q6_k"])
@settings(max_examples=50)
@given(data=st.data())
def test_kernel_error_against_exact_x_is_the_q8_0_rounding(name, data):
    """``|y - Ŵ x| <= Σ|ŵ_i| e_i`` + the epilogue bound, with ``e_i`` derived from Q8_0's
    definition: ``d = max|x_b|/127`` (float32), codes ``round(x/d)`` (half a step) and d
    stored as fp16 (127 steps of its rounding), plus 2⁻¹⁵ d for the float32 ``x·(1/d)``."""
    w, X = data.draw(kernel_case(name))
    _, qt = _quantize(name, w)
    x = X[0].astype(np.float64)
    n = x.size
    w_hat = qt.dequantize().astype(np.float64)
    xb = np.abs(np.pad(X[0], (0, -n % 32))).reshape(-1, 32).max(axis=1)
    d = (xb / np.float32(127)).astype(np.float32).astype(np.float64)
    e = d / 2 * (1 + 2.0**-15) + 127 * np.abs(d - d.astype(np.float16).astype(np.float64))
    e = np.repeat(e, 32)[:n]
    y = KERNELS[name].matmul(qt, X[0])
    bound = np.abs(w_hat) @ e + kernel_bound(w_hat, q8_0_round_trip(X[0]))[:, 0] + 1e-300
    assert np.all(np.abs(y - w_hat @ x) <= bound)


@given(M=st.integers(1, 16), n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e4, 1e6]))
def test_compiled_q8_0_activation_is_llama_cpp_q8_0(M, n, seed, scale):
    """Codes and fp16 scales bit-identical to ``gguf.quants.quantize(.., "Q8_0")``; the
    block sums are those of the codes."""
    X = (np.random.default_rng(seed).standard_normal((M, n)) * scale).astype(np.float32)
    X[:, ::7] = np.round(X[:, ::7] * 4) / 4
    nb = -(-n // 32)
    xq, dx, xs = kernels.bytedot.quantize_x_q8_0(X, nb)
    raw = quants.quantize(np.pad(X, ((0, 0), (0, 32 * nb - n))), "Q8_0").reshape(M, nb, 34)
    np.testing.assert_array_equal(xq.reshape(M, nb, 32), raw[:, :, 2:].view(np.int8))
    np.testing.assert_array_equal(dx, raw[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32))
    np.testing.assert_array_equal(xs, dx * xq.reshape(M, nb, 32).sum(axis=2))


def test_q8_0_activation_ties_round_away_from_zero():
    """A block whose max|x| is 127 has d = 1 exactly, so x·(1/d) = x: the halves are exact
    ties, which llama.cpp's roundf takes away from zero (2.5 -> 3, -0.5 -> -1), as
    ``gguf.quants``' Q8_0 (checked against gguf-py) does."""
    ties = np.array([2.5, -2.5, 0.5, -0.5, 126.5, -126.5, 3.5, -3.5], np.float32)
    X = np.zeros((1, 64), np.float32)
    X[0, 0], X[0, 1:9] = 127, ties
    X[0, 32], X[0, 33:41] = -127, ties
    xq, dx, _ = kernels.bytedot.quantize_x_q8_0(X, 2)
    want = np.array([3, -3, 1, -1, 127, -127, 4, -4])
    np.testing.assert_array_equal(xq[0, 1:9], want)
    np.testing.assert_array_equal(xq[0, 33:41], want)
    assert dx.tolist() == [[1.0, 1.0]]
    raw = quants.quantize(X, "Q8_0").reshape(2, 34)
    np.testing.assert_array_equal(xq.reshape(2, 32), raw[:, 2:].view(np.int8))


def test_q8_0_block_by_hand():
    """w = 1..32 gives d_w = fp16(32/127) and codes roundf(i·127/32); x = ones gives
    d_x = fp16(1/127) and codes 127: y = d_w·d_x·127·Σ codes."""
    w = np.arange(1, 33, dtype=np.float32)[None, :]
    _, qt = _quantize("q8_0", w)
    dw = float(np.float16(np.float32(32) / np.float32(127)))
    dx = float(np.float16(np.float32(1) / np.float32(127)))
    expected = dw * dx * 127 * np.floor(np.arange(1, 33) * (127 / 32) + 0.5).sum()
    for tier in TIERS:
        y = float(kernels.bytedot.matmul(packed(qt), np.ones(32, np.float32), tier=tier)[0])
        assert abs(y - expected) <= 1e-6 * expected


def test_layout_golden():
    """By hand (``Packed``'s docstring): rows interleaved in groups of 8; byte
    ``128b + 32p + 4r + k`` holds weight ``4p + k`` of row r's block b in its low nibble and
    weight ``16 + 4p + k`` in its high one; bit 4 of those 32 codes in the 4 plane bytes at
    ``32b + 8p + 4h`` (h: low/high nibble), bit ``4r + k``; scales at ``[g, 8j + r]``."""
    codes = np.zeros((9, 64), np.uint8)
    codes[0, 3] = 0x15         # row 0, block 0, weight 3: p 0, k 3, low nibble 5, bit 4 set
    codes[2, 32 + 21] = 0x1A   # row 2, block 1, weight 21 = 16 + 4*1 + 1: p 1, k 1, high nibble 10, bit 4
    codes[8, 6] = 0x07         # row 8: group 1, row 0; weight 6: p 1, k 2
    bd = kernels.bytedot
    d = np.arange(18, dtype=np.uint16).reshape(9, 2)
    p = bd.pack_codes(codes, "u5", 64, d=d, dshift=0, offset=bd.OFFSET_NONE)
    assert p.qs.shape == (2, 256) and p.qh.shape == (2, 64) and p.d.shape == (2, 16)
    expect = np.zeros((2, 256), np.uint8)
    expect[0, 3] = 0x05
    expect[0, 128 + 32 + 8 + 1] = 0xA0
    expect[1, 32 + 2] = 0x07
    np.testing.assert_array_equal(p.qs, expect)
    planes = np.zeros((2, 64), np.uint8)
    planes[0, 0] = 1 << 3                   # block 0, p 0, low: bit 3 (r 0, k 3), byte 0
    planes[0, 32 + 8 + 4 + 1] = 1 << 1      # block 1, p 1, high: bit 4*2 + 1 = 9 -> byte 1, bit 1
    np.testing.assert_array_equal(p.qh, planes)
    dexp = np.zeros((2, 16), np.uint16)
    for r in range(9):
        for j in range(2):
            dexp[r // 8, 8 * j + r % 8] = d[r, j]
    np.testing.assert_array_equal(p.d, dexp)
    assert p.nbytes == 2 * (256 + 64 + 32)
    s8 = bd.pack_codes(np.arange(-32, 32, dtype=np.int8).reshape(2, 32), "s8", 32, d=np.ones((2, 1), np.float32),
                       dshift=30, offset=bd.OFFSET_NONE)
    got = s8.qs.view(np.int8).reshape(8, 8, 4)      # [j, r, k]: weight 4j + k of row r
    np.testing.assert_array_equal(got[:, 0], np.arange(-32, 0).reshape(8, 4))
    np.testing.assert_array_equal(got[:, 1], np.arange(0, 32).reshape(8, 4))
    assert not got[:, 2:].any()
    lg = p.logical()
    np.testing.assert_array_equal(lg["codes"], codes)
    np.testing.assert_array_equal(lg["d"], d)


def test_repacked_bytes_are_the_formats_bits_per_weight():
    """What a matvec reads, per weight, by hand (rows a whole group of 8): Q4_0 4 + 16/32;
    Q4_K 4 + (2+2+8+8)·8/256; Q6_K 6 + (2 + 16)·8/256; INT4 g128 4 + 16/128; Q8_0 8 + 16/32;
    IQ4_NL 4 + 16/32; IQ4_XS 4 + 16/256 + 8/32 (its 6-bit sub-scales read as int8: 4.3125
    against the format's 4.25)."""
    w = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    expect = {"q4_0": 4.5, "q4_k": 4.625, "q6_k": 6.5625, "int4_g128": 4.125, "q8_0": 8.5, "q5_0": 5.5,
              "iq4_nl": 4.5, "iq4_xs": 4.3125}
    for name, bpw in expect.items():
        _, qt = _quantize(name, w)
        assert packed(qt).nbytes * 8 / w.size == bpw, name


def test_repacked_form_is_cached_and_tensor_bytes_unchanged():
    w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    s, qt = _quantize("q4_k", w)
    before = qt.codes.copy()
    s.matvec(qt, np.ones(256, np.float32))
    p = packed(qt)
    s.matvec(qt, np.ones(256, np.float32))
    assert packed(qt) is p
    np.testing.assert_array_equal(qt.codes, before)
    assert qt.nbytes == before.nbytes


def test_tier_selection_and_override(monkeypatch):
    assert TIERS[-1] == "numba"
    monkeypatch.setenv(kernels.bytedot.TIER_ENV, "numba")
    assert kernels.bytedot.backend() == "numba"
    monkeypatch.setenv(kernels.bytedot.TIER_ENV, "sse9")
    with pytest.raises(ValueError, match="not a tier"):
        kernels.bytedot.backend()
    missing = [t for t in kernels.bytedot.TIERS if t not in TIERS]
    if missing:
        monkeypatch.setenv(kernels.bytedot.TIER_ENV, missing[0])
        with pytest.raises(ValueError, match="only runs"):
            kernels.bytedot.backend()
    monkeypatch.delenv(kernels.bytedot.TIER_ENV)
    assert kernels.bytedot.backend() == TIERS[0]


def _run_snippet(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_portable_target_uses_only_the_numba_tier():
    """With NUMBA_CPU_NAME set, code must run on other CPUs: no host-specific byte dots."""
    out = _run_snippet("from refquant.kernels import bytedot; print(bytedot.available_tiers())",
                       NUMBA_CPU_NAME="generic")
    assert out.strip() == "('numba',)"


_ZEN4 = "+64bit,+avx,+avx2,+f16c,+fma,+bmi,+bmi2,+popcnt,+sse4.2,+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vnni"


@pytest.mark.parametrize("tier, instruction, absent", [("vnni", "vpdpbusd", "vpmaddubsw"),
                                                        ("avx2", "vpmaddubsw", "vpdpbusd")])
def test_each_simd_tier_compiles_to_its_byte_dot(tier, instruction, absent):
    """Compiled (never run) for a Zen 4 target in a subprocess, so tiers this machine lacks
    are checked too: the kernel holds the tier's byte-dot instruction and not the other's."""
    code = f"""
import numpy as np
from numba import typeof
from refquant.kernels import bytedot as B
from refquant.gguf import quants
p = quants.pack_ggml(quants.quantize(np.ones((2, 64), np.float32), "Q4_1", impl="numpy"), "Q4_1", 64)  # (a compiled
# quantizer would be built for the Zen 4 target too, and run here)
k = B._build("{tier}", p.kind, p.sub16, p.offset, p.sc is not None, p.mn is not None, p.c, p.dshift, p.mshift,
             p.mnshift)
z8 = np.zeros((1, 64), np.int8)
f = np.zeros((1, 2), np.float32)
args = (0, 1, p.qs, p.qh, p.d, B._DUMMY_U8, p.m, B._DUMMY_U8, z8, z8, f, f, np.zeros((2, 1, 8), np.float32), f)
sig = tuple(typeof(a) for a in args)
k.chunks.compile(sig)          # the kernel's loops (its parallel part calls them by address)
asm = k.chunks.inspect_asm(sig)
print(asm.count("{instruction}"), asm.count("{absent}"))
"""
    have, other = map(int, _run_snippet(code, NUMBA_CPU_NAME="znver4", NUMBA_CPU_FEATURES=_ZEN4,
                                        REFQUANT_NUMBA_CACHE="0").split())   # a cached kernel has no asm
    assert have > 0 and other == 0


def test_bad_input_raises():
    _, qt = _quantize("q4_0", np.ones((2, 64), np.float32))
    p = packed(qt)
    with pytest.raises(ValueError, match=r"shape \(64,\) or \(M, 64\)"):
        kernels.bytedot.matmul(p, np.ones(63, np.float32))
    with pytest.raises(ValueError, match="at most 16"):
        kernels.bytedot.matmul(p, np.ones((17, 64), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        kernels.bytedot.matmul(p, np.r_[np.ones(63), np.inf].astype(np.float32))
    with pytest.raises(ValueError, match="overflows fp16"):
        kernels.bytedot.matmul(p, np.full(64, 1e7, np.float32))
    with pytest.raises(TypeError, match="Packed"):
        kernels.bytedot.matmul(qt, np.ones(64, np.float32))
    with pytest.raises(ValueError, match="no byte-dot kernel for Q2_K"):
        quants.pack_ggml(quants.quantize(np.ones((1, 256), np.float32), "Q2_K"), "Q2_K", 256)
    with pytest.raises(ValueError, match="'l4' takes a table of 16"):
        kernels.bytedot.pack_codes(np.zeros((1, 32), np.uint8), "l4", 32, d=np.ones((1, 1), np.uint16), dshift=0,
                                   offset=0, table=(128,) * 16)
    bad = quants.quantize(np.ones((1, 32), np.float32), "Q8_0")
    bad[0, 2] = 0x80                    # a crafted code -128
    with pytest.raises(ValueError, match="code -128"):
        quants.pack_ggml(bad, "Q8_0", 32)
    with pytest.raises(ValueError, match="power-of-two multiple of 32"):
        kernels.bytedot._log2_blocks(48)


_CACHE_SNIPPET = """
import numpy as np
from refquant.kernels import bytedot as B
from refquant.gguf import quants
x = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
p = quants.pack_ggml(quants.quantize(x[::-1].copy(), "Q4_0"), "Q4_0", 64)
out = B.matmul(p, x, tier="numba")
print(sum(B.kernel("numba", p).stats.cache_hits.values()), out.tobytes().hex())
"""


def test_kernels_load_from_the_disk_cache_in_a_new_process(tmp_path):
    """A factory-built kernel compiled in one process is loaded (not compiled) by the next,
    and computes the same bytes; with the cache off it is compiled again."""
    env = dict(NUMBA_CACHE_DIR=str(tmp_path), REFQUANT_KERNEL_TIER="numba")
    first = _run_snippet(_CACHE_SNIPPET, **env).split()
    second = _run_snippet(_CACHE_SNIPPET, **env).split()
    off = _run_snippet(_CACHE_SNIPPET, **env, REFQUANT_NUMBA_CACHE="0").split()
    assert (first[0], second[0], off[0]) == ("0", "1", "0")
    assert first[1] == second[1] == off[1]


_DAMAGE_SNIPPET = """
import numpy as np
from refquant.kernels import bytedot as B
from refquant.gguf import quants
from refquant.gguf.quants import compiled
x = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
q = quants.quantize(x, "Q4_0", impl="numba")
out = B.matmul(quants.pack_ggml(q, "Q4_0", 64), x, tier="numba")
hits = sum(compiled.q4_0.stats.cache_hits.values()) + sum(B.kernel("numba", quants.pack_ggml(q, "Q4_0", 64)).stats.cache_hits.values())
print(hits, q.tobytes().hex() + out.tobytes().hex())
"""


def _damage(cache_dir, suffix, how):
    files = sorted(cache_dir.rglob(f"*{suffix}"))
    assert files, f"no {suffix} files under {cache_dir}"
    for f in files:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2] if how == "truncate" else bytes(b ^ 0x5A for b in data))
    return len(files)


@pytest.mark.parametrize("suffix, how", [(".nbi", "truncate"), pytest.param(".nbc", "garble", marks=pytest.mark.slow),
                                         pytest.param(".nbi", "garble", marks=pytest.mark.slow)])
def test_a_damaged_cache_entry_is_a_miss(tmp_path, suffix, how):
    """A truncated or garbled index or data file (a full disk, a copied tree) is recompiled and
    rewritten, for the compiled quantizers and the factory-built kernels alike: the next
    process computes the same bytes, and the one after loads from the mended cache."""
    env = dict(NUMBA_CACHE_DIR=str(tmp_path), REFQUANT_KERNEL_TIER="numba")
    first = _run_snippet(_DAMAGE_SNIPPET, **env).split()
    assert _damage(tmp_path, suffix, how) >= 2
    mended = _run_snippet(_DAMAGE_SNIPPET, **env).split()
    again = _run_snippet(_DAMAGE_SNIPPET, **env).split()
    assert mended[1] == first[1] == again[1]
    assert int(first[0]) == 0 and int(mended[0]) < 2 <= int(again[0])


@pytest.mark.slow   # three cold compilations at once
def test_three_processes_compile_into_one_cold_cache(tmp_path):
    """Processes compiling the same kernels at once into a cold cache all succeed, agree, and
    leave a cache the next process loads from."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "REFQUANT_KERNEL_TIER": "numba"}
    procs = [subprocess.Popen([sys.executable, "-c", _DAMAGE_SNIPPET], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__))) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert len({o.split()[1] for o, _ in outs}) == 1
    after = _run_snippet(_DAMAGE_SNIPPET, **{k: env[k] for k in ("NUMBA_CACHE_DIR", "REFQUANT_KERNEL_TIER")}).split()
    assert after[1] == outs[0][0].split()[1] and int(after[0]) >= 2


def test_cache_key_of_the_compiled_quantizers_covers_their_constants():
    """numba freezes the global tables a function reads (KVALUES_IQ4NL, ...) into its code and
    keys the entry by the function's own file only: the quantizers' entries also carry a hash
    of constants.py, so editing a table there invalidates them."""
    from refquant.gguf.quants import compiled
    from refquant.kernels import _cache

    fn = compiled.q4_0
    if not _cache.enabled():
        pytest.fail("REFQUANT_NUMBA_CACHE=0 in the test environment (conftest removes it)")
    assert fn._cache.deps == _cache._source_hash(("refquant/gguf/quants/constants.py",)) != ""
    ctx = type("C", (), {"magic_tuple": lambda self: ("cpu",)})()
    key = fn._cache._index_key((), ctx)
    fn._cache.deps, old = "edited", fn._cache.deps
    try:
        assert fn._cache._index_key((), ctx) != key
    finally:
        fn._cache.deps = old


def test_cache_key_covers_the_build_and_the_kernel_sources(monkeypatch):
    """Entries differ by the factory's key and by the source of the kernel modules."""
    from refquant.kernels import _cache

    cls = _cache._cache_class()

    def f(x):
        return x

    def index(key):
        return cls(f, key)._index_key((), type("C", (), {"magic_tuple": lambda self: ("cpu",)})())
    a, b = index("k1"), index("k2")
    monkeypatch.setattr(_cache, "_source_hash", lambda: "edited")
    assert len({a, b, index("k1")}) == 3


def test_row_stacking_parts_whose_rows_do_not_fill_groups_repacks_them():
    """``concat_rows``: parts of 8k rows stack their groups; others are repacked, and either
    way the logical fields are the parts' one after the other."""
    rng = np.random.default_rng(5)
    bd = kernels.bytedot
    for rows in ((8, 16), (5, 3, 9), (8, 13)):
        parts = [bd.pack_codes(rng.integers(0, 32, (r, 64)).astype(np.uint8), "u5", 64,
                               d=rng.integers(0, 30000, (r, 2)).astype(np.uint16), dshift=0, offset=bd.OFFSET_NONE)
                 for r in rows]
        cat = bd.concat_rows(parts)
        assert cat.shape == (sum(rows), 64) and cat.qs.shape[0] == -(-sum(rows) // 8)
        for f in ("codes", "d"):
            np.testing.assert_array_equal(cat.logical()[f], np.concatenate([p.logical()[f] for p in parts]))
    # layouts whose arrays have equal shapes still differ: Q4_0 (u - 8) and IQ4_NL (a codebook), Q4_0 and Q4_1
    w = rng.standard_normal((8, 64)).astype(np.float32)
    q4_0, iq4, q4_1 = (quants.pack_ggml(quants.quantize(w, t), t, 64) for t in ("Q4_0", "IQ4_NL", "Q4_1"))
    for a, b in ((q4_0, iq4), (q4_0, q4_1), (q4_1, q4_0)):
        with pytest.raises(ValueError, match="different layouts"):
            bd.concat_rows([a, b])
    with pytest.raises(ValueError, match="sub16"):
        bd.pack_codes(np.zeros((1, 32), np.uint8), "u6", 32, d=np.ones((1, 1), np.uint16), dshift=0,
                      offset=bd.OFFSET_MIN, m=np.ones((1, 1), np.uint16), sc=np.ones((1, 2), np.int8), sub16=True)


@pytest.mark.parametrize("bad", [np.nan, -np.inf, 65504.0 * 127 * 1.001])
def test_q8_0_activation_refuses_nan_and_what_overflows_its_scale(bad):
    """max|x|/127 beyond fp16's 65504 would store an infinite scale, and NaN has no block
    scale at all: both are refused, in a full block and in the zero-padded tail."""
    for n, at in ((64, 40), (40, 35)):
        X = np.ones((2, n), np.float32)
        X[1, at] = bad
        from refquant.kernels import layout

        with pytest.raises(ValueError, match="Q8_0"):
            kernels.bytedot.quantize_x_q8_0(X, 2)
        with pytest.raises(ValueError, match="NaN|range"):
            layout.quantize_x(X, n, np.empty((2, 64), np.int8), np.empty((2, 2), np.float32),
                                             np.empty((2, 2), np.float32))
