"""Quantized safetensors checkpoints: GPTQ, AWQ and compressed-tensors, read and written.

A checkpoint is a directory (or one ``.safetensors`` file beside its config) holding
``*.safetensors`` and the config that names the layout:

* GPTQ: ``quantize_config.json`` (AutoGPTQ / GPTQModel: ``bits``, ``group_size``,
  ``desc_act``, ``sym``, ``checkpoint_format``) or ``config.json``'s
  ``quantization_config`` with ``quant_method: "gptq"``;
* AWQ: ``config.json``'s ``quantization_config`` (or ``quant_config.json``) with
  ``quant_method: "awq"``, ``bits``/``w_bit``, ``group_size``/``q_group_size``,
  ``version: "gemm"``;
* compressed-tensors: ``config.json``'s ``quantization_config`` with ``quant_method:
  "compressed-tensors"``, ``format: "pack-quantized"`` and one ``config_groups`` entry whose
  ``weights`` give ``num_bits``, ``symmetric``, ``strategy`` and ``group_size``.

A quantized Linear ``prefix`` is the set of tensors ``prefix.qweight``/``qzeros``/``scales``/
``g_idx`` (GPTQ), ``prefix.qweight``/``qzeros``/``scales`` (AWQ) or ``prefix.weight_packed``/
``weight_scale``/``weight_zero_point``/``weight_shape``/``weight_g_idx`` (compressed-tensors);
everything else (embeddings, norms, biases) is an ordinary tensor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refquant._atomic import atomic_open
from refquant.hf import layouts, safetensors
from refquant.tensor import QuantizedTensor

LAYOUTS = ("gptq", "awq", "compressed-tensors")
_FIELDS = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"),
}
_KEY = {"gptq": "qweight", "awq": "qweight", "compressed-tensors": "weight_packed"}


@dataclass
class Scheme:
    """What a checkpoint's config says about its quantized layers."""

    layout: str
    bits: int
    group_size: int
    sym: bool = True
    act_order: bool = False
    checkpoint_format: str = "gptq"     # GPTQ only: "gptq" (v1, zeros stored minus one) or "gptq_v2"
    config: dict = field(default_factory=dict)


@dataclass
class Checkpoint:
    scheme: Scheme
    quantized: dict            # Linear prefix -> QuantizedTensor
    tensors: dict              # every other tensor: name -> ndarray
    raw: dict                  # Linear prefix -> the stored tensors of its layout


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def scheme_of(directory) -> Scheme:
    """The layout and grid a checkpoint directory's config files describe."""
    d = Path(directory)
    qc = None
    if (d / "config.json").is_file():
        qc = _load_json(d / "config.json").get("quantization_config")
    for name in ("quantize_config.json", "quant_config.json"):
        if qc is None and (d / name).is_file():
            qc = _load_json(d / name)
            qc.setdefault("quant_method", "gptq" if name == "quantize_config.json" else "awq")
    if not isinstance(qc, dict):
        raise ValueError(f"{d}: no quantization config (config.json's quantization_config, quantize_config.json "
                         "or quant_config.json)")
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in layouts.GPTQ_FORMATS:
            raise ValueError(f"{d}: GPTQ checkpoint_format {fmt!r} is not one of {layouts.GPTQ_FORMATS}")
        return Scheme("gptq", int(qc["bits"]), int(qc["group_size"]), bool(qc.get("sym", True)),
                      bool(qc.get("desc_act", False)), fmt, qc)
    if method == "awq":
        if str(qc.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"{d}: only AWQ's GEMM layout is read, got version {qc.get('version')!r}")
        return Scheme("awq", int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size"))),
                      False, False, config=qc)
    if method == "compressed-tensors":
        if qc.get("format") != "pack-quantized":
            raise ValueError(f"{d}: only compressed-tensors' pack-quantized format is read, got {qc.get('format')!r}")
        groups = list(qc.get("config_groups", {}).values())
        if len(groups) != 1 or "weights" not in groups[0]:
            raise ValueError(f"{d}: expected one config_groups entry with weights, got {len(groups)}")
        w = groups[0]["weights"]
        if w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
            raise ValueError(f"{d}: pack-quantized int weights per group or channel expected, got {w}")
        gs = int(w["group_size"]) if w["strategy"] == "group" else -1
        return Scheme("compressed-tensors", int(w["num_bits"]), gs, bool(w.get("symmetric", True)),
                      bool(w.get("actorder")), config=qc)
    raise ValueError(f"{d}: quant_method {method!r} is not one of gptq, awq, compressed-tensors")


