"""Nodes run on the golden tiny DiT and VAE (CPU, fp32) through the ComfyUI stubs.

Checks against upstream golden data (pipeline cases) and against direct lens_model calls with the
same inputs; conversions of core latents; interrupt, progress and error behaviour.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from comfy_stubs import InterruptProcessingException, comfy_env, place_golden_models  # noqa: F401
from conftest import GOLDEN

DIT = "lens_tiny_turbo/"
VAE = "lens_tiny_vae/"


@pytest.fixture
def models(comfy_env):
    place_golden_models(comfy_env, GOLDEN)
    return comfy_env


@pytest.fixture(scope="module")
def cases():
    return load_file(str(GOLDEN / "pipeline_cases.safetensors"))


def tokens_to_latents(t, h, w):
    b, n, c = t.shape
    return t.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def cond_from(cases, n, prefix="prompt"):
    """Golden per-layer features -> core Lens CONDITIONING (layer-major concat, int64 mask)."""
    ctx = torch.cat([cases[f"case{n}.{prefix}_embeds.{i}"] for i in range(4)], dim=-1)
    mask = cases[f"case{n}.{prefix}_mask"].to(torch.int64)
    return [[ctx, {"pooled_output": None, "attention_mask": mask, "num_layers_stacked": 4}]]


def load_dit(**kw):
    from nodes import LensNodesDiTLoader

    args = dict(model_name=DIT, weight_dtype="default", device="auto", offload="auto")
    args.update(kw)
    return LensNodesDiTLoader().load(**args)[0]


def load_vae():
    from nodes import LensNodesVAELoader

    return LensNodesVAELoader().load(vae_name=VAE, dtype="auto", device="auto")[0]


def run_sampler(model, positive, **kw):
    from nodes import LensNodesSampler

    args = dict(seed=0, steps=4, cfg=1.0, schedule="upstream", denoise=1.0,
                noise_layout="upstream", width=64, height=64)
    args.update(kw)
    return LensNodesSampler().sample(model=model, positive=positive, **args)[0]


# -------------------------------------------------------------------------------------------
# golden parity through the nodes
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2])
def test_sampler_and_decode_match_upstream_golden(models, cases, monkeypatch, n):
    import json

    import lens_model.sampling as sampling
    from nodes import LensNodesEmptyLatent, LensNodesVAEDecode

    case = json.loads((GOLDEN / "pipeline_cases.json").read_text())[n]
    B, H, W = case["batch"], case["height"], case["width"]
    h, w = H // 16, W // 16
    init = tokens_to_latents(cases[f"case{n}.initial_latents"], h, w)

    def fake_noise(seed, batch, hh, ww, layout="upstream", batch_index=None):
        assert (batch, hh, ww) == (B, h, w)
        return init.clone()

    monkeypatch.setattr(sampling, "make_noise", fake_noise)
    kw = {}
    if case["negative"] == "embeds":
        kw["negative"] = cond_from(cases, n, "negative_prompt")
    elif n == 2:  # an explicitly connected empty negative (S = 0) is the empty negative
        kw["negative"] = [[torch.zeros(1, 0, 128), {"pooled_output": None,
                                                   "attention_mask": torch.zeros(1, 0, dtype=torch.int64),
                                                   "num_layers_stacked": 4}]]
    latent = LensNodesEmptyLatent().generate(width=W, height=H, batch_size=B)[0]
    out = run_sampler(load_dit(), cond_from(cases, n), steps=case["steps"],
                      cfg=case["guidance_scale"], latent=latent, **kw)
    x = out["samples"]
    assert x.dtype == torch.float32 and x.device.type == "cpu" and x.shape == (B, 128, h, w)
    want = tokens_to_latents(cases[f"case{n}.expected_final_latents"], h, w)
    torch.testing.assert_close(x, want, atol=2e-4, rtol=2e-4)

    if n == 1:
        return  # the VAE is checked on cases 0 and 2 (decoding is the slow part on a busy CPU)
    img = LensNodesVAEDecode().decode(samples=out, vae=load_vae(), tile="auto")[0]
    assert img.shape == (B, H, W, 3) and img.dtype == torch.float32
    torch.testing.assert_close(img, cases[f"case{n}.expected_image"], atol=2e-4, rtol=0)


# -------------------------------------------------------------------------------------------
# node output == the Python API with the same inputs
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule,layout,cfg,mu", [
    ("upstream", "upstream", 1.0, 0.0),
    ("comfyui", "comfy", 3.0, 0.0),
    ("upstream", "upstream", 2.0, 1.7),
])
def test_sampler_equals_python_api(models, cases, schedule, layout, cfg, mu):
    import lens_model as lm
    import lens_model.sampling  # noqa: F401

    handle = load_dit()
    pos = cond_from(cases, 1)
    neg = cond_from(cases, 1, "negative_prompt")
    out = run_sampler(handle, pos, negative=neg, seed=123, steps=3, cfg=cfg, schedule=schedule,
                      noise_layout=layout, width=48, height=32, mu=mu)["samples"]

    model = lm.load_transformer(GOLDEN / "transformer")
    noise = lm.make_noise(123, 1, 2, 3, layout=layout)
    m = mu if mu else None
    sig = lm.lens_sigmas(32, 48, 3, mu=m) if schedule == "upstream" else lm.comfyui_sigmas(32, 48, 3, mu=m)
    ctx, mask = pos[0][0], pos[0][1]["attention_mask"].bool()
    nctx, nmask = neg[0][0], neg[0][1]["attention_mask"].bool()
    want = lm.sample(model, noise, sig, ctx, mask, negative_context=nctx, negative_mask=nmask,
                     guidance_scale=cfg)
    assert torch.equal(out, want)


def test_img2img_equals_python_api(models, cases):
    import lens_model as lm
    import lens_model.sampling  # noqa: F401
    from nodes import LensNodesVAEEncode

    torch.manual_seed(0)
    image = torch.rand(1, 40, 56, 3)  # not multiples of 16: center-cropped to 32x48
    vae = load_vae()
    latent = LensNodesVAEEncode().encode(pixels=image, vae=vae)[0]
    assert latent["samples"].shape == (1, 128, 2, 3)
    out = run_sampler(load_dit(), cond_from(cases, 0), latent=latent, seed=7, steps=4,
                      denoise=0.6)["samples"]

    ref_vae = lm.load_vae(GOLDEN / "vae", dtype=torch.float32)
    z = ref_vae.encode(image[:, 4:36, 4:52, :])
    torch.testing.assert_close(latent["samples"], z, atol=0, rtol=0)
    sig = lm.img2img_sigmas(32, 48, 4, 0.6)
    assert sig.shape == (5,) and float(sig[0]) < 1.0
    x = lm.sampling.noise_image_latents(lm.make_noise(7, 1, 2, 3), z, sig[0])
    ctx = cond_from(cases, 0)[0][0]
    mask = cond_from(cases, 0)[0][1]["attention_mask"].bool()
    want = lm.sample(lm.load_transformer(GOLDEN / "transformer"), x, sig, ctx, mask)
    assert torch.equal(out, want)


def test_denoise_below_one_on_empty_latent_runs_full_schedule(models, cases, caplog):
    handle = load_dit()
    pos = cond_from(cases, 0)
    full = run_sampler(handle, pos, seed=3, width=32, height=32)["samples"]
    with caplog.at_level(logging.WARNING):
        part = run_sampler(handle, pos, seed=3, width=32, height=32, denoise=0.5)["samples"]
    assert torch.equal(full, part)
    assert "needs an image latent" in caplog.text


# -------------------------------------------------------------------------------------------
# latents from core
# -------------------------------------------------------------------------------------------

def test_core_empty_latent_image_is_converted(models, cases):
    from nodes import LensNodesEmptyLatent

    handle = load_dit()
    pos = cond_from(cases, 0)
    # core EmptyLatentImage at 72x104 px: 4 channels at 1/8 -> 9x13 -> round(4.5)=4, round(6.5)=6
    core = {"samples": torch.zeros(2, 4, 9, 13), "downscale_ratio_spacial": 8}
    out = run_sampler(handle, pos, latent=core, seed=5)["samples"]
    assert out.shape == (2, 128, 4, 6)
    ours = LensNodesEmptyLatent().generate(width=96, height=64, batch_size=2)[0]
    assert torch.equal(out, run_sampler(handle, pos, latent=ours, seed=5)["samples"])
    # core EmptyFlux2LatentImage: already 128 channels, zeros
    flux2 = {"samples": torch.zeros(2, 128, 4, 6)}
    assert torch.equal(out, run_sampler(handle, pos, latent=flux2, seed=5)["samples"])


def test_non_empty_foreign_latent_is_rejected(models, cases):
    with pytest.raises(ValueError, match="4 channels and is not empty"):
        run_sampler(load_dit(), cond_from(cases, 0), latent={"samples": torch.ones(1, 4, 8, 8)})
    from nodes import LensNodesVAEDecode

    with pytest.raises(ValueError, match="128"):
        LensNodesVAEDecode().decode(samples={"samples": torch.zeros(1, 4, 8, 8)}, vae=load_vae())


def test_latent_without_samples_names_what_it_got(comfy_env):
    from nodes.sampler import prepare_latent

    with pytest.raises(ValueError, match=r"got \['noise_mask'\].*Empty Latent"):
        prepare_latent({"noise_mask": torch.ones(1, 8, 8)}, 64, 64)
    with pytest.raises(ValueError, match="got Tensor"):
        prepare_latent(torch.zeros(1, 128, 4, 4), 64, 64)


def test_our_latent_decodes_like_core_layout(models, cases):
    """Our LATENT is plain Flux2 layout: fp32, CPU, [B, 128, h, w], only 'samples'."""
    out = run_sampler(load_dit(), cond_from(cases, 0), width=48, height=32)
    assert set(out) == {"samples"}
    assert out["samples"].shape == (1, 128, 2, 3)


# -------------------------------------------------------------------------------------------
# conditioning handling
# -------------------------------------------------------------------------------------------

def test_multiple_conditioning_entries_use_the_first(models, cases, caplog):
    handle = load_dit()
    a, b = cond_from(cases, 0), cond_from(cases, 1)
    with caplog.at_level(logging.WARNING):
        both = run_sampler(handle, a + b, seed=1, width=32, height=32)["samples"]
    assert "uses only the first" in caplog.text
    assert torch.equal(both, run_sampler(handle, a, seed=1, width=32, height=32)["samples"])


def test_wrong_feature_width_is_rejected(models):
    bad = [[torch.zeros(1, 3, 4 * 4096), {"pooled_output": None,
                                          "attention_mask": torch.ones(1, 3, dtype=torch.int64)}]]
    with pytest.raises(ValueError, match="expects 4×32"):
        run_sampler(load_dit(), bad, width=32, height=32)


def test_core_conditioning_without_mask_or_float16(models, cases):
    """Core's TE may give fp16 features; a missing mask means all tokens are real."""
    handle = load_dit()
    c = cond_from(cases, 0)
    plain = [[c[0][0].half(), {"pooled_output": None, "num_layers_stacked": 4}]]
    ref = [[c[0][0].half().float(), {"attention_mask": torch.ones(1, 5, dtype=torch.int64)}]]
    assert torch.equal(run_sampler(handle, plain, width=32, height=32)["samples"],
                       run_sampler(handle, ref, width=32, height=32)["samples"])


