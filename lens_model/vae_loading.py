"""Loading the FLUX.2 VAE: key layouts, file checks and diagnosis, dtype choice, building the model.

- Key layouts: BFL (the model's own names), LDM top-level and diffusers, converted by
  :func:`to_bfl_key` / :func:`to_diffusers_key` (a bijection, including the ``[C, C, 1, 1]`` <->
  ``[C, C]`` attention weight reshape).
- :func:`load_vae` / :func:`inspect_vae` read a file or folder through
  :func:`lens_model.checkpoints.open_checkpoint` and check kind, layout and every shape first;
  files of other VAE families get a message naming what they are.
- :func:`vae_from_state_dict` builds from an in-memory state dict in any of the layouts.

The model itself is :class:`lens_model.vae.Flux2VAE`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .checkpoints import (
    PREFIXES, SAFETENSORS_DTYPES, SAFETENSORS_SUFFIXES, CheckpointError, open_checkpoint, read_safetensors_header,
    safetensors_dtype_name,
)
from .precision import refuse_fp16
from .vae import Flux2VAE, Flux2VAEConfig

logger = logging.getLogger(__name__)

#: Optional key (an int64 scalar nobody uses).
OPTIONAL_KEYS = ("bn.num_batches_tracked",)
_ATTN_WEIGHT = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_VAE_FIX = "Lens needs the FLUX.2 VAE (flux2-vae.safetensors, from Comfy-Org or black-forest-labs/FLUX.2-dev `ae.safetensors`)."


# ------------------------------------------------------------------------------------------------
# Key layouts
# ------------------------------------------------------------------------------------------------

#: The one BFL <-> diffusers key table for the part after ``encoder.`` / ``decoder.``: matching prefixes,
#: ``{i}`` a level, ``{j}`` a block. ``{u}`` is an up level, numbered in reverse in diffusers.
_KEY_SEGMENTS = (
    ("norm_out.", "conv_norm_out."),
    ("down.{i}.block.{j}.", "down_blocks.{i}.resnets.{j}."),
    ("down.{i}.downsample.conv.", "down_blocks.{i}.downsamplers.0.conv."),
    ("up.{u}.block.{j}.", "up_blocks.{u}.resnets.{j}."),
    ("up.{u}.upsample.conv.", "up_blocks.{u}.upsamplers.0.conv."),
    ("mid.block_1.", "mid_block.resnets.0."),
    ("mid.block_2.", "mid_block.resnets.1."),
    ("mid.attn_1.norm.", "mid_block.attentions.0.group_norm."),
    ("mid.attn_1.q.", "mid_block.attentions.0.to_q."),
    ("mid.attn_1.k.", "mid_block.attentions.0.to_k."),
    ("mid.attn_1.v.", "mid_block.attentions.0.to_v."),
    ("mid.attn_1.proj_out.", "mid_block.attentions.0.to_out.0."),
)
#: Whole-key prefixes: the quant convs sit inside encoder / decoder in BFL, at the top in diffusers and LDM.
_TOP_LEVEL_PREFIXES = (
    ("encoder.quant_conv.", "quant_conv."),
    ("decoder.post_quant_conv.", "post_quant_conv."),
)
#: The resnet shortcut conv, anywhere in an ``encoder.`` / ``decoder.`` key.
_SHORTCUT = (".nin_shortcut.", ".conv_shortcut.")


def _segment_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{", "{").replace(r"\}", "}").format(
        i=r"(?P<i>\d+)", j=r"(?P<j>\d+)", u=r"(?P<u>\d+)"))


#: ``_SEGMENT_RULES[d]``: (pattern, template) pairs from column ``1 - d`` of :data:`_KEY_SEGMENTS` to
#: column ``d`` (d = 0: to BFL, d = 1: to diffusers).
_SEGMENT_RULES = tuple(
    [(_segment_regex(pair[1 - d]), pair[d]) for pair in _KEY_SEGMENTS] for d in (0, 1)
)


def _rename(key: str, num_levels: int, to_diffusers: bool) -> str:
    """``key`` renamed by the tables above towards diffusers (``to_diffusers``) or BFL names; keys
    already in the target layout, and unknown keys, come back unchanged."""
    src, dst = (0, 1) if to_diffusers else (1, 0)
    for names in _TOP_LEVEL_PREFIXES:
        if key.startswith(names[src]):
            return names[dst] + key[len(names[src]):]
    m = re.match(r"^(encoder|decoder)\.(.*)$", key)
    if not m:
        return key  # bn.*, top-level quant_conv.* / post_quant_conv.* (LDM) are the same in diffusers
    part, rest = m.groups()
    for pattern, template in _SEGMENT_RULES[dst]:
        mm = pattern.match(rest)
        if mm:
            groups = mm.groupdict()
            if groups.get("u") is not None:
                groups["u"] = str(num_levels - 1 - int(groups["u"]))
            rest = template.format(**groups) + rest[mm.end():]
            break
    rest = rest.replace(_SHORTCUT[src], _SHORTCUT[dst])
    return f"{part}.{rest}"


def _levels(keys: Iterable[str], pattern: str) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(idx) + 1 if idx else 0


def detect_vae_layout(keys: Iterable[str]) -> str:
    """``"diffusers"``, ``"bfl"`` (nested quant convs) or ``"ldm"`` (top-level quant convs)."""
    keys = list(keys)
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in keys):
        return "diffusers"
    if any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys):
        return "ldm"
    return "bfl"


def to_diffusers_key(key: str, num_levels: int) -> str:
    """BFL or LDM key -> diffusers key. Unknown keys come back unchanged."""
    return _rename(key, num_levels, to_diffusers=True)


def to_bfl_key(key: str, num_levels: int) -> str:
    """diffusers, LDM or BFL key -> BFL key (the internal layout). Unknown keys come back unchanged."""
    return _rename(key, num_levels, to_diffusers=False)


def _num_levels(keys: Iterable[str]) -> int:
    keys = list(keys)
    return max(
        _levels(keys, r"^decoder\.up_blocks\.(\d+)\."),
        _levels(keys, r"^decoder\.up\.(\d+)\."),
        _levels(keys, r"^encoder\.down_blocks\.(\d+)\."),
        _levels(keys, r"^encoder\.down\.(\d+)\."),
    )


def _bfl_shape(bfl_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Attention projection weights are ``[C, C, 1, 1]`` in BFL; a 2-D ``[C, C]`` one is reshaped."""
    if len(shape) == 2 and _ATTN_WEIGHT.match(bfl_key):
        return (*shape, 1, 1)
    return tuple(shape)


