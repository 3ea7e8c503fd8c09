"""W8A8's activation-outlier cliff on a MiniGPT layer, and SmoothQuant / LLM.int8() fixing it.

    python -m benchmarks.outliers [--quick]

Takes the real inputs of MiniGPT's ``blk.1.ffn_up`` (calibration sequences from the
training split), multiplies 4 input channels by a factor f ∈ {1, 2, 5, …, 100} (the
systematic outlier features of large LLMs), and measures each scheme's relative output
error ``||Y - X Wᵀ|| / ||X Wᵀ||`` against the exact float64 product. Weight-only INT8
(activations in float) is the reference line. Every scheme is re-calibrated on the
modified inputs. Writes ``benchmarks/results/outliers.json`` and ``figures/outliers.png``.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from benchmarks import common
from minigpt_np import checkpoint, evaluate
from minigpt_np.model import forward
from refquant import calibration, schemes

LAYER = "blk.1.ffn_up"
FACTORS = (1, 2, 5, 10, 20, 50, 100)
SCHEMES = ("int8_channel", "w8a8", "smoothquant_w8a8", "llm_int8")
N_OUTLIERS = 4


def run(quick: bool = False) -> dict:
    params, cfg, _ = checkpoint.load()
    seqs = evaluate.calibration_sequences(cfg, 8 if quick else 32)
    X = calibration.collect(lambda t, hook: forward(params, t, cfg=cfg, hook=hook), seqs, [LAYER],
                            keep_inputs=True, progress=False)[LAYER].X
    w = params[LAYER + ".weight"]
    chans = np.sort(np.random.default_rng(0).choice(X.shape[1], N_OUTLIERS, replace=False))
    rows = []
    for f in tqdm(FACTORS[:3] if quick else FACTORS, desc="outlier factor", unit="factor"):
        Xf = X.copy()
        Xf[:, chans] *= f
        ref = Xf.astype(np.float64) @ w.T.astype(np.float64)
        for name in SCHEMES:
            s = schemes.get(name)
            qt = s.quantize(w, calib=Xf if s.needs_calib else None)
            Y = s.matmul(qt, Xf)
            rows.append(dict(factor=f, scheme=name, rel_error=float(np.linalg.norm(Y - ref) / np.linalg.norm(ref)),
                             max_abs_x=float(np.abs(Xf).max())))
    return dict(benchmark="outliers", quick=quick, layer=LAYER, tokens=int(X.shape[0]), outlier_channels=chans.tolist(),
                machine=common.machine(), results=rows)


def plot(data: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    labels = {"int8_channel": "INT8 weights only (float activations)", "w8a8": "W8A8 (per-token int8 activations)",
              "smoothquant_w8a8": "SmoothQuant α=0.5 + W8A8", "llm_int8": "LLM.int8() (|x| ≥ 6 in FP16)"}
    for name in SCHEMES:
        r = [d for d in data["results"] if d["scheme"] == name]
        ax.plot([d["factor"] for d in r], [d["rel_error"] for d in r], "o-", label=labels[name])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"outlier factor on {len(data['outlier_channels'])} of the input channels")
    ax.set_ylabel("relative output error  ||Y − XWᵀ|| / ||XWᵀ||")
    ax.set_title(f"W8A8 outlier cliff: MiniGPT {data['layer']}, {data['tokens']} tokens")
    ax.legend(fontsize=8)
    common.finish_figure(fig, ax, path)


def main(argv=None) -> None:
    args = common.quick_args(__doc__).parse_args(argv)
    data = run(args.quick)
    path = common.write_json("outliers", data)
    plot(data, common.FIGURES / "outliers.png")
    for d in data["results"]:
        print(f"x{d['factor']:<4d} {d['scheme']:18s} {d['rel_error']:.5f}")
    print(f"wrote {path} and {common.FIGURES / 'outliers.png'}")


if __name__ == "__main__":
    main()
