"""``python -m refquant``: inspect, requantize, dequantize, compare and export GGUF files.

    python -m refquant inspect FILE            (a .gguf, or a GPTQ/AWQ/compressed-tensors checkpoint)
    python -m refquant export IN.gguf DIR --format gptq|awq|compressed-tensors [--bits 4 --group-size 128]
    python -m refquant convert DIR OUT.gguf [--metadata-from IN.gguf] [--fallback Q8_0]
    python -m refquant quantize IN OUT --type Q4_K [--keep PATTERN ...] [--impl auto|numpy|numba]
    python -m refquant dequantize IN OUT [--type F32|F16]
    python -m refquant compare A B

Exit codes: 0 success, 1 ``compare`` found tensors present in only one file, 2 bad
arguments or a malformed / unreadable file (the message says what and where).
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys

import numpy as np

from refquant import gguf
from refquant.gguf import quants
from refquant.gguf.file import shorten
from refquant._checks import cli_int

# llama.cpp's llama_ftype for a file whose weights are all one type (general.file_type)
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
              "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32}


def _short(v) -> str:
    if isinstance(v, np.ndarray):
        return f"[{v.size} x {v.dtype}]"
    if isinstance(v, list):
        kind = type(v[0]).__name__ if v else "?"
        return f"[{len(v)} x {kind}]"
    s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= 70 else s[:67] + "..."


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def cmd_inspect(args) -> int:
    from pathlib import Path

    if Path(args.file).is_dir() or str(args.file).endswith(".safetensors"):
        return _inspect_checkpoint(args.file)
    with gguf.read(args.file) as f:
        print(f"{f.path}: GGUF v{f.version}, alignment {f.alignment}, {len(f.metadata)} metadata keys, "
              f"{len(f.tensors)} tensors, data at byte {f.data_offset}")
        print("\nmetadata:")
        width = max((len(k) for k in f.metadata), default=0)
        for k, v in f.metadata.items():
            print(f"  {k:<{width}}  {_short(v)}")
        print(f"\n{'tensor':<40} {'shape':>18} {'type':>7} {'bytes':>12} {'bpw':>7}")
        total = weights = 0
        for info in f.tensors.values():
            print(f"{info.name:<40} {'x'.join(map(str, info.shape)):>18} {info.type.name:>7} "
                  f"{info.nbytes:>12} {info.bits_per_weight:>7.3f}")
            total += info.nbytes
            weights += info.n_elements
        bpw = 8 * total / weights if weights else 0.0
        print(f"\ntotal: {weights} weights in {total} bytes ({_human(total)}), {bpw:.3f} bits per weight")
    return 0


def _inspect_checkpoint(path) -> int:
    """A GPTQ / AWQ / compressed-tensors checkpoint as its tensors hold it: every quantized
    Linear (shape, bits, group size, act-order, stored bits per weight), the other tensors,
    and a summary of the layers (not the config's claims; a claim the tensors do not bear
    out, such as ``desc_act`` with no permuted ``g_idx``, is said)."""
    from refquant.hf import checkpoint

    ck = checkpoint.read(path)
    s, layers = ck.scheme, list(ck.quantized.values())
    bits = sorted({qt.meta["bits"] for qt in layers})
    groups = sorted({checkpoint.per_row(qt) for qt in layers})
    groups = ["per row" if g == -1 else str(g) for g in groups]
    act = sum(checkpoint.act_order(qt) for qt in layers)
    sym = all(qt.meta["sym"] for qt in layers)
    extra = f", checkpoint_format {s.checkpoint_format}" if s.layout == "gptq" else ""
    print(f"{path}: {s.layout} checkpoint{extra}, {len(layers)} quantized layers: "
          f"{'/'.join(map(str, bits))}-bit, group size{'s' if len(groups) > 1 else ''} "
          f"{', '.join(groups)}, {'symmetric' if sym else 'asymmetric'}"
          + (f", act-order in {act}" if act else ""))
    if s.act_order and not act:
        print(f"note: the config says act-order ({'desc_act' if s.layout == 'gptq' else 'actorder'}), "
              "but no layer's g_idx is permuted")
    print(f"tokenizer: {_tokenizer_summary(path)}")
    print(f"\n{'quantized layer':<44} {'shape':>11} {'bits':>4} {'group':>6} {'act':>4} {'bpw':>7}")
    stored = weights = 0
    for prefix, qt in ck.quantized.items():
        m = qt.meta
        gs = m.get("group_size") or qt.shape[1]
        bpw = checkpoint.stored_bits_per_weight(ck.raw[prefix], qt.shape)
        print(f"{prefix:<44} {'x'.join(map(str, qt.shape)):>11} {m['bits']:>4} {gs:>6} "
              f"{'yes' if checkpoint.act_order(qt) else 'no':>4} {bpw:>7.3f}")
        stored += bpw * qt.shape[0] * qt.shape[1] / 8
        weights += qt.shape[0] * qt.shape[1]
    print(f"\n{'other tensor':<44} {'shape':>11} {'dtype':>8}")
    for name, a in ck.tensors.items():
        print(f"{name:<44} {'x'.join(map(str, a.shape)):>11} {str(a.dtype):>8}")
    if weights:
        print(f"\nquantized: {weights} weights in {stored:.0f} bytes, {8 * stored / weights:.3f} bits per weight")
    return 0


def _tokenizer_summary(path) -> str:
    """What ``convert`` would make of a checkpoint's tokenizer files, in a few words."""
    import json
    from pathlib import Path

    from refquant.hf import tokenizer as hf_tokenizer

    d = Path(path) if Path(path).is_dir() else Path(path).parent
    if not (d / "tokenizer.json").is_file():
        return "none (no tokenizer.json)"
    try:
        cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
        m = hf_tokenizer.gguf_metadata(d, cfg if isinstance(cfg, dict) else {})
    except (ValueError, OSError) as e:
        return f"unreadable ({e})"
    special = int((m["tokenizer.ggml.token_type"] == hf_tokenizer.CONTROL).sum())
    return (f"byte-level BPE, {len(m['tokenizer.ggml.tokens'])} tokens ({special} control), "
            f"{len(m['tokenizer.ggml.merges'])} merges, pre-tokenizer {m['tokenizer.ggml.pre']}"
            + (", chat template" if "tokenizer.chat_template" in m else ""))


