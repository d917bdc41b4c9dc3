"""Lens / Lens-Turbo text-to-image in plain PyTorch.

Public API (importing the package imports torch and these modules; it reads no model file):

- :func:`load_transformer` (``dit``) — the Lens MMDiT.
- :func:`load_vae` (``vae``) — the FLUX.2 VAE with Lens' batch-norm latent space.
- :func:`load_text_encoder` (``text_encoder``) — gpt-oss-20b as a feature extractor.
- :func:`load_tokenizer` (``tokenizer``) — the harmony template and o200k_harmony tokenizer.
- :func:`lens_sigmas`, :func:`sample`, :func:`make_noise` (``sampling``) — schedule and sampler.
- :func:`open_checkpoint`, :class:`CheckpointError` (``checkpoints``) — file reading and its errors.

Shared constants live in :mod:`lens_model.constants`, the dtype policy in :mod:`lens_model.precision`.
"""

from __future__ import annotations

from .checkpoints import CheckpointError, open_checkpoint
from .dit import LensDiTConfig, LensTransformer, load_transformer
from .sampling import comfyui_sigmas, empirical_mu, img2img_sigmas, lens_sigmas, make_noise, sample
from .text_encoder import LensTextEncoder, load_text_encoder
from .tokenizer import LensTokenizer, load_tokenizer
from .vae import Flux2VAE, load_vae

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Flux2VAE",
    "LensDiTConfig",
    "LensTextEncoder",
    "LensTokenizer",
    "LensTransformer",
    "comfyui_sigmas",
    "empirical_mu",
    "img2img_sigmas",
    "lens_sigmas",
    "load_text_encoder",
    "load_tokenizer",
    "load_transformer",
    "load_vae",
    "make_noise",
    "open_checkpoint",
    "sample",
]
