"""MiniGPT checkpoints as GGUF files that llama.cpp's ``gpt2`` architecture can load.

Tensors keep llama.cpp's gpt2 names (``token_embd.weight``, ``position_embd.weight``,
``blk.N.attn_norm.{weight,bias}``, ``blk.N.attn_qkv.*``, ``blk.N.attn_output.*``,
``blk.N.ffn_norm.*``, ``blk.N.ffn_up.*``, ``blk.N.ffn_down.*``, ``output_norm.*``; no
``output.weight``: the output projection is tied to the token embedding). Metadata: the
``gpt2.*`` hyperparameters, and a byte-level BPE vocabulary (``tokenizer.ggml.model =
gpt2``): the 256 byte tokens written with GPT-2's byte-to-unicode map and no merges, plus
``<|endoftext|>`` as BOS/EOS. ``minigpt.*`` keys record the training run and test metrics.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from minigpt_np.model import EOT, Config, validate
from refquant import gguf

DEFAULT = Path(__file__).resolve().parent / "checkpoints" / "minigpt.gguf"


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def metadata(cfg: Config, extra: dict | None = None) -> dict:
    b2u = byte_to_unicode()
    tokens = [b2u[b] for b in range(256)] + ["<|endoftext|>"]
    meta = {
        "general.architecture": "gpt2",
        "general.name": "MiniGPT (refquant, English-verb corpus)",
        "general.file_type": np.uint32(0),
        "gpt2.context_length": np.uint32(cfg.n_ctx),
        "gpt2.embedding_length": np.uint32(cfg.d_model),
        "gpt2.feed_forward_length": np.uint32(cfg.d_ff),
        "gpt2.block_count": np.uint32(cfg.n_layer),
        "gpt2.attention.head_count": np.uint32(cfg.n_head),
        "gpt2.attention.layer_norm_epsilon": np.float32(cfg.eps),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array([1] * 256 + [3], np.int32),
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.bos_token_id": np.uint32(EOT),
        "tokenizer.ggml.eos_token_id": np.uint32(EOT),
    }
    for k, v in (extra or {}).items():
        meta[f"minigpt.{k}"] = np.float64(v) if isinstance(v, float) else v
    return meta


def save(path, params: dict, cfg: Config, extra: dict | None = None) -> Path:
    """Write F32 ``params`` (+ metadata) atomically."""
    return gguf.write(path, metadata(cfg, extra), {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()})


def load(path=DEFAULT, *, parts: bool = True) -> tuple[dict, Config, dict]:
    """``(params, cfg, metadata)`` from a checkpoint written by ``save`` (every tensor
    dequantized to float32; ``parts=False`` leaves out the parts of stored quantized
    tensors, see ``save_quantized``)."""
    from refquant.gguf import tensors as gguf_tensors

    with gguf.read(path) as f:
        m = f.metadata
        if m.get("general.architecture") != "gpt2":
            raise gguf.GGUFError(f"{path}: not a gpt2 GGUF (architecture {m.get('general.architecture')!r})")
        keys = ("gpt2.block_count", "gpt2.embedding_length", "gpt2.attention.head_count", "gpt2.context_length",
                "tokenizer.ggml.tokens", "gpt2.attention.layer_norm_epsilon")
        missing = [k for k in keys if k not in m]
        if missing:
            raise gguf.GGUFError(f"{path}: metadata key {missing[0]} is missing")
        d = int(m["gpt2.embedding_length"])
        cfg = Config(n_layer=int(m["gpt2.block_count"]), d_model=d,
                     n_head=int(m["gpt2.attention.head_count"]), n_ctx=int(m["gpt2.context_length"]),
                     vocab=len(m["tokenizer.ggml.tokens"]), d_ff=int(m.get("gpt2.feed_forward_length", 4 * d)),
                     eps=float(f"{m['gpt2.attention.layer_norm_epsilon']:.7g}"))  # float32 -> the decimal it came from
        stored_parts = gguf_tensors.part_names(f)
        skip = set() if parts else stored_parts
        if not stored_parts:   # (a file storing parts: load_quantized validates once the Linears are rebuilt)
            validate(f.tensors, cfg, path)
        params = {n: f.tensor(n).dequantize().copy() for n in f.tensors if n not in skip}
        return params, cfg, dict(m)


# --- quantized models ----------------------------------------------------------------------
# A quantized MiniGPT is written with its Linears in their stored form
# (``refquant.gguf.tensors``: GGML schemes as ggml tensors llama.cpp reads, other schemes as
# their parts); embeddings as F16 (the evaluation policy), norms and biases as F32.


def save_quantized(path, params: dict, cfg: Config, linears, scheme: str) -> Path:
    """Write a MiniGPT whose Linears (``model.Linears``) were quantized by ``scheme``."""
    from refquant.gguf import tensors as gguf_tensors

    meta = metadata(cfg, {"scheme": scheme})
    tensors = {}
    for k, v in params.items():
        if k in ("token_embd.weight", "position_embd.weight"):
            tensors[k] = np.asarray(v, np.float16)
        elif k[: -len(".weight")] not in linears.layers:
            tensors[k] = np.asarray(v, np.float32)
    for name, lin in linears.layers.items():
        qt = getattr(lin, "qt", None)   # a float32 Linear has no QuantizedTensor: written as F32
        if qt is None:
            tensors[name + ".weight"] = lin.dequantize()
            continue
        t, m = gguf_tensors.to_gguf(name + ".weight", qt)
        tensors.update(t)
        meta.update(m)
    return gguf.write(path, meta, tensors)


def load_quantized(path):
    """``(params, cfg, quantized)``: params with every Linear weight dequantized (the
    fake-quant weights), and ``{linear name: QuantizedTensor}`` rebuilt from the file."""
    from refquant.gguf import tensors as gguf_tensors

    params, cfg, _ = load(path, parts=False)
    with gguf.read(path) as f:
        qts = gguf_tensors.read_quantized(f)
    for n, qt in qts.items():
        params[n] = qt.dequantize()
    validate(params, cfg, path)
    return params, cfg, {n[: -len(".weight")]: qt for n, qt in qts.items()}
