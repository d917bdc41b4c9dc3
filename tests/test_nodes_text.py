"""GPT-OSS Loader / TextEncode on the golden tiny text encoder: layout, lazy loading, caches.

The tiny encoder has a 512-token vocabulary, so the real o200k_harmony tokenizer is wrapped to map
ids modulo 512 (template structure and lengths unchanged). Node and Python API use the same
wrapper, so their features must be identical.
"""

from __future__ import annotations

import os

import pytest
import torch

from comfy_stubs import InterruptProcessingException, ModTokenizer, comfy_env, place_golden_models  # noqa: F401
from conftest import GOLDEN

TE = "lens_tiny_te/"
E = 64  # tiny hidden size


@pytest.fixture(scope="module")
def tokenizer():
    from lens_model.tokenizer import load_tokenizer

    return ModTokenizer(load_tokenizer(GOLDEN / "text_encoder"))


@pytest.fixture
def te_env(comfy_env, tokenizer, monkeypatch):
    import lens_model.tokenizer
    from nodes import text_encode

    place_golden_models(comfy_env, GOLDEN)
    monkeypatch.setattr(lens_model.tokenizer, "load_tokenizer", lambda path=None: tokenizer)
    text_encode.FEATURES.clear()
    yield comfy_env
    text_encode.FEATURES.clear()


def load_te(**kw):
    from nodes import LensNodesTextEncoderLoader

    args = dict(text_encoder_name=TE, device="auto", dtype="fp32", offload="auto", keep_loaded=False)
    args.update(kw)
    return LensNodesTextEncoderLoader().load(**args)[0]


def encode(handle, text, **kw):
    from nodes import LensNodesTextEncode

    args = dict(date="2026-05-23", strip_markers=True)
    args.update(kw)
    return LensNodesTextEncode().encode(text_encoder=handle, text=text, **args)[0]


def reference(tokenizer, prompts, **kw):
    from lens_model import load_text_encoder

    te = load_text_encoder(GOLDEN / "text_encoder", dtype=torch.float32, device="cpu", tokenizer=tokenizer)
    return te, te.encode(prompts, **kw)


def test_conditioning_layout_matches_core_lens_layout(te_env, tokenizer):
    handle = load_te()
    assert handle.loads == 0  # the loader only checks the file
    cond = encode(handle, "a cat")
    assert isinstance(cond, list) and len(cond) == 1 and len(cond[0]) == 2
    ctx, extra = cond[0]
    assert set(extra) == {"pooled_output", "attention_mask", "num_layers_stacked"}
    assert extra["pooled_output"] is None and extra["num_layers_stacked"] == 4
    mask = extra["attention_mask"]
    assert ctx.dtype == torch.float32 and ctx.device.type == "cpu"
    assert mask.dtype == torch.int64 and mask.device.type == "cpu"
    assert ctx.shape == (1, 24, 4 * E)  # "a cat": 121 templated ids, 97 dropped
    assert mask.shape == (1, 24) and bool((mask == 1).all())

    te, (want_ctx, want_mask) = reference(tokenizer, ["a cat"])
    assert torch.equal(ctx, want_ctx.float()) and torch.equal(mask, want_mask.long())
    # layer-major: channel l*E + e holds layer l (5, 11, 17, 23), after the 97-token crop
    ids = torch.tensor([te.tokenize("a cat")])
    layers = te.encode_ids(ids, torch.ones_like(ids))
    for i, feat in enumerate(layers):
        assert torch.equal(ctx[..., i * E:(i + 1) * E], feat[:, 97:].float())


def test_empty_text_gives_zero_tokens_without_loading(te_env):
    handle = load_te()
    for text in ("", "   \n"):
        ctx, extra = encode(handle, text)[0]
        assert ctx.shape == (1, 0, 4 * E) and ctx.dtype == torch.float32
        assert extra["attention_mask"].shape == (1, 0)
        assert extra["attention_mask"].dtype == torch.int64
    assert handle.loads == 0


def test_unchanged_prompt_never_reloads_the_encoder(te_env):
    handle = load_te()
    first = encode(handle, "a red fox")
    assert handle.loads == 1 and not handle.loaded  # unloaded after encoding (keep_loaded off)
    again = encode(handle, "a red fox")
    assert handle.loads == 1
    assert torch.equal(first[0][0], again[0][0])
    # another handle on the same file/dtype shares the cache
    assert torch.equal(encode(load_te(), "a red fox")[0][0], first[0][0])
    # the key covers the date and the strip flag
    other_date = encode(handle, "a red fox", date="2025-01-01")
    assert handle.loads == 2
    assert not torch.equal(other_date[0][0], first[0][0])
    encode(handle, "a red fox", strip_markers=False)
    assert handle.loads == 3


def test_disk_cache_survives_a_restart(te_env):
    from nodes import text_encode

    handle = load_te()
    first = encode(handle, "a blue bird", cache_to_disk=True)
    assert handle.loads == 1
    files = list((te_env.root / "cache").rglob("*.safetensors"))
    assert len(files) == 1
    text_encode.FEATURES.clear()  # "restart"
    fresh = load_te()
    again = encode(fresh, "a blue bird", cache_to_disk=True)
    assert fresh.loads == 0
    assert torch.equal(again[0][0], first[0][0])
    assert torch.equal(again[0][1]["attention_mask"], first[0][1]["attention_mask"])
    text_encode.FEATURES.clear()
    encode(fresh, "a blue bird")  # disk cache off: encodes
    assert fresh.loads == 1


