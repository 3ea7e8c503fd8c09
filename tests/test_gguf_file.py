"""GGUF files: byte-exact round trips, every metadata type, interop with gguf-py, atomic
writes, and a reader that rejects malformed files with GGUFError (targeted cases here,
Hypothesis mutation fuzzing below)."""
import hashlib
import os
import re
import struct
import tracemalloc
from collections import Counter

import numpy as np
import pytest
from hypothesis import event, given, settings, strategies as st

from refquant import gguf
from refquant.gguf import GGUFError, GGUFTensor, quants


# --------------------------------------------------------------------- a hand-built file
# Written with struct straight from the GGUF spec, independently of refquant's writer, and
# recording where every count, length, type id, dimension and offset sits (for the fuzzer).

def _s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def hand_built():
    """(file bytes, metadata, tensors, fields) for a small valid GGUF v3 file; ``fields``
    lists (byte offset, width, what) of every structural integer."""
    fields, out = [], bytearray(b"GGUF")
    def num(fmt, v, what):
        fields.append((len(out), struct.calcsize(fmt), what))
        out.extend(struct.pack("<" + fmt, v))
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    tensors = {"tok.weight": w, "q.weight": (quants.quantize(w, "Q4_K"), "Q4_K"), "norm": np.arange(8, dtype=np.float32)}
    meta = {"general.architecture": "test", "x.count": np.uint32(7), "x.ids": np.array([1, -2, 3], np.int32),
            "x.names": ["a", "bc", ""], "x.flag": True}
    num("I", 3, "version")
    num("Q", len(tensors), "n_tensors")
    num("Q", len(meta), "n_kv")
    def key(k):
        num("Q", len(k.encode()), "key length")
        out.extend(k.encode())
    key("general.architecture"); num("I", 8, "value type"); num("Q", 4, "string length"); out.extend(b"test")
    key("x.count"); num("I", 4, "value type"); out.extend(struct.pack("<I", 7))
    key("x.ids"); num("I", 9, "value type"); num("I", 5, "array type"); num("Q", 3, "array count")
    out.extend(np.array([1, -2, 3], "<i4").tobytes())
    key("x.names"); num("I", 9, "value type"); num("I", 8, "array type"); num("Q", 3, "array count")
    for s in (b"a", b"bc", b""):
        num("Q", len(s), "string length")
        out.extend(s)
    key("x.flag"); num("I", 7, "value type"); out.extend(b"\x01")
    datas, offset = [], 0
    for name, t in tensors.items():
        raw, tname, shape = (t.view(np.uint8).ravel(), "F32", t.shape) if isinstance(t, np.ndarray) else (t[0].ravel(), t[1], w.shape)
        num("Q", len(name), "name length")
        out.extend(name.encode())
        num("I", len(shape), "n_dims")
        for d in shape[::-1]:
            num("Q", d, "dimension")
        num("I", quants.TYPES[tname].id, "ggml type")
        num("Q", offset, "tensor offset")
        datas.append(raw.tobytes() + b"\0" * (-raw.size % 32))
        offset += len(datas[-1])
    out.extend(b"\0" * (-len(out) % 32))
    out.extend(b"".join(datas))
    return bytes(out), meta, tensors, fields


def test_reader_parses_the_hand_built_file(tmp_path):
    data, meta, tensors, _ = hand_built()
    p = tmp_path / "h.gguf"
    p.write_bytes(data)
    with gguf.read(p) as f:
        assert list(f.metadata) == list(meta)
        assert f.metadata["x.count"] == 7 and isinstance(f.metadata["x.count"], np.uint32)
        np.testing.assert_array_equal(f.metadata["x.ids"], [1, -2, 3])
        assert f.metadata["x.names"] == ["a", "bc", ""] and f.metadata["x.flag"] is True
        np.testing.assert_array_equal(f.tensor("tok.weight").numpy(), tensors["tok.weight"])
        assert f.tensors["q.weight"].type.name == "Q4_K" and f.tensors["q.weight"].shape == (4, 256)
        np.testing.assert_array_equal(f.tensor("q.weight").raw, tensors["q.weight"][0].ravel())


