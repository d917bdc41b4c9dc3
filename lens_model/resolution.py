"""Resolution presets, size validation, empty and cropped inputs at the latent grid, and conversion
of core's empty LATENT into a Lens latent.

Upstream presets (``resolution.py`` of Microsoft Lens): ratio strings are **W:H**, and the upstream
table lists **height × width**; the functions here return ``(width, height)``. Every side is a
multiple of 16. The 1440 family is round16(1024 value × 1440/1024).
"""

from __future__ import annotations

from typing import Optional

import torch

from .constants import LATENT_CELL_PIXELS, LATENT_CHANNELS, MAX_SIDE, RATIOS, SIZE_MULTIPLE
from .sampling import MU_TOKEN_THRESHOLD, image_tokens

# base -> ratio (W:H) -> (height, width), exactly as the upstream table lists them.
_PRESETS_HW: dict[int, dict[str, tuple[int, int]]] = {
    1024: {
        "1:2": (1472, 736), "9:16": (1376, 768), "2:3": (1248, 832), "3:4": (1152, 864),
        "1:1": (1024, 1024), "4:3": (864, 1152), "3:2": (832, 1248), "16:9": (768, 1376),
        "2:1": (736, 1472),
    },
    1440: {
        "1:2": (2080, 1040), "9:16": (1936, 1088), "2:3": (1760, 1168), "3:4": (1616, 1216),
        "1:1": (1440, 1440), "4:3": (1216, 1616), "3:2": (1168, 1760), "16:9": (1088, 1936),
        "2:1": (1040, 2080),
    },
}

BASES = tuple(_PRESETS_HW)

RELEASE_NOTES_PRESETS: tuple[tuple[int, int], ...] = ((1248, 1664), (1664, 1248))
"""(width, height) sizes quoted in the release coverage ("1248×1664"); not upstream presets. Both
orientations are offered; at 8112 tokens they sit in the 1440 family's schedule regime."""

PRESET_SIZES: frozenset[tuple[int, int]] = frozenset(
    [(w, h) for table in _PRESETS_HW.values() for (h, w) in table.values()]
    + list(RELEASE_NOTES_PRESETS))
"""All preset sizes as (width, height)."""

# The 1440 family's smallest token count (7676); 1024-family presets stay at or below 4232 tokens,
# under the μ threshold.
_JUMP_ZONE_END = min(image_tokens(h, w) for h, w in _PRESETS_HW[1440].values())


def default_base(device: torch.device | str) -> int:
    """The preset family used when no size is given: 1024 (~1 MP) on the CPU, 1440 (~2 MP) on any
    other device."""
    return 1024 if torch.device(device).type == "cpu" else 1440


def resolution_for(base: int, ratio: str) -> tuple[int, int]:
    """Upstream preset for ``base`` (1024 or 1440) and ``ratio`` ("W:H"): returns (width, height).

    >>> resolution_for(1024, "16:9")
    (1376, 768)
    """
    try:
        table = _PRESETS_HW[int(base)]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"unknown preset base {base!r}; expected one of {list(BASES)}") from None
    key = str(ratio).strip().replace("/", ":").replace(" ", "")
    if key not in table:
        raise ValueError(f"unknown aspect ratio {ratio!r}; expected W:H, one of {list(RATIOS)}")
    h, w = table[key]
    return w, h


def presets() -> list[tuple[int, str, int, int]]:
    """All upstream presets as (base, ratio, width, height)."""
    return [(b, r, w, h) for b, table in _PRESETS_HW.items() for r, (h, w) in table.items()]


def validate_size(width: int, height: int) -> tuple[int, int]:
    """Check a generation size: multiples of :data:`SIZE_MULTIPLE` (16), at most :data:`MAX_SIDE`
    (2080) per side.

    Returns (width, height) as ints; raises ValueError naming the offending value otherwise.
    """
    out = []
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or int(v) != v:
            raise ValueError(f"{name} must be an integer number of pixels, got {v!r}")
        v = int(v)
        if v < SIZE_MULTIPLE or v > MAX_SIDE:
            raise ValueError(f"{name} {v} is out of range: expected {SIZE_MULTIPLE}..{MAX_SIDE} "
                             f"pixels")
        if v % SIZE_MULTIPLE:
            lo = v // SIZE_MULTIPLE * SIZE_MULTIPLE
            raise ValueError(f"{name} {v} is not a multiple of {SIZE_MULTIPLE}; use {lo} or "
                             f"{lo + SIZE_MULTIPLE}")
        out.append(v)
    return out[0], out[1]


