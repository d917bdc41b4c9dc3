"""pipeline.generate: memory ladder order, negative handling, batch, img2img (tiny DiT/VAE, fake TE)."""

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lens_model.pipeline as pipeline
from lens_model import dit_loading, text_encoder
from lens_model.checkpoints import CheckpointError
from lens_model.pipeline import images_to_uint8, to_pil, variant_defaults
from lens_tiny_files import write_broken_transformer, write_flux1_vae, write_tiny_text_encoder

GOLDEN = Path(__file__).parent / "fixtures/golden/lens_tiny"


class FakeTE:
    """Stands in for LensTextEncoder: 128-channel features (4 x 32, what the tiny DiT takes)."""

    def __init__(self, log):
        self.log = log

    def encode(self, prompts, date=None, callback=None):
        self.log.append(("encode", list(prompts), date))
        for layer in range(1, 4):
            if callback is not None:
                callback(layer, 3)
        g = torch.Generator().manual_seed(len(prompts[0]))
        s = 3
        return torch.randn(len(prompts), s, 128, generator=g), torch.ones(len(prompts), s, dtype=torch.bool)


@pytest.fixture(scope="module")
def tiny_te(tmp_path_factory):
    """Headers of a text encoder that fits the golden tiny DiT (the loader itself is faked)."""
    return write_tiny_text_encoder(tmp_path_factory.mktemp("te"), vocab_size=512)


@pytest.fixture
def ladder(monkeypatch, tiny_te):
    log = []
    log_te[:] = [tiny_te]
    te_ref = []
    real_load_transformer = dit_loading.load_transformer

    def load_te(path, dtype=None, device=None):
        te = FakeTE(log)
        te_ref.append(weakref.ref(te))
        log.append(("load_te", str(path)))
        return te

    def load_dit(path, dtype=None, device=None):
        gc.collect()
        log.append(("load_dit", te_ref[-1]() is None))  # the TE must already be released
        return real_load_transformer(GOLDEN / "transformer", dtype=torch.float32, device="cpu")

    monkeypatch.setattr(text_encoder, "load_text_encoder", load_te)
    monkeypatch.setattr(dit_loading, "load_transformer", load_dit)
    return log


log_te = []  # the tiny text-encoder folder of the current test (set by ``ladder``)


def _gen(**kw):
    args = dict(transformer_path=GOLDEN / "transformer", text_encoder_path=log_te[0],
                vae_path=GOLDEN / "vae", width=32, height=48, steps=2, device="cpu")
    args.update(kw)
    return pipeline.generate(**args)


def test_generate_ladder_and_cfg1_skips_negative(ladder):
    imgs = _gen(prompt="a cat", negative="blurry", guidance=1.0, batch=2, seed=5)
    assert [e[0] for e in ladder] == ["load_te", "encode", "load_dit"]
    assert ladder[1][1] == ["a cat"]          # the negative is not encoded at CFG 1
    assert ladder[2] == ("load_dit", True)    # TE released before the DiT is loaded
    assert len(imgs) == 2 and all(im.size == (32, 48) for im in imgs)
    again = _gen(prompt="a cat", negative="blurry", guidance=1.0, batch=2, seed=5)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(imgs, again))
    assert not np.array_equal(np.asarray(imgs[0]), np.asarray(imgs[1]))  # different noise rows


def test_generate_encodes_nonempty_negative_only(ladder):
    _gen(prompt="a cat", negative="blurry", guidance=4.0)
    assert [e[1] for e in ladder if e[0] == "encode"] == [["a cat"], ["blurry"]]
    ladder.clear()
    _gen(prompt=["a cat", "a dog"], negative="   ", guidance=4.0, date="2025-01-01")
    enc = [e for e in ladder if e[0] == "encode"]
    assert enc == [("encode", ["a cat", "a dog"], "2025-01-01")]


