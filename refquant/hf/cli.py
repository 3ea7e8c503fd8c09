"""``python -m refquant export`` / ``convert`` and ``inspect`` of a checkpoint: llama GGUF files
to and from GPTQ / AWQ / compressed-tensors checkpoints (``refquant.hf``)."""
from __future__ import annotations

import numpy as np

from refquant import gguf
from refquant._checks import cli_int
from refquant._cli import note, progress_items
from refquant.gguf import quants


def add_parsers(sub) -> None:
    """The ``export`` and ``convert`` subcommands' arguments."""
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


def inspect_checkpoint(path) -> int:
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
                note(f"export: the Hugging Face tokenizer files have no place for {', '.join(tokenizer['lost'])}")
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
        for name, info in progress_items(f.tensors.items(), "export"):
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
            note(f"{name}: {e}; requantized to {t}")
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
