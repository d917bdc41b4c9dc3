"""Shared test fixtures: the golden tiny-model folder and deterministic torch settings.

It also keeps pytest from importing the repository root as a Python package (see
``_RepositoryRootAsPlainFolder``), so the suite runs from a clone under any folder name.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden" / "lens_tiny"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


class _RepositoryRootAsPlainFolder:
    """Collect the repository root as a plain folder (``pytest.Dir``), never as a ``pytest.Package``.

    The root holds ComfyUI's entry point ``__init__.py`` (``from .nodes import ...``). Since pytest 8
    the collection tree starts at the rootdir (the folder of ``pyproject.toml``), and a folder with an
    ``__init__.py`` becomes a ``Package`` whose setup imports that file before the first test. Under a
    folder name that is not a Python identifier (``ComfyUI-Lens``, ``lens clone.v2``) pytest cannot
    name the package and imports the file as a top-level module ``__init__``, so the relative import
    fails and every test errors; under an identifier name it imports the whole pack a second time as
    a package named after the folder (``lens_clone.nodes``), which breaks for names such as ``nodes``.
    ``--import-mode=importlib`` still imports the file, and ``--confcutdir=tests`` only works from the
    repository root, so the root is collected as what it is for the tests: a folder. Registered as a
    plugin (not a conftest hook, which would only apply below ``tests/``) so it also covers the root.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent: pytest.Collector):
        if path.resolve() == self.root:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_RepositoryRootAsPlainFolder(ROOT), "lens-repository-root-as-folder")


@pytest.fixture(scope="module")
def positive():
    """A CONDITIONING from the golden case-0 prompt features (what the text-encode node outputs)."""
    from safetensors.torch import load_file

    cases = load_file(str(GOLDEN / "pipeline_cases.safetensors"))
    ctx = torch.cat([cases[f"case0.prompt_embeds.{i}"] for i in range(4)], dim=-1)
    mask = cases["case0.prompt_mask"].to(torch.int64)
    return [[ctx, {"pooled_output": None, "attention_mask": mask, "num_layers_stacked": 4}]]


@pytest.fixture
def golden_dir() -> Path:
    """tests/fixtures/golden/lens_tiny (copied verbatim from ../shared/golden)."""
    return GOLDEN