def to_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout -> BFL names and shapes (nested quant convs, 4-D attention weights)."""
    n = _num_levels(state_dict)
    out = {}
    for k, v in state_dict.items():
        nk = to_bfl_key(k, n)
        out[nk] = v.reshape(_bfl_shape(nk, tuple(v.shape)))
    return out


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL / LDM layout -> diffusers names, attention weights ``[C, C, 1, 1]`` -> ``[C, C]``."""
    n = _num_levels(state_dict)
    out = {}
    for k, v in state_dict.items():
        nk = to_diffusers_key(k, n)
        if _ATTN_WEIGHT.match(k) and v.ndim == 4:
            v = v.reshape(v.shape[0], v.shape[1])
        out[nk] = v
    return out


# ------------------------------------------------------------------------------------------------
# Validation and loading
# ------------------------------------------------------------------------------------------------

class _DictSource:
    """Minimal TensorSource-like view of an in-memory state dict (for :func:`vae_from_state_dict`)."""

    def __init__(self, sd: Mapping[str, torch.Tensor], name: str) -> None:
        prefix = _vae_prefix(list(sd))
        self._sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        self.name = name
        self.config = None

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> str:
        return safetensors_dtype_name(self._sd[key].dtype)

    def read(self, key: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        t = self._sd[key]
        return t.to(device=device, dtype=dtype) if (dtype is not None or device is not None) else t


def _vae_prefix(keys: list[str]) -> str:
    """The component prefix (``vae.`` / ``first_stage_model.``) carried by more than 5 keys, else ``""``."""
    for prefix in PREFIXES["vae"]:
        if sum(k.startswith(prefix) for k in keys) > 5:
            return prefix
    return ""


def check_vae_keys(shapes: Mapping[str, tuple[int, ...]], name: str) -> None:
    """Refuse what is not a FLUX.2 VAE, naming what was found.

    ``shapes``: key -> shape, after prefix stripping, in any layout.
    """
    keys = set(shapes)
    conv_in = shapes.get("decoder.conv_in.weight")
    has_bn = "bn.running_mean" in keys and "bn.running_var" in keys
    if conv_in is None:
        if any(k.startswith("transformer_blocks.") for k in keys):
            raise ValueError(f"`{name}` is a diffusion model (transformer_blocks.*), not a VAE. {_VAE_FIX}")
        if any(k.startswith(("layers.", "model.layers.", "block.")) for k in keys):
            raise ValueError(f"`{name}` is a text encoder / language model (layers.*), not a VAE. {_VAE_FIX}")
        raise ValueError(f"`{name}` has no `decoder.conv_in.weight`; it is not a VAE. {_VAE_FIX}")
    if len(conv_in) == 5:
        raise ValueError(
            f"`{name}` has a 5-D `decoder.conv_in.weight` {list(conv_in)}: this is a video VAE (3-D convs), "
            f"not the image FLUX.2 VAE. {_VAE_FIX}"
        )
    if len(conv_in) != 4:
        raise ValueError(f"`{name}`: `decoder.conv_in.weight` has shape {list(conv_in)}; expected 4-D [C, 32, 3, 3]. {_VAE_FIX}")
    z = conv_in[1]
    if z == 16 and not has_bn:
        raise ValueError(
            f"`{name}` is a 16-channel (FLUX.1/SD3) VAE without `bn.running_mean`: this is a FLUX.1 VAE; "
            f"Lens needs the FLUX.2 VAE (flux2-vae.safetensors)."
        )
    if z == 4 and not has_bn:
        raise ValueError(
            f"`{name}` is a 4-channel Stable Diffusion (SD1.x/SDXL) VAE; {_VAE_FIX}"
        )
    if not has_bn:
        raise ValueError(
            f"`{name}` is a {z}-channel VAE without `bn.running_mean` / `bn.running_var` (the FLUX.2 latent "
            f"batch-norm statistics). {_VAE_FIX}"
        )
    bn = shapes["bn.running_mean"]
    if len(bn) != 1 or shapes["bn.running_var"] != bn or bn[0] % z:
        raise ValueError(
            f"`{name}`: bn.running_mean {list(bn)} / bn.running_var {list(shapes['bn.running_var'])} do not fit "
            f"{z} latent channels (expected [{4 * z}]). {_VAE_FIX}"
        )


def _resolve_dtype(requested: torch.dtype | None, stored: torch.dtype, device: torch.device, name: str) -> torch.dtype:
    """The VAE's dtype: ``requested``, else the stored one; fp16 replaced as :mod:`lens_model.precision`
    rules for the VAE (``small_model``: fp32 except on a CUDA device with bf16)."""
    dtype = requested if requested is not None else stored
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"unsupported VAE dtype {dtype}; use torch.float32 or torch.bfloat16.")
    return refuse_fp16(dtype, device, "VAE", stored_in=None if requested is not None else name, stacklevel=4,
                       small_model=True)


