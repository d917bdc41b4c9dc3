"""LoRAs for the Lens DiT: read every published Lens LoRA layout and run it as a low-rank side path.

Reading (:func:`load_lora`). One file, one :class:`LensLoRA`: per target module of the DiT a
down matrix A [r, in], an up matrix B [out, r] and a scale. Accepted layouts:

=================================  =============================================================  ==========================
layout                             keys (block i)                                                 alpha
=================================  =============================================================  ==========================
kohya-ss / musubi-tuner            ``lora_unet_transformer_blocks_{i}_attn_img_qkv.lora_down``    ``.alpha`` tensor
                                   ``.weight`` / ``.lora_up.weight`` / ``.alpha``
VideoX-Fun ComfyUI export          ``lora_unet__transformer_blocks_{i}_attn_img_qkv.lora_down``   none (see below)
                                   ``.weight`` / ``.lora_up.weight``
LoboForge-LensTrainer              ``diffusion_model.transformer_blocks.{i}.attn.img_qkv``        metadata ``alpha``
                                   ``.lora_A.default.weight`` / ``.lora_B.default.weight``
diffusers / PEFT                   ``transformer.transformer_blocks.{i}.attn.img_qkv.lora_A``     metadata
                                   ``.weight`` (also bare ``transformer_blocks.…``,               ``lora_adapter_metadata``
                                   ``base_model.model.…``, ``model.diffusion_model.…``)           or ``adapter_config.json``
=================================  =============================================================  ==========================

Every Linear of the DiT can be a target (:data:`TARGET_MODULES`: the fused ``attn.img_qkv`` /
``attn.txt_qkv``, the output projections, both MLPs, the modulations ``img_mod.1`` / ``txt_mod.1``,
and ``img_in``, ``txt_in``, ``proj_out``, ``norm_out.linear`` and the time embedder); the key
translation to our module names is that one table, in dotted form or with dots written as ``_``.

Scale of a module: ``alpha / r`` (``alpha / sqrt(r)`` when the adapter config says ``use_rslora``),
r = the rank of its tensors. alpha comes from, in this order:

1. the ``.alpha`` tensor of the module (kohya / musubi; 0 means "alpha = rank", as kohya does);
2. the file metadata: LoboForge's ``alpha``, diffusers' ``lora_adapter_metadata`` (``lora_alpha``
   with ``alpha_pattern``), kohya's ``ss_network_alpha``, or a generic ``lora_alpha``;
3. ``adapter_config.json`` next to a PEFT ``adapter_model.safetensors``;
4. the ``alpha=`` argument of :func:`load_lora`;
5. otherwise alpha = r, scale 1.0. This is what VideoX-Fun's ComfyUI export
   (``…_compatible_with_comfyui.safetensors``) and its bare PEFT file get: VideoX-Fun writes no
   alpha anywhere, and its own ``merge_lora`` and ComfyUI core both apply 1.0 to these files, so
   1.0 reproduces its published inference. The training scale (alpha / rank, e.g. 32 / 64 = 0.5 in
   VideoX-Fun's README example) is not recoverable from the file: pass ``alpha=`` (or lower the
   strength) to use it. The choice is logged.

Refused, with a :class:`LoRAError` that says why: LoHa / LoKr / DoRA / OFT / GLoRA files (named);
LoRAs for other models (SD 1.x / SDXL UNets, FLUX / FLUX.2, SD3, Qwen-Image, Wan, Z-Image /
Lumina 2, HunyuanVideo: named); unknown keys (listed, never dropped); a module with only one of its
two matrices, or with inconsistent ranks. :meth:`LensLoRA.check` compares every pair with the
model's Linear shapes (from its :class:`~lens_model.dit.LensDiTConfig`) and lists each mismatch with
the file key and both shapes; :func:`apply_loras` runs it for all LoRAs before attaching anything.

Applying (:func:`apply_loras` / :func:`remove_loras`, or the :func:`applied` context manager). A
LoRA is never merged into the weights. Each target Linear gets a forward hook that adds the side
path ``y = base(x) + Σ_i s_i·(α_i/r_i)·B_i(A_i x)``: the LoRAs applied together are concatenated
along the rank (A_cat [Σr, in], B_cat [out, Σr] with each B pre-multiplied by s_i·α_i/r_i in fp32),
so one call costs two thin matmuls whatever their number. The side path runs in the activation
dtype (bf16 or fp32) on the activation's device; the factors are cast there once per apply.
Consequences:

- **quantised layers** (fp8 weight-only and MXFP8 / NVFP4 :class:`~lens_model.ops.QuantLinear`)
  keep their stored weights untouched: the base path dequantises as before and the LoRA adds its
  product in the compute dtype. Nothing is re-quantised, so a LoRA on an fp8 or MXFP8 model is as
  exact as on bf16 (core's merge instead rounds W + ΔW back to fp8);
- removal restores the base forward **bit for bit** (the hooks are removed; the weights were never
  written), there is no copy of any weight, and several LoRAs stack, each with its own strength;
- strength 0 attaches nothing (the output is the base output bit for bit);
- memory: the LoRA's own tensors plus one copy of the factors in the compute dtype on the model's
  device (rank 16 on all 480 block Linears of the full model: ~80 MB in bf16).

Plain PyTorch + safetensors; never imports ComfyUI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoints import SAFETENSORS_SUFFIXES

logger = logging.getLogger(__name__)


class LoRAError(ValueError):
    """A LoRA file that cannot be applied to the Lens DiT (the message says what and why)."""


# =================================================================================================
# The key table
# =================================================================================================

#: Every Linear of the Lens DiT a LoRA may target, by our module name (= the checkpoint key without
#: ``.weight``); ``{i}`` is a block index. This is the only place LoRA keys are mapped to modules.
TARGET_MODULES: tuple[str, ...] = (
    "img_in",
    "txt_in",
    "proj_out",
    "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "transformer_blocks.{i}.attn.img_qkv",
    "transformer_blocks.{i}.attn.txt_qkv",
    "transformer_blocks.{i}.attn.to_out.0",
    "transformer_blocks.{i}.attn.to_add_out",
    "transformer_blocks.{i}.img_mod.1",
    "transformer_blocks.{i}.txt_mod.1",
    "transformer_blocks.{i}.img_mlp.w1",
    "transformer_blocks.{i}.img_mlp.w2",
    "transformer_blocks.{i}.img_mlp.w3",
    "transformer_blocks.{i}.txt_mlp.w1",
    "transformer_blocks.{i}.txt_mlp.w2",
    "transformer_blocks.{i}.txt_mlp.w3",
)

#: Wrappers trainers put in front of the module name: (prefix, layout it indicates). Longest first.
#: Kohya-style prefixes write the module name with ``_`` for ``.``; the others keep the dots.
KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet__", "VideoX-Fun (ComfyUI export)"),
    ("lora_unet_", "kohya / musubi-tuner"),
    ("base_model.model.", "PEFT"),
    ("model.diffusion_model.", "ComfyUI"),
    ("diffusion_model.", "LoboForge-LensTrainer / ComfyUI"),
    ("transformer.", "diffusers / PEFT"),
    ("", "PEFT (bare module names)"),
)

#: Suffix after the module name -> which part of the pair it is.
_PART_RE = re.compile(
    r"^(?P<module>.+?)\.(?:"
    r"(?P<kohya>lora_down|lora_up)\.weight"
    r"|lora_(?P<peft>[AB])(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?\.weight"
    r"|(?P<alpha>alpha)"
    r")$"
)


def _compile_targets() -> tuple[re.Pattern, re.Pattern]:
    dotted, underscored = [], []
    for name in TARGET_MODULES:
        d = re.escape(name).replace(r"\{i\}", r"\d+")
        u = re.escape(name.replace(".", "_")).replace(r"\{i\}", r"\d+")
        dotted.append(d)
        underscored.append(u)
    return re.compile("^(?:" + "|".join(dotted) + ")$"), re.compile("^(?:" + "|".join(underscored) + ")$")


_DOTTED_RE, _UNDERSCORED_RE = _compile_targets()
_BLOCK_UNDERSCORE_RE = re.compile(r"^transformer_blocks_(\d+)_(.+)$")


def _module_from_underscored(name: str) -> str | None:
    """``transformer_blocks_3_attn_to_out_0`` -> ``transformer_blocks.3.attn.to_out.0`` (or None)."""
    if not _UNDERSCORED_RE.match(name):
        return None
    m = _BLOCK_UNDERSCORE_RE.match(name)
    if m:
        rest = m.group(2)
        for pattern in TARGET_MODULES:
            if pattern.startswith("transformer_blocks.{i}."):
                tail = pattern[len("transformer_blocks.{i}."):]
                if tail.replace(".", "_") == rest:
                    return f"transformer_blocks.{m.group(1)}.{tail}"
        return None
    for pattern in TARGET_MODULES:
        if "{i}" not in pattern and pattern.replace(".", "_") == name:
            return pattern
    return None


def module_for_key(base: str) -> tuple[str, str] | None:
    """LoRA base name (the key without its ``.lora_*`` / ``.alpha`` suffix) -> (module, layout).

    None when no prefix + module name of :data:`KEY_PREFIXES` / :data:`TARGET_MODULES` matches.
    """
    for prefix, layout in KEY_PREFIXES:
        if not base.startswith(prefix):
            continue
        rest = base[len(prefix):]
        if prefix.startswith("lora_unet"):
            module = _module_from_underscored(rest)
        else:
            module = rest if _DOTTED_RE.match(rest) else None
        if module is not None:
            return module, layout
    return None


# -- what other files look like --------------------------------------------------------------------

#: (regex on a key, what the file is). Checked before parsing, first match wins.
_UNSUPPORTED_KINDS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"\.hada_(w1|w2|t1|t2)"), "a LoHa (LyCORIS) network (`hada_*` keys)"),
    (re.compile(r"\.lokr_(w1|w2|t2)"), "a LoKr (LyCORIS) network (`lokr_*` keys)"),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector)\b"), "a DoRA (`dora_scale` / `lora_magnitude_vector` keys)"),
    (re.compile(r"\.(oft_blocks|oft_diag|oft_r)\b|\.boft_"), "an OFT / BOFT network"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "a GLoRA network"),
    (re.compile(r"\.(lora_mid)\."), "a LoCon network with a `lora_mid` (Tucker) factor"),
)

#: (regex on a key, model name). A LoRA whose keys match is for another model.
_OTHER_MODELS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"(^|[._])te2[._]|lora_te2_"), "SDXL (Stable Diffusion XL: a UNet plus two CLIP text encoders)"),
    (re.compile(r"(lora_unet_|unet\.|^)(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]"),
     "Stable Diffusion 1.x / 2.x / SDXL (a UNet)"),
    (re.compile(r"(^|[._])lora_te1?_"), "Stable Diffusion (a CLIP text encoder)"),
    (re.compile(r"individual_token_refiner|txt_in[._]t_embedder"), "HunyuanVideo"),
    (re.compile(r"(double_blocks|single_blocks|single_transformer_blocks)[._]"), "FLUX / FLUX.2 (double_blocks / single_blocks)"),
    (re.compile(r"joint_blocks[._]"), "Stable Diffusion 3 (joint_blocks)"),
    (re.compile(r"(img_mlp|txt_mlp)[._]net[._]"), "Qwen-Image (`img_mlp.net` / `txt_mlp.net` keys)"),
    (re.compile(r"(^|[._])ff_context[._]"), "Stable Diffusion 3 / FLUX in diffusers layout (`ff_context` keys)"),
    (re.compile(r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn|ffn)[._]"), "Wan (video)"),
    (re.compile(r"(^|[._])layers[._]\d+[._](attention|feed_forward|adaLN_modulation)[._]"), "Z-Image / Lumina 2"),
)
_SPLIT_QKV = re.compile(r"attn[._](to_[qkv]|add_[qkv]_proj)[._]")


# =================================================================================================
# The LoRA object
# =================================================================================================

@dataclass
class LoRAPair:
    """One target module: ``down`` A [r, in], ``up`` B [out, r], ``alpha``; ΔW = scale·B·A."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    scale: float
    keys: tuple[str, str]  # the file keys of down and up (for messages)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW = scale·B·A [out, in] (for inspection and tests; applying never forms it)."""
        return (self.up.to(torch.float32) @ self.down.to(torch.float32)).mul_(self.scale).to(dtype)


