"""Shared plumbing for benchmarks: results directory, atomic JSON writing, machine facts."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from refquant._atomic import atomic_open

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "figures"


def machine() -> dict:
    """What the numbers were measured on."""
    import numpy as np

    return dict(python=platform.python_version(), numpy=np.__version__, machine=platform.machine(),
                processor=platform.processor(), cpu=_cpu(), cpus=os.cpu_count())


def _cpu() -> str:
    """The CPU's model name, family and model from ``/proc/cpuinfo`` (hosts of one name differ:
    "AMD EPYC" has been a Zen 3 and a Zen 5 here), or "" where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    f = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        f.setdefault(k.strip(), v.strip())
    return f"{f.get('model name', '')} (family {f.get('cpu family', '?')}, model {f.get('model', '?')})"


def write_json(name: str, data: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` atomically (temp file + rename)."""
    path = RESULTS / f"{name}.json"
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return path


def read_json(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def quick_args(doc: str):
    """The argument parser every benchmark shares (``--quick``); add more before parsing."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (CI smoke run)")
    return ap


def run_and_save(doc: str, name: str, run, argv, option: str, **option_kw) -> tuple[dict, Path]:
    """Parse ``--quick`` plus one ``option``, call ``run(quick, value)``, write ``<name>.json``."""
    ap = quick_args(doc)
    ap.add_argument(option, dest="value", **option_kw)
    args = ap.parse_args(argv)
    data = run(args.quick, args.value)
    return data, write_json(name, data)


def finish_figure(fig, ax, path: Path) -> None:
    """Grid, tight layout, save as PNG and close: the end of every figure."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label_points(ax, xs, ys, names, fontsize: float = 7.0, cluster_px: float = 45.0) -> None:
    """Label scatter points without overlaps: points closer than ``cluster_px`` along x form
    a cluster whose labels are stacked in a column beside it (in y order, with leader lines).

    Call after the axes limits and scales are final.
    """
    import numpy as np

    fig = ax.figure
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    box = ax.get_window_extent()
    h = 1.25 * fontsize * fig.dpi / 72
    order = np.argsort(pts[:, 0])
    clusters, cur = [], [order[0]]
    for i in order[1:]:
        if pts[i, 0] - pts[cur[-1], 0] < cluster_px:
            cur.append(i)
        else:
            clusters.append(cur)
            cur = [i]
    clusters.append(cur)
    for c in clusters:
        c = sorted(c, key=lambda i: pts[i, 1])
        want = pts[c, 1]
        y = want.copy()
        for k in range(1, len(y)):
            y[k] = max(y[k], y[k - 1] + h)
        y += want.mean() - y.mean()
        y += max(0, box.y0 + h / 2 - y[0]) - max(0, y[-1] - (box.y1 - h / 2))
        right = pts[c, 0].max() + 12 + 80 < box.x1
        x = pts[c, 0].max() + 12 if right else pts[c, 0].min() - 12
        for i, yl in zip(c, y):
            off = ((x - pts[i, 0]) * 72 / fig.dpi, (yl - pts[i, 1]) * 72 / fig.dpi)
            ax.annotate(names[i], (xs[i], ys[i]), xytext=off, textcoords="offset points", fontsize=fontsize,
                        ha="left" if right else "right", va="center",
                        arrowprops=dict(arrowstyle="-", lw=0.4, color="0.6", shrinkA=0, shrinkB=2))


def kl_columns(ref_logits, logits, tokens) -> dict:
    """The KL statistics of ``refquant.metrics.kl_divergence`` (as llama.cpp's
    ``--kl-divergence`` reports them) that the tables show: mean KLD ± se, median, p99,
    max, same top token ± se, and the perplexity ratio ± se, per next-byte position."""
    from refquant import metrics

    k = metrics.kl_divergence(ref_logits, logits, tokens)
    return dict(n=k["n"], kld_mean=k["kld"]["mean"], kld_se=k["kld"]["se"], kld_median=k["kld"]["median"],
                kld_p99=k["kld"]["p99"], kld_max=k["kld"]["max"], same_top=k["same_top"]["mean"],
                same_top_se=k["same_top"]["se"], ppl_ratio=k["ppl_ratio"]["mean"], ppl_ratio_se=k["ppl_ratio"]["se"])


def weight_only(names) -> list[str]:
    """The schemes of ``names`` that store weights alone (no calibration, no activation
    rounding): the ones the embeddings passes quantize the token embedding with."""
    from refquant import schemes

    return [n for n in names if n != "fp32" and not schemes.get(n).needs_calib and schemes.get(n).act_quant is None]
