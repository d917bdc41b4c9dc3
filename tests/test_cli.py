"""Command-line tool: end to end on tiny weights, argument handling, file resolution and downloads."""

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lens_model import cli

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "fixtures/golden/lens_tiny"
_REAL_DOWNLOAD = cli._download

pytest.importorskip("lens_model.text_encoder", reason="text encoder module not in the repo yet")


@pytest.fixture(scope="module")
def tiny_te(tmp_path_factory) -> Path:
    """A tiny random gpt-oss text encoder that fits the tiny DiT.

    The golden ``text_encoder/`` cannot feed the golden ``transformer/``: its hidden size is 64
    (context 4·64 = 256 channels) where the tiny DiT expects ``enc_hidden_dim`` 32, and its vocabulary
    has 512 entries while the harmony template needs ids up to ~200k. This folder keeps the golden
    configuration except hidden_size 32 and the full o200k_harmony vocabulary (201088).
    """
    out = tmp_path_factory.mktemp("tiny_te")
    cfg = json.loads((GOLDEN / "text_encoder/config.json").read_text())
    hid, heads, kv, hd, inter, ne = 32, cfg["num_attention_heads"], cfg["num_key_value_heads"], \
        cfg["head_dim"], cfg["intermediate_size"], cfg["num_local_experts"]
    cfg.update(hidden_size=hid, vocab_size=201088)
    g = torch.Generator().manual_seed(0)

    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    sd = {"model.embed_tokens.weight": r(cfg["vocab_size"], hid, std=1.0),
          "model.norm.weight": torch.ones(hid)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": 1 + r(hid), p + "post_attention_layernorm.weight": 1 + r(hid),
            p + "self_attn.q_proj.weight": r(heads * hd, hid), p + "self_attn.q_proj.bias": r(heads * hd),
            p + "self_attn.k_proj.weight": r(kv * hd, hid), p + "self_attn.k_proj.bias": r(kv * hd),
            p + "self_attn.v_proj.weight": r(kv * hd, hid), p + "self_attn.v_proj.bias": r(kv * hd),
            p + "self_attn.o_proj.weight": r(hid, heads * hd), p + "self_attn.o_proj.bias": r(hid),
            p + "self_attn.sinks": r(heads),
            p + "mlp.router.weight": r(ne, hid), p + "mlp.router.bias": r(ne),
            p + "mlp.experts.gate_up_proj": r(ne, hid, 2 * inter),
            p + "mlp.experts.gate_up_proj_bias": r(ne, 2 * inter),
            p + "mlp.experts.down_proj": r(ne, inter, hid), p + "mlp.experts.down_proj_bias": r(ne, hid),
        })
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_cli_end_to_end_tiny(tmp_path, tiny_te):
    out = tmp_path / "fox.png"
    cmd = [sys.executable, "-m", "lens_model.cli", "a red fox in the snow", "-o", str(out),
           "--transformer", str(GOLDEN / "transformer"), "--text-encoder", str(tiny_te),
           "--vae", str(GOLDEN / "vae"), "--width", "64", "--height", "64", "--steps", "2",
           "--seed", "3", "--device", "cpu", "--no-download"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines() == [str(out)]
    img = Image.open(out)
    assert img.size == (64, 64) and img.mode == "RGB"
    meta = json.loads(img.text["lens_generation"])
    assert meta["prompt"] == "a red fox in the snow"
    assert (meta["seed"], meta["steps"], meta["cfg"]) == (3, 2, 5.0)   # folder "lens_tiny": Lens 20/5
    assert (meta["width"], meta["height"]) == (64, 64)
    assert img.text["parameters"].startswith("a red fox in the snow\nSteps: 2, CFG scale: 5.0, Seed: 3")
    assert "prompt" not in img.text  # ComfyUI would parse a "prompt" chunk as workflow JSON
    pixels = torch.from_numpy(np.array(img)).float()
    assert pixels.std() > 0


# ------------------------------------------------------------------------- in-process, fake pipeline

@pytest.fixture
def fake_generate(monkeypatch):
    calls = []

    def generate(prompt, **kw):
        calls.append(dict(kw, prompt=prompt))
        n = kw["batch"]
        return [Image.new("RGB", (kw["width"], kw["height"]), (i * 40, 0, 0)) for i in range(n)]

    import lens_model.pipeline as pipeline

    monkeypatch.setattr(pipeline, "generate", generate)

    def no_download(filename, models_dir):
        raise AssertionError(f"unexpected download of {filename}")

    monkeypatch.setattr(cli, "_download", no_download)
    return calls


def _local(tmp_path, name="lens_turbo_bf16.safetensors"):
    files = {}
    for key, fname in (("transformer", name), ("te", "te.safetensors"), ("vae", "vae.safetensors")):
        p = tmp_path / fname
        p.write_bytes(b"x")
        files[key] = p
    return ["--transformer", str(files["transformer"]), "--text-encoder", str(files["te"]),
            "--vae", str(files["vae"]), "--device", "cpu", "-q"]


def test_cli_defaults_from_file_name_and_ratio(tmp_path, fake_generate, capsys):
    out = tmp_path / "a.png"
    assert cli.main(["cat", "-o", str(out), "--ratio", "16:9"] + _local(tmp_path)) == 0
    kw = fake_generate[-1]
    assert (kw["steps"], kw["guidance"]) == (4, 1.0)           # turbo from the file name
    assert (kw["width"], kw["height"]) == (1376, 768)          # 16:9 at base 1024 (CPU default)
    assert capsys.readouterr().out.strip() == str(out)
    assert Image.open(out).size == (1376, 768)

    assert cli.main(["cat", "-o", str(out), "--variant", "lens", "--base", "1440"]
                    + _local(tmp_path)) == 0
    kw = fake_generate[-1]
    assert (kw["steps"], kw["guidance"], kw["width"], kw["height"]) == (20, 5.0, 1440, 1440)

    assert cli.main(["cat", "-o", str(out), "--steps", "7", "--cfg", "3.5", "--seed", "9"]
                    + _local(tmp_path, "lens_base.safetensors")) == 0
    kw = fake_generate[-1]
    assert (kw["steps"], kw["guidance"], kw["seed"]) == (7, 3.5, 9)
    assert (kw["width"], kw["height"]) == (1024, 1024)


def test_cli_batch_writes_numbered_files(tmp_path, fake_generate, capsys):
    out = tmp_path / "fox.png"
    assert cli.main(["fox", "-o", str(out), "--batch", "3", "--width", "64", "--height", "32",
                     "--negative", "blurry"] + _local(tmp_path)) == 0
    printed = capsys.readouterr().out.split()
    names = [tmp_path / f"fox_{i}.png" for i in range(3)]
    assert printed == [str(p) for p in names]
    for i, p in enumerate(names):
        img = Image.open(p)
        assert img.size == (64, 32)
        meta = json.loads(img.text["lens_generation"])
        assert meta["index"] == i and meta["negative"] == "blurry"
        assert "Negative prompt: blurry" in img.text["parameters"]
    assert fake_generate[-1]["negative"] == "blurry"


@pytest.mark.parametrize("args,needle", [
    (["--width", "100", "--height", "64"], "100"),
    (["--width", "64"], "both --width and --height"),
    (["--width", "64", "--height", "64", "--ratio", "1:1"], "exclusive"),
    (["--steps", "0"], "--steps"),
    (["--ratio", "5:4"], "5:4"),
])
def test_cli_argument_errors(tmp_path, fake_generate, capsys, args, needle):
    assert cli.main(["x", "-o", str(tmp_path / "o.png")] + args + _local(tmp_path)) == 2
    assert needle in capsys.readouterr().err
    assert not fake_generate


def test_cli_missing_files(tmp_path, fake_generate, capsys):
    missing = tmp_path / "nope.safetensors"
    argv = ["x", "-o", str(tmp_path / "o.png")] + _local(tmp_path)
    argv[argv.index("--vae") + 1] = str(missing)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--vae" in err and str(missing) in err
    # Lens-Base has no Comfy-Org single file
    assert cli.main(["x", "--variant", "base", "--device", "cpu", "--no-download"]) == 2
    assert "Lens-Base" in capsys.readouterr().err
    # nothing local and downloads disabled
    empty = tmp_path / "models"
    empty.mkdir()
    assert cli.main(["x", "--device", "cpu", "--no-download", "--models-dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "diffusion_models/lens_turbo_bf16.safetensors" in err and "--no-download" in err
    assert cli.main(["x", "-o", str(tmp_path / "no_dir" / "o.png")] + _local(tmp_path)) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_models_dir_and_download(tmp_path, monkeypatch, fake_generate):
    # ComfyUI layout inside --models-dir is used without downloading
    for sub in ("diffusion_models/lens_bf16.safetensors", "text_encoders/gpt_oss_20b_nvfp4.safetensors"):
        (tmp_path / sub).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / sub).write_bytes(b"x")
    requests = []

    def hf_hub_download(repo_id, filename, **kw):
        requests.append((repo_id, filename, kw))
        return str(Path(kw.get("local_dir", tmp_path)) / filename)

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(hf_hub_download=hf_hub_download))
    monkeypatch.setattr(cli, "_download", _REAL_DOWNLOAD)  # undo the fixture's guard
    args = cli.build_parser().parse_args(["x", "--variant", "lens", "--models-dir", str(tmp_path)])
    files = cli.resolve_files(args, "lens")
    assert files["transformer"] == tmp_path / "diffusion_models/lens_bf16.safetensors"
    assert files["text_encoder"] == tmp_path / "text_encoders/gpt_oss_20b_nvfp4.safetensors"
    assert requests == [("Comfy-Org/Lens", "vae/flux2-vae.safetensors",
                         {"local_dir": str(tmp_path)})]
    assert files["vae"] == tmp_path / "vae/flux2-vae.safetensors"
    # turbo without a models dir: all three from the Hub cache
    requests.clear()
    args = cli.build_parser().parse_args(["x"])
    cli.resolve_files(args, "turbo")
    assert [r[1] for r in requests] == ["diffusion_models/lens_turbo_bf16.safetensors",
                                        "text_encoders/gpt_oss_20b_nvfp4.safetensors",
                                        "vae/flux2-vae.safetensors"]
    assert all(r[0] == "Comfy-Org/Lens" and r[2] == {} for r in requests)



def test_cli_download_failure_is_a_cli_error(tmp_path, monkeypatch, fake_generate, capsys):
    def hf_hub_download(repo_id, filename, **kw):
        raise OSError("Connection refused")

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(hf_hub_download=hf_hub_download))
    monkeypatch.setattr(cli, "_download", _REAL_DOWNLOAD)  # undo the fixture's guard
    assert cli.main(["x", "--device", "cpu", "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "Comfy-Org/Lens/diffusion_models/lens_turbo_bf16.safetensors" in err
    assert "Connection refused" in err and "--models-dir" in err
