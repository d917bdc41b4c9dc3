"""The only place where the pack touches ComfyUI.

Every ComfyUI module (``folder_paths``, ``comfy.model_management``, ``comfy.model_patcher``,
``comfy.utils``, ``comfy.latent_formats``, ``latent_preview``) is imported inside the function that
needs it, so ``nodes`` imports in a plain Python environment (tests, scripts) and the stand-ins of
``tests/comfy_stubs.py`` can be swapped in per test. Outside ComfyUI each function falls back to a
sensible default: CUDA if present else CPU, models moved by hand, no progress bar, no previews,
no interrupt.

Our DiT and VAE are placed by core's model management (:func:`wrap_model`, :func:`place`), so core
evicts them when another model needs room, evicts its own for them, and ``/free`` /
``unload_all_models`` reach them; the streamed text encoder announces its memory with
:func:`claim_memory`.

ComfyUI is GPL-3.0: we call it at run time, we never copy its code.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from pathlib import Path

import torch

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
# devices
# --------------------------------------------------------------------------------------------

def torch_device() -> torch.device:
    """ComfyUI's main compute device (the CPU under --cpu)."""
    mm = _mm()
    if mm is not None:
        return torch.device(mm.get_torch_device())
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def text_encoder_device() -> torch.device:
    """ComfyUI's placement policy for text encoders (CPU on low-VRAM setups)."""
    mm = _mm()
    return torch.device(mm.text_encoder_device()) if mm is not None else torch_device()


def vae_device() -> torch.device:
    """ComfyUI's VAE device (the CPU with --cpu-vae)."""
    mm = _mm()
    return torch.device(mm.vae_device()) if mm is not None else torch_device()


def intermediate_device() -> torch.device:
    """Where LATENT, IMAGE and CONDITIONING tensors travel between nodes (the CPU)."""
    mm = _mm()
    return torch.device(mm.intermediate_device()) if mm is not None else torch.device("cpu")


def should_use_bf16(device) -> bool:
    """Whether to compute in bf16 on `device` (else fp32; Lens never runs in fp16).

    Inside ComfyUI this is core's ``should_use_bf16`` (honours --force-fp32; False on the CPU and on
    pre-Ampere NVIDIA cards such as T4, V100 or RTX 20xx, where bf16 is emulated and slow). Outside
    ComfyUI: CUDA devices of compute capability 8.0 or newer.
    """
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
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    return True


