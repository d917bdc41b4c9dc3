"""The batch job's stages as Ray Data operators over actor pools (``--ray``; optional extra).

Graph (the same on one CPU machine and on a GPU cluster; only the per-stage resources change)::

    unique missing texts ──map_batches(EncodeActor pool)──> feature cache (files)
    rows sorted by size ──map_batches(DiTActor pool)──> latents ──map_batches(DecodeActor pool)──> PNG + record

The encode stage runs first and fills the feature cache; the DiT actors read their rows' features
from it, so the cache folder (and the output folder) must be visible to every node: a local disk
on one machine, a shared filesystem or an object-store URI (``s3://…``, through ``pyarrow.fs``) on
a cluster. The driver appends each record to the manifest as
it arrives. Ray restarts a killed actor (``max_restarts``) and re-runs the batch it held
(``max_task_retries``); a re-run writes the same bytes, because every stage is deterministic per row.

Ray is imported only here, and only when ``--ray`` is given.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from .batch import (
    BatchResult, BatchRow, DecodeStage, DiTStage, EncodeStage, JobSettings, Progress,
    encode_seconds, group_rows, plan, texts_to_encode,
)
from .constants import LATENT_CELL_PIXELS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageResources:
    """Actors and per-actor resources of one stage (Ray's ``num_gpus``/``num_cpus``/``memory``)."""

    workers: int = 1
    gpus: Optional[float] = None   # None: ``default_gpus`` on a CUDA job, else 0
    cpus: float = 1.0
    memory_gb: Optional[float] = None

    def remote_args(self, cuda: bool, default_gpus: float) -> dict:
        gpus = self.gpus if self.gpus is not None else (default_gpus if cuda else 0.0)
        out = {"concurrency": self.workers, "num_cpus": self.cpus, "num_gpus": gpus}
        if self.memory_gb:
            out["memory"] = int(self.memory_gb * 2 ** 30)
        return out


@dataclass(frozen=True)
class RayOptions:
    """``address``: "auto" (join the running cluster), "local" (start one here) or a cluster
    address. ``fault_marker`` is for tests: the first DiT call that creates this file kills its
    own worker process."""

    address: str = "local"
    encode: StageResources = field(default_factory=StageResources)
    dit: StageResources = field(default_factory=StageResources)
    vae: StageResources = field(default_factory=StageResources)
    max_restarts: int = 3
    fault_marker: Optional[str] = None

    @classmethod
    def from_args(cls, args) -> "RayOptions":
        def stage(name: str) -> StageResources:
            return StageResources(workers=getattr(args, f"{name}_workers"),
                                  gpus=getattr(args, f"{name}_gpus"),
                                  cpus=getattr(args, f"{name}_cpus"),
                                  memory_gb=getattr(args, f"{name}_memory"))

        return cls(address=args.ray, encode=stage("encode"), dit=stage("dit"), vae=stage("vae"))


def connect(address: str) -> None:
    """Start or join Ray unless this process is connected already."""
    import ray  # an optional extra: imported only when a job runs on Ray

    if ray.is_initialized():
        return
    if address == "local":
        ray.init(include_dashboard=False)
    else:
        ray.init(address=address)  # "auto" or "ray://…" / "host:port"


def _rows_column(batch: dict) -> list[BatchRow]:
    return [BatchRow(**json.loads(text)) for text in batch["row"]]


class EncodeActor:
    """Ray actor around :class:`lens_model.batch.EncodeStage` (one text encoder per actor)."""

    def __init__(self, job: JobSettings):
        self.stage = EncodeStage(job)

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch["text"]]
        spent = self.stage(texts)
        return {"text": np.array(texts, dtype=object),
                "encode_s": np.array([spent.get(t, 0.0) for t in texts], dtype=np.float64)}


