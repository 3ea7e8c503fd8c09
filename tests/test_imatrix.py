"""Importance matrices: ggml's quantizers with ``quant_weights`` against bytes written by
ggml's C (llama.cpp 0c1e570), and what an importance vector may be."""
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from refquant.gguf import quants

GOLDEN = np.load(Path(__file__).parent / "data" / "ggml_golden_imatrix.npz")
FAMILIES = sorted(k[2:] for k in GOLDEN.files if k.startswith("x/"))
GOLDEN_TYPES = sorted({k.split("/")[0] for k in GOLDEN.files} - {"x", "qw"})
# the types whose quantizer weighs by an importance matrix (the registry's ``weighted`` row)
WEIGHTED = sorted(n for n, f in quants.FORMATS.items() if f.weighted is not None)


def test_every_weighted_type_has_golden_bytes_from_ggml_c():
    """A type given a weighted quantizer without golden bytes would never meet ggml's C;
    Q8_0, whose ggml quantizer ignores the weights, is in the golden set as such."""
    assert set(GOLDEN_TYPES) == set(WEIGHTED) | {"Q8_0"}
    assert len(WEIGHTED) == 11 and len(FAMILIES) == 8


@pytest.mark.parametrize("name", GOLDEN_TYPES)
def test_quantize_with_an_imatrix_matches_ggml_c(name):
    """``quantize(x, type, imatrix=w)`` writes the bytes of ggml's ``quantize_<type>(x, …, w)``
    on rows with zeros, ties, outliers, overflowing sums and subnormals, against importance
    vectors with zero columns, one dominant column and all-equal ones."""
    checked = 0
    for family in FAMILIES:
        key = f"{name}/{family}"
        if key not in GOLDEN.files:     # 576-wide rows: the 32-block types only
            assert quants.TYPES[name].block_size == 256
            continue
        with np.errstate(all="ignore"):
            ours = quants.quantize(GOLDEN[f"x/{family}"], name, imatrix=GOLDEN[f"qw/{family}"])
        bad = np.argwhere(ours != GOLDEN[key])
        assert bad.size == 0, f"{key}: {len(bad)} bytes differ, first at (row, byte) {tuple(bad[0])}"
        checked += 1
    assert checked >= 7


def test_the_imatrix_changes_the_bytes_where_ggml_uses_it():
    """The golden bytes with an importance matrix differ from those without for every type
    that uses it (so the test above could not pass on the plain quantizer), and equal them
    for Q8_0."""
    x, qw = GOLDEN["x/normal"], GOLDEN["qw/normal"]
    for name in GOLDEN_TYPES:
        plain = quants.quantize(x, name)
        assert np.array_equal(plain, GOLDEN[f"{name}/normal"]) == (name == "Q8_0"), name


@pytest.mark.parametrize("name", WEIGHTED)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_scaling_the_imatrix_by_a_power_of_two_keeps_the_bytes(name, data):
    """Every search compares ratios of sums that are linear in the weights (Σwxl/Σwl²,
    (Σwxl)² > best·Σwl², weighted errors against each other), and a power of two scales a
    float32 exactly: ggml's choice cannot move (a metamorphic check of the weighting)."""
    t = quants.TYPES[name]
    rows = data.draw(st.integers(1, 3))
    n = t.block_size * data.draw(st.integers(1, 2 if t.block_size == 256 else 4))
    x = data.draw(hnp.arrays(np.float32, (rows, n), elements=st.floats(-4, 4, width=32)))
    qw = data.draw(hnp.arrays(np.float32, n, elements=st.one_of(st.just(0.0), st.floats(2.0 ** -10, 8, width=32))))
    k = data.draw(st.integers(-6, 6))
    a = quants.quantize(x, name, imatrix=qw)
    b = quants.quantize(x, name, imatrix=qw * np.float32(2.0 ** k))
    np.testing.assert_array_equal(a, b)


def test_q8_0_and_the_float_types_ignore_an_imatrix_as_ggml_does():
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    qw = np.arange(64, dtype=np.float32)
    for name in ("Q8_0", "F16", "BF16", "F32"):
        np.testing.assert_array_equal(quants.quantize(x, name, imatrix=qw), quants.quantize(x, name))


@pytest.mark.parametrize("bad, exc, match", [
    (np.ones(63, np.float32), ValueError, "one importance per column"),
    (np.ones((2, 64), np.float32), ValueError, "one importance per column"),
    (np.array([np.nan] + [1.0] * 63, np.float32), ValueError, "NaN, Inf or negative"),
    (np.array([np.inf] + [1.0] * 63, np.float32), ValueError, "NaN, Inf or negative"),
    (np.array([-1.0] + [1.0] * 63, np.float32), ValueError, "NaN, Inf or negative"),
    (np.array(["a"] * 64), TypeError, "float array"),
])
def test_quantize_rejects_a_bad_imatrix(bad, exc, match):
    x = np.ones((2, 64), np.float32)
    with pytest.raises(exc, match=match):
        quants.quantize(x, "Q4_K" if x.shape[1] % 256 == 0 else "Q4_0", imatrix=bad)


def test_no_compiled_weighted_quantizer_is_claimed():
    """``impl="numba"`` with an importance matrix names the missing kernel rather than
    silently running the NumPy reference."""
    with pytest.raises(ValueError, match="no compiled quantizer for Q4_0 with an importance matrix"):
        quants.quantize(np.ones((1, 32), np.float32), "Q4_0", imatrix=np.ones(32, np.float32), impl="numba")
