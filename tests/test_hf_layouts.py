"""The GPTQ, AWQ and compressed-tensors layouts: hand-worked words read off the packers'
source (cited in refquant/hf/layouts.py), round trips, and each layout's own dequantization
against QuantizedTensor.dequantize()."""
import functools

import numpy as np
import pytest

from refquant import affine, gptq, packing
from refquant.hf import layouts
from refquant.tensor import QuantizedTensor


def hand_tensor(q, sym=True, zeros=None, scale=0.5):
    """A one-group affine tensor with the given codes (refquant's storage convention)."""
    q = np.asarray(q, np.int16)
    out, n = q.shape
    meta = dict(kind="affine", bits=4, sym=sym, full_range=False, granularity="group", axis=None, group_size=n,
                padded_shape=(out, n))
    return QuantizedTensor(packing.pack(q, 4, signed=sym), np.full((out, 1), scale, np.float16),
                           None if sym else np.asarray(zeros, np.uint8).reshape(out, 1), (out, n), "hand", meta)


def i32(word):
    return np.array(word, np.uint32).view(np.int32)


def test_gptq_words_by_hand():
    # one output, inputs 0..7 with refquant codes -7..0 -> AutoGPTQ's u = q + 8 = 1..8, packed
    # along the input dimension, input i in bits 4i: 0x87654321; z = 8 stored as 7 (v1) or 8 (v2)
    qt = hand_tensor([[-7, -6, -5, -4, -3, -2, -1, 0]])
    t = layouts.to_gptq(qt)
    np.testing.assert_array_equal(t["qweight"], [[i32(0x87654321)]])
    np.testing.assert_array_equal(t["qzeros"], [[7]])
    np.testing.assert_array_equal(t["g_idx"], np.zeros(8, np.int32))
    np.testing.assert_array_equal(layouts.to_gptq(qt, "gptq_v2")["qzeros"], [[8]])
    # qzeros run along the output dimension: outputs 0..7 with zeros 1..8 (asymmetric), v1 stores 0..7
    qa = hand_tensor(np.full((8, 8), 3), sym=False, zeros=np.arange(1, 9))
    np.testing.assert_array_equal(layouts.to_gptq(qa)["qzeros"], [[i32(0x76543210)]])
    np.testing.assert_array_equal(layouts.to_gptq(qa)["qweight"], np.full((1, 8), i32(0x33333333)))


def test_awq_words_by_hand():
    # one input, outputs 0..7 with u = 1..8: nibble k holds column [0, 2, 4, 6, 1, 3, 5, 7][k],
    # so the nibbles from low to high are 1, 3, 5, 7, 2, 4, 6, 8: 0x86427531
    qt = hand_tensor(np.arange(1, 9)[:, None], sym=False, zeros=[0, 1, 2, 3, 4, 5, 6, 7])
    t = layouts.to_awq(qt)
    np.testing.assert_array_equal(t["qweight"], [[i32(0x86427531)]])
    np.testing.assert_array_equal(t["qzeros"], [[i32(0x75316420)]])   # zeros 0..7, same order, not shifted
    assert t["scales"].shape == (1, 8) and t["scales"].dtype == np.float16


def test_compressed_tensors_words_by_hand():
    # signed codes -7..0 stored as q + 8 = 1..8 along the input dimension: 0x87654321; the
    # asymmetric zero point is packed along the output dimension (8 outputs per word)
    qt = hand_tensor([[-7, -6, -5, -4, -3, -2, -1, 0]])
    t = layouts.to_compressed(qt)
    np.testing.assert_array_equal(t["weight_packed"], [[i32(0x87654321)]])
    np.testing.assert_array_equal(t["weight_shape"], [1, 8])
    assert "weight_zero_point" not in t and "weight_g_idx" not in t
    qa = hand_tensor(np.full((8, 8), 3), sym=False, zeros=np.arange(1, 9))
    np.testing.assert_array_equal(layouts.to_compressed(qa)["weight_zero_point"], [[i32(0x87654321)]])


def _cases():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((24, 256)).astype(np.float32)
    X = rng.standard_normal((400, 256)).astype(np.float32)
    H = gptq.hessian(X)
    yield "rtn sym g64", affine.quantize(w, 4, granularity="group", group_size=64, scale_dtype=np.float16)
    yield "rtn asym g128", affine.quantize(w, 4, sym=False, granularity="group", group_size=128,
                                           scale_dtype=np.float16)
    yield "gptq sym g128", gptq.gptq_quantize(w, H, bits=4, group_size=128)[0]
    yield "gptq act-order asym g64", gptq.gptq_quantize(w, H, bits=4, group_size=64, sym=False, act_order=True)[0]
    yield "gptq int8 channel", gptq.gptq_quantize(w, H, bits=8, group_size=-1)[0]
    yield "rtn int2 g32", affine.quantize(w, 2, sym=False, granularity="group", group_size=32, scale_dtype=np.float16)