def test_size_must_be_multiple_of_16(models, cases):
    with pytest.raises(ValueError, match="width 40 is not a multiple of 16"):
        run_sampler(load_dit(), cond_from(cases, 0), width=40, height=32)


# -------------------------------------------------------------------------------------------
# progress, interrupt, errors
# -------------------------------------------------------------------------------------------

def test_progress_reported_every_step(models, cases):
    run_sampler(load_dit(), cond_from(cases, 0), steps=4, width=32, height=32)
    steps = [(v, t) for (_, kind, v, t, _) in models.progress if kind == "abs"]
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(p is None for (*_, p) in models.progress)  # no previews by default


def test_default_preview_method_none_sends_no_previews(models, cases):
    # core's get_previewer answers None for preview method "none": asked once, nothing decoded
    run_sampler(load_dit(), cond_from(cases, 0), steps=3, width=32, height=32)
    assert len(models.previewer_requests) == 1 and models.previews == []
    assert [p for (*_, p) in models.progress] == [None, None, None]


def test_previews_every_step_are_x0_in_flux2_format(models, cases):
    import sys

    import lens_model as lm
    from comfy_stubs import FakePreviewImage
    from nodes import LensNodesEmptyLatent

    models.preview_method = "latent2rgb"
    pos = cond_from(cases, 0)
    latent = LensNodesEmptyLatent().generate(width=48, height=32, batch_size=2)[0]
    handle = load_dit()
    out = run_sampler(handle, pos, latent=latent, seed=9, steps=4)["samples"]

    # one previewer per run, for core's Flux2 latent format on the sampling device
    assert len(models.previewer_requests) == 1
    device, fmt = models.previewer_requests[0]
    assert torch.device(device).type == "cpu"
    assert isinstance(fmt, sys.modules["comfy.latent_formats"].Flux2)
    # one preview per step, each handed to the progress bar with its step
    sent = [(v, t, p) for (_, kind, v, t, p) in models.progress if kind == "abs"]
    assert [(v, t) for v, t, _ in sent] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(p == ("JPEG", FakePreviewImage((2, 128, 2, 3)), 512) for *_, p in sent)
    assert len(models.previews) == 4
    assert all(f == "JPEG" and x0.shape == (2, 128, 2, 3) for f, x0 in models.previews)
    # before the first step, after every step and before every module of every DiT block
    assert models.interrupt_checks > 5 * len(handle.for_compute().transformer_blocks)

    # the same x0 as lens_model.sample's callback gives, and the final latent is unchanged
    model = lm.load_transformer(GOLDEN / "transformer")
    noise = lm.make_noise(9, 2, 2, 3)
    sig = lm.lens_sigmas(32, 48, 4)
    ctx, mask = pos[0][0], pos[0][1]["attention_mask"].bool()
    seen = []
    want = lm.sample(model, noise, sig, ctx, mask,
                     callback=lambda k, n, x, d: seen.append((x.clone(), d.clone())))
    assert torch.equal(out, want)
    for (_, x0), (_, d) in zip(models.previews, seen):
        assert torch.equal(x0, d)
    # and x0 = x_k - sigma_k * v(x_k), recomputed with the DiT from the latents before each step
    xs = [noise] + [x for x, _ in seen[:-1]]
    c2, m2 = ctx.expand(2, -1, -1), mask.expand(2, -1)
    for k, ((_, x0), x_k) in enumerate(zip(models.previews, xs)):
        s_k = float(sig[k])
        with torch.no_grad():
            v = model(x_k, torch.full((2,), s_k), c2, m2).float()
        torch.testing.assert_close(x0, x_k - s_k * v, atol=1e-5, rtol=1e-5)
    assert not torch.equal(models.previews[0][1], models.previews[-1][1])