@dataclass
class LensLoRA:
    """A LoRA read by :func:`load_lora`: ``pairs`` maps our module names to :class:`LoRAPair`."""

    name: str
    layout: str
    pairs: dict[str, LoRAPair]
    alpha_source: str
    metadata: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        ranks = sorted({p.rank for p in self.pairs.values()})
        return (f"LensLoRA({self.name!r}, {self.layout}, {len(self.pairs)} modules, rank "
                f"{'/'.join(map(str, ranks))}, alpha from {self.alpha_source})")

    @property
    def modules(self) -> list[str]:
        return sorted(self.pairs, key=_module_sort_key)

    @property
    def nbytes(self) -> int:
        return sum(p.down.numel() * p.down.element_size() + p.up.numel() * p.up.element_size()
                   for p in self.pairs.values())

    def check(self, target) -> None:
        """Check every pair against the DiT's Linear shapes; raise :class:`LoRAError` listing all
        problems (module absent from the model, or ``[out, in]`` not matching ``B·A``).

        target: a :class:`~lens_model.dit.LensTransformer`, its :class:`~lens_model.dit.LensDiTConfig`,
        or a dict module name -> (out, in).
        """
        shapes = linear_shapes(target)
        problems = []
        for module in self.modules:
            pair = self.pairs[module]
            want = shapes.get(module)
            if want is None:
                problems.append(f"`{pair.keys[0]}` targets `{module}`, which this DiT does not have")
                continue
            out_f, in_f = want
            if pair.down.shape[1] != in_f:
                problems.append(f"`{pair.keys[0]}` has shape {list(pair.down.shape)}, the model's `{module}` "
                                f"needs [{pair.rank}, {in_f}] (its weight is [{out_f}, {in_f}])")
            if pair.up.shape[0] != out_f:
                problems.append(f"`{pair.keys[1]}` has shape {list(pair.up.shape)}, the model's `{module}` "
                                f"needs [{out_f}, {pair.rank}] (its weight is [{out_f}, {in_f}])")
        if problems:
            raise LoRAError(
                f"LoRA `{self.name}` does not fit this Lens DiT ({len(problems)} problem(s)): "
                + "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
                + ". Was it trained for another Lens size or another model?"
            )