class DiTActor:
    """Ray actor around :class:`lens_model.batch.DiTStage` (one DiT per actor)."""

    def __init__(self, job: JobSettings, fault_marker: Optional[str] = None):
        self.stage = DiTStage(job)
        self.fault_marker = fault_marker

    def _maybe_fail(self) -> None:
        if not self.fault_marker:
            return
        try:
            os.close(os.open(self.fault_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        logger.warning("fault_marker: killing this worker (pid %d) for a test", os.getpid())
        os._exit(1)

    def __call__(self, batch: dict) -> dict:
        rows = _rows_column(batch)
        self._maybe_fail()
        latents, seconds = self.stage(rows)
        return {"row": batch["row"],
                "latents": np.array([lat.numpy().tobytes() for lat in latents], dtype=object),
                "dit_s": np.array(seconds, dtype=np.float64)}


class DecodeActor:
    """Ray actor around :class:`lens_model.batch.DecodeStage` (one VAE per actor); writes PNGs."""

    def __init__(self, job: JobSettings):
        self.stage = DecodeStage(job)

    def __call__(self, batch: dict) -> dict:
        rows = _rows_column(batch)
        records = []
        for row, blob, dit_s in zip(rows, batch["latents"], batch["dit_s"]):
            lat = torch.frombuffer(bytearray(blob), dtype=torch.float32)
            lat = lat.view(1, -1, row.height // LATENT_CELL_PIXELS, row.width // LATENT_CELL_PIXELS)
            rec = self.stage.write(row, lat)
            rec["dit_s"] = float(dit_s)
            records.append(json.dumps(rec))
        return {"record": np.array(records, dtype=object)}


def _encode_on_ray(texts: Sequence[str], job: JobSettings, opts: RayOptions, cuda: bool) -> dict:
    import ray  # an optional extra: imported only when a job runs on Ray

    if not texts:
        return {}
    ds = ray.data.from_items([{"text": t} for t in texts])
    ds = ds.map_batches(EncodeActor, fn_constructor_args=(job,), batch_size=1,
                        max_restarts=opts.max_restarts, max_task_retries=-1,
                        **opts.encode.remote_args(cuda, 1.0))
    return {row["text"]: float(row["encode_s"]) for row in ds.iter_rows()}


def run_on_ray(rows: Sequence[BatchRow], job: JobSettings, opts: RayOptions,
               dit_batch: int = 4, progress_every: float = 10.0) -> BatchResult:
    """Run the job's three stages on Ray Data; writes the same files as :func:`run_in_process`.
    Progress lines (:class:`lens_model.batch.Progress`) come from the stage seconds the actors
    report in each record, over the actors of each stage."""
    import ray  # an optional extra: imported only when a job runs on Ray

    connect(opts.address)
    manifest, todo, done = plan(rows, job)
    result = BatchResult(skipped=done)
    progress = Progress(len(rows), len(done), interval=progress_every,
                        workers={"encode": opts.encode.workers, "dit": opts.dit.workers,
                                 "vae": opts.vae.workers})
    cuda = job.device == "cuda"
    if todo:
        cache = job.feature_cache()
        missing = [t for t in texts_to_encode(todo) if t not in cache]
        t0 = time.perf_counter()
        spent = _encode_on_ray(missing, job, opts, cuda)
        logger.info("encoded %d text(s) on Ray in %.1f s", len(spent), time.perf_counter() - t0)
        result.encoded = len(spent)
        ordered = [r for g in group_rows(todo, dit_batch) for r in g]
        by_id = {r.id: r for r in ordered}
        ds = ray.data.from_items([{"row": json.dumps(asdict(r))} for r in ordered])
        ds = ds.map_batches(DiTActor, fn_constructor_args=(job, opts.fault_marker),
                            batch_size=dit_batch, max_restarts=opts.max_restarts,
                            max_task_retries=-1, **opts.dit.remote_args(cuda, 1.0))
        ds = ds.map_batches(DecodeActor, fn_constructor_args=(job,), batch_size=dit_batch,
                            max_restarts=opts.max_restarts, max_task_retries=-1,
                            **opts.vae.remote_args(cuda, 0.25))
        for item in ds.iter_rows():
            rec = json.loads(item["record"])
            rec["encode_s"] = encode_seconds(by_id[rec["id"]], spent)
            manifest.add(rec)
            result.written.append(rec["id"])
            progress.add(rec)
        logger.info("%s", progress.summary())
    manifest.finish([r.id for r in rows])
    return result
