"""Checkpoint files: reading, path resolution, prefix stripping and component detection.

Every Lens loader goes through :func:`open_checkpoint`, which

1. resolves what the user pointed at (a ``.safetensors`` / ``.sft`` file, a shard of a sharded set, a
   ``*.safetensors.index.json``, a diffusers component folder or a diffusers pipeline root);
2. reads the safetensors **headers only** (``safetensors.safe_open``, which also refuses a file
   shorter than its header says);
3. strips the known key prefixes of the requested component (ComfyUI, diffusers and training tools);
4. detects which model the keys belong to and refuses the wrong kind with an actionable message.

Tensors are then read one at a time with ``safe_open(...).get_tensor``: a zero-copy view of a
copy-on-write memory map of the whole file, whose pages are read from the page cache when first
touched. The map is released when the handle and the last tensor viewing it are gone, so a reader
that opens one handle per unit of work (:meth:`TensorSource.reading`: a DiT block, a text-encoder
layer) never keeps more of a 13 GB file mapped than the tensors it still holds. BENCHMARKS.md
("Reading tensors") has the measurements that chose this over the pack's former own reader.

Pickle formats (``.ckpt``, ``.pt``, ``.bin``) are never opened; GGUF is detected and refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open

from . import quant

logger = logging.getLogger(__name__)

COMPONENTS = ("dit", "te", "vae")

#: File suffixes read as safetensors.
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")

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

#: safetensors dtype string -> (torch dtype of the tensors this package hands out, bytes per element)
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
    """One tensor of a header: the ``file`` holding it, its ``key`` as stored there (with any prefix),
    its stored ``dtype`` string and ``shape``."""

    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Stored bytes (0 for a dtype missing from :data:`SAFETENSORS_DTYPES`)."""
        return math.prod(self.shape) * SAFETENSORS_DTYPES.get(self.dtype, (None, 0))[1]


def _display(path: Path) -> str:
    return str(path)


def open_safetensors(path: str | os.PathLike) -> safe_open:
    """``safetensors.safe_open(path, "pt")``, its errors reworded as :class:`CheckpointError`.

    The message names the file and what it looks like instead: GGUF, a pickled PyTorch checkpoint,
    a file cut short (incomplete download) or otherwise not safetensors.
    """
    path = Path(path)
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise CheckpointError(_not_safetensors_message(path, str(e))) from e


def _not_safetensors_message(path: Path, why: str) -> str:
    """Why ``path`` cannot be opened, from its first bytes and size (only asked after safetensors
    refused the file: a valid header length may start with any byte)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"GGUF":
        return f"{_display(path)}: GGUF files are not supported; use the safetensors files from Comfy-Org/Lens."
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return (
            f"{_display(path)}: looks like a pickled PyTorch checkpoint; this pack only reads .safetensors "
            "files (pickle can run arbitrary code)."
        )
    if size < 8:
        return f"{_display(path)}: safetensors header unreadable: the file is only {size} bytes (incomplete download?)."
    if "incomplete metadata" in why or "not fully covered" in why:
        return (
            f"{_display(path)}: file is {size} bytes, which does not match the tensors its header lists; "
            "the file is truncated (incomplete download?) or has bytes after its last tensor. Download it again."
        )
    return (
        f"{_display(path)}: safetensors header unreadable / file shorter than header says ({why}; file size "
        f"{size}; incomplete download, or not a safetensors file?)."
    )


def _handle_infos(path: Path, handle: safe_open) -> dict[str, TensorInfo]:
    infos = {}
    for key in handle.keys():
        view = handle.get_slice(key)
        infos[key] = TensorInfo(path, key, view.get_dtype(), tuple(int(s) for s in view.get_shape()))
    return infos


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The header of one safetensors file, without touching the tensor data.

    Returns ``(infos, metadata)`` where ``infos`` maps the stored key to its :class:`TensorInfo`.
    Raises :class:`CheckpointError` for GGUF, pickle, unreadable headers and truncated files.
    """
    path = Path(path)
    handle = open_safetensors(path)
    return _handle_infos(path, handle), dict(handle.metadata() or {})


