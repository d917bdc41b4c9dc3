"""Writers for test and benchmark files: safetensors files and quantised weights in the layouts
ComfyUI / comfy-kitchen and transformers write. Not part of the ``lens_model`` package, which only
reads these formats (``lens_model.quant`` dequantises them).

Tests import this module as ``writers`` (``tests/`` is on ``sys.path`` there); ``tools/`` and
``bench/`` scripts, which need the git checkout anyway, put ``tests/`` on ``sys.path`` first.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import torch

from lens_model import quant
from lens_model.checkpoints import safetensors_dtype_name

_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` in safetensors format, one tensor at a time.

    Handles the float8 dtypes and keeps the tensors in the given order (``safetensors.torch.save_file``
    reorders them by alignment, which would hide odd file offsets from the tests that need them).
    Writes a temporary file and renames it over ``path``.
    """
    header: dict[str, object] = {}
    offset = 0
    items = []
    for key, t in tensors.items():
        try:
            st = safetensors_dtype_name(t.dtype)
        except ValueError:
            raise ValueError(f"cannot write tensor {key!r} of dtype {t.dtype}") from None
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": st, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        items.append(t)
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for t in items:
                if t.numel():
                    f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write failed


def _nearest_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (int64, 0..15) of each element of x (saturating at +-6)."""
    mag = torch.bucketize(x.abs(), _E2M1_BOUNDS.to(x.device))
    return mag | ((x < 0).to(torch.int64) << 3)


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unswizzle_scales`: ``[..., R, C]`` -> zero-padded swizzled ``[..., Rp, Cp]``."""
    *lead, rows, cols = scales.shape
    rp, cp = quant.padded_scale_shape(rows, cols)
    padded = torch.zeros(*lead, rp, cp, dtype=scales.dtype, device=scales.device)
    padded[..., :rows, :cols] = scales
    n = len(lead)
    t = padded.reshape(*lead, rp // 128, 4, 32, cp // 4, 4)
    perm = list(range(n)) + [n, n + 3, n + 2, n + 1, n + 4]
    return t.permute(*perm).reshape(*lead, rp, cp)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[..., out, in]`` (in % 32 == 0) -> (blocks uint8 ``[..., out, in/32, 16]``, scales uint8).

    Scale per 32-block is 2^(floor(log2 amax) - 2); codes are the nearest E2M1 value.
    """
    *lead, out, inp = weight.shape
    if inp % 32:
        raise ValueError(f"MXFP4 needs in_features % 32 == 0, got {inp}")
    w = weight.detach().float().reshape(*lead, out, inp // 32, 32)
    amax = w.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-38))) - 2, torch.zeros_like(amax))
    e = (exp + 127).clamp(0, 254)
    codes = _nearest_e2m1(w / torch.exp2(e - 127).unsqueeze(-1))
    pairs = codes.reshape(*lead, out, inp // 32, 16, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return blocks, e.to(torch.uint8)




# -- NVFP4 (ComfyUI / comfy-kitchen) ----------------------------------------------------------------


def quantize_nvfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense ``[E, out, in]`` -> (weight uint8 ``[E, out, in/2]``, swizzled E4M3 scale bits uint8
    ``[E, Rp, Cp]``, global scale fp32 ``[E]``), following comfy-kitchen's writer:
    g = amax / (6*448), b = e4m3(block_amax / (6*g)) capped at 448, codes = nearest(x / (g*b)).
    """
    e, out, inp = weight.shape
    if inp % 16:
        raise ValueError(f"NVFP4 needs in_features % 16 == 0, got {inp}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=(1, 2))
    g = torch.where(amax > 0, amax / (6.0 * 448.0), torch.ones_like(amax))
    blocks = w.reshape(e, out, inp // 16, 16)
    bamax = blocks.abs().amax(dim=-1)
    b = (bamax / (6.0 * g.view(e, 1, 1))).clamp(max=448.0).to(torch.float8_e4m3fn)
    denom = b.float() * g.view(e, 1, 1)
    x = torch.where(denom.unsqueeze(-1) > 0, blocks / denom.clamp_min(1e-30).unsqueeze(-1), torch.zeros_like(blocks))
    codes = _nearest_e2m1(x).reshape(e, out, inp // 2, 2)
    packed = ((codes[..., 0] << 4) | codes[..., 1]).to(torch.uint8)
    scales = swizzle_scales(b.view(torch.uint8))
    return packed, scales, g.to(torch.float32)


def quantize_mxfp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[out, in]`` -> (float8_e4m3fn weight zero-padded to multiples of 32, swizzled uint8 E8M0
    scales), following comfy-kitchen's writer: e = 127 + smallest k with block_amax <= 448*2^k,
    clamped to 0..254; all-zero blocks get e = 0. For tests and benchmarks.
    """
    out, inp = weight.shape
    out_p, in_p = -(-out // 32) * 32, -(-inp // 32) * 32
    w = torch.zeros(out_p, in_p, dtype=torch.float32)
    w[:out, :inp] = weight.detach().float()
    blocks = w.reshape(out_p, in_p // 32, 32)
    amax = blocks.abs().amax(dim=-1)
    k = torch.ceil(torch.log2(amax.clamp_min(1e-38) / 448.0))
    e = torch.where(amax > 0, (k + 127).clamp(0, 254), torch.zeros_like(amax))
    scale = torch.exp2(e - 127.0)
    q = (blocks / scale.unsqueeze(-1)).clamp(-448.0, 448.0)
    q = torch.where(amax.unsqueeze(-1) > 0, q, torch.zeros_like(q))
    return q.reshape(out_p, in_p).to(torch.float8_e4m3fn), swizzle_scales(e.to(torch.uint8))


def comfy_quant_tensor(cfg: dict) -> torch.Tensor:
    """Encode a marker dict the way ComfyUI writes it (default JSON spacing)."""
    return torch.tensor(list(json.dumps(cfg).encode("utf-8")), dtype=torch.uint8)