def test_writer_reproduces_the_hand_built_file(tmp_path):
    data, meta, tensors, _ = hand_built()
    ts = {k: (GGUFTensor("Q4_K", (4, 256), v[0]) if isinstance(v, tuple) else v) for k, v in tensors.items()}
    p = gguf.write(tmp_path / "w.gguf", meta, ts)
    assert p.read_bytes() == data


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_smollm2_read_then_write_is_byte_identical(smollm2_path, tmp_path):
    with gguf.read(smollm2_path) as f:
        assert f.version == 3 and len(f.tensors) == 272
        assert f.metadata["general.architecture"] == "llama"
        out = gguf.write(tmp_path / "copy.gguf", f.metadata, {n: f.tensor(n) for n in f.tensors})
    assert sha256(out) == sha256(smollm2_path)


ALL_VALUES = {
    "u8": np.uint8(255), "i8": np.int8(-128), "u16": np.uint16(65535), "i16": np.int16(-32768),
    "u32": np.uint32(2**32 - 1), "i32": np.int32(-(2**31)), "u64": np.uint64(2**64 - 1), "i64": np.int64(-(2**63)),
    "f32": np.float32(1.5e-45), "f64": np.float64(np.pi), "b": False, "s": "grüße ✓",
    "py_int": 5, "py_big": 2**40, "py_float": 0.1, "empty_s": "",
    "arr_u8": np.arange(5, dtype=np.uint8), "arr_i64": np.array([-1, 2**62], np.int64),
    "arr_f64": np.array([0.5, -np.inf]), "arr_bool": np.array([True, False]), "arr_s": ["x", "", "ζ"],
    "nested": [np.array([1, 2], np.int16), np.array([3], np.int16)], "nested_s": [["a"], ["b", "c"]],
    "empty_arr": np.array([], np.float32),
}


def test_every_metadata_type_round_trips(tmp_path):
    p = gguf.write(tmp_path / "m.gguf", ALL_VALUES, {"t": np.ones((2, 3), np.float32)})
    with gguf.read(p) as f:
        got = f.metadata
    assert list(got) == list(ALL_VALUES)
    for k, v in ALL_VALUES.items():
        g = got[k]
        if isinstance(v, np.ndarray):
            assert g.dtype == v.dtype and np.array_equal(g, v), k
        elif isinstance(v, np.generic):
            assert type(g) is type(v) and g == v, k
        elif k == "nested":
            assert len(g) == len(v) and all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(g, v))
        elif k == "py_int":
            assert g == 5 and isinstance(g, np.int32)
        elif k == "py_big":
            assert g == 2**40 and isinstance(g, np.int64)
        elif k == "py_float":
            assert g == np.float32(0.1) and isinstance(g, np.float32)
        else:
            assert g == v and type(g) is type(v), k
    # and again: read -> write is stable byte for byte
    with gguf.read(p) as f:
        q = gguf.write(tmp_path / "m2.gguf", f.metadata, {n: f.tensor(n) for n in f.tensors})
    assert sha256(p) == sha256(q)


@pytest.mark.oracle
def test_gguf_py_reads_our_files_and_we_read_theirs(tmp_path):
    from tests.conftest import gguf_py as need_gguf_py

    gguf_py = need_gguf_py()
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    q8 = quants.quantize(w, "Q8_0")
    ours = gguf.write(tmp_path / "ours.gguf", {"general.architecture": "llama", "k": np.uint32(3), "names": ["a", "b"]},
                      {"w": w, "q": GGUFTensor("Q8_0", w.shape, q8), "h": w.astype(np.float16)})
    r = gguf_py.GGUFReader(ours)
    assert r.fields["k"].parts[-1][0] == 3 and str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8") == "llama"
    by_name = {t.name: t for t in r.tensors}
    np.testing.assert_array_equal(np.asarray(by_name["w"].data).reshape(w.shape), w)
    np.testing.assert_array_equal(np.asarray(by_name["q"].data).reshape(q8.shape), q8)
    assert by_name["h"].tensor_type == gguf_py.GGMLQuantizationType.F16

    wr = gguf_py.GGUFWriter(tmp_path / "theirs.gguf", "llama")
    wr.add_uint32("k", 9)
    wr.add_array("names", ["p", "q"])
    wr.add_tensor("w", w)
    wr.write_header_to_file(); wr.write_kv_data_to_file(); wr.write_tensors_to_file(); wr.close()
    with gguf.read(tmp_path / "theirs.gguf") as f:
        assert f.metadata["k"] == 9 and f.metadata["names"] == ["p", "q"]
        np.testing.assert_array_equal(f.tensor("w").numpy(), w)


