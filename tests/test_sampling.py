"""Schedule, noise, CFG, img2img, inpainting and sampler-loop tests."""

import json
import re
from pathlib import Path

import pytest
import torch

from lens_model.sampling import (
    align_text, cfg_combine, check_number, check_text_features, comfyui_mu, comfyui_sigmas,
    empirical_mu, empty_text, expand_batch, img2img_sigmas, lens_sigmas, make_noise,
    noise_image_latents, pad_text, plan_sampling, sample, sample_to_tokens, tokens_to_latents,
)

GOLDEN = Path(__file__).parent / "fixtures/golden/lens_tiny"
SCHEDULE = json.loads((GOLDEN / "schedule.json").read_text())


# ------------------------------------------------------------------------------------ schedules

def test_schedule_json_has_50_rows():
    assert len(SCHEDULE) == 50


@pytest.mark.parametrize("row", SCHEDULE, ids=lambda r: f"{r['height']}x{r['width']}-{r['steps']}")
def test_schedule_golden(row):
    assert row["image_tokens"] == (row["height"] // 16) * (row["width"] // 16)
    mu = empirical_mu(row["image_tokens"], row["steps"])
    assert isinstance(mu, float)
    assert abs(mu - row["mu"]) <= 1e-9
    sig = lens_sigmas(row["height"], row["width"], row["steps"])
    assert sig.dtype == torch.float32 and sig.shape == (row["steps"] + 1,)
    assert sig[0].item() == 1.0 and sig[-1].item() == 0.0
    assert torch.allclose(sig, torch.tensor(row["sigmas"]), atol=1e-6, rtol=0)


def test_mu_jump_at_4300_tokens():
    # 1056x1040 (4290 tokens) is on the n-dependent line; 1056x1056 (4356) on the flat branch.
    assert empirical_mu(4290, 4) == pytest.approx(2.307630, abs=1e-6)
    assert empirical_mu(4356, 4) == pytest.approx(1.194007, abs=1e-6)
    assert empirical_mu(4300, 4) > 2.0          # 4300 itself is still the line branch
    assert empirical_mu(4301, 4) < 1.3
    # Above the threshold, mu does not depend on the step count.
    assert empirical_mu(8100, 1) == empirical_mu(8100, 50)


def test_lens_sigmas_one_step_and_mu_override():
    assert lens_sigmas(1024, 1024, 1).tolist() == [1.0, 0.0]
    # mu = 0 means no shift: sigma = t = linspace(1, 1/n, n).
    assert torch.allclose(lens_sigmas(1024, 1024, 4, mu=0.0),
                          torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), atol=1e-7)
    # The override replaces the empirical value: 1024^2 at 4 steps with the 1056^2 mu.
    assert torch.allclose(lens_sigmas(1024, 1024, 4, mu=1.19400678),
                          lens_sigmas(1056, 1056, 4), atol=0)


@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_bad_steps_rejected(steps):
    with pytest.raises(ValueError, match="steps"):
        lens_sigmas(1024, 1024, steps)


def test_comfyui_sigmas_1024_4_steps():
    sig = comfyui_sigmas(1024, 1024, 4)
    assert sig.dtype == torch.float32
    assert torch.allclose(sig, torch.tensor([1.0, 0.9045, 0.7595, 0.5128, 0.0]), atol=1e-4)


def test_comfyui_mu_values():
    assert comfyui_mu(1024, 1024) == pytest.approx(1.15, abs=1e-12)
    assert comfyui_mu(1440, 1440) == pytest.approx(1.827760, abs=1e-6)
    assert comfyui_mu(1448, 1448) == pytest.approx(1.843037, abs=1e-6)
    # At 8100 tokens core's linear μ and upstream's flat (> 4300 tokens) branch agree to ~1e-5.
    assert comfyui_mu(1440, 1440) == pytest.approx(empirical_mu(8100, 20), abs=1e-4)


def test_comfyui_sigmas_table_indexing():
    # n divides 10000: t_k = 1 - k/n exactly, so mu = 0 gives the plain grid.
    assert torch.allclose(comfyui_sigmas(64, 64, 5, mu=0.0),
                          torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0]), atol=1e-7)
    # n = 3: t = 1, 1 - 0.3333, 1 - 0.6666 (table resolution 1e-4), unlike linspace(1, 1/3, 3).
    assert torch.allclose(comfyui_sigmas(64, 64, 3, mu=0.0),
                          torch.tensor([1.0, 0.6667, 0.3334, 0.0]), atol=1e-6)
    # Core's float index int(57 * (10000/76)) = 7499 picks t = 0.2501 (not 0.25).
    assert comfyui_sigmas(64, 64, 76, mu=0.0)[57].item() == pytest.approx(0.2501, abs=1e-7)


def test_img2img_denoise_one_is_txt2img():
    for h, w, n in [(1024, 1024, 4), (1440, 1440, 20), (48, 80, 6)]:
        assert torch.equal(img2img_sigmas(h, w, n, 1.0), lens_sigmas(h, w, n))
        assert torch.equal(img2img_sigmas(h, w, n, 1.0, mode="comfyui"), comfyui_sigmas(h, w, n))


