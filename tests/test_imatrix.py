"""Importance matrices: ggml's quantizers with ``quant_weights`` against bytes written by
ggml's C (llama.cpp 0c1e570), and what an importance vector may be."""
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from refquant.gguf import quants
from tests.strategies import weight_rows

pytestmark = pytest.mark.oracle   # ggml's C (golden bytes), llama.cpp's files and gguf-py are the oracles

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
        for impl in ("numpy", "numba"):
            with np.errstate(all="ignore"):
                ours = quants.quantize(GOLDEN[f"x/{family}"], name, imatrix=GOLDEN[f"qw/{family}"], impl=impl)
            bad = np.argwhere(ours != GOLDEN[key])
            assert bad.size == 0, f"{key} ({impl}): {len(bad)} bytes differ, first at (row, byte) {tuple(bad[0])}"
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
@settings(max_examples=10, deadline=None)
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


def test_every_weighted_type_has_a_compiled_kernel():
    from refquant.gguf.quants import compiled

    assert sorted(compiled.WEIGHTED) == WEIGHTED


@pytest.mark.slow   # the default tier holds both paths to ggml's golden bytes; this is the wider sweep
@pytest.mark.parametrize("name", WEIGHTED)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_compiled_weighted_quantizer_writes_the_reference_bytes(name, data):
    """The numba kernel under an importance matrix against the NumPy reference, on the rows
    that hit the searches' branches (subnormals, overflowing scales, zeros, ties) and
    importances with zeros, huge and tiny columns, with 1 and 2 threads."""
    from refquant.gguf.quants import compiled

    t = quants.TYPES[name]
    x = data.draw(weight_rows(t.block_size, max_blocks=2))
    n = x.shape[-1]
    qw = data.draw(hnp.arrays(np.float32, n, elements=st.one_of(
        st.just(0.0), st.floats(2.0 ** -100, 2.0 ** 100, width=32), st.floats(0, 8, width=32))))
    want = quants.quantize(x, name, imatrix=qw, impl="numpy")
    saved = compiled._MIN_CHUNK
    compiled._MIN_CHUNK = t.block_size
    try:
        for threads in (1, 2):
            np.testing.assert_array_equal(quants.quantize(x, name, imatrix=qw, impl="numba", threads=threads), want)
    finally:
        compiled._MIN_CHUNK = saved


# ----------------------------------------------------------------------------- the files
# Both written by llama-imatrix (llama.cpp 0c1e570) on minigpt_np/checkpoints/minigpt.gguf:
#   llama-imatrix -m minigpt.gguf -f text.txt -c 128 --chunks 4 -t 2 -o minigpt_imatrix.gguf
#   (the same with --output-format dat -o minigpt_imatrix.dat); text.txt: tests/data/imatrix_text.txt
#   (the first five topics of pydoc_data.topics, keys sorted, cut at 20000 characters). It printed
#   the chunks' perplexities [1]236.5865,[2]459.5970,[3]448.2127,[4]826.8482.
DATA = Path(__file__).parent / "data"
LLAMA_GGUF, LLAMA_DAT = DATA / "minigpt_imatrix.gguf", DATA / "minigpt_imatrix.dat"


def test_reads_both_of_llama_imatrix_formats_to_the_same_weights():
    """The GGUF (Σx² and counts) and the legacy file ((Σx²/count)·ncall) of one llama-imatrix
    run give llama-quantize's quant_weights, the same floats; gguf-py reads the same sums."""
    from refquant.gguf import imatrix
    from tests.conftest import gguf_py

    a, b = imatrix.read(LLAMA_GGUF), imatrix.read(LLAMA_DAT)
    assert not a.legacy and b.legacy
    assert sorted(a.sums) == sorted(b.sums) and len(a) == 16      # MiniGPT: 4 layers x (qkv, out, up, down)
    assert (a.datasets, a.chunk_count, a.chunk_size) == (["text.txt"], 4, 128)
    assert (b.datasets, b.chunk_count) == (["text.txt"], 4)
    reader = gguf_py().GGUFReader(LLAMA_GGUF)
    theirs = {t.name: np.asarray(t.data, np.float32).reshape(-1) for t in reader.tensors}
    for name in a.sums:
        assert a.sums[name].shape == (1, 1024 if "ffn_down" in name else 256)
        np.testing.assert_array_equal(a.sums[name].reshape(-1), theirs[name + ".in_sum2"])
        assert a.counts[name].tolist() == [int(theirs[name + ".counts"][0])] == [512]   # 4 chunks of 128
        np.testing.assert_array_equal(a.weights(name), a.sums[name] / np.float32(512))
        np.testing.assert_array_equal(a.weights(name), b.weights(name))


def test_writes_llama_imatrix_files_byte_for_byte(tmp_path):
    """Read back and written again, both of llama-imatrix's files come out byte-identical
    (the legacy file's (Σx²/count)·ncall recomputed from the GGUF's sums and counts)."""
    from refquant.gguf import imatrix

    m = imatrix.read(LLAMA_GGUF)
    assert imatrix.write(tmp_path / "a.gguf", m).read_bytes() == LLAMA_GGUF.read_bytes()
    assert imatrix.write_dat(tmp_path / "a.dat", m).read_bytes() == LLAMA_DAT.read_bytes()