def test_write_is_atomic_on_failure(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"previous contents")

    def boom():
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        gguf.write(target, {"a": 1}, {"x": np.ones(4, np.float32), "y": GGUFTensor("F32", (4,), boom)})
    assert target.read_bytes() == b"previous contents"
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]  # no temporary left behind
    with pytest.raises(GGUFError, match="needs 16 uint8 bytes, got 12"):
        gguf.write(tmp_path / "new.gguf", {}, {"y": GGUFTensor("F32", (4,), np.zeros(12, np.uint8))})
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]


def test_written_file_has_ordinary_permissions(tmp_path):
    """The temporary file behind the atomic rename must not leave the result private (0600)."""
    umask = os.umask(0o022)
    try:
        out = gguf.write(tmp_path / "m.gguf", {"a": 1}, {"x": np.ones(4, np.float32)})
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("meta, tensors, match", [
    ({"": 1}, {}, "non-empty strings"),
    ({"k": np.uint8(3) + np.zeros(2, np.uint8).reshape(1, 2)}, {}, "1-D"),
    ({"k": [1, "a"]}, {}, "share one type"),
    ({"k": 2**70}, {}, "does not fit"),
    ({"k": {"a": 1}}, {}, "cannot store a dict"),
    ({"general.alignment": 24}, {}, "power of two"),
    ({}, {"x" * 64: np.ones(2, np.float32)}, "under 64 bytes"),
    ({}, {"t": np.ones((1, 1, 1, 1, 2), np.float32)}, "1..4"),
    ({}, {"t": np.ones(3, np.uint8)}, "no ggml type"),
    ({}, {"t": GGUFTensor("Q4_0", (2, 40), np.zeros(1, np.uint8))}, "multiple of 32"),
])
def test_writer_rejects_bad_requests(tmp_path, meta, tensors, match):
    with pytest.raises(GGUFError, match=match):
        gguf.write(tmp_path / "bad.gguf", meta, tensors)
    assert not any(tmp_path.iterdir())


def _patched(data, offset, fmt, value):
    b = bytearray(data)
    struct.pack_into("<" + fmt, b, offset, value)
    return bytes(b)


def _field(fields, what, nth=0):
    return [f for f in fields if f[2] == what][nth]


