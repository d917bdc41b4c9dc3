#!/usr/bin/env python
"""Write a small, mutually consistent set of random Lens models into a ComfyUI ``models/`` folder.

The shipped workflows need a DiT, a gpt-oss text encoder and a FLUX.2 VAE. The real files are
≈ 21.5 GB; this tool writes stand-ins of a few MB (≈ 40 MB with the text encoder's embedded
tokenizer) in exactly the formats the pack's loaders read, so that every workflow validates and
runs in a real ComfyUI (≥ 0.22) on any machine, in seconds. The images are noise: the weights are
random. Nothing is downloaded.

Usage::

    python tools/make_tiny_models.py --out /path/to/ComfyUI/models [--seed 0]
        [--names-from-workflows] [--full-vae] [--input-dir /path/to/ComfyUI/input] [--force]

Files (default names; ``--names-from-workflows`` uses the names the shipped workflows select
instead, see below):

``diffusion_models/lens_tiny_turbo.safetensors`` and ``diffusion_models/lens_tiny.safetensors``
    The same tiny Lens DiT under a Turbo and a non-Turbo name (the loader guesses the variant from
    the name): the golden tiny transformer (2 blocks, 2 heads x 64, tests/fixtures/golden/lens_tiny)
    with its text input (``txt_norm.*``, ``txt_in``) replaced by seeded random weights of the tiny
    text encoder's width (enc_hidden_dim 64). ComfyUI single-file layout (``model.diffusion_model.``
    prefix), bf16, no config.json (the loader infers the configuration from the shapes).
``text_encoders/gpt_oss_tiny_nvfp4.safetensors``
    A seeded random gpt-oss in the ComfyUI NVFP4 layout (bare keys, no lm_head): 24 decoder layers
    (so layers 5/11/17/23 exist), hidden 64, 2 attention heads and 1 KV head of 64 (a single file
    cannot state head_dim; the loader assumes gpt-oss' 64), 8 experts of width 64 (top 4), the full
    o200k_harmony vocabulary (201088 rows, so the real template ids work). Expert banks are NVFP4
    (``.weight`` U8, swizzled F8_E4M3 ``.weight_scale``, F32 ``.weight_scale_2``, ``.bias``,
    ``.comfy_quant`` = ``{"format": "nvfp4", "num_experts": 8}``), everything else bf16, plus an
    embedded ``tokenizer_json`` built from the pack's o200k_base fallback, so the file is
    self-contained.
``vae/flux2_tiny_vae.safetensors``
    The golden tiny FLUX.2 VAE (channels 32/32/32/64) in BFL key names, fp32. For the pack's
    FLUX2 VAE Loader only: core's ``VAELoader`` hard-codes the full FLUX.2 channel plan.
``vae/flux2-vae-random.safetensors`` (only with ``--full-vae``)
    A full-size FLUX.2 VAE (251 tensors, ≈ 336 MB fp32, BFL names) with seeded PyTorch default-init
    weights, for core's ``VAELoader`` / ``VAEDecode`` in ``lens_mixed_core_vae``.

Selecting the files: the tool prints, for every shipped workflow, which widget value to pick in each
loader node. ``--names-from-workflows`` writes the files under the names the workflows already select
(``lens_turbo_bf16.safetensors``, ``lens_bf16.safetensors``, ``gpt_oss_20b_nvfp4.safetensors``,
``flux2-vae.safetensors``), so the workflows run unchanged. ``flux2-vae.safetensors`` is selected
by both the pack's VAE loader and core's ``VAELoader``; it is the full-size random VAE with
``--full-vae`` (which both loaders read) and the tiny VAE otherwise (then core's ``VAELoader`` in
``lens_mixed_core_vae`` fails). An existing file that this tool did not write is never replaced
unless ``--force`` is given (so real weights are safe); files it wrote before are replaced.

``--input-dir`` also writes ``example.png`` (a seeded 64x64 noise image) for ``lens_img2img``'s
``LoadImage``.

The workflows ask for 1024-1440 px images and up to 20 steps; that is quick on a GPU. On a CPU the
tiny models still take a while at those sizes (mainly the VAE decode; the full-size random VAE in
``lens_mixed_core_vae`` needs several GB of RAM there): pick base 1024 or a small custom size in Lens
Resolution for a quick check.

Requires the pack's ``lens_model`` (imported from this checkout), torch, safetensors, tokenizers and
the golden tiny weights in ``tests/fixtures/golden/lens_tiny`` (``--golden`` to point elsewhere).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests"):  # the package, and tests/writers.py (file writers, not shipped)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from lens_model.constants import VOCAB_SIZE  # noqa: E402  (after the path set-up above)

GOLDEN = ROOT / "tests" / "fixtures" / "golden" / "lens_tiny"
WORKFLOWS_API = ROOT / "workflows" / "api"

#: safetensors metadata key marking files written by this tool (only those are replaced silently).
MARK = "lens_tiny_models"

DEFAULT_NAMES = {
    "dit_turbo": "lens_tiny_turbo.safetensors",
    "dit": "lens_tiny.safetensors",
    "te": "gpt_oss_tiny_nvfp4.safetensors",
    "vae": "flux2_tiny_vae.safetensors",
    "full_vae": "flux2-vae-random.safetensors",
}
FOLDER = {"dit": "diffusion_models", "te": "text_encoders", "vae": "vae", "full_vae": "vae"}

#: Loader node -> (input, kind of file it takes).
LOADERS = {
    "LensNodesDiTLoader": ("model_name", "dit"),
    "LensNodesTextEncoderLoader": ("text_encoder_name", "te"),
    "LensNodesVAELoader": ("vae_name", "vae"),
    "VAELoader": ("vae_name", "core_vae"),
}

# Tiny gpt-oss. GptOssConfig.infer (single file, no config.json) reads hidden and vocab from the
# embedding, heads from `sinks`, KV heads from k_proj / 64, experts and width from gate_up, layers
# from the keys; head_dim is fixed at 64 and top-k is min(4, experts).
TE_HIDDEN = 64
TE_LAYERS = 24
TE_HEADS = 2
TE_KV_HEADS = 1
TE_HEAD_DIM = 64
TE_EXPERTS = 8
TE_INTERMEDIATE = 64
TE_VOCAB = VOCAB_SIZE  # the real vocabulary, so the template ids work


# --------------------------------------------------------------------------------------------------
# Model tensors


def _generator(seed: int, stream: int):
    import torch

    return torch.Generator().manual_seed(int(seed) * 1000 + stream)


def make_dit(seed: int = 0, text_width: int = TE_HIDDEN, golden: Path = GOLDEN) -> dict:
    """The tiny DiT as a ComfyUI single file: ``model.diffusion_model.<key>`` -> bf16 tensor.

    The golden tiny transformer with ``txt_norm.{0..3}.weight`` ([text_width]) and ``txt_in.weight``
    ([D, 4 * text_width]) replaced by seeded random weights of the golden tensors' scale.
    """
    import torch
    from safetensors.torch import load_file

    src = golden / "transformer" / "diffusion_pytorch_model.safetensors"
    if not src.is_file():
        raise FileNotFoundError(
            f"golden tiny transformer not found at {src}; run from a checkout of the pack or pass --golden."
        )
    sd = load_file(str(src))
    g = _generator(seed, 1)
    n_text = len([k for k in sd if k.startswith("txt_norm.")])
    for i in range(n_text):
        w = sd[f"txt_norm.{i}.weight"].float()
        sd[f"txt_norm.{i}.weight"] = w.mean() + w.std().clamp_min(0.05) * torch.randn(text_width, generator=g)
    win = sd["txt_in.weight"].float()
    std = float(win.std()) * math.sqrt(win.shape[1] / (n_text * text_width))  # keep the output scale
    sd["txt_in.weight"] = torch.randn(win.shape[0], n_text * text_width, generator=g) * std
    return {"model.diffusion_model." + k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}


def tokenizer_json_tensor():
    """The o200k_harmony tokenizer.json (from the pack's o200k_base fallback) as a 1-D uint8 tensor."""
    import torch

    from lens_model.tokenizer import load_tokenizer

    data = load_tokenizer(None).to_json().encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def make_text_encoder(seed: int = 0, with_tokenizer: bool = True) -> dict:
    """A tiny gpt-oss in the ComfyUI NVFP4 layout (bare keys) -> {key: tensor}.

    Weights are scaled so activations stay O(1): embedding N(0, 1), projections N(0, 1/fan_in),
    biases N(0, 0.02^2), norms 1 + N(0, 0.05^2), sinks N(0, 0.5^2).
    """
    import torch
    from writers import comfy_quant_tensor, quantize_nvfp4

    g = _generator(seed, 2)
    bf16 = torch.bfloat16
    e, hd, x, inter = TE_HIDDEN, TE_HEAD_DIM, TE_EXPERTS, TE_INTERMEDIATE
    q, kv = TE_HEADS * hd, TE_KV_HEADS * hd

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def linear(out_f, in_f):
        return randn(out_f, in_f, std=1.0 / math.sqrt(in_f))

    t = {"embed_tokens.weight": randn(TE_VOCAB, e).to(bf16)}
    marker = comfy_quant_tensor({"format": "nvfp4", "num_experts": x})
    for i in range(TE_LAYERS):
        p = f"layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + randn(e, std=0.05)).to(bf16)
        t[p + "post_attention_layernorm.weight"] = (1 + randn(e, std=0.05)).to(bf16)
        for name, (out_f, in_f) in (("q_proj", (q, e)), ("k_proj", (kv, e)), ("v_proj", (kv, e)), ("o_proj", (e, q))):
            t[p + f"self_attn.{name}.weight"] = linear(out_f, in_f).to(bf16)
            t[p + f"self_attn.{name}.bias"] = randn(out_f, std=0.02).to(bf16)
        t[p + "self_attn.sinks"] = randn(TE_HEADS, std=0.5).to(bf16)
        t[p + "mlp.router.weight"] = linear(x, e).to(bf16)
        t[p + "mlp.router.bias"] = randn(x, std=0.02).to(bf16)
        for bank, (out_f, in_f) in (("gate_up_proj", (2 * inter, e)), ("down_proj", (e, inter))):
            base = p + f"mlp.experts.{bank}"
            w = randn(x, out_f, in_f, std=1.0 / math.sqrt(in_f))  # [E, out, in], Linear orientation
            codes, scales, gscale = quantize_nvfp4(w)
            t[base + ".weight"] = codes
            t[base + ".weight_scale"] = scales.view(torch.float8_e4m3fn)
            t[base + ".weight_scale_2"] = gscale
            t[base + ".bias"] = randn(x, out_f, std=0.02).to(bf16)
            t[base + ".comfy_quant"] = marker.clone()
    t["norm.weight"] = torch.ones(e, dtype=bf16)  # unused by Lens; present in the published file
    if with_tokenizer:
        t["tokenizer_json"] = tokenizer_json_tensor()
    return t


def make_tiny_vae(golden: Path = GOLDEN) -> dict:
    """The golden tiny FLUX.2 VAE in BFL key names, fp32."""
    from safetensors.torch import load_file

    from lens_model.vae_loading import to_bfl

    src = golden / "vae" / "diffusion_pytorch_model.safetensors"
    if not src.is_file():
        raise FileNotFoundError(
            f"golden tiny VAE not found at {src}; run from a checkout of the pack or pass --golden."
        )
    return {k: v.contiguous() for k, v in to_bfl(load_file(str(src))).items()}


def make_full_vae(seed: int = 0) -> dict:
    """A full-size FLUX.2 VAE with seeded PyTorch default-init weights, BFL names, fp32 (251 tensors)."""
    import torch

    from lens_model.vae import Flux2VAE, Flux2VAEConfig

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed) * 1000 + 3)
        model = Flux2VAE(Flux2VAEConfig())
    finally:
        torch.random.set_rng_state(state)
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    sd.setdefault("bn.num_batches_tracked", torch.zeros((), dtype=torch.int64))
    return sd