def cmd_export(args) -> int:
    """A llama GGUF's Linear weights, round-to-nearest, as a GPTQ / AWQ / compressed-tensors checkpoint."""
    from refquant import affine
    from refquant.hf import llama

    sym = not args.asym
    tokenizer = not args.no_tokenizer
    with gguf.read(args.input) as f:
        meta = dict(f.metadata)
        if meta.get("general.architecture") != "llama":
            raise ValueError(f"{args.input}: export reads llama-architecture files, got "
                             f"{meta.get('general.architecture')!r}")
        if tokenizer and "tokenizer.ggml.tokens" in meta:
            try:   # before the weights: a tokenizer that cannot be written fails fast
                tokenizer = llama.tokenizer_files(meta)
            except ValueError as e:
                raise ValueError(f"{args.input}: {e}; --no-tokenizer writes the checkpoint without one") from None
            if tokenizer["lost"]:
                _note(f"export: the Hugging Face tokenizer files have no place for {', '.join(tokenizer['lost'])}")
        linears = {n for n, info in f.tensors.items()
                   if n.startswith("blk.") and n.split(".")[-2] in llama.LINEARS and len(info.shape) == 2}
        widths = sorted({f.tensors[n].shape[1] for n in linears})
        fits = [g for g in (256, 128, 64, 32, 16) if all(n % g == 0 for n in widths)]
        if args.group_size == -1 and args.format == "awq":
            raise ValueError("--group-size -1 (one group per row) has no AWQ form: AWQ's config states one group "
                             "width for every Linear; choose --group-size " + (f"{fits[0]}" if fits else "dividing "
                                                                                 "every Linear's input width"))
        if args.group_size != -1 and any(n % args.group_size for n in widths):
            raise ValueError(f"{args.input}: --group-size {args.group_size} does not divide every Linear's "
                             f"input width ({', '.join(map(str, widths))}); choose --group-size "
                             + (f"{fits[0]}" if fits else "dividing them") + " or -1 (one group per row)")
        quantized, others = {}, {}
        for name, info in _progress_items(f.tensors.items(), "export"):
            w = f.tensor(name).dequantize()
            if name in linears:
                # row-wise groups: quantizing in GGUF row order, then reordering, is exact
                grid = (dict(granularity="channel", axis=0) if args.group_size == -1
                        else dict(granularity="group", group_size=args.group_size))
                quantized[name] = affine.quantize(w, args.bits, sym=sym, scale_dtype=np.float16, **grid)
            else:
                others[name] = w
    _, with_tokenizer = llama.write_checkpoint(args.output, quantized, others, meta, layout=args.format,
                                               checkpoint_format=args.checkpoint_format, force=args.force,
                                               tokenizer=tokenizer)
    grid = "per row" if args.group_size == -1 else f"g{args.group_size}"
    print(f"wrote {args.output}: {len(quantized)} Linears as {args.format} int{args.bits} {grid} "
          f"({'symmetric' if sym else 'asymmetric'}), {len(others)} other tensors, "
          + ("the tokenizer" if with_tokenizer else "no tokenizer"))
    return 0


