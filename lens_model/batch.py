"""Batch text-to-image over a prompts file, in this process or on a Ray cluster.

    python -m lens_model.batch prompts.jsonl --out images/            # in-process
    python -m lens_model.batch prompts.jsonl --out images/ --ray auto  # on Ray Data (optional extra)

Input: JSONL (one object a line) or Parquet (``pyarrow`` needed) rows with ``prompt`` and optional
``id``, ``negative``, ``seed``, ``width``, ``height``, ``steps``, ``cfg``, ``variant`` and ``lora``.
Missing values take the command-line tool's defaults (seed 0, 1:1 at base 1024 on the CPU / 1440 on
CUDA, steps and CFG from the variant). A bad row is reported with its line number and skipped; the
other rows still run.

Stages (each model is loaded once per process or Ray actor, never per image):

1. **encode** every unique text (prompts, and negatives where CFG ≠ 1) once. Features are stored as
   safetensors files in a feature cache keyed by the text encoder file's identity, its dtype and
   device, the template date and the text (:mod:`lens_model.feature_cache`), so a rerun or another
   job over the same prompts does not encode again;
2. **sample** with the DiT, rows grouped by (size, steps, CFG) into batches of ``--dit-batch``
   (each image sampled on its own, see :class:`DiTStage`);
3. **decode** with the VAE and write ``<id>.png`` plus one manifest record per image
   (``manifest.jsonl``, and ``manifest.parquet`` when pyarrow is installed): id, file, sha256,
   every parameter and the seconds each stage spent on the row.

``--out`` is a local folder or a URI of any filesystem ``pyarrow.fs`` supports (``s3://``,
``gs://``, ``file://`` …): images, manifest, resume check and the default feature cache go through
:class:`lens_model.batch_store.OutputStore`.

Every PNG is byte-identical to what ``python -m lens_model.cli`` writes for the same parameters: the
noise, schedule, sampler, decoder, uint8 conversion and PNG metadata are the pipeline's and the
command-line tool's own functions. A rerun skips the ids whose manifest record has the same
parameters and whose file is still there (recorded size; on a local disk also the sha256).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from . import cli
from .batch_store import OutputStore
from .checkpoints import checkpoint_identity
from .constants import DEFAULT_DATE, VARIANT_DEFAULTS
from .dit_loading import load_transformer
from .feature_cache import FeatureFolder, PromptFeatures
from .lora import parse_lora_arg
from .ops import release_free_memory
from .pipeline import (
    check_generation_options, default_device, encode_prompts, generate_from_features, to_pil,
    variant_defaults,
)
from .resolution import BASES, default_base, resolution_for, validate_size
from .sampling import NOISE_LAYOUTS
from .text_encoder import load_text_encoder, resolve_dtype
from .vae_loading import load_vae

logger = logging.getLogger(__name__)

ROW_FIELDS = ("id", "prompt", "negative", "seed", "width", "height", "steps", "cfg", "variant",
              "lora")
"""Columns a prompts file may have (``prompt`` is required)."""

JOB_FIELDS = ("model", "text_encoder", "vae", "noise_layout", "mu", "date", "dtype")
"""Job-wide settings recorded with every image; together with the row's parameters they decide the
image, so a resumed job compares them too."""

STAGE_FIELDS = ("encode_s", "dit_s", "vae_s", "write_s")
"""Seconds each stage spent on the row, in a manifest record (``encode_s``: encoding its texts
that no earlier row had needed; 0 when they were cached)."""

ROW_OPTION_NAMES = {"steps": "steps", "guidance_scale": "cfg", "seed": "seed"}
"""How range errors name a row's columns (keys of :data:`lens_model.pipeline.PYTHON_NAMES`)."""

MANIFEST_JSONL = "manifest.jsonl"
MANIFEST_PARQUET = "manifest.parquet"
FEATURE_FOLDER = ".lens_features"
"""Default feature cache: this folder in the output folder."""
_SAFE_ID = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class BatchError(Exception):
    """A user-facing error of the batch command (bad file, bad option): exit status 2."""


# ------------------------------------------------------------------------------------------ rows

@dataclass(frozen=True)
class BatchRow:
    """One image to make. ``line`` is the 1-based line (JSONL) or row number (Parquet)."""

    id: str
    prompt: str
    negative: str
    seed: int
    width: int
    height: int
    steps: int
    cfg: float
    variant: str
    lora: Optional[str]  # the row's ``--lora`` values as a compact JSON list, or None
    line: int = 0

    def params(self) -> dict:
        """The row's parameters as stored in the manifest (no id, no line)."""
        d = asdict(self)
        del d["id"], d["line"]
        return d

    @property
    def size_key(self) -> tuple:
        """Rows with the same key can share one DiT batch."""
        return (self.width, self.height, self.steps, self.cfg)


