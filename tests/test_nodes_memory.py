"""Our DiT, VAE and text encoder in ComfyUI's model management (through the stand-ins of
tests/comfy_stubs.py, which follow core's ModelPatcher / load_models_gpu contract).

``comfy_env.capacity`` makes the stand-in treat the CPU as a device of that many bytes, so core's
evictions happen without a GPU.
"""

from __future__ import annotations

import sys

import pytest
import torch

from comfy_stubs import comfy_env, place_golden_models  # noqa: F401  (fixture)
from conftest import GOLDEN

DIT = "lens_tiny_turbo/"
VAE = "lens_tiny_vae/"
CPU = torch.device("cpu")


@pytest.fixture
def models(comfy_env):
    place_golden_models(comfy_env, GOLDEN)
    return comfy_env


def load_dit(**kw):
    from nodes import LensNodesDiTLoader

    return LensNodesDiTLoader().load(model_name=DIT, **kw)[0]


def load_vae():
    from nodes import LensNodesVAELoader

    return LensNodesVAELoader().load(vae_name=VAE)[0]


def sample(model, positive, **kw):
    from nodes import LensNodesSampler

    args = dict(seed=3, steps=2, cfg=1.0, width=32, height=32)
    args.update(kw)
    return LensNodesSampler().sample(model=model, positive=positive, **args)[0]["samples"]


def decode(vae, z):
    from nodes import LensNodesVAEDecode

    return LensNodesVAEDecode().decode(samples={"samples": z}, vae=vae)[0]


def listed():
    import comfy.model_management as mm

    return [type(lm.model.model).__name__ for lm in mm.current_loaded_models if lm.model is not None]


def core_model(nbytes: int):
    """A model of core's own (an upscaler, a second checkpoint), wrapped as core wraps them."""
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(torch.nn.Linear(nbytes // 4, 1, bias=False), CPU, CPU)


def test_dit_and_vae_are_placed_by_core(models, positive):
    """Each use goes through load_models_gpu (full load: our layers are not comfy.ops layers),
    and the models then sit in core's list of loaded models under their own class names."""
    dit, vae = load_dit(), load_vae()
    assert listed() == []  # loading reads the file only; nothing is placed yet
    z = sample(dit, positive)
    decode(vae, z)
    assert listed() == ["LensVAE", "LensDiT"]
    assert [c[0] for c in models.load_calls] == [["LensDiT"], ["LensVAE"]]
    assert all(force_full for *_, force_full in models.load_calls)
    assert models.load_calls[1][1] > 0  # the VAE's working memory is announced
    assert dit.patcher.loaded_size() == dit.patcher.model_size() > 0


def test_another_model_evicts_ours_and_ours_evicts_it(models, positive):
    """On a device too small for both, loading a core model evicts our DiT (detached, out of the
    list); the next sampler run makes core evict that model again, with the same result."""
    import comfy.model_management as mm

    dit = load_dit()
    first = sample(dit, positive)
    size = dit.patcher.model_size()
    models.capacity = int(size * 1.6)
    other = core_model(size)
    mm.load_models_gpu([other])
    assert listed() == ["Linear"] and ("detach", "LensDiT", CPU) in models.events
    assert dit.patcher.loaded_size() == 0
    assert torch.equal(sample(dit, positive), first)
    assert listed() == ["LensDiT"] and other.loaded_size() == 0


def test_unload_all_models_and_free_reach_ours(models, positive):
    """core's /free and its OOM handler call unload_all_models: our DiT and VAE are detached and
    leave the list; the nodes place them again on the next use."""
    import comfy.model_management as mm

    dit, vae = load_dit(), load_vae()
    z = sample(dit, positive)
    image = decode(vae, z)
    mm.unload_all_models()
    assert listed() == []
    detached = [name for kind, name, _ in models.events if kind == "detach"]
    assert sorted(detached) == ["LensDiT", "LensVAE"]
    assert torch.equal(decode(vae, sample(dit, positive)), image)


def test_offload_choices_map_onto_core_placement(models, positive):
    """offload 'always': out of core's list after every run; 'never': its offload device is its
    compute device (core cannot move it away, like --highvram for this model)."""
    always = load_dit(offload="always")
    sample(always, positive)
    assert listed() == [] and models.events[-1][:2] == ("detach", "LensDiT")
    never = load_dit(offload="never")
    assert never.patcher.offload_device == never.patcher.load_device


def test_read_only_device_property_is_wrapped(models):
    """Core assigns `device` on the module it manages; our models' `device` is read-only, so the
    patcher manages a container holding them."""
    import comfy.model_patcher

    dit = load_dit()
    with pytest.raises(AttributeError):
        comfy.model_patcher.ModelPatcher(dit.model, CPU, CPU).model.device = CPU
    assert dit.patcher.model.inner is dit.model and dit.patcher.model.device == CPU


def test_nodes_place_models_without_comfyui(models, positive, monkeypatch):
    """Outside ComfyUI (scripts using the node classes) the adapter moves the model itself."""
    dit = load_dit()
    want = sample(dit, positive)
    for name in ("comfy", "comfy.model_management", "comfy.model_patcher", "comfy.utils",
                 "comfy.patcher_extension", "latent_preview"):
        monkeypatch.setitem(sys.modules, name, None)
    plain = load_dit()
    assert type(plain.patcher).__name__ == "_LocalPatcher"
    assert torch.equal(sample(plain, positive), want)
