"""ComfyUI-Lens: Microsoft Lens / Lens-Turbo text-to-image nodes in plain PyTorch.

ComfyUI imports this file at startup (as a package named after the pack folder, e.g.
``ComfyUI-Lens``). It makes the pack's model package importable under its own name
``lens_model`` — the name it has for the command line, ``pip install`` and the tests — by
appending the pack folder to ``sys.path``, then registers the nodes through the legacy (V1)
mappings. The nodes import ``lens_model`` with plain ``import`` statements. No model file is read
and nothing runs on a device here.
"""

import logging
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)  # appended: the pack never shadows core's own modules (e.g. `nodes`)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

_lens_model = sys.modules.get("lens_model")
if _lens_model is not None and not os.path.realpath(_lens_model.__file__).startswith(
        os.path.realpath(_PACK_DIR) + os.sep):
    logging.getLogger(__name__).warning(
        "ComfyUI-Lens: another lens_model package (%s) is imported instead of the pack's own (%s); "
        "uninstall it (pip uninstall lens-nodes) or install this checkout.",
        _lens_model.__file__, _PACK_DIR)

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