@pytest.mark.parametrize("missing", ["latent_preview", "Flux2"])
def test_no_previews_without_core_preview_machinery(models, cases, monkeypatch, caplog, missing):
    import sys

    import nodes.comfy_adapter as adapter

    if missing == "latent_preview":
        monkeypatch.delitem(sys.modules, "latent_preview")
    else:  # an older ComfyUI without the Flux2 latent format
        monkeypatch.delattr(sys.modules["comfy.latent_formats"], "Flux2")
    monkeypatch.setattr(adapter, "_preview_note_logged", False)
    models.preview_method = "latent2rgb"
    handle = load_dit()
    pos = cond_from(cases, 0)
    with caplog.at_level(logging.DEBUG, logger="nodes.comfy_adapter"):
        a = run_sampler(handle, pos, steps=2, width=32, height=32)["samples"]
        b = run_sampler(handle, pos, steps=2, width=32, height=32)["samples"]
    assert torch.equal(a, b)
    assert models.previews == [] and all(p is None for (*_, p) in models.progress)
    notes = [r for r in caplog.records if "no latent previews" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.DEBUG  # once per process


def test_failing_preview_is_dropped_and_sampling_goes_on(models, cases, caplog):
    handle = load_dit()
    pos = cond_from(cases, 0)
    clean = run_sampler(handle, pos, steps=3, width=32, height=32)["samples"]
    models.preview_method = "taesd"
    models.preview_error = RuntimeError("bad taef2 file")
    models.progress.clear()
    with caplog.at_level(logging.WARNING):
        out = run_sampler(handle, pos, steps=3, width=32, height=32)["samples"]
    assert torch.equal(out, clean)
    assert [p for (*_, p) in models.progress] == [None, None, None]
    assert caplog.text.count("latent preview failed") == 1 and "bad taef2 file" in caplog.text
    # an interrupt (BaseException) raised while previewing is not swallowed
    models.preview_error = InterruptProcessingException()
    with pytest.raises(InterruptProcessingException):
        run_sampler(handle, pos, steps=3, width=32, height=32)


def test_interrupt_mid_sampling_raises_and_rerun_is_identical(models, cases):
    handle = load_dit()
    pos = cond_from(cases, 1)
    neg = cond_from(cases, 1, "negative_prompt")
    kw = dict(negative=neg, seed=11, steps=4, cfg=4.0, width=80, height=48)
    clean = run_sampler(handle, pos, **kw)["samples"]
    checks_per_run = models.interrupt_checks
    assert checks_per_run >= 5  # before the first step and after every step
    models.interrupt_at(3)
    with pytest.raises(InterruptProcessingException):
        run_sampler(handle, pos, **kw)
    again = run_sampler(handle, pos, **kw)["samples"]
    assert torch.equal(clean, again)


@pytest.mark.parametrize("field,bad", [
    ("cfg", float("nan")), ("cfg", float("inf")), ("mu", float("nan")), ("mu", float("-inf")),
    ("denoise", float("nan")), ("steps", 100000),
])
def test_sampler_rejects_non_finite_options_before_work(models, cases, field, bad):
    handle = load_dit()
    with pytest.raises(ValueError, match=rf"{field} must be (a finite number|an integer from 1 to 200), "
                                         rf"got {bad!r}"):
        run_sampler(handle, cond_from(cases, 0), width=32, height=32, **{field: bad})
    assert models.bars == []  # rejected before any progress bar (or model) started


class _NaNFromStep:
    """Wraps the DiT: from model call ``k`` on, the output is NaN (a stand-in for fp16 overflow)."""

    def __init__(self, inner, k):
        self.inner, self.k, self.calls = inner, k, 0
        self.dtype, self.device = inner.dtype, inner.device
        self.resolved_compute_dtype = getattr(inner, "resolved_compute_dtype", None)

    def __call__(self, *args):
        out = self.inner(*args)
        self.calls += 1
        return out * float("nan") if self.calls > self.k else out


def test_sampler_non_finite_model_output_is_a_clear_node_error(models, cases, monkeypatch):
    import lens_model.sampling as sampling

    handle = load_dit()
    real = handle.for_compute
    monkeypatch.setattr(handle, "for_compute", lambda *a, **k: _NaNFromStep(real(*a, **k), 1))
    with pytest.raises(sampling.NonFiniteError,
                       match=r"^MMDiT Sampler: the DiT returned NaN .* step 2 of 4.*fp16.*"
                             r"weight_dtype") as err:
        run_sampler(handle, cond_from(cases, 0), width=32, height=32)
    assert err.value.step == 2
    # progress went to step 1 only: no NaN latent reached a preview or the output
    assert [v for (_, kind, v, _, _) in models.progress if kind == "abs"] == [1]
    monkeypatch.setattr(handle, "for_compute", real)  # (undo() would also remove the comfy stubs)
    assert torch.isfinite(run_sampler(handle, cond_from(cases, 0), width=32, height=32)["samples"]).all()


def test_cancel_is_checked_inside_a_dit_step_and_hooks_are_removed(models, cases):
    handle = load_dit()
    pos = cond_from(cases, 0)
    clean = run_sampler(handle, pos, seed=2, width=32, height=32)["samples"]
    blocks = handle.for_compute().transformer_blocks
    assert models.interrupt_checks > 4 * len(blocks)  # several checks per block per step
    models.progress.clear()
    models.interrupt_at(3)
    with pytest.raises(InterruptProcessingException):
        run_sampler(handle, pos, seed=2, width=32, height=32)
    assert _abs_progress(models) == []  # stopped inside the first step
    assert all(not m._forward_pre_hooks for b in blocks for m in b.modules())
    assert torch.equal(run_sampler(handle, pos, seed=2, width=32, height=32)["samples"], clean)


def test_interrupt_is_not_swallowed_by_except_exception(models, cases):
    assert not issubclass(InterruptProcessingException, Exception)
    models.interrupted = True
    with pytest.raises(InterruptProcessingException):
        run_sampler(load_dit(), cond_from(cases, 0), width=32, height=32)


def test_dit_loader_bad_file_then_good_file(models):
    from nodes import LensNodesDiTLoader

    dm = models.folder("diffusion_models")
    (dm / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    os.symlink(GOLDEN / "vae" / "diffusion_pytorch_model.safetensors", dm / "a_vae.safetensors")
    loader = LensNodesDiTLoader()
    with pytest.raises((ValueError, RuntimeError)) as e:
        loader.load(model_name="broken.safetensors")
    assert "broken.safetensors" in str(e.value)
    with pytest.raises(ValueError) as e:
        loader.load(model_name="a_vae.safetensors")
    assert "a_vae.safetensors" in str(e.value) and "VAE" in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        loader.load(model_name="missing.safetensors")
    handle = loader.load(model_name=DIT)[0]
    assert handle.model.config.enc_hidden_dim == 32


def test_vae_loader_bad_file_then_good_file(models):
    from nodes import LensNodesVAELoader

    os.symlink(GOLDEN / "transformer" / "diffusion_pytorch_model.safetensors",
               models.folder("vae") / "dit.safetensors")
    with pytest.raises(ValueError, match="dit.safetensors"):
        LensNodesVAELoader().load(vae_name="dit.safetensors")
    assert load_vae().vae is not None


def test_dit_loader_options(models, cases):
    handle = load_dit(weight_dtype="bf16")
    assert next(handle.model.parameters()).dtype == torch.bfloat16
    out = run_sampler(handle, cond_from(cases, 0), steps=1, width=32, height=32)["samples"]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    fp8 = load_dit(weight_dtype="fp8")
    out8 = run_sampler(fp8, cond_from(cases, 0), steps=1, width=32, height=32)["samples"]
    assert torch.isfinite(out8).all()
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        load_dit(device="gpu")
    comfy_eps = load_dit(qk_norm_eps="comfyui")
    assert comfy_eps.model.config.qk_norm_eps == 1e-5
    assert handle.model.config.qk_norm_eps == 1e-6


# -------------------------------------------------------------------------------------------
# resolution and empty latent
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base,ratio,want", [
    ("1024", "1:1", (1024, 1024)),
    ("1024", "16:9", (1376, 768)),
    ("1440", "1:1", (1440, 1440)),
    ("1440", "1:2", (1040, 2080)),
    ("1248x1664", "16:9", (1248, 1664)),
    ("1664x1248", "1:1", (1664, 1248)),
])
def test_resolution_presets(comfy_env, base, ratio, want):
    from nodes import LensNodesResolution

    assert LensNodesResolution().resolve(base=base, ratio=ratio, width=64, height=64) == want