def cmd_convert(args) -> int:
    """A GPTQ / AWQ / compressed-tensors checkpoint of a Llama model as a GGUF file: 4-bit
    groups of a multiple of 32 become Q4_0 (symmetric, bit for bit) or Q4_1 (asymmetric, m
    rounded to fp16, reported); any other grid is dequantized and requantized to
    ``--fallback`` (said per tensor)."""
    import json
    from pathlib import Path

    from refquant.gguf.tensors import as_ggml
    from refquant.hf import checkpoint, llama
    from refquant.hf import tokenizer as hf_tokenizer

    ck = checkpoint.read(args.input)
    d = Path(args.input)
    d = d if d.is_dir() else d.parent
    cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architectures"), list) \
            or "LlamaForCausalLM" not in cfg["architectures"]:
        raise ValueError(f"{args.input}: convert reads LlamaForCausalLM checkpoints, config.json says "
                         f"{cfg.get('architectures') if isinstance(cfg, dict) else cfg!r}")
    meta = llama.metadata(cfg, d / "config.json")
    if args.metadata_from:   # the tokenizer and any other keys, from a GGUF of the same model
        with gguf.read(args.metadata_from) as f:
            meta = {**{k: v for k, v in f.metadata.items() if k != "general.file_type"}, **meta}
    elif args.no_tokenizer:
        pass
    elif (d / "tokenizer.json").is_file():
        meta.update(hf_tokenizer.gguf_metadata(d, cfg, pre=args.pre))
    else:
        raise ValueError(f"{args.input}: no tokenizer.json: pass --metadata-from GGUF (a GGUF of the same model) "
                         "or --no-tokenizer for a weights-only file")
    # what llama.cpp and minigpt_np's engines would refuse, refused before anything is converted
    llama.validate({**{llama.gguf_name(p + ".weight"): qt for p, qt in ck.quantized.items()},
                    **{llama.gguf_name(n): a for n, a in ck.tensors.items()}},
                   llama.config_from_metadata(meta, args.input), args.input)
    out, exact, requant, worst_m = {}, 0, [], 0.0
    for prefix, qt in ck.quantized.items():
        name = llama.gguf_name(prefix + ".weight")
        scales = np.asarray(qt.scales, np.float32)
        if not args.allow_nonfinite and not np.isfinite(scales).all():
            raise ValueError(f"{args.input}: layer {prefix!r} has {int((~np.isfinite(scales)).sum())} non-finite "
                             "scale(s) (NaN or Inf); --allow-nonfinite converts it anyway")
        perm = llama.rotary_perm(name, qt.shape[0], cfg)
        if perm is not None:   # to llama.cpp's rotary row order
            qt = llama.permute_rows(qt, perm)
        try:
            raw, t, m_err = as_ggml(qt)
            exact += 1
            worst_m = max(worst_m, m_err)
        except ValueError as e:
            t = quants.ggml_type(args.fallback).name
            raw = quants.quantize(qt.dequantize(), t)
            requant.append(name)
            _note(f"{name}: {e}; requantized to {t}")
        out[name] = gguf.GGUFTensor(t, qt.shape, raw)
    for hf, a in ck.tensors.items():
        name = llama.gguf_name(hf)
        a = np.asarray(a, np.float32)
        perm = llama.rotary_perm(name, a.shape[0], cfg) if a.ndim == 2 else None
        if perm is not None:
            a = a[perm]
        out[name] = a if a.ndim == 1 else gguf.GGUFTensor("F16", a.shape, a.astype("<f2").reshape(-1).view(np.uint8))
    gguf.write(args.output, meta, out)
    source = (f"the tokenizer of {args.metadata_from}" if args.metadata_from else
              f"the tokenizer of tokenizer.json ({meta['tokenizer.ggml.pre']})" if "tokenizer.ggml.tokens" in meta
              else "no tokenizer")
    print(f"wrote {args.output}: {exact} Linears exactly as Q4_0/Q4_1 (largest fp16 rounding of m: {worst_m:.3g}), "
          f"{len(requant)} requantized to {args.fallback}, {len(ck.tensors)} other tensors, {source}")
    return 0