def test_img2img_partial_schedule():
    # 4 steps at denoise 0.5 -> the 8-step 1024^2 schedule (mu from 8 steps), last 5 values.
    row = next(r for r in SCHEDULE if (r["height"], r["width"], r["steps"]) == (1024, 1024, 8))
    sig = img2img_sigmas(1024, 1024, 4, 0.5)
    assert torch.allclose(sig, torch.tensor(row["sigmas"][4:]), atol=1e-6)
    # floor(4 / 0.3) = 13 total steps; the start sigma shrinks with the strength.
    assert img2img_sigmas(1024, 1024, 4, 0.3).shape == (5,)
    starts = [img2img_sigmas(1024, 1024, 4, s)[0].item() for s in (1.0, 0.8, 0.5, 0.2)]
    assert starts == sorted(starts, reverse=True) and starts[0] == 1.0
    for s in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="denoise"):
            img2img_sigmas(1024, 1024, 4, s)


def _golden_row(height, width, steps):
    return next(r for r in SCHEDULE if (r["height"], r["width"], r["steps"]) == (height, width, steps))


def test_plan_sampling_text_to_image_follows_the_golden_schedule():
    row = _golden_row(1024, 1024, 4)
    plan = plan_sampling(1024, 1024, 4)
    assert plan.sigmas.dtype == torch.float32 and plan.sigmas.shape == (5,)
    assert torch.allclose(plan.sigmas, torch.tensor(row["sigmas"]), atol=1e-6, rtol=0)
    assert abs(plan.mu - row["mu"]) <= 1e-9
    assert (plan.steps, plan.full_steps, plan.start, plan.img2img) == (4, 4, 0, False)
    assert plan.sigma0 == 1.0 and plan.denoise == 1.0 and plan.warnings == ()
    noise = torch.randn(1, 128, 2, 2)
    assert plan.start_latents(noise) is noise
    # the same numbers, bit for bit, as the public schedule functions
    assert torch.equal(plan.sigmas, lens_sigmas(1024, 1024, 4))
    assert torch.equal(plan_sampling(48, 80, 6, schedule="comfyui").sigmas, comfyui_sigmas(48, 80, 6))


def test_plan_sampling_img2img_is_the_tail_of_the_longer_schedule():
    row = _golden_row(1024, 1024, 8)   # 4 steps at denoise 0.5: the last 5 of 8 steps
    plan = plan_sampling(1024, 1024, 4, denoise=0.5, has_init=True)
    assert torch.allclose(plan.sigmas, torch.tensor(row["sigmas"][4:]), atol=1e-6, rtol=0)
    assert abs(plan.mu - row["mu"]) <= 1e-9
    assert (plan.steps, plan.full_steps, plan.start, plan.img2img) == (4, 8, 4, True)
    assert plan.sigma0 == pytest.approx(row["sigmas"][4], abs=1e-6)
    noise, z = torch.full((2, 128, 2, 2), 3.0), torch.full((1, 128, 2, 2), -1.0)
    s0 = row["sigmas"][4]
    assert torch.allclose(plan.start_latents(noise, z), torch.full((2, 128, 2, 2), 3 * s0 - (1 - s0)))
    with pytest.raises(ValueError, match="latents"):
        plan.start_latents(noise)
    assert torch.equal(plan.sigmas, img2img_sigmas(1024, 1024, 4, 0.5))
    assert torch.equal(plan_sampling(1024, 1024, 4, denoise=0.3, schedule="comfyui", has_init=True)
                       .sigmas, img2img_sigmas(1024, 1024, 4, 0.3, mode="comfyui"))


def test_plan_sampling_denoise_without_an_image_runs_the_full_schedule_with_a_warning():
    row = _golden_row(1024, 1024, 4)
    plan = plan_sampling(1024, 1024, 4, denoise=0.5, has_init=False)
    assert torch.allclose(plan.sigmas, torch.tensor(row["sigmas"]), atol=1e-6, rtol=0)
    assert (plan.img2img, plan.denoise, plan.full_steps) == (False, 1.0, 4)
    assert len(plan.warnings) == 1 and "needs an image latent" in plan.warnings[0]
    # an init image at denoise 1 is not img2img either (no warning: inpainting uses it)
    assert not plan_sampling(1024, 1024, 4, has_init=True).img2img


def test_plan_sampling_mu_override_comfyui_mode_and_explicit_sigmas():
    plan = plan_sampling(1024, 1024, 4, mu=0.0)        # no shift: sigma = t
    assert torch.allclose(plan.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), atol=1e-7)
    assert plan.mu == 0.0
    plan = plan_sampling(1024, 1024, 4, schedule="comfyui")
    assert torch.allclose(plan.sigmas, torch.tensor([1.0, 0.9045, 0.7595, 0.5128, 0.0]), atol=1e-4)
    assert plan.mu == pytest.approx(1.15, abs=1e-12) and plan.schedule == "comfyui"
    given = torch.tensor([0.6, 0.3, 0.0])
    plan = plan_sampling(1024, 1024, 9, denoise=0.6, has_init=True, sigmas=given)
    assert torch.equal(plan.sigmas, given) and plan.steps == 2 and plan.mu is None and plan.img2img
    for bad in ({"schedule": "karras"}, {"denoise": 0.0}, {"denoise": float("nan")},
                {"mu": 30.0}, {"sigmas": torch.tensor([1.0])},
                {"sigmas": torch.tensor([1.0, float("nan"), 0.0])}):
        with pytest.raises(ValueError):
            plan_sampling(1024, 1024, 4, **bad)
    with pytest.raises(ValueError, match="steps"):
        plan_sampling(1024, 1024, 0)


