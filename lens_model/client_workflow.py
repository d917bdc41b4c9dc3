"""API-format ComfyUI workflows: reading and checking them, and setting their inputs.

An API prompt is ``{"<node id>": {"class_type", "inputs", "_meta"?}}``, what ``POST /prompt`` takes
and ComfyUI's "Save (API)" writes. :func:`apply_overrides` sets the prompt text, seed, steps, CFG
and size on the nodes that carry them (table :data:`OVERRIDE_INPUTS`), finding the positive and
negative text-encode nodes from the wiring. No network here: :mod:`lens_model.client_server` talks
to the server, :mod:`lens_model.client` is the command line.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Mapping

logger = logging.getLogger(__name__)

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

