"""safetensors files (against the safetensors package) and whole GPTQ / AWQ /
compressed-tensors checkpoints: write, read back, configs, and bad files named."""
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refquant import affine, gptq
from refquant.hf import checkpoint, safetensors
from tests.conftest import need
from tests.oracles import refused


def st_numpy():
    return need("safetensors.numpy")


@pytest.mark.oracle
def test_files_cross_read_with_the_safetensors_package(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.float16).reshape(3, 4), "b": np.array([-1, 7], np.int32),
              "c": np.zeros((0, 5), np.float32), "d": np.arange(6, dtype=np.uint8)}
    safetensors.write(tmp_path / "ours.safetensors", arrays, {"format": "pt"})
    theirs = st_numpy().load_file(str(tmp_path / "ours.safetensors"))
    st_numpy().save_file(arrays, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    back, meta = safetensors.read(tmp_path / "theirs.safetensors")
    assert meta == {"k": "v"} and set(theirs) == set(back) == set(arrays)
    for k, a in arrays.items():
        for got in (theirs[k], back[k]):
            assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)


def _raw_file(path, header: dict, data: bytes, size=None):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if size is None else size) + h + data)
    return path


def test_bf16_reads_as_float32(tmp_path):
    # bf16 0x3F80 = 1.0, 0xC000 = -2.0 (the high halves of the float32 bits)
    p = _raw_file(tmp_path / "b.safetensors", {"x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}},
                  b"\x80\x3f\x00\xc0")
    x, _ = safetensors.read(p)
    np.testing.assert_array_equal(x["x"], np.array([1.0, -2.0], np.float32))


@pytest.mark.parametrize("header, data, size, match", [
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "outside the 4 data bytes"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
    ({"x": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "unknown dtype"),
    ({"x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
      "y": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"\0" * 3, None, "overlap or leave holes"),
    ({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0" * 2, None, "cover 1 of 2"),
    ({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0", 10**6, "does not fit"),
    ({"x": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"\0", None, "non-negative"),
])
def test_malformed_files_are_named(tmp_path, header, data, size, match):
    p = _raw_file(tmp_path / "bad.safetensors", header, data, size)
    with pytest.raises(safetensors.SafetensorsError, match=match):
        safetensors.read(p)
    (tmp_path / "short.safetensors").write_bytes(b"\x05\0\0")
    with pytest.raises(safetensors.SafetensorsError, match="too short"):
        safetensors.read(tmp_path / "short.safetensors")


def tiny_model(seed=0):
    rng = np.random.default_rng(seed)
    names = {"model.layers.0.self_attn.q_proj": (64, 256), "model.layers.0.mlp.up_proj": (128, 256),
             "model.layers.0.mlp.down_proj": (64, 128)}
    ws = {k: rng.standard_normal(s).astype(np.float32) for k, s in names.items()}
    Hs = {k: gptq.hessian(rng.standard_normal((300, s[1])).astype(np.float32)) for k, s in names.items()}
    others = {"model.embed_tokens.weight": rng.standard_normal((50, 64)).astype(np.float16),
              "model.norm.weight": np.ones(64, np.float32)}
    return ws, Hs, others


@pytest.mark.parametrize("layout, kw, fmt", [
    ("gptq", dict(bits=4, group_size=64), "gptq"),
    ("gptq", dict(bits=4, group_size=64, sym=False, act_order=True), "gptq_v2"),
    ("awq", dict(bits=4, group_size=64, sym=False), "gptq"),
    ("compressed-tensors", dict(bits=4, group_size=64), "gptq"),
    ("compressed-tensors", dict(bits=8, group_size=-1, sym=False, act_order=True), "gptq"),
])
def test_checkpoint_round_trip(tmp_path, layout, kw, fmt):
    ws, Hs, others = tiny_model()
    q = {k: gptq.gptq_quantize(w, Hs[k], **kw)[0] for k, w in ws.items()}
    if layout == "gptq" and fmt == "gptq" and any(not t.meta["sym"] and np.any(t.zeros == 0) for t in q.values()):
        pytest.fail("test setup: v1 cannot store zero points of 0")
    checkpoint.write(tmp_path, q, others, layout=layout, checkpoint_format=fmt, config={"architectures": ["X"]})
    ck = checkpoint.read(tmp_path)
    assert ck.scheme.layout == layout and ck.scheme.bits == kw["bits"] and ck.scheme.sym == kw.get("sym", True)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["X"]
    assert set(ck.quantized) == set(q) and set(ck.tensors) == set(others)
    for k, t in q.items():
        np.testing.assert_array_equal(ck.quantized[k].dequantize(), t.dequantize())
        if layout != "awq":   # AWQ stores every grid as asymmetric; the weights above are what matters
            np.testing.assert_array_equal(ck.quantized[k].codes, t.codes)
        bpw = checkpoint.stored_bits_per_weight(ck.raw[k], t.shape)
        assert kw["bits"] < bpw < kw["bits"] + 1.5
    for k, a in others.items():
        np.testing.assert_array_equal(ck.tensors[k], a)


def test_checkpoint_errors_name_the_layer(tmp_path):
    ws, Hs, others = tiny_model()
    q = {k: affine.quantize(w, 4, granularity="group", group_size=64, scale_dtype=np.float16) for k, w in ws.items()}
    checkpoint.write(tmp_path, q, others, layout="gptq")
    tensors, meta = safetensors.read(tmp_path / "model.safetensors")
    tensors = dict(tensors)
    tensors["model.layers.0.mlp.up_proj.scales"] = tensors["model.layers.0.mlp.up_proj.scales"][:, :64]
    safetensors.write(tmp_path / "model.safetensors", tensors, meta)
    with pytest.raises(ValueError, match="layer 'model.layers.0.mlp.up_proj'.*GPTQ tensors disagree"):
        checkpoint.read(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(ValueError, match="does not fit"):
        checkpoint.read(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bnb"}}))
    with pytest.raises(ValueError, match="quant_method 'bnb'"):
        checkpoint.scheme_of(tmp_path)


def test_llama_names_and_rotary_rows_by_hand():
    from refquant.hf import llama
    assert llama.hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert llama.hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert llama.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    for n in ("blk.12.ffn_down.weight", "blk.0.attn_norm.weight", "output_norm.weight", "output.weight"):
        assert llama.gguf_name(llama.hf_name(n)) == n
    with pytest.raises(ValueError, match="no Hugging Face Llama name"):
        llama.hf_name("blk.0.attn_qkv.weight")
    # 2 heads of 4 rows: GGUF row 2i + j of a head is HF row 2j + i (d/2 = 2)
    np.testing.assert_array_equal(llama.rope_rows(8, 2), [0, 2, 1, 3, 4, 6, 5, 7])


def tiny_llama_gguf(path):
    from refquant import gguf

    rng = np.random.default_rng(2)
    d, kv, ff = 64, 32, 128
    shapes = {"attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, d), "ffn_gate": (ff, d),
              "ffn_up": (ff, d), "ffn_down": (d, ff)}
    t = {f"blk.0.{k}.weight": rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    t.update({"token_embd.weight": rng.standard_normal((16, d)).astype(np.float32),
              "blk.0.attn_norm.weight": np.ones(d, np.float32), "blk.0.ffn_norm.weight": np.ones(d, np.float32),
              "output_norm.weight": np.ones(d, np.float32)})
    meta = {"general.architecture": "llama", "llama.block_count": np.uint32(1), "llama.embedding_length": np.uint32(d),
            "llama.feed_forward_length": np.uint32(ff), "llama.attention.head_count": np.uint32(4),
            "llama.attention.head_count_kv": np.uint32(2), "llama.context_length": np.uint32(64),
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": [chr(ord("a") + i) for i in range(15)] + ["ab"],
            "tokenizer.ggml.token_type": np.ones(16, np.int32), "tokenizer.ggml.merges": ["a b"]}
    gguf.write(path, meta, t)
    return t


@pytest.mark.parametrize("fmt, asym, want_type", [("gptq", False, "Q4_0"), ("compressed-tensors", True, "Q4_1"),
                                                   ("awq", False, "Q4_1")])
def test_export_then_convert_gives_the_round_to_nearest_weights_back(tmp_path, fmt, asym, want_type):
    """GGUF → checkpoint → GGUF: every Linear comes back as Q4_0 / Q4_1 whose dequantized
    weights are the RTN grid of the original (GGUF row order restored) bit for bit."""
    from refquant import gguf
    from refquant.__main__ import main

    t = tiny_llama_gguf(tmp_path / "m.gguf")
    args = ["--asym"] if asym else []
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "ck"), "--format", fmt, "--group-size", "32",
                 *args]) == 0
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "back.gguf"), "--metadata-from",
                 str(tmp_path / "m.gguf")]) == 0
    with gguf.read(tmp_path / "back.gguf") as f:
        assert f.metadata["tokenizer.ggml.model"] == "gpt2" and int(f.metadata["llama.attention.head_count_kv"]) == 2
        assert set(f.tensors) == set(t)
        for k, w in t.items():
            got = f.tensor(k).dequantize()
            if w.ndim == 2 and not k.startswith("token_embd"):
                want = affine.quantize(w, 4, sym=not asym, granularity="group", group_size=32, scale_dtype=np.float16)
                assert f.tensors[k].type.name == want_type
                if not asym:   # Q4_0, or Q4_1 with m = fp16(-8 s), exact: the same floats
                    np.testing.assert_array_equal(got, want.dequantize())
                    continue
                # Q4_1: m = fp16(-z s) rounds; each weight moves by that rounding (+ float32 sum rounding)
                zs = want.zeros.astype(np.float64) * want.scales.astype(np.float64)
                m_err = np.abs((-zs).astype(np.float16).astype(np.float64) + zs).repeat(32, axis=1)
                err = np.abs(got.astype(np.float64) - want.dequantize())
                assert np.all(err <= m_err + 2.0**-23 * np.abs(want.dequantize()) + 1e-30) and np.any(m_err > 0)
            else:
                np.testing.assert_array_equal(got, w.astype(np.float16 if w.ndim == 2 else np.float32))


def test_convert_requantizes_grids_without_a_gguf_form(tmp_path, capsys):
    from refquant import gguf
    from refquant.__main__ import main

    tiny_llama_gguf(tmp_path / "m.gguf")
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "ck"), "--format", "gptq", "--bits", "8",
                 "--group-size", "32", "--checkpoint-format", "gptq_v2"]) == 0
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "b.gguf"), "--fallback", "Q8_0"]) == 0
    assert "requantized to Q8_0" in capsys.readouterr().err
    with gguf.read(tmp_path / "b.gguf") as f:
        assert f.tensors["blk.0.attn_q.weight"].type.name == "Q8_0"
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps(dict(cfg, architectures=["MistralForCausalLM"])))
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "c.gguf")]) == 2
    assert "LlamaForCausalLM" in capsys.readouterr().err and not (tmp_path / "c.gguf").exists()


