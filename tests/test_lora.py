"""LoRAs on the Lens DiT: every published layout at its scale, stacking, removal, refusals,
quantised bases, and the Lens LoRA Loader node.

Expected outputs come from a model whose weights were merged here, W + s·(α/r)·B·A, with the module
names written out by hand below; lens_model.lora is only used to read and apply the files.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_stubs import EXTENSIONS, comfy_env, place_golden_models  # noqa: F401  (fixture)
from conftest import GOLDEN
from writers import write_safetensors
import writers
from lens_model import lora as lens_lora
from lens_model import ops
from lens_model.dit import LensTransformer
from lens_model.dit_loading import load_transformer

FP32 = load_file(str(GOLDEN / "transformer" / "diffusion_pytorch_model.safetensors"))
CASES = load_file(str(GOLDEN / "dit_cases.safetensors"))
RANK = 4

#: Hand-written targets on the tiny DiT (2 blocks, width 128, MLP 341): fused qkv of both
#: streams, both output projections, both MLPs, the modulations and the in/out projections.
TARGETS = [
    "transformer_blocks.0.attn.img_qkv",
    "transformer_blocks.1.attn.txt_qkv",
    "transformer_blocks.0.attn.to_out.0",
    "transformer_blocks.1.attn.to_add_out",
    "transformer_blocks.0.img_mlp.w1",
    "transformer_blocks.1.img_mlp.w2",
    "transformer_blocks.0.txt_mlp.w3",
    "transformer_blocks.0.img_mod.1",
    "transformer_blocks.1.txt_mod.1",
    "img_in",
    "txt_in",
    "proj_out",
    "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_2",
]


def factors(seed: int, targets=TARGETS, rank=RANK) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A [r, in], B [out, r]) with deltas of a few % of the weights."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in targets:
        w = FP32[name + ".weight"]
        a = torch.randn(rank, w.shape[1], generator=g) / math.sqrt(w.shape[1])
        b = torch.randn(w.shape[0], rank, generator=g) * w.std().item() * 0.5
        out[name] = (a, b)
    return out


def merged_model(*loras: tuple[dict, float, float], base: dict | None = None) -> LensTransformer:
    """fp32 model with W + Σ s·(α/r)·B·A merged (products in fp64). loras: (factors, s, alpha/r)."""
    sd = dict(FP32 if base is None else base)
    for fac, strength, scale in loras:
        for name, (a, b) in fac.items():
            w = sd[name + ".weight"].to(torch.float64)
            sd[name + ".weight"] = (w + strength * scale * (b.double() @ a.double())).to(torch.float32)
    cfg = load_transformer(GOLDEN / "transformer").config
    model = LensTransformer(cfg)
    model.load_state_dict(sd)
    return model.eval()


def run(model, n: int = 1) -> torch.Tensor:
    c = {k[len(f"case{n}."):]: v for k, v in CASES.items() if k.startswith(f"case{n}.")}
    feats = [c[f"encoder_hidden_states.{k}"] for k in range(4)]
    return model.forward_tokens(c["hidden_states"], c["timestep"], feats, c["encoder_mask"], c["grid_hw"])


@pytest.fixture(scope="module")
def base() -> LensTransformer:
    return load_transformer(GOLDEN / "transformer")


@pytest.fixture(scope="module")
def base_out(base) -> torch.Tensor:
    return run(base)


# -- writers for each layout (key spelling by hand) ----------------------------------------------------

def write_musubi(path, fac, alpha):
    sd = {}
    for name, (a, b) in fac.items():
        k = "lora_unet_" + name.replace(".", "_")
        sd[k + ".lora_down.weight"] = a.to(torch.bfloat16)
        sd[k + ".lora_up.weight"] = b.to(torch.bfloat16)
        sd[k + ".alpha"] = torch.tensor(float(alpha))
    if len(fac) == len(TARGETS):  # the spelling, by hand
        assert "lora_unet_transformer_blocks_0_attn_img_qkv.lora_down.weight" in sd
        assert "lora_unet_transformer_blocks_0_attn_to_out_0.alpha" in sd
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora_lens", "ss_network_dim": str(RANK)})


def write_loboforge(path, fac, alpha):
    sd = {}
    for name, (a, b) in fac.items():
        sd[f"diffusion_model.{name}.lora_A.default.weight"] = a
        sd[f"diffusion_model.{name}.lora_B.default.weight"] = b
    if len(fac) == len(TARGETS):  # the spelling, by hand
        assert "diffusion_model.transformer_blocks.0.attn.img_qkv.lora_A.default.weight" in sd
    save_file(sd, str(path), metadata={"rank": str(RANK), "alpha": str(alpha), "step": "1000",
                                       "base_model": "microsoft/Lens-Turbo"})


def write_videox(path, fac, alpha=None):
    assert alpha is None  # VideoX-Fun's ComfyUI export stores none
    sd = {}
    for name, (a, b) in fac.items():
        k = "lora_unet__" + name.replace(".", "_")
        sd[k + ".lora_down.weight"] = a
        sd[k + ".lora_up.weight"] = b
    if len(fac) == len(TARGETS):  # the spelling, by hand
        assert "lora_unet__transformer_blocks_0_img_mod_1.lora_up.weight" in sd
    save_file(sd, str(path))


def write_diffusers(path, fac, alpha):
    sd = {}
    for name, (a, b) in fac.items():
        sd[f"transformer.{name}.lora_A.weight"] = a
        sd[f"transformer.{name}.lora_B.weight"] = b
    if len(fac) == len(TARGETS):  # the spelling, by hand
        assert "transformer.transformer_blocks.1.attn.txt_qkv.lora_B.weight" in sd
    meta = {"transformer.r": RANK, "transformer.lora_alpha": alpha, "transformer.use_dora": False,
            "transformer.target_modules": ["img_qkv", "txt_qkv"]}
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(meta), "format": "pt"})


def write_peft_dir(path, fac, alpha):
    """PEFT save_pretrained: adapter_model.safetensors (base_model.model.…) + adapter_config.json."""
    sd = {}
    for name, (a, b) in fac.items():
        sd[f"base_model.model.{name}.lora_A.weight"] = a
        sd[f"base_model.model.{name}.lora_B.weight"] = b
    save_file(sd, str(path))
    path.with_name("adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": alpha, "peft_type": "LORA"}))


# (writer, file name, alpha written, the scale it must get)
LAYOUTS = {
    "musubi": (write_musubi, "lens_style_musubi.safetensors", 2.0, 2.0 / RANK),
    "loboforge": (write_loboforge, "lora_final.safetensors", 8.0, 8.0 / RANK),
    "videox": (write_videox, "lora_diffusion_pytorch_model_compatible_with_comfyui.safetensors", None, 1.0),
    "diffusers": (write_diffusers, "pytorch_lora_weights.safetensors", 1.0, 1.0 / RANK),
    "peft": (write_peft_dir, "adapter_model.safetensors", 12.0, 12.0 / RANK),
}


def write_layout(tmp_path, layout, fac):
    writer, fname, alpha, scale = LAYOUTS[layout]
    path = tmp_path / fname
    if alpha is None:
        writer(path, fac)
    else:
        writer(path, fac, alpha)
    return path, scale


# -- each layout equals merging it -----------------------------------------------------------------------

@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_equals_merged_weights(tmp_path, base, base_out, layout):
    fac = factors(1)
    if layout == "musubi":  # the file is bf16: merge what it stores
        fac = {k: (a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float()) for k, (a, b) in fac.items()}
    path, scale = write_layout(tmp_path, layout, fac)
    lo = lens_lora.load_lora(path)
    assert set(lo.pairs) == set(TARGETS)
    strength = 0.7
    with lens_lora.applied(base, [(lo, strength)]):
        out = run(base)
    expected = run(merged_model((fac, strength, scale)))
    assert (expected - base_out).norm() > 0.01 * base_out.norm()  # the LoRA matters
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert torch.equal(run(base), base_out)  # removed: base output bit for bit


def test_videox_scale_is_one_unless_alpha_is_given(tmp_path, base):
    fac = factors(2)
    path, _ = write_layout(tmp_path, "videox", fac)
    assert lens_lora.load_lora(path).pairs["img_in"].scale == 1.0
    lo = lens_lora.load_lora(path, alpha=2.0)  # e.g. the training alpha the user knows
    assert lo.pairs["img_in"].scale == 2.0 / RANK
    with lens_lora.applied(base, [(lo, 1.0)]):
        out = run(base)
    torch.testing.assert_close(out, run(merged_model((fac, 1.0, 2.0 / RANK))), atol=2e-5, rtol=1e-4)


def test_alpha_tensor_wins_over_metadata_and_zero_means_rank(tmp_path):
    fac = factors(3, TARGETS[:2])
    sd = {}
    for i, (name, (a, b)) in enumerate(fac.items()):
        k = "lora_unet_" + name.replace(".", "_")
        sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"] = a, b
        sd[k + ".alpha"] = torch.tensor([1.0, 0.0][i])
    save_file(sd, str(tmp_path / "l.safetensors"), metadata={"ss_network_alpha": "16"})
    lo = lens_lora.load_lora(tmp_path / "l.safetensors")
    assert lo.pairs[TARGETS[0]].scale == 1.0 / RANK
    assert lo.pairs[TARGETS[1]].scale == 1.0


def test_peft_alpha_pattern_and_rslora(tmp_path):
    fac = factors(4, TARGETS[:2])
    sd = {}
    for name, (a, b) in fac.items():
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = a, b
    meta = {"r": RANK, "lora_alpha": 8, "alpha_pattern": {"txt_qkv": 2}, "use_rslora": True}
    save_file(sd, str(tmp_path / "l.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    lo = lens_lora.load_lora(tmp_path / "l.safetensors")
    assert lo.pairs["transformer_blocks.0.attn.img_qkv"].scale == 8 / math.sqrt(RANK)
    assert lo.pairs["transformer_blocks.1.attn.txt_qkv"].scale == 2 / math.sqrt(RANK)


# -- strength, stacking, removal -----------------------------------------------------------------------

def test_strength_zero_is_bitwise_base(tmp_path, base, base_out):
    path, _ = write_layout(tmp_path, "loboforge", factors(5))
    with lens_lora.applied(base, [(lens_lora.load_lora(path), 0.0)]):
        assert torch.equal(run(base), base_out)


def test_remove_restores_bitwise_and_stacking_is_the_sum(tmp_path, base, base_out):
    f1, f2 = factors(6), factors(7, TARGETS[::2])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    p1, s1 = write_layout(tmp_path / "a", "diffusers", f1)
    p2, s2 = write_layout(tmp_path / "b", "loboforge", f2)
    l1, l2 = lens_lora.load_lora(p1), lens_lora.load_lora(p2)
    expected = run(merged_model((f1, 0.8, s1), (f2, -1.3, s2)))
    handle = lens_lora.apply_loras(base, [(l1, 0.8), (l2, -1.3)])
    try:
        torch.testing.assert_close(run(base), expected, atol=3e-5, rtol=1e-4)
        assert lens_lora.active_loras(base) == [l1.name, l2.name]
    finally:
        handle.remove()
    assert torch.equal(run(base), base_out)
    # applied one after the other (two calls) stacks too; remove_loras removes both
    lens_lora.apply_loras(base, [(l1, 0.8)])
    lens_lora.apply_loras(base, [(l2, -1.3)])
    torch.testing.assert_close(run(base), expected, atol=3e-5, rtol=1e-4)
    lens_lora.remove_loras(base)
    assert lens_lora.active_loras(base) == []
    assert torch.equal(run(base), base_out)


def test_context_manager_removes_on_error(tmp_path, base, base_out):
    path, _ = write_layout(tmp_path, "musubi", factors(8))
    with pytest.raises(KeyboardInterrupt):
        with lens_lora.applied(base, [(lens_lora.load_lora(path), 1.0)]):
            raise KeyboardInterrupt
    assert torch.equal(run(base), base_out)


def test_no_weight_is_written_or_copied(tmp_path, base):
    path, _ = write_layout(tmp_path, "musubi", factors(9))
    before = {k: (v.data_ptr(), v.clone()) for k, v in base.state_dict().items()}
    with lens_lora.applied(base, [(lens_lora.load_lora(path), 1.0)]):
        run(base)
        now = base.state_dict()
        assert now.keys() == before.keys()
        for k, (ptr, val) in before.items():
            assert now[k].data_ptr() == ptr and torch.equal(now[k], val), k


# -- refusals -------------------------------------------------------------------------------------------

def _save(tmp_path, sd, name="x.safetensors", metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("keys, match", [
    (["lora_unet_transformer_blocks_0_attn_img_qkv.lokr_w1", "lora_unet_transformer_blocks_0_attn_img_qkv.lokr_w2"],
     "LoKr"),
    (["lora_unet_transformer_blocks_0_attn_img_qkv.hada_w1_a", "lora_unet_transformer_blocks_0_attn_img_qkv.hada_w1_b"],
     "LoHa"),
    (["transformer.transformer_blocks.0.attn.img_qkv.lora_A.weight",
      "transformer.transformer_blocks.0.attn.img_qkv.lora_B.weight",
      "transformer.transformer_blocks.0.attn.img_qkv.lora_magnitude_vector"], "DoRA"),
    (["lora_unet_transformer_blocks_0_attn_img_qkv.lora_down.weight",
      "lora_unet_transformer_blocks_0_attn_img_qkv.dora_scale"], "DoRA"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
      "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "SDXL"),
    (["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"], "Stable Diffusion 1"),
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"], "FLUX"),
    (["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"], "FLUX"),
    (["transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight",
      "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight"], "Qwen-Image"),
    (["transformer_blocks.0.attn.to_q.lora_A.weight"], "split q/k/v"),
])
def test_other_kinds_and_models_are_refused_by_name(tmp_path, keys, match):
    path = _save(tmp_path, {k: torch.zeros(2, 2) for k in keys})
    with pytest.raises(lens_lora.LoRAError, match=match):
        lens_lora.load_lora(path)


def test_peft_use_dora_config_is_refused(tmp_path):
    sd = {"transformer.img_in.lora_A.weight": torch.zeros(2, 128), "transformer.img_in.lora_B.weight": torch.zeros(128, 2)}
    meta = {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 2, "use_dora": True})}
    with pytest.raises(lens_lora.LoRAError, match="DoRA"):
        lens_lora.load_lora(_save(tmp_path, sd, metadata=meta))


def test_unknown_keys_are_listed(tmp_path):
    good = factors(10, TARGETS[:1])
    sd = {}
    for name, (a, b) in good.items():
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = a, b
    sd["transformer.transformer_blocks.0.attn.norm_q.lora_A.weight"] = torch.zeros(2, 64)
    sd["text_encoder.layers.0.lora_A.weight"] = torch.zeros(2, 2)
    sd["transformer.img_in.lora_B.bias"] = torch.zeros(128)
    with pytest.raises(lens_lora.LoRAError, match="3 key") as e:
        lens_lora.load_lora(_save(tmp_path, sd))
    for k in ("transformer.transformer_blocks.0.attn.norm_q.lora_A.weight", "text_encoder.layers.0.lora_A.weight",
              "transformer.img_in.lora_B.bias"):
        assert k in str(e.value)


def test_half_pairs_and_rank_mismatch_are_reported(tmp_path):
    sd = {"lora_unet_img_in.lora_down.weight": torch.zeros(4, 128),
          "lora_unet_proj_out.lora_down.weight": torch.zeros(4, 128),
          "lora_unet_proj_out.lora_up.weight": torch.zeros(128, 8)}
    with pytest.raises(lens_lora.LoRAError) as e:
        lens_lora.load_lora(_save(tmp_path, sd))
    msg = str(e.value)
    assert "`img_in`" in msg and "no up" in msg
    assert "rank 4" in msg and "rank 8" in msg


def test_shape_mismatch_names_key_and_both_shapes_before_applying(tmp_path, base, base_out):
    good_path, _ = write_layout(tmp_path, "musubi", factors(11))
    # a LoRA for the full-size Lens (width 1536) on the tiny model (width 128)
    sd = {"lora_unet_transformer_blocks_0_attn_img_qkv.lora_down.weight": torch.zeros(16, 1536),
          "lora_unet_transformer_blocks_0_attn_img_qkv.lora_up.weight": torch.zeros(4608, 16),
          "lora_unet_transformer_blocks_7_attn_img_qkv.lora_down.weight": torch.zeros(16, 128),
          "lora_unet_transformer_blocks_7_attn_img_qkv.lora_up.weight": torch.zeros(384, 16)}
    bad = lens_lora.load_lora(_save(tmp_path, sd, "full_size.safetensors"))
    with pytest.raises(lens_lora.LoRAError) as e:
        lens_lora.apply_loras(base, [(lens_lora.load_lora(good_path), 1.0), (bad, 1.0)])
    msg = str(e.value)
    assert "lora_unet_transformer_blocks_0_attn_img_qkv.lora_down.weight" in msg
    assert "[16, 1536]" in msg and "[16, 128]" in msg
    assert "lora_unet_transformer_blocks_0_attn_img_qkv.lora_up.weight" in msg and "[4608, 16]" in msg
    assert "[384, 16]" in msg
    assert "transformer_blocks.7.attn.img_qkv" in msg and "does not have" in msg
    # nothing was attached
    assert lens_lora.active_loras(base) == []
    assert torch.equal(run(base), base_out)


def test_not_safetensors_and_missing_files(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"not a pickle")
    with pytest.raises(lens_lora.LoRAError, match="safetensors"):
        lens_lora.load_lora(tmp_path / "x.ckpt")
    with pytest.raises(FileNotFoundError):
        lens_lora.load_lora(tmp_path / "nope.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(lens_lora.LoRAError, match="readable"):
        lens_lora.load_lora(tmp_path / "trunc.safetensors")


def test_parse_lora_arg_and_as_lora_list(tmp_path):
    assert lens_lora.parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert lens_lora.parse_lora_arg("dir/a.safetensors:0.5") == ("dir/a.safetensors", 0.5)
    assert lens_lora.parse_lora_arg("a.safetensors:-1") == ("a.safetensors", -1.0)
    assert lens_lora.parse_lora_arg(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    assert lens_lora.parse_lora_arg(r"C:\loras\a.safetensors:0.3") == (r"C:\loras\a.safetensors", 0.3)
    path, _ = write_layout(tmp_path, "musubi", factors(12, TARGETS[:1]))
    items = lens_lora.as_lora_list([f"{path}:0.25", (path, 2)])
    assert [s for _, s in items] == [0.25, 2.0]
    assert lens_lora.as_lora_list(None) == [] and len(lens_lora.as_lora_list(str(path))) == 1
    with pytest.raises(ValueError, match="finite"):
        lens_lora.as_lora_list([(items[0][0], float("nan"))])


# -- quantised and bf16 bases ---------------------------------------------------------------------------

def _dequantised_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights as fp32 under the golden keys (quantised layers dequantised by ops)."""
    msd = model.state_dict()
    sd = {}
    for k in FP32:
        layer, _, pname = k.rpartition(".")
        m = model.get_submodule(layer)
        if isinstance(m, ops.QuantLinear) and pname == "weight":
            sd[k] = m.dequantize(torch.float32)
        else:
            sd[k] = msd[k].float()
    return sd


