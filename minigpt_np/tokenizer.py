"""Byte-level BPE tokenizer built from a GGUF file's ``tokenizer.ggml.*`` metadata.

This is the GPT-2 scheme llama.cpp implements for ``tokenizer.ggml.model == "gpt2"``:

1. **Pre-tokenization** splits text into pieces that BPE never merges across. llama.cpp
   picks the split rules from ``tokenizer.ggml.pre``; the ones implemented here:

   * ``gpt-2`` (and the others of its family): the GPT-2 pattern
     ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)``
     (text no alternative matches, e.g. a lone newline before a word, is its own piece);
   * ``smollm`` (also starcoder, refact, command-r, codeshell, exaone, minerva): every
     digit is first cut out as its own piece, then the GPT-2 pattern runs on the rest.

   Python's ``re`` has no ``\\p{L}``, so the GPT-2 pattern is a small hand-written scanner
   over Unicode categories (``unicodedata``): letters are categories L*, numbers N*.
2. **Byte mapping**: each piece's UTF-8 bytes become printable characters with GPT-2's
   byte-to-unicode table (printable Latin-1 bytes map to themselves, the other 68 bytes
   to U+0100 onwards), so every byte string has a spelling in the vocabulary's alphabet.
3. **BPE**: the adjacent pair with the lowest merge rank (its line in
   ``tokenizer.ggml.merges``) is merged until no pair has a rank; each resulting symbol
   is a vocabulary token.

Control tokens (``token_type`` 3, e.g. ``<|im_start|>``) are recognised in the text only
when ``encode(..., special=True)``; otherwise their spelling is tokenized as plain text.
``decode(encode(s)) == s`` for every string whose bytes all have tokens (``representable``). ``render_chat`` formats messages with the
ChatML layout of ``tokenizer.chat_template`` (no Jinja: the template is checked to be the
ChatML one before it is used).
"""
from __future__ import annotations

import heapq
import re
import unicodedata
from functools import lru_cache

import numpy as np

from refquant._checks import first_surrogate as _surrogate
from refquant.hf.pretokenizers import PRE_TOKENIZERS

CONTROL = 3
# llama.cpp's pre-tokenizer names by regex set (refquant.hf.pretokenizers.PRE_TOKENIZERS, from src/llama-vocab.cpp)
DIGIT_SPLIT_PRE = set(PRE_TOKENIZERS["smollm"][0])
GPT2_PRE = set(PRE_TOKENIZERS["gpt2"][0])


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _kind(c: str) -> str:
    """'L' letter, 'N' number, 'S' whitespace, 'O' anything else (the regex's classes)."""
    if c.isspace():
        return "S"
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "O"


_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def gpt2_split(text: str) -> list[str]:
    """Pieces of ``text`` under the GPT-2 pre-tokenizer pattern (see the module docstring)."""
    out, i, n = [], 0, len(text)
    kinds = [_kind(c) for c in text]
    while i < n:
        if text[i] == "'":  # the contractions come first in the alternation
            hit = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
            if hit:
                out.append(hit)
                i += len(hit)
                continue
        lead = text[i] == " " and i + 1 < n and kinds[i + 1] != "S"  # the optional " " prefix
        k = kinds[i + 1] if lead else kinds[i]
        if k != "S":  # ' ?\p{L}+' | ' ?\p{N}+' | ' ?[^\s\p{L}\p{N}]+'
            j = i + 1 if lead else i
            while j < n and kinds[j] == k:
                j += 1
            out.append(text[i:j])
            i = j
            continue
        j = i  # a whitespace run
        while j < n and kinds[j] == "S":
            j += 1
        if j == n:               # '\s+(?!\S)' takes all of it at the end
            out.append(text[i:j])
            i = j
        elif j - i > 1:          # all but the last, which goes with what follows
            out.append(text[i:j - 1])
            i = j - 1
        else:                    # one non-space whitespace char before text: matched by
            out.append(text[i])  # no alternative, so it stays a piece of its own
            i = j
    return out


