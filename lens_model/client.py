"""Queue API-format ComfyUI workflows on one or several servers and fetch their images.

Run it as ``python -m lens_model.client WORKFLOW_api.json [options]``::

    python -m lens_model.client my_workflow_api.json --prompt "a red fox in snow" \\
        --seed 7 --width 1024 --height 1024 --output-dir outputs

The client talks to a running ComfyUI server:

1. reads the workflow, refusing the UI (editor) format, and applies the overrides
   (``--prompt``, ``--negative``, ``--seed``, ``--width``/``--height``, ``--steps``, ``--cfg``,
   ``--set NODE_ID.INPUT=VALUE``) to a copy;
2. opens the websocket ``/ws?clientId=<id>`` when it can (``websocket-client``) and
   ``POST /prompt {prompt, client_id, prompt_id}``; an HTTP 400 is reported node by node;
3. follows progress over the websocket (``executing``, ``progress``, ``execution_error``,
   ``execution_interrupted``) or, without one, polls ``GET /history/{prompt_id}`` (and
   ``GET /queue`` for the queue position);
4. reads ``/history/{prompt_id}`` and downloads every output image with ``GET /view`` into
   ``--output-dir``; the saved paths are printed, one a line.

Exit status of the command: 0 done, 1 the server refused or failed the prompt (or could not be
reached), 2 bad arguments or workflow file, 3 ``--timeout`` passed (the prompt is left queued or
running on the server: ``POST /interrupt`` stops it), 130 Ctrl-C (which cancels the prompt).

With ``--prompts FILE`` the rows of a prompts file are spread over one or several servers
(``--server`` repeated, ``--servers-file``): that part is :mod:`lens_model.client_multi`.

The parts: :mod:`lens_model.client_workflow` (API workflow files and the overrides),
:mod:`lens_model.client_server` (:class:`ComfyClient`, one server over HTTP and websocket),
:mod:`lens_model.client_multi` (a prompts file over several servers); this module runs one workflow
(:func:`run_workflow`), holds the command line and re-exports the public names of the three, so
``from lens_model.client import ComfyClient, apply_overrides, load_workflow, run_many`` works.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from .client_multi import (
    MANY_COLUMNS, PROMPT_COLUMNS, ManyResult, PromptRow, ServerPool, load_prompt_rows,
    main_many, parse_prompt_row, prompt_for_row, read_servers_file, run_many,
)
from .client_server import (
    DEFAULT_SERVER, DEFAULT_TIMEOUT, ClientError, ComfyClient, ExecutionFailed, ProgressCallback,
    PromptValidationError, ServerUnreachable, WaitTimeout, WebSocket, WebSocketError,
)
from .client_workflow import (
    OVERRIDE_INPUTS, TEXT_ENCODE_INPUTS, apply_overrides, check_api_prompt, find_text_encoders,
    load_workflow, parse_set,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SERVER", "DEFAULT_TIMEOUT", "MANY_COLUMNS", "OVERRIDE_INPUTS", "PROMPT_COLUMNS",
    "TEXT_ENCODE_INPUTS", "ClientError", "ComfyClient", "ExecutionFailed", "ManyResult",
    "ProgressCallback", "PromptRow", "PromptValidationError", "ServerPool", "ServerUnreachable",
    "WaitTimeout", "WebSocket", "WebSocketError", "apply_overrides", "build_parser",
    "check_api_prompt", "find_text_encoders", "load_prompt_rows", "load_workflow", "main",
    "parse_prompt_row", "parse_set", "prompt_for_row", "read_servers_file", "run_many",
    "run_workflow",
]


def run_workflow(workflow: str | os.PathLike | Mapping, *, server: str = DEFAULT_SERVER,
                 output_dir: str | os.PathLike = "outputs", timeout: float | None = DEFAULT_TIMEOUT,
                 prompt_text: str | None = None, negative: str | None = None,
                 seed: int | None = None, width: int | None = None, height: int | None = None,
                 steps: int | None = None, cfg: float | None = None,
                 sets: Iterable[str | tuple[str, str, Any]] = (), use_websocket: bool = True,
                 poll_interval: float = 1.0, on_progress: ProgressCallback | None = None,
                 client: ComfyClient | None = None) -> list[Path]:
    """Load (path) or take (dict) an API workflow, apply overrides, queue it, wait, save the images.

    ``timeout`` bounds the whole run in seconds (None: no limit). Returns the saved image paths.
    """
    # apply_overrides checks the prompt (check_api_prompt) on the copy it returns
    prompt = workflow if isinstance(workflow, Mapping) else load_workflow(workflow)
    prompt = apply_overrides(prompt, prompt_text=prompt_text, negative=negative, seed=seed,
                             width=width, height=height, steps=steps, cfg=cfg, sets=sets)
    deadline = None if timeout is None else time.monotonic() + timeout
    own = client is None
    client = client or ComfyClient(server, use_websocket=use_websocket, poll_interval=poll_interval)
    try:
        pid = client.queue(prompt, timeout=timeout)
        left = None if deadline is None else deadline - time.monotonic()
        entry = client.wait(pid, timeout=left, on_progress=on_progress)
        left = None if deadline is None else max(0.1, deadline - time.monotonic())
        paths = client.download_images(entry, output_dir, timeout=left)
        if not paths:
            logger.warning("prompt %s finished but produced no images (does the workflow end in "
                           "SaveImage / PreviewImage?)", pid)
        return paths
    finally:
        if own:
            client.close()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lens_model.client",
        description="Queue an API-format ComfyUI workflow, follow its progress and download its "
                    "images. Export workflows with 'Save (API)' or use the *_api.json files in "
                    "workflows/api/.")
    p.add_argument("workflow", help="API-format workflow JSON file")
    p.add_argument("--server", action="append", default=None, metavar="URL",
                   help=f"ComfyUI URL (default {DEFAULT_SERVER}); repeat it to spread a --prompts "
                        "file over several servers")
    p.add_argument("--servers-file", metavar="FILE",
                   help="a file of server URLs, one a line (# comments), added to --server")
    p.add_argument("--prompts", metavar="FILE",
                   help="JSONL or Parquet prompts file (columns id, prompt, negative, seed, width, "
                        "height, steps, cfg): one prompt per row, spread over the servers by "
                        "queue length, images saved as ID.png with a manifest.jsonl")
    p.add_argument("--per-server", type=int, default=2, metavar="N",
                   help="with --prompts: prompts of this run queued per server at a time "
                        "(default 2)")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="with --prompts: times to try a failed (or timed-out) prompt again, on "
                        "other servers when there are any (default 2; a server that goes away "
                        "does not count)")
    p.add_argument("--prompt", dest="prompt_text", metavar="TEXT",
                   help="text of the positive text-encode node")
    p.add_argument("--negative", metavar="TEXT", help="text of the negative text-encode node")
    p.add_argument("--seed", type=int, metavar="N",
                   help="sampler seed (LensNodesSampler.seed, KSampler.seed, "
                        "SamplerCustom/RandomNoise.noise_seed)")
    p.add_argument("--width", type=int, metavar="PX", help="image width in pixels")
    p.add_argument("--height", type=int, metavar="PX", help="image height in pixels")
    p.add_argument("--steps", type=int, metavar="N", help="sampling steps")
    p.add_argument("--cfg", type=float, metavar="SCALE", help="guidance scale")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                   help="set any input; VALUE is JSON (7, 1.5, true, \"text\", [\"4\", 0]) or "
                        "plain text; repeatable, applied last")
    p.add_argument("--output-dir", default="outputs",
                   help="where images are saved (default ./outputs)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"overall limit in seconds (with --prompts: per prompt), 0 for none "
                        f"(default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--poll-interval", type=float, default=1.0,
                   help="seconds between /history polls (default 1)")
    p.add_argument("--no-websocket", action="store_true",
                   help="do not open the websocket; poll /history only")
    p.add_argument("--dry-run", action="store_true",
                   help="print the API prompt with the overrides applied and exit without queueing")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 server failure, 2 bad input,
    3 timeout, 130 Ctrl-C, which also cancels the prompt). Prints the saved image paths, one a
    line; everything else goes to logging."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    client = None
    try:
        servers = list(args.server or [])
        if args.servers_file:
            servers += read_servers_file(args.servers_file)
        servers = servers or [DEFAULT_SERVER]
        if args.prompts:
            return main_many(args, servers)
        if len(servers) > 1:
            raise ValueError("several servers need a --prompts file (one workflow run goes to "
                             "one server)")
        prompt = load_workflow(args.workflow)
        prompt = apply_overrides(prompt, prompt_text=args.prompt_text, negative=args.negative,
                                 seed=args.seed, width=args.width, height=args.height,
                                 steps=args.steps, cfg=args.cfg, sets=args.sets)
        if args.dry_run:
            print(json.dumps(prompt, indent=2, ensure_ascii=False))
            return 0
        with ComfyClient(servers[0], use_websocket=not args.no_websocket,
                         poll_interval=args.poll_interval) as client:
            paths = run_workflow(prompt, output_dir=args.output_dir,
                                 timeout=args.timeout if args.timeout > 0 else None, client=client)
    except (ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    except WaitTimeout as e:
        logger.error("timeout after %gs: %s", args.timeout, e)
        return 3
    except ClientError as e:
        logger.error("%s", e)
        return 1
    except KeyboardInterrupt:  # run_many has cancelled its prompts already
        pid = client.active_prompt if client is not None else None
        if pid:
            try:
                what = client.cancel(pid)
                logger.error("stopped by Ctrl-C; prompt %s %s", pid, what)
            except ClientError as e:
                logger.error("stopped by Ctrl-C; could not cancel prompt %s: %s", pid, e)
        else:
            logger.error("stopped by Ctrl-C")
        return 130
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
