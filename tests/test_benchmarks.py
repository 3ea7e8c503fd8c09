"""The benchmark modules run end to end in --quick mode and write the JSON fields the
figures and the README rely on. No timing is asserted: speed is measured, not tested."""
import json

import pytest

from benchmarks import common


@pytest.fixture
def out_dirs(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "FIGURES", tmp_path / "figures")
    return tmp_path


def load(tmp, name):
    return json.loads((tmp / "results" / f"{name}.json").read_text())


@pytest.mark.slow   # the main job runs the full roofline in CI (README command 1)
def test_roofline_quick(out_dirs):
    from benchmarks import roofline
    roofline.main(["--quick"])
    data = load(out_dirs, "roofline")
    assert data["read_bandwidth"]["best_gbs"] > 0 and data["sgemm"]["gflops"] > 0 and data["int8_dot"]["gops"] > 0
    assert {(d["kernel"], d["threads"]) for d in data["dots"]} == {
        (k, 1) for k in ("numpy-fp32", "int8", "w8a8", "int4-g128", "q8_0", "q4_0", "q4_k", "int4-g128-x16")}
    assert all(d["pct_of_bandwidth"] > 0 for d in data["dots"]) and data["decode_dots"] == []  # --quick: no MiniGPT
    for d in data["dots"]:
        assert d["intensity"] == pytest.approx(d["flops"] / d["weight_bytes"])
        assert {"ms", "gbs", "gflops", "pct_of_bandwidth", "x_fp32"} <= set(d)
    fp32 = next(d for d in data["dots"] if d["kernel"] == "numpy-fp32")
    assert fp32["intensity"] == pytest.approx(0.5)          # 2 FLOP per 4-byte weight
    assert (out_dirs / "figures" / "roofline.png").stat().st_size > 10_000


def test_smollm2_dots_from_another_host_are_marked_as_such(out_dirs):
    """The roofline places SmolLM2's decode from decode.json; measured on another CPU, its
    dots say so (label and ``other_host``) instead of passing for this machine's."""
    from benchmarks import roofline

    (out_dirs / "results").mkdir()
    row = dict(engine="compiled", type="Q4_0", decode_tokens_per_s=250.0, gbs=19.0, weight_bytes=76_000_000)
    for cpu, other in (("CPU A (family 25, model 17)", False), ("CPU B (family 26, model 2)", True)):
        common.write_json("decode", dict(machine=dict(cpu=cpu), flops_per_token=2.7e8,
                                         results=[row, dict(row, engine="numpy")]))
        (d,) = roofline.smollm2_dots(here=dict(cpu="CPU A (family 25, model 17)"))
        assert d["other_host"] is other and d["host"] == cpu
        assert ("(other host)" in d["label"]) is other and d["gflops"] == pytest.approx(2.7e8 * 250 / 1e9)


def test_kernels_quick(out_dirs):
    from benchmarks import kernels
    kernels.main(["--quick"])
    data = load(out_dirs, "kernels")
    assert data["quick"] is True and data["results"]
    for r in data["results"]:
        assert {"layer", "shape", "kernel", "threads", "ms", "p10_ms", "gbs", "pct_of_bandwidth", "x_fp32",
                "weight_bytes", "calls"} <= set(r)
    assert {r["threads"] for r in data["runs"]} == {1}
    assert all(r["read_bandwidth"]["best_gbs"] > 0 for r in data["runs"])


@pytest.mark.slow   # every registered scheme on 4096x4096 (~30 s)
def test_schemes_quick(out_dirs):
    from benchmarks import schemes
    schemes.main(["--quick"])
    data = load(out_dirs, "schemes")
    from refquant import schemes as registry
    assert [r["scheme"] for r in data["results"]] == registry.names()
    assert (out_dirs / "figures" / "schemes_sqnr.png").exists()


def test_outliers_quick(out_dirs):
    from benchmarks import outliers
    outliers.main(["--quick"])
    data = load(out_dirs, "outliers")
    err = {(d["factor"], d["scheme"]): d["rel_error"] for d in data["results"]}
    assert err[5, "w8a8"] > err[1, "w8a8"]                    # the cliff starts
    assert err[5, "llm_int8"] < err[5, "w8a8"]                # and the fix
    assert (out_dirs / "figures" / "outliers.png").stat().st_size > 10_000


