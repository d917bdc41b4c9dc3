"""Queue API-format ComfyUI workflows on one or several servers and fetch their images.

Run it as ``python -m lens_model.client WORKFLOW_api.json [options]``::

    python -m lens_model.client my_workflow_api.json --prompt "a red fox in snow" \\
        --seed 7 --width 1024 --height 1024 --output-dir outputs

The client talks to a running ComfyUI server (spec comfyui.md §9):

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

Python API: :class:`ComfyClient`, :func:`apply_overrides`, :func:`load_workflow`,
:func:`run_workflow`; :func:`~lens_model.client_multi.run_many` and
:func:`~lens_model.client_multi.load_prompt_rows` (also reachable from here).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

try:  # the websocket-client package (requirements.txt); without it prompts are followed by polling
    import websocket as _wsclient
except ImportError:  # pragma: no cover - exercised only where the package is missing
    _wsclient = None

logger = logging.getLogger(__name__)

DEFAULT_SERVER = "http://127.0.0.1:8188"
DEFAULT_TIMEOUT = 900.0

# --------------------------------------------------------------------------------------------
# Override table: option -> {class_type: input name(s)}. Adjust here when a node gains or renames
# an input. A value is set only on nodes whose class_type is listed AND whose API entry already
# has that input (optional inputs that are absent stay absent); when no node qualifies the
# override is an error that suggests --set.
# --------------------------------------------------------------------------------------------
TEXT_ENCODE_INPUTS: dict[str, str] = {
    "LensNodesTextEncode": "text",
    "CLIPTextEncode": "text",
}
OVERRIDE_INPUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "seed": {
        "LensNodesSampler": ("seed",),
        "KSampler": ("seed",),
        "KSamplerAdvanced": ("noise_seed",),
        "SamplerCustom": ("noise_seed",),
        "RandomNoise": ("noise_seed",),
    },
    "steps": {
        "LensNodesSampler": ("steps",),
        "KSampler": ("steps",),
        "KSamplerAdvanced": ("steps",),
        "BasicScheduler": ("steps",),
        "Flux2Scheduler": ("steps",),
    },
    "cfg": {
        "LensNodesSampler": ("cfg",),
        "KSampler": ("cfg",),
        "KSamplerAdvanced": ("cfg",),
        "SamplerCustom": ("cfg",),
        "CFGGuider": ("cfg",),
    },
    "width": {
        "LensNodesResolution": ("width",),
        "LensNodesEmptyLatent": ("width",),
        "LensNodesSampler": ("width",),
        "EmptyLatentImage": ("width",),
        "EmptyFlux2LatentImage": ("width",),
        "EmptySD3LatentImage": ("width",),
        "ModelSamplingFlux": ("width",),
        "Flux2Scheduler": ("width",),
    },
    "height": {
        "LensNodesResolution": ("height",),
        "LensNodesEmptyLatent": ("height",),
        "LensNodesSampler": ("height",),
        "EmptyLatentImage": ("height",),
        "EmptyFlux2LatentImage": ("height",),
        "EmptySD3LatentImage": ("height",),
        "ModelSamplingFlux": ("height",),
        "Flux2Scheduler": ("height",),
    },
}

ProgressCallback = Callable[[str, dict], None]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class ClientError(RuntimeError):
    """Base class for failures talking to ComfyUI."""


class ServerUnreachable(ClientError):
    """The server did not answer (refused, DNS, TLS, socket timeout)."""


class PromptValidationError(ClientError):
    """``POST /prompt`` answered HTTP 400; ``.error`` and ``.node_errors`` hold the reply."""

    def __init__(self, message: str, error: dict, node_errors: Any):
        super().__init__(message)
        self.error = error
        self.node_errors = node_errors


class ExecutionFailed(ClientError):
    """The prompt failed (``execution_error``) or was interrupted (``execution_interrupted``).

    ``.kind`` is the event name and ``.data`` its payload (node_id, node_type, exception_type,
    exception_message, traceback, ...).
    """

    def __init__(self, message: str, kind: str, data: dict):
        super().__init__(message)
        self.kind = kind
        self.data = data


class WaitTimeout(ClientError, TimeoutError):
    """The overall ``timeout`` passed before the prompt finished."""


class WebSocketError(OSError):
    """Websocket handshake refused or protocol error (the client then falls back to polling)."""


# --------------------------------------------------------------------------------------------
# Workflow files and overrides
# --------------------------------------------------------------------------------------------
def _is_link(value: Any) -> bool:
    """An API input that is a link: ``["<source id>", <output index>]``."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _api_twin(path: Path) -> Path:
    """The API-format copy of a shipped example: ``workflows/api/<name>_api.json``."""
    name = path.stem + "_api" + path.suffix
    nested = path.parent / "api" / name
    return nested if nested.is_file() else path.with_name(name)


