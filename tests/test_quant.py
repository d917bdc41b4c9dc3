"""Dequantisation against hand-built bytes and the reference implementation comfy-kitchen."""

from __future__ import annotations

import pytest
import torch

import writers
from lens_model import ops, quant

try:
    import comfy_kitchen as ck
except ImportError:  # the reference is a test dependency; hand-checked cases still run without it
    ck = None
needs_ck = pytest.mark.skipif(ck is None, reason="comfy-kitchen (reference quantisers) not installed")


def test_swizzle_matches_flat_index_formula():
    # logical (r, c) sits at flat ((r//128)*(Cp/4) + c//4)*512 + (r%32)*16 + ((r%128)//32)*4 + c%4
    rows, cols = 200, 7
    s = torch.randint(0, 255, (rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sw = writers.swizzle_scales(s)
    assert tuple(sw.shape) == (256, 8)
    flat = sw.reshape(-1)
    cp = 8
    for r in range(rows):
        for c in range(cols):
            idx = ((r // 128) * (cp // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
            assert flat[idx] == s[r, c]
    assert torch.equal(quant.unswizzle_scales(sw, rows, cols), s)
    assert torch.equal(quant.unswizzle_scales(sw.reshape(-1), rows, cols), s)


def test_swizzle_padding_of_down_projection_rows():
    # gpt-oss down_proj scales: 2880 rows padded to 2944, 180 columns.
    assert quant.padded_scale_shape(2880, 180) == (2944, 180)
    assert quant.padded_scale_shape(5760, 180) == (5760, 180)


def test_mxfp4_hand_checked_byte():
    # byte 0x2F with s = 128: element 2j = -6*2 = -12 (low nibble), element 2j+1 = 1*2 = 2 (high nibble)
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x2F
    out = quant.dequantize_mxfp4(blocks, torch.tensor([[128]], dtype=torch.uint8), torch.float32)
    assert out.shape == (1, 32)
    assert out[0, 0].item() == -12.0 and out[0, 1].item() == 2.0
    assert torch.count_nonzero(out[0, 2:]) == 0


def test_nvfp4_hand_checked_byte_is_high_nibble_first():
    # one 16x16 matrix, all block scales 1.0 (e4m3 0x38), global scale 0.5
    weight = torch.zeros(16, 8, dtype=torch.uint8)
    weight[0, 0] = 0x2F  # element 0 <- high nibble 2 (=1.0), element 1 <- low nibble 0xF (=-6)
    scales = torch.full((16, 1), 1.0).to(torch.float8_e4m3fn).view(torch.uint8)
    out = quant.dequantize_nvfp4(weight, writers.swizzle_scales(scales), torch.tensor(0.5), 16, 16, torch.float32)
    assert out[0, 0].item() == 0.5 and out[0, 1].item() == -3.0


@needs_ck
@pytest.mark.parametrize("rows,cols", [(128, 64), (200, 96)])
def test_nvfp4_matches_comfy_kitchen(rows, cols):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, cols, generator=g) * 3
    per_tensor = x.abs().amax() / (6.0 * 448.0)
    qx, bs = ck.quantize_nvfp4(x, per_tensor)
    ref = ck.dequantize_nvfp4(qx, per_tensor, bs, output_type=torch.float32)
    ours = quant.dequantize_nvfp4(qx, bs, per_tensor, rows, cols, torch.float32)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)


@needs_ck
def test_nvfp4_writer_round_trips_through_comfy_kitchen_dequant():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(2, 130, 64, generator=g)
    packed, scales, gs = writers.quantize_nvfp4(w)
    assert packed.shape == (2, 130, 32) and scales.shape == (2, 256, 4) and gs.shape == (2,)
    ours = quant.dequantize_nvfp4(packed, scales, gs, 130, 64, torch.float32)
    for e in range(2):
        ref = ck.dequantize_nvfp4(packed[e], gs[e], scales[e].view(torch.float8_e4m3fn), output_type=torch.float32)
        assert torch.allclose(ours[e], ref[:130], rtol=1e-6, atol=1e-7)
    # a quantiser is lossy but close
    assert ((ours - w).norm() / w.norm()) < 0.15


@needs_ck
def test_mxfp8_matches_comfy_kitchen():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 96, generator=g)
    qx, bs = ck.quantize_mxfp8(x)
    ref = ck.dequantize_mxfp8(qx, bs, output_type=torch.float32)
    ours = quant.dequantize_mxfp8(qx, bs, 128, 96, torch.float32)
    assert torch.equal(ours, ref)
    # our writer produces the same bytes as comfy-kitchen's
    q2, s2 = writers.quantize_mxfp8(x)
    assert torch.equal(q2.view(torch.uint8), qx.view(torch.uint8))
    assert torch.equal(s2, bs.view(torch.uint8).reshape(s2.shape))


def test_mxfp8_zero_scale_byte_and_padding():
    w = torch.zeros(40, 50)
    w[0, 0] = 3.0
    q, s = writers.quantize_mxfp8(w)
    assert q.shape == (64, 64)
    logical = quant.unswizzle_scales(s, 64, 2)
    assert logical[1, 0] == 0  # all-zero block -> byte 0
    out = quant.dequantize_mxfp8(q, s, 40, 50, torch.float32)
    assert out.shape == (40, 50)
    assert out[0, 0].item() == 3.0 and torch.count_nonzero(out) == 1
    # byte 0 is an exact zero scale even under non-zero codes
    q_all = torch.ones(32, 32).to(torch.float8_e4m3fn)
    zero_scales = writers.swizzle_scales(torch.zeros(32, 1, dtype=torch.uint8))
    assert torch.count_nonzero(quant.dequantize_mxfp8(q_all, zero_scales, 32, 32, torch.float32)) == 0


def test_mxfp4_matches_transformers_reference():
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    g = torch.Generator().manual_seed(4)
    blocks = torch.randint(0, 256, (2, 6, 3, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 134, (2, 6, 3), dtype=torch.uint8, generator=g)
    ref = mx.convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.float32)
    ours = quant.dequantize_mxfp4(blocks, scales, torch.float32)
    # transformers returns the [E, in, out] orientation
    assert torch.equal(ours.transpose(1, 2), ref)


def test_comfy_quant_marker_round_trip_and_errors():
    t = writers.comfy_quant_tensor({"format": "nvfp4", "num_experts": 32})
    assert t.numel() == 38  # ComfyUI's default JSON spacing
    assert quant.parse_comfy_quant(t) == {"format": "nvfp4", "num_experts": 32}
    assert writers.comfy_quant_tensor({"format": "mxfp8"}).numel() == 19
    with pytest.raises(ValueError, match="format"):
        quant.parse_comfy_quant(writers.comfy_quant_tensor({"fmt": "x"}))


def test_float8_per_tensor():
    w = torch.randn(8, 8)
    q, s = quant.quantize_float8(w)
    out = quant.dequantize_float8(q, s, torch.float32)
    assert torch.allclose(out, w, rtol=0.07, atol=1e-3)


# -- the code tables every decoder shares --------------------------------------------------------


def test_e4m3_codes_hand_checked():
    # sign | 4 exponent bits (bias 7) | 3 mantissa bits; exponent 0 is subnormal; S.1111.111 is NaN
    bits = torch.tensor([0x00, 0x01, 0x08, 0x38, 0x3C, 0x7E, 0xB8, 0xFE], dtype=torch.uint8)
    want = [0.0, 2.0 ** -9, 2.0 ** -6, 1.0, 1.5, 448.0, -1.0, -448.0]
    assert quant.e4m3_to_float(bits).tolist() == want
    assert quant.e4m3_table()[bits.long()].tolist() == want
    assert quant.e4m3_to_float(bits.view(torch.float8_e4m3fn)).tolist() == want
    assert torch.isnan(quant.e4m3_table()[[0x7F, 0xFF]]).all()


def test_e8m0_tables_hand_checked():
    assert quant.e8m0_table()[[0, 1, 126, 127, 130]].tolist() == [0.0, 2.0 ** -126, 0.5, 1.0, 8.0]
    assert quant.e8m0_table(zero_byte_is_zero=False)[0].item() == 2.0 ** -127


@pytest.mark.parametrize("dtype,word", [(torch.float32, torch.int64), (torch.bfloat16, torch.int32)])
def test_fp4_pair_table_packs_both_nibble_orders(dtype, word):
    # byte 0x2F: low nibble F = -6.0, high nibble 2 = 1.0
    for low_first, pair in ((True, [-6.0, 1.0]), (False, [1.0, -6.0])):
        table = quant.fp4_pair_table(dtype, low_first)
        assert table.dtype == word and table.shape == (256,)
        assert table[0x2F:0x30].view(dtype).float().tolist() == pair


def test_nvfp4_nan_scale_byte_decodes_alike_in_bank_and_linear():
    """The expert bank (table lookup) and the Linear dequantiser read E4M3 scales the same way."""
    codes = torch.full((1, 16, 8), 0x22, dtype=torch.uint8)  # every element 1.0
    plain = torch.full((1, 16, 1), 0x38, dtype=torch.uint8)  # scale 1.0 ...
    plain[0, 3, 0] = 0x7F  # ... but row 3's block scale is the NaN code
    scales = writers.swizzle_scales(plain)
    g = torch.tensor([0.5])
    bank = ops.ExpertBank("nvfp4", 1, 16, 16, torch.zeros(1, 16), codes=codes, scales=scales, global_scale=g)
    dense = quant.dequantize_nvfp4(codes, scales, g, 16, 16, torch.float32)[0]
    torch.testing.assert_close(bank.dequantize(0), dense, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(dense[3]).all() and (dense[torch.arange(16) != 3] == 0.5).all()


def test_expert_bank_rejects_an_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'fp4'"):
        ops.ExpertBank("fp4", 1, 2, 32, torch.zeros(1, 2), codes=torch.zeros(1, 2, 16, dtype=torch.uint8))


def test_quant_linear_from_stored_scales():
    """Stored scales become QuantLinear's form: MXFP8 E8M0 bytes unswizzled once, fp8 scale an fp32 scalar."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 64, generator=g)
    q, s = writers.quantize_mxfp8(w)  # swizzled uint8 scales
    layer = ops.QuantLinear.from_stored("mxfp8", 64, 40, q, s.view(torch.float8_e8m0fnu), None)
    assert layer.weight_scale.dtype == torch.uint8 and layer.weight_scale.shape == (64, 2)
    assert torch.equal(layer.dequantize(torch.float32), quant.dequantize_mxfp8(q, s, 40, 64, torch.float32))
    q8, s8 = quant.quantize_float8(w)
    layer = ops.QuantLinear.from_stored("float8_e4m3fn", 64, 40, q8, s8.reshape(1).bfloat16(), None)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == ()
    assert torch.equal(layer.dequantize(torch.float32), q8.float() * s8.bfloat16().float())