# --------------------------------------------------------------------------------------------------
# Names


def workflow_names(api_dir: Path = WORKFLOWS_API) -> dict[str, dict[str, list[str]]]:
    """{kind: {file name: [workflows selecting it]}} over ``*_api.json``; kinds dit / te / vae / core_vae."""
    found: dict[str, dict[str, list[str]]] = {"dit": {}, "te": {}, "vae": {}, "core_vae": {}}
    files = sorted(Path(api_dir).glob("*_api.json"))
    if not files:
        raise FileNotFoundError(f"no *_api.json workflows in {api_dir}")
    for f in files:
        wf = f.name[: -len("_api.json")]
        for entry in json.loads(f.read_text()).values():
            spec = LOADERS.get(entry.get("class_type"))
            if spec is None:
                continue
            value = entry["inputs"].get(spec[0])
            if isinstance(value, str):
                users = found[spec[1]].setdefault(value, [])
                if wf not in users:
                    users.append(wf)
    return found


def plan(names_from_workflows: bool, full_vae: bool, api_dir: Path = WORKFLOWS_API) -> tuple[list, dict, list]:
    """What to write and how the workflows map onto it.

    Returns ``(files, mapping, notes)``: files = [(folder, name, kind)] with kind in dit / te / vae /
    full_vae; mapping = {class_type: {old widget value: new value or None}}; notes = warnings.
    """
    used = workflow_names(api_dir)
    files: list[tuple[str, str, str]] = []
    mapping: dict[str, dict[str, str | None]] = {c: {} for c in LOADERS}
    notes: list[str] = []

    def add(kind, name):
        for folder, existing, _ in files:
            if folder == FOLDER[kind] and existing == name:
                return  # already planned (the full VAE also serves the pack's VAE loader)
        files.append((FOLDER[kind], name, kind))

    if names_from_workflows:
        for name in used["dit"]:
            add("dit", name)
            mapping["LensNodesDiTLoader"][name] = name
        for name in used["te"]:
            add("te", name)
            mapping["LensNodesTextEncoderLoader"][name] = name
        for name, users in used["core_vae"].items():
            if full_vae:
                add("full_vae", name)
                mapping["VAELoader"][name] = name
            else:
                mapping["VAELoader"][name] = None
                notes.append(
                    f"core's VAELoader cannot load the tiny VAE, so vae/{name} does not serve it "
                    f"({', '.join(users)} fails there); rerun with --full-vae."
                )
        for name in used["vae"]:
            add("vae", name)
            mapping["LensNodesVAELoader"][name] = name
    else:
        add("dit", DEFAULT_NAMES["dit_turbo"])
        add("dit", DEFAULT_NAMES["dit"])
        add("te", DEFAULT_NAMES["te"])
        add("vae", DEFAULT_NAMES["vae"])
        if full_vae:
            add("full_vae", DEFAULT_NAMES["full_vae"])
        for name in used["dit"]:
            turbo = "turbo" in name.lower()
            mapping["LensNodesDiTLoader"][name] = DEFAULT_NAMES["dit_turbo" if turbo else "dit"]
        for name in used["te"]:
            mapping["LensNodesTextEncoderLoader"][name] = DEFAULT_NAMES["te"]
        for name in used["vae"]:
            mapping["LensNodesVAELoader"][name] = DEFAULT_NAMES["vae"]
        for name, users in used["core_vae"].items():
            mapping["VAELoader"][name] = DEFAULT_NAMES["full_vae"] if full_vae else None
            if not full_vae:
                notes.append(f"core's VAELoader ({', '.join(users)}) needs the full-size VAE: rerun with --full-vae.")
    return files, mapping, notes


