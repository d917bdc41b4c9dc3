"""Example workflows: UI-format structure, API twins, and execution on the golden tiny models.

The executor below runs an API prompt the way ComfyUI does in outline (validate inputs against
INPUT_TYPES, resolve links, call FUNCTION on a worker thread inside torch.inference_mode()), with our
node classes and from-scratch stand-ins for
the few core nodes the examples use (SaveImage, LoadImage, VAELoader, VAEDecode). Model names are
re-pointed to the golden tiny weights (a DiT derived from the golden one so that its text input
fits the tiny text encoder), sizes to 48x32 and steps to at most 4; the saved images must equal
what the Python API computes for the same inputs.
"""

from __future__ import annotations

import copy
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_stubs import ModTokenizer, comfy_env, place_golden_models  # noqa: F401  (fixture)
from conftest import GOLDEN

ROOT = Path(__file__).resolve().parent.parent
WF = ROOT / "workflows"
API = WF / "api"
TOOLS = ROOT / "tools"
NAMES = ["lens_turbo_t2i", "lens_t2i", "lens_img2img", "lens_mixed_core_vae", "lens_inpaint"]


def _import_build_workflows():
    sys.path.insert(0, str(TOOLS))
    try:
        import build_workflows
    finally:
        sys.path.remove(str(TOOLS))
    return build_workflows


bw = _import_build_workflows()  # file names: workflows/<title>.json|.jpg, workflows/api/<name>_api.json
CORE_TYPES = {"SaveImage", "LoadImage", "VAELoader", "VAEDecode", "SetLatentNoiseMask"}
FRONTEND_ONLY = {"MarkdownNote", "Note"}
# widget values each core node stores in the UI file (LoadImage also stores its upload button)
CORE_WIDGETS = {"SaveImage": ["filename_prefix"], "LoadImage": ["image", "upload"],
                "VAELoader": ["vae_name"], "VAEDecode": [], "SetLatentNoiseMask": []}
HF = "https://huggingface.co/Comfy-Org/Lens/resolve/main/"


def classes():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def load(name):
    return (json.loads(bw.ui_path(name).read_text(encoding="utf-8")),
            json.loads(bw.api_path(name).read_text(encoding="utf-8")))


def pyproject():
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def widget_inputs(node_type):
    """[(name, spec)] of an input's widgets in UI order; spec None for core nodes."""
    if node_type in CORE_WIDGETS:
        return [(n, None) for n in CORE_WIDGETS[node_type]]
    spec = classes()[node_type].INPUT_TYPES()
    out = []
    for group in ("required", "optional"):
        for name, s in spec.get(group, {}).items():
            kind = s[0]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                out.append((name, s))
    return out


# -------------------------------------------------------------------------------------------
# structure
# -------------------------------------------------------------------------------------------

def test_every_workflow_has_an_api_twin():
    # ComfyUI's template library lists every top-level *.json of workflows/ (not subfolders) and
    # shows the same-name .jpg as its thumbnail: only UI-format files and their thumbnails there,
    # the API twins in workflows/api/, no scripts in workflows/.
    assert sorted(p.name for p in WF.iterdir() if p.is_file()) == sorted(
        [f"{title}.json" for title, _ in bw.TEMPLATE_TITLES.values()]
        + [f"{title}.jpg" for title, _ in bw.TEMPLATE_TITLES.values()])
    assert sorted(p.name for p in API.iterdir()) == sorted(f"{n}_api.json" for n in NAMES)
    assert list(bw.EXAMPLES) == list(bw.TEMPLATE_TITLES) == NAMES
    for name in NAMES:
        ui, api = load(name)
        assert "nodes" in ui and "links" in ui  # UI format
        assert all("class_type" in e for e in api.values())  # API format


def test_committed_files_equal_the_generator_output():
    for name, (ui, api) in bw.build().items():
        assert load(name) == (ui, api), f"{name}: run python tools/build_workflows.py"