def test_resolution_custom_and_jump_warning(comfy_env, caplog):
    from nodes import LensNodesResolution

    node = LensNodesResolution()
    with caplog.at_level(logging.WARNING):
        assert node.resolve(base="custom", ratio="1:1", width=1040, height=1040) == (1040, 1040)
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING):
        assert node.resolve(base="custom", ratio="1:1", width=1088, height=1088) == (1088, 1088)
    assert "4300" in caplog.text
    with pytest.raises(ValueError, match="multiple of 16"):
        node.resolve(base="custom", ratio="1:1", width=1000, height=1024)
    with pytest.raises(ValueError, match="2080"):
        node.resolve(base="custom", ratio="1:1", width=2096, height=1024)


def test_empty_latent(comfy_env):
    from nodes import LensNodesEmptyLatent

    out = LensNodesEmptyLatent().generate(width=1440, height=1024, batch_size=3)[0]
    assert set(out) == {"samples", "downscale_ratio_spacial"}
    assert out["downscale_ratio_spacial"] == 16  # as core's EmptyFlux2LatentImage marks it
    s = out["samples"]
    assert s.shape == (3, 128, 64, 90) and s.dtype == torch.float32 and not s.any()


def test_out_of_memory_gives_actionable_error(models, cases, monkeypatch):
    """An OOM stays an OOM (core's handler recognises it and unloads its models), with our advice
    in the message; every model, our DiT included, is unloaded through core first."""
    import comfy.model_management as mm
    import lens_model.sampling as sampling

    original = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def boom(*args, **kwargs):
        raise original

    monkeypatch.setattr(sampling, "sample", boom)
    handle = load_dit()
    caches = models.empty_cache_calls
    with pytest.raises(torch.cuda.OutOfMemoryError, match="weight_dtype 'fp8'") as e:
        run_sampler(handle, cond_from(cases, 0), width=32, height=32, cfg=2.0)
    assert "32x32" in str(e.value) and "two passes" in str(e.value) and "2.00 GiB" in str(e.value)
    assert e.value.__cause__ is original
    assert models.unloads == 1 and models.empty_cache_calls > caches
    assert mm.current_loaded_models == [] and ("detach", "LensDiT", torch.device("cpu")) in models.events


