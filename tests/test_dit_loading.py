"""Lens DiT loading: layouts, prefixes, shards, ComfyUI MXFP8 / fp8 files, fp8 storage mode, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GOLDEN
from writers import write_safetensors
import writers
from lens_model import ops, quant
from lens_model.checkpoints import CheckpointError, TensorSource, open_checkpoint
from lens_model.dit import LensTransformer
from lens_model.dit_loading import load_transformer, variant_defaults_for

FP32 = load_file(str(GOLDEN / "transformer" / "diffusion_pytorch_model.safetensors"))
CASES = load_file(str(GOLDEN / "dit_cases.safetensors"))
PREFIX = "model.diffusion_model."

#: The layers the published MXFP8 files quantise, applied to the tiny DiT: every block
#: Linear except the modulations, plus txt_in -> 21 layers.
MXFP8_LAYERS = ["txt_in"] + [
    f"transformer_blocks.{i}.{name}"
    for i in range(2)
    for name in (
        "attn.img_qkv", "attn.txt_qkv", "attn.to_out.0", "attn.to_add_out",
        "img_mlp.w1", "img_mlp.w2", "img_mlp.w3", "txt_mlp.w1", "txt_mlp.w2", "txt_mlp.w3",
    )
]


def case(n: int) -> dict:
    p = f"case{n}."
    return {k[len(p):]: v for k, v in CASES.items() if k.startswith(p)}


def run_case(model: LensTransformer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = case(n)
    feats = [c[f"encoder_hidden_states.{k}"] for k in range(4)]
    out = model.forward_tokens(c["hidden_states"], c["timestep"], feats, c["encoder_mask"], c["grid_hw"])
    return out, c["expected"]


def assert_same_model(a: LensTransformer, b: LensTransformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    assert a.config == b.config


@pytest.fixture(scope="module")
def folder_model() -> LensTransformer:
    return load_transformer(GOLDEN / "transformer")


# -- plain layouts -----------------------------------------------------------------------------------

def test_diffusers_folder(folder_model):
    assert folder_model.dtype == torch.float32
    assert folder_model.variant_defaults == {"variant": "lens", "steps": 20, "cfg": 5.0}
    for k, v in folder_model.state_dict().items():
        assert torch.equal(v, FP32[k]), k


def test_comfy_bf16_file_strips_prefix_and_equals_rounded_fp32():
    path = GOLDEN / "lens_tiny_comfy_bf16.safetensors"
    raw = load_file(str(path))
    assert all(k.startswith(PREFIX) for k in raw)
    model = load_transformer(path)
    assert model.dtype == torch.bfloat16
    sd = model.state_dict()
    assert set(sd) == set(FP32)
    for k, v in sd.items():
        assert v.dtype == torch.bfloat16, k
        assert torch.equal(v, FP32[k].to(torch.bfloat16)), k  # round-to-nearest-even, exactly
    as_fp32 = load_transformer(path, dtype=torch.float32)
    for k, v in as_fp32.state_dict().items():
        assert torch.equal(v, FP32[k].to(torch.bfloat16).float()), k
    out, expected = run_case(as_fp32, 0)
    assert (out - expected).abs().max().item() < 5e-2  # sanity bound on the bf16 rounding only


@pytest.mark.parametrize("prefix", ["", PREFIX, "diffusion_model.", "transformer."])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_file_equals_folder(tmp_path, folder_model, prefix, dtype):
    path = tmp_path / "lens_single.safetensors"
    save_file({prefix + k: v.to(dtype) for k, v in FP32.items()}, str(path))
    model = load_transformer(path, dtype=torch.float32)
    if dtype == torch.float32:
        assert_same_model(model, folder_model)  # config inferred from shapes == config.json
    else:
        assert load_transformer(path).dtype == torch.bfloat16
        for k, v in model.state_dict().items():
            assert torch.equal(v, FP32[k].to(dtype).float())


def test_fp16_file_loads_as_bf16_with_warning(tmp_path):
    path = tmp_path / "lens_fp16.safetensors"
    save_file({k: v.half() for k, v in FP32.items()}, str(path))
    with pytest.warns(UserWarning, match="fp16"):
        model = load_transformer(path)
    assert model.dtype == torch.bfloat16


def write_sharded(folder: Path) -> None:
    folder.mkdir(parents=True)
    keys = sorted(FP32)
    half = len(keys) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: FP32[k] for k in ks}, str(folder / name))
        weight_map.update({k: name for k in ks})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    shutil.copy(GOLDEN / "transformer" / "config.json", folder / "config.json")


def test_sharded_folder_index_and_shard_load_identically(tmp_path, folder_model):
    folder = tmp_path / "Lens-Turbo" / "transformer"
    write_sharded(folder)
    by_folder = load_transformer(folder)
    assert_same_model(by_folder, folder_model)
    assert by_folder.variant_defaults["variant"] == "turbo"  # from the parent folder name
    by_index = load_transformer(folder / "diffusion_pytorch_model.safetensors.index.json")
    assert_same_model(by_index, folder_model)
    by_shard = load_transformer(folder / "diffusion_pytorch_model-00002-of-00002.safetensors")
    assert_same_model(by_shard, folder_model)
    by_root = load_transformer(tmp_path / "Lens-Turbo")
    assert_same_model(by_root, folder_model)


def test_missing_shard_is_named(tmp_path):
    folder = tmp_path / "transformer"
    write_sharded(folder)
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="00002-of-00002"):
        load_transformer(folder)


@pytest.mark.parametrize(
    "name, variant, steps, cfg",
    [
        ("lens_turbo_bf16.safetensors", "turbo", 4, 1.0),
        ("Lens-Turbo/transformer/diffusion_pytorch_model.safetensors", "turbo", 4, 1.0),
        ("Lens-Base/transformer", "base", 50, 5.0),
        ("lens_base_mxfp8.safetensors", "base", 50, 5.0),
        ("lens_mxfp8.safetensors", "lens", 20, 5.0),
        ("database/lens_bf16.safetensors", "lens", 20, 5.0),
    ],
)
def test_variant_defaults_from_name(name, variant, steps, cfg):
    assert variant_defaults_for(name) == {"variant": variant, "steps": steps, "cfg": cfg}


# -- quantised files -----------------------------------------------------------------------------------

def mxfp8_state_dict(prefix: str = "", e8m0: bool = False, markers: bool = True) -> dict[str, torch.Tensor]:
    """The tiny DiT with MXFP8_LAYERS quantised (ComfyUI layout), everything else bf16."""
    sd = {}
    for k, v in FP32.items():
        layer = k.rsplit(".", 1)[0]
        if layer in MXFP8_LAYERS and k.endswith(".weight"):
            w8, scales = writers.quantize_mxfp8(v)
            sd[prefix + k] = w8
            sd[prefix + layer + ".weight_scale"] = scales.view(torch.float8_e8m0fnu) if e8m0 else scales
            if markers:
                sd[prefix + layer + ".comfy_quant"] = writers.comfy_quant_tensor({"format": "mxfp8"})
        else:
            sd[prefix + k] = v.to(torch.bfloat16)
    return sd


def check_close_to_fp32(model: LensTransformer, max_rel: float, min_cos: float) -> None:
    """Compare with the fp32 golden outputs. Load with dtype=torch.float32: a bf16 DiT rounds sigma to
    bf16 (0.7 -> 0.69921875), which alone moves golden case 0 by ~4 % relative L2."""
    for n in range(4):
        out, expected = run_case(model, n)
        rel = ((out - expected).norm() / expected.norm()).item()
        cos = torch.nn.functional.cosine_similarity(out, expected, dim=-1).min().item()
        assert rel < max_rel and cos > min_cos, (n, rel, cos)


@pytest.mark.parametrize("prefix", ["", PREFIX])
@pytest.mark.parametrize("e8m0", [False, True])
def test_mxfp8_file(tmp_path, prefix, e8m0):
    path = tmp_path / "lens_turbo_mxfp8.safetensors"
    sd = mxfp8_state_dict(prefix, e8m0)
    assert sd[prefix + "transformer_blocks.0.img_mlp.w1.weight"].shape == (352, 128)  # 341 padded
    assert sd[prefix + "transformer_blocks.0.img_mlp.w1.weight_scale"].shape == (384, 4)
    assert sd[prefix + "transformer_blocks.0.img_mlp.w2.weight_scale"].shape == (128, 12)
    write_safetensors(path, sd)
    model = load_transformer(path)
    assert model.config.mlp_hidden == 341
    assert model.dtype == torch.bfloat16 and model.variant_defaults["variant"] == "turbo"
    quantised = {n for n, m in model.named_modules() if isinstance(m, ops.QuantLinear)}
    assert quantised == set(MXFP8_LAYERS)
    mod = model.transformer_blocks[0].img_mod[1]
    assert type(mod) is ops.Linear and mod.weight.dtype == torch.bfloat16
    # stays quantised; dequantises like the reference implementation in quant.py
    w1 = model.get_submodule("transformer_blocks.1.img_mlp.w1")
    assert w1.weight.dtype == torch.float8_e4m3fn and w1.weight.shape == (352, 128)
    ref = quant.dequantize_mxfp8(
        sd[prefix + "transformer_blocks.1.img_mlp.w1.weight"],
        sd[prefix + "transformer_blocks.1.img_mlp.w1.weight_scale"], 341, 128, torch.float32,
    )
    assert torch.equal(w1.dequantize(torch.float32), ref)
    w2 = model.get_submodule("transformer_blocks.1.img_mlp.w2").dequantize(torch.float32)
    assert w2.shape == (128, 341)
    # MXFP8 against the fp32 weights: ComfyUI's full-size files show 0.67-0.74 % relative L2 and
    # cosine >= 0.99995; the tiny model gets a looser bound
    check_close_to_fp32(load_transformer(path, dtype=torch.float32), max_rel=0.012, min_cos=0.9998)


def test_mxfp8_quantization_metadata_header(tmp_path):
    path = tmp_path / "lens_mxfp8.safetensors"
    sd = mxfp8_state_dict(PREFIX, markers=False)
    meta = {"format_version": "1.0", "layers": {PREFIX + layer: {"format": "mxfp8"} for layer in MXFP8_LAYERS}}
    write_safetensors(path, sd, metadata={"_quantization_metadata": json.dumps(meta)})
    model = load_transformer(path)
    assert {n for n, m in model.named_modules() if isinstance(m, ops.QuantLinear)} == set(MXFP8_LAYERS)
    check_close_to_fp32(load_transformer(path, dtype=torch.float32), max_rel=0.012, min_cos=0.9998)


def test_mxfp8_scale_byte_zero_is_zero():
    assert quant.e8m0_to_float(torch.tensor([0, 1, 126, 127, 128, 254], dtype=torch.uint8)).tolist() == [
        0.0, 2.0 ** -126, 0.5, 1.0, 2.0, 2.0 ** 127
    ]
    # MXFP4 files (OpenAI / transformers) read byte 0 as 2^-127, not 0
    assert quant.e8m0_to_float(torch.tensor([0, 1], dtype=torch.uint8), zero_byte_is_zero=False).tolist() == [
        2.0 ** -127, 2.0 ** -126
    ]
    w = torch.randn(64, 64)
    w[:, 32:] = 0.0  # all-zero blocks -> writer stores byte 0
    w8, scales = writers.quantize_mxfp8(w)
    logical = quant.unswizzle_scales(scales, 64, 2)
    assert logical[:, 1].eq(0).all() and logical[:, 0].ne(0).all()
    # fill the zero blocks' fp8 payload with non-zero codes: byte 0 must still give exactly 0
    w8 = w8.clone()
    w8[:, 32:] = torch.full((64, 32), 448.0).to(torch.float8_e4m3fn)
    layer = ops.QuantLinear("mxfp8", 64, 64, w8, logical.contiguous(), None)
    dense = layer.dequantize(torch.float32)
    assert dense[:, 32:].eq(0).all()
    assert ((dense[:, :32] - w[:, :32]).abs() / w[:, :32].abs().max()).max() < 0.07


def test_mxfp8_weight_stored_as_u8_is_refused(tmp_path):
    path = tmp_path / "bad_mxfp8.safetensors"
    sd = mxfp8_state_dict()
    key = "transformer_blocks.0.attn.img_qkv.weight"
    sd[key] = sd[key].view(torch.uint8)
    write_safetensors(path, sd)
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.attn\.img_qkv.*mxfp8.*U8"):
        load_transformer(path)


def test_unknown_quant_format_is_refused(tmp_path):
    path = tmp_path / "bad_format.safetensors"
    sd = mxfp8_state_dict()
    sd["transformer_blocks.1.txt_mlp.w3.comfy_quant"] = writers.comfy_quant_tensor({"format": "int8_tensorwise"})
    write_safetensors(path, sd)
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.txt_mlp\.w3.*int8_tensorwise"):
        load_transformer(path)


def test_float8_per_tensor_file(tmp_path):
    path = tmp_path / "lens_fp8_e4m3fn.safetensors"
    sd = {}
    for k, v in FP32.items():
        layer = k.rsplit(".", 1)[0]
        if layer in MXFP8_LAYERS and k.endswith(".weight"):
            w8, s = quant.quantize_float8(v)
            sd[PREFIX + k], sd[PREFIX + layer + ".weight_scale"] = w8, s
            sd[PREFIX + layer + ".comfy_quant"] = writers.comfy_quant_tensor({"format": "float8_e4m3fn"})
        else:
            sd[PREFIX + k] = v.to(torch.bfloat16)
    write_safetensors(path, sd)
    model = load_transformer(path)
    q = model.get_submodule("transformer_blocks.0.attn.img_qkv")
    assert isinstance(q, ops.QuantLinear) and q.fmt == "float8_e4m3fn"
    check_close_to_fp32(load_transformer(path, dtype=torch.float32), max_rel=0.012, min_cos=0.9998)


def test_nvfp4_layers(tmp_path):
    path = tmp_path / "lens_nvfp4.safetensors"
    layers = {"transformer_blocks.0.attn.img_qkv", "transformer_blocks.1.attn.txt_qkv"}
    sd = {}
    for k, v in FP32.items():
        layer = k.rsplit(".", 1)[0]
        if layer in layers and k.endswith(".weight"):
            w4, bs, g = writers.quantize_nvfp4(v[None])
            sd[k], sd[layer + ".weight_scale"], sd[layer + ".weight_scale_2"] = w4[0], bs[0], g[0]
            sd[layer + ".comfy_quant"] = writers.comfy_quant_tensor({"format": "nvfp4"})
        else:
            sd[k] = v
    write_safetensors(path, sd)
    model = load_transformer(path)
    assert model.dtype == torch.float32
    q = model.get_submodule("transformer_blocks.0.attn.img_qkv")
    assert isinstance(q, ops.QuantLinear) and q.fmt == "nvfp4"
    check_close_to_fp32(model, max_rel=0.015, min_cos=0.9995)


def test_fp8_weight_storage_mode():
    model = load_transformer(GOLDEN / "lens_tiny_comfy_bf16.safetensors", weight_dtype="fp8")
    quantised = {n for n, m in model.named_modules() if isinstance(m, ops.QuantLinear)}
    expected = {l for l in MXFP8_LAYERS if l != "txt_in"}
    assert quantised == expected
    for n in expected:
        m = model.get_submodule(n)
        assert m.fmt == "float8_e4m3fn" and m.weight.dtype == torch.float8_e4m3fn
        if m.bias is not None:
            assert m.bias.dtype == torch.bfloat16
    for name in ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
                 "transformer_blocks.0.img_mod.1", "transformer_blocks.1.txt_mod.1"):
        m = model.get_submodule(name)
        assert type(m) is ops.Linear and m.weight.dtype == torch.bfloat16, name
    assert model.transformer_blocks[0].attn.norm_q.weight.dtype == torch.bfloat16
    fp32 = load_transformer(GOLDEN / "transformer", dtype=torch.float32, weight_dtype="fp8")
    assert fp32.get_submodule("transformer_blocks.0.img_mlp.w2").fmt == "float8_e4m3fn"
    check_close_to_fp32(fp32, max_rel=0.012, min_cos=0.9998)
    with pytest.raises(ValueError, match="weight_dtype"):
        load_transformer(GOLDEN / "transformer", weight_dtype="int4")


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sub, kind", [("text_encoder", "text encoder"), ("vae", "VAE")])
def test_wrong_component_in_dit_slot(sub, kind):
    with pytest.raises(CheckpointError, match=kind):
        load_transformer(GOLDEN / sub / ("model.safetensors" if sub == "text_encoder" else "diffusion_pytorch_model.safetensors"))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    path = tmp_path / "lens_missing.safetensors"
    sd = dict(FP32)
    gone = ["proj_out.bias", "transformer_blocks.1.attn.to_add_out.bias"]
    for k in gone:
        del sd[k]
    sd["transformer_blocks.1.attn.extra.weight"] = torch.zeros(3)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as e:
        load_transformer(path)
    msg = str(e.value)
    assert str(path) in msg and "2 missing" in msg and all(f"`{k}`" in msg for k in gone)
    assert "1 unexpected" in msg and "transformer_blocks.1.attn.extra.weight" in msg


def test_many_missing_keys_list_at_most_ten(tmp_path):
    path = tmp_path / "lens_block1_gone.safetensors"
    sd = {k: v for k, v in FP32.items() if not k.startswith("transformer_blocks.1.") or "norm" in k}
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as e:
        load_transformer(path)
    msg = str(e.value)
    assert "missing key(s)" in msg and "more" in msg
    assert msg.count("`transformer_blocks.1.") <= 10


def test_wrong_shape_is_reported(tmp_path):
    path = tmp_path / "lens_shape.safetensors"
    sd = dict(FP32)
    sd["transformer_blocks.0.img_mod.1.bias"] = torch.zeros(700)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"img_mod\.1\.bias.*\[700\].*\[768\]"):
        load_transformer(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "lens_truncated.safetensors"
    save_file(dict(FP32), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated|shorter"):
        load_transformer(path)


def test_failed_load_keeps_nothing(monkeypatch):
    """An error in the middle of reading leaves no real tensor in the half-built model."""
    calls = {"n": 0}
    real_read = TensorSource.read

    def failing_read(self, key, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError("disk went away")
        return real_read(self, key, *args, **kwargs)

    monkeypatch.setattr(TensorSource, "read", failing_read)
    try:
        load_transformer(GOLDEN / "transformer")
    except (OSError, RuntimeError) as err:
        assert "disk went away" in str(err)
        tb = err.__traceback__
        models = []
        while tb is not None:
            m = tb.tb_frame.f_locals.get("model")
            if isinstance(m, LensTransformer):
                models.append(m)
            tb = tb.tb_next
        assert models
        for m in models:
            assert all(t.is_meta for t in m.state_dict().values())
    else:
        pytest.fail("load_transformer did not raise")


def test_chunked_fp8_quantiser_matches_reference():
    w = torch.randn(300, 96) * 0.1
    w[7, 3] = 5.0
    a8, a_scale = quant.quantize_float8(w, chunk_elements=1000)  # 10 rows per chunk
    ref_scale = torch.tensor(5.0) / 448.0  # amax / 448 in fp32
    ref8 = (w / ref_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)  # whole matrix at once
    assert torch.equal(a8.view(torch.uint8), ref8.view(torch.uint8)) and torch.equal(a_scale, ref_scale)
    z8, z_scale = quant.quantize_float8(torch.zeros(4, 4))
    assert z_scale.item() == 1.0 and z8.float().eq(0).all()


# -- memory-mapped loading --------------------------------------------------------------------------

def _load_without_mapping(monkeypatch, *args, **kw) -> LensTransformer:
    """load_transformer with every tensor copied out of the file's map into private memory."""
    real_read = TensorSource.read

    def copied(self, key, *args, **kwargs):
        return real_read(self, key, *args, **kwargs).clone()

    with monkeypatch.context() as m:
        m.setattr(TensorSource, "read", copied)
        return load_transformer(*args, **kw)