def test_template_browser_titles_are_readable():
    # The browser titles a custom-node template by its file name (no metadata file is read).
    titles = [title for title, _ in bw.TEMPLATE_TITLES.values()]
    assert len(set(t.lower() for t in titles)) == len(titles)
    for name, (title, subtitle) in bw.TEMPLATE_TITLES.items():
        assert re.fullmatch(r"Lens [A-Za-z0-9 ]+", title) and "_" not in title and title != name
        assert bw.ui_path(name).name == f"{title}.json" and subtitle
        ui, _ = load(name)
        assert ui["extra"]["info"]["name"].replace(":", "") == title  # the name stored in the file


@pytest.mark.parametrize("name", NAMES)
def test_thumbnail_is_a_small_square_jpeg_next_to_its_workflow(name):
    from PIL import Image, ImageStat

    path = bw.thumbnail_path(name)
    assert path.parent == WF and path.stem == bw.ui_path(name).stem
    assert 0 < path.stat().st_size < 50_000
    with Image.open(path) as img:
        assert img.format == "JPEG" and img.mode == "RGB"
        assert img.width == img.height >= 256
        assert max(ImageStat.Stat(img).stddev) > 10  # a drawn card, not a blank image


def test_thumbnail_tool_draws_each_graph():
    from PIL import Image

    cards = {}
    for name, (title, subtitle) in bw.TEMPLATE_TITLES.items():
        ui, _ = load(name)
        data = bw.thumbnail_jpeg(ui, title, subtitle)
        assert len(data) < bw.THUMBNAIL_MAX_BYTES
        cards[name] = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32)
    # different workflows give different cards (the graph and the title are drawn)
    for a in NAMES:
        for b in NAMES:
            if a < b:
                assert np.abs(cards[a] - cards[b]).mean() > 1.0, (a, b)


@pytest.mark.parametrize("name", NAMES)
def test_ui_structure(name):
    ui, _ = load(name)
    assert ui["version"] == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert key in ui, key
    ids = [n["id"] for n in ui["nodes"]]
    assert len(ids) == len(set(ids)) and max(ids) <= ui["last_node_id"]
    by_id = {n["id"]: n for n in ui["nodes"]}
    link_ids = [link[0] for link in ui["links"]]
    assert len(link_ids) == len(set(link_ids)) and max(link_ids) <= ui["last_link_id"]
    for lid, src, src_slot, dst, dst_slot, typ in ui["links"]:
        out = by_id[src]["outputs"][src_slot]
        assert lid in out["links"] and out["type"] == typ
        inp = by_id[dst]["inputs"][dst_slot]
        assert inp["link"] == lid and inp["type"] == typ
    for n in ui["nodes"]:  # every link a node mentions is in the link table
        for inp in n["inputs"]:
            assert inp["link"] is None or inp["link"] in link_ids
        for out in n["outputs"]:
            assert all(lid in link_ids for lid in out["links"] or [])
        for key in ("pos", "size", "flags", "order", "mode", "properties", "widgets_values"):
            assert key in n, (n["id"], key)
    orders = sorted(n["order"] for n in ui["nodes"])
    assert orders == list(range(len(ui["nodes"])))