def test_export_cli_writes_hugging_face_rows(tmp_path):
    """A tiny llama GGUF exported: names mapped, q/k rows back in Hugging Face's rotary
    order (GGUF = HF[perm], llama.cpp's permute), every Linear RTN-quantized on those rows."""
    from refquant.__main__ import main
    from refquant.hf import llama

    t = tiny_llama_gguf(tmp_path / "m.gguf")
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "ck"), "--format", "compressed-tensors",
                 "--group-size", "32"]) == 0
    ck = checkpoint.read(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"] is True
    for k, w in t.items():
        name = llama.hf_name(k)
        kind = k.split(".")[-2]
        if kind in ("attn_q", "attn_k"):
            w = w[np.argsort(llama.rope_rows(w.shape[0], 4 if kind == "attn_q" else 2))]
        if kind in llama.LINEARS:
            want = affine.quantize(w, 4, granularity="group", group_size=32, scale_dtype=np.float16)
            np.testing.assert_array_equal(ck.quantized[name[:-len(".weight")]].dequantize(), want.dequantize())
        else:
            np.testing.assert_array_equal(ck.tensors[name], w.astype(ck.tensors[name].dtype))
    assert main(["inspect", str(tmp_path / "ck")]) == 0


def test_export_names_the_cli_options_for_a_group_size_that_does_not_fit(tmp_path, capsys):
    """64 and 128 inputs are not whole groups of 48: a one-line error naming the option and a
    size that fits (an API argument such as pad=True is no help on the command line); no files."""
    from refquant.__main__ import main

    tiny_llama_gguf(tmp_path / "m.gguf")
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "bad"), "--format", "gptq",
                 "--group-size", "48"]) == 2
    err = capsys.readouterr().err
    assert "--group-size 48 does not divide every Linear's input width (64, 128); choose --group-size 64" in err
    assert "pad=" not in err and not (tmp_path / "bad").exists()
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "bad"), "--format", "awq",
                 "--group-size", "-1"]) == 2
    assert "--group-size -1 (one group per row) has no AWQ form" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_export_per_row_converts_back_as_q4_0_bit_for_bit(tmp_path, capsys, fmt):
    """``--group-size -1``: one fp16 scale per output row (per channel), which is Q4_0 with
    every block of a row taking the row's scale: the converted GGUF dequantizes to the
    per-channel RTN grid of the original rows exactly."""
    from refquant import gguf
    from refquant.__main__ import main

    t = tiny_llama_gguf(tmp_path / "m.gguf")
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "ck"), "--format", fmt, "--group-size", "-1"]) == 0
    assert main(["inspect", str(tmp_path / "ck")]) == 0
    assert "4-bit, group size per row, symmetric" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "back.gguf")]) == 0
    with gguf.read(tmp_path / "back.gguf") as f:
        for name, w in t.items():
            if name.split(".")[-2] in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
                assert f.tensors[name].type.name == "Q4_0"
                want = affine.quantize(w, 4, granularity="channel", axis=0, scale_dtype=np.float16).dequantize()
                np.testing.assert_array_equal(f.tensor(name).dequantize(), want)


