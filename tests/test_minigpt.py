"""MiniGPT: gradients vs finite differences, KV cache, generation, corpus rules, training
smoke run, checkpoint round trip and the committed checkpoint's recorded metrics."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minigpt_np import checkpoint, corpus
from minigpt_np import train as tr
from minigpt_np.model import (
    Config, Linears, attention, decode_step, forward, gelu, generate, init_params, layer_norm, quantize_sequential,
)

# --------------------------------------------------------------------- gradient checks


def directional_check(f, x, grad, rng, h=1e-6):
    """Central difference of f along a random direction vs <grad, direction>, float64."""
    u = rng.standard_normal(x.shape)
    x0 = x.copy()
    x[...] = x0 + h * u
    fp = f()
    x[...] = x0 - h * u
    fm = f()
    x[...] = x0
    num, ana = (fp - fm) / (2 * h), float((grad * u).sum())
    # relative 1e-6, plus the difference quotient's own round-off (~eps |f| / h)
    assert abs(num - ana) <= 1e-6 * max(abs(num), abs(ana)) + 1e-9 * max(1.0, abs(fp)), (num, ana)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.sampled_from([2, 4, 6]))


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_layer_norm_backward(shape, seed):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal(shape), rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    dy = rng.standard_normal(shape)
    grads = {"ln.weight": np.zeros_like(w), "ln.bias": np.zeros_like(b)}
    cache = []
    layer_norm(x, w, b, 1e-5, cache)
    dx = tr.layer_norm_bwd(dy, cache[0], grads, "ln")
    f = lambda: float((layer_norm(x, w, b, 1e-5) * dy).sum())  # noqa: E731
    directional_check(f, x, dx, rng)
    directional_check(f, w, grads["ln.weight"], rng)
    directional_check(f, b, grads["ln.bias"], rng)


@given(shape=shapes, out=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_linear_and_gelu_backward(shape, out, seed):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal(shape), rng.standard_normal((out, shape[-1])), rng.standard_normal(out)
    dy = rng.standard_normal(shape[:-1] + (out,))
    grads = {"l.weight": np.zeros_like(w), "l.bias": np.zeros_like(b)}
    dx = tr.linear_bwd(dy, x, w, grads, "l")
    f = lambda: float(((x @ w.T + b) * dy).sum())  # noqa: E731
    for arr, g in ((x, dx), (w, grads["l.weight"]), (b, grads["l.bias"])):
        directional_check(f, arr, g, rng)
    dy2 = rng.standard_normal(shape)
    cache = []
    gelu(x, cache)
    dg = tr.gelu_bwd(dy2, cache[0])
    directional_check(lambda: float((gelu(x) * dy2).sum()), x, dg, rng)


@given(B=st.integers(1, 2), T=st.integers(1, 5), heads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_attention_and_cross_entropy_backward(B, T, heads, seed):
    rng = np.random.default_rng(seed)
    d = 2 * heads
    qkv = rng.standard_normal((B, T, 3 * d))
    do = rng.standard_normal((B, T, d))
    mask = np.triu(np.full((T, T), -np.inf), k=1)

    def fused_attention(cache=None):   # model.forward's use: fused qkv -> heads -> attention -> merged
        q, k, v = qkv.reshape(B, T, 3, heads, 2).transpose(2, 0, 3, 1, 4)
        return attention(q, k, v, mask, cache).transpose(0, 2, 1, 3).reshape(B, T, d)

    cache = []
    fused_attention(cache)
    dqkv = tr.attention_bwd(do, cache[0])
    directional_check(lambda: float((fused_attention() * do).sum()), qkv, dqkv, rng)
    logits, targets = rng.standard_normal((B, T, 7)), rng.integers(0, 7, (B, T))
    dl = tr.cross_entropy_bwd(tr.cross_entropy_fwd(logits, targets)[1])
    directional_check(lambda: tr.cross_entropy_fwd(logits, targets)[0], logits, dl, rng)


def test_whole_model_backward_including_embeddings():
    cfg = Config(n_layer=2, d_model=8, n_head=2, n_ctx=6, vocab=11)
    rng = np.random.default_rng(0)
    params = {k: v.astype(np.float64) + rng.normal(0, 0.1, v.shape) for k, v in init_params(cfg, 1).items()}
    x, y = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    loss, grads = tr.loss_and_grads(params, cfg, x, y)
    for name in params:  # every parameter, embeddings (tied output) and positions included
        directional_check(lambda: tr.loss_and_grads(params, cfg, x, y)[0], params[name], grads[name], rng)
    logits, _ = forward(params, x, cfg=cfg)
    from minigpt_np.model import log_softmax
    ref = -np.take_along_axis(log_softmax(logits.astype(np.float64)), y[..., None], -1).mean()
    assert abs(loss - ref) < 1e-6


# --------------------------------------------------------------------- model behaviour

def tiny():
    cfg = Config(n_layer=2, d_model=32, n_head=4, n_ctx=24)
    return init_params(cfg, 5), cfg


def test_kv_cache_decode_equals_full_forward():
    params, cfg = tiny()
    toks = np.random.default_rng(1).integers(0, 257, 20)
    full, _ = forward(params, toks[None], cfg=cfg)
    lin = Linears(params, cfg)
    _, cache = forward(params, toks[None, :5], cfg=cfg, linears=lin)
    for i in range(5, 20):
        logits, cache = decode_step(params, int(toks[i]), cache, cfg=cfg, linears=lin)
        np.testing.assert_allclose(logits, full[0, i], atol=1e-5, rtol=1e-5)


def test_generate_is_deterministic_under_a_seed():
    params, cfg = tiny()
    a = generate(params, "she ", 10, temperature=1.0, seed=3, cfg=cfg)
    assert a == generate(params, "she ", 10, temperature=1.0, seed=3, cfg=cfg)
    assert generate(params, "she ", 10, cfg=cfg) == generate(params, "she ", 10, cfg=cfg)


def test_scheme_linears_change_only_the_weights():
    params, cfg = tiny()
    toks = np.arange(10)[None]
    ref, _ = forward(params, toks, cfg=cfg)
    q8, _ = forward(params, toks, cfg=cfg, linears=Linears(params, cfg, "int8_channel"))
    assert 0 < np.abs(q8 - ref).max() < 0.05 * np.abs(ref).max()
    lin = Linears(params, cfg, "q8_0")
    assert lin.nbytes == sum(params[n + ".weight"].size for n in lin.layers) * 34 // 32


def test_training_smoke_run_lowers_the_loss():
    cfg = Config(n_layer=1, d_model=32, n_head=2, n_ctx=32)
    _, log = tr.train(cfg, steps=80, batch_size=8, lr=3e-3, warmup=10, eval_every=40, quiet=True)
    losses = [l for _, l, _, _ in log["train"]]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0
    assert log["val"][-1][1] < log["val"][0][1]


def test_training_resumes_where_it_stopped(tmp_path):
    cfg = Config(n_layer=1, d_model=16, n_head=2, n_ctx=16)
    kw = dict(batch_size=4, lr=1e-3, warmup=2, eval_every=5, quiet=True, state_path=tmp_path / "s.npz")
    full, full_log = tr.train(cfg, steps=10, **{**kw, "state_path": None})
    _, cut = tr.train(cfg, steps=10, save_every=5, time_limit_s=-1, **kw)  # stops after the first step
    assert len(cut["train"]) == 1
    part, log = tr.train(cfg, steps=10, save_every=5, resume=True, **kw)
    assert [r[:2] for r in log["train"]] == [r[:2] for r in full_log["train"]]   # same steps, same losses
    assert log["val"] == full_log["val"]
    for k in full:   # the resumed run is the uninterrupted run, bit for bit
        np.testing.assert_array_equal(part[k], full[k])


def test_checkpoint_round_trip(tmp_path):
    params, cfg = tiny()
    path = checkpoint.save(tmp_path / "m.gguf", params, cfg, {"note": "x", "acc": 0.5})
    p2, cfg2, meta = checkpoint.load(path)
    assert cfg2 == cfg and meta["gpt2.block_count"] == 2 and meta["minigpt.acc"] == 0.5
    assert meta["tokenizer.ggml.tokens"][ord("A")] == "A" and meta["tokenizer.ggml.tokens"][ord(" ")] == "Ġ"
    for k in params:
        np.testing.assert_array_equal(p2[k], params[k])


# --------------------------------------------------------------------- corpus

GOLDEN = {  # base: (3rd person, past, participle, -ing), from a grammar reference
    "stop": ("stops", "stopped", "stopped", "stopping"), "visit": ("visits", "visited", "visited", "visiting"),
    "prefer": ("prefers", "preferred", "preferred", "preferring"), "carry": ("carries", "carried", "carried", "carrying"),
    "play": ("plays", "played", "played", "playing"), "watch": ("watches", "watched", "watched", "watching"),
    "fix": ("fixes", "fixed", "fixed", "fixing"), "agree": ("agrees", "agreed", "agreed", "agreeing"),
    "tie": ("ties", "tied", "tied", "tying"), "hope": ("hopes", "hoped", "hoped", "hoping"),
    "hop": ("hops", "hopped", "hopped", "hopping"), "rain": ("rains", "rained", "rained", "raining"),
    "swim": ("swims", "swam", "swum", "swimming"), "go": ("goes", "went", "gone", "going"),
    "lie": ("lies", "lay", "lain", "lying"), "see": ("sees", "saw", "seen", "seeing"),
    "have": ("has", "had", "had", "having"), "do": ("does", "did", "done", "doing"),
    "write": ("writes", "wrote", "written", "writing"), "admit": ("admits", "admitted", "admitted", "admitting"),
    "open": ("opens", "opened", "opened", "opening"), "cry": ("cries", "cried", "cried", "crying"),
}


def test_spelling_rules_on_golden_verbs():
    lex = {v.base: v for v in corpus.lexicon()}
    for base, forms in GOLDEN.items():
        v = lex[base]
        assert (v.s, v.past, v.participle, v.ing) == forms, base
    assert len(lex) >= 300 and sum(v.irregular for v in lex.values()) >= 100


@pytest.fixture(scope="module")
def splits():
    return corpus.make_splits()


def test_every_label_agrees_with_its_verb_phrase(splits):
    """Independent rules: the auxiliaries and the main-verb form must spell the label."""
    lex = {v.base: v for v in corpus.lexicon()}
    for ln, base in zip(splits.test, splits.test_verbs):
        text, label = corpus.parse(ln)
        v, w = lex[base], text.split()
        tense, aspect = label.split()
        near = lambda aux, form: any(a == aux and form in w[i + 1:i + 6] for i, a in enumerate(w))  # noqa: E731
        if aspect == "perfect":
            ok = {"past": near("had", v.participle), "present": near("has", v.participle) or near("have", v.participle),
                  "future": near("will", "have") and v.participle in w}[tense]
        elif aspect == "progressive":
            ok = {"past": near("was", v.ing) or near("were", v.ing),
                  "present": any(near(a, v.ing) for a in ("am", "is", "are")),
                  "future": near("will", "be") and v.ing in w}[tense]
        else:
            ok = {"past": v.past in w or near("did", v.base), "present": v.s in w or v.base in w,
                  "future": near("will", v.base)}[tense]
            ok = ok and "will" not in w if tense != "future" else ok
        assert ok, ln


def test_splits_are_disjoint_and_hold_out_verb_forms(splits):
    train = set(splits.train)
    assert not train & set(splits.test) and not train & set(splits.validation)
    assert len(set(splits.test)) == len(splits.test)
    for ln in splits.train:
        assert ln.count(corpus.SEP) == 1 and corpus.parse(ln)[1] in corpus.LABELS
    lex = {v.base: v for v in corpus.lexicon()}
    others = {f for v in lex.values() if v.base not in splits.heldout_verbs for f in (v.base, v.s, v.past, v.participle, v.ing)}
    unseen = {f for b in splits.heldout_verbs for f in (lex[b].past, lex[b].participle, lex[b].ing)
              if f not in (lex[b].base, lex[b].s)} - others  # "set" stays "set": seen as a base form
    words = {w for ln in splits.train for w in corpus.parse(ln)[0].split()}
    assert unseen and not unseen & words
    assert sum(b in splits.heldout_verbs for b in splits.test_verbs) >= 100


def test_corpus_is_deterministic():
    a = corpus.make_splits(n_train=200, n_val=10, n_test=10)
    corpus._draw_splits.cache_clear()   # drawn again, not served from the per-process cache
    b = corpus.make_splits(n_train=200, n_val=10, n_test=10)
    assert a == b and a.train != corpus.make_splits(n_train=200, n_val=10, n_test=10, seed=1).train
    a.train.append("changed")   # every call gets its own lists
    assert corpus.make_splits(n_train=200, n_val=10, n_test=10) == b


# --------------------------------------------------------------------- the committed checkpoint

def test_committed_checkpoint_reproduces_its_recorded_metrics():
    from minigpt_np import evaluate

    params, cfg, meta = checkpoint.load()
    n = int(meta["minigpt.subset_n"])
    r = evaluate.evaluate("fp32", limit=n, progress=False)
    assert abs(r["accuracy"] - float(meta["minigpt.subset_accuracy"])) <= 1e-4
    assert abs(r["perplexity"] - float(meta["minigpt.subset_perplexity"])) <= 1e-4
    assert float(meta["minigpt.test_accuracy"]) >= 0.95


def test_activation_quantizing_schemes_round_the_layer_inputs():
    params, cfg = tiny()
    lin = Linears(params, cfg, "w8a8")
    name = "blk.0.ffn_up"
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    from refquant import schemes
    qt = lin.layers[name].qt
    want = schemes.get("w8a8").matmul(qt, x) + params[name + ".bias"]
    np.testing.assert_allclose(lin(name, x), want, rtol=1e-5, atol=1e-6)


def test_sequential_calibration_calibrates_layer_k_on_the_quantized_layers_before_it(monkeypatch):
    """The property: a spy on ``linear.quantize`` records, per layer, the inputs it was
    calibrated on and the tensor it produced; layer k's inputs must be exactly what the
    model gives with layers 0..k-1 replaced by their quantized tensors (and no others),
    collected again here by a plain forward with a hook."""
    from refquant import calibration, linear
    from minigpt_np.model import linear_names

    cfg = Config(n_layer=2, d_model=128, n_head=2, n_ctx=16)
    params = init_params(cfg, 0)
    seqs = np.random.default_rng(0).integers(0, 256, (6, 16))
    names = linear_names(cfg)
    calls, real = [], linear.quantize

    def spy(w, scheme, *, calib=None, **kw):
        out = real(w, scheme, calib=calib, **kw)
        if scheme == "gptq_int4_g128":   # (Linears builds its float layers through it too)
            calls.append((next(n for n in names if params[n + ".weight"] is w), np.array(calib), out))
        return out
    monkeypatch.setattr(linear, "quantize", spy)
    lin = quantize_sequential(params, cfg, "gptq_int4_g128", seqs, progress=False)
    assert [c[0] for c in calls] == names
    assert all(lin.layers[n] is out for n, _, out in calls) and all(
        layer.qt.scheme == "gptq_int4_g128" for layer in lin.layers.values())
    monkeypatch.setattr(linear, "quantize", real)
    for k, (name, X, _) in enumerate(calls):
        model = Linears(params, cfg)
        for done, _, out in calls[:k]:
            model.layers[done] = out
        want = calibration.collect(lambda t, hook: forward(params, t, cfg=cfg, linears=model, hook=hook), seqs,
                                   [name], progress=False, keep_inputs=True)[name].X
        np.testing.assert_array_equal(X, want)
        if k:   # and they differ from the float model's: the quantized layers were in the pass
            flt = calibration.collect(lambda t, hook: forward(params, t, cfg=cfg, hook=hook), seqs, [name],
                                      progress=False, keep_inputs=True)[name].X
            assert not np.array_equal(X, flt)


def test_calibration_statistics_are_their_definitions():
    from refquant import calibration
    cfg = Config(n_layer=1, d_model=128, n_head=2, n_ctx=16)
    params = init_params(cfg, 0)
    seqs = np.random.default_rng(0).integers(0, 256, (8, 16))
    stats = calibration.collect(lambda t, hook: forward(params, t, cfg=cfg, hook=hook), seqs, ["blk.0.ffn_up"],
                                progress=False, keep_inputs=True)["blk.0.ffn_up"]
    X = stats.X.astype(np.float64)
    np.testing.assert_allclose(stats.H, 2 / len(X) * X.T @ X, rtol=1e-10)
    np.testing.assert_allclose(stats.max_abs, np.abs(X).max(0))
    np.testing.assert_allclose(stats.mean_abs, np.abs(X).mean(0), rtol=1e-10)


@pytest.mark.parametrize("scheme", ["q8_0", "q4_0", "q4_k", "iq4_nl", "fp16", "bf16", "fp8_e4m3", "nf4_dq",
                                    "gptq_int4_g128_actorder", "w8a8", "llm_int8"])
def test_quantized_gguf_export_round_trips_exactly(scheme, tmp_path):
    from minigpt_np import evaluate
    cfg = Config(n_layer=1, d_model=256, n_head=2, n_ctx=16)
    params = init_params(cfg, 0)
    p, lin = evaluate.prepare(params, cfg, scheme)
    r = evaluate.export_check(tmp_path / "m.gguf", p, cfg, lin, scheme, corpus.make_splits(200, 10, 10).test)
    assert len(r["weights"]) == len(lin.layers) > 0
    for name, (written, read) in zip(lin.layers, r["weights"]):
        if isinstance(read, np.ndarray):   # fp16/bf16: a plain F16/BF16 tensor, read back as floats
            np.testing.assert_array_equal(read, written.dequantize())
            continue
        assert read.scheme == written.scheme and read.shape == written.shape, name
        for part in ("codes", "scales", "zeros"):
            a, b = getattr(written, part), getattr(read, part)
            assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b)), (name, part)
        assert set(read.meta) == set(written.meta)
        for k, v in written.meta.items():
            assert np.array_equal(read.meta[k], v) if isinstance(v, np.ndarray) else read.meta[k] == v, (name, k)
        np.testing.assert_array_equal(read.dequantize(), written.dequantize())
    assert r["max_logit_diff"] == 0
    ggml = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K", "iq4_nl": "IQ4_NL", "fp16": "F16", "bf16": "BF16"}
    if scheme in ggml:
        assert r["ggml_types"] == [ggml[scheme]]
        from refquant import gguf
        with gguf.read(tmp_path / "m.gguf") as f:  # a plain ggml tensor llama.cpp can read
            assert f.tensors["blk.0.ffn_up.weight"].type.name == ggml[scheme]
            assert f.tensors["token_embd.weight"].type.name == "F16"


def test_readme_commands_train_and_evaluate(tmp_path, monkeypatch, capsys):
    """`python -m minigpt_np.train` (shortened) writes a checkpoint carrying its own FP32
    metrics; `python -m minigpt_np.evaluate` reports a scheme on it."""
    from minigpt_np import evaluate
    out = tmp_path / "m.gguf"
    tr.main(["--steps", "2", "--warmup", "1", "--state", str(tmp_path / "s.npz"), "--out", str(out),
             "--eval-lines", "12", "--log", str(tmp_path / "results" / "minigpt_train.json")])
    _, _, meta = checkpoint.load(out)
    assert meta["minigpt.train_steps"] == 2 and meta["minigpt.subset_n"] == 12 == meta["minigpt.test_lines"]
    r = evaluate.evaluate("fp32", limit=12, path=out, progress=False)
    assert r["accuracy"] == meta["minigpt.subset_accuracy"] and r["perplexity"] == meta["minigpt.subset_perplexity"]
    assert (tmp_path / "results" / "minigpt_train.json").exists()
    evaluate.main(["--scheme", "int4_g128", "--limit", "12", "--model", str(out)])
    text = capsys.readouterr().out
    assert "scheme int4_g128: 4.125 bits/weight" in text and "verb-tense accuracy" in text
