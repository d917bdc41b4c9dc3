"""tools/make_tiny_models.py: a consistent tiny model set that runs the shipped workflows unchanged.

The tool writes into a fake ComfyUI ``models/`` folder; the API workflows then run through the node
classes with the executor of test_workflows.py (core SaveImage / LoadImage / VAELoader / VAEDecode
are its stand-ins), only shrunk to 48x32 and at most 4 steps. No id folding, no widened DiT, no
tokenizer override: the text encoder tokenizes with its embedded tokenizer_json, its real
o200k_harmony ids index its own embedding, and its features feed the DiT as they are.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_stubs import comfy_env  # noqa: F401  (fixture)
import test_workflows as tw

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "make_tiny_models.py"
PROMPT_TEXT = "a red fox in the snow"


def _tool():
    spec = importlib.util.spec_from_file_location("make_tiny_models", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tool, *args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = tool.main([str(a) for a in args])
    return summary, buf.getvalue()


@pytest.fixture(scope="module")
def tool():
    return _tool()


@pytest.fixture(scope="module")
def generated(tool, tmp_path_factory):
    """Both naming modes, seed 0: (models dir, summary, stdout) per mode."""
    out = {}
    for mode, extra in (("workflow", ["--names-from-workflows"]), ("default", [])):
        models = tmp_path_factory.mktemp(f"models_{mode}")
        summary, text = _run(tool, "--out", models, *extra)
        out[mode] = (models, summary, text)
    return out


def _place(env, models: Path) -> None:
    """Symlink every generated file into the fake ComfyUI model folders."""
    for f in models.rglob("*.safetensors"):
        dst = env.models_dir / f.relative_to(models)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f, dst)


@pytest.fixture
def run_env(comfy_env):  # noqa: F811
    from nodes import text_encode
    from PIL import Image

    text_encode.FEATURES.clear()
    inp = comfy_env.root / "input"
    inp.mkdir()
    rng = np.random.default_rng(0)
    # the 40x56 image test_workflows.reference_image crops to 32x48
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(inp / "example.png")
    tw.CoreSaveImage.saved = []
    yield comfy_env
    text_encode.FEATURES.clear()


def _loader_value(api, class_type, name):
    return next(e["inputs"][name] for e in api.values() if e["class_type"] == class_type)


def _check_image(img):
    assert img.shape == (1, tw.H, tw.W, 3) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert float(img.std()) > 0  # not a constant image


# -------------------------------------------------------------------------------------------------
# the files


def test_files_and_names(tool, generated):
    used = tool.workflow_names()
    models, summary, text = generated["workflow"]
    expected = {f"diffusion_models/{n}" for n in used["dit"]} | {f"text_encoders/{n}" for n in used["te"]} \
        | {f"vae/{n}" for n in used["vae"]}
    assert set(summary["files"]) == expected
    assert "lens_turbo_bf16.safetensors" in used["dit"] and "lens_bf16.safetensors" in used["dit"]
    assert any("--full-vae" in n for n in summary["notes"])  # core's VAELoader needs the full VAE
    models, summary, text = generated["default"]
    assert set(summary["files"]) == {
        "diffusion_models/lens_tiny_turbo.safetensors", "diffusion_models/lens_tiny.safetensors",
        "text_encoders/gpt_oss_tiny_nvfp4.safetensors", "vae/flux2_tiny_vae.safetensors"}
    assert summary["files"]["text_encoders/gpt_oss_tiny_nvfp4.safetensors"] < 60e6
    for rel in summary["files"]:
        assert f"wrote {models / rel}" in text
    # every workflow's loaders are told what to select
    assert "lens_t2i:" in text and "LensNodesDiTLoader.model_name: lens_tiny.safetensors" in text
    assert "LensNodesDiTLoader.model_name: lens_tiny_turbo.safetensors" in text
    assert "VAELoader.vae_name: (no tiny file: rerun with --full-vae)" in text


def test_same_seed_same_bytes_other_seed_other_weights(tool, generated):
    a, b = generated["workflow"][0], generated["default"][0]
    pairs = [("diffusion_models/lens_turbo_bf16.safetensors", "diffusion_models/lens_tiny_turbo.safetensors"),
             ("text_encoders/gpt_oss_20b_nvfp4.safetensors", "text_encoders/gpt_oss_tiny_nvfp4.safetensors"),
             ("vae/flux2-vae.safetensors", "vae/flux2_tiny_vae.safetensors")]
    for x, y in pairs:
        assert (a / x).read_bytes() == (b / y).read_bytes(), (x, y)
    d0, d1 = tool.make_dit(0), tool.make_dit(1)
    key = "model.diffusion_model.txt_in.weight"
    assert not torch.equal(d0[key], d1[key])
    assert torch.equal(d0["model.diffusion_model.img_in.weight"], d1["model.diffusion_model.img_in.weight"])


def test_loaders_read_the_files_without_config(tool, generated):
    import lens_model as lm
    from lens_model.checkpoints import open_checkpoint
    from lens_model.gpt_oss_checkpoints import GptOssCheckpoint
    from lens_model.text_encoder import GptOssConfig
    from lens_model.tokenizer import find_tokenizer_source

    models = generated["default"][0]
    te_path = models / "text_encoders" / "gpt_oss_tiny_nvfp4.safetensors"
    assert not (te_path.parent / "config.json").exists()
    ck = GptOssCheckpoint(open_checkpoint(te_path, "te"))
    cfg = GptOssConfig.infer(ck)
    ck.validate(cfg)
    assert ck.layout == "comfy" and ck.expert_format == "nvfp4"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (201088, tool.TE_HIDDEN, 24)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_local_experts) == (2, 1, 8)
    assert find_tokenizer_source(te_path)[0] == "embedded"
    dit = lm.load_transformer(models / "diffusion_models" / "lens_tiny_turbo.safetensors")
    assert dit.config.enc_hidden_dim == cfg.hidden_size and dit.dtype == torch.bfloat16
    assert dit.variant_defaults["variant"] == "turbo"
    vae = lm.load_vae(models / "vae" / "flux2_tiny_vae.safetensors")
    assert vae.config.block_out_channels == (32, 32, 32, 64)
    # the real template ids index the embedding; the features have the DiT's text width
    te = lm.load_text_encoder(te_path, device="cpu")
    ids = te.tokenize(PROMPT_TEXT)
    assert max(ids) >= 200000 and max(ids) < cfg.vocab_size
    ctx, mask = te.encode([PROMPT_TEXT])
    assert ctx.shape == (1, len(ids) - 97, 4 * dit.config.enc_hidden_dim) and torch.isfinite(ctx).all()
    # the text reaches the image: another prompt gives another latent
    other, other_mask = te.encode(["a blue car at night"])
    noise, sigmas = lm.make_noise(0, 1, 2, 3), lm.lens_sigmas(32, 48, 2)
    x1 = lm.sample(dit, noise, sigmas, ctx, mask)
    x2 = lm.sample(dit, noise, sigmas, other, other_mask)
    assert torch.isfinite(x1).all() and (x1 - x2).abs().mean() > 1e-3 * x1.abs().mean()


def test_refuses_to_replace_foreign_files(tool, tmp_path):
    real = tmp_path / "models" / "text_encoders" / "gpt_oss_20b_nvfp4.safetensors"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"real weights")
    with pytest.raises(SystemExit, match="refusing to replace"):
        _run(tool, "--out", tmp_path / "models", "--names-from-workflows")
    assert real.read_bytes() == b"real weights"
    assert sorted(p.name for p in (tmp_path / "models").rglob("*") if p.is_file()) == [real.name]


def test_full_vae_plan_and_example_image(tool, tmp_path):
    files, mapping, notes = tool.plan(names_from_workflows=True, full_vae=True)
    assert ("vae", "flux2-vae.safetensors", "full_vae") in files
    assert not [f for f in files if f[2] == "vae"]  # the full VAE also serves the pack's loader
    assert mapping["VAELoader"] == {"flux2-vae.safetensors": "flux2-vae.safetensors"} and not notes
    files, mapping, notes = tool.plan(names_from_workflows=False, full_vae=True)
    assert ("vae", "flux2-vae-random.safetensors", "full_vae") in files
    assert mapping["VAELoader"] == {"flux2-vae.safetensors": "flux2-vae-random.safetensors"}
    tool.make_example_image(tmp_path / "input" / "example.png")
    from PIL import Image

    with Image.open(tmp_path / "input" / "example.png") as im:
        assert im.size == (64, 64) and im.mode == "RGB"


# -------------------------------------------------------------------------------------------------
# the shipped workflows on the generated files


@pytest.mark.parametrize("name", tw.NAMES)
def test_shipped_workflow_runs_unchanged_on_tiny_models(run_env, generated, name):
    models = generated["workflow"][0]
    _place(run_env, models)
    _, api = tw.load(name)
    prompt = tw.shrink(api)  # sizes and steps only; model names and dtypes as shipped
    tw.execute(prompt)
    assert len(tw.CoreSaveImage.saved) == 1
    got = tw.CoreSaveImage.saved[0]
    _check_image(got)
    te = models / "text_encoders" / _loader_value(prompt, "LensNodesTextEncoderLoader", "text_encoder_name")
    dit = models / "diffusion_models" / _loader_value(prompt, "LensNodesDiTLoader", "model_name")
    vae = models / "vae" / "flux2-vae.safetensors"
    want = tw.reference_image(prompt, None, run_env, te_path=te, vae_path=vae, dit_path=dit, te_dtype=None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_default_names_with_the_printed_widget_values(tool, run_env, generated):
    models, summary, _ = generated["default"]
    _place(run_env, models)
    for name in ("lens_t2i", "lens_turbo_t2i"):
        tw.CoreSaveImage.saved = []
        _, api = tw.load(name)
        prompt = tool.retarget(tw.shrink(api), summary["mapping"])
        assert _loader_value(prompt, "LensNodesDiTLoader", "model_name") == (
            "lens_tiny.safetensors" if name == "lens_t2i" else "lens_tiny_turbo.safetensors")
        tw.execute(prompt)
        _check_image(tw.CoreSaveImage.saved[0])
    _, api = tw.load("lens_mixed_core_vae")
    with pytest.raises(KeyError, match="flux2-vae.safetensors"):  # no full-size VAE without --full-vae
        tool.retarget(api, summary["mapping"])


def test_workflow_json_names_are_what_the_tool_reads(tool):
    # the UI files select the same model files as their API twins
    used = tool.workflow_names()
    for path in sorted((ROOT / "workflows").glob("*.json")):
        ui = json.loads(path.read_text())
        for node in ui["nodes"]:
            if node["type"] in tool.LOADERS:
                kind = tool.LOADERS[node["type"]][1]
                assert node["widgets_values"][0] in used[kind], (path.name, node["type"])