def test_inspect_reports_the_tensors_and_says_which_config_claims_they_do_not_bear_out(tmp_path, capsys):
    """A GPTQ config claiming desc_act over natural-order g_idx: inspect says the layers are
    not act-order and notes the claim; ``inspect | head`` ends quietly (no broken-pipe error)."""
    from refquant.__main__ import main

    tiny_llama_gguf(tmp_path / "m.gguf")
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "ck"), "--format", "gptq", "--group-size", "32"]) == 0
    _edited_config(tmp_path / "ck", "gptq", lambda qc: qc.update(desc_act=True))
    assert main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "7 quantized layers: 4-bit, group size 32, symmetric\n" in out
    assert "note: the config says act-order (desc_act), but no layer's g_idx is permuted" in out
    assert " yes " not in out
    r = subprocess.run(f"{sys.executable} -m refquant inspect {tmp_path / 'ck'} | head -1", shell=True,
                       capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.stdout.startswith(str(tmp_path / "ck")) and "Broken pipe" not in r.stderr and "Traceback" not in r.stderr


def test_smollm2_gptq_export_converts_back_to_the_same_weights(tmp_path, smollm2_path):
    """Calibrated GPTQ (block 0's q, k and down Linears, symmetric INT4 g64, act-order off) exported
    as a GPTQ checkpoint and converted back: Q4_0 tensors that dequantize bit for bit to the
    GPTQ weights the model in memory holds; the other matrices are their float16 values."""
    from refquant import gguf
    from refquant.__main__ import main
    from minigpt_np import corpus, export

    text = "\n".join(ln.split(" => ")[0] for ln in corpus.make_splits().test[:200])
    layers = [f"blk.0.{k}.weight" for k in ("attn_q", "attn_k", "ffn_down")]   # rotary rows, both widths
    mem = export.export(smollm2_path, tmp_path / "ck", method="gptq", layout="gptq", calib_text=text,
                        group_size=64, sequences=2, tokens=32, layers=layers, progress=False)
    assert set(mem) == set(layers) and all(qt.scheme == "gptq_int4_g64" for qt in mem.values())
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "back.gguf"), "--metadata-from",
                 str(smollm2_path)]) == 0
    with gguf.read(tmp_path / "back.gguf") as f, gguf.read(smollm2_path) as src:
        for name, qt in mem.items():
            assert f.tensors[name].type.name == "Q4_0"
            np.testing.assert_array_equal(f.tensor(name).dequantize(), qt.dequantize())
        for name in ("blk.1.attn_q.weight", "blk.29.ffn_down.weight"):
            np.testing.assert_array_equal(f.tensor(name).dequantize(),
                                          src.tensor(name).dequantize().astype(np.float16).astype(np.float32))


