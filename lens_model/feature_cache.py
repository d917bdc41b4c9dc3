"""Prompt features (text-encoder output) cached per prompt, in memory and optionally in a folder.

The one cache of the ComfyUI text-encode node and of the batch job (:mod:`lens_model.batch`):

- :func:`feature_key`: the entry key, :func:`lens_model.text_encoder.encode_prompt_cache_key` over
  the text, the template date, the text encoder's file identity (path, bytes, mtime), its compute
  dtype, the device kind it ran on and the marker-stripping flag. Replacing the file, or changing
  any of these, gives other keys.
- :class:`FeatureMemory`: an LRU in RAM bounded by entry count and by bytes.
- :class:`FeatureFolder`: one safetensors file per entry in a folder (a local path, or any
  filesystem :class:`~lens_model.batch_store.OutputStore` opens), written so that a file appears
  whole or not at all; several processes may share one folder.
- :class:`PromptFeatures`: both, seen through one text-encoder setting, keyed by the text alone.

File format: ``<key>.safetensors`` holding ``context`` ([1, S, 4E], the dtype it was given) and
``mask`` ([1, S] uint8, 1 = real token), with the key in the metadata (``{"key": <key>}``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .batch_store import OutputStore
from .text_encoder import encode_prompt_cache_key
from .tokenizer import resolve_date

logger = logging.getLogger(__name__)

Features = tuple[torch.Tensor, torch.Tensor]
"""``(context [1, S, 4E], mask [1, S] bool)`` on the CPU."""


def feature_key(text: str, date: str, identity, dtype: torch.dtype, device,
                strip_markers: bool = True) -> str:
    """Hex key of the features of ``text`` encoded with template ``date`` (``YYYY-MM-DD``) by the
    text encoder file of ``identity`` computing in ``dtype`` on ``device`` (its kind counts:
    "cpu", "cuda", …), with or without harmony markers stripped."""
    return encode_prompt_cache_key(text, date, identity, dtype, strip_markers=bool(strip_markers),
                                   device=torch.device(device).type)


class FeatureMemory:
    """LRU of :data:`Features` per key string, safe to share between threads.

    Bounded by entry count and by bytes (a 415-token prompt is ≈ 19 MB of fp32 features); the
    newest entry is always kept, even when it alone exceeds the byte budget.
    """

    def __init__(self, capacity: int = 64, max_bytes: int = 512 * 1024 * 1024):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, Features] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _size(value: Features) -> int:
        return sum(t.numel() * t.element_size() for t in value)

    def get(self, key: str) -> Optional[Features]:
        with self._lock:
            hit = self._data.get(key)
            if hit is not None:
                self._data.move_to_end(key)
            return hit

    def put(self, key: str, value: Features) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old)
            self._data[key] = value
            self._bytes += self._size(value)
            while len(self._data) > 1 and (len(self._data) > self.capacity
                                           or self._bytes > self.max_bytes):
                _, evicted = self._data.popitem(last=False)
                self._bytes -= self._size(evicted)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)


class FeatureFolder:
    """One safetensors file per key in a folder (see the module docstring for the format).

    ``root``: a local folder, a URI or an :class:`~lens_model.batch_store.OutputStore`. A file
    that cannot be read or parsed is logged and reads as a miss (the text is encoded again). A failed write
    raises OSError, or with ``best_effort`` is logged and skipped (the caller still has the
    features it tried to store).
    """

    def __init__(self, root: "str | os.PathLike | OutputStore", best_effort: bool = False):
        self.store = root if isinstance(root, OutputStore) else OutputStore(root)
        self.best_effort = best_effort

    def __repr__(self) -> str:
        return f"FeatureFolder({self.store.location!r})"

    @staticmethod
    def name(key: str) -> str:
        """The entry's file name in the folder."""
        return f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.store.size(self.name(key)) is not None

    def get(self, key: str) -> Optional[Features]:
        try:
            data = self.store.read(self.name(key))
            if data is None:
                return None
            tensors = load_safetensors(data)
            return tensors["context"], tensors["mask"].to(torch.bool)
        except (OSError, SafetensorError, KeyError) as e:
            logger.warning("ignoring unreadable text-feature cache file %s: %s",
                           self.store.path(self.name(key)), e)
            return None

    def put(self, key: str, context: torch.Tensor, mask: torch.Tensor) -> None:
        data = save_safetensors({"context": context.contiguous(), "mask": mask.to(torch.uint8)},
                                metadata={"key": key})
        try:
            self.store.write(self.name(key), data)
        except OSError as e:
            if not self.best_effort:
                raise
            logger.warning("could not write the text-feature cache %s: %s",
                           self.store.path(self.name(key)), e)


class PromptFeatures:
    """The feature cache of one text-encoder setting, keyed by the prompt text.

    ``identity``: the text encoder file's identity (:func:`lens_model.checkpoints.checkpoint_identity`,
    as the loader nodes and the batch job compute it);
    ``dtype`` / ``device``: where it computes; ``date``: template date (None: the default date).
    Lookups go to ``memory`` first, then to ``folder``; a folder hit is kept in ``memory``. Either
    may be None. Stored features are moved to the CPU.
    """

    def __init__(self, identity, dtype: torch.dtype, device, date: Optional[str] = None,
                 strip_markers: bool = True, memory: Optional[FeatureMemory] = None,
                 folder: Optional[FeatureFolder] = None):
        self.identity, self.dtype, self.device = identity, dtype, torch.device(device)
        self.date = resolve_date(date)
        self.strip_markers = bool(strip_markers)
        self.memory, self.folder = memory, folder

    def key(self, text: str) -> str:
        return feature_key(text, self.date, self.identity, self.dtype, self.device,
                           self.strip_markers)

    def __contains__(self, text: str) -> bool:
        key = self.key(text)
        return (self.memory is not None and key in self.memory) or \
            (self.folder is not None and key in self.folder)

    def get(self, text: str) -> Optional[Features]:
        """The cached features of ``text``, or None."""
        key = self.key(text)
        hit = self.memory.get(key) if self.memory is not None else None
        if hit is None and self.folder is not None:
            hit = self.folder.get(key)
            if hit is not None and self.memory is not None:
                self.memory.put(key, hit)
        return hit

    def __getitem__(self, text: str) -> Features:
        hit = self.get(text)
        if hit is None:
            where = self.folder.store if self.folder is not None else "memory"
            raise KeyError(f"no cached features for {text!r} in {where}")
        return hit

    def put(self, text: str, context: torch.Tensor, mask: torch.Tensor) -> None:
        """Store ``context [1, S, 4E]`` and ``mask [1, S]`` of ``text`` (on the CPU; the mask as
        bool) in memory and in the folder."""
        key = self.key(text)
        features = (context.detach().cpu(), mask.detach().cpu().to(torch.bool))
        if self.memory is not None:
            self.memory.put(key, features)
        if self.folder is not None:
            self.folder.put(key, *features)
