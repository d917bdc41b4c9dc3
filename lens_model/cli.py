"""Command-line text-to-image with Lens / Lens-Turbo / Lens-Base.

    python -m lens_model.cli "a red fox in the snow" -o fox.png

Without local paths the Comfy-Org/Lens single files are fetched with ``huggingface_hub`` (the
only place this package downloads anything; ``--no-download`` turns it off). Progress goes to
stderr through ``logging``; stdout receives only the written file path(s).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

logger = logging.getLogger("lens_model.cli")

HF_REPO = "Comfy-Org/Lens"
HF_FILES = {
    "turbo": "diffusion_models/lens_turbo_bf16.safetensors",
    "lens": "diffusion_models/lens_bf16.safetensors",
    "text_encoder": "text_encoders/gpt_oss_20b_nvfp4.safetensors",
    "vae": "vae/flux2-vae.safetensors",
}
"""Files of huggingface.co/Comfy-Org/Lens, laid out like ComfyUI's ``models/`` folder."""

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class CliError(Exception):
    """A user-facing error: printed as ``lens: error: <message>``, exit status 2."""


def _parse_ratio(text: str) -> str:
    parts = text.replace("/", ":").split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"ratio must look like W:H (e.g. 16:9), got {text!r}")
    return f"{int(parts[0])}:{int(parts[1])}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lens_model.cli",
        description="Generate images with Microsoft's Lens text-to-image models (pure PyTorch).",
        epilog="Without --transformer/--text-encoder/--vae the Comfy-Org/Lens files are used: "
               "first from --models-dir (ComfyUI layout: diffusion_models/, text_encoders/, vae/), "
               "otherwise downloaded with huggingface_hub (about 22 GB for Turbo).")
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("-o", "--output", default="lens.png",
                   help="output PNG path (several images: NAME_0.png, NAME_1.png, ...)")
    p.add_argument("--variant", choices=("turbo", "lens", "base"),
                   help="model variant: sets the default steps/CFG and the file to download "
                        "(default: from the --transformer file name, else turbo)")
    p.add_argument("--negative", default="", help="negative prompt (ignored at CFG 1)")
    size = p.add_argument_group("size (default: 1:1 at base 1024 on CPU, 1440 on CUDA)")
    size.add_argument("--width", type=int, help="width in pixels (multiple of 16, <= 2080)")
    size.add_argument("--height", type=int, help="height in pixels (multiple of 16, <= 2080)")
    size.add_argument("--ratio", type=_parse_ratio, default=None,
                      help="preset aspect ratio W:H: 1:2 9:16 2:3 3:4 1:1 4:3 3:2 16:9 2:1")
    size.add_argument("--base", type=int, choices=(1024, 1440), default=None,
                      help="preset family (1024 ~1 MP, 1440 ~2 MP)")
    p.add_argument("--steps", type=int, help="sampling steps (turbo 4, lens 20, base 50)")
    p.add_argument("--cfg", type=float, help="guidance scale (turbo 1, lens/base 5)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--batch", type=int, default=1, help="images to generate (default 1)")
    p.add_argument("--mu", type=float, default=None, help="override the schedule shift mu")
    p.add_argument("--noise-layout", choices=("upstream", "comfy"), default="upstream",
                   help="noise draw layout (upstream [B,N,128] or ComfyUI [B,128,h,w])")
    p.add_argument("--image", help="init image for img2img (resized to the output size)")
    p.add_argument("--denoise", type=float, default=1.0,
                   help="img2img strength in (0, 1] (1 = text-to-image)")
    p.add_argument("--date", default=None, help="template date (default 2026-05-23)")
    files = p.add_argument_group("model files")
    files.add_argument("--transformer", help="DiT checkpoint: .safetensors file or diffusers folder")
    files.add_argument("--text-encoder", help="gpt-oss-20b checkpoint: file, shard set or folder")
    files.add_argument("--vae", help="FLUX.2 VAE checkpoint: file or diffusers folder")
    files.add_argument("--models-dir", help="ComfyUI-style models folder to look in and download to")
    files.add_argument("--no-download", action="store_true",
                       help="never download; fail if a file is missing locally")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="compute device (default: cuda if available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="DiT compute dtype (default: the stored dtype)")
    p.add_argument("-q", "--quiet", action="store_true", help="only print the output path(s)")
    return p