def test_vae_out_of_memory_suggests_tiles(models, monkeypatch):
    from nodes import LensNodesVAEDecode, LensNodesVAEEncode

    vae = load_vae()

    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(type(vae.vae), "decode", boom)
    monkeypatch.setattr(type(vae.vae), "encode", boom)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="tile to 'on'"):
        LensNodesVAEDecode().decode(samples={"samples": torch.zeros(1, 128, 2, 2)}, vae=vae, tile="off")
    with pytest.raises(torch.cuda.OutOfMemoryError, match="tile to 'on'"):
        LensNodesVAEEncode().encode(pixels=torch.zeros(1, 32, 32, 3), vae=vae, tile="off")
    assert models.unloads == 2


def test_denoise_zero_returns_the_latent(models, cases):
    from nodes import LensNodesVAEEncode

    torch.manual_seed(1)
    latent = LensNodesVAEEncode().encode(pixels=torch.rand(1, 32, 48, 3), vae=load_vae())[0]
    checks, bars = models.interrupt_checks, len(models.bars)
    out = run_sampler(load_dit(), cond_from(cases, 0), latent=latent, denoise=0.0)["samples"]
    assert torch.equal(out, latent["samples"])
    assert models.interrupt_checks == checks and len(models.bars) == bars  # the DiT never ran
    with pytest.raises(ValueError, match="denoise"):
        run_sampler(load_dit(), cond_from(cases, 0), latent=latent, denoise=-0.1)


