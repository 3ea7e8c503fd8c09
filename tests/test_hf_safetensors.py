"""refquant.hf.safetensors against the reference reader, the ``safetensors`` package (Rust, serde_json).

Golden cases, one test per finding of issue 36 (S1-S6, the dtypes): hand-built headers whose
verdict is known from the reference's source; ``test_the_cases_agree_with_the_reference``
checks each verdict against the package. Then a differential mutation test: small valid files,
mutated in their header JSON and their bytes, are read by refquant iff the reference reads
them, with the same dtype, shape and bytes, and refused with nothing but ``SafetensorsError``.
The one allowed difference is ``UNSUPPORTED``: dtypes both accept in a header but refquant
cannot turn into arrays.
"""
import itertools
import json
import math
import struct

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from refquant.hf import safetensors
from refquant.hf.safetensors import SafetensorsError
from tests.conftest import need

# The reference's dtypes and their bits per element (safetensors/src/tensor.rs, ``Dtype::bitsize``)
BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
        "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
        "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
# The only difference allowed: valid in a header, refused by ``read`` as "unsupported dtype" (sub-byte
# packings the spec leaves open, and FP8 variants refquant.formats does not define)
UNSUPPORTED = {"F4", "F6_E2M3", "F6_E3M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
# dtypes NumPy lacks, read as float32: the ml_dtypes type that decodes them independently of refquant
ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu"}


def _file(path, text, data=b""):
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype='"U8"', shape="[2]", offsets="[0,2]", extra=""):
    return f'{{"dtype":{dtype},"shape":{shape},"data_offsets":{offsets}{extra}}}'


def _x(**kw):
    """A header holding one tensor ``x`` (by default two U8 bytes), fields as JSON text."""
    return f'{{"x":{_entry(**kw)}}}'


def _nest(depth):
    return "[" * depth + "]" * depth


BIG = "9" * 5000   # beyond Python's 4,300-digit int() limit


def _verdict(path):
    """``"ok"`` if refquant reads the header, else the refusal's message (which must name the file)."""
    try:
        safetensors.read_header(path)
    except SafetensorsError as e:
        assert str(path) in str(e), e
        return str(e)
    return "ok"


# verdicts of valid files that ``read`` refuses all the same, naming the tensor
NUMPY_LACKS_SHAPE, UNSUPPORTED_DTYPE = "valid; read: NumPy cannot hold", "valid; read: unsupported dtype"


def _check(tmp_path, text, data, expect):
    """``expect``: "ok"; one of the two verdicts above; or words the refusal must contain,
    "|"-separated (the field it names)."""
    p = _file(tmp_path / "t.safetensors", text, data)
    got = _verdict(p)
    if expect == "ok":
        assert got == "ok"
        safetensors.read(p)
    elif expect.startswith("valid; "):
        assert got == "ok"
        with pytest.raises(SafetensorsError, match="'x'.*" + expect.removeprefix("valid; read: ")):
            safetensors.read(p)
    else:
        assert got != "ok", "accepted"
        assert all(w in got for w in expect.split("|")), got
        with pytest.raises(SafetensorsError):
            safetensors.read(p)


S1 = [pytest.param(_x(extra=f',"j":{_nest(998)}'), b"ab", "nests 1000 deep", id="1000-deep"),
      pytest.param(_x(extra=f',"j":{_nest(126)}'), b"ab", "nests 128 deep", id="128-deep"),
      pytest.param(_x(extra=f',"j":{_nest(125)}'), b"ab", "ok", id="127-deep")]
S2 = [pytest.param(_x(shape=f"[{2**64}]"), b"ab", "shape", id="2^64"),
      pytest.param(_x(shape=f"[{2**70}, 0]"), b"", "shape", id="2^70"),
      pytest.param(_x(shape=f"[{2**63}]"), b"ab", "2^64 bits", id="2^63"),   # 2^66 bits: usize overflows
      pytest.param(_x(shape=f"[{2**60}]"), b"ab", f"needs {2**60} bytes", id="2^60")]
