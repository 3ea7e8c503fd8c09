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

from minigpt_np.model import EOT, Config
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
        "gpt2.feed_forward_length": np.uint32(4 * cfg.d_model),
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


def load(path=DEFAULT) -> tuple[dict, Config, dict]:
    """``(params, cfg, metadata)`` from a checkpoint written by ``save``."""
    with gguf.read(path) as f:
        m = f.metadata
        if m.get("general.architecture") != "gpt2":
            raise gguf.GGUFError(f"{path}: not a gpt2 GGUF (architecture {m.get('general.architecture')!r})")
        cfg = Config(n_layer=int(m["gpt2.block_count"]), d_model=int(m["gpt2.embedding_length"]),
                     n_head=int(m["gpt2.attention.head_count"]), n_ctx=int(m["gpt2.context_length"]),
                     vocab=len(m["tokenizer.ggml.tokens"]),
                     eps=float(f"{m['gpt2.attention.layer_norm_epsilon']:.7g}"))  # float32 -> the decimal it came from
        params = {n: f.tensor(n).dequantize().copy() for n in f.tensors}
        return params, cfg, dict(m)


# --- quantized models ----------------------------------------------------------------------
# A quantized MiniGPT is written with its Linears in their stored form. Schemes with a GGML
# type (Q8_0, Q4_K, IQ4_NL, …) become ordinary ggml tensors of that type, which llama.cpp
# reads. Any other scheme (GPTQ with act-order, NF4, AWQ, W8A8, …) is stored as its parts:
# ``<name>.weight.codes`` / ``.scales`` / ``.zeros`` and ``.meta.<key>`` for every array in
# ``QuantizedTensor.meta``, raw bytes kept bit for bit (uint8 data in I8 tensors); the other
# meta values, the dtypes and the shape go to the metadata key ``refquant.<name>.weight``
# as JSON. Embeddings are written as F16 (the evaluation policy), norms and biases as F32.

_DTYPES = {"uint8": np.int8, "int8": np.int8, "float16": np.float16, "float32": np.float32, "int32": np.int32,
           "int16": np.int16, "float64": np.float64, "int64": np.int64}


def _part(a: np.ndarray) -> np.ndarray:
    """An array as a GGUF-storable one with the same bytes (unsigned -> signed view)."""
    a = np.ascontiguousarray(a)
    if a.ndim == 0:
        a = a.reshape(1)
    return a.view(a.dtype.str.replace("u", "i")) if a.dtype.kind == "u" else a


# Unscaled float schemes whose codes are exactly a ggml tensor type's bytes.
_FLOAT_GGML = {"fp16": "F16", "bf16": "BF16"}


def save_quantized(path, params: dict, cfg: Config, linears, scheme: str) -> Path:
    """Write a MiniGPT whose Linears were quantized by ``scheme`` (``linears`` from evaluate)."""
    import json

    meta = metadata(cfg, {"scheme": scheme})
    tensors = {}
    for k, v in params.items():
        if k in ("token_embd.weight", "position_embd.weight"):
            tensors[k] = np.asarray(v, np.float16)
        elif not any(k == n + ".weight" for n in linears.layers):
            tensors[k] = np.asarray(v, np.float32)
    for name, layer in linears.layers.items():
        key = name + ".weight"
        qt = layer.get("qt")
        if qt is None:  # FP32 method
            tensors[key] = layer["w"]
            continue
        if qt.kind == "ggml":
            tensors[key] = gguf.GGUFTensor(qt.meta["ggml_type"], qt.shape, qt.codes)
            continue
        if qt.meta.get("granularity") == "none" and qt.meta.get("fmt") in _FLOAT_GGML:
            raw = np.ascontiguousarray(qt.codes).view(np.uint8).reshape(-1)
            tensors[key] = gguf.GGUFTensor(_FLOAT_GGML[qt.meta["fmt"]], qt.shape, raw)
            continue
        parts = {"codes": qt.codes, "scales": qt.scales, "zeros": qt.zeros}
        parts.update({f"meta.{k}": v for k, v in qt.meta.items() if isinstance(v, np.ndarray)})
        info = {"shape": list(qt.shape), "scheme": qt.scheme, "dtypes": {}, "shapes": {},
                "meta": {k: v for k, v in qt.meta.items() if not isinstance(v, np.ndarray)}}
        for part, arr in parts.items():
            if arr is None:
                continue
            info["dtypes"][part], info["shapes"][part] = arr.dtype.name, list(arr.shape)
            tensors[f"{key}.{part}"] = _part(arr)
        meta[f"refquant.{key}"] = json.dumps(info, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    return gguf.write(path, meta, tensors)


def load_quantized(path):
    """``(params, cfg, quantized)``: params with every Linear weight dequantized (the
    fake-quant weights), and ``{linear name: QuantizedTensor}`` rebuilt from the file."""
    import json

    from refquant.gguf import quants
    from refquant.tensor import QuantizedTensor

    with gguf.read(path) as f:
        m = f.metadata
        cfg = Config(n_layer=int(m["gpt2.block_count"]), d_model=int(m["gpt2.embedding_length"]),
                     n_head=int(m["gpt2.attention.head_count"]), n_ctx=int(m["gpt2.context_length"]),
                     vocab=len(m["tokenizer.ggml.tokens"]),
                     eps=float(f"{m['gpt2.attention.layer_norm_epsilon']:.7g}"))
        params, quantized = {}, {}
        for n, info in f.tensors.items():
            if ".weight." in n:
                continue  # parts of a stored QuantizedTensor, assembled below
            t = f.tensor(n)
            if info.type.name not in ("F32", "F16"):
                qt = QuantizedTensor(np.array(t.raw).reshape(info.shape[0], -1), None, None, info.shape,
                                     info.type.name.lower(), {"kind": "ggml", "ggml_type": info.type.name})
                quantized[n[:-len(".weight")]] = qt
                params[n] = qt.dequantize()
            else:
                params[n] = t.dequantize().copy()
        for key in [k for k in m if k.startswith("refquant.")]:
            info = json.loads(m[key])
            wname = key[len("refquant."):]
            arrays = {}
            for part, dt in info["dtypes"].items():
                raw = f.tensor(f"{wname}.{part}").numpy()
                arrays[part] = np.array(raw).view(np.dtype(dt)).reshape(info["shapes"][part])
            meta = dict(info["meta"])
            for k, v in meta.items():
                if isinstance(v, list):
                    meta[k] = tuple(v)
            meta.update({p[5:]: a for p, a in arrays.items() if p.startswith("meta.")})
            qt = QuantizedTensor(arrays["codes"], arrays.get("scales"), arrays.get("zeros"), tuple(info["shape"]),
                                 info["scheme"], meta)
            quantized[wname[:-len(".weight")]] = qt
            params[wname] = qt.dequantize()
        del quants
        return params, cfg, quantized
