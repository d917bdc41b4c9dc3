"""Full sampling + decode against upstream's tiny-model pipeline goldens (pipeline_cases)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lens_model
from lens_model.pipeline import generate_from_features, to_pil
from lens_model.sampling import lens_sigmas, pad_text, sample_to_tokens, tokens_to_latents

GOLDEN = Path(__file__).parent / "fixtures/golden/lens_tiny"
CASES = json.loads((GOLDEN / "pipeline_cases.json").read_text())
DATA = load_file(str(GOLDEN / "pipeline_cases.safetensors"))

# The σ schedule upstream's reference run used for each case (6 decimals)
UPSTREAM_SCHEDULES = {
    0: [1, .954515, .874924, .699854, 0],
    1: [1, .971788, .932335, .873246, .775010, .579454, 0],
    2: [1, .876483, 0],
}


@pytest.fixture(scope="module")
def transformer():
    return lens_model.load_transformer(GOLDEN / "transformer", dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def vae():
    return lens_model.load_vae(GOLDEN / "vae", dtype=torch.float32, device="cpu")


def _case(i):
    meta = CASES[i]
    p = f"case{i}."
    h, w = meta["height"] // 16, meta["width"] // 16
    ctx = torch.cat([DATA[f"{p}prompt_embeds.{k}"] for k in range(4)], dim=-1)
    mask = DATA[f"{p}prompt_mask"].bool()
    nctx = nmask = None
    if meta["negative"] == "embeds":
        nctx = torch.cat([DATA[f"{p}negative_prompt_embeds.{k}"] for k in range(4)], dim=-1)
        nmask = DATA[f"{p}negative_prompt_mask"].bool()
    noise = tokens_to_latents(DATA[f"{p}initial_latents"], h, w)
    return meta, ctx, mask, nctx, nmask, noise


@pytest.mark.parametrize("i", [0, 1, 2])
def test_pipeline_golden(i, transformer, vae):
    meta, ctx, mask, nctx, nmask, noise = _case(i)
    sig = lens_model.lens_sigmas(meta["height"], meta["width"], meta["steps"])
    assert torch.allclose(sig, torch.tensor(UPSTREAM_SCHEDULES[i], dtype=torch.float32), atol=1e-6)
    steps_seen = []
    out = lens_model.sample(transformer, noise, sig, ctx, mask, nctx, nmask,
                            guidance_scale=meta["guidance_scale"],
                            callback=lambda k, n, x, d: steps_seen.append(k))
    assert steps_seen == list(range(meta["steps"]))
    assert out.shape == noise.shape and out.dtype == torch.float32
    expected = DATA[f"case{i}.expected_final_latents"]
    torch.testing.assert_close(sample_to_tokens(out), expected, atol=2e-4, rtol=2e-4)
    image = vae.decode(out, tile=False)
    torch.testing.assert_close(image, DATA[f"case{i}.expected_image"], atol=2e-4, rtol=0)


def test_pipeline_golden_joint_batch_padding(transformer):
    """Upstream's own layout: one 2B batch, negative padded to the positive with zeros + mask 0."""
    meta, ctx, mask, nctx, nmask, noise = _case(1)
    sig = lens_sigmas(meta["height"], meta["width"], meta["steps"])
    out = lens_model.sample(transformer, noise, sig, ctx, mask, nctx, nmask,
                            guidance_scale=meta["guidance_scale"], batch_cfg=True)
    torch.testing.assert_close(sample_to_tokens(out), DATA["case1.expected_final_latents"],
                               atol=2e-4, rtol=2e-4)
    # explicit padding of the negative to 9 tokens changes nothing
    pn, pm = pad_text(nctx, nmask, 9)
    out2 = lens_model.sample(transformer, noise, sig, ctx, mask, pn, pm,
                             guidance_scale=meta["guidance_scale"])
    torch.testing.assert_close(out2, out, atol=2e-5, rtol=2e-5)