def test_failed_move_to_gpu_leaves_the_model_in_ram(comfy_env):
    """A DiT move that runs out of memory is rolled back to host RAM by core (the patcher detaches
    it), so nothing is left split; core was asked to make room first."""
    from nodes import comfy_adapter
    from nodes.handles import DiTHandle

    class Boom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.moves = []

        def _apply(self, fn, recurse=True):
            device = fn(torch.zeros(0)).device
            self.moves.append(device.type)
            if device.type == "meta":  # stands for a GPU that runs out of memory
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return self

    patcher = comfy_adapter.wrap_model(Boom(), "dit", torch.device("meta"))
    handle = DiTHandle(patcher, "x.safetensors", "id", "bf16", False)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        handle.for_compute()
    assert handle.model.moves == ["meta", "cpu"]
    assert comfy_env.freed and str(comfy_env.freed[-1][1]) == "meta"  # core asked to make room
    import comfy.model_management as mm

    assert mm.current_loaded_models == []


# -------------------------------------------------------------------------------------------
# VAE progress / interrupt, encode tiling
# -------------------------------------------------------------------------------------------

def _abs_progress(env):
    return [(v, t) for (_, kind, v, t, _) in env.progress if kind == "abs"]


def test_vae_decode_progress_and_interrupt_per_block(models):
    from nodes import LensNodesVAEDecode

    z = {"samples": torch.randn(2, 128, 2, 3, generator=torch.Generator().manual_seed(0))}
    vae = load_vae()
    per_image = lm_vae().decoder.num_blocks
    assert per_image > 3
    images = LensNodesVAEDecode().decode(samples=z, vae=vae, tile="auto")[0]
    assert _abs_progress(models) == [(i, 2 * per_image) for i in range(1, 2 * per_image + 1)]
    want = lm_vae().decode(z["samples"])
    assert torch.equal(images, want)
    models.progress.clear()
    models.interrupt_at(3)  # one check before the work, then after every decoder block
    with pytest.raises(InterruptProcessingException):
        LensNodesVAEDecode().decode(samples=z, vae=vae, tile="auto")
    assert len(_abs_progress(models)) == 2 < per_image  # stopped inside the first image
    assert torch.equal(LensNodesVAEDecode().decode(samples=z, vae=vae, tile="auto")[0], want)


