"""GPT-OSS TextEncode: prompt -> CONDITIONING in ComfyUI core's Lens layout.

Output: ``[[ctx, {"pooled_output": None, "attention_mask": mask, "num_layers_stacked": 4}]]`` with
``ctx`` float32 [1, S, 4·E] layer-major (layers 5|11|17|23) after the 97-token template crop and
``mask`` int64 [1, S]; an empty prompt gives S = 0 without running (or loading) the encoder.

Features are cached in memory per (prompt, date, strip flag, encoder identity), and optionally on
disk, so an unchanged prompt never loads the 13 GB encoder.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections import OrderedDict

import torch
from lens_model import constants
from lens_model.constants import DEFAULT_DATE
from lens_model.text_encoder import encode_prompt_cache_key
from safetensors import safe_open
from safetensors.torch import save_file

from . import comfy_adapter as comfy
from .common import CATEGORY

logger = logging.getLogger(__name__)

NUM_LAYERS_STACKED = len(constants.CAPTURED_LAYERS)
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class FeatureCache:
    """LRU of (ctx [1, S, 4E] fp32 CPU, mask [1, S] bool CPU) per key string.

    Bounded by entry count and by bytes (a 415-token prompt is ≈ 19 MB of fp32 features); the
    newest entry is always kept, even when it alone exceeds the byte budget.
    """

    def __init__(self, capacity: int = 64, max_bytes: int = 512 * 1024 * 1024):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, tuple] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _size(value: tuple) -> int:
        return sum(t.numel() * t.element_size() for t in value if hasattr(t, "element_size"))

    def get(self, key: str):
        with self._lock:
            hit = self._data.get(key)
            if hit is not None:
                self._data.move_to_end(key)
            return hit

    def put(self, key: str, value: tuple) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old)
            self._data[key] = value
            self._bytes += self._size(value)
            while len(self._data) > 1 and (len(self._data) > self.capacity or self._bytes > self.max_bytes):
                _, evicted = self._data.popitem(last=False)
                self._bytes -= self._size(evicted)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self):
        return len(self._data)


FEATURES = FeatureCache()


def cache_key(text: str, date: str, strip_markers: bool, handle) -> str:
    """The library's prompt-feature key (text, date, file identity, dtype, options) plus the
    device kind the features were computed on."""
    return encode_prompt_cache_key(text, date, handle.identity, handle.dtype,
                                   strip_markers=bool(strip_markers), device=handle.device.type)


def _disk_path(key: str):
    return comfy.cache_dir() / "text_features" / f"{key}.safetensors"


def _disk_get(key: str):
    path = _disk_path(key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            ctx = f.get_tensor("context")
            mask = f.get_tensor("mask").to(bool)
    except Exception as e:  # a damaged cache file is not an error: re-encode
        logger.warning("ignoring unreadable text-feature cache file %s: %s", path, e)
        return None
    return ctx, mask


def _disk_put(key: str, ctx, mask) -> None:
    path = _disk_path(key)
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"context": ctx.contiguous(), "mask": mask.to(dtype=torch.uint8)},
                  str(tmp), metadata={"key": key})
        tmp.replace(path)
    except OSError as e:
        logger.warning("could not write the text-feature cache %s: %s", path, e)
        with contextlib.suppress(OSError):  # no half-written file left behind
            tmp.unlink(missing_ok=True)


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
                    "tooltip": "The prompt. At most about 415 tokens reach the model (the "
                               "template takes 97 of the 512); longer text is cut."}),
                "date": ("STRING", {
                    "default": DEFAULT_DATE,
                    "tooltip": "Date written into the GPT-OSS chat template (YYYY-MM-DD). "
                               "2026-05-23 matches ComfyUI core; changing it changes the image "
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

        key = cache_key(text, date, strip_markers, handle)
        hit = FEATURES.get(key)
        if hit is None and cache_to_disk:
            hit = _disk_get(key)
            if hit is not None:
                FEATURES.put(key, hit)
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
        FEATURES.put(key, (ctx, mask))
        if cache_to_disk:
            _disk_put(key, ctx, mask)
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
