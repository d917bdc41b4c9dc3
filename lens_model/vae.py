"""FLUX.2 VAE (BFL "ae", diffusers ``AutoencoderKLFlux2``) in plain PyTorch: config, modules, forward.

A standard LDM/SD-style KL autoencoder with 32 latent channels and x8 down/up-sampling, plus a
non-affine BatchNorm over the 2x2-patchified latent (128 channels, x16 overall). Lens works in the
BN-normalised, patchified space.

- Key layout: **BFL** (``encoder.down.{i}.block.{j}``, nested ``encoder.quant_conv`` /
  ``decoder.post_quant_conv``, attention projections as 1x1 convs ``[C, C, 1, 1]``). The submodule
  names equal these key names, so a BFL file loads without renaming; other layouts are converted,
  and files checked and loaded, in :mod:`lens_model.vae_loading`.
- :class:`Flux2VAE` ``.encode(images [B, H, W, 3] in 0..1) -> [B, 128, H/16, W/16]`` (posterior mean,
  BN-normalised) and ``.decode(latents [B, 128, h, w]) -> [B, 16h, 16w, 3]`` float32 in [0, 1] on the
  CPU. Both run the untiled passes (:meth:`Flux2VAE.encode_pass` / :meth:`Flux2VAE.decode_pass`)
  through :mod:`lens_model.vae_tiling`, which tiles with feathered blending, reports
  ``callback(done, total)`` after every tile / sample or block, and retries in tiles after a CUDA
  out-of-memory error.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vae_tiling import OnBlock, ProgressCallback, TileArg, Tiling, passes_per_unit


__all__ = [
    "Flux2VAEConfig",
    "Flux2VAE",
    "Encoder",
    "Decoder",
    "patchify",
    "unpatchify",
]

GN_EPS = 1e-6


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass
class Flux2VAEConfig:
    """Hyper-parameters of the FLUX.2 VAE (defaults = the published FLUX.2 VAE).

    ``layers_per_block`` is the encoder's resnet count per level; the decoder has one more.
    ``decoder_block_out_channels`` is None when the decoder uses ``block_out_channels`` (reversed in
    execution order, as in diffusers).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = (2, 2)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if self.decoder_block_out_channels is not None:
            self.decoder_block_out_channels = tuple(int(c) for c in self.decoder_block_out_channels)
            if len(self.decoder_block_out_channels) != len(self.block_out_channels):
                raise ValueError(
                    f"decoder_block_out_channels {self.decoder_block_out_channels} must have as many levels as "
                    f"block_out_channels {self.block_out_channels}."
                )
        ps = self.patch_size
        self.patch_size = (int(ps), int(ps)) if isinstance(ps, int) else tuple(int(p) for p in ps)

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def bn_channels(self) -> int:
        """Channels of the patchified latent (128 for FLUX.2)."""
        return self.latent_channels * self.patch_size[0] * self.patch_size[1]

    @property
    def downscale(self) -> int:
        """Pixels per patchified latent cell along one side (16 for FLUX.2)."""
        return 2 ** (self.num_levels - 1) * self.patch_size[0]

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "Flux2VAEConfig":
        """Build from a diffusers ``config.json`` dict; unknown keys (``force_upcast``, ``sample_size``,
        ``_class_name``, ...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in names and v is not None}
        for k in ("block_out_channels", "decoder_block_out_channels", "patch_size"):
            if k in kwargs and isinstance(kwargs[k], list):
                kwargs[k] = tuple(kwargs[k])
        act = cfg.get("act_fn", "silu")
        if act != "silu":
            raise ValueError(f"FLUX.2 VAE config has act_fn={act!r}; only 'silu' is supported.")
        return cls(**kwargs)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], batch_norm_eps: float = 1e-4) -> "Flux2VAEConfig":
        """Infer the configuration from tensor shapes in the internal (BFL) layout.

        ``norm_num_groups`` is assumed to be 32.
        """
        levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"^encoder\.down\.(\d+)\.", k))})
        up_levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"^decoder\.up\.(\d+)\.", k))})
        if not levels or levels != list(range(len(levels))) or up_levels != levels:
            raise ValueError(
                f"cannot infer the VAE layout: encoder levels {levels}, decoder levels {up_levels} "
                "(expected matching 0..L-1)."
            )
        enc = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels)
        dec = tuple(shapes[f"decoder.up.{i}.block.0.conv1.weight"][0] for i in levels)
        n_enc = len({m.group(1) for k in shapes if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))})
        n_dec = len({m.group(1) for k in shapes if (m := re.match(r"^decoder\.up\.0\.block\.(\d+)\.", k))})
        if n_dec != n_enc + 1:
            raise ValueError(
                f"cannot infer the VAE layout: the encoder has {n_enc} resnets per level and the decoder {n_dec}; "
                "a FLUX.2 VAE has one more in the decoder."
            )
        latent = shapes["decoder.conv_in.weight"][1]
        bn = shapes.get("bn.running_mean", (latent * 4,))[0]
        ratio = bn // latent if latent else 0
        p = math.isqrt(ratio)
        if p * p != ratio or p * p * latent != bn:
            raise ValueError(f"bn.running_mean has {bn} channels, which is not latent_channels {latent} x a square patch.")
        return cls(
            in_channels=shapes["encoder.conv_in.weight"][1],
            out_channels=shapes["decoder.conv_out.weight"][0],
            block_out_channels=enc,
            decoder_block_out_channels=None if dec == enc else dec,
            layers_per_block=n_enc,
            latent_channels=latent,
            norm_num_groups=32,
            batch_norm_eps=batch_norm_eps,
            patch_size=(p, p),
            use_quant_conv="encoder.quant_conv.weight" in shapes,
            use_post_quant_conv="decoder.post_quant_conv.weight" in shapes,
            mid_block_add_attention="encoder.mid.attn_1.q.weight" in shapes,
        )


# ------------------------------------------------------------------------------------------------
# Patchify and BN
# ------------------------------------------------------------------------------------------------


def patchify(z: torch.Tensor, patch_size: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """``z: [B, C, p*h, q*w] -> [B, C*p*q, h, w]`` with ``out[b, C_idx*p*q + a*q + d, i, j] = z[b, C_idx, p*i + a, q*j + d]``.

    For FLUX.2 (C=32, p=q=2) channel ``4c + 2a + d`` holds latent channel c at row offset a and column
    offset d.
    """
    p, q = patch_size
    b, c, hh, ww = z.shape
    if hh % p or ww % q:
        raise ValueError(f"patchify: spatial size {hh}x{ww} is not a multiple of the patch {p}x{q}.")
    h, w = hh // p, ww // q
    return z.view(b, c, h, p, w, q).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * q, h, w)


def unpatchify(x: torch.Tensor, patch_size: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """Exact inverse of :func:`patchify`: ``x: [B, C*p*q, h, w] -> [B, C, p*h, q*w]``."""
    p, q = patch_size
    b, cpq, h, w = x.shape
    if cpq % (p * q):
        raise ValueError(f"unpatchify: {cpq} channels is not a multiple of {p * q}.")
    c = cpq // (p * q)
    return x.reshape(b, c, p, q, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * p, w * q)


class LatentBatchNorm(nn.Module):
    """The non-affine BatchNorm statistics of the patchified latent (buffers only, always fp32).

    Never runs BatchNorm itself: :meth:`normalize` / :meth:`denormalize` apply the formula to the
    running statistics in fp32 and never modify the buffers.
    """

    def __init__(self, channels: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = float(eps)
        self.register_buffer("running_mean", torch.zeros(channels, dtype=torch.float32))
        self.register_buffer("running_var", torch.ones(channels, dtype=torch.float32))

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.running_mean.to(device=device, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.sqrt(self.running_var.to(device=device, dtype=torch.float32) + self.eps).view(1, -1, 1, 1)
        return mean, std

    def normalize(self, p: torch.Tensor) -> torch.Tensor:
        """``p: [B, 128, h, w]`` patchified latent -> ``(p - mean) / sqrt(var + eps)``, fp32."""
        mean, std = self._stats(p.device)
        return (p.float() - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """``z: [B, 128, h, w]`` normalised latent -> ``z * sqrt(var + eps) + mean``, fp32."""
        mean, std = self._stats(z.device)
        return z.float() * std + mean


# ------------------------------------------------------------------------------------------------
# Network (BFL names)
# ------------------------------------------------------------------------------------------------


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GN_EPS, affine=True)


class ResnetBlock(nn.Module):
    """``x: [B, in, H, W] -> [B, out, H, W]``: shortcut(x) + conv(SiLU(GN(conv(SiLU(GN(x))))))."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place SiLU on the fresh GroupNorm output and in-place residual on the fresh conv output:
        # the input is never modified.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return h.add_(x)