def test_export_module_cli(tmp_path, smollm2_path, capsys):
    from minigpt_np import export
    with pytest.raises(SystemExit) as e:
        export.main(["--help"])
    assert e.value.code == 0 and "--calib" in capsys.readouterr().out
    assert export.main([str(smollm2_path), str(tmp_path / "ck"), "--method", "gptq"]) == 2
    assert "needs calibration text" in capsys.readouterr().err and not (tmp_path / "ck").exists()
    assert export.main([str(smollm2_path), str(tmp_path / "ck"), "--method", "awq", "--group-size", "64"]) == 2
    assert "no registered INT4 scheme for method awq with group size 64 (group sizes: 128)" in capsys.readouterr().err


@pytest.mark.parametrize("method,type_name,want_sym", [("gptq", "Q4_0", True), ("rtn", "Q4_1", False)])
def test_smollm2_gptq_exported_as_gguf_blocks_is_the_gptq_model(tmp_path, smollm2_path, method, type_name, want_sym):
    """GPTQ INT4 with an fp16 scale per 32 inputs written as Q4_0 (and RTN asymmetric as Q4_1):
    block 0's Linears read back as those blocks and dequantize bit for bit to the tensors the
    model in memory holds (Q4_1: within the fp16 rounding of m); every other tensor keeps the
    source file's bytes."""
    from refquant import gguf
    from minigpt_np import corpus, export

    text = "\n".join(ln.split(" => ")[0] for ln in corpus.make_splits().test[:200])
    layers = [f"blk.0.{k}" for k in ("attn_q.weight", "attn_v.weight", "ffn_down.weight")]
    r = export.export_gguf(smollm2_path, tmp_path / "out.gguf", method=method, type_name=type_name, calib_text=text,
                           sequences=2, tokens=32, layers=layers, progress=False)
    assert set(r["quantized"]) == set(layers)
    with gguf.read(tmp_path / "out.gguf") as f, gguf.read(smollm2_path) as src:
        assert f.metadata["general.file_type"] == {"Q4_0": 2, "Q4_1": 3}[type_name]
        assert set(f.tensors) == set(src.tensors)
        for name, qt in r["quantized"].items():
            assert qt.meta["sym"] is want_sym and f.tensors[name].type.name == type_name
            got, want = f.tensor(name).dequantize(), qt.dequantize()
            if want_sym:
                np.testing.assert_array_equal(got, want)
            else:   # u·d + m against s·(u - z): m = fp16(-z·s) moves every weight by at most its rounding
                exact_m = max(np.abs(t.zeros.astype(np.float64) * t.scales).max() for t in r["quantized"].values())
                assert 0 < r["m_error"] <= max(exact_m * 2.0 ** -11, 2.0 ** -25)   # fp16: half an ulp, any layer
                assert np.abs(got - want).max() <= r["m_error"] + 4 * np.finfo(np.float32).eps * np.abs(want).max()
        for name in ("blk.0.attn_k.weight", "token_embd.weight", "blk.5.ffn_norm.weight"):
            np.testing.assert_array_equal(np.asarray(f.tensor(name).raw), np.asarray(src.tensor(name).raw))
    with pytest.raises(ValueError, match="no exact GGUF grid"):
        export.export_gguf(smollm2_path, tmp_path / "x.gguf", method="gptq", type_name="Q4_1")
    assert not (tmp_path / "x.gguf").exists()


