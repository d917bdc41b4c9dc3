"""The only place where the pack touches ComfyUI.

Every ComfyUI module (``folder_paths``, ``comfy.model_management``, ``comfy.utils``,
``comfy.latent_formats``, ``latent_preview``) is imported lazily inside the function that needs it,
so ``nodes`` imports cleanly in a plain Python environment (tests, scripts). Outside ComfyUI each
function falls back to a sensible default: CUDA if present else CPU, no-op memory calls, no
progress bar, no previews, no interrupt.

ComfyUI is GPL-3.0: we call it at run time, we never copy its code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def _folder_paths():
    try:
        import folder_paths  # ComfyUI
    except ImportError:
        return None
    return folder_paths


def _mm():
    try:
        import comfy.model_management as mm  # ComfyUI
    except ImportError:
        return None
    return mm


# --------------------------------------------------------------------------------------------
# model folders
# --------------------------------------------------------------------------------------------

def filename_list(key: str) -> list[str]:
    """Relative file names ComfyUI lists for a model folder key (`diffusion_models`, ...)."""
    fp = _folder_paths()
    if fp is None:
        return []
    try:
        return list(fp.get_filename_list(key))
    except Exception as e:  # an unknown key in an old ComfyUI, a broken extra_model_paths.yaml
        logger.warning("could not list model folder %r: %s", key, e)
        return []


def folder_roots(key: str) -> list[str]:
    """Absolute folders ComfyUI searches for `key` (includes extra_model_paths.yaml entries)."""
    fp = _folder_paths()
    if fp is None:
        return []
    try:
        return [p for p in fp.get_folder_paths(key) if os.path.isdir(p)]
    except Exception as e:
        logger.warning("could not read model folders for %r: %s", key, e)
        return []


def full_path(key: str, name: str) -> str:
    """Resolve a combo entry to an absolute path, or raise FileNotFoundError naming the folders."""
    fp = _folder_paths()
    if fp is not None:
        path = fp.get_full_path(key, name)
        if path is not None:
            return path
        roots = folder_roots(key)
    else:
        roots = []
    if os.path.isabs(name) and os.path.exists(name):
        return name
    looked = ", ".join(roots) if roots else "(no ComfyUI model folders available)"
    raise FileNotFoundError(
        f"Model {name!r} was not found in the {key!r} folders ({looked}). Put the file there "
        f"(or list its folder in extra_model_paths.yaml), then refresh the browser (press R)."
    )


def cache_dir() -> Path:
    """Folder for the pack's on-disk caches (text-encoder features).

    ``LENS_NODES_CACHE_DIR`` overrides it. Inside ComfyUI: the system-user folder
    ``folder_paths.get_system_user_directory("lens_nodes")`` (``user/__lens_nodes``; core never
    serves ``__`` folders over HTTP and keeps them across restarts); on ComfyUI versions without it,
    ``<models>/lens_nodes_cache``. Outside ComfyUI: ``~/.cache/lens_nodes``.
    """
    env = os.environ.get("LENS_NODES_CACHE_DIR")
    if env:
        return Path(env)
    fp = _folder_paths()
    if fp is not None:
        system = getattr(fp, "get_system_user_directory", None)
        if system is not None:
            try:
                return Path(system("lens_nodes"))
            except Exception as e:
                logger.warning("could not get ComfyUI's system user directory: %s", e)
        models = getattr(fp, "models_dir", None)
        if models:
            return Path(models) / "lens_nodes_cache"
    return Path.home() / ".cache" / "lens_nodes"


# --------------------------------------------------------------------------------------------
# devices and memory
# --------------------------------------------------------------------------------------------

def torch_device():
    """ComfyUI's main compute device (the CPU under --cpu)."""
    import torch

    mm = _mm()
    if mm is not None:
        return torch.device(mm.get_torch_device())
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def offload_device():
    """Where a model waits while it is not computing (host RAM)."""
    import torch

    mm = _mm()
    if mm is not None:
        return torch.device(mm.unet_offload_device())
    return torch.device("cpu")


def text_encoder_device():
    """ComfyUI's placement policy for text encoders (CPU on low-VRAM setups)."""
    import torch

    mm = _mm()
    if mm is not None:
        return torch.device(mm.text_encoder_device())
    return torch_device()


def vae_device():
    import torch

    mm = _mm()
    if mm is not None:
        return torch.device(mm.vae_device())
    return torch_device()


def intermediate_device():
    """Where LATENT, IMAGE and CONDITIONING tensors travel between nodes (the CPU)."""
    import torch

    mm = _mm()
    if mm is not None:
        return torch.device(mm.intermediate_device())
    return torch.device("cpu")


