"""Regenerate the example workflows (UI format 0.4 + API-format twins + thumbnails) from the node schemas.

    python tools/build_workflows.py

Writes, for each example id (``lens_turbo_t2i`` ...): ``workflows/<title>.json`` (UI format),
``workflows/<title>.jpg`` (its thumbnail) and ``workflows/api/<id>_api.json`` (API format).

How ComfyUI's template browser shows a pack's templates (ComfyUI ``/api/workflow_templates`` and
the frontend's template store): it lists every top-level ``*.json`` of the pack's ``workflows/``
folder (``example_workflows/`` is the recommended name; ``workflows`` is accepted), not of its
subfolders, and serves the folder at ``/api/workflow_templates/<pack folder>/``. A custom-node
template has no metadata: its title is the file name without ``.json`` (shown as is; the
description is the same name with ``-`` and ``_`` turned into spaces) and its thumbnail is the
``.jpg`` with the same name (only ``.jpg`` is requested). So the UI files are named by their
readable titles (:data:`TEMPLATE_TITLES`), the API twins keep the short ids for scripts and live
in ``workflows/api/``, and this script lives outside ``workflows/`` altogether.

Widget values are written positionally in each node's input order, read from the live
``INPUT_TYPES`` (a seed widget carries its control value), so the files follow the schema; a widget
an example does not set takes its ``INPUT_TYPES`` default. The
tests (tests/test_workflows.py) check the committed files against the same rules and run the API
twins through the nodes. The thumbnails are small title cards drawn with Pillow from the UI graph
(node boxes and links), so they show what the workflow contains.
"""

from __future__ import annotations

import io
import json
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
API_DIR = WORKFLOWS / "api"

# the registry id and version ComfyUI-Manager resolves the pack by: pyproject's [project]
_PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
CNR_ID = _PROJECT["name"]
VERSION = _PROJECT["version"]
CORE_VERSION = "0.22.0"
HF = "https://huggingface.co/Comfy-Org/Lens/resolve/main"

PROMPT = ("A stylish vintage Porsche driving through a rainy neon city street at night, "
          "reflections shimmering across wet pavement, a glowing sign that reads \"Lens\", "
          "cinematic atmosphere, analog film grain")
NEGATIVE = "blurry, low quality, distorted, watermark"

# Core nodes used by the examples: (sockets in, widgets in order (name, widget values count),
# outputs). Written from the documented node interfaces; only what the examples need.
CORE = {
    "SaveImage": {"inputs": [("images", "IMAGE")], "widgets": [("filename_prefix", 1)], "outputs": [],
                  "output_node": True},
    "LoadImage": {"inputs": [], "widgets": [("image", 1), ("upload", 1)],
                  "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")]},
    "VAELoader": {"inputs": [], "widgets": [("vae_name", 1)], "outputs": [("VAE", "VAE")]},
    "VAEDecode": {"inputs": [("samples", "LATENT"), ("vae", "VAE")], "widgets": [],
                  "outputs": [("IMAGE", "IMAGE")]},
    "SetLatentNoiseMask": {"inputs": [("samples", "LATENT"), ("mask", "MASK")], "widgets": [],
                           "outputs": [("LATENT", "LATENT")]},
}
FRONTEND_ONLY = {"MarkdownNote", "Note"}
API_SKIP_WIDGETS = {("LoadImage", "upload")}  # UI-only widget

MODEL_FILES = {
    "lens_turbo_bf16.safetensors": "diffusion_models",
    "lens_bf16.safetensors": "diffusion_models",
    "gpt_oss_20b_nvfp4.safetensors": "text_encoders",
    "flux2-vae.safetensors": "vae",
}


def model_entry(name: str) -> dict:
    folder = MODEL_FILES[name]
    return {"name": name, "url": f"{HF}/{folder}/{name}", "directory": folder}


def _import_nodes():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def _display_name(node_type: str) -> str:
    import nodes

    return nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_type, node_type)


