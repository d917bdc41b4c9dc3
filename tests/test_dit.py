"""Lens DiT math: golden parity, input layouts, masking, RoPE positions, config inference."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import GOLDEN
from lens_model import dit
from lens_model.dit import LensDiTConfig, LensTransformer, rope_positions
from lens_model.dit_loading import load_transformer

CASES = load_file(str(GOLDEN / "dit_cases.safetensors"))


@pytest.fixture(scope="module")
def tiny() -> LensTransformer:
    return load_transformer(GOLDEN / "transformer")


def case(n: int) -> dict:
    p = f"case{n}."
    return {k[len(p):]: v for k, v in CASES.items() if k.startswith(p)}


def feats_of(c: dict) -> list[torch.Tensor]:
    return [c[f"encoder_hidden_states.{k}"] for k in range(4)]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -- golden parity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_golden_dit_cases(tiny, n):
    c = case(n)
    out = tiny.forward_tokens(c["hidden_states"], c["timestep"], feats_of(c), c["encoder_mask"], c["grid_hw"])
    assert out.shape == c["expected"].shape and out.dtype == torch.float32
    torch.testing.assert_close(out, c["expected"], atol=1e-4, rtol=1e-4)


def test_golden_case2_is_empty_text():
    c = case(2)
    assert c["encoder_hidden_states.0"].shape[1] == 0 and c["encoder_mask"].shape == (1, 0)


def test_image_layout_call_matches_token_layout(tiny):
    """model(x [B,128,h,w], sigma, context [B,S,4E] layer-major, mask) == forward_tokens (token n = r*w + c)."""
    c = case(1)
    h, w = c["grid_hw"].tolist()
    bsz = c["hidden_states"].shape[0]
    x = c["hidden_states"].transpose(1, 2).reshape(bsz, 128, h, w)
    context = torch.cat(feats_of(c), dim=-1)  # index l*E + e
    v = tiny(x, c["timestep"], context, c["encoder_mask"].bool())
    assert v.shape == (bsz, 128, h, w)
    expected = c["expected"].transpose(1, 2).reshape(bsz, 128, h, w)
    torch.testing.assert_close(v, expected, atol=1e-4, rtol=1e-4)


def test_layer_major_context_equals_list(tiny):
    c = case(0)
    as_list = tiny.forward_tokens(c["hidden_states"], c["timestep"], feats_of(c), c["encoder_mask"], c["grid_hw"])
    as_cat = tiny.forward_tokens(
        c["hidden_states"], c["timestep"], torch.cat(feats_of(c), dim=-1), c["encoder_mask"], c["grid_hw"]
    )
    torch.testing.assert_close(as_cat, as_list, atol=0, rtol=0)


@pytest.mark.parametrize("batch", [1, 2])
def test_zero_padding_with_false_mask_changes_nothing(tiny, batch):
    """Appending zero-feature tokens with mask 0 leaves the image output unchanged (batch 1 and 2)."""
    c = case(0)
    x = c["hidden_states"].repeat(batch, 1, 1)
    sigma = torch.tensor([0.7, 0.3][:batch])
    feats = [f.repeat(batch, 1, 1) for f in feats_of(c)]
    mask = torch.ones(batch, feats[0].shape[1], dtype=torch.bool)
    ref = tiny.forward_tokens(x, sigma, feats, mask, c["grid_hw"])
    padded = [torch.cat((f, torch.zeros(batch, 5, f.shape[-1])), dim=1) for f in feats]
    pmask = torch.cat((mask, torch.zeros(batch, 5, dtype=torch.bool)), dim=1)
    out = tiny.forward_tokens(x, sigma, padded, pmask, c["grid_hw"])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_masked_tokens_are_ignored_in_a_batch(tiny):
    """Sample 1 of golden case 1 (3 of 6 tokens valid, garbage features behind the mask) equals a
    batch-1 call with only its 3 valid tokens."""
    c = case(1)
    feats = [f[1:2, :3] for f in feats_of(c)]
    out = tiny.forward_tokens(c["hidden_states"][1:2], c["timestep"][1:2], feats, None, c["grid_hw"])
    torch.testing.assert_close(out, c["expected"][1:2], atol=1e-4, rtol=1e-4)


def test_empty_text_equals_all_masked_tokens(tiny):
    c = case(2)
    empty = tiny.forward_tokens(c["hidden_states"], c["timestep"], feats_of(c), c["encoder_mask"], c["grid_hw"])
    zeros = [torch.zeros(1, 4, 32) for _ in range(4)]
    masked = tiny.forward_tokens(c["hidden_states"], c["timestep"], zeros, torch.zeros(1, 4, dtype=torch.bool), c["grid_hw"])
    torch.testing.assert_close(masked, empty, atol=1e-5, rtol=1e-5)
    # batch 2 keeps the mask path (no compaction): same result per sample
    both = tiny.forward_tokens(
        c["hidden_states"].repeat(2, 1, 1), c["timestep"].repeat(2), [z.repeat(2, 1, 1) for z in zeros],
        torch.zeros(2, 4, dtype=torch.bool), c["grid_hw"],
    )
    torch.testing.assert_close(both, empty.repeat(2, 1, 1), atol=1e-5, rtol=1e-5)


def test_chunked_cpu_attention_matches(tiny, monkeypatch):
    c = case(3)
    ref = tiny.forward_tokens(c["hidden_states"], c["timestep"], feats_of(c), c["encoder_mask"], c["grid_hw"])
    monkeypatch.setattr(dit, "CPU_ATTENTION_CHUNK_BYTES", 4 * 2 * 7 * 34)  # 7-query chunks
    monkeypatch.setattr(dit, "_sdpa_is_math", lambda *a: True)
    out = tiny.forward_tokens(c["hidden_states"], c["timestep"], feats_of(c), c["encoder_mask"], c["grid_hw"])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_bf16_compute_is_close(tiny):
    """bf16 weights computing in bf16 are a sanity check only: per-token cosine >= 0.99 (golden README)."""
    model = load_transformer(GOLDEN / "transformer", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    model.compute_dtype = torch.bfloat16
    for n in range(4):
        c = case(n)
        out = model.forward_tokens(c["hidden_states"], c["timestep"], feats_of(c), c["encoder_mask"], c["grid_hw"])
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        cos = torch.nn.functional.cosine_similarity(out, c["expected"], dim=-1)
        assert cos.min().item() > 0.99, (n, cos.min().item())


def test_sigma_is_rounded_to_the_dit_dtype():
    model = load_transformer(GOLDEN / "transformer", dtype=torch.bfloat16)
    model.compute_dtype = torch.float32
    c = case(1)
    sigma = c["timestep"]
    rounded = sigma.to(torch.bfloat16).float()
    assert not torch.equal(sigma, rounded)
    a = model.forward_tokens(c["hidden_states"], sigma, feats_of(c), c["encoder_mask"], c["grid_hw"])
    b = model.forward_tokens(c["hidden_states"], rounded, feats_of(c), c["encoder_mask"], c["grid_hw"])
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_fp16_is_refused_with_a_warning():
    with pytest.warns(UserWarning, match="fp16"):
        model = load_transformer(GOLDEN / "transformer", dtype=torch.float16)
    assert model.dtype == torch.bfloat16


def test_bad_inputs_raise(tiny):
    c = case(0)
    with pytest.raises(ValueError, match="grid_hw"):
        tiny.forward_tokens(c["hidden_states"], c["timestep"], feats_of(c), None, (3, 4))
    with pytest.raises(ValueError, match="text feature layers"):
        tiny.forward_tokens(c["hidden_states"], c["timestep"], feats_of(c)[:3], None, c["grid_hw"])
    with pytest.raises(ValueError, match="encoder_mask"):
        tiny.forward_tokens(c["hidden_states"], c["timestep"], feats_of(c), torch.ones(1, 3), c["grid_hw"])
    bsz = c["hidden_states"].shape[0]
    with pytest.raises(ValueError, match=f"timestep has {bsz + 1} values; expected 1 or {bsz}"):
        tiny.forward_tokens(c["hidden_states"], torch.full((bsz + 1,), 0.5), feats_of(c), None, c["grid_hw"])


# -- RoPE --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "h, expect_y",
    [(4, [-2, -1, 0, 1]), (5, [-3, -2, -1, 0, 1]), (90, list(range(-45, 45))), (1, [-1]), (2, [-1, 0])],
)
def test_rope_image_positions(h, expect_y):
    img, _ = rope_positions(h, 3, 0)
    ys = img[:, 1].view(h, 3)[:, 0].tolist()
    assert ys == expect_y
    assert img[:, 0].eq(0).all()
    assert img[:, 2].view(h, 3)[0].tolist() == [-2, -1, 0]  # w = 3: c - ceil(3/2)


@pytest.mark.parametrize("h, w, start", [(90, 90, 45), (64, 64, 32), (5, 3, 2), (3, 5, 2), (4, 7, 3), (1, 1, 0)])
def test_rope_text_positions(h, w, start):
    img, txt = rope_positions(h, w, 4)
    assert img.shape == (h * w, 3)
    assert txt.tolist() == [[start + k] * 3 for k in range(4)]
    # token n = r*w + c
    r, col = divmod(h * w - 1, w)
    assert img[-1].tolist() == [0, r - (h - h // 2), col - (w - w // 2)]


def test_rope_frequencies_pairs_and_rotation():
    pos = torch.tensor([[1, 2, 3]])
    f = dit.rope_frequencies(pos, (8, 28, 28), 10000.0)
    assert f.shape == (1, 32) and f.dtype == torch.complex64
    ang = torch.angle(f[0]).double()
    # pair 0: frame axis, omega 1 -> angle 1; pair 4: height axis omega 1 -> angle 2; pair 18: width -> 3
    assert abs(ang[0] - 1.0) < 1e-6 and abs(ang[4] - 2.0) < 1e-6 and abs(ang[18] - 3.0) < 1e-6
    # pair 1: frame axis omega = 10000^(-2/8)
    assert abs(ang[1] - 10000 ** (-0.25)) < 1e-6
    assert abs(ang[5] - 2 * 10000 ** (-2 / 28)) < 1e-6


def test_timestep_embedding_is_cos_first_with_x1000():
    e = dit.timestep_embedding(torch.tensor([0.5]), 256)
    j = torch.arange(128, dtype=torch.float64)
    args = 500.0 * torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * j / 128)
    torch.testing.assert_close(e[0, :128].double(), torch.cos(args), atol=2e-4, rtol=0)
    torch.testing.assert_close(e[0, 128:].double(), torch.sin(args), atol=2e-4, rtol=0)


# -- configuration -----------------------------------------------------------------------------------

def full_size_shapes() -> dict[str, tuple[int, ...]]:
    """The full Lens key set (as the upstream checkpoints store it), written out independently of the code under test."""
    s = {
        "img_in.weight": (1536, 128), "img_in.bias": (1536,),
        "txt_in.weight": (1536, 11520), "txt_in.bias": (1536,),
        "time_text_embed.timestep_embedder.linear_1.weight": (1536, 256),
        "time_text_embed.timestep_embedder.linear_1.bias": (1536,),
        "time_text_embed.timestep_embedder.linear_2.weight": (1536, 1536),
        "time_text_embed.timestep_embedder.linear_2.bias": (1536,),
        "norm_out.linear.weight": (3072, 1536), "norm_out.linear.bias": (3072,),
        "proj_out.weight": (128, 1536), "proj_out.bias": (128,),
    }
    s.update({f"txt_norm.{k}.weight": (2880,) for k in range(4)})
    for i in range(48):
        p = f"transformer_blocks.{i}."
        s.update({
            p + "attn.img_qkv.weight": (4608, 1536), p + "attn.img_qkv.bias": (4608,),
            p + "attn.txt_qkv.weight": (4608, 1536), p + "attn.txt_qkv.bias": (4608,),
            p + "attn.norm_q.weight": (64,), p + "attn.norm_k.weight": (64,),
            p + "attn.norm_added_q.weight": (64,), p + "attn.norm_added_k.weight": (64,),
            p + "attn.to_out.0.weight": (1536, 1536), p + "attn.to_out.0.bias": (1536,),
            p + "attn.to_add_out.weight": (1536, 1536), p + "attn.to_add_out.bias": (1536,),
            p + "img_mod.1.weight": (9216, 1536), p + "img_mod.1.bias": (9216,),
            p + "txt_mod.1.weight": (9216, 1536), p + "txt_mod.1.bias": (9216,),
            p + "img_norm1.weight": (1536,), p + "img_norm2.weight": (1536,),
            p + "txt_norm1.weight": (1536,), p + "txt_norm2.weight": (1536,),
            p + "img_mlp.w1.weight": (4096, 1536), p + "img_mlp.w3.weight": (4096, 1536),
            p + "img_mlp.w2.weight": (1536, 4096),
            p + "txt_mlp.w1.weight": (4096, 1536), p + "txt_mlp.w3.weight": (4096, 1536),
            p + "txt_mlp.w2.weight": (1536, 4096),
        })
    return s


def test_config_from_full_key_set_on_meta():
    shapes = full_size_shapes()
    assert len(shapes) == 1264
    meta = {k: torch.empty(v, device="meta", dtype=torch.bfloat16) for k, v in shapes.items()}
    cfg = LensDiTConfig.from_state_dict_shapes({k: t.shape for k, t in meta.items()})
    assert (cfg.num_layers, cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim) == (48, 1536, 24, 64)
    assert (cfg.enc_hidden_dim, cfg.mlp_hidden, cfg.num_text_layers, cfg.in_channels, cfg.out_channels) == (2880, 4096, 4, 128, 32)
    assert cfg.time_embed_dim == 256
    with torch.device("meta"):
        model = LensTransformer(cfg, dtype=torch.bfloat16)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes  # submodule names = checkpoint keys
    assert sum(v.numel() for v in sd.values()) == 4_104_225_152
    model.load_state_dict(meta, assign=True, strict=True)


def test_config_from_tiny_keys_and_config_json():
    import json

    shapes = {k: v.shape for k, v in load_file(str(GOLDEN / "transformer" / "diffusion_pytorch_model.safetensors")).items()}
    a = LensDiTConfig.from_state_dict_shapes(shapes)
    b = LensDiTConfig.from_diffusers_config(json.loads((GOLDEN / "transformer" / "config.json").read_text()))
    for cfg in (a, b):
        assert (cfg.num_layers, cfg.num_attention_heads, cfg.inner_dim, cfg.enc_hidden_dim, cfg.mlp_hidden) == (2, 2, 128, 32, 341)
        assert cfg.axes_dims_rope == (8, 28, 28) and cfg.qk_norm_eps == 1e-6
    assert b.to_dict() == a.to_dict()  # inner_dim 1536 in config.json is ignored


def test_qk_norm_eps_is_configurable():
    model = load_transformer(GOLDEN / "transformer", qk_norm_eps=1e-5)
    assert model.config.qk_norm_eps == 1e-5
    assert model.transformer_blocks[0].attn.norm_q.eps == 1e-5
    c = case(0)
    with warnings.catch_warnings():
        out = model.forward_tokens(c["hidden_states"], c["timestep"], feats_of(c), c["encoder_mask"], c["grid_hw"])
    diff = (out - c["expected"]).abs().max().item()
    assert 0 < diff < 1e-4  # spec: ~3e-6 on the tiny model


def test_holes_in_the_mask_keep_text_positions(tiny):
    """Batch 1 drops masked tokens but keeps the positions of the others; batch 2 keeps the mask.
    Both must agree when the mask has holes (positions k, not 0..S'-1)."""
    c = case(3)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 1]], dtype=torch.bool)
    one = tiny.forward_tokens(c["hidden_states"], c["timestep"], feats_of(c), mask, c["grid_hw"])
    two = tiny.forward_tokens(
        c["hidden_states"].repeat(2, 1, 1), c["timestep"].repeat(2), [f.repeat(2, 1, 1) for f in feats_of(c)],
        mask.repeat(2, 1), c["grid_hw"],
    )
    torch.testing.assert_close(two[:1], one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two[1:], one, atol=1e-5, rtol=1e-5)
    full = tiny.forward_tokens(c["hidden_states"], c["timestep"], feats_of(c), None, c["grid_hw"])
    assert (full - one).abs().max() > 1e-3  # the mask matters
    # dropping the masked tokens and renumbering positions would be wrong
    kept = [f[:, mask[0]] for f in feats_of(c)]
    renumbered = tiny.forward_tokens(c["hidden_states"], c["timestep"], kept, None, c["grid_hw"])
    assert (renumbered - one).abs().max() > 1e-5
