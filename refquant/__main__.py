"""``python -m refquant``: inspect, requantize, dequantize, compare and export GGUF files.

    python -m refquant inspect FILE            (a .gguf, or a GPTQ/AWQ/compressed-tensors checkpoint)
    python -m refquant export IN.gguf DIR --format gptq|awq|compressed-tensors [--bits 4 --group-size 128]
    python -m refquant convert DIR OUT.gguf [--metadata-from IN.gguf] [--fallback Q8_0]
    python -m refquant quantize IN OUT --type Q4_K [--keep PATTERN ...] [--impl auto|numpy|numba]
    python -m refquant quantize IN OUT --ftype Q4_K_M [--imatrix FILE] [--pure] [--allow-requantize]
        [--output-tensor-type T] [--token-embedding-type T] [--leave-output-tensor]
        [--tensor-type REGEX=TYPE ...] [--include-weights S ... | --exclude-weights S ...]
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
from refquant._cli import note, progress_bytes
from refquant.hf import cli as hf_cli

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
        return hf_cli.inspect_checkpoint(args.file)
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
        kinds: dict = {}
        for info in f.tensors.values():
            kinds[info.type.name] = kinds.get(info.type.name, 0) + 1
        from refquant.gguf.mixes import FTYPES
        ft = f.metadata.get("general.file_type")
        name = next((k for k, (v, _) in FTYPES.items() if v == ft), None)
        print(f"types: {', '.join(f'{n} {t}' for t, n in sorted(kinds.items(), key=lambda kv: -kv[1]))}"
              + (f"; file type {name} ({ft})" if name else f"; file type {ft}" if ft is not None else "")
              + (f"; imatrix {f.metadata['quantize.imatrix.file']!r}, {f.metadata.get('quantize.imatrix.entries_count')}"
                 f" entries" if "quantize.imatrix.file" in f.metadata else ""))
    return 0


def _problem(path, name: str, values: np.ndarray) -> str | None:
    """A note on tensor ``name`` of ``path`` when it is empty or holds non-finite values, else None."""
    if values.size == 0:
        return f"{path}: tensor {name!r} is empty"
    bad = ~np.isfinite(values)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        return f"{path}: tensor {name!r} has {int(bad.sum())} non-finite values, the first at index {first}"
    return None


def cmd_quantize(args) -> int:
    if (args.type is None) == (args.ftype is None):
        raise SystemExit("error: give one of --type (every 2-D tensor in one type) or --ftype (a llama-quantize mix)")
    if args.ftype is not None:
        return cmd_quantize_mix(args)
    if args.imatrix or args.mix_switches_given:
        raise SystemExit("error: --imatrix and llama-quantize's switches go with --ftype")
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
                    note(problem + ("; kept as it was" if info.n_elements == 0 else
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
        gguf.write(args.output, meta, out, progress=lambda it: progress_bytes(it, f"quantize {target.name}"))
    n_target = len(out) - len(kept) - len(fell_back)
    fb = f", {len(fell_back)} -> {quants.FALLBACK[target.name]} (rows not a multiple of {target.block_size})" if fell_back else ""
    print(f"wrote {args.output}: {n_target} tensors -> {target.name}{fb}, {len(kept)} kept as they were"
          + (f" ({refused} refused: non-finite values)" if refused else ""))
    return 1 if refused else 0


def _imatrix(args):
    """The importance matrix of ``--imatrix``, filtered as llama-quantize filters it
    (``--include-weights`` / ``--exclude-weights``: substrings of entry names); None when
    none is given or no entry is left."""
    from refquant.gguf import imatrix

    if not args.imatrix:
        if args.include_weights or args.exclude_weights:
            raise SystemExit("error: --include-weights / --exclude-weights filter an --imatrix")
        return None
    if args.include_weights and args.exclude_weights:
        raise SystemExit("error: --include-weights and --exclude-weights cannot be used together")
    im = imatrix.read(args.imatrix)
    keep = [n for n in im.sums if not any(s in n for s in args.exclude_weights)
            and (not args.include_weights or any(s in n for s in args.include_weights))]
    for n in keep:
        if not np.all(np.isfinite(im.sums[n])):
            raise ValueError(f"{args.imatrix}: imatrix entry {n!r} holds non-finite values")
    for n in set(im.sums) - set(keep):
        del im.sums[n], im.counts[n]
    if not len(im):
        note(f"{args.imatrix}: no importance matrix entry is left; quantizing without one")
        return None
    return im


def cmd_quantize_mix(args) -> int:
    """llama-quantize's file types (``gguf.mixes.write``): every tensor in the type
    llama-quantize gives it, with the importance matrix's weights where the file has an
    entry for it. All the refusals happen before anything is written."""
    from refquant.gguf import mixes

    ft = mixes.ftype(args.ftype)
    im = _imatrix(args)
    options = mixes.Options(pure=args.pure, output_tensor_type=args.output_tensor_type,
                            token_embedding_type=args.token_embedding_type,
                            leave_output_tensor=args.leave_output_tensor,
                            tensor_types=[_tensor_type(a) for a in args.tensor_type])
    r = mixes.write(args.input, args.output, ft, options, imatrix=im, imatrix_file=args.imatrix,
                    allow_requantize=args.allow_requantize, progress=lambda it: progress_bytes(it, f"quantize {ft}"))
    for name in r["imatrix_size_mismatch"]:
        note(f"{args.imatrix}: the entry of {name} has another size than the tensor; quantized without it, "
             "as llama-quantize does")
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(r["types"].items(), key=lambda kv: -kv[1]))
    print(f"wrote {args.output} ({ft}): {kinds}, {r['kept']} kept as they were"
          + (f"; imatrix weights for {r['imatrix_tensors']} tensors" if im is not None else ""))
    return 0


def _tensor_type(arg: str) -> tuple[str, str]:
    name, sep, t = arg.partition("=")
    if not sep or not name or not t:
        raise SystemExit(f"error: --tensor-type takes REGEX=TYPE, got {arg!r}")
    return name, t


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
            note(problem + "; written as it is")
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
        gguf.write(args.output, meta, out, progress=lambda it: progress_bytes(it, f"dequantize {args.type.upper()}"))
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
    s = sub.add_parser("quantize", help="requantize every 2-D weight tensor (--type), or as llama-quantize's "
                                       "file types do (--ftype)")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--type", help=f"every 2-D tensor in this ggml type: {', '.join(quants.quantizable())}")
    s.add_argument("--ftype", help="a llama-quantize file type (Q4_K_M, Q3_K_S, IQ4_XS, Q8_0, ...): each tensor "
                                   "in the type llama-quantize (llama.cpp 0c1e570) gives it")
    s.add_argument("--imatrix", metavar="FILE", help="importance matrix (llama-imatrix's GGUF or .dat), with --ftype")
    s.add_argument("--include-weights", action="append", default=[], metavar="S",
                   help="use the imatrix only for tensors whose name contains S (repeatable)")
    s.add_argument("--exclude-weights", action="append", default=[], metavar="S",
                   help="do not use the imatrix for tensors whose name contains S (repeatable)")
    s.add_argument("--pure", action="store_true", help="no mix: every quantizable tensor in the default type")
    s.add_argument("--output-tensor-type", metavar="T", help="ggml type of output.weight")
    s.add_argument("--token-embedding-type", metavar="T", help="ggml type of token_embd.weight")
    s.add_argument("--leave-output-tensor", action="store_true", help="keep output.weight as it is")
    s.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="tensors whose name matches REGEX in TYPE (repeatable, first match wins)")
    s.add_argument("--allow-requantize", action="store_true",
                   help="quantize tensors that are already quantized (from their dequantized values)")
    s.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                   help="glob of tensor names to copy unchanged (repeatable), e.g. 'token_embd.*'")
    s.add_argument("--allow-nonfinite", action="store_true",
                   help="quantize tensors holding NaN/Inf too (default: copy them unchanged and exit 1)")
    s.add_argument("--impl", default="auto", choices=quants.IMPLS,
                   help="quantizer: the compiled kernels over every core (numba), the NumPy reference "
                        "(numpy), or numba where it applies (auto, the default); the bytes are the same")
    hf_cli.add_parsers(sub)
    s = sub.add_parser("dequantize", help="write every tensor as F32 or F16")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--type", default="F32", choices=["F32", "F16", "f32", "f16"])
    s = sub.add_parser("compare", help="per-tensor max-abs error and SQNR of B against A (exit 1 when "
                                      "tensors are missing on one side or hold non-finite values)")
    s.add_argument("a")
    s.add_argument("b")
    args = p.parse_args(argv)
    if args.cmd == "quantize":
        args.mix_switches_given = any((args.pure, args.output_tensor_type, args.token_embedding_type,
                                       args.leave_output_tensor, args.tensor_type, args.allow_requantize,
                                       args.include_weights, args.exclude_weights))
    try:
        return {"inspect": cmd_inspect, "quantize": cmd_quantize, "dequantize": cmd_dequantize,
                "compare": cmd_compare, "export": hf_cli.cmd_export, "convert": hf_cli.cmd_convert}[args.cmd](args)
    except BrokenPipeError:   # the reader went away (``inspect ... | head``): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (gguf.GGUFError, ValueError, OSError) as e:
        note(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
