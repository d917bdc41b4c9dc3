"""Tests for lens_model/vae.py, vae_loading.py and vae_tiling.py.

Reference values come from the golden fixtures (upstream Lens pipeline) and from diffusers'
``AutoencoderKLFlux2`` (test-only dependency); layout conversions used to build test files are
written here from the spec table, independently of the code under test.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from lens_model.vae import AttnBlock, Flux2VAE, Flux2VAEConfig, patchify, unpatchify
from lens_model.vae_tiling import Progress, Tiling, blend_weights, tile_starts, tiling_from_pixels
from lens_model.vae_loading import (
    bfl_to_diffusers,
    detect_vae_layout,
    load_vae,
    to_bfl,
    to_bfl_key,
    to_diffusers_key,
    vae_from_state_dict,
)

from conftest import GOLDEN

GOLDEN_VAE = GOLDEN / "vae"


# ------------------------------------------------------------------------------------------------
# helpers written from the published layouts (diffusers / BFL key names, 2x2 patchify, BN), independent of lens_model.vae
# ------------------------------------------------------------------------------------------------

_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def spec_bfl_name(dkey: str, levels: int) -> str:
    """diffusers key -> BFL key, written out part by part from the two layouts."""
    parts = dkey.split(".")
    if parts[0] == "quant_conv":
        return "encoder." + dkey
    if parts[0] == "post_quant_conv":
        return "decoder." + dkey
    if parts[0] == "bn":
        return dkey
    side, rest = parts[0], parts[1:]
    if rest[0] == "down_blocks":
        if rest[2] == "resnets":
            new = ["down", rest[1], "block", rest[3], *rest[4:]]
        else:
            assert rest[2:4] == ["downsamplers", "0"]
            new = ["down", rest[1], "downsample", *rest[4:]]
    elif rest[0] == "up_blocks":
        i = str(levels - 1 - int(rest[1]))
        if rest[2] == "resnets":
            new = ["up", i, "block", rest[3], *rest[4:]]
        else:
            assert rest[2:4] == ["upsamplers", "0"]
            new = ["up", i, "upsample", *rest[4:]]
    elif rest[0] == "mid_block":
        if rest[1] == "resnets":
            new = ["mid", f"block_{int(rest[2]) + 1}", *rest[3:]]
        else:
            assert rest[1:3] == ["attentions", "0"]
            name = rest[3]
            tail = rest[5:] if name == "to_out" else rest[4:]
            new = ["mid", "attn_1", _ATTN[name], *tail]
    else:
        new = rest
    new = [{"conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out"}.get(p, p) for p in new]
    return ".".join([side, *new])


def spec_to_bfl(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        nk = spec_bfl_name(k, levels)
        if ".mid.attn_1." in nk and nk.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[nk] = v.contiguous()
    return out


def spec_patchify(z: torch.Tensor) -> torch.Tensor:
    """[B, C, 2h, 2w] -> [B, 4C, h, w], channel 4c + 2a + d = z[:, c, 2i + a, 2j + d]."""
    b, c, hh, ww = z.shape
    cells = [z[:, :, a::2, d::2] for a in (0, 1) for d in (0, 1)]  # index 2a + d
    return torch.stack(cells, dim=2).reshape(b, 4 * c, hh // 2, ww // 2)


def spec_unpatchify(p: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = p.shape
    c = c4 // 4
    cells = p.reshape(b, c, 4, h, w)
    z = torch.empty(b, c, 2 * h, 2 * w, dtype=p.dtype)
    for a in (0, 1):
        for d in (0, 1):
            z[:, :, a::2, d::2] = cells[:, :, 2 * a + d]
    return z


def tokens_to_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    return tokens.view(b, h, w, 128).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def golden_vae() -> Flux2VAE:
    return load_vae(GOLDEN_VAE)


@pytest.fixture(scope="module")
def golden_sd() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN_VAE / "diffusion_pytorch_model.safetensors"))


# ------------------------------------------------------------------------------------------------
# golden
# ------------------------------------------------------------------------------------------------

_CASES = json.loads((GOLDEN / "pipeline_cases.json").read_text())


@pytest.mark.parametrize("case", _CASES, ids=lambda c: f"case{c['case']}")
def test_golden_decode(golden_vae, case):
    data = load_file(str(GOLDEN / "pipeline_cases.safetensors"))
    n = case["case"]
    h, w = case["height"] // 16, case["width"] // 16
    latents = tokens_to_latents(data[f"case{n}.expected_final_latents"], h, w)
    expected = data[f"case{n}.expected_image"]
    image = golden_vae.decode(latents)
    assert image.shape == (case["batch"], case["height"], case["width"], 3) == expected.shape
    assert image.dtype == torch.float32 and image.device.type == "cpu"
    torch.testing.assert_close(image, expected, atol=2e-4, rtol=0)


def test_golden_config(golden_vae, golden_sd):
    cfg = golden_vae.config
    assert cfg.block_out_channels == (32, 32, 32, 64)
    assert cfg.layers_per_block == 1 and cfg.latent_channels == 32 and cfg.norm_num_groups == 32
    assert cfg.batch_norm_eps == 1e-4 and cfg.patch_size == (2, 2)
    assert cfg.use_quant_conv and cfg.use_post_quant_conv and cfg.mid_block_add_attention
    # from_dict ignores unknown keys (force_upcast, sample_size, _class_name, ...)
    raw = json.loads((GOLDEN_VAE / "config.json").read_text())
    assert "force_upcast" in raw
    assert Flux2VAEConfig.from_dict(raw) == cfg
    # inference from shapes gives the same configuration
    shapes = {k: tuple(v.shape) for k, v in spec_to_bfl(golden_sd, 4).items()}
    assert Flux2VAEConfig.from_shapes(shapes) == cfg
    assert len(golden_vae.decoder.up[0].block) == 2 and len(golden_vae.encoder.down[0].block) == 1


# ------------------------------------------------------------------------------------------------
# key mapping
# ------------------------------------------------------------------------------------------------


def test_mapping_full_size_round_trip():
    with torch.device("meta"):
        ours = Flux2VAE(Flux2VAEConfig())
    bfl = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    bfl["bn.num_batches_tracked"] = ()
    assert len(bfl) == 251
    assert "encoder.quant_conv.weight" in bfl and "decoder.post_quant_conv.weight" in bfl
    assert bfl["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert sum(torch.Size(s).numel() for k, s in bfl.items() if not k.startswith("bn.")) == 84_046_115
    # shapes that tell the layout apart
    assert bfl["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert bfl["encoder.conv_out.weight"] == (64, 512, 3, 3)
    assert bfl["decoder.conv_in.weight"] == (512, 32, 3, 3)
    assert bfl["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert bfl["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert bfl["decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert bfl["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)

    diff = {to_diffusers_key(k, 4): k for k in bfl}
    assert len(diff) == 251  # injective
    for dk, bk in diff.items():
        assert to_bfl_key(dk, 4) == bk
        assert spec_bfl_name(dk, 4) == bk
    assert diff["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"] == "decoder.up.1.block.0.nin_shortcut.weight"
    assert diff["decoder.up_blocks.0.upsamplers.0.conv.weight"] == "decoder.up.3.upsample.conv.weight"
    assert diff["quant_conv.weight"] == "encoder.quant_conv.weight"
    assert diff["decoder.mid_block.attentions.0.to_out.0.weight"] == "decoder.mid.attn_1.proj_out.weight"

    meta = {k: torch.empty(s, device="meta") for k, s in bfl.items()}
    as_diff = bfl_to_diffusers(meta)
    assert as_diff["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)
    back = to_bfl(as_diff)
    assert {k: tuple(v.shape) for k, v in back.items()} == bfl

    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLFlux2()
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in as_diff.items()} == ref_shapes


def test_layout_detection():
    assert detect_vae_layout(["decoder.up_blocks.0.resnets.0.norm1.weight", "quant_conv.weight"]) == "diffusers"
    assert detect_vae_layout(["decoder.up.0.block.0.norm1.weight", "quant_conv.weight"]) == "ldm"
    assert detect_vae_layout(["decoder.up.0.block.0.norm1.weight", "encoder.quant_conv.weight"]) == "bfl"


# ------------------------------------------------------------------------------------------------
# diffusers parity on a random tiny config, three layouts
# ------------------------------------------------------------------------------------------------

PARITY_CFG = dict(
    block_out_channels=(32, 64, 64),
    decoder_block_out_channels=(32, 32, 64),
    layers_per_block=2,
    latent_channels=32,
    norm_num_groups=32,
)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1234)
    ref = diffusers.AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, **PARITY_CFG
    ).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
        ref.bn.running_mean.normal_(0.0, 0.5)
        ref.bn.running_var.uniform_(0.1, 2.1)
    root = tmp_path_factory.mktemp("vae_parity")
    sd = {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}
    # (a) diffusers folder with config.json
    (root / "vae").mkdir()
    save_file(sd, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    (root / "vae" / "config.json").write_text(json.dumps(dict(ref.config)))
    # (b) BFL single file (nested quant convs, 4-D attention weights), no config: inferred
    bfl = spec_to_bfl(sd, 3)
    save_file(bfl, str(root / "bfl.safetensors"))
    # (c) LDM top-level quant convs, with ComfyUI's `first_stage_model.` prefix, without num_batches_tracked
    ldm = {}
    for k, v in bfl.items():
        if k == "bn.num_batches_tracked":
            continue
        k = k.replace("encoder.quant_conv.", "quant_conv.").replace("decoder.post_quant_conv.", "post_quant_conv.")
        ldm["first_stage_model." + k] = v
    save_file(ldm, str(root / "ldm.safetensors"))

    # diffusers reference: encode mean -> patchify -> BN normalise; de-norm -> unpatchify -> decode
    torch.manual_seed(7)
    images = torch.rand(2, 32, 48, 3)
    latents = torch.randn(2, 128, 4, 6)
    bn_mean = ref.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + 1e-4)
    with torch.no_grad():
        mean = ref.encode(images.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
        want_latents = (spec_patchify(mean) - bn_mean) / bn_std
        x = ref.decode(spec_unpatchify(latents * bn_std + bn_mean)).sample
        want_images = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    return root, images, want_latents, latents, want_images


@pytest.mark.parametrize("layout", ["vae", "bfl.safetensors", "ldm.safetensors"])
def test_diffusers_parity(parity, layout):
    root, images, want_latents, latents, want_images = parity
    vae = load_vae(root / layout)
    assert vae.config.block_out_channels == (32, 64, 64)
    assert vae.config.decoder_channels == (32, 32, 64)
    assert vae.downscale == 8
    got = vae.encode(images)
    assert got.shape == (2, 128, 4, 6)
    torch.testing.assert_close(got, want_latents, atol=1e-5, rtol=1e-5)
    got = vae.decode(latents)
    assert got.shape == (2, 32, 48, 3)
    torch.testing.assert_close(got, want_images, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# patchify, BN, shapes
# ------------------------------------------------------------------------------------------------


def test_patchify_rule_and_round_trip():
    z = torch.randn(2, 32, 6, 10)
    p = patchify(z)
    assert p.shape == (2, 128, 3, 5)
    b, c, a, d, i, j = torch.meshgrid(
        *(torch.arange(n) for n in (2, 32, 2, 2, 3, 5)), indexing="ij"
    )
    assert torch.equal(p[b, 4 * c + 2 * a + d, i, j], z[b, c, 2 * i + a, 2 * j + d])
    assert torch.equal(p[0, 0:4, 0, 0], torch.stack([z[0, 0, 0, 0], z[0, 0, 0, 1], z[0, 0, 1, 0], z[0, 0, 1, 1]]))
    assert torch.equal(unpatchify(p), z)
    assert torch.equal(patchify(unpatchify(p)), p)


def test_bn_round_trip_and_buffers_untouched(golden_vae):
    bn = golden_vae.bn
    before = (bn.running_mean.clone(), bn.running_var.clone())
    assert bn.running_mean.dtype == torch.float32
    zhat = torch.randn(2, 128, 3, 4)
    p = bn.denormalize(zhat)
    m, v = before[0].double().view(1, -1, 1, 1), before[1].double().view(1, -1, 1, 1)
    torch.testing.assert_close(p.double(), zhat.double() * torch.sqrt(v + 1e-4) + m, atol=1e-6, rtol=1e-6)
    assert (bn.normalize(p) - zhat).abs().max().item() <= 1e-6
    golden_vae.decode(zhat)
    golden_vae.encode(torch.rand(1, 32, 32, 3))
    golden_vae.train()  # even in train mode nothing updates the statistics
    golden_vae.decode(zhat)
    golden_vae.eval()
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])


def test_shapes(golden_vae):
    img = torch.rand(1, 64, 64, 3)
    with torch.no_grad():
        moments = golden_vae.encoder(img.permute(0, 3, 1, 2) * 2 - 1)
    assert moments.shape == (1, 64, 8, 8)
    lat = golden_vae.encode(img)
    assert lat.shape == (1, 128, 4, 4) and lat.dtype == torch.float32
    assert golden_vae.decode(lat).shape == (1, 64, 64, 3)
    lat2 = golden_vae.encode(torch.rand(2, 128, 96, 3))
    assert lat2.shape == (2, 128, 8, 6)
    out = golden_vae.decode(lat2)
    assert out.shape == (2, 128, 96, 3)
    assert 0.0 <= out.min().item() and out.max().item() <= 1.0


def test_encode_rejects_bad_size(golden_vae):
    with pytest.raises(ValueError, match="72x64"):
        golden_vae.encode(torch.rand(1, 64, 72, 3))


def test_missing_num_batches_tracked(golden_vae, golden_sd):
    sd = {k: v for k, v in golden_sd.items() if k != "bn.num_batches_tracked"}
    vae = vae_from_state_dict(sd, config=golden_vae.config)
    lat = torch.randn(1, 128, 2, 3)
    assert torch.equal(vae.decode(lat), golden_vae.decode(lat))


def test_strict_keys(golden_sd):
    sd = {k: v for k, v in golden_sd.items() if k != "decoder.up_blocks.1.resnets.0.conv2.bias"}
    with pytest.raises(ValueError, match=r"missing.*decoder\.up\.2\.block\.0\.conv2\.bias"):
        vae_from_state_dict(sd)
    sd = dict(golden_sd, **{"encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected.*encoder\.extra\.weight"):
        vae_from_state_dict(sd)


def test_attention_query_chunking(golden_vae, monkeypatch):
    lat = torch.randn(1, 128, 4, 3)
    whole = golden_vae.decode(lat)
    monkeypatch.setattr(AttnBlock, "score_budget_bytes", 4 * 48 * 5)  # N = 8 * 6 -> chunks of 5 queries
    chunked = golden_vae.decode(lat)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_dtypes(caplog, tmp_path, golden_sd):
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="VAE in fp16"):
        vae16 = load_vae(GOLDEN_VAE, dtype=torch.float16)
    assert vae16.dtype == torch.float32  # CPU: fp16 refused -> fp32
    assert "fp16" in caplog.text
    vae_bf = load_vae(GOLDEN_VAE, dtype=torch.bfloat16)
    assert vae_bf.dtype == torch.bfloat16 and vae_bf.bn.running_var.dtype == torch.float32
    ref = load_vae(GOLDEN_VAE)
    lat = torch.randn(1, 128, 2, 2)
    out = vae_bf.decode(lat)
    assert out.dtype == torch.float32
    assert (out - ref.decode(lat)).abs().mean().item() < 0.05
    # an fp16 file with dtype=None is promoted (fp32 on the CPU), bn stays fp32
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in golden_sd.items()}, str(tmp_path / "f16.safetensors"))
    with pytest.warns(UserWarning, match="stored in"):
        vae_f16_file = load_vae(tmp_path / "f16.safetensors")
    assert vae_f16_file.dtype == torch.float32 and vae_f16_file.bn.running_mean.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# tiling
# ------------------------------------------------------------------------------------------------


def _jumps(e: torch.Tensor) -> torch.Tensor:
    """Mean |e[r] - e[r-1]| per row boundary of an image batch [B, H, W, 3]."""
    return (e[:, 1:] - e[:, :-1]).abs().mean(dim=(0, 2, 3))


@pytest.fixture(scope="module")
def random_vae() -> Flux2VAE:
    """Default-initialised 2-level VAE (x4 per latent cell): small enough to tile 128 px images."""
    torch.manual_seed(0)
    vae = Flux2VAE(Flux2VAEConfig(block_out_channels=(32, 64), layers_per_block=1)).eval()
    vae.bn.running_mean.normal_(0.0, 0.5)
    vae.bn.running_var.uniform_(0.1, 2.1)
    assert vae.downscale == 4
    return vae


def test_tile_modes_without_tiling(random_vae):
    z = torch.randn(1, 128, 8, 6)
    full = random_vae.decode(z, tile=False)
    assert torch.equal(random_vae.decode(z, tile="auto"), full)  # CPU: "auto" never tiles
    assert torch.equal(random_vae.decode(z, tile=True, tile_size=8, overlap=2), full)  # fits one tile
    assert tile_starts(32, 16, 8) == [0, 8, 16]
    assert tile_starts(28, 16, 8) == [0, 8, 12]
    assert tile_starts(16, 16, 8) == [0]


def test_tiled_decode(random_vae):
    vae = random_vae
    z = torch.randn(1, 128, 32, 20, generator=torch.Generator().manual_seed(100))  # 128 x 80 px
    full = vae.decode(z, tile=False)
    tiled = vae.decode(z, tile=True, tile_size=16, overlap=8)  # 3 x 2 tiles (rows start 0, 8, 16; columns 0, 4)
    assert tiled.shape == full.shape == (1, 128, 80, 3)
    err = tiled - full
    assert 0 < err.abs().mean().item() < 2e-2
    # no seams: the error field is continuous across every tile edge (rows at 8, 16, 24 cells)
    jumps = _jumps(err)
    edges = [r * 4 * 8 for r in (1, 2, 3)]
    assert max(jumps[e - 1].item() for e in edges) < 2.0 * jumps.median().item()
    # ... a hard seam (no overlap blending) would be caught by the same measure
    hard = vae.decode(z, tile=True, tile_size=16, overlap=0) - full
    hj = _jumps(hard)
    assert hj[16 * 4 - 1].item() > 2.0 * hj.median().item()


def _smooth_image(h: int, w: int, seed: int) -> torch.Tensor:
    """A smooth random RGB image [1, h, w, 3] in [0, 1] (bilinear upsampling of coarse noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 8, w // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").permute(0, 2, 3, 1)


def _row_jumps(z: torch.Tensor) -> torch.Tensor:
    """Mean |z[:, :, r] - z[:, :, r-1]| per row boundary of a latent batch [B, C, h, w]."""
    return (z[:, :, 1:] - z[:, :, :-1]).abs().mean(dim=(0, 1, 3))


def test_tiled_encode(random_vae):
    vae = random_vae
    img = _smooth_image(128, 80, seed=1)  # 32 x 20 latent cells (x4 per cell)
    full = vae.encode(img)
    assert torch.equal(vae.encode(img, tile="auto"), full)  # CPU: "auto" never tiles
    assert torch.equal(vae.encode(img, tile=True, tile_size=32, overlap=8), full)  # fits one tile
    tiled = vae.encode(img, tile=True, tile_size=16, overlap=8)  # 3 x 2 tiles (rows 0, 8, 16; columns 0, 4)
    assert tiled.shape == full.shape == (1, 128, 32, 20) and tiled.dtype == torch.float32
    err = (tiled - full).abs().mean().item()
    assert 0 < err < 0.15 * full.abs().mean().item()
    # feathered: no step in the error field at the tile edges (rows 8, 16, 24) ...
    jumps = _row_jumps(tiled - full)
    assert max(jumps[r - 1].item() for r in (8, 16, 24)) < 1.5 * jumps.median().item()
    # ... where hard-edged tiles (rows 0, 16, no blending) show one
    hard = _row_jumps(vae.encode(img, tile=True, tile_size=16, overlap=0) - full)
    assert hard[16 - 1].item() > 1.5 * hard.median().item()
    with pytest.raises(ValueError, match="overlap"):
        vae.encode(img, tile=True, tile_size=4, overlap=4)
    with pytest.raises(ValueError, match="tile must be"):
        vae.encode(img, tile="yes")


def test_progress_callback_and_abort(random_vae):
    vae = random_vae
    z = torch.randn(2, 128, 8, 6, generator=torch.Generator().manual_seed(3))
    calls = []
    tiled = vae.decode(z, tile=True, tile_size=4, overlap=2, callback=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 12) for i in range(1, 13)]  # 2 samples x (3 x 2) tiles
    calls.clear()
    full = vae.decode(z, tile=False, callback=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)] and full.shape == tiled.shape == (2, 32, 24, 3)
    calls.clear()
    img = _smooth_image(32, 24, seed=4).expand(3, -1, -1, -1)
    lat = vae.encode(img, callback=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)] and lat.shape == (3, 128, 8, 6)
    calls.clear()
    vae.encode(img[:1], tile=True, tile_size=4, overlap=2, callback=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 6) for i in range(1, 7)]

    class Stop(Exception):
        pass

    def stop_at_3(done, total):
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        vae.decode(z, tile=True, tile_size=4, overlap=2, callback=stop_at_3)
    with pytest.raises(Stop):
        vae.encode(img, callback=stop_at_3)


