"""End-to-end Lens text-to-image for Python users and the command-line tool.

Memory ladder: the text encoder, the DiT and the VAE are never needed at the
same time, so each is loaded, used and released in turn:

1. load the text encoder, encode the prompt(s) (and a non-empty negative when CFG ≠ 1), free it;
2. (img2img only) load the VAE and encode the input image;
3. load the DiT, sample, free it;
4. load the VAE (unless already loaded), decode.

Callers that already hold loaded modules (e.g. the ComfyUI nodes) use :mod:`lens_model.sampling`
directly, or :func:`generate_from_features` with module objects instead of paths.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import operator
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import dit_loading, ops, text_encoder as text_encoder_module, vae_loading
from .checkpoints import CheckpointError, WrongComponentError
from .constants import LATENT_CELL_PIXELS, LATENT_CHANNELS
from .dit_loading import inspect_transformer, variant_defaults_for
from .text_encoder import DEFAULT_SELECTED_LAYERS, inspect_text_encoder
from .vae_loading import inspect_vae
from .lora import applied as lora_applied, as_lora_list
from .resolution import schedule_jump_warning, validate_size
from .sampling import (
    CFG_MODES, NOISE_LAYOUTS, SCHEDULES, SamplingPlan, StepCallback, check_sampling_options, latent_mask,
    make_noise, plan_sampling, sample,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

ProgressCallback = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: ``stage`` is one of :data:`STAGES`; it may raise to abort."""

STAGES = ("text encoder", "VAE encode", "sampling", "VAE decode")
"""Progress stages, in order: text-encoder layers (per encoded prompt batch), VAE encoder blocks
(img2img only), sampling steps, VAE decoder blocks."""

SEED_MAX = 2**64 - 1
"""Largest seed: seeds are 0..2⁶⁴−1, the range of ComfyUI's seed widgets (0..0xffffffffffffffff)
and of ``torch.Generator.manual_seed``."""

MAX_BATCH = 64
"""Largest ``batch`` (images per prompt) :func:`generate` accepts."""

OUTPUT_TYPES = ("pil", "pt", "latent")
"""What :func:`generate` / :func:`generate_from_features` can return: PIL images, an image tensor
``[B, H, W, 3]`` in 0..1, or the latents ``[B, 128, h, w]``."""

PYTHON_NAMES = {"steps": "steps", "guidance_scale": "guidance", "denoise": "denoise", "mu": "mu",
                "seed": "seed", "batch": "batch"}
"""How :func:`check_generation_options` names each option by default (the Python argument)."""

PYTHON_FILE_LABELS = {"dit": "transformer_path", "te": "text_encoder_path", "vae": "vae_path"}
PYTHON_FILE_FIXES = {"dit": "Pass it as transformer_path.", "te": "Pass it as text_encoder_path.",
                     "vae": "Pass it as vae_path."}
"""How :func:`check_model_files` names the files, and what it tells the user to do with a file of
another kind, by default (the command-line tool passes its option names instead)."""


def check_generation_options(steps=None, guidance=None, mu=None, denoise=None, seed=None,
                             batch=None, names: Optional[Mapping[str, str]] = None) -> None:
    """Validate generation options before any model runs; ``None`` skips an option.

    ``steps``, ``guidance``, ``denoise`` and ``mu`` go through
    :func:`lens_model.sampling.check_sampling_options` (steps 1..200, finite guidance in [0, 100],
    denoise in (0, 1], μ in [−20, 20]; NaN / Inf never pass); ``seed`` must be an integer in
    0..:data:`SEED_MAX`, ``batch`` in 1..:data:`MAX_BATCH`. Raises ValueError naming the option
    (``names`` maps the keys of :data:`PYTHON_NAMES` to what the caller's user knows, e.g.
    ``{"guidance_scale": "--cfg"}``), its value and the accepted range.
    """
    names = dict(PYTHON_NAMES, **(names or {}))
    check_sampling_options(steps=steps, guidance_scale=guidance, denoise=denoise, mu=mu,
                           names=names)
    for key, value, lo, hi in (("seed", seed, 0, SEED_MAX), ("batch", batch, 1, MAX_BATCH)):
        if value is None:
            continue
        try:
            as_int = None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            as_int = None
        if as_int is None or not lo <= as_int <= hi:
            raise ValueError(f"{names[key]} must be an integer from {lo} to {hi}, got {value!r}")


