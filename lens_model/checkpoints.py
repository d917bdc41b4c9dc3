"""Checkpoint files: reading, path resolution, prefix stripping and component detection.

Every Lens loader goes through :func:`open_checkpoint`, which

1. resolves what the user pointed at (a ``.safetensors`` / ``.sft`` file, a shard of a sharded set, a
   ``*.safetensors.index.json``, a diffusers component folder or a diffusers pipeline root);
2. reads the safetensors **headers only** and checks that every file is as long as its header says;
3. strips the known key prefixes of the requested component (ComfyUI, diffusers and training tools);
4. detects which model the keys belong to and refuses the wrong kind with an actionable message.

Tensors are then read one at a time, either with ``os.pread`` into fresh memory
(:meth:`TensorSource.read`) or as a per-tensor copy-on-write memory map of the file
(:meth:`TensorSource.map`, :func:`map_tensor`). A mapping covers one tensor and is unmapped when the
last tensor viewing it is freed, so a 13 GB text encoder read layer by layer never keeps the whole
file mapped, while a model that keeps its mapped weights (the DiT on the CPU) holds them in
file-backed page-cache pages instead of a private copy.

Pickle formats (``.ckpt``, ``.pt``, ``.bin``) are never opened; GGUF is detected and refused.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from . import quant

logger = logging.getLogger(__name__)

COMPONENTS = ("dit", "te", "vae")

#: Display names used in messages.
COMPONENT_NAMES = {
    "dit": "Lens diffusion model (DiT)",
    "te": "gpt-oss text encoder",
    "vae": "FLUX.2 VAE",
}

#: Where each component lives in ComfyUI's model folders.
COMPONENT_FOLDERS = {"dit": "models/diffusion_models", "te": "models/text_encoders", "vae": "models/vae"}

#: Sub-folder of a diffusers pipeline root that holds each component.
DIFFUSERS_SUBFOLDERS = {"dit": "transformer", "te": "text_encoder", "vae": "vae"}

#: Candidate key prefixes per component, tried longest first.
PREFIXES = {
    "dit": ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "net."),
    "te": ("text_encoders.gpt_oss.transformer.", "text_encoders.", "transformer.", "model."),
    "vae": ("first_stage_model.", "vae."),
}

#: Keys that identify each component once the prefix is stripped. Any one tuple must be fully present.
DETECTION_KEYS: Mapping[str, tuple[tuple[str, ...], ...]] = {
    "dit": (("transformer_blocks.0.attn.norm_added_q.weight", "transformer_blocks.0.img_mlp.w1.weight"),),
    "te": (
        ("layers.0.self_attn.sinks",),
        ("block.0.attn.sinks",),
    ),
    "vae": (
        ("encoder.down.0.block.0.norm1.weight", "bn.running_mean"),
        ("decoder.up.0.block.0.norm1.weight", "bn.running_mean"),
        ("decoder.up_blocks.0.resnets.0.norm1.weight", "bn.running_mean"),
        ("encoder.down_blocks.0.resnets.0.norm1.weight", "bn.running_mean"),
    ),
}

#: safetensors dtype string -> (torch dtype used to view the bytes, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    # E8M0 scales are handled as raw exponent bytes everywhere in this package.
    "F8_E8M0": (torch.uint8, 1),
}

_TORCH_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
if hasattr(torch, "float8_e8m0fnu"):
    _TORCH_TO_ST[torch.float8_e8m0fnu] = "F8_E8M0"

_MAX_HEADER = 256 * 1024 * 1024


def safetensors_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors dtype string of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors name") from None


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, incomplete or not the model that was asked for."""


class WrongComponentError(CheckpointError):
    """A file holds another kind of model (``found``) than the one asked for (``component``).

    The message uses the ComfyUI wording; :meth:`reworded` gives it with another fix text (see
    :func:`wrong_kind_message`)."""

    def __init__(self, name: str, found: str, component: str) -> None:
        self.name, self.found, self.component = name, found, component
        super().__init__(wrong_kind_message(name, found, component))

    def reworded(self, fixes: Mapping[str, str]) -> str:
        return wrong_kind_message(self.name, self.found, self.component, fixes)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file`` bytes ``[start, end)``, stored ``dtype`` and ``shape``."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _display(path: Path) -> str:
    return str(path)