def test_partial_entries_and_several_matrices_round_trip(tmp_path):
    """A 3-D (expert) entry keeps one count per matrix; a count of 0 gives importance 1
    (GGUF) as llama-quantize fills it; the legacy file stores such a matrix as ncall."""
    from refquant.gguf import imatrix

    m = imatrix.IMatrix({"blk.0.ffn_down_exps.weight": np.array([[2, 4], [6, 8], [1, 1]], np.float32)},
                        {"blk.0.ffn_down_exps.weight": np.array([2, 4, 0])}, ["d.txt"], 1, 4)
    want = np.array([[1, 2], [1.5, 2], [1, 1]], np.float32)
    np.testing.assert_array_equal(m.weights("blk.0.ffn_down_exps.weight"), want)
    g = imatrix.read(imatrix.write(tmp_path / "m.gguf", m))
    np.testing.assert_array_equal(g.weights("blk.0.ffn_down_exps.weight"), want)
    d = imatrix.read(imatrix.write_dat(tmp_path / "m.dat", m))
    assert d.counts["blk.0.ffn_down_exps.weight"].tolist() == [1]       # ceil(4 / chunk_size 4)
    np.testing.assert_array_equal(d.weights("blk.0.ffn_down_exps.weight").reshape(3, 2), want)
    assert m.check("blk.0.ffn_down_exps.weight", 2, 3).shape == (3, 2)
    with pytest.raises(ValueError, match="blk.0.ffn_down_exps.weight.*different"):
        m.check("blk.0.ffn_down_exps.weight", 4, 2)


def test_bad_imatrix_files_are_refused_naming_what_is_wrong(tmp_path):
    from refquant.gguf import GGUFError, imatrix

    with pytest.raises(GGUFError, match="not an importance matrix"):
        imatrix.read(Path(__file__).parent.parent / "minigpt_np" / "checkpoints" / "minigpt.gguf")
    data = LLAMA_DAT.read_bytes()
    for cut in (0, 2, 6, 9, 40, len(data) // 2):
        (tmp_path / "t.dat").write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="truncated|no data"):
            imatrix.read(tmp_path / "t.dat")
    (tmp_path / "n.dat").write_bytes(np.int32(1).tobytes() + np.int32(-5).tobytes())
    with pytest.raises(GGUFError, match="name length -5"):
        imatrix.read(tmp_path / "n.dat")
    from refquant.gguf import write
    write(tmp_path / "half.gguf", {"general.type": "imatrix", "imatrix.datasets": ["x"],
                                   "imatrix.chunk_count": np.uint32(1), "imatrix.chunk_size": np.uint32(1)},
          {"a.in_sum2": np.ones(4, np.float32)})
    with pytest.raises(GGUFError, match="mismatched sums and counts for 'a'"):
        imatrix.read(tmp_path / "half.gguf")


# ----------------------------------------------------------------------------- collecting one
LLAMA_PPL = [236.5865, 459.5970, 448.2127, 826.8482]


