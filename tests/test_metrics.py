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


# --- KL divergence statistics (llama-perplexity --kl-divergence) ---------------------------

def test_kl_statistics_by_hand():
    """Reference uniform over two tokens, Q = (3/4, 1/4) at three positions:
    KL = ½ ln(½/¾) + ½ ln(½/¼) = ½ ln(4/3); text tokens 0, 1, 0 give Δp = +¼, -¼, +¼,
    nll_Q = ln(4/3), ln 4, ln(4/3) so PPL(Q) = (4/3 · 4 · 4/3)^(1/3) = (64/9)^(1/3), PPL(ref) = 2."""
    ref = np.zeros((3, 2))
    q = np.tile([np.log(3.0), 0.0], (3, 1))
    s = metrics.kl_divergence(ref, q, np.array([0, 1, 0]))
    assert s["kld"]["mean"] == pytest.approx(0.5 * np.log(4 / 3), rel=1e-12)
    assert s["kld"]["se"] == 0 and s["kld"]["max"] == pytest.approx(s["kld"]["min"], rel=1e-12)
    assert s["delta_p"]["mean"] == pytest.approx(1 / 12) and s["delta_p"]["rms"] == pytest.approx(0.25)
    assert s["delta_p"]["min"] == pytest.approx(-0.25) and s["delta_p"]["max"] == pytest.approx(0.25)
    assert s["ppl"]["mean"] == pytest.approx((64 / 9) ** (1 / 3)) and s["ppl_ref"]["mean"] == pytest.approx(2)
    assert s["ln_ppl_ratio"]["mean"] == pytest.approx(np.log((64 / 9) ** (1 / 3) / 2))
    # without text tokens, Δp is the reference's top token's (token 0: +¼ everywhere)
    s = metrics.kl_divergence(ref, q)
    assert s["delta_p"]["mean"] == pytest.approx(0.25) and "ppl" not in s


def _naive_kl(ref, q, tokens):
    """Per position with math.exp, as llama.cpp's loops do, and its statistics by hand."""
    import math

    kl, same, dp = [], 0, []
    for r_row, q_row, t in zip(ref, q, tokens):
        zr = [math.exp(v - max(r_row)) for v in r_row]
        zq = [math.exp(v - max(q_row)) for v in q_row]
        P = [v / sum(zr) for v in zr]
        Q = [v / sum(zq) for v in zq]
        kl.append(sum(p * math.log(p / qq) for p, qq in zip(P, Q)))
        same += int(max(range(len(P)), key=P.__getitem__) == max(range(len(Q)), key=Q.__getitem__))
        dp.append(Q[t] - P[t])
    n = len(kl)

    def mean_se(v):
        m = sum(v) / n
        var = sum(x * x for x in v) / n - m * m
        return m, math.sqrt(var / (n - 1))

    def percentile(v, frac):        # llama.cpp: rank frac·(N-1), linear between neighbours
        v = sorted(v)
        pos = frac * (n - 1)
        i = int(pos)
        return (1 - (pos - i)) * v[i] + (pos - i) * v[min(i + 1, n - 1)]
    return dict(kl=mean_se(kl), kl99=percentile(kl, 0.99), kl90=percentile(kl, 0.90), kl_max=max(kl),
                same=same / n, dp=mean_se(dp), dp_rms=math.sqrt(sum(x * x for x in dp) / n),
                dp5=percentile(dp, 0.05))


def test_kl_statistics_equal_a_naive_loop(rng):
    ref = rng.standard_normal((60, 9)) * 3
    q = ref + rng.standard_normal((60, 9)) * 0.7
    tokens = rng.integers(0, 9, 60)
    s, want = metrics.kl_divergence(ref, q, tokens), _naive_kl(ref, q, tokens)
    assert (s["kld"]["mean"], s["kld"]["se"]) == pytest.approx(want["kl"], rel=1e-9)
    assert s["kld"]["p99"] == pytest.approx(want["kl99"], rel=1e-9)
    assert s["kld"]["p90"] == pytest.approx(want["kl90"], rel=1e-9)
    assert s["kld"]["max"] == pytest.approx(want["kl_max"], rel=1e-9)
    assert s["same_top"]["mean"] == want["same"] and 0 < want["same"] < 1
    assert (s["delta_p"]["mean"], s["delta_p"]["se"]) == pytest.approx(want["dp"], rel=1e-9)
    assert s["delta_p"]["rms"] == pytest.approx(want["dp_rms"], rel=1e-9)
    assert s["delta_p"]["p5"] == pytest.approx(want["dp5"], rel=1e-9)
    nll = [-metrics.log_softmax(row)[t] for row, t in ((q[i], tokens[i]) for i in range(60))]
    nll_ref = [-metrics.log_softmax(row)[t] for row, t in ((ref[i], tokens[i]) for i in range(60))]
    assert s["cor_nll"] == pytest.approx(np.corrcoef(nll, nll_ref)[0, 1], rel=1e-9)
    assert s["ppl"]["mean"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-12)


def test_kl_is_stable_and_zero_for_the_same_model(rng):
    big = rng.standard_normal((20, 50)) * 1e4        # exp would overflow without the max shift
    s = metrics.kl_divergence(big, big.astype(np.float32).astype(np.float64), rng.integers(0, 50, 20))
    assert np.isfinite(s["kld"]["mean"]) and s["same_top"]["mean"] == 1.0
    same = metrics.kl_divergence(big, big)
    assert same["kld"]["max"] == 0 and same["delta_p"]["rms"] == 0 and same["same_top"]["se"] == 0


def test_kl_bad_input():
    a = np.zeros((4, 3))
    with pytest.raises(ValueError, match="same shape"):
        metrics.kl_divergence(a, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.kl_divergence(a, np.where(np.eye(4, 3) > 0, np.nan, 0.0))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        metrics.kl_divergence(a, a, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer ids"):
        metrics.kl_divergence(a, a, np.zeros(4))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.kl_divergence(a[:1], a[:1])
