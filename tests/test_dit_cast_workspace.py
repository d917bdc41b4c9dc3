"""The DiT's cast workspace: bf16 / fp8 / MXFP8 weights cast into reused memory give bitwise the
same results as the per-call casts into fresh memory, under no_grad and inference_mode, from
several threads, and never under autograd."""

from __future__ import annotations

import copy
import math
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import GOLDEN
import writers
from lens_model import ops, quant
from lens_model.dit import LensDiTConfig, LensTransformer
from lens_model.dit_loading import load_transformer

CASES = load_file(str(GOLDEN / "dit_cases.safetensors"))


def case(n: int) -> dict:
    p = f"case{n}."
    return {k[len(p):]: v for k, v in CASES.items() if k.startswith(p)}


def run_case(model: LensTransformer, n: int) -> torch.Tensor:
    c = case(n)
    feats = [c[f"encoder_hidden_states.{k}"] for k in range(4)]
    return model.forward_tokens(c["hidden_states"], c["timestep"], feats, c["encoder_mask"], c["grid_hw"])


# The layer forwards as they were before the workspace (a fresh cast / dequantisation per call).
def _old_linear_forward(self, x):
    w, b = self.weight, self.bias
    if w.dtype != x.dtype:
        w = w.to(x.dtype)
    if b is not None and b.dtype != x.dtype:
        b = b.to(x.dtype)
    return F.linear(x, w, b)


def _old_dequantize(self, dtype):
    if self.fmt == "mxfp8":
        out_p, in_p = self.weight.shape
        w = self.weight.to(torch.float32).view(out_p, in_p // 32, 32)
        w.mul_(quant.e8m0_to_float(self.weight_scale).unsqueeze(-1))
        w = w.view(out_p, in_p)[: self.out_features, : self.in_features]
        return w.to(dtype)
    if self.fmt == "float8_e4m3fn":
        w = self.weight.to(torch.float32)
        return w.mul_(self.weight_scale.to(torch.float32)).to(dtype)
    return quant.dequantize_nvfp4(
        self.weight, self.weight_scale, self.weight_scale_2, self.out_features, self.in_features, dtype
    )


def _old_quant_forward(self, x):
    b = self.bias
    if b is not None and b.dtype != x.dtype:
        b = b.to(x.dtype)
    return F.linear(x, _old_dequantize(self, x.dtype), b)


def per_call_cast(fn, monkeypatch):
    """Run ``fn()`` with the pre-workspace layer forwards."""
    with monkeypatch.context() as m:
        m.setattr(ops.Linear, "forward", _old_linear_forward)
        m.setattr(ops.QuantLinear, "forward", _old_quant_forward)
        return fn()


@pytest.fixture(scope="module")
def bf16_fp32() -> LensTransformer:
    """The tiny DiT with bf16 weights computing in fp32 (the no-native-bf16 CPU path)."""
    model = load_transformer(GOLDEN / "lens_tiny_comfy_bf16.safetensors")
    model.compute_dtype = torch.float32
    return model


def _random_wide_block(dtype=torch.bfloat16) -> LensTransformer:
    """One full-width block (D 1536, MLP 4096, E 2880: the real GEMM shapes), random weights."""
    torch.manual_seed(0)
    model = LensTransformer(LensDiTConfig(num_layers=1), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.05)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    model = model.to(dtype).eval()
    model.compute_dtype = torch.float32
    return model


def _wide_inputs(model: LensTransformer, h: int = 6, w: int = 5, s: int = 7):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, h * w, 128, generator=g)
    feats = torch.randn(1, s, 4 * model.config.enc_hidden_dim, generator=g)
    mask = torch.ones(1, s, dtype=torch.bool)
    mask[0, -2:] = False
    return x, torch.tensor([0.6]), feats, mask, (h, w)


# -- bitwise equality ---------------------------------------------------------------------------------