@dataclass(frozen=True)
class ModelFiles:
    """What :func:`check_model_files` read from the headers (None for a file not given)."""

    transformer: Any = None   # lens_model.dit.LensDiTConfig
    text_encoder: Any = None  # lens_model.text_encoder.GptOssConfig
    vae: Any = None           # lens_model.vae.Flux2VAEConfig


def check_model_files(transformer_path: Optional[PathLike] = None,
                      text_encoder_path: Optional[PathLike] = None,
                      vae_path: Optional[PathLike] = None, *,
                      labels: Optional[Mapping[str, str]] = None,
                      fixes: Optional[Mapping[str, str]] = None) -> ModelFiles:
    """Check the model files from their headers only (milliseconds; nothing is loaded).

    Each given file must be the right kind of model, in a known layout, with every tensor shape
    consistent (:func:`~lens_model.dit_loading.inspect_transformer`,
    :func:`~lens_model.text_encoder.inspect_text_encoder`, :func:`~lens_model.vae_loading.inspect_vae`), and
    the files must fit each other: the text encoder's width and layer count feed the DiT's text
    input, the VAE's latent channels are the DiT's. Messages start with the file's label
    (``labels``, keyed "dit" / "te" / "vae"; default the :func:`generate` argument names) and a file
    of another kind gets the fix in ``fixes`` (default :data:`PYTHON_FILE_FIXES`; see
    :func:`lens_model.checkpoints.wrong_kind_message`). Raises FileNotFoundError or
    :class:`~lens_model.checkpoints.CheckpointError` (a ValueError).
    """
    labels = dict(PYTHON_FILE_LABELS, **(labels or {}))
    fixes = PYTHON_FILE_FIXES if fixes is None else fixes
    found = {}
    for key, path, inspect in (("dit", transformer_path, inspect_transformer),
                               ("te", text_encoder_path, inspect_text_encoder),
                               ("vae", vae_path, inspect_vae)):
        if path is None:
            continue
        if not Path(path).exists():
            raise FileNotFoundError(f"{labels[key]}: {str(path)!r} does not exist")
        try:
            found[key] = inspect(path)
        except WrongComponentError as e:
            raise CheckpointError(f"{labels[key]}: {e.reworded(fixes)}") from None
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{labels[key]}: {e}") from None
        except ValueError as e:  # CheckpointError and the configuration checks
            raise CheckpointError(f"{labels[key]}: {e}") from None
    dit, te, vae = found.get("dit"), found.get("te"), found.get("vae")
    if dit is not None and te is not None:
        layers = tuple(DEFAULT_SELECTED_LAYERS)
        if te.hidden_size != dit.enc_hidden_dim or dit.num_text_layers != len(layers):
            raise CheckpointError(
                f"{labels['te']} and {labels['dit']} do not fit each other: the text encoder gives "
                f"{len(layers)} layers of width {te.hidden_size}, the DiT takes {dit.num_text_layers} "
                f"of width {dit.enc_hidden_dim}. Lens needs gpt-oss-20b (width 2880) with the Lens DiT; "
                "pick files of the same model (tiny test models only fit each other).")
        if te.num_hidden_layers <= max(layers):
            raise CheckpointError(
                f"{labels['te']}: the text encoder has {te.num_hidden_layers} layers; Lens reads "
                f"layers {list(layers)} (gpt-oss-20b has 24).")
    if dit is not None and vae is not None and vae.bn_channels != dit.in_channels:
        raise CheckpointError(
            f"{labels['vae']} and {labels['dit']} do not fit each other: the VAE's latents have "
            f"{vae.bn_channels} channels, the DiT takes {dit.in_channels}. Lens needs the FLUX.2 VAE.")
    return ModelFiles(dit, te, vae)

def check_loras(lora, dit) -> list:
    """Read the LoRA(s) in ``lora`` (anything :func:`lens_model.lora.as_lora_list` takes; None for
    none) and check each against the DiT: a loaded module, or the
    :class:`~lens_model.dit.LensDiTConfig` that :func:`check_model_files` /
    :func:`~lens_model.dit_loading.inspect_transformer` read from the header (None skips the shape check).

    Returns ``[(LensLoRA, strength), ...]``. Raises FileNotFoundError for a missing file and
    :class:`~lens_model.lora.LoRAError` (a ValueError) for a refused or ill-fitting one, naming the
    file and every problem; this reads only the LoRA files, so it takes seconds at most.
    """
    loras = as_lora_list(lora)
    if dit is not None:
        for lo, _ in loras:
            lo.check(dit)
    return loras