def _file_backing(t: torch.Tensor) -> str | None:
    """The file a tensor's memory belongs to (from /proc/self/maps), or None for anonymous memory."""
    addr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= addr < hi:
                path = parts[5] if len(parts) > 5 else ""
                return path if path.startswith("/") else None
    return None


def _quant_files(tmp_path) -> dict[str, Path]:
    mx = tmp_path / "lens_mxfp8.safetensors"
    write_safetensors(mx, mxfp8_state_dict(PREFIX))
    f8 = tmp_path / "lens_fp8.safetensors"
    sd = {}
    for k, v in FP32.items():
        layer = k.rsplit(".", 1)[0]
        if layer in MXFP8_LAYERS and k.endswith(".weight"):
            sd[k], sd[layer + ".weight_scale"] = quant.quantize_float8(v)
            sd[layer + ".comfy_quant"] = writers.comfy_quant_tensor({"format": "float8_e4m3fn"})
        else:
            sd[k] = v.to(torch.bfloat16)
    write_safetensors(f8, sd)
    return {"mxfp8": mx, "fp8": f8}


@pytest.mark.parametrize(
    "what, dtype, kw",
    [
        ("folder", None, {}),  # fp32 -> fp32: mapped
        ("bf16", None, {}),  # bf16 -> bf16: mapped
        ("bf16", torch.float32, {}),  # cast: converted block by block
        ("folder", torch.bfloat16, {}),
        ("mxfp8", None, {}),
        ("mxfp8", torch.float32, {}),
        ("fp8", None, {}),
        ("bf16", None, {"weight_dtype": "fp8"}),
    ],
)
def test_mapped_load_equals_in_memory_load_bitwise(tmp_path, monkeypatch, what, dtype, kw):
    paths = {"folder": GOLDEN / "transformer", "bf16": GOLDEN / "lens_tiny_comfy_bf16.safetensors"}
    if what not in paths:
        paths.update(_quant_files(tmp_path))
    mapped = load_transformer(paths[what], dtype=dtype, **kw)
    read = _load_without_mapping(monkeypatch, paths[what], dtype=dtype, **kw)
    sa, sb = mapped.state_dict(), read.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k].reshape(-1).view(torch.uint8), sb[k].reshape(-1).view(torch.uint8)), k
    assert [type(m) for m in mapped.modules()] == [type(m) for m in read.modules()]
    out_a, _ = run_case(mapped, 0)
    out_b, _ = run_case(read, 0)
    assert torch.equal(out_a, out_b)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/maps")