def _progress_items(items, desc):
    from tqdm import tqdm

    items = list(items)
    return tqdm(items, desc=desc, unit="tensor", disable=None)


def _progress(items, desc):
    """A progress bar over ``gguf.write``'s ``(name, tensor, nbytes)`` items that counts the
    bytes written (MB/s), advancing when each tensor is done."""
    from tqdm import tqdm

    with tqdm(total=sum(n for _, _, n in items), desc=desc, unit="B", unit_scale=True, disable=None) as bar:
        for item in items:
            yield item
            bar.update(item[2])


def _problem(path, name: str, values: np.ndarray) -> str | None:
    """A note on tensor ``name`` of ``path`` when it is empty or holds non-finite values, else None."""
    if values.size == 0:
        return f"{path}: tensor {name!r} is empty"
    bad = ~np.isfinite(values)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        return f"{path}: tensor {name!r} has {int(bad.sum())} non-finite values, the first at index {first}"
    return None


def _note(msg: str) -> None:
    """One readable line on stderr, however long the names in it (``gguf.file.shorten``)."""
    print(shorten(msg), file=sys.stderr)


def cmd_quantize(args) -> int:
    target = quants.ggml_type(args.type)
    if not target.can_quantize:
        raise SystemExit(f"error: refquant cannot quantize to {target.name}; choose one of {', '.join(quants.quantizable())}")
    refused = 0
    with gguf.read(args.input) as f:
        out, kept, fell_back = {}, [], []
        for name, info in f.tensors.items():
            src = f.tensor(name)
            t = target
            if info.shape[-1] % t.block_size and t.name in quants.FALLBACK:
                t = quants.ggml_type(quants.FALLBACK[t.name])
                fell_back.append(name)
            keep = (len(info.shape) != 2 or any(fnmatch.fnmatchcase(name, p) for p in args.keep)
                    or info.shape[-1] % t.block_size or not info.type.can_dequantize)
            if not keep:   # empty and non-finite tensors: say so and copy them as they are
                problem = _problem(args.input, name, src.dequantize())
                if problem and (info.n_elements == 0 or not args.allow_nonfinite):
                    keep = True
                    refused += info.n_elements > 0
                    _note(problem + ("; kept as it was" if info.n_elements == 0 else
                                     "; kept as it was (--allow-nonfinite quantizes it anyway)"))
            if keep:
                out[name] = src
                kept.append(name)
                if fell_back and fell_back[-1] == name:
                    fell_back.pop()
            else:  # quantized only when the writer reaches it: one tensor in memory at a time
                out[name] = gguf.GGUFTensor(t, info.shape, lambda s=src, t=t, n=name: _quantize(
                    s, t, n, args.input, args.allow_nonfinite, args.impl))
        meta = dict(f.metadata)
        if "general.file_type" in meta and target.name in _FILE_TYPE:
            meta["general.file_type"] = np.uint32(_FILE_TYPE[target.name])
        gguf.write(args.output, meta, out, progress=lambda it: _progress(it, f"quantize {target.name}"))
    n_target = len(out) - len(kept) - len(fell_back)
    fb = f", {len(fell_back)} -> {quants.FALLBACK[target.name]} (rows not a multiple of {target.block_size})" if fell_back else ""
    print(f"wrote {args.output}: {n_target} tensors -> {target.name}{fb}, {len(kept)} kept as they were"
          + (f" ({refused} refused: non-finite values)" if refused else ""))
    return 1 if refused else 0