def variant_defaults(name: Optional[PathLike]) -> dict:
    """Step/CFG defaults guessed from a checkpoint path (``dit.variant_defaults_for``): "turbo" →
    4 / 1.0, "base" → 50 / 5.0, anything else → Lens 20 / 5.0. Checkpoint keys do not say which
    variant a file is, so the name is the only hint; users may override."""
    return variant_defaults_for(str(name or ""))


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[B, H, W, 3]`` float in [0, 1] → uint8 by truncation of 255·I.

    With I = clamp((x̂ + 1)/2, 0, 1) this is upstream's PIL conversion, truncation of 127.5·(x̂ + 1)
    (and ComfyUI SaveImage's clip(255·I) truncation), up to fp32 rounding exactly at integers.
    """
    return (images.float().clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def to_pil(images: torch.Tensor) -> list:
    """``[B, H, W, 3]`` float in [0, 1] → list of RGB ``PIL.Image`` (see :func:`images_to_uint8`)."""
    arr = images_to_uint8(images.cpu()).numpy()
    return [Image.fromarray(a) for a in arr]  # uint8 [H, W, 3] -> RGB


def _free(device: Optional[torch.device] = None) -> None:
    """Collect garbage, hand freed heap memory back to the OS and empty the CUDA cache.

    ``malloc_trim`` matters on the CPU: once the text encoder has freed buffers larger than glibc's
    initial mmap threshold, the threshold rises (up to 32 MB) and the DiT's per-tensor allocations
    land in the heap, where freeing them keeps them resident (measured: 8.1 GB still resident after
    ``del``; bench/bench_end_to_end.py)."""

    gc.collect()
    ops.release_free_memory()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


def _open_image(image, what: str, mode: str):
    """A path → the decoded PIL image in ``mode`` (the file is closed at once); else unchanged."""
    if not isinstance(image, (str, os.PathLike)):
        return image
    if not Path(image).is_file():
        raise FileNotFoundError(f"{what} {str(image)!r} does not exist")
    with Image.open(image) as im:
        return im.convert(mode)


def _as_image_tensor(image, width: int, height: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """A PIL image, a path or a ``[B, H, W, 3]`` / ``[H, W, 3]`` tensor in [0, 1] → ``[B, H, W, 3]``
    at width × height (PIL inputs are resized with Lanczos; tensors must have that size already),
    and the size (W, H) it was given in."""
    image = _open_image(image, "init image", "RGB")
    if isinstance(image, torch.Tensor):
        t = image.float()
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.dim() != 4 or t.shape[-1] not in (3, 4):
            raise ValueError(f"init image tensor must be [B, H, W, 3] in 0..1, got {tuple(t.shape)}")
        if t.shape[2] != width or t.shape[1] != height:
            raise ValueError(f"init image is {t.shape[2]}x{t.shape[1]}, the generation size "
                             f"{width}x{height}; resize it first")
        return t[..., :3], (width, height)
    img = image.convert("RGB")
    given = img.size
    if img.size != (width, height):
        img = img.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img).copy()).float().div(255.0).unsqueeze(0), given


def _as_mask_tensor(mask, image_size: tuple[int, int], width: int, height: int) -> torch.Tensor:
    """An inpainting mask (path, PIL image or ``[H, W]`` / ``[B, H, W]`` / ``[B, 1, H, W]`` tensor;
    1 / white = repaint, soft values blend; images are read as grayscale) → ``[B, H, W]`` float in
    [0, 1] at width × height.

    The mask must have the size the init image was given in (``image_size``, W × H): it is made for
    that picture. When the image is resized to the generation size the mask is resized with it
    (bilinear, antialiased) and an info line says so; any other size is a ValueError.
    """

    mask = _open_image(mask, "mask", "L")
    if isinstance(mask, torch.Tensor):
        m = mask.detach().to(device="cpu", dtype=torch.float32)
        if m.dim() == 4 and m.shape[1] == 1:
            m = m[:, 0]
        m = m.unsqueeze(0) if m.dim() == 2 else m
        if m.dim() != 3 or m.numel() == 0:
            raise ValueError(f"mask tensor must be [H, W], [B, H, W] or [B, 1, H, W] in 0..1, got "
                             f"{tuple(mask.shape)}")
        if not bool(torch.isfinite(m).all()):
            raise ValueError("mask contains NaN or Inf")
    else:  # PIL
        m = torch.from_numpy(np.asarray(mask.convert("L")).copy()).float().div(255.0)[None]
    size = (m.shape[2], m.shape[1])
    if size != tuple(image_size):
        raise ValueError(f"mask is {size[0]}x{size[1]} but the init image is {image_size[0]}x"
                         f"{image_size[1]}; the mask must have its image's size")
    if size != (width, height):
        logger.info("mask resized from %dx%d to %dx%d with the init image", *size, width, height)
        m = F.interpolate(m[:, None], size=(height, width), mode="bilinear", align_corners=False,
                          antialias=True)[:, 0]
    return m.clamp(0.0, 1.0)


def load_init_image(image, mask, width: int, height: int):
    """Read and check the img2img / inpainting inputs of :func:`generate` at the generation size.

    ``image``: path, PIL image (resized with Lanczos to width × height) or ``[B, H, W, 3]`` tensor
    in 0..1 (of that size); ``mask``: see :func:`generate_from_features`. Returns ``(image
    [B, H, W, 3] float or None, mask [B, H, W] float in [0, 1] or None)``, which :func:`generate`
    accepts as they are. Raises FileNotFoundError, or ValueError for a mask without an image, a mask
    of another size than its image, or a malformed tensor.
    """
    if mask is not None and image is None:
        raise ValueError("a mask needs an init image (image=..., --image): the mask says where to "
                         "repaint that image")
    if image is None:
        return None, None
    img, given = _as_image_tensor(image, width, height)
    return img, None if mask is None else _as_mask_tensor(mask, given, width, height)


def generate_from_features(
    context: torch.Tensor, context_mask: torch.Tensor, transformer, vae, width: int, height: int,
    steps: Optional[int] = None, guidance: Optional[float] = None,
    negative_context: Optional[torch.Tensor] = None, negative_mask: Optional[torch.Tensor] = None,
    seed: int = 0, batch: int = 1, noise: Optional[torch.Tensor] = None,
    sigmas: Optional[torch.Tensor] = None, mu: Optional[float] = None, schedule: str = "upstream",
    noise_layout: str = "upstream", cfg_mode: str = "upstream", image=None, denoise: float = 1.0,
    device=None, dtype: Optional[torch.dtype] = None, vae_dtype: Optional[torch.dtype] = None,
    vae_tile="auto", callback: Optional[StepCallback] = None, output_type: str = "pil",
    progress: Optional[ProgressCallback] = None, lora=None, mask=None,
):
    """Sample and decode from precomputed text features (no text encoder needed).

    Args:
        context, context_mask: ``[P, S, 4E]`` layer-major features / ``[P, S]`` mask of P prompts.
        transformer, vae: a path (loaded here and released after use) or an already loaded module.
        width, height: output size in pixels (multiples of 16, ≤ 2080).
        steps, guidance: default from the transformer's variant (turbo 4 / 1.0, base 50 / 5.0,
            otherwise 20 / 5.0).
        negative_context, negative_mask: ``[1 or P, S_neg, 4E]``; None = empty negative.
        seed, batch: noise seed and images per prompt (B = P·batch); ``noise`` ``[B, 128, h, w]``
            replaces the seeded draw. ``noise_layout`` "upstream" or "comfy" (:func:`make_noise`).
        sigmas: explicit schedule ``[n + 1]``; otherwise ``schedule`` "upstream" (empirical μ,
            ``mu`` override) or "comfyui". ``cfg_mode`` see :func:`lens_model.sampling.cfg_combine`.
        image, denoise: img2img input (PIL image, path, or ``[B, H, W, 3]`` tensor in 0..1) and
            strength s ∈ (0, 1]: the last n + 1 values of an ⌊n/s⌋-step schedule, x = σ_start·noise +
            (1 − σ_start)·z_img (:func:`lens_model.sampling.plan_sampling`).
        mask: inpainting (needs ``image``; any ``denoise``): a path, PIL image or ``[H, W]`` /
            ``[B, H, W]`` / ``[B, 1, H, W]`` tensor in 0..1 of the image's size, 1 / white = repaint,
            soft values blend (images are read as grayscale). Resized with the image to the
            generation size, then to the latent grid by coverage
            (:func:`lens_model.sampling.latent_mask`); outside it the result keeps the encoded
            image exactly (``sample(denoise_mask=...)``). A mask of ones is plain img2img.
        device, dtype: where / in which dtype the DiT runs (default CUDA if present; dtype None keeps
            the stored dtype). ``vae_dtype`` likewise for the VAE.
        output_type: "pil" (list of PIL images), "pt" (``[B, H, W, 3]`` float in 0..1) or
            "latent" (``[B, 128, h, w]`` float32, no decode).
        progress: ``progress(stage, done, total)`` after each VAE encoder block ("VAE encode"),
            sampling step ("sampling") and VAE decoder block ("VAE decode"); it may raise to stop.
        lora: LoRA(s) for the DiT: a path, ``"FILE:STRENGTH"``, a
            :class:`~lens_model.lora.LensLoRA`, a ``(lora, strength)`` pair or a list of these
            (:func:`lens_model.lora.as_lora_list`). Applied as side paths while sampling only and
            always removed afterwards (also on errors), so a DiT passed as a module is left as it was.

    Options are checked (:func:`check_generation_options`), a transformer or VAE given as a path
    is checked from its header (:func:`check_model_files`), and LoRA files are read and checked
    against the DiT's shapes (:func:`check_loras`), before any model runs.
    """
    check_generation_options(steps=steps, guidance=guidance, mu=mu, denoise=denoise, seed=seed,
                             batch=batch)
    _check_choices(output_type, schedule, noise_layout, cfg_mode)
    width, height = validate_size(width, height)
    image, mask = load_init_image(image, mask, width, height)
    device = torch.device(device) if device is not None else default_device()
    models = _Models(transformer, vae, device, dtype, vae_dtype, vae_tile)
    loras = models.checked_loras(lora)
    warn = schedule_jump_warning(width, height)
    if warn:
        logger.warning(warn)
    steps, guidance = _steps_and_guidance(transformer, steps, guidance)
    options = _SamplingOptions(width, height, steps, guidance, seed, int(batch), noise, sigmas, mu,
                               schedule, noise_layout, cfg_mode, denoise)
    prompts = _Prompts(context, context_mask, negative_context, negative_mask)
    latents, vae_model = _sample_latents(models, loras, prompts, options, image, mask, callback,
                                         progress)
    if output_type == "latent":
        return latents.cpu()
    images = _decode_stage(models, vae_model, latents, progress)
    return images if output_type == "pt" else to_pil(images)


@dataclass(frozen=True)
class _Models:
    """The DiT and the VAE of one run: each a path (loaded when needed and released after use) or
    a loaded module (used as is), and where / in which dtype they run."""

    transformer: Any
    vae: Any
    device: torch.device
    dtype: Optional[torch.dtype] = None
    vae_dtype: Optional[torch.dtype] = None
    vae_tile: Any = "auto"

    @property
    def own_dit(self) -> bool:
        return isinstance(self.transformer, (str, os.PathLike))

    @property
    def own_vae(self) -> bool:
        return isinstance(self.vae, (str, os.PathLike))

    def checked_loras(self, lora) -> list:
        """Check the DiT and the VAE given as paths from their headers (:func:`check_model_files`)
        and the LoRAs against the DiT (:func:`check_loras`); returns the LoRAs."""
        files = check_model_files(self.transformer if self.own_dit else None, None,
                                  self.vae if self.own_vae else None)
        return check_loras(lora, files.transformer if self.own_dit else self.transformer)

    def dit(self):
        if not self.own_dit:
            return self.transformer
        return dit_loading.load_transformer(self.transformer, dtype=self.dtype, device=self.device)

    def vae_module(self):
        if not self.own_vae:
            return self.vae
        return vae_loading.load_vae(self.vae, dtype=self.vae_dtype, device=self.device)


@dataclass(frozen=True)
class _Prompts:
    """Text features of P prompts ``[P, S, 4E]`` / ``[P, S]`` and of the negative (None: empty)."""

    context: torch.Tensor
    mask: torch.Tensor
    negative_context: Optional[torch.Tensor] = None
    negative_mask: Optional[torch.Tensor] = None

    @property
    def rows(self) -> int:
        return int(self.context.shape[0])


def _steps_and_guidance(transformer, steps, guidance) -> tuple[int, float]:
    """Steps and CFG, defaulting from the DiT's variant (its ``variant_defaults``, else its name)."""
    own = isinstance(transformer, (str, os.PathLike))
    defaults = None if own else getattr(transformer, "variant_defaults", None)
    if not defaults:
        defaults = variant_defaults(transformer if own else getattr(transformer, "name", None))
    return (int(steps if steps is not None else defaults["steps"]),
            float(guidance if guidance is not None else defaults["cfg"]))


