"""Loading the Lens DiT: file checks, configuration, dtype choice and filling the model.

:func:`load_transformer` builds :class:`~lens_model.dit.LensTransformer` on the meta device, checks the
file against the module's own state-dict shapes (``_validate``), then fills it tensor by tensor from
any supported layout (diffusers folder, sharded set, single file with or without prefix, ComfyUI
MXFP8 / fp8 / NVFP4 layers with ``comfy_quant`` markers). :func:`inspect_transformer` runs the same
checks from the headers alone. :func:`variant_defaults_for` guesses the step / CFG preset from a
file name. The model code itself is in :mod:`lens_model.dit`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import torch
import torch.nn as nn

from . import ops
from . import quant
from .checkpoints import SAFETENSORS_DTYPES, CheckpointError, open_checkpoint, quant_layers, quantised_linear_problems
from .constants import VARIANT_DEFAULTS
from .dit import LensDiTConfig, LensTransformer
from .precision import refuse_fp16

logger = logging.getLogger(__name__)

#: Linear layers that the optional ``weight_dtype="fp8"`` storage mode quantises: the attention and
#: MLP projections of every block (the bulk of the weights; embeddings, modulation and output stay).
FP8_CANDIDATES = re.compile(
    r"^transformer_blocks\.\d+\.(attn\.(img_qkv|txt_qkv|to_out\.0|to_add_out)|(img|txt)_mlp\.w[123])$"
)

_QUANT_EXTRA_SUFFIXES = (".weight_scale", ".weight_scale_2", ".comfy_quant", ".input_scale")

#: Safetensors dtype names a plain (unquantised) DiT tensor may have, with their torch dtypes.
_FLOAT_ST = {name: SAFETENSORS_DTYPES[name][0] for name in ("F32", "BF16", "F16", "F64")}




def variant_defaults_for(name: str | Path) -> dict:
    """Default preset from a file or folder name: turbo 4 / 1.0, base 50 / 5.0, else 20 / 5.0.

    Generic diffusers names (``diffusion_pytorch_model*``, ``transformer/``) defer to the parent folder.
    """
    p = Path(name)
    parts = [p.name]
    for parent in p.parents:
        if not parts[-1] or parts[-1].startswith(("diffusion_pytorch_model", "model")) or parts[-1] in ("transformer",):
            parts.append(parent.name)
        else:
            break
    text = " ".join(parts).lower()
    if "turbo" in text:
        return dict(VARIANT_DEFAULTS["turbo"])
    if re.search(r"(^|[^a-z])base([^a-z]|$)", text):
        return dict(VARIANT_DEFAULTS["base"])
    return dict(VARIANT_DEFAULTS["lens"])


def _linear_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _module_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of ``model`` (built on the meta device) with its shape: what a file must hold."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _pick_dtype(requested: torch.dtype | None, stored: torch.dtype, device: torch.device, name: str) -> torch.dtype:
    dtype = requested if requested is not None else stored
    dtype = refuse_fp16(dtype, device, "DiT", stored_in=None if requested is not None else name, stacklevel=3)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"unsupported DiT dtype {dtype}; use torch.bfloat16 or torch.float32")
    return dtype


def _validate(source, cfg: LensDiTConfig, qlayers: dict[str, dict], model: nn.Module) -> None:
    """Check every key and shape against ``model`` (built from ``cfg`` on the meta device); raise
    CheckpointError listing the problems."""
    name = source.name
    expected = _module_shapes(model)
    linear_names = _linear_names(model)
    present = set(source.keys())
    problems: list[str] = []

    for layer, qcfg in qlayers.items():
        fmt = str(qcfg.get("format"))
        if layer not in linear_names:
            raise CheckpointError(
                f"`{name}`: `{source.stored_key(layer)}` carries a quantisation marker ({fmt}) but is not a "
                "Linear layer of the Lens DiT (norm weights cannot be quantised)."
            )
        if fmt not in quant.LINEAR_FORMATS:
            raise CheckpointError(quant.unsupported_format_message(name, source.stored_key(layer), fmt))
        wkey = layer + ".weight"
        if wkey in present:  # a missing weight is reported below with the other missing keys
            problems += quantised_linear_problems(source, layer, fmt, *expected[wkey])

    missing = [k for k in expected if k not in present]
    allowed_extra = {layer + suf for layer in qlayers for suf in _QUANT_EXTRA_SUFFIXES}
    unexpected = [k for k in source.keys() if k not in expected and k not in allowed_extra]
    bad_shape = []
    for k, want in expected.items():
        if k in present and not (k.endswith(".weight") and k[: -len(".weight")] in qlayers):
            got = tuple(source.shape(k))
            if got != want:
                bad_shape.append(f"`{k}` has shape {list(got)}, expected {list(want)}")
    for k in present:
        if k in expected and k.endswith(".weight") and k[: -len(".weight")] not in qlayers:
            if source.dtype(k) not in _FLOAT_ST:
                problems.append(
                    f"`{k}` is stored as {source.dtype(k)} without a `comfy_quant` marker (expected a float dtype)"
                )
    for k in present:
        if k.endswith(".bias") and k in expected and source.dtype(k) not in _FLOAT_ST:
            problems.append(f"`{k}` is stored as {source.dtype(k)}, expected a float dtype")

    def listing(keys: list[str]) -> str:
        shown = ", ".join(f"`{k}`" for k in keys[:10])
        return shown + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")

    msgs = []
    if missing:
        msgs.append(f"{len(missing)} missing key(s): {listing(missing)}")
    if unexpected:
        msgs.append(f"{len(unexpected)} unexpected key(s): {listing(unexpected)}")
    if bad_shape or problems:
        items = bad_shape + problems
        msgs.append(f"{len(items)} problem(s): " + "; ".join(items[:10]) + (f"; and {len(items) - 10} more" if len(items) > 10 else ""))
    if msgs:
        raise CheckpointError(
            f"`{name}` does not match a Lens DiT with {cfg.num_layers} blocks, width {cfg.inner_dim}, "
            f"{cfg.num_attention_heads} heads, MLP {cfg.mlp_hidden}, text width {cfg.enc_hidden_dim}: "
            + " | ".join(msgs)
            + ". The file may be incomplete or from another model; download it again or pick the matching file."
        )


def _config_for(source) -> LensDiTConfig:
    shapes = source.shapes()
    cfg_dict = source.config
    if cfg_dict and cfg_dict.get("_class_name") not in (None, "LensTransformer2DModel"):
        logger.warning("%s: config.json _class_name is %r, not LensTransformer2DModel", source.name, cfg_dict.get("_class_name"))
    try:
        if cfg_dict:
            cfg = LensDiTConfig.from_diffusers_config(cfg_dict)
            if "transformer_blocks.0.img_mlp.w1.weight" in shapes:
                inferred = LensDiTConfig.from_state_dict_shapes(shapes)
                cfg.mlp_hidden = inferred.mlp_hidden
            return cfg
        return LensDiTConfig.from_state_dict_shapes(shapes)
    except KeyError as e:
        raise CheckpointError(
            f"`{source.name}` does not look like a complete Lens DiT: key `{e.args[0]}` is missing, so the "
            "configuration cannot be derived. The file may be incomplete; download it again."
        ) from None


def inspect_transformer(path: str | Path) -> LensDiTConfig:
    """The configuration of the Lens DiT at ``path``, after checking every key, shape and
    quantisation marker (headers only: no tensor is read; the model is built on the meta device to
    list its Linear layers). Raises the same errors as :func:`load_transformer`, in milliseconds."""
    cfg, _, _ = _checked_meta_model(open_checkpoint(path, "dit"))
    return cfg


def _checked_meta_model(source, qk_norm_eps: float | None = None):
    """The configuration of the DiT in ``source``, its per-layer quantisation markers and the
    :class:`LensTransformer` built from them on the meta device, after every key, shape and marker of
    the file was checked against that module (:func:`_validate`). ``qk_norm_eps`` overrides the
    configuration's q/k RMSNorm eps. Returns ``(cfg, qlayers, model)``."""
    cfg = _config_for(source)
    if qk_norm_eps is not None:
        cfg.qk_norm_eps = float(qk_norm_eps)
    qlayers = quant_layers(source)
    with torch.device("meta"):
        model = LensTransformer(cfg)
    _validate(source, cfg, qlayers, model)
    return cfg, qlayers, model