def test_fp8_weight_only_model(tmp_path):
    fp8 = load_transformer(GOLDEN / "transformer", dtype=torch.float32, weight_dtype="fp8")
    assert isinstance(fp8.get_submodule("transformer_blocks.0.attn.img_qkv"), ops.QuantLinear)
    fac = factors(13)
    path, scale = write_layout(tmp_path, "loboforge", fac)
    base8 = run(fp8)
    with lens_lora.applied(fp8, [(lens_lora.load_lora(path), 1.0)]):
        out = run(fp8)
    expected = run(merged_model((fac, 1.0, scale), base=_dequantised_state_dict(fp8)))
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=1e-4)
    assert torch.equal(run(fp8), base8)
    assert fp8.get_submodule("transformer_blocks.0.attn.img_qkv").weight.dtype == torch.float8_e4m3fn


def test_mxfp8_model(tmp_path):
    layers = ["transformer_blocks.0.attn.img_qkv", "transformer_blocks.1.img_mlp.w2", "txt_in"]
    sd = {}
    for k, v in FP32.items():
        layer = k.rsplit(".", 1)[0]
        if layer in layers and k.endswith(".weight"):
            w8, scales = writers.quantize_mxfp8(v)
            sd[k], sd[layer + ".weight_scale"] = w8, scales
            sd[layer + ".comfy_quant"] = writers.comfy_quant_tensor({"format": "mxfp8"})
        else:
            sd[k] = v
    write_safetensors(tmp_path / "lens_mxfp8.safetensors", sd)
    mx = load_transformer(tmp_path / "lens_mxfp8.safetensors")
    assert {n for n, m in mx.named_modules() if isinstance(m, ops.QuantLinear)} == set(layers)
    fac = factors(14)
    path, scale = write_layout(tmp_path, "musubi", fac)
    fac = {k: (a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float()) for k, (a, b) in fac.items()}
    base_mx = run(mx)
    with lens_lora.applied(mx, [(lens_lora.load_lora(path), 0.5)]):
        out = run(mx)
    expected = run(merged_model((fac, 0.5, scale), base=_dequantised_state_dict(mx)))
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=1e-4)
    assert torch.equal(run(mx), base_mx)


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_bf16_model(tmp_path, compute):
    """bf16 weights; activations in fp32 (CPUs without bf16) or bf16 (GPUs): the side path runs in
    the activation dtype."""
    bf = load_transformer(GOLDEN / "lens_tiny_comfy_bf16.safetensors")
    assert bf.dtype == torch.bfloat16
    bf.compute_dtype = compute
    fac = factors(15)
    path, scale = write_layout(tmp_path, "diffusers", fac)
    base_bf = run(bf)
    with lens_lora.applied(bf, [(lens_lora.load_lora(path), 1.0)]):
        out = run(bf)
    assert torch.equal(run(bf), base_bf)
    bf_weights = load_file(str(GOLDEN / "lens_tiny_comfy_bf16.safetensors"))
    bf_weights = {k.split("diffusion_model.", 1)[-1]: v.float() for k, v in bf_weights.items()}
    merged = merged_model((fac, 1.0, scale), base=bf_weights)
    for norm in merged.txt_norm:  # the bf16 DiT normalises the text features with bf16 norm weights: do the same
        norm.weight.data = norm.weight.data.to(torch.bfloat16)
    merged.compute_dtype = torch.float32
    expected = run(merged)
    if compute == torch.float32:
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    else:
        rel = ((out.float() - expected).norm() / expected.norm()).item()
        assert rel < 0.01, rel
        assert ((base_bf.float() - expected).norm() / expected.norm()).item() > 4 * rel


