"""One dtype policy (lens_model.precision) for the DiT and the text encoder."""

from __future__ import annotations

import pytest
import torch

from conftest import GOLDEN
from lens_model import precision, vae_loading
from lens_model.dit_loading import load_transformer
from lens_model.text_encoder import resolve_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_dit_and_text_encoder_follow_the_same_cpu_bf16_probe(monkeypatch, native):
    """Both models ask one probe: a CPU without native bf16 computes both in fp32, one with it both
    in bf16 (the DiT for its bf16 weights, the text encoder by default)."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    want = torch.bfloat16 if native else torch.float32
    dit = load_transformer(GOLDEN / "transformer", dtype=torch.bfloat16)
    assert dit.resolved_compute_dtype() == want
    assert resolve_dtype(None, CPU) == want
    assert resolve_dtype("auto", CPU) == want


def test_fp32_weights_always_compute_in_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.compute_dtype_for(torch.float32, CPU) == torch.float32
    assert precision.compute_dtype_for(torch.float64, CPU) == torch.float32


@pytest.mark.parametrize("bf16_ok", [True, False])
def test_fp16_is_replaced_the_same_way_for_both_models(monkeypatch, bf16_ok):
    """fp16 becomes bf16, or fp32 on a GPU without bf16, with a warning naming the model."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    gpu = torch.device("cuda")
    want = torch.bfloat16 if bf16_ok else torch.float32
    with pytest.warns(UserWarning, match="gpt-oss text encoder in fp16"):
        assert resolve_dtype(torch.float16, gpu) == want
    with pytest.warns(UserWarning, match="DiT in fp16.*requested"):
        assert precision.refuse_fp16(torch.float16, gpu, "DiT") == want
    with pytest.warns(UserWarning, match="stored in `x.safetensors`"):
        assert precision.refuse_fp16(torch.float16, CPU, "DiT", stored_in="x.safetensors") == torch.bfloat16


def test_dtype_names():
    assert precision.parse_dtype("bf16") is torch.bfloat16
    assert precision.parse_dtype("float32") is torch.float32
    assert precision.parse_dtype("auto") is None and precision.parse_dtype(None) is None
    assert precision.parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        precision.parse_dtype("int8")


@pytest.mark.parametrize("bf16_ok", [True, False])
def test_vae_fp16_rule_comes_from_precision(monkeypatch, bf16_ok):
    """The VAE refuses fp16 through lens_model.precision like the other models, with its own
    replacement: fp32 on the CPU, bf16 only on a CUDA device with bf16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    with pytest.warns(UserWarning, match="VAE in fp16.*requested"):
        got = vae_loading._resolve_dtype(torch.float16, torch.float32, torch.device("cuda"), "ae.safetensors")
    assert got == (torch.bfloat16 if bf16_ok else torch.float32)
    with pytest.warns(UserWarning, match="stored in `ae.safetensors`"):
        assert vae_loading._resolve_dtype(None, torch.float16, CPU, "ae.safetensors") == torch.float32
    assert precision.fp16_replacement(CPU, small_model=True) == torch.float32
    assert precision.fp16_replacement(CPU) == torch.bfloat16


@pytest.mark.parametrize("fast", [True, False])
def test_loader_dtype_choices_on_a_gpu_follow_the_callers_bf16_answer(fast):
    """On a GPU every automatic choice is bf16 exactly when the caller (ComfyUI) says the device
    computes it fast; explicit bf16 / fp32 are kept whatever the device."""
    want = torch.bfloat16 if fast else torch.float32
    for component, choices in (("dit", ("default", "fp8")), ("te", ("auto",)), ("vae", ("auto",))):
        for choice in choices:
            assert precision.choose_dtype(choice, "cuda:0", component, fast) == want, (component, choice)
        assert precision.choose_dtype("bf16", "cuda:0", component, fast) == torch.bfloat16
        assert precision.choose_dtype("fp32", "cuda:0", component, fast) == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_loader_dtype_choices_on_the_cpu_keep_each_components_default(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.choose_dtype("default", CPU, "dit", True) is None  # the stored dtype
    assert precision.choose_dtype("fp8", CPU, "dit", False) == torch.bfloat16
    assert precision.choose_dtype("auto", CPU, "te", False) == (torch.bfloat16 if native else torch.float32)
    assert precision.choose_dtype("auto", CPU, "vae", True) == torch.float32
    assert precision.choose_dtype("bf16", CPU, "vae", False) == torch.bfloat16


def test_loader_device_choices():
    cuda = torch.device("cuda", 1)
    assert precision.choose_device("cpu", cuda, cuda) == CPU
    assert precision.choose_device("gpu", CPU, cuda) == cuda
    assert precision.choose_device("auto", CPU, cuda) == CPU  # e.g. ComfyUI's low-VRAM text encoder
    assert precision.choose_device("auto", "cuda:0", cuda) == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="'gpu' was selected but ComfyUI runs on the CPU"):
        precision.choose_device("gpu", CPU, CPU)
