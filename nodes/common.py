"""Helpers shared by the node modules: model lists, combo entries, queue-time checks."""

from __future__ import annotations

import os

from lens_model import checkpoints, constants, sampling

from . import comfy_adapter as comfy

CATEGORY = "Lens"
NO_FILES = "(no files found)"
"""The only combo entry of an empty model folder."""

# Which Lens component each ComfyUI model-folder key holds.
_COMPONENT = {"diffusion_models": "dit", "text_encoders": "te", "vae": "vae"}


def model_list(key: str) -> list[str]:
    """Combo values for a loader: ComfyUI's files of ``key`` as a Lens model picker lists them
    (``lens_model.checkpoints.list_checkpoints``: one ``<folder>/`` entry per diffusers folder, one
    entry per shard set)."""
    names = checkpoints.list_checkpoints(comfy.filename_list(key), comfy.folder_roots(key),
                                         _COMPONENT[key])
    return names or [NO_FILES]


def resolve_model(key: str, name: str) -> str:
    """Absolute path of a combo entry: a file, or a folder for the synthetic ``<folder>/`` entries."""
    if name == NO_FILES:
        raise FileNotFoundError(
            f"No model files found in the {key!r} folders ({', '.join(comfy.folder_roots(key))}). "
            f"Download the Lens files (https://huggingface.co/Comfy-Org/Lens) into models/{key}, "
            f"then refresh the browser."
        )
    if not name.endswith("/"):
        return comfy.full_path(key, name)
    roots = comfy.folder_roots(key)
    for root in roots:
        path = os.path.join(root, name.rstrip("/"))
        if os.path.isdir(path):
            return path
    if os.path.isabs(name) and os.path.isdir(name):
        return name.rstrip("/")
    raise FileNotFoundError(
        f"Folder {name!r} was not found in the {key!r} folders ({', '.join(roots) or 'none'}); "
        f"refresh the browser."
    )


def identity_or_nan(key: str, name: str):
    """``IS_CHANGED`` of a loader: the checkpoint's identity, so a replaced file reloads; NaN (never
    equal, so the node re-runs and raises the readable error) when the entry does not resolve."""
    try:
        return checkpoints.checkpoint_identity(resolve_model(key, name))
    except Exception:
        return float("nan")


def size_input(default: int, tooltip: str):
    """The INT widget of an image side in pixels: a multiple of ``SIZE_MULTIPLE`` up to ``MAX_SIDE``."""
    return ("INT", {"default": default, "min": constants.SIZE_MULTIPLE, "max": constants.MAX_SIDE,
                    "step": constants.SIZE_MULTIPLE, "tooltip": tooltip})


def check_choice(name: str, value, options) -> None:
    """A combo value arriving through the API is one of ``options``, or ValueError naming it."""
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


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
            sampling.check_number(value, name, opts["min"], opts["max"])
        except ValueError as e:
            problems.append(str(e))
    return "; ".join(problems) or True
