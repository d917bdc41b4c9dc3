"""Non-finite text features never reach the sampler's output: the nodes refuse them with a clear error."""

from __future__ import annotations

import pytest
import torch

from comfy_stubs import comfy_env  # noqa: F401
from test_nodes_run import cases, cond_from, load_dit, models, run_sampler  # noqa: F401
from test_nodes_text import encode, load_te, te_env, tokenizer  # noqa: F401


def test_sampler_refuses_non_finite_conditioning(models, cases):
    pos = cond_from(cases, 0)
    pos[0][0] = pos[0][0].clone()
    pos[0][0][0, 0, 3] = float("nan")  # what a core text encoder overflowing in fp16 gives
    with pytest.raises(ValueError, match=r"positive: the conditioning contains NaN or Inf"):
        run_sampler(load_dit(), pos, width=32, height=32)
    assert models.bars == []


def test_text_encode_refuses_and_does_not_cache_non_finite_features(te_env, monkeypatch):
    from nodes import text_encode

    handle = load_te()
    encoder = handle.encoder()
    real = type(encoder).encode

    def overflowing(self, *args, **kw):
        ctx, mask = real(self, *args, **kw)
        return ctx * float("inf"), mask

    monkeypatch.setattr(type(encoder), "encode", overflowing)
    with pytest.raises(ValueError, match="GPT-OSS TextEncode: the text encoder produced NaN or Inf"):
        encode(handle, "a green car")
    assert len(text_encode.FEATURES) == 0
    monkeypatch.setattr(type(encoder), "encode", real)  # (undo() would also drop te_env's tokenizer)
    assert torch.isfinite(encode(handle, "a green car")[0][0]).all()


def _core_queue_time_errors(node_cls, widget_values: dict) -> list:
    """What ComfyUI's validate_inputs (execution.py) reports for literal widget values when a
    prompt is queued: min/max for inputs VALIDATE_INPUTS does not take, then VALIDATE_INPUTS
    with the ones it takes (linked inputs are not passed)."""
    import inspect

    types = node_cls.INPUT_TYPES()
    spec = {**types["required"], **types.get("optional", {})}
    fn = getattr(node_cls, "VALIDATE_INPUTS", None)
    taken = inspect.getfullargspec(fn).args if fn is not None else []
    errors = []
    for name, value in widget_values.items():
        opts = spec[name][1]
        if name not in taken:
            if value < opts["min"] or value > opts["max"]:
                errors.append(name)
    if fn is not None:
        result = fn(**{k: v for k, v in widget_values.items() if k in taken})
        if result is not True:
            errors.append(str(result))
    return errors


@pytest.mark.parametrize("name,value", [("cfg", float("nan")), ("cfg", float("inf")),
                                        ("denoise", float("nan")), ("mu", float("nan")),
                                        ("cfg", 31.0), ("denoise", -0.5)])
def test_sampler_refuses_bad_floats_when_queued(comfy_env, name, value):
    # NaN passes core's min/max (comparisons with NaN are false): found only after the text
    # encoder had run, minutes with the real 20B model
    from nodes.sampler import LensNodesSampler

    values = {"seed": 0, "steps": 4, "cfg": 1.0, "denoise": 1.0, "mu": 0.0, name: value}
    errors = _core_queue_time_errors(LensNodesSampler, values)
    assert errors and (name in errors or any(f"{name} must be" in e for e in errors)), errors
    assert _core_queue_time_errors(LensNodesSampler, {"cfg": 5.0, "denoise": 0.6, "mu": 1.5}) == []
    assert LensNodesSampler.VALIDATE_INPUTS() is True  # every float linked: checked when it runs


def test_lora_loader_refuses_nan_strength_when_queued(comfy_env):
    from nodes.lora import LensNodesLoRALoader

    errors = _core_queue_time_errors(LensNodesLoRALoader, {"strength": float("nan")})
    assert errors and "strength must be a finite number" in errors[-1], errors
    assert _core_queue_time_errors(LensNodesLoRALoader, {"strength": 0.0}) == []
