"""Byte-level BPE tokenizers between GGUF metadata and Hugging Face's tokenizer files.

A GGUF file carries its tokenizer as ``tokenizer.ggml.*`` keys; a Hugging Face checkpoint as
``tokenizer.json`` (read by the ``tokenizers`` library), ``tokenizer_config.json`` and
``generation_config.json`` (read by transformers). ``hf_files`` writes the second from the
first (``export``); ``gguf_metadata`` reads it back into the keys llama.cpp's
``convert_hf_to_gguf.py`` writes for a GPT-2-style BPE (``convert``). Only ``tokenizer.ggml.model
== "gpt2"`` (byte-level BPE) is handled: SmolLM, GPT-2, StarCoder, Llama 3 and Qwen2 use it.

What the reader reproduces, from llama.cpp's ``convert_hf_to_gguf.py`` (``get_vocab_base``,
``_set_vocab_gpt2``, ``LlamaModel.set_vocab``, read at commit 0024aa7) and gguf-py's
``SpecialVocab`` (``gguf/vocab.py``, 0.19):

* **tokens**: id ``i`` of ``[0, vocab_size)`` (``config.json``'s ``vocab_size``, else the
  vocabulary's) is its token in ``model.vocab`` or ``added_tokens``, else ``[PAD{i}]``;
* **token types**: an added token is CONTROL (3) when ``special`` or when it looks special
  (``<|...|>``, ``<｜...｜>``, ``<unused...>``, ``<pad>``, ``<mask>``, ``<2mass>``,
  ``[@BOS@]``), else USER_DEFINED (4, ``▁`` written as a space); ``[PAD{i}]`` is UNUSED (5);
  the rest NORMAL (1);
* **merges** as ``"a b"`` strings (pairs ``[a, b]`` joined; a space inside a part as ``Ġ``);
* **special ids** (``bos``/``eos``/``unk``/``sep``/``pad``/``mask``): the token
  ``tokenizer_config.json`` names, looked up in ``added_tokens``, else ``config.json``'s
  ``{kind}_token_id``; **add_bos/add_eos** from a ``TemplateProcessing`` post-processor,
  overridden by ``tokenizer_config.json``'s booleans; **chat template** from
  ``tokenizer_config.json``, else ``chat_template.jinja``, else ``chat_template.json``;
* for Llama models: ``add_space_prefix`` when ``tokenizer_config.json`` has
  ``add_prefix_space``, and ``add_bos_token = False`` when ``vocab_size`` is 49152 (the
  converter's rule for "granite small models", which SmolLM's vocabulary also meets);
* **tokenizer.ggml.pre**, llama.cpp's name for the pre-tokenizer. The converter hashes the
  tokenizer's encoding of a check text; without a tokenizer to run, this reader recognises
  the ``pre_tokenizer`` object itself (``PRE_TOKENIZERS``: the forms the converters and hub
  files write for each family) and names the family's reference model (``gpt-2``,
  ``smollm``, ``llama-bpe``, ``qwen2``); ``pre=`` names another member of the same family
  (``starcoder`` for a StarCoder file). An unknown pre-tokenizer is refused, naming it.

The writer is the inverse: every token in ``model.vocab`` at its GGUF id (``[PAD{i}]`` left
out: ``config.json``'s ``vocab_size`` restores them), CONTROL and USER_DEFINED tokens also in
``added_tokens`` (the ``tokenizers`` library assigns them the vocabulary's id), the family's
``pre_tokenizer``, a ``TemplateProcessing`` post-processor when BOS is added, merges as
strings (which every ``tokenizers`` version reads), ``tokenizer_class
"PreTrainedTokenizerFast"`` (transformers 5 rebuilds the pre-tokenizer of a model-specific
class and would drop the digit split).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from refquant._checks import first_surrogate
from refquant.hf.checkpoint import read_json
from refquant.hf.pretokenizers import (  # noqa: F401  (re-exported)
    GPT2_REGEX, LLAMA3_REGEX, PRE_TOKENIZERS, QWEN2_REGEX, _describe, _split, family, recognise,
)

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
MAX_VOCAB = 1 << 24        # ids past this are a malformed file, not a vocabulary (padding would fill them)
_ID_KEY = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
           "sep": "seperator_token_id", "pad": "padding_token_id", "mask": "mask_token_id",
           "eot": "eot_token_id", "eom": "eom_token_id"}   # (sic: gguf-py's "seperator"; cls has no key)

_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}


def _looks_special(t: str) -> bool:
    """``convert_hf_to_gguf.py``'s ``does_token_look_special``."""
    return (t in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (t.startswith("<|") and t.endswith("|>"))
            or (t.startswith("<｜") and t.endswith("｜>")) or (t.startswith("<unused") and t.endswith(">")))