class Downsample(nn.Module):
    """Zero-pad right/bottom by 1, then 3x3 conv with stride 2: ``[B, C, H, W] -> [B, C, H/2, W/2]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then 3x3 conv: ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttnBlock(nn.Module):
    """Single-head self-attention of width C over all H*W positions, with residual.

    The projections are stored as 1x1 convs (BFL layout, ``[C, C, 1, 1]``) and applied as Linears on
    ``[B, H*W, C]`` tokens. Queries are processed in chunks so that no chunk's score matrix exceeds
    :attr:`score_budget_bytes` (an N x N matrix at 2048^2 would be 16 GiB in fp32).
    """

    score_budget_bytes = 256 * 1024 * 1024

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    @staticmethod
    def _linear(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        c_out, c_in = conv.weight.shape[:2]
        return F.linear(x, conv.weight.view(c_out, c_in), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        n = hh * ww
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, N, C]
        q = self._linear(h, self.q).unsqueeze(1)  # [B, 1, N, C]
        k = self._linear(h, self.k).unsqueeze(1)
        v = self._linear(h, self.v).unsqueeze(1)
        del h
        chunk = max(1, self.score_budget_bytes // max(1, b * n * 4))
        if chunk >= n:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.empty_like(q)
            for s in range(0, n, chunk):
                o[:, :, s:s + chunk] = F.scaled_dot_product_attention(q[:, :, s:s + chunk], k, v)
        del q, k, v
        o = self._linear(o.squeeze(1), self.proj_out)  # [B, N, C]
        return o.transpose(1, 2).reshape(b, c, hh, ww).add_(x)


def _no_op() -> None:
    pass


class _Ticker:
    """Calls ``on_block()`` for the first ``n - 1`` units; :meth:`finish` reports the last one, so the
    final call comes when the pass's output exists."""

    def __init__(self, on_block: OnBlock | None, n: int) -> None:
        self.on_block, self.left = on_block, n

    def __call__(self) -> None:
        self.left -= 1
        if self.on_block is not None and self.left > 0:
            self.on_block()

    def finish(self) -> None:
        if self.on_block is not None:
            self.on_block()


