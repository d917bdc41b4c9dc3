"""MMDiT Sampler: Euler flow matching with the Lens schedule and norm-rescaled CFG.

Accepts CONDITIONING from our GPT-OSS TextEncode or core's CLIPTextEncode (type lens), and a LATENT
from our Empty Latent / VAE Encode, core's EmptyFlux2LatentImage / VAEEncode (FLUX.2 VAE) or core's
4-channel EmptyLatentImage (converted). Returns LATENT {"samples": [B, 128, h, w] fp32 CPU}.
"""

from __future__ import annotations

import logging

import torch

from lens_model import constants, resolution, sampling
from lens_model.pipeline import SEED_MAX

from . import comfy_adapter as comfy
from .common import CATEGORY, check_choice, check_float_widgets, size_input
from .lora import loras_applied

logger = logging.getLogger(__name__)

SCHEDULES = list(sampling.SCHEDULES)
MASK_MODES = list(sampling.MASK_MODES)
NOISE_LAYOUTS = ["upstream", "comfy"]
CFG_MODES = ["upstream", "comfyui"]
CELL = constants.LATENT_CELL_PIXELS


def parse_conditioning(cond, what: str, config):
    """CONDITIONING (its first entry) -> (ctx [B, S, F] float32, mask [B, S] bool), checked against
    the DiT's ``config`` by ``lens_model.sampling.check_text_features``."""
    if not isinstance(cond, (list, tuple)) or len(cond) == 0:
        raise ValueError(f"{what}: the CONDITIONING is empty; connect a GPT-OSS TextEncode "
                         f"(or core CLIPTextEncode with a CLIPLoader of type 'lens').")
    if len(cond) > 1:
        logger.warning("%s: CONDITIONING has %d entries (combined?); Lens uses only the first.",
                       what, len(cond))
    entry = cond[0]
    extra = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    return sampling.check_text_features(entry[0], extra.get("attention_mask"),
                                        layers=extra.get("num_layers_stacked"),
                                        width=getattr(config, "enc_hidden_dim", None), what=what)


def prepare_latent(latent, width: int, height: int):
    """-> (samples [B, 128, h, w] fp32 CPU, has_content). Core's empty latents are converted
    (``lens_model.resolution.latent_from_core_empty``); without a latent, zeros of width x height."""
    if latent is None:
        return resolution.empty_latent(width, height), False
    if not isinstance(latent, dict) or "samples" not in latent:
        got = sorted(latent) if isinstance(latent, dict) else type(latent).__name__
        raise ValueError(f"latent must be a LATENT dict with 'samples', got {got}. Connect Lens "
                         f"Empty Latent, FLUX2 VAE Encode or a core latent node.")
    s = resolution.latent_from_core_empty(latent).to("cpu", torch.float32)
    return s, bool(s.any())