def _resolve_files(path: Path, component: str) -> tuple[list[Path], Path]:
    """Return ``(safetensors files, root folder)`` for whatever ``path`` points at."""
    if not path.exists():
        raise FileNotFoundError(f"{_display(path)}: no such file or folder.")
    if path.is_dir():
        sub = path / DIFFUSERS_SUBFOLDERS[component]
        has_own_weights = any(p.suffix in SAFETENSORS_SUFFIXES for p in path.iterdir())
        if sub.is_dir() and not has_own_weights:
            path = sub  # a diffusers pipeline root: use the component's sub-folder
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            return _files_from_index(indexes[0]), path
        files = sorted(p for p in path.iterdir() if p.suffix in SAFETENSORS_SUFFIXES)
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

    Tensors are read on demand, one at a time, through ``safetensors.safe_open`` (:meth:`read`,
    :meth:`read_rows`; :meth:`reading` keeps the files open for a block of reads).
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
        self._local = threading.local()  # safe_open handles of the current `reading()` block, per thread

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
    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Keep one ``safe_open`` handle per file for the reads of this block on this thread.

        Outside such a block every read opens (and checks) its file anew: one header parse per call.
        Inside it, the handles and so the file's memory map stay open until the block ends; pages
        touched through it count as the process's (file-backed, reclaimable) resident memory until
        then, which is why the loaders open one block per unit of work (a DiT block, a text-encoder
        layer). Nested blocks share the outer one's handles. Tensors read inside a block stay valid
        after it.
        """
        if getattr(self._local, "handles", None) is not None:
            yield
            return
        self._local.handles = {}
        try:
            yield
        finally:
            self._local.handles = None

    def _handle(self, file: Path) -> safe_open:
        handles = getattr(self._local, "handles", None)
        if handles is None:
            return open_safetensors(file)
        handle = handles.get(file)
        if handle is None:
            handle = handles[file] = open_safetensors(file)
        return handle

    def _view(self, key: str, aligned: bool = True) -> torch.Tensor:
        """The stored tensor as a zero-copy view of its file (F8_E8M0 as uint8 bytes); with ``aligned``,
        a tensor at a file offset that is not a multiple of its element size is copied instead."""
        info = self.info(key)
        if info.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.name}: tensor `{self.stored_key(key)}` has unsupported dtype {info.dtype}.")
        try:
            t = self._handle(info.file).get_tensor(info.key)
        except SafetensorError as e:
            raise CheckpointError(f"{info.file}: cannot read `{self.stored_key(key)}` ({e}).") from e
        if info.dtype == "F8_E8M0" and t.dtype != torch.uint8:
            t = t.view(torch.uint8)
        if aligned and t.data_ptr() % t.element_size():
            # safetensors does not align tensors in the file: a view at an odd offset is copied into
            # aligned memory (some kernels and devices require aligned elements)
            t = t.clone()
        return t

    def read(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """One tensor, cast to ``dtype`` and moved to ``device`` when given (else as stored).

        As stored on the CPU it is a zero-copy, copy-on-write view of the file's memory map (writes
        stay private to the process). The file must not be rewritten in place while the tensor
        lives: replacing it (a new file renamed over it) or deleting it is safe, rewriting the same
        inode shows the new bytes, and truncating it makes reads past the new end raise SIGBUS. A
        cast or moved tensor is a copy. F8_E8M0 tensors come back as uint8 exponent bytes.
        """
        t = self._view(key)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        if device is not None and t.device != torch.device(device):
            t = t.to(device)
        return t

    def read_rows(self, key: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of a 2-D tensor, touching only those rows' pages (e.g. embedding lookups).

        ``index``: LongTensor of any shape -> a copy of shape ``index.shape + (cols,)``.
        """
        shape = self.shape(key)
        if len(shape) != 2:
            raise ValueError(f"{self.name}: `{self.stored_key(key)}` is not 2-D.")
        flat = index.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= shape[0]):
            raise IndexError(f"{self.name}: row index out of range for `{self.stored_key(key)}` with {shape[0]} rows.")
        # the rows are copied out anyway: no aligned copy of the whole table first
        return self._view(key, aligned=False).index_select(0, flat).reshape(*index.shape, shape[1])


def read_tensor_from_file(path: str | os.PathLike, key: str) -> torch.Tensor:
    """One tensor of a single safetensors file, by its stored key (reads that tensor's bytes only)."""
    handle = open_safetensors(path)
    if key not in handle.keys():
        raise KeyError(f"{path}: no tensor `{key}`.")
    return handle.get_tensor(key)


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
        files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (*SAFETENSORS_SUFFIXES, ".json"))
        return file_identity(files, str(p)) if files else (str(p), 0, 0)
    return file_identity([p], str(p))


#: ``<stem>-0000k-of-0000n.safetensors``: shard k of a set of n (the Hugging Face naming).
_SHARD_RE = re.compile(r"^.+-(?P<index>\d{5})-of-\d{5}\.safetensors$")


def checkpoint_identity(path: str | os.PathLike) -> tuple:
    """Identity (path, bytes, newest mtime) of the checkpoint at ``path``, for reload checks and
    feature caches: :func:`path_identity` of the file or folder, and for one shard of a
    ``-0000k-of-0000n`` set that of its folder (the loaders read the whole set)."""
    if _SHARD_RE.match(os.path.basename(path)):
        path = os.path.dirname(path)
    return path_identity(path)


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Stored bytes of the weights at ``path``: a file's size (0 when it is missing), or the sum
    over every ``.safetensors`` file below a folder."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(folder, f))
                   for folder, _, files in os.walk(path) for f in files if f.endswith(".safetensors"))
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _is_diffusers_folder(path: str, component: str) -> bool:
    """A diffusers pipeline root (``<sub-folder>/config.json``) or component folder (``config.json``
    beside safetensors files)."""
    if os.path.isfile(os.path.join(path, DIFFUSERS_SUBFOLDERS[component], "config.json")):
        return True
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    try:
        return any(n.endswith(".safetensors") for n in os.listdir(path))
    except OSError:
        return False


def list_checkpoints(files: Iterable[str], roots: Iterable[str], component: str) -> list[str]:
    """The entries of a model picker for ``component`` (``"dit"``, ``"te"``, ``"vae"``).

    ``roots``: the model folders; ``files``: the files in them, as names relative to a root. Returns
    one ``<folder>/`` entry per diffusers folder directly inside a root (sorted), then the sorted
    files, leaving out GGUF and JSON files, files inside those folders and every shard after the
    first of a ``-0000k-of-0000n`` set (the first stands for the set).
    """
    folders: set[str] = set()
    for root in roots:
        try:
            entries = list(os.scandir(root))  # the folder set is sorted at the end
        except OSError:
            continue
        for entry in entries:
            if (entry.is_dir(follow_symlinks=True) and not entry.name.startswith(".")
                    and _is_diffusers_folder(entry.path, component)):
                folders.add(entry.name + "/")
    kept = []
    for name in files:
        rel = name.replace("\\", "/")
        if name.endswith((".gguf", ".json")) or any(rel.startswith(d) for d in folders):
            continue
        shard = _SHARD_RE.match(os.path.basename(rel))
        if shard and int(shard.group("index")) > 1:
            continue
        kept.append(name)
    return sorted(folders) + sorted(kept)


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