def weights_device(module) -> torch.device:
    """Where a module's weights are now (its first parameter or buffer; CPU when it has none)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# model management: our DiT and VAE live in core's list of loaded models
# --------------------------------------------------------------------------------------------

class ModelHolder(torch.nn.Module):
    """The module core's ``ModelPatcher`` manages: our model as the child ``inner``.

    Core writes its load bookkeeping (``device``, ``model_loaded_weight_memory``, ...) onto the
    module it manages, and our models' ``device`` is a read-only property, so they sit inside this
    container. The subclass name is what core's log shows ("Requested to load LensDiT").
    """

    def __init__(self, module=None):
        super().__init__()
        if module is not None:
            self.inner = module
        self.device = weights_device(self)


class LensDiT(ModelHolder):
    pass


class LensVAE(ModelHolder):
    pass


class LensTextEncoder(ModelHolder):
    """No weights of its own: stands for the streamed text encoder's memory in core's list."""


class _LocalPatcher:
    """Outside ComfyUI: the part of ``ModelPatcher`` the nodes use (move to the load device)."""

    def __init__(self, model, load_device, offload_device, size=0):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.on_detach = []

    def place(self):
        self.model.to(self.load_device)

    def detach(self, unpatch_all=True):
        self.model.to(self.offload_device)
        for fn in self.on_detach:
            fn(self, unpatch_all)
        return self.model


def _model_patcher_class():
    try:
        import comfy.model_patcher as model_patcher  # ComfyUI
    except ImportError:
        return None
    return model_patcher.ModelPatcher


def wrap_model(module, kind: str, device, keep_on_device: bool = False):
    """Wrap our DiT (``kind="dit"``) or VAE (``"vae"``) for core's model management.

    The legacy ``comfy.model_patcher.ModelPatcher`` is named on purpose: our layers are not
    ``comfy.ops`` layers, so core's dynamic-VRAM patcher could not stage them and its partial
    loading would leave them behind. ``device`` is where the model computes (the node's choice
    resolved: core's main / VAE device, or the CPU); it waits on core's offload device for that
    kind (host RAM; the GPU under --highvram / --gpu-only), or stays on ``device`` with
    ``keep_on_device``. Returns the patcher; the model is moved only by :func:`place`.
    """
    device = torch.device(device)
    holder = {"dit": LensDiT, "vae": LensVAE}[kind](module)
    offload = torch.device("cpu")
    mm = _mm()
    if device.type == "cpu":
        offload = device
    elif keep_on_device:
        offload = device
    elif mm is not None:
        offload = torch.device(mm.unet_offload_device() if kind == "dit" else mm.vae_offload_device())
    cls = _model_patcher_class()
    if cls is None:
        return _LocalPatcher(holder, device, offload)
    return cls(holder, load_device=device, offload_device=offload)


def place(patcher, memory_required: int = 0):
    """Put a wrapped model on its compute device through core and return our module.

    ``load_models_gpu`` frees room first (evicting core's models, or ours, as needed), then loads
    this one completely (``force_full_load``: core's partial loading only handles ``comfy.ops``
    layers). ``memory_required`` is the working memory the run needs beside the weights. Compute
    where the returned module's weights are (:func:`weights_device`): under --novram core leaves
    them in host RAM. Call it before every use; core may have moved the model since.
    """
    mm = _mm()
    if isinstance(patcher, _LocalPatcher) or mm is None:
        patcher.place()
    else:
        mm.load_models_gpu([patcher], memory_required=int(memory_required), force_full_load=True)
    return getattr(patcher.model, "inner", None)


def unload(patcher) -> None:
    """Take one wrapped model off its device now and out of core's list (the DiT loader's
    offload "always"; a text encoder that is not kept). Core's own eviction does the same."""
    mm = _mm()
    if isinstance(patcher, _LocalPatcher) or mm is None:
        patcher.detach()
        return
    for loaded in list(mm.current_loaded_models):
        if loaded.model is patcher:
            mm.current_loaded_models.remove(loaded)
            loaded.model_unload()  # detach: back to the offload device, ON_DETACH callbacks
            return


def claim_memory(nbytes: int, device, on_evict):
    """A patcher standing for `nbytes` we hold on `device` outside a module (the streamed text
    encoder). :func:`place` it before using the memory: core frees that much first and lists it
    among its loaded models; when core evicts it (another model needs room, /free,
    unload_all_models) it calls ``on_evict()``, which must drop the memory. Keep the patcher for
    the next :func:`place` (core's list only holds weak references); give the memory back early
    with :func:`unload`."""
    device = torch.device(device)
    cls = _model_patcher_class()
    if cls is None or _mm() is None:
        patcher = _LocalPatcher(LensTextEncoder(), device, device)
        patcher.on_detach.append(lambda *_: on_evict())
        return patcher
    from comfy.patcher_extension import CallbacksMP  # ComfyUI

    patcher = cls(LensTextEncoder(), load_device=device, offload_device=device, size=max(1, int(nbytes)))
    patcher.add_callback(CallbacksMP.ON_DETACH, lambda *_: on_evict())
    return patcher


def unload_all_models() -> None:
    """Ask ComfyUI to unload every loaded model, ours included (after an out-of-memory error)."""
    mm = _mm()
    if mm is None:
        return
    try:
        mm.unload_all_models()
    except Exception as e:
        logger.warning("ComfyUI unload_all_models() failed: %s", e)


def soft_empty_cache() -> None:
    """Return cached allocator blocks to the driver (after large frees)."""
    gc.collect()
    mm = _mm()
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    """Whether `error` is an out-of-memory error (core's test when it has one)."""
    mm = _mm()
    test = getattr(mm, "is_oom", None) if mm is not None else None
    if test is not None:
        return bool(test(error))
    return isinstance(error, torch.cuda.OutOfMemoryError)


def out_of_memory(error: BaseException, message: str) -> BaseException:
    """After an out-of-memory error: unload every model (ours are in core's list) and return an
    error of the same type (core still recognises it as OOM) whose message starts with `message`.
    Use ``raise out_of_memory(e, "...") from e``."""
    unload_all_models()
    soft_empty_cache()
    try:
        return type(error)(f"{message} ({error})")
    except Exception:  # an error type that does not take a message
        error.add_note(message)
        return error


@contextlib.contextmanager
def oom_advice(message: str):
    """Inside: an out-of-memory error becomes :func:`out_of_memory`'s (every model unloaded, the
    same error type, ``message`` in front); any other error passes unchanged."""
    try:
        yield
    except Exception as e:
        if not is_oom(e):
            raise
        raise out_of_memory(e, message) from e


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


@contextlib.contextmanager
def cancel_inside_forward(transformer):
    """Check ComfyUI's Cancel before every transformer block and every module inside it
    (attention, each MLP linear, ...) while sampling: a CPU step of the full DiT takes minutes and
    one block's MLP alone several seconds, so checks between steps or blocks are too coarse.
    Forward pre-hooks (a flag check each, no device sync), removed on exit; a model without
    ``transformer_blocks`` gets none."""
    blocks = getattr(transformer, "transformer_blocks", None) or []
    handles = []

    def check(module, args):
        check_interrupt()

    try:
        for block in blocks:
            handles += [m.register_forward_pre_hook(check) for m in block.modules()]
        yield
    finally:
        for h in handles:
            h.remove()


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
