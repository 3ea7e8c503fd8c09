"""Train MiniGPT in NumPy with a hand-written backward pass; ``python -m minigpt_np.train``.

Every layer has a forward that keeps what its backward needs and a backward that returns
the input gradient and accumulates parameter gradients (tests check each against central
finite differences in float64). Optimizer: AdamW (β = 0.9, 0.95; weight decay 0.1 on
matrices and embeddings), linear warmup then cosine decay, global-norm gradient clipping
at 1.0. Data: the training lines of ``minigpt_np.corpus``, each preceded by the
end-of-text token, concatenated; batches are random windows of ``n_ctx + 1`` tokens.

Size (the default ``Config``): 4 layers, d_model 256, 4 heads, context 128, byte
vocabulary of 257: 3.2 M parameters (12.7 MB as F32). d_model = 256 makes every Linear's
input a multiple of 256, so the GGML K-quants (256-weight super-blocks) apply to all of
them; 4 layers at batch 16 × 128 run ~1.3 steps/s on 2 cores, so 3000 steps
(~6 M tokens, ~2 epochs) fit in under 45 minutes.

The run state (parameters, Adam moments, step, RNG) is saved every ``--save-every`` steps
to ``--state`` and resumed from it with ``--resume``. The final parameters are written
with ``refquant.gguf.write`` to ``minigpt_np/checkpoints/minigpt.gguf`` (see
``minigpt_np.checkpoint``), and the loss log to ``benchmarks/results/minigpt_train.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from minigpt_np import corpus
from minigpt_np.model import GELU_A, GELU_C, Config, forward, init_params
from refquant._checks import cli_float, cli_int

ROOT = Path(__file__).resolve().parents[1]


# --- backward of each layer (the forward is ``model.forward``, which records what these need) ----

def layer_norm_bwd(dy, cache, grads, prefix):
    xhat, rstd, w = cache
    axes = tuple(range(dy.ndim - 1))
    grads[prefix + ".weight"] += (dy * xhat).sum(axis=axes)
    grads[prefix + ".bias"] += dy.sum(axis=axes)
    dxhat = dy * w
    n = dy.shape[-1]
    return rstd / n * (n * dxhat - dxhat.sum(-1, keepdims=True) - xhat * (dxhat * xhat).sum(-1, keepdims=True))


def linear_bwd(dy, x, w, grads, prefix):
    d_out, d_in = w.shape
    grads[prefix + ".weight"] += dy.reshape(-1, d_out).T @ x.reshape(-1, d_in)
    grads[prefix + ".bias"] += dy.reshape(-1, d_out).sum(axis=0)
    return dy @ w


def gelu_bwd(dy, cache):
    x, t = cache
    dinner = GELU_C * (1 + 3 * GELU_A * x * x)
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dinner)


def attention_bwd(do, cache):
    """Gradient of ``model.attention`` w.r.t. the fused ``qkv`` (B, T, 3d), from ``do`` (B, T, d)."""
    q, k, v, att, scale = cache
    B, H, T, dh = q.shape
    do = do.reshape(B, T, H, dh).transpose(0, 2, 1, 3)
    dv = att.transpose(0, 1, 3, 2) @ do
    datt = do @ v.transpose(0, 1, 3, 2)
    ds = att * (datt - (datt * att).sum(-1, keepdims=True)) * scale
    dq = ds @ k
    dk = ds.transpose(0, 1, 3, 2) @ q
    return np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * H * dh)


def cross_entropy_fwd(logits, targets):
    """Mean cross-entropy (nats) over all positions, and the softmax for the backward."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    flat = p.reshape(-1, p.shape[-1])
    t = targets.reshape(-1)
    loss = -np.log(np.maximum(flat[np.arange(t.size), t], 1e-30)).mean()
    return float(loss), (p, targets)


def cross_entropy_bwd(cache):
    p, targets = cache
    g = p.reshape(-1, p.shape[-1]).copy()
    t = targets.reshape(-1)
    g[np.arange(t.size), t] -= 1.0
    return (g / t.size).reshape(p.shape)


# --- the whole model ----------------------------------------------------------------------

