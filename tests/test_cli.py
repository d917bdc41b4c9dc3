"""Command-line tool: end to end on tiny weights, argument handling, file resolution and downloads."""

import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import lens_model.pipeline as pipeline
from lens_model import cli
from lens_tiny_files import write_broken_transformer, write_flux1_vae, write_tiny_text_encoder

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "fixtures/golden/lens_tiny"
_REAL_DOWNLOAD = cli._download
_REAL_CHECK = pipeline.check_model_files

pytest.importorskip("lens_model.text_encoder", reason="text encoder module not in the repo yet")


@pytest.fixture(scope="module")
def tiny_te(tmp_path_factory) -> Path:
    """A tiny random gpt-oss text encoder that fits the tiny DiT.

    The golden ``text_encoder/`` cannot feed the golden ``transformer/``: its hidden size is 64
    (context 4·64 = 256 channels) where the tiny DiT expects ``enc_hidden_dim`` 32, and its vocabulary
    has 512 entries while the harmony template needs ids up to ~200k. This folder keeps the golden
    configuration except hidden_size 32 and the full o200k_harmony vocabulary (201088).
    """
    return write_tiny_text_encoder(tmp_path_factory.mktemp("tiny_te"))


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
    # stderr is not a terminal here: progress as plain lines with rate and ETA, no bar redraws
    assert "\r" not in res.stderr
    for line in ("text encoder: 24/24 layers [", "sampling: 2/2 steps [", "VAE decode: "):
        assert line in res.stderr, res.stderr[-3000:]


# ------------------------------------------------------------------------- in-process, fake pipeline

@pytest.fixture
def fake_generate(monkeypatch):
    calls = []

    def generate(prompt, **kw):
        calls.append(dict(kw, prompt=prompt))
        n = kw["batch"]
        return [Image.new("RGB", (kw["width"], kw["height"]), (i * 40, 0, 0)) for i in range(n)]

    monkeypatch.setattr(pipeline, "generate", generate)
    # the placeholder files of _local are not models: file checks have their own tests
    monkeypatch.setattr(pipeline, "check_model_files", lambda *a, **kw: None, raising=False)

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
    (["--steps", "100000"], "from 1 to 200"),
    (["--ratio", "5:4"], "5:4"),
    (["--cfg", "nan"], "--cfg must be a finite number"),
    (["--cfg", "inf"], "--cfg must be a finite number"),
    (["--mu", "nan"], "--mu must be a finite number"),
    (["--denoise", "nan"], "--denoise must be a finite number"),
    (["--seed", "99999999999999999999999"], "--seed must be an integer from 0 to 18446744073709551615"),
    (["--seed", "-1"], "--seed must be an integer from 0"),
    (["--batch", "0"], "--batch must be an integer from 1 to 64"),
    (["--batch", "100000"], "--batch must be an integer from 1 to 64"),
    (["--width", "4096", "--height", "64"], "--width 4096 is out of range"),
    (["-o", "fox.gif"], "unknown image type '.gif'"),
])
def test_cli_argument_errors(tmp_path, fake_generate, capsys, args, needle):
    assert cli.main(["x", "-o", str(tmp_path / "o.png")] + args + _local(tmp_path)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Overflow" not in err and "Traceback" not in err
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


# ------------------------------------------------------------------ file checks before any work

@pytest.fixture(scope="module")
def header_te(tmp_path_factory) -> Path:
    """Text-encoder headers that fit the golden tiny DiT (small vocabulary: header checks only)."""
    return write_tiny_text_encoder(tmp_path_factory.mktemp("header_te"), vocab_size=512)


def _files(te, transformer=GOLDEN / "transformer", vae=GOLDEN / "vae"):
    return ["--transformer", str(transformer), "--text-encoder", str(te), "--vae", str(vae),
            "--device", "cpu", "--width", "64", "--height", "64", "--no-download"]


def test_cli_checks_all_three_files_before_any_model_runs(tmp_path, fake_generate, monkeypatch,
                                                           capsys, header_te):
    monkeypatch.setattr(pipeline, "check_model_files", _REAL_CHECK)
    out = ["x", "-o", str(tmp_path / "o.png")]
    broken = write_broken_transformer(tmp_path / "lens_turbo_broken.safetensors")
    assert cli.main(out + _files(header_te, transformer=broken)) == 2
    err = capsys.readouterr().err
    assert err.startswith("lens: error: --transformer: ") and "img_mlp.w2.weight" in err
    # a text encoder given as the VAE: the message names the CLI options, not ComfyUI folders
    assert cli.main(out + _files(header_te, vae=header_te)) == 2
    err = capsys.readouterr().err
    assert "--vae: " in err and "Pass it with --text-encoder" in err
    assert "models/" not in err and "loader" not in err
    assert cli.main(out + _files(header_te, vae=write_flux1_vae(tmp_path / "ae.safetensors"))) == 2
    assert "--vae: " in (err := capsys.readouterr().err) and "FLUX.1" in err
    # each file fine on its own, but the text encoder is 64 wide and the DiT takes 32
    assert cli.main(out + _files(GOLDEN / "text_encoder")) == 2
    err = capsys.readouterr().err
    assert "--text-encoder and --transformer do not fit" in err and "64" in err
    assert not fake_generate  # nothing ran
    assert cli.main(out + _files(header_te)) == 0  # the consistent set passes the checks


# ------------------------------------------------------------------ output files

def test_cli_output_type_from_extension(tmp_path, fake_generate, capsys):
    for name, fmt in (("fox.jpg", "JPEG"), ("fox.JPEG", "JPEG"), ("fox.webp", "WEBP"),
                      ("fox", "PNG")):
        out = tmp_path / name
        assert cli.main(["fox", "-o", str(out), "--width", "64", "--height", "64"]
                        + _local(tmp_path)) == 0
        written = Path(capsys.readouterr().out.strip())
        assert written == (out if out.suffix else tmp_path / "fox.png")
        with Image.open(written) as img:
            assert img.format == fmt and img.size == (64, 64)
    assert not (tmp_path / "fox.jpg.png").exists()
    with Image.open(tmp_path / "fox.jpg") as img:
        assert img.info["comment"].decode().startswith("fox\nSteps: 4")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_cli_ctrl_c_one_line_exit_130_no_partial_files(tmp_path, monkeypatch, fake_generate, capsys):
    def interrupted(prompt, **kw):
        kw["progress"]("text encoder", 1, 24)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "generate", interrupted)
    out = tmp_path / "fox.png"
    assert cli.main(["fox", "-o", str(out)] + _local(tmp_path)) == 130
    cap = capsys.readouterr()
    assert cap.err == "interrupted\n" and cap.out == ""
    assert not out.exists()

    # interrupted while the image is being written: neither the file nor a temporary is left
    monkeypatch.setattr(pipeline, "generate",
                        lambda prompt, **kw: [Image.new("RGB", (kw["width"], kw["height"]))])
    real_save = Image.Image.save

    def save_then_stop(self, fp, *a, **kw):
        real_save(self, fp, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_then_stop)
    before = set(tmp_path.iterdir())
    assert cli.main(["fox", "-o", str(out), "--width", "64", "--height", "64"]
                    + _local(tmp_path)) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert set(tmp_path.iterdir()) == before and not out.exists()