@dataclass(frozen=True)
class RowDefaults:
    """Job-wide defaults a row falls back on (those of ``python -m lens_model.cli``)."""

    variant: str = "turbo"
    width: int = 1024
    height: int = 1024
    seed: int = 0


@dataclass(frozen=True)
class RowError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def int_field(raw: dict, name: str, default: Optional[int], minimum: int) -> Optional[int]:
    """``raw[name]`` as an int >= ``minimum`` (a float with an integer value is accepted: Parquet
    and pandas turn integer columns with gaps into floats); ``default`` when absent or null."""
    value = raw.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def str_field(raw: dict, name: str, default: Optional[str]) -> Optional[str]:
    """``raw[name]`` as a string; ``default`` when absent or null."""
    value = raw.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    return value


def row_id(raw_id: Any, params: dict) -> str:
    """A row's id: its ``id`` column checked (:func:`check_id`), or without one ``p`` + 16 hex
    digits of ``params`` (stable across reruns and edits of other lines)."""
    if raw_id is None:
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8")).hexdigest()
        return "p" + digest[:16]
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise ValueError(f"id must be a string or an integer, got {raw_id!r}")
    rid = str(raw_id)
    return check_id(rid)


def check_id(rid: str) -> str:
    """``rid`` if it can name an output file, else ValueError."""
    if not rid or len(rid) > 128 or not set(rid) <= _SAFE_ID or rid.startswith("."):
        raise ValueError(f"id {rid!r} must be 1-128 characters of A-Z a-z 0-9 . _ - (it names the "
                         "image file) and not start with '.'")
    return rid


def parse_lora_column(value: Any) -> Optional[str]:
    """A row's ``lora``: ``"FILE[:STRENGTH]"`` or a list of them (the command-line tool's
    ``--lora`` values) -> the list as compact JSON, or None. Each file must exist."""
    if value is None or value == [] or value == "":
        return None
    specs = [value] if isinstance(value, str) else value
    if not isinstance(specs, list) or not all(isinstance(x, str) and x for x in specs):
        raise ValueError(f"lora must be \"FILE[:STRENGTH]\" or a list of them, got {value!r}")
    for spec in specs:
        path, _ = parse_lora_arg(spec)
        if not Path(path).expanduser().is_file():
            raise ValueError(f"lora {spec!r}: {path!r} does not exist")
    return json.dumps(specs, separators=(",", ":"))


def lora_specs(row: BatchRow) -> list[str]:
    """The row's ``--lora`` values (empty without LoRA)."""
    return json.loads(row.lora) if row.lora else []


def check_row_loras(rows: Sequence[BatchRow], dit_config) -> tuple[list[BatchRow], list[RowError]]:
    """Read each distinct LoRA set once and check it against the DiT configuration (from the
    header); rows whose LoRA is unreadable or does not fit become errors, before any model runs."""
    verdict: dict[str, Optional[str]] = {}
    good, errors = [], []
    for row in rows:
        if row.lora and row.lora not in verdict:
            try:
                cli.check_loras_fit(cli.read_loras(lora_specs(row)), dit_config)
                verdict[row.lora] = None
            except cli.CliError as e:
                verdict[row.lora] = str(e)
        problem = verdict.get(row.lora) if row.lora else None
        if problem:
            errors.append(RowError(row.line, problem))
        else:
            good.append(row)
    return good, errors


