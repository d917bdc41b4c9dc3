"""FLUX2 VAE Decode / Encode: LATENT [B, 128, h, w] <-> IMAGE [B, 16h, 16w, 3] in [0, 1]."""

from __future__ import annotations

import logging

from . import comfy_adapter as comfy
from .common import CATEGORY, out_of_memory

logger = logging.getLogger(__name__)

TILE_MODES = ["auto", "on", "off"]
_TILE_ARG = {"auto": "auto", "on": True, "off": False}


def _progress(total: int):
    """A VAE ``callback(done, total)``: ComfyUI progress plus the Cancel check, between tiles/images."""
    pbar = comfy.progress_bar(total)

    def callback(done, n):
        pbar.update_absolute(done, n, None)
        comfy.check_interrupt()

    return callback


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
                    "tooltip": "auto: whole image, tiles only when GPU memory is short. on: "
                               "1024-px tiles with 256-px blended overlap (less memory, tiny "
                               "tone differences). off: never tile."}),
            }
        }

    def decode(self, samples, vae, tile="auto"):
        import torch

        handle = _vae_handle(vae)
        if tile not in TILE_MODES:
            raise ValueError(f"tile must be one of {TILE_MODES}, got {tile!r}")
        z = samples["samples"] if isinstance(samples, dict) else samples
        if z.ndim != 4 or z.shape[1] != 128:
            raise ValueError(
                f"FLUX2 VAE Decode needs Lens / FLUX.2 latents [B, 128, h, w], got "
                f"{tuple(z.shape)}. Latents of other models need their own VAE."
            )
        comfy.check_interrupt()
        est = getattr(handle.model(), "estimate_decode_bytes", None)
        work = est(z.shape[-2], z.shape[-1]) if est is not None else 0
        try:
            model = handle.for_compute(work)
            # one image (or tile) at a time inside; progress and Cancel between them
            images = model.decode(z.to(torch.float32), tile=_TILE_ARG[tile],
                                  callback=_progress(z.shape[0]))
        except torch.cuda.OutOfMemoryError as e:
            raise out_of_memory(
                e,
                f"FLUX2 VAE Decode ran out of {handle.device} memory at {16 * z.shape[-1]}x"
                f"{16 * z.shape[-2]}. Set tile to 'on', or FLUX2 VAE Loader device to 'cpu'.",
                handle,
            ) from e
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
                    "tooltip": "auto: whole image, tiles only when GPU memory is short. on: "
                               "1024-px tiles with 256-px blended overlap (less memory, latents "
                               "differ slightly). off: never tile."}),
            },
        }

    def encode(self, pixels, vae, tile="auto"):
        import torch

        handle = _vae_handle(vae)
        if tile not in TILE_MODES:
            raise ValueError(f"tile must be one of {TILE_MODES}, got {tile!r}")
        if pixels.ndim != 4 or pixels.shape[-1] not in (3, 4):
            raise ValueError(f"pixels must be an IMAGE [B, H, W, 3], got {tuple(pixels.shape)}.")
        _, H, W, _ = pixels.shape
        h, w = H // 16 * 16, W // 16 * 16
        if h == 0 or w == 0:
            raise ValueError(f"image {W}x{H} is smaller than 16 pixels on a side.")
        if (h, w) != (H, W):
            y0, x0 = (H - h) // 2, (W - w) // 2
            logger.info("FLUX2 VAE Encode: center-cropping %dx%d to %dx%d (multiples of 16).",
                        W, H, w, h)
            pixels = pixels[:, y0:y0 + h, x0:x0 + w, :]
        comfy.check_interrupt()
        try:
            model = handle.for_compute()
            z = model.encode(pixels[..., :3].to(torch.float32), tile=_TILE_ARG[tile],
                             callback=_progress(pixels.shape[0]))
        except torch.cuda.OutOfMemoryError as e:
            raise out_of_memory(
                e,
                f"FLUX2 VAE Encode ran out of {handle.device} memory at {w}x{h}. Set tile to "
                f"'on', or FLUX2 VAE Loader device to 'cpu'.",
                handle,
            ) from e
        return ({"samples": z.to(comfy.intermediate_device(), torch.float32)},)
