"""One prompts file over several ComfyUI servers (``python -m lens_model.client --prompts FILE``).

Each row of a JSONL / Parquet prompts file (the batch job's columns, read by
:func:`lens_model.batch.read_rows`) becomes one API prompt: the workflow with the command line's
overrides, then the row's values. :class:`ServerPool` queues each on the live server with the
shortest queue (``GET /queue``), follows it on its own client (websocket or polling), and queues it
again on another server when its server fails or loses it. The images are saved as ``<id>.png``
with the batch job's manifest (:class:`lens_model.batch.Manifest`), so a rerun skips the rows
already done. Ctrl-C cancels every prompt this run queued, on every server.

One server is :class:`~lens_model.client_server.ComfyClient`, the overrides are
:mod:`lens_model.client_workflow`; the command line (:func:`lens_model.client.main`) hands
``--prompts`` runs to :func:`main_many`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue as queue_mod
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import batch as batch_rows
from .client_server import (
    DEFAULT_TIMEOUT, ClientError, ComfyClient, ExecutionFailed, ServerUnreachable, WaitTimeout,
)
from .client_workflow import apply_overrides, check_api_prompt, load_workflow
from .constants import SIZE_MULTIPLE

logger = logging.getLogger(__name__)

PROMPT_COLUMNS = ("id", "prompt", "negative", "seed", "width", "height", "steps", "cfg")
"""Prompts-file columns the client applies (``variant`` and ``lora`` belong to the workflow)."""

MANY_COLUMNS = ("id", "file", "sha256", "bytes", "prompt", "negative", "seed", "width", "height", "steps",
                "cfg", "workflow", "server", "prompt_id", "seconds")
"""Manifest columns of a multi-server run."""


@dataclass(frozen=True)
class PromptRow:
    """One prompts-file row: its id, line and the overrides it sets (absent columns keep the
    workflow's values)."""

    id: str
    line: int
    prompt: str
    negative: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg: float | None = None

    def params(self) -> dict:
        return {k: getattr(self, k) for k in PROMPT_COLUMNS if k != "id"}


def parse_prompt_row(raw: Any, line: int) -> PromptRow:
    """Validate one prompts-file row (ValueError says what is wrong)."""
    if not isinstance(raw, dict):
        raise ValueError(f"a row must be an object, got {type(raw).__name__}")
    prompt = batch_rows.str_field(raw, "prompt", None)
    if prompt is None:
        raise ValueError("no 'prompt'")
    cfg = raw.get("cfg")
    if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, (int, float))):
        raise ValueError(f"cfg must be a number, got {cfg!r}")
    values = dict(prompt=prompt, negative=batch_rows.str_field(raw, "negative", None),
                  seed=batch_rows.int_field(raw, "seed", None, 0),
                  width=batch_rows.int_field(raw, "width", None, SIZE_MULTIPLE),
                  height=batch_rows.int_field(raw, "height", None, SIZE_MULTIPLE),
                  steps=batch_rows.int_field(raw, "steps", None, 1),
                  cfg=None if cfg is None else float(cfg))
    return PromptRow(id=batch_rows.row_id(raw.get("id"), values), line=line, **values)


def load_prompt_rows(path: str | os.PathLike, template: Mapping | None = None,
                     base: Mapping | None = None) -> tuple[list[PromptRow], list[str]]:
    """Read a JSONL / Parquet prompts file; returns the good rows and ``"line N: why"`` for the
    bad ones. With ``template`` each row's overrides (after ``base``, the command line's) are tried
    on it, so a row the workflow cannot take is reported here, before anything is queued."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--prompts {str(path)!r} does not exist")

    def parse(raw: Any, line: int) -> PromptRow:
        row = parse_prompt_row(raw, line)
        if template is not None:
            prompt_for_row(template, row, base)
        return row

    try:
        rows, errors = batch_rows.read_rows(path, parse)
    except batch_rows.BatchError as e:  # a Parquet file without pyarrow
        raise ValueError(str(e)) from None
    return rows, [str(e) for e in errors]


def prompt_for_row(template: Mapping, row: PromptRow, base: Mapping | None = None) -> dict:
    """The API prompt for one row: the command line's overrides (``base``: keyword arguments of
    :func:`apply_overrides`), then the row's values."""
    kw = dict(base or {})
    for key, name in (("prompt", "prompt_text"), ("negative", "negative"), ("seed", "seed"),
                      ("width", "width"), ("height", "height"), ("steps", "steps"),
                      ("cfg", "cfg")):
        value = getattr(row, key)
        if value is not None:
            kw[name] = value
    return apply_overrides(template, **kw)


