"""Command-line text-to-image with Lens / Lens-Turbo / Lens-Base.

    python -m lens_model.cli "a red fox in the snow" -o fox.png

Without local paths the Comfy-Org/Lens single files are fetched with ``huggingface_hub`` (the
only place this package downloads anything; ``--no-download`` turns it off). Before any model runs,
the options and all three model files (from their headers) are checked. Progress goes to stderr (a
bar with rate and ETA on a terminal, plain log lines otherwise, nothing with ``-q``); stdout
receives only the written file path(s). Ctrl-C stops with ``interrupted`` and exit status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import pipeline
from .checkpoints import SAFETENSORS_SUFFIXES, CheckpointError, detect_component, read_safetensors_header
from .constants import DEFAULT_DATE, MAX_SIDE, RATIOS, SIZE_MULTIPLE, VARIANT_DEFAULTS
from .dit_loading import variant_defaults_for
from .lora import load_lora, parse_lora_arg
from .precision import DTYPE_NAMES
from .resolution import BASES, default_base, resolution_for, validate_size
from .sampling import MAX_GUIDANCE, MAX_STEPS, MU_RANGE, NOISE_LAYOUTS

logger = logging.getLogger("lens_model.cli")

HF_REPO = "Comfy-Org/Lens"
HF_FILES = {
    "turbo": "diffusion_models/lens_turbo_bf16.safetensors",
    "lens": "diffusion_models/lens_bf16.safetensors",
    "text_encoder": "text_encoders/gpt_oss_20b_nvfp4.safetensors",
    "vae": "vae/flux2-vae.safetensors",
}
"""Files of huggingface.co/Comfy-Org/Lens, laid out like ComfyUI's ``models/`` folder."""

DTYPES = {name: DTYPE_NAMES[name] for name in ("bf16", "fp32")}
"""``--dtype`` choices (fp16 is never offered: Lens produces NaNs in it)."""

FLAGS = {"transformer": "--transformer", "text_encoder": "--text-encoder", "vae": "--vae"}
COMPONENTS = {"transformer": "dit", "text_encoder": "te", "vae": "vae"}

CLI_FILE_LABELS = {"dit": "--transformer", "te": "--text-encoder", "vae": "--vae"}
CLI_FILE_FIXES = {"dit": "Pass it with --transformer.", "te": "Pass it with --text-encoder.",
                  "vae": "Pass it with --vae."}
"""How the early file checks name the files and the fix for a file of another kind."""

CLI_OPTION_NAMES = {"steps": "--steps", "guidance_scale": "--cfg", "denoise": "--denoise",
                    "mu": "--mu", "seed": "--seed", "batch": "--batch"}

MODELS_SUBFOLDERS = {"transformer": ("diffusion_models", "unet"),
                     "text_encoder": ("text_encoders", "clip"), "vae": ("vae",)}
"""Where ``--models-dir`` is searched (ComfyUI's folder names, the legacy ones second)."""

NAME_HINTS = {"transformer": ("lens",), "text_encoder": ("gpt_oss", "gpt-oss", "gptoss"),
              "vae": ("flux2", "flux.2")}
"""Lower-case name parts that mark a file as the component in ``--models-dir``."""

OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
"""Output file types by extension (Pillow format names)."""

EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A user-facing error: printed as ``lens: error: <message>``, exit status 2."""


def _parse_ratio(text: str) -> str:
    parts = text.replace("/", ":").split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"ratio must look like W:H (e.g. 16:9), got {text!r}")
    return f"{int(parts[0])}:{int(parts[1])}"


MODULE_PROGRAM = "python -m lens_model.cli"


def program_name(argv0: Optional[str] = None) -> str:
    """How the user started the tool, for ``usage:``: the script name (``lens-generate``), or
    ``python -m lens_model.cli`` when run as a module (``argv0`` is then this file)."""
    argv0 = sys.argv[0] if argv0 is None and sys.argv else (argv0 or "")
    name = Path(argv0).name
    if not name or name in ("-c", "-m") or Path(argv0).suffix == ".py":
        return MODULE_PROGRAM
    return name


def _variant_defaults_text(key: str) -> str:
    """The per-variant defaults of ``key`` for help texts: ``"turbo 1, lens/base 5"``."""
    by_value: dict = {}
    for variant, defaults in VARIANT_DEFAULTS.items():
        by_value.setdefault(defaults[key], []).append(variant)
    return ", ".join(f"{'/'.join(names)} {value:g}" for value, names in by_value.items())


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or program_name(),
        description="Generate images with Microsoft's Lens text-to-image models (pure PyTorch).",
        epilog="Without --transformer/--text-encoder/--vae the Comfy-Org/Lens files are used: "
               "first from --models-dir (ComfyUI layout: diffusion_models/ or unet/, "
               "text_encoders/ or clip/, vae/; any file name, see README), otherwise downloaded "
               "with huggingface_hub (about 22 GB for Turbo). All three files are checked from "
               "their headers before any model runs. Ctrl-C stops with exit status 130.")
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("-o", "--output", default="lens.png",
                   help="output image: .png (with generation metadata), .jpg/.jpeg or .webp, "
                        "from the extension; no extension adds .png (several images: NAME_0.png, "
                        "NAME_1.png, ...)")
    p.add_argument("--variant", choices=("turbo", "lens", "base"),
                   help="model variant: sets the default steps/CFG and the file to look for or "
                        "download (default: from the DiT file name: 'turbo' in it -> turbo, "
                        "'base' -> base, any other name -> lens; without a DiT file: turbo)")
    p.add_argument("--negative", default="", help="negative prompt (ignored at CFG 1)")
    size = p.add_argument_group(f"size (default: 1:1 at base {default_base('cpu')} on CPU, "
                                f"{default_base('cuda')} on CUDA)")
    sides = f"multiple of {SIZE_MULTIPLE}, {SIZE_MULTIPLE}..{MAX_SIDE}"
    size.add_argument("--width", type=int, help=f"width in pixels ({sides})")
    size.add_argument("--height", type=int, help=f"height in pixels ({sides})")
    size.add_argument("--ratio", type=_parse_ratio, default=None,
                      help="preset aspect ratio W:H: " + " ".join(RATIOS))
    size.add_argument("--base", type=int, choices=BASES, default=None,
                      help="preset family (1024 ~1 MP, 1440 ~2 MP)")
    p.add_argument("--steps", type=int,
                   help=f"sampling steps, 1..{MAX_STEPS} (default {_variant_defaults_text('steps')})")
    p.add_argument("--cfg", type=float,
                   help=f"guidance scale, 0..{MAX_GUIDANCE:g} (default {_variant_defaults_text('cfg')})")
    p.add_argument("--seed", type=int, default=0,
                   help=f"noise seed, 0..{pipeline.SEED_MAX} (2^64-1, ComfyUI's seed range; "
                        "default 0)")
    p.add_argument("--batch", type=int, default=1,
                   help=f"images to generate, 1..{pipeline.MAX_BATCH} (default 1)")
    p.add_argument("--mu", type=float, default=None,
                   help=f"override the schedule shift mu ({MU_RANGE[0]:g}..{MU_RANGE[1]:g})")
    p.add_argument("--noise-layout", choices=NOISE_LAYOUTS, default="upstream",
                   help="noise draw layout (upstream [B,N,128] or ComfyUI [B,128,h,w]; with "
                        "'comfy' a seed gives the noise ComfyUI's samplers draw for it)")
    p.add_argument("--image", help="init image for img2img (resized to the output size)")
    p.add_argument("--denoise", type=float, default=1.0,
                   help="img2img strength in (0, 1] (1 = text-to-image)")
    p.add_argument("--mask", metavar="MASK.png",
                   help="inpainting mask for --image (same size as the image; white = repaint, "
                        "black = keep exactly, grey blends); works with any --denoise")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="apply a Lens LoRA (.safetensors, any published layout) with a strength "
                        "(default 1; negative allowed); repeat to stack several. Read and "
                        "checked against the DiT before any model runs")
    p.add_argument("--date", default=None, help=f"template date (default {DEFAULT_DATE})")
    files = p.add_argument_group("model files")
    files.add_argument("--transformer", help="DiT checkpoint: .safetensors file or diffusers folder")
    files.add_argument("--text-encoder", help="gpt-oss-20b checkpoint: file, shard set or folder")
    files.add_argument("--vae", help="FLUX.2 VAE checkpoint: file or diffusers folder")
    files.add_argument("--models-dir",
                       help="existing ComfyUI-style models folder to look in (and download "
                            "missing files to)")
    files.add_argument("--no-download", action="store_true",
                       help="never download; fail if a file is missing locally")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="compute device (default: cuda if available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="DiT compute dtype (default: the stored dtype)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="only print the output path(s), warnings and errors (no progress)")
    return p


# --------------------------------------------------------------------------------------------
# model files
# --------------------------------------------------------------------------------------------

def _download(filename: str, models_dir: Optional[str]) -> Path:
    """Fetch one Comfy-Org/Lens file with huggingface_hub."""
    # Imported here, not at the top: importing ``hf_hub_download`` took 1.6-1.9 s on a 2-core
    # CPU machine, which every ``--help`` and every run with local files would pay, and local
    # files must keep working where the package is missing.
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise CliError("downloading needs huggingface_hub (pip install huggingface_hub), or pass "
                       "local files with --transformer/--text-encoder/--vae") from e
    try:  # the hub logs through its own handler; without this every warning prints twice
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.disable_propagation()
    except (ImportError, AttributeError):
        pass
    logger.info("fetching %s/%s%s", HF_REPO, filename,
                f" into {models_dir}" if models_dir else " (Hugging Face cache)")
    kw = {"local_dir": models_dir} if models_dir else {}
    try:
        return Path(hf_hub_download(repo_id=HF_REPO, filename=filename, **kw))
    except OSError as e:  # network and HTTP errors of huggingface_hub / requests are OSErrors
        raise CliError(f"downloading {HF_REPO}/{filename} failed ({e}); check the network "
                       "connection, or pass local files with --transformer/--text-encoder/--vae "
                       "or --models-dir") from e


def _header_kind(path: Path) -> Optional[str]:
    """"dit" / "te" / "vae" / another family from a safetensors header, None when unreadable."""
    try:
        infos, _ = read_safetensors_header(path)
    except Exception:  # not a safetensors file, truncated header, ...
        return None
    return detect_component(infos)


def _candidates(root: Path, key: str) -> list[Path]:
    """``.safetensors`` / ``.sft`` files under the component's subfolders of ``root`` (recursive,
    sorted by relative path like ComfyUI's model lists), then files directly in ``root``."""
    out = []
    for sub in MODELS_SUBFOLDERS[key]:
        d = root / sub
        if d.is_dir():
            out += sorted((p for p in d.rglob("*") if p.suffix in SAFETENSORS_SUFFIXES
                           and p.is_file()), key=lambda p: p.relative_to(d).as_posix())
    out += sorted(p for p in root.iterdir() if p.suffix in SAFETENSORS_SUFFIXES and p.is_file())
    return out


