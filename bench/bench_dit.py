"""CPU benchmark: one Lens DiT forward at full width vs a plain eager baseline.

Full-width blocks (D 1536, 24 heads of 64, E 2880, MLP 4096), 4 blocks instead of 48, a 64x64 latent
grid (N = 4096, a 1024x1024 image) and 128 text tokens, random weights. For fp32 and bf16 weights it
times one forward of ``lens_model.LensTransformer`` and of a naive reference forward written
below (same math, unchunked attention with an explicit [B, H, L, L] score matrix, per-op code,
everything in the weight dtype), each in its own subprocess so peak RSS is clean, and prints the
ratios (``--only`` also reports the process's CPU seconds per forward, all threads, which a
busy machine moves less than wall time). Run on a quiet machine:

    python bench/bench_dit.py                 # all four runs, summary table
    python bench/bench_dit.py --only ours --dtype bf16 --blocks 1   # one run, JSON line
    python bench/bench_dit.py --load FILE.safetensors   # time load_transformer(FILE) in a fresh process

The ``--only ours`` and ``--load`` children use only the package's public API (``lens_model``'s
exports and calling the model), so ``bench/compare_revisions.py`` can run them against an older
checkout put first on ``PYTHONPATH``.

``--load`` reports the load's wall and CPU time, the process's peak RSS (VmHWM, file-backed pages
included), anonymous / file-backed RSS after the load, then the time to read every weight byte
once (memory-mapped weights fault their pages in on first use, so load + read is the comparable
cost) with the RSS after it, and the bytes read from storage (/proc/self/io). Warm the page cache first (``cat FILE > /dev/null``) to time the cached case.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # a checkout already on PYTHONPATH (compare_revisions.py) stays first
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lens_model  # noqa: E402
from lens_model import LensDiTConfig, LensTransformer, load_transformer  # noqa: E402
from procstats import read_bytes, status_bytes  # noqa: E402  (bench/ is the script folder)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -- helpers -------------------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill a DiT with random weights of sane scales (activations stay finite in bf16), in place."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.01)
            elif p.dim() == 1:
                p.normal_(1.0, 0.05)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model.eval()


def random_model(cfg: LensDiTConfig, dtype: torch.dtype, seed: int = 0) -> LensTransformer:
    """A random-weight DiT built in fp32 on the CPU, then cast to ``dtype``."""
    return randomize_(LensTransformer(cfg, dtype=torch.float32), seed).to(dtype)


def inputs(cfg: LensDiTConfig, h: int, w: int, s: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, h * w, cfg.in_channels, generator=g)
    feats = torch.randn(1, s, cfg.num_text_layers * cfg.enc_hidden_dim, generator=g) * 3.0
    mask = torch.ones(1, s, dtype=torch.bool)
    sigma = torch.tensor([0.7])
    return x, sigma, feats, mask


# -- the naive baseline -----------------------------------------------------------------------------------

def naive_rope_frequencies(h: int, w: int, s: int, axes_dims, theta: float):
    """Complex RoPE rotations [L, sum(axes_dims) / 2] of the image grid (frame 0, rows and columns
    centred on 0) and of the text tokens (max(h//2, w//2) + k on all three axes)."""
    ys = torch.arange(h) - (h - h // 2)
    xs = torch.arange(w) - (w - w // 2)
    img = torch.stack((torch.zeros(h * w, dtype=torch.int64), ys.repeat_interleave(w), xs.repeat(h)), -1)
    txt = (max(h // 2, w // 2) + torch.arange(s)).unsqueeze(-1).expand(s, 3)

    def freqs(pos):
        ang = torch.cat([torch.outer(pos[:, a].float(), 1.0 / theta ** (torch.arange(0, d, 2).float() / d))
                         for a, d in enumerate(axes_dims)], dim=1)
        return torch.polar(torch.ones_like(ang), ang)

    return freqs(img), freqs(txt)


def naive_forward(model: LensTransformer, x, sigma, feats, mask, h, w, sdpa: bool = False):
    """Straightforward eager port of the upstream forward: weight dtype everywhere except the fp32
    norm statistics / RoPE / sinusoid, explicit softmax(QK^T / 8 + A) V over the joint sequence.

    ``sdpa=True`` is the "upstream" variant: the same code with ``F.scaled_dot_product_attention``
    and the additive [B, 1, 1, L] mask, as the reference implementation does."""
    cfg = model.config
    sd = dict(model.named_parameters())
    dt = model.dtype
    d, hd, heads = cfg.inner_dim, cfg.attention_head_dim, cfg.num_attention_heads
    bsz, n, _ = x.shape
    s = feats.shape[1]

    def lin(t, name, bias=True):
        return F.linear(t, sd[name + ".weight"], sd[name + ".bias"] if bias else None)

    def rms(t, weight, eps):
        tf = t.float()
        tf = tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps)
        return tf.to(weight.dtype) * weight

    def rope(t, freqs):  # t [B, L, H, hd]
        tc = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
        return torch.view_as_real(tc * freqs.unsqueeze(1)).flatten(3).type_as(t)

    valid = torch.cat([torch.ones(bsz, n, dtype=torch.bool), mask], dim=1)
    amask = torch.zeros(bsz, 1, 1, n + s).masked_fill(~valid[:, None, None, :], float("-inf")).to(dt)

    hs = lin(x.to(dt), "img_in")
    t = sigma.to(dt)
    fe = feats.to(dt).view(bsz, s, cfg.num_text_layers, cfg.enc_hidden_dim)
    normed = [rms(fe[:, :, k], sd[f"txt_norm.{k}.weight"], 1e-5) for k in range(cfg.num_text_layers)]
    enc = lin(torch.cat(normed, dim=-1), "txt_in")
    half = cfg.time_embed_dim // 2
    freqs_t = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs_t[None] * 1000
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1).to(dt)
    temb = lin(F.silu(lin(emb, "time_text_embed.timestep_embedder.linear_1")), "time_text_embed.timestep_embedder.linear_2")

    img_f, txt_f = naive_rope_frequencies(h, w, s, cfg.axes_dims_rope, cfg.rope_theta)

    for i in range(cfg.num_layers):
        p = f"transformer_blocks.{i}."
        im1, im2 = lin(F.silu(temb), p + "img_mod.1").chunk(2, -1)
        tm1, tm2 = lin(F.silu(temb), p + "txt_mod.1").chunk(2, -1)

        def modulate(v, mp):
            shift, scale, gate = mp.chunk(3, -1)
            return v * (1 + scale[:, None]) + shift[:, None], gate[:, None]

        xm, g1 = modulate(rms(hs, sd[p + "img_norm1.weight"], 1e-6), im1)
        cm, tg1 = modulate(rms(enc, sd[p + "txt_norm1.weight"], 1e-6), tm1)
        iq, ik, iv = lin(xm, p + "attn.img_qkv").view(bsz, n, 3, heads, hd).unbind(2)
        tq, tk, tv = lin(cm, p + "attn.txt_qkv").view(bsz, s, 3, heads, hd).unbind(2)
        eps = cfg.qk_norm_eps
        iq = rope(rms(iq, sd[p + "attn.norm_q.weight"], eps), img_f)
        ik = rope(rms(ik, sd[p + "attn.norm_k.weight"], eps), img_f)
        tq = rope(rms(tq, sd[p + "attn.norm_added_q.weight"], eps), txt_f)
        tk = rope(rms(tk, sd[p + "attn.norm_added_k.weight"], eps), txt_f)
        q = torch.cat([iq, tq], 1).transpose(1, 2)
        k = torch.cat([ik, tk], 1).transpose(1, 2)
        v = torch.cat([iv, tv], 1).transpose(1, 2)
        if sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=amask).transpose(1, 2).reshape(bsz, n + s, d)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + amask
            o = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(bsz, n + s, d)
            del scores
        hs = hs + g1 * lin(o[:, :n], p + "attn.to_out.0")
        enc = enc + tg1 * lin(o[:, n:], p + "attn.to_add_out")
        xm2, g2 = modulate(rms(hs, sd[p + "img_norm2.weight"], 1e-6), im2)
        hs = hs + g2 * lin(F.silu(lin(xm2, p + "img_mlp.w1", False)) * lin(xm2, p + "img_mlp.w3", False), p + "img_mlp.w2", False)
        cm2, tg2 = modulate(rms(enc, sd[p + "txt_norm2.weight"], 1e-6), tm2)
        enc = enc + tg2 * lin(F.silu(lin(cm2, p + "txt_mlp.w1", False)) * lin(cm2, p + "txt_mlp.w3", False), p + "txt_mlp.w2", False)

    scale, shift = lin(F.silu(temb), "norm_out.linear").chunk(2, -1)
    hs = F.layer_norm(hs, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    return lin(hs, "proj_out")


# -- load timing (child process) ----------------------------------------------------------------------

def run_load(path: str, dtype_name: str | None) -> dict:
    """Time ``load_transformer(path)`` once in this (fresh) process."""
    before_read = read_bytes()
    rss_before = rss_bytes()
    gc.collect()  # else a collection of the import's garbage may land in the timed load
    t0, c0 = time.perf_counter(), time.process_time()
    model = load_transformer(path, dtype=DTYPES[dtype_name] if dtype_name else None)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    load_peak = peak_rss_bytes()
    load_status = status_bytes()
    tensors = list(model.state_dict().values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    t0, c0 = time.perf_counter(), time.process_time()
    for t in tensors:  # read every weight byte once, as a first forward does (maps fault in lazily)
        if t.numel():
            t.reshape(-1).view(torch.uint8).max()
    touch, touch_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "load": str(path),
        "dtype": str(model.dtype).replace("torch.", ""),
        "seconds": round(elapsed, 3),
        "cpu_seconds": round(cpu, 3),
        "weights_gb": round(nbytes / 1e9, 3),
        "gb_per_s": round(nbytes / 1e9 / elapsed, 2),
        "rss_before_gb": round(rss_before / 1e9, 3),
        "peak_rss_gb": round(load_peak / 1e9, 3),
        "rss_anon_gb": round(load_status["RssAnon"] / 1e9, 3),
        "rss_file_gb": round(load_status["RssFile"] / 1e9, 3),
        "touch_seconds": round(touch, 3),
        "load_touch_seconds": round(elapsed + touch, 3),
        "load_touch_cpu_seconds": round(cpu + touch_cpu, 3),
        "peak_rss_after_touch_gb": round(peak_rss_bytes() / 1e9, 3),
        "rss_anon_after_touch_gb": round(status_bytes()["RssAnon"] / 1e9, 3),
        "rss_file_after_touch_gb": round(status_bytes()["RssFile"] / 1e9, 3),
        "read_from_storage_gb": round((read_bytes() - before_read) / 1e9, 3),
        "lens_model": str(Path(lens_model.__file__).parent),
    }


# -- one run (child process) ---------------------------------------------------------------------------

def run_one(impl: str, dtype_name: str, blocks: int, grid: int, text: int, compute: str | None, repeat: int = 1,
            cast_workspace: bool = True) -> dict:
    import resource

    cfg = LensDiTConfig(num_layers=blocks)
    model = random_model(cfg, DTYPES[dtype_name])
    if compute:
        model.compute_dtype = DTYPES[compute]
    if not cast_workspace:  # the layers cast into fresh memory per call (the code before the workspace)
        for m in model.modules():
            if hasattr(m, "cast_workspace"):
                m.cast_workspace = None
    x, sigma, feats, mask = inputs(cfg, grid, grid, text)
    if impl == "ours":  # the documented call: latents [B, 128, h, w] in, velocity [B, 128, h, w] out
        def fwd(tokens, sigma, feats, mask, h, w):
            bsz, n, ch = tokens.shape
            out = model(tokens.transpose(1, 2).reshape(bsz, ch, h, w), sigma, feats, mask)
            return out.reshape(bsz, -1, n).transpose(1, 2)
    else:
        fwd = lambda *a: naive_forward(model, *a, sdpa=impl == "upstream")  # noqa: E731
    with torch.no_grad():
        # warm-up on a small grid (kernel selection, allocator) - not timed
        xs, ss, fs, ms = inputs(cfg, 8, 8, 8)
        fwd(xs, ss, fs, ms, 8, 8)
        before = rss_bytes()
        reset_peak_rss()
        gc.collect()
        times, cpus, faults = [], [], []
        for _ in range(max(1, repeat)):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0, c0 = time.perf_counter(), time.process_time()
            out = fwd(x, sigma, feats, mask, grid, grid)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        elapsed = times[0]
        peak = peak_rss_bytes()
    out = out.float()
    torch.save(out, f"/tmp/bench_dit_{impl}_{dtype_name}.pt")
    return {
        "impl": impl,
        "dtype": dtype_name,
        "compute": str(model.resolved_compute_dtype()).replace("torch.", "") if impl == "ours" else dtype_name,
        "sdpa_backend": "explicit softmax" if impl == "naive" else "sdpa",
        "blocks": blocks,
        "grid": grid,
        "text": text,
        "seconds": round(elapsed, 3),
        **({"seconds_each": [round(t, 3) for t in times]} if len(times) > 1 else {}),
        "cpu_seconds_each": [round(c, 3) for c in cpus],
        "minor_page_faults_each": faults,
        "cast_workspace": cast_workspace,
        "rss_before_gb": round(before / 1e9, 3),
        "peak_rss_gb": round(peak / 1e9, 3),
        "peak_delta_gb": round((peak - before) / 1e9, 3),
        "finite": bool(torch.isfinite(out).all()),
        "threads": torch.get_num_threads(),
        "lens_model": str(Path(lens_model.__file__).parent),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["ours", "naive", "upstream"], help="run one implementation in this process, print JSON")
    ap.add_argument("--upstream", default="fp32", help="dtypes for which to also time the upstream-style "
                    "forward (naive code + SDPA with the additive mask); '' for none")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--dtypes", default="fp32,bf16", help="dtypes for the full comparison")
    ap.add_argument("--compute", choices=list(DTYPES), default=None, help="force the compute dtype of ours")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--grid", type=int, default=64)
    ap.add_argument("--text", type=int, default=128)
    ap.add_argument("--skip-naive-bf16", action="store_true", help="skip the (very slow on AVX2) naive bf16 run")
    ap.add_argument("--naive-bf16-blocks", type=int, default=None,
                    help="run the naive bf16 baseline with this many blocks and extrapolate its time linearly "
                         "(bf16 GEMMs are emulated on CPUs without AVX512-BF16/AMX: ~6 GFLOP/s on AVX2)")
    ap.add_argument("--repeat", type=int, default=1, help="with --only: time this many consecutive forwards "
                    "(seconds = the first, seconds_each = all)")
    ap.add_argument("--no-cast-workspace", action="store_true", help="with --only ours: detach the model's "
                    "CastWorkspace (cast bf16 weights into fresh memory per call, as before it existed)")
    ap.add_argument("--load", metavar="FILE", help="time load_transformer(FILE) in this process, print JSON")
    ap.add_argument("--load-dtype", choices=list(DTYPES), default=None, help="dtype for --load (default: as stored)")
    args = ap.parse_args()

    if args.load:
        print(json.dumps(run_load(args.load, args.load_dtype)), flush=True)
        return
    if args.only:
        print(json.dumps(run_one(args.only, args.dtype, args.blocks, args.grid, args.text, args.compute, args.repeat,
                                 cast_workspace=not args.no_cast_workspace)), flush=True)
        return

    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}", flush=True)
    results = {}
    for dt in args.dtypes.split(","):
        for impl in ("naive", "upstream", "ours"):
            if impl == "naive" and dt == "bf16" and args.skip_naive_bf16:
                continue
            if impl == "upstream" and dt not in args.upstream.split(","):
                continue
            blocks = args.blocks
            if impl == "naive" and dt == "bf16" and args.naive_bf16_blocks:
                blocks = args.naive_bf16_blocks
            cmd = [sys.executable, __file__, "--only", impl, "--dtype", dt, "--blocks", str(blocks),
                   "--grid", str(args.grid), "--text", str(args.text)]
            if impl == "ours" and args.compute:
                cmd += ["--compute", args.compute]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            print(json.dumps(res), flush=True)
            if blocks != args.blocks:
                res["seconds_measured"] = res["seconds"]
                res["seconds"] = round(res["seconds"] * args.blocks / blocks, 3)
                res["extrapolated_from_blocks"] = blocks
                print(f"  naive {dt}: {res['seconds_measured']} s for {blocks} block(s) -> {res['seconds']} s "
                      f"extrapolated to {args.blocks}", flush=True)
            results[(impl, dt)] = res
        if (("naive", dt) in results) and (("ours", dt) in results):
            a = torch.load(f"/tmp/bench_dit_ours_{dt}.pt")
            b = torch.load(f"/tmp/bench_dit_naive_{dt}.pt")
            rel = ((a - b).norm() / b.norm()).item() if a.shape == b.shape and "extrapolated_from_blocks" not in results[("naive", dt)] else float("nan")
            o, nv = results[("ours", dt)], results[("naive", dt)]
            print(
                f"{dt}: ours {o['seconds']:.2f} s (compute {o['compute']}), naive {nv['seconds']:.2f} s -> time ratio "
                f"{o['seconds'] / nv['seconds']:.2f}; peak RSS ours {o['peak_rss_gb']:.2f} GB (+{o['peak_delta_gb']:.2f}), "
                f"naive {nv['peak_rss_gb']:.2f} GB (+{nv['peak_delta_gb']:.2f}) -> ratio "
                f"{o['peak_rss_gb'] / nv['peak_rss_gb']:.2f}; output rel diff {rel:.2e}",
                flush=True,
            )
        if ("upstream", dt) in results and ("ours", dt) in results:
            u, o = results[("upstream", dt)], results[("ours", dt)]
            print(f"{dt}: upstream-style (SDPA) {u['seconds']:.2f} s, peak RSS {u['peak_rss_gb']:.2f} GB "
                  f"(+{u['peak_delta_gb']:.2f}) -> ours/upstream time {o['seconds'] / u['seconds']:.2f}", flush=True)
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)


if __name__ == "__main__":
    main()
