"""The README's Python example runs as written on a CPU-only machine.

The example is read from README.md and executed with two stand-ins only: ``hf_hub_download``
returns the files of a tiny, mutually consistent model set written by tools/make_tiny_models.py in
the Comfy-Org/Lens layout (nothing is downloaded), and the example's image size line is shrunk so
the tiny VAE decodes quickly. ``torch.cuda.is_available()`` reports no GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SIZE_LINE = "height = width = 1024"


def _readme_python_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Python API\n"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no ```python block under '## Python API'"
    return match.group(1)


def _tiny_models(out: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_tiny_models", ROOT / "tools" / "make_tiny_models.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with contextlib.redirect_stdout(io.StringIO()):
        tool.main(["--out", str(out), "--names-from-workflows"])


def test_readme_python_example_runs_on_cpu(tmp_path, monkeypatch):
    import huggingface_hub
    from PIL import Image

    code = _readme_python_example()
    assert '"cuda"' not in code.replace('"cuda" if torch.cuda.is_available()', "")
    assert code.count(SIZE_LINE) == 1, f"the example sets its size in one line: {SIZE_LINE!r}"

    models = tmp_path / "models"
    _tiny_models(models)
    asked = []

    def hf_hub_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        path = models / filename
        assert repo_id == "Comfy-Org/Lens" and path.is_file(), (repo_id, filename)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    namespace = {"__name__": "readme_example"}
    exec(compile(code.replace(SIZE_LINE, "height = width = 64"), "README.md:Python API", "exec"), namespace)

    assert {f for _, f in asked} == {"text_encoders/gpt_oss_20b_nvfp4.safetensors",
                                     "diffusion_models/lens_turbo_bf16.safetensors",
                                     "vae/flux2-vae.safetensors"}
    assert namespace["device"] == "cpu"
    assert tuple(namespace["images"].shape) == (1, 64, 64, 3)
    assert torch.isfinite(namespace["images"]).all()
    with Image.open(work / "fox.png") as img:
        assert img.size == (64, 64)
