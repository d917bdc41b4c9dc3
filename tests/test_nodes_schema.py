"""Node schemas: registration, frozen input order, valid specs, tooltips, import hygiene."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_stubs import comfy_env  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent

# Frozen: saved workflows store widget values by position. Never reorder or remove; append new
# inputs at the end (as optional with defaults) and extend this snapshot.
INPUT_ORDER = {
    "LensNodesDiTLoader": ["model_name", "weight_dtype", "device", "offload", "qk_norm_eps"],
    "LensNodesTextEncoderLoader": ["text_encoder_name", "device", "dtype", "offload", "keep_loaded"],
    "LensNodesTextEncode": ["text_encoder", "text", "date", "strip_markers", "cache_to_disk"],
    "LensNodesSampler": ["model", "positive", "seed", "steps", "cfg", "schedule", "denoise",
                         "noise_layout", "width", "height", "negative", "latent", "mu", "cfg_mode",
                         "mask_mode"],
    "LensNodesVAELoader": ["vae_name", "dtype", "device"],
    "LensNodesVAEDecode": ["samples", "vae", "tile", "tile_size"],
    "LensNodesVAEEncode": ["pixels", "vae", "tile", "tile_size"],
    "LensNodesResolution": ["base", "ratio", "width", "height"],
    "LensNodesEmptyLatent": ["width", "height", "batch_size"],
    "LensNodesLoRALoader": ["model", "lora_name", "strength"],
}
RETURNS = {
    "LensNodesDiTLoader": ("LENS_DIT",),
    "LensNodesTextEncoderLoader": ("LENS_TE",),
    "LensNodesTextEncode": ("CONDITIONING",),
    "LensNodesSampler": ("LATENT",),
    "LensNodesVAELoader": ("LENS_VAE",),
    "LensNodesVAEDecode": ("IMAGE",),
    "LensNodesVAEEncode": ("LATENT",),
    "LensNodesResolution": ("INT", "INT"),
    "LensNodesEmptyLatent": ("LATENT",),
    "LensNodesLoRALoader": ("LENS_DIT",),
}
DISPLAY = {
    "LensNodesDiTLoader": "LensLoader",
    "LensNodesTextEncoderLoader": "GPT-OSS Loader",
    "LensNodesTextEncode": "GPT-OSS TextEncode",
    "LensNodesSampler": "MMDiT Sampler",
    "LensNodesVAELoader": "FLUX2 VAE Loader",
    "LensNodesVAEDecode": "FLUX2 VAE Decode",
    "LensNodesVAEEncode": "FLUX2 VAE Encode",
    "LensNodesResolution": "Lens Resolution",
    "LensNodesEmptyLatent": "Lens Empty Latent",
    "LensNodesLoRALoader": "Lens LoRA Loader",
}
PRIMITIVES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CUSTOM = {"LENS_DIT", "LENS_TE", "LENS_VAE", "CONDITIONING", "LATENT", "IMAGE"}


def _mappings():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS


def _ordered_inputs(cls):
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}, set(spec)
    items = list(spec.get("required", {}).items()) + list(spec.get("optional", {}).items())
    return items


def _import_pack_as_comfyui_does(name: str, extra: str) -> str:
    """Python source: import the pack folder as ComfyUI's loader does (spec_from_file_location
    under the folder name, submodule search in the folder), then run `extra`."""
    return (
        "import importlib.util, sys\n"
        f"name = {name!r}\n"
        f"spec = importlib.util.spec_from_file_location(name, {str(ROOT / '__init__.py')!r},"
        f" submodule_search_locations=[{str(ROOT)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules[name] = m\n"
        "spec.loader.exec_module(m)\n" + extra + "print('ok')\n"
    )


def test_pack_imports_as_comfyui_loads_it_without_comfy():
    """Imported under the folder name ``ComfyUI-Lens`` (not a Python identifier), the pack
    registers its nodes, imports no ComfyUI module and reads no model file."""
    code = _import_pack_as_comfyui_does("ComfyUI-Lens", (
        "assert len(m.NODE_CLASS_MAPPINGS) == 10, m.NODE_CLASS_MAPPINGS\n"
        "assert m.WEB_DIRECTORY is None\n"
        "assert not hasattr(m, 'comfy_entrypoint')\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('comfy', 'folder_paths')]\n"
        "assert not bad, bad\n"
    ))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_nodes_use_the_packs_own_lens_model_by_plain_import():
    """Inside ComfyUI the nodes import ``lens_model`` by name (plain imports, go-to-definition
    works) and get this checkout's package, once: never a second copy under the pack's name."""
    name = str(ROOT).replace(".", "_x_")
    code = _import_pack_as_comfyui_does(name, (
        "import os\n"
        "sampler = sys.modules[name + '.nodes.sampler']\n"
        "assert sampler.sampling is sys.modules['lens_model.sampling']\n"
        f"assert os.path.realpath(sys.modules['lens_model'].__file__).startswith({str(ROOT.resolve())!r})\n"
        "assert not [k for k in sys.modules if k.startswith(name + '.lens_model')]\n"
        "assert m.NODE_CLASS_MAPPINGS['LensNodesResolution']().resolve('1024', '16:9') == (1376, 768)\n"
    ))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_nodes_import_the_pack_plainly():
    """No ``importlib`` / helper indirection for the pack's own modules in the nodes."""
    for path in sorted((ROOT / "nodes").glob("*.py")):
        text = path.read_text()
        assert "importlib" not in text and "lens(" not in text, path


