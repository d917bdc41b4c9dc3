"""One ComfyUI server over HTTP, with its ``/ws`` progress feed when ``websocket-client`` is there.

:class:`ComfyClient` queues an API prompt (``POST /prompt``; an HTTP 400 becomes
:class:`PromptValidationError` listing the node errors), follows it over the websocket
(``executing``, ``progress``, ``execution_error``, ``execution_interrupted``) or by polling
``GET /history/{prompt_id}`` and ``GET /queue``, cancels it (``POST /interrupt``,
``POST /queue {delete}``) and downloads its images (``GET /view``).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

from .client_workflow import check_api_prompt

try:  # the websocket-client package (requirements.txt); without it prompts are followed by polling
    import websocket as _wsclient
except ImportError:  # pragma: no cover - exercised only where the package is missing
    _wsclient = None

logger = logging.getLogger(__name__)

DEFAULT_SERVER = "http://127.0.0.1:8188"
DEFAULT_TIMEOUT = 900.0

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
        """Read websocket messages until the prompt is done; raise ExecutionFailed on errors.

        While the feed is quiet (a model loading) or a message may have been missed, ``/history``
        and ``/queue`` are asked every ``quiet_poll_interval`` seconds whether the prompt ended.
        """
        prompt = self._prompts.get(prompt_id) or {}
        last_poll = time.monotonic()
        last_log: dict[Any, float] = {}
        while True:
            left = self._remaining(deadline, prompt_id)
            wait_s = self.quiet_poll_interval if left is None \
                else min(left, self.quiet_poll_interval)
            msg = self._ws.recv(wait_s)
            if msg is None or time.monotonic() - last_poll >= self.quiet_poll_interval:
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
            if self._ws_event(event, prompt_id, prompt, notify, last_log):
                return

    def _ws_event(self, event: dict, prompt_id: str, prompt: Mapping, notify: ProgressCallback,
                  last_log: dict[Any, float]) -> bool:
        """Log and report one ``/ws`` event of ``prompt_id`` (others are ignored); True once the
        prompt has finished. ``last_log``: when each node's progress was last logged (at most one
        line a second per node). Raises ExecutionFailed for an error or an interrupt."""
        etype, data = event.get("type"), event.get("data") or {}
        if not isinstance(data, dict) or data.get("prompt_id", prompt_id) != prompt_id:
            return False
        if etype == "executing":
            node = data.get("node")
            if node is None:
                return True
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
            return True
        elif etype in ("execution_error", "execution_interrupted"):
            if data.get("traceback"):
                logger.debug("server traceback:\n%s", "".join(data["traceback"]))
            self.active_prompt = None
            raise ExecutionFailed(_execution_message(etype, data, prompt), etype, data)
        return False

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