@dataclass
class _Attempt:
    row: PromptRow
    server: str
    client: "ComfyClient"
    prompt_id: str
    started: float


@dataclass
class ManyResult:
    """Outcome of :func:`run_many`: written files per row id, skipped ids, failed rows."""

    files: dict[str, list[Path]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, list[str]] = field(default_factory=dict)  # row id -> servers it went to
    failures: dict[str, int] = field(default_factory=dict)  # row id -> failed prompts (not servers)


class ServerPool:
    """Spreads prompts over several ComfyUI servers by queue length and follows each prompt on a
    thread of its own (its own client id and websocket). A server that fails (connection refused,
    reset, prompt vanished) is dropped and its prompts are queued again on the others."""

    def __init__(self, servers: Sequence[str], per_server: int = 2, retries: int = 2,
                 use_websocket: bool = True, poll_interval: float = 1.0,
                 prompt_timeout: float | None = DEFAULT_TIMEOUT):
        if not servers:
            raise ValueError("no ComfyUI server given (--server URL or --servers-file FILE)")
        if per_server < 1 or retries < 0:
            raise ValueError(f"--per-server must be >= 1 and --retries >= 0, got {per_server} "
                             f"and {retries}")
        self.probes = {ComfyClient(s).server: ComfyClient(s, use_websocket=False)
                       for s in servers}
        self.alive = list(self.probes)
        self.per_server, self.retries = per_server, retries
        self.use_websocket, self.poll_interval = use_websocket, poll_interval
        self.prompt_timeout = prompt_timeout
        self.in_flight: dict[str, _Attempt] = {}  # prompt id -> attempt
        self._done: "queue_mod.Queue[tuple[_Attempt, Any]]" = queue_mod.Queue()

    def drop(self, server: str, why: Exception) -> None:
        if server in self.alive:
            self.alive.remove(server)
            logger.warning("server %s dropped (%s); its prompts go to the other servers", server,
                           why)

    def load(self, server: str) -> int | None:
        """Prompts running or waiting on ``server`` (all clients), or None when it is down."""
        try:
            reply = self.probes[server]._get_json("/queue", timeout=10.0)
        except ServerUnreachable as e:
            self.drop(server, e)
            return None
        return len(reply.get("queue_running") or []) + len(reply.get("queue_pending") or [])

    def pick(self, avoid: Iterable[str]) -> str | None:
        """The alive server with room and the shortest queue, preferring those not in ``avoid``."""
        mine = {s: 0 for s in self.alive}
        for a in self.in_flight.values():
            if a.server in mine:
                mine[a.server] += 1
        free = [s for s in self.alive if mine[s] < self.per_server]
        avoid = set(avoid)
        fresh = [s for s in free if s not in avoid]
        loads = {s: self.load(s) for s in (fresh or free)}
        loads = {s: n for s, n in loads.items() if n is not None}
        if not loads:
            return None
        return min(loads, key=lambda s: (loads[s], self.alive.index(s)))

    def submit(self, server: str, row: PromptRow, prompt: dict) -> None:
        c = ComfyClient(server, use_websocket=self.use_websocket, poll_interval=self.poll_interval)
        pid = c.queue(prompt, timeout=60.0)
        attempt = _Attempt(row, server, c, pid, time.monotonic())
        self.in_flight[pid] = attempt
        threading.Thread(target=self._follow, args=(attempt,), daemon=True,
                         name=f"lens-follow-{pid[:8]}").start()

    def _follow(self, attempt: _Attempt) -> None:
        try:
            entry = attempt.client.wait(attempt.prompt_id, timeout=self.prompt_timeout)
            outcome: Any = entry
        except BaseException as e:  # handed to the dispatcher, which decides
            outcome = e
        finally:
            attempt.client.close()
        self._done.put((attempt, outcome))

    def next_done(self, timeout: float) -> tuple[_Attempt, Any] | None:
        try:
            attempt, outcome = self._done.get(timeout=timeout)
        except queue_mod.Empty:
            return None
        self.in_flight.pop(attempt.prompt_id, None)
        return attempt, outcome

    def cancel_all(self) -> None:
        """Cancel every prompt this pool queued and has not seen finish (Ctrl-C)."""
        for pid, a in list(self.in_flight.items()):
            try:
                what = self.probes[a.server].cancel(pid)
                logger.error("prompt %s on %s %s", pid, a.server, what)
            except ClientError as e:
                logger.error("could not cancel prompt %s on %s: %s", pid, a.server, e)


