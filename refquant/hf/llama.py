"""Llama-architecture names and row orders between GGUF and Hugging Face checkpoints.

The tensor names follow llama.cpp's ``gguf-py/gguf/tensor_mapping.py`` (``token_embd`` ↔
``model.embed_tokens``, ``blk.N.attn_q`` ↔ ``model.layers.N.self_attn.q_proj``, …). The
query and key rows differ in order: Hugging Face's rotary embedding pairs dimension ``i``
with ``i + d/2`` of each head, llama.cpp's pairs ``2i`` with ``2i + 1``, and
``convert_hf_to_gguf.py`` (``LlamaModel.permute``) reorders the rows of ``q_proj`` (per
query head) and ``k_proj`` (per key/value head) when it writes a GGUF: GGUF row
``h·d + 2i + j`` is Hugging Face row ``h·d + j·d/2 + i``. Reordering rows moves whole rows
of codes, scales and zero points, so it is exact for every per-row layout.
"""
from __future__ import annotations

import re

import numpy as np

_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}
_TOP_BACK = {v: k for k, v in _TOP.items()}
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` → ``model.layers.3.self_attn.q_proj.weight``."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"no Hugging Face Llama name for GGUF tensor {gguf_name!r}")


def gguf_name(name: str) -> str:
    """The inverse of ``hf_name``."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+\.\w+|\w+)\.(weight|bias)", name)
    if m and m.group(2) in _BLOCK_BACK:
        return f"blk.{m.group(1)}.{_BLOCK_BACK[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(model\.\w+|lm_head)\.(weight|bias)", name)
    if m and m.group(1) in _TOP_BACK:
        return f"{_TOP_BACK[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"no GGUF Llama name for tensor {name!r}")


def rope_rows(n_rows: int, n_head: int) -> np.ndarray:
    """``perm`` with ``W_gguf = W_hf[perm]`` for a q (``n_head`` query heads) or k (key/value
    heads) projection of ``n_rows`` rows: per head, GGUF row ``2i + j`` is HF row ``j·d/2 + i``."""
    d = n_rows // n_head
    if d * n_head != n_rows or d % 2:
        raise ValueError(f"{n_rows} rows do not split into {n_head} heads of an even size")
    return np.arange(n_rows).reshape(n_head, 2, d // 2).swapaxes(1, 2).reshape(-1)


def rotary_perm(gguf_name: str, n_rows: int, cfg: dict) -> np.ndarray | None:
    """``perm`` with ``W_gguf = W_hf[perm]`` when ``gguf_name`` is a block's q or k projection
    (heads from the ``config.json`` fields ``cfg``), else None."""
    n_head = int(cfg["num_attention_heads"])
    heads = {"attn_q": n_head, "attn_k": int(cfg.get("num_key_value_heads", n_head))}
    kind = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else None
    return rope_rows(n_rows, heads[kind]) if kind in heads else None


def write_checkpoint(out_dir, quantized: dict, others: dict, metadata: dict, *, layout: str,
                     checkpoint_format: str = "gptq", force: bool = False):
    """A llama GGUF's tensors, given by GGUF name in GGUF row order, written as a Hugging Face
    checkpoint: ``quantized`` (``QuantizedTensor`` s) in ``layout``, ``others`` as float16
    matrices / float32 vectors, Hugging Face names and rotary rows, ``config.json`` from the
    GGUF ``metadata`` (tied embeddings when there is no ``output.weight``)."""
    from refquant.hf import checkpoint

    cfg = config(metadata)
    q_hf, o_hf = {}, {}
    for name, qt in quantized.items():
        perm = rotary_perm(name, qt.shape[0], cfg)
        q_hf[hf_name(name)[: -len(".weight")]] = qt if perm is None else permute_rows(qt, np.argsort(perm))
    for name, w in others.items():
        w = np.asarray(w)
        perm = rotary_perm(name, w.shape[0], cfg) if w.ndim == 2 else None
        w = w if perm is None else w[np.argsort(perm)]
        o_hf[hf_name(name)] = w.astype(np.float32 if w.ndim == 1 else np.float16)
    if "lm_head.weight" not in o_hf:
        cfg["tie_word_embeddings"] = True
    return checkpoint.write(out_dir, q_hf, o_hf, layout=layout, checkpoint_format=checkpoint_format, config=cfg,
                            force=force)


def config(metadata: dict) -> dict:
    """``config.json`` fields of a ``LlamaForCausalLM`` from a llama GGUF's metadata."""
    m = metadata
    n_head = int(m["llama.attention.head_count"])
    return dict(architectures=["LlamaForCausalLM"], model_type="llama",
                hidden_size=int(m["llama.embedding_length"]), intermediate_size=int(m["llama.feed_forward_length"]),
                num_hidden_layers=int(m["llama.block_count"]), num_attention_heads=n_head,
                num_key_value_heads=int(m.get("llama.attention.head_count_kv", n_head)),
                max_position_embeddings=int(m.get("llama.context_length", 2048)),
                rms_norm_eps=float(str(np.float32(m.get("llama.attention.layer_norm_rms_epsilon", 1e-5)))),
                rope_theta=float(m.get("llama.rope.freq_base", 10000.0)),
                vocab_size=int(m.get("llama.vocab_size", 0)) or None, torch_dtype="float16")


def permute_rows(qt, perm: np.ndarray):
    """``qt`` with its output rows reordered (row ``r`` of the result is row ``perm[r]``):
    codes, scales and zero points move with their rows, so the weights move exactly."""
    from refquant.tensor import QuantizedTensor

    m = qt.meta
    if qt.kind not in ("affine", "gptq") or (qt.kind == "affine" and m["granularity"] not in ("group", "channel")):
        raise ValueError(f"rows of a {qt.kind} tensor ({m.get('granularity')}) cannot be reordered here")
    return QuantizedTensor(qt.codes[perm], qt.scales[perm], None if qt.zeros is None else qt.zeros[perm],
                           qt.shape, qt.scheme, dict(m))


def metadata(cfg: dict) -> dict:
    """llama GGUF metadata (``llama.*``) from a ``config.json``."""
    n_head = int(cfg["num_attention_heads"])
    d = int(cfg["hidden_size"])
    return {"general.architecture": "llama", "llama.block_count": np.uint32(cfg["num_hidden_layers"]),
            "llama.context_length": np.uint32(cfg.get("max_position_embeddings", 2048)),
            "llama.embedding_length": np.uint32(d), "llama.feed_forward_length": np.uint32(cfg["intermediate_size"]),
            "llama.attention.head_count": np.uint32(n_head),
            "llama.attention.head_count_kv": np.uint32(cfg.get("num_key_value_heads", n_head)),
            "llama.rope.freq_base": np.float32(cfg.get("rope_theta", 10000.0)),
            "llama.attention.layer_norm_rms_epsilon": np.float32(cfg.get("rms_norm_eps", 1e-5)),
            "llama.rope.dimension_count": np.uint32(d // n_head)}
