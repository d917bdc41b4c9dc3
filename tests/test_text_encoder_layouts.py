"""Text-encoder checkpoint layouts (ComfyUI NVFP4, HF MXFP4, OpenAI original, HF dense) built from the golden tiny weights, plus the
loader's error messages. Quantised layouts are compared with the same model run on its own
dequantised weights (written as a plain fp32 file); lossless layouts must match exactly."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GOLDEN
import writers
from lens_model import ops, quant
from lens_model import tokenizer as tok
from lens_model.checkpoints import CheckpointError, open_checkpoint
from lens_model.gpt_oss import GptOssConfig, GptOssDecoderLayer
from lens_model.gpt_oss_checkpoints import GptOssCheckpoint
from lens_model.text_encoder import inspect_text_encoder, load_text_encoder
from test_text_encoder import _one_thread, save_st  # noqa: F401  (_one_thread: autouse fixture)

TE_DIR = GOLDEN / "text_encoder"
CONFIG = json.loads((TE_DIR / "config.json").read_text())
L = CONFIG["num_hidden_layers"]




def golden_sd_dict():
    sd = load_file(str(TE_DIR / "model.safetensors"))
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def golden_sd():
    return golden_sd_dict()


@pytest.fixture(scope="module")
def ids_mask():
    cases = load_file(str(GOLDEN / "text_encoder_cases.safetensors"))
    return cases["input_ids"], cases["attention_mask"]


def _write_folder(folder, tensors, config=CONFIG, name="model.safetensors", metadata=None):
    folder.mkdir(parents=True, exist_ok=True)
    save_st(tensors, folder / name, metadata)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder / name


def _encode(path, ids_mask, **kw):
    te = load_text_encoder(path, dtype=torch.float32, device="cpu", **kw)
    return te, te.encode_ids(*ids_mask)


def _dense_reference(tmp_path, sd, banks_oi: dict, attn: dict | None = None):
    """Write the HF-dense layout with expert banks replaced by ``banks_oi`` ([E, out, in]) -> path."""
    ref = dict(sd)
    for key, w in banks_oi.items():
        ref[key] = w.transpose(1, 2).contiguous()
    ref.update(attn or {})
    return _write_folder(tmp_path / "reference" / "text_encoder", {"model." + k: v for k, v in ref.items()})


def _assert_same(a, b, exact=False):
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


# -- (a) ComfyUI NVFP4 ------------------------------------------------------------------------------


def build_comfy_nvfp4(sd, scale_dtype="f8", global_scale="vector", marker="tensor", quant_attn=False):
    """ComfyUI layout from HF-dense weights -> (tensors, metadata, dequantised banks [E,out,in], attn weights)."""
    out, banks, attn, meta_layers = {}, {}, {}, {}
    for k, v in sd.items():
        if ".mlp.experts." in k or k == "lm_head.weight":
            continue
        out[k] = v
    for i in range(L):
        for bank in ("gate_up_proj", "down_proj"):
            base = f"layers.{i}.mlp.experts.{bank}"
            w = sd[base].transpose(1, 2).contiguous()  # [E, out, in]
            codes, scales, g = writers.quantize_nvfp4(w)
            if global_scale == "scalar":
                g = g.mean().reshape(())
            out[f"{base}.weight"] = codes
            out[f"{base}.weight_scale"] = scales.view(torch.float8_e4m3fn) if scale_dtype == "f8" else scales
            out[f"{base}.weight_scale_2"] = g
            out[f"{base}.bias"] = sd[f"{base}_bias"]
            if marker == "tensor":
                out[f"{base}.comfy_quant"] = writers.comfy_quant_tensor({"format": "nvfp4", "num_experts": w.shape[0]})
            else:
                meta_layers[base] = {"format": "nvfp4"}
            banks[base] = quant.dequantize_nvfp4(codes, scales, g, w.shape[1], w.shape[2], torch.float32)
    if quant_attn:  # per-layer markers on attention Linears of layer 1
        p = "layers.1.self_attn."
        w = sd[p + "q_proj.weight"]
        codes, scales, g = writers.quantize_nvfp4(w[None])
        out[p + "q_proj.weight"], out[p + "q_proj.weight_scale"], out[p + "q_proj.weight_scale_2"] = codes[0], scales[0], g[0]
        out[p + "q_proj.comfy_quant"] = writers.comfy_quant_tensor({"format": "nvfp4"})
        attn[p + "q_proj.weight"] = quant.dequantize_nvfp4(codes[0], scales[0], g[0], *w.shape, torch.float32)
        w = sd[p + "k_proj.weight"]
        f8, sc = writers.quantize_mxfp8(w)
        out[p + "k_proj.weight"], out[p + "k_proj.weight_scale"] = f8, sc
        out[p + "k_proj.comfy_quant"] = writers.comfy_quant_tensor({"format": "mxfp8"})
        attn[p + "k_proj.weight"] = quant.dequantize_mxfp8(f8, sc, *w.shape, torch.float32)
        w = sd[p + "o_proj.weight"]
        f8, s = quant.quantize_float8(w)
        out[p + "o_proj.weight"], out[p + "o_proj.weight_scale"] = f8, s
        out[p + "o_proj.comfy_quant"] = writers.comfy_quant_tensor({"format": "float8_e4m3fn"})
        attn[p + "o_proj.weight"] = quant.dequantize_float8(f8, s, torch.float32)
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": meta_layers})} if meta_layers else None
    return out, metadata, banks, attn


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(scale_dtype="u8", global_scale="scalar"),
        dict(marker="metadata", quant_attn=True),
    ],
    ids=["f8-scales+vector-g", "u8-scales+0d-g", "metadata-marker+quantised-attention"],
)
def test_comfy_nvfp4_matches_its_own_dequantised_weights(tmp_path, golden_sd, ids_mask, variant):
    tensors, metadata, banks, attn = build_comfy_nvfp4(golden_sd, **variant)
    assert not any(k.startswith("model.") for k in tensors)
    path = _write_folder(tmp_path / "comfy", tensors, name="gpt_oss_tiny_nvfp4.safetensors", metadata=metadata)
    te, got = _encode(path, ids_mask)
    assert (te.checkpoint.layout, te.checkpoint.expert_format) == ("comfy", "nvfp4")
    _, ref = _encode(_dense_reference(tmp_path, golden_sd, banks, attn), ids_mask)
    _assert_same(got, ref)
    # lossy: close to, but not equal to, the golden fp32 model
    _, golden = _encode(TE_DIR, ids_mask)
    assert not torch.equal(got[3], golden[3])


# -- (b) HF MXFP4 sharded folder, (c) OpenAI original -------------------------------------------------


@pytest.mark.parametrize("offload", ["stream", "device", "layers"])
def test_layers_run_as_modules_with_ops_linears_and_hold_no_weights_after(tmp_path, golden_sd, ids_mask, offload,
                                                                           monkeypatch):
    """Each layer runs as an nn.Module whose projections are the ops seam's layers (a QuantLinear for a
    quantised projection, ops.Linear for a plain one); its weights are assigned just before it runs
    and released after, in every offload mode (the module is back on the meta device)."""
    tensors, metadata, _, _ = build_comfy_nvfp4(golden_sd, marker="metadata", quant_attn=True)
    path = _write_folder(tmp_path / "comfy", tensors, name="te.safetensors", metadata=metadata)
    seen = {}
    forward = GptOssDecoderLayer.forward

    def recording(self, h, *args):
        attn = self.self_attn
        seen[self.index] = {name: (type(getattr(attn, name)), getattr(attn, name).weight.is_meta)
                            for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        seen[self.index]["banks"] = (self.mlp.experts.gate_up_proj is not None, self.mlp.experts.down_proj is not None)
        return forward(self, h, *args)

    monkeypatch.setattr(GptOssDecoderLayer, "forward", recording)
    te, _ = _encode(path, ids_mask, offload=offload)
    assert sorted(seen) == list(range(te.num_layers_run))
    assert seen[1]["q_proj"] == (ops.QuantLinear, False) and seen[1]["o_proj"] == (ops.QuantLinear, False)
    assert seen[1]["v_proj"] == (ops.Linear, False) and seen[0]["q_proj"] == (ops.Linear, False)
    assert all(v["banks"] == (True, True) for v in seen.values())
    for layer in te.model.layers:
        assert all(p.is_meta for p in layer.parameters())
        assert type(layer.self_attn.q_proj) is ops.Linear
        assert layer.mlp.experts.gate_up_proj is None and layer.mlp.experts.down_proj is None


def build_mxfp4_banks(sd):
    q, deq = {}, {}
    for i in range(L):
        for bank in ("gate_up_proj", "down_proj"):
            base = f"layers.{i}.mlp.experts.{bank}"
            w = sd[base].transpose(1, 2).contiguous()
            blocks, scales = writers.quantize_mxfp4(w)
            q[base] = (blocks, scales)
            deq[base] = quant.dequantize_mxfp4(blocks, scales, torch.float32)
    return q, deq


def write_hf_mxfp4_sharded(folder, sd, qbanks):
    tensors = {}
    for k, v in sd.items():
        if ".mlp.experts." in k:
            continue
        tensors[k if k == "lm_head.weight" else "model." + k] = v
    for base, (blocks, scales) in qbanks.items():
        tensors[f"model.{base}_blocks"] = blocks
        tensors[f"model.{base}_scales"] = scales
        tensors[f"model.{base}_bias"] = sd[f"{base}_bias"]
    folder.mkdir(parents=True)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, ks in shards.items():
        save_st({k: tensors[k] for k in ks}, folder / name)
        weight_map.update({k: name for k in ks})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = dict(CONFIG, quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def write_openai_original(folder, sd, qbanks):
    t = {"embedding.weight": sd["embed_tokens.weight"], "norm.scale": sd["norm.weight"], "unembedding.weight": sd["lm_head.weight"]}
    for i in range(L):
        p, b = f"layers.{i}.", f"block.{i}."
        t[b + "attn.norm.scale"] = sd[p + "input_layernorm.weight"]
        t[b + "mlp.norm.scale"] = sd[p + "post_attention_layernorm.weight"]
        t[b + "attn.qkv.weight"] = torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        t[b + "attn.qkv.bias"] = torch.cat([sd[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        t[b + "attn.sinks"] = sd[p + "self_attn.sinks"]
        t[b + "attn.out.weight"] = sd[p + "self_attn.o_proj.weight"]
        t[b + "attn.out.bias"] = sd[p + "self_attn.o_proj.bias"]
        t[b + "mlp.gate.weight"] = sd[p + "mlp.router.weight"]
        t[b + "mlp.gate.bias"] = sd[p + "mlp.router.bias"]
        for bank, mlp in (("gate_up_proj", "mlp1"), ("down_proj", "mlp2")):
            blocks, scales = qbanks[f"layers.{i}.mlp.experts.{bank}"]
            t[b + f"mlp.{mlp}_weight.blocks"] = blocks
            t[b + f"mlp.{mlp}_weight.scales"] = scales
            t[b + f"mlp.{mlp}_bias"] = sd[p + f"mlp.experts.{bank}_bias"]
    c = CONFIG
    openai_cfg = {
        "num_hidden_layers": c["num_hidden_layers"], "num_experts": c["num_local_experts"],
        "experts_per_token": c["num_experts_per_tok"], "vocab_size": c["vocab_size"], "hidden_size": c["hidden_size"],
        "intermediate_size": c["intermediate_size"], "swiglu_limit": 7.0, "head_dim": c["head_dim"],
        "num_attention_heads": c["num_attention_heads"], "num_key_value_heads": c["num_key_value_heads"],
        "sliding_window": c["sliding_window"], "initial_context_length": 4096, "rope_theta": 150000,
        "rope_scaling_factor": 32.0, "rope_ntk_alpha": 1, "rope_ntk_beta": 32,
    }
    return _write_folder(folder, t, config=openai_cfg)


def test_hf_mxfp4_sharded_and_openai_original(tmp_path, golden_sd, ids_mask):
    qbanks, deq = build_mxfp4_banks(golden_sd)
    hf = write_hf_mxfp4_sharded(tmp_path / "gpt-oss-tiny", golden_sd, qbanks)
    te, got = _encode(hf, ids_mask)
    assert (te.checkpoint.layout, te.checkpoint.expert_format) == ("hf", "mxfp4")
    _, ref = _encode(_dense_reference(tmp_path, golden_sd, deq), ids_mask)
    _assert_same(got, ref)
    # a single shard names the whole set through the index beside it
    _, via_shard = _encode(hf / "model-00002-of-00002.safetensors", ids_mask)
    _assert_same(via_shard, got, exact=True)
    # OpenAI names, fused qkv, same MXFP4 bytes: identical numbers
    orig = write_openai_original(tmp_path / "gpt-oss-tiny" / "original", golden_sd, qbanks)
    te_o, got_o = _encode(orig, ids_mask)
    assert te_o.checkpoint.layout == "openai" and te_o.config == te.config
    _assert_same(got_o, got, exact=True)


# -- (d) plain bf16 / fp32 ---------------------------------------------------------------------------


def test_bare_bf16_dense_equals_fp32_with_bf16_rounded_weights(tmp_path, golden_sd, ids_mask):
    bf = {k: v.bfloat16() for k, v in golden_sd.items() if k != "lm_head.weight"}
    path = _write_folder(tmp_path / "bf16", bf, name="gpt_oss_tiny_bf16.safetensors")
    te, got = _encode(path, ids_mask)
    assert (te.checkpoint.layout, te.checkpoint.expert_format) == ("hf_dense", "dense_io")
    rounded = _write_folder(tmp_path / "rounded" / "text_encoder", {"model." + k: v.float() for k, v in bf.items()})
    _, ref = _encode(rounded, ids_mask)
    _assert_same(got, ref, exact=True)


def test_dense_linear_orientation_weight_banks(tmp_path, golden_sd, ids_mask):
    """A ComfyUI-style bf16/fp32 export: `.weight` banks in [E, out, in] with `.bias`, no marker."""
    t = {}
    for k, v in golden_sd.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            t[k + ".weight"] = v.transpose(1, 2).contiguous()
        elif k.endswith("_proj_bias") and ".experts." in k:
            t[k[: -len("_bias")] + ".bias"] = v
        elif k != "lm_head.weight":
            t[k] = v
    te, got = _encode(_write_folder(tmp_path / "oi", t, name="te.safetensors"), ids_mask)
    assert te.checkpoint.expert_format == "dense_oi"
    _, ref = _encode(TE_DIR, ids_mask)
    _assert_same(got, ref)


# -- errors ------------------------------------------------------------------------------------------


def test_dit_and_vae_in_the_text_encoder_slot():
    with pytest.raises(CheckpointError, match="diffusion model"):
        load_text_encoder(GOLDEN / "transformer", device="cpu")
    with pytest.raises(CheckpointError, match="VAE"):
        load_text_encoder(GOLDEN / "vae", device="cpu")


@pytest.fixture(scope="module")
def comfy_tensors(golden_sd):
    return build_comfy_nvfp4(golden_sd)[0]


def test_bank_without_marker_is_refused(tmp_path, comfy_tensors):
    t = {k: v for k, v in comfy_tensors.items() if k != "layers.3.mlp.experts.down_proj.comfy_quant"}
    path = _write_folder(tmp_path / "m", t, name="te.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.3\.mlp\.experts\.down_proj.*no `comfy_quant`"):
        load_text_encoder(path, device="cpu")


def test_missing_bias_is_refused(tmp_path, comfy_tensors):
    t = {k: v for k, v in comfy_tensors.items() if k != "layers.0.mlp.experts.gate_up_proj.bias"}
    path = _write_folder(tmp_path / "b", t, name="te.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.experts\.gate_up_proj.*no bias"):
        load_text_encoder(path, device="cpu")


def test_truncated_file_is_refused(tmp_path, comfy_tensors):
    path = _write_folder(tmp_path / "t", comfy_tensors, name="te.safetensors")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match="truncated|incomplete"):
        load_text_encoder(path, device="cpu")


def test_unsupported_and_mis_stored_attention_formats(tmp_path, comfy_tensors):
    t = dict(comfy_tensors)
    t["layers.2.self_attn.q_proj.comfy_quant"] = writers.comfy_quant_tensor({"format": "int8_tensorwise"})
    with pytest.raises(CheckpointError, match="int8_tensorwise.*not support"):
        load_text_encoder(_write_folder(tmp_path / "u", t, name="te.safetensors"), device="cpu")
    t = dict(comfy_tensors)
    w = t["layers.2.self_attn.k_proj.weight"]
    f8, sc = writers.quantize_mxfp8(w)
    t["layers.2.self_attn.k_proj.weight"] = f8.view(torch.uint8)
    t["layers.2.self_attn.k_proj.weight_scale"] = sc
    t["layers.2.self_attn.k_proj.comfy_quant"] = writers.comfy_quant_tensor({"format": "mxfp8"})
    with pytest.raises(CheckpointError, match="mxfp8.*stored as U8"):
        load_text_encoder(_write_folder(tmp_path / "w", t, name="te.safetensors"), device="cpu")


@pytest.mark.parametrize("fmt", ["mxfp8", "float8_e4m3fn"])
def test_attention_scales_are_checked_at_load_like_the_dit(tmp_path, comfy_tensors, fmt):
    """A quantised q/k/v/o layer gets the DiT's checks from its headers, before any layer is read
    (the streamed mode reads no layer at load): here a scale of the wrong shape."""
    t = dict(comfy_tensors)
    w = t["layers.2.self_attn.k_proj.weight"]
    f8, sc = writers.quantize_mxfp8(w) if fmt == "mxfp8" else quant.quantize_float8(w)
    t["layers.2.self_attn.k_proj.weight"] = f8
    t["layers.2.self_attn.k_proj.weight_scale"] = torch.ones(3, dtype=torch.uint8 if fmt == "mxfp8" else torch.float32)
    t["layers.2.self_attn.k_proj.comfy_quant"] = writers.comfy_quant_tensor({"format": fmt})
    path = _write_folder(tmp_path / "s", t, name="te.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.2\.self_attn\.k_proj\.weight_scale` has shape \[3\]"):
        load_text_encoder(path, device="cpu", offload="stream")


def test_shapes_are_checked_against_the_config(tmp_path, comfy_tensors):
    path = _write_folder(tmp_path / "c", comfy_tensors, name="te.safetensors", config=dict(CONFIG, num_local_experts=8))
    with pytest.raises(CheckpointError, match="do not match the gpt-oss config"):
        load_text_encoder(path, device="cpu")


def test_no_tokenizer_anywhere(tmp_path, comfy_tensors, monkeypatch):
    path = _write_folder(tmp_path / "nt", comfy_tensors, name="te.safetensors")
    monkeypatch.setattr(tok, "FALLBACK_RANKS_PATH", tmp_path / "missing" / "o200k_base.tiktoken.gz")
    with pytest.raises(FileNotFoundError, match="No tokenizer found"):
        load_text_encoder(path, device="cpu")


# -- config inference for a full-size single file (sparse, header only) -----------------------------


def _sparse_safetensors(path, specs: dict[str, tuple[str, tuple[int, ...]]], metadata=None):
    """A safetensors file with the given header whose data is a hole (no disk space, zeros)."""
    sizes = {"BF16": 2, "F32": 4, "U8": 1, "F8_E4M3": 1}
    header, off = ({"__metadata__": metadata} if metadata else {}), 0
    for k, (dt, shape) in specs.items():
        n = sizes[dt]
        for s in shape:
            n *= s
        header[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)


def test_full_size_config_is_inferred_from_a_comfy_file(tmp_path):
    e, layers = 2880, 24
    specs = {"embed_tokens.weight": ("BF16", (201088, e)), "norm.weight": ("BF16", (e,))}
    for i in range(layers):
        p = f"layers.{i}."
        specs.update({
            p + "input_layernorm.weight": ("BF16", (e,)), p + "post_attention_layernorm.weight": ("BF16", (e,)),
            p + "self_attn.q_proj.weight": ("BF16", (4096, e)), p + "self_attn.q_proj.bias": ("BF16", (4096,)),
            p + "self_attn.k_proj.weight": ("BF16", (512, e)), p + "self_attn.k_proj.bias": ("BF16", (512,)),
            p + "self_attn.v_proj.weight": ("BF16", (512, e)), p + "self_attn.v_proj.bias": ("BF16", (512,)),
            p + "self_attn.o_proj.weight": ("BF16", (e, 4096)), p + "self_attn.o_proj.bias": ("BF16", (e,)),
            p + "self_attn.sinks": ("BF16", (64,)),
            p + "mlp.router.weight": ("BF16", (32, e)), p + "mlp.router.bias": ("BF16", (32,)),
        })
        for bank, rows, srows in (("gate_up_proj", 5760, 5760), ("down_proj", 2880, 2944)):
            b = p + f"mlp.experts.{bank}"
            specs.update({
                b + ".weight": ("U8", (32, rows, 1440)), b + ".weight_scale": ("F8_E4M3", (32, srows, 180)),
                b + ".weight_scale_2": ("F32", (32,)), b + ".bias": ("BF16", (32, rows)),
            })
    path = tmp_path / "gpt_oss_20b_nvfp4.safetensors"
    meta_layers = {f"layers.{i}.mlp.experts.{b}": {"format": "nvfp4"} for i in range(layers) for b in ("gate_up_proj", "down_proj")}
    _sparse_safetensors(path, specs, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": meta_layers})})
    ck = GptOssCheckpoint(open_checkpoint(path, "te"))
    cfg = GptOssConfig.infer(ck)
    assert cfg == GptOssConfig()  # gpt-oss-20b
    ck.validate(cfg)
    assert ck.layout == "comfy" and ck.expert_format == "nvfp4"


def test_inspect_text_encoder_reads_headers_and_checks_shapes(tmp_path):
    cfg = inspect_text_encoder(GOLDEN / "text_encoder")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_local_experts) == (64, 24, 4)
    sd = load_file(str(GOLDEN / "text_encoder" / "model.safetensors"))
    sd["model.layers.3.self_attn.q_proj.weight"] = torch.zeros(60, 64)
    bad = tmp_path / "te"
    bad.mkdir()
    save_file(sd, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((GOLDEN / "text_encoder" / "config.json").read_text())
    with pytest.raises(Exception, match="q_proj"):
        inspect_text_encoder(bad)