S3 = [pytest.param(_x(shape=f"[{2**62 + 1}, 4]", offsets="[0,4]"), b"abcd", "shape|2^64", id="wraps-to-4"),
      pytest.param(_x(shape=f"[{2**32}, {2**32}]", offsets="[0,0]"), b"", "shape|2^64", id="wraps-to-0"),
      pytest.param(_x(shape=f"[{2**32}, {2**32}, 0]", offsets="[0,0]"), b"", "shape|2^64", id="overflow-then-0"),
      pytest.param(_x(dtype='"F64"', shape=f"[{2**58}]", offsets="[0,0]"), b"", "2^64 bits", id="bits-overflow"),
      pytest.param(_x(shape=f"[0, {2**63}, 2]", offsets="[0,0]"), b"", NUMPY_LACKS_SHAPE, id="0-first"),
      pytest.param(_x(shape="[true, 2]"), b"ab", "shape", id="bool-dim"),
      pytest.param(_x(shape="[2, false]", offsets="[0,0]"), b"", "shape", id="false-dim")]
S4 = [pytest.param(_x(dtype='["U8"]'), b"ab", "dtype", id="list"),
      pytest.param(_x(dtype='{"U8":0}'), b"ab", "dtype", id="dict"),
      pytest.param(_x(dtype='{}'), b"ab", "dtype", id="empty-dict"),
      pytest.param(_x(dtype='{"U8":null,"I8":null}'), b"ab", "dtype", id="two-key-dict"),
      pytest.param(_x(dtype="null"), b"ab", "dtype", id="null"),
      pytest.param(_x(dtype='{"U8":null}'), b"ab", "ok", id="enum-map")]   # serde's map form of a unit variant
S5 = [pytest.param(_x(shape=f"[{BIG}]"), b"ab", "out of range", id="shape"),
      pytest.param(_x(offsets=f"[0,{BIG}]"), b"ab", "out of range", id="offsets"),
      pytest.param(_x(extra=f',"j":-{BIG}'), b"ab", "out of range", id="ignored-field")]
S6 = [pytest.param(f'{{"__metadata__":{m},"x":{_entry()}}}', b"ab", "__metadata__", id=f"metadata-{m}")
      for m in ("false", "[]", "0", '""', '{"a":1}', '{"a":"1","a":2}')] + [
      pytest.param(f'{{"__metadata__":{{}},"__metadata__":{{}},"x":{_entry()}}}', b"ab", "__metadata__",
                   id="metadata-twice"),
      pytest.param(f'{{"x\\udc00":{_entry()}}}', b"ab", "surrogate", id="surrogate-name"),
      pytest.param(f'{{"__metadata__":{{"a":"\\ud800"}},"x":{_entry()}}}', b"ab", "surrogate", id="surrogate-meta"),
      pytest.param(_x(extra=',"j":["\\ud800"]'), b"ab", "surrogate", id="surrogate-in-list"),
      pytest.param(_x(extra=',"dtype":"U8"'), b"ab", "'x'|dtype", id="field-twice"),
      pytest.param(f'{{"x":{_entry(dtype=chr(34) + "Q" + chr(34))},"x":{_entry()}}}', b"ab", "'x'|dtype",
                   id="name-twice-first-invalid"),
      pytest.param(_x(shape="[-0, 2]", offsets="[0,0]"), b"", "shape", id="minus-zero"),
      pytest.param(_x(shape="[2.0]"), b"ab", "shape", id="float-dim"),
      pytest.param(_x(extra=',"j":NaN'), b"ab", "NaN", id="nan"),
      pytest.param(_x(extra=',"j":1e400'), b"ab", "out of range", id="1e400"),
      pytest.param('{"x":["U8",[2]]}', b"ab", "'x'", id="short-list-entry"),
      # what the reference accepts
      pytest.param('{"__metadata__":null,"x":["U8",[2],[0,2]]}', b"ab", "ok", id="list-entry"),
      pytest.param(f'{{"x":{_entry(shape="[5]")},"x":{_entry()}}}', b"ab", "ok", id="name-twice-last-kept"),
      pytest.param(f'{{"__metadata__":{{"a":"1","a":"2"}},"x":{_entry()}}}', b"ab", "ok", id="metadata-key-twice"),
      pytest.param(f'{{"x\\ud83d\\ude00":{_entry()}}}', b"ab", "ok", id="surrogate-pair"),
      pytest.param(_x(extra=',"j":{"k":[1,"-0",-0,1e300,null,true],"k":2}'), b"ab", "ok", id="ignored-fields"),
      pytest.param(_x(shape=f"[0, {2**64 - 1}]", offsets="[0,0]"), b"", NUMPY_LACKS_SHAPE, id="0-then-2^64-1"),
      pytest.param(_x(shape="[" + ",".join(["1"] * 65) + "]", offsets="[0,1]"), b"a", NUMPY_LACKS_SHAPE, id="65-dims")]
