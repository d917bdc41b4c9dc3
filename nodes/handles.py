"""Values of the custom types LENS_DIT, LENS_TE and LENS_VAE.

A handle owns one lens_model object plus the user's placement choices, and moves the weights
between the compute device and host RAM (comfyui.md §4, performance.md §4): at most one of our big
models sits on the GPU at a time, and ComfyUI's own models are evicted before ours move in.

The text-encoder handle is lazy: the 13 GB encoder is loaded only when a prompt misses the feature
cache, so an unchanged prompt never reloads it.
"""

from __future__ import annotations

import logging
import threading

from . import comfy_adapter as comfy
from .common import Resident, lens, make_room, module_device, module_nbytes, same_device

logger = logging.getLogger(__name__)


def _move(obj, device):
    """Move a lens_model object (an nn.Module, or an object with its own ``to``)."""
    to = getattr(obj, "to", None)
    if to is None:
        return obj
    out = to(device)
    return obj if out is None else out


class DiTHandle(Resident):
    """LENS_DIT: a loaded LensTransformer plus where it computes and when it is offloaded.

    ``offload``: "auto" keeps it on the compute device until another of our models needs the room;
    "always" moves it to host RAM after every sampling run; "never" keeps it resident.
    ``reload``: builds the model again (into host RAM) after :meth:`release` dropped it; the loader
    releases its previous model when it loads another one, while ComfyUI may still hold this handle.
    """

    def __init__(self, model, path: str, identity: str, device, offload: str, dtype_name: str,
                 reload=None):
        super().__init__()
        self.model = model
        self.path = path
        self.identity = identity
        self.device = device
        self.offload_policy = offload
        self.dtype_name = dtype_name
        self.nbytes = module_nbytes(model)
        self._config = getattr(model, "config", None)
        self._variant_defaults = dict(getattr(model, "variant_defaults", {}) or {})
        self._reload = reload
        self.loads = 1

    def __repr__(self):
        return f"LensDiT({self.path}, {self.dtype_name}, {self.device})"

    @property
    def config(self):
        return self._config

    @property
    def variant_defaults(self) -> dict:
        return dict(self._variant_defaults)

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def on_gpu(self) -> bool:
        return self.model is not None and module_device(self.model).type != "cpu"

    def _offload(self):
        if self.offload_policy == "never":
            return
        self.evict()

    def evict(self):
        if self.on_gpu:
            self.model = _move(self.model, comfy.offload_device())
            comfy.soft_empty_cache()

    def release(self):
        if self.model is None or self._reload is None:
            return
        logger.info("releasing Lens DiT %s (another model was loaded by its loader)", self.path)
        self.model = None
        comfy.soft_empty_cache()

    def for_compute(self):
        """The model on its compute device (reloaded if released, made room for first)."""
        if self.model is None:
            logger.info("reloading Lens DiT %s", self.path)
            self.model = self._reload()
            self.loads += 1
        if not same_device(module_device(self.model), self.device):
            if self.device.type != "cpu":
                make_room(self, self.device, self.nbytes)
                logger.info("moving Lens DiT to %s", self.device)
            try:
                self.model = _move(self.model, self.device)
            except BaseException:
                # a failed move (out of memory, interrupt) must not leave the model split
                self.model = _move(self.model, comfy.offload_device())
                comfy.soft_empty_cache()
                raise
        return self.model

    def after_use(self):
        if self.offload_policy == "always":
            self.offload()