def _save_row_images(client: "ComfyClient", entry: Mapping, row: PromptRow, out_dir: Path,
                     ) -> list[Path]:
    """Download a finished prompt's images as ``<id>.png``, ``<id>_1.png``, ... (atomically)."""
    parts = out_dir / ".parts" / row.id
    if parts.exists():
        for p in parts.iterdir():
            p.unlink()
    got = client.download_images(entry, parts)
    out = []
    for k, p in enumerate(got):
        dst = out_dir / (f"{row.id}{p.suffix}" if k == 0 else f"{row.id}_{k}{p.suffix}")
        os.replace(p, dst)
        out.append(dst)
    return out


def run_many(workflow: str | os.PathLike | Mapping, rows: Sequence[PromptRow],
             servers: Sequence[str], output_dir: str | os.PathLike = "outputs", *,
             base_overrides: Mapping | None = None, per_server: int = 2, retries: int = 2,
             use_websocket: bool = True, poll_interval: float = 1.0,
             prompt_timeout: float | None = DEFAULT_TIMEOUT) -> ManyResult:
    """Run every row of a prompts file through ``workflow`` on several servers.

    Each row is queued on the alive server with the shortest queue (at most ``per_server`` of this
    run's prompts per server at a time) and followed until done; its images are saved as
    ``<id>.png`` (``<id>_1.png``, ... for more) in ``output_dir`` with a record per image in
    ``manifest.jsonl`` (and ``manifest.parquet`` with pyarrow). When a server fails, its rows are
    queued again on another server; a row whose prompt fails is tried ``retries`` more times on
    other servers. A rerun skips rows already in the manifest with the same values.
    KeyboardInterrupt cancels the prompts still queued or running and is raised again.
    """
    template = load_workflow(workflow) if not isinstance(workflow, Mapping) \
        else check_api_prompt(dict(workflow))
    wf_name = Path(workflow).name if not isinstance(workflow, Mapping) else None
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = batch_rows.Manifest(out_dir)
    result = ManyResult()
    pending: deque = deque()
    for row in rows:
        (result.skipped.append(row.id) if manifest.matches(row.id, row.params())
         else pending.append(row))
    pool = ServerPool(servers, per_server, retries, use_websocket, poll_interval, prompt_timeout)
    total, t0 = len(rows), time.monotonic()
    try:
        while pending or pool.in_flight:
            _dispatch(pool, pending, template, base_overrides, result)
            if not pool.alive and pending:
                for row in pending:
                    result.failed[row.id] = "every server is down"
                pending.clear()
            done = pool.next_done(0.2)
            if done is None:
                continue
            attempt, outcome = done
            _settle(pool, attempt, outcome, pending, manifest, out_dir, wf_name, result)
            n = len(result.files) + len(result.skipped)
            logger.info("%d/%d rows done, %.1f images/min", n, total,
                        60.0 * len(result.files) / max(1e-9, time.monotonic() - t0))
    except KeyboardInterrupt:
        pool.cancel_all()
        raise
    finally:
        manifest.finish([r.id for r in rows], MANY_COLUMNS)
        for d in sorted((out_dir / ".parts").glob("*"), reverse=True) + [out_dir / ".parts"]:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return result


def _dispatch(pool: ServerPool, pending: deque, template: Mapping, base: Mapping | None,
              result: ManyResult) -> None:
    while pending:
        row = pending[0]
        server = pool.pick(result.attempts.get(row.id, ()))
        if server is None:
            return
        pending.popleft()
        try:
            pool.submit(server, row, prompt_for_row(template, row, base))
        except ServerUnreachable as e:
            pool.drop(server, e)
            pending.appendleft(row)
            continue
        except ClientError as e:  # refused (HTTP 400 ...): maybe a model missing there
            result.attempts.setdefault(row.id, []).append(server)
            _retry_or_fail(pool, row, server, e, pending, result)
            continue
        result.attempts.setdefault(row.id, []).append(server)