def test_same_dtype_cpu_weights_live_in_the_file(tmp_path):
    path = tmp_path / "lens_turbo_bf16.safetensors"
    shutil.copy(GOLDEN / "lens_tiny_comfy_bf16.safetensors", path)
    model = load_transformer(path)
    w = model.transformer_blocks[1].img_mlp.w2.weight
    assert _file_backing(w) == str(path)
    assert _file_backing(model.txt_norm[0].weight) == str(path)
    before = w.clone()
    out_before, _ = run_case(model, 0)
    # replacing the file (new inode, as downloaders do) leaves the loaded model untouched
    other = {k: torch.zeros_like(v) for k, v in load_file(str(path)).items()}
    save_file(other, str(tmp_path / "new.safetensors"))
    (tmp_path / "new.safetensors").replace(path)
    assert torch.equal(w, before)
    assert torch.equal(run_case(model, 0)[0], out_before)
    # a cast (bf16 file -> fp32 model) is converted into private memory
    as_fp32 = load_transformer(GOLDEN / "lens_tiny_comfy_bf16.safetensors", dtype=torch.float32)
    assert _file_backing(as_fp32.transformer_blocks[1].img_mlp.w2.weight) is None


def test_misaligned_tensors_are_read_correctly(tmp_path):
    """safetensors does not align tensors: a bf16 tensor after an odd-length uint8 one starts at an
    odd file offset and still reads back as written, in memory aligned for its dtype."""
    path = tmp_path / "lens_odd.safetensors"
    sd = {"aaa_odd": torch.arange(3, dtype=torch.uint8)}  # written first: shifts every later tensor by 3
    sd.update({k: v.to(torch.bfloat16) for k, v in FP32.items()})
    write_safetensors(path, sd)
    data = path.read_bytes()
    src = open_checkpoint(path, "dit")
    odd = [k for k in src.keys() if k != "aaa_odd" and sd[k].numel() > 8
           and data.find(sd[k].view(torch.uint8).numpy().tobytes()) % 2]
    assert odd  # the fixture really has misaligned tensors
    for k in odd[:3]:
        t = src.read(k)
        assert t.data_ptr() % 2 == 0 and torch.equal(t, sd[k])
