"""End-to-end CPU benchmark: Lens-Turbo text-to-image with full-size random weights.

Runs ``lens_model.pipeline.generate(...)`` (the path the ``lens`` CLI takes) in a fresh child process
on the CPU: 256x256, 4 steps, CFG 1, seed 42, prompt "a red fox in the snow", with

- the DiT as one bf16 ``.safetensors`` file in the ComfyUI layout (``model.diffusion_model.`` keys,
  48 blocks, ~8.2 GB),
- the gpt-oss-20b text encoder in the ComfyUI NVFP4 layout (~13.2 GB, made by
  ``bench/bench_text_encoder.py``; synthesised here through it when missing),
- the FLUX.2 VAE in fp32, BFL layout (~336 MB),

all random. Missing files are synthesised once under /tmp/lens_bench/ (the DiT is written tensor by
tensor in bf16, never holding the model) and reused afterwards.

The child uses only the package's public API: ``lens_model.pipeline.generate`` / ``to_pil``, and
stage boundaries taken from the exported classes (``LensTextEncoder``, ``LensTransformer``,
``Flux2VAE``: construction, ``encode``, ``forward``, ``decode``) and the step callback, so
``bench/compare_revisions.py`` can run it against an older checkout put first on ``PYTHONPATH``.

Reported per run: wall and process CPU seconds per stage (file checks, TE load + encode + release,
DiT load, every sampling step, DiT release, VAE load, VAE decode, PNG encode), the total, the
child's peak RSS (VmHWM = ru_maxrss, file-backed pages included) with per-stage peaks of anonymous /
file-backed RSS sampled every 20 ms, bytes the child read from storage per stage (/proc/self/io),
whether the output is finite and the PNG size and hash. The spec's target for the pack: <= 50 s and <= 12 GB peak RSS (ComfyUI core on the Zen 5
avx512_bf16 anchor machine: 100-105 s, 24.3 GB).

    python bench/bench_end_to_end.py                 # synthesise if needed, one run
    python bench/bench_end_to_end.py --runs 2        # two runs, each in a fresh process
    python bench/bench_end_to_end.py --synthesize-only
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import resource
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # a checkout already on PYTHONPATH (compare_revisions.py) stays first
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import lens_model  # noqa: E402
from lens_model import Flux2VAE, LensDiTConfig, LensTextEncoder, LensTransformer  # noqa: E402
from lens_model.pipeline import generate, to_pil  # noqa: E402
from procstats import read_bytes, status_bytes  # noqa: E402  (bench/ is the script folder)

PROMPT = "a red fox in the snow"
BENCH_DIR = Path("/tmp/lens_bench")
DIT_PATH = BENCH_DIR / "lens_turbo_bf16_random_comfy.safetensors"
TE_PATH = BENCH_DIR / "gpt_oss_20b_nvfp4_random.safetensors"
VAE_PATH = BENCH_DIR / "flux2_vae_fp32_random_bfl.safetensors"
OUT_PNG = BENCH_DIR / "e2e_out.png"
COMFY_DIT_PREFIX = "model.diffusion_model."
GB = 1e9


# --------------------------------------------------------------------------------------------------
# Synthesis


def _write_streamed(path: Path, entries: list[tuple[str, tuple[int, ...], str]], make, metadata: dict) -> None:
    """Write a safetensors file header-first, then each tensor from ``make(index, key, shape)`` in
    turn (only one tensor is alive at a time)."""
    sizes = {"BF16": 2, "F32": 4}
    header, off = {}, 0
    for key, shape, dt in entries:
        n = sizes[dt] * math.prod(shape)
        header[key] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    t0 = time.perf_counter()
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, (key, shape, dt) in enumerate(entries):
            t = make(i, key, shape).contiguous()
            assert tuple(t.shape) == tuple(shape) and {torch.bfloat16: "BF16", torch.float32: "F32"}[t.dtype] == dt, key
            f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
            del t
    os.replace(tmp, path)
    print(f"wrote {path} ({path.stat().st_size / GB:.2f} GB, {len(entries)} tensors) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)


def synthesize_dit(path: Path, seed: int = 0, blocks: int = 48) -> Path:
    """Full-width Lens DiT (48 blocks unless ``blocks`` says fewer) in bf16, ComfyUI single-file
    layout, random weights with the scales of ``bench_dit.randomize_`` (bias N(0, 0.01), norm
    weights N(1, 0.05), matrices N(0, 1/sqrt(fan_in))), drawn per tensor in fp32 and cast to bf16."""
    shapes = LensDiTConfig(num_layers=blocks).expected_shapes()
    keys = list(shapes)

    def make(i, key, shape):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        if key.endswith("bias"):
            t = torch.randn(shape, generator=g).mul_(0.01)
        elif len(shape) == 1:
            t = torch.randn(shape, generator=g).mul_(0.05).add_(1.0)
        else:
            t = torch.randn(shape, generator=g).mul_(1.0 / math.sqrt(shape[1]))
        return t.to(torch.bfloat16)

    _write_streamed(path, [(COMFY_DIT_PREFIX + k, tuple(shapes[k]), "BF16") for k in keys],
                    lambda i, k, s: make(i, k[len(COMFY_DIT_PREFIX):], s),
                    {"format": "pt", "lens_bench": "random Lens-Turbo DiT, bf16, ComfyUI layout"})
    return path


def synthesize_vae(path: Path, seed: int = 0) -> Path:
    """Full-size FLUX.2 VAE (default config) with PyTorch's default init, fp32, BFL key layout
    (the module's own state-dict names), latent BN statistics mean N(0, 0.5), var U(0.1, 2.1)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    vae = Flux2VAE().eval()
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.1, 2.1)
    sd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file(sd, str(tmp), metadata={"format": "pt", "lens_bench": "random FLUX.2 VAE, fp32, BFL layout"})
    os.replace(tmp, path)
    print(f"wrote {path} ({path.stat().st_size / GB:.3f} GB, {len(sd)} tensors)", flush=True)
    return path


