"""Lens LoRA Loader: adds a LoRA (with a strength) to a LENS_DIT; chainable.

The node never touches the upstream model (ComfyUI caches node outputs and may hand the same
handle to other branches): it returns a :class:`LoRAModel`, a thin view of the upstream handle that
carries the list of (LoRA, strength). The LoRA file is read and checked against the DiT's shapes
here, so a wrong file fails at this node, before any sampling. The sampler attaches the LoRAs
around its run with :func:`loras_applied` (``lens_model.lora.applied``) and they are removed
afterwards; the base weights are never modified.
"""

from __future__ import annotations

import contextlib
import logging

from lens_model import lora as lens_lora
from lens_model import sampling
from lens_model.checkpoints import SAFETENSORS_SUFFIXES

from . import comfy_adapter as comfy
from .common import CATEGORY, NO_FILES, check_float_widgets, identity_or_nan

logger = logging.getLogger(__name__)

LORA_FOLDER = "loras"


class LoRAModel:
    """LENS_DIT with LoRAs: the upstream handle plus ``loras`` = ((LensLoRA, strength), ...).

    Every other attribute (``patcher``, ``config``, ``for_compute``, ``after_use``, ...) is the
    upstream handle's, so it behaves as the model it wraps and shares its place in ComfyUI's
    model management (the LoRA is a side path, not a core weight patch: core's patches would be
    silently wrong on fp8 / MXFP8 layers); ``base_handle`` is that handle.
    """

    __slots__ = ("_base", "loras")

    def __init__(self, base, loras) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "loras", tuple(loras))

    @property
    def base_handle(self):
        return self._base

    def __getattr__(self, name):
        if name in ("_base", "loras"):  # during copy / unpickling, before __init__ ran
            raise AttributeError(name)
        return getattr(self._base, name)

    def __setattr__(self, name, value):
        if name in LoRAModel.__slots__:
            object.__setattr__(self, name, value)
        else:
            setattr(self._base, name, value)  # state belongs to the upstream handle

    def __repr__(self) -> str:
        names = ", ".join(f"{lo.name}@{s:g}" for lo, s in self.loras)
        return f"{self._base!r} + LoRA({names})"


def lora_list() -> list[str]:
    names = [f for f in comfy.filename_list(LORA_FOLDER) if f.lower().endswith(SAFETENSORS_SUFFIXES)]
    return sorted(names) or [NO_FILES]


def loras_applied(model, transformer):
    """Context manager for the sampler: ``with loras_applied(model, dit): <sample>`` attaches the
    LoRAs a LENS_DIT carries (none for a plain loader output) to ``dit`` and removes them after."""
    loras = list(getattr(model, "loras", ()))
    return lens_lora.applied(transformer, loras) if loras else contextlib.nullcontext()


class LensNodesLoRALoader:
    DESCRIPTION = (
        "Adds a Lens LoRA from models/loras to the Lens model, with a strength (negative values "
        "subtract it). Chain several loaders to stack LoRAs. Reads kohya / musubi-tuner, "
        "LoboForge-LensTrainer, VideoX-Fun and diffusers / PEFT files at their trained scale "
        "(alpha / rank; files that store no alpha get 1.0). The weights are not changed: the LoRA "
        "runs beside each layer during sampling (also on fp8 / mxfp8 models) and is gone "
        "afterwards. LoRAs for other models (SDXL, FLUX, ...) and LoHa / LoKr / DoRA are refused."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["lora", "lens lora", "load lora", "lora loader", "lycoris"]
    RETURN_TYPES = ("LENS_DIT",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Lens model with this LoRA added, for the MMDiT Sampler or another LoRA loader.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("LENS_DIT", {"tooltip": "From LensLoader or another Lens LoRA Loader."}),
                "lora_name": (lora_list(), {
                    "tooltip": "A Lens LoRA (.safetensors) from models/loras."}),
                "strength": ("FLOAT", {
                    "default": 1.0, "min": -4.0, "max": 4.0, "step": 0.01,
                    "tooltip": "How much of the LoRA to add: 1 = as trained, 0 = off, negative = "
                               "subtract it."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, lora_name, **kwargs):
        return identity_or_nan(LORA_FOLDER, lora_name)

    @classmethod
    def VALIDATE_INPUTS(cls, strength=1.0):
        """Queue-time check: NaN/Inf or out-of-range strength refused with its name."""
        return check_float_widgets(cls, strength=strength)

    def apply(self, model, lora_name, strength=1.0):
        if not hasattr(model, "for_compute") or getattr(model, "config", None) is None:
            raise ValueError("model must come from the LensLoader node (or another Lens LoRA Loader); "
                             f"got {type(model).__name__}. Core MODEL outputs do not work here.")
        strength = sampling.check_number(strength, "strength")
        if lora_name == NO_FILES:
            raise FileNotFoundError(
                f"No LoRA files in the {LORA_FOLDER!r} folders "
                f"({', '.join(comfy.folder_roots(LORA_FOLDER)) or 'none'}). Put a Lens LoRA there, "
                "then refresh the browser (press R)."
            )
        path = comfy.full_path(LORA_FOLDER, lora_name)
        lora = lens_lora.load_lora(path)
        lora.check(model.config)
        base = model.base_handle if isinstance(model, LoRAModel) else model
        loras = tuple(getattr(model, "loras", ())) + ((lora, strength),)
        logger.info("Lens LoRA Loader: %s at strength %g (%d module(s), %s)", lora_name, strength,
                    len(lora.pairs), lora.layout)
        return (LoRAModel(base, loras),)