def node_interface(node_type: str, classes) -> dict:
    """{"inputs": [(name, type, optional, is_widget, n_values)], "outputs": [(name, type)]}."""
    if node_type in CORE:
        c = CORE[node_type]
        ins = [(n, t, False, False, 0) for n, t in c["inputs"]]
        ins += [(n, "COMBO" if n != "filename_prefix" else "STRING", False, True, k) for n, k in c["widgets"]]
        return {"inputs": ins, "outputs": list(c["outputs"])}
    cls = classes[node_type]
    spec = cls.INPUT_TYPES()
    ins = []
    for group in ("required", "optional"):
        for name, s in spec.get(group, {}).items():
            kind = s[0]
            opts = s[1] if len(s) > 1 else {}
            if isinstance(kind, list):
                ins.append((name, "COMBO", group == "optional", True, 1))
            elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN") and not opts.get("forceInput"):
                ins.append((name, kind, group == "optional", True,
                            2 if opts.get("control_after_generate") else 1))
            else:
                ins.append((name, kind, group == "optional", False, 0))
    names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
    return {"inputs": ins, "outputs": list(zip(names, cls.RETURN_TYPES))}


def widget_default(node_type: str, name: str, classes):
    """The INPUT_TYPES default of one of our nodes' widgets (a combo without one: its first option)."""
    for group in ("required", "optional"):
        s = classes[node_type].INPUT_TYPES().get(group, {}).get(name)
        if s is not None:
            opts = s[1] if len(s) > 1 else {}
            if "default" in opts:
                return opts["default"]
            if isinstance(s[0], list) and s[0]:
                return s[0][0]
    raise KeyError(f"{node_type}.{name} has no default: the example must set it")


class Graph:
    def __init__(self, classes):
        self.classes = classes
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, node_type, widgets=None, pos=(0, 0), size=(320, 160), title=None, seed_control=None,
            models=None, text=None):
        nid = len(self.nodes) + 1
        self.nodes.append({"id": nid, "type": node_type, "widgets": dict(widgets or {}), "pos": list(pos),
                           "size": list(size), "title": title, "seed_control": seed_control,
                           "models": models, "text": text, "in_links": {}, "out_links": {}})
        return nid

    def link(self, src, src_slot, dst, dst_input):
        lid = len(self.links) + 1
        src_node, dst_node = self.nodes[src - 1], self.nodes[dst - 1]
        out_type = node_interface(src_node["type"], self.classes)["outputs"][src_slot][1]
        dst_node["in_links"][dst_input] = (lid, src, src_slot, out_type)
        src_node["out_links"].setdefault(src_slot, []).append(lid)
        self.links.append([lid, src, src_slot, dst, dst_input, out_type])
        return lid

    def _widget(self, n: dict, name: str):
        """The value an example chose, else the node's default (a widget added to a node later)."""
        if name in n["widgets"] or n["type"] in CORE:
            return n["widgets"][name]
        return widget_default(n["type"], name, self.classes)

    # -- execution order -----------------------------------------------------------------------
    def _order(self):
        deps = {n["id"]: {v[1] for v in n["in_links"].values()} for n in self.nodes}
        order, done = [], set()
        while len(order) < len(self.nodes):
            for n in self.nodes:
                if n["id"] not in done and deps[n["id"]] <= done:
                    order.append(n["id"])
                    done.add(n["id"])
        return {nid: i for i, nid in enumerate(order)}

    # -- UI (0.4) --------------------------------------------------------------------------------
    def ui(self, title: str) -> dict:
        order = self._order()
        ui_nodes, ui_links = [], []
        slot_of: dict[tuple[int, str], int] = {}
        for n in self.nodes:
            t = n["type"]
            if t in FRONTEND_ONLY:
                ui_nodes.append({
                    "id": n["id"], "type": t, "pos": n["pos"], "size": n["size"], "flags": {},
                    "order": order[n["id"]], "mode": 0, "inputs": [], "outputs": [],
                    "title": n["title"], "properties": {}, "widgets_values": [n["text"]],
                    "color": "#432", "bgcolor": "#653",
                })
                continue
            iface = node_interface(t, self.classes)
            inputs, values = [], []
            for name, typ, optional, is_widget, count in iface["inputs"]:
                link = n["in_links"].get(name)
                if is_widget:
                    if (t, name) == ("LoadImage", "upload"):
                        values.append("image")
                        continue
                    values.append(self._widget(n, name))
                    if count == 2:
                        values.append(n["seed_control"] or "randomize")
                    if link is None:
                        continue
                    entry = {"name": name, "type": typ, "widget": {"name": name}, "link": link[0]}
                else:
                    entry = {"name": name, "type": typ, "link": link[0] if link else None}
                    if optional:
                        entry["shape"] = 7
                slot_of[(n["id"], name)] = len(inputs)
                entry["localized_name"] = name
                inputs.append(entry)
            outputs = []
            for slot, (oname, otype) in enumerate(iface["outputs"]):
                lids = n["out_links"].get(slot)
                outputs.append({"localized_name": oname, "name": oname, "type": otype,
                                "slot_index": slot, "links": lids if lids else None})
            props = {"cnr_id": CNR_ID if t in self.classes else "comfy-core",
                     "ver": VERSION if t in self.classes else CORE_VERSION,
                     "Node name for S&R": t}
            if n["models"]:
                props["models"] = [model_entry(m) for m in n["models"]]
            node = {"id": n["id"], "type": t, "pos": n["pos"], "size": n["size"], "flags": {},
                    "order": order[n["id"]], "mode": 0, "inputs": inputs, "outputs": outputs,
                    "properties": props, "widgets_values": values}
            if n["title"]:
                node["title"] = n["title"]
            ui_nodes.append(node)
        for lid, src, src_slot, dst, dst_input, typ in self.links:
            ui_links.append([lid, src, src_slot, dst, slot_of[(dst, dst_input)], typ])
        models = []
        for n in self.nodes:
            for m in n["models"] or []:
                if model_entry(m) not in models:
                    models.append(model_entry(m))
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": ui_nodes,
            "links": ui_links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "info": {"name": title}},
            "version": 0.4,
            "models": models,
        }

    # -- API prompt ------------------------------------------------------------------------------
    def api(self) -> dict:
        out = {}
        for n in self.nodes:
            t = n["type"]
            if t in FRONTEND_ONLY:
                continue
            iface = node_interface(t, self.classes)
            inputs = {}
            for name, typ, optional, is_widget, count in iface["inputs"]:
                if (t, name) in API_SKIP_WIDGETS:
                    continue
                link = n["in_links"].get(name)
                if link is not None:
                    inputs[name] = [str(link[1]), link[2]]
                elif is_widget:
                    inputs[name] = self._widget(n, name)
            title = n["title"] or _display_name(t)
            out[str(n["id"])] = {"inputs": inputs, "class_type": t, "_meta": {"title": title}}
        return out