def _module_sort_key(name: str):
    return [int(t) if t.isdigit() else t for t in name.split(".")]


def linear_shapes(target) -> dict[str, tuple[int, int]]:
    """Module name -> logical (out, in) of every Linear of a DiT (from its config; quantised layers
    report their unpadded shape)."""
    if isinstance(target, Mapping):
        return {k: (int(v[0]), int(v[1])) for k, v in target.items()}
    cfg = getattr(target, "config", target)
    expected = getattr(cfg, "expected_shapes", None)
    if expected is None:
        raise TypeError(f"cannot read Linear shapes from {type(target).__name__}; pass a LensTransformer or LensDiTConfig")
    out = {}
    for key, shape in expected().items():
        if key.endswith(".weight") and len(shape) == 2:
            out[key[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
    return out


# =================================================================================================
# Reading
# =================================================================================================

def load_lora(path: str | os.PathLike, *, alpha: float | None = None) -> LensLoRA:
    """Read a Lens LoRA ``.safetensors`` file in any supported layout (see the module docstring).

    alpha: used only when the file stores no alpha (neither tensors nor metadata); default: rank.
    Raises :class:`LoRAError` for refused or malformed files, FileNotFoundError when missing.
    """
    from safetensors import safe_open

    path = Path(path)
    name = path.name
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise LoRAError(f"LoRA `{name}`: only .safetensors files are read (no pickle); got `{path.suffix}`.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / invalid files
        raise LoRAError(f"LoRA `{name}` is not a readable safetensors file ({type(e).__name__}: {e}).") from None
    config = _sidecar_adapter_config(path)
    return lora_from_state_dict(tensors, metadata, name=name, alpha=alpha, adapter_config=config)


def _sidecar_adapter_config(path: Path) -> dict | None:
    """PEFT's ``adapter_config.json`` next to ``adapter_model.safetensors`` (PEFT save_pretrained)."""
    if path.name != "adapter_model.safetensors":
        return None
    cfg = path.with_name("adapter_config.json")
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        logger.warning("%s: could not read %s (%s); ignoring it", path.name, cfg.name, e)
        return None


def lora_from_state_dict(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    name: str = "<state dict>",
    alpha: float | None = None,
    adapter_config: Mapping | None = None,
) -> LensLoRA:
    """:func:`load_lora` on tensors already in memory (``metadata``: the safetensors header's)."""
    metadata = dict(metadata or {})
    keys = list(tensors)
    if not keys:
        raise LoRAError(f"LoRA `{name}` holds no tensors.")
    _refuse_other_kinds(name, keys, adapter_config, metadata)
    parts, layouts = _group_keys(name, tensors)
    pairs, sources = _build_pairs(name, parts, _metadata_alpha(metadata, adapter_config), alpha)

    layout = " + ".join(sorted(set(layouts.values())))
    source = " / ".join(sorted(sources))
    if any(s.startswith("default") for s in sources):
        logger.info("LoRA %s (%s) stores no alpha: applying scale alpha/rank = 1.0 (as VideoX-Fun's "
                    "merge_lora and ComfyUI do); pass alpha= to use the training alpha.", name, layout)
    lora = LensLoRA(name=name, layout=layout, pairs=pairs, alpha_source=source, metadata=metadata)
    logger.info("read %r", lora)
    return lora


def _group_keys(name: str, tensors: Mapping[str, torch.Tensor]):
    """Keys → ``{module: {"down"|"up"|"alpha": (key, tensor)}}`` and ``{module: layout}``; every key
    that is not a LoRA part of a Lens DiT Linear is listed in one LoRAError."""
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    layouts: dict[str, str] = {}
    unknown: list[str] = []
    for key in tensors:
        m = _PART_RE.match(key)
        hit = module_for_key(m.group("module")) if m else None
        if hit is None:
            unknown.append(key)
            continue
        module, layout = hit
        if m.group("kohya"):
            part = "down" if m.group("kohya") == "lora_down" else "up"
        elif m.group("peft"):
            part = "down" if m.group("peft") == "A" else "up"
        else:
            part = "alpha"
        slot = parts.setdefault(module, {})
        if part in slot:
            raise LoRAError(
                f"LoRA `{name}`: `{module}` appears twice (`{slot[part][0]}` and `{key}`); a file must "
                "hold one adapter per module."
            )
        slot[part] = (key, tensors[key])
        layouts[module] = layout
    if unknown:
        shown = ", ".join(f"`{k}`" for k in sorted(unknown)[:12])
        more = f" and {len(unknown) - 12} more" if len(unknown) > 12 else ""
        raise LoRAError(
            f"LoRA `{name}`: {len(unknown)} key(s) are not a LoRA of a Lens DiT module: {shown}{more}. "
            "Expected `<module>.lora_down.weight` / `.lora_up.weight` / `.alpha` (kohya) or "
            "`<module>.lora_A[.default].weight` / `.lora_B[…].weight` (PEFT), where <module> is a Lens "
            "Linear such as `transformer_blocks.0.attn.img_qkv` (dotted, or with `_` after `lora_unet_`)."
        )
    return parts, layouts


def _build_pairs(name: str, parts, meta_alpha, alpha: float | None):
    """Grouped parts → ``({module: LoRAPair}, alpha sources)``; every malformed module (half pair,
    rank mismatch, non-matrix, non-finite, non-float) is listed in one LoRAError."""
    pairs: dict[str, LoRAPair] = {}
    problems: list[str] = []
    sources: set[str] = set()
    for module in sorted(parts, key=_module_sort_key):
        slot = parts[module]
        if "down" not in slot or "up" not in slot:
            have = ", ".join(f"`{k}`" for k, _ in slot.values())
            missing = "down (lora_down / lora_A)" if "down" not in slot else "up (lora_up / lora_B)"
            problems.append(f"`{module}` has {have} but no {missing} matrix")
            continue
        (kd, down), (ku, up) = slot["down"], slot["up"]
        if down.dim() != 2 or up.dim() != 2:
            problems.append(f"`{kd}` {list(down.shape)} / `{ku}` {list(up.shape)} are not matrices "
                            "(convolution LoRAs do not apply to the Lens DiT)")
            continue
        if down.shape[0] != up.shape[1]:
            problems.append(f"`{kd}` has rank {down.shape[0]} but `{ku}` has rank {up.shape[1]} "
                            f"(shapes {list(down.shape)} and {list(up.shape)})")
            continue
        rank = int(down.shape[0])
        a, src, rslora = _alpha_for(module, slot.get("alpha"), meta_alpha, alpha, rank)
        if not math.isfinite(a):
            problems.append(f"`{module}` has a non-finite alpha ({a})")
            continue
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            problems.append(f"`{kd}` or `{ku}` holds non-finite values")
            continue
        sources.add(src)
        scale = a / math.sqrt(rank) if rslora else a / rank
        if not down.is_floating_point() or not up.is_floating_point():
            problems.append(f"`{kd}` / `{ku}` are {down.dtype} / {up.dtype}, expected floating point")
            continue
        pairs[module] = LoRAPair(down=down, up=up, alpha=a, scale=scale, keys=(kd, ku))
    if problems:
        raise LoRAError(f"LoRA `{name}` is malformed ({len(problems)} problem(s)): " + "; ".join(problems[:10])
                        + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "") + ".")
    return pairs, sources


def _refuse_other_kinds(name: str, keys: Sequence[str], adapter_config, metadata) -> None:
    for cfg in (adapter_config, _json_or_none(metadata.get("lora_adapter_metadata"))):
        if isinstance(cfg, Mapping) and any(bool(v) for k, v in cfg.items() if k.rsplit(".", 1)[-1] == "use_dora"):
            raise LoRAError(f"LoRA `{name}` is a DoRA (its adapter config sets use_dora); only plain LoRAs "
                            "are supported for Lens (no Lens trainer writes DoRA).")
    for pattern, what in _UNSUPPORTED_KINDS:
        hits = [k for k in keys if pattern.search(k)]
        if hits:
            raise LoRAError(
                f"LoRA `{name}` is {what}, e.g. `{hits[0]}`. Only plain LoRA (low-rank down/up pairs) is "
                "supported for Lens; LoHa, LoKr, DoRA, OFT and GLoRA are not."
            )
    for pattern, model in _OTHER_MODELS:
        hits = [k for k in keys if pattern.search(k)]
        if hits:
            raise LoRAError(
                f"LoRA `{name}` is for {model}, not for Lens (e.g. key `{hits[0]}`). Pick a LoRA trained "
                "for Lens / Lens-Turbo (keys such as `…transformer_blocks.0.attn.img_qkv.lora_A.weight`)."
            )
    hits = [k for k in keys if _SPLIT_QKV.search(k)]
    if hits:
        raise LoRAError(
            f"LoRA `{name}` targets split q/k/v projections (e.g. `{hits[0]}`), which the Lens DiT does not "
            "have (it uses fused `attn.img_qkv` / `attn.txt_qkv`); it was probably trained for another "
            "MMDiT such as Qwen-Image or FLUX."
        )


def _json_or_none(text):
    if not isinstance(text, str):
        return None
    try:
        out = json.loads(text)
    except ValueError:
        return None
    return out if isinstance(out, Mapping) else None


@dataclass
class _MetaAlpha:
    alpha: float | None = None
    patterns: dict[str, float] = field(default_factory=dict)  # PEFT alpha_pattern
    rslora: bool = False
    source: str = ""


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _metadata_alpha(metadata: Mapping[str, str], adapter_config: Mapping | None) -> _MetaAlpha:
    """alpha from the file metadata or a PEFT adapter config (first found wins, see module doc)."""
    # diffusers: {"lora_adapter_metadata": json of the LoraConfig, keys possibly "transformer."-prefixed}
    cfg = _json_or_none(metadata.get("lora_adapter_metadata"))
    if cfg:
        flat = {k.split(".", 1)[1] if k.startswith(("transformer.", "unet.")) else k: v for k, v in cfg.items()}
        a = _num(flat.get("lora_alpha"))
        if a is not None:
            return _MetaAlpha(a, _patterns(flat.get("alpha_pattern")), bool(flat.get("use_rslora")),
                              "metadata lora_adapter_metadata")
    # LoboForge-LensTrainer: {"rank": "16", "alpha": "16", ...}; generic trainers: lora_alpha / network_alpha
    for key in ("alpha", "lora_alpha", "network_alpha", "ss_network_alpha"):
        a = _num(metadata.get(key))
        if a is not None:
            return _MetaAlpha(a, source=f"metadata {key}")
    if adapter_config:
        a = _num(adapter_config.get("lora_alpha"))
        if a is not None:
            return _MetaAlpha(a, _patterns(adapter_config.get("alpha_pattern")),
                              bool(adapter_config.get("use_rslora")), "adapter_config.json")
    return _MetaAlpha()


def _patterns(value) -> dict[str, float]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): float(v) for k, v in value.items() if _num(v) is not None}