def find_in_models_dir(root: Path, key: str, variant: Optional[str]) -> Optional[Path]:
    """Choose the file for ``key`` ("transformer", "text_encoder", "vae") in a models folder.

    Rule (README "Command line"): among the files of the component's folders, those whose name
    says what they are (:data:`NAME_HINTS`), else those whose header holds that kind of model; for
    the DiT, those of ``variant`` by name (:func:`~lens_model.dit_loading.variant_defaults_for`; with
    ``variant`` None a Turbo file, else any Lens DiT); then the Comfy-Org file name, else the first
    in ComfyUI's (alphabetical) order. Logs what was found and chosen; None when nothing fits.
    """
    files = _candidates(root, key)
    where = " or ".join(f"{sub}/" for sub in MODELS_SUBFOLDERS[key])
    named = [p for p in files if any(h in p.name.lower() for h in NAME_HINTS[key])]
    if not named:
        named = [p for p in files if _header_kind(p) == COMPONENTS[key]]
    if not named:
        logger.info("--models-dir: no %s file in %s (%s)", FLAGS[key][2:], root, where)
        return None
    pool = named
    if key == "transformer":
        want = variant or "turbo"
        pool = [p for p in named if variant_defaults_for(p)["variant"] == want]
        if not pool and variant is None:
            pool = named
    rel = [p.relative_to(root).as_posix() for p in named]
    if not pool:
        logger.info("--models-dir: found %s in %s, none of them a %s DiT by name", ", ".join(rel),
                    root, variant)
        return None
    default = Path(HF_FILES.get(variant or "turbo", "") if key == "transformer"
                   else HF_FILES[key]).name
    chosen = sorted(pool, key=lambda p: p.name != default)[0]  # stable: ComfyUI order otherwise
    if len(named) > 1:
        logger.info("--models-dir: found %d %s files: %s; using %s", len(named), FLAGS[key][2:],
                    ", ".join(rel), chosen.relative_to(root).as_posix())
    else:
        logger.info("--models-dir: using %s", chosen.relative_to(root).as_posix())
    return chosen