# ----------------------------------------------------------------------------- GGUF -> HF

def hf_files(metadata: dict, *, context_length: int | None = None) -> dict:
    """``{"tokenizer.json": ..., "tokenizer_config.json": ..., "generation_config.json": ...}``
    (JSON objects) of a GGUF's ``tokenizer.ggml.*`` metadata, ``"config"``: the special
    token ids ``config.json`` carries, and ``"lost"``: the tokenizer keys the files have no
    place for (EOT/EOM/FIM ids, named chat templates...), which ``gguf_metadata`` cannot restore. ``ValueError`` for a tokenizer that is not byte-level
    BPE, a pre-tokenizer not in ``PRE_TOKENIZERS``, or inconsistent keys."""
    m = metadata
    model = m.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"only byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2') are written as "
                         f"tokenizer.json, got {model!r}")
    pre = str(m.get("tokenizer.ggml.pre", ""))
    _, normalizer, pre_tokenizer, ignore_merges = PRE_TOKENIZERS[family(pre)]
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if not isinstance(m.get(key, []), (list, tuple)):
            raise ValueError(f"{key} is not a list of strings")
    tokens = [str(t) for t in m.get("tokenizer.ggml.tokens", ())]
    n = len(tokens)
    types = np.asarray(m.get("tokenizer.ggml.token_type", np.full(n, NORMAL)), np.int64)
    if n == 0 or types.shape != (n,):
        raise ValueError(f"tokenizer.ggml.token_type has {types.size} entries for {n} tokens")
    vocab, added = {}, []
    for i, (t, k) in enumerate(zip(tokens, types)):
        if k == UNUSED and t == f"[PAD{i}]":
            continue                     # config.json's vocab_size brings it back
        if k not in (NORMAL, CONTROL, USER_DEFINED):
            raise ValueError(f"token {i} ({t!r}) has type {k}; a byte-level BPE tokenizer.json holds normal, "
                             "control and user-defined tokens")
        if t in vocab:
            raise ValueError(f"token {t!r} appears twice (ids {vocab[t]} and {i})")
        vocab[t] = i
        if k != NORMAL:
            added.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": bool(k == CONTROL)})
    merges = [str(x) for x in m.get("tokenizer.ggml.merges", ())]
    for x in merges:
        k = x.find(" ", 1)
        if k < 0 or " " in x[k + 1:]:
            raise ValueError(f"merge {x!r} is not two tokens separated by one space")

    ids = {kind: int(m[f"tokenizer.ggml.{key}"]) for kind, key in _ID_KEY.items()
           if f"tokenizer.ggml.{key}" in m and kind not in ("eot", "eom")}   # (no place the reader looks)
    for kind, i in ids.items():
        if not 0 <= i < n:
            raise ValueError(f"tokenizer.ggml.{_ID_KEY[kind]} {i} is outside the {n} tokens")
        if tokens[i] not in vocab:
            raise ValueError(f"tokenizer.ggml.{_ID_KEY[kind]} {i} is an unused padding token ({tokens[i]!r})")
    add_bos = bool(m.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(m.get("tokenizer.ggml.add_eos_token", False))
    single = []
    if add_bos or add_eos:
        for kind in ("bos", "eos"):
            if (add_bos if kind == "bos" else add_eos) and kind not in ids:
                raise ValueError(f"tokenizer.ggml.add_{kind}_token is set but there is no {kind} token id")
        bos, eos = (tokens[ids[k]] if k in ids else None for k in ("bos", "eos"))
        piece = lambda t, type_id: {"SpecialToken": {"id": t, "type_id": type_id}}  # noqa: E731
        seq = lambda s, type_id: {"Sequence": {"id": s, "type_id": type_id}}  # noqa: E731
        single = ([piece(bos, 0)] if add_bos else []) + [seq("A", 0)] + ([piece(eos, 0)] if add_eos else [])
        pair = single + [seq("B", 1)] + ([piece(eos, 1)] if add_eos else [])
        specials = {t: {"id": t, "ids": [vocab[t]], "tokens": [t]}
                    for t, on in ((bos, add_bos), (eos, add_eos)) if on}
        post = {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}]}
    else:
        post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer, "post_processor": post, "decoder": _DECODER,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}}

    in_added = {a["id"] for a in added}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for kind, i in ids.items():
        cfg[f"{kind}_token"] = tokens[i]
    config_ids = {f"{kind}_token_id": i for kind, i in ids.items()
                  if kind in ("bos", "eos", "pad") or i not in in_added}   # what added_tokens cannot resolve
    for key in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{key}" in m:       # consistent with the post-processor above
            cfg[key] = bool(m[f"tokenizer.ggml.{key}"])
    if "tokenizer.ggml.add_space_prefix" in m:
        cfg["add_prefix_space"] = bool(m["tokenizer.ggml.add_space_prefix"])
    if context_length:
        cfg["model_max_length"] = int(context_length)
    if "tokenizer.chat_template" in m:
        cfg["chat_template"] = str(m["tokenizer.chat_template"])
    cfg["added_tokens_decoder"] = {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                      "single_word", "special")} for a in added}
    generation = {k: v for k, v in config_ids.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    carried = {"model", "pre", "tokens", "token_type", "merges", "add_bos_token", "add_eos_token", "add_space_prefix"}
    carried |= {_ID_KEY[k] for k in ids}
    lost = sorted(k for k in m if k.startswith("tokenizer.") and k != "tokenizer.chat_template"
                  and k.removeprefix("tokenizer.ggml.") not in carried)
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": cfg, "generation_config.json": generation,
            "config": config_ids, "lost": lost}