def test_mappings_frozen_ids_and_display_names():
    classes, display = _mappings()
    assert set(classes) == set(INPUT_ORDER)
    assert display == DISPLAY
    for node_id in classes:
        assert node_id.startswith("LensNodes")


@pytest.mark.parametrize("node_id", sorted(INPUT_ORDER))
def test_input_order_snapshot(comfy_env, node_id):
    cls = _mappings()[0][node_id]
    assert [name for name, _ in _ordered_inputs(cls)] == INPUT_ORDER[node_id]


@pytest.mark.parametrize("node_id", sorted(INPUT_ORDER))
def test_class_contract(comfy_env, node_id):
    cls = _mappings()[0][node_id]
    assert cls.RETURN_TYPES == RETURNS[node_id]
    assert cls.CATEGORY == "Lens"
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    assert callable(getattr(cls, cls.FUNCTION))
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    assert not getattr(cls, "OUTPUT_NODE", False)
    # the FUNCTION accepts every input by name, and optional ones have defaults
    import inspect

    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    spec = cls.INPUT_TYPES()
    for name in spec.get("required", {}):
        assert name in params, name
    for name in spec.get("optional", {}):
        assert name in params and params[name].default is not inspect.Parameter.empty, name


@pytest.mark.parametrize("node_id", sorted(INPUT_ORDER))
def test_input_specs_valid(comfy_env, node_id):
    cls = _mappings()[0][node_id]
    for name, spec in _ordered_inputs(cls):
        assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (name, spec)
        kind = spec[0]
        opts = spec[1] if len(spec) == 2 else {}
        assert isinstance(opts.get("tooltip"), str) and opts["tooltip"].strip(), f"{name}: tooltip"
        if isinstance(kind, list):
            assert kind and all(isinstance(v, str) for v in kind), name
            assert len(set(kind)) == len(kind), name
            if "default" in opts:
                assert opts["default"] in kind, name
        elif kind in ("INT", "FLOAT"):
            for key in ("default", "min", "max", "step"):
                assert key in opts, (name, key)
            assert opts["min"] <= opts["default"] <= opts["max"], name
            assert opts["step"] > 0
            if kind == "INT":
                assert all(isinstance(opts[k], int) for k in ("default", "min", "max", "step")), name
        elif kind == "BOOLEAN":
            assert isinstance(opts.get("default"), bool), name
        elif kind == "STRING":
            assert isinstance(opts.get("default"), str), name
        else:
            assert kind in CUSTOM, (name, kind)
            assert "default" not in opts, name


def test_seed_has_generate_control(comfy_env):
    from nodes import LensNodesSampler

    seed = LensNodesSampler.INPUT_TYPES()["required"]["seed"][1]
    assert seed["control_after_generate"] is True
    assert seed["min"] == 0 and seed["max"] == 0xFFFFFFFFFFFFFFFF


def test_defaults_match_the_brief(comfy_env):
    from nodes import LensNodesSampler, LensNodesTextEncode

    req = LensNodesSampler.INPUT_TYPES()["required"]
    assert req["steps"][1]["default"] == 4
    assert req["cfg"][1]["default"] == 1.0
    assert req["schedule"][0] == ["upstream", "comfyui"]
    assert req["noise_layout"][0] == ["upstream", "comfy"]
    te = LensNodesTextEncode.INPUT_TYPES()
    assert te["required"]["date"][1]["default"] == "2026-05-23"
    assert te["required"]["strip_markers"][1]["default"] is True
    assert te["required"]["text"][1]["multiline"] is True
    assert te["optional"]["cache_to_disk"][1]["default"] is False


def test_model_lists_come_from_folder_paths(comfy_env):
    from nodes import LensNodesDiTLoader, LensNodesTextEncoderLoader, LensNodesVAELoader

    dm = comfy_env.folder("diffusion_models")
    (dm / "lens_turbo_bf16.safetensors").write_bytes(b"x")
    sharded = dm / "Lens-Diffusers" / "transformer"
    sharded.mkdir(parents=True)
    (sharded / "config.json").write_text("{}")
    for i in (1, 2, 3):
        (sharded / f"diffusion_pytorch_model-0000{i}-of-00003.safetensors").write_bytes(b"x")
    (comfy_env.models_dir / "unet" / "old.safetensors").write_bytes(b"x")
    (dm / "sub").mkdir()
    (dm / "sub" / "lens_bf16.safetensors").write_bytes(b"x")  # a plain subfolder keeps its files
    names = LensNodesDiTLoader.INPUT_TYPES()["required"]["model_name"][0]
    # the diffusers folder is one entry; the files inside it are not listed
    assert names == [
        "Lens-Diffusers/",
        "lens_turbo_bf16.safetensors",
        "old.safetensors",
        "sub/lens_bf16.safetensors",
    ]
    assert LensNodesTextEncoderLoader.INPUT_TYPES()["required"]["text_encoder_name"][0] == ["(no files found)"]
    (comfy_env.models_dir / "clip" / "gpt_oss_20b_nvfp4.safetensors").write_bytes(b"x")
    assert LensNodesTextEncoderLoader.INPUT_TYPES()["required"]["text_encoder_name"][0] == [
        "gpt_oss_20b_nvfp4.safetensors"]
    assert LensNodesVAELoader.INPUT_TYPES()["required"]["vae_name"][0] == ["(no files found)"]


