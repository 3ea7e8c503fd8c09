"""MiniGPT: a GPT-2-style decoder in NumPy (pure functions over a dict of float32 arrays).

Architecture (GPT-2): byte tokens (256 bytes + one end-of-text token) and learned position
embeddings, ``n_layer`` pre-LayerNorm blocks ``x += attn(ln1(x)); x += mlp(ln2(x))`` with
causal multi-head attention and a GELU (tanh approximation) MLP of width 4·d, a final
LayerNorm, and the output projection tied to the token embedding.

Parameter names are llama.cpp's ``gpt2`` tensor names (``token_embd.weight``,
``blk.0.attn_qkv.weight`` …), so the dict is written to GGUF as it is. Linear weights are
``(out, in)``.

Every Linear is a ``refquant.linear.Linear`` (float32, or any registered scheme behind the
same call), held by ``Linears``; the model code never branches on how a weight is stored.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from refquant.kernels.kvcache import KVCache
from refquant.metrics import log_softmax  # noqa: F401  (part of this module's API: training and evaluation use it)
from refquant._checks import check_tensors

VOCAB = 257
EOT = 256  # end of text: separates examples and starts generation


@dataclass(frozen=True)
class Config:
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 4
    n_ctx: int = 128
    vocab: int = VOCAB
    eps: float = 1e-5
    d_ff: int | None = None   # the MLP's width; None: 4 * d_model (GPT-2's)

    def __post_init__(self):
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)

    def to_dict(self) -> dict:
        return asdict(self)


def token_ids(tokens, vocab: int) -> np.ndarray:
    """``tokens`` as an int64 array of ids in ``[0, vocab)`` (same shape), or an error: floats
    and bools are refused, not cast (a cast turns 1.7 and True into token 1)."""
    t = np.asarray(tokens)
    if t.size == 0:
        raise ValueError("tokens is empty")
    if not isinstance(tokens, np.ndarray) and t.dtype.kind in "iu" and any(
            isinstance(v, (bool, np.bool_)) for v in np.asarray(tokens, dtype=object).reshape(-1)):
        t = t.astype(bool)   # a list mixing bools and ints converts to ints: refuse it as bools
    if t.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got {t.dtype} ({t.reshape(-1)[:3].tolist()}...)")
    t = t.astype(np.int64)
    if t.min() < 0 or t.max() >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}), got {t.min()}..{t.max()}")
    return t


def tensor_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward reads, with the shape the config implies (rows first)."""
    d, ff = cfg.d_model, cfg.d_ff
    want = {"token_embd.weight": (cfg.vocab, d), "position_embd.weight": (cfg.n_ctx, d),
            "output_norm.weight": (d,), "output_norm.bias": (d,)}
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        for ln in ("attn_norm", "ffn_norm"):
            want[b + ln + ".weight"] = want[b + ln + ".bias"] = (d,)
        for name, (out, inp) in (("attn_qkv", (3 * d, d)), ("attn_output", (d, d)), ("ffn_up", (ff, d)),
                                 ("ffn_down", (d, ff))):
            want[b + name + ".weight"], want[b + name + ".bias"] = (out, inp), (out,)
    return want


def validate(tensors, cfg: Config, source="params") -> None:
    """A MiniGPT against its config before any engine runs it: positive sizes, ``d_model`` a
    multiple of ``n_head``, and every tensor's shape (``tensor_shapes``, ``check_tensors``)."""
    for field in ("n_layer", "d_model", "n_head", "n_ctx", "vocab", "d_ff"):
        if getattr(cfg, field) < 1:
            raise ValueError(f"{source}: {field} must be positive, got {getattr(cfg, field)}")
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"{source}: d_model {cfg.d_model} is not a multiple of head_count {cfg.n_head}")
    check_tensors(tensors, tensor_shapes(cfg), source)