def _calib_text():
    from minigpt_np import corpus

    return "\n".join(ln.split(" => ")[0] for ln in corpus.make_splits().test[:200])


def test_awq_folded_into_smollm2_leaves_its_output_unchanged(smollm2_path):
    """``llama.awq_fold`` before any quantization: q/k/v's columns times ``s`` with
    ``attn_norm`` divided by it, gate/up with ``ffn_norm``, down with up's rows (no v -> o:
    SmolLM2's v has 192 outputs, o 576 inputs) give the same logits as the model as loaded,
    to float32 rounding, while the scales themselves are far from 1."""
    from minigpt_np import export, llama, tokenizer

    params, cfg, _ = llama.load(smollm2_path, dtype="f32")
    seqs = export.calibration_sequences(tokenizer.from_gguf(smollm2_path), _calib_text(), 2, 32)
    folded, X, scales = llama.awq_fold(params, cfg, seqs, group_size=32, sym=True, blocks=[0, 3])
    assert set(scales) == {f"blk.{i}.{s}" for i in (0, 3) for s in ("attn_norm.weight", "ffn_norm.weight",
                                                                      "ffn_up.weight")}
    assert set(X) == {f"blk.{i}.{s}" for i in (0, 3) for s in llama.LINEAR_SUFFIXES}
    assert min(s.max() / s.min() for s in scales.values()) > 2
    ids = seqs[1][:12]
    want, _ = llama.forward(params, cfg, ids)
    got, _ = llama.forward(folded, cfg, ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    np.testing.assert_array_equal(folded["blk.1.attn_norm.weight"], params["blk.1.attn_norm.weight"])
    broken = dict(folded, **{"blk.3.ffn_norm.weight": params["blk.3.ffn_norm.weight"]})   # one fold left out
    assert np.abs(llama.forward(broken, cfg, ids)[0] - want).max() > 100 * np.abs(got - want).max()


@pytest.mark.parametrize("type_name,sym", [("Q4_0", True), ("Q4_1", False)])
def test_smollm2_awq_exported_as_gguf_blocks_is_the_awq_model(tmp_path, smollm2_path, type_name, sym):
    """AWQ to GGUF: asking for one Linear of block 0 quantizes the whole block (its scales
    fold into the block's norms and up rows); its 7 Linears read back as ``type_name``
    blocks that dequantize bit for bit to the model in memory (Q4_1: within the fp16
    rounding of m), the rescaled norms as float32 equal to it, every other tensor keeps the
    source's bytes. An unfolded AWQ tensor has no GGUF form."""
    from refquant import gguf
    from refquant.gguf.tensors import as_ggml
    from minigpt_np import export, llama

    r = export.export_gguf(smollm2_path, tmp_path / "awq.gguf", method="awq", type_name=type_name,
                           calib_text=_calib_text(), sequences=2, tokens=32, layers=["blk.0.attn_q.weight"],
                           progress=False)
    assert set(r["quantized"]) == {f"blk.0.{s}" for s in llama.LINEAR_SUFFIXES}
    assert set(r["folded"]) == {"blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"}
    with gguf.read(tmp_path / "awq.gguf") as f, gguf.read(smollm2_path) as src:
        assert set(f.tensors) == set(src.tensors)
        for name, qt in r["quantized"].items():
            assert qt.meta["sym"] is sym and f.tensors[name].type.name == type_name
            got, want = f.tensor(name).dequantize(), qt.dequantize()
            tol = 0 if sym else r["m_error"] + 4 * np.finfo(np.float32).eps * np.abs(want).max()
            assert np.abs(got - want).max() <= tol
        for name, w in r["folded"].items():
            assert f.tensors[name].type.name == "F32"
            np.testing.assert_array_equal(f.tensor(name).dequantize(), w)
            assert not np.array_equal(w, src.tensor(name).dequantize())
        for name in ("blk.1.attn_q.weight", "blk.1.attn_norm.weight", "token_embd.weight"):
            np.testing.assert_array_equal(np.asarray(f.tensor(name).raw), np.asarray(src.tensor(name).raw))
    from refquant import awq
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="no place in a GGUF tensor"):
        as_ggml(awq.awq_quantize(np.ones((2, 64), np.float32) + x[:2], x, group_size=32))


def _edited_config(ck, fmt, edit):
    """Rewrite the quantization config of checkpoint ``ck`` (written as ``fmt``) by ``edit(qc)``."""
    cfg = json.loads((ck / "config.json").read_text())
    qc = cfg["quantization_config"]
    edit(qc if fmt != "compressed-tensors" else qc["config_groups"]["group_0"]["weights"])
    (ck / "config.json").write_text(json.dumps(cfg))
    if (ck / "quantize_config.json").exists():
        (ck / "quantize_config.json").unlink()