def test_pareto_quick(out_dirs):
    from benchmarks import pareto
    pareto.main(["--quick", "--limit", "12"])
    data = load(out_dirs, "pareto")
    by = {r["scheme"]: r for r in data["results"]}
    assert set(pareto.QUICK_SCHEMES) <= set(by)
    assert by["fp32"]["bits_per_weight"] == 32 and abs(by["q4_k"]["bits_per_weight"] - 4.5) < 1e-9
    for r in data["results"]:
        if r["scheme"] != "fp32":
            assert {"weights_identical", "max_logit_diff", "file_bytes"} <= set(r["export"])
            assert r["export"]["weights_identical"] is True, r["scheme"]
    assert len(data["sensitivity"]) == 16 and "bits_per_weight" in data["mixed"]
    from minigpt_np import checkpoint
    params, _, _ = checkpoint.load()
    assert by["fp32"]["model_bytes"] == 4 * sum(v.size for v in params.values())
    emb = {r["scheme"]: r for r in data["embeddings_quantized"]}
    assert set(emb) == set(pareto.QUICK_SCHEMES) - {"fp32"}    # all weight-only schemes
    vocab, d = params["token_embd.weight"].shape
    # Q4_K token embedding: 144 bytes per 256 weights instead of FP16's 512
    assert by["q4_k"]["model_bytes"] - emb["q4_k"]["model_bytes"] == vocab * d * 2 - vocab * d // 256 * 144
    for f in ("pareto_ppl.png", "pareto_kld.png", "verb_tense.png", "sensitivity.png"):
        assert (out_dirs / "figures" / f).stat().st_size > 10_000
    # KLD from FP32 at every next-byte position of the 12 lines' text (EOT + text + SEP)
    from minigpt_np import corpus
    positions = sum(len((corpus.parse(ln)[0] + corpus.SEP).encode()) for ln in corpus.make_splits().test[:12])
    kl = {s: r["kl"] for s, r in by.items()}
    assert all(k["n"] == positions for k in kl.values())
    assert kl["fp32"]["kld_mean"] == 0 and kl["fp32"]["same_top"] == 1 and kl["fp32"]["ppl_ratio"] == 1
    # rounding to 4 bits moves the distributions far more than to fp16 (a 2^-11 relative step)
    assert 0 < kl["fp16"]["kld_mean"] < kl["int8_channel"]["kld_mean"] < kl["int4_g128"]["kld_mean"]
    assert kl["int4_g128"]["kld_mean"] > 2 * kl["int4_g128"]["kld_se"] > 0