def test_vae_encode_tile_option_progress_and_interrupt(models):
    from nodes import LensNodesVAEEncode

    torch.manual_seed(2)
    pixels = torch.rand(2, 32, 48, 3)
    vae = load_vae()
    node = LensNodesVAEEncode()
    per_image = lm_vae().encoder.num_blocks
    out = node.encode(pixels=pixels, vae=vae)[0]["samples"]  # tile defaults to "auto"
    assert _abs_progress(models)[-1] == (2 * per_image, 2 * per_image)
    assert torch.equal(out, lm_vae().encode(pixels))
    # a small image is one tile, so "on" is exact here
    assert torch.equal(node.encode(pixels=pixels, vae=vae, tile="on")[0]["samples"], out)
    assert torch.equal(node.encode(pixels=pixels, vae=vae, tile="off")[0]["samples"], out)
    with pytest.raises(ValueError, match="tile must be"):
        node.encode(pixels=pixels, vae=vae, tile="yes")
    models.progress.clear()
    models.interrupt_at(3)
    with pytest.raises(InterruptProcessingException):
        node.encode(pixels=pixels, vae=vae)
    assert len(_abs_progress(models)) == 2 < per_image  # stopped inside the first image


def test_vae_tile_size_is_a_visible_choice_and_auto_tiles_on_the_cpu(models):
    from nodes import LensNodesVAEDecode, LensNodesVAEEncode

    dec, enc = LensNodesVAEDecode(), LensNodesVAEEncode()
    for node in (dec, enc):
        opt = type(node).INPUT_TYPES()["optional"]["tile_size"][1]
        assert opt["default"] == 256 and opt["min"] <= 256 <= opt["max"]
    z = torch.randn(1, 128, 10, 12, generator=torch.Generator().manual_seed(5))  # 160x192 px
    ref = lm_vae()
    # 128-px tiles = 8 cells with a quarter (2 cells) of overlap
    tiled = ref.decode(z, tile=True, tile_size=8, overlap=2)
    untiled = ref.decode(z, tile=False)
    assert not torch.equal(tiled, untiled)
    vae = load_vae()
    assert torch.equal(dec.decode(samples={"samples": z}, vae=vae, tile="on", tile_size=128)[0], tiled)
    # the CPU tiles under "auto" (a whole image would be one uncancellable pass)
    assert torch.equal(dec.decode(samples={"samples": z}, vae=vae, tile="auto", tile_size=128)[0], tiled)
    assert torch.equal(dec.decode(samples={"samples": z}, vae=vae, tile="off", tile_size=128)[0], untiled)
    # the default 256 px (16 cells) holds this latent in one tile
    assert torch.equal(dec.decode(samples={"samples": z}, vae=vae)[0], untiled)
    pixels = untiled[:, :96, :128]
    want = ref.encode(pixels, tile=True, tile_size=8, overlap=2)
    assert torch.equal(enc.encode(pixels=pixels, vae=vae, tile_size=128)[0]["samples"], want)
    for bad in (100, 64, 8192, 130.0):
        with pytest.raises(ValueError, match="tile_size must be a multiple of 16"):
            dec.decode(samples={"samples": z}, vae=vae, tile_size=bad)
        with pytest.raises(ValueError, match="tile_size must be a multiple of 16"):
            enc.encode(pixels=pixels, vae=vae, tile_size=bad)