@pytest.mark.parametrize("mutate, match", [
    (lambda d, f: b"GGUX" + d[4:], "bad magic"),
    (lambda d, f: d[:3], "magic at byte 0 needs 4 bytes"),
    (lambda d, f: _patched(d, 4, "I", 1), "unsupported GGUF version 1"),
    (lambda d, f: _patched(d, 4, "I", 3 << 24), "big-endian"),
    (lambda d, f: _patched(d, 16, "Q", 2**63), "metadata count .* cannot fit"),
    (lambda d, f: _patched(d, 8, "Q", 2**40), "tensor count .* cannot fit"),
    (lambda d, f: _patched(d, _field(f, "key length")[0], "Q", 2**62), "key of metadata entry 0"),
    (lambda d, f: _patched(d, _field(f, "value type")[0], "I", 13), "unknown GGUF value type 13"),
    (lambda d, f: _patched(d, _field(f, "array count")[0], "Q", 2**61), "array count 2305843009213693952"),
    (lambda d, f: _patched(d, _field(f, "array type")[0], "I", 99), "unknown array element type 99"),
    (lambda d, f: _patched(d, _field(f, "n_dims")[0], "I", 5), "5 dimensions"),
    (lambda d, f: _patched(d, _field(f, "dimension")[0], "q", -4), "negative dimension"),
    (lambda d, f: _patched(d, _field(f, "dimension", 1)[0], "Q", 2**40), "needs .* bytes; the file has"),
    (lambda d, f: _patched(d, _field(f, "dimension", 1)[0], "Q", 2**62), "spans more than 2\\^63 - 1 elements"),
    (lambda d, f: _patched(d, _field(f, "ggml type")[0], "I", 4), "unknown ggml type id 4"),
    (lambda d, f: _patched(d, _field(f, "ggml type", 2)[0], "I", 2), "not a multiple of Q4_0's block size"),
    (lambda d, f: _patched(d, _field(f, "tensor offset", 1)[0], "Q", 64), "has data offset 64, expected"),
    (lambda d, f: d[:-40], "runs past the end"),
    (lambda d, f: _patched(d, 4 + 4 + 8 + 8 + 8 + 20 + 4 + 8, "4s", b"\xff\xfe\xfd\xfc"), None),  # non-UTF-8 ok
])
def test_reader_rejects_malformed_files(tmp_path, mutate, match):
    data, _, _, fields = hand_built()
    p = tmp_path / "bad.gguf"
    p.write_bytes(mutate(data, fields))
    if match is None:
        gguf.read(p).close()
        return
    with pytest.raises(GGUFError, match=match):
        gguf.read(p)


def test_reader_rejects_duplicates_and_bad_alignment(tmp_path):
    p = tmp_path / "al.gguf"
    b = bytearray(gguf.write(tmp_path / "al0.gguf", {"general.alignment": 64}, {"t": np.ones(4, np.float32)}).read_bytes())
    struct.pack_into("<I", b, b.index(b"general.alignment") + 17, 5)  # UINT32 -> INT32
    p.write_bytes(bytes(b))
    with pytest.raises(GGUFError, match="general.alignment must be a UINT32"):
        gguf.read(p)
    b2 = bytearray(b)
    struct.pack_into("<I", b2, b.index(b"general.alignment") + 17, 4)
    struct.pack_into("<I", b2, b.index(b"general.alignment") + 21, 48)
    p.write_bytes(bytes(b2))
    with pytest.raises(GGUFError, match="not a power of two"):
        gguf.read(p)
    two = gguf.write(tmp_path / "two.gguf", {"aa": 1, "ab": 2}, {}).read_bytes().replace(b"ab", b"aa")
    p.write_bytes(two)
    with pytest.raises(GGUFError, match="duplicate metadata key 'aa'"):
        gguf.read(p)
    two = gguf.write(tmp_path / "t2.gguf", {}, {"ta": np.ones(8, np.float32), "tb": np.ones(8, np.float32)}).read_bytes()
    p.write_bytes(two.replace(b"tb", b"ta"))
    with pytest.raises(GGUFError, match="duplicate tensor name 'ta'"):
        gguf.read(p)
    p.write_bytes(b"")
    with pytest.raises(GGUFError, match="empty file"):
        gguf.read(p)


# --------------------------------------------------------------------- mutation fuzzing

HUGE = [2**64 - 1, 2**63, 2**63 - 1, 2**32, 2**32 - 1, 2**31, 10**12, 0]


@st.composite
def mutations(draw):
    data, _, _, fields = hand_built()
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "field", "field", "type"]))
        if kind == "truncate":
            del b[draw(st.integers(0, len(b))):]
        elif kind == "flip" and b:
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= draw(st.integers(1, 255))
        elif kind == "field":
            off, width, _ = draw(st.sampled_from(fields))
            if off + width <= len(b):
                v = draw(st.sampled_from(HUGE) | st.integers(0, 2 ** (8 * width) - 1))
                b[off:off + width] = (v % 2 ** (8 * width)).to_bytes(width, "little")
        else:
            cands = [f for f in fields if f[2] in ("value type", "array type", "ggml type")]
            off, width, _ = draw(st.sampled_from(cands))
            if off + width <= len(b):
                b[off:off + width] = draw(st.integers(0, 60)).to_bytes(width, "little")
    return bytes(b)