# madvise(MADV_POPULATE_READ) (Linux >= 5.14): fault a whole mapping in, page-cache pages shared
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


def map_tensor(info: TensorInfo, populate: bool = True) -> torch.Tensor:
    """One tensor of a safetensors file as a copy-on-write memory map (no copy, no zero-fill).

    ``info``: a :class:`TensorInfo`. Returns the tensor in its stored dtype and shape (F8_E8M0 as
    uint8 bytes, as :meth:`TensorSource.read`). The mapping covers only this tensor (from the
    allocation-granularity boundary below it), is prefaulted on the calling thread when
    ``populate`` (one ``madvise`` instead of a page fault per 4 KiB), and is unmapped as soon as
    the last tensor viewing it is freed; while it lives, its pages count towards the resident set
    as file-backed (page-cache) pages. Writes stay private to the process (``MAP_PRIVATE``).

    The mapping reads the file as it is on disk, page by page, for as long as it lives: a file
    *replaced* meanwhile (a new file renamed over it, or deleted) does not affect it, but a file
    *rewritten in place* (same inode, e.g. ``cp new old`` or a download resumed into it) changes
    the tensor's values under it, and truncating it makes reads past the new end raise SIGBUS.
    On Windows a mapped file cannot be deleted or replaced while mapped.

    Raises OSError / ValueError / BufferError when the file cannot be mapped (callers fall back to
    :meth:`TensorSource.read`), KeyError for a dtype missing from :data:`SAFETENSORS_DTYPES`.
    """
    tdtype, _ = SAFETENSORS_DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=tdtype)
    gran = mmap.ALLOCATIONGRANULARITY
    base = info.start // gran * gran
    with open(info.file, "rb") as f:
        m = mmap.mmap(f.fileno(), info.end - base, access=mmap.ACCESS_COPY, offset=base)
    if populate and hasattr(m, "madvise"):
        for advice in (_MADV_POPULATE_READ, getattr(mmap, "MADV_WILLNEED", None)):
            if advice is None:
                continue
            try:
                m.madvise(advice)
                break
            except OSError:
                continue
    raw = torch.frombuffer(m, dtype=torch.uint8, offset=info.start - base, count=info.nbytes)
    return raw.view(tdtype).reshape(info.shape)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors header without touching the tensor data.

    Returns ``(infos, metadata)`` where ``infos`` maps the stored key to its :class:`TensorInfo`.
    Raises :class:`CheckpointError` for GGUF files, unreadable headers and truncated files.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] == b"GGUF":
            raise CheckpointError(
                f"{_display(path)}: GGUF files are not supported; use the safetensors files from Comfy-Org/Lens."
            )
        if len(head) < 8:
            raise CheckpointError(
                f"{_display(path)}: safetensors header unreadable: the file is only {size} bytes (incomplete download?)."
            )
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(_not_safetensors_message(path, head, n, size))
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(_not_safetensors_message(path, head, n, size)) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{_display(path)}: safetensors header is not a JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    max_end = 0
    for key, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{_display(path)}: malformed header entry for tensor {key!r}.") from e
        infos[key] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
        max_end = max(max_end, end)
    if data_start + max_end > size:
        raise CheckpointError(
            f"{_display(path)}: file is {size} bytes but its header says {data_start + max_end}; "
            "the file is truncated (incomplete download?). Download it again."
        )
    return infos, dict(metadata)


def _not_safetensors_message(path: Path, head: bytes, n: int, size: int) -> str:
    """Why the first bytes of ``path`` are not a readable safetensors header (checked only after
    parsing failed: a valid header length may start with any byte)."""
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return (
            f"{_display(path)}: looks like a pickled PyTorch checkpoint; this pack only reads .safetensors "
            "files (pickle can run arbitrary code)."
        )
    return (
        f"{_display(path)}: safetensors header unreadable / file shorter than header says "
        f"(header length {n}, file size {size}; incomplete download, or not a safetensors file?)."
    )