@pytest.mark.oracle
@pytest.mark.slow   # a whole-model sweep, twice
def test_pareto_smollm2_quick_serial_equals_dask(out_dirs, smollm2_path):
    """The SmolLM2 sweep on block 0-1's Linears: KLD at every position of the windows, the
    bytes counted by hand, GPTQ and AWQ -> Q4_0 in files that read back, say Paris and
    beat plain Q4_0, and the
    same JSON (timings aside) for the three schemes from one dask.distributed task each."""
    from benchmarks import pareto, pareto_smollm2 as P
    from minigpt_np import llama

    pareto.main(["--model", "smollm2", "--quick"])
    data = load(out_dirs, "pareto_smollm2")
    by = {r["scheme"]: r for r in data["results"]}
    assert set(by) == set(P.QUICK_SCHEMES) and data["executor"] == "serial"
    assert all(r["kl"]["n"] == data["windows"] * data["length"] == data["positions"] for r in by.values())
    _, cfg, _ = llama.load(smollm2_path)
    layers = data["layers"]
    shapes = [(cfg.d_model if k in ("attn_q", "attn_output") else cfg.d_model // cfg.n_head * cfg.n_head_kv
               if k in ("attn_k", "attn_v") else cfg.d_ff if k in ("ffn_gate", "ffn_up") else cfg.d_model,
               cfg.d_ff if k == "ffn_down" else cfg.d_model) for k in (n.split(".")[2] for n in layers)]
    weights = sum(o * n for o, n in shapes)
    # int4_g128: 4-bit codes and an fp16 scale per 128 inputs, 576-wide rows stored as 640
    int4 = sum(o * ((n + -n % 128) // 2 + (n + -n % 128) // 128 * 2) for o, n in shapes)
    assert by["int4_g128"]["linear_bytes"] == int4 and by["q4_0"]["linear_bytes"] == weights // 32 * 18
    assert by["q8_0"]["bits_per_weight"] == 8.5 and not by["q8_0"]["fitted"]
    assert any("short last group" in f for f in by["int4_g128"]["fitted"])
    kld = {s: r["kl"]["kld_mean"] for s, r in by.items()}
    assert 0 < kld["q8_0"] < kld["q4_0"] and kld["q8_0"] < kld["int4_g128"]
    assert {r["scheme"] for r in data["embeddings_quantized"]} == set(P.QUICK_SCHEMES)
    assert [f["method"] for f in data["files"]] == ["gptq", "awq"]
    for f in data["files"]:
        assert f["type"] == "Q4_0" and "Paris" in f["greedy"] and f["kl"]["kld_mean"] < kld["q4_0"]
    assert (out_dirs / "figures" / "pareto_kld.png").stat().st_size > 10_000
    # the three schemes again, one dask task each (the extras are the same code)
    dask = json.loads(json.dumps(P.run(True, dask=True, extras=False, progress=False)))
    assert dask["executor"] == "dask" and not dask["embeddings_quantized"] and not dask["files"]
    want = P.without_timings(data)
    want.update(embeddings_quantized=[], files=[])
    assert P.without_timings(dask) == want


def test_training_curve_figure(out_dirs):
    from benchmarks import training
    log = {"config": {"n_layer": 1, "d_model": 8, "n_head": 1, "n_ctx": 4}, "steps": 60, "batch_size": 2,
           "elapsed_s": 60.0, "train": [[i, 3 - i / 30, 1.0, 1e-3] for i in range(60)], "val": [[30, 2.5], [60, 1.2]]}
    common.write_json("minigpt_train", {"benchmark": "minigpt_train", **log})
    training.main([])
    assert (out_dirs / "figures" / "minigpt_loss.png").stat().st_size > 10_000


def test_requant_quick(out_dirs):
    from benchmarks import requant
    requant.main(["--quick"])
    data = load(out_dirs, "requant")
    rows = {r["type"]: r for r in data["results"]}
    assert "Q8_0" in rows and data["tokens"] == 96
    # Q8_0 of the dequantized Q4_1 weights: 8.5 bits per weight against Q4_1's 5 -> a bigger file,
    # and perplexity close to the shipped file's (+0.23% over 1023 tokens; 96 tokens are noisier)
    assert rows["Q8_0"]["file_bytes"] > data["results"][0]["file_bytes"]
    assert abs(rows["Q8_0"]["ppl_change_pct"]) < 3.0


@pytest.mark.slow   # two SmolLM2 engines compiled and timed (~20 s)
def test_decode_quick(out_dirs):
    from benchmarks import decode
    decode.main(["--quick"])
    data = load(out_dirs, "decode")
    rows = {(r["engine"], r["type"]): r for r in data["results"]}
    assert set(rows) == {("compiled", "Q4_1"), ("numpy", "f32"), ("numpy", "Q4_1")}
    assert all(r["text"].startswith("The capital of France is Paris") for r in data["results"])
    assert rows["numpy", "f32"]["x_numpy_f32"] == 1.0
    q = rows["compiled", "Q4_1"]
    # Q4_1 body (20 bytes per 32 weights) and the Q8_0 head (34 per 32), hand-counted from
    # SmolLM2's shapes: 30 layers of 576x(576+192+192) + 576x576 + 2x1536x576 + 576x1536, head 49152x576
    body = 30 * (576 * 960 + 576 * 576 + 2 * 1536 * 576 + 576 * 1536)
    assert q["weight_bytes"] == body // 32 * 20 + 49152 * 576 // 32 * 34
    assert q["breakdown_ms"]["products"] > 0 and q["check"]["rms_gap"] <= q["check"]["bound"]


def test_llama_bench_runs_tg_on_the_file_and_its_json_is_read(tmp_path):
    """``decode.llama_bench`` runs llama-bench as its docstring says (tg n, no prompt, one
    repetition, the thread count given, JSON out) and reads avg_ts; a failing run raises."""
    import sys

    from benchmarks import decode

    exe = tmp_path / "llama-bench"
    exe.write_text(f"#!{sys.executable}\nimport json, sys\na = sys.argv[1:]\n"
                   "opt = lambda k: a[a.index(k) + 1]\n"
                   "if opt('-p') != '0' or opt('-r') != '1' or opt('-o') != 'json': sys.exit(2)\n"
                   "print(json.dumps([dict(build_commit='0c1e570', avg_ts=100.0 + int(opt('-n')) + int(opt('-t')),"
                   " model_size=7, model_filename=opt('-m'))]))\n")
    exe.chmod(0o755)
    r = decode.llama_bench(str(exe), tmp_path / "m.gguf", 3, 8)
    assert r["tokens_per_s"] == 111.0 and r["build_commit"] == "0c1e570"
    assert r["command"][r["command"].index("-m") + 1] == str(tmp_path / "m.gguf")
    exe.write_text(f"#!{sys.executable}\nimport sys\nsys.stderr.write('no model')\nsys.exit(1)\n")
    with pytest.raises(RuntimeError, match="no model"):
        decode.llama_bench(str(exe), tmp_path / "m.gguf", 2)


def test_tokenizer_quick(out_dirs):
    from benchmarks import tokenizer
    tokenizer.main(["--quick"])
    data = load(out_dirs, "tokenizer")
    assert [r["kind"] for r in data["results"]] == ["prose", "code", "cjk", "one character", "spaces"]
    assert all(r["tokens"] > 0 and r["s_per_mb"] > 0 for r in data["results"])


def test_cli_memory_quick(out_dirs):
    from benchmarks import cli_memory
    cli_memory.main(["--quick"])
    data = load(out_dirs, "cli_memory")
    (row,) = data["results"]
    assert row["command"] == "quantize Q8_0" and row["peak_mb"] > data["interpreter_mb"] > 0


def test_quantize_quick(out_dirs):
    """Every type's row, bytes checked (against the NumPy reference, and ggml's C when its
    source is found), GPTQ against one sgemm; the CLI comparison is for full runs only."""
    from benchmarks import quantize
    quantize.main(["--quick"])
    data = load(out_dirs, "quantize")
    assert [r["type"] for r in data["types"]] == quantize.types() and data["cli"] is None
    for r in data["types"]:
        assert r["bytes_equal_numpy"] and r["numba_ms"] > 0 and r["numpy_ms"] > 0
        assert (r["c_ms"] is not None and r["bytes_equal_c"]) if data["c"] else r["c_ms"] is None
    g = data["gptq"]
    assert g["n"] == 256 and g["ratio"] > 0 and g["output_error_gptq"] < g["output_error_rtn"]


def test_batch_quick(out_dirs):
    """``benchmarks.batch --quick``: the shipped file, a 16-token prompt checked against the
    NumPy forward before timing, its useful operations counted by hand, B = 1 and 4, the
    batch checked against each sequence decoded alone before timing, a figure drawn from
    the JSON."""
    from benchmarks import batch
    batch.main(["--quick"])
    data = load(out_dirs, "batch")
    pr = data["prompt"]
    assert pr["types"] == ["Q4_1"] and pr["lengths"] == [16] and pr["checks"]["Q4_1"]["rms_gap"] <= \
        pr["checks"]["Q4_1"]["bound"]
    (r,) = pr["results"]
    # SmolLM2: 30 layers of q, k, v, o (576x576, 192x576 twice, 576x576) and gate, up, down
    # (1536x576 each), 2 ops per weight per token; the 49152x576 head once
    layer = 30 * (576 * 576 * 2 + 2 * 192 * 576 + 3 * 1536 * 576)
    gops = (16 * 2 * layer + 2 * 49152 * 576) / r["seconds"] / 1e9
    assert r["gops"] == pytest.approx(gops, rel=1e-9) and r["tokens_per_s"] == pytest.approx(16 / r["seconds"])
    peak = pr["int8_peak"]["gops_per_thread"] * pr["threads"]
    assert r["pct_of_peak"] == pytest.approx(100 * gops / peak) and 0 < r["pct_of_peak"] < 100
    assert data["batches"] == [1, 4] and data["verified"] == dict(batch=4, steps=2)
    rows = {(r["type"], r["batch"]): r for r in data["results"]}
    assert set(rows) == {("Q4_1", 1), ("Q4_1", 4)} and rows["Q4_1", 1]["x_b1"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 2 for r in rows.values())
    assert (out_dirs / "figures" / "batch.png").stat().st_size > 10_000


@pytest.mark.slow
def test_context_quick(out_dirs):
    """``benchmarks.context --quick``: f32 and q8_0 caches at depths 0 and 64, the roof of
    each from the F32 step's GB/s, KV bytes counted by hand, the q8_0 cache's KLD on float
    weights small."""
    from benchmarks import context
    context.main(["--quick"])
    data = load(out_dirs, "context")
    assert data["types"] == ["f32", "q8_0"] and data["depths"] == [0, 64] and data["check"]["rms_gap"] <= \
        data["check"]["bound"]
    # SmolLM2: 30 layers x (K and V) x 3 KV heads x a 64-number row: 256 B (f32), 128 (f16, bf16),
    # 2 x 34 (q8_0), 2 x 18 (q4_0, iq4_nl), 2 x 20 (q4_1), 2 x 22 (q5_0), 2 x 24 (q5_1)
    want = dict(f32=256, f16=128, bf16=128, q8_0=68, q4_0=36, q4_1=40, iq4_nl=36, q5_0=44, q5_1=48, fp8_e4m3=64,
                fp8_e5m2=64)
    table = {r["type"]: r for r in data["seed_table"]}
    assert {t: r["bytes_per_token"] for t, r in table.items()} == {t: 180 * b for t, b in want.items()}
    assert table["q8_0"]["sequences_in_budget"] == (2 << 30) // (180 * 68 * 8000) == 21
    roof = data["roof"]["f32_weight_gbs"] * 1e9
    for r in data["results"]:
        per = 180 * want[r["type"]]
        assert r["bytes_per_token"] == data["weight_bytes"] + (r["depth"] + 1) * per
        assert r["roof_tokens_per_s"] == pytest.approx(roof / r["bytes_per_token"])
        assert r["pct_of_roof"] == pytest.approx(100 * r["tokens_per_s"] / r["roof_tokens_per_s"])
    q = {r["type"]: r for r in data["quality"]}
    assert list(q) == ["q8_0", "fp8_e4m3", "fp8_e5m2", "fp8_e4m3 calibrated", "fp8_e5m2 calibrated"]
    assert all(r["window"] == 64 for r in q.values()) and 0 < q["q8_0"]["kld_mean"] < 5e-3
    assert q["fp8_e4m3"]["kld_mean"] < q["fp8_e5m2"]["kld_mean"]     # one more significand bit
    assert (out_dirs / "figures" / "context.png").stat().st_size > 10_000


def test_mixes_quick(out_dirs):
    """``benchmarks.mixes --quick --model minigpt``: Q3_K_M and Q4_K_M written with and without
    an importance matrix of 8 chunks, judged on 8 chunks of the test split; the bits per
    weight counted from the files' tensors; the table and the figure come out."""
    from benchmarks import mixes
    mixes.main(["--quick", "--model", "minigpt"])
    data = load(out_dirs, "mixes")
    d = data["models"]["minigpt"]
    assert d["imatrix_chunks"] == 8 and d["kld_chunks"] == 8 and d["positions"] == 8 * 63
    rows = {(r["ftype"], r["imatrix"]): r for r in d["results"]}
    assert set(rows) == {(f, w) for f in mixes.QUICK_MIXES for w in (False, True)}
    # MiniGPT Q4_K_M: token_embd Q6_K (tied), half the qkv and ffn_down Q6_K, the rest Q4_K
    assert rows["Q4_K_M", True]["types"] == {"Q6_K": 5, "Q4_K": 12}
    for r in rows.values():
        assert 3 < r["bits_per_weight"] < 6.5 and 0 < r["kl"]["kld"]["mean"] < 0.05
        assert r["kl"]["n"] == d["positions"]
    assert set(d["paired"]) == set(mixes.QUICK_MIXES)
    assert (out_dirs / "figures" / "mixes.png").stat().st_size > 10_000
    assert len(mixes.table(data, "minigpt")) == 2 + len(mixes.QUICK_MIXES)
