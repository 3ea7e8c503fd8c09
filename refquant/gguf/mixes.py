"""llama-quantize's mixes: the ggml type it gives each tensor of a model for a file type
(``Q4_K_M`` …), as ``src/llama-quant.cpp`` at llama.cpp 0c1e570 (2026-10-01, ggml 0.25.3)
chooses it (``llama_tensor_get_type`` 717-773 and its rules 446-714,
``tensor_allows_quantization`` 287-383, ``tensor_type_fallback`` 390-443,
``llama_ftype_get_default_type`` 881-924, ``tensor_requires_imatrix`` 856-875).

What decides a tensor's type, in llama-quantize's order:

1. Tensors are taken sorted by layer (``blk.N.``; others first), then by name, bytes
   compared (``llama_model_loader::weight_name_comparer``): the layer counters below count
   in that order, and the output file lists the tensors in it.
2. Only tensors of 2 or more dimensions (trailing 1s of ggml's shape dropped) whose name
   ends in ``weight`` are quantized, never norms, position embeddings, MoE gates and a list
   of small special tensors (``_NEVER``); ``--leave-output-tensor`` keeps ``output.weight``.
3. ``--token-embedding-type`` / ``--output-tensor-type`` win outright (no fallback).
4. The file type's default type (``FTYPES``); if it is a quantized type, a matching
   ``--tensor-type`` regex, else (unless ``--pure``) the mix rules (``_mix``): the output
   (and ``token_embd`` when no ``output.weight`` exists: tied embeddings) Q6_K, or Q8_0 where
   its rows are not whole blocks of the default type; ``attn_v`` of Q4_K_M/Q5_K_M Q6_K in
   the layers ``use_more_bits`` picks (the first and last eighth, and every third between);
   ``ffn_down`` likewise by a running counter; and so on per file type (``_mix``).
5. The fallback when a row is not whole blocks (``fallback``): Q2_K, Q3_K → Q4_0 (older
   llama.cpp sent them to IQ4_NL), Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, IQ types → IQ4_NL;
   F16 when even that does not divide the row.

Whether an importance matrix is given changes the choice (``imatrix=True``: IQ3_XXS's
``attn_v``, the first eighth of ``ffn_down`` in IQ4_NL/IQ4_XS, Q4_0 → Q4_1 and Q5_0 → Q5_1 in
that eighth); ``requires_imatrix`` says which tensors llama-quantize refuses to write without
one. Checked against llama-quantize itself: ``tests/test_mixes.py`` holds the committed
tables it wrote for SmolLM2 and MiniGPT.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from refquant.gguf.quants.core import TYPES

# file type -> (llama_ftype, default ggml type); tools/quantize/quantize.cpp's names
# (Q3_K, Q4_K, Q5_K are its aliases of the _M mixes)
FTYPES = {
    "F32": (0, "F32"), "F16": (1, "F16"), "Q4_0": (2, "Q4_0"), "Q4_1": (3, "Q4_1"), "Q8_0": (7, "Q8_0"),
    "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"), "Q2_K": (10, "Q2_K"), "Q3_K_S": (11, "Q3_K"),
    "Q3_K_M": (12, "Q3_K"), "Q3_K_L": (13, "Q3_K"), "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"),
    "Q5_K_S": (16, "Q5_K"), "Q5_K_M": (17, "Q5_K"), "Q6_K": (18, "Q6_K"), "IQ2_XXS": (19, "IQ2_XXS"),
    "IQ2_XS": (20, "IQ2_XS"), "Q2_K_S": (21, "Q2_K"), "IQ3_XS": (22, "IQ3_S"), "IQ3_XXS": (23, "IQ3_XXS"),
    "IQ1_S": (24, "IQ1_S"), "IQ4_NL": (25, "IQ4_NL"), "IQ3_S": (26, "IQ3_S"), "IQ3_M": (27, "IQ3_S"),
    "IQ2_S": (28, "IQ2_XS"), "IQ2_M": (29, "IQ2_S"), "IQ4_XS": (30, "IQ4_XS"), "IQ1_M": (31, "IQ1_M"),
    "BF16": (32, "BF16"), "TQ1_0": (36, "TQ1_0"), "TQ2_0": (37, "TQ2_0"), "MXFP4_MOE": (38, "MXFP4"),
    "Q1_0": (40, "Q1_0"), "Q2_0": (41, "Q2_0"),
}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
_FLOATS = ("F32", "F16", "BF16", "I8", "I16", "I32", "I64", "F64")     # not ggml_is_quantized
_IQ12 = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
# tensor_allows_quantization: names holding one of these are never quantized
_NEVER = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
          "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
          "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
          "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
          "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
          "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
          ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
          "a.rvq.codebook", "mm.a.code_embd")
_NEVER_GLM5_NEXT = ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
                    "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight")
_BLK = re.compile(r"blk\.\s*([+-]?\d+)\.")      # sscanf(name, "blk.%d.", &i)


def ftype(name: str) -> str:
    """The canonical name of a llama-quantize file type (any case; ``Q4_K`` is ``Q4_K_M``)."""
    n = ALIASES.get(str(name).upper(), str(name).upper())
    if n not in FTYPES:
        raise ValueError(f"unknown file type {name!r}; llama-quantize's: {', '.join(FTYPES)}")
    return n


def _layer(name: str) -> int | None:
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


def order(names) -> list[str]:
    """Tensor names in llama-quantize's order: by ``blk.N.`` layer (others, -1, first), then
    by name as bytes."""
    return sorted(names, key=lambda n: (-1 if _layer(n) is None else _layer(n), n.encode()))


def category(name: str) -> str:
    """``tensor_get_category``: the first of these the name matches."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _is_attn_v(cat: str) -> bool:
    return cat in ("attn_v", "attn_qkv", "attn_kv_b")


