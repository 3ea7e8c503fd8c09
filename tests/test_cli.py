"""`python -m refquant`: inspect, quantize -> compare, dequantize, and bad-file handling."""
import re
import subprocess
import sys

import numpy as np
import pytest

from refquant import gguf
from refquant.__main__ import main
from tests.oracles import refused


def test_inspect_smollm2_prints_every_tensor(smollm2_path, capsys):
    assert main(["inspect", str(smollm2_path)]) == 0
    out = capsys.readouterr().out
    assert "GGUF v3" in out and "tokenizer.ggml.tokens" in out and "[49152 x str]" in out
    rows = [l for l in out.splitlines() if re.match(r"^(blk\.|token_embd|output)", l)]
    with gguf.read(smollm2_path) as f:
        assert len(rows) == len(f.tensors) == 272
        info = f.tensors["blk.0.attn_q.weight"]
    row = next(l for l in rows if l.startswith("blk.0.attn_q.weight "))
    assert row.split()[1:] == ["576x576", "Q4_1", str(info.nbytes), "5.000"]  # Q4_1: 20 bytes / 32 weights


def test_quantize_to_q8_0_then_compare_is_above_40_db(smollm2_path, tmp_path, capsys):
    out = tmp_path / "q8.gguf"
    assert main(["quantize", str(smollm2_path), str(out), "--type", "Q8_0", "--keep", "output_norm*"]) == 0
    with gguf.read(out) as f:
        types = {n: i.type.name for n, i in f.tensors.items()}
        assert f.metadata["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    capsys.readouterr()
    assert main(["compare", str(smollm2_path), str(out)]) == 0
    table = capsys.readouterr().out.splitlines()[1:]
    sqnr = {l.split()[0]: float(l.split()[-1]) for l in table}
    quantized = [n for n, t in types.items() if t == "Q8_0"]
    assert len(quantized) == 211
    assert min(sqnr[n] for n in quantized) > 40.0
    assert all(sqnr[n] == float("inf") for n, t in types.items() if t == "F32")


def test_dequantize_writes_f32_equal_to_the_decoded_tensors(tmp_path, capsys):
    w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    src = gguf.write(tmp_path / "q.gguf", {"general.file_type": np.uint32(15)},
                     {"w": gguf.GGUFTensor("Q4_K", w.shape, gguf.quantize(w, "Q4_K"))})
    assert main(["dequantize", str(src), str(tmp_path / "f.gguf")]) == 0
    with gguf.read(src) as a, gguf.read(tmp_path / "f.gguf") as b:
        assert b.tensors["w"].type.name == "F32"
        np.testing.assert_array_equal(b.tensor("w").numpy(), a.tensor("w").dequantize())
        assert b.metadata["general.file_type"] == 0


def test_bad_files_exit_2_with_a_message(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    assert main(["inspect", str(bad)]) == 2
    assert "error: metadata count 18446744073709551615 at byte 16 cannot fit" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.gguf")]) == 2
    assert main(["quantize", str(bad), str(tmp_path / "o.gguf"), "--type", "Q4_K"]) == 2
    assert not (tmp_path / "o.gguf").exists()


def test_module_entry_point_runs(tmp_path):
    f = gguf.write(tmp_path / "t.gguf", {"a": 1}, {"t": np.ones(8, np.float32)})
    r = subprocess.run([sys.executable, "-m", "refquant", "inspect", str(f)], capture_output=True, text=True)
    assert r.returncode == 0 and "total: 8 weights in 32 bytes" in r.stdout
    r = subprocess.run([sys.executable, "-m", "refquant", "quantize", str(f), str(f) + ".o", "--type", "IQ2_XXS"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "cannot quantize to IQ2_XXS" in r.stderr


def test_compare_reports_empty_and_non_finite_tensors_and_goes_on(tmp_path, capsys):
    """Files gguf.write itself writes: an empty tensor and a NaN weight get a line each, the
    table is complete, and the exit code says something needs a look."""
    f = gguf.write(tmp_path / "z.gguf", {}, {"zero": np.zeros((0, 4), np.float32),
                                             "nan": np.array([[1.0, np.nan]], np.float32),
                                             "ok": np.ones((2, 2), np.float32)})
    assert main(["inspect", str(f)]) == 0
    assert main(["compare", str(f), str(f)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^zero .* empty$", out, re.M)
    assert re.search(rf"^nan .* not compared: A \({re.escape(str(f))}\) has 1 non-finite values", out, re.M)
    assert re.search(r"^ok .* 0 +inf$", out, re.M)
    g = gguf.write(tmp_path / "n.gguf", {}, {"nan": np.r_[np.ones(31), np.nan].astype(np.float32).reshape(1, 32),
                                             "ok": np.ones((2, 32), np.float32)})
    assert main(["quantize", str(g), str(tmp_path / "q.gguf"), "--type", "Q8_0"]) == 1   # refused, file complete
    err = capsys.readouterr().err
    assert f"{g}: tensor 'nan' has 1 non-finite values, the first at index (0, 31); kept as it was" in err
    with gguf.read(tmp_path / "q.gguf") as q:
        assert q.tensors["nan"].type.name == "F32" and q.tensors["ok"].type.name == "Q8_0"
    assert main(["quantize", str(g), str(tmp_path / "q2.gguf"), "--type", "Q8_0", "--allow-nonfinite"]) == 0
    with gguf.read(tmp_path / "q2.gguf") as q:
        assert q.tensors["nan"].type.name == "Q8_0"
    assert main(["dequantize", str(g), str(tmp_path / "d.gguf")]) == 1
    assert "tensor 'nan' has 1 non-finite values" in capsys.readouterr().err


def test_messages_from_hostile_files_are_one_short_line(tmp_path, capsys):
    """A 200 kB metadata key in a malformed file gives one line of at most 300 characters."""
    p = gguf.write(tmp_path / "k.gguf", {"k" * 200_000: np.uint32(1)}, {"t": np.ones(2, np.float32)})
    raw = bytearray(p.read_bytes())
    raw[4:8] = np.uint32(7).tobytes()            # an unsupported version: the error names the file
    bad = tmp_path / ("x" * 200 + ".gguf")
    bad.write_bytes(bytes(raw))
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and len(err[0]) <= 300 and "unsupported GGUF version 7" in err[0]
    with pytest.raises(gguf.GGUFError) as e:
        gguf.write(tmp_path / "w.gguf", {}, {"n" * 100_000: np.ones(1, np.float32)})
    assert len(str(e.value)) <= 300


# Every numeric option of every CLI, fed 0, a negative, NaN and a huge value: each one the
# option does not take ends in argparse's one-line usage error (exit 2), before any work.
NUMERIC_OPTIONS = [   # (module, the other arguments, option, the values of the four it accepts)
    ("refquant.hf.cli", ["export", "in.gguf", "out", "--format", "gptq"], "--bits", ()),
    ("refquant.hf.cli", ["export", "in.gguf", "out", "--format", "gptq"], "--group-size", ()),
    ("minigpt_np.export", ["m.gguf", "out"], "--group-size", ()),
    ("minigpt_np.export", ["m.gguf", "out"], "--sequences", ()),
    ("minigpt_np.export", ["m.gguf", "out"], "--tokens", ()),
    ("minigpt_np.evaluate", [], "--limit", ()),
    ("minigpt_np.evaluate", [], "--tokens", ()),
    ("minigpt_np.generate", ["--prompt", "x"], "-n", ()),
    ("minigpt_np.generate", ["--prompt", "x"], "--temp", ("0",)),
    ("minigpt_np.generate", ["--prompt", "x"], "--seed", ("0",)),
    ("minigpt_np.generate", ["--prompt", "x"], "--ctx-size", ()),
    ("minigpt_np.train", [], "--steps", ()),
    ("minigpt_np.train", [], "--batch-size", ()),
    ("minigpt_np.train", [], "--lr", ()),
    ("minigpt_np.train", [], "--warmup", ("0",)),
    ("minigpt_np.train", [], "--seed", ("0",)),
    ("minigpt_np.train", [], "--eval-lines", ()),
    ("benchmarks.schemes", [], "--size", ()),
    ("benchmarks.quantize", [], "--repeats", ()),
    ("benchmarks.pareto", [], "--limit", ()),
    ("benchmarks.decode", [], "-n", ()),
    ("minigpt_np.imatrix", ["m.gguf", "--text", "t.txt"], "-c", ()),
    ("minigpt_np.imatrix", ["m.gguf", "--text", "t.txt"], "--chunks", ()),
    ("minigpt_np.kld", ["--base", "m.gguf"], "-c", ()),
    ("minigpt_np.kld", ["--base", "m.gguf"], "--chunks", ()),
]


def test_every_numeric_option_is_range_checked(capsys):
    import importlib

    for module, args, option, accepted in NUMERIC_OPTIONS:   # (the module that defines the option)
        main_ = importlib.import_module({"refquant.hf.cli": "refquant.__main__"}.get(module, module)).main
        for value in ("0", "-5", "nan", "1" + "0" * 30):
            if value in accepted:
                continue
            e = refused(f"{module} {option} {value}", SystemExit, "", main_, [*args, option, value])
            assert e.code == 2, (module, option, value)
            err = capsys.readouterr().err.strip().splitlines()
            assert f"error: argument {option}" in err[-1], (module, err)


def test_no_numeric_option_escapes_the_range_checks():
    """Every ``add_argument`` with a numeric type in the three packages uses ``cli_int`` /
    ``cli_float``, and every such option is in the test above."""
    from pathlib import Path

    root = Path(__file__).parents[1]
    raw, checked = [], set()
    for pkg in ("refquant", "minigpt_np", "benchmarks"):
        for p in (root / pkg).rglob("*.py"):
            text = p.read_text()
            raw += [f"{p.name}: {m}" for m in re.findall(r"add_argument\([^)]*type=(?:int|float)\b", text)]
            mod = ".".join(p.relative_to(root).with_suffix("").parts)
            checked |= {(mod, o) for o in re.findall(r"add_argument\(\"(-[-\w]+)\"[^\n]*type=cli_(?:int|float)", text)}
    assert raw == []
    assert len(checked) >= 19 and checked == {(m, o) for m, _, o, _ in NUMERIC_OPTIONS}


def test_a_full_disk_names_the_output_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """ENOSPC (a write names no file) during quantize and export: a one-line error naming
    the output, and no file or directory of it left behind (issue 36, F2)."""
    import errno
    import os

    from tests.test_hf_checkpoint import tiny_llama_gguf

    tiny_llama_gguf(tmp_path / "m.gguf")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(tmp_path / "m.gguf"), str(out), "--type", "Q8_0"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(out) in err
    ck = tmp_path / "ck"
    assert main(["export", str(tmp_path / "m.gguf"), str(ck), "--format", "gptq", "--group-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(ck) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
