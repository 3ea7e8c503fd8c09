"""Microscaling block formats: MXFP4, MXFP8 (OCP MX v1.0) and NVFP4.

MX (OCP Microscaling Formats Specification v1.0, §5.3 and §6.3): blocks of k = 32
consecutive elements along the last axis share one E8M0 scale ``X = 2^e``; elements are
stored in a narrow float format (E2M1 for MXFP4, E4M3 for MXFP8). The spec's scale rule::

    e = floor(log2(max_i |V_i|)) - emax_elem          (emax_elem = 2 for E2M1, 8 for E4M3)
    P_i = round_to_elem(V_i / X), clamped to ±max_elem (saturating conversion)

so the block's largest element lands in the element format's top binade; values that
round above ``max_elem`` (e.g. 7.5 in an E2M1 block) saturate. ``e`` is clamped to the
E8M0 range [-127, 127]. An all-zero block has no log2; as the OCP reference code
(microsoft/microxcaling) does, its amax is taken as the smallest normal float32, which
puts ``e`` at the bottom of the range (code 0 for MXFP4).

NVFP4 (NVIDIA Blackwell): blocks of 16 E2M1 elements with an E4M3 block scale and one
fp32 per-tensor scale. With ``g = amax_tensor / (6 * 448)`` (so the largest block scale
lands on E4M3's maximum)::

    s_b = e4m3(amax_block / 6 / g),   P_i = e2m1(V_i / (s_b * g)) saturating,   V̂_i = P_i s_b g

Storage: E2M1 codes two per byte (``refquant.packing``, low nibble first), E4M3 codes
one byte each, E8M0 / E4M3 scales one byte per block, NVFP4's ``g`` as fp32.
Bits per weight: MXFP4 4.25, MXFP8 8.25, NVFP4 4.5 (+32 bits per tensor).
"""
from __future__ import annotations

import numpy as np

from refquant import formats, packing
from refquant._checks import float_array
from refquant.schemes import Spec, register
from refquant.tensor import QuantizedTensor, register_decoder

MX_FORMATS = {
    # name: (element format, block size, emax of the element format)
    "mxfp4": ("fp4_e2m1", 32, 2),
    "mxfp8": ("fp8_e4m3fn", 32, 8),
}
NVFP4_BLOCK = 16
_F32_MIN_NORMAL = np.float32(2.0**-126)


def _blocked(w: np.ndarray, block: int, name: str) -> np.ndarray:
    if w.shape[-1] % block:
        raise ValueError(f"{name} needs the last axis of w to be a multiple of {block}, got shape {w.shape}")
    return w.astype(np.float32).reshape(w.shape[:-1] + (-1, block))


def _pack_elements(codes: np.ndarray, fmt: str, shape) -> np.ndarray:
    codes = codes.reshape(shape)
    return packing.pack(codes, 4) if formats.get_format(fmt).width == 4 else codes.astype(np.uint8)


def _unpack_elements(qt: QuantizedTensor, fmt: str) -> np.ndarray:
    if formats.get_format(fmt).width == 4:
        return packing.unpack(qt.codes, 4, qt.shape[-1])
    return qt.codes


def shared_exponent(amax: np.ndarray, emax_elem: int) -> np.ndarray:
    """OCP MX scale exponent ``floor(log2(amax)) - emax_elem``, clamped to [-127, 127]:
    E8M0's ``"floor"`` rounding of amax (``formats.encode``), less the element's emax."""
    amax = np.where(amax == 0, _F32_MIN_NORMAL, amax).astype(np.float32)
    floor_log2 = formats.encode(amax, "e8m0", rounding="floor").astype(np.int64) - 127   # exact, from the bits
    return np.clip(floor_log2 - emax_elem, -127, 127)


def quantize_mx(w: np.ndarray, name: str = "mxfp4", *, scheme: str | None = None) -> QuantizedTensor:
    """MXFP4 / MXFP8 quantization of ``w`` along its last axis (module docstring)."""
    w = float_array(w, "w")
    if name not in MX_FORMATS:
        raise ValueError(f"name must be one of {sorted(MX_FORMATS)}, got {name!r}")
    fmt, block, emax = MX_FORMATS[name]
    b = _blocked(w, block, name)
    e = shared_exponent(np.max(np.abs(b), axis=-1), emax)
    scaled = np.ldexp(b.astype(np.float64), -e[..., None])          # exact: division by a power of two
    codes = formats.encode(scaled, fmt, saturate=True)
    return QuantizedTensor(codes=_pack_elements(codes, fmt, w.shape), scales=(e + 127).astype(np.uint8), zeros=None,
                           shape=w.shape, scheme=scheme or name, meta=dict(kind="mx", fmt=fmt, block=block, name=name))


