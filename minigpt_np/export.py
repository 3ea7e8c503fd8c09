"""Calibrated export of a Llama GGUF as a GPTQ / AWQ / compressed-tensors checkpoint, or as GGUF.

    python -m minigpt_np.export model.gguf DIR --method gptq --format gptq --calib FILE \\
        [--group-size 64] [--act-order] [--sequences 16] [--tokens 128]
    python -m minigpt_np.export model.gguf out.gguf --method gptq --format gguf --type Q4_0 --calib FILE
    python -m minigpt_np.export model.gguf out.gguf --method awq --format gguf --type Q4_0 --calib FILE

The model runs on ``--sequences`` windows of ``--tokens`` tokens of the calibration text
(``llama.quantize_model``: one pass collects every Linear's Hessian / activation
statistics), each block Linear is quantized by the registered scheme
(``gptq_int4_g{size}``, ``gptq_int4_g128_actorder``, ``awq_int4_g128`` or the RTN
``int4_g{size}``), and ``refquant.hf.checkpoint`` writes the layout with Hugging Face's
names and rotary row order. As GGUF (``export_gguf``), GPTQ or AWQ (its scales folded into
the norms, ``llama.awq_model``) on grids that are Q4_0 / Q4_1 exactly. (``python -m refquant
export`` is the round-to-nearest export without a model pass; calibration needs the
forward, which lives here, above refquant.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from minigpt_np import llama, tokenizer
from refquant._checks import cli_int

# method -> the spec fields its INT4 scheme has (the group size comes from the command line)
METHODS = {"gptq": dict(calibration="gptq"), "gptq-actorder": dict(calibration="gptq_actorder"),
           "awq": dict(calibration="awq"), "rtn": dict(calibration=None, symmetric=True)}


def calibration_sequences(tok, text: str, n: int, length: int) -> list[list[int]]:
    """``n`` windows of ``length`` tokens, evenly spaced over the tokenized text."""
    ids = tok.encode(text)
    if len(ids) < length:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of {length}")
    starts = np.linspace(0, len(ids) - length, num=n).astype(int)
    return [ids[s:s + length] for s in starts]


def export(model, out_dir, *, method: str = "gptq", layout: str = "gptq", calib_text: str | None = None,
           group_size: int = 64, sequences: int = 16, tokens: int = 128, checkpoint_format: str = "gptq",
           layers=None, progress: bool = True, force: bool = False, write_tokenizer: bool = True) -> dict:
    """Quantize every block Linear of ``model`` (or the GGUF names in ``layers``; the rest are
    written as float16) and write the checkpoint; returns the ``QuantizedTensor`` s by GGUF
    name (GGUF row order), as the model in memory holds them."""
    from refquant import schemes
    from refquant.hf import llama as hf_llama

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    found = schemes.find(values="int", bits=4, group_size=group_size, **METHODS[method])
    if not found:
        sizes = sorted({schemes.get(n).group_size for n in schemes.find(values="int", bits=4, **METHODS[method])})
        raise ValueError(f"no registered INT4 scheme for method {method} with group size {group_size} "
                         f"(group sizes: {', '.join(map(str, sizes))})")
    scheme = found[0]
    params, cfg, meta = llama.load(model, dtype="f32")
    seqs = None
    if schemes.get(scheme).needs_calib:
        if calib_text is None:
            raise ValueError(f"{scheme} needs calibration text (--calib FILE)")
        seqs = calibration_sequences(tokenizer.from_gguf(model), calib_text, sequences, tokens)
    q = llama.quantize_model(params, cfg, scheme, seqs, layers=layers, progress=progress)
    in_memory = {name: q[name].qt for name in layers or llama.block_linears(cfg)}
    others = {}
    for name, v in params.items():
        if name not in in_memory and not (name == "output.weight" and v is params["token_embd.weight"]):
            others[name] = v.dequantize() if hasattr(v, "dequantize") else v
    hf_llama.write_checkpoint(out_dir, in_memory, others, meta, layout=layout, checkpoint_format=checkpoint_format,
                              force=force, tokenizer=write_tokenizer)
    return in_memory


GGUF_SCHEMES = {("gptq", "Q4_0"): "gptq_int4_g32", ("rtn", "Q4_0"): "int4_g32", ("rtn", "Q4_1"): "int4_g32_asym",
                ("awq", "Q4_0"): "int4_g32", ("awq", "Q4_1"): "int4_g32_asym"}   # AWQ: folded (llama.awq_model)


def export_gguf(model, out_path, *, method: str = "gptq", type_name: str = "Q4_0", calib_text: str | None = None,
                calib=None, sequences: int = 16, tokens: int = 128, layers=None, progress: bool = True) -> dict:
    """Quantize the block Linears of the Llama GGUF ``model`` (or the GGUF names in
    ``layers``) by ``method`` on a grid that *is* a GGML type, and write a GGUF llama.cpp
    runs: those Linears as ``type_name`` blocks (``refquant.gguf.tensors.as_ggml``: GPTQ's
    symmetric INT4 grid with an fp16 scale per 32 inputs is Q4_0 block for block, with no
    second rounding), every other tensor exactly as the source stores it. ``method="awq"``
    quantizes whole blocks (``llama.awq_model``): its input scalings are folded into the
    blocks' ``attn_norm`` / ``ffn_norm`` weights (written as float32) and ``ffn_up`` rows,
    and the Linears are INT4 g32 on the folded weights (Q4_0 symmetric, Q4_1 asymmetric).

    ``calib``: token-id sequences, or ``calib_text`` cut into ``sequences`` windows of
    ``tokens``. Returns ``dict(layers=..., scheme=..., type=..., m_error=..., quantized=...)``
    (``m_error``: the largest fp16 rounding of a Q4_1 ``m``, 0 for Q4_0; ``quantized``: the
    ``QuantizedTensor`` s by GGUF name, as the model in memory holds them; ``folded``: AWQ's
    rescaled norm weights by name).
    """
    from refquant import gguf, schemes
    from refquant.gguf.tensors import as_ggml

    key = (method, type_name.upper())
    if key not in GGUF_SCHEMES:
        raise ValueError(f"no exact GGUF grid for method {method!r} as {type_name!r}; "
                         f"choose one of {', '.join(f'{m} -> {t}' for m, t in GGUF_SCHEMES)}")
    scheme = GGUF_SCHEMES[key]
    params, cfg, meta = llama.load(model, dtype="f32")
    seqs = calib
    if (method == "awq" or schemes.get(scheme).needs_calib) and seqs is None:
        if calib_text is None:
            raise ValueError(f"{method} needs calibration text (--calib FILE)")
        seqs = calibration_sequences(tokenizer.from_gguf(model), calib_text, sequences, tokens)
    names = list(layers or llama.block_linears(cfg))
    out, worst = {}, 0.0
    if method == "awq":   # whole blocks: the scales fold into their norms and up rows
        blocks = sorted({int(n.split(".")[1]) for n in names})
        q, folded = llama.awq_model(params, cfg, seqs, group_size=32, sym=key[1] == "Q4_0", blocks=blocks,
                                    progress=progress)
        names = [f"blk.{i}.{s}" for i in blocks for s in llama.LINEAR_SUFFIXES]
        for name in folded:
            if name not in names:     # a norm: float32, as the source stores it
                out[name] = gguf.GGUFTensor.from_array(q[name])
    else:
        q = llama.quantize_model(params, cfg, scheme, seqs, layers=names, progress=progress)
    for name in names:
        raw, t, m_err = as_ggml(q[name].qt)
        out[name] = gguf.GGUFTensor(t, q[name].shape, raw)
        worst = max(worst, m_err)
    with gguf.read(model) as f:
        for name in f.tensors:
            out.setdefault(name, f.tensor(name))
        ftype = {"Q4_0": 2, "Q4_1": 3}[key[1]]
        gguf.write(out_path, {**f.metadata, "general.file_type": np.uint32(ftype)}, out)
    return dict(layers=len(names), scheme=f"awq+{scheme}" if method == "awq" else scheme, type=key[1],
                m_error=worst, quantized={n: q[n].qt for n in names},
                folded={n: q[n] for n in folded if n not in names} if method == "awq" else {})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minigpt_np.export", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="Llama GGUF")
    p.add_argument("output", help="checkpoint directory")
    p.add_argument("--method", default="gptq", choices=list(METHODS))
    p.add_argument("--format", default="gptq", choices=["gptq", "awq", "compressed-tensors", "gguf"],
                   help="gguf: OUTPUT is a .gguf file, the Linears as --type blocks (export_gguf)")
    p.add_argument("--type", default="Q4_0", choices=["Q4_0", "Q4_1"], help="gguf: the ggml type (Q4_1: rtn only)")
    p.add_argument("--calib", help="calibration text file")
    p.add_argument("--group-size", type=cli_int(1, 1 << 20, also=(-1,)), default=64)
    p.add_argument("--sequences", type=cli_int(1, 1 << 16), default=16)
    p.add_argument("--tokens", type=cli_int(2, 1 << 20), default=128)
    p.add_argument("--checkpoint-format", default="gptq", choices=["gptq", "gptq_v2"])
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists and is not empty")
    p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files beside the checkpoint")
    args = p.parse_args(argv)
    try:
        text = Path(args.calib).read_text() if args.calib else None
        if args.format == "gguf":
            r = export_gguf(args.model, args.output, method=args.method, type_name=args.type, calib_text=text,
                            sequences=args.sequences, tokens=args.tokens)
            print(f"wrote {args.output}: {r['layers']} Linears {r['scheme']} as {r['type']} "
                  f"(largest fp16 rounding of m: {r['m_error']:.3g})")
            return 0
        export(args.model, args.output, method=args.method, layout=args.format,
               calib_text=text, group_size=args.group_size, sequences=args.sequences, tokens=args.tokens,
               checkpoint_format=args.checkpoint_format, force=args.force, write_tokenizer=not args.no_tokenizer)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {args.method} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