def _read_fuzzed(blob: bytes, p) -> str:
    """Read a mutated file: success must mean every tensor is in bounds and decodes, failure
    must be a GGUFError, and neither may allocate more than 64 MiB. Returns the outcome."""
    p.write_bytes(blob)
    tracemalloc.start()
    try:
        with gguf.read(p) as f:
            for name, info in f.tensors.items():
                assert info.offset >= f.data_offset and info.offset + info.nbytes <= len(blob)
                assert info.offset % f.alignment == f.data_offset % f.alignment
                t = f.tensor(name)
                assert t.raw.size == info.nbytes
                if info.type.can_dequantize:
                    assert t.dequantize().shape == info.shape
        event("read: ok")
        return "ok"
    except GGUFError as e:
        event("read: GGUFError, " + re.sub(r"\d+|'[^']*'|\([^)]*\)", "_", str(e))[:40])
        return "error"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 64 * 2**20, f"reading a {len(blob)}-byte file allocated {peak} bytes"


def test_fuzz_reader_succeeds_consistently_or_raises_gguf_error(tmp_path):
    """1200 mutated files; the mutations must reach both outcomes (else the checks on a
    successful read would check nothing)."""
    outcomes = Counter()

    @settings(max_examples=1200)
    @given(blob=mutations())
    def one(blob):
        outcomes[_read_fuzzed(blob, tmp_path / "f.gguf")] += 1

    one()
    assert outcomes["ok"] >= 10 and outcomes["error"] >= 10, outcomes


def test_killed_writers_leave_nothing_after_the_next_write(tmp_path):
    """Ten writers SIGKILLed in the middle of ``gguf.write`` each leave ``.NAME.PID.*.tmp``;
    every later write of the same target removes those whose process is gone, and leaves a
    live writer's temp file alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "m.gguf"
    code = ("import sys, time, numpy as np; from refquant import gguf\n"
            "def slow():\n    time.sleep(60); return np.zeros(8, np.uint8)\n"
            "gguf.write(sys.argv[1], {}, {'t': gguf.GGUFTensor('F32', (2,), slow)})\n")
    for _ in range(10):
        p = subprocess.Popen([sys.executable, "-c", code, str(target)])
        deadline = time.time() + 60
        while not list(tmp_path.glob(f".m.gguf.{p.pid}.*.tmp")) and time.time() < deadline:
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL
    # each new writer already removed the temp file of the one killed before it
    assert [t.name.split(".")[3] for t in tmp_path.glob(".m.gguf.*.tmp")] == [str(p.pid)] and not target.exists()
    live = tmp_path / f".m.gguf.{os.getpid()}.abc.tmp"     # a writer that is still running (this process)
    live.write_bytes(b"x")
    other = tmp_path / ".other.gguf.1.abc.tmp"             # another file's temp file is not ours to judge
    other.write_bytes(b"x")
    gguf.write(target, {"general.architecture": "x"}, {"t": np.ones(2, np.float32)})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.gguf", live.name, other.name])


def test_dimensions_no_array_can_have_are_refused(tmp_path):
    """(2^62, 2^62, 0) holds no element but no array can have that shape: both ends refuse it."""
    huge = gguf.GGUFTensor("F32", (2**62, 2**62, 0), np.zeros(0, np.uint8))
    with pytest.raises(gguf.GGUFError, match=r"'v': shape .* spans more than 2\^63 - 1 elements"):
        gguf.write(tmp_path / "z.gguf", {}, {"v": huge})
    assert not list(tmp_path.iterdir())
    ok = gguf.write(tmp_path / "z.gguf", {}, {"v": gguf.GGUFTensor("F32", (4, 4, 0), np.zeros(0, np.uint8))})
    raw = ok.read_bytes()
    dims = np.array([0, 4, 4], "<u8").tobytes()          # (ne0, ne1, ne2) as written
    at = raw.index(dims)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(raw[:at] + np.array([0, 2**62, 2**62], "<u8").tobytes() + raw[at + len(dims):])
    with pytest.raises(gguf.GGUFError, match=r"'v': shape \(4611686018427387904, 4611686018427387904, 0\) spans"):
        gguf.read(bad)


# --- 4-bit affine / GPTQ codes as Q4_0 / Q4_1 blocks (tensors.as_ggml) -----------------------

def _ggml_deq(raw, type_name, shape):
    """gguf-py's dequantization (the oracle) of our blocks."""
    from tests.conftest import gguf_py

    g = gguf_py()
    return g.quants.dequantize(raw, g.constants.GGMLQuantizationType[type_name]).reshape(shape)


