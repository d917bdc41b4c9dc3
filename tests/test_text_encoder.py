"""gpt-oss text encoder: golden parity, transformers parity, masks, sinks, RoPE, dequantisation, API."""

from __future__ import annotations

import json
import math
import threading
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GOLDEN
import writers
from lens_model import ops, quant
from lens_model.gpt_oss import GptOssConfig, GptOssEmbedding, attention_bias, sink_attention, yarn_inv_freq
from lens_model.gpt_oss_checkpoints import GptOssCheckpoint, LayerWeights
from lens_model.ops import CastWorkspace, ExpertBank
from lens_model.text_encoder import ExpertPool, load_text_encoder, resolve_dtype

TE_DIR = GOLDEN / "text_encoder"


def save_st(tensors, path, metadata=None):
    """safetensors.save_file with optional metadata."""
    save_file(tensors, str(path), metadata=dict(metadata) if metadata else None)


@pytest.fixture(autouse=True)
def _one_thread():
    """The test box is shared; one intra-op thread keeps these tiny ops fast and deterministic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cases():
    return load_file(str(GOLDEN / "text_encoder_cases.safetensors"))


@pytest.fixture(scope="module")
def golden_te():
    return load_text_encoder(TE_DIR, dtype=torch.float32, device="cpu")


# -- golden --------------------------------------------------------------------------------------


@pytest.mark.parametrize("offload", ["stream", "device", "layers"])
def test_golden_all_layers_all_positions(cases, offload):
    te = load_text_encoder(TE_DIR, dtype=torch.float32, device="cpu", offload=offload)
    assert te.selected_layers == (5, 11, 17, 23)
    feats = te.encode_ids(cases["input_ids"], cases["attention_mask"])
    assert len(feats) == 4
    for layer, got in enumerate(feats):
        expected = cases[f"expected_layer.{layer}"]
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_offload_modes_give_identical_numbers(cases):
    outs = []
    for offload in ("stream", "device", "layers"):
        te = load_text_encoder(TE_DIR, dtype=torch.float32, device="cpu", offload=offload)
        outs.append(te.encode_ids(cases["input_ids"], cases["attention_mask"]))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stream_mode_copies_layers_on_the_callers_cuda_stream(cases, monkeypatch):
    """The reader thread of offload="stream" must move weights on the stream the forward runs on."""
    seen = []
    to = LayerWeights.to

    def recording_to(self, device, non_blocking=False):
        seen.append(torch.cuda.current_stream())
        return to(self, device, non_blocking=non_blocking)

    monkeypatch.setattr(LayerWeights, "to", recording_to)
    te = load_text_encoder(TE_DIR, dtype=torch.float32, device="cuda", offload="stream")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        feats = te.encode_ids(cases["input_ids"], cases["attention_mask"])
        torch.testing.assert_close(feats[-1].cpu(), cases["expected_layer.3"], atol=1e-4, rtol=1e-4)
    assert seen and all(s == side for s in seen)


def test_padded_row_is_finite_and_matches_row_alone(cases, golden_te):
    ids, mask = cases["input_ids"], cases["attention_mask"]
    feats = golden_te.encode_ids(ids, mask)
    n_real = int(mask[1].sum())
    assert n_real == 9
    alone = golden_te.encode_ids(ids[1:2, :n_real], mask[1:2, :n_real])
    for full, single in zip(feats, alone):
        assert torch.isfinite(full).all()
        torch.testing.assert_close(full[1:2, :n_real], single, atol=1e-5, rtol=1e-5)


def test_never_reads_lm_head_or_final_norm(golden_te, cases, monkeypatch):
    read, rows = [], []
    src = golden_te.checkpoint.source
    orig_read, orig_rows, orig_map = type(src).read, type(src).read_rows, GptOssCheckpoint._read
    monkeypatch.setattr(type(src), "read", lambda self, key, *a, **k: read.append(key) or orig_read(self, key, *a, **k))
    monkeypatch.setattr(type(src), "read_rows", lambda self, key, *a, **k: rows.append(key) or orig_rows(self, key, *a, **k))
    monkeypatch.setattr(GptOssCheckpoint, "_read", lambda self, key, *a, **k: read.append(key) or orig_map(self, key, *a, **k))
    golden_te.encode_ids(cases["input_ids"][:1, :4], cases["attention_mask"][:1, :4])
    assert read and not any(k.startswith(("lm_head", "norm.")) for k in read)
    assert "embed_tokens.weight" not in read and rows == ["embed_tokens.weight"]  # rows only


def test_token_embedding_is_a_module_without_a_table(golden_te):
    """model.embed_tokens holds no weight; its rows come from the file through the row reader."""
    emb = golden_te.model.embed_tokens
    assert isinstance(emb, GptOssEmbedding) and not list(emb.parameters()) and not list(emb.buffers())
    table = load_file(str(TE_DIR / "model.safetensors"))["model.embed_tokens.weight"]
    ids = torch.tensor([[5, 0, 511], [7, 7, 2]])
    assert torch.equal(emb(ids), table[ids])
    bare = GptOssEmbedding(golden_te.config)
    with pytest.raises(RuntimeError, match="no row_reader"):
        bare(ids)
    bare.row_reader = lambda i: torch.zeros(*i.shape, 3)
    with pytest.raises(ValueError, match="expected"):
        bare(ids)


def test_stops_after_last_selected_layer(cases):
    te = load_text_encoder(TE_DIR, dtype=torch.float32, device="cpu", selected_layers=(1, 3))
    seen = []
    te.encode_ids(cases["input_ids"][:1, :5], None, callback=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (4, 4) and len(seen) == 4


# -- transformers parity on a tiny random config ----------------------------------------------------


def _random_gpt_oss(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers import GptOssConfig as HFConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssModel

    cfg = HFConfig(
        vocab_size=97, hidden_size=32, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=5, num_experts_per_tok=3, sliding_window=3,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": False},
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = GptOssModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "sinks" in name or name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.3 if "embed" not in name else 1.0))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    save_st({"model." + k: v for k, v in sd.items()}, folder / "model.safetensors")
    cfg.to_json_file(str(folder / "config.json"))
    return model, folder, transformers


def test_matches_transformers_gpt_oss_with_padding(tmp_path):
    model, folder, _ = _random_gpt_oss(tmp_path)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    captured = {}
    hooks = [layer.register_forward_hook(lambda m, inp, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out))
             for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in hooks:
        h.remove()
    te = load_text_encoder(folder, dtype=torch.float32, device="cpu", selected_layers=(0, 1, 2, 3))
    assert te.config.sliding_window == 3 and te.config.num_experts_per_tok == 3
    ours = te.encode_ids(ids, mask)
    for i in range(4):
        ref = captured[i]
        # real tokens always; padded query positions too (keys-only masking on both sides)
        torch.testing.assert_close(ours[i], ref, atol=2e-5, rtol=2e-5)


# -- masks, sinks, rope ---------------------------------------------------------------------------


def test_sliding_window_edge():
    s, w = 300, 128
    bias = attention_bias(torch.ones(1, s, dtype=torch.long), w)[0]
    i = 250
    assert bias[i, i - 127] == 0 and bias[i, i] == 0
    assert bias[i, i - 128] == float("-inf")
    assert bias[i, i + 1] == float("-inf")
    full = attention_bias(torch.ones(1, s, dtype=torch.long), None)[0]
    assert full[i, 0] == 0 and full[i, i + 1] == float("-inf")
    cfg = GptOssConfig()
    assert cfg.layer_types[0] == "sliding_attention" and cfg.layer_types[1] == "full_attention"
    assert all(cfg.layer_types[n] == "full_attention" for n in (5, 11, 17, 23))


def test_padding_masks_keys_never_queries():
    mask = torch.tensor([[1, 1, 0, 0]])
    bias = attention_bias(mask, None)[0]
    assert torch.isinf(bias[:, 2:]).all()  # padded keys masked for every query
    assert (bias[3, :2] == 0).all()  # a padded query still sees the real keys


def test_sinks_large_positive_gives_zero_and_large_negative_is_plain_softmax():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 6, 8)
    k = torch.randn(1, 2, 6, 8)
    v = torch.randn(1, 2, 6, 8)
    bias = attention_bias(torch.ones(1, 6, dtype=torch.long), None)
    out = sink_attention(q, k, v, torch.full((4,), 80.0), bias, 8 ** -0.5)
    assert out.abs().max() < 1e-20
    out = sink_attention(q, k, v, torch.full((4,), -1e4), bias, 8 ** -0.5)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_fully_masked_row_gives_zero_not_nan():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    bias = torch.full((1, 3, 3), float("-inf"))
    out = sink_attention(q, k, v, torch.tensor([0.3, -0.2]), bias, 0.5)
    assert torch.equal(out, torch.zeros_like(out))


def test_yarn_values_from_spec():
    inv, amp = yarn_inv_freq(GptOssConfig())
    assert amp == pytest.approx(1.3465736, abs=1e-6)
    assert inv[1].item() == pytest.approx(0.6890443, rel=1e-6)
    assert inv[31].item() == pytest.approx(3.023511e-7, rel=1e-5)
    # low / high of the ramp for d = 64 and d = 16
    for d, low, high in ((64, 8.09278, 17.39802), (16, 2.0232, 4.3495)):
        corr = lambda n: d * math.log(4096 / (2 * math.pi * n)) / (2 * math.log(150000))  # noqa: E731
        assert corr(32) == pytest.approx(low, abs=1e-4) and corr(1) == pytest.approx(high, abs=1e-4)
    theta = 150000 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert inv[0].item() == pytest.approx(theta[0].item())  # below `low`: plain theta
    assert inv[20].item() == pytest.approx(theta[20].item() / 32, rel=1e-6)  # above `high`: theta / 32


def test_config_from_4x_rope_scaling_equals_rope_parameters():
    d = json.loads((TE_DIR / "config.json").read_text())
    old = dict(d)
    rope = dict(old.pop("rope_parameters"))
    old["rope_theta"] = rope.pop("rope_theta")
    old["rope_scaling"] = rope
    assert GptOssConfig.from_dict(old) == GptOssConfig.from_dict(d)
    c = GptOssConfig.from_dict(d)
    assert (c.head_dim, c.sliding_window, c.num_experts_per_tok, c.rope_truncate) == (16, 4, 2, False)


def test_fp16_is_refused_with_a_warning():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert resolve_dtype(torch.float16, torch.device("cpu")) == torch.bfloat16
    assert any("fp16" in str(x.message) for x in w)
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32


def test_bf16_runs_and_stays_close(cases):
    te = load_text_encoder(TE_DIR, dtype=torch.bfloat16, device="cpu")
    feats = te.encode_ids(cases["input_ids"][:1], cases["attention_mask"][:1])
    ref = cases["expected_layer.0"][:1]
    assert feats[0].dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(feats[0].float(), ref, dim=-1)
    assert cos.min() > 0.99


# -- dequantisation ---------------------------------------------------------------------------------


def _mxfp4_bank(blocks, scales):
    e, out, g, _ = blocks.shape
    return ExpertBank("mxfp4", e, out, g * 32, torch.zeros(e, out), codes=blocks.reshape(e, out, g * 16), scales=scales)


def test_mxfp4_expert_dequant_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 140, (3, 40, 4), dtype=torch.uint8, generator=gen)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    bank = _mxfp4_bank(blocks, scales)
    for e in range(3):
        assert torch.equal(bank.dequantize(e, torch.float32), ref[e].t())
        assert torch.equal(bank.dequantize(e, torch.bfloat16), ref[e].t().bfloat16())
    assert torch.equal(quant.dequantize_mxfp4(blocks, scales, torch.float32), ref.transpose(1, 2))


def test_mxfp4_hand_checked_byte_low_nibble_first():
    blocks = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0, 0] = 0x2F
    w = _mxfp4_bank(blocks, torch.full((1, 1, 1), 128, dtype=torch.uint8)).dequantize(0)
    assert w[0, 0].item() == -12.0 and w[0, 1].item() == 2.0 and (w[0, 2:] == 0).all()


def _nvfp4_bank(codes, scales, g, out_f, in_f):
    e = codes.shape[0]
    return ExpertBank("nvfp4", e, out_f, in_f, torch.zeros(e, out_f), codes=codes, scales=scales, global_scale=g)


def test_nvfp4_hand_checked_byte_high_nibble_first():
    codes = torch.zeros(1, 1, 8, dtype=torch.uint8)
    codes[0, 0, 0] = 0x2F
    s = torch.zeros(1, 1, 1, dtype=torch.uint8)
    s[0, 0, 0] = torch.tensor(2.0).to(torch.float8_e4m3fn).view(torch.uint8)
    w = _nvfp4_bank(codes, writers.swizzle_scales(s), torch.tensor([0.5]), 1, 16).dequantize(0)
    # element 2j from the high nibble (2 -> 1.0), 2j+1 from the low nibble (F -> -6.0), times 2 * 0.5
    assert w[0, 0].item() == 1.0 and w[0, 1].item() == -6.0 and (w[0, 2:] == 0).all()


@pytest.mark.parametrize("rows,g_shape", [(200, "vector"), (130, "scalar"), (256, "vector")])
def test_nvfp4_expert_dequant_matches_comfy_kitchen(rows, g_shape):
    ck = pytest.importorskip("comfy_kitchen")
    gen = torch.Generator().manual_seed(rows)
    e, cols = 3, 96
    codes = torch.randint(0, 256, (e, rows, cols // 2), dtype=torch.uint8, generator=gen)
    plain = torch.randint(0, 0x7E, (e, rows, cols // 16), dtype=torch.uint8, generator=gen)  # finite e4m3
    scales = writers.swizzle_scales(plain)  # rows padded to a multiple of 128 (200 -> 256 like 2880 -> 2944)
    assert scales.shape[1] == -(-rows // 128) * 128
    g = torch.rand(e, generator=gen) + 0.01 if g_shape == "vector" else torch.tensor(0.37)
    bank = _nvfp4_bank(codes, scales.view(torch.float8_e4m3fn).view(torch.uint8), g, rows, cols)
    flat_bank = _nvfp4_bank(codes, scales.reshape(e, -1), g, rows, cols)
    for x in range(e):
        gx = g[x] if g.dim() else g
        ref = ck.dequantize_nvfp4(codes[x], gx.reshape(()), scales[x].view(torch.float8_e4m3fn), output_type=torch.float32)
        assert torch.equal(bank.dequantize(x), ref)
        assert torch.equal(flat_bank.dequantize(x), ref)
    assert torch.equal(quant.dequantize_nvfp4(codes, scales, g, rows, cols, torch.float32)[1], bank.dequantize(1))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_linear_equals_dense_reference(fmt, dtype, monkeypatch):
    """The chunked CPU kernel (reused buffers, chunks that do not divide the rows) equals dequant + linear."""
    monkeypatch.setattr(ops, "CPU_CHUNK_ROWS", 128)
    gen = torch.Generator().manual_seed(3)
    e, rows, cols = 2, 300, 64
    w = torch.randn(e, rows, cols, generator=gen)
    if fmt == "mxfp4":
        blocks, scales = writers.quantize_mxfp4(w)
        bank = ExpertBank("mxfp4", e, rows, cols, torch.randn(e, rows, generator=gen), codes=blocks.reshape(e, rows, cols // 2), scales=scales)
    else:
        codes, scales, g = writers.quantize_nvfp4(w)
        bank = ExpertBank("nvfp4", e, rows, cols, torch.randn(e, rows, generator=gen), codes=codes, scales=scales, global_scale=g)
    x = torch.randn(7, cols, generator=gen).to(dtype)
    ws = CastWorkspace()
    for ex in range(e):
        dense = bank.dequantize(ex, dtype)
        ref = torch.nn.functional.linear(x.float(), dense.float(), bank.bias[ex].to(dtype).float())
        with torch.inference_mode():  # the workspace's buffers are reused only outside autograd
            got = bank.linear(ex, x, ws)
        assert got.dtype == dtype and got.shape == (7, rows)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
    assert ws.nbytes > 0  # the chunks went through the reused buffers


# -- encode() API with a stand-in tokenizer (the tiny model's vocab is 512) ---------------------------


class _ToyTokenizer:
    """97 prefix ids + one id per character + 22 suffix ids, all below the tiny vocab."""

    def tokenize(self, prompt, date=None, strip_markers=True, **kwargs):
        base = 3 if date in (None, "2026-05-23") else 4
        return [base] * 97 + [10 + (ord(c) % 400) for c in prompt] + [2] * 22


def test_encode_drops_prefix_pads_and_handles_empty(cases):
    te = load_text_encoder(TE_DIR, dtype=torch.float32, device="cpu", tokenizer=_ToyTokenizer())
    ctx, mask = te.encode(["a cat", "", "hello there"])
    assert ctx.shape == (3, 11 + 22, 4 * 64) and mask.dtype == torch.bool
    assert mask[0].sum() == 5 + 22 and mask[2].all() and not mask[1].any()
    assert torch.equal(ctx[1], torch.zeros_like(ctx[1]))
    # layer-major packing and equality with encode_ids on the templated ids (prefix dropped)
    ids = torch.tensor([_ToyTokenizer().tokenize("hello there")])
    feats = te.encode_ids(ids, torch.ones_like(ids))
    torch.testing.assert_close(ctx[2], torch.cat(feats, -1)[0, 97:], atol=1e-6, rtol=1e-6)
    # a padded row equals the same prompt alone on its real tokens
    alone, _ = te.encode(["a cat"])
    torch.testing.assert_close(ctx[0, :27], alone[0], atol=1e-5, rtol=1e-5)
    # all empty: zero tokens, the model does not run
    te.checkpoint = None  # would raise if the model ran
    ctx0, mask0 = te.encode(["  ", "\n"])
    assert ctx0.shape == (2, 0, 256) and mask0.shape == (2, 0)


def test_encode_empty_with_template_option():
    te = load_text_encoder(TE_DIR, dtype=torch.float32, device="cpu", tokenizer=_ToyTokenizer())
    ctx, mask = te.encode([""], encode_empty=True)
    assert ctx.shape == (1, 22, 256) and mask.all()
    k1, k2 = te.cache_key("a", date="2026-05-23"), te.cache_key("a", date="2026-05-24")
    assert k1 != k2 and k1 == te.cache_key("a")


def test_expert_worker_threads_give_identical_numbers(cases, tmp_path):
    """The CPU expert pool (one expert per worker) sums in expert order: same numbers as serial."""
    # imported here: test_text_encoder_layouts imports this module's fixture and save_st at its top
    from test_text_encoder_layouts import build_comfy_nvfp4, _write_folder, golden_sd_dict

    path = _write_folder(tmp_path / "c", build_comfy_nvfp4(golden_sd_dict())[0], name="te.safetensors")
    outs = []
    for threads in (1, 3):
        te = load_text_encoder(path, dtype=torch.float32, device="cpu")
        te.cpu_threads = threads
        outs.append(te.encode_ids(cases["input_ids"], cases["attention_mask"]))
        te.unload()
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_selected_layers_can_grow_after_a_resident_load(cases):
    te = load_text_encoder(TE_DIR, dtype=torch.float32, device="cpu", offload="device", selected_layers=(1, 3))
    assert len(te._resident) == 4
    te.selected_layers = (5, 11, 17, 23)
    feats = te.encode_ids(cases["input_ids"], cases["attention_mask"])
    torch.testing.assert_close(feats[3], cases["expected_layer.3"], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="outside"):
        te.selected_layers = (24,)


def test_expert_pool_leaves_the_thread_count_of_other_threads_alone():
    """Workers run with one intra-op thread each, but torch.set_num_threads also sets the count
    that threads initialising torch later inherit: creating the pool must not leave that at 1."""
    torch.set_num_threads(2)  # the autouse fixture restores the original count
    pool = ExpertPool(2)
    try:
        assert pool.submit(torch.get_num_threads).result() == 1
        seen = []
        fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        fresh.start()
        fresh.join()
        assert seen == [2]
        assert torch.get_num_threads() == 2
    finally:
        pool.shutdown()


def test_out_of_vocabulary_ids_are_named(golden_te):
    vocab = golden_te.config.vocab_size
    with pytest.raises(ValueError, match=f"span 3..{vocab}, outside .* 0..{vocab - 1}"):
        golden_te.encode_ids(torch.tensor([[3, vocab]]))