# ----------------------------------------------------------------------------- HF -> GGUF

def _name(t):
    """A special token of ``tokenizer_config.json``: a string, or an AddedToken object."""
    return t.get("content") if isinstance(t, dict) else t if isinstance(t, str) else None


def gguf_metadata(directory, config: dict | None = None, *, pre: str | None = None) -> dict:
    """The ``tokenizer.*`` GGUF keys of the Hugging Face tokenizer files in ``directory``, as
    ``convert_hf_to_gguf.py`` writes them for a GPT-2-style BPE (see the module docstring);
    ``config`` is the checkpoint's ``config.json``. ``pre`` names llama.cpp's pre-tokenizer
    (it must be of the family the file's pre-tokenizer is, when that one is recognised).
    ``ValueError`` naming what is missing, malformed or unknown; files the ``tokenizers``
    library would refuse (merges of tokens not in the vocabulary, a token twice) are refused."""
    d = Path(directory)
    try:
        return _gguf_metadata(d, config if isinstance(config, dict) else {}, pre)
    except (TypeError, AttributeError, KeyError, IndexError, OverflowError) as e:   # a field of the wrong kind
        raise ValueError(f"{d}: malformed tokenizer files ({type(e).__name__}: {e})") from None


def _gguf_metadata(d: Path, config: dict, pre: str | None) -> dict:
    if not (d / "tokenizer.json").is_file():
        raise ValueError(f"{d}: no tokenizer.json")
    tj = read_json(d / "tokenizer.json")
    tc = read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else None
    if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
        raise ValueError(f"{d / 'tokenizer.json'}: no model object")
    if tc is not None and not isinstance(tc, dict):
        raise ValueError(f"{d / 'tokenizer_config.json'}: not a JSON object")
    model = tj["model"]
    if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict) \
            or not isinstance(model.get("merges"), list):
        raise ValueError(f"{d / 'tokenizer.json'}: a BPE model with vocab and merges expected, got "
                         f"type {model.get('type')!r}")
    fam = recognise(tj)
    if fam is None and pre is None:
        raise ValueError(f"{d / 'tokenizer.json'}: its pre-tokenizer ({_describe(tj)}) is not one refquant "
                         "knows (gpt-2, smollm, llama-bpe, qwen2 families); --pre NAME names llama.cpp's")
    if pre is not None and fam is not None and family(pre) != fam:
        raise ValueError(f"{d / 'tokenizer.json'}: its pre-tokenizer is the {PRE_TOKENIZERS[fam][0][0]} "
                         f"family's; --pre {pre} is the {PRE_TOKENIZERS[family(pre)][0][0]} family's")
    name = pre if pre is not None else PRE_TOKENIZERS[fam][0][0]

    entries = tj.get("added_tokens") or []
    if not isinstance(entries, list):
        raise ValueError(f"{d / 'tokenizer.json'}: added_tokens is not a list")
    added = {}
    for a in entries:
        ok = isinstance(a, dict) and isinstance(a.get("content"), str) and isinstance(a.get("id"), int) \
            and not isinstance(a.get("id"), bool) and a["id"] >= 0 and isinstance(a.get("special", False), bool)
        if not ok:
            raise ValueError(f"{d / 'tokenizer.json'}: an added_tokens entry needs a string content, an id >= 0 "
                             f"and a boolean special: {a!r:.80}")
        added.setdefault(a["content"], a)
    ids, vocab = {}, model["vocab"]
    for t, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"{d / 'tokenizer.json'}: vocab id of {t!r} is {i!r}")
        if i in ids:
            raise ValueError(f"{d / 'tokenizer.json'}: vocab id {i} is both {ids[i]!r} and {t!r}")
        ids[i] = t
    for t, a in added.items():
        if t not in vocab:   # one already in the vocabulary keeps its vocabulary id (as tokenizers does)
            if a["id"] in ids:
                raise ValueError(f"{d / 'tokenizer.json'}: added token {t!r} takes id {a['id']}, which is "
                                 f"{ids[a['id']]!r}")
            ids[a["id"]] = t
    if not ids:
        raise ValueError(f"{d / 'tokenizer.json'}: the vocabulary is empty")
    size = config.get("vocab_size") or max(ids) + 1
    if not isinstance(size, int) or isinstance(size, bool) or max(ids) >= size:
        raise ValueError(f"{d}: config.json's vocab_size {size!r} is smaller than the tokenizer's largest id {max(ids)}")
    if size > MAX_VOCAB:
        raise ValueError(f"{d}: a vocabulary of {size} ids (the largest real ones have about 2^18); refused")
    tokens, types = [], []
    for i in range(size):
        t = ids.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif t in added:
            special = bool(added[t].get("special")) or _looks_special(t)
            tokens.append(t if special else t.replace("\u2581", " "))
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(t)
            types.append(NORMAL)
    merges = []
    for x in model["merges"]:
        if isinstance(x, str):
            merges.append(x)
        elif isinstance(x, list) and len(x) == 2 and all(isinstance(p, str) for p in x):
            merges.append(" ".join(p.replace(" ", "\u0120") for p in x))
        else:
            raise ValueError(f"{d / 'tokenizer.json'}: merge {x!r:.60} is neither 'a b' nor [a, b]")
    known = set(vocab) | set(added)
    for x in merges:
        k = x.find(" ", 1)
        a, b = x[:k], x[k + 1:]
        if k < 0 or a not in known or b not in known or a + b not in known:
            raise ValueError(f"{d / 'tokenizer.json'}: merge {x!r} is not of two tokens into a token of the "
                             "vocabulary (the tokenizers library refuses it too)")

    bad = next((t for t in tokens if first_surrogate(t) is not None), None)
    if bad is not None:
        raise ValueError(f"{d / 'tokenizer.json'}: token {bad!r} holds a lone surrogate (no UTF-8 form)")
    out = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": name, "tokenizer.ggml.tokens": tokens,
           "tokenizer.ggml.token_type": np.array(types, np.int32), "tokenizer.ggml.merges": merges}
    ids, add, template = _special_vocab(d, tj, tc, config)
    for kind, i in ids.items():
        if kind in _ID_KEY:
            if not 0 <= i < size:
                raise ValueError(f"{d}: the {kind} token's id {i} is outside the {size} tokens")
            out[f"tokenizer.ggml.{_ID_KEY[kind]}"] = np.uint32(i)
    for kind, v in add.items():
        if kind in ("bos", "eos", "sep"):
            out[f"tokenizer.ggml.add_{kind}_token"] = v
    for t in (template if isinstance(template, list) else [template]):
        text = t.get("template") if isinstance(t, dict) else t
        if isinstance(text, str) and first_surrogate(text) is not None:
            raise ValueError(f"{d}: the chat template holds a lone surrogate (no UTF-8 form)")
    if isinstance(template, str):
        out["tokenizer.chat_template"] = template
    elif isinstance(template, list):   # named templates, as gguf-py's add_chat_template writes them
        names = []
        for choice in template:
            if not isinstance(choice, dict):
                raise ValueError(f"{d}: a chat template entry is not an object: {choice!r:.60}")
            nm = "".join(c if c.isascii() and c.isalnum() else "_" for c in str(choice.get("name", "")))
            t = choice.get("template")
            if nm and isinstance(t, str):
                if nm == "default":
                    out["tokenizer.chat_template"] = t
                else:
                    out[f"tokenizer.chat_template.{nm}"] = t
                    names.append(nm)
        if names:
            out["tokenizer.chat_templates"] = sorted(set(names))
    if "LlamaForCausalLM" in _architectures(config):   # LlamaModel.set_vocab
        if tc is not None and "add_prefix_space" in tc:
            out["tokenizer.ggml.add_space_prefix"] = bool(tc["add_prefix_space"])
        if config.get("vocab_size", 32000) == 49152:
            out["tokenizer.ggml.add_bos_token"] = False
    return out


