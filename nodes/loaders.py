"""Loader nodes: Lens DiT, GPT-OSS text encoder, FLUX.2 VAE.

Each loader resolves a combo entry from ComfyUI's model folders (a file, the first shard of a set,
or a ``<folder>/`` entry for a diffusers folder), builds the model completely or raises, and
returns a handle (nodes/handles.py). The DiT and VAE are wrapped for ComfyUI's model management
right away but stay in host RAM until a node uses them. ``IS_CHANGED`` returns the file identity
so a replaced file reloads; the model a loader returned before is freed when ComfyUI drops that
output.
"""

from __future__ import annotations

import logging

import torch

import lens_model
from lens_model import checkpoints, precision
from lens_model.constants import QK_NORM_EPS
from lens_model.text_encoder import inspect_text_encoder

from . import comfy_adapter as comfy
from .common import CATEGORY, check_choice, identity_or_nan, model_list, resolve_model
from .handles import DiTHandle, TextEncoderHandle, VAEHandle

logger = logging.getLogger(__name__)

DIT_DTYPES = ["default", "bf16", "fp32", "fp8"]
DEVICES = ["auto", "gpu", "cpu"]
DIT_OFFLOAD = ["auto", "always", "never"]
QK_EPS = list(QK_NORM_EPS)
TE_DTYPES = ["auto", "bf16", "fp32"]
TE_OFFLOAD = ["auto", "device", "layers", "stream"]
VAE_DTYPES = ["auto", "bf16", "fp32"]


def _device_and_dtype(device: str, auto_device, dtype: str, component: str):
    """A loader's device and dtype choices -> (torch device, compute dtype or None), decided by
    ``lens_model.precision`` with ComfyUI's answer to whether the device computes bf16 fast."""
    dev = precision.choose_device(device, auto_device, comfy.torch_device())
    return dev, precision.choose_dtype(dtype, dev, component, comfy.should_use_bf16(dev))


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