@pytest.mark.parametrize("name", NAMES)
def test_ui_types_properties_and_widgets(name):
    ui, _ = load(name)
    project = pyproject()
    known = classes()
    for n in ui["nodes"]:
        t = n["type"]
        if t in FRONTEND_ONLY:
            continue
        assert t in known or t in CORE_TYPES, t
        props = n["properties"]
        assert props["Node name for S&R"] == t
        if t in known:
            assert props["cnr_id"] == project["name"] == "lens-nodes"
            assert props["ver"] == project["version"] == "0.1.0"
        else:
            assert props["cnr_id"] == "comfy-core" and re.match(r"^\d+\.\d+\.\d+$", props["ver"])
        widgets = widget_inputs(t)
        expected = sum(2 if s and s[1].get("control_after_generate") else 1 for _, s in widgets)
        assert len(n["widgets_values"]) == expected, (t, n["widgets_values"])
        # values are valid for their widgets (combos in range, numbers in range)
        values = iter(n["widgets_values"])
        for wname, spec in widgets:
            v = next(values)
            if spec is not None and spec[1].get("control_after_generate"):
                assert next(values) in ("fixed", "increment", "decrement", "randomize")
            if spec is None:
                continue
            kind, opts = spec[0], spec[1]
            if isinstance(kind, list) and not wname.endswith("_name"):
                assert v in kind, (t, wname, v)
            elif kind in ("INT", "FLOAT"):
                assert opts["min"] <= v <= opts["max"], (t, wname, v)
            elif kind == "BOOLEAN":
                assert isinstance(v, bool)
        for m in props.get("models", []):
            assert set(m) == {"name", "url", "directory"}
            assert m["url"] == f"{HF}{m['directory']}/{m['name']}"
            assert n["widgets_values"][0] == m["name"]
    for m in ui.get("models", []):
        assert m["url"] == f"{HF}{m['directory']}/{m['name']}"
    loaders = [n for n in ui["nodes"] if n["type"].endswith("Loader")]
    assert loaders and all(n["properties"].get("models") for n in loaders)


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_matches_ui(name):
    ui, api = load(name)
    nodes_ui = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY}
    assert set(api) == set(nodes_ui)
    links = {lid: (src, slot) for lid, src, slot, *_ in ui["links"]}
    for nid, entry in api.items():
        n = nodes_ui[nid]
        assert entry["class_type"] == n["type"]
        assert entry["_meta"]["title"]
        linked = {i["name"]: links[i["link"]] for i in n["inputs"] if i["link"] is not None}
        values = iter(n["widgets_values"])
        for wname, spec in widget_inputs(n["type"]):
            v = next(values)
            if spec is not None and spec[1].get("control_after_generate"):
                next(values)
            if (n["type"], wname) == ("LoadImage", "upload"):
                assert wname not in entry["inputs"]
                continue
            if wname in linked:
                continue
            assert entry["inputs"][wname] == v, (name, nid, wname)
        for iname, (src, slot) in linked.items():
            assert entry["inputs"][iname] == [str(src), slot], (name, nid, iname)
        sockets = {i["name"] for i in n["inputs"] if "widget" not in i}
        widgets = {w for w, _ in widget_inputs(n["type"])} - {"upload"}
        assert set(entry["inputs"]) <= sockets | widgets