def _alpha_for(module: str, alpha_tensor, meta: _MetaAlpha, fallback: float | None,
               rank: int) -> tuple[float, str, bool]:
    """(alpha, where it came from, rsLoRA) for one module."""
    if alpha_tensor is not None:
        key, t = alpha_tensor
        if t.numel() != 1:
            raise LoRAError(f"`{key}` should be a scalar alpha, got shape {list(t.shape)}")
        a = float(t.reshape(()).to(torch.float64))
        if a == 0.0:  # kohya: alpha 0 / None means "no scaling"
            return float(rank), "tensor (0 = rank)", False
        return a, "tensor", False
    if meta.alpha is not None:
        for pattern, a in meta.patterns.items():  # PEFT: key matches "(.*\.)?pattern$"
            if re.match(rf"(.*\.)?(?:{pattern})$", module):
                return a, meta.source + " alpha_pattern", meta.rslora
        return meta.alpha, meta.source, meta.rslora
    if fallback is not None:
        return float(fallback), "alpha argument", False
    return float(rank), "default (alpha = rank)", False


# =================================================================================================
# Applying: a low-rank side path on the target Linears
# =================================================================================================

_ATTACHED_ATTR = "_lens_lora_attached"
_lock = threading.Lock()


class _SidePath:
    """Forward hook adding (x Aᵀ) Bᵀ to a Linear's output, A = cat(A_i) [Σr, in] and
    B = cat(s_i·scale_i·B_i) [out, Σr] (scales folded into B in fp32).

    The factors are built in the activation's dtype on its device, once, and rebuilt from the
    LoRAs' own tensors only if the dtype or device changes (the model was moved or recast).
    """

    def __init__(self, entries: list[tuple[LoRAPair, float]]) -> None:
        self.entries = entries
        self._built: tuple[torch.dtype, torch.device, torch.Tensor, torch.Tensor] | None = None

    def factors(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._built
        if c is None or c[0] != dtype or c[1] != device:
            self._built = None  # drop the old copy before building the new one
            down = torch.cat([p.down.to(device=device, dtype=dtype) for p, _ in self.entries], dim=0)
            up = torch.cat([p.up.to(device=device, dtype=torch.float32) * (s * p.scale) for p, s in self.entries], dim=1)
            c = (dtype, device, down, up.to(dtype))
            self._built = c
        return c[2], c[3]

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        down, up = self.factors(output.dtype, output.device)
        if x.dtype != output.dtype or x.device != output.device:
            x = x.to(device=output.device, dtype=output.dtype)
        return output + F.linear(F.linear(x, down), up)


class AppliedLoRAs:
    """The side paths one :func:`apply_loras` call attached; :meth:`remove` detaches them."""

    def __init__(self, model: nn.Module, handles: list, names: list[str]) -> None:
        self.model = model
        self._handles = handles
        self.names = names

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Detach these side paths (idempotent). The base forward is then exactly as before."""
        with _lock:
            for h in self._handles:
                h.remove()
            self._handles = []
            attached = getattr(self.model, _ATTACHED_ATTR, None)
            if attached is not None and self in attached:
                attached.remove(self)


def as_lora_list(loras) -> list[tuple[LensLoRA, float]]:
    """Normalise what callers pass as ``lora=``: None, one item, or a list of items, where an item is
    a :class:`LensLoRA`, a path (strength 1), ``"FILE:STRENGTH"`` (see :func:`parse_lora_arg`), or a
    ``(LensLoRA | path, strength)`` pair. Files are read here (errors before any work)."""
    if loras is None:
        return []
    if isinstance(loras, (LensLoRA, str, os.PathLike)) or (
        isinstance(loras, tuple) and len(loras) == 2 and isinstance(loras[1], (int, float))
        and not isinstance(loras[1], bool)
    ):
        loras = [loras]
    out: list[tuple[LensLoRA, float]] = []
    for item in loras:
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ValueError(f"a LoRA entry must be (lora, strength), got {item!r}")
            lo, strength = item
        elif isinstance(item, (str, os.PathLike)) and not isinstance(item, LensLoRA):
            lo, strength = parse_lora_arg(os.fspath(item))
        else:
            lo, strength = item, 1.0
        if not isinstance(lo, LensLoRA):
            lo = load_lora(lo)
        strength = float(strength)
        if not math.isfinite(strength):
            raise ValueError(f"LoRA `{lo.name}`: strength must be finite, got {strength}")
        out.append((lo, strength))
    return out


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``"FILE[:STRENGTH]"`` -> (FILE, STRENGTH or 1.0), for ``--lora``. The strength is the part
    after the last ``:`` when it parses as a number (so ``C:\\loras\\a.safetensors`` stays a path)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail.startswith(("\\", "/")):
        try:
            value = float(tail)
        except ValueError:
            pass
        else:
            if not math.isfinite(value):
                raise ValueError(f"--lora {text!r}: the strength must be a finite number")
            return head, value
    return text, 1.0


def _named_linears(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    out = {}
    for n in names:
        try:
            out[n] = model.get_submodule(n)
        except AttributeError:
            raise LoRAError(f"the model has no module `{n}`") from None
    return out


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")


def apply_loras(model: nn.Module, loras) -> AppliedLoRAs:
    """Attach LoRAs to a Lens DiT as side paths; returns the handle that removes them.

    model: a :class:`~lens_model.dit.LensTransformer` (bf16, fp32, fp8 or MXFP8 weights).
    loras: ``[(LensLoRA, strength), ...]`` (or anything :func:`as_lora_list` takes). Strength 0
    entries are skipped. Every LoRA is checked against the model first: on any error nothing is
    attached. Applying more LoRAs later stacks on top; :func:`remove_loras` removes all of them.
    """
    items = [(lo, s) for lo, s in as_lora_list(loras)]
    for lo, _ in items:
        lo.check(model)
    items = [(lo, s) for lo, s in items if s != 0.0]
    per_module: dict[str, list[tuple[LoRAPair, float]]] = {}
    for lo, s in items:
        for module, pair in lo.pairs.items():
            per_module.setdefault(module, []).append((pair, s))
    targets = _named_linears(model, per_module)
    compute = model.resolved_compute_dtype() if hasattr(model, "resolved_compute_dtype") else None
    paths = {}
    for module, entries in per_module.items():
        path = _SidePath(entries)
        if compute is not None:  # build now (memory errors surface here, not mid-sampling)
            path.factors(compute, _module_device(targets[module]))
        paths[module] = path
    handles = []
    with _lock:
        for module, path in paths.items():
            handles.append(targets[module].register_forward_hook(path))
        applied_ = AppliedLoRAs(model, handles, [lo.name for lo, _ in items])
        attached = model.__dict__.setdefault(_ATTACHED_ATTR, [])
        attached.append(applied_)
    if items:
        logger.info("applied LoRA(s) %s to %d modules",
                    ", ".join(f"{lo.name}@{s:g}" for lo, s in items), len(paths))
    return applied_


def remove_loras(model: nn.Module) -> None:
    """Detach every LoRA side path :func:`apply_loras` attached to ``model``."""
    for a in list(model.__dict__.get(_ATTACHED_ATTR, [])):
        a.remove()


def active_loras(model: nn.Module) -> list[str]:
    """Names of the LoRAs currently attached to ``model`` (in application order)."""
    return [n for a in model.__dict__.get(_ATTACHED_ATTR, []) for n in a.names]


@contextlib.contextmanager
def applied(model: nn.Module, loras) -> Iterator[AppliedLoRAs]:
    """``with applied(dit, [(lora, 0.8)]): ...`` — the LoRAs are attached inside the block and
    removed when it ends, also on errors and interrupts. An empty list attaches nothing."""
    handle = apply_loras(model, loras)
    try:
        yield handle
    finally:
        handle.remove()


__all__ = [
    "LoRAError",
    "LensLoRA",
    "LoRAPair",
    "AppliedLoRAs",
    "TARGET_MODULES",
    "KEY_PREFIXES",
    "load_lora",
    "lora_from_state_dict",
    "module_for_key",
    "linear_shapes",
    "as_lora_list",
    "parse_lora_arg",
    "apply_loras",
    "remove_loras",
    "active_loras",
    "applied",
]