def _check_layout(source: Any, config: Flux2VAEConfig | Mapping[str, Any] | None
                  ) -> tuple[Flux2VAEConfig, dict[str, str], dict[str, tuple[int, ...]], list[str]]:
    """Header-level checks (kind, layout, every shape): ``(config, internal key -> stored key,
    expected internal key -> shape, stored keys)``. Reads no tensor."""
    name = source.name
    raw_keys = list(source.keys())
    n = _num_levels(raw_keys)
    to_internal = {to_bfl_key(k, n): k for k in raw_keys}
    if len(to_internal) != len(raw_keys):
        raise ValueError(f"`{name}` mixes key layouts (the same tensor appears under BFL and diffusers names).")
    shapes = {ik: _bfl_shape(ik, tuple(source.shape(k))) for ik, k in to_internal.items()}
    check_vae_keys(shapes, name)

    if config is None and isinstance(getattr(source, "config", None), Mapping):
        cfg_dict = source.config
        if "block_out_channels" in cfg_dict:
            config = cfg_dict
        else:
            logger.debug("%s: config.json is not a VAE config; inferring from shapes.", name)
    try:
        if config is None:
            cfg = Flux2VAEConfig.from_shapes(shapes)
        elif isinstance(config, Flux2VAEConfig):
            cfg = config
        else:
            cfg = Flux2VAEConfig.from_dict(config)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"`{name}`: cannot build the FLUX.2 VAE configuration: {e}") from e

    with torch.device("meta"):
        model = Flux2VAE(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - set(OPTIONAL_KEYS))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:10])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(to_internal[k] for k in unexpected[:10])})")
        raise ValueError(
            f"`{name}` does not match the FLUX.2 VAE layout for config block_out_channels="
            f"{list(cfg.block_out_channels)}, layers_per_block={cfg.layers_per_block}: {'; '.join(parts)}. "
            f"Is the file complete and a FLUX.2 VAE? {_VAE_FIX}"
        )
    bad = [f"{to_internal[k]} {list(shapes[k])} (expected {list(s)})" for k, s in expected.items() if shapes[k] != s]
    if bad:
        raise ValueError(f"`{name}`: tensor shapes do not match the config: {'; '.join(bad[:10])}.")
    return cfg, to_internal, expected, raw_keys