@pytest.mark.parametrize("name", NAMES)
def test_links_connect_matching_types(comfy_env, name):
    """Core refuses a link whose source output type differs from the input's type
    (return_type_mismatch); the UI link table's TYPE must name the same type."""
    ui, api = load(name)

    def returns(t):
        cls = classes().get(t) or CORE_STANDINS[t]
        return cls.RETURN_TYPES

    def input_type(t, iname):
        cls = classes().get(t) or CORE_STANDINS[t]
        spec = cls.INPUT_TYPES()
        s = {**spec.get("required", {}), **spec.get("optional", {})}[iname]
        return s[0]

    for nid, entry in api.items():
        for iname, v in entry["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                src_type = returns(api[v[0]]["class_type"])[v[1]]
                assert src_type == input_type(entry["class_type"], iname), (name, nid, iname)
    by_id = {n["id"]: n for n in ui["nodes"]}
    for lid, src, src_slot, dst, dst_slot, typ in ui["links"]:
        assert returns(by_id[src]["type"])[src_slot] == typ, (name, lid)
        dst_node = by_id[dst]
        assert input_type(dst_node["type"], dst_node["inputs"][dst_slot]["name"]) == typ, (name, lid)


def test_expected_settings():
    def sampler(name):
        _, api = load(name)
        return next(e["inputs"] for e in api.values() if e["class_type"] == "LensNodesSampler"), api

    s, api = sampler("lens_turbo_t2i")
    assert (s["steps"], s["cfg"], s["denoise"]) == (4, 1.0, 1.0)
    assert any(e["inputs"].get("model_name") == "lens_turbo_bf16.safetensors" for e in api.values())
    s, api = sampler("lens_t2i")
    assert (s["steps"], s["cfg"]) == (20, 5.0) and "negative" in s
    assert any(e["inputs"].get("model_name") == "lens_bf16.safetensors" for e in api.values())
    s, api = sampler("lens_img2img")
    assert s["denoise"] == 0.6 and "latent" in s
    src = api[s["latent"][0]]
    assert src["class_type"] == "LensNodesVAEEncode"
    assert api[src["inputs"]["pixels"][0]]["class_type"] == "LoadImage"
    _, api = sampler("lens_mixed_core_vae")
    types = {e["class_type"] for e in api.values()}
    assert {"VAELoader", "VAEDecode", "SaveImage", "LensNodesSampler", "LensNodesTextEncode"} <= types
    s, api = sampler("lens_inpaint")
    assert (s["steps"], s["cfg"], s["denoise"], s["mask_mode"]) == (4, 1.0, 1.0, "coverage")
    masked = api[s["latent"][0]]
    assert masked["class_type"] == "SetLatentNoiseMask"
    assert api[masked["inputs"]["samples"][0]]["class_type"] == "LensNodesVAEEncode"
    assert masked["inputs"]["mask"][1] == 1 and api[masked["inputs"]["mask"][0]]["class_type"] == "LoadImage"
    assert "VAEEncodeForInpaint" not in {e["class_type"] for e in api.values()}


# -------------------------------------------------------------------------------------------
# executor with core stand-ins
# -------------------------------------------------------------------------------------------

class CoreSaveImage:
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    saved: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}

    def save(self, images, filename_prefix):
        assert images.ndim == 4 and images.shape[-1] == 3
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        CoreSaveImage.saved.append(images)
        return {"ui": {"images": [{"filename": f"{filename_prefix}_00001_.png"}]}, "result": ()}


class CoreLoadImage:
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE", "MASK")

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        files = sorted(p.name for p in Path(folder_paths.get_input_directory()).glob("*.png"))
        return {"required": {"image": (files,)}}

    def load(self, image):
        import folder_paths
        from PIL import Image

        with Image.open(Path(folder_paths.get_input_directory()) / image) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            alpha = (np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0
                     if "A" in im.getbands() else None)
        img = torch.from_numpy(arr)[None]
        # core: MASK = 1 - alpha, or 64x64 zeros for an image without alpha
        mask = 1.0 - torch.from_numpy(alpha)[None] if alpha is not None else torch.zeros(1, 64, 64)
        return img, mask


class CoreSetLatentNoiseMask:
    FUNCTION = "set_mask"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    def set_mask(self, samples, mask):
        return ({**samples, "noise_mask": mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])},)


class CoreVAELoader:
    FUNCTION = "load"
    RETURN_TYPES = ("VAE",)

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"vae_name": (folder_paths.get_filename_list("vae"),)}}

    def load(self, vae_name):
        import folder_paths
        from lens_model import load_vae

        return (load_vae(folder_paths.get_full_path("vae", vae_name), dtype=torch.float32),)


class CoreVAEDecode:
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    def decode(self, samples, vae):
        return (vae.decode(samples["samples"]),)


CORE_STANDINS = {"SaveImage": CoreSaveImage, "LoadImage": CoreLoadImage, "VAELoader": CoreVAELoader,
                 "VAEDecode": CoreVAEDecode, "SetLatentNoiseMask": CoreSetLatentNoiseMask}