# -- the Lens LoRA Loader node ---------------------------------------------------------------------------

def _lora_folder(comfy_env):
    import folder_paths

    folder = comfy_env.models_dir / "loras"
    folder.mkdir(exist_ok=True)
    folder_paths.folder_names_and_paths.setdefault("loras", ([str(folder)], set(EXTENSIONS)))
    return folder


@pytest.fixture
def dit_handle(comfy_env):
    from nodes import LensNodesDiTLoader

    names = place_golden_models(comfy_env, GOLDEN)
    (handle,) = LensNodesDiTLoader().load(names["dit"], "fp32", "cpu", "never")
    return handle


def test_node_registered_with_contract(comfy_env):
    import inspect

    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["LensNodesLoRALoader"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["LensNodesLoRALoader"] == "Lens LoRA Loader"
    assert cls.CATEGORY == "Lens" and cls.RETURN_TYPES == ("LENS_DIT",) and cls.RETURN_NAMES == ("model",)
    assert len(cls.OUTPUT_TOOLTIPS) == 1 and isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    spec = cls.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "lora_name", "strength"]
    assert spec["required"]["model"][0] == "LENS_DIT"
    strength = spec["required"]["strength"][1]
    assert (strength["min"], strength["max"], strength["step"], strength["default"]) == (-4.0, 4.0, 0.01, 1.0)
    for _, (kind, opts) in spec["required"].items():
        assert opts["tooltip"].strip()
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    assert {"model", "lora_name", "strength"} <= set(params)
    assert cls.SEARCH_ALIASES and "lora" in cls.SEARCH_ALIASES