def parse_row(raw: Any, line: int, defaults: RowDefaults) -> BatchRow:
    """Validate one input row (a dict) and fill in the defaults; raises ValueError saying what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"a row must be an object, got {type(raw).__name__}")
    prompt = str_field(raw, "prompt", None)
    if prompt is None:
        raise ValueError("no 'prompt'")
    variant = str_field(raw, "variant", defaults.variant)
    if variant not in VARIANT_DEFAULTS:
        raise ValueError(f"variant must be one of {sorted(VARIANT_DEFAULTS)}, got {variant!r}")
    vdef = VARIANT_DEFAULTS[variant]
    if (raw.get("width") is None) != (raw.get("height") is None):
        raise ValueError("give both width and height, or neither")
    width = int_field(raw, "width", defaults.width, 1)
    height = int_field(raw, "height", defaults.height, 1)
    width, height = validate_size(width, height)
    cfg = raw.get("cfg")
    if cfg is None:
        cfg = vdef["cfg"]
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not cfg == cfg:
        raise ValueError(f"cfg must be a number, got {cfg!r}")
    lora = parse_lora_column(raw.get("lora"))
    params = dict(prompt=prompt, negative=str_field(raw, "negative", ""),
                  seed=int_field(raw, "seed", defaults.seed, 0), width=width, height=height,
                  steps=int_field(raw, "steps", vdef["steps"], 1), cfg=float(cfg),
                  variant=variant, lora=lora)
    # the command-line tool's ranges (steps 1..200, finite cfg 0..100, seed 0..2**64-1)
    check_generation_options(steps=params["steps"], guidance=params["cfg"], seed=params["seed"],
                             names=ROW_OPTION_NAMES)
    return BatchRow(id=row_id(raw.get("id"), params), line=line, **params)


def read_raw_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded row or a ValueError) for every non-blank line / Parquet row."""
    if path.suffix.lower() in (".parquet", ".pq"):
        try:  # pyarrow is an optional extra: imported only when a Parquet file is read
            import pyarrow.parquet as pq
        except ImportError as e:
            raise BatchError(f"{path} is Parquet: install pyarrow (pip install pyarrow), or give "
                             "a JSONL file") from e
        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    with open(path, encoding="utf-8") as f:
        for i, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield i, json.loads(text)
            except json.JSONDecodeError as e:
                yield i, ValueError(f"not valid JSON ({e.msg} at column {e.colno})")


def read_rows(path: str | os.PathLike, parse: Callable[[Any, int], Any]) -> tuple[list, list[RowError]]:
    """Read a prompts file with ``parse(raw_row, line)`` (which returns a row with ``id``, ``line``
    and ``params()``, or raises ValueError saying what is wrong). Returns the good rows in file
    order and the bad ones; a second row with an id already used is a bad row. The one reader of
    both the batch job and the multi-server client."""
    path = Path(path)
    if not path.is_file():
        raise BatchError(f"prompts file {str(path)!r} does not exist")
    rows: list = []
    errors: list[RowError] = []
    seen: dict[str, Any] = {}
    for line, raw in read_raw_rows(path):
        try:
            if isinstance(raw, Exception):
                raise raw
            row = parse(raw, line)
        except ValueError as e:
            errors.append(RowError(line, str(e)))
            continue
        first = seen.get(row.id)
        if first is not None:
            same = first.params() == row.params()
            errors.append(RowError(line, f"id {row.id!r} already used on line {first.line}"
                                   + (" (same parameters: skipped)" if same else "")))
            continue
        seen[row.id] = row
        rows.append(row)
    return rows, errors


def load_rows(path: str | os.PathLike, defaults: RowDefaults) -> tuple[list[BatchRow], list[RowError]]:
    """Read and validate a batch prompts file (:func:`parse_row` with ``defaults``). Returns the
    good rows in file order and the bad ones; unknown columns get one warning."""
    unknown: set[str] = set()

    def parse(raw: Any, line: int) -> BatchRow:
        row = parse_row(raw, line, defaults)
        unknown.update(k for k in raw if k not in ROW_FIELDS)
        return row

    rows, errors = read_rows(path, parse)
    if unknown:
        logger.warning("%s: columns %s are not used (known: %s)", path, sorted(unknown),
                       ", ".join(ROW_FIELDS))
    return rows, errors


# ----------------------------------------------------------------------------- texts

def texts_to_encode(rows: Iterable[BatchRow]) -> list[str]:
    """Unique texts the rows need, in first-use order: every prompt, and every non-empty negative of
    a row with CFG ≠ 1 (at CFG 1 the command-line tool does not encode the negative either)."""
    out: dict[str, None] = {}
    for r in rows:
        out.setdefault(r.prompt)
        if r.cfg != 1.0 and r.negative.strip():
            out.setdefault(r.negative)
    return list(out)


# --------------------------------------------------------------------------------------- stages

@dataclass(frozen=True)
class JobSettings:
    """What every stage of a job needs to know (picklable, so Ray actors receive it as is)."""

    transformer: str
    text_encoder: str
    vae: str
    out_dir: str                         # local folder or URI (OutputStore)
    cache_dir: Optional[str] = None      # local folder or URI; None: OUT/.lens_features
    device: str = "cpu"
    dtype: Optional[str] = None          # DiT compute dtype name (cli.DTYPES) or None = stored
    date: Optional[str] = None
    mu: Optional[float] = None
    noise_layout: str = "upstream"
    filesystem: Any = None               # a pyarrow FileSystem holding out_dir (else from its URI)

    def torch_dtype(self) -> Optional[torch.dtype]:
        return cli.DTYPES.get(self.dtype) if self.dtype else None

    def job_params(self) -> dict:
        return {"model": Path(self.transformer).name, "text_encoder": Path(self.text_encoder).name,
                "vae": Path(self.vae).name, "noise_layout": self.noise_layout, "mu": self.mu,
                "date": self.date, "dtype": self.dtype}

    def out_store(self) -> OutputStore:
        return OutputStore(self.out_dir, self.filesystem)

    def feature_cache(self) -> PromptFeatures:
        """The job's text-feature cache: a folder only (``cache_dir``, else ``OUT/.lens_features``),
        which every stage and Ray worker reads; features the text encoder computes with its
        default dtype on the job's device."""
        device = torch.device(self.device)
        store = OutputStore(self.cache_dir) if self.cache_dir else \
            self.out_store().child(FEATURE_FOLDER)
        return PromptFeatures(checkpoint_identity(self.text_encoder), resolve_dtype(None, device), device,
                              self.date, folder=FeatureFolder(store))


