"""Tensor reading: the pack's former hand-written readers against ``safetensors.safe_open``.

Two workloads, each read in a fresh child process per reader, page cache warm, readers alternated:

* ``dit``: a representative subset of the full-size DiT: the first ``--blocks`` (default 4) of the 48
  full-width blocks plus every non-block tensor, random bf16, written once to ``--dir`` (one
  ComfyUI-layout file, 0.73 GB for 4 blocks). Every tensor is read and kept (as the DiT loader
  does), then every byte is read once (a max over the bytes, as a first forward reads them).
* ``te``: full-size gpt-oss-20b decoder layers with NVFP4 and MXFP4 expert banks (random codes,
  ``--te-layers`` of each, 0.49 GB per layer), read one layer at a time as the streamed text
  encoder does: read every tensor of the layer, read every byte, drop the layer. Per-layer time
  and the process's resident memory (anonymous / file-backed) after the last layer.

Each child also reports its CPU seconds and minor page faults, which a busy shared machine moves
far less than wall time.

Readers:
  ``pread``       ``os.preadv`` into fresh memory per tensor (the pack's reader before memory maps).
  ``mmap``        a copy-on-write ``mmap`` per tensor, prefaulted with ``MADV_POPULATE_READ`` (the
                  pack's reader until this benchmark).
  ``safe_open``   ``safetensors.safe_open(...).get_tensor`` (zero-copy views of one copy-on-write map
                  of the whole file); for ``te`` one handle per layer, dropped with the layer.
  ``safe_open_1`` (``te`` only) one handle kept open for all layers.

Ratios are against ``mmap``. Example: ``python bench/bench_safetensors.py`` (~2 GB in /tmp).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from procstats import status_bytes  # noqa: E402

DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "U8": torch.uint8, "F8_E4M3": torch.float8_e4m3fn}


# -- the former hand-written readers (kept here only for the comparison) -----------------------------

def _offsets(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (DTYPES[v["dtype"]], tuple(v["shape"]), 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items()}


def _pread(path: Path, dtype, shape, start, end) -> torch.Tensor:
    out = torch.empty(end - start, dtype=torch.uint8)
    view = memoryview(out.numpy()).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            done += os.preadv(fd, [view[done:]], start + done)
    finally:
        os.close(fd)
    return out.view(dtype).reshape(shape)


def _mmap(path: Path, dtype, shape, start, end) -> torch.Tensor:
    gran = mmap.ALLOCATIONGRANULARITY
    base = start // gran * gran
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), end - base, access=mmap.ACCESS_COPY, offset=base)
    m.madvise(getattr(mmap, "MADV_POPULATE_READ", 22))
    return torch.frombuffer(m, dtype=torch.uint8, offset=start - base, count=end - start).view(dtype).reshape(shape)


# -- files --------------------------------------------------------------------------------------------

def dit_file(folder: Path, blocks: int) -> Path:
    from lens_model import LensDiTConfig, LensTransformer

    path = folder / f"lens_dit_{blocks}blocks_bf16.safetensors"
    if not path.exists():
        with torch.device("meta"):
            model = LensTransformer(LensDiTConfig(num_layers=blocks))
        g = torch.Generator().manual_seed(0)
        sd = {"model.diffusion_model." + k: (torch.randn(v.shape, generator=g) * 0.02).bfloat16()
              for k, v in model.state_dict().items()}
        save_file(sd, str(path))
    return path


def te_file(folder: Path, layers: int) -> Path:
    from bench_text_encoder import RandomPool, layer_tensors

    path = folder / f"gpt_oss_{layers}nvfp4_{layers}mxfp4_layers.safetensors"
    if not path.exists():
        pool, g = RandomPool(seed=0), torch.Generator().manual_seed(0)
        sd = {}
        for i in range(2 * layers):
            sd.update(layer_tensors(i, pool, g, "nvfp4" if i < layers else "mxfp4"))
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


# -- child: one reader, one workload ------------------------------------------------------------------

def _touch(tensors) -> None:
    """Read every byte once (a max over the bytes: about memory speed once the pages are in)."""
    for t in tensors:
        if t.numel():
            t.reshape(-1).view(torch.uint8).max()


def _cpu() -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_minflt


def child(workload: str, reader: str, path: Path) -> dict:
    offs = _offsets(path)
    out: dict = {"reader": reader}
    cpu0, flt0 = _cpu()
    if workload == "dit":
        t0 = time.perf_counter()
        if reader == "safe_open":
            with safe_open(path, "pt") as f:
                kept = [f.get_tensor(k) for k in f.keys()]
        else:
            fn = _pread if reader == "pread" else _mmap
            kept = [fn(path, *offs[k]) for k in offs]
        t1 = time.perf_counter()
        _touch(kept)
        t2 = time.perf_counter()
        st = status_bytes()
        cpu1, flt1 = _cpu()
        out.update(cpu_s=cpu1 - cpu0, faults=flt1 - flt0, read_s=t1 - t0, touch_s=t2 - t1, total_s=t2 - t0, gb=sum(t.nbytes for t in kept) / 1e9,
                   peak_gb=st["VmHWM"] / 1e9, anon_gb=st["RssAnon"] / 1e9, file_gb=st["RssFile"] / 1e9)
        return out
    layers = sorted({int(k.split(".")[1]) for k in offs})
    per_layer, handle = [], (safe_open(path, "pt") if reader == "safe_open_1" else None)
    for i in layers:
        keys = [k for k in offs if k.startswith(f"layers.{i}.")]
        t0 = time.perf_counter()
        if reader in ("safe_open", "safe_open_1"):
            f = handle or safe_open(path, "pt")
            layer = [f.get_tensor(k) for k in keys]
            del f
        else:
            fn = _pread if reader == "pread" else _mmap
            layer = [fn(path, *offs[k]) for k in keys]
        _touch(layer)
        per_layer.append(time.perf_counter() - t0)
        del layer
    st = status_bytes()
    cpu1, flt1 = _cpu()
    out.update(cpu_s=cpu1 - cpu0, faults=flt1 - flt0, layer_s=per_layer, total_s=sum(per_layer), peak_gb=st["VmHWM"] / 1e9, anon_gb=st["RssAnon"] / 1e9,
               file_gb=st["RssFile"] / 1e9, layer_gb=path.stat().st_size / len(layers) / 1e9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/lens_bench"))
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--te-layers", type=int, default=2, help="layers of each expert format")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["dit", "te"], default=None, help="run one workload")
    ap.add_argument("--child", nargs=3, metavar=("WORKLOAD", "READER", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        w, r, f = args.child
        print("RESULT " + json.dumps(child(w, r, Path(f))), flush=True)
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    files = {w: make(args.dir, n) for w, make, n in (("dit", dit_file, args.blocks), ("te", te_file, args.te_layers))
             if args.only in (None, w)}
    readers = {"dit": ("mmap", "safe_open", "pread"), "te": ("mmap", "safe_open", "safe_open_1", "pread")}
    best: dict = {}
    totals: dict = {}  # (workload, reader) -> total seconds per round
    cpus: dict = {}  # (workload, reader) -> CPU seconds of the child per round
    for rnd in range(args.rounds):
        for w, path in files.items():
            for r in readers[w]:
                _warm(path)
                proc = subprocess.run([sys.executable, __file__, "--child", w, r, str(path)],
                                      capture_output=True, text=True, check=True)
                res = json.loads(proc.stdout.split("RESULT ", 1)[1])
                print(w, json.dumps(res), flush=True)
                key = (w, r)
                totals.setdefault(key, []).append(res["total_s"])
                cpus.setdefault(key, []).append(res["cpu_s"])
                if key not in best or res["total_s"] < best[key]["total_s"]:
                    best[key] = res
    print(f"\nbest of {args.rounds} rounds; time ratio against mmap (the reader before this benchmark) as the"
          " median of the per-round ratios (the machine is shared: rounds differ)")
    for (w, r), res in best.items():
        ratios = sorted(a / b for a, b in zip(totals[(w, r)], totals[(w, "mmap")]))
        extra = (f"read {res['read_s']:.2f} s + touch {res['touch_s']:.2f} s" if w == "dit"
                 else f"per layer {min(res['layer_s']):.3f}-{max(res['layer_s']):.3f} s")
        cpu = sorted(cpus[(w, r)])
        print(f"{w:3s} {r:11s} total {res['total_s']:.2f} s ({extra}), time x{ratios[len(ratios) // 2]:.2f} "
              f"(rounds {', '.join(f'{x:.2f}' for x in ratios)}), CPU {cpu[0]:.2f}-{cpu[-1]:.2f} s, "
              f"{res['faults']} minor faults, "
              f"peak RSS {res['peak_gb']:.2f} GB, end anon/file {res['anon_gb']:.2f}/{res['file_gb']:.2f} GB")


if __name__ == "__main__":
    main()