def load_transformer(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    weight_dtype: str | None = None,
    qk_norm_eps: float | None = None,
) -> LensTransformer:
    """Load a Lens DiT from a diffusers folder, shard set or single ``.safetensors`` file.

    path: a ``transformer/`` folder (or the pipeline root), an index json, a shard, or a single file
        (bare keys or any DiT prefix, e.g. ``model.diffusion_model.``); ComfyUI ``*_mxfp8`` /
        float8_e4m3fn files with per-layer ``comfy_quant`` markers (or ``_quantization_metadata``).
    dtype: model dtype; None keeps the stored dtype (fp32 folder stays fp32, bf16 file stays bf16,
        quantised files use their plain tensors' dtype). fp16 is refused with a warning -> bf16.
    device: where the weights live (default CPU).
    weight_dtype: None (as stored) or ``"fp8"``: store the attention and MLP Linears of every block
        as float8_e4m3fn with a per-tensor scale (weight-only), everything else in ``dtype``.
    qk_norm_eps: override the q/k RMSNorm eps (None: the configuration's, upstream 1e-6;
        :data:`lens_model.constants.QK_NORM_EPS` has ComfyUI core's 1e-5).

    The model is built on the meta device and filled one tensor at a time (cast per tensor), so
    peak host memory is the final size plus one tensor. Quantised layers stay quantised
    (:class:`ops.QuantLinear`) and are dequantised per layer at use. On any error nothing is
    returned and the tensors read so far are released.

    **Memory-mapped weights.** Tensors are read with ``safetensors.safe_open`` (through
    :meth:`TensorSource.read <lens_model.checkpoints.TensorSource.read>`). On the CPU, every tensor
    whose stored dtype is the model's dtype (a bf16 file loaded as bf16, an fp32 folder as fp32,
    fp8 / MXFP8 weights) is not copied: it stays a view of a copy-on-write memory map of the file,
    so the weights live in the kernel's page cache (file-backed, shared with other processes
    reading the file, reclaimable under memory pressure and re-read from the file when touched
    again) and a cached file loads at memory speed. Tensors that are cast or moved to another
    device are converted one block at a time, each block's map released after it. Consequence:
    **the file must not be modified in place while the model is loaded.** Replacing it (a new file
    renamed over it, as downloaders do) or deleting it is safe: the model keeps the old file's
    data. Rewriting it in place (same inode, e.g. ``cp new.safetensors old.safetensors``, or a
    resumed download into it) silently changes the loaded model's weights to the new bytes, and
    truncating it makes the next forward crash with SIGBUS. On Windows the file cannot be deleted
    or replaced while the model is loaded. Writes to the weights stay private to the process.
    """
    if weight_dtype not in (None, "fp8", "float8_e4m3fn"):
        raise ValueError(f"weight_dtype must be None or 'fp8', got {weight_dtype!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    source = open_checkpoint(path, "dit")
    cfg, qlayers, model = _checked_meta_model(source, qk_norm_eps)
    stored = _stored_dtype(source)
    target = _pick_dtype(dtype, stored, device, source.name)
    fp8_mode = weight_dtype is not None
    _fill_weights(model, source, qlayers, target, device, fp8_mode,
                  keep_views=device.type == "cpu" and target == stored and not fp8_mode)
    _finish_loaded(model, source, cfg, target, device)
    return model


def _stored_dtype(source) -> torch.dtype:
    """The float dtype the file stores its plain tensors in (read from ``txt_norm.0.weight``, which is
    never quantised); float64 files count as float32."""
    stored = _FLOAT_ST.get(source.dtype("txt_norm.0.weight"), torch.float32)
    return torch.float32 if stored == torch.float64 else stored


def _fill_weights(model: LensTransformer, source, qlayers: dict[str, dict], target: torch.dtype,
                  device: torch.device, fp8_mode: bool, keep_views: bool) -> None:
    """Fill ``model`` (built on the meta device) from ``source`` (:func:`_read_weights`); on any
    error every tensor read so far is dropped before the error propagates."""
    try:
        _read_weights(model, source, qlayers, _module_shapes(model), _linear_names(model), target,
                      device, fp8_mode, keep_views=keep_views)
    except BaseException:
        model.to("meta")  # drop every tensor read so far before the traceback can keep it alive
        ops.release_free_memory()
        raise
    ops.release_free_memory()


def _finish_loaded(model: LensTransformer, source, cfg: LensDiTConfig, target: torch.dtype,
                   device: torch.device) -> None:
    """Make a filled model ready to run (cast workspace, eval mode), record the variant defaults
    guessed from the file name and the file's identity on it, and log what was loaded."""
    model.attach_cast_workspace()  # quantised layers were installed after construction
    model.eval()
    model.variant_defaults = variant_defaults_for(source.name)
    model.source_identity = source.identity
    nq = sum(isinstance(m, ops.QuantLinear) for m in model.modules())
    logger.info(
        "loaded Lens DiT %s: %d blocks, width %d, %s on %s%s; defaults %s",
        source.name, cfg.num_layers, cfg.inner_dim, str(target).replace("torch.", ""), device,
        f", {nq} quantised layers" if nq else "", model.variant_defaults,
    )


def _block_of(name: str) -> str:
    """``transformer_blocks.{i}`` for a tensor or layer inside a block, else ``""``."""
    parts = name.split(".", 2)
    return ".".join(parts[:2]) if parts[0] == "transformer_blocks" else ""


def _read_weights(model, source, qlayers, expected, linear_names, target, device, fp8_mode, keep_views) -> None:
    """Fill ``model`` (built on the meta device) from ``source``, one DiT block at a time.

    Each block is read through one ``safe_open`` handle per file (:meth:`TensorSource.reading`),
    released after the block, so a load that casts or moves tensors never keeps more than one
    block's pages of the file mapped. ``keep_views`` (CPU, stored dtype: the weights stay views of
    the file anyway) reads everything through one handle instead, saving a header parse per block.
    """
    with source.reading() if keep_views else contextlib.nullcontext():
        for block in dict.fromkeys(_block_of(k) for k in expected):
            with source.reading():
                for layer, qcfg in qlayers.items():
                    if _block_of(layer) == block:
                        _load_quant_layer(model, source, layer, qcfg["format"], expected[layer + ".weight"], target, device)
                if fp8_mode:
                    for layer in sorted(linear_names):
                        if _block_of(layer) == block and layer not in qlayers and FP8_CANDIDATES.match(layer):
                            _load_fp8_layer(model, source, layer, expected, target, device)
                for key in expected:
                    if _block_of(key) != block:
                        continue
                    module_name, _, pname = key.rpartition(".")
                    module = model.get_submodule(module_name)
                    if isinstance(module, ops.QuantLinear):
                        continue
                    t = source.read(key, dtype=target, device=device)
                    module._parameters[pname] = nn.Parameter(t, requires_grad=False)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"internal error: tensors not loaded: {leftovers[:10]}")


