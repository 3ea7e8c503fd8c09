"""The contract every registered scheme must honour.

Parametrized over ``refquant.schemes.names()``: a scheme registered anywhere in the
package is checked here with no change to this file.
"""
import numpy as np
import pytest

import refquant
from refquant import schemes
from refquant.kernels.table import KERNELS
from tests.oracles import kernel_bound, kernel_x_hat
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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_shapes_dtypes_and_bytes(scheme, shape, dtype):
    w = make_weight(shape, dtype=dtype)
    qt = quantize(scheme, w)
    assert isinstance(qt, refquant.QuantizedTensor)
    assert qt.shape == shape and qt.scheme == scheme.name
    w_hat = qt.dequantize()
    assert w_hat.shape == shape and w_hat.dtype == np.float32
    assert qt.nbytes == scheme.expected_nbytes(shape), "stored bytes differ from the format's hand count"


def test_only_calibrated_schemes_lack_an_error_bound():
    """GPTQ/AWQ move weights to cancel output error, so no per-element bound exists; every
    round-to-nearest scheme must declare one (and is checked against it below)."""
    unbounded = {n for n in NAMES if schemes.get(n).error_bound is None}
    assert unbounded <= {n for n in NAMES if schemes.get(n).needs_calib}


@pytest.mark.parametrize("name", [n for n in NAMES if schemes.get(n).error_bound is not None])
def test_error_within_the_scheme_bound(name):
    scheme = schemes.get(name)
    w = make_weight((48, 256)).astype(np.float64)
    qt = quantize(scheme, w)
    err = np.abs(w - qt.dequantize())
    assert np.all(err <= scheme.error_bound(w, qt))


def test_quantization_is_deterministic(scheme):
    w = make_weight((16, 256), seed=3)
    a, b = quantize(scheme, w), quantize(scheme, w)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.dequantize(), b.dequantize())


@pytest.mark.parametrize("shape", SHAPES)
def test_matvec_and_matmul_agree_with_dequantize(scheme, shape):
    w = make_weight(shape, seed=5)
    qt = quantize(scheme, w)
    ref_w = qt.dequantize().astype(np.float64)
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape[1]).astype(np.float32)
    X = rng.standard_normal((5, shape[1])).astype(np.float32)
    y, Y = scheme.matvec(qt, x), scheme.matmul(qt, X)
    assert y.shape == (shape[0],) and y.dtype == np.float32
    assert Y.shape == (5, shape[0]) and Y.dtype == np.float32

    if scheme.name in KERNELS:   # Ŵ x̂ with x rounded as the kernel defines it
        for v, out in ((x[None], y[None]), (X, Y)):
            v_hat = kernel_x_hat(KERNELS[scheme.name], qt, v, scheme.act_quant)
            if KERNELS[scheme.name].prepare_x is not None:   # AWQ: Ŵ holds W·diag(s); the kernel divides x by s
                w_eff = ref_w * qt.meta["awq_scales"].astype(np.float64)
            else:
                w_eff = ref_w
            err = np.abs(out.astype(np.float64) - v_hat @ w_eff.T)
            assert np.all(err <= kernel_bound(w_eff, v_hat).T + 1e-30), err.max()
        return
    if scheme.act_quant is not None:  # the layer sees its activations rounded; compare against that
        x = scheme.act_quant(qt, x[None])[0].astype(np.float64)
        X = scheme.act_quant(qt, X).astype(np.float64)
    scale = np.abs(ref_w) @ np.abs(x)
    assert np.all(np.abs(y - ref_w @ x) <= TOL["matvec_rel"] * scale + 1e-30)
    scale = np.abs(X) @ np.abs(ref_w).T
    assert np.all(np.abs(Y - X.astype(np.float64) @ ref_w.T) <= TOL["matvec_rel"] * scale + 1e-30)


@pytest.mark.parametrize("bad, exc, match", [
    (np.array([[1.0, np.nan]], np.float32), ValueError, "w contains 1 non-finite"),
    (np.array([[1.0, -np.inf]], np.float32), ValueError, "w contains 1 non-finite"),
    (np.zeros((0, 256), np.float32), ValueError, "w is empty"),
    (np.ones(256, np.float32), ValueError, "w must be 2-D"),
    (np.ones((2, 2, 256), np.float32), ValueError, "w must be 2-D"),
    (np.ones((2, 256), np.int8), TypeError, "w must be a floating-point array"),
    ("weights", TypeError, "w must be a NumPy array"),
])
def test_bad_weights_raise(scheme, bad, exc, match):
    with pytest.raises(exc, match=match):
        quantize(scheme, bad)


def test_bad_activations_raise(scheme):
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
        schemes.register("fp32", description="again", nbytes=lambda s: 0)(lambda w, *, calib=None: None)