# (issue 36, H1-H3) every config field is read as written or refused: missing, null,
# wrong-typed, out of range, or disagreeing with the tensors; never coerced or ignored
BAD_CONFIGS = [
    ("gptq", "bits", lambda qc: qc.pop("bits"), "'bits' is missing"),
    ("gptq", "bits", lambda qc: qc.update(bits=None), "'bits' must be int"),
    ("gptq", "bits", lambda qc: qc.update(bits=4.5), "'bits' must be int"),
    ("gptq", "bits", lambda qc: qc.update(bits="4"), "'bits' must be int"),
    ("gptq", "bits", lambda qc: qc.update(bits=3), "bits 3 is not one of"),
    ("gptq", "sym", lambda qc: qc.update(sym="false"), "'sym' must be bool"),
    ("gptq", "group_size", lambda qc: qc.update(group_size=0), "group_size 0"),
    ("gptq", "group_size", lambda qc: qc.update(group_size=64), r"group_size 64 gives 2 group.* of 128 inputs; the tensors hold 4"),
    ("gptq", "group_size", lambda qc: qc.update(group_size=2**40), "gives 1 group"),
    ("awq", "bits", lambda qc: qc.update(bits=3), "bits 3 is not one of"),
    ("awq", "bits", lambda qc: qc.update(bits=True), "'bits' must be int"),
    ("awq", "group_size", lambda qc: qc.update(group_size=None), "'group_size' must be int"),
    ("compressed-tensors", "num_bits", lambda w: w.update(num_bits=None), "'num_bits' must be int"),
    ("compressed-tensors", "group_size", lambda w: w.update(group_size=-1), "group_size -1 must be a positive"),
    ("compressed-tensors", "group_size", lambda w: w.update(group_size=7), "group_size 7 gives 19 group"),
]


def test_config_fields_are_checked_or_refused(tmp_path):
    from refquant.__main__ import main

    tiny_llama_gguf(tmp_path / "m.gguf")
    for fmt in sorted({c[0] for c in BAD_CONFIGS}):   # one pristine checkpoint per format
        assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / fmt), "--format", fmt,
                     "--group-size", "32"]) == 0
    for i, (fmt, field, edit, message) in enumerate(BAD_CONFIGS):
        ck = tmp_path / f"case{i}"
        shutil.copytree(tmp_path / fmt, ck)
        _edited_config(ck, fmt, edit)
        refused(f"{fmt} {field} ({message})", ValueError, message, checkpoint.read, ck)
        for cmd in (["inspect", str(ck)], ["convert", str(ck), str(tmp_path / "o.gguf")]):
            assert main(cmd) == 2, (fmt, field, cmd)   # a one-line error, not a traceback
        assert not (tmp_path / "o.gguf").exists()


# (issue 36) convert reads config.json's fields as written (the parser, llama.metadata) and
# then checks the model against them as the engines do (llama.config_from_metadata and
# validate, what minigpt_np's engines call): the tiny model has d 64, 4 heads, 2 kv heads,
# ff 128, 16 tokens
BAD_FIELDS = [
    (dict(num_attention_heads=0), "'num_attention_heads' must be a positive integer"),
    (dict(num_attention_heads="4"), "'num_attention_heads' must be a positive integer"),
    (dict(num_attention_heads=None), "'num_attention_heads' must be a positive integer"),
    (dict(hidden_size=True), "'hidden_size' must be a positive integer"),
    (dict(rms_norm_eps="1e-5"), "'rms_norm_eps' must be a positive float32"),
    (dict(rms_norm_eps=-1e-5), "'rms_norm_eps' must be a positive float32"),
    (dict(rope_theta=1e39), "'rope_theta' must be a positive float32"),
    (dict(rope_theta=10**400), "'rope_theta' must be a positive float32"),
    (dict(architectures=5), "convert reads LlamaForCausalLM checkpoints"),
]
BAD_MODELS = [
    (dict(num_hidden_layers=2), r"tensor blk\.1\.attn_norm\.weight is missing"),
    (dict(intermediate_size=96), r"tensor blk\.0\.ffn_gate\.weight has shape \(128, 64\), the config needs \(96, 64\)"),
    (dict(num_attention_heads=3), "d_model 64 is not a multiple of head_count 3"),
    (dict(num_key_value_heads=4), r"tensor blk\.0\.attn_k\.weight has shape \(32, 64\), the config needs \(64, 64\)"),
    (dict(num_key_value_heads=3), "head_count 4 is not a multiple of head_count_kv 3"),
    (dict(vocab_size=20), r"tensor token_embd\.weight has shape \(16, 64\), the config needs \(20, 64\)"),
]


