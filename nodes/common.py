"""Helpers shared by the node modules: the lens_model import, model lists, file identity and the
pack's own GPU residency policy (core cannot see our models, comfyui.md §4)."""

from __future__ import annotations

import importlib
import logging
import os
import re
import threading
import weakref

from . import comfy_adapter as comfy

logger = logging.getLogger(__name__)

CATEGORY = "Lens"

# Markers of a diffusers-style component folder, per ComfyUI folder key.
_DIFFUSERS_SUBFOLDER = {
    "diffusion_models": "transformer",
    "text_encoders": "text_encoder",
    "vae": "vae",
}
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")


def lens(submodule: str | None = None):
    """Import ``lens_model`` (or ``lens_model.<submodule>``) lazily.

    Inside ComfyUI the pack folder is a package and lens_model is its sub-package; in tests and
    scripts ``nodes`` is a top-level package next to a top-level ``lens_model``.
    """
    parent = (__package__ or "").rpartition(".")[0]
    name = f"{parent}.lens_model" if parent else "lens_model"
    return importlib.import_module(f"{name}.{submodule}" if submodule else name)


# --------------------------------------------------------------------------------------------
# model lists
# --------------------------------------------------------------------------------------------

def _diffusers_dirs(key: str) -> list[str]:
    """Synthetic combo entries ``<folder>/`` for diffusers pipelines or component folders.

    A pipeline root (holding ``transformer/`` etc.) or a bare component folder (``config.json``
    next to safetensors) inside one of the key's folders, at most two levels deep.
    """
    sub = _DIFFUSERS_SUBFOLDER[key]
    out: set[str] = set()
    for root in comfy.folder_roots(key):
        try:
            first = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError:
            continue
        for entry in first:
            if not entry.is_dir(follow_symlinks=True) or entry.name.startswith("."):
                continue
            path = entry.path
            if os.path.isfile(os.path.join(path, sub, "config.json")):
                out.add(entry.name + "/")
            elif os.path.isfile(os.path.join(path, "config.json")) and _has_safetensors(path):
                out.add(entry.name + "/")
    return sorted(out)


def _has_safetensors(path: str) -> bool:
    try:
        return any(n.endswith(".safetensors") for n in os.listdir(path))
    except OSError:
        return False


def model_list(key: str) -> list[str]:
    """Combo values for a loader: ComfyUI's file list plus one entry per diffusers folder.

    A diffusers folder is listed once as ``<folder>/`` and the files inside it are hidden. Shards
    after the first of a ``-0000k-of-0000n`` set are hidden (the first stands for the set).
    """
    folders = _diffusers_dirs(key)
    files = [f for f in comfy.filename_list(key) if not f.endswith((".gguf", ".json"))]
    kept = []
    for f in files:
        rel = f.replace("\\", "/")
        if any(rel.startswith(d) for d in folders):
            continue
        m = _SHARD_RE.match(os.path.basename(rel))
        if m and int(m.group("i")) > 1:
            continue
        kept.append(f)
    names = folders + sorted(kept)
    return names or ["(no files found)"]


def resolve_model(key: str, name: str) -> str:
    """Absolute path of a combo entry: a file, or a folder for the synthetic ``<folder>/`` entries."""
    if name == "(no files found)":
        raise FileNotFoundError(
            f"No model files found in the {key!r} folders ({', '.join(comfy.folder_roots(key))}). "
            f"Download the Lens files (https://huggingface.co/Comfy-Org/Lens) into models/{key}, "
            f"then refresh the browser."
        )
    if name.endswith("/"):
        for root in comfy.folder_roots(key):
            path = os.path.join(root, name.rstrip("/"))
            if os.path.isdir(path):
                return path
        if os.path.isabs(name) and os.path.isdir(name):
            return name.rstrip("/")
        raise FileNotFoundError(
            f"Folder {name!r} was not found in the {key!r} folders "
            f"({', '.join(comfy.folder_roots(key)) or 'none'}); refresh the browser."
        )
    return comfy.full_path(key, name)