LONG_PIECE = 256   # pieces longer than this go through the compiled merge loop


class Tokenizer:
    """Tokenizer of one GGUF vocabulary: ``encode``, ``decode``, ``render_chat``."""

    def __init__(self, metadata: dict):
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"only byte-level BPE ('gpt2') vocabularies are supported, got {model!r}")
        self.pre = str(metadata.get("tokenizer.ggml.pre", "default"))
        # llama.cpp's "default" splits differently from GPT-2 (four regexes); with no merges
        # (MiniGPT's byte vocabulary) every split gives the same tokens, so it is read there only
        no_merges = len(metadata.get("tokenizer.ggml.merges", ())) == 0
        if self.pre not in DIGIT_SPLIT_PRE | GPT2_PRE and not (self.pre == "default" and no_merges):
            raise ValueError(f"pre-tokenizer {self.pre!r} is not implemented (known: "
                             f"{', '.join(sorted(DIGIT_SPLIT_PRE | GPT2_PRE))})")
        self.tokens = [str(t) for t in metadata["tokenizer.ggml.tokens"]]
        types = metadata.get("tokenizer.ggml.token_type")
        self.types = [int(t) for t in types] if types is not None else [1] * len(self.tokens)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(metadata["tokenizer.ggml.merges"])}
        self.bos = int(metadata.get("tokenizer.ggml.bos_token_id", -1))
        self.eos = int(metadata.get("tokenizer.ggml.eos_token_id", -1))
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
        self.chat_template = metadata.get("tokenizer.chat_template")
        self.special = {t: i for i, t in enumerate(self.tokens) if self.types[i] == CONTROL}
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)))
        self._b2u = byte_to_unicode()
        self._u2b = {u: b for b, u in self._b2u.items()}
        self._cache: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def representable(self, text: str) -> bool:
        """Whether every UTF-8 byte of ``text`` has a token. SmolLM2's vocabulary lacks 21
        of the 256 byte tokens (e.g. 0x04, 0xC0, 0xF1, 0xFF); llama.cpp, and this
        tokenizer, drop such bytes, so only representable text round-trips."""
        if _surrogate(text) is not None:
            return False
        return all(self._b2u[b] in self.ids for b in text.encode("utf-8"))

    # --- encode ------------------------------------------------------------------------
    def pre_tokenize(self, text: str) -> list[str]:
        if self.pre in DIGIT_SPLIT_PRE:
            return [p for chunk in self._split_numbers(text)
                    for p in ([chunk] if len(chunk) == 1 and _kind(chunk) == "N" else gpt2_split(chunk))]
        return gpt2_split(text)

    @staticmethod
    def _split_numbers(part: str) -> list[str]:
        """Cut every \\p{N} character (not only ASCII digits) out as its own piece."""
        out, start = [], 0
        for i, c in enumerate(part):
            if _kind(c) == "N":
                if i > start:
                    out.append(part[start:i])
                out.append(c)
                start = i + 1
        if start < len(part):
            out.append(part[start:])
        return out

    def _bpe(self, piece: str) -> list[int]:
        """Byte-level BPE of one pre-token piece: repeatedly merge the adjacent pair of lowest
        merge rank, the leftmost on ties (llama.cpp's ``llm_tokenizer_bpe``). A heap of
        candidate pairs over a linked list of symbols makes it O(n log n) in the piece's
        length; a pair whose symbols changed since it was pushed is skipped when popped."""
        if piece in self._cache:
            return self._cache[piece]
        if len(piece) > LONG_PIECE and self._kernel_tables() is not None:
            return self._bpe_compiled(piece)
        sym = [self._b2u[b] for b in piece.encode("utf-8")]
        n = len(sym)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        ranks, shift = self.ranks, 32   # heap keys rank·2^32 + position: int comparisons only
        heap = [r << shift | i for i, r in enumerate(map(ranks.get, zip(sym, sym[1:]))) if r is not None]
        heapq.heapify(heap)
        mask = (1 << shift) - 1
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            key = pop(heap)
            r, i = key >> shift, key & mask
            j = nxt[i]
            if j >= n or ranks.get((sym[i], sym[j])) != r:   # stale: a neighbour merged since
                continue
            sym[i] += sym[j]
            sym[j] = ""
            k = nxt[i] = nxt[j]
            if k < n:
                prv[k] = i
                rk = ranks.get((sym[i], sym[k]))
                if rk is not None:
                    push(heap, rk << shift | i)
            h = prv[i]
            if h >= 0:
                rh = ranks.get((sym[h], sym[i]))
                if rh is not None:
                    push(heap, rh << shift | h)
        ids, i = [], 0
        while i < n:
            s_ = sym[i]
            if s_ in self.ids:
                ids.append(self.ids[s_])
            else:  # fall back to single bytes; bytes the vocabulary lacks are dropped, as llama.cpp does
                ids.extend(self.ids[c] for c in s_ if c in self.ids)
            i = nxt[i]
        if len(self._cache) < 100_000:
            self._cache[piece] = ids
        return ids

    def _kernel_tables(self):
        if not hasattr(self, "_tables"):
            from minigpt_np import _bpe_kernel

            self._tables = _bpe_kernel.tables(self.ids, self.ranks)
        return self._tables

    def _bpe_compiled(self, piece: str) -> list[int]:
        """The same merges as ``_bpe`` in numba (``_bpe_kernel``), for long pieces."""
        from minigpt_np import _bpe_kernel

        vocab, keys, ranks, results = self._tables
        sym = np.array([self.ids.get(self._b2u[b], -1) for b in piece.encode("utf-8")], np.int64)
        return _bpe_kernel.merge(sym, vocab, keys, ranks, results).tolist()

    def encode(self, text: str, *, special: bool = False, bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; ``special=True`` turns control-token spellings into their ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        bad = _surrogate(text)
        if bad is not None:
            raise ValueError(f"text holds a lone surrogate (U+{ord(text[bad]):04X}) at index {bad}: "
                             "it is not a character and has no UTF-8 bytes")
        ids = [self.bos] if (self.add_bos if bos is None else bos) and self.bos >= 0 else []
        chunks = [(text, False)]
        if special and self.special:
            chunks, pos = [], 0
            for m in self._special_re.finditer(text):
                chunks += [(text[pos:m.start()], False), (m.group(), True)]
                pos = m.end()
            chunks.append((text[pos:], False))
        for chunk, is_special in chunks:
            if is_special:
                ids.append(self.special[chunk])
            elif chunk:
                for piece in self.pre_tokenize(chunk):
                    ids.extend(self._bpe(piece))
        return ids

    # --- decode ------------------------------------------------------------------------
    def decode(self, ids, *, special: bool = True) -> str:
        """Text of ``ids``; control tokens are written out unless ``special=False``."""
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"token id {i} outside the vocabulary of {len(self.tokens)}")
            if self.types[i] == CONTROL:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                if special:
                    out.append(self.tokens[i])
                continue
            buf.extend(self._u2b[c] for c in self.tokens[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    # --- chat --------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    default_system: str | None = None) -> str:
        """ChatML text of ``messages`` as the GGUF's (ChatML) chat template renders it."""
        t = self.chat_template or ""
        if "<|im_start|>" not in t or "<|im_end|>" not in t:
            raise ValueError("the vocabulary's chat template is not ChatML; rendering it is not implemented")
        if default_system is None:
            m = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", t, re.S)
            default_system = m.group(1) if m else None
        parts = []
        if default_system is not None and messages and messages[0]["role"] != "system":
            parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
        for msg in messages:
            parts.append(f"<|im_start|>{msg['role']}\n{msg['content']}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)


def from_gguf(path) -> Tokenizer:
    """The tokenizer stored in a GGUF file."""
    from refquant import gguf

    with gguf.read(path) as f:
        return Tokenizer(f.metadata)
