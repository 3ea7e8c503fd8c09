"""Llama-architecture names and row orders between GGUF and Hugging Face checkpoints.

The tensor names follow llama.cpp's ``gguf-py/gguf/tensor_mapping.py`` (``token_embd`` ↔
``model.embed_tokens``, ``blk.N.attn_q`` ↔ ``model.layers.N.self_attn.q_proj``, …). The
query and key rows differ in order: Hugging Face's rotary embedding pairs dimension ``i``
with ``i + d/2`` of each head, llama.cpp's pairs ``2i`` with ``2i + 1``, and
``convert_hf_to_gguf.py`` (``LlamaModel.permute``) reorders the rows of ``q_proj`` (per
query head) and ``k_proj`` (per key/value head) when it writes a GGUF: GGUF row
``h·d + 2i + j`` is Hugging Face row ``h·d + j·d/2 + i``. Reordering rows moves whole rows
of codes, scales and zero points, so it is exact for every per-row layout.

The architecture's hyperparameters (``LlamaConfig``, read from GGUF metadata by
``config_from_metadata``) and one check of a model against them (``validate``: head
arithmetic, every tensor's shape) live here, beside the names, so that every reader of a
Llama -- both of ``minigpt_np``'s engines and ``python -m refquant convert`` -- accepts and
refuses the same models.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from refquant._checks import check_tensors

_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}
_TOP_BACK = {v: k for k, v in _TOP.items()}
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class LlamaConfig:
    n_layer: int
    d_model: int
    d_ff: int
    n_head: int
    n_head_kv: int
    n_rot: int
    rope_base: float
    eps: float
    vocab: int
    n_ctx: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def config_from_metadata(m: dict, source="metadata") -> LlamaConfig:
    """The hyperparameters of a llama GGUF's metadata, checked by ``check_config``. The
    vocabulary is the tokenizer's token count (``tokenizer.ggml.tokens``), else
    ``llama.vocab_size``; when both are present they must agree."""
    arch = m.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"not a llama-architecture GGUF (general.architecture = {arch!r})")
    missing = [k for k in ("llama.attention.head_count", "llama.embedding_length", "llama.block_count",
                           "llama.feed_forward_length") if k not in m]
    if "tokenizer.ggml.tokens" not in m and "llama.vocab_size" not in m:
        missing.append("tokenizer.ggml.tokens")
    if missing:
        raise ValueError(f"{source}: metadata key {missing[0]} is missing")
    n_head = int(m["llama.attention.head_count"])
    d = int(m["llama.embedding_length"])
    cfg = LlamaConfig(
        n_layer=int(m["llama.block_count"]), d_model=d, d_ff=int(m["llama.feed_forward_length"]), n_head=n_head,
        n_head_kv=int(m.get("llama.attention.head_count_kv", n_head)),
        n_rot=int(m.get("llama.rope.dimension_count", d // max(n_head, 1))),
        rope_base=float(m.get("llama.rope.freq_base", 10000.0)),
        eps=float(m.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        vocab=len(m["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in m else int(m["llama.vocab_size"]),
        n_ctx=int(m.get("llama.context_length", 2048)))
    check_config(cfg, source)
    if "llama.vocab_size" in m and int(m["llama.vocab_size"]) != cfg.vocab:
        raise ValueError(f"{source}: llama.vocab_size is {m['llama.vocab_size']} but the tokenizer has {cfg.vocab} tokens")
    return cfg


def check_config(cfg: LlamaConfig, source="params") -> None:
    """The head arithmetic the forward relies on: positive sizes, ``d_model`` a multiple of
    ``n_head``, ``n_head`` a multiple of ``n_head_kv`` (grouped-query attention), an even
    rotary width no wider than a head."""
    for field in ("n_layer", "d_model", "d_ff", "n_head", "n_head_kv", "vocab", "n_ctx"):
        if getattr(cfg, field) < 1:
            raise ValueError(f"{source}: {field} must be positive, got {getattr(cfg, field)}")
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"{source}: d_model {cfg.d_model} is not a multiple of head_count {cfg.n_head}")
    if cfg.n_head % cfg.n_head_kv:
        raise ValueError(f"{source}: head_count {cfg.n_head} is not a multiple of head_count_kv {cfg.n_head_kv}")
    if not (0 < cfg.n_rot <= cfg.head_dim and cfg.n_rot % 2 == 0):
        raise ValueError(f"{source}: rope.dimension_count {cfg.n_rot} must be even and in (0, head_dim "
                         f"{cfg.head_dim}]")


def tensor_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward reads, with the shape the config implies (rows first)."""
    d, q, kv, ff = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim, cfg.d_ff
    want = {"token_embd.weight": (cfg.vocab, d), "output_norm.weight": (d,), "output.weight": (cfg.vocab, d)}
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        want.update({p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,), p + "attn_q.weight": (q, d),
                     p + "attn_k.weight": (kv, d), p + "attn_v.weight": (kv, d), p + "attn_output.weight": (d, q),
                     p + "ffn_gate.weight": (ff, d), p + "ffn_up.weight": (ff, d), p + "ffn_down.weight": (d, ff)})
    return want


