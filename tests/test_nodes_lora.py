"""The MMDiT Sampler applies the LoRAs a Lens LoRA Loader output carries, around sampling only.

Expected values: the same sampler run on a DiT whose weights were merged in the test,
W + s·(α/r)·B·A (tests/test_lora.py's helpers), wrapped for core's model management like a
loader output.
"""

from __future__ import annotations

import pytest
import torch

from comfy_stubs import InterruptProcessingException, comfy_env, place_golden_models  # noqa: F401
from conftest import GOLDEN
from test_lora import TARGETS, _lora_folder, factors, merged_model, write_layout

CPU = torch.device("cpu")


@pytest.fixture
def dit(comfy_env):
    from nodes import LensNodesDiTLoader

    names = place_golden_models(comfy_env, GOLDEN)
    return LensNodesDiTLoader().load(names["dit"], "fp32", "cpu", "auto")[0]


def sample(model, positive, **kw):
    from nodes import LensNodesSampler

    args = dict(seed=7, steps=3, cfg=2.0, width=32, height=48)
    args.update(kw)
    return LensNodesSampler().sample(model=model, positive=positive, **args)[0]["samples"]


def as_handle(transformer):
    from nodes import comfy_adapter
    from nodes.handles import DiTHandle

    return DiTHandle(comfy_adapter.wrap_model(transformer, "dit", CPU), "merged", "merged", "fp32", False)


def with_lora(comfy_env, dit, fac, strength, layout="diffusers"):
    from nodes import LensNodesLoRALoader

    path, scale = write_layout(_lora_folder(comfy_env), layout, fac)
    return LensNodesLoRALoader().apply(dit, path.name, strength)[0], scale


def test_sampler_applies_the_lora_exactly_as_merging_and_removes_it(comfy_env, dit, positive):
    base = sample(dit, positive)
    fac = factors(21)
    lora_model, scale = with_lora(comfy_env, dit, fac, 0.7)
    out = sample(lora_model, positive)
    want = sample(as_handle(merged_model((fac, 0.7, scale))), positive)
    assert not torch.allclose(out, base, atol=1e-3)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    assert torch.equal(sample(dit, positive), base)  # the base model is unchanged afterwards
    assert all(not m._forward_hooks for m in dit.model.modules())


def test_stacked_loras_and_strength_zero(comfy_env, dit, positive):
    from nodes import LensNodesLoRALoader

    base = sample(dit, positive)
    fac1, fac2 = factors(22), factors(23, TARGETS[:4])
    m1, s1 = with_lora(comfy_env, dit, fac1, 0.5)
    path2, s2 = write_layout(_lora_folder(comfy_env), "loboforge", fac2)
    m2 = LensNodesLoRALoader().apply(m1, path2.name, -0.3)[0]
    want = sample(as_handle(merged_model((fac1, 0.5, s1), (fac2, -0.3, s2))), positive)
    torch.testing.assert_close(sample(m2, positive), want, atol=2e-5, rtol=1e-4)
    off = LensNodesLoRALoader().apply(dit, path2.name, 0.0)[0]
    assert torch.equal(sample(off, positive), base)


def test_cancel_mid_sampling_removes_the_lora(comfy_env, dit, positive):
    base = sample(dit, positive)
    lora_model, _ = with_lora(comfy_env, dit, factors(24), 1.0)
    with_it = sample(lora_model, positive)
    comfy_env.interrupt_at(5)
    with pytest.raises(InterruptProcessingException):
        sample(lora_model, positive)
    assert all(not m._forward_hooks for m in dit.model.modules())
    assert torch.equal(sample(dit, positive), base)
    assert torch.equal(sample(lora_model, positive), with_it)


def test_lora_model_shares_the_base_models_place_in_core(comfy_env, dit, positive):
    """A LoRA'd output is the same module in core's list (no second copy of the weights), and
    core's eviction / unload_all_models reach it like the base."""
    import comfy.model_management as mm

    lora_model, _ = with_lora(comfy_env, dit, factors(25), 1.0)
    assert lora_model.patcher is dit.patcher
    out = sample(lora_model, positive)
    assert len(mm.current_loaded_models) == 1
    mm.unload_all_models()
    assert mm.current_loaded_models == []
    assert torch.equal(sample(lora_model, positive), out)
