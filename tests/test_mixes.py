"""llama-quantize's mixes: ``refquant.gguf.mixes.plan`` against the type of every tensor that
llama-quantize itself (llama.cpp 0c1e570) chose for SmolLM2 and MiniGPT, per file type, with
and without an importance matrix, and under its switches (``tests/data/mix_tables.json.gz``,
written by ``tests/data/make_mix_tables.py``)."""
import gzip
import json
from pathlib import Path

import pytest

from refquant import gguf
from refquant.gguf import mixes
from tests.conftest import smollm2_gguf

pytestmark = pytest.mark.oracle   # llama-quantize's own choices and files are the oracle

TABLES = json.loads(gzip.open(Path(__file__).parent / "data" / "mix_tables.json.gz", "rt").read())
MINIGPT = Path(__file__).resolve().parents[1] / "minigpt_np" / "checkpoints" / "minigpt.gguf"
SWITCHES = {"pure": mixes.Options(pure=True), "output_q8_0": mixes.Options(output_tensor_type="q8_0"),
            "token_embd_q5_k": mixes.Options(token_embedding_type="q5_k"),
            "tensor_types": mixes.Options(tensor_types=[("attn_v", "q8_0"), (r"blk\.1[0-9]\.ffn", "iq4_nl")]),
            "leave_output": mixes.Options(leave_output_tensor=True)}


def _model(key):
    path = smollm2_gguf() if key == "smollm2" else MINIGPT
    with gguf.read(path) as f:
        return dict(f.metadata), {n: i.shape for n, i in f.tensors.items()}


def _runs():
    for key, t in TABLES["models"].items():
        for part in ("plain", "imatrix", "switches"):
            for label in t[part]:
                yield pytest.param(key, part, label, id=f"{key}-{part}-{label}")


def test_the_tables_cover_every_file_type_and_both_models():
    assert TABLES["llama.cpp"] == "0c1e570"
    for t in TABLES["models"].values():
        assert set(t["imatrix"]) == set(mixes.FTYPES)
        assert set(t["plain"]) == {f for f in mixes.FTYPES
                                   if not mixes.requires_imatrix("blk.0.ffn_down.weight", mixes.FTYPES[f][1], f)}
        assert set(t["switches"]) == set(SWITCHES)


@pytest.mark.parametrize("key, part, label", list(_runs()))
def test_every_tensor_gets_llama_quantize_type(key, part, label):
    """Every tensor of the model, in llama-quantize's order, gets the type it chose (all F32
    sources: a tensor it leaves alone stays F32); where it refused, the same refusal."""
    meta, shapes = _model(key)
    t = TABLES["models"][key]
    run = t[part][label]
    ftype = "Q4_K_M" if part == "switches" else label
    options = SWITCHES[label] if part == "switches" else mixes.Options(imatrix=part == "imatrix")
    if "error" in run:
        with pytest.raises(ValueError, match=run["error"].replace("q1_0", "Q1_0")):
            mixes.plan(meta, shapes, ftype, options)
        return
    got = mixes.plan(meta, shapes, ftype, options)
    assert [n for n, _ in got] == t["tensors"]
    want = run["types"].split()
    bad = [(n, g, w) for (n, g), w in zip(got, want) if g != w]
    assert not bad, f"{len(bad)} tensors differ, first {bad[:3]}"


def test_the_rules_pick_what_their_comments_say():
    """Hand-derived cases of the rules, independent of the tables: use_more_bits on 30
    layers, the tied output, SmolLM2's 576-wide rows falling back (Q2_K and Q3_K to Q4_0
    since llama.cpp's 2026 table), and the file-type names."""
    picked = [i for i in range(30) if mixes._more_bits(i, 30)]
    assert picked == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert mixes.fallback("x", (8, 576), "Q2_K") == "Q4_0" and mixes.fallback("x", (8, 576), "Q3_K") == "Q4_0"
    assert mixes.fallback("x", (8, 576), "Q4_K") == "Q5_0" and mixes.fallback("x", (8, 512), "Q4_K") == "Q4_K"
    assert mixes.fallback("x", (8, 100), "Q4_K") == "F16"
    assert mixes.ftype("q4_k") == "Q4_K_M"
    with pytest.raises(ValueError, match="unknown file type"):
        mixes.ftype("Q4_K_X")
    meta, shapes = _model("minigpt")
    plan = dict(mixes.plan(meta, shapes, "Q4_0"))
    assert plan["token_embd.weight"] == "Q6_K"      # tied: the output's rule
    assert plan["position_embd.weight"] == "F32" and plan["blk.0.attn_norm.weight"] == "F32"


