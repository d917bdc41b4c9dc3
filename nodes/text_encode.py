"""GPT-OSS TextEncode: prompt -> CONDITIONING in ComfyUI core's Lens layout.

Output: ``[[ctx, {"pooled_output": None, "attention_mask": mask, "num_layers_stacked": 4}]]`` with
``ctx`` float32 [1, S, 4·E] layer-major (layers 5|11|17|23) after the 97-token template crop and
``mask`` int64 [1, S]; an empty prompt gives S = 0 without running (or loading) the encoder.

Features are cached (:mod:`lens_model.feature_cache`) in memory per prompt, date, strip flag,
encoder file, dtype and device, and optionally on disk, so an unchanged prompt never loads the
13 GB encoder.
"""

from __future__ import annotations

import logging
import re

import torch
from lens_model import constants
from lens_model.constants import DEFAULT_DATE
from lens_model.feature_cache import FeatureFolder, FeatureMemory, PromptFeatures

from . import comfy_adapter as comfy
from .common import CATEGORY

logger = logging.getLogger(__name__)

NUM_LAYERS_STACKED = len(constants.CAPTURED_LAYERS)
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

FEATURES = FeatureMemory()
"""Features of recent prompts, shared by every TextEncode node of this ComfyUI process."""


def feature_cache(handle, date: str, strip_markers: bool, cache_to_disk: bool) -> PromptFeatures:
    """The prompt-feature cache for ``handle``'s file, dtype and device: :data:`FEATURES`, and with
    ``cache_to_disk`` the ``text_features`` folder of the pack's cache folder (a failed write is
    logged, never an error)."""
    folder = FeatureFolder(comfy.cache_dir() / "text_features", best_effort=True) \
        if cache_to_disk else None
    return PromptFeatures(handle.identity, handle.dtype, handle.device, date, strip_markers,
                          memory=FEATURES, folder=folder)


def to_conditioning(ctx, mask):
    """(ctx [B, S, 4E], mask [B, S] bool) -> core's Lens CONDITIONING (on the intermediate device)."""
    dev = comfy.intermediate_device()
    ctx = ctx.to(device=dev, dtype=torch.float32)
    mask = mask.to(device=dev, dtype=torch.int64)
    return [[ctx, {"pooled_output": None, "attention_mask": mask,
                   "num_layers_stacked": NUM_LAYERS_STACKED}]]


class LensNodesTextEncode:
    DESCRIPTION = (
        "Encodes a prompt with GPT-OSS-20B into Lens conditioning (the layout ComfyUI core's "
        "CLIPTextEncode produces for Lens). Leave the text empty for an empty negative. "
        "Results are cached, so re-running an unchanged prompt does not load the encoder."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["gpt-oss", "gpt oss", "lens", "prompt", "text encode", "clip text encode",
                      "conditioning"]
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Text features [1, S, 4×2880] with an int64 attention mask.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": ("LENS_TE", {"tooltip": "From GPT-OSS Loader."}),
                "text": ("STRING", {
                    "multiline": True, "dynamicPrompts": True, "default": "",
                    "tooltip": f"The prompt. At most about {constants.MAX_LENGTH - constants.PREFIX_LEN} tokens "
                               f"reach the model (the template takes {constants.PREFIX_LEN} of the "
                               f"{constants.MAX_LENGTH}); longer text is cut."}),
                "date": ("STRING", {
                    "default": DEFAULT_DATE,
                    "tooltip": "Date written into the GPT-OSS chat template (YYYY-MM-DD). "
                               f"{DEFAULT_DATE} matches ComfyUI core; changing it changes the image "
                               "slightly."}),
                "strip_markers": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Remove harmony control markers (<|...|>) typed into the prompt "
                               "before tokenizing, as upstream does."}),
            },
            "optional": {
                "cache_to_disk": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Also keep the features in a file cache (ComfyUI's "
                               "user/__lens_nodes folder, or LENS_NODES_CACHE_DIR), so a restart "
                               "does not need the encoder for prompts seen before."}),
            },
        }

    def encode(self, text_encoder, text, date=DEFAULT_DATE, strip_markers=True, cache_to_disk=False):
        handle = text_encoder
        if not hasattr(handle, "encoder") or not hasattr(handle, "identity"):
            raise ValueError(
                "text_encoder must come from the 'GPT-OSS Loader' node (LensNodesTextEncoderLoader); "
                f"got {type(handle).__name__}."
            )
        date = (date or "").strip() or DEFAULT_DATE
        if not _DATE_RE.match(date):
            raise ValueError(f"date must look like YYYY-MM-DD (for example {DEFAULT_DATE}), got {date!r}.")
        text = "" if text is None else str(text)

        if not text.strip():
            e = handle.hidden_size
            ctx = torch.zeros(1, 0, NUM_LAYERS_STACKED * e)
            mask = torch.zeros(1, 0, dtype=torch.bool)
            return (to_conditioning(ctx, mask),)

        cache = feature_cache(handle, date, strip_markers, cache_to_disk)
        hit = cache.get(text)
        if hit is not None:
            logger.debug("text features from cache")
            return (to_conditioning(*hit),)

        comfy.check_interrupt()
        encoder = handle.encoder()
        pbar = comfy.progress_bar(1)

        def on_layer(done, total):
            pbar.update_absolute(done, total, None)
            comfy.check_interrupt()

        try:
            with torch.no_grad():
                ctx, mask = encoder.encode([text], date=date, strip_markers=bool(strip_markers),
                                           callback=on_layer)
            ctx = ctx.detach().to("cpu", torch.float32).clone()
            mask = mask.detach().to("cpu").to(torch.bool).clone()
        except Exception as e:
            if not comfy.is_oom(e):
                raise
            handle.unload()
            raise comfy.out_of_memory(
                e, f"GPT-OSS TextEncode ran out of {handle.device} memory. In GPT-OSS Loader set "
                   f"offload to 'layers' (about 1 GB of VRAM) or 'stream', or device to 'cpu'.",
            ) from e
        finally:
            handle.after_encode()
        _check_layout(ctx, mask)
        cache.put(text, ctx, mask)
        return (to_conditioning(ctx, mask),)


def _check_layout(ctx, mask):
    if ctx.ndim != 3 or ctx.shape[-1] % NUM_LAYERS_STACKED:
        raise RuntimeError(f"text encoder returned features of shape {tuple(ctx.shape)}; "
                           f"expected [B, S, 4·E].")
    if tuple(mask.shape) != tuple(ctx.shape[:2]):
        raise RuntimeError(f"text encoder returned a mask {tuple(mask.shape)} for features "
                           f"{tuple(ctx.shape)}.")
    if not bool(ctx.isfinite().all()):
        raise ValueError("GPT-OSS TextEncode: the text encoder produced NaN or Inf features (a "
                         "compute dtype that overflows, or broken weights). Set GPT-OSS Loader "
                         "dtype to bf16 or fp32, or re-download the text encoder.")
