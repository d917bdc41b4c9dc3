"""ComfyUI-Lens: Microsoft Lens / Lens-Turbo text-to-image nodes in plain PyTorch.

ComfyUI imports this file at startup. It registers the nodes through the legacy (V1) mappings and
does nothing else: no torch work, no file scans, no network. The model code lives in
``lens_model`` (importable without ComfyUI); ``nodes`` holds thin ComfyUI adapters.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