class MidBlock(nn.Module):
    """Resnet(C), optional Attn(C), Resnet(C)."""

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else None
        self.block_2 = ResnetBlock(channels, channels, groups)

    @property
    def num_blocks(self) -> int:
        """Progress units of :meth:`forward`: the resnets and the attention block."""
        return 2 + (self.attn_1 is not None)

    def forward(self, x: torch.Tensor, on_block: OnBlock | None = None) -> torch.Tensor:
        """``on_block()`` is called after each resnet / attention block (it may raise to abort)."""
        tick = on_block or _no_op
        x = self.block_1(x)
        tick()
        if self.attn_1 is not None:
            x = self.attn_1(x)
            tick()
        x = self.block_2(x)
        tick()
        return x


class _Level(nn.Module):
    """One resolution level: ``block`` (resnets) and an optional ``downsample`` / ``upsample``."""

    def __init__(
        self,
        blocks: list[ResnetBlock],
        downsample: Downsample | None = None,
        upsample: Upsample | None = None,
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample
        self.upsample = upsample


class Encoder(nn.Module):
    """``x: [B, 3, H, W]`` in [-1, 1] -> moments ``[B, 2*z, H/8, W/8]`` (after ``quant_conv``)."""

    def __init__(self, cfg: Flux2VAEConfig) -> None:
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        prev = ch[0]
        for i, c in enumerate(ch):
            blocks = []
            for _ in range(cfg.layers_per_block):
                blocks.append(ResnetBlock(prev, c, g))
                prev = c
            self.down.append(_Level(blocks, downsample=Downsample(c) if i < len(ch) - 1 else None))
        self.mid = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)
        self.quant_conv = (
            nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1) if cfg.use_quant_conv else None
        )

    @property
    def num_blocks(self) -> int:
        """Progress units of one :meth:`forward`: every resnet and downsampler, then the mid block's."""
        return sum(len(lv.block) + (lv.downsample is not None) for lv in self.down) + self.mid.num_blocks

    def forward(self, x: torch.Tensor, on_block: OnBlock | None = None) -> torch.Tensor:
        """``on_block()`` is called after each of the :attr:`num_blocks` units (the last one once the
        output is ready); it may raise to abort between blocks."""
        tick = _Ticker(on_block, self.num_blocks)
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
                tick()
            if level.downsample is not None:
                h = level.downsample(h)
                tick()
        h = self.mid(h, tick)
        h = self.conv_out(F.silu(self.norm_out(h), inplace=True))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        tick.finish()
        return h