def test_convert_refuses_a_model_its_config_does_not_describe(tmp_path, capsys):
    from refquant.__main__ import main
    from refquant.hf import llama

    tiny_llama_gguf(tmp_path / "m.gguf")
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "ck"), "--format", "gptq", "--group-size", "32"]) == 0
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["vocab_size"] == 16   # the tokenizer's token count: transformers sizes the embedding by it
    ck = checkpoint.read(tmp_path / "ck")
    shapes = {llama.gguf_name(p + ".weight"): q for p, q in ck.quantized.items()}
    shapes.update({llama.gguf_name(n): a for n, a in ck.tensors.items()})
    for edit, message, engines in [(e, m, False) for e, m in BAD_FIELDS] + [(e, m, True) for e, m in BAD_MODELS]:
        (tmp_path / "ck" / "config.json").write_text(json.dumps({**cfg, **edit}))
        assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "o.gguf")]) == 2, edit
        err = capsys.readouterr().err
        assert re.search(message, err), (edit, err)
        assert not (tmp_path / "o.gguf").exists(), edit
        if engines:   # the parser accepts these fields; the engines' own check refuses the model the same way
            meta = llama.metadata({**cfg, **edit})
            refused(edit, ValueError, message, lambda: llama.validate(shapes, llama.config_from_metadata(meta)))


def test_convert_refuses_a_tokenizer_of_another_size_than_the_embedding(tmp_path, capsys):
    """``--metadata-from`` a GGUF whose tokenizer has 20 tokens, for a checkpoint whose
    embedding has 16 rows: the file would make the engines read past the logits."""
    from refquant import gguf
    from refquant.__main__ import main

    t = tiny_llama_gguf(tmp_path / "m.gguf")
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "ck"), "--format", "gptq", "--group-size", "32"]) == 0
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    del cfg["vocab_size"]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with gguf.read(tmp_path / "m.gguf") as f:
        meta = dict(f.metadata, **{"tokenizer.ggml.tokens": [f"t{i}" for i in range(20)]})
    gguf.write(tmp_path / "m20.gguf", meta, t)
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "o.gguf"), "--metadata-from",
                 str(tmp_path / "m20.gguf")]) == 2
    assert "token_embd.weight has shape (16, 64), the config needs (20, 64)" in capsys.readouterr().err
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_a_group_as_wide_as_some_rows_reads_back(tmp_path, fmt):
    """Group size 64 on a model whose attention rows are 64 wide (one group) and MLP rows 128
    (two): the config states 64, and every layer reads back with the exported weights."""
    from refquant.__main__ import main

    tiny_llama_gguf(tmp_path / "m.gguf")
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "ck"), "--format", fmt, "--group-size", "64"]) == 0
    ck = checkpoint.read(tmp_path / "ck")
    assert ck.scheme.group_size == 64 and len(ck.quantized) == 7


@pytest.mark.parametrize("shape", ["list", "string", "not an object"])
def test_config_of_the_wrong_shape_is_refused(tmp_path, shape):
    from refquant.__main__ import main

    tiny_llama_gguf(tmp_path / "m.gguf")
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "ck"), "--format", "compressed-tensors",
                 "--group-size", "32"]) == 0
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    qc = cfg["quantization_config"]
    if shape == "list":
        qc["config_groups"] = [qc["config_groups"]["group_0"]]
    elif shape == "string":
        qc["config_groups"]["group_0"]["weights"] = "int4"
    else:
        cfg["quantization_config"] = [qc]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config_groups|weights object|not an object"):
        checkpoint.read(tmp_path / "ck")
    assert main(["inspect", str(tmp_path / "ck")]) == 2


def test_convert_refuses_non_finite_scales_and_names_the_layer(tmp_path, capsys):
    from refquant.__main__ import main
    from refquant.hf import safetensors

    tiny_llama_gguf(tmp_path / "m.gguf")
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "ck"), "--format", "gptq", "--group-size", "32"]) == 0
    tensors, meta = safetensors.read(tmp_path / "ck" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.scales"
    tensors[name] = tensors[name].copy()
    tensors[name][0, 3] = np.nan
    safetensors.write(tmp_path / "ck" / "model.safetensors", tensors, meta)
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "o.gguf")]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.up_proj" in err and "non-finite" in err and not (tmp_path / "o.gguf").exists()
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "o.gguf"), "--allow-nonfinite"]) == 0