def test_unwritable_disk_cache_is_a_warning_not_an_error(te_env, caplog):
    """The cache folder cannot be made (a file stands where it should be): the encode succeeds,
    a warning names the problem, no file is left, and the features are still cached in memory."""
    cache = te_env.root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "text_features").write_bytes(b"not a folder")
    handle = load_te()
    out = encode(handle, "a green frog", cache_to_disk=True)
    assert out[0][0].shape[1] > 0 and handle.loads == 1
    assert "could not write the text-feature cache" in caplog.text
    assert [p.name for p in cache.rglob("*") if p.is_file()] == ["text_features"]
    again = encode(handle, "a green frog", cache_to_disk=True)
    assert handle.loads == 1 and torch.equal(again[0][0], out[0][0])


def test_disk_cache_files_of_earlier_versions_are_found(te_env):
    """The file name and format the node wrote before the cache moved into lens_model
    (``text_features/<key>.safetensors``, key over the device kind and the strip flag, uint8
    mask, the key in the metadata) are still read: no encoder load."""
    from lens_model.text_encoder import encode_prompt_cache_key
    from safetensors.torch import save_file

    handle = load_te()
    key = encode_prompt_cache_key("a white horse", "2026-05-23", handle.identity, handle.dtype,
                                  strip_markers=True, device="cpu")
    folder = te_env.root / "cache" / "text_features"
    folder.mkdir(parents=True)
    ctx = torch.arange(3 * 4 * E, dtype=torch.float32).reshape(1, 3, 4 * E)
    save_file({"context": ctx, "mask": torch.tensor([[1, 1, 0]], dtype=torch.uint8)},
              str(folder / f"{key}.safetensors"), metadata={"key": key})
    got, extra = encode(handle, "a white horse", cache_to_disk=True)[0]
    assert handle.loads == 0
    assert torch.equal(got, ctx) and extra["attention_mask"].tolist() == [[1, 1, 0]]


def test_keep_loaded(te_env):
    handle = load_te(keep_loaded=True)
    encode(handle, "one")
    encode(handle, "two")
    assert handle.loads == 1 and handle.loaded
    handle.unload()
    assert not handle.loaded


def test_date_is_validated(te_env):
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        encode(load_te(), "a cat", date="yesterday")


def test_interrupt_during_encode_then_rerun(te_env):
    handle = load_te()
    te_env.interrupt_at(3)
    with pytest.raises(InterruptProcessingException):
        encode(handle, "a green car")
    assert not handle.loaded  # nothing left half-loaded
    cond = encode(handle, "a green car")
    assert cond[0][0].shape[1] > 0
    layers = [v for (_, kind, v, t, _) in te_env.progress if kind == "abs"]
    assert layers[-1] == 24  # progress over the decoder layers run (0..23)


def test_te_loader_bad_file_then_good_file(te_env):
    from nodes import LensNodesTextEncoderLoader

    os.symlink(GOLDEN / "vae" / "diffusion_pytorch_model.safetensors",
               te_env.folder("text_encoders") / "not_a_te.safetensors")
    with pytest.raises(ValueError, match="not_a_te.safetensors"):
        LensNodesTextEncoderLoader().load(text_encoder_name="not_a_te.safetensors")
    with pytest.raises(FileNotFoundError, match="missing"):
        LensNodesTextEncoderLoader().load(text_encoder_name="missing.safetensors")
    assert load_te().hidden_size == E


def test_out_of_memory_unloads_and_stays_an_oom(te_env, monkeypatch):
    """An OOM while encoding keeps its type (core's handler matches it), carries our advice, and
    leaves nothing loaded even with keep_loaded; core is asked to unload its models."""
    import lens_model.text_encoder as te_mod

    def boom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(te_mod.LensTextEncoder, "encode", boom)
    handle = load_te(keep_loaded=True)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="offload to 'layers'") as e:
        encode(handle, "a tall tree")
    assert "1.00 GiB" in str(e.value) and isinstance(e.value.__cause__, torch.cuda.OutOfMemoryError)
    assert not handle.loaded and te_env.unloads == 1
    import comfy.model_management as mm

    assert mm.current_loaded_models == []


def test_kept_encoder_is_in_cores_list_and_core_unloads_it(te_env):
    """A kept encoder stands in core's list of loaded models (core freed room for it first), so
    unload_all_models (the /free button, core's OOM handler) drops it; the handle loads it again
    on the next cache miss. Without keep_loaded it leaves the list after every encode."""
    import comfy.model_management as mm

    def ours():
        return [lm for lm in mm.current_loaded_models if type(lm.model.model).__name__ == "LensTextEncoder"]

    first = load_te(keep_loaded=True)
    encode(first, "a small boat")
    assert first.loaded and len(ours()) == 1 and first.loads == 1
    assert te_env.load_calls[-1][0] == ["LensTextEncoder"]
    mm.unload_all_models()
    assert not first.loaded and ours() == []
    assert encode(first, "a big ship")[0][0].shape[1] > 0 and first.loads == 2 and len(ours()) == 1
    other = load_te(keep_loaded=False)
    encode(other, "a red kite")
    assert not other.loaded and len(ours()) == 1  # only the kept one is listed


def test_auto_dtype_on_a_gpu_follows_core_bf16_policy(te_env, monkeypatch):
    """auto: bf16 on GPUs core says compute it well, fp32 on pre-Ampere cards (never fp16)."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "text_encoder_device", lambda: torch.device("cuda", 0))
    te_env.bf16 = False
    handle = load_te(dtype="auto")
    assert handle.dtype == torch.float32 and handle.device.type == "cuda" and handle.loads == 0
    te_env.bf16 = True
    assert load_te(dtype="auto").dtype == torch.bfloat16
    te_env.bf16 = False
    assert load_te(dtype="bf16").dtype == torch.bfloat16  # an explicit choice is kept