class LensNodesDiTLoader:
    DESCRIPTION = (
        "Loads a Lens / Lens-Turbo / Lens-Base diffusion transformer (MMDiT) from "
        "models/diffusion_models: a Comfy-Org single file (bf16 or mxfp8), a ComfyUI-prefixed file, "
        "or a diffusers folder. Set the sampler to 4 steps / CFG 1 for Turbo, 20 steps / CFG 5 "
        "for Lens and 50 steps / CFG 5 for Lens-Base (the weights do not say which variant they "
        "are; the log shows a hint from the file name). ComfyUI's model management moves it to the "
        "GPU when the sampler runs and evicts it when another model needs the room."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["lens", "lens turbo", "mmdit", "load lens", "diffusion model loader", "unet loader"]
    RETURN_TYPES = ("LENS_DIT",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Lens diffusion transformer, for the MMDiT Sampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (model_list("diffusion_models"), {
                    "tooltip": "Lens DiT weights from models/diffusion_models (or models/unet). "
                               "Entries ending in '/' are diffusers folders; a shard stands for "
                               "its whole set."}),
                "weight_dtype": (DIT_DTYPES, {
                    "default": "default",
                    "tooltip": "default: bf16 on GPUs with native bf16 (NVIDIA Ampere / RTX 30xx "
                               "or newer), fp32 on older GPUs (T4, V100, RTX 20xx: about 16 GB; "
                               "pick fp8 on 16 GB cards), the stored dtype on the CPU. fp32 is "
                               "exact but twice the memory of bf16. fp8: weight-only fp8 storage "
                               "(about half of bf16) with modulation, embedders and norms kept in "
                               "the compute dtype; quality drops slightly. fp16 is never used "
                               "(Lens overflows in fp16)."}),
                "device": (DEVICES, {
                    "default": "auto",
                    "tooltip": "Where the DiT computes. auto: ComfyUI's main device. gpu: the "
                               "GPU or an error. cpu: very slow (minutes per step at 1024²)."}),
                "offload": (DIT_OFFLOAD, {
                    "default": "auto",
                    "tooltip": "auto: ComfyUI's model management decides (it stays on the GPU "
                               "until another model needs the room; --highvram keeps it there). "
                               "always: back to RAM after every run. never: never leaves the GPU "
                               "(ComfyUI cannot evict it to make room)."}),
            },
            "optional": {
                "qk_norm_eps": (QK_EPS, {
                    "default": "upstream",
                    "tooltip": "q/k RMSNorm epsilon. upstream: 1e-6 (Microsoft's code). comfyui: "
                               "1e-5 as in ComfyUI core, only for parity checks with core "
                               "(with schedule/cfg_mode 'comfyui' and noise_layout 'comfy')."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, model_name, **kwargs):
        return identity_or_nan("diffusion_models", model_name)

    def load(self, model_name, weight_dtype="default", device="auto", offload="auto",
             qk_norm_eps="upstream"):
        check_choice("weight_dtype", weight_dtype, DIT_DTYPES)
        check_choice("qk_norm_eps", qk_norm_eps, QK_EPS)
        check_choice("offload", offload, DIT_OFFLOAD)
        path = resolve_model("diffusion_models", model_name)
        dev, dtype = _device_and_dtype(device, comfy.torch_device(), weight_dtype, "dit")
        if dtype == torch.float32 and weight_dtype == "default":
            logger.info("%s has no fast bf16: the Lens DiT computes in fp32 (weight_dtype 'fp8' "
                        "halves its memory).", dev)
        logger.info("loading Lens DiT %s (weight dtype %s, device %s)", model_name, weight_dtype, dev)
        # into host RAM; core's model management moves it when the sampler runs
        model = lens_model.load_transformer(
            path, dtype=dtype, device="cpu", qk_norm_eps=None if qk_norm_eps == "upstream" else QK_NORM_EPS[qk_norm_eps],
            weight_dtype="fp8" if weight_dtype == "fp8" else None)
        model.eval().requires_grad_(False)
        hint = getattr(model, "variant_defaults", None) or {}
        if hint:
            logger.info("%s: suggested %s steps, CFG %s (variant guessed from the file name: %s)",
                        model_name, hint.get("steps"), hint.get("cfg"), hint.get("variant"))
        patcher = comfy.wrap_model(model, "dit", dev, keep_on_device=offload == "never")
        return (DiTHandle(patcher, path, checkpoints.checkpoint_identity(path), weight_dtype,
                          offload == "always"),)


class LensNodesTextEncoderLoader:
    DESCRIPTION = (
        "Selects the GPT-OSS-20B text encoder used by Lens (models/text_encoders: the Comfy-Org "
        "gpt_oss_20b_nvfp4.safetensors, the openai/gpt-oss-20b shards, or a diffusers "
        "text_encoder folder). The file is checked now but loaded only when a prompt is encoded "
        "that is not already cached, and it is unloaded again after encoding (or, with "
        "keep_loaded, when this node loads another file)."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["gpt-oss", "gpt oss", "lens", "text encoder loader", "clip loader"]
    RETURN_TYPES = ("LENS_TE",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The text encoder handle, for GPT-OSS TextEncode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder_name": (model_list("text_encoders"), {
                    "tooltip": "GPT-OSS-20B weights from models/text_encoders (or models/clip). "
                               "Entries ending in '/' are folders (diffusers or openai layout)."}),
                "device": (DEVICES, {
                    "default": "auto",
                    "tooltip": "Where the encoder runs. auto follows ComfyUI's text-encoder policy "
                               "(GPU unless low-VRAM). cpu needs about 14 GB of RAM and takes "
                               "tens of seconds per new prompt."}),
                "dtype": (TE_DTYPES, {
                    "default": "auto",
                    "tooltip": "Compute dtype. auto: bf16 on GPUs with native bf16 (Ampere or "
                               "newer), fp32 on older GPUs, bf16 on CPUs with AVX512-BF16/AMX "
                               "else fp32 (never fp16: gpt-oss overflows). fp32 is for parity "
                               "checks; quantised experts stay quantised."}),
                "offload": (TE_OFFLOAD, {
                    "default": "auto",
                    "tooltip": "Where the weights wait while encoding. device: all on the GPU "
                               "(about 13 GB of VRAM, fastest). layers: in RAM, each layer copied "
                               "to the GPU when it runs (about 1 GB of VRAM; 8–16 GB cards). "
                               "stream: read from disk layer by layer (lowest RAM; the CPU "
                               "default). auto: device if it fits, else stream."}),
                "keep_loaded": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Keep the encoder loaded after encoding (faster prompt edits, but "
                               "it holds its memory until the DiT needs room). Off: unload "
                               "after every encode; cached prompts need no encoder."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, text_encoder_name, **kwargs):
        return identity_or_nan("text_encoders", text_encoder_name)

    def load(self, text_encoder_name, device="auto", dtype="auto", offload="auto", keep_loaded=False):
        check_choice("dtype", dtype, TE_DTYPES)
        check_choice("offload", offload, TE_OFFLOAD)
        path = resolve_model("text_encoders", text_encoder_name)
        # the dtype is known now, so cached features are found without loading the encoder
        dev, tdtype = _device_and_dtype(device, comfy.text_encoder_device(), dtype, "te")
        hidden = inspect_text_encoder(path).hidden_size  # checks headers and shapes, loads nothing
        return (TextEncoderHandle(path, checkpoints.checkpoint_identity(path), dev, tdtype,
                                  _dtype_name(tdtype), offload, bool(keep_loaded), hidden),)


class LensNodesVAELoader:
    DESCRIPTION = (
        "Loads the FLUX.2 VAE used by Lens (models/vae: flux2-vae.safetensors, the BFL ae file or "
        "a diffusers vae folder). FLUX.1 / SD VAEs do not work with Lens."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["flux2 vae", "flux.2 vae", "lens vae", "vae loader"]
    RETURN_TYPES = ("LENS_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The FLUX.2 VAE, for FLUX2 VAE Decode / Encode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (model_list("vae"), {
                    "tooltip": "FLUX.2 VAE weights from models/vae (flux2-vae.safetensors)."}),
                "dtype": (VAE_DTYPES, {
                    "default": "auto",
                    "tooltip": "auto: bf16 on GPUs with native bf16 (Ampere or newer), fp32 on "
                               "older GPUs and on the CPU. fp32 is exact."}),
                "device": (DEVICES, {
                    "default": "auto",
                    "tooltip": "Where decoding runs. auto follows ComfyUI's VAE device."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, vae_name, **kwargs):
        return identity_or_nan("vae", vae_name)

    def load(self, vae_name, dtype="auto", device="auto"):
        check_choice("dtype", dtype, VAE_DTYPES)
        path = resolve_model("vae", vae_name)
        dev, tdtype = _device_and_dtype(device, comfy.vae_device(), dtype, "vae")
        logger.info("loading FLUX.2 VAE %s (%s, device %s)", vae_name, tdtype, dev)
        vae = lens_model.load_vae(path, dtype=tdtype, device="cpu")
        vae.eval().requires_grad_(False)
        patcher = comfy.wrap_model(vae, "vae", dev)
        return (VAEHandle(patcher, path, checkpoints.checkpoint_identity(path), _dtype_name(tdtype)),)