def _tree(d):
    """Every file under ``d`` with its bytes' hash (None if ``d`` does not exist)."""
    import hashlib

    d = Path(d)
    if not d.exists():
        return None
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_export_into_a_non_empty_directory_needs_force(tmp_path, capsys):
    from refquant.__main__ import main

    tiny_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / "ck"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    args = ["export", str(tmp_path / "m.gguf"), str(out), "--format", "awq", "--group-size", "32"]
    assert main(args) == 2 and "--force" in capsys.readouterr().err and _tree(out) == {"mine.txt": _tree(out)["mine.txt"]}
    assert main([*args, "--force"]) == 0
    assert sorted(_tree(out)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                  "tokenizer_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "m.gguf"]   # nothing left beside it


_KILLED_EXPORT = """
import os, sys
from refquant.__main__ import main
real, calls = os.rename, [0]
def rename(a, b):
    calls[0] += 1
    if str(calls[0]) == sys.argv[1]:
        os._exit(9)          # killed: no cleanup runs
    real(a, b)
os.rename = rename
import shutil
real_rmtree = shutil.rmtree
def rmtree(p, *a, **k):
    if str(p).endswith(".old") and sys.argv[1] == "rmtree":
        os._exit(9)
    real_rmtree(p, *a, **k)
shutil.rmtree = rmtree
sys.exit(main(["export", sys.argv[2], sys.argv[3], "--format", "gptq", "--group-size", "32", "--force"]))
"""


@pytest.mark.parametrize("kill_at", ["1", "2", "rmtree"])
def test_a_killed_export_leaves_the_old_or_the_new_checkpoint(tmp_path, kill_at):
    """Killed before the old directory moves aside (1), between the two renames (2), or while
    the old one is removed (rmtree): the next writer's recovery leaves the old checkpoint or
    the new one, whole, and its own run ends with the new one and no temporary files."""

    from refquant._atomic import recover_directory
    from refquant.__main__ import main

    tiny_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / "ck"
    assert main(["export", str(tmp_path / "m.gguf"), str(out), "--format", "awq", "--group-size", "32"]) == 0
    old = _tree(out)
    r = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, kill_at, str(tmp_path / "m.gguf"), str(out)],
                       cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert r.returncode == 9, r.stderr[-2000:]
    recover_directory(out)
    after = _tree(out)
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "new"), "--format", "gptq", "--group-size", "32"]) == 0
    new = _tree(tmp_path / "new")
    assert old != new and after == (new if kill_at == "rmtree" else old), kill_at   # rolled back, or finished
    assert main(["export", str(tmp_path / "m.gguf"), str(out), "--format", "gptq", "--group-size", "32", "--force"]) == 0
    assert _tree(out) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "m.gguf", "new"]


@pytest.mark.slow   # 24 real kills at random times
def test_exports_killed_at_random_times_leave_the_old_or_the_new_checkpoint(tmp_path):
    import random
    import signal
    import time

    from refquant._atomic import recover_directory
    from refquant.__main__ import main

    tiny_llama_gguf(tmp_path / "m.gguf")
    out, ref = tmp_path / "ck", tmp_path / "ref"
    cmd = lambda fmt, d: ["export", str(tmp_path / "m.gguf"), str(d), "--format", fmt, "--group-size", "32"]  # noqa: E731
    assert main(cmd("gptq", ref)) == 0
    new = _tree(ref)
    assert main(cmd("awq", out)) == 0
    old = _tree(out)
    rng = random.Random(0)
    t0 = time.perf_counter()
    assert subprocess.run([sys.executable, "-m", "refquant", *cmd("gptq", tmp_path / "timed")],
                          cwd=Path(__file__).parents[1], capture_output=True).returncode == 0
    span = time.perf_counter() - t0
    seen = set()
    for _ in range(24):
        p = subprocess.Popen([sys.executable, "-m", "refquant", *cmd("gptq", out), "--force"],
                             cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 1.0) * span)
        p.send_signal(signal.SIGKILL)
        p.wait()
        recover_directory(out)
        after = _tree(out)
        assert after in (old, new)
        seen.add("new" if after == new else "old")
        if after == new:   # back to the old one for the next kill
            assert main([*cmd("awq", out), "--force"]) == 0
    assert main([*cmd("gptq", out), "--force"]) == 0 and _tree(out) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "m.gguf", "ref", "timed"]


@pytest.mark.slow   # 20 real kills at random times
def test_converts_killed_at_random_times_leave_the_old_or_the_new_file(tmp_path):
    """``convert`` writes one GGUF through ``gguf.write`` (a temporary file renamed in): killed
    at any time, the output is the old file or the new one, and the next run removes what
    the killed one left."""
    import random
    import signal
    import time

    from refquant.__main__ import main

    tiny_llama_gguf(tmp_path / "m.gguf")
    for fmt in ("gptq", "awq"):
        assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / fmt), "--format", fmt, "--group-size", "32"]) == 0
    out = tmp_path / "out.gguf"
    convert = lambda fmt: ["convert", str(tmp_path / fmt), str(out), "--metadata-from", str(tmp_path / "m.gguf")]  # noqa: E731
    assert main(convert("gptq")) == 0
    new = out.read_bytes()
    assert main(convert("awq")) == 0
    old = out.read_bytes()
    assert old != new
    t0 = time.perf_counter()
    assert main(convert("awq")) == 0
    span = max(time.perf_counter() - t0, 0.05) + 1.0   # + the interpreter's start
    rng = random.Random(1)
    for _ in range(20):
        p = subprocess.Popen([sys.executable, "-m", "refquant", *convert("gptq")], cwd=Path(__file__).parents[1],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.2) * span)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert out.read_bytes() in (old, new)
        if out.read_bytes() == new:
            assert main(convert("awq")) == 0
    assert main(convert("gptq")) == 0 and out.read_bytes() == new
    assert not list(tmp_path.glob(".*.tmp"))