def _files(path) -> tuple[Path, list[Path]]:
    p = Path(path)
    if p.is_file():
        return p.parent, [p]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{p}: no .safetensors files")
    return p, files


def read(path) -> Checkpoint:
    """Every tensor of a checkpoint; its quantized Linears as ``QuantizedTensor`` s."""
    directory, files = _files(path)
    scheme = scheme_of(directory)
    tensors = {}
    for f in files:
        t, _ = safetensors.read(f)
        tensors.update(t)
    fields = _FIELDS[scheme.layout]
    prefixes = sorted(n[: -len(_KEY[scheme.layout]) - 1] for n in tensors if n.endswith("." + _KEY[scheme.layout]))
    quantized, raw = {}, {}
    for prefix in prefixes:
        parts = {f: tensors.pop(f"{prefix}.{f}") for f in fields if f"{prefix}.{f}" in tensors}
        raw[prefix] = parts
        try:
            quantized[prefix] = from_layout(parts, scheme)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{directory}: layer {prefix!r}: {e}") from None
    return Checkpoint(scheme, quantized, tensors, raw)


def from_layout(parts: dict, scheme: Scheme) -> QuantizedTensor:
    """One Linear's stored tensors as a ``QuantizedTensor``."""
    if scheme.layout == "gptq":
        return layouts.from_gptq(parts, scheme.bits, sym=scheme.sym, checkpoint_format=scheme.checkpoint_format)
    if scheme.layout == "awq":
        return layouts.from_awq(parts, scheme.group_size)
    return layouts.from_compressed(parts, scheme.bits, sym=scheme.sym)


def to_layout(qt: QuantizedTensor, layout: str, checkpoint_format: str = "gptq") -> dict:
    if layout == "gptq":
        return layouts.to_gptq(qt, checkpoint_format)
    if layout == "awq":
        return layouts.to_awq(qt)
    if layout == "compressed-tensors":
        return layouts.to_compressed(qt)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def config_for(layout: str, qt: QuantizedTensor, checkpoint_format: str = "gptq") -> dict:
    """The quantization config of a checkpoint whose Linears are all like ``qt``."""
    m = qt.meta
    bits, sym = m["bits"], m["sym"]
    gs = qt.shape[1] if m.get("granularity") == "channel" else m["group_size"]
    act = qt.kind == "gptq"
    if layout == "gptq":
        return dict(quant_method="gptq", bits=bits, group_size=-1 if m.get("granularity") == "channel" else gs,
                    desc_act=act, sym=sym, checkpoint_format=checkpoint_format)
    if layout == "awq":
        return dict(quant_method="awq", bits=bits, group_size=gs, zero_point=True, version="gemm")
    weights = dict(num_bits=bits, type="int", symmetric=sym,
                   strategy="channel" if m.get("granularity") == "channel" else "group",
                   group_size=None if m.get("granularity") == "channel" else gs, actorder="group" if act else None)
    return dict(quant_method="compressed-tensors", format="pack-quantized",
                config_groups={"group_0": dict(targets=["Linear"], weights=weights)}, ignore=["lm_head"])


def write(directory, quantized: dict, tensors: dict | None = None, *, layout: str,
          checkpoint_format: str = "gptq", config: dict | None = None) -> Path:
    """Write ``model.safetensors`` and the layout's config (``config.json``'s
    ``quantization_config``, merged into ``config`` if given; GPTQ also ``quantize_config.json``)."""
    if not quantized:
        raise ValueError("no quantized layers to write")
    d = Path(directory)
    out = dict(tensors or {})
    for prefix, qt in quantized.items():
        for k, v in to_layout(qt, layout, checkpoint_format).items():
            out[f"{prefix}.{k}"] = v
    qc = config_for(layout, next(iter(quantized.values())), checkpoint_format)
    safetensors.write(d / "model.safetensors", out, {"format": "pt"})
    cfg = dict(config or {})
    cfg["quantization_config"] = qc
    _write_json(d / "config.json", cfg)
    if layout == "gptq":
        _write_json(d / "quantize_config.json", qc)
    return d


def _write_json(path: Path, obj) -> None:
    with atomic_open(path, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")


def stored_bits_per_weight(parts: dict, shape) -> float:
    """Bits of everything a layer stores (codes, zeros, scales, g_idx) per weight."""
    return 8 * sum(np.asarray(v).nbytes for v in parts.values()) / (shape[0] * shape[1])