def loss_and_grads(params: dict, cfg: Config, tokens: np.ndarray, targets: np.ndarray):
    """Forward (``model.forward``, recording a tape) + backward over a batch; returns
    ``(loss, grads)`` with grads shaped like params."""
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    tape: dict = {}
    logits, _ = forward(params, tokens, cfg=cfg, tape=tape)
    loss, c_ce = cross_entropy_fwd(logits, targets)

    dlogits = cross_entropy_bwd(c_ce)
    E, hf = params["token_embd.weight"], tape["hidden"]
    grads["token_embd.weight"] += dlogits.reshape(-1, E.shape[0]).T @ hf.reshape(-1, E.shape[1])
    dx = layer_norm_bwd(dlogits @ E, tape["output_norm"][0], grads, "output_norm")
    for i in reversed(range(cfg.n_layer)):
        b = f"blk.{i}."

        def linear(name, dy):
            return linear_bwd(dy, tape[b + name], params[b + name + ".weight"], grads, b + name)

        du = gelu_bwd(linear("ffn_down", dx), tape[b + "gelu"][0])
        dx = dx + layer_norm_bwd(linear("ffn_up", du), tape[b + "ffn_norm"][0], grads, b + "ffn_norm")
        dqkv = attention_bwd(linear("attn_output", dx), tape[b + "attn"][0])
        dx = dx + layer_norm_bwd(linear("attn_qkv", dqkv), tape[b + "attn_norm"][0], grads, b + "attn_norm")
    np.add.at(grads["token_embd.weight"], tokens.reshape(-1), dx.reshape(-1, dx.shape[-1]))
    grads["position_embd.weight"][: tokens.shape[1]] += dx.sum(axis=0)
    return loss, grads


# --- optimizer and data -----------------------------------------------------------------------

def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0))))


def decays(name: str) -> bool:
    return name.endswith(".weight") and "norm" not in name


def adamw_step(params, grads, state, lr, wd=0.1, b1=0.9, b2=0.95, eps=1e-8, clip=1.0):
    """In-place AdamW update after global-norm clipping; returns the pre-clip gradient norm."""
    norm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values())))
    scale = min(1.0, clip / (norm + 1e-12))
    state["t"] += 1
    t = state["t"]
    for k, p in params.items():
        g = grads[k] * scale
        m, v = state["m"][k], state["v"][k]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        mhat = m / (1 - b1 ** t)
        vhat = v / (1 - b2 ** t)
        if decays(k):
            p *= 1 - lr * wd
        p -= (lr * mhat / (np.sqrt(vhat) + eps)).astype(p.dtype)
    return norm


def batch(stream: np.ndarray, B: int, T: int, rng) -> tuple[np.ndarray, np.ndarray]:
    starts = rng.integers(0, len(stream) - T - 1, B)
    w = np.stack([stream[s:s + T + 1] for s in starts]).astype(np.int64)
    return w[:, :-1], w[:, 1:]


def evaluate_loss(params, cfg, stream, B, T, n_batches, seed=123) -> float:
    from minigpt_np.model import log_softmax

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(n_batches):
        x, y = batch(stream, B, T, rng)
        logits, _ = forward(params, x, cfg=cfg)
        lp = log_softmax(logits)
        losses.append(-np.take_along_axis(lp, y[..., None], -1).mean())
    return float(np.mean(losses))