def find_local_files(args: argparse.Namespace, variant: Optional[str] = None) -> dict:
    """{"transformer", "text_encoder", "vae"} -> explicit path, a ``--models-dir`` find (a DiT of
    ``variant``, default ``args.variant``), or None."""
    variant = variant or args.variant
    out = {}
    root = None
    if args.models_dir:
        root = Path(args.models_dir).expanduser()
        if not root.is_dir():
            raise CliError(f"--models-dir {args.models_dir!r} does not exist (or is not a folder); "
                           "create it, fix the path, or drop --models-dir")
    for key, flag in FLAGS.items():
        explicit = getattr(args, key)
        if explicit:
            path = Path(explicit).expanduser()
            if not path.exists():
                raise CliError(f"{flag} {explicit!r} does not exist")
            out[key] = path
        else:
            out[key] = find_in_models_dir(root, key, variant) if root is not None else None
    return out


def download_missing(args: argparse.Namespace, files: dict, variant: str) -> dict:
    """Fill the None entries of ``files`` by downloading (or raise CliError with --no-download)."""
    out = dict(files)
    for key, flag in FLAGS.items():
        if out[key] is not None:
            continue
        if key == "transformer" and variant == "base":
            raise CliError("Lens-Base has no Comfy-Org single file to download; pass "
                           "--transformer PATH (a Lens-Base DiT file or diffusers transformer/ "
                           "folder, e.g. from YuCollection/Lens-Base-Diffusers)")
        filename = HF_FILES[variant if key == "transformer" else key]
        if args.no_download:
            where = (f" in {args.models_dir} ({' or '.join(MODELS_SUBFOLDERS[key])}/)"
                     if args.models_dir else "")
            raise CliError(f"no {flag} given and no {flag[2:]} file found{where} (Comfy-Org's is "
                           f"{filename}); pass {flag} PATH or drop --no-download")
        out[key] = _download(filename, args.models_dir)
    return out


def resolve_files(args: argparse.Namespace, variant: str) -> dict:
    """Return {"transformer", "text_encoder", "vae"} paths: explicit > --models-dir > download."""
    return download_missing(args, find_local_files(args, variant), variant)


def check_files(files: dict):
    """Check the given files from their headers (kind, layout, shapes, fit); CliError naming the
    option. Files that are None are skipped. Returns :class:`~lens_model.pipeline.ModelFiles`."""
    try:
        return pipeline.check_model_files(files.get("transformer"), files.get("text_encoder"),
                                          files.get("vae"), labels=CLI_FILE_LABELS,
                                          fixes=CLI_FILE_FIXES)
    except (CheckpointError, FileNotFoundError) as e:
        raise CliError(str(e)) from None