class EncodeStage:
    """Stage 1: encode texts missing from the feature cache (the text encoder loads on first need)."""

    def __init__(self, job: JobSettings):
        self.job = job
        self.cache = job.feature_cache()
        self._encoder = None

    def __call__(self, texts: Sequence[str]) -> dict[str, float]:
        """Encode and cache each text not cached yet; returns seconds spent per text encoded."""
        spent: dict[str, float] = {}
        for text in texts:
            if text in self.cache:
                continue
            if self._encoder is None:
                self._encoder = load_text_encoder(self.job.text_encoder,
                                                  device=torch.device(self.job.device))
            t0 = time.perf_counter()
            # one text per call, exactly as the command-line tool encodes a prompt or a negative
            ctx, mask, _, _ = encode_prompts(self._encoder, [text], need_negative=False,
                                             date=self.job.date)
            self.cache.put(text, ctx, mask)
            spent[text] = time.perf_counter() - t0
        return spent

    def close(self) -> None:
        """Release the text encoder (and hand its memory back) before the DiT loads."""
        if self._encoder is None:
            return
        self._encoder = None
        gc.collect()
        release_free_memory()
        if torch.device(self.job.device).type == "cuda":
            torch.cuda.empty_cache()


class DiTStage:
    """Stage 2: sample latents with a DiT loaded once.

    Each row is sampled on its own (a batch of one, as the command-line tool samples one image):
    a batched forward pass changes float results in the last bits (max |Δ| ≈ 5e-6 measured on the
    tiny model on a CPU), enough to flip PNG bytes, so grouping only decides how many rows one
    call (one Ray task) carries.
    """

    def __init__(self, job: JobSettings):
        self.job = job
        self.cache = job.feature_cache()
        self.transformer = load_transformer(job.transformer, dtype=job.torch_dtype(),
                                            device=torch.device(job.device))
        self._loras: dict[str, list] = {}  # row.lora -> [(LensLoRA, strength)], read once

    def loras(self, row: BatchRow) -> Optional[list]:
        """The row's LoRAs, read from their files on first use (None without LoRA)."""
        if not row.lora:
            return None
        if row.lora not in self._loras:
            self._loras[row.lora] = cli.read_loras(lora_specs(row))
        return self._loras[row.lora]

    def sample_row(self, row: BatchRow) -> torch.Tensor:
        """Latents ``[1, 128, h, w]`` float32 on the CPU for one row, from cached features."""
        ctx, mask = self.cache[row.prompt]
        nctx = nmask = None
        if row.cfg != 1.0 and row.negative.strip():
            nctx, nmask = self.cache[row.negative]
        return generate_from_features(
            ctx, mask, self.transformer, None, row.width, row.height, steps=row.steps,
            guidance=row.cfg, negative_context=nctx, negative_mask=nmask, seed=row.seed,
            mu=self.job.mu, noise_layout=self.job.noise_layout,
            device=torch.device(self.job.device), output_type="latent", lora=self.loras(row))

    def __call__(self, rows: Sequence[BatchRow]) -> tuple[list[torch.Tensor], list[float]]:
        """Latents ``[1, 128, h, w]`` of each row and the seconds each row took."""
        latents, seconds = [], []
        for row in rows:
            t0 = time.perf_counter()
            latents.append(self.sample_row(row))
            seconds.append(time.perf_counter() - t0)
        return latents, seconds


