"""Before / after one change, in one run: the CPU benchmarks against two revisions of ``lens_model``.

Each revision is measured from a detached ``git worktree`` under /tmp (``--before``, default the
commit before the issue-8 reshaping; ``--after``, default ``HEAD`` at the start of the run;
``--after-checkout`` measures this checkout as it is, uncommitted edits included). The measuring
code is always this checkout's ``bench/`` scripts; only ``lens_model`` comes from the revision:
each child runs with ``PYTHONPATH=<revision>:<this checkout>``, so ``import lens_model`` resolves
in the revision (checked: every child reports the package folder it imported), and the children use
only the package's public API, which both revisions share.

Per round, every selected measurement runs once for *before* and once for *after*, alternately
(before, after, before, after, ...), each in a fresh process. Printed per metric: the median over
rounds of each revision and, as the headline, the median over rounds of the ratio after / before
(each pair measured back to back; on a shared machine these move less than the times), with its
range and the ratio of the two medians. Times come as wall seconds (``_s``) and as the child's CPU
seconds over all its threads (``_cpu_s``), which other jobs on a busy machine move far less than
wall time.

Measurements (``--only`` picks some; default ``dit,te``; ``e2e`` only when asked; ``dit`` is
``dit_forward`` and ``dit_load``, which may also be picked alone):

``dit``  ``bench_dit.py --only ours``: one forward of a full-width DiT with ``--dit-blocks`` blocks,
         bf16 weights (fp32 compute where the CPU has no native bf16 matmul), median of
         ``--dit-repeat`` forwards; peak RSS. And ``bench_dit.py --load``: ``load_transformer`` of a
         random bf16 ComfyUI-layout file with ``--load-blocks`` full-width blocks (page cache
         warmed before each child), alone and followed by one read of every weight byte (a
         memory-mapped load defers its page faults to that first read); peak, anonymous and
         file-backed RSS.
``te``   this script's ``--te-child``: ``load_text_encoder`` and ``--te-runs`` encodes of "a red fox
         in the snow" from a synthetic ``--te-layers``-layer NVFP4 gpt-oss file (full-size layers
         and embedding, written by ``bench_text_encoder.py``; page cache warmed before each child),
         CPU defaults (streamed layers); peak RSS with file pages.
``e2e``  ``bench_end_to_end.py --child``: ``pipeline.generate`` with full-size random weights (bf16
         DiT 8.2 GB, NVFP4 TE 13.2 GB, fp32 VAE), 256x256, Lens-Turbo 4 steps, CFG 1, seed 42:
         wall and CPU seconds per stage, peak RSS, PNG hash (both revisions must give the same
         image). Use ``--warmup 1``: the first children meet whatever page cache other work left.

Files are synthesised once under /tmp/lens_bench by this checkout's scripts. Examples:

    python bench/compare_revisions.py                                  # dit + te, 3 rounds
    python bench/compare_revisions.py --only e2e --warmup 1 --rounds 3 # ~2 min per child here
    python bench/compare_revisions.py --only dit --rounds 1 --dit-blocks 1 --load-blocks 1  # smoke
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import torch  # noqa: E402

import bench_end_to_end as e2e  # noqa: E402  (this checkout's scripts: synthesis and the e2e summary)
import lens_model  # noqa: E402  (in a child: the revision's package, first on PYTHONPATH)
from procstats import status_bytes  # noqa: E402

BEFORE_DEFAULT = "d5ba5ff"  # the code before the issue-8 reshaping
WORKTREE_DIR = Path("/tmp")
GB = 1e9


# -- machine and revisions ----------------------------------------------------------------------------

def machine() -> dict:
    """CPU model, cores, RAM, kernel, Python, torch and its threads, load average."""
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        ram = int(next(ln for ln in f if ln.startswith("MemTotal:")).split()[1]) * 1024
    return {"cpu": model, "cores": os.cpu_count(), "ram_gib": round(ram / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def worktree(rev: str) -> tuple[Path, str, bool]:
    """A detached worktree of ``rev`` under /tmp: (folder, full hash, made here). An existing one
    at the same commit is reused (and left in place)."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = WORKTREE_DIR / f"lens_rev_{commit[:10]}"
    if (path / "lens_model").is_dir():
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        if head == commit:
            return path, commit, False
        raise SystemExit(f"{path} exists but is not a checkout of {commit}: remove it first")
    git("worktree", "add", "--detach", str(path), commit)
    return path, commit, True


def remove_worktree(path: Path) -> None:
    git("worktree", "remove", "--force", str(path))


# -- children -----------------------------------------------------------------------------------------