def _gptq(rng, shape, **kw):
    from refquant import gptq

    w = rng.standard_normal(shape).astype(np.float32)
    X = rng.standard_normal((4 * shape[1], shape[1])) * rng.uniform(0.2, 3, shape[1])
    return gptq.gptq_quantize(w, gptq.hessian(X), **kw)[0]


@pytest.mark.oracle
@pytest.mark.parametrize("scheme", ["int4_g32", "int4_g128", "gptq_int4_g64"])
def test_symmetric_4bit_codes_are_q4_0_bit_for_bit(rng, scheme):
    from refquant import schemes
    from refquant.gguf.tensors import as_ggml

    w = rng.standard_normal((6, 256)).astype(np.float32)
    X = rng.standard_normal((512, 256))
    qt = schemes.get(scheme).quantize(w, calib=X if scheme.startswith("gptq") else None)
    raw, t, m_err = as_ggml(qt)
    assert (t, m_err, raw.shape) == ("Q4_0", 0.0, (6, 256 // 32 * 18))
    np.testing.assert_array_equal(_ggml_deq(raw, "Q4_0", (6, 256)), qt.dequantize())


@pytest.mark.oracle
def test_asymmetric_gptq_codes_are_q4_1_within_the_rounding_of_m(rng):
    """Q4_1 stores m = fp16(-z·s): each weight moves by |m + z·s| <= half an fp16 ulp of
    z·s (2^-11 |z·s|), plus the float32 rounding of u·d + m."""
    from refquant.gguf.tensors import as_ggml

    qt = _gptq(rng, (8, 256), bits=4, group_size=64, sym=False)
    raw, t, m_err = as_ggml(qt)
    assert t == "Q4_1"
    ref = qt.dequantize().astype(np.float64)
    got = _ggml_deq(raw, "Q4_1", (8, 256)).astype(np.float64)
    zs = np.repeat(qt.zeros.astype(np.float64) * qt.scales.astype(np.float64), 64, axis=1)
    assert 0 < m_err <= np.max(zs) * 2.0 ** -11
    assert np.all(np.abs(got - ref) <= zs * 2.0 ** -11 + 2 * np.abs(ref) * 2.0 ** -24)
    assert np.max(np.abs(got - ref)) <= m_err + 2 * np.max(np.abs(ref)) * 2.0 ** -24
    # the nibbles are the codes themselves
    from refquant import packing

    u = packing.unpack(qt.codes, 4, 256).reshape(8, 256)
    np.testing.assert_array_equal(quants.block_fields(raw, "Q4_1", 256)["codes"][:, :256], u)


def test_as_ggml_refuses_what_llama_cpp_cannot_hold(rng):
    from refquant import affine, schemes
    from refquant.gguf.tensors import as_ggml

    w = rng.standard_normal((4, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="act-order"):
        as_ggml(_gptq(rng, (4, 256), bits=4, group_size=64, act_order=True))
    with pytest.raises(ValueError, match="multiple of 32"):
        as_ggml(affine.quantize(w, 4, granularity="group", group_size=16, scale_dtype=np.float16))
    with pytest.raises(ValueError, match="not fp16"):
        as_ggml(affine.quantize(w, 4, granularity="group", group_size=64))
    with pytest.raises(ValueError, match="4-bit"):
        as_ggml(schemes.get("gptq_int8_channel").quantize(w, calib=rng.standard_normal((64, 256))))
