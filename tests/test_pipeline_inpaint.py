"""Inpainting through pipeline.generate_from_features / generate and the CLI's --mask (tiny DiT and
VAE): outside a hard mask the final latent is the encoded image exactly, inside it is regenerated,
a mask of ones is plain img2img, and bad masks fail before any model runs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lens_model.pipeline as pipeline
from lens_model import cli, dit_loading, text_encoder, vae_loading
from lens_tiny_files import write_tiny_text_encoder

GOLDEN = Path(__file__).parent / "fixtures/golden/lens_tiny"
W, H = 32, 48          # latent grid 2 x 3


@pytest.fixture(scope="module")
def models():
    return (dit_loading.load_transformer(GOLDEN / "transformer", dtype=torch.float32, device="cpu"),
            vae_loading.load_vae(GOLDEN / "vae", dtype=torch.float32, device="cpu"))


def _image():
    return torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(5))


def _latents(models, **kw):
    g = torch.Generator().manual_seed(0)
    ctx, mask = torch.randn(1, 3, 128, generator=g), torch.ones(1, 3, dtype=torch.bool)
    args = dict(width=W, height=H, steps=3, guidance=1.0, seed=3, device="cpu",
                output_type="latent")
    args.update(kw)
    return pipeline.generate_from_features(ctx, mask, *models, **args)


def _left_column_mask():
    """Pixel mask: the left 16-px column of cells repainted (1), the right one kept (0)."""
    m = torch.zeros(H, W)
    m[:, :16] = 1.0
    return m


@pytest.mark.parametrize("denoise", [1.0, 0.7])
def test_hard_mask_keeps_the_encoded_image_outside_exactly(models, denoise):
    image = _image()
    z = models[1].encode(image)                                  # [1, 128, 3, 2]
    out = _latents(models, image=image, mask=_left_column_mask(), denoise=denoise)
    assert out.shape == z.shape
    assert torch.equal(out[..., 1], z[..., 1])                   # kept cells: bit for bit
    assert (out[..., 0] - z[..., 0]).abs().mean() > 0.05         # repainted cells changed


def test_mask_of_ones_equals_plain_img2img_and_txt2img(models):
    image, ones = _image(), torch.ones(H, W)
    assert torch.equal(_latents(models, image=image, mask=ones, denoise=0.6),
                       _latents(models, image=image, denoise=0.6))
    assert torch.equal(_latents(models, image=image, mask=ones), _latents(models))


def test_mask_png_soft_values_and_resizing_with_the_image(models, tmp_path):
    # a 16x24 picture and its mask (white left 6 px, then black / grey) for a 32x48 generation
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    m = np.zeros((24, 16), np.uint8)
    m[:, :6] = 255
    Image.fromarray(m).save(tmp_path / "hard.png")
    m[:, 8:] = 128
    Image.fromarray(m).convert("RGB").save(tmp_path / "soft.png")   # colour files read as grey
    image, hard = pipeline.load_init_image(tmp_path / "in.png", tmp_path / "hard.png", W, H)
    assert image.shape == (1, H, W, 3) and hard.shape == (1, H, W)
    # resized with the image (x2, bilinear): the edge at 6 px moves to 12 px and softens by 1 px
    assert hard[0, :, :11].min() == 1.0 and hard[0, :, 13:].max() == 0.0
    assert 0.0 < hard[0, 0, 11] < 1.0
    z = models[1].encode(image)
    out = _latents(models, image=tmp_path / "in.png", mask=tmp_path / "hard.png")
    assert torch.equal(out[..., 1], z[..., 1])
    soft = _latents(models, image=tmp_path / "in.png", mask=tmp_path / "soft.png")
    # grey (0.5) cells move away from the image, less than fully repainted ones would
    full = _latents(models, image=tmp_path / "in.png", mask=torch.ones(24, 16))
    d_soft = (soft[..., 1] - z[..., 1]).norm()
    assert 0 < d_soft < (full[..., 1] - z[..., 1]).norm()


def test_bad_masks_fail_before_any_model_runs(models, tmp_path, monkeypatch):
    def must_not_run(*args, **kw):
        raise AssertionError("a model was loaded before the mask was checked")

    monkeypatch.setattr(text_encoder, "load_text_encoder", must_not_run)
    monkeypatch.setattr(dit_loading, "load_transformer", must_not_run)
    monkeypatch.setattr(vae_loading, "load_vae", must_not_run)
    args = dict(transformer_path=GOLDEN / "transformer", text_encoder_path=GOLDEN / "text_encoder",
                vae_path=GOLDEN / "vae", width=W, height=H, steps=2, device="cpu")
    with pytest.raises(ValueError, match="mask needs an init image"):
        pipeline.generate("x", mask=torch.ones(H, W), **args)
    with pytest.raises(ValueError, match=r"mask is 16x16 but the init image is 32x48"):
        pipeline.generate("x", image=_image(), mask=torch.ones(16, 16), **args)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        pipeline.generate("x", image=_image(), mask=tmp_path / "nope.png", **args)
    with pytest.raises(ValueError, match="NaN"):
        pipeline.generate("x", image=_image(), mask=torch.full((H, W), float("nan")), **args)
    with pytest.raises(ValueError, match="mask needs an init image"):
        pipeline.generate_from_features(torch.zeros(1, 3, 128), torch.ones(1, 3, dtype=torch.bool),
                                        GOLDEN / "transformer", GOLDEN / "vae", W, H,
                                        mask=torch.ones(H, W))


def test_cli_mask_option(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_generate(prompt, **kw):
        calls.append(kw)
        return [Image.new("RGB", (kw["width"], kw["height"]))]

    monkeypatch.setattr(pipeline, "generate", fake_generate)
    monkeypatch.setattr(pipeline, "check_model_files", lambda *a, **kw: None)
    files = []
    for name in ("lens_turbo.safetensors", "te.safetensors", "vae.safetensors"):
        (tmp_path / name).write_bytes(b"x")
        files.append(str(tmp_path / name))
    base = ["x", "-o", str(tmp_path / "o.png"), "--transformer", files[0], "--text-encoder",
            files[1], "--vae", files[2], "--device", "cpu", "--width", "32", "--height", "48", "-q"]
    Image.new("RGB", (16, 24), (200, 10, 10)).save(tmp_path / "in.png")
    Image.new("L", (16, 24), 255).save(tmp_path / "mask.png")
    Image.new("L", (20, 20), 255).save(tmp_path / "wrong.png")
    assert cli.main(base + ["--mask", str(tmp_path / "mask.png")]) == 2
    assert "--mask needs --image" in capsys.readouterr().err
    assert cli.main(base + ["--image", str(tmp_path / "in.png"), "--mask",
                            str(tmp_path / "wrong.png")]) == 2
    err = capsys.readouterr().err
    assert "--mask: " in err and "20x20" in err and "16x24" in err
    assert cli.main(base + ["--image", str(tmp_path / "in.png"), "--mask",
                            str(tmp_path / "nope.png")]) == 2
    assert "nope.png" in capsys.readouterr().err
    assert not calls
    assert cli.main(base + ["--image", str(tmp_path / "in.png"), "--mask",
                            str(tmp_path / "mask.png"), "--denoise", "0.8"]) == 0
    kw = calls[-1]
    assert kw["image"].shape == (1, 48, 32, 3) and kw["mask"].shape == (1, 48, 32)
    assert kw["mask"].min() == 1.0 and kw["denoise"] == 0.8
    assert "mask.png" in Image.open(tmp_path / "o.png").text["lens_generation"]


class FakeTE:
    def encode(self, prompts, date=None, callback=None):
        g = torch.Generator().manual_seed(0)
        return torch.randn(1, 3, 128, generator=g), torch.ones(1, 3, dtype=torch.bool)


def test_generate_with_image_and_mask_paths(models, tmp_path, monkeypatch):
    te = write_tiny_text_encoder(tmp_path / "te", vocab_size=512)
    monkeypatch.setattr(text_encoder, "load_text_encoder", lambda *a, **kw: FakeTE())
    Image.fromarray((_image()[0].numpy() * 255).astype(np.uint8)).save(tmp_path / "in.png")
    Image.fromarray((_left_column_mask().numpy() * 255).astype(np.uint8)).save(tmp_path / "m.png")
    out = pipeline.generate("x", transformer_path=GOLDEN / "transformer", text_encoder_path=te,
                            vae_path=GOLDEN / "vae", width=W, height=H, steps=3, guidance=1.0,
                            seed=3, device="cpu", image=tmp_path / "in.png",
                            mask=tmp_path / "m.png", denoise=0.8, output_type="latent")
    image, _ = pipeline.load_init_image(tmp_path / "in.png", None, W, H)
    z = models[1].encode(image)
    assert torch.equal(out[..., 1], z[..., 1])
    assert (out[..., 0] - z[..., 0]).abs().mean() > 0.05