def quantize_nvfp4(w: np.ndarray, *, scheme: str | None = None) -> QuantizedTensor:
    """NVFP4 quantization of ``w`` along its last axis (module docstring)."""
    w = float_array(w, "w")
    b = _blocked(w, NVFP4_BLOCK, "nvfp4")
    e2m1_max, e4m3_max = formats.get_format("fp4_e2m1").max, formats.get_format("fp8_e4m3fn").max
    amax = float(np.max(np.abs(b)))
    g = np.float32(amax / (e2m1_max * e4m3_max)) if amax > 0 else np.float32(1.0)
    if g == 0:   # amax so small that g underflows float32: store it as the smallest subnormal
        g = np.float32(np.finfo(np.float32).smallest_subnormal)
    block_amax = np.max(np.abs(b), axis=-1).astype(np.float64)
    s_codes = formats.encode(block_amax / e2m1_max / np.float64(g), "fp8_e4m3fn", saturate=True)
    s = formats.decode(s_codes, "fp8_e4m3fn").astype(np.float64) * np.float64(g)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(s[..., None] > 0, b / s[..., None], 0.0)
    codes = formats.encode(scaled, "fp4_e2m1", saturate=True)
    return QuantizedTensor(codes=_pack_elements(codes, "fp4_e2m1", w.shape), scales=s_codes, zeros=None,
                           shape=w.shape, scheme=scheme or "nvfp4",
                           meta=dict(kind="nvfp4", fmt="fp4_e2m1", block=NVFP4_BLOCK,
                                     global_scale=np.array([g], np.float32)))


def block_scales(qt: QuantizedTensor) -> np.ndarray:
    """The decoded scale of every block (float64), shape ``shape[:-1] + (n_blocks,)``."""
    if qt.kind == "mx":
        return np.ldexp(1.0, qt.scales.astype(np.int32) - 127)
    return formats.decode(qt.scales, "fp8_e4m3fn").astype(np.float64) * np.float64(qt.meta["global_scale"][0])


@register_decoder("mx")
@register_decoder("nvfp4")
def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """``V̂_i = decode(P_i) * X_block``."""
    m = qt.meta
    el = formats.decode(_unpack_elements(qt, m["fmt"]), m["fmt"]).astype(np.float64)
    el = el.reshape(qt.shape[:-1] + (-1, m["block"])) * block_scales(qt)[..., None]
    return el.reshape(qt.shape).astype(np.float32)


def error_bound(w: np.ndarray, qt: QuantizedTensor) -> np.ndarray:
    """Per-element bound: half an element ulp at ``w / X`` times X, or the saturation gap."""
    m = qt.meta
    X = np.repeat(block_scales(qt), m["block"], axis=-1)
    x = np.abs(np.asarray(w, np.float64))
    elem_max = formats.get_format(m["fmt"]).max
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(X > 0, x / X, 0.0)
        ulp = formats.error_bound(r, m["fmt"]) * X
    bound = np.where(X == 0, x, np.where(r > elem_max, x - elem_max * X, ulp))
    return bound * (1 + 2.0**-20) + x * 2.0**-23 + 2.0**-149   # + the float32 rounding of ŵ


# --- schemes (refquant.schemes) ---------------------------------------------------------------

register("mxfp4", spec=Spec(4, "float", "block", scale_dtype="e8m0"),
         description="OCP MXFP4: E2M1 elements, E8M0 scale per 32", bound=error_bound)(
    lambda w, *, calib=None: quantize_mx(w, "mxfp4"))
register("mxfp8", spec=Spec(8, "float", "block", scale_dtype="e8m0"),
         description="OCP MXFP8: E4M3 elements, E8M0 scale per 32", bound=error_bound)(
    lambda w, *, calib=None: quantize_mx(w, "mxfp8"))
register("nvfp4", spec=Spec(4, "float", "block", scale_dtype="e4m3"),
         description="NVFP4: E2M1 elements, E4M3 scale per 16, fp32 tensor scale", bound=error_bound)(
    lambda w, *, calib=None: quantize_nvfp4(w))