def png_metadata(row: BatchRow, job: JobSettings) -> dict:
    """The ``lens_generation`` metadata the command-line tool writes for this row."""
    meta = cli.generation_metadata(
        row.prompt, row.negative, row.seed, row.steps, row.cfg, row.width, row.height, row.variant,
        job.transformer, job.noise_layout, mu=job.mu, loras=list(map(parse_lora_arg, lora_specs(row))))
    meta["index"] = 0
    return meta


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DecodeStage:
    """Stage 3: decode latents with a VAE loaded once and write ``<id>.png`` files to the output
    folder (an :class:`~lens_model.batch_store.OutputStore`: local or any pyarrow filesystem)."""

    def __init__(self, job: JobSettings):
        self.job = job
        self.store = job.out_store()
        self.vae = load_vae(job.vae, device=torch.device(job.device))

    def __call__(self, rows: Sequence[BatchRow], latents: Sequence[torch.Tensor]) -> list[dict]:
        """Decode each row's latents ``[1, 128, h, w]`` and write its PNG; returns manifest records
        (``vae_s``/``write_s`` filled in)."""
        return [self.write(row, lat) for row, lat in zip(rows, latents)]

    def write(self, row: BatchRow, latents: torch.Tensor) -> dict:
        t0 = time.perf_counter()
        image = to_pil(self.vae.decode(latents, tile="auto"))[0]
        t1 = time.perf_counter()
        name = f"{row.id}.png"
        data = png_bytes(image, png_metadata(row, self.job))
        self.store.write(name, data)  # appears whole or not at all
        return dict(id=row.id, file=name, sha256=hashlib.sha256(data).hexdigest(),
                    bytes=len(data), **row.params(), **self.job.job_params(), vae_s=t1 - t0,
                    write_s=time.perf_counter() - t1)


