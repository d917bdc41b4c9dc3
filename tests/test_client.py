"""Tests for lens_model.client against a fake ComfyUI server on 127.0.0.1 (ephemeral port).

The fake implements POST /prompt, GET /history/<id>, GET /queue, GET /view and a minimal RFC 6455
/ws endpoint (server frames made with websocket-client's ABNF), or a 404 there to exercise the
polling path. Nothing else is contacted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import websocket

from lens_model import client as lc
from lens_model import client_multi as cm
from lens_model import client_server, client_workflow

PNG_BYTES = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00"
             b"\x00\x90wS\xde" + b"fake-image-payload-" * 3)

# Our pack: two text encoders wired to LensNodesSampler's positive / negative.
LENS_API = {
    "1": {"class_type": "LensNodesDiTLoader", "inputs": {"file": "lens_bf16.safetensors"},
          "_meta": {"title": "Lens DiT Loader"}},
    "2": {"class_type": "LensNodesTextEncoderLoader", "inputs": {"file": "gpt_oss.safetensors"},
          "_meta": {"title": "TE loader"}},
    "3": {"class_type": "LensNodesTextEncode",
          "inputs": {"text_encoder": ["2", 0], "text": "old negative"},
          "_meta": {"title": "Negative"}},
    "4": {"class_type": "LensNodesTextEncode",
          "inputs": {"text_encoder": ["2", 0], "text": "old positive"},
          "_meta": {"title": "Positive"}},
    "5": {"class_type": "LensNodesResolution", "inputs": {"base": 1024, "ratio": "1:1"},
          "_meta": {"title": "Resolution"}},
    "6": {"class_type": "LensNodesEmptyLatent",
          "inputs": {"width": ["5", 0], "height": ["5", 1], "batch_size": 1},
          "_meta": {"title": "Empty Latent"}},
    # negative deliberately listed before positive in the node ids above, and the sampler's
    # positive points at node 4: the choice must come from the wiring, not the order.
    "7": {"class_type": "LensNodesSampler",
          "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["3", 0],
                     "latent": ["6", 0], "seed": 1, "steps": 20, "cfg": 5.0,
                     "schedule": "upstream", "denoise": 1.0, "noise_layout": "upstream",
                     "width": 1024, "height": 1024},
          "_meta": {"title": "Sampler"}},
    "8": {"class_type": "LensNodesVAELoader", "inputs": {"file": "flux2-vae.safetensors"}},
    "9": {"class_type": "LensNodesVAEDecode", "inputs": {"vae": ["8", 0], "latent": ["7", 0]}},
    "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "Lens"}},
}

# Core nodes, shaped like the core template's API form (SamplerCustom, ModelSamplingFlux, ...).
CORE_API = {
    "10": {"class_type": "UNETLoader", "inputs": {"unet_name": "lens_bf16.safetensors",
                                                  "weight_dtype": "default"}},
    "11": {"class_type": "CLIPLoader", "inputs": {"clip_name": "gpt_oss_20b_nvfp4.safetensors",
                                                  "type": "lens", "device": "default"}},
    "12": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["11", 0], "text": ""},
           "_meta": {"title": "CLIP Text Encode (Prompt)"}},
    "13": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["11", 0], "text": "a cat"},
           "_meta": {"title": "CLIP Text Encode (Prompt)"}},
    "14": {"class_type": "EmptyLatentImage", "inputs": {"width": 1440, "height": 1440,
                                                        "batch_size": 1}},
    "15": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["10", 0], "max_shift": 1.15,
                                                         "base_shift": 0.5, "width": 1440,
                                                         "height": 1440}},
    "16": {"class_type": "CFGNorm", "inputs": {"model": ["15", 0], "strength": 1}},
    "17": {"class_type": "BasicScheduler", "inputs": {"model": ["16", 0], "scheduler": "simple",
                                                      "steps": 20, "denoise": 1}},
    "18": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
    # the positive conditioning passes through a FluxGuidance-like node on its way
    "19": {"class_type": "ConditioningSetTimestepRange",
           "inputs": {"conditioning": ["13", 0], "start": 0.0, "end": 1.0}},
    "20": {"class_type": "SamplerCustom",
           "inputs": {"model": ["16", 0], "add_noise": True, "noise_seed": 5, "cfg": 5,
                      "positive": ["19", 0], "negative": ["12", 0], "sampler": ["18", 0],
                      "sigmas": ["17", 0], "latent_image": ["14", 0]}},
    "21": {"class_type": "VAELoader", "inputs": {"vae_name": "flux2-vae.safetensors"}},
    "22": {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["21", 0]}},
    "23": {"class_type": "SaveImage", "inputs": {"filename_prefix": "Lens", "images": ["22", 0]}},
}


# ------------------------------------------------------------------------------------------------
# Fake ComfyUI
# ------------------------------------------------------------------------------------------------
class _JsonHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler of the fake ComfyUI servers: quiet, one response per connection."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a):  # keep test output clean
        pass

    def _send(self, code, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True


class FakeComfy:
    """Scenario knobs: ``validation_error``, ``exec_error``, ``interrupted``, ``pending_polls``,
    ``never_done``, ``ws`` (serve /ws or 404)."""

    def __init__(self, ws=False, pending_polls=1, validation_error=False, exec_error=False,
                 interrupted=False, never_done=False, ws_close_early=False, vanish=False,
                 queue_pending=False):
        self.ws = ws
        self.vanish = vanish
        self.queue_pending = queue_pending
        self.control_posts: list[tuple[str, dict]] = []
        self.ws_close_early = ws_close_early
        self.pending_polls = pending_polls
        self.validation_error = validation_error
        self.exec_error = exec_error
        self.interrupted = interrupted
        self.never_done = never_done
        self.posted: list[dict] = []
        self.history_polls = 0
        self.view_queries: list[dict] = []
        self.ws_requests: list[str] = []
        self.pong_payloads: list[bytes] = []
        self.prompt_posted = threading.Event()
        self.prompt_id = None
        fake = self

        class Handler(_JsonHandler):

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n))
                if self.path in ("/interrupt", "/queue"):
                    fake.control_posts.append((self.path, body))
                    return self._send(200, b"", "text/plain")
                if self.path != "/prompt":
                    return self._send(404, {"error": "not found"})
                fake.posted.append(body)
                if fake.validation_error:
                    return self._send(400, {
                        "error": {"type": "prompt_outputs_failed_validation",
                                  "message": "Prompt outputs failed validation", "details": "",
                                  "extra_info": {}},
                        "node_errors": {"7": {"errors": [{
                            "type": "value_not_in_list", "message": "Value not in list",
                            "details": "mode: 'bogus' not in ['upstream', 'comfyui']",
                            "extra_info": {"input_name": "mode"}}],
                            "dependent_outputs": ["10"], "class_type": "LensNodesSampler"}}})
                fake.prompt_id = body.get("prompt_id") or "p-1"
                fake.prompt_posted.set()
                return self._send(200, {"prompt_id": fake.prompt_id, "number": 3,
                                        "node_errors": {}})

            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                if u.path == "/ws":
                    fake.ws_requests.append(self.path)
                    if not fake.ws:
                        return self._send(404, b"404: Not Found", "text/plain")
                    return self._websocket()
                if u.path.startswith("/history/"):
                    pid = urllib.parse.unquote(u.path[len("/history/"):])
                    fake.history_polls += 1
                    if pid != fake.prompt_id or fake.never_done \
                            or fake.history_polls <= fake.pending_polls:
                        return self._send(200, {})  # real ComfyUI: {} until it has finished
                    return self._send(200, {pid: fake.history_entry(pid)})
                if u.path == "/queue":
                    item = [[3, fake.prompt_id, {}, {}, ["10"]]] if fake.prompt_id else []
                    if fake.vanish:
                        item = []
                    other = [[1, "other", {}, {}, []]]
                    if fake.queue_pending:
                        return self._send(200, {"queue_running": other,
                                                "queue_pending": item + [[2, "x", {}, {}, []]]})
                    return self._send(200, {"queue_running": item, "queue_pending": []})
                if u.path == "/view":
                    q = dict(urllib.parse.parse_qsl(u.query, keep_blank_values=True))
                    fake.view_queries.append(q)
                    if q.get("filename") in ("Lens_00001_.png", "Lens_00002_.png"):
                        return self._send(200, PNG_BYTES + q["filename"].encode(), "image/png")
                    return self._send(404, b"missing", "text/plain")
                return self._send(404, {"error": "not found"})

            # -- minimal websocket server side -------------------------------------------------
            def _websocket(self):
                key = self.headers["Sec-WebSocket-Key"]
                accept = base64.b64encode(hashlib.sha1(
                    (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.end_headers()
                self.wfile.flush()
                self.close_connection = True
                self.request.settimeout(5)
                send = lambda op, payload, fin=True: (  # noqa: E731  server frames are unmasked
                    self.wfile.write(websocket.ABNF(fin=int(fin), opcode=op, mask_value=0,
                                                    data=payload).format()),
                    self.wfile.flush())
                text = lambda t, d: send(1, json.dumps({"type": t, "data": d}).encode())  # noqa
                text("status", {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "x"})
                if fake.ws_close_early:
                    fake.prompt_posted.wait(5)
                    return send(0x8, struct.pack(">H", 1001))
                if not fake.prompt_posted.wait(5):
                    return
                pid = fake.prompt_id
                text("execution_start", {"prompt_id": pid, "timestamp": 1})
                text("executing", {"node": "7", "prompt_id": "someone-else"})  # ignored
                text("execution_cached", {"nodes": ["1", "2"], "prompt_id": pid})
                text("executing", {"node": "7", "display_node": "7", "prompt_id": pid})
                # a ping: the client must answer with a masked pong carrying the same payload
                send(0x9, b"ping-1")
                hdr = self.rfile.read(2)
                n = hdr[1] & 0x7F
                mask_key = self.rfile.read(4) if hdr[1] & 0x80 else b""
                body = self.rfile.read(n)
                if mask_key:
                    body = bytes(b ^ mask_key[i % 4] for i, b in enumerate(body))
                    fake.pong_payloads.append(body)
                text("progress", {"value": 1, "max": 2, "prompt_id": pid, "node": "7"})
                send(2, b"\x00\x00\x00\x01" + b"\xff" * 300)  # binary preview frame, 126-length
                # a fragmented text message: first frame + continuation
                msg = json.dumps({"type": "progress", "data": {"value": 2, "max": 2,
                                                               "prompt_id": pid, "node": "7"}})
                send(1, msg[:10].encode(), fin=False)
                send(0, msg[10:].encode(), fin=True)
                if fake.exec_error:
                    text("execution_error", {
                        "prompt_id": pid, "node_id": "7", "node_type": "LensNodesSampler",
                        "exception_type": "torch.OutOfMemoryError",
                        "exception_message": "CUDA out of memory. Tried to allocate 2 GiB",
                        "traceback": ["Traceback...\n"], "executed": []})
                elif fake.interrupted:
                    text("execution_interrupted", {"prompt_id": pid, "node_id": "7",
                                                   "node_type": "LensNodesSampler", "executed": []})
                else:
                    text("executed", {"node": "10", "prompt_id": pid, "output": {
                        "images": [{"filename": "Lens_00001_.png", "subfolder": "",
                                    "type": "output"}], "pad": "x" * 200}})
                    text("execution_success", {"prompt_id": pid, "timestamp": 2})
                    text("executing", {"node": None, "prompt_id": pid})
                send(0x8, struct.pack(">H", 1000))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def history_entry(self, pid):
        if self.exec_error:
            return {"prompt": [3, pid, {}, {}, ["10"]], "outputs": {},
                    "status": {"status_str": "error", "completed": False, "messages": [
                        ["execution_start", {"prompt_id": pid, "timestamp": 1}],
                        ["execution_error", {
                            "prompt_id": pid, "node_id": "7", "node_type": "LensNodesSampler",
                            "exception_type": "RuntimeError",
                            "exception_message": "mat1 and mat2 shapes cannot be multiplied",
                            "traceback": [], "executed": ["1"]}]]}}
        return {"prompt": [3, pid, {}, {}, ["10"]],
                "outputs": {"10": {"images": [
                    {"filename": "Lens_00001_.png", "subfolder": "", "type": "output"},
                    {"filename": "Lens_00002_.png", "subfolder": "sub", "type": "output"}]}},
                "status": {"status_str": "success", "completed": True, "messages": []}}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def make_server():
    servers = []

    def make(**kw):
        s = FakeComfy(**kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def _write(tmp_path, obj, name="wf_api.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


# ------------------------------------------------------------------------------------------------
# apply_overrides (pure)
# ------------------------------------------------------------------------------------------------
def test_overrides_lens_nodes_follow_wiring():
    before = json.dumps(LENS_API, sort_keys=True)
    out = lc.apply_overrides(LENS_API, prompt_text="a red fox", negative="blurry", seed=42,
                             width=768, height=512, steps=8, cfg=3.5)
    assert json.dumps(LENS_API, sort_keys=True) == before  # input untouched
    assert out["4"]["inputs"]["text"] == "a red fox"       # wired to sampler.positive
    assert out["3"]["inputs"]["text"] == "blurry"          # wired to sampler.negative
    s = out["7"]["inputs"]
    assert (s["seed"], s["steps"], s["cfg"], s["width"], s["height"]) == (42, 8, 3.5, 768, 512)
    assert out["6"]["inputs"]["width"] == 768 and out["6"]["inputs"]["height"] == 512
    assert out["5"]["inputs"] == {"base": 1024, "ratio": "1:1"}  # no width/height inputs there
    assert isinstance(s["cfg"], float) and isinstance(s["seed"], int)


def test_overrides_only_touch_existing_inputs():
    wf = json.loads(json.dumps(LENS_API))
    del wf["7"]["inputs"]["width"], wf["7"]["inputs"]["height"]
    out = lc.apply_overrides(wf, width=640, height=384)
    assert "width" not in out["7"]["inputs"] and "height" not in out["7"]["inputs"]
    assert (out["6"]["inputs"]["width"], out["6"]["inputs"]["height"]) == (640, 384)


def test_turbo_sampler_without_negative():
    # LensNodesSampler's negative is optional: a Turbo graph has a single text encoder
    wf = json.loads(json.dumps(LENS_API))
    del wf["3"], wf["7"]["inputs"]["negative"]
    out = lc.apply_overrides(wf, prompt_text="turbo fox")
    assert out["4"]["inputs"]["text"] == "turbo fox"
    with pytest.raises(ValueError, match="--negative: found no negative text-encode node"):
        lc.apply_overrides(wf, negative="blur")


def test_overrides_core_nodes():
    out = lc.apply_overrides(CORE_API, prompt_text="a dog", negative="ugly", seed=9, width=1024,
                             height=768, steps=4, cfg=1.0)
    assert out["13"]["inputs"]["text"] == "a dog"   # through ConditioningSetTimestepRange
    assert out["12"]["inputs"]["text"] == "ugly"
    assert out["20"]["inputs"]["noise_seed"] == 9 and out["20"]["inputs"]["cfg"] == 1.0
    assert out["17"]["inputs"]["steps"] == 4
    for nid in ("14", "15"):
        assert (out[nid]["inputs"]["width"], out[nid]["inputs"]["height"]) == (1024, 768)
    assert CORE_API["13"]["inputs"]["text"] == "a cat"


def test_negative_derived_from_positive_is_refused():
    wf = json.loads(json.dumps(CORE_API))
    wf["30"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["13", 0]}}
    wf["20"]["inputs"]["negative"] = ["30", 0]
    del wf["12"]
    out = lc.apply_overrides(wf, prompt_text="fine")
    assert out["13"]["inputs"]["text"] == "fine"
    with pytest.raises(ValueError, match="negative input comes from the positive"):
        lc.apply_overrides(wf, negative="nope")


def test_override_without_target_and_set_errors():
    wf = {"1": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}},
          "2": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}
    with pytest.raises(ValueError, match="--seed: no node"):
        lc.apply_overrides(wf, seed=1)
    with pytest.raises(ValueError, match="--prompt: found no prompt text-encode node"):
        lc.apply_overrides(wf, prompt_text="x")
    with pytest.raises(ValueError, match="no node '99'"):
        lc.apply_overrides(wf, sets=["99.image=1"])
    with pytest.raises(ValueError, match="NODE_ID.INPUT=VALUE"):
        lc.apply_overrides(wf, sets=["2image=1"])


SHIPPED_API = sorted((Path(__file__).resolve().parents[1] / "workflows" / "api").glob("*_api.json"))


@pytest.mark.parametrize("path", SHIPPED_API, ids=lambda p: p.name)
def test_shipped_api_workflows_accept_overrides(path):
    wf = lc.load_workflow(path)
    out = lc.apply_overrides(wf, prompt_text="client override check", seed=1234, steps=3,
                             width=512, height=768)
    pos, _ = lc.find_text_encoders(out)
    assert pos and all(out[n]["inputs"]["text"] == "client override check" for n in pos)
    changed = [n for n in out if out[n] != wf[n]]
    assert set(pos) <= set(changed)


def test_history_style_wrapper_is_unwrapped():
    out = lc.apply_overrides({"prompt": LENS_API}, seed=3)
    assert set(out) == set(LENS_API) and out["7"]["inputs"]["seed"] == 3


def test_set_values_are_json_or_text():
    assert lc.parse_set('7.cfg=2.5') == ("7", "cfg", 2.5)
    assert lc.parse_set('4.text=a red fox, 8k') == ("4", "text", "a red fox, 8k")
    assert lc.parse_set('4.text="123"') == ("4", "text", "123")
    assert lc.parse_set('57:8.latent=["6", 0]') == ("57:8", "latent", ["6", 0])
    out = lc.apply_overrides(LENS_API, seed=1, sets=["7.seed=5", "7.mode=\"comfyui\""])
    assert out["7"]["inputs"]["seed"] == 5 and out["7"]["inputs"]["mode"] == "comfyui"


def test_ui_format_rejected(tmp_path):
    ui = {"last_node_id": 3, "last_link_id": 1, "nodes": [{"id": 1, "type": "SaveImage"}],
          "links": [], "version": 0.4}
    p = _write(tmp_path, ui, "lens_t2i.json")
    with pytest.raises(ValueError, match=r"UI \(editor\) workflow.*Save \(API\).*_api\.json"):
        lc.load_workflow(p)
    _write(tmp_path, LENS_API, "lens_t2i_api.json")
    with pytest.raises(ValueError, match=r"use .*lens_t2i_api\.json"):
        lc.load_workflow(p)
    assert lc.main([str(p), "--server", "http://127.0.0.1:9", "--timeout", "1"]) == 2
    with pytest.raises(ValueError, match="not an API node"):
        lc.check_api_prompt({"1": {"inputs": {}}})


# ------------------------------------------------------------------------------------------------
# against the fake server
# ------------------------------------------------------------------------------------------------
def test_polling_path_end_to_end(make_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lens_model")
    srv = make_server(ws=False, pending_polls=2)
    paths = lc.run_workflow(LENS_API, server=srv.url, output_dir=tmp_path / "out", timeout=10,
                            prompt_text="a lighthouse", negative="fog", seed=123, steps=4,
                            poll_interval=0.02)
    assert len(srv.posted) == 1
    body = srv.posted[0]
    assert body["client_id"] and body["prompt"]["4"]["inputs"]["text"] == "a lighthouse"
    assert body["prompt"]["3"]["inputs"]["text"] == "fog"
    sampler = body["prompt"]["7"]["inputs"]
    assert sampler["seed"] == 123 and sampler["steps"] == 4
    assert srv.ws_requests and srv.history_polls >= 3   # ws 404 -> polled past two "still running"
    assert [p.name for p in paths] == ["Lens_00001_.png", "Lens_00002_.png"]
    assert paths[0].read_bytes() == PNG_BYTES + b"Lens_00001_.png"
    assert paths[1].read_bytes() == PNG_BYTES + b"Lens_00002_.png"
    assert srv.view_queries[1] == {"filename": "Lens_00002_.png", "subfolder": "sub",
                                   "type": "output"}
    assert "running" in caplog.text
    # a second download never overwrites
    again = lc.ComfyClient(srv.url).download_images(srv.history_entry(srv.prompt_id),
                                                    tmp_path / "out")
    assert [p.name for p in again] == ["Lens_00001__1.png", "Lens_00002__1.png"]


def test_websocket_progress_and_pong(make_server, tmp_path):
    srv = make_server(ws=True, pending_polls=0)
    events = []
    with lc.ComfyClient(srv.url, poll_interval=0.02) as c:
        pid = c.queue(lc.apply_overrides(LENS_API, prompt_text="a boat"))
        assert c._ws is not None
        entry = c.wait(pid, timeout=10, on_progress=lambda e, d: events.append((e, d)))
        paths = c.download_images({pid: entry}, tmp_path)
    assert srv.ws_requests[0] == f"/ws?clientId={c.client_id}"
    assert srv.posted[0]["client_id"] == c.client_id
    assert srv.posted[0]["prompt"]["4"]["inputs"]["text"] == "a boat"
    assert srv.pong_payloads == [b"ping-1"]
    execs = [d for e, d in events if e == "executing"]   # the other prompt's node is skipped
    assert execs == [{"node": "7", "class_type": "LensNodesSampler"}]
    assert [(d["value"], d["max"]) for e, d in events if e == "progress"] == [(1, 2), (2, 2)]
    assert ("cached", {"nodes": ["1", "2"]}) in events
    assert paths[0].read_bytes() == PNG_BYTES + b"Lens_00001_.png"


def test_websocket_closed_early_falls_back_to_polling(make_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lens_model")
    srv = make_server(ws=True, ws_close_early=True, pending_polls=1)
    paths = lc.run_workflow(LENS_API, server=srv.url, output_dir=tmp_path, timeout=10,
                            poll_interval=0.02)
    assert "websocket lost" in caplog.text and srv.history_polls >= 2
    assert [p.read_bytes() for p in paths] == [PNG_BYTES + b"Lens_00001_.png",
                                               PNG_BYTES + b"Lens_00002_.png"]


def test_websocket_execution_error_and_interrupt(make_server):
    srv = make_server(ws=True, exec_error=True)
    with lc.ComfyClient(srv.url, poll_interval=0.02) as c:
        pid = c.queue(LENS_API)
        with pytest.raises(lc.ExecutionFailed,
                           match="node 7 .LensNodesSampler.*CUDA out of memory") as ei:
            c.wait(pid, timeout=10)
    assert ei.value.kind == "execution_error"
    srv2 = make_server(ws=True, interrupted=True)
    with lc.ComfyClient(srv2.url, poll_interval=0.02) as c:
        pid = c.queue(LENS_API)
        with pytest.raises(lc.ExecutionFailed, match="interrupted") as ei:
            c.wait(pid, timeout=10)
    assert ei.value.kind == "execution_interrupted"


def test_cli_end_to_end(make_server, tmp_path, capsys):
    srv = make_server(ws=True)
    wf = _write(tmp_path, CORE_API)
    out = tmp_path / "imgs"
    rc = lc.main([str(wf), "--server", srv.url, "--output-dir", str(out), "--prompt", "a kite",
                  "--seed", "77", "--width", "512", "--height", "512", "--cfg", "4",
                  "--set", "18.sampler_name=\"euler_ancestral\"", "--timeout", "10",
                  "--poll-interval", "0.02"])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "Lens_00001_.png"), str(out / "Lens_00002_.png")]
    p = srv.posted[0]["prompt"]
    assert p["13"]["inputs"]["text"] == "a kite" and p["20"]["inputs"]["noise_seed"] == 77
    assert p["14"]["inputs"]["width"] == 512
    assert p["18"]["inputs"]["sampler_name"] == "euler_ancestral"
    assert (out / "Lens_00002_.png").read_bytes() == PNG_BYTES + b"Lens_00002_.png"


def test_cli_validation_error_400(make_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lens_model")
    srv = make_server(validation_error=True)
    rc = lc.main([str(_write(tmp_path, LENS_API)), "--server", srv.url, "--no-websocket",
                  "--output-dir", str(tmp_path / "o"), "--timeout", "10"])
    assert rc == 1
    assert "prompt_outputs_failed_validation" in caplog.text
    assert "node 7 (LensNodesSampler) [input mode]: value_not_in_list: Value not in list: " \
           "mode: 'bogus' not in ['upstream', 'comfyui']" in caplog.text
    assert not (tmp_path / "o").exists()


def test_cli_execution_error_from_history(make_server, tmp_path, caplog):
    srv = make_server(ws=False, exec_error=True)
    rc = lc.main([str(_write(tmp_path, LENS_API)), "--server", srv.url, "--output-dir",
                  str(tmp_path / "o"), "--timeout", "10", "--poll-interval", "0.02"])
    assert rc == 1
    assert "execution failed in node 7 (LensNodesSampler): RuntimeError: mat1 and mat2" \
        in caplog.text


def test_timeout_and_unreachable(make_server, tmp_path, caplog):
    srv = make_server(ws=False, never_done=True)
    t0 = time.monotonic()
    with pytest.raises(lc.WaitTimeout, match="did not finish"):
        lc.run_workflow(LENS_API, server=srv.url, output_dir=tmp_path, timeout=0.5,
                        poll_interval=0.05)
    assert time.monotonic() - t0 < 3
    wf = str(_write(tmp_path, LENS_API))
    assert lc.main([wf, "--server", srv.url, "--timeout", "0.3", "--poll-interval", "0.05"]) == 3
    # a closed port on 127.0.0.1
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    assert lc.main([wf, "--server", f"http://127.0.0.1:{port}", "--timeout", "5"]) == 1
    assert "cannot reach ComfyUI" in caplog.text


def test_vanished_prompt_is_reported(make_server, tmp_path):
    srv = make_server(ws=False, never_done=True, vanish=True)
    with pytest.raises(lc.ClientError, match="neither queued, running nor in the history"):
        lc.run_workflow(LENS_API, server=srv.url, output_dir=tmp_path, timeout=10,
                        poll_interval=0.02)


def test_cancel_running_and_pending(make_server):
    srv = make_server(ws=False, never_done=True)
    c = lc.ComfyClient(srv.url, use_websocket=False)
    pid = c.queue(LENS_API)
    assert c.cancel(pid) == "interrupted"
    srv2 = make_server(ws=False, never_done=True, queue_pending=True)
    c2 = lc.ComfyClient(srv2.url, use_websocket=False)
    pid2 = c2.queue(LENS_API)
    assert c2.queue_state(pid2) == ("pending", 2)
    assert c2.cancel(pid2) == "deleted"
    assert srv.control_posts == [("/interrupt", {"prompt_id": pid})]
    assert srv2.control_posts == [("/queue", {"delete": [pid2]})]


def test_cli_ctrl_c_cancels_the_prompt(make_server, tmp_path, monkeypatch, caplog):
    srv = make_server(ws=False, never_done=True)

    def interrupted_wait(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(lc.ComfyClient, "wait", interrupted_wait)
    rc = lc.main([str(_write(tmp_path, LENS_API)), "--server", srv.url, "--timeout", "10"])
    assert rc == 130
    assert srv.control_posts == [("/interrupt", {"prompt_id": srv.prompt_id})]
    assert "interrupted" in caplog.text


def test_dry_run_prints_prompt(tmp_path, capsys):
    rc = lc.main([str(_write(tmp_path, LENS_API)), "--dry-run", "--prompt", "x", "--steps", "3"])
    assert rc == 0
    p = json.loads(capsys.readouterr().out)
    assert p["4"]["inputs"]["text"] == "x" and p["7"]["inputs"]["steps"] == 3


# ------------------------------------------------------------------------------------------------
# several servers, one prompts file
# ------------------------------------------------------------------------------------------------
class MultiFake:
    """A fake ComfyUI that takes many prompts: each finishes ``runs_for`` history polls after it
    was queued (``hold``: never), and its image bytes name the prompt text, seed and server. No
    websocket (404): prompts are followed by polling."""

    def __init__(self, name, runs_for=2, hold=False):
        self.name, self.runs_for, self.hold = name, runs_for, hold
        self.prompts: dict[str, dict] = {}
        self.polls: dict[str, int] = {}
        self.lock = threading.Lock()
        self.got_prompt = threading.Event()
        self.control_posts: list[tuple[str, dict]] = []
        fake = self

        class Handler(_JsonHandler):

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path in ("/interrupt", "/queue"):
                    fake.control_posts.append((self.path, body))
                    return self._send(200, b"", "text/plain")
                with fake.lock:
                    fake.prompts[body["prompt_id"]] = body["prompt"]
                    fake.polls[body["prompt_id"]] = 0
                fake.got_prompt.set()
                return self._send(200, {"prompt_id": body["prompt_id"], "number": 1,
                                        "node_errors": {}})

            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                if u.path.startswith("/history/"):
                    pid = urllib.parse.unquote(u.path[len("/history/"):])
                    with fake.lock:
                        if pid not in fake.prompts:
                            return self._send(200, {})
                        fake.polls[pid] += 1
                        done = not fake.hold and fake.polls[pid] > fake.runs_for
                    if not done:
                        return self._send(200, {})
                    return self._send(200, {pid: {"outputs": {"10": {"images": [
                        {"filename": f"{pid}.png", "subfolder": "", "type": "output"}]}},
                        "status": {"status_str": "success", "completed": True}}})
                if u.path == "/queue":
                    with fake.lock:
                        live = [pid for pid in fake.prompts
                                if fake.hold or fake.polls[pid] <= fake.runs_for]
                    items = [[i, pid, {}, {}, ["10"]] for i, pid in enumerate(live)]
                    return self._send(200, {"queue_running": items[:1],
                                            "queue_pending": items[1:]})
                if u.path == "/view":
                    pid = dict(urllib.parse.parse_qsl(u.query))["filename"][:-4]
                    inputs = fake.prompts[pid]
                    data = (PNG_BYTES + inputs["4"]["inputs"]["text"].encode() + b"/seed="
                            + str(inputs["7"]["inputs"]["seed"]).encode())
                    return self._send(200, data, "image/png")
                return self._send(404, b"404: Not Found", "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.stopped = False

    def stop(self):
        if not self.stopped:
            self.stopped = True
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=5)


@pytest.fixture
def multi_servers():
    made = []

    def make(*a, **kw):
        made.append(MultiFake(*a, **kw))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def _prompts_file(tmp_path, n):
    rows = [{"id": f"r{i}", "prompt": f"prompt {i}", "seed": 100 + i} for i in range(n)]
    rows.insert(3, {"id": "bad", "seed": 1})          # no prompt: reported, the rest still run
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _expected(i):
    return PNG_BYTES + f"prompt {i}/seed={100 + i}".encode()


def test_many_servers_one_stopped_mid_run(multi_servers, tmp_path, caplog):
    a, b, c = multi_servers("a"), multi_servers("b", hold=True), multi_servers("c")
    wf = _write(tmp_path, LENS_API)
    prompts = _prompts_file(tmp_path, 8)
    servers = tmp_path / "servers.txt"
    servers.write_text(f"# the farm\n{c.url}\n\n")
    stopper = threading.Thread(target=lambda: b.got_prompt.wait(10) and b.stop(), daemon=True)
    stopper.start()
    out = tmp_path / "out"
    status = lc.main([str(wf), "--prompts", str(prompts), "--server", a.url, "--server", b.url,
                      "--servers-file", str(servers), "--output-dir", str(out),
                      "--no-websocket", "--poll-interval", "0.01", "--timeout", "30",
                      "--steps", "3"])
    stopper.join(5)
    assert status == 1                                   # the bad row
    assert "line 4: no 'prompt'" in caplog.text
    assert b.stopped and b.prompts                       # b took prompts, then went away
    records = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(f"r{i}" for i in range(8))   # each once
    for r in records:
        i = int(r["id"][1:])
        assert (out / r["file"]).read_bytes() == _expected(i)
        assert r["server"] in (a.url, c.url) and r["seed"] == 100 + i
    # every prompt reached a live server once and carried the command line's --steps
    done = {**a.prompts, **c.prompts}
    assert len(done) == 8 and all(p["7"]["inputs"]["steps"] == 3 for p in done.values())
    assert a.prompts and c.prompts                       # spread over both live servers

    # a rerun finds every row in the manifest and queues nothing
    n_a, n_c = len(a.prompts), len(c.prompts)
    assert lc.main([str(wf), "--prompts", str(prompts), "--server", a.url, "--server", c.url,
                    "--output-dir", str(out), "--no-websocket", "--timeout", "30"]) == 1
    assert (len(a.prompts), len(c.prompts)) == (n_a, n_c)


def test_many_servers_ctrl_c_cancels_everywhere(multi_servers, tmp_path, monkeypatch):
    a, b = multi_servers("a", hold=True), multi_servers("b", hold=True)
    rows, errors = cm.load_prompt_rows(_prompts_file(tmp_path, 4))
    assert [e.split(":")[0] for e in errors] == ["line 4"]
    real = cm.ServerPool.next_done
    calls = []

    def interrupt_later(self, timeout):
        calls.append(1)
        if len(self.in_flight) == 4 or len(calls) > 200:
            raise KeyboardInterrupt
        return real(self, 0.01)

    monkeypatch.setattr(cm.ServerPool, "next_done", interrupt_later)
    with pytest.raises(KeyboardInterrupt):
        cm.run_many(LENS_API, rows, [a.url, b.url], tmp_path / "out", per_server=2,
                    use_websocket=False, poll_interval=0.01)
    cancelled = {body.get("prompt_id") or body["delete"][0]
                 for srv in (a, b) for _, body in srv.control_posts}
    assert cancelled == set(a.prompts) | set(b.prompts) and len(cancelled) == 4


def test_every_option_is_in_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Queue workflows from the command line"):]
    section = section[:section.index("## Behaviour choices")]
    for action in lc.build_parser()._actions:
        for opt in action.option_strings:
            if opt not in ("-h", "--help"):
                assert opt in section, opt


def test_without_websocket_client_the_client_polls(make_server, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="lens_model")
    monkeypatch.setattr(client_server, "_wsclient", None)  # the package is not installed
    srv = make_server(ws=True, pending_polls=1)
    paths = lc.run_workflow(LENS_API, server=srv.url, output_dir=tmp_path, timeout=10,
                            poll_interval=0.02)
    assert "websocket-client" in caplog.text and not srv.ws_requests
    assert [p.name for p in paths] == ["Lens_00001_.png", "Lens_00002_.png"]


def test_many_servers_a_prompt_past_its_timeout_is_cancelled_and_fails(multi_servers, tmp_path):
    slow = multi_servers("slow", hold=True)
    rows, _ = cm.load_prompt_rows(_prompts_file(tmp_path, 1))
    result = cm.run_many(LENS_API, rows, [slow.url], tmp_path / "out", retries=1,
                         use_websocket=False, poll_interval=0.01, prompt_timeout=0.3)
    assert list(result.failed) == ["r0"] and "did not finish" in result.failed["r0"]
    assert len(slow.prompts) == 2                        # tried twice, the server kept
    cancelled = [body for path, body in slow.control_posts]
    assert len(cancelled) == 2
    with pytest.raises(ValueError, match="--per-server"):
        cm.run_many(LENS_API, rows, [slow.url], tmp_path / "out", per_server=0)


def test_the_client_module_re_exports_its_parts():
    assert lc.run_many is cm.run_many and lc.ServerPool is cm.ServerPool
    assert lc.load_prompt_rows is cm.load_prompt_rows
    assert lc.ComfyClient is client_server.ComfyClient and lc.ClientError is client_server.ClientError
    assert lc.apply_overrides is client_workflow.apply_overrides
    assert lc.OVERRIDE_INPUTS is client_workflow.OVERRIDE_INPUTS
    assert all(hasattr(lc, name) for name in lc.__all__)
    with pytest.raises(AttributeError):
        lc.no_such_name  # noqa: B018


def test_client_modules_import_in_either_order():
    """No import cycle: the multi-server module first (it needs the server and workflow modules,
    not lens_model.client), then the client that re-exports it."""
    import subprocess
    import sys

    code = ("import lens_model.client_multi as m, lens_model.client as c; "
            "assert c.run_many is m.run_many and c.ComfyClient is m.ComfyClient")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_python_m_client_prompts_dry_run(tmp_path):
    import subprocess
    import sys

    wf = _write(tmp_path, LENS_API)
    prompts = _prompts_file(tmp_path, 2)
    proc = subprocess.run([sys.executable, "-m", "lens_model.client", str(wf), "--prompts",
                           str(prompts), "--dry-run", "--steps", "3", "-q"],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 1, proc.stderr             # the row without a prompt (last)
    assert "line 3: no 'prompt'" in proc.stderr
    out = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [o["id"] for o in out] == ["r0", "r1"]
    assert out[1]["prompt"]["4"]["inputs"]["text"] == "prompt 1"
    assert out[1]["prompt"]["7"]["inputs"]["steps"] == 3
