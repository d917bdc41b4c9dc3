"""Lens / Lens-Turbo text-to-image in plain PyTorch.

Public API (importing the package imports torch and these modules; it reads no model file):

- :func:`load_transformer`, :func:`inspect_transformer` (``dit_loading``; the model is in ``dit``) —
  the Lens MMDiT.
- :func:`load_vae`, :func:`inspect_vae` (``vae_loading``; the model is in ``vae``) — the FLUX.2 VAE
  with Lens' batch-norm latent space.
- :func:`load_text_encoder`, :func:`inspect_text_encoder` (``text_encoder``) — gpt-oss-20b as a
  feature extractor.
- :func:`load_tokenizer` (``tokenizer``) — the harmony template and o200k_harmony tokenizer.
- :func:`lens_sigmas`, :func:`plan_sampling`, :func:`sample`, :func:`make_noise`,
  :func:`latent_mask`, :func:`check_sampling_options`, :class:`NonFiniteError` (``sampling``) —
  schedule, sampler, inpainting masks and option checks.
- :func:`load_lora`, :func:`apply_loras` (``lora``) — Lens LoRAs as removable side paths.
- :func:`open_checkpoint`, :class:`CheckpointError` (``checkpoints``) — file reading and its errors.

Shared constants live in :mod:`lens_model.constants`, the dtype policy in :mod:`lens_model.precision`.
"""

from __future__ import annotations

from .checkpoints import CheckpointError, open_checkpoint
from .dit import LensDiTConfig, LensTransformer
from .dit_loading import inspect_transformer, load_transformer
from .lora import apply_loras, load_lora
from .sampling import (
    NonFiniteError,
    check_sampling_options,
    comfyui_sigmas,
    empirical_mu,
    img2img_sigmas,
    latent_mask,
    lens_sigmas,
    make_noise,
    plan_sampling,
    sample,
)
from .text_encoder import LensTextEncoder, inspect_text_encoder, load_text_encoder
from .tokenizer import LensTokenizer, load_tokenizer
from .vae import Flux2VAE
from .vae_loading import inspect_vae, load_vae

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Flux2VAE",
    "LensDiTConfig",
    "LensTextEncoder",
    "LensTokenizer",
    "LensTransformer",
    "NonFiniteError",
    "apply_loras",
    "check_sampling_options",
    "comfyui_sigmas",
    "empirical_mu",
    "img2img_sigmas",
    "inspect_text_encoder",
    "inspect_transformer",
    "inspect_vae",
    "latent_mask",
    "lens_sigmas",
    "load_lora",
    "load_text_encoder",
    "load_tokenizer",
    "load_transformer",
    "load_vae",
    "make_noise",
    "open_checkpoint",
    "plan_sampling",
    "sample",
]