def should_use_bf16(device) -> bool:
    """Whether to compute in bf16 on `device` (else fp32; Lens never runs in fp16).

    Inside ComfyUI this is core's ``should_use_bf16`` (honours --force-fp32; False on the CPU and on
    pre-Ampere NVIDIA cards such as T4, V100 or RTX 20xx, where bf16 is emulated and slow). Outside
    ComfyUI: CUDA devices of compute capability 8.0 or newer.
    """
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return False
    mm = _mm()
    if mm is not None and hasattr(mm, "should_use_bf16"):
        try:
            return bool(mm.should_use_bf16(device))
        except Exception as e:  # an exotic backend core cannot query
            logger.warning("ComfyUI should_use_bf16(%s) failed: %s; assuming bf16", device, e)
            return True
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        return torch.cuda.get_device_capability(device)[0] >= 8
    return True


def free_memory_bytes(device) -> int | None:
    """Free memory on `device` in bytes (None when unknown)."""
    import torch

    device = torch.device(device)
    mm = _mm()
    if mm is not None:
        try:
            return int(mm.get_free_memory(device))
        except Exception:
            return None
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def free_comfy_memory(nbytes: int, device) -> None:
    """Ask ComfyUI to evict its own models until `nbytes` are free on `device`."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return
    mm = _mm()
    if mm is None:
        return
    try:
        mm.free_memory(int(nbytes), device)
    except Exception as e:  # never fail a run because core's bookkeeping refused
        logger.warning("ComfyUI free_memory(%d, %s) failed: %s", nbytes, device, e)


def unload_all_models() -> None:
    """Ask ComfyUI to unload all of its own models (after an out-of-memory error)."""
    mm = _mm()
    if mm is None:
        return
    try:
        mm.unload_all_models()
    except Exception as e:
        logger.warning("ComfyUI unload_all_models() failed: %s", e)


def soft_empty_cache() -> None:
    """Return cached allocator blocks to the driver (after large frees)."""
    import gc

    gc.collect()
    mm = _mm()
    if mm is not None:
        mm.soft_empty_cache()
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# progress and cancellation
# --------------------------------------------------------------------------------------------

def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel.

    The exception derives from BaseException: never catch it with ``except Exception``.
    """
    mm = _mm()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class _NoProgress:
    def update(self, value):
        pass

    def update_absolute(self, value, total=None, preview=None):
        pass


def progress_bar(total: int):
    """A ComfyUI progress bar (``update_absolute(value, total, preview)``), or a silent one."""
    try:
        import comfy.utils
    except ImportError:
        return _NoProgress()
    return comfy.utils.ProgressBar(int(total))


# --------------------------------------------------------------------------------------------
# latent previews
# --------------------------------------------------------------------------------------------

_preview_note_logged = False


def _preview_unavailable(reason) -> None:
    global _preview_note_logged
    if not _preview_note_logged:
        _preview_note_logged = True
        logger.debug("MMDiT Sampler: no latent previews (%s).", reason)


def make_previewer(device):
    """ComfyUI's latent previewer for Lens latents, or None when no previews are sent.

    Returns ``preview(x0 [B, 128, h, w]) -> ("JPEG", PIL.Image, max_size) | None``, the value
    ``ProgressBar.update_absolute(value, total, preview)`` takes. Everything comes from core at run
    time: ``latent_preview.get_previewer(device, comfy.latent_formats.Flux2())`` honours the user's
    preview method (none / auto / latent2rgb / taesd with models/vae_approx/taef2_decoder), and
    the previewer's ``decode_latent_to_preview_image`` turns x0 into the image. Like core's
    KSampler, the previewer gets x0 in the model's latent space (``process_in`` of the LATENT
    space; identity for Flux2). The pack holds no latent→RGB factors of its own.

    Outside ComfyUI, or on a ComfyUI without these names, there are no previews (logged once at
    debug level). A previewer that fails while decoding is dropped for the rest of the run with
    one warning; sampling goes on.
    """
    try:
        import latent_preview  # ComfyUI root module
        from comfy import latent_formats
        fmt = latent_formats.Flux2()
        get_previewer = latent_preview.get_previewer
    except (ImportError, AttributeError) as e:
        _preview_unavailable(e)
        return None
    try:
        previewer = get_previewer(device, fmt)
    except Exception as e:  # e.g. an unreadable TAESD file; previews are optional
        logger.warning("MMDiT Sampler: ComfyUI's latent previewer could not be set up (%s); "
                       "sampling without previews.", e)
        return None
    if previewer is None:  # the user's preview method is "none"
        return None
    decode = getattr(previewer, "decode_latent_to_preview_image", None)
    if decode is None:
        _preview_unavailable(f"{type(previewer).__name__} has no decode_latent_to_preview_image")
        return None
    process_in = getattr(fmt, "process_in", None)
    failed = False

    def preview(x0):
        nonlocal failed
        if failed:
            return None
        try:
            z = process_in(x0) if process_in is not None else x0
            return decode("JPEG", z)
        except Exception as e:  # never fail a generation over a preview (BaseException passes)
            failed = True
            logger.warning("MMDiT Sampler: latent preview failed (%s: %s); no more previews "
                           "this run.", type(e).__name__, e)
            return None

    return preview