# --------------------------------------------------------------------------------------------
# the examples
# --------------------------------------------------------------------------------------------

def _loaders(g, dit_file, x=0):
    dit = g.add("LensNodesDiTLoader", {"model_name": dit_file, "weight_dtype": "default",
                                       "device": "auto", "offload": "auto", "qk_norm_eps": "upstream"},
                pos=(x, 0), size=(340, 150), models=[dit_file])
    te = g.add("LensNodesTextEncoderLoader", {"text_encoder_name": "gpt_oss_20b_nvfp4.safetensors",
                                              "device": "auto", "dtype": "auto", "offload": "auto",
                                              "keep_loaded": False},
               pos=(x, 200), size=(340, 180), models=["gpt_oss_20b_nvfp4.safetensors"])
    return dit, te


def _encode(g, te, text, pos, title):
    nid = g.add("LensNodesTextEncode", {"text": text, "date": "2026-05-23", "strip_markers": True,
                                        "cache_to_disk": False},
                pos=pos, size=(420, 220), title=title)
    g.link(te, 0, nid, "text_encoder")
    return nid


def _sampler_widgets(steps, cfg, denoise=1.0, seed=42, width=1440, height=1440):
    return {"seed": seed, "steps": steps, "cfg": cfg, "schedule": "upstream", "denoise": denoise,
            "noise_layout": "upstream", "width": width, "height": height, "mu": 0.0,
            "cfg_mode": "upstream"}