def test_the_single_type_fallback_is_llama_quantize_one():
    """``quants.FALLBACK`` (``quantize --type``, ``llama.fit_scheme``) is ``mixes.fallback``
    for every quantizable type with blocks over 32."""
    from refquant.gguf import quants

    big = [t for t in quants.quantizable() if quants.TYPES[t].block_size > 32 and t != "Q8_K"]
    assert {t: mixes.fallback("x", (1, 576), t) for t in big} == quants.FALLBACK


# ----------------------------------------------------------------------------- the command line
ROOT = Path(__file__).resolve().parents[1]
IMATRIX = "tests/data/minigpt_imatrix.gguf"     # as llama-quantize was given it (quantize.imatrix.file)


def _quantize(tmp_path, *args, cwd=ROOT):
    from refquant.__main__ import main

    out = tmp_path / "out.gguf"
    import os
    old = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(["quantize", str(MINIGPT), str(out), *args])
    finally:
        os.chdir(old)
    return code, out


@pytest.mark.parametrize("label", sorted(TABLES["files"]))
def test_quantize_ftype_writes_llama_quantize_file_byte_for_byte(tmp_path, label):
    """``python -m refquant quantize minigpt.gguf out.gguf --ftype F [--imatrix FILE]`` writes
    the very file llama-quantize writes (its sha256, committed): tensor order, types, bytes
    with and without the importance matrix, metadata and its order, padding."""
    import hashlib

    ft, _, im = label.partition("+")
    code, out = _quantize(tmp_path, "--ftype", ft, *(["--imatrix", IMATRIX] if im else []))
    assert code == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == TABLES["files"][label]


def test_quantize_ftype_refusals_write_nothing(tmp_path, capsys):
    """What llama-quantize refuses, refused before anything is written, naming the tensor."""
    from refquant.gguf import imatrix

    cases = [(["--ftype", "Q2_K_S"], "blk.0.attn_output.weight.*requires an importance matrix"),
             (["--ftype", "IQ2_XXS", "--imatrix", IMATRIX], "IQ2_XXS, which refquant cannot write yet"),
             (["--ftype", "Q4_K_M", "--imatrix", str(MINIGPT)], "not an importance matrix"),
             (["--ftype", "Q4_K_M", "--tensor-type", "attn_v"], None),
             (["--ftype", "Q4_K_X"], "unknown file type")]
    bad = imatrix.read(ROOT / IMATRIX)
    bad.sums["blk.1.ffn_up.weight"] = bad.sums["blk.1.ffn_up.weight"][:, :100]
    imatrix.write(tmp_path / "bad.gguf", bad)
    cases.append((["--ftype", "Q4_K_M", "--imatrix", str(tmp_path / "bad.gguf")],
                  "imatrix size 100 of 'blk.1.ffn_up.weight' is different"))
    for args, match in cases:
        try:
            code, out = _quantize(tmp_path, *args)
        except SystemExit as e:
            code, out = e.code, tmp_path / "out.gguf"
        assert code not in (0, None), args
        assert not out.exists(), args
        if match:
            import re
            assert re.search(match, capsys.readouterr().err), args
    code, out = _quantize(tmp_path, "--ftype", "Q4_K_M")
    assert code == 0
    code, again = 0, tmp_path / "re.gguf"
    from refquant.__main__ import main
    assert main(["quantize", str(out), str(again), "--ftype", "Q8_0"]) == 2
    assert "requantizing from type q6_k is disabled" in capsys.readouterr().err and not again.exists()
    assert main(["quantize", str(out), str(again), "--ftype", "Q8_0", "--allow-requantize"]) == 0