def _download(filename: str, models_dir: Optional[str]) -> Path:
    """Fetch one Comfy-Org/Lens file with huggingface_hub (imported only here)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise CliError("downloading needs huggingface_hub (pip install huggingface_hub), or pass "
                       "local files with --transformer/--text-encoder/--vae") from e
    logger.info("fetching %s/%s%s", HF_REPO, filename,
                f" into {models_dir}" if models_dir else " (Hugging Face cache)")
    kw = {"local_dir": models_dir} if models_dir else {}
    try:
        return Path(hf_hub_download(repo_id=HF_REPO, filename=filename, **kw))
    except OSError as e:  # network and HTTP errors of huggingface_hub / requests are OSErrors
        raise CliError(f"downloading {HF_REPO}/{filename} failed ({e}); check the network "
                       "connection, or pass local files with --transformer/--text-encoder/--vae "
                       "or --models-dir") from e


def resolve_files(args: argparse.Namespace, variant: str) -> dict:
    """Return {"transformer", "text_encoder", "vae"} paths: explicit > --models-dir > download."""
    out = {}
    for key, flag, hf_key in (("transformer", "--transformer", variant),
                              ("text_encoder", "--text-encoder", "text_encoder"),
                              ("vae", "--vae", "vae")):
        explicit = getattr(args, key)
        if explicit:
            path = Path(explicit).expanduser()
            if not path.exists():
                raise CliError(f"{flag} {explicit!r} does not exist")
            out[key] = path
            continue
        if key == "transformer" and variant == "base":
            raise CliError("Lens-Base has no Comfy-Org single file to download; pass "
                           "--transformer PATH (a Lens-Base DiT file or diffusers transformer/ "
                           "folder, e.g. from YuCollection/Lens-Base-Diffusers)")
        filename = HF_FILES[hf_key]
        if args.models_dir:
            root = Path(args.models_dir).expanduser()
            for cand in (root / filename, root / Path(filename).name):
                if cand.is_file():
                    out[key] = cand
                    break
            if key in out:
                continue
        if args.no_download:
            where = f" in {args.models_dir}" if args.models_dir else ""
            raise CliError(f"no {flag.lstrip('-')} file given and {filename} not found{where}; "
                           f"pass {flag} PATH or drop --no-download")
        out[key] = _download(filename, args.models_dir)
    return out


def _output_paths(output: str, count: int) -> list[Path]:
    out = Path(output).expanduser()
    if out.suffix.lower() != ".png":
        out = out.with_name(out.name + ".png")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def _png_info(meta: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    # "parameters" is the A1111-style summary many viewers read. The keys "prompt"/"workflow"
    # are avoided on purpose: ComfyUI parses those as workflow JSON when a PNG is dropped on it.
    neg = f"\nNegative prompt: {meta['negative']}" if meta["negative"] else ""
    info.add_text("parameters",
                  f"{meta['prompt']}{neg}\nSteps: {meta['steps']}, CFG scale: {meta['cfg']}, "
                  f"Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}, "
                  f"Model: {meta['model']}, Sampler: Euler (flow matching)")
    info.add_text("lens_generation", json.dumps(meta, ensure_ascii=False))
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _run(args)
    except CliError as e:
        print(f"lens: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"lens: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from .dit import VARIANT_DEFAULTS
    from .pipeline import generate, variant_defaults
    from .resolution import resolution_for, validate_size

    if args.variant:
        variant = args.variant
    elif args.transformer:
        variant = variant_defaults(args.transformer)["variant"]
    else:
        variant = "turbo"
    defaults = VARIANT_DEFAULTS[variant]
    steps = args.steps if args.steps is not None else defaults["steps"]
    cfg = args.cfg if args.cfg is not None else defaults["cfg"]
    if steps < 1:
        raise CliError(f"--steps must be >= 1, got {steps}")
    if args.batch < 1:
        raise CliError(f"--batch must be >= 1, got {args.batch}")

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was requested but CUDA is not available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    if (args.width is None) != (args.height is None):
        raise CliError("give both --width and --height, or neither")
    if args.width is not None:
        if args.ratio or args.base:
            raise CliError("--width/--height and --ratio/--base are exclusive")
        width, height = args.width, args.height
    else:
        base = args.base or (1024 if device.type == "cpu" else 1440)
        try:
            width, height = resolution_for(base, args.ratio or "1:1")
        except ValueError as e:
            raise CliError(str(e)) from None
    try:
        width, height = validate_size(width, height)
    except ValueError as e:
        raise CliError(str(e)) from None

    files = resolve_files(args, variant)
    paths = _output_paths(args.output, args.batch)
    for path in paths:
        if not path.parent.exists():
            raise CliError(f"output folder {str(path.parent)!r} does not exist")

    logger.info("Lens %s: %dx%d, %d step(s), cfg %g, seed %d, %s", variant, width, height, steps,
                cfg, args.seed, device)

    def progress(step, total, x, denoised):
        logger.info("step %d/%d", step + 1, total)

    images = generate(
        args.prompt, negative=args.negative, transformer_path=files["transformer"],
        text_encoder_path=files["text_encoder"], vae_path=files["vae"], width=width,
        height=height, steps=steps, guidance=cfg, seed=args.seed, batch=args.batch,
        device=device, dtype=DTYPES.get(args.dtype), date=args.date, mu=args.mu,
        noise_layout=args.noise_layout, image=args.image, denoise=args.denoise,
        callback=progress)

    meta = {"prompt": args.prompt, "negative": args.negative, "seed": args.seed, "steps": steps,
            "cfg": cfg, "width": width, "height": height, "variant": variant,
            "model": Path(files["transformer"]).name, "noise_layout": args.noise_layout}
    if args.mu is not None:
        meta["mu"] = args.mu
    if args.image:
        meta["denoise"] = args.denoise
    for i, (img, path) in enumerate(zip(images, paths)):
        img.save(path, format="PNG", pnginfo=_png_info(dict(meta, index=i)))
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