@pytest.mark.parametrize("schedule", ["upstream", "comfyui"])
@pytest.mark.parametrize("mu", [None, 1.2])
def test_plan_sampling_is_bitwise_the_schedule_rule_of_the_node_and_pipeline(schedule, mu):
    """The rule both callers used: img2img only with an image and denoise < 1, as the tail of the
    int(steps / denoise)-step schedule; otherwise the full schedule of the chosen mode."""
    full = lens_sigmas if schedule == "upstream" else comfyui_sigmas
    for h, w, steps in [(1024, 1024, 4), (48, 80, 7), (1440, 1440, 20)]:
        for denoise in (1.0, 0.99, 0.5, 0.3):
            for has_init in (False, True):
                plan = plan_sampling(h, w, steps, denoise=denoise, schedule=schedule, mu=mu,
                                     has_init=has_init)
                if has_init and denoise < 1.0:
                    expected = full(h, w, int(steps / denoise), mu=mu)[-(steps + 1):]
                else:
                    expected = full(h, w, steps, mu=mu)
                assert torch.equal(plan.sigmas, expected), (h, w, steps, denoise, has_init)
                assert plan.img2img == (has_init and denoise < 1.0)


def test_noise_image_latents():
    noise = torch.full((2, 128, 2, 3), 2.0)
    z = torch.full((1, 128, 2, 3), -1.0)
    x = noise_image_latents(noise, z, 0.25)
    assert x.shape == (2, 128, 2, 3)
    assert torch.allclose(x, torch.full_like(x, 0.25 * 2.0 + 0.75 * -1.0))
    assert torch.equal(noise_image_latents(noise, z, 1.0), noise)
    with pytest.raises(ValueError, match="do not match"):
        noise_image_latents(noise, torch.zeros(1, 128, 3, 3), 0.5)


# ------------------------------------------------------------------------------------ noise

def test_make_noise_upstream_layout():
    n = make_noise(123, 2, 3, 5)
    assert n.shape == (2, 128, 3, 5) and n.dtype == torch.float32 and n.device.type == "cpu"
    g = torch.Generator("cpu").manual_seed(123)
    tok = torch.randn(2, 15, 128, generator=g)
    # token index r*w + c holds the 128 channels of latent position (r, c)
    assert torch.equal(n[1, :, 2, 4], tok[1, 2 * 5 + 4])
    assert torch.equal(n[0, :, 0, 1], tok[0, 1])


def test_make_noise_comfy_layout_and_differences():
    torch.manual_seed(7)
    ref = torch.randn(2, 128, 3, 5)
    state = torch.get_rng_state()
    c = make_noise(7, 2, 3, 5, layout="comfy")
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is not touched
    assert torch.equal(c, ref)
    u = make_noise(7, 2, 3, 5, layout="upstream")
    assert not torch.equal(u, c)
    assert torch.equal(make_noise(7, 2, 3, 5), u)  # reproducible
    assert not torch.equal(make_noise(8, 2, 3, 5), u)
    with pytest.raises(ValueError, match="layout"):
        make_noise(7, 1, 2, 2, layout="nope")


def test_token_layout_roundtrip():
    x = torch.randn(2, 128, 3, 4)
    t = sample_to_tokens(x)
    assert torch.equal(t[1, 1 * 4 + 2], x[1, :, 1, 2])
    assert torch.equal(tokens_to_latents(t, 3, 4), x)


# ------------------------------------------------------------------------------------ CFG

def test_cfg_g1_returns_cond_exactly():
    c, u = torch.randn(2, 128, 3, 3), torch.randn(2, 128, 3, 3)
    assert torch.equal(cfg_combine(c, u, 1.0), c)