def _quantize(src, t, name: str, path, allow_nonfinite: bool = False, impl: str = "auto") -> np.ndarray:
    try:
        return quants.quantize(src.dequantize(), t, allow_nonfinite=allow_nonfinite, impl=impl)
    except ValueError as e:
        raise ValueError(f"tensor {name!r} of {path}: {e}") from None


def cmd_dequantize(args) -> int:
    dtype = {"F32": np.float32, "F16": np.float16}[args.type.upper()]
    noted = []

    def decode(src, name):   # when the writer reaches the tensor: decoded once, checked, written as it is
        values = src.dequantize()
        problem = _problem(args.input, name, values) if values.size else None
        if problem:   # NaN stays NaN, but is said
            _note(problem + "; written as it is")
            noted.append(name)
        return values.astype(dtype).reshape(-1).view(np.uint8)

    with gguf.read(args.input) as f:
        out = {}
        for name, info in f.tensors.items():
            src = f.tensor(name)
            if info.type.name in ("F32", "F16", "BF16") or info.type.can_dequantize:
                out[name] = gguf.GGUFTensor(args.type.upper(), info.shape, lambda s=src, n=name: decode(s, n))
            else:
                out[name] = src
        meta = dict(f.metadata)
        if "general.file_type" in meta:
            meta["general.file_type"] = np.uint32(_FILE_TYPE[args.type.upper()])
        gguf.write(args.output, meta, out, progress=lambda it: _progress(it, f"dequantize {args.type.upper()}"))
    print(f"wrote {args.output}" + (f" ({len(noted)} tensors hold non-finite values)" if noted else ""))
    return 1 if noted else 0


