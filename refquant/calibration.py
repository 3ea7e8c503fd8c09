"""Calibration: run a model over sample sequences and collect what calibrated quantizers need.

Per Linear layer, from its inputs ``x`` (one row per token), accumulated in float64:

* the Hessian proxy ``H = 2/n Σ x xᵀ`` (GPTQ),
* per-input-channel ``mean |x|`` (AWQ) and ``max |x|`` (SmoothQuant, LLM.int8()),
* optionally the inputs themselves (``keep_inputs``), which is what a scheme's
  ``quantize(w, calib=X)`` takes.

The model is driven through a ``hook(name, x)`` that sees every Linear's input (MiniGPT's
``forward(..., hook=...)``, through callbacks: this module imports no model).
``quantize_sequential`` quantizes a whole model the way the GPTQ paper does: layer by
layer in forward order, each layer calibrated on the inputs produced by the
already-quantized layers before it. Only the current layer's statistics
are held (one d×d matrix at a time).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refquant._checks import float_array


@dataclass
class LayerStats:
    """Running input statistics of one Linear, accumulated batch by batch (``add_batch``, as
    the GPTQ reference accumulates its Hessian). ``keep_inputs``: also keep the inputs."""

    keep_inputs: bool = False
    n: int = 0
    xtx: np.ndarray | None = None
    sum_abs: np.ndarray | None = None
    max_abs: np.ndarray | None = None
    inputs: list = field(default_factory=list)

    def add_batch(self, x: np.ndarray) -> "LayerStats":
        """Add inputs ``x`` (..., in): one row per token."""
        x = np.asarray(x)
        x2 = x.astype(np.float64).reshape(-1, x.shape[-1])
        if self.xtx is None:
            d = x2.shape[1]
            self.xtx, self.sum_abs, self.max_abs = np.zeros((d, d)), np.zeros(d), np.zeros(d)
        elif x2.shape[1] != self.xtx.shape[0]:
            raise ValueError(f"inputs have {x2.shape[1]} features, earlier batches had {self.xtx.shape[0]}")
        self.xtx += x2.T @ x2
        self.sum_abs += np.abs(x2).sum(axis=0)
        np.maximum(self.max_abs, np.abs(x2).max(axis=0, initial=0), out=self.max_abs)
        self.n += x2.shape[0]
        if self.keep_inputs:
            self.inputs.append(x2.astype(np.float32))
        return self

    def _need_data(self):
        if self.n == 0:
            raise ValueError("no calibration inputs were added")

    @property
    def H(self) -> np.ndarray:
        """GPTQ's Hessian proxy ``2/n Σ x xᵀ``, float64 (in, in)."""
        self._need_data()
        return 2.0 / self.n * self.xtx

    @property
    def mean_abs(self) -> np.ndarray:
        """Per input channel ``mean |x|`` (AWQ)."""
        self._need_data()
        return self.sum_abs / self.n

    @property
    def X(self) -> np.ndarray:
        """The inputs themselves, float32 (n, in) (only with ``keep_inputs``)."""
        if not self.keep_inputs:
            raise ValueError("these statistics were collected without keep_inputs: the inputs were not kept")
        self._need_data()
        return np.concatenate(self.inputs)

    def padded(self, width: int) -> "LayerStats":
        """These statistics for inputs zero-padded to ``width`` features: the extra inputs
        are never active (GPTQ treats them as dead, AWQ as unused channels)."""
        self._need_data()
        d = self.xtx.shape[0]
        if width < d:
            raise ValueError(f"cannot pad {d} features to {width}")
        e = width - d
        xtx = np.zeros((width, width))
        xtx[:d, :d] = self.xtx
        return LayerStats(self.keep_inputs, self.n, xtx, np.pad(self.sum_abs, (0, e)), np.pad(self.max_abs, (0, e)),
                          [np.pad(x, ((0, 0), (0, e))) for x in self.inputs])


def as_stats(calib) -> LayerStats:
    """Calibration data as ``LayerStats``: statistics pass through; inputs ``X`` (tokens, in)
    become the statistics of those inputs (inputs kept)."""
    if isinstance(calib, LayerStats):
        return calib
    return LayerStats(keep_inputs=True).add_batch(float_array(calib, "calib", ndim=2))


def collect(run, sequences, names=None, *, keep_inputs: bool = False, batch: int = 16,
            progress: bool = True) -> dict[str, LayerStats]:
    """Statistics of the Linears in ``names`` (all if None) over ``sequences`` (S, T) tokens.

    ``run(batch, hook)`` runs the model on ``sequences[i:i + batch]`` (an array of token
    rows, or a list of token lists) with the hook installed.
    """
    from tqdm import tqdm

    stats: dict[str, LayerStats] = {}
    wanted = None if names is None else set(names)

    def hook(name, x):
        if wanted is None or name in wanted:
            stats.setdefault(name, LayerStats(keep_inputs)).add_batch(x)

    for i in tqdm(range(0, len(sequences), batch), desc="calibrate", unit="batch", disable=not progress, leave=False):
        run(sequences[i:i + batch], hook)
    return stats


def quantize_sequential(names, run, quantize, sequences, *, needs_calib: bool = True, progress: bool = True,
                        desc: str = "quantize") -> None:
    """Quantize a model's Linears one at a time, in forward order, as the GPTQ paper does.

    ``names``: the Linears in forward order; ``run(tokens, hook)``: the model as it stands
    (already-quantized layers included) on a batch of token rows with the hook installed;
    ``quantize(name, calib)``: quantize layer ``name`` in the model with its inputs
    ``calib`` (tokens, in), or None when ``needs_calib`` is false (no passes are run then).
    Layer k is thus calibrated on the inputs produced by the quantized layers 0..k-1. The
    model is whatever the callbacks drive: refquant knows no model.
    """
    from tqdm import tqdm

    for name in tqdm(list(names), desc=desc, unit="layer", disable=not progress):
        X = collect(run, sequences, [name], keep_inputs=True, progress=False)[name].X if needs_calib else None
        quantize(name, X)