def _ne(shape) -> tuple[int, int, int, int]:
    """ggml's ne (row length first) of a NumPy-order shape, padded to 4."""
    ne = tuple(int(s) for s in reversed(tuple(shape)))
    return ne + (1,) * (4 - len(ne))


def _n_dims(ne) -> int:
    return next((i + 1 for i in (3, 2, 1) if ne[i] > 1), 1)


def quantizable(name: str, shape, arch: str = "", *, leave_output_tensor: bool = False) -> bool:
    """``tensor_allows_quantization``: whether llama-quantize may change this tensor's type."""
    if _n_dims(_ne(shape)) < 2:
        return False
    ok = name.endswith("weight") or len(name) == 5      # C: name.rfind("weight") == name.size() - 6, size_t
    ok = ok and not (leave_output_tensor and name == "output.weight")
    ok = ok and not any(s in name for s in _NEVER)
    ok = ok and name not in ("position_embd.weight", "token_types.weight")
    if arch == "glm5-next":
        ok = ok and not any(s in name for s in _NEVER_GLM5_NEXT)
    return ok


def fallback(name: str, shape, target: str) -> str:
    """``tensor_type_fallback``: ``target``, or the type llama-quantize takes when ``shape``'s
    rows are not whole blocks of it (module docstring)."""
    n = _ne(shape)[0]
    block = TYPES[target].block_size
    if n % block == 0:
        return target
    if target in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"):
        out = "IQ4_NL"
    elif target in ("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0"):
        out = "Q4_0"
    else:
        out = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}.get(target, target if block <= 32 else None)
        if out is None:
            raise ValueError(f"{name}: no tensor type fallback is defined for type {target} (rows of {n})")
    return out if n % TYPES[out].block_size == 0 else "F16"