def _our_decode(g, sampler, x):
    vae = g.add("LensNodesVAELoader", {"vae_name": "flux2-vae.safetensors", "dtype": "auto", "device": "auto"},
                pos=(x, 420), size=(320, 130), models=["flux2-vae.safetensors"])
    dec = g.add("LensNodesVAEDecode", {"tile": "auto"}, pos=(x, 0), size=(260, 100))
    g.link(sampler, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    return vae, dec


def _save(g, image_src, x):
    save = g.add("SaveImage", {"filename_prefix": "Lens"}, pos=(x, 0), size=(480, 520))
    g.link(image_src, 0, save, "images")
    return save


NOTE_FILES = (
    "Model files (https://huggingface.co/Comfy-Org/Lens):\n"
    "- models/diffusion_models: {dit}\n"
    "- models/text_encoders: gpt_oss_20b_nvfp4.safetensors\n"
    "- models/vae: flux2-vae.safetensors\n"
)


def turbo_t2i(classes):
    g = Graph(classes)
    dit, te = _loaders(g, "lens_turbo_bf16.safetensors")
    pos = _encode(g, te, PROMPT, (400, 0), "Prompt")
    res = g.add("LensNodesResolution", {"base": "1440", "ratio": "1:1", "width": 1024, "height": 1024},
                pos=(400, 280), size=(300, 170))
    s = g.add("LensNodesSampler", _sampler_widgets(4, 1.0), pos=(860, 0), size=(320, 420),
              seed_control="randomize")
    g.link(dit, 0, s, "model")
    g.link(pos, 0, s, "positive")
    g.link(res, 0, s, "width")
    g.link(res, 1, s, "height")
    _, dec = _our_decode(g, s, 1220)
    _save(g, dec, 1520)
    g.add("MarkdownNote", pos=(-420, 0), size=(380, 360), title="Note: Lens Turbo",
          text="# Lens Turbo, text to image\n\n4 steps, CFG 1 (the negative prompt has no effect "
               "at CFG 1).\n\n" + NOTE_FILES.format(dit="lens_turbo_bf16.safetensors")
               + "\nOn the CPU pick base 1024 in Lens Resolution.")
    return g, "Lens Turbo: text to image"


def lens_t2i(classes):
    g = Graph(classes)
    dit, te = _loaders(g, "lens_bf16.safetensors")
    pos = _encode(g, te, PROMPT, (400, 0), "Prompt")
    neg = _encode(g, te, NEGATIVE, (400, 260), "Negative prompt")
    res = g.add("LensNodesResolution", {"base": "1440", "ratio": "1:1", "width": 1024, "height": 1024},
                pos=(400, 520), size=(300, 170))
    s = g.add("LensNodesSampler", _sampler_widgets(20, 5.0), pos=(860, 0), size=(320, 420),
              seed_control="randomize")
    g.link(dit, 0, s, "model")
    g.link(pos, 0, s, "positive")
    g.link(neg, 0, s, "negative")
    g.link(res, 0, s, "width")
    g.link(res, 1, s, "height")
    _, dec = _our_decode(g, s, 1220)
    _save(g, dec, 1520)
    g.add("MarkdownNote", pos=(-420, 0), size=(380, 360), title="Note: Lens",
          text="# Lens, text to image\n\n20 steps, CFG 5. Empty the negative prompt to use the "
               "empty negative Lens was trained with.\n\n"
               + NOTE_FILES.format(dit="lens_bf16.safetensors"))
    return g, "Lens: text to image"


def _encoded_image(g):
    """FLUX2 VAE Loader + Load Image (example.png) -> FLUX2 VAE Encode; returns the three node ids."""
    vae = g.add("LensNodesVAELoader", {"vae_name": "flux2-vae.safetensors", "dtype": "auto", "device": "auto"},
                pos=(0, 440), size=(320, 130), models=["flux2-vae.safetensors"])
    img = g.add("LoadImage", {"image": "example.png"}, pos=(0, 620), size=(320, 360))
    enc = g.add("LensNodesVAEEncode", {"tile": "auto"}, pos=(400, 440), size=(260, 110))
    g.link(img, 0, enc, "pixels")
    g.link(vae, 0, enc, "vae")
    return vae, img, enc


def img2img(classes):
    g = Graph(classes)
    dit, te = _loaders(g, "lens_turbo_bf16.safetensors")
    pos = _encode(g, te, PROMPT, (400, 0), "Prompt")
    vae, img, enc = _encoded_image(g)
    s = g.add("LensNodesSampler", _sampler_widgets(4, 1.0, denoise=0.6, width=1024, height=1024),
              pos=(860, 0), size=(320, 420), seed_control="fixed")
    g.link(dit, 0, s, "model")
    g.link(pos, 0, s, "positive")
    g.link(enc, 0, s, "latent")
    dec = g.add("LensNodesVAEDecode", {"tile": "auto"}, pos=(1220, 0), size=(260, 100))
    g.link(s, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    _save(g, dec, 1520)
    g.add("MarkdownNote", pos=(-420, 0), size=(380, 360), title="Note: image to image",
          text="# Lens Turbo, image to image\n\nThe loaded image is encoded with the FLUX.2 VAE "
               "(sides cropped to multiples of 16) and re-noised to denoise 0.6: lower keeps "
               "more of the input. Pick your own picture in Load Image first: example.png is "
               "a placeholder name, and ComfyUI refuses to queue while it is missing from the "
               "input folder.\n\n" + NOTE_FILES.format(dit="lens_turbo_bf16.safetensors"))
    return g, "Lens Turbo: image to image"


def mixed_core_vae(classes):
    g = Graph(classes)
    dit, te = _loaders(g, "lens_turbo_bf16.safetensors")
    pos = _encode(g, te, PROMPT, (400, 0), "Prompt")
    res = g.add("LensNodesResolution", {"base": "1024", "ratio": "3:2", "width": 1024, "height": 1024},
                pos=(400, 280), size=(300, 170))
    empty = g.add("LensNodesEmptyLatent", {"width": 1024, "height": 1024, "batch_size": 1},
                  pos=(400, 500), size=(300, 130))
    g.link(res, 0, empty, "width")
    g.link(res, 1, empty, "height")
    s = g.add("LensNodesSampler", _sampler_widgets(4, 1.0, width=1024, height=1024), pos=(860, 0),
              size=(320, 420), seed_control="randomize")
    g.link(dit, 0, s, "model")
    g.link(pos, 0, s, "positive")
    g.link(empty, 0, s, "latent")
    vae = g.add("VAELoader", {"vae_name": "flux2-vae.safetensors"}, pos=(860, 480), size=(320, 80),
                models=["flux2-vae.safetensors"])
    dec = g.add("VAEDecode", {}, pos=(1220, 0), size=(220, 60))
    g.link(s, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    _save(g, dec, 1480)
    g.add("MarkdownNote", pos=(-420, 0), size=(380, 360), title="Note: core VAE",
          text="# Lens Turbo with core's VAE nodes\n\nThe MMDiT Sampler's LATENT is the FLUX.2 "
               "latent space, so core VAELoader + VAEDecode with flux2-vae.safetensors decode it "
               "directly.\n\n" + NOTE_FILES.format(dit="lens_turbo_bf16.safetensors"))
    return g, "Lens Turbo with core VAE decode"


def inpaint(classes):
    g = Graph(classes)
    dit, te = _loaders(g, "lens_turbo_bf16.safetensors")
    pos = _encode(g, te, PROMPT, (400, 0), "Prompt")
    vae, img, enc = _encoded_image(g)
    masked = g.add("SetLatentNoiseMask", {}, pos=(400, 600), size=(260, 60))
    g.link(enc, 0, masked, "samples")
    g.link(img, 1, masked, "mask")
    s = g.add("LensNodesSampler", _sampler_widgets(4, 1.0, width=1024, height=1024),
              pos=(860, 0), size=(320, 440), seed_control="randomize")
    g.link(dit, 0, s, "model")
    g.link(pos, 0, s, "positive")
    g.link(masked, 0, s, "latent")
    dec = g.add("LensNodesVAEDecode", {"tile": "auto"}, pos=(1220, 0), size=(260, 100))
    g.link(s, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    _save(g, dec, 1520)
    g.add("MarkdownNote", pos=(-420, 0), size=(380, 400), title="Note: inpainting",
          text="# Lens Turbo, inpainting\n\nPick your picture in Load Image (`example.png` is a "
               "placeholder), right-click it, **Open in MaskEditor** and paint the area to "
               "repaint; describe the whole picture in the prompt. Set Latent Noise Mask hands "
               "the mask to the MMDiT Sampler, which regenerates the painted area and keeps the "
               "rest exactly (mask_mode coverage: a 16-px latent cell is as masked as its "
               "pixels). Core's VAE Encode (for Inpainting) is not used: it greys the masked "
               "pixels, which Lens was not trained for.\n\n"
               + NOTE_FILES.format(dit="lens_turbo_bf16.safetensors"))
    return g, "Lens Turbo: inpainting"


EXAMPLES = {
    "lens_turbo_t2i": turbo_t2i,
    "lens_t2i": lens_t2i,
    "lens_img2img": img2img,
    "lens_mixed_core_vae": mixed_core_vae,
    "lens_inpaint": inpaint,
}


# The template browser shows the UI file's name as the title: {example id: (file title, card subtitle)}.
# Plain ASCII letters, digits and spaces, so the names are valid file names and URLs everywhere.
TEMPLATE_TITLES = {
    "lens_turbo_t2i": ("Lens Turbo text to image", "4 steps, CFG 1"),
    "lens_t2i": ("Lens text to image", "20 steps, CFG 5, negative prompt"),
    "lens_img2img": ("Lens Turbo image to image", "4 steps, denoise 0.6"),
    "lens_mixed_core_vae": ("Lens Turbo with core VAE decode", "core VAELoader and VAEDecode"),
    "lens_inpaint": ("Lens Turbo inpainting", "Load Image mask, Set Latent Noise Mask"),
}
THUMBNAIL_SIZE = 384  # px, square like the browser's cards
THUMBNAIL_MAX_BYTES = 50_000


def ui_path(name: str) -> Path:
    """``workflows/<title>.json`` of example ``name``."""
    return WORKFLOWS / f"{TEMPLATE_TITLES[name][0]}.json"


def thumbnail_path(name: str) -> Path:
    """``workflows/<title>.jpg``: the template browser's thumbnail for ``ui_path(name)``."""
    return ui_path(name).with_suffix(".jpg")


def api_path(name: str) -> Path:
    """``workflows/api/<name>_api.json``."""
    return API_DIR / f"{name}_api.json"


def build() -> dict[str, tuple[dict, dict]]:
    classes = _import_nodes()
    out = {}
    for name, fn in EXAMPLES.items():
        g, title = fn(classes)
        out[name] = (g.ui(title), g.api())
    return out


# -- thumbnails ----------------------------------------------------------------------------------
_BACKGROUND = (24, 26, 33)
_TEXT = (236, 238, 244)
_MUTED = (150, 156, 172)
_LINK = (120, 128, 150)
_OURS = (52, 96, 160)  # this pack's nodes
_CORE = (70, 110, 70)  # ComfyUI core nodes


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (FreeType)
    except TypeError:
        return ImageFont.load_default()


def thumbnail(ui: dict, title: str, subtitle: str):
    """A square title card: the title, a subtitle and the workflow's node graph (PIL image)."""
    from PIL import Image, ImageDraw

    size = THUMBNAIL_SIZE
    img = Image.new("RGB", (size, size), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    margin = 22
    y = margin
    for line in textwrap.wrap(title, width=18):
        draw.text((margin, y), line, font=_font(34), fill=_TEXT)
        y += 40
    draw.text((margin, y + 4), subtitle, font=_font(17), fill=_MUTED)
    top = y + 40

    nodes = [n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    box_w, box_h = size - 2 * margin, size - margin - top
    scale = min(box_w / (x1 - x0), box_h / (y1 - y0))
    off_x = margin + (box_w - scale * (x1 - x0)) / 2
    off_y = top + (box_h - scale * (y1 - y0)) / 2

    def rect(n):
        left = off_x + scale * (n["pos"][0] - x0)
        upper = off_y + scale * (n["pos"][1] - y0)
        return left, upper, left + scale * n["size"][0], upper + scale * n["size"][1]

    by_id = {n["id"]: n for n in nodes}
    for _, src, _, dst, _, _ in ui["links"]:
        a, b = rect(by_id[src]), rect(by_id[dst])
        draw.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=_LINK, width=2)
    label_font = _font(11)
    for n in nodes:
        left, upper, right, lower = rect(n)
        ours = n["properties"].get("cnr_id") == CNR_ID
        draw.rounded_rectangle((left, upper, right, lower), radius=4, fill=_OURS if ours else _CORE,
                               outline=_TEXT, width=1)
        label = n.get("title") or _display_name(n["type"])
        lines = textwrap.wrap(label, width=max(4, int((right - left) / 6.5)), break_long_words=False)
        for i, line in enumerate(lines[: max(1, int((lower - upper - 4) // 12))]):
            while len(line) > 1 and label_font.getlength(line) > right - left - 6:
                line = line[:-1]  # clip a word wider than its box
            draw.text((left + 4, upper + 3 + 12 * i), line, font=label_font, fill=_TEXT)
    return img


def thumbnail_jpeg(ui: dict, title: str, subtitle: str) -> bytes:
    buf = io.BytesIO()
    thumbnail(ui, title, subtitle).save(buf, format="JPEG", quality=85, optimize=True)
    data = buf.getvalue()
    if len(data) > THUMBNAIL_MAX_BYTES:
        raise ValueError(f"thumbnail for {title!r} is {len(data)} bytes (limit {THUMBNAIL_MAX_BYTES})")
    return data


def main() -> None:
    API_DIR.mkdir(parents=True, exist_ok=True)
    for name, (ui, api) in build().items():
        title, subtitle = TEMPLATE_TITLES[name]
        ui_path(name).write_text(json.dumps(ui, indent=2, ensure_ascii=False) + "\n")
        thumbnail_path(name).write_bytes(thumbnail_jpeg(ui, title, subtitle))
        api_path(name).write_text(json.dumps(api, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
