"""Any GGUF this package runs (a ``llama`` model such as SmolLM2, or MiniGPT's ``gpt2``), as
the tools that only need text in and logits out see it: ``open_model(path)`` gives a
``Model`` with ``encode(text)`` (the file's own tokenizer, BOS as the file says) and
``logits(tokens, hook)`` (the NumPy forward on float32 weights, every tensor dequantized;
``hook(name, x)`` sees the input (T, in) of every matrix product by its GGUF tensor name).
Used by ``minigpt_np.imatrix`` and ``minigpt_np.kld``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from refquant import gguf


@dataclass
class Model:
    path: str
    arch: str
    n_ctx: int
    vocab: int
    bos: int | None                 # the token that starts a sequence, when the vocabulary adds one
    head: str                       # the GGUF name of the output product's weight
    encode: Callable[[str], list]
    _run: Callable

    def logits(self, tokens, hook=None) -> np.ndarray:
        """float32 (T, vocab): next-token logits at every position of ``tokens`` (one sequence
        from an empty cache)."""
        return self._run(np.asarray(tokens, np.int64), hook)


def open_model(path) -> Model:
    """The GGUF at ``path`` as a ``Model`` (module docstring); a clear error for another
    architecture."""
    from minigpt_np.tokenizer import Tokenizer

    with gguf.read(path) as f:
        arch = f.metadata.get("general.architecture")
        has_output = "output.weight" in f.tensors
    if arch == "llama":
        from minigpt_np import llama

        params, cfg, meta = llama.load(path)
        head = "output.weight" if has_output else "token_embd.weight"

        def run(tokens, hook):
            return llama.forward(params, cfg, tokens, hook=hook, head_name=head,
                                 allow_long_context=True)[0]
        n_ctx, vocab = cfg.n_ctx, cfg.vocab
    elif arch == "gpt2":
        from minigpt_np import checkpoint, model

        params, cfg, meta = checkpoint.load(path)
        head = "token_embd.weight"      # MiniGPT's head is its tied embedding

        def run(tokens, hook):
            named = None if hook is None else (lambda name, x: hook(name + ".weight", x.reshape(-1, x.shape[-1])))
            return model.forward(params, tokens, cfg=cfg, hook=named)[0][0]
        n_ctx, vocab = cfg.n_ctx, cfg.vocab
    else:
        raise gguf.GGUFError(f"{path}: architecture {arch!r}; this runs llama and gpt2 (MiniGPT) models")
    tok = Tokenizer(meta)
    bos = tok.bos if tok.add_bos and tok.bos >= 0 else None
    return Model(str(path), arch, int(n_ctx), int(vocab), bos, head, lambda text: tok.encode(text, bos=False), run)
