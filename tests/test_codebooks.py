import numpy as np
import pytest
from hypothesis import given, strategies as st

from refquant import codebooks
from tests.strategies import float_arrays

# bitsandbytes' FP4 lookup table (get_4bit_type("fp4") normalised by its max, 12): code -> value
BNB_FP4 = [0, 0.0625 / 12, 8 / 12, 1, 4 / 12, 6 / 12, 2 / 12, 3 / 12]


def test_nf4_codebook_is_the_normal_map_bitsandbytes_builds():
    """bitsandbytes' ``create_normal_map(offset=0.9677083)``, recomputed from the normal
    quantile function (``statistics.NormalDist``): 8 quantiles of linspace(offset, 0.5, 9)
    and 7 negated ones of linspace(offset, 0.5, 8), and 0, sorted and divided by the largest.
    bitsandbytes runs it once in torch float32 and ships the result; the table here is those
    shipped constants, which the recomputation meets within 2 float32 ulps of 1."""
    from statistics import NormalDist

    ppf, off = NormalDist().inv_cdf, 0.9677083
    v = sorted([ppf(p) for p in np.linspace(off, 0.5, 9)[:-1]] + [0.0]
               + [-ppf(p) for p in np.linspace(off, 0.5, 8)[:-1]])
    want = np.array(v) / max(v)
    assert codebooks.NF4.dtype == np.float32 and codebooks.NF4.shape == (16,)
    assert np.abs(codebooks.NF4 - want).max() <= 2 * 2.0**-23
    assert 0.0 in codebooks.NF4 and codebooks.NF4.min() == -1 and codebooks.NF4.max() == 1
    assert np.sum(codebooks.NF4 < 0) == 7 and np.sum(codebooks.NF4 > 0) == 8   # asymmetric: exact zero


def test_fp4_codebook_is_bitsandbytes():
    np.testing.assert_allclose(codebooks.FP4[:8], BNB_FP4, rtol=1e-7)
    np.testing.assert_array_equal(codebooks.FP4[8:], -codebooks.FP4[:8])


def naive_nearest(x, table):
    """Oracle: scan the table, keep the first (lowest) value at the smallest distance."""
    out = []
    for v in np.ravel(x):
        best, best_d = 0, np.inf
        for i, t in enumerate(table):
            d = abs(float(v) - float(t))
            if d < best_d:
                best, best_d = i, d
        out.append(best)
    return np.array(out)


@given(st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=64))
def test_nearest_index_matches_a_linear_scan(xs):
    x = np.array(xs, np.float32)
    np.testing.assert_array_equal(codebooks.nearest_index(x, codebooks.NF4), naive_nearest(x, codebooks.NF4))


def test_ties_go_to_the_lower_value():
    mid = (np.float64(codebooks.NF4[8]) + codebooks.NF4[9]) / 2
    assert codebooks.nearest_index(np.array([mid]), codebooks.NF4)[0] == 8


@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
@given(w=float_arrays(max_dims=2, max_side=80))
def test_error_at_most_half_the_largest_gap_times_absmax(codebook, w):
    qt = codebooks.quantize(w, codebook, blocksize=16)
    w_hat = qt.dequantize()
    assert w_hat.shape == w.shape
    flat = np.concatenate([w.reshape(-1).astype(np.float64), np.zeros((-w.size) % 16)]).reshape(-1, 16)
    absmax = np.abs(flat).max(axis=1)
    bound = np.repeat(codebooks.max_gap(codebook) / 2 * absmax, 16)[: w.size].reshape(w.shape)
    assert np.all(np.abs(w - w_hat) <= bound * (1 + 2.0**-20) + 2.0**-149)


@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
def test_subnormal_absmax_does_not_overflow_the_reciprocal(codebook):
    # 1 / 1.7e-44 overflows float32: the zero must still decode to 0, the max to itself
    w = np.array([0.0, 1.7e-44], np.float32)
    np.testing.assert_array_equal(codebooks.quantize(w, codebook, blocksize=2).dequantize(), w)


def test_golden_nf4_block():
    w = np.array([2.0, -2.0, 1.0, 0.0, 0.17, -0.2], np.float32)
    qt = codebooks.quantize(w, "nf4", blocksize=8)
    # absmax 2 -> normalised [1, -1, 0.5, 0, 0.085, -0.1]; nearest NF4: 15, 0, 12 (0.4407 vs 0.5626:
    # 0.5 is closer to 0.4407), 7, 8 (0.0796), 6 (-0.0911)
    idx = codebooks.packing.unpack(qt.codes, 4, 8)[:6]
    np.testing.assert_array_equal(idx, [15, 0, 12, 7, 8, 6])
    assert qt.scales.tolist() == [2.0]


def test_dynamic_map_shape_and_hand_values():
    d = codebooks.dynamic_map()
    assert d.shape == (256,) and np.all(np.diff(d) >= 0)
    assert d[-1] == 1.0 and 0.0 in d
    # largest non-one entry: midpoint of the last two of 65 points on [0.1, 1]
    assert d[-2] == np.float32((1 + 0.1 + 0.9 * 63 / 64) / 2)
    # smallest positive entry: 10^-6 * mean(0.1, 1)
    assert d[d > 0].min() == np.float32(0.55e-6)
    assert np.sum(d < 0) == 127


def test_double_quant_costs_4_127_bits_per_weight():
    w = np.random.default_rng(0).standard_normal((1024, 4096)).astype(np.float32)
    plain = codebooks.quantize(w, "nf4")
    dq = codebooks.quantize(w, "nf4", double_quant=True)
    n = w.size
    # QLoRA §3: 4 + 32/64 = 4.5 bits; with DQ 4 + 8/64 + 32/(64*256) = 4.127 bits; plus the
    # stored codebooks (16 + 256 fp32) and the fp32 mean.
    assert plain.nbytes * 8 / n == pytest.approx(4.5 + 16 * 32 / n)
    assert dq.nbytes * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + (16 + 256 + 1) * 32 / n)
    assert round(4 + 8 / 64 + 32 / (64 * 256), 3) == 4.127
    # the absmax constants survive the second quantization to within the 8-bit map's resolution
    true, approx = plain.scales, codebooks.absmax(dq)
    assert np.max(np.abs(true - approx) / true) < 0.01
    err_plain = np.mean((plain.dequantize() - w) ** 2)
    err_dq = np.mean((dq.dequantize() - w) ** 2)
    assert err_dq < err_plain * 1.01


def test_bad_input():
    with pytest.raises(ValueError, match="codebook must be one of"):
        codebooks.quantize(np.ones(4, np.float32), "nf3")
    with pytest.raises(ValueError, match="blocksize must be a positive"):
        codebooks.quantize(np.ones(4, np.float32), blocksize=0)
    with pytest.raises(ValueError, match="w contains"):
        codebooks.quantize(np.array([np.nan], np.float32))