def retarget(api: dict, mapping: dict) -> dict:
    """A copy of an API workflow with the loader widget values replaced per ``mapping`` (from :func:`plan`).

    Raises KeyError for a loader value the mapping has no file for.
    """
    import copy

    out = copy.deepcopy(api)
    for nid, entry in out.items():
        spec = LOADERS.get(entry.get("class_type"))
        if spec is None or not isinstance(entry["inputs"].get(spec[0]), str):
            continue
        new = mapping.get(entry["class_type"], {}).get(entry["inputs"][spec[0]])
        if new is None:
            raise KeyError(f"node {nid} ({entry['class_type']}): no tiny file for {entry['inputs'][spec[0]]!r}")
        entry["inputs"][spec[0]] = new
    return out


# --------------------------------------------------------------------------------------------------
# Writing


def _ours(path: Path) -> bool:
    """True when ``path`` is a safetensors file this tool wrote."""
    from lens_model.checkpoints import read_safetensors_header

    try:
        _, meta = read_safetensors_header(path)
    except Exception:
        return False
    return MARK in meta


def _write(path: Path, tensors: dict, seed: int, kind: str) -> int:
    from writers import write_safetensors

    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, tensors, {MARK: json.dumps({"kind": kind, "seed": seed}), "format": "pt"})
    return path.stat().st_size