def read_init_image(args: argparse.Namespace, width: int, height: int):
    """``--image`` / ``--mask`` read and checked at the output size (before any model file is
    looked at) → ``(image, mask)`` tensors for :func:`lens_model.pipeline.generate`, or Nones."""
    if args.mask and not args.image:
        raise CliError("--mask needs --image (the picture the mask repaints)")
    for flag, value in (("--image", args.image), ("--mask", args.mask)):
        if value and not Path(value).expanduser().is_file():
            raise CliError(f"{flag} {value!r} does not exist")
    image = Path(args.image).expanduser() if args.image else None
    mask = Path(args.mask).expanduser() if args.mask else None
    try:
        return pipeline.load_init_image(image, mask, width, height)
    except (OSError, ValueError) as e:  # unreadable image, mask of another size
        flag = "--mask" if mask is not None and "mask" in str(e) else "--image"
        raise CliError(f"{flag}: {e}") from None


def read_loras(specs: Sequence[str]) -> list:
    """``--lora FILE[:STRENGTH]`` values → ``[(LensLoRA, strength), ...]``; CliError naming the
    option for a missing, unreadable or refused file (LoRA files only: no model is touched)."""
    out = []
    for spec in specs:
        try:
            path, strength = parse_lora_arg(spec)
        except ValueError as e:
            raise CliError(str(e)) from None
        if not Path(path).expanduser().is_file():
            raise CliError(f"--lora {spec!r}: {path!r} does not exist")
        try:
            out.append((load_lora(Path(path).expanduser()), strength))
        except ValueError as e:  # LoRAError
            raise CliError(f"--lora {spec!r}: {e}") from None
    return out


def check_loras_fit(loras: list, dit_config) -> None:
    """Each LoRA's shapes against the DiT configuration read from its header; CliError."""
    for lo, _ in loras:
        try:
            lo.check(dit_config)
        except ValueError as e:
            raise CliError(f"--lora: {e}") from None


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

def _output_paths(output: str, count: int) -> list[Path]:
    """The file(s) to write; the type comes from the extension (:data:`OUTPUT_FORMATS`)."""
    out = Path(output).expanduser()
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    elif out.suffix.lower() not in OUTPUT_FORMATS:
        raise CliError(f"-o {output!r}: unknown image type {out.suffix!r}; use .png, .jpg, .jpeg "
                       "or .webp")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def _parameters_text(meta: dict) -> str:
    """The A1111-style summary many viewers read."""
    neg = f"\nNegative prompt: {meta['negative']}" if meta["negative"] else ""
    return (f"{meta['prompt']}{neg}\nSteps: {meta['steps']}, CFG scale: {meta['cfg']}, "
            f"Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}, "
            f"Model: {meta['model']}, Sampler: Euler (flow matching)")


def generation_metadata(prompt: str, negative: str, seed: int, steps: int, cfg: float, width: int,
                        height: int, variant: str, transformer, noise_layout: str, *, mu=None,
                        denoise=None, mask=None, loras=()) -> dict:
    """The ``lens_generation`` metadata of one run, in the key order the PNG stores (the batch job
    writes the same dict, so its PNGs are byte-identical). ``loras``: ``(name or path, strength)``."""
    meta = {"prompt": prompt, "negative": negative, "seed": seed, "steps": steps, "cfg": cfg,
            "width": width, "height": height, "variant": variant,
            "model": Path(transformer).name, "noise_layout": noise_layout}
    if mu is not None:
        meta["mu"] = mu
    if denoise is not None:
        meta["denoise"] = denoise
    if mask:
        meta["mask"] = Path(mask).name
    if loras:
        meta["lora"] = [{"name": Path(name).name, "strength": strength} for name, strength in loras]
    return meta