def test_search_aliases(comfy_env):
    """Core's /object_info sends SEARCH_ALIASES to the node search box (V1 class attribute)."""
    classes, _ = _mappings()
    for node_id, cls in classes.items():
        aliases = cls.SEARCH_ALIASES
        assert isinstance(aliases, list) and aliases, node_id
        assert all(isinstance(a, str) and a.strip() == a and a for a in aliases), node_id
        assert len(set(aliases)) == len(aliases), node_id
    assert "gpt-oss" in classes["LensNodesTextEncode"].SEARCH_ALIASES
    assert "flux2 vae" in classes["LensNodesVAELoader"].SEARCH_ALIASES


def test_cache_dir_is_not_served_over_http(comfy_env, monkeypatch):
    """Disk cache: core's system-user folder (user/__lens_nodes, never served over HTTP), or
    <models>/lens_nodes_cache on a ComfyUI without it; LENS_NODES_CACHE_DIR wins."""
    import folder_paths

    from nodes import comfy_adapter as adapter

    assert adapter.cache_dir() == comfy_env.root / "cache"  # the fixture sets the variable
    monkeypatch.delenv("LENS_NODES_CACHE_DIR")
    assert adapter.cache_dir() == comfy_env.root / "user" / "__lens_nodes"
    monkeypatch.delattr(folder_paths, "get_system_user_directory")
    assert adapter.cache_dir() == comfy_env.models_dir / "lens_nodes_cache"


def test_should_use_bf16_follows_core(comfy_env, monkeypatch):
    from nodes import comfy_adapter as adapter

    assert adapter.should_use_bf16("cpu") is False
    assert adapter.should_use_bf16("cuda:0") is True
    comfy_env.bf16 = False  # a pre-Ampere card, or --force-fp32
    assert adapter.should_use_bf16("cuda:0") is False
    for name in ("folder_paths", "comfy", "comfy.model_management", "comfy.utils"):
        monkeypatch.setitem(sys.modules, name, None)
    assert adapter.should_use_bf16("cpu") is False


def test_is_changed_tracks_file_identity(comfy_env):
    import os
    import time

    from nodes import LensNodesDiTLoader, LensNodesVAELoader

    f = comfy_env.folder("diffusion_models") / "a.safetensors"
    f.write_bytes(b"one")
    first = LensNodesDiTLoader.IS_CHANGED(model_name="a.safetensors", weight_dtype="default")
    assert first == LensNodesDiTLoader.IS_CHANGED(model_name="a.safetensors", weight_dtype="bf16")
    f.write_bytes(b"three")
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second = LensNodesDiTLoader.IS_CHANGED(model_name="a.safetensors")
    assert second != first
    missing = LensNodesVAELoader.IS_CHANGED(vae_name="nope.safetensors")
    assert missing != missing  # NaN: always re-run, the loader then raises the readable error
    del time


def test_adapter_falls_back_without_comfyui(monkeypatch):
    """Outside ComfyUI the adapter still answers (CPU/CUDA device, no-op memory, silent progress)."""
    for name in ("folder_paths", "comfy", "comfy.model_management", "comfy.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    from nodes import comfy_adapter as adapter

    assert adapter.filename_list("vae") == []
    assert adapter.intermediate_device().type == "cpu"
    adapter.check_interrupt()
    bar = adapter.progress_bar(4)
    bar.update_absolute(1, 4, None)
    with pytest.raises(FileNotFoundError, match="not found"):
        adapter.full_path("vae", "missing.safetensors")


def test_no_print_and_no_basicconfig_in_nodes():
    for path in sorted((ROOT / "nodes").glob("*.py")) + [ROOT / "__init__.py"]:
        text = path.read_text()
        assert "print(" not in text, path
        assert "basicConfig" not in text, path
        assert "except:" not in text, path
        assert "except BaseException:\n" not in text or "raise" in text, path


def test_only_the_adapter_imports_comfy():
    import re

    for path in sorted((ROOT / "nodes").glob("*.py")):
        if path.name == "comfy_adapter.py":
            continue
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(comfy|folder_paths|server)\b", text, re.M), path
    spec = importlib.util.find_spec("nodes.comfy_adapter")
    assert spec is not None
