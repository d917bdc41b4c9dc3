"""Facts about Lens shared by several parts of the pack, each defined once.

Plain Python values only (no torch, no I/O), so any module, node or tool can import this cheaply.
"""

from __future__ import annotations

# -- latent geometry -------------------------------------------------------------------------------

#: Channels of the FLUX.2 VAE latent before patchifying (the raw ``z`` of the autoencoder).
VAE_LATENT_CHANNELS = 32

#: Channels of a Lens latent: the 32 VAE channels packed over a 2x2 patch (ComfyUI LATENT ``[B, 128, h, w]``).
LATENT_CHANNELS = 128

#: Image pixels along one side of a Lens latent cell (x8 VAE downsampling times the 2x2 patch).
LATENT_CELL_PIXELS = 16

#: Every generated width and height is a multiple of this many pixels (one latent cell).
SIZE_MULTIPLE = LATENT_CELL_PIXELS

#: Largest width or height in pixels the library accepts (the largest side of an upstream preset).
MAX_SIDE = 2080

#: Upstream aspect-ratio presets as ``"W:H"`` strings, from portrait to landscape.
RATIOS = ("1:2", "9:16", "2:3", "3:4", "1:1", "4:3", "3:2", "16:9", "2:1")

# -- text features ---------------------------------------------------------------------------------

#: gpt-oss decoder layers (0-based) whose outputs become the DiT's text features.
CAPTURED_LAYERS = (5, 11, 17, 23)

#: Width of one gpt-oss hidden state, and so of each captured text-feature layer.
TEXT_HIDDEN_SIZE = 2880

#: Token ids in the o200k_harmony vocabulary of gpt-oss (ordinary and special tokens).
VOCAB_SIZE = 201088

#: Tokens of the harmony template before the prompt (the same count for every date); the encoder
#: drops these positions from the features it returns.
PREFIX_LEN = 97

#: Tokens of the harmony template after the prompt.
SUFFIX_LEN = 22

#: Longest templated token sequence, prefix and suffix included.
MAX_LENGTH = 512

#: Id that pads shorter prompts of a batch (``<|endoftext|>``); padded positions are masked out.
PAD_ID = 199999

#: Date written into the template when none is given (upstream writes the current day; ComfyUI and
#: mflux pin this value, so a fixed date keeps results reproducible).
DEFAULT_DATE = "2026-05-23"

# -- DiT -------------------------------------------------------------------------------------------

#: eps of the DiT's q/k RMSNorms, by convention: upstream's checkpoints were trained with 1e-6;
#: ComfyUI core's Lens model uses 1e-5 (offered only for parity checks against core).
QK_NORM_EPS = {"upstream": 1e-6, "comfyui": 1e-5}

# -- variants --------------------------------------------------------------------------------------

VARIANT_DEFAULTS: dict[str, dict] = {
    "turbo": {"variant": "turbo", "steps": 4, "cfg": 1.0},
    "lens": {"variant": "lens", "steps": 20, "cfg": 5.0},
    "base": {"variant": "base", "steps": 50, "cfg": 5.0},
}
"""Per-variant step and CFG defaults (the model cards and ComfyUI's templates). Callers get copies
(:func:`lens_model.dit_loading.variant_defaults_for`)."""


__all__ = [
    "CAPTURED_LAYERS",
    "DEFAULT_DATE",
    "LATENT_CELL_PIXELS",
    "LATENT_CHANNELS",
    "MAX_LENGTH",
    "MAX_SIDE",
    "PAD_ID",
    "PREFIX_LEN",
    "QK_NORM_EPS",
    "RATIOS",
    "SIZE_MULTIPLE",
    "SUFFIX_LEN",
    "TEXT_HIDDEN_SIZE",
    "VAE_LATENT_CHANNELS",
    "VARIANT_DEFAULTS",
    "VOCAB_SIZE",
]
