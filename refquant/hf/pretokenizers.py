"""Pre-tokenizers by llama.cpp's names: the families of ``src/llama-vocab.cpp``'s regex sets
(``llm_tokenizer_bpe``) and the ``tokenizer.json`` forms that say them.

A family is what llama.cpp splits text by; its members are the ``tokenizer.ggml.pre``
names llama.cpp maps to that regex set (the first is the family's reference model).
Each family has the normalizer and ``pre_tokenizer`` the converters and hub files write
for it, so a ``tokenizer.json`` is named by its form (``recognise``) and a GGUF's
tokenizer is written in it (``refquant.hf.tokenizer``).
"""
from __future__ import annotations

import json

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


# family -> (llama.cpp's pre names of that family (the first is the reference model's), the
# normalizer, the pre_tokenizer, whether BPE ignores merges for whole-vocabulary words); the
# families are llama.cpp's regex sets (src/llama-vocab.cpp, llm_tokenizer_bpe)
PRE_TOKENIZERS = {
    "gpt2": (("gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "gigachat", "jina-v2-es",
              "jina-v2-de", "a.x-4.0", "mellum", "exaone4"),
             None, _byte_level(True), False),
    "smollm": (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
               None, {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                            _byte_level(True)]}, False),
    "llama3": (("llama-bpe", "llama3", "llama-v3", "falcon3"),   # (dbrx, smaug-bpe: same regex, no ignore_merges)
               None, {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), _byte_level(False)]}, True),
    "qwen2": (("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"),
              {"type": "NFC"}, {"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), _byte_level(False)]},
              False),
}
_FAMILY = {name: fam for fam, (names, *_) in PRE_TOKENIZERS.items() for name in names}


def family(pre: str) -> str:
    """The regex family (a key of ``PRE_TOKENIZERS``) of llama.cpp's pre-tokenizer ``pre``."""
    if pre not in _FAMILY:
        raise ValueError(f"tokenizer.ggml.pre {pre!r} is not a pre-tokenizer refquant can write or name (known: "
                         f"the {', '.join(names[0] for names, *_ in PRE_TOKENIZERS.values())} families, "
                         "refquant.hf.tokenizer.PRE_TOKENIZERS)")
    return _FAMILY[pre]


def _canonical(obj):
    """A ``pre_tokenizer`` (or normalizer) as the fields that decide how text is split: the
    serializer's defaults filled in, the offsets-only ``trim_offsets`` dropped."""
    if isinstance(obj, dict):
        t = obj.get("type")
        if t == "ByteLevel":
            return {"type": t, "add_prefix_space": bool(obj.get("add_prefix_space", True)),
                    "use_regex": bool(obj.get("use_regex", True))}
        if t == "Sequence" and isinstance(obj.get("pretokenizers"), list):
            items = [_canonical(p) for p in obj["pretokenizers"]]
            return items[0] if len(items) == 1 else {"type": t, "pretokenizers": items}
        if t == "Split":
            return {"type": t, "pattern": obj.get("pattern"), "behavior": obj.get("behavior"),
                    "invert": bool(obj.get("invert", False))}
        return {k: _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    return obj


def recognise(tokenizer_json: dict) -> str | None:
    """The family (a key of ``PRE_TOKENIZERS``) whose normalizer and pre-tokenizer
    ``tokenizer_json`` has, or None."""
    got = (_canonical(tokenizer_json.get("normalizer")), _canonical(tokenizer_json.get("pre_tokenizer")))
    for fam, (_, normalizer, pre_tokenizer, _) in PRE_TOKENIZERS.items():
        if got == (_canonical(normalizer), _canonical(pre_tokenizer)):
            return fam
    return None


def _describe(tokenizer_json: dict) -> str:
    """The regexes (or the JSON) of an unrecognised pre-tokenizer, for an error message."""
    regexes = []

    def walk(o):
        if isinstance(o, dict):
            if "Regex" in o:
                regexes.append(o["Regex"])
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(tokenizer_json.get("pre_tokenizer"))
    if regexes:
        return "the Split regex " + ", ".join(repr(r) for r in regexes)
    return json.dumps(tokenizer_json.get("pre_tokenizer"))[:200]
