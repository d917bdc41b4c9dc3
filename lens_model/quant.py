"""Block-quantised weight formats: MXFP4 (OpenAI/HF), NVFP4 and MXFP8 (ComfyUI), per-tensor FP8.

This module is the one implementation of every stored weight format, for the DiT
(:class:`lens_model.ops.QuantLinear`) and the text encoder alike. Dequantisation runs at inference
time; :func:`quantize_float8` serves the DiT's optional fp8 storage mode. The writers of the other
formats (test and benchmark files in the layouts ComfyUI / comfy-kitchen and transformers write)
live in ``tests/writers.py``.

Conventions: a weight is ``[..., out, in]`` (Linear orientation); leading dims are expert banks.
Block scales of NVFP4 and MXFP8 are stored *swizzled* in 128x4 tiles (:func:`unswizzle_scales`).
"""

from __future__ import annotations

import json

import torch

#: FP4 E2M1 code -> value. Codes 8..15 are the negated values of 0..7 (8 is -0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

#: Formats a quantised Linear layer may be stored in (ComfyUI ``comfy_quant`` names), in the DiT and
#: in the text encoder's attention projections.
LINEAR_FORMATS = ("float8_e4m3fn", "mxfp8", "nvfp4")

#: Block-quantised FP4 formats a gpt-oss expert bank may be stored in (OpenAI/HF and ComfyUI).
EXPERT_FORMATS = ("mxfp4", "nvfp4")

#: Quantisation formats this package can read: the Linear formats, and MXFP4 for expert banks.
SUPPORTED_FORMATS = LINEAR_FORMATS + tuple(f for f in EXPERT_FORMATS if f not in LINEAR_FORMATS)

#: Elements sharing one E8M0 scale in MXFP4 and MXFP8 blocks.
MX_BLOCK = 32

#: Elements sharing one E4M3 scale in NVFP4 blocks.
NVFP4_BLOCK = 16


# -- element and scale codes ------------------------------------------------------------------------
# The one decoding of each 8-bit code (E4M3, E8M0) and of the FP4 E2M1 pairs in a byte. Decoders
# that look codes up by byte use the 256-entry tables below, built from these functions and kept
# once per device.