def test_pipeline_golden_empty_negative_as_padded_zeros(transformer):
    """Case 2 with upstream's empty negative (zeros shaped like the positive, mask all false)."""
    meta, ctx, mask, _, _, noise = _case(2)
    zeros = torch.zeros_like(ctx)
    zmask = torch.zeros_like(mask)
    sig = lens_sigmas(meta["height"], meta["width"], meta["steps"])
    out = lens_model.sample(transformer, noise, sig, ctx, mask, zeros, zmask,
                            guidance_scale=meta["guidance_scale"])
    torch.testing.assert_close(sample_to_tokens(out), DATA["case2.expected_final_latents"],
                               atol=2e-4, rtol=2e-4)


def test_generate_from_features_golden(transformer, vae):
    meta, ctx, mask, nctx, nmask, noise = _case(1)
    imgs = generate_from_features(ctx, mask, transformer, vae, meta["width"], meta["height"],
                                  steps=meta["steps"], guidance=meta["guidance_scale"],
                                  negative_context=nctx, negative_mask=nmask, noise=noise,
                                  device="cpu", output_type="pt")
    torch.testing.assert_close(imgs, DATA["case1.expected_image"], atol=2e-4, rtol=0)
    pil = to_pil(imgs)
    assert len(pil) == 1 and pil[0].size == (80, 48) and pil[0].mode == "RGB"
    # uint8 by truncation of 255*I (upstream PIL: truncation of 127.5*(x+1))
    expected_u8 = (DATA["case1.expected_image"][0] * 255).floor()
    got = torch.from_numpy(np.array(pil[0])).float()
    assert (got - expected_u8).abs().max() <= 1
    assert (got == expected_u8).float().mean() > 0.99


def test_img2img_denoise_one_equals_txt2img(transformer, vae):
    meta, ctx, mask, _, _, noise = _case(0)
    a = generate_from_features(ctx, mask, transformer, vae, 64, 64, steps=4, guidance=1.0,
                               noise=noise, device="cpu", output_type="latent")
    img = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    b = generate_from_features(ctx, mask, transformer, vae, 64, 64, steps=4, guidance=1.0,
                               noise=noise, device="cpu", output_type="latent", image=img,
                               denoise=1.0)
    assert torch.equal(a, b)
    # a small strength keeps the result close to the encoded image; larger ones move away
    z = vae.encode(img)
    dist = []
    for strength in (0.02, 0.3, 0.9):
        out = generate_from_features(ctx, mask, transformer, vae, 64, 64, steps=4, guidance=1.0,
                                     noise=noise, device="cpu", output_type="latent", image=img,
                                     denoise=strength)
        dist.append(((out - z).norm() / z.norm()).item())
    assert dist[0] < dist[1] < dist[2]
    assert dist[0] < 0.2


@pytest.mark.parametrize("compute", [None, torch.bfloat16])
def test_pipeline_bf16_weights_sanity(compute):
    """bf16 ComfyUI-prefixed weights: a sanity bound only (upstream publishes no bf16 reference, so cosine bounds, not
    tolerances)."""
    model = lens_model.load_transformer(GOLDEN / "lens_tiny_comfy_bf16.safetensors", device="cpu")
    assert model.dtype == torch.bfloat16
    model.compute_dtype = compute
    meta, ctx, mask, nctx, nmask, noise = _case(1)
    out = lens_model.sample(model, noise, lens_sigmas(meta["height"], meta["width"], meta["steps"]),
                            ctx, mask, nctx, nmask, guidance_scale=meta["guidance_scale"])
    assert out.dtype == torch.float32  # the running latent stays fp32
    got, exp = sample_to_tokens(out), DATA["case1.expected_final_latents"]
    cos = torch.nn.functional.cosine_similarity(got, exp, dim=-1)
    assert cos.min() >= 0.99
    assert (got - exp).norm() / exp.norm() < 0.1