def test_generate_missing_file(ladder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        _gen(prompt="x", vae_path=tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="100"):
        _gen(prompt="x", width=100)


def test_variant_defaults_from_names():
    assert variant_defaults("models/diffusion_models/lens_turbo_bf16.safetensors")["steps"] == 4
    assert variant_defaults("lens_bf16.safetensors") == {"variant": "lens", "steps": 20, "cfg": 5.0}
    assert variant_defaults("Lens-Base-Diffusers/transformer")["steps"] == 50


def test_uint8_conversion_truncates():
    x = torch.tensor([[[[0.0, 0.5, 1.0], [0.999, 1.5, -0.2]]]])
    # 255*0.5 = 127.5 -> 127; 255*0.999 = 254.745 -> 254; clamped to 0..1 first
    assert images_to_uint8(x).tolist() == [[[[0, 127, 255], [254, 255, 0]]]]
    img = to_pil(x)[0]
    assert img.size == (2, 1) and img.getpixel((0, 0)) == (0, 127, 255)


def _features_latents(**kw):
    g = torch.Generator().manual_seed(0)
    ctx, mask = torch.randn(1, 3, 128, generator=g), torch.ones(1, 3, dtype=torch.bool)
    model = dit_loading.load_transformer(GOLDEN / "transformer", dtype=torch.float32, device="cpu")
    args = dict(width=32, height=48, steps=2, guidance=1.0, seed=3, device="cpu",
                output_type="latent")
    args.update(kw)
    vae = args.pop("vae", None)
    return pipeline.generate_from_features(ctx, mask, model, vae, **args)


def test_denoise_without_image_runs_full_schedule():
    # pure noise sits at sigma 1: without an init image denoise < 1 must not shorten the schedule
    full = _features_latents()
    assert torch.equal(_features_latents(denoise=0.5), full)
    assert not torch.equal(_features_latents(steps=1), full)  # the comparison can tell schedules apart


def test_bad_schedule_and_denoise_rejected():
    image = torch.zeros(1, 48, 32, 3)
    with pytest.raises(ValueError, match="'nope'"):
        _features_latents(schedule="nope", image=image, denoise=0.5)
    with pytest.raises(ValueError, match="1.5"):
        _features_latents(denoise=1.5)


def test_img2img_from_a_path_depends_on_the_image(tmp_path):
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        p = tmp_path / f"init{i}.png"
        Image.new("RGB", (16, 24), colour).save(p)  # resized to 32x48 by the pipeline
        paths.append(p)
    a, b = (_features_latents(image=p, denoise=0.5, vae=GOLDEN / "vae") for p in paths)
    assert a.shape == (1, 128, 3, 2)
    assert not torch.allclose(a, b, atol=1e-3)


# ------------------------------------------------------------------ checks before any model runs

def test_generate_checks_all_three_files_before_any_model_runs(ladder, tmp_path):
    bad_dit = write_broken_transformer(tmp_path / "lens_broken.safetensors")
    with pytest.raises(CheckpointError, match=r"transformer_path: .*lens_broken.*img_mlp\.w2"):
        _gen(prompt="x", transformer_path=bad_dit)
    flux1 = write_flux1_vae(tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"vae_path: .*FLUX\.1"):
        _gen(prompt="x", vae_path=flux1)
    # a text encoder given as the VAE: the fix names the Python argument, not ComfyUI folders
    with pytest.raises(CheckpointError, match="vae_path: .*text encoder") as e:
        _gen(prompt="x", vae_path=log_te[0])
    assert "text_encoder_path" in str(e.value) and "models/" not in str(e.value)
    # files that are each fine but do not fit each other (text width 64 vs the DiT's 32)
    with pytest.raises(CheckpointError, match="64.*32"):
        _gen(prompt="x", text_encoder_path=GOLDEN / "text_encoder")
    assert ladder == []  # nothing was loaded or encoded


@pytest.mark.parametrize("kw,needle", [
    (dict(guidance=float("nan")), "guidance"),
    (dict(guidance=float("inf")), "guidance"),
    (dict(mu=float("nan")), "mu"),
    (dict(denoise=float("nan")), "denoise"),
    (dict(steps=201), "200"),
    (dict(seed=2**64), "18446744073709551615"),
    (dict(seed=-1), "seed"),
    (dict(batch=0), "batch"),
])
def test_generate_rejects_bad_options_up_front(ladder, kw, needle):
    with pytest.raises(ValueError, match=needle):
        _gen(prompt="x", **kw)
    assert ladder == []


def test_generate_reports_progress_per_stage(ladder):
    seen = []
    # (the largest seed, 2**64 - 1 like ComfyUI's widget, is accepted)
    _gen(prompt="x", negative="blurry", guidance=4.0, seed=2**64 - 1, progress=lambda *a: seen.append(a))
    stages = [s for s, _, _ in seen]
    assert stages[:6] == ["text encoder"] * 6          # prompt, then the negative: 3 layers each
    sampling = [(d, t) for s, d, t in seen if s == "sampling"]
    assert sampling == [(1, 2), (2, 2)]
    decode = [(d, t) for s, d, t in seen if s == "VAE decode"]
    total = decode[0][1]
    assert total > 1 and decode == [(i, total) for i in range(1, total + 1)]  # per decoder block
    assert stages.index("VAE decode") > stages.index("sampling")

    class Stop(Exception):
        pass

    def stop_in_decode(stage, done, total):
        if stage == "VAE decode" and done == 2:
            raise Stop

    with pytest.raises(Stop):
        _gen(prompt="x", guidance=1.0, progress=stop_in_decode)


@pytest.mark.parametrize("bad", [{"output_type": "png"}, {"schedule": "karras"}, {"noise_layout": "cuda"},
                                 {"cfg_mode": "apg"}])
def test_generate_refuses_unknown_choices_before_the_text_encoder(tmp_path, monkeypatch, bad):
    """An unknown output_type / schedule / noise_layout / cfg_mode is a ValueError naming it, raised
    before any model file is read (the files here are empty)."""

    def never(*args, **kwargs):
        raise AssertionError("a model file was read before the option check")

    monkeypatch.setattr(pipeline, "check_model_files", never)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        pipeline.generate("a fox", transformer_path=empty, text_encoder_path=empty, vae_path=empty, **bad)
