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

from refquant._atomic import atomic_directory, atomic_open
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


def read_json(path: Path):
    """A JSON file's value, or one ``ValueError`` naming the file (unreadable, not UTF-8, not
    JSON, numbers of 4,300+ digits, nesting past Python's recursion limit)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:   # (JSONDecodeError, 4300+ digits are ValueErrors)
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a readable JSON file (nested too deeply)") from None


_MISSING = object()
_BITS = (2, 4, 8)   # the int32-packed layouts' code widths (layouts.INT32_BITS)


def _get(qc: dict, d, keys, kind, default=_MISSING):
    """``qc``'s value for the first of ``keys`` present, which must be a ``kind`` (int: not a
    bool, a float or a string; bool: true or false, not "false"), else ``ValueError`` naming
    the directory and the field: a config field is read as written or refused, never coerced."""
    for k in keys:
        if k in qc:
            v = qc[k]
            ok = isinstance(v, bool) if kind is bool else isinstance(v, kind) and not isinstance(v, bool)
            if not ok:
                raise ValueError(f"{d}: quantization config field {k!r} must be {kind.__name__}, got {v!r}")
            return v
    if default is _MISSING:
        raise ValueError(f"{d}: quantization config field {keys[0]!r} is missing")
    return default


def _bits(v: int, d, field: str, allowed=_BITS) -> int:
    if v not in allowed:
        raise ValueError(f"{d}: {field} {v} is not one of the widths this layout holds {allowed}")
    return v


def _group_size(v: int, d, field: str, *, channel_ok: bool = True) -> int:
    if not (v >= 1 or (channel_ok and v == -1)):
        raise ValueError(f"{d}: {field} {v} must be a positive group size" + (" or -1 (per channel)" if channel_ok else ""))
    return v


def scheme_of(directory) -> Scheme:
    """The layout and grid a checkpoint directory's config files describe. Every field read
    is checked for its type and range (``_get``); ``read`` checks the group size against the
    tensors."""
    d = Path(directory)
    qc = None
    if (d / "config.json").is_file():
        cfg = read_json(d / "config.json")
        if not isinstance(cfg, dict):
            raise ValueError(f"{d / 'config.json'}: not a JSON object")
        qc = cfg.get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            raise ValueError(f"{d / 'config.json'}: quantization_config is not an object ({type(qc).__name__})")
    for name in ("quantize_config.json", "quant_config.json"):
        if qc is None and (d / name).is_file():
            qc = read_json(d / name)
            if not isinstance(qc, dict):
                raise ValueError(f"{d / name}: not a JSON object")
            qc.setdefault("quant_method", "gptq" if name == "quantize_config.json" else "awq")
    if not isinstance(qc, dict):
        raise ValueError(f"{d}: no quantization config (config.json's quantization_config, quantize_config.json "
                         "or quant_config.json)")
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in layouts.GPTQ_FORMATS:
            raise ValueError(f"{d}: GPTQ checkpoint_format {fmt!r} is not one of {layouts.GPTQ_FORMATS}")
        return Scheme("gptq", _bits(_get(qc, d, ("bits",), int), d, "bits"),
                      _group_size(_get(qc, d, ("group_size",), int), d, "group_size"),
                      _get(qc, d, ("sym",), bool, True), _get(qc, d, ("desc_act",), bool, False), fmt, qc)
    if method == "awq":
        if str(qc.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"{d}: only AWQ's GEMM layout is read, got version {qc.get('version')!r}")
        bits = _bits(_get(qc, d, ("bits", "w_bit"), int, 4), d, "bits", allowed=(4,))   # GEMM packs nibbles
        gs = _group_size(_get(qc, d, ("group_size", "q_group_size"), int), d, "group_size", channel_ok=False)
        return Scheme("awq", bits, gs, False, False, config=qc)
    if method == "compressed-tensors":
        if qc.get("format") != "pack-quantized":
            raise ValueError(f"{d}: only compressed-tensors' pack-quantized format is read, got {qc.get('format')!r}")
        groups = qc.get("config_groups", {})
        if not isinstance(groups, dict) or len(groups) != 1:
            raise ValueError(f"{d}: expected config_groups to be an object with one entry, got {groups!r:.80}")
        w = next(iter(groups.values()))
        w = w.get("weights") if isinstance(w, dict) else None
        if not isinstance(w, dict):
            raise ValueError(f"{d}: the config_groups entry has no weights object")
        if w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
            raise ValueError(f"{d}: pack-quantized int weights per group or channel expected, got {w}")
        gs = (_group_size(_get(w, d, ("group_size",), int), d, "group_size", channel_ok=False)
              if w["strategy"] == "group" else -1)
        return Scheme("compressed-tensors", _bits(_get(w, d, ("num_bits",), int), d, "num_bits"), gs,
                      _get(w, d, ("symmetric",), bool, True), bool(w.get("actorder")), config=qc)
    raise ValueError(f"{d}: quant_method {method!r} is not one of gptq, awq, compressed-tensors")


def _check_group_size(qt: QuantizedTensor, scheme: Scheme) -> None:
    """The config's group size agrees with the tensors: -1 (per channel) is one scale per row,
    ``g`` is ``ceil(in / g)`` scales per row (AutoGPTQ's last group of a row may be short)."""
    n, groups, want = qt.shape[1], np.asarray(qt.scales).shape[-1], scheme.group_size
    expected = 1 if want == -1 else -(-n // want)
    if groups != expected:
        raise ValueError(f"the config's group_size {want} gives {expected} group(s) per row of {n} inputs; "
                         f"the tensors hold {groups}")


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
            _check_group_size(quantized[prefix], scheme)
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


def per_row(qt: QuantizedTensor) -> int:
    """The group size a config states for ``qt``: -1 for one scale per row (per channel, or
    GPTQ's group_size -1, which records the row's width), else the group size."""
    m = qt.meta
    return -1 if m.get("granularity") == "channel" or m.get("group_size") == qt.shape[1] else m["group_size"]


def act_order(qt: QuantizedTensor) -> bool:
    """Whether ``qt``'s groups are permuted (GPTQ's act-order: ``g_idx`` not ascending)."""
    return qt.kind == "gptq" and bool(np.any(np.diff(np.asarray(qt.meta["g_idx"])) < 0))


def config_for(layout: str, qt: QuantizedTensor, checkpoint_format: str = "gptq") -> dict:
    """The quantization config of a checkpoint whose Linears are all like ``qt``."""
    m = qt.meta
    bits, sym, width = m["bits"], m["sym"], per_row(qt)
    gs = qt.shape[1] if width == -1 else width
    act = act_order(qt)
    if layout == "gptq":
        return dict(quant_method="gptq", bits=bits, group_size=width, desc_act=act, sym=sym,
                    checkpoint_format=checkpoint_format)
    if layout == "awq":
        return dict(quant_method="awq", bits=bits, group_size=gs, zero_point=True, version="gemm")
    weights = dict(num_bits=bits, type="int", symmetric=sym, strategy="channel" if width == -1 else "group",
                   group_size=None if width == -1 else gs, actorder="group" if act else None)
    return dict(quant_method="compressed-tensors", format="pack-quantized",
                config_groups={"group_0": dict(targets=["Linear"], weights=weights)}, ignore=["lm_head"])


def write(directory, quantized: dict, tensors: dict | None = None, *, layout: str,
          checkpoint_format: str = "gptq", config: dict | None = None, force: bool = False,
          files: dict | None = None) -> Path:
    """Write ``model.safetensors`` and the layout's config (``config.json``'s
    ``quantization_config``, merged into ``config`` if given; GPTQ also ``quantize_config.json``),
    and ``files`` (file name -> JSON object, e.g. the tokenizer's) beside them.

    The directory appears whole or not at all (``_atomic.atomic_directory``): built beside
    ``directory`` and renamed in, so a failure or a kill never leaves one file of the new
    checkpoint beside another of the old. An existing non-empty ``directory`` needs ``force``."""
    if not quantized:
        raise ValueError("no quantized layers to write")
    d = Path(directory)
    out = dict(tensors or {})
    for prefix, qt in quantized.items():
        for k, v in to_layout(qt, layout, checkpoint_format).items():
            out[f"{prefix}.{k}"] = v
    # the config states one group size: a layer's, unless every layer has one group per row
    grouped = [qt for qt in quantized.values() if per_row(qt) != -1]
    qc = config_for(layout, (grouped or list(quantized.values()))[0], checkpoint_format)
    cfg = dict(config or {})
    cfg["quantization_config"] = qc
    with atomic_directory(d, force=force) as new:
        safetensors.write(new / "model.safetensors", out, {"format": "pt"})
        _write_json(new / "config.json", cfg)
        if layout == "gptq":
            _write_json(new / "quantize_config.json", qc)
        for name, obj in (files or {}).items():
            _write_json(new / name, obj)
    return d


def _write_json(path: Path, obj) -> None:
    with atomic_open(path, "w") as f:
        f.write(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def stored_bits_per_weight(parts: dict, shape) -> float:
    """Bits of everything a layer stores (codes, zeros, scales, g_idx) per weight."""
    return 8 * sum(np.asarray(v).nbytes for v in parts.values()) / (shape[0] * shape[1])
