"""Lens / Lens-Turbo text-to-image in plain PyTorch.

Public API (each name is imported lazily from the module that owns it, so ``import lens_model`` is
cheap and never touches model files):

- :func:`load_transformer` (``dit``) — the Lens MMDiT.
- :func:`load_vae` (``vae``) — the FLUX.2 VAE with Lens' batch-norm latent space.
- :func:`load_text_encoder` (``text_encoder``) — gpt-oss-20b as a feature extractor.
- :func:`load_tokenizer` (``tokenizer``) — the harmony template and o200k_harmony tokenizer.
- :func:`lens_sigmas`, :func:`sample`, :func:`make_noise` (``sampling``) — schedule and sampler.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_transformer": "dit",
    "LensTransformer": "dit",
    "LensDiTConfig": "dit",
    "load_vae": "vae",
    "Flux2VAE": "vae",
    "load_text_encoder": "text_encoder",
    "LensTextEncoder": "text_encoder",
    "load_tokenizer": "tokenizer",
    "LensTokenizer": "tokenizer",
    "lens_sigmas": "sampling",
    "comfyui_sigmas": "sampling",
    "img2img_sigmas": "sampling",
    "empirical_mu": "sampling",
    "make_noise": "sampling",
    "sample": "sampling",
    "open_checkpoint": "checkpoints",
    "CheckpointError": "checkpoints",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lens_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