def _resolve_files(path: Path, component: str) -> tuple[list[Path], Path]:
    """Return ``(safetensors files, root folder)`` for whatever ``path`` points at."""
    if not path.exists():
        raise FileNotFoundError(f"{_display(path)}: no such file or folder.")
    if path.is_dir():
        sub = path / DIFFUSERS_SUBFOLDERS[component]
        has_own_weights = any(p.suffix in (".safetensors", ".sft") for p in path.iterdir())
        if sub.is_dir() and not has_own_weights:
            path = sub  # a diffusers pipeline root: use the component's sub-folder
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            return _files_from_index(indexes[0]), path
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".sft"))
        if not files:
            raise FileNotFoundError(
                f"{_display(path)}: folder holds no .safetensors files (expected a diffusers "
                f"`{DIFFUSERS_SUBFOLDERS[component]}/` folder or a single safetensors file)."
            )
        return files, path
    name = path.name
    if name.endswith(".index.json"):
        return _files_from_index(path), path.parent
    if path.suffix in (".gguf",):
        raise CheckpointError(f"{_display(path)}: GGUF files are not supported; use the safetensors files from Comfy-Org/Lens.")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise CheckpointError(
            f"{_display(path)}: pickled checkpoints ({path.suffix}) are not supported; use a .safetensors file."
        )
    # A shard listed by ComfyUI's folder scan: use the whole set when an index sits beside it.
    indexes = [p for p in path.parent.glob("*.safetensors.index.json")]
    for index in indexes:
        files = _files_from_index(index, check=False)
        if path.resolve() in [f.resolve() for f in files]:
            return _files_from_index(index), path.parent
    return [path], path.parent


def _files_from_index(index: Path, check: bool = True) -> list[Path]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{_display(index)}: unreadable shard index (expected a JSON object with `weight_map`).") from e
    files = []
    for name in dict.fromkeys(weight_map.values()):
        f = index.parent / name
        if check and not f.exists():
            raise FileNotFoundError(f"{_display(index)}: index lists `{name}`, which is not in `{index.parent}`.")
        files.append(f)
    return files


def strip_prefix(keys: Iterable[str], component: str) -> str:
    """Pick the prefix to strip for ``component`` (``""`` when the keys are bare).

    A prefix is accepted when more than 5 keys carry it and stripping it yields the detection keys.
    """
    keys = list(keys)
    if _detect_bare(set(keys), component):
        return ""
    for prefix in sorted(PREFIXES[component], key=len, reverse=True):
        carried = [k[len(prefix):] for k in keys if k.startswith(prefix)]
        if len(carried) > 5 and _detect_bare(set(carried), component):
            return prefix
    return ""


def _detect_bare(keys: set[str], component: str) -> bool:
    return any(all(k in keys for k in group) for group in DETECTION_KEYS[component])


def detect_component(keys: Iterable[str]) -> str:
    """Name the model family of a state dict, for routing and error messages.

    Returns one of ``"dit"``, ``"te"``, ``"vae"`` (after trying each component's prefixes), or a
    foreign family: ``"other_vae"`` (a VAE without FLUX.2 batch-norm statistics; ``vae.py`` names
    FLUX.1 / SD / video VAEs more precisely from their shapes), ``"flux_dit"``, ``"qwen_image_dit"``,
    ``"unet"``, ``"llm"`` or ``"unknown"``.
    """
    keys = list(keys)
    for component in COMPONENTS:
        prefix = strip_prefix(keys, component)
        bare = {k[len(prefix):] for k in keys if k.startswith(prefix)}
        if _detect_bare(bare, component):
            return component
    ks = set(keys)
    joined = "\n".join(keys)
    if any(k.endswith("decoder.conv_in.weight") for k in ks) or "decoder.up.0.block.0.norm1.weight" in joined:
        return "other_vae"
    if "double_blocks.0." in joined or "single_blocks.0." in joined:
        return "flux_dit"
    if "transformer_blocks.0.img_mod.1.weight" in joined or "transformer_blocks.0.attn.add_q_proj.weight" in joined:
        return "qwen_image_dit"
    if "input_blocks.0.0.weight" in joined or "down_blocks.0.resnets.0.conv1.weight" in joined:
        return "unet"
    if "layers.0.self_attn.q_proj.weight" in joined or "layers.0.mlp.gate_proj.weight" in joined:
        return "llm"
    return "unknown"