class Decoder(nn.Module):
    """``z: [B, z, h, w]`` (un-normalised, unpatchified latent) -> ``[B, 3, 8h, 8w]`` (about [-1, 1]).

    ``up[i]`` is level i (0 = full resolution); levels run from L-1 down to 0.
    """

    def __init__(self, cfg: Flux2VAEConfig) -> None:
        super().__init__()
        ch, g, n = cfg.decoder_channels, cfg.norm_num_groups, cfg.layers_per_block + 1
        self.post_quant_conv = (
            nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1) if cfg.use_post_quant_conv else None
        )
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        levels: list[_Level] = [None] * len(ch)  # type: ignore[list-item]
        prev = ch[-1]
        for i in reversed(range(len(ch))):
            blocks = []
            for _ in range(n):
                blocks.append(ResnetBlock(prev, ch[i], g))
                prev = ch[i]
            levels[i] = _Level(blocks, upsample=Upsample(ch[i]) if i > 0 else None)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch[0], g)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    @property
    def num_blocks(self) -> int:
        """Progress units of one :meth:`forward`: the mid block's, then every resnet and upsampler."""
        return self.mid.num_blocks + sum(len(lv.block) + (lv.upsample is not None) for lv in self.up)

    def forward(self, z: torch.Tensor, on_block: OnBlock | None = None) -> torch.Tensor:
        """``on_block()`` is called after each of the :attr:`num_blocks` units (the last one once the
        output is ready); it may raise to abort between blocks."""
        tick = _Ticker(on_block, self.num_blocks)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.conv_in(z)
        del z
        h = self.mid(h, tick)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for blk in level.block:
                h = blk(h)
                tick()
            if level.upsample is not None:
                h = level.upsample(h)
                tick()
        h = self.conv_out(F.silu(self.norm_out(h), inplace=True))
        tick.finish()
        return h


# ------------------------------------------------------------------------------------------------
# The VAE
# ------------------------------------------------------------------------------------------------

