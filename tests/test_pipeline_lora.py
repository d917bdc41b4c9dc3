"""LoRAs through pipeline.generate / generate_from_features: the output equals a model with the
merged weights W + s·(α/r)·B·A (merged by the test helpers of test_lora.py), a wrong LoRA fails
before any model runs, and the LoRA is always removed from a DiT the caller passed in."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lens_model.pipeline as pipeline
from lens_model import dit_loading, lora as lens_lora, text_encoder
from lens_tiny_files import write_tiny_text_encoder
from test_lora import _save, factors, merged_model, write_layout

GOLDEN = Path(__file__).parent / "fixtures/golden/lens_tiny"
SIZE = dict(width=32, height=48)


def _features():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, 128, generator=g), torch.ones(1, 3, dtype=torch.bool)


def _latents(model, **kw):
    ctx, mask = _features()
    args = dict(SIZE, steps=2, guidance=1.0, seed=3, device="cpu", output_type="latent")
    args.update(kw)
    return pipeline.generate_from_features(ctx, mask, model, None, **args)


@pytest.fixture(scope="module")
def base():
    return dit_loading.load_transformer(GOLDEN / "transformer", dtype=torch.float32, device="cpu")


def test_generate_from_features_with_lora_equals_merged_weights(tmp_path, base):
    fac = factors(1)
    path, scale = write_layout(tmp_path, "loboforge", fac)
    before = _latents(base)
    out = _latents(base, lora=[(str(path), 0.7)])
    expected = _latents(merged_model((fac, 0.7, scale)))
    assert (expected - before).norm() > 0.01 * before.norm()  # the LoRA matters
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    # removed afterwards: the caller's DiT is the base model again, bit for bit
    assert lens_lora.active_loras(base) == []
    assert torch.equal(_latents(base), before)


def test_two_loras_stack_and_strength_zero_is_the_base(tmp_path, base):
    fa, fb = factors(2), factors(3)
    pa, sa = write_layout(tmp_path, "loboforge", fa)
    (tmp_path / "b").mkdir()
    pb, sb = write_layout(tmp_path / "b", "diffusers", fb)
    out = _latents(base, lora=[f"{pa}:0.5", (pb, -0.8)])
    expected = _latents(merged_model((fa, 0.5, sa), (fb, -0.8, sb)))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(_latents(base, lora=(pa, 0.0)), _latents(base))


def test_lora_removed_when_sampling_stops(tmp_path, base):
    path, _ = write_layout(tmp_path, "loboforge", factors(4))
    before = _latents(base)

    def stop(*args):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _latents(base, lora=path, callback=stop)
    assert lens_lora.active_loras(base) == []
    assert torch.equal(_latents(base), before)


class FakeTE:
    """Stands in for the text encoder: 128-channel features, what the tiny DiT takes."""

    def encode(self, prompts, date=None, callback=None):
        return _features()


@pytest.fixture(scope="module")
def tiny_te(tmp_path_factory):
    return write_tiny_text_encoder(tmp_path_factory.mktemp("te"), vocab_size=512)


@pytest.fixture
def fake_te(monkeypatch):
    monkeypatch.setattr(text_encoder, "load_text_encoder", lambda *a, **kw: FakeTE())


def _merged_folder(tmp_path, model) -> Path:
    out = tmp_path / "merged_transformer"
    out.mkdir()
    shutil.copy(GOLDEN / "transformer" / "config.json", out / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "diffusion_pytorch_model.safetensors"))
    return out


def test_generate_with_lora_file_equals_the_merged_checkpoint(tmp_path, tiny_te, fake_te):
    fac = factors(5)
    path, scale = write_layout(tmp_path, "musubi", fac)
    # the musubi file stores bf16 factors: merge what it stores
    fac = {k: (a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float()) for k, (a, b) in fac.items()}
    merged = _merged_folder(tmp_path, merged_model((fac, 0.6, scale)))
    common = dict(SIZE, text_encoder_path=tiny_te, vae_path=GOLDEN / "vae", steps=2, guidance=1.0,
                  seed=1, device="cpu", output_type="latent")
    out = pipeline.generate("a fox", transformer_path=GOLDEN / "transformer",
                            lora=f"{path}:0.6", **common)
    expected = pipeline.generate("a fox", transformer_path=merged, **common)
    plain = pipeline.generate("a fox", transformer_path=GOLDEN / "transformer", **common)
    assert (expected - plain).norm() > 0.01 * plain.norm()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_wrong_lora_fails_before_any_model_runs(tmp_path, tiny_te, monkeypatch):
    def must_not_run(*args, **kw):
        raise AssertionError("a model was loaded before the LoRA was checked")

    monkeypatch.setattr(text_encoder, "load_text_encoder", must_not_run)
    monkeypatch.setattr(dit_loading, "load_transformer", must_not_run)
    # a LoRA for the full-size Lens (width 1536) on the tiny model (width 128)
    sd = {"lora_unet_transformer_blocks_0_attn_img_qkv.lora_down.weight": torch.zeros(16, 1536),
          "lora_unet_transformer_blocks_0_attn_img_qkv.lora_up.weight": torch.zeros(4608, 16)}
    full_size = _save(tmp_path, sd, "full_size.safetensors")
    args = dict(SIZE, transformer_path=GOLDEN / "transformer", text_encoder_path=tiny_te,
                vae_path=GOLDEN / "vae", steps=2, device="cpu")
    with pytest.raises(lens_lora.LoRAError, match=r"full_size.*\[16, 1536\].*\[16, 128\]"):
        pipeline.generate("a fox", lora=(full_size, 1.0), **args)
    sdxl = _save(tmp_path, {k: torch.zeros(2, 2) for k in (
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight")}, "sdxl.safetensors")
    with pytest.raises(lens_lora.LoRAError, match="SDXL"):
        pipeline.generate("a fox", lora=sdxl, **args)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        pipeline.generate("a fox", lora=tmp_path / "missing.safetensors", **args)
    with pytest.raises(lens_lora.LoRAError, match="full_size"):
        ctx, mask = _features()
        pipeline.generate_from_features(ctx, mask, GOLDEN / "transformer", None, steps=2,
                                        device="cpu", output_type="latent", lora=full_size, **SIZE)