DTYPE_CASES = [pytest.param(_x(dtype=f'"{d}"', shape=f"[{48 // BITS[d]}]", offsets=f"[0,{48 // 8}]"), b"abcdef",
                            UNSUPPORTED_DTYPE, id=d) for d in sorted(UNSUPPORTED)] + [
               pytest.param(_x(dtype='"F4"', shape="[3]"), b"ab", "bytes", id="F4-odd"),
               pytest.param(_x(dtype='"F6_E3M2"', shape="[2]"), b"ab", "bytes", id="F6-odd"),
               pytest.param(_x(dtype='"f32"'), b"ab", "unknown dtype", id="lower-case")]


# each finding's cases, the finding named in the case id (e.g. ``s3-wraps-to-4``)
FINDINGS = {"s1": S1, "s2": S2, "s3": S3, "s4": S4, "s5": S5, "s6": S6, "dtype": DTYPE_CASES}
ALL_CASES = [pytest.param(*c.values, id=f"{f}-{c.id}", marks=c.marks) for f, cases in FINDINGS.items() for c in cases]


@pytest.mark.oracle
@pytest.mark.parametrize("text, data, expect", ALL_CASES)
def test_each_finding_gets_the_verdict_worked_out_for_it_and_the_reference_agrees(tmp_path, text, data, expect):
    """S1 nesting, S2 huge dimensions, S3 counts past usize, S4 dtypes that are not names, S5
    numbers of thousands of digits, S6 serde's JSON rules, and the dtypes refquant cannot read:
    refused with the named field, or read; and the reference (safetensors) reads exactly the
    files worked out as valid."""
    _check(tmp_path, text, data, expect)
    p = _file(tmp_path / "ref.safetensors", text, data)
    assert (_reference(p) is not None) == (expect == "ok" or expect.startswith("valid; "))


def test_s6_a_repeated_name_keeps_its_last_entry(tmp_path):
    p = _file(tmp_path / "t.safetensors", f'{{"x":{_entry(shape="[1]", offsets="[0,1]")},"x":{_entry()}}}', b"ab")
    x, _ = safetensors.read(p)
    assert x["x"].tolist() == [97, 98]


@pytest.mark.parametrize("dtype, data, want", [
    ("F8_E4M3", b"\x38\xc0\x7f", [1.0, -2.0, np.nan]),     # 0.0111.000, 1.1000.000, S.1111.111 = NaN
    ("F8_E5M2", b"\x3c\xc0\x7c", [1.0, -2.0, np.inf]),     # 0.01111.00, 1.10000.00, 0.11111.00 = Inf
    ("F8_E8M0", b"\x7f\x80\xff", [1.0, 2.0, np.nan]),      # 2^(c - 127); 0xFF = NaN
    ("BF16", b"\x80\x3f\x00\xc0", [1.0, -2.0]),
    ("C64", struct.pack("<ff", 1, -2), np.array([1 - 2j], np.complex64)),   # NumPy has this one
])
def test_dtypes_numpy_lacks_read_as_float32(tmp_path, dtype, data, want):
    want = np.asarray(want, np.float32) if isinstance(want, list) else want
    p = _file(tmp_path / "t.safetensors", _x(dtype=f'"{dtype}"', shape=f"[{want.size}]", offsets=f"[0,{len(data)}]"),
              data)
    x, _ = safetensors.read(p)
    assert x["x"].dtype == want.dtype
    np.testing.assert_array_equal(x["x"], want)