def test_node_lists_loras_folder(comfy_env):
    from nodes import LensNodesLoRALoader

    assert LensNodesLoRALoader.INPUT_TYPES()["required"]["lora_name"][0] == ["(no files found)"]
    folder = _lora_folder(comfy_env)
    (folder / "b.safetensors").write_bytes(b"x")
    (folder / "sub").mkdir()
    (folder / "sub" / "a.safetensors").write_bytes(b"x")
    (folder / "old.ckpt").write_bytes(b"x")
    assert LensNodesLoRALoader.INPUT_TYPES()["required"]["lora_name"][0] == ["b.safetensors", "sub/a.safetensors"]


def test_node_chains_without_mutating_upstream(comfy_env, dit_handle, tmp_path):
    from nodes import LensNodesLoRALoader
    from nodes.lora import loras_applied

    folder = _lora_folder(comfy_env)
    fac1, fac2 = factors(16), factors(17, TARGETS[:3])
    p1, s1 = write_layout(folder, "musubi", fac1)
    (folder / "x").mkdir()
    p2, s2 = write_layout(folder / "x", "diffusers", fac2)
    node = LensNodesLoRALoader()
    (m1,) = node.apply(dit_handle, p1.name, 0.6)
    (m2,) = node.apply(m1, "x/" + p2.name, -0.4)
    assert getattr(dit_handle, "loras", ()) == ()
    assert [(lo.name, s) for lo, s in m1.loras] == [(p1.name, 0.6)]
    assert [(lo.name, s) for lo, s in m2.loras] == [(p1.name, 0.6), (p2.name, -0.4)]
    assert m2.config is dit_handle.config and m2.device == dit_handle.device
    assert m2.base_handle is dit_handle
    m3 = copy.copy(m2)
    assert m3.loras == m2.loras and m3.base_handle is dit_handle
    dit = m2.for_compute()
    assert dit is dit_handle.for_compute()
    base_out = run(dit)
    with loras_applied(m2, dit):
        out = run(dit)
    fac1 = {k: (a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float()) for k, (a, b) in fac1.items()}
    torch.testing.assert_close(out, run(merged_model((fac1, 0.6, s1), (fac2, -0.4, s2))), atol=3e-5, rtol=1e-4)
    assert torch.equal(run(dit), base_out)
    with loras_applied(dit_handle, dit):  # a plain handle: nothing attached
        assert torch.equal(run(dit), base_out)


