"""Lens DiT (``LensTransformer2DModel``): a dual-stream MMDiT in the Qwen-Image style.

Pure PyTorch reimplementation of Microsoft Lens ``transformer.py`` @ 5bf0f0c. The
image and text streams keep separate weights and meet only in joint attention. Submodule names equal
the checkpoint keys (``img_in``, ``txt_norm.{k}``, ``transformer_blocks.{i}.attn.img_qkv``,
``img_mod.1``, ``norm_out.linear``, ...), so diffusers and ComfyUI state dicts load without renaming.

Public entry points:

- :class:`LensDiTConfig` - hyper-parameters, from a diffusers ``config.json`` or from key shapes.
- :class:`LensTransformer` - ``model(x [B,128,h,w], sigma [B], context [B,S,4E], mask [B,S])``.
- Loading (:func:`load_transformer`, :func:`inspect_transformer`, :func:`variant_defaults_for`) is in
  :mod:`lens_model.dit_loading`; those names are re-exported here for existing callers.

Numerics: RMSNorm / LayerNorm statistics, the RoPE rotation and the sinusoid
arguments are computed in fp32; everything else runs in the compute dtype (the weight dtype, or fp32
for bf16 weights on CPUs without a native bf16 matmul, see :func:`precision.compute_dtype_for`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from . import quant
from .constants import (
    CAPTURED_LAYERS, LATENT_CHANNELS, QK_NORM_EPS, TEXT_HIDDEN_SIZE, VAE_LATENT_CHANNELS, VARIANT_DEFAULTS,
)
from .precision import compute_dtype_for

logger = logging.getLogger(__name__)

#: Bytes of fp32 attention scores above which CPU attention runs in query chunks when the selected
#: SDPA backend would materialise the full matrix (the math path).
CPU_ATTENTION_CHUNK_BYTES = 256 * 1024 * 1024


# =================================================================================================
# Configuration
# =================================================================================================

@dataclass
class LensDiTConfig:
    """Hyper-parameters of the Lens DiT. Defaults are the full 4.1 B model."""

    num_layers: int = 48
    num_attention_heads: int = 24
    attention_head_dim: int = 64
    in_channels: int = LATENT_CHANNELS
    out_channels: int = VAE_LATENT_CHANNELS
    enc_hidden_dim: int = TEXT_HIDDEN_SIZE
    num_text_layers: int = len(CAPTURED_LAYERS)
    mlp_hidden: int | None = None  # None -> int(inner_dim / 3 * 8), upstream's GateMLP width
    axes_dims_rope: tuple[int, int, int] = (8, 28, 28)
    rope_theta: float = 10000.0
    qk_norm_eps: float = QK_NORM_EPS["upstream"]
    time_embed_dim: int = 256
    patch_size: int = 2
    selected_layer_index: tuple[int, ...] = field(default=CAPTURED_LAYERS)

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(int(d) for d in self.axes_dims_rope)
        self.selected_layer_index = tuple(int(i) for i in self.selected_layer_index)
        if self.mlp_hidden is None:
            self.mlp_hidden = int(self.inner_dim / 3 * 8)
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim {self.attention_head_dim}"
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be even")

    @property
    def inner_dim(self) -> int:
        """Model width D = heads x head_dim (a config's ``inner_dim`` field is ignored)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def proj_out_dim(self) -> int:
        return self.patch_size * self.patch_size * self.out_channels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "LensDiTConfig":
        """From a diffusers ``transformer/config.json`` dict. ``inner_dim`` is ignored (the width is always heads x head_dim)."""
        kw: dict = {}
        for name in (
            "num_layers",
            "num_attention_heads",
            "attention_head_dim",
            "in_channels",
            "out_channels",
            "enc_hidden_dim",
            "patch_size",
        ):
            if config.get(name) is not None:
                kw[name] = int(config[name])
        if config.get("axes_dims_rope") is not None:
            kw["axes_dims_rope"] = tuple(config["axes_dims_rope"])
        if config.get("selected_layer_index") is not None:
            kw["selected_layer_index"] = tuple(config["selected_layer_index"])
            kw["num_text_layers"] = len(config["selected_layer_index"])
        for flag in ("gate_mlp", "rms_norm", "multi_layer_encoder_feature"):
            if config.get(flag) is False:
                raise ValueError(f"config.json sets {flag}=false; only the published Lens configuration (true) exists")
        return cls(**kw)

    @classmethod
    def from_state_dict_shapes(cls, shapes: dict[str, Sequence[int]]) -> "LensDiTConfig":
        """Infer the configuration from bare key -> shape.

        For MXFP8 layers (a ``<layer>.weight_scale`` key is present) the stored weight may be padded
        to multiples of 32; the MLP width then follows upstream's rule int(D / 3 * 8).
        """
        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise KeyError(key)
            return tuple(int(s) for s in shapes[key])

        head_dim = shape("transformer_blocks.0.attn.norm_q.weight")[0]
        inner = shape("img_in.weight")[0]
        if inner % head_dim:
            raise ValueError(f"img_in width {inner} is not a multiple of head_dim {head_dim}")
        in_channels = shape("img_in.weight")[1]
        pat = re.compile(r"^transformer_blocks\.(\d+)\.")
        layers = {int(m.group(1)) for k in shapes if (m := pat.match(k))}
        num_layers = max(layers) + 1 if layers else 0
        k_pat = re.compile(r"^txt_norm\.(\d+)\.weight$")
        num_text = len({int(m.group(1)) for k in shapes if (m := k_pat.match(k))})
        enc = shape("txt_norm.0.weight")[0]
        mlp = shape("transformer_blocks.0.img_mlp.w1.weight")[0]
        if "transformer_blocks.0.img_mlp.w1.weight_scale" in shapes:
            rule = int(inner / 3 * 8)
            if -(-rule // quant.MX_BLOCK) * quant.MX_BLOCK == mlp:
                mlp = rule
        proj = shape("proj_out.weight")[0]
        t_dim = shape("time_text_embed.timestep_embedder.linear_1.weight")[1]
        cfg = cls(
            num_layers=num_layers,
            num_attention_heads=inner // head_dim,
            attention_head_dim=head_dim,
            in_channels=in_channels,
            out_channels=proj // 4,
            enc_hidden_dim=enc,
            num_text_layers=num_text,
            mlp_hidden=mlp,
            time_embed_dim=t_dim,
        )
        return cfg

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every state-dict key of this configuration with its shape (16 + 26 * L keys)."""
        d, e, f, hd = self.inner_dim, self.enc_hidden_dim, self.mlp_hidden, self.attention_head_dim
        s: dict[str, tuple[int, ...]] = {
            "img_in.weight": (d, self.in_channels),
            "img_in.bias": (d,),
            "txt_in.weight": (d, e * self.num_text_layers),
            "txt_in.bias": (d,),
            "time_text_embed.timestep_embedder.linear_1.weight": (d, self.time_embed_dim),
            "time_text_embed.timestep_embedder.linear_1.bias": (d,),
            "time_text_embed.timestep_embedder.linear_2.weight": (d, d),
            "time_text_embed.timestep_embedder.linear_2.bias": (d,),
            "norm_out.linear.weight": (2 * d, d),
            "norm_out.linear.bias": (2 * d,),
            "proj_out.weight": (self.proj_out_dim, d),
            "proj_out.bias": (self.proj_out_dim,),
        }
        for k in range(self.num_text_layers):
            s[f"txt_norm.{k}.weight"] = (e,)
        for i in range(self.num_layers):
            p = f"transformer_blocks.{i}."
            for name in ("img_qkv", "txt_qkv"):
                s[p + f"attn.{name}.weight"] = (3 * d, d)
                s[p + f"attn.{name}.bias"] = (3 * d,)
            for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                s[p + f"attn.{name}.weight"] = (hd,)
            for name in ("to_out.0", "to_add_out"):
                s[p + f"attn.{name}.weight"] = (d, d)
                s[p + f"attn.{name}.bias"] = (d,)
            for name in ("img_mod.1", "txt_mod.1"):
                s[p + f"{name}.weight"] = (6 * d, d)
                s[p + f"{name}.bias"] = (6 * d,)
            for name in ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2"):
                s[p + f"{name}.weight"] = (d,)
            for stream in ("img_mlp", "txt_mlp"):
                s[p + f"{stream}.w1.weight"] = (f, d)
                s[p + f"{stream}.w3.weight"] = (f, d)
                s[p + f"{stream}.w2.weight"] = (d, f)
        return s


# =================================================================================================
# Positions, RoPE, timestep embedding
# =================================================================================================

def rope_positions(h: int, w: int, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame, y, x) positions of the image and text tokens (3-axis RoPE, image grid centred on 0).

    Image token n = r*w + c gets (0, r - ceil(h/2), c - ceil(w/2)); text token k gets
    max(h//2, w//2) + k on all three axes.

    returns: image int64 [h*w, 3], text int64 [text_len, 3]
    """
    ys = torch.arange(h, dtype=torch.int64) - (h - h // 2)
    xs = torch.arange(w, dtype=torch.int64) - (w - w // 2)
    img = torch.stack(
        (torch.zeros(h * w, dtype=torch.int64), ys.repeat_interleave(w), xs.repeat(h)), dim=-1
    )
    start = max(h // 2, w // 2)
    txt = (start + torch.arange(text_len, dtype=torch.int64)).unsqueeze(-1).expand(text_len, 3).contiguous()
    return img, txt


def rope_frequencies(
    positions: torch.Tensor, axes_dims: Sequence[int], theta: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """Unit complex rotations for interleaved-pair RoPE.

    positions: int [L, 3] (frame, y, x)
    returns: complex64 [L, sum(axes_dims) / 2]; pair m of the head channels uses the axis it belongs
    to (pairs 0..3 frame, 4..17 height, 18..31 width for (8, 28, 28)). Exponent, power, reciprocal
    and angles are fp32 as upstream (``1 / theta ** (arange(0, d, 2) / d)``, outer product).
    """
    positions = positions.to(device=device)
    angles = []
    for axis, d in enumerate(axes_dims):
        omega = 1.0 / torch.pow(theta, torch.arange(0, d, 2, device=positions.device).to(torch.float32).div(d))
        angles.append(torch.outer(positions[:, axis].to(torch.float32), omega))
    ang = torch.cat(angles, dim=1)
    return torch.polar(torch.ones_like(ang), ang)


def timestep_embedding(sigma: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Cos-first sinusoid of 1000*sigma (the cos half, then the sin half).

    sigma: [B] (already rounded to the DiT dtype) -> fp32 [B, dim]; args (sigma_fp32 * f_j) * 1000.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=sigma.device) / half
    freqs = torch.exp(exponent)
    args = sigma.to(torch.float32)[:, None] * freqs[None, :]
    args = args * 1000.0
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


def rms_factor(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2, last dim) + eps) in fp32, shape [..., 1].

    One reduction pass (``vector_norm`` accumulates in fp32 even for bf16 input, without an fp32
    copy of x); ~6x faster on CPU than ``x.square().mean(-1)`` over 64-wide heads.
    """
    n = x.shape[-1]
    ss = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return ss.square_().div_(n).add_(eps).rsqrt_()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """fp32 RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * weight. Returns fp32."""
    y = x.to(torch.float32) * rms_factor(x, eps)
    if weight is not None:
        y.mul_(weight.to(torch.float32))
    return y


def _modulated_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """RMSNorm(x; weight, eps) * (1 + scale) + shift, computed in fp32, cast to ``dtype``.

    x: [B, L, D]; weight: [D]; scale, shift: [B, 1, D]
    """
    wmod = weight.to(torch.float32) * (1.0 + scale.to(torch.float32))
    y = x.to(torch.float32) * rms_factor(x, eps)
    y.mul_(wmod).add_(shift.to(torch.float32))
    return y.to(dtype)


# =================================================================================================
# Modules (names = checkpoint keys)
# =================================================================================================

class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale ``weight`` [dim]; statistics in fp32; returns the input dtype."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """``time_text_embed.timestep_embedder``: linear_2(SiLU(linear_1(e)))."""

    def __init__(self, in_dim: int, dim: int, operations: ops.Operations, **kw) -> None:
        super().__init__()
        self.linear_1 = operations.Linear(in_dim, dim, **kw)
        self.linear_2 = operations.Linear(dim, dim, **kw)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(e)))


class TimeTextEmbed(nn.Module):
    def __init__(self, in_dim: int, dim: int, operations: ops.Operations, **kw) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.timestep_embedder = TimestepEmbedder(in_dim, dim, operations, **kw)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """sigma: [B] (already in the DiT dtype) -> temb [B, D] in ``dtype``."""
        return self.timestep_embedder(timestep_embedding(sigma, self.in_dim).to(dtype))


class GateMLP(nn.Module):
    """SwiGLU without biases: w2(SiLU(w1 u) * w3 u)."""

    def __init__(self, dim: int, hidden: int, operations: ops.Operations, **kw) -> None:
        super().__init__()
        self.w1 = operations.Linear(dim, hidden, bias=False, **kw)
        self.w2 = operations.Linear(hidden, dim, bias=False, **kw)
        self.w3 = operations.Linear(dim, hidden, bias=False, **kw)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        a = self.w1(u)
        b = self.w3(u)
        a = F.silu(a, inplace=True)
        a.mul_(b)
        del b
        return self.w2(a)


class AdaLayerNormOut(nn.Module):
    """``norm_out``: (scale, shift) = linear(SiLU(temb)), scale first; LayerNorm(x, eps 1e-6)."""

    def __init__(self, dim: int, operations: ops.Operations, eps: float = 1e-6, **kw) -> None:
        super().__init__()
        self.eps = eps
        self.linear = operations.Linear(dim, 2 * dim, **kw)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D]; temb: [B, D] -> [B, N, D] in x's dtype."""
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=-1)
        xf = F.layer_norm(x.to(torch.float32), (x.shape[-1],), eps=self.eps)
        xf.mul_(1.0 + scale.to(torch.float32).unsqueeze(1)).add_(shift.to(torch.float32).unsqueeze(1))
        return xf.to(x.dtype)


class LensJointAttention(nn.Module):
    """Joint image+text attention with separate projections per stream."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_eps: float, operations: ops.Operations, **kw) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.img_qkv = operations.Linear(dim, 3 * heads * head_dim, **kw)
        self.txt_qkv = operations.Linear(dim, 3 * heads * head_dim, **kw)
        self.norm_q = RMSNorm(head_dim, qk_eps, **kw)
        self.norm_k = RMSNorm(head_dim, qk_eps, **kw)
        self.norm_added_q = RMSNorm(head_dim, qk_eps, **kw)
        self.norm_added_k = RMSNorm(head_dim, qk_eps, **kw)
        self.to_out = nn.ModuleList([operations.Linear(heads * head_dim, dim, **kw), nn.Identity()])
        self.to_add_out = operations.Linear(heads * head_dim, dim, **kw)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        freqs: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, N, D] image, c: [B, S, D] text (both modulated, compute dtype);
        freqs: complex64 [N + S, head_dim / 2] (image rows first); mask: additive [B, 1, 1, N + S] or None.

        returns: (image out [B, N, D], text out [B, S, D])
        """
        bsz, n, _ = x.shape
        s = c.shape[1]
        heads, hd = self.heads, self.head_dim
        dtype = x.dtype
        qkv_i = self.img_qkv(x).view(bsz, n, 3, heads, hd)
        qkv_t = self.txt_qkv(c).view(bsz, s, 3, heads, hd) if s else None

        # q and k of both streams in one fp32 buffer [B, L, 2, H, hd]: RMSNorm + RoPE in fp32.
        if s:
            qk = torch.cat((qkv_i[:, :, :2], qkv_t[:, :, :2]), dim=1).to(torch.float32)
        else:
            qk = qkv_i[:, :, :2].to(torch.float32, copy=True)
        qk.mul_(rms_factor(qk, self.norm_q.eps))
        w_img = torch.stack((self.norm_q.weight, self.norm_k.weight)).to(torch.float32).view(2, 1, hd)
        qk[:, :n].mul_(w_img)
        if s:
            w_txt = torch.stack((self.norm_added_q.weight, self.norm_added_k.weight)).to(torch.float32).view(2, 1, hd)
            qk[:, n:].mul_(w_txt)
        qk_c = torch.view_as_complex(qk.view(bsz, n + s, 2, heads, hd // 2, 2))
        qk_c.mul_(freqs.view(1, n + s, 1, 1, hd // 2))
        if dtype != torch.float32:
            qk = qk.to(dtype)
        q = qk[:, :, 0].transpose(1, 2)  # [B, H, L, hd]
        k = qk[:, :, 1].transpose(1, 2)
        v = (torch.cat((qkv_i[:, :, 2], qkv_t[:, :, 2]), dim=1) if s else qkv_i[:, :, 2]).transpose(1, 2)
        del qkv_i, qkv_t

        out = attention(q, k, v, mask)  # [B, H, L, hd]
        del q, k, v, qk
        out = out.transpose(1, 2).reshape(bsz, n + s, heads * hd)
        img_out = self.to_out[0](out[:, :n])
        txt_out = self.to_add_out(out[:, n:]) if s else c.new_zeros(bsz, 0, c.shape[-1])
        return img_out, txt_out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention, scale 1/sqrt(head_dim); q, k, v [B, H, L, hd] -> [B, H, L, hd].

    On CPU, when the chosen SDPA backend would materialise the full [B, H, L, L] score matrix (the
    math path) and that matrix exceeds :data:`CPU_ATTENTION_CHUNK_BYTES`, queries run in chunks.
    """
    if q.device.type == "cpu":
        bsz, heads, lq, _ = q.shape
        lk = k.shape[2]
        score_bytes = 4 * bsz * heads * lq * lk
        if score_bytes > CPU_ATTENTION_CHUNK_BYTES and _sdpa_is_math(q, k, v, mask):
            step = max(1, CPU_ATTENTION_CHUNK_BYTES // (4 * bsz * heads * lk))
            out = torch.empty_like(q)
            for i in range(0, lq, step):
                out[:, :, i:i + step] = F.scaled_dot_product_attention(q[:, :, i:i + step], k, v, attn_mask=mask)
            return out
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _sdpa_is_math(q, k, v, mask) -> bool:
    """True when PyTorch would use the (unfused) math SDPA path for these inputs."""
    try:
        return int(torch._fused_sdp_choice(q, k, v, attn_mask=mask)) == 0
    except Exception:  # private API: assume the worst and chunk
        return True


def sdpa_backend_name(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> str:
    """Name of the SDPA backend PyTorch picks for these inputs (for logs and benchmarks)."""
    names = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}
    try:
        return names.get(int(torch._fused_sdp_choice(q, k, v, attn_mask=mask)), "unknown")
    except Exception:
        return "unknown"


class LensTransformerBlock(nn.Module):
    """One dual-stream block: per stream, modulated RMSNorm, joint attention and a gated MLP."""

    def __init__(self, cfg: LensDiTConfig, operations: ops.Operations, **kw) -> None:
        super().__init__()
        d = cfg.inner_dim
        self.eps = 1e-6
        self.attn = LensJointAttention(d, cfg.num_attention_heads, cfg.attention_head_dim, cfg.qk_norm_eps, operations, **kw)
        self.img_mod = nn.Sequential(nn.SiLU(), operations.Linear(d, 6 * d, **kw))
        self.img_norm1 = RMSNorm(d, self.eps, **kw)
        self.img_norm2 = RMSNorm(d, self.eps, **kw)
        self.img_mlp = GateMLP(d, cfg.mlp_hidden, operations, **kw)
        self.txt_mod = nn.Sequential(nn.SiLU(), operations.Linear(d, 6 * d, **kw))
        self.txt_norm1 = RMSNorm(d, self.eps, **kw)
        self.txt_norm2 = RMSNorm(d, self.eps, **kw)
        self.txt_mlp = GateMLP(d, cfg.mlp_hidden, operations, **kw)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, N, D], c: [B, S, D], temb: [B, D] -> (c, x) updated. x and c are updated in place."""
        dtype = x.dtype
        s = c.shape[1]
        m_img = self.img_mod(temb).unsqueeze(1).chunk(6, dim=-1)  # shift1, scale1, gate1, shift2, scale2, gate2
        x_mod = _modulated_rms_norm(x, self.img_norm1.weight, m_img[1], m_img[0], self.eps, dtype)
        if s:
            m_txt = self.txt_mod(temb).unsqueeze(1).chunk(6, dim=-1)
            c_mod = _modulated_rms_norm(c, self.txt_norm1.weight, m_txt[1], m_txt[0], self.eps, dtype)
        else:
            c_mod = c
        img_attn, txt_attn = self.attn(x_mod, c_mod, freqs, mask)
        del x_mod, c_mod
        x.addcmul_(img_attn, m_img[2])
        del img_attn
        h = self.img_mlp(_modulated_rms_norm(x, self.img_norm2.weight, m_img[4], m_img[3], self.eps, dtype))
        x.addcmul_(h, m_img[5])
        del h
        if s:
            c.addcmul_(txt_attn, m_txt[2])
            h = self.txt_mlp(_modulated_rms_norm(c, self.txt_norm2.weight, m_txt[4], m_txt[3], self.eps, dtype))
            c.addcmul_(h, m_txt[5])
        return c, x


class LensTransformer(nn.Module):
    """The Lens DiT.

    ``model(x, timestep, context, context_mask)``:

    - x: [B, 128, h, w] packed latents (token n = r*w + c, channel order of the VAE packing)
    - timestep: [B] sigma in [0, 1] (not x1000)
    - context: [B, S, 4E] layer-major text features (index l*E + e), or a list of 4 [B, S, E]
    - context_mask: [B, S] bool / int, 1 = real token (None = all real); S may be 0
    - returns: velocity v = noise - x0, [B, 128, h, w], in x's dtype

    Attributes: ``config`` (:class:`LensDiTConfig`), ``variant_defaults`` (set by the loader),
    ``compute_dtype`` (None = derived from the weight dtype and device), ``cast_workspace`` (the
    :class:`ops.CastWorkspace` its layers cast bf16 / quantised weights into when the compute dtype
    differs; see :meth:`attach_cast_workspace`).
    """

    def __init__(
        self,
        config: LensDiTConfig,
        operations: ops.Operations | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        operations = operations or ops.default_operations
        kw = {"dtype": dtype, "device": device}
        self.config = config
        d = config.inner_dim
        self.time_text_embed = TimeTextEmbed(config.time_embed_dim, d, operations, **kw)
        self.txt_norm = nn.ModuleList([RMSNorm(config.enc_hidden_dim, 1e-5, **kw) for _ in range(config.num_text_layers)])
        self.txt_in = operations.Linear(config.enc_hidden_dim * config.num_text_layers, d, **kw)
        self.img_in = operations.Linear(config.in_channels, d, **kw)
        self.transformer_blocks = nn.ModuleList(
            [LensTransformerBlock(config, operations, **kw) for _ in range(config.num_layers)]
        )
        self.norm_out = AdaLayerNormOut(d, operations, **kw)
        self.proj_out = operations.Linear(d, config.proj_out_dim, **kw)
        self.variant_defaults: dict = dict(VARIANT_DEFAULTS["lens"])
        self.compute_dtype: torch.dtype | None = None
        self.source_identity: tuple | None = None
        self.cast_workspace = ops.CastWorkspace()
        self.attach_cast_workspace()

    def attach_cast_workspace(self) -> None:
        """Hand :attr:`cast_workspace` to every ops layer and size it to the largest weight.

        Called at construction; call again after replacing layers (the loader does, after
        installing :class:`ops.QuantLinear` layers). Layers without it cast into fresh memory.
        """
        largest = 0
        for m in self.modules():
            if isinstance(m, (ops.Linear, ops.QuantLinear)):
                m.cast_workspace = self.cast_workspace
                largest = max(largest, m.weight.numel())
        self.cast_workspace.reserve(largest)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .float() ...: buffers on the old device or in the old dtype are stale
        self.cast_workspace.clear()
        return super()._apply(fn, recurse)

    # -- dtype / device -------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """Nominal DiT dtype: the dtype of the (never quantised) norm weights."""
        return self.txt_norm[0].weight.dtype if len(self.txt_norm) else self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.txt_norm[0].weight.device if len(self.txt_norm) else self.img_in.weight.device

    def resolved_compute_dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return compute_dtype_for(self.dtype, self.device)

    # -- forward --------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor | Sequence[torch.Tensor],
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, 128, h, w] -> velocity [B, 128, h, w] (see class docstring)."""
        bsz, ch, h, w = x.shape
        tokens = x.reshape(bsz, ch, h * w).transpose(1, 2)
        out = self.forward_tokens(tokens, timestep, context, context_mask, (h, w))
        return out.transpose(1, 2).reshape(bsz, -1, h, w)

    @torch.no_grad()
    def forward_tokens(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | Sequence[torch.Tensor],
        encoder_mask: torch.Tensor | None,
        grid_hw: tuple[int, int] | Sequence[int] | torch.Tensor,
    ) -> torch.Tensor:
        """Token-layout forward (the golden ``dit_cases`` layout).

        hidden_states: [B, N, 128], N = h*w row-major; timestep: [B] sigma;
        encoder_hidden_states: list of K [B, S, E] or one [B, S, K*E] layer-major;
        encoder_mask: [B, S] (1 = real) or None; grid_hw: (h, w)
        returns: [B, N, 128] in hidden_states' dtype
        """
        cfg = self.config
        h, w = (int(v) for v in (grid_hw.tolist() if isinstance(grid_hw, torch.Tensor) else grid_hw))
        bsz, n, _ = hidden_states.shape
        if n != h * w:
            raise ValueError(f"hidden_states has {n} tokens but grid_hw {(h, w)} needs {h * w}")
        device = self.device
        cdt = self.resolved_compute_dtype()
        out_dtype = hidden_states.dtype

        feats, encoder_mask, txt_index = self._text_tokens(encoder_hidden_states, encoder_mask, bsz)
        s = feats.shape[1]

        x = self.img_in(hidden_states.to(device=device, dtype=cdt))
        sigma = torch.as_tensor(timestep).to(device=device).reshape(-1)
        if sigma.numel() == 1 and bsz > 1:
            sigma = sigma.expand(bsz)
        elif sigma.numel() != bsz:
            raise ValueError(f"timestep has {sigma.numel()} values; expected 1 or {bsz} (one sigma per sample)")
        sigma = sigma.to(self.dtype)  # upstream rounds sigma to the DiT dtype before embedding it

        if s:
            tn = torch.stack([m.weight for m in self.txt_norm]).to(torch.float32)  # [K, E]
            c = rms_norm(feats.to(device=device), None, 1e-5).mul_(tn).to(cdt)
            c = self.txt_in(c.reshape(bsz, s, -1))
        else:
            c = x.new_zeros(bsz, 0, cfg.inner_dim)
        temb = self.time_text_embed(sigma, cdt)

        img_pos, txt_pos = rope_positions(h, w, 0 if txt_index is not None else s)
        if txt_index is not None:
            txt_pos = (max(h // 2, w // 2) + txt_index.cpu()).unsqueeze(-1).expand(-1, 3)
        freqs = rope_frequencies(torch.cat((img_pos, txt_pos)), cfg.axes_dims_rope, cfg.rope_theta, device)

        mask = None
        if encoder_mask is not None:
            valid = torch.cat((torch.ones(bsz, n, dtype=torch.bool, device=device), encoder_mask), dim=1)
            mask = torch.zeros(bsz, 1, 1, n + s, dtype=cdt, device=device)
            mask.masked_fill_(~valid.view(bsz, 1, 1, n + s), float("-inf"))

        for block in self.transformer_blocks:
            c, x = block(x, c, temb, freqs, mask)
        del c
        x = self.norm_out(x, temb)
        return self.proj_out(x).to(out_dtype)

    def _text_tokens(
        self, encoder_hidden_states: torch.Tensor | Sequence[torch.Tensor], encoder_mask: torch.Tensor | None, bsz: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The text stream of :meth:`forward_tokens`: ``(feats [B, S, K, E], mask [B, S] bool or None,
        txt_index [S] or None)``.

        A mask that keeps every token is dropped (None). With one sample, masked text tokens are
        removed instead: they cannot influence anything that is kept (image keys are always valid,
        masked keys get weight exp(-inf) = 0), and ``txt_index`` holds the original positions of the
        remaining ones (their RoPE positions).
        """
        feats = self._stack_text(encoder_hidden_states, bsz)
        s = feats.shape[1]
        if encoder_mask is None:
            return feats, None, None
        if tuple(encoder_mask.shape) != (bsz, s):
            raise ValueError(f"encoder_mask must have shape {(bsz, s)}, got {tuple(encoder_mask.shape)}")
        encoder_mask = encoder_mask.to(device=self.device).bool()
        if bool(encoder_mask.all()):
            return feats, None, None
        if bsz != 1:
            return feats, encoder_mask, None
        txt_index = encoder_mask[0].nonzero().squeeze(-1)
        return feats[:, txt_index.to(feats.device)], None, txt_index

    def _stack_text(self, feats: torch.Tensor | Sequence[torch.Tensor], bsz: int) -> torch.Tensor:
        """-> [B, S, K, E] from a list of K [B, S, E] or a [B, S, K*E] layer-major tensor."""
        cfg = self.config
        k, e = cfg.num_text_layers, cfg.enc_hidden_dim
        if isinstance(feats, (list, tuple)):
            if len(feats) != k:
                raise ValueError(f"expected {k} text feature layers, got {len(feats)}")
            for i, f in enumerate(feats):
                if f.dim() != 3 or f.shape[0] != bsz or f.shape[-1] != e or f.shape[1] != feats[0].shape[1]:
                    raise ValueError(
                        f"text feature layer {i} has shape {tuple(f.shape)}; expected [{bsz}, S, {e}] for every layer"
                    )
            return torch.stack(list(feats), dim=2)
        if feats is None:
            return torch.zeros(bsz, 0, k, e)
        if feats.dim() != 3 or feats.shape[0] != bsz or feats.shape[-1] != k * e:
            raise ValueError(f"context has shape {tuple(feats.shape)}; expected [{bsz}, S, {k * e}] (layer-major)")
        return feats.view(bsz, feats.shape[1], k, e)


__all__ = [
    "LensDiTConfig",
    "LensTransformer",
    "rope_positions",
    "rope_frequencies",
    "timestep_embedding",
    "VARIANT_DEFAULTS",
]