def schedule_jump_warning(width: int, height: int) -> Optional[str]:
    """A warning for non-preset sizes with N image tokens between :data:`MU_TOKEN_THRESHOLD` (4300)
    and the 1440 family's smallest count (7676), else None.

    Above the threshold upstream's empirical μ drops from ≈ 2.3 to ≈ 1.2, so sizes
    between the two preset families run with a smaller shift than either family; quality there is
    unverified.
    """
    n = image_tokens(height, width)
    if (int(width), int(height)) in PRESET_SIZES:
        return None
    if MU_TOKEN_THRESHOLD < n < _JUMP_ZONE_END:
        return (f"{width}x{height} has {n} image tokens, between the 1024 presets "
                f"(<= {MU_TOKEN_THRESHOLD}) and the 1440 presets (>= {_JUMP_ZONE_END}): upstream's "
                f"schedule shift drops sharply above {MU_TOKEN_THRESHOLD} tokens, "
                f"so this size runs with a smaller shift than either family (quality unverified). "
                f"Consider a preset, or set a schedule mu override.")
    return None


def empty_latent(width: int, height: int, batch: int = 1, device=None) -> torch.Tensor:
    """Zeros ``[batch, 128, height/16, width/16]`` float32: the start latent of a text-to-image run.

    The size is checked by :func:`validate_size`; ``batch`` must be at least 1 (ValueError).
    """
    w, h = validate_size(width, height)
    if int(batch) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch}")
    return torch.zeros(int(batch), LATENT_CHANNELS, h // LATENT_CELL_PIXELS, w // LATENT_CELL_PIXELS,
                       device=device)


def crop_to_cells(images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, H, W, C]`` centre-cropped to whole latent cells: ``[B, 16·⌊H/16⌋, 16·⌊W/16⌋, C]``
    (a view; unchanged when both sides are multiples of 16), as core's VAEEncode crops its input.

    Raises ValueError for an image smaller than 16 pixels on a side.
    """
    _, hh, ww, _ = images.shape
    h, w = hh // LATENT_CELL_PIXELS * LATENT_CELL_PIXELS, ww // LATENT_CELL_PIXELS * LATENT_CELL_PIXELS
    if h == 0 or w == 0:
        raise ValueError(f"image {ww}x{hh} is smaller than {LATENT_CELL_PIXELS} pixels on a side.")
    if (h, w) == (hh, ww):
        return images
    y0, x0 = (hh - h) // 2, (ww - w) // 2
    return images[:, y0:y0 + h, x0:x0 + w, :]


def latent_from_core_empty(latent: dict) -> torch.Tensor:
    """Turn a core LATENT dict into an empty Lens latent ``[B, 128, h, w]`` float32.

    - A 128-channel ``samples`` tensor is already a Lens latent and is returned as float32.
    - An all-zero latent with another channel count (core ``EmptyLatentImage``: 4 channels at
      ``downscale_ratio_spacial`` 8) becomes zeros with h = round(h₈·8/16), w = round(w₈·8/16),
      using Python's round (ties to even, like core): 1448² → 181² → 90² (1440² output).
    - A non-zero latent with the wrong channel count (e.g. an SD VAE encode) is rejected.
    """
    samples = latent["samples"] if isinstance(latent, dict) else latent
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"expected a LATENT with samples [B, C, h, w], got {shape}")
    b, c, h, w = samples.shape
    if c == LATENT_CHANNELS:
        return samples.float()
    if torch.count_nonzero(samples).item() != 0:
        raise ValueError(f"this LATENT has {c} channels and is not empty; Lens latents have "
                         f"{LATENT_CHANNELS} channels (FLUX.2 VAE). Encode the image with the Lens/"
                         f"FLUX.2 VAE, or use an empty latent.")
    ratio = 8
    if isinstance(latent, dict) and latent.get("downscale_ratio_spacial") is not None:
        ratio = int(latent["downscale_ratio_spacial"])
    hh = round(h * ratio / LATENT_CELL_PIXELS)
    ww = round(w * ratio / LATENT_CELL_PIXELS)
    if hh < 1 or ww < 1:
        raise ValueError(f"empty LATENT {h}x{w} at 1/{ratio} is smaller than one Lens latent "
                         f"position ({LATENT_CELL_PIXELS} px)")
    return torch.zeros(b, LATENT_CHANNELS, hh, ww, dtype=torch.float32)