@pytest.mark.slow   # two files of 100 MB
@pytest.mark.oracle
@pytest.mark.parametrize("n, expect", [(100_000_000, "ok"), (100_000_001, "exceeds 100000000")])
def test_the_header_size_limit_is_the_references(tmp_path, n, expect):
    p = _file(tmp_path / "t.safetensors", b"{}" + b" " * (n - 2))
    assert (_reference(p) is not None) == (expect == "ok")
    assert expect in _verdict(p)


# ---- the differential mutation test --------------------------------------------------------------
# A mutant is a small valid file after a few edits the reference reads (``_edit(valid=True)``: the
# forms serde accepts besides the plain one) and at most one it may refuse (one rule each), so that
# rule alone decides the verdict; one mutant in five gets a few edits of both kinds and byte edits.

class Raw(str):
    """JSON text written as is: what ``json.dumps`` does not write (-0, NaN, lone surrogates, ...)."""


class Obj(list):
    """A JSON object as its ``(key, value)`` pairs, so a key can repeat."""


def dump(x) -> str:
    if isinstance(x, Raw):
        return str(x)
    if isinstance(x, Obj):
        return "{" + ",".join(f"{dump(k) if isinstance(k, Raw) else json.dumps(k)}:{dump(v)}" for k, v in x) + "}"
    if isinstance(x, list):
        return "[" + ",".join(dump(v) for v in x) + "]"
    return json.dumps(x)


FIELDS = ("dtype", "shape", "data_offsets")
HUGE_DIMS = [1, 2, 2**31, 2**32, 2**40, 2**58, 2**61, 2**62, 2**62 + 1, 2**63, 2**64 - 1]
# values of an ignored field: read (the entry depth is 2, so 125 more levels make 127) ...
JUNK = [1, -1, 1.5, "s", None, True, [], Obj(), Obj([("a", 1), ("a", [2])]), Raw("-0"), Raw("1e-400"),
        Raw("-" + "9" * 30), Raw("1" + "0" * 308), Raw("1.7976931348623157e308"), Raw('"\\ud83d\\ude00"'),
        Raw('"\\u0000"'), Raw(_nest(125))]
# ... and refused
BAD_JUNK = [Raw("NaN"), Raw("-Infinity"), Raw("1e400"), Raw("-1.8e308"), Raw("9" * 309), Raw("9" * 400), Raw(BIG),
            Raw('"\\ud800"'), Raw('["\\udfff"]'), Raw('"\x01"'), Raw('"\\x"'), Raw(_nest(126)), Raw(_nest(999)),
            Raw("'s'")]
NUMBERS = [3, 8, 2**32, 2**62 + 1, 2**63, 2**64 - 1, 2**64, -1, -(2**63), 2.0, 1e300, None, "2", Raw("1e400"),
           Raw("NaN"), Raw("9" * 309), Raw(BIG)]
BAD_DTYPES = ["u8", "Q4", "", 5, None, True, ["F32"], Obj(), Obj([("F32", 0)]), Obj([("F32", None), ("F32", None)]),
              Obj([("Q4", None)]), Obj([("F32", Obj())])]
METADATA = [None, Obj(), Obj([("a", "b")]), Obj([("a", "1"), ("a", "2")]), Obj([("\u00e9", "")])]
BAD_METADATA = [False, 0, "", [], Obj([("a", 1)]), Obj([("a", None)]), Obj([("a", "1"), ("a", 2)]),
                Obj([("a", Raw('"\\udc00"'))])]


def _set(entry: Obj, key, value):
    entry[:] = [(k, value if k == key else v) for k, v in entry]


def _tensor(draw, header: Obj):
    """The index of a tensor whose entry is an object, or None."""
    found = [j for j, (k, v) in enumerate(header) if k != "__metadata__" and isinstance(v, Obj)]
    return draw(st.sampled_from(found)) if found else None


def _boundaries(header: Obj) -> list:
    """Every data offset in the header, where a tensor of no bytes fits."""
    return sorted({0} | {e for _, v in header if isinstance(v, Obj) for k, o in v
                         if k == "data_offsets" and isinstance(o, list) for e in o if type(e) is int})