class LensNodesSampler:
    DESCRIPTION = (
        "Generates Lens latents: Euler flow-matching steps with the upstream Lens schedule and "
        "per-token norm-rescaled CFG. Turbo: 4 steps, CFG 1. Lens: 20 steps, CFG 5. Connect a "
        "latent with content and lower denoise for image-to-image. Inpainting: a latent with a "
        "noise_mask (core's Set Latent Noise Mask after VAE Encode; white/1 = repaint) keeps the "
        "unmasked area exactly and regenerates the masked one, as core's samplers do. A latent's "
        "batch_index (Latent From Batch, Repeat Latent Batch) gives each image the noise of its "
        "batch position, as in core. Decode with FLUX2 VAE Decode or core VAEDecode (flux2-vae). "
        "Live previews follow ComfyUI's preview setting (--preview-method or the live preview "
        "method in the settings: none, auto/latent2rgb, or taesd with taef2_decoder in "
        "models/vae_approx)."
    )
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["lens", "lens sampler", "mmdit", "ksampler", "sampler", "generate",
                      "txt2img", "img2img"]
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Denoised FLUX.2 latents [B, 128, H/16, W/16].",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("LENS_DIT", {"tooltip": "From LensLoader."}),
                "positive": ("CONDITIONING", {
                    "tooltip": "Prompt features from GPT-OSS TextEncode (or core CLIPTextEncode "
                               "with a 'lens' CLIP)."}),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": SEED_MAX, "step": 1, "control_after_generate": True,
                    "tooltip": "Noise seed. Noise is drawn on the CPU, so a seed gives the same "
                               "image on any GPU."}),
                "steps": ("INT", {
                    "default": 4, "min": 1, "max": 200, "step": 1,
                    "tooltip": "Sampling steps: 4 for Turbo, 20 for Lens, 50 for Lens-Base."}),
                "cfg": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                    "tooltip": "Guidance scale. 1 = no guidance (one DiT pass per step; the "
                               "negative prompt has no effect). Lens uses 5."}),
                "schedule": (SCHEDULES, {
                    "default": "upstream",
                    "tooltip": "upstream: Microsoft's schedule (shift from the image size and "
                               "step count). comfyui: core's ModelSamplingFlux + simple scheduler, "
                               "for parity checks with core workflows."}),
                "denoise": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "1 = text-to-image. Below 1 with an image latent: image-to-image "
                               "starting part-way (0.6 keeps the composition). 0 returns the "
                               "latent unchanged."}),
                "noise_layout": (NOISE_LAYOUTS, {
                    "default": "upstream",
                    "tooltip": "upstream: noise drawn in token order like the reference code. "
                               "comfy: drawn as [B, 128, h, w] like core samplers. The same seed "
                               "gives different images in the two layouts."}),
                "width": size_input(1024, "Image width in pixels (multiple of 16), used when no "
                                          "latent is connected."),
                "height": size_input(1024, "Image height in pixels (multiple of 16), used when no "
                                           "latent is connected."),
            },
            "optional": {
                "negative": ("CONDITIONING", {
                    "tooltip": "Negative prompt features; only used when cfg ≠ 1. Unconnected or "
                               "empty text = the empty negative Lens was trained with."}),
                "latent": ("LATENT", {
                    "tooltip": "Start latent: Lens Empty Latent, FLUX2 VAE Encode, or core "
                               "empty/Flux2 latents. Sets the size and batch; overrides "
                               "width/height. Its noise_mask (inpainting) and batch_index are "
                               "honoured as in core's samplers."}),
                "mu": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 5.0, "step": 0.01,
                    "tooltip": "Schedule shift override (μ; the shift is e^μ). 0 = automatic "
                               "from size and steps. Try 1.2–2.3 for sizes near 1056–1300 px."}),
                "cfg_mode": (CFG_MODES, {
                    "default": "upstream",
                    "tooltip": "upstream: per-token norm rescale of the guided velocity. "
                               "comfyui: core's CFG + CFGNorm clamp, for parity checks."}),
                "mask_mode": (MASK_MODES, {
                    "default": "coverage",
                    "tooltip": "How a latent's pixel noise_mask becomes the 1/16 latent grid. "
                               "coverage: each 16×16-px cell is as masked as its pixels (thin "
                               "strokes count), aligned with the VAE's crop. comfyui: core's "
                               "bilinear resize (samples the cell centre only), for parity."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, cfg=1.0, denoise=1.0, mu=0.0):
        """Queue-time check (before the text encoder runs): NaN/Inf or out-of-range cfg, denoise,
        mu are refused with their name. Values from links are checked in ``sample``."""
        return check_float_widgets(cls, cfg=cfg, denoise=denoise, mu=mu)

    def sample(self, model, positive, seed=0, steps=4, cfg=1.0, schedule="upstream", denoise=1.0,
               noise_layout="upstream", width=1024, height=1024, negative=None, latent=None,
               mu=0.0, cfg_mode="upstream", mask_mode="coverage"):
        if not hasattr(model, "for_compute"):
            raise ValueError("model must come from the LensLoader node (LensNodesDiTLoader); got "
                             f"{type(model).__name__}. Core MODEL outputs do not work here.")
        check_choice("schedule", schedule, SCHEDULES)
        check_choice("noise_layout", noise_layout, NOISE_LAYOUTS)
        check_choice("cfg_mode", cfg_mode, CFG_MODES)
        check_choice("mask_mode", mask_mode, MASK_MODES)
        # NaN/Inf can arrive through the API (FLOAT widgets do not reject them): refuse up front
        names = {"guidance_scale": "cfg", "steps": "steps", "denoise": "denoise", "mu": "mu"}
        sampling.check_sampling_options(steps=steps, guidance_scale=cfg, names=names)
        if denoise != 0:  # 0 = return the latent unchanged
            sampling.check_sampling_options(denoise=denoise, names=names)
        if mu != 0:  # 0 = automatic
            sampling.check_sampling_options(mu=mu, names=names)

        samples, has_content = prepare_latent(latent, int(width), int(height))
        extra = _passed_through(latent)
        if float(denoise) == 0.0:
            logger.info("MMDiT Sampler: denoise 0, returning the latent unchanged.")
            return ({**extra, "samples": samples.to(comfy.intermediate_device())},)
        batch, _, h, w = samples.shape
        cond = _conditioning(positive, negative, model.config)
        warning = resolution.schedule_jump_warning(CELL * w, CELL * h)
        if warning:
            logger.warning("%s", warning)
        plan = sampling.plan_sampling(CELL * h, CELL * w, int(steps), denoise=float(denoise),
                                      schedule=schedule, mu=float(mu) if mu else None,
                                      has_init=has_content)
        for note in plan.warnings:
            logger.warning("MMDiT Sampler: %s", note)
        noise = sampling.make_noise(int(seed), batch, h, w, layout=noise_layout,
                                    batch_index=extra.get("batch_index"))
        inputs = dict(cond, guidance_scale=float(cfg), cfg_mode=cfg_mode,
                      **_inpaint_inputs(extra.get("noise_mask"), samples, noise, has_content,
                                        mask_mode))
        x = plan.start_latents(noise, samples if plan.img2img else None)
        out = _run(model, x, plan.sigmas, inputs,
                   f"{CELL * w}x{CELL * h}, batch {batch}"
                   f"{', CFG (two passes per step)' if float(cfg) != 1.0 else ''}")
        return ({**extra, "samples": out},)


def _conditioning(positive, negative, config) -> dict:
    """CONDITIONING inputs -> the context arguments of ``lens_model.sampling.sample`` (CPU)."""
    ctx, mask = parse_conditioning(positive, "positive", config)
    out = {"context": ctx, "mask": mask, "negative_context": None, "negative_mask": None}
    if negative is not None:
        nctx, nmask = parse_conditioning(negative, "negative", config)
        if nctx.shape[1] > 0:  # an empty negative is zero tokens: the one Lens was trained with
            out.update(negative_context=nctx, negative_mask=nmask)
    return out


def _inpaint_inputs(noise_mask, samples, noise, has_content, mask_mode) -> dict:
    """A LATENT's noise_mask -> the inpainting arguments of ``sampling.sample`` (none without)."""
    if noise_mask is None:
        return {}
    _, _, h, w = samples.shape
    if not has_content:
        logger.warning("MMDiT Sampler: the latent has a noise_mask but no image content; the "
                       "unmasked area is kept as an empty (zero) latent. Encode the image with "
                       "FLUX2 VAE Encode before Set Latent Noise Mask.")
    mask = sampling.latent_mask(noise_mask, h, w, batch=samples.shape[0], mode=mask_mode)
    return {"denoise_mask": mask, "init_latents": samples, "init_noise": noise}


def _run(model, x, sigmas, inputs: dict, what: str):
    """Place the DiT through ComfyUI, attach the model's LoRAs, sample, remove the LoRAs.

    Returns the latents [B, 128, h, w] float32 on the intermediate device.
    """
    pbar = comfy.progress_bar(len(sigmas) - 1)
    comfy.check_interrupt()
    advice = (f"MMDiT Sampler ran out of memory at {what}. Try: LensLoader weight_dtype 'fp8' or "
              f"offload 'always', a smaller size (base 1024 in Lens Resolution), batch 1, or close "
              f"other GPU programs.")
    try:
        with comfy.oom_advice(advice):
            transformer = model.for_compute()
            dev = torch.device(transformer.device)  # where the weights are: host RAM under --novram
            preview = comfy.make_previewer(dev)  # None: the user's preview method is "none"

            def callback(step, n, x_next, denoised):
                # denoised = x_k - sigma_k * v, the x0 estimate [B, 128, h, w] on `dev`
                pbar.update_absolute(step + 1, n, preview(denoised) if preview is not None else None)
                comfy.check_interrupt()

            args = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in inputs.items()}
            with torch.no_grad(), loras_applied(model, transformer), comfy.cancel_inside_forward(transformer):
                out = sampling.sample(transformer, x.to(dev), sigmas.to(dev), args.pop("context"),
                                      args.pop("mask"), callback=callback, **args)
            return out.detach().to(comfy.intermediate_device(), torch.float32)
    except sampling.NonFiniteError as e:
        hint = (" In LensLoader try weight_dtype 'default' or 'fp32', or re-download the DiT."
                if e.where == "model output" else "")
        raise sampling.NonFiniteError(f"MMDiT Sampler: {e}{hint}", e.step, e.total,
                                      e.where) from None
    finally:
        model.after_use()


def _passed_through(latent) -> dict:
    """LATENT keys core's samplers keep in their output (noise_mask, batch_index, …); the spatial
    ratio of an empty latent is dropped, as core does."""
    if not isinstance(latent, dict):
        return {}
    return {k: v for k, v in latent.items() if k not in ("samples", "downscale_ratio_spacial")}