CASE_NAMES = ["rtn sym g64", "rtn asym g128", "gptq sym g128", "gptq act-order asym g64", "gptq int8 channel",
              "rtn int2 g32"]


@functools.lru_cache(maxsize=1)
def cases() -> dict:
    """Built on first use, not at import (GPTQ compiles with numba; collection must not need it)."""
    return dict(_cases())


def same(a, b):
    assert a.kind == b.kind and a.shape == b.shape
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)
    assert (a.zeros is None) == (b.zeros is None) and (a.zeros is None or np.array_equal(a.zeros, b.zeros))
    assert a.meta.get("g_idx") is None or np.array_equal(a.meta["g_idx"], b.meta["g_idx"])
    np.testing.assert_array_equal(a.dequantize(), b.dequantize())


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("fmt", layouts.GPTQ_FORMATS)
def test_gptq_round_trip_and_definition(name, fmt):
    qt = cases()[name]
    bits, sym = qt.meta["bits"], qt.meta["sym"]
    t = layouts.to_gptq(qt, fmt)
    back = layouts.from_gptq(t, bits, sym=sym, checkpoint_format=fmt)
    np.testing.assert_array_equal(back.dequantize(), layouts.dequantize_gptq(t, bits, fmt))
    if not sym and fmt == "gptq" and np.any(qt.zeros == 0):
        # v1 cannot hold z = 0 (stored as -1, read back as 2^b): those groups decode shifted
        bad = np.repeat(qt.zeros == 0, qt.shape[1] // qt.zeros.shape[1], axis=1)
        s = np.repeat(qt.scales.astype(np.float32), qt.shape[1] // qt.scales.shape[1], axis=1)
        np.testing.assert_array_equal(back.dequantize()[~bad], qt.dequantize()[~bad])
        np.testing.assert_array_equal(back.dequantize()[bad], (qt.dequantize() - s * (1 << bits))[bad])
        return
    np.testing.assert_array_equal(layouts.dequantize_gptq(t, bits, fmt), qt.dequantize())
    same(back, qt)


@pytest.mark.parametrize("name", ["rtn sym g64", "rtn asym g128", "gptq sym g128"])
def test_awq_round_trip_and_definition(name):
    qt = cases()[name]
    t = layouts.to_awq(qt)
    gs = qt.meta["group_size"]
    np.testing.assert_array_equal(layouts.dequantize_awq(t, gs), qt.dequantize())
    back = layouts.from_awq(t, gs)
    np.testing.assert_array_equal(back.dequantize(), qt.dequantize())   # AWQ is asymmetric: z = 8 when sym
    assert back.meta["sym"] is False


@pytest.mark.parametrize("name", CASE_NAMES)
def test_compressed_round_trip_and_definition(name):
    qt = cases()[name]
    bits, sym = qt.meta["bits"], qt.meta["sym"]
    t = layouts.to_compressed(qt)
    np.testing.assert_array_equal(layouts.dequantize_compressed(t, bits, sym), qt.dequantize())
    same(layouts.from_compressed(t, bits, sym=sym), qt)


def test_v1_zero_point_off_by_one():
    """An asymmetric zero point of 0 is stored as -1 & 0xF = 15 by v1 and reads back as 16."""
    qa = hand_tensor(np.full((8, 8), 3), sym=False, zeros=np.zeros(8))
    t = layouts.to_gptq(qa, "gptq")
    np.testing.assert_array_equal(t["qzeros"], [[-1]])   # all nibbles 0xF
    assert np.all(layouts.dequantize_gptq(t, 4, "gptq") == np.float16(0.5).astype(np.float32) * (3 - 16))
    assert np.all(layouts.dequantize_gptq(layouts.to_gptq(qa, "gptq_v2"), 4, "gptq_v2") == 0.5 * 3)


def test_bad_input_is_named():
    qt = cases()["gptq sym g128"]
    t = layouts.to_gptq(qt)
    with pytest.raises(ValueError, match="GPTQ tensors disagree"):
        layouts.from_gptq(dict(t, g_idx=t["g_idx"][:-8]))
    with pytest.raises(ValueError, match="checkpoint_format"):
        layouts.to_gptq(qt, "gptq_v3")
    with pytest.raises(ValueError, match="AWQ tensors disagree"):
        layouts.from_awq(layouts.to_awq(qt), group_size=64)
    with pytest.raises(ValueError, match="qweight must be int32"):
        layouts.from_awq(dict(layouts.to_awq(qt), qweight=np.zeros((256, 3), np.int64)), group_size=128)
    with pytest.raises(ValueError, match="needs weight_zero_point"):
        layouts.from_compressed(layouts.to_compressed(qt), sym=False)
    with pytest.raises(ValueError, match="AWQ has no act-order"):
        layouts.to_awq(cases()["gptq act-order asym g64"])
    with pytest.raises(ValueError, match="4-bit"):
        layouts.to_awq(cases()["gptq int8 channel"])
    with pytest.raises(ValueError, match="compressed-tensors tensors disagree"):
        layouts.from_compressed(dict(layouts.to_compressed(qt), weight_shape=np.array([25, 256], np.int32)))
    with pytest.raises(ValueError, match="fp16 scales"):
        layouts.to_gptq(affine.quantize(np.ones((2, 64), np.float32), 4, granularity="group", group_size=32))
    with pytest.raises(ValueError, match="int-packed layout"):
        layouts.to_gptq(affine.quantize(np.ones((2, 64), np.float32), 8, scale_dtype=np.float16))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_short_last_group_reads_with_its_group_size(act_order, sym):
    """AutoGPTQ gives a row of n inputs ceil(n / g) groups, the last one short: 96 inputs at
    g 64 are groups of 64 and 32 (SmolLM2's 576 at g 128: 4 x 128 + 64). The tensor reads
    with group size 64 (not 96 // 2 = 48), decodes by GPTQ's own definition, writes back the
    same words, and the layouts whose readers assume whole groups refuse it. Without
    act-order it is Q4_0 (symmetric) or Q4_1 (zero points) block for block; with act-order
    GGUF has no form for it."""
    from refquant.gguf import quants
    from refquant.gguf.tensors import as_ggml

    rng = np.random.default_rng(3)
    out, n, g = 16, 96, 64
    g_idx = np.arange(n, dtype=np.int32) // g
    if act_order:
        g_idx = g_idx[rng.permutation(n)]
    zeros = np.full((2, out), 7) if sym else rng.integers(1, 15, (2, out))   # v1 stores z - 1
    t = dict(qweight=packing.pack_int32(rng.integers(0, 16, (n, out)), 4, axis=0),
             qzeros=packing.pack_int32(zeros, 4, axis=1),
             scales=rng.uniform(0.01, 0.1, (2, out)).astype(np.float16), g_idx=g_idx)
    qt = layouts.from_gptq(t, 4, sym=sym)
    assert qt.meta["group_size"] == 64 and qt.kind == "gptq"
    np.testing.assert_array_equal(qt.dequantize(), layouts.dequantize_gptq(t, 4))
    back = layouts.to_gptq(qt)
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])
    with pytest.raises(ValueError, match="does not divide 96 inputs|no act-order"):
        layouts.to_awq(qt)
    with pytest.raises(ValueError, match="does not divide 96 inputs"):
        layouts.to_compressed(qt)
    if act_order:
        with pytest.raises(ValueError, match="act-order"):
            as_ggml(qt)
        return
    raw, t_name, m_err = as_ggml(qt)
    assert t_name == ("Q4_0" if sym else "Q4_1")
    got, want = quants.dequantize(raw, t_name, qt.shape), layouts.dequantize_gptq(t, 4)
    if sym:
        np.testing.assert_array_equal(got, want)
    else:   # m = fp16(-z·s): within m's rounding plus the float32 rounding of the sum
        assert np.abs(got - want).max() <= m_err + 4 * np.finfo(np.float32).eps * np.abs(want).max()
        assert m_err < 1e-3


def test_gptq_scales_of_groups_g_idx_does_not_use_are_refused():
    rng = np.random.default_rng(4)
    t = dict(qweight=packing.pack_int32(rng.integers(0, 16, (128, 8)), 4, axis=0),
             qzeros=packing.pack_int32(np.full((5, 8), 7), 4, axis=1),
             scales=np.ones((5, 8), np.float16), g_idx=np.arange(128, dtype=np.int32) // 32)
    with pytest.raises(ValueError, match="GPTQ tensors disagree"):
        layouts.from_gptq(t, 4)