@st.composite
def valid_files(draw):
    """``(header, data)``: a valid file's header as an ``Obj`` (entries ``Obj`` too) and its data bytes."""
    utf8 = st.one_of(st.characters(max_codepoint=0xD7FF), st.characters(min_codepoint=0xE000))   # no surrogates
    names = draw(st.lists(st.text(utf8, max_size=4), min_size=1, max_size=4, unique=True))
    header, pos = Obj(), 0
    for name in (n for n in names if n != "__metadata__"):   # an unsupported dtype stops ``read``: fewer of them
        dtype = draw(st.sampled_from([d for d in BITS for _ in range(1 if d in UNSUPPORTED else 4)]))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        if math.prod(shape) * BITS[dtype] % 8:
            shape.append(8)
        nbytes = math.prod(shape) * BITS[dtype] // 8
        header.append((name, Obj([("dtype", dtype), ("shape", shape), ("data_offsets", [pos, pos + nbytes])])))
        pos += nbytes
    header = Obj(draw(st.permutations(header)))
    if draw(st.booleans()):
        meta = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
        header.insert(draw(st.integers(0, len(header))), ("__metadata__", Obj(meta.items())))
    return header, np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(pos)


def _edit(draw, header: Obj, valid: bool):
    """One edit of the header model, in place. ``valid``: one the reference reads (another form serde
    accepts, a field it ignores, a repeated name whose last entry is right, a tensor of no bytes whose
    shape a leading 0 keeps below 2^64); else one it may refuse, probing one rule."""
    kinds = ["dtype", "junk", "list-form", "repeat", "metadata", "name", "empty"]
    kind = draw(st.sampled_from(kinds if valid else kinds + ["respell", "respell", "junk", "empty", "field", "offsets",
                                                             "shape", "delete"]))
    i = _tensor(draw, header)
    if kind == "metadata":   # valid: a value it reads, once; else a bad value, or given twice or more
        given = [j for j, (k, _) in enumerate(header) if k == "__metadata__"]
        values = [draw(st.sampled_from(METADATA))] * (1 if valid else 2)
        if valid and given:
            header[given[0]], values = ("__metadata__", values[0]), []
        elif not valid and draw(st.booleans()):
            values = [draw(st.sampled_from(BAD_METADATA))]
        for value in values:
            header.insert(draw(st.integers(0, len(header))), ("__metadata__", value))
        return
    if kind == "empty" or i is None:   # huge dimensions, and a 0 among them or not
        shape = draw(st.lists(st.sampled_from(HUGE_DIMS), max_size=4))
        if valid or draw(st.booleans()):
            shape.insert(0 if valid else draw(st.integers(0, len(shape))), 0)
        name = draw(st.text(max_size=2))
        while name == "__metadata__" or any(name == k for k, _ in header):
            name += "~"
        entry = Obj([("dtype", draw(st.sampled_from(list(BITS)))), ("shape", shape),
                     ("data_offsets", [draw(st.sampled_from(_boundaries(header)))] * 2)])
        header.insert(draw(st.integers(0, len(header))), (name, entry))
        return
    name, entry = header[i]
    fields = dict(entry)
    if kind == "dtype":   # valid: another of the same size, or serde's {"NAME": null}
        new = old = fields.get("dtype")
        if not valid:
            new = draw(st.sampled_from(BAD_DTYPES + list(BITS)))
        elif isinstance(old, str) and old in BITS:
            new = draw(st.sampled_from([d for d in BITS if BITS[d] == BITS[old]]))
            new = Obj([(new, None)]) if draw(st.booleans()) else new
        _set(entry, "dtype", new)
    elif kind == "junk":   # a field serde ignores, whose value must still be JSON as serde_json reads it
        value = draw(st.sampled_from(JUNK if valid else BAD_JUNK))
        entry.insert(draw(st.integers(0, len(entry))), (draw(st.sampled_from(["j", "__metadata__", "Dtype"])), value))
    elif kind == "list-form":
        items = [fields.get(k) for k in FIELDS]
        header[i] = (name, items if valid else draw(st.sampled_from([items[:2], items + [0], items[::-1], [items]])))
    elif kind == "repeat":   # valid: the name before it, the last entry read; else after it, or before with a bad dtype
        moved = Obj([(k, [0, 0] if k == "data_offsets" else v) for k, v in entry])
        if valid or draw(st.booleans()):
            header.insert(draw(st.integers(0, i)) if valid else i + 1, (name, draw(st.sampled_from([Obj(entry), moved]))
                                                                        if valid else moved))
        else:
            header.insert(i, (name, Obj([(k, "Q4" if k == "dtype" else v) for k, v in entry])))
    elif kind == "name":
        new = draw(st.sampled_from(["", "\u00e9", "\U0001f600", "a b"] if valid else
                                   ["__metadata__", Raw('"\\ud800"'), Raw('"a\\udfff"'), Raw('"\\udc00\\ud800"')]))
        if not valid or all(k != new for k, _ in header):
            header[i] = (new, entry)
    elif kind == "respell":   # the same integer, spelled as serde's usize does not read it
        key = draw(st.sampled_from(["shape", "data_offsets"]))
        values = list(fields[key]) if isinstance(fields.get(key), list) else []
        if values and type(v := values[j := draw(st.integers(0, len(values) - 1))]) is int:
            values[j] = draw(st.sampled_from([Raw(f"{v}.0"), Raw(f"{v}e0"), str(v), [v]]
                                             + {0: [Raw("-0"), False] * 4, 1: [True] * 4}.get(v, [])))
            _set(entry, key, values)
    elif kind == "field" and entry:   # a field given twice, or missing
        if draw(st.booleans()):
            entry.insert(draw(st.integers(0, len(entry))), draw(st.sampled_from(list(entry))))
        else:
            del entry[draw(st.integers(0, len(entry) - 1))]
    elif kind == "offsets":
        off = list(fields["data_offsets"]) if isinstance(fields.get("data_offsets"), list) else [0, 0]
        j, how = draw(st.integers(0, 1)) if len(off) == 2 else 0, draw(st.sampled_from(["nudge", "number", "other"]))
        if how == "nudge" and off and type(off[j]) is int:
            off[j] += draw(st.sampled_from([-2, -1, 1, 2]))
        elif how == "number" and off:
            off[j] = draw(st.sampled_from(NUMBERS))
        else:
            off = draw(st.sampled_from([off[::-1], off + [0], off[:1]]))
        _set(entry, "data_offsets", off)
    elif kind == "shape":
        shape = list(fields["shape"]) if isinstance(fields.get("shape"), list) else []
        j = draw(st.integers(0, len(shape)))
        shape[j:j + draw(st.integers(0, 1))] = [draw(st.sampled_from(NUMBERS + HUGE_DIMS + [0]))]
        _set(entry, "shape", draw(st.sampled_from([shape, Obj(), None, "ab", [1] * 70])))
    elif kind == "delete":
        del header[i]