def _build(source: Any, config: Flux2VAEConfig | Mapping[str, Any] | None, dtype, device) -> Flux2VAE:
    name = source.name
    cfg, to_internal, expected, raw_keys = _check_layout(source, config)
    with torch.device("meta"):
        model = Flux2VAE(cfg)
    device = torch.device(device) if device is not None else torch.device("cpu")
    stored = SAFETENSORS_DTYPES.get(source.dtype(to_internal["decoder.conv_in.weight"]), (torch.float32, 4))[0]
    dtype = _resolve_dtype(dtype, stored, device, name)
    state = {}
    for ik in expected:
        wdtype = torch.float32 if ik.startswith("bn.") else dtype
        t = source.read(to_internal[ik])
        state[ik] = t.to(device=device, dtype=wdtype).reshape(expected[ik])
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    logger.info(
        "loaded FLUX.2 VAE %s (%s layout, block_out_channels=%s, %s on %s)",
        name, detect_vae_layout(raw_keys), list(cfg.block_out_channels), dtype, device,
    )
    return model


def load_vae(
    path: str | Any,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Flux2VAE:
    """Load a FLUX.2 VAE from a ``.safetensors`` file, a diffusers ``vae/`` folder or a pipeline root.

    Accepts BFL (``ae.safetensors`` / ``flux2-vae.safetensors``), LDM top-level and diffusers key layouts,
    with or without a ``vae.`` / ``first_stage_model.`` prefix. The configuration comes from
    ``config.json`` when present, else it is inferred from the tensor shapes.

    ``dtype``: None keeps the stored dtype (fp32 for the published files); fp16 is refused with a
    warning (bf16 on CUDA with bf16 support, else fp32; :mod:`lens_model.precision`). ``bn``
    statistics always stay fp32.
    ``device``: where the weights live (default CPU).
    Raises ValueError (``CheckpointError``) / FileNotFoundError with a message naming the file, what
    was found and the fix (e.g. a FLUX.1 VAE, a video VAE, a 4-channel SD VAE, a DiT or text encoder).
    """

    source = _open_vae(path)
    try:
        return _build(source, None, dtype, device)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def inspect_vae(path: str | Any) -> Flux2VAEConfig:
    """The configuration of the FLUX.2 VAE at ``path``, after checking its kind, key layout and every
    shape (headers only: nothing is loaded). Raises the same errors as :func:`load_vae`."""
    source = _open_vae(path)
    try:
        return _check_layout(source, None)[0]
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def _open_vae(path: Any):
    """``open_checkpoint(path, "vae")`` with a specific message for VAEs of other families."""
    try:
        return open_checkpoint(path, "vae")
    except CheckpointError as e:
        specific = _diagnose_foreign_file(path)
        if specific:
            raise CheckpointError(specific) from e
        raise


def _diagnose_foreign_file(path: Any) -> str | None:
    """A specific message for a single file that open_checkpoint refused as a VAE (or None)."""

    p = Path(path)
    if not p.is_file() or p.suffix not in SAFETENSORS_SUFFIXES:
        return None
    try:
        infos, _ = read_safetensors_header(p)
    except Exception:  # the original error is better
        return None
    keys = list(infos)
    prefix = _vae_prefix(keys)
    shapes = {k[len(prefix):]: tuple(v.shape) for k, v in infos.items() if k.startswith(prefix)}
    if "decoder.conv_in.weight" not in shapes:
        return None
    try:
        check_vae_keys(shapes, str(p))
    except ValueError as e:
        return str(e)
    return None


def vae_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Flux2VAEConfig | Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    name: str = "<state dict>",
) -> Flux2VAE:
    """A :class:`Flux2VAE` from a state dict in any supported layout (BFL, LDM top-level, diffusers)."""
    return _build(_DictSource(state_dict, name), config, dtype, device)


__all__ = [
    "bfl_to_diffusers",
    "check_vae_keys",
    "detect_vae_layout",
    "inspect_vae",
    "load_vae",
    "to_bfl",
    "to_bfl_key",
    "to_diffusers_key",
    "vae_from_state_dict",
]