@dataclass(frozen=True, eq=False)
class _SamplingOptions:
    """What one :func:`generate_from_features` run samples, gathered once after the checks: the
    validated size, the steps and CFG with the variant's defaults filled in, the noise (a seeded
    draw of ``batch`` images per prompt, or ``noise`` as given) and the schedule options that
    :func:`~lens_model.sampling.plan_sampling` turns into the run's plan."""

    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    batch: int
    noise: Optional[torch.Tensor]
    sigmas: Optional[torch.Tensor]
    mu: Optional[float]
    schedule: str
    noise_layout: str
    cfg_mode: str
    denoise: float

    def initial_noise(self, rows: int) -> torch.Tensor:
        """The seeded draw ``[rows·batch, 128, h, w]`` (:func:`make_noise`), or the given noise,
        checked."""
        total = rows * self.batch
        h, w = self.height // LATENT_CELL_PIXELS, self.width // LATENT_CELL_PIXELS
        if self.noise is None:
            return make_noise(self.seed, total, h, w, layout=self.noise_layout)
        if tuple(self.noise.shape) != (total, LATENT_CHANNELS, h, w):
            raise ValueError(f"noise must be [{total}, {LATENT_CHANNELS}, {h}, {w}], got "
                             f"{tuple(self.noise.shape)}")
        return self.noise

    def plan(self, has_init: bool) -> SamplingPlan:
        """The run's schedule and start, decided by :func:`~lens_model.sampling.plan_sampling` (the
        rule the sampler node uses too); its warnings are logged."""
        plan = plan_sampling(self.height, self.width, self.steps, denoise=self.denoise,
                             schedule=self.schedule, mu=self.mu, has_init=has_init,
                             sigmas=self.sigmas)
        for message in plan.warnings:
            logger.warning("%s", message)
        return plan