def train(cfg: Config, *, steps: int, batch_size: int, lr: float, warmup: int, seed: int = 0,
          state_path: Path | None = None, resume: bool = False, save_every: int = 200, eval_every: int = 100,
          log_path: Path | None = None, time_limit_s: float | None = None, quiet: bool = False):
    """Train and return ``(params, log)``; ``log`` has the loss curve and timing."""
    splits = corpus.make_splits(seed=seed)
    train_stream, val_stream = corpus.token_stream(splits.train), corpus.token_stream(splits.validation)
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed)
    opt = {"t": 0, "m": {k: np.zeros_like(v) for k, v in params.items()},
           "v": {k: np.zeros_like(v) for k, v in params.items()}}
    log = {"config": cfg.to_dict(), "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
           "seed": seed, "train": [], "val": [], "elapsed_s": 0.0}
    start = 0
    if resume and state_path and Path(state_path).exists():
        z = np.load(state_path, allow_pickle=False)
        params = {k[2:]: z[k] for k in z.files if k.startswith("p/")}
        opt["m"] = {k[2:]: z[k] for k in z.files if k.startswith("m/")}
        opt["v"] = {k[2:]: z[k] for k in z.files if k.startswith("v/")}
        opt["t"] = start = int(z["step"])
        log = json.loads(str(z["log"]))
        rng.bit_generator.state = json.loads(str(z["rng"]))   # the batches continue as if never stopped
    t0 = time.time() - log["elapsed_s"]
    from tqdm import tqdm

    bar = tqdm(range(start, steps), desc="train", unit="step", disable=quiet, initial=start, total=steps)
    for step in bar:
        x, y = batch(train_stream, batch_size, cfg.n_ctx, rng)
        loss, grads = loss_and_grads(params, cfg, x, y)
        rate = lr_at(step, steps, lr, warmup)
        norm = adamw_step(params, grads, opt, rate)
        log["train"].append([step, loss, norm, rate])
        bar.set_postfix(loss=f"{loss:.3f}")
        last = step + 1 == steps
        if (step + 1) % eval_every == 0 or last:
            val = evaluate_loss(params, cfg, val_stream, batch_size, cfg.n_ctx, 4)
            log["val"].append([step + 1, val])
            bar.write(f"step {step + 1}: train {loss:.4f}  val {val:.4f}  ({time.time() - t0:.0f} s)")
        log["elapsed_s"] = time.time() - t0
        stop = time_limit_s is not None and time.time() - t0 > time_limit_s
        if state_path and ((step + 1) % save_every == 0 or last or stop):
            save_state(state_path, params, opt, step + 1, log, rng)
        if log_path and ((step + 1) % eval_every == 0 or last or stop):
            _write_log(log_path, log)
        if stop:
            break
    return params, log


def _write_log(path: Path, log: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": "minigpt_train", **log}))
    tmp.replace(path)


def save_state(path: Path, params, opt, step, log, rng) -> None:
    """Atomic save of the resumable run state (weights, optimizer moments, step, log and
    the batch sampler's RNG state, so a resumed run draws the batches an unbroken run would)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp.npz")
    arrays = {f"p/{k}": v for k, v in params.items()}
    arrays.update({f"m/{k}": v for k, v in opt["m"].items()})
    arrays.update({f"v/{k}": v for k, v in opt["v"].items()})
    np.savez(tmp, step=step, log=json.dumps(log), rng=json.dumps(rng.bit_generator.state), **arrays)
    tmp.replace(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=cli_int(1, 10**7), default=2400)
    ap.add_argument("--batch-size", type=cli_int(1, 1 << 16), default=16)
    ap.add_argument("--lr", type=cli_float(0.0, 1.0, lo_open=True), default=1e-3)
    ap.add_argument("--warmup", type=cli_int(0, 10**7), default=100)
    ap.add_argument("--seed", type=cli_int(0, 2**32 - 1), default=0)
    ap.add_argument("--state", type=Path, default=ROOT / "minigpt_np" / "checkpoints" / "train_state.npz")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "minigpt_np" / "checkpoints" / "minigpt.gguf")
    ap.add_argument("--log", type=Path, default=ROOT / "benchmarks" / "results" / "minigpt_train.json",
                    help="training log (JSON), which `python -m benchmarks.training` draws")
    ap.add_argument("--eval-lines", type=cli_int(1, 1 << 30), default=None,
                    help="test lines the final metrics are recorded on (default: the whole test split)")
    args = ap.parse_args(argv)
    from minigpt_np import checkpoint

    cfg = Config()
    args.state.parent.mkdir(parents=True, exist_ok=True)
    params, log = train(cfg, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                        seed=args.seed, state_path=args.state, resume=args.resume,
                        log_path=args.log)
    checkpoint.save(args.out, params, cfg, {"train_steps": args.steps, "train_seconds": log["elapsed_s"]})
    from minigpt_np import evaluate

    r = evaluate.record_metrics(args.out, limit=args.eval_lines)
    print(f"wrote {args.out} after {log['elapsed_s']:.0f} s: test accuracy {100 * r['accuracy']:.2f}%, "
          f"perplexity {r['perplexity']:.4f} per byte ({r['n']} lines)")


if __name__ == "__main__":
    main()