def validate(prompt):
    """Core-like validation: required inputs present, combo values listed, numbers in range."""
    for nid, entry in prompt.items():
        cls = classes().get(entry["class_type"]) or CORE_STANDINS[entry["class_type"]]
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, s in spec.get(group, {}).items():
                if name not in entry["inputs"]:
                    assert group == "optional", (nid, name, "required_input_missing")
                    continue
                v = entry["inputs"][name]
                if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                    assert v[0] in prompt, (nid, name)
                    continue
                kind = s[0]
                opts = s[1] if len(s) > 1 else {}
                if isinstance(kind, list):
                    assert v in kind, (nid, name, v, "value_not_in_list")
                elif kind in ("INT", "FLOAT"):
                    assert opts.get("min", -1e30) <= v <= opts.get("max", 1e30), (nid, name, v)


def execute(prompt):
    """Run `prompt` like core does: on a worker thread, every node inside torch.inference_mode()."""
    import threading

    box = {}

    def worker():
        try:
            with torch.inference_mode():
                box["out"] = _execute(prompt)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=worker, name="prompt_worker")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["out"]


def _execute(prompt):
    validate(prompt)
    results = {}

    def run(nid):
        if nid in results:
            return results[nid]
        entry = prompt[nid]
        cls = classes().get(entry["class_type"]) or CORE_STANDINS[entry["class_type"]]
        kwargs = {}
        for k, v in entry["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                kwargs[k] = run(v[0])[v[1]]
            else:
                kwargs[k] = v
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(out, dict):
            out = out.get("result", ())
        assert isinstance(out, tuple)
        results[nid] = out
        return out

    for nid, entry in prompt.items():
        cls = classes().get(entry["class_type"]) or CORE_STANDINS[entry["class_type"]]
        if getattr(cls, "OUTPUT_NODE", False):
            run(nid)
    return results


W, H = 48, 32


def repoint(api, names):
    p = shrink(api)
    for entry in p.values():
        t, inp = entry["class_type"], entry["inputs"]
        if t == "LensNodesDiTLoader":
            inp["model_name"] = names["dit_te64"]
        elif t == "LensNodesTextEncoderLoader":
            inp["text_encoder_name"] = names["te"]
            inp["dtype"] = "fp32"
        elif t == "LensNodesVAELoader":
            inp["vae_name"] = names["vae"]
        elif t == "VAELoader":
            inp["vae_name"] = names["vae"] + "diffusion_pytorch_model.safetensors"
    return p


def shrink(api):
    """A copy of an API prompt at W x H with at most 4 steps (model names unchanged)."""
    p = copy.deepcopy(api)
    for entry in p.values():
        t, inp = entry["class_type"], entry["inputs"]
        if t == "LensNodesResolution":
            inp.update(base="custom", width=W, height=H)
        if t == "LensNodesSampler":
            inp["steps"] = min(inp["steps"], 4)  # keep the 20-step example quick on a CPU
        if t in ("LensNodesSampler", "LensNodesEmptyLatent"):
            for k, v in (("width", W), ("height", H)):
                if not isinstance(inp[k], list):
                    inp[k] = v
    return p


@pytest.fixture(scope="module")
def tokenizer():
    from lens_model.tokenizer import load_tokenizer

    return ModTokenizer(load_tokenizer(GOLDEN / "text_encoder"))


@pytest.fixture
def wf_env(comfy_env, tokenizer, monkeypatch):
    import lens_model.tokenizer
    from nodes import text_encode
    from PIL import Image

    names = place_golden_models(comfy_env, GOLDEN)
    monkeypatch.setattr(lens_model.tokenizer, "load_tokenizer", lambda path=None: tokenizer)
    text_encode.FEATURES.clear()
    inp = comfy_env.root / "input"
    inp.mkdir()
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (40, 56, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[4:20, 4:30, 3] = 0  # the mask editor's painted area (transparent): cells (0, 0) and (0, 1)
    Image.fromarray(rgba, "RGBA").save(inp / "example.png")
    CoreSaveImage.saved = []
    yield comfy_env, names
    text_encode.FEATURES.clear()


def reference_image(api, tokenizer, env, te_path=GOLDEN / "text_encoder", vae_path=GOLDEN / "vae", dit_path=None,
                    te_dtype=torch.float32):
    """What the Python API gives for the sampler/encoders/VAE settings of an API workflow.

    Defaults: the golden tiny TE (fp32) and VAE and the TE-matched DiT in ``env``; ``tokenizer``
    None finds the TE's own tokenizer.
    """
    import lens_model as lm
    import lens_model.sampling as sampling

    s = next(e["inputs"] for e in api.values() if e["class_type"] == "LensNodesSampler")
    te = lm.load_text_encoder(te_path, dtype=te_dtype, device="cpu", tokenizer=tokenizer)

    def features(link):
        enc = api[link[0]]["inputs"]
        if not enc["text"].strip():
            return None, None
        return te.encode([enc["text"]], date=enc["date"], strip_markers=enc["strip_markers"])

    ctx, mask = features(s["positive"])
    nctx, nmask = features(s["negative"]) if "negative" in s else (None, None)
    vae = lm.load_vae(vae_path, dtype=torch.float32)
    noise = lm.make_noise(s["seed"], 1, H // 16, W // 16, layout=s["noise_layout"])
    latent_src = api[s["latent"][0]] if "latent" in s else None
    inpaint = {}
    if latent_src is not None and latent_src["class_type"] == "SetLatentNoiseMask":
        from PIL import Image

        with Image.open(env.root / "input" / "example.png") as im:
            has_alpha = "A" in im.getbands()
            alpha = np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0 if has_alpha else None
        # core's LoadImage: MASK = 1 - alpha, or 64x64 zeros without alpha
        pixel_mask = 1.0 - torch.from_numpy(alpha) if has_alpha else torch.zeros(64, 64)
        m = sampling.latent_mask(pixel_mask, H // 16, W // 16, mode=s["mask_mode"])
        assert not has_alpha or 0 < float(m.sum()) < m.numel()  # wf_env paints part of the image
        latent_src = api[latent_src["inputs"]["samples"][0]]
        inpaint = {"denoise_mask": m}
    if latent_src is not None and latent_src["class_type"] == "LensNodesVAEEncode":
        from PIL import Image

        with Image.open(env.root / "input" / "example.png") as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]
        z = vae.encode(img[:, 4:36, 4:52])
        if s["denoise"] < 1.0:
            sig = lm.img2img_sigmas(H, W, s["steps"], s["denoise"], mode=s["schedule"])
        else:
            sig = lm.lens_sigmas(H, W, s["steps"])
        x = sampling.noise_image_latents(noise, z, sig[0])
        if inpaint:
            inpaint.update(init_latents=z, init_noise=noise)
    else:
        sig = lm.lens_sigmas(H, W, s["steps"])
        x = noise
    model = lm.load_transformer(dit_path or env.folder("diffusion_models") / "lens_tiny_te64")
    out = lm.sample(model, x, sig, ctx, mask, negative_context=nctx, negative_mask=nmask,
                    guidance_scale=s["cfg"], cfg_mode=s["cfg_mode"], **inpaint)
    if inpaint:  # the kept cells decode from exactly the encoded original
        keep = (inpaint["denoise_mask"] == 0).expand_as(out)
        assert keep.any() and torch.equal(out[keep], z.expand_as(out)[keep])
    return vae.decode(out)


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_and_equals_python_api(wf_env, tokenizer, name):
    env, names = wf_env
    _, api = load(name)
    prompt = repoint(api, names)
    execute(prompt)
    assert len(CoreSaveImage.saved) == 1
    got = CoreSaveImage.saved[0]
    assert got.shape == (1, H, W, 3) and got.dtype == torch.float32
    want = reference_image(prompt, tokenizer, env)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_unknown_model_name_fails_validation(wf_env):
    _, names = wf_env
    _, api = load("lens_turbo_t2i")
    prompt = repoint(api, names)
    next(e for e in prompt.values() if e["class_type"] == "LensNodesDiTLoader")["inputs"]["model_name"] = "nope.safetensors"
    with pytest.raises(AssertionError, match="value_not_in_list"):
        validate(prompt)