def png_info(meta: dict):
    """The PNG text chunks the tool writes for generation metadata ``meta`` (also used by
    :mod:`lens_model.batch`, whose PNGs must be byte-identical to the tool's)."""
    info = PngInfo()
    # The keys "prompt"/"workflow" are avoided on purpose: ComfyUI parses those as workflow JSON
    # when a PNG is dropped on it.
    info.add_text("parameters", _parameters_text(meta))
    info.add_text("lens_generation", json.dumps(meta, ensure_ascii=False))
    return info


def save_image(img, path: Path, meta: dict) -> None:
    """Write ``img`` atomically (a temporary file in the same folder, renamed over ``path``), so an
    interrupted or failed write never leaves a partial file. PNG carries ``parameters`` and
    ``lens_generation`` text chunks, JPEG the ``parameters`` text as a comment, WebP no metadata."""
    fmt = OUTPUT_FORMATS[path.suffix.lower()]
    if fmt == "PNG":
        kw = {"pnginfo": png_info(meta)}
    elif fmt == "JPEG":
        kw = {"quality": 95, "comment": _parameters_text(meta).encode("utf-8")}
    else:
        kw = {"quality": 95}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            img.save(f, format=fmt, **kw)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------

class ProgressReporter:
    """``progress(stage, done, total)`` of :func:`lens_model.pipeline.generate` shown on stderr.

    ``mode``: "bar" (a tqdm bar with rate and ETA per stage run; for a terminal), "lines" (plain
    ``logging`` lines with the same numbers, no carriage returns: the first and last unit of a run
    and at most one line per ``interval`` seconds between; for logs and pipes) or "off".
    """

    UNITS = {"text encoder": "layer", "VAE encode": "block", "sampling": "step",
             "VAE decode": "block"}
    LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit}s [{elapsed}<{remaining}, {rate_fmt}]"

    def __init__(self, mode: str, interval: float = 5.0) -> None:
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"mode must be 'bar', 'lines' or 'off', got {mode!r}")
        self.mode = mode
        self.interval = interval
        self.stage: Optional[str] = None
        self.done = 0
        self.bar = None
        self.t0 = 0.0
        self.first = 0
        self.last_line = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.mode == "off":
            return
        new_run = stage != self.stage or done <= self.done  # e.g. the negative prompt's run
        if new_run:
            # The first report comes after the first unit: rates and ETAs count from there.
            self.close()
            self.stage, self.t0, self.first, self.last_line = stage, time.monotonic(), done, 0.0
            if self.mode == "bar":
                self.bar = tqdm(total=total, initial=done, desc=stage,
                                unit=self.UNITS.get(stage, "it"), file=sys.stderr,
                                dynamic_ncols=True)
        self.done = done
        if self.bar is not None:
            if self.bar.total != total:
                self.bar.total = total
            self.bar.update(done - self.bar.n)
        else:
            now = time.monotonic()
            if done in (1, total) or now - self.last_line >= self.interval:
                self.last_line = now
                logger.info("%s", tqdm.format_meter(done, total, now - self.t0, prefix=stage,
                                                    unit=self.UNITS.get(stage, "it"),
                                                    bar_format=self.LINE_FORMAT,
                                                    initial=self.first))
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.stage, self.done = None, 0