def check_api_prompt(obj: Any, source: str = "workflow") -> dict:
    """Return ``obj`` as an API prompt ``{"<id>": {"class_type", "inputs", ...}}``; else ValueError.

    A UI (editor) workflow (top-level ``nodes`` and ``links``) is refused with the fix; a file
    holding ``{"prompt": {...}}`` (as /history stores it) is unwrapped.
    """
    if isinstance(obj, dict) and "nodes" in obj and "links" in obj:
        hint = ""
        if source != "workflow":
            twin = _api_twin(Path(source))
            if twin.is_file():
                hint = f" The API twin of this file exists: use {twin}."
        raise ValueError(
            f"{source} is a UI (editor) workflow (it has top-level 'nodes' and 'links'); "
            "POST /prompt needs the API format {\"<node id>\": {\"class_type\", \"inputs\"}}. "
            "Export it from ComfyUI with 'Save (API)' / 'Export (API)', or use the *_api.json twin "
            f"shipped in workflows/api/ for each example workflow.{hint}")
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), dict) and "class_type" not in obj:
        obj = obj["prompt"]
    if not isinstance(obj, dict) or not obj:
        found = type(obj).__name__ + (" (empty)" if not obj else "")
        raise ValueError(f"{source}: expected a JSON object of nodes {{\"<id>\": {{\"class_type\", "
                         f"\"inputs\"}}}}, found {found}")
    for node_id, node in obj.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs", {}), dict):
            raise ValueError(
                f"{source}: node {node_id!r} is not an API node (expected an object with a string "
                f"'class_type' and an 'inputs' object, found {json.dumps(node)[:120]}); export the "
                "workflow with 'Save (API)'")
    return obj