def _architectures(config: dict) -> list:
    a = config.get("architectures")
    return a if isinstance(a, list) else []


def _special_vocab(d: Path, tj: dict, tc: dict | None, config: dict):
    """``(ids, add, chat_template)``: gguf-py's ``SpecialVocab(d)`` (``_try_load_from_tokenizer_json``
    then ``_try_load_from_config_json``, gguf 0.19) step by step. Special tokens named in
    ``tokenizer_config.json`` (``cls`` standing in for a missing ``bos``, ``sep`` for
    ``eos``) get the id of their first ``added_tokens`` entry, else ``config.json``'s
    ``{kind}_token_id``; the first id set for a kind stays. add_bos/add_eos/add_sep come from
    the post-processor (``RobertaProcessing``: all three; a ``TemplateProcessing``: its
    leading and trailing special tokens, and a separator between A and B in ``pair``), then
    from ``tokenizer_config.json``'s booleans. A trailing special token that is not the
    configured EOS becomes the EOS, and the configured one the EOT (then EOM)."""
    tc = dict(tc) if tc else None
    kinds = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"]
    ids, add = {}, {}
    added = tj.get("added_tokens") or []

    def tok(piece):   # the SpecialToken id of a template piece, or None
        v = piece.get("SpecialToken") if isinstance(piece, dict) else None
        return v.get("id") if isinstance(v, dict) else None

    get = (tc or {}).get
    bos, cls, eos, sep = get("bos_token"), get("cls_token"), get("eos_token"), get("sep_token")
    if not bos and cls and tc:
        tc["bos_token"] = bos = cls
    if not eos and sep and tc:
        tc["eos_token"] = eos = sep
    post = tj.get("post_processor")
    procs = (post.get("processors", [post]) if isinstance(post, dict) else None) if post else []
    if not isinstance(procs, list):
        raise ValueError(f"{d / 'tokenizer.json'}: post_processor is not an object with a list of processors")
    for p in procs:
        if not isinstance(p, dict):
            continue
        if p.get("type") == "RobertaProcessing":
            add.update(bos=True, eos=True, sep=True)
            if not cls and tc:
                tc["cls_token"] = cls = (p.get("cls") or [bos])[0]
            if not sep and tc:
                tc["sep_token"] = sep = (p.get("sep") or [eos])[0]
            continue
        if p.get("type") != "TemplateProcessing":
            continue
        single, pair = p.get("single") or [], p.get("pair") or []
        if not isinstance(single, list) or not isinstance(pair, list):
            raise ValueError(f"{d / 'tokenizer.json'}: TemplateProcessing's single and pair must be lists")
        first = last = None
        if len(single) > 1:
            first = tok(single[0])
            if first:
                if not tc:
                    bos = first
                add["bos"] = first in (bos, cls)
            last = tok(single[-1])
            if last:
                if not tc:
                    eos = last
                elif last != eos:
                    extra = "eot" if "eot" not in kinds else "eom" if "eom" not in kinds else None
                    if extra:
                        kinds.append(extra)
                        tc[f"{extra}_token"] = eos
                    tc["eos_token"] = eos = last
                add["eos"] = last == eos
        if pair:
            start = 1 if first and tok(pair[0]) == first else 0
            stop = -1 if last and tok(pair[-1]) == last else None
            mid = pair[start:stop]
            if mid:
                a = mid[0].get("Sequence", {}).get("id") if isinstance(mid[0], dict) else None
                b = mid[-1].get("Sequence", {}).get("id") if isinstance(mid[-1], dict) else None
                mid = mid[1:-1]
                if a == "A" and b == "B" and mid:
                    add_sep = False
                    e = tok(mid[0])
                    if e and e in (sep, eos) and not last:
                        add_sep = True
                    if len(mid) == 2 and tok(mid[1]) and tok(mid[1]) in (sep, eos):
                        add_sep = True
                    add["sep"] = add_sep
                    if add_sep and not sep and tc:
                        tc["sep_token"] = eos
    template = None
    if tc:
        alt = None
        if (d / "chat_template.jinja").is_file():
            alt = _read_text(d / "chat_template.jinja")
            extra = sorted((d / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}] + [{"name": f.stem, "template": _read_text(f)}
                                                                 for f in extra]
        elif (d / "chat_template.json").is_file():
            obj = read_json(d / "chat_template.json")
            alt = obj.get("chat_template") if isinstance(obj, dict) else None
        template = tc.get("chat_template", alt)
        if template is not None and not isinstance(template, (str, list)):
            template = None
        for kind in kinds:
            flag = tc.get(f"add_{kind}_token")
            if isinstance(flag, bool):
                add[kind] = flag
            content = _name(tc.get(f"{kind}_token"))
            if not isinstance(content, str):
                continue
            i = next((a.get("id") for a in added if isinstance(a, dict) and a.get("content") == content), None)
            _set_id(ids, kind, i, d)
    for kind in kinds:
        i = config.get(f"{kind}_token_id")
        if i is None and isinstance(config.get("text_config"), dict):
            i = config["text_config"].get(f"{kind}_token_id")
        _set_id(ids, kind, i, d)
    return ids, add, template


def _set_id(ids: dict, kind: str, i, d) -> None:
    """``SpecialVocab._set_special_token``: an int id sets ``kind`` once; anything else is ignored."""
    if not isinstance(i, int) or isinstance(i, bool):
        return
    if i < 0:
        raise ValueError(f"{d}: invalid id {i} for the {kind} token")
    ids.setdefault(kind, i)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable UTF-8 file ({e})") from None
