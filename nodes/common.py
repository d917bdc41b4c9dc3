"""Helpers shared by the node modules: model lists, file identity, the device choice."""

from __future__ import annotations

import logging
import math
import os
import re

import torch

from lens_model.checkpoints import path_identity

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


def file_identity(path: str) -> tuple:
    """Identity (path, bytes, newest mtime) of a model for ``IS_CHANGED`` and the feature cache:
    a file, a folder, or for a shard its folder (the whole set); a replaced file changes it."""
    if _SHARD_RE.match(os.path.basename(path)):
        path = os.path.dirname(path)
    return path_identity(path)


def resolve_device(choice: str, auto_device) -> torch.device:
    """Map a node's ``auto|gpu|cpu`` choice to a torch device; ``gpu`` without one is an error."""
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


# --------------------------------------------------------------------------------------------
# queue-time checks
# --------------------------------------------------------------------------------------------

def check_float_widgets(node_cls, **values):
    """A node's ``VALIDATE_INPUTS`` for FLOAT widgets: True, or a message naming each bad input.

    ComfyUI runs ``VALIDATE_INPUTS`` when a prompt is queued, before any node executes. Its own
    min/max check lets NaN through (every comparison with NaN is false; the API's JSON accepts
    ``NaN``), so a NaN cfg was found only after the text encoder had run. Core skips its min/max
    check for inputs that ``VALIDATE_INPUTS`` takes, so the widget's range is checked here too.
    Inputs fed by a link are not passed at queue time; the node checks them when it runs.
    """
    types = node_cls.INPUT_TYPES()
    spec = {**types.get("required", {}), **types.get("optional", {})}
    problems = []
    for name, value in values.items():
        opts = spec[name][1]
        try:
            v = float(value)
        except (TypeError, ValueError, OverflowError):
            problems.append(f"{name} must be a number, got {value!r}")
            continue
        if not math.isfinite(v):
            problems.append(f"{name} must be a finite number, got {v}")
        elif not opts["min"] <= v <= opts["max"]:
            problems.append(f"{name} must be from {opts['min']:g} to {opts['max']:g}, got {v:g}")
    return "; ".join(problems) or True
