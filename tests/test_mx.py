import numpy as np
import pytest
from hypothesis import given

from refquant import formats, mx, packing
from tests.strategies import float_arrays


def elements(qt):
    codes = packing.unpack(qt.codes, 4, qt.shape[-1]) if qt.meta["fmt"] == "fp4_e2m1" else qt.codes
    return formats.decode(codes, qt.meta["fmt"])


def test_golden_mxfp4_block_exact_scale():
    w = np.zeros(32, np.float32)
    w[:5] = [6.0, 1.0, -0.5, 0.25, 3.5]
    qt = mx.quantize_mx(w, "mxfp4")
    # amax 6: floor(log2 6) = 2, minus emax(E2M1) = 2 -> X = 2^0, scale code 127
    assert qt.scales.tolist() == [127]
    # 0.25 is a tie between 0 and 0.5 -> 0 (even); 3.5 a tie between 3 and 4 -> 4 (even)
    np.testing.assert_array_equal(elements(qt)[:5], [6.0, 1.0, -0.5, 0.0, 4.0])
    assert qt.nbytes == 16 + 1


def test_golden_mxfp4_scale_rounding_rule():
    """The spec floors log2(amax): the scale is NOT rounded up to fit amax, the top saturates."""
    w = np.zeros((2, 32), np.float32)
    w[0, :2] = [7.5, 1.0]          # floor(log2 7.5) = 2 -> X = 1; 7.5 saturates to 6
    w[1, :2] = [0.9, -0.1]         # floor(log2 0.9) = -1 -> X = 2^-3; 7.2 -> 6 -> 0.75; -0.8 -> -1 -> -0.125
    qt = mx.quantize_mx(w, "mxfp4")
    assert qt.scales[:, 0].tolist() == [127, 124]
    np.testing.assert_array_equal(qt.dequantize()[:, :2], [[6.0, 1.0], [0.75, -0.125]])


def test_all_zero_block():
    qt = mx.quantize_mx(np.zeros((1, 64), np.float32), "mxfp4")
    # amax taken as the smallest normal float32 (2^-126): e = -126 - 2 clamps to -127 -> code 0
    assert qt.scales.tolist() == [[0, 0]]
    np.testing.assert_array_equal(qt.dequantize(), 0)
    nv = mx.quantize_nvfp4(np.zeros((1, 16), np.float32))
    np.testing.assert_array_equal(nv.dequantize(), 0)


def test_golden_mxfp8():
    w = np.zeros(32, np.float32)
    w[:3] = [448.0, -1.0, 3.0]     # floor(log2 448) = 8 = emax(E4M3) -> X = 1
    w[3] = 0.0                      # and 20 rounds to 20 exactly, 21 -> 20 (spacing 2 in [16, 32): tie to even)
    w[4:6] = [20.0, 21.0]
    qt = mx.quantize_mx(w, "mxfp8")
    assert qt.scales.tolist() == [127]
    np.testing.assert_array_equal(qt.dequantize()[:6], [448, -1, 3, 0, 20, 20])


def test_golden_nvfp4():
    w = np.zeros((1, 32), np.float32)
    w[0, 0] = 2688.0               # tensor amax = 6 * 448 -> g = 1; block scale e4m3(2688 / 6) = 448
    w[0, 16:18] = [3.0, 1.0]       # block 2: scale e4m3(3 / 6) = 0.5; elements 6 and 2
    qt = mx.quantize_nvfp4(w)
    assert qt.meta["global_scale"].tolist() == [1.0]
    np.testing.assert_array_equal(formats.decode(qt.scales, "fp8_e4m3fn"), [[448.0, 0.5]])
    np.testing.assert_array_equal(elements(qt)[0, [0, 16, 17]], [6.0, 6.0, 2.0])
    np.testing.assert_array_equal(qt.dequantize(), w)


@given(w=float_arrays(max_dims=2, max_side=6, last_multiple_of=32, dtypes=(np.float32,)))
def test_mx_error_bound(w):
    for name in ("mxfp4", "mxfp8"):
        qt = mx.quantize_mx(w, name)
        assert np.all(np.abs(w - qt.dequantize()) <= mx.error_bound(w, qt))
    qt = mx.quantize_nvfp4(w)
    assert np.all(np.abs(w - qt.dequantize()) <= mx.error_bound(w, qt))


def test_bits_per_weight():
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    assert mx.quantize_mx(w, "mxfp4").bits_per_weight == 4.25
    assert mx.quantize_mx(w, "mxfp8").bits_per_weight == 8.25
    assert mx.quantize_nvfp4(w).bits_per_weight == 4.5 + 32 / w.size


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        mx.quantize_mx(np.ones((2, 48), np.float32))
    with pytest.raises(ValueError, match="multiple of 16"):
        mx.quantize_nvfp4(np.ones((2, 24), np.float32))
    with pytest.raises(ValueError, match="name must be one of"):
        mx.quantize_mx(np.ones((2, 32), np.float32), "mxfp6")