_FAMILY_TEXT = {
    "dit": "a Lens diffusion model (found `transformer_blocks.0.attn.norm_added_q.weight`)",
    "te": "a gpt-oss text encoder (found `layers.0.self_attn.sinks`)",
    "vae": "a FLUX.2 VAE (found `bn.running_mean`)",
    "other_vae": "a VAE without FLUX.2 batch-norm statistics (FLUX.1 / SD / video VAE)",
    "flux_dit": "a FLUX diffusion model (double_blocks / single_blocks)",
    "qwen_image_dit": "a Qwen-Image-style diffusion model, not Lens",
    "unet": "a UNet (Stable Diffusion family)",
    "llm": "a language model other than gpt-oss (no attention sinks)",
    "unknown": "an unknown model",
}

_FIX = {
    "dit": "Put it in `models/diffusion_models` and select it in the Lens DiT loader.",
    "te": "Put it in `models/text_encoders` and select it in the GPT-OSS text-encoder loader.",
    "vae": "Put it in `models/vae` and select it in the FLUX.2 VAE loader.",
}

_EXPECTED = {
    "dit": "a Lens diffusion model (e.g. lens_turbo_bf16.safetensors with `transformer_blocks.0.attn.norm_added_q.weight` and `transformer_blocks.0.img_mlp.w1.weight`)",
    "te": "the gpt-oss-20b text encoder (e.g. gpt_oss_20b_nvfp4.safetensors with `layers.0.self_attn.sinks`)",
    "vae": "the FLUX.2 VAE (flux2-vae.safetensors, with `bn.running_mean`)",
}


def wrong_kind_message(name: str, found: str, component: str, fixes: Mapping[str, str] | None = None) -> str:
    """The error text for a file that holds ``found`` where ``component`` was expected.

    ``fixes``: component -> what to do with a file of that kind, worded for the caller's interface
    (default: the ComfyUI folders and loader nodes; the command-line tool names its options)."""
    fixes = _FIX if fixes is None else fixes
    text = f"`{name}` looks like {_FAMILY_TEXT.get(found, found)}, not {_EXPECTED[component]}."
    if found in fixes:
        text += " " + fixes[found]
    elif component == "vae" and found == "other_vae":
        text += " Lens needs the FLUX.2 VAE (`flux2-vae.safetensors`)."
    return text