def _load_fp8_layer(model, source, layer, expected, target, device) -> None:
    """Read one plain Linear, quantise its weight to float8_e4m3fn (per-tensor scale) and install an
    :class:`ops.QuantLinear` (the ``weight_dtype="fp8"`` storage mode)."""
    w = source.read(layer + ".weight")
    w8, scale = quant.quantize_float8(w)
    del w
    bias = None
    if layer + ".bias" in expected:
        bias = source.read(layer + ".bias", dtype=target, device=device)
    out_f, in_f = expected[layer + ".weight"]
    model.set_submodule(layer, ops.QuantLinear("float8_e4m3fn", in_f, out_f, w8.to(device), scale.to(device), bias))


def _load_quant_layer(model, source, layer, fmt, shape, target, device) -> None:
    """Read one quantised Linear (weight, scales, bias) and install an :class:`ops.QuantLinear`."""
    out_f, in_f = shape
    bias = source.read(layer + ".bias", dtype=target, device=device) if layer + ".bias" in source else None
    scale2 = source.read(layer + ".weight_scale_2", device=device) if fmt == "nvfp4" else None
    model.set_submodule(layer, ops.QuantLinear.from_stored(
        fmt, in_f, out_f, source.read(layer + ".weight", device=device),
        source.read(layer + ".weight_scale", device=device), bias, weight_scale_2=scale2,
    ))


__all__ = [
    "FP8_CANDIDATES",
    "inspect_transformer",
    "load_transformer",
    "variant_defaults_for",
]
