"""Lens Resolution (upstream presets -> width, height) and Lens Empty Latent."""

from __future__ import annotations

import logging

from lens_model import constants, resolution
from lens_model.pipeline import MAX_BATCH

from . import comfy_adapter as comfy
from .common import CATEGORY, check_choice, size_input

logger = logging.getLogger(__name__)

CELL = constants.LATENT_CELL_PIXELS
# Frozen UI values (saved in workflows); the sizes come from lens_model.resolution.
BASES = ["1024", "1440", "1248x1664", "1664x1248", "custom"]
RATIOS = list(constants.RATIOS)


class LensNodesResolution:
    DESCRIPTION = (
        "Picks a Lens generation size: the upstream presets (base 1024 or 1440 with nine aspect "
        "ratios), the 1248×1664 / 1664×1248 sizes from the release notes, or a custom size. Warns "
        "in the log when a custom size falls between the two preset families, where the schedule "
        "shift jumps (above 4300 image tokens)."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["lens", "resolution", "aspect ratio", "image size"]
    RETURN_TYPES = ("INT", "INT")
    RETURN_NAMES = ("width", "height")
    OUTPUT_TOOLTIPS = ("Width in pixels (multiple of 16).", "Height in pixels (multiple of 16).")
    FUNCTION = "resolve"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "base": (BASES, {
                    "default": "1440",
                    "tooltip": "1024 or 1440: upstream preset family (1440 ≈ 2 MP, what the "
                               "ComfyUI templates use; 1024 is faster). WxH entries are fixed "
                               "sizes. custom: use width and height below."}),
                "ratio": (RATIOS, {
                    "default": "1:1",
                    "tooltip": "Aspect ratio as width:height, for the 1024 and 1440 families."}),
                "width": size_input(1024, f"Width for base = custom (multiple of {constants.SIZE_MULTIPLE}, "
                                           f"up to {constants.MAX_SIDE})."),
                "height": size_input(1024, f"Height for base = custom (multiple of {constants.SIZE_MULTIPLE}, "
                                            f"up to {constants.MAX_SIDE})."),
            }
        }

    def resolve(self, base="1440", ratio="1:1", width=1024, height=1024):
        check_choice("base", base, BASES)
        if base == "custom":
            w, h = resolution.validate_size(int(width), int(height))
        elif "x" in base:  # a fixed WxH entry
            w, h = (int(v) for v in base.split("x"))
        else:
            w, h = resolution.resolution_for(int(base), ratio)
        warning = resolution.schedule_jump_warning(w, h)
        if warning:
            logger.warning("%s", warning)
        return (w, h)


class LensNodesEmptyLatent:
    DESCRIPTION = (
        "An empty Lens latent (FLUX.2 latent space: 128 channels at 1/16 size) for the MMDiT "
        "Sampler. Equivalent to core's EmptyFlux2LatentImage."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["lens", "empty latent", "flux2 latent", "empty latent image"]
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Zeros [batch, 128, height/16, width/16].",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "width": size_input(1024, "Image width in pixels (multiple of 16)."),
                "height": size_input(1024, "Image height in pixels (multiple of 16)."),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH, "step": 1,
                                       "tooltip": "Images per run (noise differs per image)."}),
            }
        }

    def generate(self, width=1024, height=1024, batch_size=1):
        samples = resolution.empty_latent(int(width), int(height), int(batch_size),
                                          device=comfy.intermediate_device())
        # the spatial ratio lets core's samplers recognise an empty FLUX.2 latent, as core's
        # EmptyFlux2LatentImage marks it
        return ({"samples": samples, "downscale_ratio_spacial": CELL},)