def _sample_latents(models: _Models, loras: list, prompts: _Prompts, options: _SamplingOptions,
                    image, mask, callback: Optional[StepCallback],
                    progress: Optional[ProgressCallback]):
    """Draw the noise, plan the run, build the start latent (encoding the init image if needed) and
    sample: returns the latents ``[B, 128, h, w]`` and the VAE if the init image loaded it."""
    noise = options.initial_noise(prompts.rows)
    plan = options.plan(has_init=image is not None)
    x, inpaint, vae_model = _start_latents(plan, noise, image, mask, models, progress)
    t0 = time.perf_counter()
    latents = _sample_stage(models, loras, plan, x, prompts, options, inpaint,
                            _step_callback(callback, progress))
    logger.info("sampled %d step(s) at %dx%d, cfg %.2f in %.1f s", plan.steps, options.width,
                options.height, options.guidance, time.perf_counter() - t0)
    return latents, vae_model


def _start_latents(plan, noise, image, mask, models: _Models, progress):
    """The sampler's start latent, its inpainting arguments and the VAE if it was loaded.

    The init image is encoded for img2img (``plan.img2img``) and for inpainting; the start is
    ``plan.start_latents`` (σ_start·noise + (1 − σ_start)·z, or the noise), and with a mask the
    original is kept outside it, noised with the same pure noise (``sample(denoise_mask=...)``).
    """
    if not plan.img2img and mask is None:
        if image is not None:
            logger.warning("an init image was given with denoise 1.0; it is ignored (text-to-image)")
        return noise, {}, None
    vae_model = models.vae_module()
    z = vae_model.encode(image, **_vae_progress(progress, "VAE encode"))
    if z.shape[0] not in (1, noise.shape[0]):
        raise ValueError(f"init image batch {z.shape[0]} does not match {noise.shape[0]} images")
    inpaint = {}
    if mask is not None:
        h, w = noise.shape[-2:]
        inpaint = dict(denoise_mask=latent_mask(mask, h, w, batch=noise.shape[0]), init_latents=z,
                       init_noise=noise)
    return plan.start_latents(noise, z), inpaint, vae_model