def test_workspace_forward_equals_per_call_cast_bitwise(bf16_fp32, monkeypatch):
    ws = bf16_fp32.cast_workspace
    for n in range(4):
        ref = per_call_cast(lambda: run_case(bf16_fp32, n), monkeypatch)
        ws.clear()
        out = run_case(bf16_fp32, n)
        assert ws.nbytes > 0  # the workspace was used
        assert torch.equal(out, ref), n
        assert torch.equal(run_case(bf16_fp32, n), ref), n  # and reused


def test_full_width_block_equals_per_call_cast_bitwise(monkeypatch):
    model = _random_wide_block()
    args = _wide_inputs(model)
    ref = per_call_cast(lambda: model.forward_tokens(*args), monkeypatch)
    out = model.forward_tokens(*args)
    assert torch.isfinite(out).all() and torch.equal(out, ref)
    largest = model.config.enc_hidden_dim * 4 * model.config.inner_dim  # txt_in
    ws = model.cast_workspace
    assert ws.nbytes == 4 * largest  # one fp32 buffer sized to the largest weight, nothing else


def _quant_layer(fmt: str, out_f: int = 341, in_f: int = 128, seed: int = 0) -> ops.QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    bias = torch.randn(out_f, generator=g).to(torch.bfloat16)
    if fmt == "mxfp8":
        w8, scales = writers.quantize_mxfp8(w)
        out_p, in_p = w8.shape
        scale = quant.unswizzle_scales(scales, out_p, in_p // 32).contiguous()
    else:
        w8, scale = quant.quantize_float8(w)
    return ops.QuantLinear(fmt, in_f, out_f, w8, scale, bias)


@pytest.mark.parametrize("fmt", ["mxfp8", "float8_e4m3fn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantised_layers_dequantise_into_the_workspace_bitwise(fmt, dtype, monkeypatch):
    layer = _quant_layer(fmt)
    layer.cast_workspace = ws = ops.CastWorkspace()
    x = torch.randn(9, 128).to(dtype)
    with torch.no_grad():
        ref = per_call_cast(lambda: layer(x), monkeypatch)
        out = layer(x)
        assert ws.nbytes > 0 and torch.equal(out, ref)
        with ws.lease() as lease:
            assert torch.equal(layer.dequantize(dtype, lease), _old_dequantize(layer, dtype))
        assert torch.equal(layer.dequantize(dtype), _old_dequantize(layer, dtype))


def test_mxfp8_model_forward_equals_per_call_dequantisation(tmp_path, monkeypatch):
    from writers import write_safetensors

    fp32 = load_file(str(GOLDEN / "transformer" / "diffusion_pytorch_model.safetensors"))
    sd = {}
    for k, v in fp32.items():
        layer = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and (".attn." in k or "_mlp." in k) and "norm" not in k:
            sd[k], sd[layer + ".weight_scale"] = writers.quantize_mxfp8(v)
            sd[layer + ".comfy_quant"] = writers.comfy_quant_tensor({"format": "mxfp8"})
        else:
            sd[k] = v.to(torch.bfloat16)
    path = tmp_path / "lens_mxfp8.safetensors"
    write_safetensors(path, sd)
    model = load_transformer(path)
    model.compute_dtype = torch.float32
    qs = [m for m in model.modules() if isinstance(m, ops.QuantLinear)]
    assert len(qs) == 20 and all(m.cast_workspace is model.cast_workspace for m in qs)
    ref = per_call_cast(lambda: run_case(model, 3), monkeypatch)
    assert torch.equal(run_case(model, 3), ref)


# -- when the workspace is (not) used -----------------------------------------------------------------

def test_no_buffer_when_nothing_is_cast():
    model = load_transformer(GOLDEN / "transformer")  # fp32 weights, fp32 compute
    run_case(model, 0)
    assert model.cast_workspace.nbytes == 0
    assert all(m.cast_workspace is model.cast_workspace for m in model.modules() if isinstance(m, ops.Linear))


def test_each_model_has_its_own_workspace(bf16_fp32):
    other = load_transformer(GOLDEN / "lens_tiny_comfy_bf16.safetensors")
    assert other.cast_workspace is not bf16_fp32.cast_workspace
    assert ops.default_operations.__dict__ == {}  # the shared factory holds no state


def test_moving_the_model_drops_the_buffers(bf16_fp32):
    model = load_transformer(GOLDEN / "lens_tiny_comfy_bf16.safetensors")
    model.compute_dtype = torch.float32
    run_case(model, 0)
    assert model.cast_workspace.nbytes > 0
    model.to(torch.float32)
    assert model.cast_workspace.nbytes == 0
    run_case(model, 0)  # fp32 weights now: nothing to cast
    assert model.cast_workspace.nbytes == 0


def test_deepcopy_and_pickle_get_a_fresh_shared_workspace(bf16_fp32):
    run_case(bf16_fp32, 0)
    for clone in (copy.deepcopy(bf16_fp32), pickle.loads(pickle.dumps(bf16_fp32))):
        ws = clone.cast_workspace
        assert ws is not bf16_fp32.cast_workspace and ws.nbytes == 0
        assert all(m.cast_workspace is ws for m in clone.modules() if isinstance(m, ops.Linear))
        assert torch.equal(run_case(clone, 1), run_case(bf16_fp32, 1))


# -- inference_mode, autograd, threads -----------------------------------------------------------------

@pytest.mark.parametrize("first", ["inference_mode", "no_grad"])
def test_workspace_is_safe_under_inference_mode_and_no_grad(first, monkeypatch):
    model = load_transformer(GOLDEN / "lens_tiny_comfy_bf16.safetensors")
    model.compute_dtype = torch.float32
    ref = per_call_cast(lambda: run_case(model, 1), monkeypatch)
    modes = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
    order = [first, "no_grad" if first == "inference_mode" else "inference_mode", first]
    for mode in order:  # buffers allocated under one mode are written under the other
        with modes[mode]():
            out = run_case(model, 1)
        assert torch.equal(out, ref), mode
    assert model.cast_workspace.nbytes > 0
    assert not any(b.is_inference() for b in model.cast_workspace._buffers.values())


def test_autograd_never_sees_a_reused_buffer():
    """With autograd recording (input requiring grad), the layer casts into fresh memory: a reused
    buffer would be overwritten by the next layer before backward reads it."""
    torch.manual_seed(0)
    a, b = ops.Linear(16, 32).to(torch.bfloat16), ops.Linear(32, 8).to(torch.bfloat16)
    a.cast_workspace = b.cast_workspace = ws = ops.CastWorkspace()
    x = torch.randn(4, 16, requires_grad=True)
    b(a(x)).square().sum().backward()
    assert ws.nbytes == 0
    wa, wb = a.weight.float(), b.weight.float()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(F.linear(x2, wa, a.bias.float()), wb, b.bias.float()).square().sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_a_second_thread_casts_into_fresh_memory_while_the_workspace_is_leased():
    torch.manual_seed(0)
    lin = ops.Linear(64, 48).to(torch.bfloat16)
    lin.cast_workspace = ws = ops.CastWorkspace()
    x = torch.randn(5, 64)
    ref = _old_linear_forward(lin, x)
    got = {}

    def other():
        with torch.no_grad():
            got["y"] = lin(x)
            got["used"] = ws.nbytes

    with torch.no_grad(), ws.lease() as lease:
        assert lease is ws
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert got["used"] == 0 and torch.equal(got["y"], ref)
    with torch.no_grad():
        assert torch.equal(lin(x), ref) and ws.nbytes > 0


def test_concurrent_forwards_on_one_model(bf16_fp32, monkeypatch):
    refs = [per_call_cast(lambda n=n: run_case(bf16_fp32, n), monkeypatch) for n in range(4)]
    errors, outs = [], {}

    def worker(i):
        try:
            with torch.inference_mode():
                for r in range(3):
                    outs[(i, r)] = run_case(bf16_fp32, (i + r) % 4)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (i, r), out in outs.items():
        assert torch.equal(out, refs[(i + r) % 4])