def cmd_compare(args) -> int:
    from refquant import metrics

    with gguf.read(args.a) as a, gguf.read(args.b) as b:
        common = [n for n in a.tensors if n in b.tensors]
        only = sorted(set(a.tensors) ^ set(b.tensors))
        print(f"{'tensor':<40} {'A type':>7} {'B type':>7} {'max |A-B|':>12} {'SQNR dB':>9}")
        problems = 0
        for name in common:
            ta, tb = a.tensor(name), b.tensor(name)
            if ta.shape != tb.shape:
                print(f"{name:<40} shapes differ: {ta.shape} vs {tb.shape}")
                continue
            if not (ta.type.can_dequantize and tb.type.can_dequantize):
                same = np.array_equal(ta.raw, tb.raw) and ta.type == tb.type
                print(f"{name:<40} {ta.type.name:>7} {tb.type.name:>7} {'identical' if same else 'differ':>22}")
                continue
            x, y = ta.dequantize(), tb.dequantize()
            if x.size == 0:
                print(f"{name:<40} {ta.type.name:>7} {tb.type.name:>7} {'empty':>22}")
                continue
            bad = {side: int((~np.isfinite(v)).sum()) for side, v in (("A", x), ("B", y))}
            if any(bad.values()):   # report it and go on with the other tensors
                where = ", ".join(f"{k} ({args.a if k == 'A' else args.b}) has {n} non-finite values"
                                  for k, n in bad.items() if n)
                print(f"{name:<40} {ta.type.name:>7} {tb.type.name:>7}   not compared: {where}")
                problems += 1
                continue
            err = metrics.max_abs_error(x, y)
            sqnr = metrics.sqnr_db(x, y) if np.any(x) else float("nan")
            print(f"{name:<40} {ta.type.name:>7} {tb.type.name:>7} {err:>12.4g} {sqnr:>9.2f}")
        for name in only:
            print(f"{name:<40} only in {'A' if name in a.tensors else 'B'}")
    return 1 if only or problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m refquant", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("inspect", help="metadata summary and tensor table (GGUF), or layers and scheme "
                                      "(GPTQ / AWQ / compressed-tensors checkpoint directory or .safetensors)")
    s.add_argument("file")
    s = sub.add_parser("quantize", help="requantize every 2-D weight tensor")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--type", required=True, help=f"ggml type: {', '.join(quants.quantizable())}")
    s.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                   help="glob of tensor names to copy unchanged (repeatable), e.g. 'token_embd.*'")
    s.add_argument("--allow-nonfinite", action="store_true",
                   help="quantize tensors holding NaN/Inf too (default: copy them unchanged and exit 1)")
    s.add_argument("--impl", default="auto", choices=quants.IMPLS,
                   help="quantizer: the compiled kernels over every core (numba), the NumPy reference "
                        "(numpy), or numba where it applies (auto, the default); the bytes are the same")
    s = sub.add_parser("export", help="a llama GGUF as a GPTQ / AWQ / compressed-tensors checkpoint "
                                     "(round-to-nearest; Hugging Face names and rotary row order)")
    s.add_argument("input")
    s.add_argument("output", help="directory: model.safetensors, config.json (+ quantize_config.json)")
    s.add_argument("--format", required=True, choices=["gptq", "awq", "compressed-tensors"])
    s.add_argument("--bits", type=cli_int(2, 8), default=4)
    s.add_argument("--group-size", type=cli_int(1, 1 << 20, also=(-1,)), default=128,
                   help="weights per scale (-1: one per output channel)")
    s.add_argument("--asym", action="store_true", help="zero points (AWQ stores every grid with them)")
    s.add_argument("--force", action="store_true", help="replace OUTPUT if it exists and is not empty")
    s.add_argument("--checkpoint-format", default="gptq", choices=["gptq", "gptq_v2"],
                   help="GPTQ only: v1 stores zero points minus one (the original AutoGPTQ files)")
    s.add_argument("--no-tokenizer", action="store_true",
                   help="write no tokenizer.json / tokenizer_config.json / generation_config.json")
    s = sub.add_parser("convert", help="a GPTQ / AWQ / compressed-tensors Llama checkpoint as GGUF (4-bit groups "
                                      "exactly as Q4_0 / Q4_1, other grids requantized)")
    s.add_argument("input", help="checkpoint directory (or its .safetensors file)")
    s.add_argument("output")
    s.add_argument("--fallback", default="Q8_0", help="ggml type for grids that have no exact GGUF form")
    s.add_argument("--metadata-from", metavar="GGUF",
                   help="copy the tokenizer and other metadata from this file (wins over tokenizer.json)")
    s.add_argument("--pre", metavar="NAME", help="llama.cpp's name of tokenizer.json's pre-tokenizer "
                                                 "(tokenizer.ggml.pre), e.g. starcoder; default: the family's")
    s.add_argument("--no-tokenizer", action="store_true",
                   help="write a weights-only GGUF (tokenizer.json, if any, is not read)")
    s.add_argument("--allow-nonfinite", action="store_true", help="convert layers with NaN or Inf scales anyway")
    s = sub.add_parser("dequantize", help="write every tensor as F32 or F16")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--type", default="F32", choices=["F32", "F16", "f32", "f16"])
    s = sub.add_parser("compare", help="per-tensor max-abs error and SQNR of B against A (exit 1 when "
                                      "tensors are missing on one side or hold non-finite values)")
    s.add_argument("a")
    s.add_argument("b")
    args = p.parse_args(argv)
    try:
        return {"inspect": cmd_inspect, "quantize": cmd_quantize, "dequantize": cmd_dequantize,
                "compare": cmd_compare, "export": cmd_export, "convert": cmd_convert}[args.cmd](args)
    except BrokenPipeError:   # the reader went away (``inspect ... | head``): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (gguf.GGUFError, ValueError, OSError) as e:
        _note(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