class TextEncoderHandle(Resident):
    """LENS_TE: where the text encoder is and how to load it; loads on the first cache miss."""

    def __init__(self, path: str, identity: str, device, dtype, dtype_name: str, offload: str,
                 keep_loaded: bool, hidden_size: int | None):
        super().__init__()
        self.path = path
        self.identity = identity
        self.device = device
        self.dtype = dtype
        self.dtype_name = dtype_name
        self.offload_mode = offload
        self.keep_loaded = keep_loaded
        self.hidden_size = hidden_size
        self._encoder = None
        self._lock = threading.Lock()
        self.loads = 0  # how many times the encoder was built (tests, logs)

    def __repr__(self):
        return f"LensTE({self.path}, {self.dtype_name}, {self.device}, offload={self.offload_mode})"

    @property
    def cache_identity(self) -> str:
        """What the features depend on besides the prompt: file, dtype and device kind."""
        return f"{self.identity}|{self.dtype_name}|{self.device.type}"

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    @property
    def on_gpu(self) -> bool:
        return self._encoder is not None and self.device.type != "cpu"

    def _offload(self):
        # The encoder is only useful for new prompts; features are cached. Dropping it is the
        # cheapest way to give its memory back (reloading reads the file again).
        self.unload()

    def evict(self):
        self.unload()

    def release(self):
        self.unload()

    def unload(self):
        with self._lock:
            enc, self._encoder = self._encoder, None
        if enc is None:
            return
        drop = getattr(enc, "unload", None)
        if drop is not None:
            drop()
        del enc
        logger.info("unloaded the Lens text encoder %s", self.path)
        comfy.soft_empty_cache()

    def encoder(self):
        """The loaded LensTextEncoder, loading it now if needed (raises and leaves nothing)."""
        with self._lock:
            if self._encoder is not None:
                return self._encoder
            from pathlib import Path

            if self.device.type != "cpu":
                size = _path_size(self.path)
                need = size if self.offload_mode in ("auto", "device") else min(size, 2 << 30)
                make_room(self, self.device, need)
            offload = None if self.offload_mode == "auto" else self.offload_mode
            logger.info("loading Lens text encoder %s (%s, %s, offload %s)", Path(self.path).name,
                        self.dtype_name, self.device, self.offload_mode)
            try:
                enc = lens().load_text_encoder(self.path, dtype=self.dtype, device=self.device,
                                               offload=offload)
            except BaseException:
                comfy.soft_empty_cache()
                raise
            self._encoder = enc
            self.loads += 1
            return enc

    def encoder_hidden_size(self) -> int:
        """Hidden size E from the loaded encoder (only when the file header did not tell)."""
        enc = self.encoder()
        try:
            cfg = getattr(enc, "config", None)
            e = getattr(cfg, "hidden_size", None) if cfg is not None else None
            if e is None and isinstance(cfg, dict):
                e = cfg.get("hidden_size")
            if e is None:
                raise RuntimeError(f"cannot tell the hidden size of the text encoder {self.path}.")
            self.hidden_size = int(e)
            return self.hidden_size
        finally:
            self.after_encode()

    def after_encode(self):
        if not self.keep_loaded:
            self.unload()


class VAEHandle(Resident):
    """LENS_VAE: a loaded Flux2VAE; computes on `device`, waits in host RAM. ``reload`` as for
    :class:`DiTHandle`."""

    def __init__(self, vae, path: str, identity: str, device, dtype_name: str, reload=None):
        super().__init__()
        self.vae = vae
        self.path = path
        self.identity = identity
        self.device = device
        self.dtype_name = dtype_name
        self.nbytes = module_nbytes(vae) if hasattr(vae, "parameters") else 0
        self._reload = reload
        self.loads = 1

    def __repr__(self):
        return f"LensVAE({self.path}, {self.dtype_name}, {self.device})"

    @property
    def loaded(self) -> bool:
        return self.vae is not None

    @property
    def on_gpu(self) -> bool:
        return hasattr(self.vae, "parameters") and module_device(self.vae).type != "cpu"

    def _offload(self):
        self.vae = _move(self.vae, comfy.offload_device())

    def release(self):
        if self.vae is None or self._reload is None:
            return
        logger.info("releasing FLUX.2 VAE %s (another VAE was loaded by its loader)", self.path)
        self.vae = None
        comfy.soft_empty_cache()  # as for the DiT: a VAE left on the GPU gives its memory back now

    def model(self):
        """The VAE wherever it is now (reloaded into host RAM if released)."""
        if self.vae is None:
            logger.info("reloading FLUX.2 VAE %s", self.path)
            self.vae = self._reload()
            self.loads += 1
        return self.vae

    def for_compute(self, work_bytes: int = 0):
        vae = self.model()
        if self.device.type != "cpu":
            free = comfy.free_memory_bytes(self.device)
            need = work_bytes + (0 if self.on_gpu else self.nbytes)
            if free is None or free < need:
                make_room(self, self.device, need)
        if hasattr(vae, "parameters") and not same_device(module_device(vae), self.device):
            try:
                self.vae = _move(vae, self.device)
            except BaseException:
                self.vae = _move(vae, comfy.offload_device())
                comfy.soft_empty_cache()
                raise
        return self.vae


def _path_size(path: str) -> int:
    import os

    if os.path.isdir(path):
        total = 0
        for dirpath, _, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files
                         if f.endswith(".safetensors"))
        return total
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
