"""Minimal stand-ins for the ComfyUI modules the pack calls, written from scratch for tests.

ComfyUI is not on PyPI, so the node tests run against these fakes:

- ``folder_paths``: model folders under a temp ``models/`` dir (``diffusion_models`` also searches
  ``unet``, ``text_encoders`` also ``clip``), ``get_filename_list`` (recursive, relative, sorted),
  ``get_full_path``, ``get_full_path_or_raise``, ``get_folder_paths``, user/temp directories and
  ``get_system_user_directory(name)`` (``user/__<name>``, as in core);
- ``comfy.model_management``: CPU device, ``should_use_bf16`` (answers ``env.bf16`` for non-CPU
  devices), an interrupt flag and an ``InterruptProcessingException`` deriving from BaseException
  (like core's), and core's loaded-model bookkeeping: ``current_loaded_models`` (most recent
  first), ``load_models_gpu`` (frees room with ``free_memory``, pops and detaches loaded clones of
  the same module, loads each patcher completely, logs "Requested to load <class>"),
  ``free_memory`` (evicts the models on that device in core's order until enough is free: a
  model is detached and dropped from the list), ``unload_all_models``, ``unload_model_and_clones``
  and ``is_oom``. Core never frees memory on the CPU; the stand-in does when ``env.capacity`` is
  set (bytes of "device memory"), so eviction can be tested without a GPU;
- ``comfy.model_patcher.ModelPatcher``: the legacy patcher's residency contract (writes
  ``device`` and ``model_loaded_weight_memory`` onto the module, so a read-only ``device``
  property fails as in core; ``model_size`` = bytes of the state dict or ``size=``; full
  ``load`` moves the module to the load device; ``detach`` moves it to the offload device and
  runs the ON_DETACH callbacks; ``partially_unload`` frees nothing, so eviction detaches);
  ``comfy.patcher_extension.CallbacksMP``; ``env.events`` records ("load"/"detach", class name,
  device);
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
    capacity: int | None = None                        # "device memory" in bytes (None: 64 GiB, CPU never freed)
    events: list = field(default_factory=list)         # ("load"/"detach", module class, device)
    load_calls: list = field(default_factory=list)     # (module classes, memory_required, force_full_load)
    loaded: list = field(default_factory=list)         # the stand-in's current_loaded_models

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


class CallbacksMP:
    ON_LOAD = "on_load"
    ON_DETACH = "on_detach"


def _make_model_patcher(env: ComfyEnv):
    import torch

    class ModelPatcher:
        """Stand-in for core's legacy ``comfy.model_patcher.ModelPatcher`` (residency part)."""

        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.size = model, size
            self.load_device, self.offload_device = load_device, offload_device
            if getattr(model, "device", None) is None:
                model.device = offload_device  # AttributeError for a read-only property, as in core
            if not hasattr(model, "model_loaded_weight_memory"):
                model.model_loaded_weight_memory = 0
            self.callbacks = {}
            self.parent = None

        def model_size(self):
            if self.size > 0:
                return self.size
            self.size = sum(t.nbytes for t in self.model.state_dict().values())
            return self.size

        def loaded_size(self):
            return self.model.model_loaded_weight_memory

        def current_loaded_device(self):
            return self.model.device

        def is_clone(self, other):
            return getattr(other, "model", None) is self.model

        def clone(self):
            n = ModelPatcher(self.model, self.load_device, self.offload_device, self.model_size())
            n.parent = self
            return n

        def is_dynamic(self):
            return False

        def add_callback(self, call_type, callback):
            self.callbacks.setdefault(call_type, []).append(callback)

        def model_patches_models(self):
            return []

        def load(self, device_to):
            self.model.to(device_to)
            self.model.device = device_to
            self.model.model_loaded_weight_memory = self.model_size()
            env.events.append(("load", type(self.model).__name__, torch.device(device_to)))

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            if self.model.model_loaded_weight_memory > 0:
                return 0
            try:
                self.load(device_to)
            except Exception:
                self.detach()
                raise
            return self.model.model_loaded_weight_memory

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            return 0

        def detach(self, unpatch_all=True):
            self.model.to(self.offload_device)
            self.model.device = self.offload_device
            self.model.model_loaded_weight_memory = 0
            env.events.append(("detach", type(self.model).__name__, torch.device(self.offload_device)))
            for callback in self.callbacks.get(CallbacksMP.ON_DETACH, []):
                callback(self, unpatch_all)
            return self.model

    mp = types.ModuleType("comfy.model_patcher")
    mp.ModelPatcher = ModelPatcher
    mp.CoreModelPatcher = ModelPatcher
    pe = types.ModuleType("comfy.patcher_extension")
    pe.CallbacksMP = CallbacksMP
    return mp, pe