def file_identity(path: str) -> str:
    """(path, size, mtime) of a file, a shard set or a folder's weight/config files, as one string.

    Used by the loaders' ``IS_CHANGED`` and the text-encoder feature cache key: a replaced file
    changes the identity.
    """
    path = os.path.abspath(path)
    files: list[str]
    if os.path.isdir(path):
        files = []
        for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
            dirnames.sort()
            depth = os.path.relpath(dirpath, path).count(os.sep)
            if depth >= 2:
                dirnames[:] = []
            files += [os.path.join(dirpath, n) for n in sorted(filenames)
                      if n.endswith((".safetensors", ".json"))]
    else:
        m = _SHARD_RE.match(os.path.basename(path))
        folder = os.path.dirname(path)
        if m:
            stem = m.group("stem")
            files = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                           if n.startswith(stem) and (_SHARD_RE.match(n) or n.endswith(".json")))
        else:
            files = [path]
    parts = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            parts.append(f"{f}:missing")
            continue
        parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


# --------------------------------------------------------------------------------------------
# residency: at most one of our big models on the GPU at a time
# --------------------------------------------------------------------------------------------

class Resident:
    """Base for handles whose weights can move between the compute device and host RAM.

    Subclasses implement ``_offload()`` (move weights off the GPU or drop them) and report
    ``on_gpu``. ``make_room`` offloads every other live handle before a big model moves in.
    """

    _live: "weakref.WeakSet[Resident]" = weakref.WeakSet()
    _lock = threading.Lock()

    def __init__(self):
        with Resident._lock:
            Resident._live.add(self)

    @property
    def on_gpu(self) -> bool:  # pragma: no cover - overridden
        return False

    def _offload(self) -> None:  # pragma: no cover - overridden
        pass

    def offload(self) -> None:
        if self.on_gpu:
            self._offload()

    def evict(self) -> None:
        """Leave the GPU whatever the offload policy (after an out-of-memory error)."""
        self.offload()

    def release(self) -> None:
        """Drop the weights (host RAM included); the handle reloads them from the file when used again."""


def make_room(for_handle, device, nbytes: int) -> None:
    """Before moving `for_handle` (our model, `nbytes` big) to `device`: offload our other GPU
    models, ask ComfyUI to evict its own models, and empty the allocator cache."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return
    moved = False
    with Resident._lock:
        others = [h for h in Resident._live if h is not for_handle]
    for h in others:
        if h.on_gpu:
            logger.info("offloading %s to make room on %s", h, device)
            h.offload()
            moved = True
    comfy.free_comfy_memory(int(nbytes * 1.1) + (512 << 20), device)
    if moved:
        comfy.soft_empty_cache()


def out_of_memory(error: BaseException, message: str, *handles) -> BaseException:
    """After an out-of-memory error: move our `handles` off the GPU, ask ComfyUI to unload its
    models and empty the allocator cache, and return an error of the same type (so core still
    recognises it as OOM) whose message starts with `message`. Use ``raise out_of_memory(...) from e``.
    """
    for h in handles:
        if h is None:
            continue
        try:
            h.evict()
        except Exception as e:  # never hide the OOM behind a second error
            logger.warning("could not offload %s after running out of memory: %s", h, e)
    comfy.unload_all_models()
    comfy.soft_empty_cache()
    try:
        return type(error)(f"{message} ({error})")
    except Exception:  # an error type that does not take a message
        error.add_note(message)
        return error


def module_nbytes(module) -> int:
    """Bytes held by a module's parameters and buffers."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += t.numel() * t.element_size()
    return total


def same_device(a, b) -> bool:
    """torch devices equal up to a missing CUDA index ("cuda" == "cuda:<current>")."""
    import torch

    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        if a.type != "cuda":
            return True
        current = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def module_device(module):
    import torch

    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def resolve_device(choice: str, auto_device):
    """Map a node's ``auto|gpu|cpu`` choice to a torch device; ``gpu`` without one is an error."""
    import torch

    if choice == "cpu":
        return torch.device("cpu")
    if choice == "gpu":
        dev = comfy.torch_device()
        if dev.type == "cpu":
            raise RuntimeError(
                "device 'gpu' was selected but ComfyUI runs on the CPU (no GPU found or --cpu "
                "given). Select 'auto' or 'cpu'."
            )
        return dev
    return torch.device(auto_device)
