import numpy as np
import pytest

from refquant import affine, metrics


def test_golden_metrics():
    w = np.array([1.0, -2.0, 3.0, 0.0])
    w_hat = np.array([1.0, -2.5, 3.0, 0.5])
    assert metrics.max_abs_error(w, w_hat) == 0.5
    assert metrics.mse(w, w_hat) == pytest.approx((0.25 + 0.25) / 4)
    # signal 1 + 4 + 9 = 14, noise 0.5 -> 10 log10(28)
    assert metrics.sqnr_db(w, w_hat) == pytest.approx(10 * np.log10(28))
    assert metrics.sqnr_db(w, w) == float("inf")


def test_sqnr_gains_about_6db_per_bit(rng):
    """Uniform quantization theory: noise power s^2/12 with s = 1/(2^(b-1)-1) for
    uniform data, so one more bit gains 20 log10(qmax(b+1)/qmax(b)) dB (-> 6.02 dB)."""
    w = rng.uniform(-1, 1, size=(64, 1024))
    bits = np.arange(4, 9)
    sq = [metrics.sqnr_db(w, affine.quantize(w, int(b)).dequantize()) for b in bits]
    qmax = 2.0 ** (bits - 1) - 1
    np.testing.assert_allclose(np.diff(sq), 20 * np.log10(qmax[1:] / qmax[:-1]), atol=0.1)


def test_bytes_per_weight():
    qt = affine.quantize(np.ones((4, 256), np.float32), 4, granularity="group", group_size=128)
    # 4 bits + one fp32 scale per 128 weights = 4 + 32/128 bits
    assert metrics.bits_per_weight(qt) == 4.25
    assert metrics.bytes_per_weight(qt) == 4.25 / 8
    s = metrics.summary(np.ones((4, 256)), qt)
    assert s["bits_per_weight"] == 4.25 and s["max_abs_error"] == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        metrics.mse(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="all zeros"):
        metrics.sqnr_db(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="w_hat contains"):
        metrics.mse(np.ones(2), np.array([1.0, np.nan]))