def run_child(tree: Path, cmd: list[str], timeout: float) -> dict:
    """Run ``cmd`` (a bench script and its arguments) with ``tree``'s lens_model first on the path;
    returns the JSON of its last ``RESULT`` line (or its last line when it has none)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(ROOT)]))
    # cwd "/": a ``python -c`` child gets no checkout on its path through the current folder
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, cwd="/", timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"child failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    tagged = [ln for ln in lines if ln.startswith("RESULT ")]
    return json.loads(tagged[-1][len("RESULT "):] if tagged else lines[-1])


def lens_model_folder(tree: Path) -> str:
    """The folder ``import lens_model`` resolves to under ``run_child``'s path for ``tree``."""
    return run_child(tree, ["-c", 'import json, lens_model, pathlib; '
                                  'print(json.dumps(str(pathlib.Path(lens_model.__file__).parent)))'], 120)


def warm(path: Path) -> None:
    """Read a file once so that its pages are in the page cache."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def dit_forward(tree: Path, a, label: str) -> dict:
    res = run_child(tree, [str(BENCH / "bench_dit.py"), "--only", "ours", "--dtype", "bf16", "--blocks",
                           str(a.dit_blocks), "--grid", str(a.dit_grid), "--text", str(a.dit_text),
                           "--repeat", str(a.dit_repeat)], a.timeout)
    each = res.get("seconds_each", [res["seconds"]])
    return {"lens_model": res["lens_model"], "dit_forward_s": median(each),
            "dit_forward_cpu_s": median(res["cpu_seconds_each"]),
            "dit_forward_peak_rss_gb": res["peak_rss_gb"], "dit_forward_peak_delta_gb": res["peak_delta_gb"]}


def dit_load(tree: Path, a, label: str) -> dict:
    warm(a.load_file)
    res = run_child(tree, [str(BENCH / "bench_dit.py"), "--load", str(a.load_file)], a.timeout)
    return {"lens_model": res["lens_model"], "dit_load_s": res["seconds"], "dit_load_cpu_s": res["cpu_seconds"],
            "dit_load_and_read_s": res["load_touch_seconds"], "dit_load_and_read_cpu_s": res["load_touch_cpu_seconds"],
            "dit_load_peak_rss_gb": res["peak_rss_gb"],
            "dit_load_read_peak_rss_gb": res["peak_rss_after_touch_gb"],
            "dit_load_read_anon_gb": res["rss_anon_after_touch_gb"],
            "dit_load_read_file_gb": res["rss_file_after_touch_gb"]}


def te_child(path: str, layers: int, runs: int) -> dict:
    """In a fresh process: ``load_text_encoder`` (CPU, its default dtype and offload) of a
    ``layers``-layer file capturing its last four layers (every layer runs), then ``runs`` encodes
    of the e2e prompt. Public API only (``selected_layers`` is a keyword of both revisions)."""
    selected = tuple(sorted({max(0, layers - 4 + i) for i in range(4)}))
    gc.collect()  # else a collection of the import's garbage may land in the timed load (~0.2 s here)
    t0, c0 = time.perf_counter(), time.process_time()
    te = lens_model.load_text_encoder(path, device="cpu", selected_layers=selected)
    out = {"lens_model": str(Path(lens_model.__file__).parent), "load_s": time.perf_counter() - t0,
           "load_cpu_s": time.process_time() - c0, "encode_s": [], "encode_cpu_s": []}
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        ctx, mask = te.encode([e2e.PROMPT])
        out["encode_s"].append(time.perf_counter() - t0)
        out["encode_cpu_s"].append(time.process_time() - c0)
    st = status_bytes()
    out.update(shape=list(ctx.shape), finite=bool(torch.isfinite(ctx).all()), dtype=str(te.dtype),
               peak_rss_gb=st["VmHWM"] / GB, rss_end_gb=st["VmRSS"] / GB)
    return out


def text_encoder(tree: Path, a, label: str) -> dict:
    warm(a.te_file)
    res = run_child(tree, [str(Path(__file__).resolve()), "--te-child", str(a.te_file), str(a.te_layers),
                           str(a.te_runs)], a.timeout)
    if not res["finite"]:
        raise RuntimeError(f"{label}: text encoder output not finite: {res}")
    return {"lens_model": res["lens_model"], "te_load_s": res["load_s"], "te_load_cpu_s": res["load_cpu_s"],
            "te_first_encode_s": res["encode_s"][0], "te_encode_s": median(res["encode_s"]),
            "te_encode_cpu_s": median(res["encode_cpu_s"]), "te_peak_rss_gb": res["peak_rss_gb"],
            "te_rss_end_gb": res["rss_end_gb"]}


def end_to_end(tree: Path, a, label: str) -> dict:
    out = Path(f"/tmp/lens_bench/e2e_{label}.png")
    res = run_child(tree, [str(BENCH / "bench_end_to_end.py"), "--child", "--dit", str(e2e.DIT_PATH), "--te",
                           str(e2e.TE_PATH), "--vae", str(e2e.VAE_PATH), "--out", str(out), "--size", "256",
                           "--steps", "4", "--cfg", "1.0", "--seed", "42"], a.timeout)
    s = e2e.summarize(res)
    cpu = s["cpu_s"]
    return {"lens_model": res["lens_model"], "e2e_total_s": s["total_generate_s"], "e2e_checks_s": s["checks_s"],
            "e2e_te_s": s["te_load_encode_s"], "e2e_dit_load_s": s["dit_load_s"], "e2e_sampling_s": s["sampling_s"],
            "e2e_step_s": median(s["step_s"]), "e2e_dit_release_s": s["dit_release_s"],
            "e2e_vae_s": s["vae_load_decode_s"], "e2e_total_cpu_s": cpu["generate"], "e2e_te_cpu_s": cpu["te"],
            "e2e_dit_load_cpu_s": cpu["dit_load"], "e2e_sampling_cpu_s": cpu["sampling"], "e2e_vae_cpu_s": cpu["vae"],
            "e2e_peak_rss_gb": s["peak_rss_gb"],
            "e2e_peak_rss_dit_stage_gb": s["peak_rss_by_stage_gb"]["dit"],
            "e2e_read_gb": s["read_from_storage_gb"], "png_sha256": s["png_sha256"], "finite": s["finite"]}


MEASUREMENTS = {"dit": (dit_forward, dit_load), "dit_forward": (dit_forward,), "dit_load": (dit_load,),
                "te": (text_encoder,), "e2e": (end_to_end,)}


# -- files --------------------------------------------------------------------------------------------

def prepare_files(a) -> None:
    """Synthesise (once) the files the selected measurements read, with this checkout's scripts."""
    if {"dit", "dit_load"} & set(a.only) and not a.load_file.exists():
        e2e.synthesize_dit(a.load_file, blocks=a.load_blocks)
    if "te" in a.only and not a.te_file.exists():
        subprocess.run([sys.executable, str(BENCH / "bench_text_encoder.py"), "--layers", str(a.te_layers),
                        "--path", str(a.te_file), "--synthesize-only"], check=True, cwd=str(ROOT))
    if "e2e" in a.only:
        e2e.ensure_files(e2e.DIT_PATH, e2e.TE_PATH, e2e.VAE_PATH)


