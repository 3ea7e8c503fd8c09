"""MiniGPT's training curve, drawn from the log that ``python -m minigpt_np.train`` writes.

    python -m benchmarks.training

Reads ``benchmarks/results/minigpt_train.json`` (train loss per step, validation loss every
100 steps, learning rate) and draws ``figures/minigpt_loss.png``. Does not train.
"""
from __future__ import annotations

import numpy as np

from benchmarks import common


def plot(data: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = np.array(data["train"])
    va = np.array(data["val"])
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(tr[:, 0], tr[:, 1], color="0.75", lw=0.6, label="train loss (per batch)")
    k = 50
    if len(tr) > k:
        smooth = np.convolve(tr[:, 1], np.ones(k) / k, mode="valid")
        ax.plot(tr[k - 1:, 0], smooth, color="tab:blue", lw=1.5, label=f"train loss ({k}-step mean)")
    ax.plot(va[:, 0], va[:, 1], "o-", color="tab:orange", ms=3, label="validation loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy [nats per byte]")
    c = data["config"]
    ax.set_title(f"MiniGPT {c['n_layer']}L d{c['d_model']} h{c['n_head']} ctx{c['n_ctx']}: "
                 f"{data['steps']} steps x {data['batch_size']}x{c['n_ctx']} tokens, {data['elapsed_s'] / 60:.0f} min")
    ax2 = ax.twinx()
    ax2.plot(tr[:, 0], tr[:, 3], color="tab:green", lw=0.8, ls="--", label="learning rate")
    ax2.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper right")
    common.finish_figure(fig, ax, path)


def main(argv=None) -> None:
    common.quick_args(__doc__).parse_args(argv)
    data = common.read_json("minigpt_train")
    plot(data, common.FIGURES / "minigpt_loss.png")
    print(f"final train loss {np.mean([r[1] for r in data['train'][-50:]]):.4f}, val {data['val'][-1][1]:.4f}; "
          f"wrote {common.FIGURES / 'minigpt_loss.png'}")


if __name__ == "__main__":
    main()