class Flux2VAE(nn.Module):
    """FLUX.2 VAE with Lens' latent convention (BN-normalised, 2x2-patchified, 128 channels).

    Submodules ``encoder``, ``decoder``, ``bn`` carry the BFL key names. Build the weights with
    :func:`~lens_model.vae_loading.load_vae` or :func:`~lens_model.vae_loading.vae_from_state_dict`.
    """

    def __init__(self, config: Flux2VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or Flux2VAEConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.bn = LatentBatchNorm(self.config.bn_channels, self.config.batch_norm_eps)

    # -- properties ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along one side (16)."""
        return self.config.downscale

    # -- latent helpers -----------------------------------------------------------------------
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """``z: [B, 32, 2h, 2w]`` raw latent -> ``[B, 128, h, w]`` Lens latent (fp32)."""
        return self.bn.normalize(patchify(z, self.config.patch_size))

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents: [B, 128, h, w]`` Lens latent -> ``[B, 32, 2h, 2w]`` raw latent (fp32)."""
        return unpatchify(self.bn.denormalize(latents), self.config.patch_size)

    # -- untiled passes -----------------------------------------------------------------------
    def encode_pass(self, images: torch.Tensor, on_block: OnBlock | None = None) -> torch.Tensor:
        """One untiled encoder pass: ``images: [B, H, W, 3]`` in [0, 1] -> ``[B, 128, H/16, W/16]``
        Lens latent (posterior mean, BN-normalised), float32 on the CPU. ``on_block`` as in
        :meth:`Encoder.forward`."""
        x = images[..., :3].to(device=self.device, dtype=torch.float32)
        x = (x.permute(0, 3, 1, 2) * 2.0 - 1.0).to(self.dtype)
        moments = self.encoder(x, on_block)
        mean = moments[:, :self.config.latent_channels]
        return self.normalize(mean).float().cpu()

    def decode_pass(self, latents: torch.Tensor, on_block: OnBlock | None = None) -> torch.Tensor:
        """One untiled decoder pass: ``latents: [B, 128, h, w]`` -> ``[B, 3, 16h, 16w]`` decoder
        output (about [-1, 1]), float32 on the model's device. ``on_block`` as in :meth:`Decoder.forward`."""
        z = self.denormalize(latents.to(device=self.device, dtype=torch.float32)).to(self.dtype)
        return self.decoder(z, on_block).float()

    def estimate_encode_bytes(self, height: int, width: int) -> int:
        """Rough peak activation bytes of an untiled encode of one ``height x width`` px image: a few
        full-resolution maps of the first level's width, plus 30 % slack and the attention budget."""
        ch0 = self.config.block_out_channels[0]
        elt = torch.finfo(self.dtype).bits // 8
        return int(1.3 * (4 * height * width * ch0 * elt) + AttnBlock.score_budget_bytes)

    def estimate_decode_bytes(self, h: int, w: int) -> int:
        """Rough peak activation bytes of an untiled decode of one ``[1, 128, h, w]`` latent (about
        1.25 GiB at 1024^2 in bf16 for the full model): 2.5 maps of the top level's input width at
        full resolution, plus 30 % slack and the attention budget."""
        ch = self.config.decoder_channels
        c_in_top = ch[1] if len(ch) > 1 else ch[0]
        px = (h * self.downscale) * (w * self.downscale)
        elt = torch.finfo(self.dtype).bits // 8
        return int(1.3 * (2.5 * px * c_in_top * elt) + AttnBlock.score_budget_bytes)

    # -- public encode / decode (tiling, progress and the out-of-memory retry: vae_tiling) ----
    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor,
        tile: TileArg = False,
        tile_size: int = 64,
        overlap: int = 16,
        callback: ProgressCallback | None = None,
        progress_unit: str = "tile",
    ) -> torch.Tensor:
        """``images: [B, H, W, 3]`` in [0, 1] (ComfyUI IMAGE; an alpha channel is dropped) ->
        ``[B, 128, H/16, W/16]`` float32 on the CPU: BN-normalised patchified posterior mean.

        H and W must be multiples of 16 (ValueError otherwise). Each sample is encoded separately.

        ``tile`` (default False), ``tile_size`` and ``overlap`` (latent cells) as in :meth:`decode`;
        pixel tiles are encoded on their own and blended in the latent grid (the BN normalisation
        is affine per channel, so blending before or after it is the same). Tiled latents are close
        to, never equal to, untiled ones. ``callback(done, total)`` and ``progress_unit`` as in
        :meth:`decode`, with ``encoder.num_blocks`` blocks per pass.
        """
        if images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise ValueError(f"encode expects images [B, H, W, 3] in 0..1, got shape {tuple(images.shape)}.")
        tiling = Tiling(tile, tile_size, overlap)
        blocks = passes_per_unit(progress_unit, self.encoder.num_blocks)
        b, hh, ww, _ = images.shape
        f = self.downscale
        if hh % f or ww % f:
            raise ValueError(
                f"encode: image size {ww}x{hh} (WxH) is not a multiple of {f}; crop or resize it to "
                f"{ww // f * f}x{hh // f * f} (multiples of {f} pixels)."
            )

        def run_tile(i: int, rows: slice, cols: slice, on_block: OnBlock | None) -> torch.Tensor:
            crop = images[i:i + 1, rows.start * f:rows.stop * f, cols.start * f:cols.stop * f, :3]
            return self.encode_pass(crop, on_block)

        samples = tiling.run(run_tile, b, (hh // f, ww // f), channels=self.config.bn_channels, scale=1,
                             callback=callback, blocks_per_pass=blocks, device=self.device,
                             need_bytes=self.estimate_encode_bytes(hh, ww), what="encode")
        return torch.cat(list(samples))

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        tile: TileArg = "auto",
        tile_size: int = 64,
        overlap: int = 16,
        callback: ProgressCallback | None = None,
        progress_unit: str = "tile",
    ) -> torch.Tensor:
        """``latents: [B, 128, h, w]`` (Lens / ComfyUI LATENT samples) -> ``[B, 16h, 16w, 3]`` float32 on
        the CPU in [0, 1], = clamp((x + 1) / 2, 0, 1). Each sample is decoded separately.

        Tiling (ComfyUI style, in the 128-channel /16 latent grid; :class:`~lens_model.vae_tiling.Tiling`):
        ``tile_size`` and ``overlap`` are in latent cells (1 cell = 16 px). Tiles of ``tile_size`` x
        ``tile_size`` cells start every ``tile_size - overlap`` cells (the last tile is aligned to the
        far edge), each is decoded on its own and blended with weights that ramp linearly across
        ``overlap`` cells on every side that touches another tile. Tiled output is close to, never
        equal to, the untiled one (GroupNorm and mid-block attention become per tile).

        ``tile``: False = never tile; True = tile when the latent exceeds ``tile_size``; "auto" = decode
        untiled, but tile when on CUDA the estimated peak exceeds free memory or when it runs out of
        memory (CPU never tiles under "auto").
        ``callback(done, total)`` is called after every tile (untiled: after every sample), so a caller
        can report progress and abort by raising; ``total`` grows if "auto" switches a sample to tiles.
        With ``progress_unit="block"`` it is called after every decoder block of every tile / sample
        instead (``decoder.num_blocks`` per pass, 18 for the FLUX.2 VAE): progress and aborts between
        blocks, not only between tiles.
        """
        if latents.ndim != 4 or latents.shape[1] != self.config.bn_channels:
            raise ValueError(
                f"decode expects latents [B, {self.config.bn_channels}, h, w] (Lens / FLUX.2 latent), "
                f"got shape {tuple(latents.shape)}."
            )
        tiling = Tiling(tile, tile_size, overlap)
        blocks = passes_per_unit(progress_unit, self.decoder.num_blocks)
        b, _, h, w = latents.shape

        def run_tile(i: int, rows: slice, cols: slice, on_block: OnBlock | None) -> torch.Tensor:
            return self.decode_pass(latents[i:i + 1, :, rows, cols], on_block).cpu()

        samples = tiling.run(run_tile, b, (h, w), channels=self.config.out_channels, scale=self.downscale,
                             callback=callback, blocks_per_pass=blocks, device=self.device,
                             need_bytes=self.estimate_decode_bytes(h, w), what="decode")
        return torch.cat([((x + 1.0) * 0.5).clamp_(0.0, 1.0).permute(0, 2, 3, 1) for x in samples]).contiguous()
