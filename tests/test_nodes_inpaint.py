"""MMDiT Sampler honours a LATENT's noise_mask (inpainting) and batch_index like core's samplers.

Runs the golden tiny DiT and VAE on the CPU through the ComfyUI stubs; expected values come from
direct lens_model calls or from the encoded original itself.
"""

from __future__ import annotations

import pytest
import torch

from comfy_stubs import comfy_env  # noqa: F401
from conftest import GOLDEN
from test_nodes_run import cases, cond_from, load_dit, load_vae, models, run_sampler  # noqa: F401


def set_latent_noise_mask(latent, mask):
    """What core's SetLatentNoiseMask does: the pixel mask reshaped to [B, 1, H, W]."""
    return {**latent, "noise_mask": mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])}


@pytest.fixture
def encoded(models):
    from nodes import LensNodesVAEEncode

    torch.manual_seed(4)
    image = torch.rand(1, 48, 64, 3)
    return LensNodesVAEEncode().encode(pixels=image, vae=load_vae())[0]  # [1, 128, 3, 4]


@pytest.mark.parametrize("denoise", [1.0, 0.7])
def test_hard_mask_keeps_the_unmasked_latent_exactly(models, cases, encoded, denoise):
    mask = torch.zeros(1, 48, 64)
    mask[:, 16:32, 16:48] = 1.0  # cells (1, 1) and (1, 2)
    latent = set_latent_noise_mask(encoded, mask)
    out = run_sampler(load_dit(), cond_from(cases, 0), latent=latent, seed=3, steps=3,
                      denoise=denoise)
    z, x = encoded["samples"], out["samples"]
    inside = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    inside[..., 1, 1:3] = True
    outside = (~inside).expand_as(x)
    assert torch.equal(x[outside], z[outside])
    assert (x - z)[inside.expand_as(x)].abs().mean() > 1e-2
    # core keeps the mask (and batch_index) on the sampler's output LATENT
    assert torch.equal(out["noise_mask"], latent["noise_mask"])


def test_mask_of_ones_equals_plain_img2img(models, cases, encoded):
    handle, pos = load_dit(), cond_from(cases, 0)
    plain = run_sampler(handle, pos, latent=encoded, seed=3, steps=3, denoise=0.6)["samples"]
    ones = set_latent_noise_mask(encoded, torch.ones(1, 48, 64))
    assert torch.equal(run_sampler(handle, pos, latent=ones, seed=3, steps=3,
                                   denoise=0.6)["samples"], plain)


def test_node_inpaint_equals_python_api(models, cases, encoded):
    import lens_model as lm
    from lens_model import sampling

    mask = torch.zeros(1, 48, 64)
    mask[:, 5:40, 20:23] = 1.0  # a 3-px stroke: soft coverage values
    pos = cond_from(cases, 1)
    neg = cond_from(cases, 1, "negative_prompt")
    out = run_sampler(load_dit(), pos, negative=neg, cfg=3.0, latent=set_latent_noise_mask(encoded, mask),
                      seed=9, steps=3, denoise=0.8)["samples"]

    z = encoded["samples"]
    sig = lm.img2img_sigmas(48, 64, 3, 0.8)
    eps = lm.make_noise(9, 1, 3, 4)
    m = sampling.latent_mask(mask, 3, 4)
    ctx, cm = pos[0][0], pos[0][1]["attention_mask"].bool()
    nctx, nm = neg[0][0], neg[0][1]["attention_mask"].bool()
    want = lm.sample(lm.load_transformer(GOLDEN / "transformer"),
                     sampling.noise_image_latents(eps, z, sig[0]), sig, ctx, cm, nctx, nm,
                     guidance_scale=3.0, denoise_mask=m, init_latents=z, init_noise=eps)
    assert torch.equal(out, want)
    # core's bilinear resize reads only the cell centres and misses the stroke: nothing changes
    core = run_sampler(load_dit(), pos, negative=neg, cfg=3.0, seed=9, steps=3, denoise=0.8,
                       latent=set_latent_noise_mask(encoded, mask), mask_mode="comfyui")["samples"]
    assert torch.equal(core, z)
    assert not torch.equal(out, z)


def test_batch_index_gives_the_noise_of_the_batch_position(models, cases):
    from nodes import LensNodesEmptyLatent

    handle, pos = load_dit(), cond_from(cases, 0)
    empty = LensNodesEmptyLatent().generate(width=32, height=32, batch_size=3)[0]
    batch = run_sampler(handle, pos, latent=empty, seed=21)["samples"]
    one = {"samples": empty["samples"][:1], "batch_index": [2]}  # core's LatentFromBatch(2, 1)
    out = run_sampler(handle, pos, latent=one, seed=21)
    # same noise; the DiT's batch-1 and batch-3 matmuls may differ in the last bits
    torch.testing.assert_close(out["samples"][0], batch[2], atol=1e-5, rtol=1e-5)
    plain = run_sampler(handle, pos, latent={"samples": empty["samples"][:1]}, seed=21)["samples"]
    assert (plain[0] - batch[2]).abs().max() > 1e-2  # without batch_index: position 0's noise
    assert out["batch_index"] == [2]
    rep = {"samples": empty["samples"][:2], "batch_index": [1, 1]}
    x = run_sampler(handle, pos, latent=rep, seed=21, noise_layout="comfy")["samples"]
    torch.testing.assert_close(x[0], x[1], atol=1e-5, rtol=1e-5)  # repeated index: same noise
    with pytest.raises(ValueError, match="batch_index has 1 entries for a batch of 2"):
        run_sampler(handle, pos, latent={"samples": empty["samples"][:2], "batch_index": [0]})


def test_mask_on_an_empty_latent_warns(models, cases, caplog):
    from nodes import LensNodesEmptyLatent

    empty = LensNodesEmptyLatent().generate(width=32, height=32, batch_size=1)[0]
    with caplog.at_level("WARNING"):
        out = run_sampler(load_dit(), cond_from(cases, 0),
                          latent=set_latent_noise_mask(empty, torch.zeros(32, 32)))["samples"]
    assert "no image content" in caplog.text
    assert torch.equal(out, torch.zeros_like(out))  # all kept: the (empty) original