def test_collected_imatrix_agrees_with_llama_imatrix_on_minigpt(tmp_path, capsys):
    """``python -m minigpt_np.imatrix`` on the text and chunks llama-imatrix was given: the same
    entries and counts, sums within float32 reassociation of llama.cpp's kernels (its
    activations are ggml's, ours NumPy's), the same per-chunk perplexities."""
    from minigpt_np.imatrix import main
    from refquant.gguf import imatrix

    out = tmp_path / "ours.gguf"
    assert main([str(MINIGPT), "--text", str(DATA / "imatrix_text.txt"), "-c", "128", "--chunks", "4",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().err
    ppl = [float(v) for v in __import__("re").findall(r"\[\d+\]([\d.]+),", printed)]
    np.testing.assert_allclose(ppl, LLAMA_PPL, rtol=1e-3)
    ours, theirs = imatrix.read(out), imatrix.read(LLAMA_GGUF)
    assert sorted(ours.sums) == sorted(theirs.sums) and (ours.chunk_count, ours.chunk_size) == (4, 128)
    for name in theirs.sums:
        assert ours.counts[name].tolist() == theirs.counts[name].tolist() == [512]
        np.testing.assert_allclose(ours.sums[name], theirs.sums[name], rtol=5e-3, atol=0, err_msg=name)


MINIGPT = Path(__file__).resolve().parents[1] / "minigpt_np" / "checkpoints" / "minigpt.gguf"


def _two_layer_llama(path, tied: bool):
    """A 2-layer llama GGUF whose vocabulary adds BOS (token 0, an embedding unlike the others)."""
    from refquant import gguf

    rng = np.random.default_rng(5)
    d, kv, ff, vocab = 32, 16, 48, 20
    shapes = {"attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, d), "ffn_gate": (ff, d),
              "ffn_up": (ff, d), "ffn_down": (d, ff)}
    t = {f"blk.{i}.{k}.weight": (0.3 * rng.standard_normal(s)).astype(np.float32)
         for i in range(2) for k, s in shapes.items()}
    for i in range(2):
        t[f"blk.{i}.attn_norm.weight"] = np.ones(d, np.float32)
        t[f"blk.{i}.ffn_norm.weight"] = np.ones(d, np.float32)
    emb = rng.standard_normal((vocab, d)).astype(np.float32)
    emb[0] = 10 * np.arange(d) / d          # BOS
    t["token_embd.weight"], t["output_norm.weight"] = emb, np.ones(d, np.float32)
    if not tied:
        t["output.weight"] = rng.standard_normal((vocab, d)).astype(np.float32)
    meta = {"general.architecture": "llama", "llama.block_count": np.uint32(2), "llama.embedding_length": np.uint32(d),
            "llama.feed_forward_length": np.uint32(ff), "llama.attention.head_count": np.uint32(4),
            "llama.attention.head_count_kv": np.uint32(2), "llama.context_length": np.uint32(64),
            "llama.attention.layer_norm_rms_epsilon": np.float32(1e-5),
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": ["<s>"] + [chr(ord("a") + i) for i in range(vocab - 1)],
            "tokenizer.ggml.token_type": np.ones(vocab, np.int32), "tokenizer.ggml.merges": [],
            "tokenizer.ggml.bos_token_id": np.uint32(0), "tokenizer.ggml.add_bos_token": True}
    gguf.write(path, meta, t)
    return t


@pytest.mark.parametrize("tied", [False, True])
def test_imatrix_of_a_two_layer_model_by_hand(tmp_path, tied):
    """llama-imatrix's definition, computed by hand for the first products: chunks of n_ctx
    tokens (the tail that does not fill one dropped, --chunks caps them), each chunk's first
    token replaced by BOS, q/k/v of layer 0 fed RMSNorm(embedding) so their Σx² per column
    follows from the embedding table alone; one count of tokens per weight; the output only
    with --process-output and an untied head."""
    from minigpt_np.gguf_model import open_model
    from minigpt_np.imatrix import collect

    t = _two_layer_llama(tmp_path / "m.gguf", tied)
    model = open_model(tmp_path / "m.gguf")
    assert model.bos == 0
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 20, 16 * 3 + 5)
    for chunks, want_chunks in ((None, 3), (2, 2)):
        im, ppl = collect(model, tokens, 16, chunks, process_output=True, progress=False)
        assert im.chunk_count == want_chunks and len(ppl) == want_chunks
        want = np.zeros(32)
        for c in range(want_chunks):
            ids = tokens[16 * c:16 * (c + 1)].copy()
            ids[0] = 0
            e = t["token_embd.weight"][ids].astype(np.float64)
            x = e / np.sqrt((e * e).mean(axis=1, keepdims=True) + 1e-5)
            want += (x * x).sum(axis=0)
        for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
            np.testing.assert_allclose(im.sums[name][0], want, rtol=1e-5)
        expected = {f"blk.{i}.{k}.weight" for i in range(2) for k in
                    ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
        assert set(im.sums) == expected | (set() if tied else {"output.weight"})
        assert all(c.tolist() == [16 * want_chunks] for c in im.counts.values())
        assert im.sums["blk.1.ffn_down.weight"].shape == (1, 48)
    with pytest.raises(ValueError, match="at least 32 tokens"):
        collect(model, tokens[:31], 16, progress=False)


# ----------------------------------------------------------------------------- judging a mix
def test_kld_tool_prints_llama_perplexity_statistics(tmp_path, capsys):
    """``python -m minigpt_np.kld``: the base against itself is 0 with the same top token
    everywhere; a Q4_K_M of it moves, by what refquant.metrics computes on the second halves
    of llama-perplexity's chunks (hand check of the chunking: 2 chunks of 128 score 2 x 63);
    the saved base gives the same figures."""
    from minigpt_np import kld
    from refquant.__main__ import main as refquant_main

    text = str(DATA / "imatrix_text.txt")
    assert kld.main(["--base", str(MINIGPT), "--model", str(MINIGPT), "--text", text, "--chunks", "2"]) == 0
    out = capsys.readouterr().out
    assert "Mean    KLD:   0.000000 ± 0.000000" in out and "Same top p: 100.000 ± 0.000 %" in out
    assert "(126 positions)" in out
    q = tmp_path / "q.gguf"
    assert refquant_main(["quantize", str(MINIGPT), str(q), "--ftype", "Q4_K_M"]) == 0
    capsys.readouterr()
    assert kld.main(["--base", str(MINIGPT), "--model", str(q), "--text", text, "--chunks", "2",
                     "--save-base", str(tmp_path / "b.npz")]) == 0
    first = capsys.readouterr().out
    assert kld.main(["--base", str(tmp_path / "b.npz"), "--model", str(q)]) == 0
    again = capsys.readouterr().out
    tail = lambda s: s[s.index("====== Perplexity"):]   # noqa: E731
    assert tail(first) == tail(again)
    mean = float(__import__("re").search(r"Mean    KLD:\s+([\d.]+)", first).group(1))
    assert 1e-4 < mean < 0.1
    assert kld.main(["--base", str(MINIGPT), "--model", str(q), "--text", text, "-c", "4096"]) == 2