def _make_model_management(env: ComfyEnv) -> types.ModuleType:
    import logging
    import weakref

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
    mm.vae_offload_device = lambda: cpu
    mm.current_loaded_models = env.loaded
    log = logging.getLogger("comfy_stub.model_management")

    class LoadedModel:
        def __init__(self, patcher):
            self._model = weakref.ref(patcher)  # core keeps weak references to patchers
            self.device = patcher.load_device

        @property
        def model(self):
            return self._model()

        def model_memory_required(self, device):
            m = self.model
            if device == m.current_loaded_device():
                return m.model_size() - m.loaded_size()
            return m.model_size()

        def model_unload(self, memory_to_free=None):
            m = self.model
            if memory_to_free is not None and memory_to_free < m.loaded_size():
                if m.partially_unload(m.offload_device, memory_to_free) >= memory_to_free:
                    return False
            m.detach()
            return True

    def get_free_memory(device=None, torch_free_too=False):
        if env.capacity is None:
            free = 64 << 30
        else:
            used = sum(lm.model.loaded_size() for lm in env.loaded
                       if lm.model is not None and lm.device == torch.device(device))
            free = env.capacity - used
        return (free, free) if torch_free_too else free

    def free_memory(memory_required, device, keep_loaded=(), for_dynamic=False, **kw):
        env.freed.append((memory_required, device))
        env.loaded[:] = [lm for lm in env.loaded if lm.model is not None]
        keep = [k.model if isinstance(k, LoadedModel) else k for k in keep_loaded]
        order = sorted((-(lm.model.model_size() - lm.model.loaded_size()), lm.model.model_size(), i)
                       for i, lm in enumerate(env.loaded)
                       if lm.device == device and not any(lm.model is k for k in keep))
        gone = []
        for *_, i in order:
            need = memory_required - get_free_memory(device)
            if need > 0 and env.loaded[i].model_unload(need):
                log.debug("Unloading %s", type(env.loaded[i].model.model).__name__)
                gone.append(i)
        removed = [env.loaded.pop(i) for i in sorted(gone, reverse=True)]
        return removed

    def load_models_gpu(models, memory_required=0, force_patch_weights=False,
                        minimum_memory_required=None, force_full_load=False):
        env.load_calls.append(([type(m.model).__name__ for m in models], memory_required,
                               force_full_load))
        todo = []
        for m in models:
            found = next((lm for lm in env.loaded if lm.model is m), None)
            if found is None:
                log.info("Requested to load %s", type(m.model).__name__)
                for lm in [lm for lm in env.loaded if lm.model is not None and m.is_clone(lm.model)]:
                    env.loaded.remove(lm)
                    lm.model.detach(unpatch_all=False)
                found = LoadedModel(m)
            todo.append(found)
        need = {}
        for lm in todo:
            need[lm.device] = need.get(lm.device, 0) + lm.model_memory_required(lm.device)
        for device, total in need.items():
            if device.type != "cpu" or env.capacity is not None:
                free_memory(total * 1.1 + memory_required, device)
        for lm in todo:
            lm.model.partially_load(lm.device, 1e32)
            if lm in env.loaded:
                env.loaded.remove(lm)
            env.loaded.insert(0, lm)

    def unload_all_models():
        env.unloads += 1
        for device in {lm.device for lm in env.loaded} | {cpu}:
            free_memory(1e30, device)

    def unload_model_and_clones(model, unload_additional_models=True, all_devices=False):
        keep = [lm for lm in env.loaded if lm.model is not None and lm.model.model is not model.model]
        for device in {lm.device for lm in env.loaded}:
            free_memory(1e30, device, keep)

    def is_oom(e):
        return isinstance(e, torch.cuda.OutOfMemoryError)

    def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
        if device is not None and torch.device(device).type == "cpu":
            return False
        return env.bf16

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

    mm.LoadedModel = LoadedModel
    mm.get_free_memory = get_free_memory
    mm.free_memory = free_memory
    mm.load_models_gpu = load_models_gpu
    mm.unload_all_models = unload_all_models
    mm.unload_model_and_clones = unload_model_and_clones
    mm.is_oom = is_oom
    mm.should_use_bf16 = should_use_bf16
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
    model_patcher, patcher_extension = _make_model_patcher(env)
    utils = _make_utils(env)
    latent_formats = _make_latent_formats()
    comfy.model_management = mm
    comfy.model_patcher = model_patcher
    comfy.patcher_extension = patcher_extension
    comfy.utils = utils
    comfy.latent_formats = latent_formats
    monkeypatch.setitem(sys.modules, "folder_paths", _make_folder_paths(env))
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.model_patcher", model_patcher)
    monkeypatch.setitem(sys.modules, "comfy.patcher_extension", patcher_extension)
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