def test_cfg_rescales_to_cond_norm_per_token():
    torch.manual_seed(0)
    c, u = torch.randn(2, 128, 3, 4), torch.randn(2, 128, 3, 4)
    v = cfg_combine(c, u, 4.0)
    assert torch.allclose(v.norm(dim=1), c.norm(dim=1), rtol=1e-5)
    comb = u + 4.0 * (c - u)
    # same direction as the plain CFG combination (positive multiple, per token)
    cos = torch.nn.functional.cosine_similarity(v, comb, dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    # token layout variant: norms over the last dim
    vt = cfg_combine(sample_to_tokens(c), sample_to_tokens(u), 4.0, dim=-1)
    assert torch.allclose(vt, sample_to_tokens(v), atol=1e-6)


def test_cfg_zero_norm_comb_returned_as_is():
    c = torch.randn(1, 128, 1, 2)
    u = c.clone()
    # g = 2 and u = 2c at position 0 gives comb = u + 2(c - u) = 0 there.
    u[..., 0] = 2 * c[..., 0]
    v = cfg_combine(c, u, 2.0)
    assert torch.equal(v[..., 0], torch.zeros(1, 128, 1))
    assert torch.isfinite(v).all()
    assert torch.allclose(v[..., 1], c[..., 1])  # u = c there: comb = c, ratio 1


def test_cfg_comfyui_is_x0_space_attenuate_only():
    torch.manual_seed(1)
    x = torch.randn(1, 128, 2, 2)
    c, u = torch.randn(1, 128, 2, 2), torch.randn(1, 128, 2, 2)
    s = 0.6
    v = cfg_combine(c, u, 3.0, mode="comfyui", x=x, sigma=s)
    x0_c = x - s * c
    d_plain = x - s * (u + 3.0 * (c - u))
    d = x - s * v
    # D is the x0 CFG result scaled by a factor in [0, 1] per position, never above ||x0_c||
    ratio = (d.norm(dim=1) / d_plain.norm(dim=1))
    assert (ratio <= 1 + 1e-6).all() and (ratio >= 0).all()
    assert (d.norm(dim=1) <= x0_c.norm(dim=1) * (1 + 1e-6) + 1e-6).all()
    cos = torch.nn.functional.cosine_similarity(d, d_plain, dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    with pytest.raises(ValueError, match="needs"):
        cfg_combine(c, u, 3.0, mode="comfyui")


# ------------------------------------------------------------------------------------ text helpers

def test_pad_and_align_text():
    a, am = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    b, bm = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.uint8)
    pa, pam, pb, pbm = align_text(a, am, b, bm)
    assert pa.shape == (2, 5, 8) and pb.shape == (2, 5, 8)
    assert torch.equal(pa[:, :3], a) and (pa[:, 3:] == 0).all()
    assert pam.dtype == torch.bool and pam[:, :3].all() and not pam[:, 3:].any()
    assert pbm.dtype == torch.bool and pbm.all()
    with pytest.raises(ValueError):
        pad_text(b, bm, 2)
    e, em = empty_text(3, 8)
    assert e.shape == (3, 0, 8) and em.shape == (3, 0)
    assert pad_text(e, em, 4)[0].shape == (3, 4, 8)


def test_expand_batch_repeat_interleave():
    ctx = torch.arange(2).float().view(2, 1, 1).expand(2, 2, 3).contiguous()
    m = torch.ones(2, 2, dtype=torch.bool)
    out, om = expand_batch(ctx, m, 6)
    assert out[:, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert om.shape == (6, 2)
    with pytest.raises(ValueError, match="cannot be spread"):
        expand_batch(ctx, m, 3)


# ------------------------------------------------------------------------------------ sampler loop

class ToyDiT(torch.nn.Module):
    """Deterministic stand-in for the DiT: v = a·x + (masked mean of the text features) + σ.

    Masked text tokens have no effect, like in the real DiT; padding must leave outputs unchanged.
    """

    def __init__(self, channels=8, dtype=torch.float32):
        super().__init__()
        self.proj = torch.nn.Linear(channels, 128, bias=False, dtype=dtype)
        torch.nn.init.normal_(self.proj.weight, std=0.5, generator=torch.Generator().manual_seed(0))
        self.calls = []

    @property
    def dtype(self):
        return self.proj.weight.dtype

    def forward(self, x, sigma, context, mask):
        self.calls.append((x.shape[0], context.shape[1], x.dtype))
        m = mask.to(x.dtype).unsqueeze(-1)
        pooled = (context.to(x.dtype) * m).sum(1) / m.sum(1).clamp_min(1)
        bias = self.proj(pooled)[:, :, None, None]
        return -0.5 * x + bias + sigma.to(x.dtype)[:, None, None, None]


def _toy_inputs(batch=2, h=2, w=3, s=4):
    g = torch.Generator().manual_seed(3)
    ctx = torch.randn(batch, s, 8, generator=g)
    msk = torch.ones(batch, s, dtype=torch.bool)
    neg = torch.randn(1, 2, 8, generator=g)
    nmsk = torch.ones(1, 2, dtype=torch.bool)
    return make_noise(0, batch, h, w), ctx, msk, neg, nmsk


def test_sample_euler_g1_matches_hand_loop_and_skips_uncond():
    model = ToyDiT()
    noise, ctx, msk, neg, nmsk = _toy_inputs()
    sig = lens_sigmas(32, 48, 3)
    out = sample(model, noise, sig, ctx, msk, neg, nmsk, guidance_scale=1.0)
    assert len(model.calls) == 3  # no unconditional pass at g = 1
    x = noise.clone()
    for k in range(3):
        v = model(x, sig[k].expand(2), ctx, msk)
        x = x + (sig[k + 1] - sig[k]) * v
    assert out.dtype == torch.float32 and torch.allclose(out, x, atol=1e-6)


def test_sample_cfg_two_pass_equals_joint_batch_and_padding_invariance():
    noise, ctx, msk, neg, nmsk = _toy_inputs()
    sig = lens_sigmas(32, 48, 2)
    m1, m2 = ToyDiT(), ToyDiT()
    two = sample(m1, noise, sig, ctx, msk, neg, nmsk, guidance_scale=5.0)
    joint = sample(m2, noise, sig, ctx, msk, neg, nmsk, guidance_scale=5.0, batch_cfg=True)
    assert [c[0] for c in m1.calls] == [2, 2, 2, 2] and [c[0] for c in m2.calls] == [4, 4]
    assert torch.allclose(two, joint, atol=1e-6)
    # pad the negative with zero features + mask False: unchanged
    pneg, pnm = pad_text(neg, nmsk, 7)
    padded = sample(ToyDiT(), noise, sig, ctx, msk, pneg, pnm, guidance_scale=5.0)
    assert torch.allclose(padded, two, atol=1e-6)
    # and the guidance did something
    g1 = sample(ToyDiT(), noise, sig, ctx, msk, neg, nmsk, guidance_scale=1.0)
    assert not torch.allclose(g1, two, atol=1e-3)


def test_sample_empty_negative_is_zero_length_text():
    noise, ctx, msk, _, _ = _toy_inputs()
    model = ToyDiT()
    sig = lens_sigmas(32, 48, 1)
    sample(model, noise, sig, ctx, msk, guidance_scale=4.0)
    assert sorted(c[1] for c in model.calls) == [0, 4]


def test_sample_broadcasts_single_prompt_and_casts_to_model_dtype():
    model = ToyDiT(dtype=torch.bfloat16)
    noise = make_noise(1, 3, 2, 2)
    ctx = torch.randn(1, 4, 8)
    msk = torch.ones(1, 4, dtype=torch.bool)
    out = sample(model, noise, lens_sigmas(32, 32, 2), ctx, msk, guidance_scale=2.0)
    assert out.dtype == torch.float32 and out.shape == (3, 128, 2, 2)
    assert all(c[0] == 3 and c[2] == torch.bfloat16 for c in model.calls)
    # identical rows (same prompt, same noise row 0 vs itself) -> broadcasting is row-wise
    noise2 = noise[:1].expand(3, -1, -1, -1).contiguous()
    out2 = sample(ToyDiT(dtype=torch.bfloat16), noise2, lens_sigmas(32, 32, 2), ctx, msk, guidance_scale=2.0)
    assert torch.equal(out2[0], out2[2])


def test_sample_callback_and_interrupt():
    noise, ctx, msk, _, _ = _toy_inputs()
    sig = lens_sigmas(32, 48, 3)
    seen = []

    def cb(step, total, x, denoised):
        seen.append((step, total, x.clone(), denoised.clone()))

    model = ToyDiT()
    out = sample(model, noise, sig, ctx, msk, callback=cb)
    assert [s[:2] for s in seen] == [(0, 3), (1, 3), (2, 3)]
    assert torch.equal(seen[-1][2], out)
    # denoised = x_k - sigma_k * v_k; at the last step x_n = x_k + (0 - sigma_k) v = denoised
    assert torch.allclose(seen[-1][3], out, atol=1e-6)
    v0 = ToyDiT()(noise, sig[0].expand(2), ctx, msk)
    assert torch.allclose(seen[0][3], noise - sig[0] * v0, atol=1e-6)

    class Stop(BaseException):
        pass

    def stop(step, total, x, d):
        if step == 1:
            raise Stop()

    model = ToyDiT()
    with pytest.raises(Stop):
        sample(model, noise, sig, ctx, msk, callback=stop)
    assert len(model.calls) == 2


def test_sample_comfyui_cfg_mode_runs_and_differs():
    noise, ctx, msk, neg, nmsk = _toy_inputs()
    sig = comfyui_sigmas(32, 48, 3)
    a = sample(ToyDiT(), noise, sig, ctx, msk, neg, nmsk, guidance_scale=5.0, cfg_mode="comfyui")
    b = sample(ToyDiT(), noise, sig, ctx, msk, neg, nmsk, guidance_scale=5.0)
    assert torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-3)
    # at g = 1 the comfyui clamp is a no-op to ~1e-8 relative
    c = sample(ToyDiT(), noise, sig, ctx, msk, guidance_scale=1.0, cfg_mode="comfyui")
    d = sample(ToyDiT(), noise, sig, ctx, msk, guidance_scale=1.0)
    assert torch.allclose(c, d, atol=1e-5)


def test_sample_rejects_bad_inputs():
    noise, ctx, msk, _, _ = _toy_inputs()
    with pytest.raises(ValueError, match="noise"):
        sample(ToyDiT(), noise[:, :64], lens_sigmas(32, 48, 2), ctx, msk)
    with pytest.raises(ValueError, match="cannot be spread"):
        sample(ToyDiT(), make_noise(0, 3, 2, 3), lens_sigmas(32, 48, 2), ctx, msk)
    with pytest.raises(ValueError, match="cfg_mode"):
        sample(ToyDiT(), noise, lens_sigmas(32, 48, 2), ctx, msk, cfg_mode="x")


# ------------------------------------------------------------------------------------ option checks

from lens_model.sampling import MAX_STEPS, NonFiniteError, check_sampling_options  # noqa: E402

NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("bad", NON_FINITE)
def test_non_finite_guidance_rejected_before_sampling(bad):
    noise, ctx, msk, neg, nmsk = _toy_inputs()
    model = ToyDiT()
    with pytest.raises(ValueError, match=r"guidance_scale must be a finite number.*(nan|inf)"):
        sample(model, noise, lens_sigmas(32, 48, 2), ctx, msk, neg, nmsk, guidance_scale=bad)
    assert model.calls == []  # nothing ran


@pytest.mark.parametrize("bad", NON_FINITE)
def test_non_finite_mu_and_denoise_rejected_by_the_schedules(bad):
    with pytest.raises(ValueError, match="mu must be a finite number"):
        lens_sigmas(1024, 1024, 4, mu=bad)
    with pytest.raises(ValueError, match="mu must be a finite number"):
        comfyui_sigmas(1024, 1024, 4, mu=bad)
    with pytest.raises(ValueError, match="denoise must be a finite number"):
        img2img_sigmas(1024, 1024, 4, bad)


def test_check_sampling_options_names_value_and_range():
    check_sampling_options(steps=MAX_STEPS, guidance_scale=0.0, denoise=1.0, mu=-20.0)
    check_sampling_options()  # everything optional
    with pytest.raises(ValueError, match=r"steps must be an integer from 1 to 200, got 100000"):
        check_sampling_options(steps=100000)
    with pytest.raises(ValueError, match=r"steps must be an integer from 1 to 200, got 0"):
        check_sampling_options(steps=0)
    with pytest.raises(ValueError, match=r"steps must be an integer .* got 2\.5"):
        check_sampling_options(steps=2.5)
    with pytest.raises(ValueError, match=r"steps must be an integer .* got True"):
        check_sampling_options(steps=True)
    with pytest.raises(ValueError, match=r"guidance_scale must be in \[0, 100\], got -1\.0"):
        check_sampling_options(guidance_scale=-1)
    with pytest.raises(ValueError, match=r"denoise must be in \(0, 1\], got 0\.0"):
        check_sampling_options(denoise=0)
    with pytest.raises(ValueError, match=r"mu \(schedule shift override\) must be in \[-20, 20\]"):
        check_sampling_options(mu=25)
    with pytest.raises(ValueError, match=r"must be a number, got 'x'"):
        check_sampling_options(guidance_scale="x")
    # callers name their own flags
    with pytest.raises(ValueError, match=r"^--cfg must be a finite number, got nan"):
        check_sampling_options(guidance_scale=float("nan"), names={"guidance_scale": "--cfg"})


def test_schedules_reject_unreasonable_steps_but_img2img_may_build_long_ones():
    with pytest.raises(ValueError, match="from 1 to 200"):
        lens_sigmas(1024, 1024, 100000)
    with pytest.raises(ValueError, match="from 1 to 200"):
        comfyui_sigmas(1024, 1024, 201)
    # 200 steps at denoise 0.5 runs the tail of a 400-step schedule
    sig = img2img_sigmas(1024, 1024, 200, 0.5)
    assert sig.shape == (201,) and sig[-1].item() == 0.0


class _BrokenDiT(ToyDiT):
    """Returns NaN (or a huge value) in the conditional / unconditional pass from a given call on."""

    def __init__(self, bad_call, value=float("nan"), only_uncond=False):
        super().__init__()
        self.bad_call, self.value, self.only_uncond = bad_call, value, only_uncond

    def forward(self, x, sigma, context, mask):
        out = super().forward(x, sigma, context, mask)
        uncond = context.shape[1] == 2  # _toy_inputs: the negative has 2 tokens, the prompt 4
        if len(self.calls) - 1 >= self.bad_call and (uncond or not self.only_uncond):
            out = out.clone()
            out[:, 0, 0, 0] = self.value
        return out


def test_non_finite_model_output_names_step_and_cause():
    noise, ctx, msk, neg, nmsk = _toy_inputs()
    seen = []
    with pytest.raises(NonFiniteError, match=r"DiT returned NaN or Inf \(conditional pass\) at "
                                             r"step 2 of 3.*fp16.*weights") as err:
        sample(_BrokenDiT(bad_call=1), noise, lens_sigmas(32, 48, 3), ctx, msk,
               callback=lambda *a: seen.append(a[0]))
    assert (err.value.step, err.value.total, err.value.where) == (2, 3, "model output")
    assert isinstance(err.value, ValueError)
    assert seen == [0]  # no callback (preview, progress) ever saw the NaN latent
    with pytest.raises(NonFiniteError, match=r"unconditional pass\) at step 1 of 3"):
        sample(_BrokenDiT(bad_call=0, only_uncond=True), noise, lens_sigmas(32, 48, 3), ctx, msk,
               neg, nmsk, guidance_scale=4.0)


def test_guidance_overflow_is_blamed_on_guidance():
    noise, ctx, msk, neg, nmsk = _toy_inputs()
    # finite but huge outputs: u + g(c - u) overflows float32 at g = 100
    model = _BrokenDiT(bad_call=0, value=3e38, only_uncond=True)
    with pytest.raises(NonFiniteError, match=r"guided velocity .* step 1 of 2 .* with "
                                             r"guidance scale 100.*lower cfg") as err:
        sample(model, noise, lens_sigmas(32, 48, 2), ctx, msk, neg, nmsk, guidance_scale=100.0)
    assert err.value.where == "guided velocity"


def test_non_finite_start_latent_rejected_before_the_model_runs():
    noise, ctx, msk, _, _ = _toy_inputs()
    noise[0, 3, 1, 1] = float("inf")
    model = ToyDiT()
    with pytest.raises(NonFiniteError, match="start latent") as err:
        sample(model, noise, lens_sigmas(32, 48, 2), ctx, msk)
    assert err.value.step == 0 and model.calls == []
    with pytest.raises(ValueError, match="sigmas must be finite"):
        sample(model, _toy_inputs()[0], torch.tensor([1.0, float("nan"), 0.0]), ctx, msk)


# ------------------------------------------------------------------------------------ inpainting

from lens_model.sampling import latent_mask, repeat_to_batch  # noqa: E402


def _inpaint_case(batch=2, h=4, w=5, steps=3, denoise=0.6, seed=7):
    g = torch.Generator().manual_seed(11)
    z = torch.randn(1, 128, h, w, generator=g)
    ctx = torch.randn(1, 4, 8, generator=g)
    msk = torch.ones(1, 4, dtype=torch.bool)
    sig = img2img_sigmas(16 * h, 16 * w, steps, denoise)
    eps = make_noise(seed, batch, h, w)
    x = noise_image_latents(eps, z, sig[0])
    return z, ctx, msk, sig, eps, x


def test_inpaint_hard_mask_keeps_the_original_exactly_outside():
    z, ctx, msk, sig, eps, x = _inpaint_case()
    m = torch.zeros(1, 1, 4, 5)
    m[..., 1:3, 2:4] = 1.0
    out = sample(ToyDiT(), x, sig, ctx, msk, guidance_scale=3.0, negative_context=ctx[:, :2],
                 negative_mask=msk[:, :2], denoise_mask=m, init_latents=z, init_noise=eps)
    keep = (m == 0).expand_as(out)
    assert torch.equal(out[keep], z.expand_as(out)[keep])
    inside = (out - z)[:, :, 1:3, 2:4]
    assert inside.abs().amin(dim=(1, 2, 3)).gt(0).all() and inside.abs().mean() > 1e-2


def test_inpaint_mask_of_ones_equals_plain_img2img():
    z, ctx, msk, sig, eps, x = _inpaint_case()
    plain = sample(ToyDiT(), x, sig, ctx, msk)
    ones = sample(ToyDiT(), x, sig, ctx, msk, denoise_mask=torch.ones(1, 1, 4, 5),
                  init_latents=z, init_noise=eps)
    assert torch.equal(ones, plain)
    # with sigma_0 = 1 (denoise 1) the start latent is the noise itself
    full = lens_sigmas(64, 80, 2)
    a = sample(ToyDiT(), eps, full, ctx, msk)
    b = sample(ToyDiT(), eps, full, ctx, msk, denoise_mask=torch.ones(2, 128, 4, 5), init_latents=z)
    assert torch.equal(a, b)


def test_inpaint_soft_mask_follows_core_x0_blend():
    """Hand loop of core's KSamplerX0Inpaint (x₀ blended with the original outside the mask)
    around an Euler sampler."""
    z, ctx, msk, sig, eps, x = _inpaint_case(batch=1)
    m = torch.linspace(0, 1, 20).reshape(1, 1, 4, 5)
    out = sample(ToyDiT(), x, sig, ctx, msk, denoise_mask=m, init_latents=z, init_noise=eps)
    ref_model = ToyDiT()
    xr = x.clone()
    for k in range(len(sig) - 1):
        s, s_next = sig[k].item(), sig[k + 1].item()
        x_in = xr * m + (s * eps + (1 - s) * z) * (1 - m)
        v = ref_model(x_in, torch.full((1,), s), ctx, msk)
        x0 = (x_in - s * v) * m + z * (1 - m)
        xr = xr + (s_next - s) * (xr - x0) / s
    xr = xr * m + z * (1 - m)
    assert torch.allclose(out, xr, atol=1e-5)
    assert not torch.allclose(out, z, atol=1e-3)


def test_inpaint_bad_inputs():
    z, ctx, msk, sig, eps, x = _inpaint_case()
    m = torch.ones(1, 1, 4, 5)
    with pytest.raises(ValueError, match="needs init_latents"):
        sample(ToyDiT(), x, sig, ctx, msk, denoise_mask=m)
    with pytest.raises(ValueError, match="pass init_noise"):
        sample(ToyDiT(), x, sig, ctx, msk, denoise_mask=m, init_latents=z)
    with pytest.raises(ValueError, match="denoise_mask must be"):
        sample(ToyDiT(), x, sig, ctx, msk, denoise_mask=torch.ones(1, 1, 64, 80), init_latents=z,
               init_noise=eps)
    with pytest.raises(ValueError, match="finite and in"):
        sample(ToyDiT(), x, sig, ctx, msk, denoise_mask=m * float("nan"), init_latents=z,
               init_noise=eps)


def test_latent_mask_coverage_keeps_a_thin_stroke_that_core_resize_loses():
    mask = torch.zeros(1, 64, 64)
    mask[0, :, 3] = 1.0  # a 1-px vertical stroke in the first cell column
    cov = latent_mask(mask, 4, 4)
    assert cov.shape == (1, 1, 4, 4)
    assert torch.equal(cov[0, 0, :, 0], torch.full((4,), 1 / 16))
    assert cov[0, 0, :, 1:].abs().sum() == 0
    core = latent_mask(mask, 4, 4, mode="comfyui")
    assert core.abs().sum() == 0  # bilinear x1/16 samples pixels 7 and 8 of each cell only
    # a 2x2 dot on those centre pixels: core sees a fully masked cell, coverage 4/256
    dot = torch.zeros(64, 64)
    dot[7:9, 23:25] = 1.0
    assert latent_mask(dot, 4, 4, mode="comfyui")[0, 0, 0, 1] == 1.0
    assert latent_mask(dot, 4, 4)[0, 0, 0, 1] == 4 / 256


def test_latent_mask_coverage_crop_is_aligned_to_the_encoded_image():
    # a 70x75 image encodes to 4x4 cells from the centre crop rows 3..67, columns 5..69
    mask = torch.zeros(70, 75)
    mask[3 + 16:3 + 32, 5 + 32:5 + 48] = 1.0  # exactly cell (1, 2) of the crop
    cov = latent_mask(mask, 4, 4)
    want = torch.zeros(1, 1, 4, 4)
    want[0, 0, 1, 2] = 1.0
    assert torch.equal(cov, want)
    # only the crop counts: the 3 rows above it do not leak into row 0
    mask[:3] = 1.0
    assert torch.equal(latent_mask(mask, 4, 4), want)


def test_latent_mask_shapes_batch_and_values(caplog):
    m = torch.rand(2, 1, 32, 48)
    assert latent_mask(m, 2, 3).shape == (2, 1, 2, 3)
    assert latent_mask(m, 2, 3, batch=5).shape == (5, 1, 2, 3)
    assert torch.equal(latent_mask(m, 2, 3, batch=3)[2], latent_mask(m, 2, 3)[0])
    assert torch.equal(latent_mask(m, 2, 3, batch=1), latent_mask(m, 2, 3)[:1])
    assert latent_mask(torch.full((32, 48), 3.0), 2, 3).max() == 1.0  # clipped
    with pytest.raises(ValueError, match="NaN"):
        latent_mask(torch.full((32, 48), float("nan")), 2, 3)
    with pytest.raises(ValueError, match="mask mode"):
        latent_mask(m, 2, 3, mode="nearest")
    with caplog.at_level("WARNING"):
        assert latent_mask(torch.ones(64, 64), 2, 3).shape == (1, 1, 2, 3)  # LoadImage's 64x64
    assert "stretched" in caplog.text


def test_repeat_to_batch_tiles_or_truncates():
    t = torch.arange(2).reshape(2, 1)
    assert repeat_to_batch(t, 5).flatten().tolist() == [0, 1, 0, 1, 0]
    assert repeat_to_batch(t, 1).flatten().tolist() == [0]


@pytest.mark.parametrize("layout", ["upstream", "comfy"])
def test_batch_index_gives_each_image_its_batch_position_noise(layout):
    full = make_noise(5, 4, 2, 3, layout=layout)
    picked = make_noise(5, 3, 2, 3, layout=layout, batch_index=[3, 0, 3])
    assert torch.equal(picked, full[[3, 0, 3]])
    assert torch.equal(make_noise(5, 1, 2, 3, layout=layout, batch_index=[2]), full[2:3])


def test_batch_index_matches_core_prepare_noise():
    # core: torch.manual_seed(seed), then one randn([1, C, h, w]) per position 0..max(index)
    torch.manual_seed(9)
    draws = [torch.randn([1, 128, 2, 3], dtype=torch.float32) for _ in range(3)]
    want = torch.cat([draws[2], draws[1]])
    assert torch.equal(make_noise(9, 2, 2, 3, layout="comfy", batch_index=[2, 1]), want)
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        make_noise(9, 3, 2, 3, batch_index=[0, 1])
    with pytest.raises(ValueError, match="non-negative integers"):
        make_noise(9, 2, 2, 3, batch_index=[0, -1])


def test_check_number_names_the_value_and_its_range():
    assert check_number("2.5", "cfg", 0, 30) == 2.5
    assert check_number(-1e30, "strength") == -1e30  # no range: any finite number
    for bad, words in ((float("nan"), "cfg must be a finite number, got nan"),
                       (float("-inf"), "cfg must be a finite number, got -inf"),
                       ("x", "cfg must be a number, got 'x'"), (None, "cfg must be a number"),
                       (10**400, "cfg must be a number"), (True, "cfg must be a number"),
                       (31, "cfg must be from 0 to 30, got 31")):
        with pytest.raises(ValueError, match=re.escape(words)):
            check_number(bad, "cfg", 0, 30)


def test_check_text_features_converts_and_refuses_what_the_dit_cannot_take():
    ctx = torch.randn(1, 3, 4 * 8, dtype=torch.float16)
    out, mask = check_text_features(ctx, torch.tensor([[1, 1, 0]]), layers=4, width=8)
    assert out.dtype == torch.float32 and torch.equal(out, ctx.float())
    assert mask.dtype == torch.bool and mask.tolist() == [[True, True, False]]
    assert check_text_features(ctx)[1].all()  # no mask: every token counts
    # the empty prompt (zero tokens) has no width to check
    assert check_text_features(torch.zeros(1, 0, 5), width=8)[0].shape == (1, 0, 5)
    cases = [
        (dict(context=torch.zeros(3, 32)), r"neg: expected Lens text features \[B, S, 4×2880\], got \(3, 32\)"),
        (dict(context="text"), "got str"),
        (dict(context=ctx, layers=2), "stacks 2 text-encoder layers; Lens needs 4"),
        (dict(context=ctx.clone().index_fill_(1, torch.tensor([1]), float("nan"))), "NaN or Inf"),
        (dict(context=ctx, mask=torch.ones(1, 4)), r"attention_mask \(1, 4\) does not match"),
        (dict(context=ctx, width=16), "32 channels per token, but this Lens DiT expects 4×16 = 64"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ValueError, match=words):
            check_text_features(what="neg", **kwargs)