def requires_imatrix(name: str, new_type: str, ftype_name: str) -> bool:
    """``tensor_requires_imatrix``: llama-quantize refuses to write this without an importance
    matrix (never the embeddings or the output)."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if new_type in ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"):
        return True
    return new_type == "Q2_K" and ftype_name == "Q2_K_S"


@dataclass
class Model:
    """What the rules read of a model (``hparams`` at load, llama-model.cpp 1327-1404):
    its architecture, ``block_count``, ``expert_count``, the query/KV head ratio of layer 0
    (0 when it has no KV heads) and whether llama.cpp calls it a 70B."""

    arch: str
    n_layer: int
    n_expert: int = 0
    n_gqa: int = 1
    is_70b: bool = False

    @classmethod
    def from_metadata(cls, meta: dict) -> "Model":
        arch = meta.get("general.architecture")
        if not isinstance(arch, str) or f"{arch}.block_count" not in meta:
            raise ValueError(f"the rules need general.architecture and <arch>.block_count; got {arch!r}")
        n_layer = int(meta[f"{arch}.block_count"])
        n_expert = int(meta.get(f"{arch}.expert_count", 0))
        if arch in ("hunyuan_vl", "hunyuan-dense") and n_expert <= 1:
            n_expert = 0

        def first(key, default):
            v = meta.get(key, default)
            return int(v[0]) if isinstance(v, (list, tuple)) else int(v)
        heads = first(f"{arch}.attention.head_count", 0)
        kv = first(f"{arch}.attention.head_count_kv", heads)
        real = n_layer - int(meta.get(f"{arch}.nextn_predict_layers", 0))
        if arch in ("llama", "llama-embed"):
            big = n_expert != 8 and real == 80 and heads != kv
        else:
            big = real == {"qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}.get(arch, -1)
        return cls(arch, n_layer, n_expert, heads // kv if kv else 0, big)


@dataclass
class Options:
    """llama-quantize's switches that change the choice: ``--imatrix`` given (``imatrix``),
    ``--pure``, ``--output-tensor-type``, ``--token-embedding-type``,
    ``--leave-output-tensor`` and ``--tensor-type REGEX=TYPE`` (``tensor_types``, first
    match wins, searched anywhere in the name, case as given but the pattern lower-cased as
    quantize.cpp does)."""

    imatrix: bool = False
    pure: bool = False
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    leave_output_tensor: bool = False
    tensor_types: list = field(default_factory=list)

    def __post_init__(self):
        pats = []
        for p, t in self.tensor_types:
            try:
                pats.append((re.compile(p.lower()) if isinstance(p, str) else p, TYPES[str(t).upper()].name))
            except re.error as e:
                raise ValueError(f"--tensor-type {p!r}: not a regular expression ({e})") from None
            except KeyError:
                raise ValueError(f"--tensor-type {p}={t}: unknown ggml type {t!r}") from None
        self.tensor_types = pats
        for k in ("output_tensor_type", "token_embedding_type"):
            v = getattr(self, k)
            if v is not None:
                if str(v).upper() not in TYPES:
                    raise ValueError(f"--{k.replace('_', '-')} {v!r}: unknown ggml type")
                setattr(self, k, TYPES[str(v).upper()].name)


def _more_bits(i: int, n: int) -> bool:
    """``use_more_bits``: the first and last eighth of the layers, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class _Counters:
    def __init__(self, names, n_layer):
        self.n_attention_wv = sum(_is_attn_v(category(n)) for n in names)
        self.tied = "output.weight" not in names
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.n_ffn = n_layer


