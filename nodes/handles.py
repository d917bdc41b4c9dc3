"""Values of the custom types LENS_DIT, LENS_TE and LENS_VAE.

The DiT and VAE handles are records around a core ``ModelPatcher`` (``.patcher``, core's own
convention for VAE / CLIP values): ComfyUI's model management decides where the weights are, and
the nodes call :meth:`for_compute` right before each use. The text-encoder handle is lazy: the
13 GB encoder is loaded only when a prompt misses the feature cache, keeps its own layer streaming,
and stands in core's list of loaded models while it is loaded, so core can evict it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import lens_model
from lens_model.checkpoints import checkpoint_bytes

from . import comfy_adapter as comfy

logger = logging.getLogger(__name__)


class _PlacedModel:
    """A model wrapped for core's model management (``patcher``) plus what its loader knew: the
    file ``path``, its ``identity`` and the dtype name it was loaded with."""

    def __init__(self, patcher, path: str, identity: tuple, dtype_name: str):
        self.patcher = patcher
        self.path = path
        self.identity = identity
        self.dtype_name = dtype_name

    def __repr__(self):
        # the holder's class names the kind, as in core's log ("LensDiT", "LensVAE")
        return f"{type(self.patcher.model).__name__}({self.path}, {self.dtype_name}, {self.patcher.load_device})"

    @property
    def device(self):
        """Where it computes when core places it (it may wait elsewhere)."""
        return self.patcher.load_device

    def for_compute(self, memory_required: int = 0):
        """The model on its compute device, placed by core (which frees room for it first)."""
        return comfy.place(self.patcher, memory_required)


class DiTHandle(_PlacedModel):
    """LENS_DIT: a LensTransformer wrapped for core's model management.

    ``loras`` is empty here; the LoRA loader returns a view with its own (nodes/lora.py).
    """

    loras = ()

    def __init__(self, patcher, path: str, identity: tuple, dtype_name: str, always_unload: bool):
        super().__init__(patcher, path, identity, dtype_name)
        self.always_unload = always_unload

    @property
    def model(self):
        """The LensTransformer wherever it is now."""
        return self.patcher.model.inner

    @property
    def config(self):
        return self.model.config

    @property
    def variant_defaults(self) -> dict:
        return dict(getattr(self.model, "variant_defaults", {}) or {})

    def after_use(self):
        if self.always_unload:
            comfy.unload(self.patcher)


class VAEHandle(_PlacedModel):
    """LENS_VAE: a Flux2VAE wrapped for core's model management."""

    @property
    def vae(self):
        """The Flux2VAE wherever it is now."""
        return self.patcher.model.inner


class TextEncoderHandle:
    """LENS_TE: where the text encoder is and how to load it; loads on the first cache miss.

    While loaded, its memory on the compute device is announced to core (:func:`comfy.claim_memory`),
    so core frees room before the encoder moves in and unloads it when another model needs the
    room, on ``/free`` and on ``unload_all_models``.
    """

    def __init__(self, path: str, identity: tuple, device, dtype, dtype_name: str, offload: str,
                 keep_loaded: bool, hidden_size: int):
        self.path = path
        self.identity = identity
        self.device = device
        self.dtype = dtype
        self.dtype_name = dtype_name
        self.offload_mode = offload
        self.keep_loaded = keep_loaded
        self.hidden_size = hidden_size
        self._encoder = None
        self._patcher = None
        self._lock = threading.RLock()
        self.loads = 0  # how many times the encoder was built (tests, logs)

    def __repr__(self):
        return f"LensTE({self.path}, {self.dtype_name}, {self.device}, offload={self.offload_mode})"

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def _drop_encoder(self):
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

    def unload(self):
        """Drop the encoder and its entry in core's list; the next cache miss loads it again."""
        if self._patcher is not None:
            comfy.unload(self._patcher)  # core detaches it: the callback drops the encoder
        self._drop_encoder()

    def _device_bytes(self) -> int:
        """Memory the encoder takes on its device: all weights (offload device/auto) or about one
        layer plus attention (layers/stream)."""
        size = checkpoint_bytes(self.path)
        return size if self.offload_mode in ("auto", "device") else min(size, 2 << 30)

    def encoder(self):
        """The loaded LensTextEncoder, loading it now if needed (raises and leaves nothing)."""
        with self._lock:
            if self._encoder is not None:
                return self._encoder
            if self._patcher is None:
                self._patcher = comfy.claim_memory(self._device_bytes(), self.device,
                                                   self._drop_encoder)
            comfy.place(self._patcher)  # core frees room for it and lists it
            offload = None if self.offload_mode == "auto" else self.offload_mode
            logger.info("loading Lens text encoder %s (%s, %s, offload %s)", Path(self.path).name,
                        self.dtype_name, self.device, self.offload_mode)
            try:
                self._encoder = lens_model.load_text_encoder(self.path, dtype=self.dtype,
                                                             device=self.device, offload=offload)
            except BaseException:
                self.unload()
                raise
            self.loads += 1
            return self._encoder

    def after_encode(self):
        if not self.keep_loaded:
            self.unload()
