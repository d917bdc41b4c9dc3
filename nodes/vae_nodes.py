"""FLUX2 VAE Decode / Encode: LATENT [B, 128, h, w] <-> IMAGE [B, 16h, 16w, 3] in [0, 1]."""

from __future__ import annotations

import logging

import torch

from lens_model import constants, resolution, vae_tiling

from . import comfy_adapter as comfy
from .common import CATEGORY

logger = logging.getLogger(__name__)

TILE_MODES = list(vae_tiling.TILE_MODES)
CELL = constants.LATENT_CELL_PIXELS
DEFAULT_TILE_PX = 256
"""Default tile side. On a CPU the FLUX.2 VAE needs ≈ 9 s per 256² px (≈ 145 s for 1024²) and its
slowest block ≈ 13 % of a pass, so 256-px tiles with a Cancel check after every block stop within
about 1-2 s; 512-px tiles would take ≈ 5 s."""


def _tile_size_input(what: str):
    lo, hi = vae_tiling.TILE_PX_RANGE
    return ("INT", {
        "default": DEFAULT_TILE_PX, "min": lo, "max": hi, "step": 64,
        "tooltip": f"Tile side in pixels (multiple of 16) when {what} in tiles, with a quarter of "
                   f"it as blended overlap. Smaller tiles: less memory and a quicker Cancel on the "
                   f"CPU, more seams to blend; larger: closer to the untiled result."})


def _progress(total: int):
    """A VAE ``callback(done, total)``: ComfyUI progress plus the Cancel check. Called after every
    encoder / decoder block (``progress_unit="block"``), so Cancel works inside a tile too."""
    pbar = comfy.progress_bar(total)

    def callback(done, n):
        pbar.update_absolute(done, n, None)
        comfy.check_interrupt()

    return callback


def _check_finite(t, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or Inf values; refusing to turn them into an image. "
                         f"Check the node that produced it (a sampler in fp16, broken weights, "
                         f"extreme guidance).")


def _oom_advice(what: str):
    """An out-of-memory error inside stays one (core recognises it) after every model, ours
    included, was unloaded, with our advice in front."""
    return comfy.oom_advice(f"{what} ran out of memory. Set tile to 'on', or FLUX2 VAE Loader "
                            f"device to 'cpu'.")


def _vae_handle(vae):
    if not hasattr(vae, "for_compute") or not hasattr(vae, "vae"):
        raise ValueError(
            "vae must come from the 'FLUX2 VAE Loader' node (LensNodesVAELoader); got "
            f"{type(vae).__name__}. A core VAE works with core VAEDecode / VAEEncode instead."
        )
    return vae


class LensNodesVAEDecode:
    DESCRIPTION = (
        "Decodes Lens / FLUX.2 latents into images with the FLUX.2 VAE. Also decodes latents from "
        "core VAEEncode or EmptyFlux2LatentImage."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["flux2 vae decode", "vae decode", "lens decode", "decode latent"]
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Images [B, H, W, 3] in 0..1.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "Latents from the MMDiT Sampler."}),
                "vae": ("LENS_VAE", {"tooltip": "From FLUX2 VAE Loader."}),
                "tile": (TILE_MODES, {
                    "default": "auto",
                    "tooltip": "auto: on a GPU the whole image, tiles only when memory is short; "
                               "on the CPU tiles of tile_size, so Cancel stops within about 2 s. "
                               "on: always tiles of tile_size (less memory, tiny tone "
                               "differences). off: never tile."}),
            },
            "optional": {
                "tile_size": _tile_size_input("decoding"),
            },
        }

    def decode(self, samples, vae, tile="auto", tile_size=DEFAULT_TILE_PX):
        handle = _vae_handle(vae)
        vae_tiling.tiling_from_pixels(tile, tile_size, "cpu")  # options checked before any work
        z = samples["samples"] if isinstance(samples, dict) else samples
        if z.ndim != 4 or z.shape[1] != constants.LATENT_CHANNELS:
            raise ValueError(
                f"FLUX2 VAE Decode needs Lens / FLUX.2 latents [B, 128, h, w], got "
                f"{tuple(z.shape)}. Latents of other models need their own VAE."
            )
        _check_finite(z, "FLUX2 VAE Decode: the latent")
        comfy.check_interrupt()
        work = handle.vae.estimate_decode_bytes(z.shape[-2], z.shape[-1])
        what = f"FLUX2 VAE Decode at {CELL * z.shape[-1]}x{CELL * z.shape[-2]}"
        with _oom_advice(what):
            model = handle.for_compute(work)
            arg, cells, overlap = vae_tiling.tiling_from_pixels(tile, tile_size, comfy.weights_device(model))
            # one image (or tile) at a time inside; progress and Cancel after every decoder block
            images = model.decode(z.to(torch.float32), tile=arg, tile_size=cells, overlap=overlap,
                                  callback=_progress(z.shape[0]), progress_unit="block")
        return (images.to(comfy.intermediate_device(), torch.float32),)


class LensNodesVAEEncode:
    DESCRIPTION = (
        "Encodes images into Lens / FLUX.2 latents (the VAE mean, patchified and BN-normalised) "
        "for image-to-image with the MMDiT Sampler (denoise < 1). Sides are center-cropped to "
        "multiples of 16."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["flux2 vae encode", "vae encode", "lens encode", "img2img", "encode image"]
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Latents [B, 128, H/16, W/16].",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pixels": ("IMAGE", {"tooltip": "Images [B, H, W, 3] in 0..1 (alpha is dropped)."}),
                "vae": ("LENS_VAE", {"tooltip": "From FLUX2 VAE Loader."}),
            },
            "optional": {
                "tile": (TILE_MODES, {
                    "default": "auto",
                    "tooltip": "auto: on a GPU the whole image, tiles only when memory is short; "
                               "on the CPU tiles of tile_size, so Cancel stops within about 2 s. "
                               "on: always tiles of tile_size (less memory, latents differ "
                               "slightly). off: never tile."}),
                "tile_size": _tile_size_input("encoding"),
            },
        }

    def encode(self, pixels, vae, tile="auto", tile_size=DEFAULT_TILE_PX):
        handle = _vae_handle(vae)
        vae_tiling.tiling_from_pixels(tile, tile_size, "cpu")  # options checked before any work
        if pixels.ndim != 4 or pixels.shape[-1] not in (3, 4):
            raise ValueError(f"pixels must be an IMAGE [B, H, W, 3], got {tuple(pixels.shape)}.")
        _check_finite(pixels, "FLUX2 VAE Encode: the image")
        cropped = resolution.crop_to_cells(pixels)
        _, h, w, _ = cropped.shape
        if cropped is not pixels:
            logger.info("FLUX2 VAE Encode: center-cropping %dx%d to %dx%d (multiples of 16).",
                        pixels.shape[2], pixels.shape[1], w, h)
        pixels = cropped
        comfy.check_interrupt()
        with _oom_advice(f"FLUX2 VAE Encode at {w}x{h}"):
            model = handle.for_compute(handle.vae.estimate_encode_bytes(h, w))
            arg, cells, overlap = vae_tiling.tiling_from_pixels(tile, tile_size, comfy.weights_device(model))
            z = model.encode(pixels[..., :3].to(torch.float32), tile=arg, tile_size=cells,
                             overlap=overlap, callback=_progress(pixels.shape[0]),
                             progress_unit="block")
        return ({"samples": z.to(comfy.intermediate_device(), torch.float32)},)