def test_tile_arguments(golden_vae):
    lat = torch.randn(1, 128, 2, 2)
    with pytest.raises(ValueError, match="overlap"):
        golden_vae.decode(lat, tile=True, tile_size=4, overlap=4)
    with pytest.raises(ValueError, match="tile must be"):
        golden_vae.decode(lat, tile="yes")
    with pytest.raises(ValueError, match=r"\[B, 128, h, w\]"):
        golden_vae.decode(torch.randn(1, 32, 4, 4))


# ------------------------------------------------------------------------------------------------
# rejections
# ------------------------------------------------------------------------------------------------


def _foreign(golden_sd, z: int | None = None, conv_in_5d: bool = False, bn: bool = True) -> dict:
    sd = spec_to_bfl(golden_sd, 4)
    if not bn:
        sd = {k: v for k, v in sd.items() if not k.startswith("bn.")}
    if z is not None:
        sd["decoder.conv_in.weight"] = torch.zeros(64, z, 3, 3)
        sd["encoder.conv_out.weight"] = torch.zeros(2 * z, 64, 3, 3)
    if conv_in_5d:
        sd["decoder.conv_in.weight"] = torch.zeros(64, 32, 1, 3, 3)
    return sd


@pytest.mark.parametrize(
    "kind, kwargs, pattern",
    [
        ("flux1", dict(z=16, bn=False), r"FLUX\.1 VAE; Lens needs the FLUX\.2 VAE \(flux2-vae\.safetensors\)"),
        ("video", dict(conv_in_5d=True), r"5-D `decoder\.conv_in\.weight`.*video VAE"),
        ("sd", dict(z=4, bn=False), r"4-channel Stable Diffusion"),
    ],
)
def test_rejections(tmp_path, golden_sd, kind, kwargs, pattern):
    sd = _foreign(golden_sd, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        vae_from_state_dict(sd, name=kind)
    path = tmp_path / f"{kind}.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=pattern) as info:
        load_vae(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("folder", ["transformer", "text_encoder"])
def test_rejects_other_components(folder):
    with pytest.raises(ValueError, match="VAE"):
        load_vae(GOLDEN / folder)


def test_rejects_other_state_dicts():
    with pytest.raises(ValueError, match="diffusion model"):
        vae_from_state_dict({"transformer_blocks.0.attn.norm_added_q.weight": torch.zeros(4)})
    with pytest.raises(ValueError, match="text encoder"):
        vae_from_state_dict({"layers.0.self_attn.sinks": torch.zeros(4)})


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("direction", ["decode", "encode"])
def test_cuda_oom_retry_runs_after_failed_attempt_is_released(random_vae, monkeypatch, direction):
    """tile="auto" on CUDA: after an out-of-memory error the tiled retry must not run while the
    exception's traceback still holds the failed attempt's activations."""
    import weakref

    attempts: list[weakref.ref] = []
    released_at_retry: list[bool] = []
    f = random_vae.downscale

    def fake_pass(x, on_block=None):
        if not attempts:  # the untiled attempt
            activations = torch.empty(64)
            attempts.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("fake CUDA out of memory")
        released_at_retry.append(attempts[0]() is None)
        if direction == "decode":
            return torch.zeros(1, 3, x.shape[2] * f, x.shape[3] * f)
        return torch.zeros(1, 128, x.shape[1] // f, x.shape[2] // f)

    monkeypatch.setattr(type(random_vae), "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(random_vae, f"{direction}_pass", fake_pass)
    calls = []
    if direction == "decode":  # 8 x 8 cells in 4-cell tiles, overlap 2: 3 x 3 tiles
        out = random_vae.decode(torch.zeros(1, 128, 8, 8), tile="auto", tile_size=4, overlap=2,
                                callback=lambda d, t: calls.append((d, t)))
        assert out.shape == (1, 32, 32, 3)
    else:
        out = random_vae.encode(torch.zeros(1, 32, 32, 3), tile="auto", tile_size=4, overlap=2,
                                callback=lambda d, t: calls.append((d, t)))
        assert out.shape == (1, 128, 8, 8)
    assert released_at_retry == [True] * 9
    assert calls == [(i, 9) for i in range(1, 10)]  # the total grew from 1 pass to 9 tiles


def test_blend_weights_and_tile_plan():
    """Weights ramp up over the overlap on sides that touch another tile and are 1 elsewhere."""
    r = 3
    assert torch.equal(blend_weights(8, r, False, False), torch.ones(8))
    up = torch.tensor([0.25, 0.5, 0.75])
    assert torch.equal(blend_weights(8, r, True, False)[:3], up)
    assert torch.equal(blend_weights(8, r, True, True)[-3:], up.flip(0))
    torch.testing.assert_close(blend_weights(4, 3, True, True), torch.tensor([1 / 3, 2 / 3, 2 / 3, 1 / 3]))  # ramp <= half
    tiling = Tiling(True, 4, 2)
    assert tiling.count(8, 5) == 3 * 2
    with pytest.raises(ValueError, match="tile must be"):
        Tiling("sometimes")


def test_tiles_cover_the_grid_and_blend_exactly(random_vae):
    """With a constant per-tile output the blended result is that constant everywhere (weights are
    normalised), and every tile is asked for exactly the cells of the plan."""
    seen = []

    def run_tile(rows, cols):
        seen.append((rows.start, rows.stop, cols.start, cols.stop))
        return torch.full((1, 2, 3 * (rows.stop - rows.start), 3 * (cols.stop - cols.start)), 0.5)

    out = Tiling(True, 4, 1).blend(run_tile, 7, 4, channels=2, scale=3, progress=Progress(None, 0))
    assert out.shape == (1, 2, 21, 12)
    torch.testing.assert_close(out, torch.full_like(out, 0.5), rtol=0, atol=1e-6)
    assert seen == [(0, 4, 0, 4), (3, 7, 0, 4)]


@pytest.mark.parametrize("mode, device, expected", [
    ("auto", "cpu", (True, 16, 4)),        # the CPU tiles so Cancel stays quick
    ("auto", "cuda", ("auto", 16, 4)),     # elsewhere the library's own "auto"
    ("on", "cuda", (True, 16, 4)),
    ("off", "cpu", (False, 16, 4)),
])
def test_tiling_from_pixels(mode, device, expected):
    assert tiling_from_pixels(mode, 256, device) == expected


def test_tiling_from_pixels_sizes():
    assert tiling_from_pixels("on", 128, "cpu") == (True, 8, 2)
    assert tiling_from_pixels("on", 4096, "cpu") == (True, 256, 64)
    assert tiling_from_pixels("on", 144, "cpu") == (True, 9, 2)
    for bad in (120, 136, 4112, 256.0, True, "256"):
        with pytest.raises(ValueError, match="tile_size must be a multiple of 16 pixels from 128 to 4096"):
            tiling_from_pixels("on", bad, "cpu")
    with pytest.raises(ValueError, match="tile must be one of"):
        tiling_from_pixels("sometimes", 256, "cpu")