def _retry_or_fail(pool: ServerPool, row: PromptRow, server: str, why: Exception,
                   pending: deque, result: ManyResult) -> None:
    n = result.failures[row.id] = result.failures.get(row.id, 0) + 1
    if n <= pool.retries and pool.alive:
        logger.warning("row %s failed on %s (%s); trying again elsewhere", row.id, server, why)
        pending.append(row)
    else:
        result.failed[row.id] = f"{server}: {why}"
        logger.error("row %s (line %d) failed: %s: %s", row.id, row.line, server, why)


def _settle(pool: ServerPool, attempt: _Attempt, outcome: Any, pending: deque,
            manifest: "batch_rows.Manifest", out_dir: Path, wf_name: str | None,
            result: ManyResult) -> None:
    row, server = attempt.row, attempt.server
    if isinstance(outcome, WaitTimeout):  # too slow there: stop it, count it against the row
        try:
            pool.probes[server].cancel(attempt.prompt_id)
        except ClientError as e:
            logger.warning("could not cancel prompt %s on %s: %s", attempt.prompt_id, server, e)
        _retry_or_fail(pool, row, server, outcome, pending, result)
        return
    if isinstance(outcome, BaseException):
        if isinstance(outcome, ServerUnreachable) or (
                isinstance(outcome, ClientError) and not isinstance(outcome, ExecutionFailed)):
            pool.drop(server, outcome)  # down, restarted or lost the prompt: not the row's fault
            pending.appendleft(row)
        else:
            _retry_or_fail(pool, row, server, outcome, pending, result)
        return
    if row.id in result.files:
        return  # already completed by an earlier attempt
    try:
        paths = _save_row_images(pool.probes[server], outcome, row, out_dir)
    except ServerUnreachable as e:
        pool.drop(server, e)
        pending.appendleft(row)
        return
    seconds = time.monotonic() - attempt.started
    for k, path in enumerate(paths):
        manifest.add(dict(id=row.id if k == 0 else f"{row.id}_{k}", file=path.name,
                          sha256=batch_rows.sha256_file(path), bytes=path.stat().st_size,
                          **row.params(), workflow=wf_name,
                          server=server, prompt_id=attempt.prompt_id, seconds=seconds))
    result.files[row.id] = paths
    if not paths:
        logger.warning("row %s finished on %s but produced no images", row.id, server)


def read_servers_file(path: str | os.PathLike) -> list[str]:
    """Server URLs from a file, one a line; blank lines and ``#`` comments are skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--servers-file {str(p)!r} does not exist")
    lines = (ln.split("#", 1)[0].strip() for ln in p.read_text(encoding="utf-8").splitlines())
    return [ln for ln in lines if ln]


def main_many(args: argparse.Namespace, servers: list[str]) -> int:
    """``--prompts``: every row on the least busy server; exit 1 when a row was bad or failed."""
    template = load_workflow(args.workflow)
    base = dict(prompt_text=args.prompt_text, negative=args.negative, seed=args.seed,
                width=args.width, height=args.height, steps=args.steps, cfg=args.cfg,
                sets=args.sets)
    rows, errors = load_prompt_rows(args.prompts, template, base)
    for err in errors:
        logger.error("%s: %s", args.prompts, err)
    if args.dry_run:
        for row in rows:
            print(json.dumps({"id": row.id, "prompt": prompt_for_row(template, row, base)},
                             ensure_ascii=False))
        return 1 if errors else 0
    result = run_many(args.workflow, rows, servers, args.output_dir, base_overrides=base,
                      per_server=args.per_server, retries=args.retries,
                      use_websocket=not args.no_websocket, poll_interval=args.poll_interval,
                      prompt_timeout=args.timeout if args.timeout > 0 else None)
    for row in rows:
        for path in result.files.get(row.id, []):
            print(path)
    logger.info("%d row(s) done, %d already in the manifest, %d failed, %d bad", len(result.files),
                len(result.skipped), len(result.failed), len(errors))
    return 1 if errors or result.failed else 0
