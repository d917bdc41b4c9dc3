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