def linear_names(cfg: Config) -> list[str]:
    """The Linear layers, in forward order (without the ``.weight`` suffix)."""
    return [f"blk.{i}.{n}" for i in range(cfg.n_layer) for n in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")]


def init_params(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2 initialization: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
    rng = np.random.default_rng(seed)
    d = cfg.d_model
    p = {"token_embd.weight": rng.normal(0, 0.02, (cfg.vocab, d)),
         "position_embd.weight": rng.normal(0, 0.01, (cfg.n_ctx, d))}
    resid = 0.02 / np.sqrt(2 * cfg.n_layer)
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        for ln in ("attn_norm", "ffn_norm"):
            p[b + ln + ".weight"], p[b + ln + ".bias"] = np.ones(d), np.zeros(d)
        for name, (out, inp), std in (("attn_qkv", (3 * d, d), 0.02), ("attn_output", (d, d), resid),
                                      ("ffn_up", (cfg.d_ff, d), 0.02), ("ffn_down", (d, cfg.d_ff), resid)):
            p[b + name + ".weight"] = rng.normal(0, std, (out, inp))
            p[b + name + ".bias"] = np.zeros(out)
    p["output_norm.weight"], p["output_norm.bias"] = np.ones(d), np.zeros(d)
    return {k: v.astype(np.float32) for k, v in p.items()}


def config_from_params(params: dict) -> Config:
    """Sizes read off the arrays; ``n_head`` and ``eps`` cannot be, so they are the defaults
    (pass ``cfg`` explicitly for other values; checkpoints store it)."""
    n_layer = len({k.split(".")[1] for k in params if k.startswith("blk.")})
    vocab, d = params["token_embd.weight"].shape
    return Config(n_layer=n_layer, d_model=d, n_ctx=params["position_embd.weight"].shape[0], vocab=vocab,
                  d_ff=params["blk.0.ffn_up.weight"].shape[0] if n_layer else None)


# --- primitives --------------------------------------------------------------------------

def layer_norm(x, w, b, eps=1e-5, cache=None):
    """``(x - mean) / sqrt(var + eps) * w + b`` over the last axis; ``cache``, a list, gets
    ``(x̂, 1/σ, w)`` appended (what the backward pass needs, ``minigpt_np.train``)."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    xhat = xc * rstd
    if cache is not None:
        cache.append((xhat, rstd, w))
    return xhat * w + b


GELU_C = np.float32(np.sqrt(2.0 / np.pi))


GELU_A = np.float32(0.044715)


def gelu(x, cache=None):
    """GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³))); ``cache``
    gets ``(x, tanh(…))`` appended."""
    t = np.tanh(GELU_C * (x + GELU_A * x * x * x))
    if cache is not None:
        cache.append((x, t))
    return 0.5 * x * (1.0 + t)


def softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def attention(q, k, v, mask, cache=None):
    """``softmax(q kᵀ / sqrt(d_head) + mask) v`` for heads (B, H, T, d_head); ``cache`` gets
    ``(q, k, v, probabilities, scale)`` appended."""
    scale = np.float32(1 / np.sqrt(q.shape[-1]))
    att = softmax(q @ k.transpose(0, 1, 3, 2) * scale + mask)
    if cache is not None:
        cache.append((q, k, v, att, scale))
    return att @ v


# --- Linears ------------------------------------------------------------------------------

class Linears:
    """The model's Linear layers: ``linears(name, x) = x Wᵀ + b``, each weight a
    ``refquant.linear.Linear`` (float32, or quantized by any registered scheme).

    ``method``: a scheme name for every layer (None or ``"fp32"``: float32), or a callable
    ``name -> scheme name``; ``calib``: optional ``name -> calibration inputs`` for
    calibrated schemes. ``layers[name]`` can be replaced by any ``Linear``.
    """

    def __init__(self, params: dict, cfg: Config, method=None, calib=None):
        from refquant import linear

        validate(params, cfg)
        self.params = params
        self.layers = {}
        for name in linear_names(cfg):
            scheme = (method(name) if callable(method) else method) or "fp32"
            self.layers[name] = linear.quantize(params[name + ".weight"], scheme, calib=calib(name) if calib else None)

    def __call__(self, name: str, x: np.ndarray) -> np.ndarray:
        return self.layers[name](x) + self.params[name + ".bias"]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())


# --- forward ---------------------------------------------------------------------------

def forward(params: dict, tokens, *, cfg: Config | None = None, linears: Linears | None = None,
            past: list | None = None, hook=None, tape: dict | None = None):
    """Logits for ``tokens`` (T,) or (B, T); returns ``(logits (B, T, V), present)``, float32
    for float32 params. ``linears``: the Linear layers (``Linears``; None: the float weights
    in ``params`` as they are).

    ``past``: per-layer ``(k, v)`` of shape (B, H, T_past, d_head) from an earlier call
    (the KV cache); ``present`` is the same list extended by these tokens. Or, for one
    sequence (B = 1), a ``refquant.kernels.kvcache.KVCache`` (what ``Session`` and the
    compiled engine hold), which stores the new rows and is returned as ``present``. ``hook(name, x)``
    sees every Linear's input (calibration). ``tape``, a dict, receives what training's
    backward pass needs (``minigpt_np.train``): per norm, attention and GELU their cache
    list, per Linear its input, and the final hidden state ``"hidden"``.
    """
    cfg = cfg or config_from_params(params)
    tokens = np.atleast_2d(token_ids(tokens, cfg.vocab))
    B, T = tokens.shape
    kv = past if isinstance(past, KVCache) else None
    if kv is not None and B != 1:
        raise ValueError(f"a KVCache holds one sequence here; got a batch of {B}")
    t0 = int(kv.pos[0]) if kv is not None else 0 if not past else past[0][0].shape[2]
    if t0 + T > cfg.n_ctx:
        raise ValueError(f"sequence of {t0 + T} tokens exceeds the context of {cfg.n_ctx}")
    H, d = cfg.n_head, cfg.d_model
    dh = d // H
    x = params["token_embd.weight"][tokens] + params["position_embd.weight"][t0:t0 + T]
    present = []
    mask = np.triu(np.full((T, t0 + T), -np.inf, np.float32), k=t0 + 1)
    rec = (lambda key: tape.setdefault(key, [])) if tape is not None else (lambda key: None)

    def lin(name, x):
        if hook:
            hook(name, x)
        if tape is not None:
            tape[name] = x
        if linears is not None:
            return linears(name, x)
        w = params[name + ".weight"]   # the float weights as they are (training: any float dtype)
        return (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0]) + params[name + ".bias"]

    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        h = layer_norm(x, params[b + "attn_norm.weight"], params[b + "attn_norm.bias"], cfg.eps, rec(b + "attn_norm"))
        qkv = lin(b + "attn_qkv", h).reshape(B, T, 3, H, dh).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if kv is not None:
            kv.store(0, i, t0, k[0].transpose(1, 0, 2), v[0].transpose(1, 0, 2))
            k = kv.keys(0, i, t0 + T).transpose(1, 0, 2)[None]
            v = kv.values(0, i, t0 + T).transpose(1, 0, 2)[None]
        elif past:
            k = np.concatenate([past[i][0], k], axis=2)
            v = np.concatenate([past[i][1], v], axis=2)
        present.append((k, v))
        o = attention(q, k, v, mask, rec(b + "attn")).transpose(0, 2, 1, 3).reshape(B, T, d)
        x = x + lin(b + "attn_output", o)
        h = layer_norm(x, params[b + "ffn_norm.weight"], params[b + "ffn_norm.bias"], cfg.eps, rec(b + "ffn_norm"))
        u = gelu(lin(b + "ffn_up", h), rec(b + "gelu"))
        x = x + lin(b + "ffn_down", u)
    h = layer_norm(x, params["output_norm.weight"], params["output_norm.bias"], cfg.eps, rec("output_norm"))
    if tape is not None:
        tape["hidden"] = h
    logits = h.reshape(B * T, d) @ params["token_embd.weight"].T   # tied head, one 2-D BLAS call
    if kv is not None:
        kv.pos[0] = t0 + T
        present = kv
    return logits.reshape(B, T, -1), present


class CacheSession:
    """What every session (NumPy or compiled, Llama or MiniGPT) shares: a ``KVCache`` in
    ``self.cache`` (sequence 0), ``pos``, ``reset()`` and ``step(id)`` as a one-token
    ``prefill`` (which each session defines)."""

    cache: KVCache

    @property
    def pos(self) -> int:
        """Positions the cache holds; setting it rewinds (or, up to rows already written,
        replays) the sequence to that many positions: later rows are overwritten."""
        return int(self.cache.pos[0])

    @pos.setter
    def pos(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= self.cache.n_ctx:
            raise ValueError(f"pos must be an integer in [0, {self.cache.n_ctx}], got {value!r}")
        self.cache.pos[0] = value

    def reset(self) -> None:
        """Forget every position (the cache is overwritten from position 0)."""
        self.cache.reset()

    def prefill(self, ids, *, last_only: bool = False) -> np.ndarray:
        raise NotImplementedError

    def step(self, token: int) -> np.ndarray:
        return self.prefill([token])[0]


class Session(CacheSession):
    """Token-by-token MiniGPT on the NumPy forward with a ``KVCache`` (the operand the
    compiled engine holds): ``prefill(ids)`` -> logits (T, vocab) (``last_only``: (1,
    vocab)), ``step(id)`` -> logits (vocab,), ``reset()``, ``pos``. The NumPy reference for
    ``minigpt_np.compiled.MiniGPT``, which has the same interface (``cache_type_k`` /
    ``cache_type_v``: the cache's storage, ``refquant.kernels.kvcache``)."""

    def __init__(self, params: dict, cfg: Config, linears: Linears | None = None, *, cache_type_k: str = "f32",
                 cache_type_v: str = "f32"):
        validate(params, cfg)
        self.params, self.cfg, self.linears, self.n_ctx = params, cfg, linears, cfg.n_ctx
        self.cache = KVCache(cfg.n_layer, cfg.n_head, cfg.d_model // cfg.n_head, cfg.n_ctx, type_k=cache_type_k,
                             type_v=cache_type_v)

    def prefill(self, ids, *, last_only: bool = False) -> np.ndarray:
        logits, _ = forward(self.params, np.asarray(token_ids(ids, self.cfg.vocab)).reshape(1, -1), cfg=self.cfg,
                            linears=self.linears, past=self.cache)
        return logits[0, -1:] if last_only else logits[0]


def decode_step(params: dict, token: int, cache: list | None, *, cfg=None, linears=None):
    """One token through the KV cache: ``(logits (V,), new cache)``."""
    logits, cache = forward(params, np.array([[token]]), cfg=cfg, linears=linears, past=cache)
    return logits[0, -1], cache


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def generate(params: dict, prompt: str, n: int = 32, *, temperature: float = 0.0, seed: int = 0,
             cfg=None, linears=None, stop: int | None = ord("\n")) -> str:
    """Sample up to ``n`` bytes after ``[EOT] + prompt`` with the KV cache (greedy at temperature 0)."""
    cfg = cfg or config_from_params(params)
    linears = linears or Linears(params, cfg)
    rng = np.random.default_rng(seed)
    logits, cache = forward(params, np.array([[EOT] + encode(prompt)]), cfg=cfg, linears=linears)
    logits = logits[0, -1]
    out = []
    for _ in range(n):
        if temperature == 0:
            tok = int(np.argmax(logits))
        else:
            p = softmax(logits.astype(np.float64) / temperature)
            tok = int(rng.choice(len(p), p=p))
        if tok == stop or tok == EOT or len(out) + len(encode(prompt)) + 2 > cfg.n_ctx:
            break
        out.append(tok)
        logits, cache = decode_step(params, tok, cache, cfg=cfg, linears=linears)
    return decode(out)


def quantize_sequential(params: dict, cfg: Config, scheme: str, sequences, *, progress: bool = True) -> Linears:
    """MiniGPT ``Linears`` with every layer quantized by ``scheme``, calibrated sequentially
    (``refquant.calibration.quantize_sequential``: layer k on the inputs that the already
    quantized layers 0..k-1 produce). Uncalibrated schemes skip the passes."""
    from refquant import calibration, linear, schemes

    linears = Linears(params, cfg)

    def run(tokens, hook):
        forward(params, tokens, cfg=cfg, linears=linears, hook=hook)

    def quantize(name, X):
        linears.layers[name] = linear.quantize(params[name + ".weight"], scheme, calib=X)

    calibration.quantize_sequential(linear_names(cfg), run, quantize, sequences,
                                    needs_calib=schemes.get(scheme).needs_calib, progress=progress,
                                    desc=f"quantize {scheme}")
    return linears