def _progress_mode(quiet: bool) -> str:
    if quiet:
        return "off"
    return "bar" if sys.stderr.isatty() else "lines"


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                                format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        reporter = ProgressReporter(_progress_mode(args.quiet))
        redirect = contextlib.nullcontext()
        if reporter.mode == "bar":  # log lines are printed above the bar instead of through it
            redirect = logging_redirect_tqdm()
        try:
            with redirect:
                return _run(args, reporter)
        finally:
            reporter.close()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CliError as e:
        print(f"lens: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"lens: error: {e}", file=sys.stderr)
        return 1


def _cli_message(e: ValueError) -> str:
    """``validate_size`` / ``resolution_for`` messages with the option names."""
    text = str(e)
    for name in ("width", "height"):
        if text.startswith(name):
            return "--" + text
    return text


def _run(args: argparse.Namespace, progress: ProgressReporter) -> int:
    try:  # everything that does not depend on the variant, before any file is touched
        pipeline.check_generation_options(steps=args.steps, guidance=args.cfg, mu=args.mu,
                                          denoise=args.denoise, seed=args.seed, batch=args.batch,
                                          names=CLI_OPTION_NAMES)
    except ValueError as e:
        raise CliError(str(e)) from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was requested but CUDA is not available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    width, height = output_size(args, device)
    paths = _output_paths(args.output, args.batch)
    for path in paths:
        if not path.parent.is_dir():
            raise CliError(f"output folder {str(path.parent)!r} does not exist")
    image, mask = read_init_image(args, width, height)
    loras = read_loras(args.lora)

    files, found, variant = resolve_model_files(args)
    if loras and found is not None:
        check_loras_fit(loras, found.transformer)
    defaults = VARIANT_DEFAULTS[variant]
    steps = args.steps if args.steps is not None else defaults["steps"]
    cfg = args.cfg if args.cfg is not None else defaults["cfg"]

    logger.info("Lens %s: %dx%d, %d step(s), cfg %g, seed %d, %s", variant, width, height, steps,
                cfg, args.seed, device)
    images = pipeline.generate(
        args.prompt, negative=args.negative, transformer_path=files["transformer"],
        text_encoder_path=files["text_encoder"], vae_path=files["vae"], width=width,
        height=height, steps=steps, guidance=cfg, seed=args.seed, batch=args.batch,
        device=device, dtype=DTYPES.get(args.dtype), date=args.date, mu=args.mu,
        noise_layout=args.noise_layout, image=image, denoise=args.denoise,
        progress=progress, lora=loras or None, mask=mask)

    meta = generation_metadata(
        args.prompt, args.negative, args.seed, steps, cfg, width, height, variant,
        files["transformer"], args.noise_layout, mu=args.mu,
        denoise=args.denoise if args.image else None, mask=args.mask,
        loras=[(lo.name, strength) for lo, strength in loras])
    for i, (img, path) in enumerate(zip(images, paths)):
        save_image(img, path, dict(meta, index=i))
        print(path)
    return 0


def output_size(args: argparse.Namespace, device: torch.device) -> tuple[int, int]:
    """(width, height) from --width/--height, else --ratio/--base (base :func:`default_base` of
    the device), checked by :func:`validate_size`; CliError naming the option."""
    if (args.width is None) != (args.height is None):
        raise CliError("give both --width and --height, or neither")
    if args.width is not None:
        if args.ratio or args.base:
            raise CliError("--width/--height and --ratio/--base are exclusive")
        width, height = args.width, args.height
    else:
        base = args.base or default_base(device)
        try:
            width, height = resolution_for(base, args.ratio or "1:1")
        except ValueError as e:
            raise CliError(str(e)) from None
    try:
        return validate_size(width, height)
    except ValueError as e:
        raise CliError(_cli_message(e)) from None


def resolve_model_files(args: argparse.Namespace):
    """The three model files and the variant: ``(files, configs, variant)``.

    Local files (explicit, then ``--models-dir``) are header-checked before anything is
    downloaded; the variant is ``--variant``, else guessed from the DiT file name (logged), else
    turbo; missing files are then downloaded (or CliError with ``--no-download``) and checked.
    ``configs`` is the :class:`~lens_model.pipeline.ModelFiles` of the final set.
    """
    local = find_local_files(args)
    found = check_files(local)  # the files at hand, before downloading the others
    if args.variant:
        variant = args.variant
    elif local["transformer"] is not None:
        guess = variant_defaults_for(local["transformer"])
        variant = guess["variant"]
        logger.info("variant %s (%d steps, CFG %g) from the DiT file name %s%s", variant,
                    guess["steps"], guess["cfg"], local["transformer"],
                    "" if variant == "turbo" else "; pass --variant turbo for a Lens-Turbo file")
    else:
        variant = "turbo"
    files = download_missing(args, local, variant)
    if any(local[k] is None for k in FLAGS):
        found = check_files(files)
    return files, found, variant


if __name__ == "__main__":
    sys.exit(main())
