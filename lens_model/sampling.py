"""Flow-matching schedule, Euler sampler, norm-rescaled CFG, noise, img2img and inpainting for Lens.

Reference: Microsoft Lens ``pipeline.py`` @ 5bf0f0c (``compute_empirical_mu`` and the ``__call__``
loop) with diffusers ``FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)``. A
ComfyUI-core-compatible variant of the schedule (``ModelSamplingFlux`` + the "simple" scheduler) and
of CFG (x₀-space CFG + ``CFGNorm``) is provided for parity checks, but the upstream behaviour is the
default everywhere.

Conventions:
- latents are in the ComfyUI LATENT layout ``[B, 128, h, w]`` (h = H/16, w = W/16); token n of the
  upstream ``[B, h·w, 128]`` layout is position (n // w, n % w);
- flow matching x_σ = (1 − σ)·x₀ + σ·ε, the DiT predicts the velocity v = ε − x₀, so
  x₀ = x_σ − σ·v and an Euler step is x ← x + (σ_next − σ)·v;
- text features are ``context [B, S, 4E]`` (layer-major) with ``context_mask [B, S]`` bool; S may be 0.

Inpainting (``sample(denoise_mask=m, init_latents=z, init_noise=ε)``, core's ``KSamplerX0Inpaint``
semantics): before every model call the kept part (m = 0) is replaced by the original noised to the
current σ, x_in = x·m + (σ·ε + (1 − σ)·z)·(1 − m); the model's x₀ estimate is blended back,
x₀ ← x₀·m + z·(1 − m), and the Euler step uses it. After the last step x ← x·m + z·(1 − m), so
cells with m = 0 come out exactly equal to z, and a mask of ones gives exactly the unmasked result.
Recipe (pixel mask ``mask`` [H, W] or [B, H, W], white/1 = repaint)::

    z = vae.encode(image)                                     # [1, 128, h, w]
    sig = img2img_sigmas(H, W, steps, denoise)                # or lens_sigmas(...) (denoise 1)
    eps = make_noise(seed, B, h, w)
    x = noise_image_latents(eps, z, sig[0])
    m = latent_mask(mask, h, w, batch=B)                      # coverage downsampling
    out = sample(dit, x, sig, ctx, ctx_mask, denoise_mask=m, init_latents=z, init_noise=eps)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .constants import CAPTURED_LAYERS, LATENT_CELL_PIXELS, LATENT_CHANNELS, TEXT_HIDDEN_SIZE

logger = logging.getLogger(__name__)

MU_TOKEN_THRESHOLD = 4300
"""Above this many image tokens the empirical μ no longer depends on the step count."""

# FLUX.2's empirical-μ constants: two lines in the token count N, at 10 and at 200 steps.
_A1, _B1 = 8.73809524e-05, 1.89833333
_A2, _B2 = 0.00016927, 0.45666666

# ComfyUI core ModelSamplingFlux node defaults (max_shift, base_shift) and its σ-table size.
COMFY_MAX_SHIFT = 1.15
COMFY_BASE_SHIFT = 0.5
COMFY_TABLE_SIZE = 10000

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------

def image_tokens(height: int, width: int) -> int:
    """Number of image tokens N = (H/16)·(W/16) for a pixel size."""
    return (int(height) // LATENT_CELL_PIXELS) * (int(width) // LATENT_CELL_PIXELS)


MAX_STEPS = 200
"""Largest step count accepted by :func:`check_sampling_options` (and the sampler node). The
empirical-μ line is fitted between 10 and 200 steps; the models use 4-50."""

MAX_GUIDANCE = 100.0
"""Largest guidance scale accepted (core's KSampler uses the same bound)."""

MU_RANGE = (-20.0, 20.0)
"""Accepted schedule-shift overrides μ. The empirical μ of any size up to 4096² stays below 12; at
|μ| = 20 the shift e^μ ≈ 5·10⁸ already saturates every σ to 1 (or 0) in float32."""


class NonFiniteError(ValueError):
    """NaN or Inf appeared in the sampler (in the start latent, the DiT output, the guided velocity
    or the running latent). ``step`` is the 1-based step (0: before the first step), ``total`` the
    step count and ``where`` names the tensor."""

    def __init__(self, message: str, step: int, total: int, where: str):
        super().__init__(message)
        self.step = step
        self.total = total
        self.where = where


def _finite_float(value, label: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{label} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{label} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{label} must be a finite number, got {out!r}")
    return out


def check_sampling_options(steps=None, guidance_scale=None, denoise=None, mu=None,
                           names: Optional[dict] = None) -> None:
    """Validate sampling options before any work starts; ``None`` skips an option.

    Raises ValueError naming the option, its value and the accepted range:

    - ``steps``: an integer in 1..:data:`MAX_STEPS` (200);
    - ``guidance_scale``: a finite number in [0, :data:`MAX_GUIDANCE`] (CFG; 1 = no guidance);
    - ``denoise``: a finite number in (0, 1] (img2img strength; 1 = text-to-image);
    - ``mu``: a finite schedule-shift override in :data:`MU_RANGE` ([-20, 20]).

    NaN and ±Inf are always rejected (they would otherwise turn every latent into NaN and give a
    black image). ``names`` maps option names to the names the caller's user knows, e.g.
    ``{"guidance_scale": "--cfg"}`` in a CLI or ``{"guidance_scale": "cfg"}`` in a node.
    """
    names = names or {}

    def label(key: str) -> str:
        return names.get(key, key)

    if steps is not None:
        bad = isinstance(steps, bool)
        try:
            as_int = int(steps)
            bad = bad or as_int != steps
        except (TypeError, ValueError, OverflowError):
            bad = True
        if bad or not 1 <= as_int <= MAX_STEPS:
            raise ValueError(f"{label('steps')} must be an integer from 1 to {MAX_STEPS}, "
                             f"got {steps!r}")
    if guidance_scale is not None:
        g = _finite_float(guidance_scale, label("guidance_scale"))
        if not 0.0 <= g <= MAX_GUIDANCE:
            raise ValueError(f"{label('guidance_scale')} must be in [0, {MAX_GUIDANCE:g}], got {g!r}")
    if denoise is not None:
        d = _finite_float(denoise, label("denoise"))
        if not 0.0 < d <= 1.0:
            raise ValueError(f"{label('denoise')} must be in (0, 1], got {d!r}")
    if mu is not None:
        m = _finite_float(mu, label("mu"))
        if not MU_RANGE[0] <= m <= MU_RANGE[1]:
            raise ValueError(f"{label('mu')} (schedule shift override) must be in "
                             f"[{MU_RANGE[0]:g}, {MU_RANGE[1]:g}], got {m!r}")


def check_number(value, label: str, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a finite float in [low, high] (the whole finite range by default); otherwise a
    ValueError naming ``label``: not a number, NaN / ±Inf, or out of the range."""
    v = _finite_float(value, label)
    if not low <= v <= high:
        raise ValueError(f"{label} must be from {low:g} to {high:g}, got {v:g}")
    return v


def _check_steps(steps) -> int:
    """A positive integer step count (no upper bound: img2img builds n/s-step schedules)."""
    if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


def empirical_mu(image_tokens: int, steps: int) -> float:
    """Upstream's empirical schedule shift μ (FLUX.2 constants), as a Python float (float64).

    Above 4300 tokens μ = a2·N + b2. At or below, μ lies on the line through (10, a1·N + b1) and
    (200, a2·N + b2), evaluated at ``steps`` (extrapolated below 10 steps, as upstream does). The
    jump at 4300 tokens is upstream behaviour and is reproduced on purpose.
    """
    n_tok = int(image_tokens)
    steps = _check_steps(steps)
    if n_tok > MU_TOKEN_THRESHOLD:
        return float(_A2 * n_tok + _B2)
    m_200 = _A2 * n_tok + _B2
    m_10 = _A1 * n_tok + _B1
    slope = (m_200 - m_10) / 190.0
    intercept = m_200 - 200.0 * slope
    return float(slope * steps + intercept)


def _exp_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """Exponential time shift σ = e^μ / (e^μ + (1/t − 1)), t in (0, 1], float64."""
    e = math.exp(mu)
    return e / (e + (1.0 / t - 1.0))


def lens_sigmas(height: int, width: int, steps: int, mu: Optional[float] = None) -> torch.Tensor:
    """Canonical Lens σ schedule: float32 tensor ``[steps + 1]`` from 1.0 down to a trailing 0.0.

    t_k = linspace(1, 1/n, n), σ_k = e^μ / (e^μ + (1/t_k − 1)), then σ_n = 0. μ defaults to
    :func:`empirical_mu` of N = (H/16)·(W/16) and n; pass ``mu`` to override it ("schedule μ
    override"). Computed in float64 and rounded once to float32 (diffusers works in float32; the
    two agree to ≤ 1e-7). ``steps`` and ``mu`` are checked by :func:`check_sampling_options`.
    """
    check_sampling_options(steps=steps, mu=mu)
    return _lens_schedule(height, width, int(steps), mu)


def _lens_schedule(height: int, width: int, steps: int, mu: Optional[float]) -> torch.Tensor:
    steps = _check_steps(steps)
    if mu is None:
        mu = empirical_mu(image_tokens(height, width), steps)
    t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    sig = _exp_shift(float(mu), t)
    return torch.cat([sig, sig.new_zeros(1)]).to(torch.float32)


def comfyui_mu(height: int, width: int,
               max_shift: float = COMFY_MAX_SHIFT, base_shift: float = COMFY_BASE_SHIFT) -> float:
    """μ of core's ``ModelSamplingFlux(max_shift, base_shift, width, height)`` node.

    μ = (W·H/256)·m + b with m = (max_shift − base_shift)/(4096 − 256), b = base_shift − 256·m.
    Note the node takes *pixel* sizes: the official template feeds 1448² here (μ 1.843037) although
    its latent ends up 1440² (μ 1.827760).
    """
    m = (max_shift - base_shift) / (4096 - 256)
    b = base_shift - m * 256
    return float((width * height / (8 * 8 * 2 * 2)) * m + b)


def comfyui_sigmas(height: int, width: int, steps: int, mu: Optional[float] = None,
                   max_shift: float = COMFY_MAX_SHIFT,
                   base_shift: float = COMFY_BASE_SHIFT) -> torch.Tensor:
    """σ schedule of ComfyUI core: ModelSamplingFlux + the "simple" scheduler, float32 ``[steps+1]``.

    Core tabulates σ(t) = e^μ / (e^μ + (1/t − 1)) at t = i/10000, i = 1..10000, and the "simple"
    scheduler takes entry ``table[-(1 + int(k · (10000 / n)))]`` for k = 0..n−1, then appends 0,
    i.e. t_k = 1 − j_k/10000 with j_k = int(k·(10000/n)).

    j_k is computed with core's float expression on purpose. It equals ⌊k·10000/n⌋ except where
    k·10000/n is an integer that the float product lands just below (e.g. n = 76, k = 57 gives
    7499, not 7500; 12 such (n, k) pairs for n ≤ 200, none for n | 10000); there core picks the
    neighbouring table entry (Δt = 1e-4) and so do we. Core evaluates the table in float32; we
    evaluate in float64 and round once (difference ≤ 1e-7).
    """
    check_sampling_options(steps=steps, mu=mu)
    return _comfyui_schedule(height, width, int(steps), mu, max_shift, base_shift)


def _comfyui_schedule(height: int, width: int, steps: int, mu: Optional[float],
                      max_shift: float = COMFY_MAX_SHIFT,
                      base_shift: float = COMFY_BASE_SHIFT) -> torch.Tensor:
    steps = _check_steps(steps)
    if mu is None:
        mu = comfyui_mu(height, width, max_shift, base_shift)
    stride = COMFY_TABLE_SIZE / steps
    idx = [int(k * stride) for k in range(steps)]
    t = torch.tensor([(COMFY_TABLE_SIZE - j) / COMFY_TABLE_SIZE for j in idx], dtype=torch.float64)
    sig = _exp_shift(float(mu), t)
    return torch.cat([sig, sig.new_zeros(1)]).to(torch.float32)


def img2img_sigmas(height: int, width: int, steps: int, denoise: float,
                   mode: str = "upstream", mu: Optional[float] = None) -> torch.Tensor:
    """Partial schedule for img2img with denoise strength s in (0, 1], float32 ``[steps + 1]``.

    ComfyUI's rule (core's KSampler): n_total = ⌊n / s⌋ (computed as ``int(steps / denoise)``, like
    core's KSampler), build the full schedule for n_total steps (μ from N and n_total in "upstream"
    mode, :func:`comfyui_sigmas` in "comfyui" mode) and keep the last n + 1 values σ_start … 0.
    s = 1 gives exactly the text-to-image schedule. ``steps``, ``denoise`` and ``mu`` are checked
    by :func:`check_sampling_options` (n_total itself may exceed :data:`MAX_STEPS`).
    """
    check_sampling_options(steps=steps, denoise=denoise, mu=mu)
    return plan_sampling(height, width, steps, denoise=denoise, schedule=mode, mu=mu,
                         has_init=True).sigmas


SCHEDULES = ("upstream", "comfyui")
"""Schedule modes: "upstream" (:func:`lens_sigmas`, empirical μ) and "comfyui" (:func:`comfyui_sigmas`)."""
NOISE_LAYOUTS = ("upstream", "comfy")
"""Noise layouts of :func:`make_noise`: upstream's token order or ComfyUI's ``[B, 128, h, w]`` draw."""
CFG_MODES = ("upstream", "comfyui")
"""CFG combinations of :func:`sample` (:func:`cfg_combine`)."""


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """What to sample, decided once by :func:`plan_sampling` for the pipeline and the sampler node.

    ``sigmas`` is the float32 schedule ``[steps + 1]`` from σ_start down to 0. When ``img2img`` is
    True the sampler starts from the init latents noised to σ_start (:meth:`start_latents`),
    otherwise from pure noise. A partial (img2img) schedule is the tail of a ``full_steps``-step
    schedule: it starts at index :attr:`start` of it. ``mu`` is the schedule shift the schedule used
    (None for an explicit schedule). ``warnings`` are for the caller to log.
    """

    sigmas: torch.Tensor
    steps: int
    full_steps: int
    denoise: float
    img2img: bool
    schedule: str
    mu: Optional[float]
    warnings: tuple = ()

    @property
    def start(self) -> int:
        """Index of σ_start in the full ``full_steps``-step schedule (0 for text-to-image)."""
        return self.full_steps - self.steps

    @property
    def sigma0(self) -> float:
        """σ_start, the noise level the sampler starts at."""
        return float(self.sigmas[0])

    def start_latents(self, noise: torch.Tensor,
                      init_latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sampler's start latent: ``noise`` (pure noise, σ = 1), or for img2img
        σ_start·noise + (1 − σ_start)·z (:func:`noise_image_latents`)."""
        if not self.img2img:
            return noise
        if init_latents is None:
            raise ValueError("this plan starts from an image (img2img): pass its latents")
        return noise_image_latents(noise, init_latents, self.sigma0)


def plan_sampling(height: int, width: int, steps: int, *, denoise: float = 1.0,
                  schedule: str = "upstream", mu: Optional[float] = None, has_init: bool = False,
                  sigmas: Optional[torch.Tensor] = None) -> SamplingPlan:
    """Decide the schedule and the start of a run: the one rule used by the pipeline and the node.

    Args:
        height, width: image size in pixels (the latent grid is H/16 × W/16).
        steps: Euler steps n (1..:data:`MAX_STEPS`).
        denoise: strength s in (0, 1]. Below 1 *with* an init image (``has_init``) the run is
            img2img: the last n + 1 values of a ⌊n/s⌋-step schedule (:func:`img2img_sigmas`),
            starting from the init latents noised to σ_start. Below 1 *without* one, pure noise
            sits at σ = 1, so the full text-to-image schedule runs instead and a warning says so.
        schedule: "upstream" (:func:`lens_sigmas`; μ from the size and the full step count) or
            "comfyui" (:func:`comfyui_sigmas`; μ from the size).
        mu: schedule shift override; None = automatic.
        has_init: whether init latents (an encoded image, a LATENT with content) are available.
        sigmas: an explicit schedule ``[n + 1]`` replacing the computed one (``steps`` is then
            its length − 1); the denoise rule still decides whether it starts from the image.

    Options are checked by :func:`check_sampling_options` (ValueError naming the option).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be 'upstream' or 'comfyui', got {schedule!r}")
    check_sampling_options(denoise=denoise, mu=mu)
    denoise = float(denoise)
    warnings = []
    if denoise < 1.0 and not has_init:
        warnings.append(f"denoise {denoise:.2f} needs an image latent (an init image) to start "
                        f"from; without one the full schedule runs (text-to-image)")
        denoise = 1.0
    if sigmas is not None:
        sig = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
        if sig.numel() < 2 or not bool(torch.isfinite(sig).all()):
            raise ValueError(f"sigmas must be n + 1 >= 2 finite values, got {sig.tolist()}")
        n = sig.numel() - 1
        return SamplingPlan(sig, n, n, denoise, denoise < 1.0, schedule, None, tuple(warnings))
    check_sampling_options(steps=steps)
    steps = int(steps)
    full = max(int(steps / denoise), steps)  # core's KSampler: int(steps / denoise)
    if schedule == "comfyui":
        used_mu = comfyui_mu(height, width) if mu is None else float(mu)
        sig = _comfyui_schedule(height, width, full, used_mu)
    else:
        used_mu = empirical_mu(image_tokens(height, width), full) if mu is None else float(mu)
        sig = _lens_schedule(height, width, full, used_mu)
    if full != steps:
        sig = sig[-(steps + 1):].clone()
    return SamplingPlan(sig, steps, full, denoise, denoise < 1.0, schedule, used_mu,
                        tuple(warnings))


# --------------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------------

def make_noise(seed: int, batch: int, h: int, w: int, layout: str = "upstream",
               batch_index: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Initial noise ``[B, 128, h, w]`` float32 on the CPU.

    - "upstream": ``torch.Generator("cpu").manual_seed(seed)``, ``randn([B, h·w, 128])`` in token
      layout, then ``view(B, h, w, 128).permute(0, 3, 1, 2)``. Upstream draws in the DiT dtype
      (bf16); we always draw fp32 (whether a bf16 draw equals a rounded fp32 draw is unverified).
    - "comfy": core's ``prepare_noise``: ``randn([B, 128, h, w])`` from a generator seeded like
      ``torch.manual_seed(seed)``. The same seed gives a different image from "upstream".

    ``batch_index`` (a LATENT's ``batch_index``: one non-negative int per image, from core's
    Latent From Batch / Repeat Latent Batch / Latent Batch) gives image i the noise of position
    ``batch_index[i]`` in a batch drawn from the seed, as core's ``prepare_noise`` does: single-image
    draws are made in order for positions 0..max(batch_index) and each image takes its own
    (repeated indices share noise). Without it, image i takes position i. A batch drawn at once
    equals the same single-image draws in order (CPU ``randn``), so image k of a batch is also the
    image k generated alone with ``batch_index=[k]``.

    A private generator is used, so the global RNG state is left untouched.
    """
    if batch < 1 or h < 1 or w < 1:
        raise ValueError(f"make_noise needs batch, h, w >= 1, got {batch}, {h}, {w}")
    if layout not in NOISE_LAYOUTS:
        raise ValueError(f"noise layout must be 'upstream' or 'comfy', got {layout!r}")
    gen = torch.Generator("cpu").manual_seed(int(seed))

    def draw(n: int) -> torch.Tensor:
        if layout == "upstream":
            tok = torch.randn([n, h * w, LATENT_CHANNELS], generator=gen, dtype=torch.float32)
            return tok.view(n, h, w, LATENT_CHANNELS).permute(0, 3, 1, 2).contiguous()
        return torch.randn([n, LATENT_CHANNELS, h, w], generator=gen, dtype=torch.float32)

    if batch_index is None:
        return draw(batch)
    index = _check_batch_index(batch_index, batch)
    wanted = set(index)
    picked = {}
    for i in range(max(index) + 1):
        one = draw(1)
        if i in wanted:
            picked[i] = one
    return torch.cat([picked[i] for i in index])


def _check_batch_index(batch_index, batch: int) -> list[int]:
    try:
        index = [int(i) for i in batch_index]
        ok = all(int(a) == a and not isinstance(a, bool) for a in batch_index)
    except (TypeError, ValueError):
        ok = False
    if not ok or any(i < 0 for i in index):
        raise ValueError(f"batch_index must be a list of non-negative integers, got {batch_index!r}")
    if len(index) != batch:
        raise ValueError(f"batch_index has {len(index)} entries for a batch of {batch} latents "
                         f"({batch_index!r})")
    return index


def noise_image_latents(noise: torch.Tensor, image_latents: torch.Tensor, sigma) -> torch.Tensor:
    """Start latent for img2img: x = σ·noise + (1 − σ)·z_img, float32 ``[B, 128, h, w]``.

    ``image_latents`` (BN-normalised VAE mean, [B or 1, 128, h, w]) broadcasts over the noise batch.
    """
    if noise.shape[1:] != image_latents.shape[1:]:
        raise ValueError(f"img2img latents {tuple(image_latents.shape)} do not match the noise "
                         f"{tuple(noise.shape)}; the image must have the generation size")
    sigma = float(sigma)
    z = image_latents.to(device=noise.device, dtype=torch.float32)
    return sigma * noise.float() + (1.0 - sigma) * z


# --------------------------------------------------------------------------------------------------
# Inpainting masks
# --------------------------------------------------------------------------------------------------

MASK_MODES = ("coverage", "comfyui")
"""Pixel-mask → latent-grid downsampling modes of :func:`latent_mask`."""


def repeat_to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Tile or truncate ``t`` along dim 0 to ``batch`` rows (core's rule for masks)."""
    n = t.shape[0]
    if n == batch:
        return t
    if n > batch:
        return t[:batch]
    reps = -(-batch // n)
    return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch]


def latent_mask(mask: torch.Tensor, h: int, w: int, batch: Optional[int] = None,
                mode: str = "coverage") -> torch.Tensor:
    """A pixel mask (1 = regenerate, soft values allowed) on the latent grid: ``[B, 1, h, w]`` fp32.

    ``mask``: ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` in 0..1 at pixel resolution (a core MASK,
    or a LATENT's ``noise_mask`` from core's SetLatentNoiseMask). Values are clipped to [0, 1];
    NaN or Inf is a ValueError. ``h``, ``w``: the latent grid (image H/16 × W/16).

    - "coverage" (default): a cell's value is the mean of its 16×16 pixels, so a cell is as masked
      as its pixels and a 1-px stroke still marks its cells (1/16 per cell). When the mask has the
      image's size (16h ≤ H < 16h + 16, same for W) it is first centre-cropped to 16h × 16w exactly
      as FLUX2 VAE Encode and core's VAEEncode crop the pixels, so mask and latent stay aligned. A
      mask of any other size is averaged over the whole grid (adaptive average pooling) with a
      warning.
    - "comfyui": core's ``reshape_mask``: bilinear resize of the whole mask straight to (h, w)
      (align_corners False, no antialias, no crop). Bilinear ×1/16 reads only the two centre
      pixels of each cell, so thin strokes can vanish and a size that is not a multiple of 16 is
      misaligned by up to 15 px; offered for parity with core.

    ``batch``: tile or truncate the mask rows to this many images (core's ``repeat_to_batch_size``).
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
    m = torch.as_tensor(mask)
    if m.ndim < 2 or (m.ndim == 4 and m.shape[1] != 1) or m.ndim > 4 or m.numel() == 0:
        raise ValueError(f"mask must be [H, W], [B, H, W] or [B, 1, H, W], got {tuple(m.shape)}")
    H, W = m.shape[-2:]
    m = m.reshape(-1, 1, H, W).to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(m).all()):
        raise ValueError("mask contains NaN or Inf")
    m = m.clamp(0.0, 1.0)
    if mode == "comfyui":
        out = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    else:
        ch, cw = LATENT_CELL_PIXELS * h, LATENT_CELL_PIXELS * w
        if ch <= H < ch + LATENT_CELL_PIXELS and cw <= W < cw + LATENT_CELL_PIXELS:
            y0, x0 = (H - ch) // 2, (W - cw) // 2
            out = F.avg_pool2d(m[:, :, y0:y0 + ch, x0:x0 + cw], LATENT_CELL_PIXELS)
        else:
            logger.warning("mask is %dx%d px but the latent is %dx%d cells (%dx%d px); the mask is "
                           "stretched over the image", W, H, w, h, cw, ch)
            out = F.adaptive_avg_pool2d(m, (h, w))
    if batch is not None:
        out = repeat_to_batch(out, int(batch))
    return out.contiguous()


# --------------------------------------------------------------------------------------------------
# CFG
# --------------------------------------------------------------------------------------------------

def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float, mode: str = "upstream",
                x: Optional[torch.Tensor] = None, sigma=None, dim: int = 1) -> torch.Tensor:
    """Guided velocity from the conditional and unconditional velocities (float32).

    ``cond``, ``uncond``: ``[B, 128, h, w]`` velocities (norms over ``dim``, the 128 channels; pass
    ``dim=-1`` for token layout ``[B, N, 128]``).

    - "upstream" (Lens' pipeline), in velocity space: comb = u + g·(c − u), then per token
      v = comb·‖c‖/‖comb‖ (denominator clamp_min(1e-12)); where ‖comb‖ = 0, v = comb. No clamp on
      the ratio, so v has the conditional norm but the guided direction. g = 1 returns c exactly.
    - "comfyui": core's x₀-space CFG followed by ``CFGNorm(strength 1)`` as a post-CFG function:
      x₀_c = x − σ·c, x₀_u = x − σ·u, D = x₀_u + g·(x₀_c − x₀_u),
      D ← D·clamp(‖x₀_c‖/(‖D‖ + 1e-8), 0, 1) (attenuate only), returned as a velocity
      v = (x − D)/σ. Needs ``x`` (the step's input latent) and ``sigma`` (> 0; at σ = 0 the comb is
      returned). Core applies the clamp also at g = 1, where it is a no-op to ~1e-8 relative.
    """
    c = cond.float()
    u = uncond.float()
    g = float(scale)
    if mode == "upstream":
        if g == 1.0:
            return c
        comb = u + g * (c - u)
        c_norm = torch.linalg.vector_norm(c, dim=dim, keepdim=True)
        comb_norm = torch.linalg.vector_norm(comb, dim=dim, keepdim=True)
        ratio = torch.where(comb_norm > 0, c_norm / comb_norm.clamp_min(1e-12),
                            torch.ones_like(comb_norm))
        return comb * ratio
    if mode == "comfyui":
        if x is None or sigma is None:
            raise ValueError("cfg_combine(mode='comfyui') needs the step input x and its sigma")
        s = float(sigma)
        if s == 0.0:
            return u + g * (c - u)
        xf = x.float()
        x0_c = xf - s * c
        x0_u = xf - s * u
        d = x0_u + (x0_c - x0_u) * g
        n_c = torch.linalg.vector_norm(x0_c, dim=dim, keepdim=True)
        n_d = torch.linalg.vector_norm(d, dim=dim, keepdim=True)
        d = d * (n_c / (n_d + 1e-8)).clamp(min=0.0, max=1.0)
        return (xf - d) / s
    raise ValueError(f"cfg mode must be 'upstream' or 'comfyui', got {mode!r}")


# --------------------------------------------------------------------------------------------------
# Text alignment helpers
# --------------------------------------------------------------------------------------------------

def empty_text(batch: int, channels: int, device=None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero-length text stream: context ``[B, 0, C]`` and mask ``[B, 0]`` bool (empty negative)."""
    return (torch.zeros(batch, 0, channels, device=device, dtype=dtype),
            torch.zeros(batch, 0, device=device, dtype=torch.bool))


def pad_text(context: torch.Tensor, mask: torch.Tensor,
             length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``context [B, S, C]`` / ``mask [B, S]`` to ``length`` tokens with zero features and
    mask False. Padding never changes a DiT result (masked keys get weight exp(−inf) = 0)."""
    b, s, c = context.shape
    mask = mask.to(torch.bool)
    if length < s:
        raise ValueError(f"pad_text cannot shrink {s} tokens to {length}")
    if length == s:
        return context, mask
    ctx = torch.cat([context, context.new_zeros(b, length - s, c)], dim=1)
    msk = torch.cat([mask, mask.new_zeros(b, length - s)], dim=1)
    return ctx, msk


def align_text(context_a: torch.Tensor, mask_a: torch.Tensor, context_b: torch.Tensor,
               mask_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad two text streams (e.g. positive and negative) to a common S = max(S_a, S_b)."""
    s = max(context_a.shape[1], context_b.shape[1])
    ca, ma = pad_text(context_a, mask_a, s)
    cb, mb = pad_text(context_b, mask_b, s)
    return ca, ma, cb, mb


def expand_batch(context: torch.Tensor, mask: torch.Tensor, batch: int,
                 what: str = "prompt") -> tuple[torch.Tensor, torch.Tensor]:
    """Expand text rows to ``batch`` images: repeat-interleave each prompt's row
    ([p0, p0, …, p1, p1, …], as upstream batches prompts). A single row broadcasts to every image."""
    rows = context.shape[0]
    if mask.shape[:2] != context.shape[:2]:
        raise ValueError(f"{what} mask shape {tuple(mask.shape)} does not match context "
                         f"{tuple(context.shape)}")
    if rows == batch:
        return context, mask
    if rows == 0 or batch % rows:
        raise ValueError(f"{what} has {rows} rows, which cannot be spread over a noise batch of "
                         f"{batch} (need a divisor of {batch})")
    k = batch // rows
    return context.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)


def check_text_features(context, mask=None, *, layers: Optional[int] = None,
                        width: Optional[int] = None,
                        what: str = "prompt") -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt features made elsewhere (a ComfyUI CONDITIONING) checked before :func:`sample`.

    ``context``: ``[B, S, K·E]`` layer-major features of K = 4 text-encoder layers
    (:data:`~lens_model.constants.CAPTURED_LAYERS`); ``mask``: ``[B, S]``, nonzero = a token, None =
    every token; ``layers``: K as the producer records it (None: not recorded); ``width``: the E the
    DiT takes (its ``enc_hidden_dim``; None skips that check). Zero tokens (the empty prompt) carry
    no width to check.

    Returns ``(context float32, mask bool on the CPU)``. Raises ValueError starting with ``what``
    for a context that is not ``[B, S, F]``, another layer count, NaN / Inf features (an encoder
    that overflowed), a mask of another shape, or features of another width.
    """
    k = len(CAPTURED_LAYERS)
    if not torch.is_tensor(context) or context.ndim != 3:
        shape = tuple(context.shape) if torch.is_tensor(context) else type(context).__name__
        raise ValueError(f"{what}: expected Lens text features [B, S, {k}×{TEXT_HIDDEN_SIZE}], "
                         f"got {shape}.")
    if layers is not None and layers != k:
        raise ValueError(f"{what}: conditioning stacks {layers} text-encoder layers; Lens needs {k} "
                         f"(was it encoded for another model?).")
    if not bool(torch.isfinite(context).all()):
        raise ValueError(f"{what}: the conditioning contains NaN or Inf text features (a text "
                         f"encoder that overflowed, e.g. in fp16, or broken weights); re-encode "
                         f"the prompt in bf16 or fp32.")
    if mask is None:
        mask = torch.ones(context.shape[:2], dtype=torch.bool)
    elif tuple(mask.shape) != tuple(context.shape[:2]):
        raise ValueError(f"{what}: attention_mask {tuple(mask.shape)} does not match the "
                         f"features {tuple(context.shape)}.")
    if width is not None and context.shape[1] > 0 and context.shape[-1] != k * width:
        raise ValueError(
            f"{what}: text features have {context.shape[-1]} channels per token, but this Lens DiT "
            f"expects {k}×{width} = {k * width}. Encode the prompt with GPT-OSS TextEncode (or a "
            f"core CLIPLoader of type 'lens')."
        )
    return context.to(torch.float32), mask.to(torch.bool).cpu()


# --------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------

def _model_dtype_device(transformer, fallback_device) -> tuple[torch.dtype, torch.device]:
    """The dtype the model input is cast to and the device it runs on.

    ``resolved_compute_dtype()`` when the model has it (the Lens DiT: e.g. bf16 weights computing in
    fp32 on a CPU without a bf16 path), else ``.dtype``, else the first parameter's dtype.
    """
    resolve = getattr(transformer, "resolved_compute_dtype", None)
    dtype = resolve() if callable(resolve) else getattr(transformer, "dtype", None)
    device = getattr(transformer, "device", None)
    if dtype is None or device is None:
        params = getattr(transformer, "parameters", None)
        p = next(iter(params()), None) if callable(params) else None
        if dtype is None:
            dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        if device is None:
            device = p.device if p is not None else fallback_device
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        dtype = torch.bfloat16  # quantised storage: compute dtype is bf16 unless the model says so
    return dtype, torch.device(device)


def sample(transformer, noise: torch.Tensor, sigmas: torch.Tensor, context: torch.Tensor,
           context_mask: torch.Tensor, negative_context: Optional[torch.Tensor] = None,
           negative_mask: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
           callback: Optional[StepCallback] = None, cfg_mode: str = "upstream",
           batch_cfg: bool = False, denoise_mask: Optional[torch.Tensor] = None,
           init_latents: Optional[torch.Tensor] = None,
           init_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the Lens Euler sampler; returns the final latents ``[B, 128, h, w]`` float32 on the
    transformer's device (BN-normalised, ready for ``vae.decode``).

    Args:
        transformer: callable ``(x [B,128,h,w], sigma [B], context [B,S,4E], mask [B,S] bool) ->
            v [B,128,h,w]`` exposing ``.dtype`` / ``.device`` (or parameters).
        noise: ``[B, 128, h, w]`` start latent at σ_0 (pure noise for txt2img, see
            :func:`noise_image_latents` for img2img).
        sigmas: ``[n + 1]`` schedule ending in 0 (:func:`lens_sigmas`, :func:`img2img_sigmas`, …).
        context, context_mask: positive text ``[Bp, S, 4E]`` / ``[Bp, S]``; Bp must divide B and
            rows are repeat-interleaved over the images (Bp = 1 broadcasts).
        negative_context, negative_mask: negative text ``[Bn, S_neg, 4E]``; None means the empty
            negative (a zero-length text stream, S = 0). Bn = 1 broadcasts.
        guidance_scale: g, finite, in [0, 100] (checked before anything runs). At g = 1 the
            unconditional pass is skipped (identical result).
        callback: ``callback(step, total, x, denoised)`` after each Euler step, with ``step`` the
            0-based index k of the step just taken (progress = step + 1 of total), ``x`` the new
            latent x_{k+1} and ``denoised`` = x_k − σ_k·v (the x₀ preview). Exceptions it raises
            (e.g. ComfyUI's interrupt) propagate unchanged.
        cfg_mode: "upstream" (per-token norm rescale in velocity space) or "comfyui" (x₀-space CFG
            + CFGNorm clamp), see :func:`cfg_combine`.
        batch_cfg: False (default) runs cond and uncond as two passes of B, which halves the peak
            activation memory; True runs them as one 2B batch (upstream's way) with the text padded
            to a common length by zero features and mask False. Both agree to rounding.
        denoise_mask: inpainting (core's ``KSamplerX0Inpaint`` semantics, see "Inpainting" in the
            module docstring): ``[B or 1, 1 or 128, h, w]`` in [0, 1] on the latent grid
            (:func:`latent_mask`), 1 = regenerate, 0 = keep ``init_latents``, soft values blend.
            Cells with m = 0 come out exactly equal to z; a mask of ones gives exactly the unmasked
            result.
        init_latents: z ``[B or 1, 128, h, w]``, the original image latents; required with
            ``denoise_mask``.
        init_noise: ε ``[B, 128, h, w]``, the pure noise the original is noised with. Defaults to
            ``noise`` when σ_0 = 1 (the start latent is then pure noise); for a partial schedule
            (img2img, σ_0 < 1) pass the ε that built ``noise = σ_0·ε + (1 − σ_0)·z``.

    The running latent stays float32 between steps; the model is called with x cast to its compute
    dtype (``resolved_compute_dtype()`` if the model has it, else ``.dtype``) and σ_k as a float32
    ``[B]`` tensor (the DiT rounds it to its own dtype); the output is upcast to float32, and CFG
    and the Euler update x ← x + (σ_{k+1} − σ_k)·v are float32. The text features are passed in
    their own dtype (moved to the model's device).

    Raises:
        ValueError: bad options (:func:`check_sampling_options`), shapes or non-finite sigmas,
            before the first model call.
        NonFiniteError: (a ValueError) the start latent is not finite, or NaN/Inf appears during
            sampling; it names the step and the likely cause (fp16 overflow or broken weights
            when the DiT output itself is non-finite, extreme guidance when only the guided
            velocity is). One ``isfinite`` reduction per step detects it.
    """
    sig = _checked_sigmas(noise, sigmas, cfg_mode, guidance_scale)
    dtype, device = _model_dtype_device(transformer, noise.device)
    text = _SamplerText.build(context, context_mask, negative_context, negative_mask,
                              noise.shape[0], device, float(guidance_scale) != 1.0, batch_cfg)
    x = noise.to(device=device, dtype=torch.float32)
    n = sig.numel() - 1
    inpaint = _inpaint_inputs(denoise_mask, init_latents, init_noise, x, float(sig[0]), n)
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(
            "the start latent contains NaN or Inf before step 1: the noise or the image latents "
            "(img2img) are broken; check the input latent or image.", 0, n, "start latent")
    with torch.no_grad():
        return _euler_steps(transformer, x, sig, text, float(guidance_scale), cfg_mode, inpaint,
                            dtype, callback)


def _checked_sigmas(noise: torch.Tensor, sigmas, cfg_mode: str, guidance_scale) -> torch.Tensor:
    """Check :func:`sample`'s noise shape, schedule, CFG mode and scale; the schedule as a float32
    CPU vector ``[n + 1]``."""
    if noise.dim() != 4 or noise.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"noise must be [B, {LATENT_CHANNELS}, h, w], got {tuple(noise.shape)}")
    sig = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
    if sig.numel() < 2:
        raise ValueError(f"sigmas needs at least 2 values (n + 1 for n steps), got {sig.numel()}")
    if cfg_mode not in CFG_MODES:
        raise ValueError(f"cfg_mode must be 'upstream' or 'comfyui', got {cfg_mode!r}")
    check_sampling_options(guidance_scale=guidance_scale)
    if not bool(torch.isfinite(sig).all()):
        raise ValueError(f"sigmas must be finite, got {sig.tolist()}")
    return sig


def _euler_steps(transformer, x: torch.Tensor, sig: torch.Tensor, text: _SamplerText, g: float,
                 cfg_mode: str, inpaint: Optional[_Inpainting], dtype: torch.dtype,
                 callback: Optional[StepCallback]) -> torch.Tensor:
    """The Euler loop of :func:`sample` over the checked inputs: x ``[B, 128, h, w]`` float32 on the
    model's device, the schedule ``sig`` ``[n + 1]``; returns the final latent."""
    n = sig.numel() - 1
    for k in range(n):
        s_k = float(sig[k])
        t = torch.full((x.shape[0],), s_k, dtype=torch.float32, device=x.device)
        x_model = inpaint.model_input(x, s_k) if inpaint is not None else x
        v_c, v_u = text.velocities(transformer, x_model.to(dtype), t)
        if v_u is not None:
            v = cfg_combine(v_c, v_u, g, cfg_mode, x=x_model, sigma=s_k)
        elif cfg_mode == "comfyui":
            v = cfg_combine(v_c, v_c, 1.0, cfg_mode, x=x_model, sigma=s_k)
        else:
            v = v_c
        if inpaint is not None and s_k > 0.0:
            v = inpaint.step_velocity(v, x, x_model, s_k)
        denoised = x - s_k * v if callback is not None else None
        x = x + (sig[k + 1] - sig[k]).item() * v
        if inpaint is not None and k == n - 1:
            x = inpaint.keep_original(x)
        if not bool(torch.isfinite(x).all()):  # one reduction per step
            raise _non_finite(k, n, s_k, g, v_c, v_u, v)
        del v_u
        if callback is not None:
            callback(k, n, x, denoised)
    return x


@dataclass(frozen=True, eq=False)
class _SamplerText:
    """The text of a :func:`sample` run, expanded to the noise batch on the model's device.

    ``negative_context`` / ``negative_mask`` are None without guidance (g = 1: no unconditional
    pass) and the empty text stream when no negative was given. With ``batch_cfg`` the positive and
    the negative are also padded to one length and stacked as ``joint_context`` ``[2B, S, 4E]`` /
    ``joint_mask`` ``[2B, S]`` for a single 2B pass.
    """

    context: torch.Tensor
    mask: torch.Tensor
    negative_context: Optional[torch.Tensor] = None
    negative_mask: Optional[torch.Tensor] = None
    joint_context: Optional[torch.Tensor] = None
    joint_mask: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, context, context_mask, negative_context, negative_mask, batch: int,
              device: torch.device, use_uncond: bool, batch_cfg: bool) -> _SamplerText:
        ctx, msk, nctx, nmsk = _text_inputs(context, context_mask, negative_context, negative_mask,
                                            batch, device, use_uncond)
        if not (use_uncond and batch_cfg):
            return cls(ctx, msk, nctx, nmsk)
        pc, pm, nc, nm = align_text(ctx, msk, nctx, nmsk)
        return cls(ctx, msk, nctx, nmsk, torch.cat([pc, nc], dim=0), torch.cat([pm, nm], dim=0))

    def velocities(self, transformer, xin: torch.Tensor,
                   t: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The conditional and unconditional velocities (float32) at input ``xin`` and σ ``t``;
        the unconditional one is None without guidance."""
        if self.joint_context is not None:
            out = transformer(torch.cat([xin, xin]), torch.cat([t, t]), self.joint_context,
                              self.joint_mask)
            v_c, v_u = out.float().chunk(2)
            return v_c, v_u
        v_c = transformer(xin, t, self.context, self.mask).float()
        if self.negative_context is None:
            return v_c, None
        return v_c, transformer(xin, t, self.negative_context, self.negative_mask).float()


def _text_inputs(context, context_mask, negative_context, negative_mask, batch: int,
                 device: torch.device, use_uncond: bool):
    """Positive and negative text expanded to ``batch`` rows on ``device``: ``(ctx, mask, nctx,
    nmask)``; the negative is None without guidance, the empty text stream when not given. The
    features keep their dtype (the negative takes the positive's); the DiT normalises them in fp32."""
    ctx, msk = expand_batch(context, context_mask, batch, "positive prompt")
    ctx = ctx.to(device=device)
    msk = msk.to(device=device, dtype=torch.bool)
    if not use_uncond:
        return ctx, msk, None, None
    if negative_context is None:
        nctx, nmsk = empty_text(batch, ctx.shape[-1], device=device, dtype=ctx.dtype)
        return ctx, msk, nctx, nmsk
    if negative_mask is None:
        negative_mask = torch.ones(negative_context.shape[:2], dtype=torch.bool)
    if negative_context.shape[-1] != ctx.shape[-1]:
        raise ValueError(f"negative features have {negative_context.shape[-1]} channels, "
                         f"the positive {ctx.shape[-1]}")
    nctx, nmsk = expand_batch(negative_context, negative_mask, batch, "negative prompt")
    return ctx, msk, nctx.to(device=device, dtype=ctx.dtype), nmsk.to(device=device, dtype=torch.bool)


def _inpaint_inputs(denoise_mask, init_latents, init_noise, x: torch.Tensor, sigma0: float,
                    steps: int) -> Optional[_Inpainting]:
    """The checked inpainting inputs (m, 1 − m, z, ε) on x's device in fp32 for :func:`sample`, or
    None without a mask."""
    if denoise_mask is None:
        if init_noise is not None:
            raise ValueError("init_noise is only used with denoise_mask")
        return None
    b, c, h, w = x.shape
    if init_latents is None:
        raise ValueError("denoise_mask needs init_latents (the original image latents to keep)")
    m = torch.as_tensor(denoise_mask).to(device=x.device, dtype=torch.float32)
    if m.ndim != 4 or m.shape[0] not in (1, b) or m.shape[1] not in (1, c) or m.shape[2:] != (h, w):
        raise ValueError(f"denoise_mask must be [B or 1, 1 or {c}, {h}, {w}] on the latent grid "
                         f"(see latent_mask), got {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()) or float(m.min()) < 0.0 or float(m.max()) > 1.0:
        raise ValueError("denoise_mask values must be finite and in [0, 1]")
    z = init_latents.to(device=x.device, dtype=torch.float32)
    if z.ndim != 4 or z.shape[0] not in (1, b) or z.shape[1:] != x.shape[1:]:
        raise ValueError(f"init_latents {tuple(z.shape)} do not match the noise {tuple(x.shape)}")
    if init_noise is None:
        if sigma0 != 1.0:
            raise ValueError(f"the schedule starts at sigma {sigma0:.4g} < 1: pass init_noise, the "
                             f"pure noise the start latent was made from")
        eps = x
    else:
        eps = init_noise.to(device=x.device, dtype=torch.float32)
        if eps.shape != x.shape:
            raise ValueError(f"init_noise {tuple(eps.shape)} does not match the noise "
                             f"{tuple(x.shape)}")
    if not (bool(torch.isfinite(z).all()) and bool(torch.isfinite(eps).all())):
        raise NonFiniteError("the inpainting init_latents or init_noise contain NaN or Inf "
                             "before step 1", 0, steps, "start latent")
    return _Inpainting(m, 1.0 - m, z, eps)


@dataclass(frozen=True, eq=False)
class _Inpainting:
    """The checked inpainting inputs of :func:`sample`, float32 on the latent's device: the mask m
    ``[B or 1, 1 or 128, h, w]``, ``keep`` = 1 − m, the original latents z and the pure noise ε."""

    mask: torch.Tensor
    keep: torch.Tensor
    z: torch.Tensor
    eps: torch.Tensor

    def model_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The model's input at σ: x inside the mask, the original noised to σ outside it,
        x_in = x·m + (σ·ε + (1 − σ)·z)·(1 − m)."""
        return x * self.mask + (sigma * self.eps + (1.0 - sigma) * self.z) * self.keep

    def step_velocity(self, v: torch.Tensor, x: torch.Tensor, x_model: torch.Tensor,
                      sigma: float) -> torch.Tensor:
        """The Euler step's velocity with the model's x₀ estimate blended back to the original
        outside the mask (σ > 0)."""
        # core: x0 = x_in − σ·v, x0 ← x0·m + z·(1 − m), step direction d = (x − x0)/σ.
        # Rearranged as d = v·m + (x − x_in·m − z·(1 − m))/σ: the same value, and exactly
        # v where m = 1 (then x_in = x), so a mask of ones changes nothing.
        return v * self.mask + (x - x_model * self.mask - self.z * self.keep) / sigma

    def keep_original(self, x: torch.Tensor) -> torch.Tensor:
        """After the last step: unmasked cells end exactly at the original, x·m + z·(1 − m)."""
        return x * self.mask + self.z * self.keep


def _non_finite(k: int, n: int, sigma: float, g: float, v_c: torch.Tensor,
                v_u: Optional[torch.Tensor], v: torch.Tensor) -> NonFiniteError:
    """The error for a latent that became non-finite at step k (0-based), naming the likely cause."""
    at = f"at step {k + 1} of {n} (sigma {sigma:.4g})"
    if not bool(torch.isfinite(v_c).all()) or (v_u is not None and not bool(torch.isfinite(v_u).all())):
        which = "conditional" if not bool(torch.isfinite(v_c).all()) else "unconditional"
        return NonFiniteError(
            f"the DiT returned NaN or Inf ({which} pass) {at}. Likely causes: a compute dtype "
            f"that overflows (fp16: use bf16 or fp32), or broken weights (a corrupt or wrong DiT "
            f"file, or a bad quantisation).", k + 1, n, "model output")
    if not bool(torch.isfinite(v).all()):
        return NonFiniteError(
            f"the guided velocity became NaN or Inf {at} with guidance scale {g:g} although the "
            f"model outputs are finite: the guidance is too extreme; lower cfg.",
            k + 1, n, "guided velocity")
    return NonFiniteError(
        f"the latent became NaN or Inf {at}: the velocity is finite but too large (extreme "
        f"guidance {g:g}, or a model/dtype problem such as fp16 overflow).", k + 1, n, "latent")


def sample_to_tokens(latents: torch.Tensor) -> torch.Tensor:
    """``[B, 128, h, w]`` → upstream token layout ``[B, h·w, 128]`` (row-major)."""
    b, c, h, w = latents.shape
    return latents.permute(0, 2, 3, 1).reshape(b, h * w, c)


def tokens_to_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Upstream token layout ``[B, h·w, 128]`` → ``[B, 128, h, w]``."""
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not form a {h}×{w} grid")
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


__all__: Sequence[str] = (
    "check_sampling_options", "NonFiniteError", "SamplingPlan", "plan_sampling", "SCHEDULES", "NOISE_LAYOUTS", "CFG_MODES", "MAX_STEPS", "empirical_mu", "lens_sigmas", "comfyui_mu", "comfyui_sigmas", "img2img_sigmas",
    "make_noise", "noise_image_latents", "latent_mask", "repeat_to_batch", "MASK_MODES", "cfg_combine", "empty_text", "pad_text", "align_text",
    "expand_batch", "sample", "image_tokens", "sample_to_tokens", "tokens_to_latents",
)