def ensure_files(dit: Path, te: Path, vae: Path) -> None:
    if not te.exists():
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_text_encoder import synthesize

        synthesize(te, 24)
    if not dit.exists():
        synthesize_dit(dit)
    if not vae.exists():
        synthesize_vae(vae)
    for p in (dit, te, vae):
        print(f"using {p} ({p.stat().st_size / GB:.2f} GB)", flush=True)


# --------------------------------------------------------------------------------------------------
# Child: one generate() call, instrumented


class Timeline:
    """Stage boundaries with wall time, storage reads and RSS maxima sampled by a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.t0 = time.perf_counter()
        self.stages: list[dict] = []
        self._cur = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.begin("startup")
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            s = status_bytes()
            with self._lock:
                cur = self._cur
                for k in ("VmRSS", "RssAnon", "RssFile"):
                    cur["max_" + k] = max(cur.get("max_" + k, 0), s.get(k, 0))

    @property
    def current(self) -> str | None:
        """Name of the stage running now."""
        return self._cur["stage"] if self._cur is not None else None

    def begin(self, name: str) -> None:
        now, cpu, rb, s = time.perf_counter(), time.process_time(), read_bytes(), status_bytes()
        with self._lock:
            if self._cur is not None:
                c = self._cur
                c["s"] = now - c.pop("_t")
                c["cpu_s"] = cpu - c.pop("_cpu")
                c["read_gb"] = (rb - c.pop("_rb")) / GB
                c["rss_end_gb"] = s["VmRSS"] / GB
                for k in ("VmRSS", "RssAnon", "RssFile"):
                    c["max_" + k] = max(c.get("max_" + k, 0), s.get(k, 0))
                self.stages.append(c)
            self._cur = None if name is None else {"stage": name, "_t": now, "_cpu": cpu, "_rb": rb,
                                                    "start_s": now - self.t0}

    def end(self) -> list[dict]:
        self.begin(None)
        self._stop.set()
        self._thread.join()
        for c in self.stages:
            for k in ("VmRSS", "RssAnon", "RssFile"):
                c["max_" + k] = round(c["max_" + k] / GB, 3)
            for k in ("s", "cpu_s", "start_s", "read_gb", "rss_end_gb"):
                c[k] = round(c[k], 3)
        return self.stages


class Stages:
    """Stage boundaries of one ``generate()`` call, read off the exported classes.

    Each hook wraps a method of a public class and calls the original. Construction of a class
    starts its load stage only at its place in the sequence (``inspect_*`` may build models on the
    meta device while the files are checked); the sequence is checks -> te_load -> te_encode ->
    te_release -> dit_load -> step_1 .. step_n -> dit_release -> vae_load -> vae_decode ->
    vae_release.
    """

    def __init__(self, timeline: "Timeline") -> None:
        self.tl = timeline
        self.finite_steps: list[bool] = []
        self._originals: list[tuple[type, str, object]] = []

    def _hook(self, cls: type, name: str, before: str | None = None, after: str | None = None,
              during: tuple[str, ...] = ()) -> None:
        orig = getattr(cls, name)
        tl = self.tl

        @functools.wraps(orig)
        def hooked(*a, **k):
            if before and tl.current in during:
                tl.begin(before)
            out = orig(*a, **k)
            if after:
                tl.begin(after)
            return out

        self._originals.append((cls, name, orig))
        setattr(cls, name, hooked)

    def install(self) -> None:
        self._hook(LensTextEncoder, "__init__", before="te_load", during=("checks",))
        self._hook(LensTextEncoder, "encode", before="te_encode", after="te_release", during=("checks", "te_load"))
        self._hook(LensTransformer, "__init__", before="dit_load", during=("te_release",))
        self._hook(LensTransformer, "forward", before="step_1", during=("dit_load",))
        self._hook(Flux2VAE, "__init__", before="vae_load", during=("dit_release",))
        self._hook(Flux2VAE, "decode", before="vae_decode", after="vae_release", during=("dit_release", "vae_load"))

    def uninstall(self) -> None:
        for cls, name, orig in reversed(self._originals):
            setattr(cls, name, orig)

    def step_callback(self, step, total, x, denoised) -> None:
        self.finite_steps.append(bool(torch.isfinite(x).all()))
        self.tl.begin(f"step_{step + 2}" if step + 1 < total else "dit_release")


def child(args) -> dict:
    tl = Timeline()
    res: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                 "lens_model": str(Path(lens_model.__file__).parent),
                 "rss_start_gb": status_bytes()["VmRSS"] / GB}
    stages = Stages(tl)
    stages.install()
    tl.begin("checks")
    t_start = time.perf_counter()
    images = generate(
        PROMPT, transformer_path=args.dit, text_encoder_path=args.te, vae_path=args.vae,
        width=args.size, height=args.size, steps=args.steps, guidance=args.cfg, seed=args.seed,
        device="cpu", callback=stages.step_callback, output_type="pt")
    t_gen = time.perf_counter() - t_start
    stages.uninstall()
    tl.begin("png")
    img = to_pil(images)[0]
    img.save(args.out, format="PNG")
    stage_list = tl.end()
    res.update(
        generate_s=round(t_gen, 3), stages=stage_list,
        peak_rss_gb=round(status_bytes()["VmHWM"] / GB, 3),
        ru_maxrss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3),
        image_shape=list(images.shape), finite=bool(torch.isfinite(images).all()),
        latents_finite_per_step=stages.finite_steps,
        image_mean=round(float(images.mean()), 4), image_std=round(float(images.std()), 4),
        png=str(args.out), png_bytes=Path(args.out).stat().st_size,
        png_sha256=hashlib.sha256(Path(args.out).read_bytes()).hexdigest(),
        read_total_gb=round(sum(s["read_gb"] for s in stage_list), 3))
    return res


# --------------------------------------------------------------------------------------------------
# Parent


def summarize(res: dict) -> dict:
    st = {s["stage"]: s for s in res["stages"]}
    step_names = sorted((k for k in st if k.startswith("step_")), key=lambda k: int(k[5:]))
    steps = [st[k]["s"] for k in step_names]
    g = lambda *names: round(sum(st[n]["s"] for n in names if n in st), 2)  # noqa: E731
    cpu = lambda *names: round(sum(st[n]["cpu_s"] for n in names if n in st), 2)  # noqa: E731
    peak = lambda *names: max(st[n]["max_VmRSS"] for n in names if n in st)  # noqa: E731
    return {
        "total_generate_s": round(res["generate_s"], 2),
        "checks_s": g("checks"),
        "te_load_encode_s": g("te_load", "te_encode", "te_release"),
        "te_load_s": g("te_load"), "te_encode_s": g("te_encode"), "te_release_s": g("te_release"),
        "dit_load_s": g("dit_load"),
        "step_s": [round(s, 2) for s in steps], "sampling_s": round(sum(steps), 2),
        "dit_release_s": g("dit_release"),
        "vae_load_decode_s": g("vae_load", "vae_decode", "vae_release"),
        "vae_load_s": g("vae_load"), "vae_decode_s": g("vae_decode"),
        "peak_rss_gb": res["peak_rss_gb"],
        "peak_rss_by_stage_gb": {"te": peak("te_load", "te_encode", "te_release"),
                                 "dit": peak("dit_load", *step_names, "dit_release"),
                                 "vae": peak("vae_load", "vae_decode", "vae_release")},
        "read_from_storage_gb": res["read_total_gb"],
        "finite": res["finite"] and all(res["latents_finite_per_step"]),
        "png_bytes": res["png_bytes"], "png_sha256": res["png_sha256"][:16],
        "cpu_s": {"generate": cpu(*(s["stage"] for s in res["stages"] if s["stage"] not in ("startup", "png"))),
                  "te": cpu("te_load", "te_encode", "te_release"), "dit_load": cpu("dit_load"),
                  "sampling": cpu(*step_names), "vae": cpu("vae_load", "vae_decode", "vae_release")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dit", type=Path, default=DIT_PATH)
    ap.add_argument("--te", type=Path, default=TE_PATH)
    ap.add_argument("--vae", type=Path, default=VAE_PATH)
    ap.add_argument("--out", type=Path, default=OUT_PNG)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--runs", type=int, default=1, help="runs, each in a fresh child process")
    ap.add_argument("--synthesize-only", action="store_true")
    ap.add_argument("--log", action="store_true", help="show the pipeline's INFO log of each run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    ensure_files(args.dit, args.te, args.vae)
    if args.synthesize_only:
        return
    cmd = [sys.executable, __file__, "--child", "--dit", str(args.dit), "--te", str(args.te), "--vae", str(args.vae),
           "--out", str(args.out), "--size", str(args.size), "--steps", str(args.steps), "--cfg", str(args.cfg),
           "--seed", str(args.seed)]
    summaries = []
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}: load average {os.getloadavg()[0]:.2f}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if args.log or proc.returncode:
            print(proc.stderr, file=sys.stderr)
        if proc.returncode:
            print(proc.stdout, file=sys.stderr)
            raise SystemExit(proc.returncode)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        res = json.loads(line[len("RESULT "):])
        summary = summarize(res)
        summaries.append(summary)
        print(json.dumps({"run": run + 1, "summary": summary, "detail": res}, indent=1), flush=True)
    print("SUMMARY " + json.dumps(summaries), flush=True)


if __name__ == "__main__":
    main()