def test_node_errors_before_sampling(comfy_env, dit_handle):
    from nodes import LensNodesLoRALoader

    folder = _lora_folder(comfy_env)
    sd = {"lora_unet_img_in.lora_down.weight": torch.zeros(4, 64), "lora_unet_img_in.lora_up.weight": torch.zeros(128, 4)}
    save_file(sd, str(folder / "wrong_size.safetensors"))
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 2)}, str(folder / "flux.safetensors"))
    node = LensNodesLoRALoader()
    with pytest.raises(lens_lora.LoRAError, match=r"lora_unet_img_in\.lora_down\.weight.*\[4, 64\].*\[4, 128\]"):
        node.apply(dit_handle, "wrong_size.safetensors", 1.0)
    with pytest.raises(lens_lora.LoRAError, match="FLUX"):
        node.apply(dit_handle, "flux.safetensors", 1.0)
    with pytest.raises(FileNotFoundError):
        node.apply(dit_handle, "missing.safetensors", 1.0)
    with pytest.raises(ValueError, match="LensLoader"):
        node.apply(object(), "flux.safetensors", 1.0)
    with pytest.raises(ValueError, match="strength"):
        node.apply(dit_handle, "wrong_size.safetensors", float("inf"))


def test_node_is_changed_tracks_the_file(comfy_env):
    import os

    from nodes import LensNodesLoRALoader

    folder = _lora_folder(comfy_env)
    f = folder / "a.safetensors"
    f.write_bytes(b"one")
    first = LensNodesLoRALoader.IS_CHANGED(lora_name="a.safetensors", strength=1.0)
    f.write_bytes(b"three")
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert LensNodesLoRALoader.IS_CHANGED(lora_name="a.safetensors") != first
    missing = LensNodesLoRALoader.IS_CHANGED(lora_name="nope.safetensors")
    assert missing != missing