def _mutate_bytes(draw, raw: bytes) -> bytes:
    """A byte changed, the file cut or extended, or the header size off by a few."""
    j, kind = draw(st.integers(0, len(raw))), draw(st.sampled_from(["flip", "cut", "append", "size"]))
    if kind == "size":
        return struct.pack("<Q", (int.from_bytes(raw[:8], "little") + draw(st.integers(-3, 3))) % 2**64) + raw[8:]
    return {"flip": raw[:j] + bytes([draw(st.integers(0, 255))]) + raw[j + 1:], "cut": raw[:j],
            "append": raw + draw(st.binary(min_size=1, max_size=3))}[kind]


@st.composite
def mutated_files(draw):
    """The bytes of a mutant (see above)."""
    header, data = draw(valid_files())
    chaos = draw(st.integers(0, 4)) == 0
    for _ in range(draw(st.integers(0, 3))):
        _edit(draw, header, valid=not (chaos and draw(st.booleans())))
    if chaos or draw(st.integers(0, 5)):
        _edit(draw, header, valid=False)
    text = dump(header).encode("utf-8", "surrogatepass")
    text += b" " * draw(st.sampled_from([0, -len(text) % 8]))   # as the reference's writer pads
    if draw(st.integers(0, 9)) == 0:   # JSON's whitespace is " \t\n\r"; the others are not
        pads = [b"", b" ", b"\t\n\r", b"\x00", b"\x0c", b"\xc2\xa0", b"\xef\xbb\xbf"]
        text = draw(st.sampled_from(pads)) + text + draw(st.sampled_from(pads))
    raw = struct.pack("<Q", len(text)) + text + data
    for _ in range(draw(st.integers(1, 2)) if chaos else 0):
        raw = _mutate_bytes(draw, raw)
    return raw