def test_vae_nodes_refuse_non_finite_inputs(models):
    from nodes import LensNodesVAEDecode, LensNodesVAEEncode

    z = torch.zeros(1, 128, 2, 2)
    z[0, 5, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="latent contains NaN or Inf"):
        LensNodesVAEDecode().decode(samples={"samples": z}, vae=load_vae())
    pixels = torch.full((1, 32, 32, 3), float("inf"))
    with pytest.raises(ValueError, match="image contains NaN or Inf"):
        LensNodesVAEEncode().encode(pixels=pixels, vae=load_vae())
    assert models.bars == []


def lm_vae():
    import lens_model as lm

    return lm.load_vae(GOLDEN / "vae", dtype=torch.float32)


# -------------------------------------------------------------------------------------------
# one model per loader node; pre-Ampere dtypes
# -------------------------------------------------------------------------------------------

def test_a_dropped_loader_output_frees_its_model(models, cases):
    """The model lives as long as ComfyUI keeps the loader's output: core's list of loaded models
    holds weak references only, so a replaced output frees its weights; a kept old output still
    runs (ComfyUI's cache may hand it out again)."""
    import gc
    import weakref

    from nodes import LensNodesDiTLoader, LensNodesVAELoader

    loader = LensNodesDiTLoader()
    first = loader.load(model_name=DIT)[0]
    pos = cond_from(cases, 0)
    want = run_sampler(first, pos, width=32, height=32)["samples"]
    second = loader.load(model_name=DIT, qk_norm_eps="comfyui")[0]
    run_sampler(second, pos, width=32, height=32)
    assert torch.equal(run_sampler(first, pos, width=32, height=32)["samples"], want)
    weights = weakref.ref(first.model)
    vae = weakref.ref(LensNodesVAELoader().load(vae_name=VAE)[0].vae)
    del first
    gc.collect()
    assert weights() is None and vae() is None and second.model is not None


def test_pre_ampere_gpu_falls_back_to_fp32(models, monkeypatch):
    """On a GPU without fast bf16 (core's should_use_bf16 False: T4, V100, RTX 20xx, --force-fp32)
    the auto/default dtypes are fp32, never fp16; with bf16 they are bf16. Weights load to host RAM
    first, so no GPU is needed to check the choice."""
    import comfy.model_management as mm

    from nodes import LensNodesDiTLoader, LensNodesVAELoader

    cuda = torch.device("cuda", 0)
    for name in ("get_torch_device", "vae_device", "text_encoder_device"):
        monkeypatch.setattr(mm, name, lambda: cuda)
    for fast, want in ((False, torch.float32), (True, torch.bfloat16)):
        models.bf16 = fast
        dit = LensNodesDiTLoader().load(model_name=DIT, weight_dtype="default")[0]
        assert dit.patcher.load_device == cuda and next(dit.model.parameters()).dtype == want
        vae = LensNodesVAELoader().load(vae_name=VAE, dtype="auto")[0]
        assert vae.patcher.load_device == cuda and next(vae.vae.parameters()).dtype == want
    models.bf16 = False
    assert next(LensNodesVAELoader().load(vae_name=VAE, dtype="bf16")[0].vae.parameters()).dtype == torch.bfloat16


# -------------------------------------------------------------------------------------------
# core runs nodes on a worker thread inside torch.inference_mode()
# -------------------------------------------------------------------------------------------

def _in_worker_inference_mode(fn):
    import threading

    box = {}

    def worker():
        try:
            with torch.inference_mode():
                box["out"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["out"]


def test_nodes_in_inference_mode_on_a_worker_thread(models, cases):
    """Loaders, VAE Encode, Sampler (img2img and t2i) and VAE Decode as core runs them, twice with
    the same handles (cached outputs are reused across runs); equal to a plain main-thread run."""
    from nodes import LensNodesDiTLoader, LensNodesEmptyLatent, LensNodesVAEDecode, LensNodesVAEEncode, LensNodesVAELoader

    torch.manual_seed(3)
    image = torch.rand(1, 32, 48, 3)
    pos = cond_from(cases, 0)
    state = {}

    def run():
        if "dit" not in state:
            state["dit"] = LensNodesDiTLoader().load(model_name=DIT)[0]
            state["vae"] = LensNodesVAELoader().load(vae_name=VAE)[0]
        dit, vae = state["dit"], state["vae"]
        latent = LensNodesVAEEncode().encode(pixels=image, vae=vae)[0]
        a = run_sampler(dit, pos, latent=latent, denoise=0.6, seed=2)
        empty = LensNodesEmptyLatent().generate(width=48, height=32, batch_size=1)[0]
        b = run_sampler(dit, pos, latent=empty, seed=2)
        return [LensNodesVAEDecode().decode(samples=x, vae=vae)[0] for x in (a, b)] + [latent["samples"]]

    first = _in_worker_inference_mode(run)
    second = _in_worker_inference_mode(run)
    state.clear()
    plain = run()
    for x, y, z in zip(first, second, plain):
        assert torch.equal(x, z) and torch.equal(y, z)
