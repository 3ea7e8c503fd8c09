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
                processor=platform.processor(), cpus=os.cpu_count())


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


def finish_figure(fig, ax, path: Path) -> None:
    """Grid, tight layout, save as PNG and close: the end of every figure."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
