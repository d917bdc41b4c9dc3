"""Minimal stand-ins for the ComfyUI modules the pack calls, written from scratch for tests.

ComfyUI is not on PyPI, so the node tests run against these fakes:

- ``folder_paths``: model folders under a temp ``models/`` dir (``diffusion_models`` also searches
  ``unet``, ``text_encoders`` also ``clip``), ``get_filename_list`` (recursive, relative, sorted),
  ``get_full_path``, ``get_full_path_or_raise``, ``get_folder_paths``, user/temp directories and
  ``get_system_user_directory(name)`` (``user/__<name>``, as in core);
- ``comfy.model_management``: CPU device, recorded free/unload calls, ``should_use_bf16`` (answers
  ``env.bf16`` for non-CPU devices), an interrupt flag and an ``InterruptProcessingException``
  deriving from BaseException (like core's);
- ``comfy.utils.ProgressBar``: records every ``update`` / ``update_absolute`` call;
- ``comfy.latent_formats.Flux2``: 128 channels, 16× downscale, identity ``process_in`` /
  ``process_out`` (no latent→RGB factors: the stand-in previewer does not need any);
- ``latent_preview.get_previewer(device, latent_format)``: None while ``env.preview_method`` is
  "none" (core's default), else a previewer whose ``decode_latent_to_preview_image(format, x0)``
  records ``x0`` in ``env.previews`` and returns ``("JPEG", FakePreviewImage, 512)``.

Use the ``comfy_env`` fixture (import it into a test module: ``from comfy_stubs import comfy_env``).
It installs the fakes into ``sys.modules`` for one test and removes them afterwards.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
FOLDERS = {
    "diffusion_models": ["diffusion_models", "unet"],
    "text_encoders": ["text_encoders", "clip"],
    "vae": ["vae"],
}


class InterruptProcessingException(BaseException):
    """Raised by the fake throw_exception_if_processing_interrupted (BaseException, as in core)."""


@dataclass
class ComfyEnv:
    """Handle on the installed fakes: folders, recorded calls and the interrupt switch."""

    root: Path
    models_dir: Path
    progress: list = field(default_factory=list)       # (bar id, "update"/"abs", value, total, preview)
    bars: list = field(default_factory=list)           # totals of created ProgressBars
    freed: list = field(default_factory=list)          # (bytes, device) of free_memory calls
    unloads: int = 0
    empty_cache_calls: int = 0
    interrupt_checks: int = 0
    interrupt_after_checks: int | None = None          # raise on the n-th check from now
    interrupted: bool = False
    bf16: bool = True                                  # should_use_bf16 for non-CPU devices
    preview_method: str = "none"                       # "none" (core's default), "latent2rgb", ...
    previewer_requests: list = field(default_factory=list)  # (device, latent_format) per call
    previews: list = field(default_factory=list)       # (preview_format, x0 CPU copy) per preview
    preview_error: BaseException | None = None         # raised by the fake decode when set

    def folder(self, key: str) -> Path:
        return self.models_dir / FOLDERS[key][0]

    def interrupt_at(self, n: int | None) -> None:
        """Raise InterruptProcessingException at the n-th interrupt check from now (None: never)."""
        self.interrupt_after_checks = None if n is None else self.interrupt_checks + n


def _make_folder_paths(env: ComfyEnv) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(env.models_dir)
    fp.folder_names_and_paths = {
        key: ([str(env.models_dir / d) for d in dirs], set(EXTENSIONS)) for key, dirs in FOLDERS.items()
    }

    def get_folder_paths(key):
        return list(fp.folder_names_and_paths[key][0])

    def get_filename_list(key):
        out = set()
        for base in get_folder_paths(key):
            if not os.path.isdir(base):
                continue
            for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
                dirnames.sort()
                for name in filenames:
                    if name.endswith(EXTENSIONS):
                        rel = os.path.relpath(os.path.join(dirpath, name), base)
                        out.add(rel.replace(os.sep, "/"))
        return sorted(out)

    def get_full_path(key, name):
        for base in get_folder_paths(key):
            path = os.path.join(base, name)
            if os.path.isfile(path):
                return path
        return None

    def get_full_path_or_raise(key, name):
        path = get_full_path(key, name)
        if path is None:
            raise FileNotFoundError(f"Model in folder '{key}' with filename '{name}' not found.")
        return path

    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.get_full_path_or_raise = get_full_path_or_raise
    def get_system_user_directory(name="system"):
        if not name or not isinstance(name, str) or name.startswith("_") or not name.replace("_", "").isalnum():
            raise ValueError(f"Invalid system user name: {name!r}")
        return os.path.join(str(env.root / "user"), "__" + name)

    fp.get_system_user_directory = get_system_user_directory
    fp.get_user_directory = lambda: str(env.root / "user")
    fp.get_temp_directory = lambda: str(env.root / "temp")
    fp.get_output_directory = lambda: str(env.root / "output")
    fp.get_input_directory = lambda: str(env.root / "input")
    return fp


def _make_model_management(env: ComfyEnv) -> types.ModuleType:
    import torch

    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    cpu = torch.device("cpu")
    mm.get_torch_device = lambda: cpu
    mm.intermediate_device = lambda: cpu
    mm.unet_offload_device = lambda: cpu
    mm.text_encoder_device = lambda: cpu
    mm.text_encoder_offload_device = lambda: cpu
    mm.vae_device = lambda: cpu
    mm.get_free_memory = lambda device=None, torch_free_too=False: 64 << 30

    def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
        if device is not None and torch.device(device).type == "cpu":
            return False
        return env.bf16

    mm.should_use_bf16 = should_use_bf16

    def free_memory(memory_required, device, keep_loaded=()):
        env.freed.append((memory_required, device))

    def unload_all_models():
        env.unloads += 1

    def soft_empty_cache(force=False):
        env.empty_cache_calls += 1

    def interrupt_current_processing(value=True):
        env.interrupted = value

    def processing_interrupted():
        return env.interrupted

    def throw_exception_if_processing_interrupted():
        env.interrupt_checks += 1
        if env.interrupt_after_checks is not None and env.interrupt_checks >= env.interrupt_after_checks:
            env.interrupt_after_checks = None
            env.interrupted = True
        if env.interrupted:
            env.interrupted = False  # core clears the flag when it raises
            raise InterruptProcessingException()

    mm.free_memory = free_memory
    mm.unload_all_models = unload_all_models
    mm.soft_empty_cache = soft_empty_cache
    mm.interrupt_current_processing = interrupt_current_processing
    mm.processing_interrupted = processing_interrupted
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    return mm


def _make_utils(env: ComfyEnv) -> types.ModuleType:
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total
            self.current = 0
            self.id = len(env.bars)
            env.bars.append(total)

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            env.progress.append((self.id, "abs", value, self.total, preview))

        def update(self, value):
            self.current += value
            env.progress.append((self.id, "update", self.current, self.total, None))

    utils.ProgressBar = ProgressBar
    return utils


@dataclass
class FakePreviewImage:
    """What the stand-in previewer returns in place of a PIL image."""

    shape: tuple


def _make_latent_formats() -> types.ModuleType:
    lf = types.ModuleType("comfy.latent_formats")

    class Flux2:
        latent_channels = 128
        latent_dimensions = 2
        spacial_downscale_ratio = 16
        taesd_decoder_name = "taef2_decoder"

        def process_in(self, latent):
            return latent

        def process_out(self, latent):
            return latent

    lf.Flux2 = Flux2
    return lf


def _make_latent_preview(env: ComfyEnv) -> types.ModuleType:
    lp = types.ModuleType("latent_preview")

    class FakePreviewer:
        def __init__(self, latent_format):
            self.latent_format = latent_format

        def decode_latent_to_preview_image(self, preview_format, x0):
            if env.preview_error is not None:
                raise env.preview_error
            env.previews.append((preview_format, x0.detach().to("cpu", copy=True)))
            return ("JPEG", FakePreviewImage(tuple(x0.shape)), 512)

    def get_previewer(device, latent_format):
        env.previewer_requests.append((device, latent_format))
        if env.preview_method == "none":
            return None
        return FakePreviewer(latent_format)

    lp.get_previewer = get_previewer
    return lp


def install(monkeypatch, root: Path) -> ComfyEnv:
    models = root / "models"
    for dirs in FOLDERS.values():
        for d in dirs:
            (models / d).mkdir(parents=True, exist_ok=True)
    env = ComfyEnv(root=root, models_dir=models)
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []  # a package, so `import comfy.utils` resolves through sys.modules
    mm = _make_model_management(env)
    utils = _make_utils(env)
    latent_formats = _make_latent_formats()
    comfy.model_management = mm
    comfy.utils = utils
    comfy.latent_formats = latent_formats
    monkeypatch.setitem(sys.modules, "folder_paths", _make_folder_paths(env))
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    monkeypatch.setitem(sys.modules, "comfy.latent_formats", latent_formats)
    monkeypatch.setitem(sys.modules, "latent_preview", _make_latent_preview(env))
    monkeypatch.setenv("LENS_NODES_CACHE_DIR", str(root / "cache"))
    return env


@pytest.fixture
def comfy_env(tmp_path, monkeypatch) -> ComfyEnv:
    """Fake ComfyUI modules with empty model folders under tmp_path/models."""
    return install(monkeypatch, tmp_path)


# --------------------------------------------------------------------------------------------
# golden tiny models in the fake folders
# --------------------------------------------------------------------------------------------

def place_golden_models(env: ComfyEnv, golden: Path) -> dict[str, str]:
    """Symlink the golden tiny weights into the fake model folders; returns the combo names.

    diffusion_models/lens_tiny_turbo/transformer (a pipeline root, listed as "lens_tiny_turbo/"),
    text_encoders/lens_tiny_te/ and vae/lens_tiny_vae/ (component folders), and
    diffusion_models/lens_tiny_te64/ (:func:`make_te_matched_dit`, for TE -> DiT runs).
    """
    pipe = env.folder("diffusion_models") / "lens_tiny_turbo"
    pipe.mkdir(exist_ok=True)
    os.symlink(golden / "transformer", pipe / "transformer")
    os.symlink(golden / "vae", env.folder("vae") / "lens_tiny_vae")
    os.symlink(golden / "text_encoder", env.folder("text_encoders") / "lens_tiny_te")
    make_te_matched_dit(golden, env.folder("diffusion_models") / "lens_tiny_te64")
    return {"dit": "lens_tiny_turbo/", "te": "lens_tiny_te/", "vae": "lens_tiny_vae/",
            "dit_te64": "lens_tiny_te64/"}


def make_te_matched_dit(golden: Path, dst: Path, text_width: int = 64) -> Path:
    """A tiny DiT whose text input fits the tiny text encoder (hidden 64; the golden DiT takes 32).

    Derived deterministically from the golden DiT: each ``txt_norm.l`` weight and each layer's
    column block of ``txt_in`` is tiled to ``text_width``; everything else is unchanged. Written as a
    diffusers ``transformer/`` folder under ``dst`` (a pipeline root). Used for end-to-end runs
    TE -> DiT, compared against lens_model on the same weights.
    """
    import json

    import torch
    from safetensors.torch import load_file, save_file

    src = golden / "transformer"
    cfg = json.loads((src / "config.json").read_text())
    e = int(cfg["enc_hidden_dim"])
    sd = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    reps = -(-text_width // e)
    for i in range(4):
        w = sd[f"txt_norm.{i}.weight"]
        sd[f"txt_norm.{i}.weight"] = torch.cat([w * (1.0 + 0.1 * k) for k in range(reps)])[:text_width].contiguous()
    win = sd["txt_in.weight"]
    blocks = [torch.cat([win[:, i * e:(i + 1) * e] / reps] * reps, dim=1)[:, :text_width] for i in range(4)]
    sd["txt_in.weight"] = torch.cat(blocks, dim=1).contiguous()
    cfg["enc_hidden_dim"] = text_width
    out = dst / "transformer"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(sd, str(out / "diffusion_pytorch_model.safetensors"))
    return dst


class ModTokenizer:
    """The real o200k_harmony tokenizer with ids folded into the tiny encoder's 512-token vocabulary
    (template structure and lengths unchanged)."""

    def __init__(self, real, vocab: int = 512):
        self.real = real
        self.vocab = vocab

    def tokenize(self, prompt, date=None, strip_markers=True, **kw):
        ids = self.real.tokenize(prompt, date=date, strip_markers=strip_markers, **kw)
        return [i % self.vocab for i in ids]