def load_workflow(path: str | os.PathLike) -> dict:
    """Read an API-format workflow file (JSON) and return the prompt (:func:`check_api_prompt`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"workflow file not found: {path}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected an API-format workflow") from None
    return check_api_prompt(obj, str(path))


def _node_label(prompt: Mapping, node_id: str) -> str:
    node = prompt.get(node_id) or {}
    title = (node.get("_meta") or {}).get("title")
    ct = node.get("class_type", "?")
    return f"{node_id} ({ct}{', ' + repr(title) if title and title != ct else ''})"


def _trace_encoders(prompt: Mapping, start: Any, branch: str) -> list[str]:
    """Text-encode node ids upstream of the link ``start``.

    Passing through a node that itself has a ``positive`` or ``negative`` input (ControlNet apply,
    a guider) follows only its ``branch`` input; the walk stops at text-encode nodes.
    """
    found: list[str] = []
    seen: set[str] = set()
    queue = deque([start])
    while queue:
        link = queue.popleft()
        if not _is_link(link):
            continue
        nid = str(link[0])
        if nid in seen or nid not in prompt:
            continue
        seen.add(nid)
        node = prompt[nid]
        if node.get("class_type") in TEXT_ENCODE_INPUTS:
            found.append(nid)
            continue
        inputs = node.get("inputs") or {}
        if "positive" in inputs or "negative" in inputs:
            queue.append(inputs.get(branch))
        else:
            queue.extend(v for v in inputs.values() if _is_link(v))
    return found


def find_text_encoders(prompt: Mapping) -> tuple[list[str], list[str]]:
    """Return (positive ids, negative ids) of the text-encode nodes (TEXT_ENCODE_INPUTS classes).

    The branch is read from the wiring: every node with a ``positive`` input (our LensNodesSampler,
    whose ``negative`` is optional, KSampler, SamplerCustom, CFGGuider, ...) is traced upstream.
    Without such a node a lone encoder is the positive one, and several are told apart by a
    ``_meta.title`` containing "negative" / "positive".
    """
    encoders = [nid for nid, n in prompt.items() if n.get("class_type") in TEXT_ENCODE_INPUTS]
    samplers = [nid for nid, n in prompt.items()
                if _is_link((n.get("inputs") or {}).get("positive"))]
    pos: list[str] = []
    neg: list[str] = []
    for sid in samplers:
        inputs = prompt[sid]["inputs"]
        for branch, out in (("positive", pos), ("negative", neg)):
            ids = _trace_encoders(prompt, inputs.get(branch), branch)
            if len(ids) > 1:
                raise ValueError(
                    f"the {branch} input of node {_node_label(prompt, sid)} is fed by several "
                    f"text-encode nodes ({', '.join(_node_label(prompt, i) for i in ids)}); "
                    "set the text of the one you mean with --set NODE_ID.text=...")
            out.extend(i for i in ids if i not in out)
    if samplers and (pos or neg):
        return pos, neg
    if len(encoders) == 1:
        return encoders, []
    for nid in encoders:
        title = str((prompt[nid].get("_meta") or {}).get("title", "")).lower()
        if "negative" in title:
            neg.append(nid)
        elif "positive" in title or "prompt" in title:
            pos.append(nid)
    return pos, neg


def parse_set(spec: str) -> tuple[str, str, Any]:
    """Parse ``NODE_ID.INPUT=VALUE`` into (node id, input, value).

    VALUE is parsed as JSON (``7``, ``1.5``, ``true``, ``"text"``, ``["4", 0]`` for a link); text
    that is not valid JSON is kept as a string, so ``--set 6.text=a red fox`` works.
    """
    target, eq, raw = spec.partition("=")
    node_id, dot, name = target.rpartition(".")
    if not eq or not dot or not node_id.strip() or not name.strip():
        raise ValueError(f"--set {spec!r}: expected NODE_ID.INPUT=VALUE, e.g. --set 3.steps=8 "
                         "or --set 6.text=\"a red fox\"")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return node_id.strip(), name.strip(), value


def _set_by_table(prompt: dict, option: str, value: Any) -> list[str]:
    table = OVERRIDE_INPUTS[option]
    done = []
    for nid, node in prompt.items():
        inputs = node.get("inputs")
        for name in table.get(node.get("class_type"), ()):
            if isinstance(inputs, dict) and name in inputs:
                old = inputs[name]
                inputs[name] = value
                done.append(nid)
                logger.info("override %s: node %s .%s = %r%s", option, _node_label(prompt, nid),
                            name, value, " (replaces a link)" if _is_link(old) else "")
    if not done:
        classes = ", ".join(f"{c}.{'/'.join(n)}" for c, n in table.items())
        raise ValueError(f"--{option}: no node in the workflow has one of the inputs {classes}; "
                         f"use --set NODE_ID.INPUT=VALUE to set it on a specific node")
    return done


def apply_overrides(prompt: Mapping, prompt_text: str | None = None, negative: str | None = None,
                    seed: int | None = None, width: int | None = None, height: int | None = None,
                    steps: int | None = None, cfg: float | None = None,
                    sets: Iterable[str | tuple[str, str, Any]] = ()) -> dict:
    """Return a deep copy of the API ``prompt`` with the overrides applied (the input is unchanged).

    - ``prompt_text`` / ``negative``: the ``text`` input of the text-encode node
      (LensNodesTextEncode or CLIPTextEncode) wired to the samplers' ``positive`` / ``negative``
      (:func:`find_text_encoders`).
    - ``seed``, ``steps``, ``cfg``, ``width``, ``height``: every node listed for that option in
      ``OVERRIDE_INPUTS`` that has the input.
    - ``sets``: ``"NODE_ID.INPUT=VALUE"`` strings (:func:`parse_set`) or (id, input, value) tuples,
      applied last.

    Raises ValueError naming the option when no node qualifies, or when the negative text node
    cannot be told apart from the positive one.
    """
    prompt = check_api_prompt(copy.deepcopy(dict(prompt)))
    if prompt_text is not None or negative is not None:
        pos, neg = find_text_encoders(prompt)
        for option, text, ids in (("prompt", prompt_text, pos), ("negative", negative, neg)):
            if text is None:
                continue
            if not ids:
                encs = [n for n, v in prompt.items() if v.get("class_type") in TEXT_ENCODE_INPUTS]
                raise ValueError(
                    f"--{option}: found no {option} text-encode node "
                    f"({'/'.join(TEXT_ENCODE_INPUTS)}) wired to a sampler's "
                    f"{'positive' if option == 'prompt' else 'negative'} input (text-encode nodes: "
                    f"{', '.join(_node_label(prompt, n) for n in encs) or 'none'}); "
                    "use --set NODE_ID.text=...")
            if option == "negative" and set(ids) & set(pos):
                raise ValueError(
                    "--negative: the sampler's negative input comes from the positive text-encode "
                    f"node {', '.join(_node_label(prompt, n) for n in set(ids) & set(pos))} (for "
                    "example through ConditioningZeroOut); add a separate text-encode node for the "
                    "negative prompt, or drop --negative")
            for nid in ids:
                prompt[nid]["inputs"][TEXT_ENCODE_INPUTS[prompt[nid]["class_type"]]] = text
                logger.info("override %s: node %s .text = %r", option, _node_label(prompt, nid),
                            text)
    for option, value, kind in (("seed", seed, int), ("steps", steps, int), ("cfg", cfg, float),
                                ("width", width, int), ("height", height, int)):
        if value is not None:
            _set_by_table(prompt, option, kind(value))
    for spec in sets:
        node_id, name, value = parse_set(spec) if isinstance(spec, str) else spec
        if node_id not in prompt:
            raise ValueError(f"--set {node_id}.{name}: no node {node_id!r} in the workflow; "
                             "node ids: " + ", ".join(_node_label(prompt, n) for n in prompt))
        inputs = prompt[node_id].setdefault("inputs", {})
        if name not in inputs:
            logger.warning("--set %s.%s: node %s has no input %r yet; adding it", node_id, name,
                           _node_label(prompt, node_id), name)
        inputs[name] = value
        logger.info("override set: node %s .%s = %r", _node_label(prompt, node_id), name, value)
    return prompt


# --------------------------------------------------------------------------------------------
# Websocket (websocket-client; without it the client polls /history)
# --------------------------------------------------------------------------------------------
class WebSocket:
    """ComfyUI's ``/ws`` feed over the ``websocket-client`` library.

    ``recv(timeout)`` returns ``("text", str)``, ``("binary", bytes)`` or None when no whole message
    arrived in time (the library keeps partial frames for the next call); pings are answered by the
    library; :class:`WebSocketError` is raised once the server closes or the connection breaks.
    """

    def __init__(self, conn: Any):
        self.conn = conn
        self.closed = False

    @classmethod
    def connect(cls, url: str, timeout: float = 10.0) -> "WebSocket":
        if _wsclient is None:
            raise WebSocketError("the websocket-client package is not installed "
                                 "(pip install websocket-client)")
        try:
            return cls(_wsclient.create_connection(url, timeout=timeout))
        except (_wsclient.WebSocketException, OSError) as e:
            raise WebSocketError(f"websocket handshake with {url} failed: {e}") from None

    def recv(self, timeout: float | None) -> tuple[str, str | bytes] | None:
        if self.closed:
            raise WebSocketError("websocket closed")
        try:
            self.conn.settimeout(timeout)
            opcode, data = self.conn.recv_data()
        except _wsclient.WebSocketTimeoutException:
            return None
        except (_wsclient.WebSocketException, OSError) as e:
            self.closed = True
            raise WebSocketError(f"websocket connection lost ({e or type(e).__name__})") from None
        if opcode == _wsclient.ABNF.OPCODE_CLOSE:
            self.closed = True
            code = struct.unpack(">H", data[:2])[0] if len(data) >= 2 else 1005
            raise WebSocketError(f"websocket closed by the server (code {code})")
        if opcode == _wsclient.ABNF.OPCODE_TEXT:
            return "text", data.decode("utf-8") if isinstance(data, bytes) else data
        return "binary", bytes(data)

    def close(self) -> None:
        self.closed = True
        try:
            self.conn.settimeout(1.0)
            self.conn.close()
        except (_wsclient.WebSocketException, OSError):
            pass


# --------------------------------------------------------------------------------------------
# ComfyUI client
# --------------------------------------------------------------------------------------------
def _format_node_errors(node_errors: Any, prompt: Mapping | None) -> list[str]:
    lines = []
    items = node_errors.items() if isinstance(node_errors, dict) else enumerate(node_errors or [])
    for nid, entry in items:
        entry = entry if isinstance(entry, dict) else {"errors": [{"message": str(entry)}]}
        ct = entry.get("class_type") or ((prompt or {}).get(str(nid)) or {}).get("class_type", "?")
        for err in entry.get("errors") or [{}]:
            parts = [str(err.get("type") or "error"), str(err.get("message") or "")]
            if err.get("details"):
                parts.append(str(err["details"]))
            extra = err.get("extra_info") or {}
            where = f" [input {extra['input_name']}]" if isinstance(extra, dict) \
                and extra.get("input_name") else ""
            lines.append(f"node {nid} ({ct}){where}: " + ": ".join(p for p in parts if p))
    return lines


def _execution_message(kind: str, data: dict, prompt: Mapping | None = None) -> str:
    nid = data.get("node_id")
    ct = data.get("node_type") or ((prompt or {}).get(str(nid)) or {}).get("class_type", "?")
    if kind == "execution_interrupted":
        return f"execution interrupted at node {nid} ({ct})" if nid is not None \
            else "execution interrupted"
    return (f"execution failed in node {nid} ({ct}): {data.get('exception_type', 'error')}: "
            f"{data.get('exception_message', '').strip()}")


def _is_loopback(host: str | None) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or bool(host and host.startswith("127."))


class ComfyClient:
    """Talks to one ComfyUI server over HTTP (+ websocket when available).

    ``server``: base URL, e.g. ``http://127.0.0.1:8188``. ``use_websocket=False`` forces polling.
    ``poll_interval``: seconds between ``/history`` polls. Proxies from the environment are ignored
    for loopback servers.
    """

    def __init__(self, server: str = DEFAULT_SERVER, client_id: str | None = None,
                 use_websocket: bool = True, poll_interval: float = 1.0,
                 request_timeout: float = 60.0):
        if "://" not in server:
            server = "http://" + server
        self.server = server.rstrip("/")
        u = urllib.parse.urlsplit(self.server)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"--server {server!r}: expected http(s)://host:port")
        self.client_id = client_id or uuid.uuid4().hex
        self.use_websocket = use_websocket
        self.poll_interval = poll_interval
        self.quiet_poll_interval = max(5.0, poll_interval)
        self.request_timeout = request_timeout
        self._opener = (urllib.request.build_opener(urllib.request.ProxyHandler({}))
                        if _is_loopback(u.hostname) else urllib.request.build_opener())
        self._ws: WebSocket | None = None
        self._ws_failed = False
        self._prompts: dict[str, dict] = {}
        self.active_prompt: str | None = None  # queued by this client and not yet seen finished

    # -- plumbing ------------------------------------------------------------------------------
    def url(self, path: str, query: Mapping[str, str] | None = None) -> str:
        return self.server + path + ("?" + urllib.parse.urlencode(query) if query else "")

    def _request(self, method: str, path: str, body: Any = None, query: Mapping | None = None,
                 timeout: float | None = None) -> tuple[int, bytes]:
        """Return (status, body). HTTP error statuses come back as values, not exceptions."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url(path, query), data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        t = self.request_timeout if timeout is None \
            else max(0.1, min(timeout, self.request_timeout))
        try:
            with self._opener.open(req, timeout=t) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerUnreachable(f"cannot reach ComfyUI at {self.server} ({method} {path}: "
                                    f"{reason}); is the server running? (--server)") from None

    def _get_json(self, path: str, timeout: float | None = None) -> Any:
        status, data = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise ClientError(f"GET {path} on {self.server}: HTTP {status}: "
                              f"{data[:300].decode('utf-8', 'replace')}")
        try:
            return json.loads(data)
        except json.JSONDecodeError:
            raise ClientError(f"GET {path} on {self.server}: not JSON: "
                              f"{data[:200].decode('utf-8', 'replace')}") from None

    def _ensure_ws(self) -> None:
        if not self.use_websocket or self._ws is not None or self._ws_failed:
            return
        u = urllib.parse.urlsplit(self.server)
        ws_url = urllib.parse.urlunsplit(("wss" if u.scheme == "https" else "ws", u.netloc,
                                          u.path + "/ws", "clientId=" + self.client_id, ""))
        try:
            self._ws = WebSocket.connect(ws_url, timeout=min(10.0, self.request_timeout))
            logger.debug("websocket connected: %s", ws_url)
        except (OSError, ValueError) as e:
            self._ws_failed = True
            logger.info("websocket unavailable (%s); following the prompt by polling /history", e)

    def _drop_ws(self, why: Exception) -> None:
        logger.info("websocket lost (%s); polling /history instead", why)
        if self._ws is not None:
            self._ws.close()
        self._ws, self._ws_failed = None, True

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def __enter__(self) -> "ComfyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- API -----------------------------------------------------------------------------------
    def queue(self, prompt: Mapping, extra_data: dict | None = None,
              timeout: float | None = None) -> str:
        """``POST /prompt``; returns the prompt_id. Raises PromptValidationError on HTTP 400.

        Opens the websocket first (when enabled) so no progress message is missed.
        """
        prompt = check_api_prompt(dict(prompt))
        self._ensure_ws()
        body: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id,
                                "prompt_id": str(uuid.uuid4())}
        if extra_data:
            body["extra_data"] = extra_data
        status, data = self._request("POST", "/prompt", body=body, timeout=timeout)
        try:
            reply = json.loads(data) if data else {}
        except json.JSONDecodeError:
            reply = {"error": {"type": "invalid_response",
                               "message": data[:300].decode("utf-8", "replace")}}
        if status == 400 or (status == 200 and "error" in reply and "prompt_id" not in reply):
            error = reply.get("error") if isinstance(reply.get("error"), dict) \
                else {"type": "error", "message": str(reply.get("error", ""))}
            node_errors = reply.get("node_errors") or {}
            lines = [f"ComfyUI rejected the prompt: {error.get('type', 'error')}: "
                     f"{error.get('message', '')}".rstrip(": ")]
            if error.get("details"):
                lines.append(f"  {error['details']}")
            lines += ["  " + ln for ln in _format_node_errors(node_errors, prompt)]
            raise PromptValidationError("\n".join(lines), error, node_errors)
        if status != 200:
            raise ClientError(f"POST /prompt on {self.server}: HTTP {status}: "
                              f"{data[:300].decode('utf-8', 'replace')}")
        pid = reply.get("prompt_id")
        if not pid:
            raise ClientError(f"POST /prompt on {self.server}: reply has no prompt_id: {reply}")
        for ln in _format_node_errors(reply.get("node_errors") or {}, prompt):
            logger.warning("queued with a node error (its output is skipped): %s", ln)
        self._prompts[pid] = prompt
        self.active_prompt = pid
        logger.info("queued prompt %s (queue number %s)", pid, reply.get("number"))
        return pid

    def history(self, prompt_id: str, timeout: float | None = None) -> dict | None:
        """``GET /history/{prompt_id}`` -> the entry (``outputs``, ``status``, ...) or None."""
        reply = self._get_json(f"/history/{urllib.parse.quote(prompt_id)}", timeout=timeout)
        entry = reply.get(prompt_id) if isinstance(reply, dict) else None
        return entry if isinstance(entry, dict) else None

    def queue_state(self, prompt_id: str, timeout: float | None = None) -> tuple[str, int] | None:
        """From ``GET /queue``: ("running", 0), ("pending", position from 1) or None."""
        reply = self._get_json("/queue", timeout=timeout)
        for item in reply.get("queue_running") or []:
            if len(item) > 1 and item[1] == prompt_id:
                return "running", 0
        pending = sorted((it for it in reply.get("queue_pending") or [] if len(it) > 1),
                         key=lambda it: it[0])
        for i, item in enumerate(pending):
            if item[1] == prompt_id:
                return "pending", i + 1
        return None

    def cancel(self, prompt_id: str) -> str:
        """Stop one prompt: ``POST /interrupt {prompt_id}`` when it runs, ``POST /queue {delete}``
        when it waits. Returns "interrupted", "deleted" or "not queued"."""
        state = self.queue_state(prompt_id)
        if state is None:
            return "not queued"
        if state[0] == "running":
            status, _ = self._request("POST", "/interrupt", body={"prompt_id": prompt_id})
            what = "interrupted"
        else:
            status, _ = self._request("POST", "/queue", body={"delete": [prompt_id]})
            what = "deleted"
        if status != 200:
            raise ClientError(f"cancel {prompt_id} on {self.server}: HTTP {status}")
        logger.info("prompt %s %s", prompt_id, what)
        return what

    def wait(self, prompt_id: str, timeout: float | None = None,
             on_progress: ProgressCallback | None = None) -> dict:
        """Block until the prompt finishes; return its history entry (``outputs``, ``status``).

        Progress is logged and passed to ``on_progress(event, data)``: ``("queued", {"position"})``,
        ``("running", {})``, ``("executing", {"node", "class_type"})``,
        ``("progress", {"node", "value", "max"})``, ``("cached", {"nodes"})``,
        ``("executed", {"node", "output"})``. Raises ExecutionFailed (error / interrupt),
        WaitTimeout when ``timeout`` seconds pass (None: no limit), ServerUnreachable.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        notify = on_progress or (lambda event, data: None)
        if self._ws is not None:
            try:
                self._follow_ws(prompt_id, deadline, notify)
            except WaitTimeout:
                raise
            except (OSError, ValueError) as e:  # WebSocketError, reset, bad UTF-8: poll instead
                self._drop_ws(e)
        entry = self._poll_history(prompt_id, deadline, notify)
        if self.active_prompt == prompt_id:
            self.active_prompt = None
        status = entry.get("status") or {}
        if status.get("status_str") == "error" or any(
                m[0] in ("execution_error", "execution_interrupted")
                for m in status.get("messages") or [] if isinstance(m, list) and m):
            for msg in status.get("messages") or []:
                if isinstance(msg, list) and len(msg) == 2 and \
                        msg[0] in ("execution_error", "execution_interrupted"):
                    raise ExecutionFailed(_execution_message(msg[0], msg[1] or {},
                                                             self._prompts.get(prompt_id)),
                                          msg[0], msg[1] or {})
            raise ExecutionFailed(f"prompt {prompt_id} finished with status "
                                  f"{status.get('status_str')!r}: {status}", "error", status)
        logger.info("prompt %s finished", prompt_id)
        return entry

    def _remaining(self, deadline: float | None, prompt_id: str) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"prompt {prompt_id} did not finish within the timeout; it may still "
                              f"be queued or running on {self.server} (POST /interrupt stops it)")
        return left

    def _follow_ws(self, prompt_id: str, deadline: float | None, notify: ProgressCallback) -> None:
        """Read websocket messages until the prompt is done; raise ExecutionFailed on errors."""
        prompt = self._prompts.get(prompt_id) or {}
        last_poll = time.monotonic()
        last_log: dict[Any, float] = {}
        while True:
            left = self._remaining(deadline, prompt_id)
            wait_s = self.quiet_poll_interval if left is None \
                else min(left, self.quiet_poll_interval)
            msg = self._ws.recv(wait_s)
            if msg is None or time.monotonic() - last_poll >= self.quiet_poll_interval:
                # quiet (model loading) or a missed message: ask /history whether it ended.
                last_poll = time.monotonic()
                if self.history(prompt_id, timeout=left) is not None:
                    return
                try:
                    if self.queue_state(prompt_id, timeout=left) is None:
                        return  # neither queued nor in history: let the poller decide
                except ClientError as e:
                    logger.debug("GET /queue failed: %s", e)
                if msg is None:
                    continue
            kind, payload = msg
            if kind == "binary":
                logger.debug("preview frame (%d bytes)", len(payload))
                continue
            try:
                event = json.loads(payload)
            except json.JSONDecodeError:
                logger.debug("non-JSON websocket text: %.200s", payload)
                continue
            etype, data = event.get("type"), event.get("data") or {}
            if not isinstance(data, dict) or data.get("prompt_id", prompt_id) != prompt_id:
                continue
            if etype == "executing":
                node = data.get("node")
                if node is None:
                    return
                ct = (prompt.get(str(node)) or {}).get("class_type", "?")
                logger.info("executing node %s (%s)", node, ct)
                notify("executing", {"node": node, "class_type": ct})
            elif etype == "progress":
                node, value, vmax = data.get("node"), data.get("value"), data.get("max")
                now = time.monotonic()
                if value == vmax or now - last_log.get(node, 0.0) >= 1.0:
                    last_log[node] = now
                    logger.info("node %s: %s/%s", node, value, vmax)
                notify("progress", {"node": node, "value": value, "max": vmax})
            elif etype == "execution_start":
                logger.info("prompt %s started", prompt_id)
                notify("running", {})
            elif etype == "execution_cached":
                nodes = data.get("nodes") or []
                if nodes:
                    logger.info("%d node(s) cached: %s", len(nodes), ", ".join(map(str, nodes)))
                notify("cached", {"nodes": nodes})
            elif etype == "executed":
                notify("executed", {"node": data.get("node"), "output": data.get("output")})
            elif etype == "execution_success":
                return
            elif etype in ("execution_error", "execution_interrupted"):
                if data.get("traceback"):
                    logger.debug("server traceback:\n%s", "".join(data["traceback"]))
                self.active_prompt = None
                raise ExecutionFailed(_execution_message(etype, data, prompt), etype, data)

    def _poll_history(self, prompt_id: str, deadline: float | None,
                      notify: ProgressCallback) -> dict:
        last_state: Any = object()
        missing = 0
        while True:
            left = self._remaining(deadline, prompt_id)
            entry = self.history(prompt_id, timeout=left)
            if entry is not None:
                status = entry.get("status") or {}
                if not status or status.get("completed") or \
                        status.get("status_str") in ("success", "error"):
                    return entry
            try:
                state = self.queue_state(prompt_id, timeout=left)
                missing = missing + 1 if state is None and entry is None else 0
            except ClientError as e:
                logger.debug("GET /queue failed: %s", e)
                state = None
            if missing >= 3:
                raise ClientError(
                    f"prompt {prompt_id} is neither queued, running nor in the history of "
                    f"{self.server}: it was deleted from the queue, the history was cleared, or "
                    "the server restarted")
            if state != last_state:
                last_state = state
                if state and state[0] == "pending":
                    logger.info("prompt %s waiting in the queue (position %d)", prompt_id, state[1])
                    notify("queued", {"position": state[1]})
                elif state:
                    logger.info("prompt %s running", prompt_id)
                    notify("running", {})
            left = self._remaining(deadline, prompt_id)
            time.sleep(self.poll_interval if left is None else min(self.poll_interval, left))

    def view(self, filename: str, subfolder: str = "", type: str = "output",
             timeout: float | None = None) -> bytes:
        """``GET /view?filename=&subfolder=&type=`` -> the file's bytes."""
        status, data = self._request("GET", "/view", query={"filename": filename,
                                                            "subfolder": subfolder, "type": type},
                                     timeout=timeout)
        if status != 200:
            raise ClientError(f"GET /view {type}/{subfolder}/{filename} on {self.server}: "
                              f"HTTP {status}: {data[:200].decode('utf-8', 'replace')}")
        return data

    def download_images(self, history: Mapping, out_dir: str | os.PathLike,
                        timeout: float | None = None) -> list[Path]:
        """Save every image of a history entry (or a ``{prompt_id: entry}`` reply) into ``out_dir``.

        Files keep the server's file name; an existing file is never overwritten (``name_1.png``).
        Returns the written paths in node order.
        """
        if "outputs" not in history and len(history) == 1:
            history = next(iter(history.values()))
        outputs = history.get("outputs") or {}
        out_dir = Path(out_dir)
        saved: list[Path] = []

        def node_key(nid: str):
            return (0, int(nid), "") if str(nid).isdigit() else (1, 0, str(nid))

        for nid in sorted(outputs, key=node_key):
            for key, items in (outputs[nid] or {}).items():
                if not isinstance(items, list):
                    continue
                for img in items:
                    if not isinstance(img, dict) or "filename" not in img:
                        continue
                    data = self.view(img["filename"], img.get("subfolder", ""),
                                     img.get("type", "output"), timeout=timeout)
                    out_dir.mkdir(parents=True, exist_ok=True)
                    name = Path(str(img["filename"]).replace("\\", "/")).name or f"{nid}_{key}.png"
                    path = out_dir / name
                    i = 1
                    while path.exists():
                        path = out_dir / f"{Path(name).stem}_{i}{Path(name).suffix}"
                        i += 1
                    tmp = path.with_name(path.name + ".part")
                    tmp.write_bytes(data)
                    tmp.replace(path)
                    logger.info("saved %s (node %s, %d bytes)", path, nid, len(data))
                    saved.append(path)
        return saved


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
    prompt = load_workflow(workflow) if not isinstance(workflow, Mapping) \
        else check_api_prompt(dict(workflow))
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
        from .client_multi import main_many, read_servers_file

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


_MULTI_SERVER_NAMES = frozenset({
    "PROMPT_COLUMNS", "MANY_COLUMNS", "PromptRow", "parse_prompt_row", "load_prompt_rows",
    "prompt_for_row", "ManyResult", "ServerPool", "run_many", "read_servers_file"})


def __getattr__(name: str):
    """The multi-server names, as they were importable from here before they moved to
    :mod:`lens_model.client_multi` (imported on first use: that module imports this one)."""
    if name in _MULTI_SERVER_NAMES:
        from . import client_multi

        return getattr(client_multi, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    # run the main of the imported module, not of this __main__ copy: lens_model.client_multi
    # imports lens_model.client, and the exceptions it raises must be the ones main() catches
    from . import client as _client

    sys.exit(_client.main())