def _reference(path):
    """What the reference reads: ``({name: (dtype, shape, bytes)}, metadata)``, or None if it refuses the file
    (opening it, or any tensor's dtype or shape)."""
    lib = need("safetensors")
    try:
        with lib.safe_open(str(path), "np") as f:
            seen = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
            meta = f.metadata() or {}
    except lib.SafetensorError:
        return None
    tensors = {k: (v["dtype"], v["shape"], bytes(v["data"])) for k, v in lib.deserialize(path.read_bytes())}
    assert {k: v[:2] for k, v in tensors.items()} == seen
    return tensors, meta


def _want(path, name, dtype, shape, data):
    """The array ``read`` must return for one tensor, or the reason it must refuse: an unsupported
    dtype, or a shape the reference's NumPy reader (or ml_dtypes') cannot hold either."""
    if dtype in UNSUPPORTED:
        return "unsupported dtype"
    try:
        if dtype in ML_DTYPES:
            return np.frombuffer(data, getattr(need("ml_dtypes"), ML_DTYPES[dtype])).astype(np.float32).reshape(shape)
        with need("safetensors").safe_open(str(path), "np") as f:
            return f.get_tensor(name)
    except ValueError:
        return "NumPy cannot hold"


# what refusals say, to tally them: Hypothesis prints the share of each (--hypothesis-show-statistics)
REFUSALS = ("too short", "does not fit", "UTF-8", "nests", "not JSON", "must be a JSON object", "__metadata__",
            "list entry", "once each", "dtype", "shape", "data_offsets", "2^64", "whole number", "needs",
            "overlap", "cover")


def check_against_reference(path):
    ref = _reference(path)
    try:
        header, meta, start = safetensors.read_header(path)
    except SafetensorsError as e:
        assert str(path) in str(e), e
        assert ref is None, f"refquant refuses what the reference reads: {e}"
        return event(f"both refuse: {next((w for w in REFUSALS if w in str(e)), str(e))}")
    raw = path.read_bytes()
    ours = {k: (t["dtype"], t["shape"], raw[start + t["data_offsets"][0]:start + t["data_offsets"][1]])
            for k, t in header.items()}
    assert ref is not None, f"refquant reads what the reference refuses: {ours}"
    assert (ours, meta) == ref
    want = {k: _want(path, k, *v) for k, v in ref[0].items()}
    try:
        arrays, meta = safetensors.read(path)
    except SafetensorsError as e:   # allowed for the reasons ``_want`` gives, and named
        reasons = [w for w in want.values() if isinstance(w, str) and w in str(e)]
        assert str(path) in str(e) and reasons, e
        return event(f"both read the header; read refuses: {reasons[0]}")
    event("both read the file")
    assert meta == ref[1] and set(arrays) == set(want)
    for k, w in want.items():
        assert not isinstance(w, str), f"{k}: read, though {w}"
        a = arrays[k]
        assert a.dtype == w.dtype and a.shape == w.shape, (k, a.dtype, w.dtype, a.shape, w.shape)
        assert a.tobytes() == w.tobytes() or (a.dtype == np.float32 and np.array_equal(a, w, equal_nan=True)
                                              and np.array_equal(np.signbit(a), np.signbit(w)))   # NaN payloads


_serial = itertools.count()


def _differential(tmp_path_factory, raw):
    path = tmp_path_factory.getbasetemp() / f"mutant{next(_serial)}.safetensors"   # kept if the check fails
    path.write_bytes(raw)
    check_against_reference(path)
    path.unlink()


@pytest.mark.oracle
@settings(max_examples=300)
@given(mutated_files())
def test_mutated_files_are_read_iff_the_reference_reads_them(tmp_path_factory, raw):
    _differential(tmp_path_factory, raw)


@pytest.mark.slow
@pytest.mark.oracle
@settings(max_examples=5000)
@given(mutated_files())
def test_mutated_files_are_read_iff_the_reference_reads_them_long(tmp_path_factory, raw):
    _differential(tmp_path_factory, raw)
