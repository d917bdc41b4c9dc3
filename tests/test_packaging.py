"""How the repository is collected by pytest and packaged by pip.

- The suite must run from a clone under any folder name. ComfyUI wants the clone in
  ``custom_nodes/ComfyUI-Lens``, which is not a Python identifier; pytest must never import the
  pack's root ``__init__.py`` (``from .nodes import ...``), see ``tests/conftest.py``.
- ``pip install .`` must give the ``lens_model`` package with its data files and the
  ``lens-generate`` console script, and nothing of the ComfyUI side (``nodes/``, root ``__init__``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_PROBE = '''
import sys
from pathlib import Path

ROOT_INIT = Path(__file__).resolve().parent.parent / "__init__.py"


def test_root_init_was_not_imported():
    imported = [name for name, module in list(sys.modules.items())
                if getattr(module, "__file__", None) and Path(module.__file__).resolve() == ROOT_INIT]
    assert imported == []
'''


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTHONPATH", None)
    return env


def test_repository_root_is_collected_as_a_plain_folder(request):
    packages = [node.nodeid or str(node.path) for node in request.node.listchain()
                if isinstance(node, pytest.Package)]
    assert packages == [], "pytest collected the repository root as a package; it imports __init__.py"


@pytest.mark.parametrize("folder", ["ComfyUI-Lens", "nodes"])
def test_readme_pytest_command_runs_under_any_folder_name(tmp_path, folder):
    """The README's ``python -m pytest -q`` in a clone named like ComfyUI's custom_nodes folder.

    The copy holds the real pytest configuration (``pyproject.toml``, ``tests/conftest.py``) and
    the real root ``__init__.py`` but no ``nodes/``: importing that file in any way fails.
    ``nodes`` is a Python identifier that collides with the pack's own sub-package.
    """
    clone = tmp_path / folder
    (clone / "tests").mkdir(parents=True)
    for name in ("pyproject.toml", "__init__.py", "tests/conftest.py"):
        shutil.copyfile(ROOT / name, clone / name)
    (clone / "tests" / "test_probe.py").write_text(_PROBE, encoding="utf-8")

    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                         cwd=clone, env=_subprocess_env(), capture_output=True, text=True, timeout=300)

    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout


def _copy_distribution_sources(destination: Path) -> None:
    """What ``pip install .`` reads: pyproject.toml, README.md and lens_model/ (no build output)."""
    destination.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, destination / name)
    shutil.copytree(ROOT / "lens_model", destination / "lens_model",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def test_pip_install_gives_lens_model_with_data_and_lens_generate(tmp_path):
    pytest.importorskip("setuptools", minversion="64", reason="building the wheel offline needs setuptools")
    source = tmp_path / "src"
    _copy_distribution_sources(source)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(wheels), str(source)],
                           env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    shipped = {path.relative_to(ROOT).as_posix() for path in (ROOT / "lens_model").rglob("*")
               if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}
    assert "lens_model/data/o200k_base.tiktoken.gz" in shipped
    assert shipped - names == set(), "files of lens_model/ missing from the wheel"
    assert not {n for n in names if n.startswith(("nodes/", "tests/", "tools/", "workflows/")) or n == "__init__.py"}
    assert "lens-generate = lens_model.cli:main" in entry_points.splitlines()

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              "--target", str(target), str(wheel)],
                             env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    env = _subprocess_env()
    env["PYTHONPATH"] = str(target)
    where = subprocess.run([sys.executable, "-c", "import lens_model; print(lens_model.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve().parent == (target / "lens_model").resolve()
    script = target / "bin" / "lens-generate"
    help_run = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0, help_run.stderr
    assert "usage:" in help_run.stdout and "--transformer" in help_run.stdout