def e4m3_to_float(bits: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 codes (uint8 bits or float8_e4m3fn) -> fp32, exactly; bytes 0x7F and 0xFF are NaN."""
    if bits.dtype == torch.uint8:
        bits = bits.contiguous().view(torch.float8_e4m3fn)
    return bits.to(torch.float32)


def e8m0_to_float(e: torch.Tensor, zero_byte_is_zero: bool = True) -> torch.Tensor:
    """E8M0 exponent bytes (uint8) -> fp32 2^(e - 127), exactly; byte 255 gives +inf.

    Built from the bits: e placed in the fp32 exponent field is 2^(e - 127) for e = 1..254. Byte 0 is
    0.0 by default, the meaning ComfyUI's MXFP8 writers give it (an all-zero block); with
    ``zero_byte_is_zero=False`` it is 2^-127 (a subnormal), as MXFP4 files from OpenAI / transformers
    read it.
    """
    bits = e.to(torch.int32) << 23
    if not zero_byte_is_zero:
        bits = torch.where(e == 0, 1 << 22, bits)
    return bits.view(torch.float32)


def _pair_table(dtype: torch.dtype, low_first: bool, device=None) -> torch.Tensor:
    """[256, 2] table: byte -> (value of element 2j, value of element 2j+1)."""
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    b = torch.arange(256, device=device)
    lo, hi = values[b & 0xF], values[b >> 4]
    pair = torch.stack((lo, hi), dim=-1) if low_first else torch.stack((hi, lo), dim=-1)
    return pair.to(dtype)


_BYTES = torch.arange(256, dtype=torch.uint8)
_CPU_TABLES: dict[tuple, torch.Tensor] = {
    ("e4m3",): e4m3_to_float(_BYTES),
    ("e8m0", True): e8m0_to_float(_BYTES, zero_byte_is_zero=True),
    ("e8m0", False): e8m0_to_float(_BYTES, zero_byte_is_zero=False),
}
_DEVICE_TABLES: dict[tuple, torch.Tensor] = {}


def _table(key: tuple, device) -> torch.Tensor:
    """The CPU table ``key`` copied once to ``device`` (and kept there)."""
    table = _CPU_TABLES[key]
    if device is None or torch.device(device).type == "cpu":
        return table
    dkey = key + (str(device),)
    t = _DEVICE_TABLES.get(dkey)
    if t is None:
        t = _DEVICE_TABLES[dkey] = table.to(device)
    return t


def e4m3_table(device=None) -> torch.Tensor:
    """[256] fp32: :func:`e4m3_to_float` of every byte, on ``device`` (default CPU)."""
    return _table(("e4m3",), device)


def e8m0_table(device=None, zero_byte_is_zero: bool = True) -> torch.Tensor:
    """[256] fp32: :func:`e8m0_to_float` of every byte, on ``device`` (default CPU)."""
    return _table(("e8m0", zero_byte_is_zero), device)


def fp4_pair_table(dtype: torch.dtype, low_first: bool, device=None) -> torch.Tensor:
    """256-entry byte -> (value of element 2j, value of element 2j+1) table, one packed word per byte.

    ``low_first``: element 2j sits in the low nibble (MXFP4) or the high nibble (NVFP4). Returns a
    1-D tensor of 256 words: int64 holding two fp32 values for ``dtype=float32``, int32 holding two
    16-bit values for bf16. ``index_select`` with the bytes (as int32) writes the values straight
    into a ``[rows, 2*cols]`` buffer viewed as words.
    """
    key = ("fp4", dtype, low_first)
    if key not in _CPU_TABLES:
        pair = _pair_table(torch.float32, low_first=low_first).to(dtype)  # [256, 2]
        word = {4: torch.int64, 2: torch.int32}[pair.element_size()]
        _CPU_TABLES[key] = pair.contiguous().view(word).reshape(256)
    return _table(key, device)


def padded_scale_shape(rows: int, cols: int) -> tuple[int, int]:
    """Swizzled storage shape ``[ceil(rows/128)*128, ceil(cols/4)*4]`` of a ``[rows, cols]`` scale matrix."""
    return -(-rows // 128) * 128, -(-cols // 4) * 4


def unswizzle_scales(scales: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Undo the 128x4-tile block-scale swizzle.

    scales: ``[..., Rp, Cp]`` or ``[..., Rp*Cp]`` (any dtype; bits are moved, never converted)
    returns: ``[..., rows, cols]``

    Logical element (r, c) sits at flat index
    ``((r//128)*(Cp/4) + c//4)*512 + (r%32)*16 + ((r%128)//32)*4 + c%4``.
    """
    rp, cp = padded_scale_shape(rows, cols)
    if scales.dim() >= 2 and tuple(scales.shape[-2:]) == (rp, cp):
        lead = scales.shape[:-2]
    elif scales.shape[-1] == rp * cp:
        lead = scales.shape[:-1]
    else:
        raise ValueError(
            f"block scales of shape {tuple(scales.shape)} do not hold a swizzled [{rows}, {cols}] matrix "
            f"(expected [..., {rp}, {cp}] or [..., {rp * cp}])"
        )
    n = len(lead)
    if scales.element_size() == 1:
        # the 4 columns of a tile slot are contiguous in both layouts: move them as one 4-byte word
        words = scales.reshape(*lead, rp * cp).view(torch.int32).reshape(*lead, rp // 128, cp // 4, 32, 4)
        perm = list(range(n)) + [n, n + 3, n + 2, n + 1]
        t = words.permute(*perm).contiguous().view(scales.dtype).reshape(*lead, rp, cp)
    else:
        t = scales.reshape(*lead, rp // 128, cp // 4, 32, 4, 4)
        perm = list(range(n)) + [n, n + 3, n + 2, n + 1, n + 4]
        t = t.permute(*perm).reshape(*lead, rp, cp)
    return t[..., :rows, :cols]


# -- MXFP4 (OpenAI / transformers) ------------------------------------------------------------------

def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 -> dense.

    blocks: uint8 ``[..., out, G, 16]`` (element 2j in the low nibble of byte j, 2j+1 in the high)
    scales: uint8 ``[..., out, G]`` E8M0 exponents (value 2^(s-127))
    returns: ``[..., out, 32*G]`` in ``dtype`` (exact in bf16 and fp32)
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} / {scales.dtype}")
    *lead, out, groups, nb = blocks.shape
    if nb != 16 or tuple(scales.shape) != (*lead, out, groups):
        raise ValueError(f"MXFP4 shapes do not match: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
    table = _pair_table(dtype, low_first=True, device=blocks.device)
    values = torch.nn.functional.embedding(blocks.to(torch.int32), table)  # [..., out, G, 16, 2]
    values = values.reshape(*lead, out, groups, 32)
    scale = e8m0_to_float(scales, zero_byte_is_zero=False).to(dtype)
    values.mul_(scale.unsqueeze(-1))
    return values.reshape(*lead, out, groups * 32)


def dequantize_nvfp4(
    weight: torch.Tensor,
    block_scales: torch.Tensor,
    global_scale: torch.Tensor,
    out_features: int,
    in_features: int,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """NVFP4 -> dense.

    weight: uint8 ``[..., out, in/2]`` (element 2j in the HIGH nibble, 2j+1 in the low nibble)
    block_scales: E4M3 scales (uint8 bits or float8_e4m3fn), swizzled ``[..., Rp, Cp]`` or flat,
        logical ``[..., out, in/16]``
    global_scale: fp32, 0-d or ``[E]`` matching the first leading dim
    returns: ``[..., out, in]`` = code value * float(block scale) * global scale, g*b formed in fp32.
    """
    if weight.dtype != torch.uint8:
        raise ValueError(f"NVFP4 weight must be uint8, got {weight.dtype}")
    *lead, out, half = weight.shape
    if out != out_features or half * 2 != in_features or in_features % 16:
        raise ValueError(
            f"NVFP4 weight of shape {tuple(weight.shape)} does not hold a [{out_features}, {in_features}] matrix"
        )
    bits = block_scales.view(torch.uint8) if block_scales.dtype != torch.uint8 else block_scales
    scale = unswizzle_scales(bits, out_features, in_features // 16)
    scale = e4m3_to_float(scale)  # [..., out, in/16]
    g = global_scale.to(device=scale.device, dtype=torch.float32)
    if g.dim() == 1 and lead:
        g = g.reshape(g.shape[0], *([1] * (len(lead) - 1 + 2)))
    elif g.numel() == 1:
        g = g.reshape(())
    scale = scale * g
    table = _pair_table(torch.float32, low_first=False, device=weight.device)
    values = torch.nn.functional.embedding(weight.to(torch.int32), table)  # [..., out, in/2, 2]
    values = values.reshape(*lead, out, in_features // 16, 16)
    values.mul_(scale.unsqueeze(-1))
    return values.reshape(*lead, out, in_features).to(dtype)


# -- MXFP8 and FP8 (ComfyUI DiT layers) -------------------------------------------------------------

def dequantize_mxfp8(
    weight: torch.Tensor, scales: torch.Tensor, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """MXFP8 -> dense.

    weight: float8_e4m3fn ``[out_p, in_p]`` (zero-padded to multiples of 32 where needed)
    scales: E8M0 exponent bytes (uint8, or float8_e8m0fnu bits), swizzled, logical ``[out_p, in_p/32]``;
        byte 0 means a scale of exactly 0
    returns: ``[out_features, in_features]`` in ``dtype`` (padding sliced off)
    """
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"MXFP8 weight must be float8_e4m3fn, got {weight.dtype}")
    out_p, in_p = weight.shape
    if in_p % MX_BLOCK or out_p < out_features or in_p < in_features:
        raise ValueError(f"MXFP8 weight of shape {tuple(weight.shape)} cannot hold [{out_features}, {in_features}]")
    bits = scales.view(torch.uint8) if scales.dtype != torch.uint8 else scales
    return dequantize_mxfp8_unswizzled(weight, unswizzle_scales(bits, out_p, in_p // MX_BLOCK), out_features,
                                       in_features, dtype)


def dequantize_mxfp8_unswizzled(
    weight: torch.Tensor,
    scales: torch.Tensor,
    out_features: int,
    in_features: int,
    dtype: torch.dtype,
    workspace=None,
) -> torch.Tensor:
    """MXFP8 -> dense, with the block scales already unswizzled (the DiT loader unswizzles once).

    weight: float8_e4m3fn ``[out_p, in_p]`` (contiguous when ``workspace`` is given);
    scales: uint8 E8M0 ``[out_p, in_p / 32]``
    workspace: a :class:`lens_model.ops.CastWorkspace` the caller holds a lease on, or None. With
        one, the result lives in its reused buffers (valid until the lease ends); fresh memory otherwise.
    returns: ``[out_features, in_features]`` in ``dtype`` (products formed in fp32, padding sliced off)
    """
    out_p, in_p = weight.shape
    if workspace is None:
        w = weight.to(torch.float32)
    else:
        w = workspace.cast(weight, torch.float32)
    w = w.view(out_p, in_p // MX_BLOCK, MX_BLOCK)
    w.mul_(e8m0_to_float(scales).unsqueeze(-1))
    w = w.view(out_p, in_p)
    if out_p != out_features or in_p != in_features:
        w = w[:out_features, :in_features]
    if workspace is None:
        return w.to(dtype)
    if dtype == torch.float32:
        return w
    return workspace.cast(w, dtype, slot=1)


def dequantize_float8(weight: torch.Tensor, scale: torch.Tensor | float | None, dtype: torch.dtype = torch.bfloat16,
                      workspace=None) -> torch.Tensor:
    """Per-tensor scaled FP8 -> dense: ``float(w) * s`` formed in fp32, cast to ``dtype`` (no scale: s = 1).

    workspace: as for :func:`dequantize_mxfp8_unswizzled` (``weight`` contiguous when given).
    """
    if workspace is None:
        w = weight.to(torch.float32, copy=True)
    else:
        w = workspace.cast(weight, torch.float32)
    if scale is not None:
        s = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale))
        w.mul_(s.to(device=w.device, dtype=torch.float32))
    if workspace is None or dtype == torch.float32:
        return w.to(dtype)
    return workspace.cast(w, dtype, slot=1)


def quantize_float8(weight: torch.Tensor, chunk_elements: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense -> (float8_e4m3fn weight of the same shape, fp32 scalar scale = amax / 448).

    Converted in row chunks of about ``chunk_elements`` elements, so the only full-size temporary is
    the fp8 result (no fp32 copy of the whole matrix): the DiT's ``weight_dtype="fp8"`` storage mode
    quantises each weight as it loads. An all-zero weight gets scale 1.
    """
    weight = weight.detach()
    amax = weight.abs().amax().to(torch.float32)
    scale = amax / 448.0 if amax > 0 else torch.ones((), dtype=torch.float32, device=weight.device)
    out = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    rows_per_chunk = max(1, chunk_elements // max(1, weight[0].numel()))
    for i in range(0, weight.shape[0], rows_per_chunk):
        chunk = weight[i:i + rows_per_chunk].to(torch.float32) / scale
        out[i:i + rows_per_chunk] = chunk.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
    return out, scale.reshape(()).to(torch.float32)


# -- comfy_quant markers ----------------------------------------------------------------------------

def parse_comfy_quant(marker: torch.Tensor) -> dict:
    """Decode a ``<layer>.comfy_quant`` tensor (the UTF-8 bytes of a JSON object) into a dict.

    Raises ValueError when it is not a JSON object with a ``format`` field.
    """
    if marker.dtype != torch.uint8 or marker.dim() != 1:
        raise ValueError(f"comfy_quant marker must be a 1-D uint8 tensor, got {marker.dtype} {tuple(marker.shape)}")
    try:
        cfg = json.loads(bytes(marker.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"comfy_quant marker is not JSON ({e})") from e
    if not isinstance(cfg, dict) or "format" not in cfg:
        raise ValueError("comfy_quant marker has no `format` field")
    return cfg


def unsupported_format_message(name: str, layer: str, fmt: str) -> str:
    return (
        f"`{name}`: layer `{layer}` uses quantisation format `{fmt}`, which this pack does not support "
        f"(supported: {', '.join(SUPPORTED_FORMATS)})."
    )


__all__ = [
    "E2M1_VALUES",
    "EXPERT_FORMATS",
    "LINEAR_FORMATS",
    "MX_BLOCK",
    "NVFP4_BLOCK",
    "SUPPORTED_FORMATS",
    "padded_scale_shape",
    "unswizzle_scales",
    "dequantize_mxfp4",
    "dequantize_nvfp4",
    "dequantize_mxfp8",
    "dequantize_mxfp8_unswizzled",
    "dequantize_float8",
    "quantize_float8",
    "parse_comfy_quant",
    "unsupported_format_message",
    "e4m3_to_float",
    "e8m0_to_float",
    "e4m3_table",
    "e8m0_table",
    "fp4_pair_table",
]