def validate(tensors, cfg: LlamaConfig, source="params") -> None:
    """A model against its config, before any engine (NumPy or compiled) runs it: the head
    arithmetic (``check_config``) and every tensor's shape (``tensor_shapes``; ``output.weight``
    may be absent: tied to the embedding). ``tensors`` maps names to anything with a
    ``.shape``: arrays, Linears, a GGUF file's tensor entries. ``ValueError`` naming the
    source, the tensor, the expected and the found shape."""
    check_config(cfg, source)
    check_tensors(tensors, tensor_shapes(cfg), source, optional=("output.weight",))


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
                     checkpoint_format: str = "gptq", force: bool = False, tokenizer: bool | dict = True):
    """A llama GGUF's tensors, given by GGUF name in GGUF row order, written as a Hugging Face
    checkpoint: ``quantized`` (``QuantizedTensor`` s) in ``layout``, ``others`` as float16
    matrices / float32 vectors, Hugging Face names and rotary rows, ``config.json`` from the
    GGUF ``metadata`` (tied embeddings when there is no ``output.weight``), and the tokenizer
    files of its ``tokenizer.ggml.*`` keys (``tokenizer_files``; or ``tokenizer``, that
    function's result computed already) unless ``tokenizer=False``; a file without a
    tokenizer gets none. Returns the directory and whether a tokenizer was written."""
    from refquant.hf import checkpoint

    cfg = config(metadata)
    files = {}
    if isinstance(tokenizer, dict) or tokenizer and "tokenizer.ggml.tokens" in metadata:
        files = dict(tokenizer) if isinstance(tokenizer, dict) else tokenizer_files(metadata)
        cfg.update(files.pop("config"))
        files.pop("lost")
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
                            force=force, files=files), bool(files)


def tokenizer_files(metadata: dict) -> dict:
    """``refquant.hf.tokenizer.hf_files`` of a llama GGUF's tokenizer (``model_max_length``:
    its context length)."""
    from refquant.hf import tokenizer as hf_tokenizer

    return hf_tokenizer.hf_files(metadata, context_length=config(metadata)["max_position_embeddings"])


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
                vocab_size=int(m.get("llama.vocab_size", 0)) or len(m.get("tokenizer.ggml.tokens", ())) or None,
                torch_dtype="float16")


def permute_rows(qt, perm: np.ndarray):
    """``qt`` with its output rows reordered (row ``r`` of the result is row ``perm[r]``):
    codes, scales and zero points move with their rows, so the weights move exactly."""
    from refquant.tensor import QuantizedTensor

    m = qt.meta
    if qt.kind not in ("affine", "gptq") or (qt.kind == "affine" and m["granularity"] not in ("group", "channel")):
        raise ValueError(f"rows of a {qt.kind} tensor ({m.get('granularity')}) cannot be reordered here")
    return QuantizedTensor(qt.codes[perm], qt.scales[perm], None if qt.zeros is None else qt.zeros[perm],
                           qt.shape, qt.scheme, dict(m))


def _field(cfg: dict, key: str, kind, default, source):
    """``config.json``'s ``key`` as written (an int is not a bool, a float or a string; a
    float may be an int), ``default`` when absent, else ``ValueError`` naming the field."""
    if key not in cfg:
        if default is None:
            raise ValueError(f"{source}: config.json field {key!r} is missing")
        return default
    v = cfg[key]
    if kind is int:
        ok = isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**32
    else:   # stored as float32: positive and finite there
        with np.errstate(over="ignore"):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 2.0**128 \
                and 0 < np.float32(v) < np.inf
    if not ok:
        raise ValueError(f"{source}: config.json field {key!r} must be a "
                         f"{'positive integer below 2^32' if kind is int else 'positive float32'}, got {v!r:.40}")
    return v


def metadata(cfg: dict, source="config.json") -> dict:
    """llama GGUF metadata (``llama.*``) from a ``config.json``, every field checked for its
    type and range (``config_from_metadata`` then checks the head arithmetic)."""
    f = lambda key, kind=int, default=None: _field(cfg, key, kind, default, source)  # noqa: E731
    n_head, d = f("num_attention_heads"), f("hidden_size")
    m = {"general.architecture": "llama", "llama.block_count": np.uint32(f("num_hidden_layers")),
         "llama.context_length": np.uint32(f("max_position_embeddings", int, 2048)),
         "llama.embedding_length": np.uint32(d), "llama.feed_forward_length": np.uint32(f("intermediate_size")),
         "llama.attention.head_count": np.uint32(n_head),
         "llama.attention.head_count_kv": np.uint32(f("num_key_value_heads", int, n_head)),
         "llama.rope.freq_base": np.float32(f("rope_theta", float, 10000.0)),
         "llama.attention.layer_norm_rms_epsilon": np.float32(f("rms_norm_eps", float, 1e-5)),
         "llama.rope.dimension_count": np.uint32(d // n_head)}
    if cfg.get("vocab_size") is not None:
        m["llama.vocab_size"] = np.uint32(f("vocab_size"))
    return m