def _step_callback(callback: Optional[StepCallback],
                   progress: Optional[ProgressCallback]) -> Optional[StepCallback]:
    """The sampler's step callback: the caller's ``callback``, then ``progress("sampling", ...)``."""
    if progress is None:
        return callback

    def step_callback(k, n, x, denoised):
        if callback is not None:
            callback(k, n, x, denoised)
        progress("sampling", k + 1, n)

    return step_callback


def _sample_stage(models: _Models, loras: list, plan: SamplingPlan, x: torch.Tensor,
                  prompts: _Prompts, options: _SamplingOptions, inpaint: dict,
                  callback) -> torch.Tensor:
    """Run the sampler with the LoRAs attached (and always detached); a DiT loaded here is
    released afterwards."""
    dit = models.dit()
    try:
        with lora_applied(dit, loras) if loras else contextlib.nullcontext():
            return sample(dit, x, plan.sigmas, prompts.context, prompts.mask,
                          prompts.negative_context, prompts.negative_mask,
                          guidance_scale=options.guidance, callback=callback,
                          cfg_mode=options.cfg_mode, **inpaint)
    finally:
        if models.own_dit:
            del dit
            _free(models.device)


def _decode_stage(models: _Models, vae_model, latents: torch.Tensor, progress) -> torch.Tensor:
    """Decode with the VAE (loading it unless img2img already did); a VAE loaded here is released."""
    if vae_model is None:
        vae_model = models.vae_module()
    try:
        return vae_model.decode(latents, tile=models.vae_tile,
                                **_vae_progress(progress, "VAE decode"))
    finally:
        if models.own_vae:
            del vae_model
            _free(models.device)