# -- report -------------------------------------------------------------------------------------------

def fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def report(rounds: list[dict[str, dict]]) -> list[dict]:
    """Per numeric metric: medians of before and after, the median of the per-round ratios
    after / before (each pair measured back to back: the headline on a shared machine), their range
    and the ratio of the two medians."""
    rows = []
    keys = [k for k, v in rounds[0]["before"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for k in keys:
        b = [r["before"][k] for r in rounds if k in r["before"]]
        a = [r["after"][k] for r in rounds if k in r["after"]]
        per_round = sorted(r["after"][k] / r["before"][k] for r in rounds if r["before"].get(k))
        mb, ma = median(b), median(a)
        rows.append({"metric": k, "before": mb, "after": ma, "ratio": median(per_round),
                     "ratio_of_medians": ma / mb if mb else float("nan"),
                     "round_ratios": per_round, "before_all": b, "after_all": a})
    return rows


def print_report(rows: list[dict], rounds: list[dict]) -> None:
    print("\n| metric | before (median) | after (median) | after / before (median of rounds) | range over rounds "
          "| ratio of the medians |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rr = r["round_ratios"]
        span = f"{rr[0]:.2f}-{rr[-1]:.2f}" if len(rr) > 1 else (f"{rr[0]:.2f}" if rr else "-")
        print(f"| {r['metric']} | {fmt(r['before'])} | {fmt(r['after'])} | **{r['ratio']:.2f}** | {span} "
              f"| {r['ratio_of_medians']:.2f} |")
    for key in ("png_sha256", "finite"):
        seen = {(lab, str(r[lab][key])) for r in rounds for lab in ("before", "after") if key in r[lab]}
        if seen:
            print(f"{key}: " + ", ".join(sorted(f"{lab} {v}" for lab, v in seen)))


# -- main ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=BEFORE_DEFAULT, help="revision measured as 'before' (default %(default)s)")
    ap.add_argument("--after", default="HEAD", help="revision measured as 'after' (default HEAD at the start)")
    ap.add_argument("--after-checkout", action="store_true", help="measure this checkout as it is as 'after'")
    ap.add_argument("--only", default="dit,te", help="comma-separated: dit (= dit_forward + dit_load), te, e2e "
                    "(default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0, help="rounds run first and not counted (e2e: the first "
                    "children find the page cache as other work left it and read up to 20 GB from disk)")
    ap.add_argument("--dit-blocks", type=int, default=4)
    ap.add_argument("--dit-grid", type=int, default=16, help="latent grid side (16 = the e2e 256x256 image)")
    ap.add_argument("--dit-text", type=int, default=28, help="text tokens (28 = the e2e prompt)")
    ap.add_argument("--dit-repeat", type=int, default=3, help="forwards per child (their median counts)")
    ap.add_argument("--load-blocks", type=int, default=8, help="blocks of the DiT file for the load timing")
    ap.add_argument("--te-layers", type=int, default=4)
    ap.add_argument("--te-runs", type=int, default=2, help="encodes per TE child (their median counts)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    ap.add_argument("--json", type=Path, help="also write every round's numbers and the summary here")
    ap.add_argument("--keep-worktrees", action="store_true", help="leave the worktrees made here in /tmp")
    ap.add_argument("--te-child", nargs=3, metavar=("FILE", "LAYERS", "RUNS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.only = [w.strip() for w in a.only.split(",") if w.strip()]
    unknown = set(a.only) - set(MEASUREMENTS)
    if unknown:
        ap.error(f"--only: unknown {sorted(unknown)}; choose from {sorted(MEASUREMENTS)}")
    a.load_file = Path(f"/tmp/lens_bench/lens_dit_bf16_random_comfy_{a.load_blocks}blocks.safetensors")
    a.te_file = Path(f"/tmp/lens_bench/gpt_oss_20b_nvfp4_random_{a.te_layers}l.safetensors")
    return a


def measure_round(trees: dict[str, Path], a, name: str) -> dict[str, dict]:
    """One round: each selected measurement for before, then after; returns {label: metrics}."""
    out: dict[str, dict] = {"before": {}, "after": {}}
    for what in a.only:
        for fn in MEASUREMENTS[what]:
            for label in ("before", "after"):
                t0 = time.perf_counter()
                m = fn(trees[label], a, label)
                folder = m.pop("lens_model", None)
                if folder is not None and Path(folder) != trees[label] / "lens_model":
                    raise RuntimeError(f"{label}: the child imported {folder}, not {trees[label] / 'lens_model'}")
                out[label].update(m)
                shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()}
                print(f"{name} {label:6s} {fn.__name__:12s} {time.perf_counter() - t0:6.1f} s  "
                      f"load {os.getloadavg()[0]:.2f}  {json.dumps(shown)}", flush=True)
    return out


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.te_child:
        path, layers, runs = a.te_child
        print("RESULT " + json.dumps(te_child(path, int(layers), int(runs))), flush=True)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still removes its worktrees
    info = machine()
    print("machine: " + json.dumps(info), flush=True)
    made = []
    before, before_commit, new = worktree(a.before)
    made += [before] if new else []
    if a.after_checkout:
        after, after_commit = ROOT, git("rev-parse", "HEAD") + " + uncommitted edits"
    else:
        after, after_commit, new = worktree(a.after)
        made += [after] if new else []
    trees = {"before": before, "after": after}
    print(f"before: {before_commit} ({before}); after: {after_commit} ({after})", flush=True)
    try:
        for label, tree in trees.items():
            if Path(lens_model_folder(tree)) != tree / "lens_model":
                raise SystemExit(f"{label}: lens_model does not resolve to {tree}")
        prepare_files(a)
        t0 = time.perf_counter()
        for r in range(a.warmup):
            measure_round(trees, a, f"warm-up {r + 1} (not counted)")
        rounds = [measure_round(trees, a, f"round {r + 1}") for r in range(a.rounds)]
        info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        rows = report(rounds)
        print(f"\n{a.rounds} rounds in {time.perf_counter() - t0:.0f} s; load average at the end "
              f"{info['load_average_end']}")
        print_report(rows, rounds)
        if a.json:
            a.json.write_text(json.dumps({"machine": info, "before": before_commit, "after": after_commit,
                                          "args": {k: str(v) for k, v in vars(a).items()}, "rounds": rounds,
                                          "summary": rows}, indent=1))
    finally:
        if not a.keep_worktrees:
            for path in made:
                remove_worktree(path)


if __name__ == "__main__":
    main()
