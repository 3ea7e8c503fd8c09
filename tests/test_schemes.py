"""The contract every registered scheme must honour.

Parametrized over ``refquant.schemes.names()``: a scheme registered anywhere in the
package is checked here with no change to this file.
"""
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import refquant
from refquant import schemes
from tests.oracles import kernel_bound, kernel_x_hat, refused
from tests.conftest import TOL

NAMES = schemes.names()
SHAPES = [(48, 256), (1, 512), (7, 256)]


def make_weight(shape, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * 0.05
    w[0, :3] = [0.0, 0.4, -0.3]          # a zero and a couple of outliers
    return w.astype(dtype)


def synthetic_calib(in_features, seed=1):
    """Correlated activations for calibration-based schemes: (tokens, in)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((in_features, in_features)) / np.sqrt(in_features)
    return (rng.standard_normal((256, in_features)) @ mix).astype(np.float32)


def quantize(scheme, w):
    ok = isinstance(w, np.ndarray) and w.ndim >= 1 and w.shape[-1] > 0
    return scheme.quantize(w, calib=synthetic_calib(w.shape[-1]) if scheme.needs_calib and ok else None)


@pytest.fixture(params=NAMES)
def scheme(request):
    return schemes.get(request.param)


def test_registry_lists_the_foundation_schemes():
    expected = {"fp32", "fp16", "int8_tensor", "int8_channel", "int4_g128", "int4_g64", "int4_g32"}
    assert expected <= set(NAMES)
    assert {n + "_asym" for n in expected if n.startswith("int")} <= set(NAMES)
    assert refquant.schemes.get("int4_g128").name == "int4_g128"


def _codebook_bytes(out, n, double_quant):
    blocks = -(-out * n // 64)                       # bitsandbytes blocks of 64 over the flat tensor
    codes, quant_map = -(-blocks * 64 // 2), 16 * 4  # two 4-bit codes per byte, the fp32 16-entry codebook
    if not double_quant:
        return codes + 4 * blocks + quant_map        # fp32 absmax per block
    # uint8 absmax codes, an fp32 scale per 256 of them, the fp32 mean, the 256-entry fp32 dynamic map
    return codes + blocks + 4 * -(-blocks // 256) + 4 + quant_map + 256 * 4


def _affine_bytes(out, n, bits, per, scale_bytes, zero_bytes=0):
    """Packed codes (rows padded to whole bytes) + a scale (and zero) per ``per`` weights of a row."""
    groups = {"tensor": 1, "channel": out}.get(per) or out * (n // per)
    return out * -(-n * bits // 8) + groups * (scale_bytes + zero_bytes)


# Bytes a (out, n) tensor takes, written out from each format's definition (not from the code).
NBYTES = {
    "fp32": lambda o, n: 4 * o * n, "fp16": lambda o, n: 2 * o * n, "bf16": lambda o, n: 2 * o * n,
    "fp8_e4m3": lambda o, n: o * n + 4 * o, "fp8_e5m2": lambda o, n: o * n + 4 * o,   # + fp32 scale per row
    "nf4": lambda o, n: _codebook_bytes(o, n, False), "fp4": lambda o, n: _codebook_bytes(o, n, False),
    "nf4_dq": lambda o, n: _codebook_bytes(o, n, True),
    "mxfp4": lambda o, n: o * n // 2 + o * n // 32,          # E2M1 nibbles + an E8M0 byte per 32
    "mxfp8": lambda o, n: o * n + o * n // 32,
    "nvfp4": lambda o, n: o * n // 2 + o * n // 16 + 4,      # + an E4M3 byte per 16 + the fp32 tensor scale
    **{f"int8_{g}{a}": (lambda o, n, g=g, a=a: _affine_bytes(o, n, 8, g, 4, 1 if a else 0))
       for g in ("tensor", "channel") for a in ("", "_asym")},
    **{f"int4_g{g}{a}": (lambda o, n, g=g, a=a: _affine_bytes(o, n, 4, g, 2, 1 if a else 0))
       for g in (32, 64, 128) for a in ("", "_asym")},
    "int3_g128": lambda o, n: _affine_bytes(o, n, 3, 128, 2),
    # GGML: n / block_size blocks per row, each of the block's byte size (ggml-common.h)
    "q8_0": lambda o, n: o * n // 32 * 34, "q4_0": lambda o, n: o * n // 32 * 18, "q4_1": lambda o, n: o * n // 32 * 20,
    "q5_0": lambda o, n: o * n // 32 * 22, "q5_1": lambda o, n: o * n // 32 * 24, "q8_1": lambda o, n: o * n // 32 * 36,
    "q2_k": lambda o, n: o * n // 256 * 84, "q3_k": lambda o, n: o * n // 256 * 110,
    "q4_k": lambda o, n: o * n // 256 * 144, "q5_k": lambda o, n: o * n // 256 * 176,
    "q6_k": lambda o, n: o * n // 256 * 210, "iq4_nl": lambda o, n: o * n // 32 * 18,
    "iq4_xs": lambda o, n: o * n // 256 * 136,
    "gptq_int4_g128": lambda o, n: _affine_bytes(o, n, 4, 128, 2), "gptq_int4_g64": lambda o, n: _affine_bytes(o, n, 4, 64, 2),
    "gptq_int4_g32": lambda o, n: _affine_bytes(o, n, 4, 32, 2),
    "gptq_int4_g128_actorder": lambda o, n: _affine_bytes(o, n, 4, 128, 2) + 4 * n,   # + int32 g_idx per input
    "gptq_int3_g128": lambda o, n: _affine_bytes(o, n, 3, 128, 2),
    "gptq_int8_channel": lambda o, n: _affine_bytes(o, n, 8, "channel", 2),
    # AWQ: nibbles, fp16 scale + uint8 zero per 128, and the fp32 per-input AWQ scales
    "awq_int4_g128": lambda o, n: o * n // 2 + o * (n // 128) * 3 + 4 * n,
    "w8a8": lambda o, n: o * n + 4 * o, "smoothquant_w8a8": lambda o, n: o * n + 4 * o + 4 * n,  # + fp32 smoothing
}


def _llm_int8_bytes(qt):   # int8 + fp32 row scale, + each outlier column as fp16 weights and an int32 index
    o, n = qt.shape
    k = len(qt.meta["outliers"])
    return o * n + 4 * o + k * (2 * o + 4)


def test_every_scheme_has_a_hand_written_byte_count():
    assert set(NAMES) - {"llm_int8"} == set(NBYTES)


def test_shapes_dtypes_bytes_and_product_shapes(scheme):
    """Every shape of ``SHAPES`` in float16/32/64: a QuantizedTensor of that shape, a float32
    dequantization, the stored bytes the format's hand count says, and float32 products of
    the right shapes (one vector, five rows)."""
    rng = np.random.default_rng(6)
    for shape in SHAPES:
        for dtype in (np.float16, np.float32, np.float64):
            qt = quantize(scheme, make_weight(shape, dtype=dtype))
            case = f"{scheme.name} {shape} {np.dtype(dtype).name}"
            assert isinstance(qt, refquant.QuantizedTensor), case
            assert qt.shape == shape and qt.scheme == scheme.name, case
            w_hat = qt.dequantize()
            assert w_hat.shape == shape and w_hat.dtype == np.float32, case
            want = _llm_int8_bytes(qt) if scheme.name == "llm_int8" else NBYTES[scheme.name](*shape)
            assert qt.nbytes == want, f"{case}: stored bytes differ from the format's hand count"
        y = scheme.matvec(qt, rng.standard_normal(shape[1]).astype(np.float32))
        Y = scheme.matmul(qt, rng.standard_normal((5, shape[1])).astype(np.float32))
        assert y.shape == (shape[0],) and y.dtype == np.float32, case
        assert Y.shape == (5, shape[0]) and Y.dtype == np.float32, case


def test_only_calibrated_schemes_lack_an_error_bound():
    """GPTQ/AWQ move weights to cancel output error, so no per-element bound exists; every
    round-to-nearest scheme must declare one (and is checked against it below)."""
    unbounded = {n for n in NAMES if schemes.get(n).error_bound is None}
    assert unbounded <= {n for n in NAMES if schemes.get(n).needs_calib}


def test_determinism_every_scheme_quantizes_a_weight_twice_to_the_same_bytes():
    """Determinism (no hidden state, no unseeded randomness): the same weight quantizes to
    the same codes and the same dequantization, scheme by scheme."""
    w = make_weight((16, 256), seed=3)
    for name in NAMES:
        a, b = quantize(schemes.get(name), w), quantize(schemes.get(name), w)
        np.testing.assert_array_equal(a.codes, b.codes, err_msg=name)
        np.testing.assert_array_equal(a.dequantize(), b.dequantize(), err_msg=name)


def naive_products(w_hat, X):
    """``X Ŵᵀ`` by explicit loops in float64: the oracle for the fast products."""
    out = np.zeros((X.shape[0], w_hat.shape[0]))
    for m in range(X.shape[0]):
        for r in range(w_hat.shape[0]):
            acc = 0.0
            for j in range(w_hat.shape[1]):
                acc += float(w_hat[r, j]) * float(X[m, j])
            out[m, r] = acc
    return out


KERNELS = schemes.kernels()
FAST = [n for n in NAMES if schemes.get(n).matmul_fn is not None]


def test_the_kernel_table_is_what_runs_fast():
    assert set(KERNELS) <= set(FAST) and set(FAST) - set(KERNELS) == {"smoothquant_w8a8", "llm_int8"}


@pytest.mark.parametrize("name", FAST)
def test_fast_products_against_a_naive_loop(name):
    """Schemes with a kernel: ``Ŵ x̂`` with x rounded as the kernel defines it (llama.cpp's
    Q8_0, checked against gguf-py, or W8A8's per-token int8), within the float32 rounding
    bound of the kernel's epilogue, scaled by Σ|ŵ||x̂|. The exact-integer W8A8 products
    (SmoothQuant, LLM.int8()): the same against their act_quant's rounding."""
    scheme = schemes.get(name)
    for shape in ((7, 256), (3, 512)):
        _fast_products_against_a_naive_loop(name, scheme, shape)


def _fast_products_against_a_naive_loop(name, scheme, shape):
    qt = quantize(scheme, make_weight(shape, seed=5))
    w_hat = qt.dequantize().astype(np.float64)
    rng = np.random.default_rng(6)
    x, X = rng.standard_normal(shape[1]).astype(np.float32), rng.standard_normal((5, shape[1])).astype(np.float32)
    for v, out in ((x[None], scheme.matvec(qt, x)[None]), (X, scheme.matmul(qt, X))):
        if name in KERNELS:
            v_hat = kernel_x_hat(KERNELS[name], qt, v, scheme.act_quant)
            w_eff = w_hat * qt.meta["awq_scales"] if KERNELS[name].prepare_x is not None else w_hat  # AWQ: x / s
            bound = kernel_bound(w_eff, v_hat).T
        else:
            v_hat, w_eff = scheme.act_quant(qt, v).astype(np.float64), w_hat
            bound = TOL["matvec_rel"] * np.abs(v_hat) @ np.abs(w_eff).T
        err = np.abs(out.astype(np.float64) - naive_products(w_eff, v_hat))
        assert np.all(err <= bound + 1e-30), (shape, err.max())


@pytest.mark.parametrize("bad, exc, match", [
    (np.array([[1.0, np.nan]], np.float32), ValueError, "w contains 1 non-finite"),
    (np.array([[1.0, -np.inf]], np.float32), ValueError, "w contains 1 non-finite"),
    (np.zeros((0, 256), np.float32), ValueError, "w is empty"),
    (np.ones(256, np.float32), ValueError, "w must be 2-D"),
    (np.ones((2, 2, 256), np.float32), ValueError, "w must be 2-D"),
    (np.ones((2, 256), np.int8), TypeError, "w must be a floating-point array"),
    ("weights", TypeError, "w must be a NumPy array"),
])
def test_bad_weights_raise(bad, exc, match):
    """Every scheme's quantize goes through ``Scheme.quantize``'s one validation: one scheme each."""
    with pytest.raises(exc, match=match):
        quantize(schemes.get("int4_g128"), bad)


def test_bad_activations_raise():
    scheme = schemes.get("nf4")
    qt = quantize(scheme, make_weight((4, 256)))
    with pytest.raises(ValueError, match="x has 255 features"):
        scheme.matvec(qt, np.ones(255, np.float32))
    with pytest.raises(ValueError, match="x must be 1-D"):
        scheme.matvec(qt, np.ones((1, 256), np.float32))
    with pytest.raises(ValueError, match="X must be 2-D"):
        scheme.matmul(qt, np.ones(256, np.float32))
    with pytest.raises(ValueError, match="x contains 1 non-finite"):
        scheme.matvec(qt, np.r_[np.ones(255), np.nan].astype(np.float32))
    with pytest.raises(TypeError, match="qt must be a QuantizedTensor"):
        scheme.matvec(np.ones((4, 256)), np.ones(256, np.float32))


def test_unknown_scheme_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown scheme 'int5_g7'.*int4_g128"):
        schemes.get("int5_g7")


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        schemes.register("fp32", spec=schemes.get("fp32").spec, description="again")(lambda w, *, calib=None: None)


def test_every_spec_describes_what_its_scheme_stores():
    """The spec is data tools act on, so it must be what the quantizer does: integer grids
    store ``bits`` per weight, a zero point exactly when asymmetric, scales of the stated
    type, one per tensor / row / group; GGML schemes store the stated type; a calibrated
    method refuses to run without data, the others run without."""
    w = make_weight((4, 256), seed=8)
    for name in NAMES:
        s = schemes.get(name)
        sp, qt = s.spec, quantize(s, w)
        if sp.values == "int":
            assert qt.codes.nbytes * 8 == sp.bits * w.size, name
            assert (qt.zeros is None) == sp.symmetric, name
            assert qt.scales.dtype == {"fp16": np.float16, "fp32": np.float32}[sp.scale_dtype], name
            per = {"tensor": 1, "channel": w.shape[0], "group": w.size // (sp.group_size or 1)}[sp.granularity]
            assert qt.scales.size == per, name
        elif sp.values == "ggml":
            assert qt.meta["ggml_type"] == sp.ggml_type and sp.ggml_type.lower() == name, name
        else:
            assert qt.codes.nbytes * 8 >= sp.bits * w.size, name
        if sp.calibration is not None:
            refused(name, ValueError, "needs calibration data", s.quantize, w)
        else:
            s.quantize(w)


def test_a_spec_that_contradicts_its_scheme_is_refused():
    """Negative controls: fields that do not fit together, and a spec whose activations are
    not what the registered products do."""
    with pytest.raises(ValueError, match="group_size is given exactly for granularity 'group'"):
        schemes.Spec(4, "int", "channel", 128, symmetric=True)
    with pytest.raises(ValueError, match="symmetric is given exactly for integer grids"):
        schemes.Spec(4, "float", "block", symmetric=True)
    with pytest.raises(ValueError, match="Spec.calibration must be one of"):
        schemes.Spec(4, "int", "tensor", symmetric=True, calibration="magic")
    k = schemes.get("int4_g128").kernel
    with pytest.raises(ValueError, match="its products take x as 'q8_0', its spec says 'float'"):
        schemes.register("x_int4", spec=schemes.Spec(4, "int", "group", 128, symmetric=True), description="x",
                         kernel=k)
    assert "x_int4" not in schemes.names()


def test_find_selects_by_spec_fields():
    assert schemes.find(calibration="gptq", bits=4, group_size=64) == ["gptq_int4_g64"]
    assert schemes.find(ggml_type="Q5_0") == ["q5_0"]
    assert set(schemes.find(values="int", granularity="group", group_size=32)) == {
        "int4_g32", "int4_g32_asym", "gptq_int4_g32"}
    with pytest.raises(ValueError, match="Spec has no field colour"):
        schemes.find(colour="red")


# Row magnitudes at the edges of float32: zero rows, subnormals, the smallest normals,
# ordinary values, large ones, and 3e37 (within 10x of the float32 maximum).
EDGE_MAGNITUDES = (0.0, 1.4e-45, 3e-42, 1.2e-38, 1e-3, 1.0, 6e4, 1e10, 3e37)


@st.composite
def edge_weights(draw):
    """(rows, 256) weights: each row one magnitude from EDGE_MAGNITUDES times a drawn pattern
    that mixes signs, exact ties (repeated values) and zeros."""
    rows = draw(st.integers(1, 3))
    mags = draw(st.lists(st.sampled_from(EDGE_MAGNITUDES), min_size=rows, max_size=rows))
    base = draw(st.lists(st.sampled_from([0.0, 1.0, -1.0, 0.5, -0.25, 0.75, 1 / 3]), min_size=8, max_size=8))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    w = np.stack([m * rng.choice(base, 256) for m in mags]).astype(np.float32)
    return w


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12)
@given(w=edge_weights())
@example(w=make_weight((48, 256)).astype(np.float64))   # ordinary weights, compared in float64
def test_edge_weights_are_within_the_bound_or_refused(name, w):
    """Finite weights of any magnitude come back finite and within the scheme's bound, or
    are refused with a ValueError that says why: never a silent Inf or NaN (and ordinary
    weights, the explicit example, never)."""
    scheme = schemes.get(name)
    try:
        qt = quantize(scheme, w)
    except ValueError as e:
        assert any(k in str(e) for k in ("cannot represent", "overflow", "range", "beyond")), str(e)
        assert np.abs(w).max() >= 6e4, f"refused ordinary weights: {e}"
        return
    w_hat = qt.dequantize()
    assert np.isfinite(w_hat).all()
    if scheme.error_bound is not None:
        w64 = w.astype(np.float64)
        assert np.all(np.abs(w64 - w_hat) <= scheme.error_bound(w64, qt))


def test_calibration_of_the_wrong_width_is_refused():
    calibrated = [n for n in NAMES if schemes.get(n).needs_calib]
    assert len(calibrated) >= 5
    for name in calibrated:
        with pytest.raises(ValueError, match=r"^calibration inputs have 100 features but w has in=256"):
            schemes.get(name).quantize(np.ones((4, 256), np.float32), calib=np.ones((8, 100), np.float32))


def test_float64_beyond_float32_is_refused_by_every_path():
    w = np.full((2, 256), 1e300)
    for name in ("q4_0", "int4_g128", "fp8_e4m3", "nf4"):
        with pytest.raises(ValueError, match=r"^w has \|values\| up to 1e\+300, beyond float32"):
            schemes.get(name).quantize(w)


def test_an_overflowing_scale_is_refused_naming_where():
    w = np.ones((3, 64), np.float32)
    w[1, 40] = 1e10
    with pytest.raises(ValueError, match=r"^scheme 'q4_0' cannot represent w: 32 weights decode to Inf/NaN, "
                                         r"the first at row 1, column 32 \(w = 1, max \|w\| of the row 1e\+10\)"):
        schemes.get("q4_0").quantize(w)


def test_nf4_dq_bound_holds_with_a_huge_outlier():
    """Q3: one 3e38 weight makes the double-quantized absmax of ordinary blocks round far
    from their own (up to 2.8e35 here); the bound counts that rounding."""
    w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    w[2, 5] = 3e38
    s = schemes.get("nf4_dq")
    qt = s.quantize(w)
    err = np.abs(w.astype(np.float64) - qt.dequantize())
    assert err.max() > 1e34                                   # the effect is real, not a tiny one
    assert np.all(err <= s.error_bound(w.astype(np.float64), qt))


def test_a_registered_group_size_is_the_one_the_quantizer_uses():
    """``Scheme.group_size`` is data the tools read (``llama.fit_scheme``): it must be the
    width of the groups the scheme's tensors have."""
    grouped = [n for n in NAMES if schemes.get(n).group_size]
    assert len(grouped) >= 10
    for name in grouped:
        s = schemes.get(name)
        qt = quantize(s, make_weight((4, 2 * s.group_size), seed=2))
        assert qt.meta["group_size"] == s.group_size, name
        assert qt.scales.shape[-1] == 2, name