def _vae_progress(progress: Optional[ProgressCallback], stage: str) -> dict:
    """Keyword arguments for ``Flux2VAE.encode`` / ``decode``: per-block progress under ``stage``."""
    if progress is None:
        return {}
    return {"callback": lambda done, total: progress(stage, done, total), "progress_unit": "block"}


def encode_prompts(text_encoder, prompts: Sequence[str], negative: str = "",
                   need_negative: bool = True, date: Optional[str] = None,
                   progress: Optional[ProgressCallback] = None):
    """Encode prompts (and a non-empty negative) with a loaded text encoder.

    Returns ``(context [P, S, 4E], mask [P, S], negative_context or None, negative_mask or None)``.
    An empty/whitespace negative gives None (a zero-length text stream, what Lens was trained with
    for an empty negative); it is never encoded as a templated empty string.
    ``progress("text encoder", layer, layers)`` follows each encoder run (prompts, then the
    negative).
    """
    kw = {} if date is None else {"date": date}
    if progress is not None:
        kw["callback"] = lambda done, total: progress("text encoder", done, total)
    ctx, mask = text_encoder.encode(list(prompts), **kw)
    nctx = nmask = None
    if need_negative and negative and negative.strip():
        nctx, nmask = text_encoder.encode([negative], **kw)
    return ctx, mask, nctx, nmask