class TensorSource:
    """Header-level view of a checkpoint (one file or a shard set) with the key prefix stripped.

    Tensors are read on demand, one at a time: with ``os.pread`` into fresh CPU memory
    (:meth:`read`), as a copy-on-write memory map of the file (:meth:`map`), or mapped where that
    works and read otherwise (:meth:`fetch`, what the loaders use).
    """

    def __init__(
        self,
        files: list[Path],
        root: Path,
        display: str,
        infos: dict[str, TensorInfo],
        metadata: dict[str, str],
        prefix: str,
        config: dict | None,
    ) -> None:
        self.files = files
        self.root = root
        self.name = display
        self._infos = infos
        self.metadata = metadata
        self.prefix = prefix
        self.config = config
        #: :meth:`fetch` maps tensors while this is true; it turns false when mapping the file fails.
        self.use_map = True

    # -- header queries -------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise KeyError(f"{self.name}: tensor `{self.prefix}{key}` is missing.") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> str:
        return self.info(key).dtype

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self._infos.items()}

    def stored_key(self, key: str) -> str:
        """The key as spelled in the file (with its prefix), for messages."""
        return self.prefix + key

    @property
    def identity(self) -> tuple:
        """(path, total size, newest mtime) of the files, for caches and ``IS_CHANGED``."""
        return file_identity(self.files, self.name)

    # -- data ---------------------------------------------------------------------------------
    def read_raw(self, key: str) -> torch.Tensor:
        """The tensor's bytes as a 1-D uint8 tensor (fresh memory, read with ``pread``)."""
        info = self.info(key)
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            fd = os.open(info.file, os.O_RDONLY)
            try:
                self._pread_exact(fd, memoryview(out.numpy()).cast("B"), info, info.start, key)
            finally:
                os.close(fd)
        return out

    def _pread_exact(self, fd: int, view: memoryview, info: TensorInfo, offset: int, key: str) -> None:
        """Fill ``view`` from ``offset`` of ``info.file``; CheckpointError if the file ends first."""
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(
                    f"{info.file}: unexpected end of file reading `{self.stored_key(key)}` (the file is shorter "
                    "than its header says; was it truncated or rewritten after opening?). Download it again."
                )
            done += got

    def read(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Read one tensor. F8_E8M0 comes back as uint8 exponent bytes; other dtypes as stored.

        ``dtype`` casts floating tensors (integer / fp8 tensors are returned as stored unless a
        floating ``dtype`` is asked for explicitly).
        """
        info = self.info(key)
        try:
            tdtype, _ = SAFETENSORS_DTYPES[info.dtype]
        except KeyError:
            raise CheckpointError(f"{self.name}: tensor `{self.stored_key(key)}` has unsupported dtype {info.dtype}.") from None
        raw = self.read_raw(key)
        t = raw.view(tdtype).reshape(info.shape) if raw.numel() else torch.empty(info.shape, dtype=tdtype)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        return t

    def map(self, key: str, populate: bool = True) -> torch.Tensor:
        """One tensor as a per-tensor copy-on-write memory map of its file (:func:`map_tensor`).

        Same dtype, shape and values as :meth:`read` (F8_E8M0 as uint8 bytes) without a copy: the
        tensor views the file's page-cache pages and keeps the mapping alive; it is unmapped when
        the last tensor viewing it is freed. The file must not be rewritten in place while the
        tensor lives (see :func:`map_tensor`). Raises OSError / ValueError / BufferError when the
        file cannot be mapped.
        """
        info = self.info(key)
        if info.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.name}: tensor `{self.stored_key(key)}` has unsupported dtype {info.dtype}.")
        return map_tensor(info, populate=populate)

    def fetch(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Same values as :meth:`read`, without a copy where possible.

        A tensor that stays as stored on the CPU is the memory map itself (:meth:`map`); one that is
        cast or moved is mapped, converted and unmapped (no zero-filled staging copy). Tensors whose
        file offset is not a multiple of their element size are read; once mapping the file fails
        (logged once), every later tensor is read too (:attr:`use_map`).
        """
        if self.use_map:
            info = self.info(key)
            entry = SAFETENSORS_DTYPES.get(info.dtype)
            if entry is not None and info.start % entry[1] == 0:
                try:
                    t = self.map(key)
                except (OSError, ValueError, BufferError) as e:
                    logger.warning("%s: memory-mapping `%s` failed (%s); reading tensors into memory instead.",
                                   self.name, self.stored_key(key), e)
                    self.use_map = False
                else:
                    if dtype is not None and t.dtype != dtype:
                        t = t.to(dtype)
                    if device is not None and t.device != torch.device(device):
                        t = t.to(device)
                    return t
        return self.read(key, dtype=dtype, device=device)

    def read_rows(self, key: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of a 2-D tensor, reading only those rows (e.g. embedding lookups).

        ``index``: LongTensor of any shape -> tensor of shape ``index.shape + (cols,)``.
        """
        info = self.info(key)
        if len(info.shape) != 2:
            raise ValueError(f"{self.name}: `{self.stored_key(key)}` is not 2-D.")
        tdtype, itemsize = SAFETENSORS_DTYPES[info.dtype]
        rows, cols = info.shape
        row_bytes = cols * itemsize
        flat = index.reshape(-1).tolist()
        unique = sorted(set(flat))
        if unique and (unique[0] < 0 or unique[-1] >= rows):
            raise IndexError(f"{self.name}: row index out of range for `{self.stored_key(key)}` with {rows} rows.")
        out = torch.empty((len(unique), cols), dtype=tdtype)
        out_bytes = memoryview(out.view(torch.uint8).numpy()).cast("B")
        fd = os.open(info.file, os.O_RDONLY)
        try:
            for i, r in enumerate(unique):
                self._pread_exact(fd, out_bytes[i * row_bytes:(i + 1) * row_bytes], info, info.start + r * row_bytes, key)
        finally:
            os.close(fd)
        pos = {r: i for i, r in enumerate(unique)}
        gather = torch.tensor([pos[r] for r in flat], dtype=torch.long)
        return out[gather].reshape(*index.shape, cols)


def read_tensor_from_file(path: str | os.PathLike, key: str) -> torch.Tensor:
    """One tensor of a single safetensors file, by its stored key (reads that tensor's bytes only)."""
    path = Path(path)
    infos, metadata = read_safetensors_header(path)
    if key not in infos:
        raise KeyError(f"{path}: no tensor `{key}`.")
    return TensorSource([path], path.parent, str(path), infos, metadata, "", None).read(key)


def file_identity(files: Iterable[Path], name: str | None = None) -> tuple:
    """(name, total bytes, newest mtime in ns) over ``files``."""
    files = list(files)
    total = 0
    newest = 0
    for f in files:
        st = os.stat(f)
        total += st.st_size
        newest = max(newest, st.st_mtime_ns)
    return (name or str(files[0]), total, newest)


def path_identity(path: str | os.PathLike) -> tuple:
    """Identity of a file or folder (every safetensors/json file below it) for ``IS_CHANGED``."""
    p = Path(path)
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".safetensors", ".sft", ".json"))
        return file_identity(files, str(p)) if files else (str(p), 0, 0)
    return file_identity([p], str(p))


def read_config(root: Path) -> dict | None:
    """``config.json`` in ``root`` (a diffusers / HF folder), or None."""
    cfg = root / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{_display(cfg)}: unreadable config.json ({e}).") from e


def open_checkpoint(path: str | os.PathLike, component: str) -> TensorSource:
    """Open ``path`` as the given component (``"dit"``, ``"te"`` or ``"vae"``).

    Reads headers only. Raises FileNotFoundError for missing files, :class:`CheckpointError` for
    unreadable / truncated / foreign files (the message names the file, what was found and the fix).
    """
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    path = Path(path).expanduser()
    files, root = _resolve_files(path, component)
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for f in files:
        file_infos, file_meta = read_safetensors_header(f)
        for k in file_infos:
            if k in infos:
                raise CheckpointError(f"{_display(f)}: tensor `{k}` also appears in {infos[k].file.name}.")
        infos.update(file_infos)
        for mk, mv in file_meta.items():
            metadata.setdefault(mk, mv)
    display = _display(path)
    keys = list(infos)
    prefix = strip_prefix(keys, component)
    if prefix:
        bare = {k[len(prefix):]: v for k, v in infos.items() if k.startswith(prefix)}
        # Tensors outside the prefix belong to other components of an all-in-one file (or are
        # metadata tensors such as `tokenizer_json`): keep the few well-known extras.
        for k, v in infos.items():
            if not k.startswith(prefix) and k in ("tokenizer_json", "lm_head.weight"):
                bare.setdefault(k, v)
    else:
        bare = infos
    if not _detect_bare(set(bare), component):
        found = detect_component(keys)
        if found == component:  # detection keys present only under an unexpected prefix
            found = "unknown"
        raise WrongComponentError(display, found, component)
    config = read_config(root) if (path.is_dir() or path.name.endswith(".index.json") or len(files) > 1) else None
    if config is None and path.is_file() and (root / "config.json").is_file() and root.name == DIFFUSERS_SUBFOLDERS[component]:
        config = read_config(root)
    source = TensorSource(files, root, display, bare, metadata, prefix, config)
    logger.debug("opened %s as %s: %d tensors in %d file(s), prefix %r", display, component, len(bare), len(files), prefix)
    return source


# -- comfy_quant markers ---------------------------------------------------------------------------

def quant_layers(source: TensorSource) -> dict[str, dict]:
    """Per-layer quantisation markers: bare layer prefix (``"a.b"`` for ``a.b.weight``) -> config.

    Reads ``<layer>.comfy_quant`` tensors and the header metadata ``_quantization_metadata``; the
    metadata wins where both name a layer (ComfyUI does the same).
    """
    layers: dict[str, dict] = {}
    for key in source.keys():
        if key.endswith(".comfy_quant"):
            layer = key[: -len(".comfy_quant")]
            try:
                layers[layer] = quant.parse_comfy_quant(source.read(key))
            except ValueError as e:
                raise CheckpointError(f"{source.name}: layer `{source.stored_key(layer)}`: {e}") from e
    meta = source.metadata.get("_quantization_metadata")
    if meta:
        try:
            parsed = json.loads(meta)
            entries = parsed.get("layers", {})
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{source.name}: unreadable `_quantization_metadata` header ({e}).") from e
        for stored, cfg in entries.items():
            layer = stored[len(source.prefix):] if source.prefix and stored.startswith(source.prefix) else stored
            if not isinstance(cfg, dict) or "format" not in cfg:
                raise CheckpointError(f"{source.name}: `_quantization_metadata` entry for `{stored}` has no `format`.")
            layers[layer] = dict(cfg)
    return layers


def quantised_linear_problems(source: TensorSource, layer: str, fmt: str, out_features: int, in_features: int) -> list[str]:
    """Check the stored tensors of one quantised Linear ``layer`` (a ``[out, in]`` weight in ``fmt``).

    The one check of every quantised Linear, in the DiT and in the text encoder's attention. Raises
    CheckpointError at once when the weight's storage dtype is not the format's (the file is
    mis-written: ComfyUI would misread it too); returns the shape and missing-tensor problems found
    (empty when the layer is fine) for the caller to report with its other findings.
    ``fmt`` must be one of :data:`quant.LINEAR_FORMATS`.
    """
    name = source.name
    wkey, skey = layer + ".weight", layer + ".weight_scale"
    if wkey not in source:
        return [f"`{source.stored_key(wkey)}` is missing ({fmt} weight)"]
    stored, shape = source.dtype(wkey), tuple(source.shape(wkey))
    want_dtype = "U8" if fmt == "nvfp4" else "F8_E4M3"
    if stored != want_dtype:
        raise CheckpointError(
            f"`{name}`: layer `{source.stored_key(layer)}` is `{fmt}` but its weight is stored as {stored}; expected "
            f"{want_dtype} (ComfyUI would corrupt it too). Re-export the file with {fmt} weights."
        )
    problems: list[str] = []
    shown = f"`{source.stored_key(wkey)}`"
    if fmt == "mxfp8":
        block = quant.MX_BLOCK
        want = (-(-out_features // block) * block, -(-in_features // block) * block)
        if shape != want:
            problems.append(f"{shown} has shape {list(shape)}, expected {list(want)} (mxfp8, padded to {block})")
        elif skey in source:
            rp, cp = quant.padded_scale_shape(want[0], want[1] // block)
            sshape = tuple(source.shape(skey))
            if source.dtype(skey) not in ("U8", "F8_E8M0"):
                problems.append(f"`{source.stored_key(skey)}` is {source.dtype(skey)}, expected U8 or F8_E8M0 exponent bytes")
            elif sshape not in ((rp, cp), (rp * cp,)):
                problems.append(f"`{source.stored_key(skey)}` has shape {list(sshape)}, expected swizzled [{rp}, {cp}]")
    elif fmt == "float8_e4m3fn":
        if shape != (out_features, in_features):
            problems.append(f"{shown} has shape {list(shape)}, expected {[out_features, in_features]}")
        if skey in source and math.prod(source.shape(skey)) != 1:
            problems.append(f"`{source.stored_key(skey)}` has shape {list(source.shape(skey))}, expected a scalar (per-tensor fp8)")
    elif fmt == "nvfp4":
        if shape != (out_features, in_features // 2) or in_features % quant.NVFP4_BLOCK:
            problems.append(f"{shown} has shape {list(shape)}, expected {[out_features, in_features // 2]} (nvfp4)")
        if layer + ".weight_scale_2" not in source:
            problems.append(f"`{source.stored_key(layer)}.weight_scale_2` is missing (nvfp4 global scale)")
    if skey not in source:
        problems.append(f"`{source.stored_key(skey)}` is missing ({fmt} block/tensor scale)")
    return problems


# -- writing (tests, benches, caches) ---------------------------------------------------------------

def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` in safetensors format, one tensor at a time.

    Handles the float8 dtypes. Used for tests, benchmarks and the prompt-embedding disk cache.
    """
    header: dict[str, object] = {}
    offset = 0
    items = []
    for key, t in tensors.items():
        st = _TORCH_TO_ST.get(t.dtype)
        if st is None:
            raise ValueError(f"cannot write tensor {key!r} of dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": st, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        items.append(t)
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for t in items:
                if t.numel():
                    f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write failed