def _mix(c: _Counters, m: Model, name: str, shape, t: str, ft: str, cat: str, o: Options) -> str:
    """``llama_tensor_get_type_impl`` (446-714): the mix rules from default type ``t``."""
    n_expert = max(1, m.n_expert)
    imatrix = o.imatrix

    def layer(counter: str) -> tuple[int, int]:
        i = getattr(c, counter)
        if n_expert > 1:
            i = _layer(name)
            if i is None:
                raise ValueError(f"Failed to determine layer for tensor {name}")
            if not 0 <= i < c.n_ffn:
                raise ValueError(f"Bad layer {i} for tensor {name}. Must be in [0, {c.n_ffn})")
        return i, c.n_ffn

    if m.arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if t not in ("F32", "BF16", "F16"):
            return "Q8_0"
    if cat == "output" or (c.tied and cat == "token_embd"):
        if o.output_tensor_type:    # (the output itself returned before the rules: tied embeddings)
            return o.output_tensor_type
        if ft == "MXFP4_MOE" or m.arch == "falcon" or _ne(shape)[0] % TYPES[t].block_size:
            return "Q8_0"
        if ft in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            return "Q5_K"
        return t if t == "Q8_0" else "Q6_K"
    if ft == "MXFP4_MOE":
        expert = m.arch != "bailingmoe3" or cat in ("ffn_up", "ffn_gate", "ffn_down")
        return "MXFP4" if _ne(shape)[2] > 1 and expert else "Q8_0"
    if cat == "token_embd":
        if ft in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        if ft in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S"
        return "Q4_K" if ft in ("TQ1_0", "TQ2_0", "Q2_0") else t
    if ft in _IQ12:
        if _is_attn_v(cat):
            t = "Q4_K" if m.n_gqa >= 4 or m.n_expert >= 4 else "IQ3_S" if ft in ("IQ2_S", "IQ2_M") else "Q2_K"
            c.i_attention_wv += 1
        elif m.n_expert == 8 and cat == "attn_k":
            t = "Q4_K"
        elif cat == "ffn_down":
            if c.i_ffn_down < c.n_ffn // 8:
                t = "IQ3_S" if ft in ("IQ2_S", "IQ2_M") else "Q2_K"
            c.i_ffn_down += 1
        elif cat == "attn_output":
            if m.n_expert == 8:
                t = "Q5_K"
            elif ft in ("IQ1_S", "IQ1_M"):
                t = "IQ2_XXS"
            elif ft in ("IQ2_S", "IQ2_M"):
                t = "IQ3_S"
        return t
    if _is_attn_v(cat):
        i, n = c.i_attention_wv, c.n_attention_wv
        if ft == "Q2_K":
            t = "Q4_K" if m.n_gqa >= 4 else "Q3_K"
        elif ft == "Q2_K_S" and m.n_gqa >= 4:
            t = "Q4_K"
        elif ft == "IQ3_XXS":
            t = "Q4_K" if m.n_gqa >= 4 else "IQ3_XXS" if imatrix else "IQ3_S"
        elif ft in ("IQ3_XS", "IQ3_S") and m.n_gqa >= 4:
            t = "Q4_K"
        elif ft == "IQ3_M":
            t = "Q4_K"
        elif ft == "Q3_K_M":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif ft == "Q3_K_L":
            t = "Q5_K"
        elif ft in ("IQ4_NL", "IQ4_XS") and m.n_gqa >= 4:
            t = "Q5_K"
        elif ft in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
            t = "Q6_K"
        elif ft == "Q4_K_S" and i < 4:
            t = "Q5_K"
        if m.is_70b and t in ("Q3_K", "Q4_K"):
            t = "Q5_K"
        if m.n_expert == 8:
            t = "Q8_0"
        c.i_attention_wv += 1
    elif cat in ("attn_k", "attn_q"):
        if cat == "attn_k" and m.n_expert == 8:
            t = "Q8_0"
        elif ft == "IQ3_XS":
            t = "IQ3_XXS"
        elif ft == "IQ3_XXS":
            t = "IQ2_S"
    elif cat == "ffn_down":
        i, n = layer("i_ffn_down")
        falcon = m.arch == "falcon"
        if ft == "Q2_K":
            t = "Q3_K"
        elif ft == "Q2_K_S":
            t = "Q4_K" if i < n // 8 else t
        elif ft == "IQ3_XXS" and not imatrix:
            t = "Q4_K" if i < n // 8 else "Q3_K"
        elif ft == "Q3_K_M":
            t = "Q5_K" if i < n // 16 else "Q4_K" if not falcon or _more_bits(i, n) else "Q3_K"
        elif ft == "IQ3_M" and (i < n // 8 or (m.n_expert == 8 and _more_bits(i, n))):
            t = "Q4_K"
        elif ft == "Q3_K_L":
            t = "Q4_K" if falcon else "Q5_K"
        elif ft == "Q4_K_M":
            if falcon:
                t = "Q6_K" if i < n // 16 else "Q5_K" if _more_bits(i, n) else "Q4_K"
            elif _more_bits(i, n):
                t = "Q6_K"
        elif i < n // 8 and ft in ("IQ4_NL", "IQ4_XS") and not imatrix:
            t = "Q5_K"
        elif ft == "Q5_K_M" and _more_bits(i, n):
            t = "Q6_K"
        elif ft == "Q4_K_S" and not falcon and i < n // 8:
            t = "Q5_K"
        elif ft in ("Q4_0", "Q5_0") and imatrix and i < n // 8:
            t = "Q4_1" if ft == "Q4_0" else "Q5_1"
        c.i_ffn_down += 1
    elif cat == "attn_output":
        if m.arch != "falcon":
            if m.n_expert == 8:
                if ft in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                          "IQ3_M", "IQ4_XS"):
                    t = "Q5_K"
            else:
                t = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(ft, t)
        elif ft == "Q3_K_L":
            t = "Q4_K"
    elif cat == "attn_qkv":     # (attn_v-like: taken above; kept as the C++ has it)
        t = {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "IQ3_M": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(ft, t)
    elif cat in ("ffn_gate", "ffn_up"):
        counter = "i_" + cat
        i, n = layer(counter)
        if ft == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            t = "IQ3_XXS"
        setattr(c, counter, getattr(c, counter) + 1)
    return t


def plan(meta: dict, shapes: dict, ftype_name: str, options: Options | None = None, types: dict | None = None
         ) -> list[tuple[str, str]]:
    """``[(tensor, its new ggml type)]`` in llama-quantize's order for a model of metadata
    ``meta`` and tensor ``shapes`` (NumPy order) in file type ``ftype_name``; a tensor it
    leaves alone keeps ``types[name]`` (its current type; "F32" when not given)."""
    ft = ftype(ftype_name)
    o = options or Options()
    m = Model.from_metadata(meta)
    default = FTYPES[ft][1]
    names = order(shapes)
    c = _Counters(names, m.n_layer)
    out = []
    for name in names:
        shape = shapes[name]
        cur = (types or {}).get(name, "F32")
        if not quantizable(name, shape, m.arch, leave_output_tensor=o.leave_output_tensor):
            out.append((name, cur))
            continue
        cat = category(name)
        if o.token_embedding_type and cat == "token_embd" and not (
                name == "per_layer_token_embd.weight" and any(p.search(name) for p, _ in o.tensor_types)):
            out.append((name, o.token_embedding_type))
            continue
        if o.output_tensor_type and cat == "output":
            out.append((name, o.output_tensor_type))
            continue
        t = default
        if t not in _FLOATS:
            manual = next((qt for p, qt in o.tensor_types if p.search(name)), None)
            if manual is not None:
                t = manual
            elif not o.pure:
                t = _mix(c, m, name, shape, t, ft, cat, o)
            t = fallback(name, shape, t)
        out.append((name, t))
    return out


def write(src, dst, ftype_name: str, options: Options | None = None, *, imatrix=None, imatrix_file: str | None = None,
          allow_requantize: bool = False, progress=None) -> dict:
    """Write the GGUF ``src`` as llama-quantize writes it in file type ``ftype_name``: the
    tensors in its order and in the types ``plan`` gives them (one it leaves alone copied as
    it is), each converted one dequantized to float32 and quantized with its importances
    from ``imatrix`` (a ``gguf.imatrix.IMatrix``; its entries llama-quantize would use, by
    tensor name), the metadata of ``src`` with ``general.quantization_version`` and
    ``general.file_type`` moved to the end and, with an importance matrix,
    ``quantize.imatrix.file`` (``imatrix_file``, cut to 127 bytes), ``.dataset``,
    ``.entries_count``, ``.chunks_count``: from the same inputs, llama-quantize's file byte
    for byte. Everything llama-quantize refuses (a tensor that needs an importance matrix
    and has none, requantizing without ``allow_requantize``, an importance vector whose size
    is not the tensor's) raises ValueError naming the tensor before anything is written;
    so does a type refquant cannot write yet. Returns ``{"types": {type: tensors converted},
    "kept": n, "imatrix_tensors": n, "imatrix_size_mismatch": [embeddings quantized without
    their entry, whose size was not theirs]}``."""
    import numpy as np

    from refquant import gguf
    from refquant.gguf import quants

    ft = ftype(ftype_name)
    o = replace(options or Options(), imatrix=imatrix is not None)     # (the caller's Options stay as they were)
    with gguf.read(src) as f:
        types = {n: i.type.name for n, i in f.tensors.items()}
        chosen = plan(f.metadata, {n: i.shape for n, i in f.tensors.items()}, ft, o, types)
        weights, skipped = {}, []
        for name, t in chosen:          # every refusal first: nothing is written on failure
            info = f.tensors[name]
            if t == info.type.name:
                continue
            if requires_imatrix(name, t, ft) and (imatrix is None or name not in imatrix):
                raise ValueError(f"tensor {name!r} would be {t}: this quantization requires an importance matrix"
                                 + (" (missing importance matrix for it in a very low-bit quantization)"
                                    if imatrix is not None else "; give one"))
            if info.type.name not in ("F32", "F16", "BF16") and not allow_requantize:
                raise ValueError(f"tensor {name!r} is {info.type.name}: requantizing from type "
                                 f"{info.type.name.lower()} is disabled (allow_requantize, --allow-requantize)")
            if not quants.ggml_type(t).can_quantize:
                raise ValueError(f"tensor {name!r} would be {t}, which refquant cannot write yet")
            if not info.type.can_dequantize:
                raise ValueError(f"tensor {name!r} is {info.type.name}, which refquant cannot decode")
            if imatrix is not None and name in imatrix:
                n_mat = int(np.prod(info.shape[:-2], dtype=np.int64)) if len(info.shape) > 2 else 1
                w = imatrix.weights(name)
                if w.size != info.shape[-1] * n_mat and name in ("token_embd.weight", "per_layer_token_embd.weight"):
                    skipped.append(name)    # llama-quantize quantizes the embeddings without it then
                    continue
                weights[name] = imatrix.check(name, info.shape[-1], n_mat)
        out = {}
        for name, t in chosen:
            s = f.tensor(name)
            out[name] = s if t == s.type.name else gguf.GGUFTensor(
                t, s.shape, lambda s=s, t=t, n=name: _convert(s, t, n, src, weights.get(n)))
        meta = {k: v for k, v in f.metadata.items() if k not in (
            "general.quantization_version", "general.file_type", "split.no", "split.count", "split.tensors.count")}
        meta["general.quantization_version"] = np.uint32(2)
        meta["general.file_type"] = np.uint32(FTYPES[ft][0])
        if imatrix is not None:
            meta["quantize.imatrix.file"] = _cut(imatrix_file or "")
            if imatrix.datasets:
                meta["quantize.imatrix.dataset"] = _cut(imatrix.datasets[0])
            meta["quantize.imatrix.entries_count"] = np.uint32(len(imatrix))
            if imatrix.chunk_count > 0:
                meta["quantize.imatrix.chunks_count"] = np.uint32(imatrix.chunk_count)
        gguf.write(dst, meta, out, progress=progress)
    counts: dict = {}
    for name, t in chosen:
        if t != types[name]:
            counts[t] = counts.get(t, 0) + 1
    return dict(types=counts, kept=len(chosen) - sum(counts.values()), imatrix_tensors=len(weights),
                imatrix_size_mismatch=skipped)


def _cut(s: str) -> str:
    """A string cut to 127 bytes, as llama-quantize stores the imatrix file and dataset names."""
    return str(s).encode("utf-8")[:127].decode("utf-8", "ignore")


def _convert(src, t: str, name: str, path, w):
    """One tensor of a mix: decoded to float32 (finite, or an error naming it) and quantized
    to ``t``, each matrix of a 3-D tensor with its own row of importances ``w`` (None:
    without)."""
    import numpy as np

    from refquant.gguf import quants

    x = src.dequantize()
    if not np.all(np.isfinite(x)):
        raise ValueError(f"tensor {name!r} of {path} holds non-finite values")
    try:
        if w is None:
            return quants.quantize(x, t)
        mats = x.reshape(w.shape[0], -1, x.shape[-1])
        return np.concatenate([quants.quantize(m, t, imatrix=wi).reshape(-1) for m, wi in zip(mats, w)])
    except ValueError as e:
        raise ValueError(f"tensor {name!r} of {path}: {e}") from None