def generate(
    prompt: Union[str, Sequence[str]], negative: str = "",
    transformer_path: Optional[PathLike] = None, text_encoder_path: Optional[PathLike] = None,
    vae_path: Optional[PathLike] = None, width: int = 1024, height: int = 1024,
    steps: Optional[int] = None, guidance: Optional[float] = None, seed: int = 0, batch: int = 1,
    device=None, dtype: Optional[torch.dtype] = None,
    text_encoder_dtype: Optional[torch.dtype] = None, vae_dtype: Optional[torch.dtype] = None,
    date: Optional[str] = None, mu: Optional[float] = None, schedule: str = "upstream",
    noise_layout: str = "upstream", cfg_mode: str = "upstream", image=None, denoise: float = 1.0,
    vae_tile="auto", callback: Optional[StepCallback] = None, output_type: str = "pil",
    progress: Optional[ProgressCallback] = None, lora=None, mask=None,
):
    """Text-to-image (or img2img, or inpainting) from checkpoint paths; returns a list of ``PIL.Image``.

    ``prompt`` may be a list (P prompts); ``batch`` images are made per prompt with one noise draw
    for all P·batch images. Steps and CFG default from the transformer's file name (turbo 4 / 1.0,
    base 50 / 5.0, otherwise 20 / 5.0); at CFG 1 the negative prompt is not encoded (it has no
    effect). The other arguments are those of :func:`generate_from_features`; ``date`` is the
    template date (default 2026-05-23, pinned by the text encoder); ``progress(stage, done, total)``
    also follows the text encoder's layers ("text encoder").

    Before any model runs, the options are checked (:func:`check_generation_options`: NaN / Inf
    guidance, μ or denoise, steps outside 1..200, a seed outside 0..2⁶⁴−1 are ValueErrors) and so are
    all three files, from their headers (:func:`check_model_files`: kind, layout, shapes and fit),
    so a wrong file costs milliseconds, not a text-encoder run; ``lora`` files are read and checked
    against the DiT's header too (:func:`check_loras`), and the init image and ``mask`` are read and
    checked (a mask without an image or of another size than its image is a ValueError).
    """
    _check_model_paths(transformer_path, text_encoder_path, vae_path)
    prompts = _prompt_list(prompt)
    check_generation_options(steps=steps, guidance=guidance, mu=mu, denoise=denoise, seed=seed,
                             batch=batch)
    _check_choices(output_type, schedule, noise_layout, cfg_mode)
    width, height = validate_size(width, height)
    image, paint_mask = load_init_image(image, mask, width, height)
    files = check_model_files(transformer_path, text_encoder_path, vae_path)
    loras = check_loras(lora, files.transformer)
    device = torch.device(device) if device is not None else default_device()
    steps, guidance = _steps_and_guidance(transformer_path, steps, guidance)
    ctx, mask, nctx, nmask = _encode_from_file(text_encoder_path, text_encoder_dtype, device,
                                               prompts, negative, guidance != 1.0, date, progress)
    return generate_from_features(
        ctx, mask, transformer_path, vae_path, width, height, steps=steps, guidance=guidance,
        negative_context=nctx, negative_mask=nmask, seed=seed, batch=batch, mu=mu,
        schedule=schedule, noise_layout=noise_layout, cfg_mode=cfg_mode, image=image,
        denoise=denoise, device=device, dtype=dtype, vae_dtype=vae_dtype, vae_tile=vae_tile,
        callback=callback, output_type=output_type, progress=progress, lora=loras, mask=paint_mask)


def _check_choices(output_type: str, schedule: str, noise_layout: str, cfg_mode: str) -> None:
    """Refuse an unknown ``output_type`` / ``schedule`` / ``noise_layout`` / ``cfg_mode`` before the
    text encoder or the DiT runs (ValueError naming the argument and the accepted values)."""
    for name, value, allowed in (("output_type", output_type, OUTPUT_TYPES), ("schedule", schedule, SCHEDULES),
                                 ("noise_layout", noise_layout, NOISE_LAYOUTS), ("cfg_mode", cfg_mode, CFG_MODES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_model_paths(transformer_path, text_encoder_path, vae_path) -> None:
    """:func:`generate` needs all three files: each path must be given and exist."""
    for name, p in (("transformer", transformer_path), ("text encoder", text_encoder_path),
                    ("VAE", vae_path)):
        if p is None:
            raise ValueError(f"generate() needs the {name} path")
        if not Path(p).exists():
            raise FileNotFoundError(f"{name} checkpoint {str(p)!r} does not exist")


def _prompt_list(prompt: Union[str, Sequence[str]]) -> list:
    """One prompt or a sequence of prompts as a non-empty list."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    return prompts


def _encode_from_file(path: PathLike, dtype: Optional[torch.dtype], device: torch.device,
                      prompts: list, negative: str, need_negative: bool, date: Optional[str],
                      progress: Optional[ProgressCallback]):
    """Load the text encoder at ``path``, encode the prompts and the negative
    (:func:`encode_prompts`) and release the encoder; the features are returned on the CPU."""
    t0 = time.perf_counter()
    te = text_encoder_module.load_text_encoder(path, dtype=dtype, device=device)
    try:
        ctx, mask, nctx, nmask = encode_prompts(te, prompts, negative, need_negative=need_negative,
                                                date=date, progress=progress)
    finally:
        del te
        _free(device)
    logger.info("encoded %d prompt(s) (%d tokens) in %.1f s", len(prompts), ctx.shape[1],
                time.perf_counter() - t0)
    ctx, mask = ctx.cpu(), mask.cpu()
    if nctx is not None:
        nctx, nmask = nctx.cpu(), nmask.cpu()
    return ctx, mask, nctx, nmask