def png_bytes(image, meta: dict) -> bytes:
    """The PNG file the command-line tool writes for ``image`` with metadata ``meta``, in memory
    (its own encoder settings and text chunks, so the bytes are the same)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=cli.png_info(meta))
    return buf.getvalue()


def group_rows(rows: Sequence[BatchRow], batch_size: int) -> list[list[BatchRow]]:
    """Split rows into DiT batches of at most ``batch_size`` rows sharing a size key (input order
    kept within a key; keys in order of first appearance)."""
    groups: dict[tuple, list[BatchRow]] = {}
    for r in rows:
        groups.setdefault(r.size_key, []).append(r)
    out = []
    for members in groups.values():
        out.extend(members[i:i + batch_size] for i in range(0, len(members), batch_size))
    return out


# ------------------------------------------------------------------------------------- manifest

class Manifest:
    """``manifest.jsonl`` in the output folder: one record per image (a later record for the same id
    replaces an earlier one). :meth:`finish` rewrites it compacted and writes ``manifest.parquet``
    when pyarrow is installed.

    ``out``: an :class:`~lens_model.batch_store.OutputStore`, a local folder or a URI. Where the
    filesystem can append (local disks, HDFS) each record is appended as its image is written;
    on an object store (no append) the whole file is written again (one PUT) at most every
    ``flush_every`` seconds and at the end, so a killed job loses at most that much of the
    manifest, and a rerun makes those images again (the same bytes).
    """

    def __init__(self, out: "OutputStore | str | os.PathLike", flush_every: float = 30.0):
        self.store = out if isinstance(out, OutputStore) else OutputStore(out)
        self.flush_every = flush_every
        self.records: dict[str, dict] = {}
        self._unsaved = False
        self._saved_at = time.monotonic()
        self._listing: Optional[dict[str, int]] = None
        data = self.store.read(MANIFEST_JSONL)
        for n, text in enumerate((data or b"").decode("utf-8").splitlines(), start=1):
            try:
                rec = json.loads(text)
                self.records[rec["id"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning("%s line %d is not a manifest record; ignored",
                               self.store.path(MANIFEST_JSONL), n)

    @property
    def path(self) -> str:
        """Where the manifest is (a filesystem path in the store)."""
        return self.store.path(MANIFEST_JSONL)

    def is_done(self, row: BatchRow, job_params: dict) -> bool:
        """True when ``row`` has a record with the same parameters and its file is intact."""
        return self.matches(row.id, dict(row.params(), **job_params))

    def matches(self, rid: str, params: dict) -> bool:
        """True when id ``rid`` has a record holding every item of ``params`` and its file is
        still there: with the recorded size (one listing of the folder, read once), and, on a local
        disk or for a record without a size, the recorded sha256."""
        rec = self.records.get(rid)
        if rec is None or any(rec.get(k) != v for k, v in params.items()):
            return False
        if self._listing is None:
            self._listing = self.store.sizes()
        name = rec.get("file") or ""
        size = self._listing.get(name)
        if size is None or (rec.get("bytes") is not None and size != rec["bytes"]):
            return False
        if rec.get("bytes") is None or self.store.local_path() is not None:
            return self.store.sha256(name) == rec.get("sha256")
        return True

    def add(self, record: dict) -> None:
        self.records[record["id"]] = record
        if self.store.append(MANIFEST_JSONL, json.dumps(record, ensure_ascii=False) + "\n"):
            return
        self._unsaved = True
        if time.monotonic() - self._saved_at >= self.flush_every:
            self._write_jsonl(list(self.records.values()))

    def _write_jsonl(self, records: Sequence[dict]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        self.store.write(MANIFEST_JSONL, text.encode("utf-8"))
        self._unsaved, self._saved_at = False, time.monotonic()

    def finish(self, order: Sequence[str], columns: Optional[Sequence[str]] = None) -> None:
        """Rewrite the JSONL compacted (records in ``order``, then the others) and write the
        Parquet twin with ``columns`` (default :func:`manifest_columns`) when pyarrow is there."""
        index = {rid: i for i, rid in enumerate(order)}
        recs = sorted(self.records.values(), key=lambda r: (index.get(r["id"], len(index)), r["id"]))
        if recs or self.store.size(MANIFEST_JSONL) is not None:
            self._write_jsonl(recs)
        try:  # pyarrow is an optional extra: without it there is no Parquet twin
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return
        if recs:
            columns = list(columns or manifest_columns())
            table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in recs])
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            self.store.write(MANIFEST_PARQUET, sink.getvalue().to_pybytes())


def manifest_columns() -> list[str]:
    """Columns of a manifest record, in order."""
    return ["id", "file", "sha256", "bytes", *(f for f in ROW_FIELDS if f != "id"), *JOB_FIELDS,
            *STAGE_FIELDS]


STAGE_WORKERS = {"encode_s": "encode", "dit_s": "dit", "vae_s": "vae", "write_s": "vae"}
"""Which pool of workers spends each stage-seconds column (the VAE actors also write the files)."""


class Progress:
    """Progress of a job on the log: rows done / total, images per minute and each stage's
    utilisation, the share of the wall time its workers were busy (the seconds the records
    report, summed, over wall time × that stage's workers; 100 % = never idle).

    A line is logged for the first image, then at most every ``interval`` seconds, and for the
    last one; :meth:`summary` gives the totals at the end. ``workers``: actors per stage name
    (``encode``, ``dit``, ``vae``; 1 each by default, as in-process).
    """

    def __init__(self, total: int, skipped: int, workers: Optional[dict[str, int]] = None,
                 interval: float = 10.0, clock=time.perf_counter):
        self.total, self.done, self.made = total, skipped, 0
        self.workers = {"encode": 1, "dit": 1, "vae": 1, **(workers or {})}
        self.interval, self.clock = interval, clock
        self.t0 = clock()
        self._logged_at: Optional[float] = None
        self.stage_s = dict.fromkeys(STAGE_FIELDS, 0.0)

    def add(self, record: dict) -> None:
        self.done += 1
        self.made += 1
        for k in self.stage_s:
            self.stage_s[k] += float(record.get(k) or 0.0)
        now = self.clock()
        if (self._logged_at is None or now - self._logged_at >= self.interval
                or self.done >= self.total):
            self._logged_at = now
            logger.info("%s", self.line())

    def utilisation(self) -> dict[str, float]:
        """Busy share of each stage-seconds column (0..1 when the workers count is right)."""
        wall = self.clock() - self.t0
        if wall <= 0:
            return dict.fromkeys(self.stage_s, 0.0)
        return {k: v / (wall * max(1, self.workers[STAGE_WORKERS[k]]))
                for k, v in self.stage_s.items()}

    def line(self) -> str:
        """``3/10 rows done, 2.5 images/min, busy: encode 4 %, dit 81 %, vae 12 %, write 1 %``"""
        minutes = (self.clock() - self.t0) / 60.0
        rate = self.made / minutes if minutes > 0 else 0.0
        busy = ", ".join(f"{k[:-2]} {100.0 * u:.0f} %" for k, u in self.utilisation().items())
        return f"{self.done}/{self.total} rows done, {rate:.1f} images/min, busy: {busy}"

    def summary(self) -> str:
        wall = self.clock() - self.t0
        parts = ", ".join(f"{k[:-2]} {v:.1f} s ({100.0 * u:.0f} % busy)"
                          for (k, v), u in zip(self.stage_s.items(), self.utilisation().values()))
        return f"{self.made} image(s) in {wall:.1f} s; stage seconds summed over workers: {parts}"


# ------------------------------------------------------------------------------------ the runner

@dataclass
class BatchResult:
    """What a run did: ids written, ids skipped (already in the manifest), bad rows."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    encoded: int = 0


def plan(rows: Sequence[BatchRow], job: JobSettings) -> tuple[Manifest, list[BatchRow], list[str]]:
    """Open the manifest and split rows into those still to make and the ids already done."""
    store = job.out_store()
    store.makedirs()
    manifest = Manifest(store)
    jp = job.job_params()
    todo: list[BatchRow] = []
    done: list[str] = []
    for r in rows:
        if manifest.is_done(r, jp):
            done.append(r.id)
        else:
            todo.append(r)
    return manifest, todo, done


def run_in_process(rows: Sequence[BatchRow], job: JobSettings, dit_batch: int = 4,
                   progress_every: float = 10.0) -> BatchResult:
    """Run the three stages in this process (the job without Ray); a progress line at most every
    ``progress_every`` seconds (:class:`Progress`)."""
    manifest, todo, done = plan(rows, job)
    result = BatchResult(skipped=done)
    progress = Progress(len(rows), len(done), interval=progress_every)
    if todo:
        encoder = EncodeStage(job)
        spent = encoder(texts_to_encode(todo))
        encoder.close()
        result.encoded = len(spent)
        dit, decoder = DiTStage(job), DecodeStage(job)
        for group in group_rows(todo, dit_batch):
            latents, dit_seconds = dit(group)
            for row, dit_s, rec in zip(group, dit_seconds, decoder(group, latents)):
                rec.update(encode_s=encode_seconds(row, spent), dit_s=dit_s)
                manifest.add(rec)
                result.written.append(row.id)
                progress.add(rec)
        logger.info("%s", progress.summary())
    manifest.finish([r.id for r in rows])
    return result


def encode_seconds(row: BatchRow, unbilled: dict[str, float]) -> float:
    """Encode seconds charged to ``row``: those of its texts not charged to an earlier row yet
    (removed from ``unbilled``), so summing a manifest's ``encode_s`` gives the encode time."""
    seconds = unbilled.pop(row.prompt, 0.0)
    if row.cfg != 1.0:
        seconds += unbilled.pop(row.negative, 0.0)
    return seconds


# ------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lens_model.batch",
        description="Generate one PNG per row of a prompts file (JSONL or Parquet), in-process or "
                    "on Ray Data; resumable, with a manifest.",
        epilog="Row columns: prompt (required), id, negative, seed, width, height, steps, cfg, "
               "variant, lora. Model files as in python -m lens_model.cli.")
    p.add_argument("prompts", help="JSONL or Parquet (.parquet) prompts file")
    p.add_argument("--out", required=True,
                   help="output folder (PNGs and manifest.jsonl): a local path or a URI pyarrow "
                        "opens (s3://bucket/run, gs://…, file:///…)")
    p.add_argument("--variant", choices=tuple(VARIANT_DEFAULTS),
                   help="default variant of rows without one (default: from the --transformer "
                        "file name, else turbo)")
    p.add_argument("--base", type=int, choices=BASES, default=None,
                   help="default 1:1 size of rows without width/height (default 1024 on CPU, "
                        "1440 on CUDA)")
    p.add_argument("--mu", type=float, default=None, help="override the schedule shift mu")
    p.add_argument("--noise-layout", choices=NOISE_LAYOUTS, default="upstream",
                   help="noise draw layout (as in the command-line tool)")
    p.add_argument("--date", default=None, help=f"template date (default {DEFAULT_DATE})")
    p.add_argument("--feature-cache", default=None,
                   help="text-feature cache folder, a local path or a URI (default "
                        "OUT/.lens_features); share it between jobs to encode a prompt only once")
    p.add_argument("--dit-batch", type=int, default=4,
                   help="rows of one size handed to the DiT stage at once (default 4; each image "
                        "is still sampled on its own, so the files do not depend on it)")
    files = p.add_argument_group("model files (as python -m lens_model.cli)")
    files.add_argument("--transformer")
    files.add_argument("--text-encoder")
    files.add_argument("--vae")
    files.add_argument("--models-dir")
    files.add_argument("--no-download", action="store_true")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="compute device (default: cuda if available)")
    p.add_argument("--dtype", choices=tuple(cli.DTYPES), default=None,
                   help="DiT compute dtype (default: the stored dtype)")
    ray = p.add_argument_group("Ray Data (pip install 'lens-nodes[batch]')")
    ray.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                     help="run the stages as Ray Data actor pools: 'auto' joins the running "
                          "cluster, 'local' starts one here, else a cluster address")
    for stage, gpus in (("encode", "1 on CUDA"), ("dit", "1 on CUDA"), ("vae", "0.25 on CUDA")):
        ray.add_argument(f"--{stage}-workers", type=int, default=1,
                         help=f"{stage} actors (default 1)")
        ray.add_argument(f"--{stage}-gpus", type=float, default=None,
                         help=f"GPUs per {stage} actor (default {gpus}, else 0)")
        ray.add_argument(f"--{stage}-cpus", type=float, default=1.0,
                         help=f"CPUs per {stage} actor (default 1)")
        ray.add_argument(f"--{stage}-memory", type=float, default=None, metavar="GB",
                         help=f"memory to reserve per {stage} actor in GB")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                   help="log rows done / total, images per minute and each stage's utilisation "
                        "at most this often (default 10; also for the first and last image)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def job_from_args(args: argparse.Namespace) -> tuple[JobSettings, RowDefaults, Any]:
    """Resolve files, device and defaults as ``python -m lens_model.cli`` does (same file search,
    header checks before anything loads, variant from ``--variant`` or the DiT's file name).
    Returns the job, the row defaults and the DiT configuration read from its header."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BatchError("--device cuda was requested but CUDA is not available")
    device = torch.device(args.device) if args.device else default_device()
    if args.dit_batch < 1:
        raise BatchError(f"--dit-batch must be >= 1, got {args.dit_batch}")
    if not args.progress_every >= 0:  # also NaN
        raise BatchError(f"--progress-every must be >= 0 seconds, got {args.progress_every}")
    try:
        check_generation_options(mu=args.mu, names={"mu": "--mu"})
    except ValueError as e:
        raise BatchError(str(e)) from None
    width, height = resolution_for(args.base or default_base(device), "1:1")
    try:
        local = cli.find_local_files(args)
        found = cli.check_files(local)  # headers only: wrong files are reported before any run
        if args.variant:
            variant = args.variant
        elif local["transformer"] is not None:
            variant = variant_defaults(local["transformer"])["variant"]
        else:
            variant = "turbo"
        files = cli.download_missing(args, local, variant)
        if any(local[k] is None for k in files):
            found = cli.check_files(files)
    except cli.CliError as e:
        raise BatchError(str(e)) from None
    job = JobSettings(transformer=str(files["transformer"]), text_encoder=str(files["text_encoder"]),
                      vae=str(files["vae"]), out_dir=_location(args.out, "--out"),
                      cache_dir=_location(args.feature_cache, "--feature-cache")
                      if args.feature_cache else None,
                      device=device.type, dtype=args.dtype, date=args.date, mu=args.mu,
                      noise_layout=args.noise_layout)
    return job, RowDefaults(variant=variant, width=width, height=height), found.transformer


def _location(text: str, option: str) -> str:
    """A URI as given, a local path made absolute (Ray workers may run elsewhere); checked by
    opening its filesystem (nothing is created), BatchError naming ``option`` when that fails."""
    location = text if "://" in text else str(Path(text).expanduser().resolve())
    try:
        OutputStore(location)
    except ValueError as e:
        raise BatchError(f"{option} {e}") from None
    return location


def _ray_available(address: str) -> bool:
    """Whether ray can be imported. Without it, ``--ray auto`` / ``--ray local`` run the same job
    in-process (same files) with a warning; a cluster address is an error."""
    try:  # ray is an optional extra: this import only asks whether it is installed
        import ray  # noqa: F401
    except ImportError:
        if address in ("auto", "local"):
            logger.warning("--ray %s: ray is not installed (pip install 'lens-nodes[batch]'); "
                           "running in-process instead (same files)", address)
            return False
        raise BatchError(f"--ray {address}: ray is not installed; pip install 'lens-nodes[batch]' "
                         "(or -r requirements-batch.txt)") from None
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        job, defaults, dit_config = job_from_args(args)
        rows, errors = load_rows(args.prompts, defaults)
        rows, lora_errors = check_row_loras(rows, dit_config)
        errors = sorted(errors + lora_errors, key=lambda e: e.line)
        for err in errors:
            print(f"lens-batch: {args.prompts}: {err}", file=sys.stderr)
        if args.ray and _ray_available(args.ray):
            # batch_ray builds on this module's stages (it imports this module): a cycle at the top
            from .batch_ray import RayOptions, run_on_ray

            result = run_on_ray(rows, job, RayOptions.from_args(args), dit_batch=args.dit_batch,
                                progress_every=args.progress_every)
        else:
            result = run_in_process(rows, job, dit_batch=args.dit_batch,
                                    progress_every=args.progress_every)
    except KeyboardInterrupt:  # images written so far are whole and in the manifest: rerun resumes
        print("interrupted", file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    except BatchError as e:
        print(f"lens-batch: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"lens-batch: error: {e}", file=sys.stderr)
        return 1
    result.errors = errors
    logger.info("%d image(s) written, %d already done, %d bad row(s); manifest %s",
                len(result.written), len(result.skipped), len(errors),
                job.out_store().path(MANIFEST_JSONL))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