# ------------------------------------------------------------------ progress

def _fake_run(progress):
    for i in range(1, 4):
        progress("text encoder", i, 3)
    for i in range(1, 3):
        progress("sampling", i, 2)
    for i in range(1, 6):
        progress("VAE decode", i, 5)


def test_progress_plain_lines_when_not_a_terminal(tmp_path, monkeypatch, fake_generate, capsys, caplog):
    def generate(prompt, **kw):
        _fake_run(kw["progress"])
        return [Image.new("RGB", (kw["width"], kw["height"]))]

    monkeypatch.setattr(pipeline, "generate", generate)
    argv = ["fox", "-o", str(tmp_path / "a.png"), "--width", "64", "--height", "64"]
    with caplog.at_level(logging.INFO, logger="lens_model.cli"):
        assert cli.main(argv + [a for a in _local(tmp_path) if a != "-q"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "lens_model.cli"]
    for want in ("text encoder: 1/3 layers [", "text encoder: 3/3 layers [", "sampling: 2/2 steps [",
                 "VAE decode: 5/5 blocks ["):
        assert any(line.startswith(want) for line in lines), lines
    assert any("/s]" in line and "<" in line for line in lines)  # rate and ETA
    assert "\r" not in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lens_model.cli"):
        assert cli.main(argv + _local(tmp_path)) == 0  # -q
    assert not [r for r in caplog.records if "sampling" in r.getMessage()]


def test_progress_bar_on_a_terminal(capsys):
    reporter = cli.ProgressReporter("bar")
    _fake_run(reporter)
    reporter.close()
    err = capsys.readouterr().err
    assert "\r" in err and "sampling: 100%" in err and "2/2" in err and "step/s" in err


# ------------------------------------------------------------------ --models-dir

def _touch(root, *names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def _vae_header(path):
    """A safetensors header the kind detector reads as a FLUX.2 VAE (not loadable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"decoder.up.0.block.0.norm1.weight": torch.zeros(1),
               "bn.running_mean": torch.zeros(1)}, str(path))


def test_models_dir_missing_is_an_error_not_a_download(tmp_path, fake_generate, capsys):
    assert cli.main(["x", "--device", "cpu", "--models-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--models-dir" in err and "does not exist" in err and "nope" in err


def test_models_dir_finds_other_names_and_logs_the_choice(tmp_path, fake_generate, caplog):
    _touch(tmp_path, "diffusion_models/lens_bf16.safetensors",
           "diffusion_models/lens_turbo_mxfp8.safetensors", "diffusion_models/flux1-dev.safetensors",
           "text_encoders/t5xxl_fp16.safetensors", "text_encoders/gpt_oss_20b_mxfp4.safetensors",
           "vae/ae.safetensors", "vae/sdxl_vae.safetensors")
    _vae_header(tmp_path / "vae/my-vae.safetensors")  # no hint in the name: found by its header
    args = cli.build_parser().parse_args(["x", "--models-dir", str(tmp_path), "--no-download"])
    with caplog.at_level(logging.INFO, logger="lens_model.cli"):
        files = cli.find_local_files(args)
    assert files == {"transformer": tmp_path / "diffusion_models/lens_turbo_mxfp8.safetensors",
                     "text_encoder": tmp_path / "text_encoders/gpt_oss_20b_mxfp4.safetensors",
                     "vae": tmp_path / "vae/my-vae.safetensors"}
    text = caplog.text
    assert "diffusion_models/lens_bf16.safetensors, diffusion_models/lens_turbo_mxfp8.safetensors" in text
    assert "using diffusion_models/lens_turbo_mxfp8.safetensors" in text
    # --variant lens picks the non-Turbo file; a second Turbo file under the Comfy-Org name wins
    args.variant = "lens"
    assert cli.find_local_files(args)["transformer"].name == "lens_bf16.safetensors"
    _touch(tmp_path, "diffusion_models/lens_turbo_bf16.safetensors")
    args.variant = None
    assert cli.find_local_files(args)["transformer"].name == "lens_turbo_bf16.safetensors"


def test_models_dir_without_turbo_uses_the_lens_file_it_has(tmp_path, fake_generate):
    _touch(tmp_path, "unet/lens_bf16.safetensors", "clip/gpt_oss_20b_nvfp4.safetensors",
           "vae/flux2-vae.safetensors")
    assert cli.main(["x", "-o", str(tmp_path / "o.png"), "--models-dir", str(tmp_path),
                     "--device", "cpu", "--no-download", "-q"]) == 0
    kw = fake_generate[-1]
    assert kw["transformer_path"] == tmp_path / "unet/lens_bf16.safetensors"
    assert (kw["steps"], kw["guidance"]) == (20, 5.0)  # Lens defaults from the file name


def test_variant_guess_matches_help(tmp_path, fake_generate):
    helptext = " ".join(cli.build_parser().format_help().split())
    assert "any other name -> lens; without a DiT file: turbo" in helptext
    assert cli.main(["x", "-o", str(tmp_path / "o.png")] + _local(tmp_path, "my_dit.safetensors")) == 0
    assert (fake_generate[-1]["steps"], fake_generate[-1]["guidance"]) == (20, 5.0)
    assert cli.main(["x", "-o", str(tmp_path / "o.png")] + _local(tmp_path, "Lens-Turbo.sft")) == 0
    assert (fake_generate[-1]["steps"], fake_generate[-1]["guidance"]) == (4, 1.0)


def test_every_option_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Command line"):]
    section = section[:section.index("\n## ", 3)]
    for action in cli.build_parser()._actions:
        for opt in action.option_strings:
            if opt not in ("-h", "--help"):
                assert opt in section, opt


HUB_SCRIPT = r"""
import sys, huggingface_hub
from huggingface_hub.utils import logging as hf_logging

def hf_hub_download(repo_id, filename, **kw):
    hf_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    raise OSError("Connection refused")

huggingface_hub.hf_hub_download = hf_hub_download
from lens_model import cli
sys.exit(cli.main(["x", "--device", "cpu", "-o", sys.argv[1]]))
"""


def test_hub_warnings_print_once(tmp_path):
    pytest.importorskip("huggingface_hub")
    res = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(tmp_path / "o.png")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("Retrying in 1s") == 1, res.stderr
    assert "Connection refused" in res.stderr


# ------------------------------------------------------------------ LoRA

def _lora_helpers():
    from test_lora import _save, factors, merged_model, write_layout
    return _save, factors, merged_model, write_layout


def test_cli_lora_equals_the_merged_checkpoint(tmp_path, tiny_te, capsys):
    import shutil

    _, factors, merged_model, write_layout = _lora_helpers()
    fac = factors(7)
    lora_path, scale = write_layout(tmp_path, "loboforge", fac)
    merged = tmp_path / "merged_transformer"
    merged.mkdir()
    shutil.copy(GOLDEN / "transformer" / "config.json", merged / "config.json")
    save_file({k: v.contiguous() for k, v in merged_model((fac, 0.6, scale)).state_dict().items()},
              str(merged / "diffusion_pytorch_model.safetensors"))
    common = ["--steps", "2", "--cfg", "1", "--seed", "4", "-q"]
    outs = {}
    for name, extra in (("lora", _files(tiny_te) + ["--lora", f"{lora_path}:0.6"]),
                        ("merged", _files(tiny_te, transformer=merged)),
                        ("plain", _files(tiny_te))):
        outs[name] = tmp_path / f"{name}.png"
        assert cli.main(["a fox", "-o", str(outs[name])] + common + extra) == 0, capsys.readouterr().err
    px = {k: np.asarray(Image.open(p)).astype(int) for k, p in outs.items()}
    assert np.abs(px["merged"] - px["plain"]).max() > 10          # the LoRA changes the image
    assert np.abs(px["lora"] - px["merged"]).max() <= 1           # as merging it does (uint8 rounding)
    meta = json.loads(Image.open(outs["lora"]).text["lens_generation"])
    assert meta["lora"] == [{"name": lora_path.name, "strength": 0.6}]


def test_cli_wrong_lora_fails_before_any_model_runs(tmp_path, fake_generate, monkeypatch, capsys,
                                                    header_te):
    _save, factors, _, write_layout = _lora_helpers()
    monkeypatch.setattr(pipeline, "check_model_files", _REAL_CHECK)
    out = ["x", "-o", str(tmp_path / "o.png")] + _files(header_te)
    full_size = _save(tmp_path, {
        "lora_unet_transformer_blocks_0_attn_img_qkv.lora_down.weight": torch.zeros(16, 1536),
        "lora_unet_transformer_blocks_0_attn_img_qkv.lora_up.weight": torch.zeros(4608, 16)},
        "full_size.safetensors")
    assert cli.main(out + ["--lora", str(full_size)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lens: error: --lora: ") and "full_size" in err and "[16, 1536]" in err
    sdxl = _save(tmp_path, {k: torch.zeros(2, 2) for k in (
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight")}, "sdxl.safetensors")
    assert cli.main(out + ["--lora", f"{sdxl}:0.5"]) == 2
    err = capsys.readouterr().err
    assert "--lora" in err and "sdxl.safetensors" in err and "SDXL" in err
    assert cli.main(out + ["--lora", str(tmp_path / "nope.safetensors:0.8")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    assert not fake_generate  # nothing ran
    # good ones are read once, stacked in order, with their strengths
    (tmp_path / "b").mkdir()
    a, _ = write_layout(tmp_path, "loboforge", factors(8))
    b, _ = write_layout(tmp_path / "b", "musubi", factors(9))
    assert cli.main(out + ["--lora", f"{a}:0.5", "--lora", str(b)]) == 0
    got = fake_generate[-1]["lora"]
    assert [(lo.name, s) for lo, s in got] == [(a.name, 0.5), (b.name, 1.0)]


# ------------------------------------------------------------------ program name

def test_program_name_in_usage(tmp_path):
    assert cli.program_name("/venv/bin/lens-generate") == "lens-generate"
    assert cli.program_name(str(ROOT / "lens_model" / "cli.py")) == "python -m lens_model.cli"
    assert cli.program_name("-c") == "python -m lens_model.cli"
    # what pip's console script does: import main and call it under the script's own name
    script = tmp_path / "lens-generate"
    script.write_text("import sys\nfrom lens_model.cli import main\nsys.exit(main())\n")
    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT))
    for cmd, usage in (([sys.executable, str(script), "--help"], "usage: lens-generate "),
                       ([sys.executable, "-m", "lens_model.cli", "--help"],
                        "usage: python -m lens_model.cli ")):
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(usage), res.stdout[:200]