def make_example_image(path: Path, seed: int = 0, size: int = 64) -> None:
    """A seeded RGB noise PNG for lens_img2img's LoadImage."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def main(argv: list[str] | None = None) -> dict:
    """Run the tool; returns ``{"files": {relative path: bytes}, "mapping": ..., "notes": [...]}``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path,
                    help="ComfyUI's models folder (gets diffusion_models/, text_encoders/, vae/)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    ap.add_argument("--names-from-workflows", action="store_true",
                    help="write the files under the names the shipped workflows select (they then run unchanged)")
    ap.add_argument("--full-vae", action="store_true",
                    help="also write a full-size random FLUX.2 VAE (≈ 336 MB) for core's VAELoader")
    ap.add_argument("--input-dir", type=Path, help="ComfyUI's input folder: write example.png for lens_img2img")
    ap.add_argument("--force", action="store_true", help="replace existing files this tool did not write")
    ap.add_argument("--workflows", type=Path, default=WORKFLOWS_API,
                    help="folder of *_api.json workflows (default: the shipped ones)")
    ap.add_argument("--golden", type=Path, default=GOLDEN,
                    help="golden tiny weights folder (default: tests/fixtures/golden/lens_tiny)")
    args = ap.parse_args(argv)

    files, mapping, notes = plan(args.names_from_workflows, args.full_vae, args.workflows)
    out = args.out.expanduser()
    targets = [(out / folder / name, kind) for folder, name, kind in files]
    foreign = [p for p, _ in targets if p.exists() and not _ours(p)]
    if foreign and not args.force:
        raise SystemExit(
            "refusing to replace files this tool did not write (real weights?): "
            + ", ".join(str(p) for p in foreign)
            + ". Move them away, write the default tiny names (drop --names-from-workflows), or pass --force."
        )

    cache: dict[str, dict] = {}

    def tensors(kind: str) -> dict:
        if kind not in cache:
            if kind == "dit":
                cache[kind] = make_dit(args.seed, TE_HIDDEN, args.golden)
            elif kind == "te":
                cache[kind] = make_text_encoder(args.seed)
            elif kind == "vae":
                cache[kind] = make_tiny_vae(args.golden)
            else:
                cache[kind] = make_full_vae(args.seed)
        return cache[kind]

    written: dict[str, int] = {}
    for path, kind in targets:
        size = _write(path, tensors(kind), args.seed, kind)
        written[str(path.relative_to(out))] = size
        print(f"wrote {path} ({size / 1e6:.1f} MB, {kind})")
    if args.input_dir is not None:
        png = args.input_dir.expanduser() / "example.png"
        make_example_image(png, args.seed)
        print(f"wrote {png} (for lens_img2img's LoadImage)")

    print("\nWidget values to select in the shipped workflows:")
    for f in sorted(Path(args.workflows).glob("*_api.json")):
        api = json.loads(f.read_text())
        print(f"  {f.name[: -len('_api.json')]}:")
        for nid, entry in api.items():
            spec = LOADERS.get(entry.get("class_type"))
            if spec is None:
                continue
            old = entry["inputs"].get(spec[0])
            new = mapping[entry["class_type"]].get(old)
            shown = new if new is not None else "(no tiny file: rerun with --full-vae)"
            print(f"    node {nid} {entry['class_type']}.{spec[0]}: {shown}" + ("" if new == old else f"  (was {old})"))
    for note in notes:
        print(f"note: {note}")
    return {"files": written, "mapping": mapping, "notes": notes}


if __name__ == "__main__":
    main()
