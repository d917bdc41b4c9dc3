"""Benchmark the gpt-oss text encoder on the CPU with full-size random weights.

Modes:
  --layer-only       build ONE full-size layer in memory (NVFP4 or MXFP4 experts, random codes) and time
                     its attention + MoE for a 125-token prompt; extrapolates to 24 layers. Cheap (~1 GB).
  (default)          synthesise a full-size gpt-oss-20b file in the ComfyUI NVFP4 layout (random codes,
                     ~13 GB; written tensor by tensor, never held in RAM; reused when present), then load
                     and encode "a red fox in the snow" (125 ids) in a fresh subprocess and report encode
                     seconds, load seconds and peak RSS (ru_maxrss of the child, file pages included).
  --layers N         synthesise / run a truncated model with N layers (quick measurements).

Example:
  python bench/bench_text_encoder.py --layer-only
  python bench/bench_text_encoder.py --layers 4
  python bench/bench_text_encoder.py            # full 13 GB file at /tmp/lens_bench/...
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests"):  # the package, and tests/writers.py (file writers, not shipped)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from writers import comfy_quant_tensor, swizzle_scales  # noqa: E402

from lens_model import quant  # noqa: E402
from lens_model.gpt_oss import GptOssConfig, GptOssDecoderLayer, attention_bias, rms_norm, rope_cos_sin  # noqa: E402
from lens_model.ops import CastWorkspace, ExpertBank  # noqa: E402
from lens_model.text_encoder import (DEFAULT_SELECTED_LAYERS, ExpertPool, default_dtype, load_text_encoder,  # noqa: E402
                                     resolve_dtype)
from lens_model.tokenizer import load_tokenizer  # noqa: E402

PROMPT = "a red fox in the snow"
DEFAULT_PATH = Path("/tmp/lens_bench/gpt_oss_20b_nvfp4_random.safetensors")

# gpt-oss-20b shapes
E, I, H, KV, D, X, V = 2880, 2880, 64, 8, 64, 32, 201088


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------
# Random full-size tensors


class RandomPool:
    """Random bytes handed out in slices, so a 13 GB file needs only one 256 MB random draw."""

    def __init__(self, nbytes: int = 256 << 20, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.buf = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
        self.pos = 0

    def take(self, n: int) -> torch.Tensor:
        out = torch.empty(n, dtype=torch.uint8)
        done = 0
        while done < n:
            k = min(n - done, self.buf.numel() - self.pos)
            out[done:done + k] = self.buf[self.pos:self.pos + k]
            self.pos = (self.pos + k) % self.buf.numel()
            done += k
        return out


def _bf16(shape, std, gen) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def _e4m3_scale_bits(n: int, gen) -> torch.Tensor:
    """Block scales around 1 (e4m3 values 0.5..2): realistic magnitudes, no subnormals."""
    lo = torch.tensor(0.5).to(torch.float8_e4m3fn).view(torch.uint8).item()
    hi = torch.tensor(2.0).to(torch.float8_e4m3fn).view(torch.uint8).item()
    return torch.randint(lo, hi + 1, (n,), dtype=torch.uint8, generator=gen)


def layer_tensors(i: int, pool: RandomPool, gen, fmt: str = "nvfp4"):
    """Yield (bare key, tensor) for decoder layer ``i`` in the ComfyUI layout (or HF MXFP4 names)."""
    p = f"layers.{i}."
    yield p + "input_layernorm.weight", (1 + _bf16((E,), 0.1, gen).float()).bfloat16()
    yield p + "post_attention_layernorm.weight", (1 + _bf16((E,), 0.1, gen).float()).bfloat16()
    for name, rows, cols in (("q_proj", H * D, E), ("k_proj", KV * D, E), ("v_proj", KV * D, E), ("o_proj", E, H * D)):
        yield p + f"self_attn.{name}.weight", _bf16((rows, cols), 0.02, gen)
        yield p + f"self_attn.{name}.bias", _bf16((rows,), 0.02, gen)
    yield p + "self_attn.sinks", _bf16((H,), 1.0, gen)
    yield p + "mlp.router.weight", _bf16((X, E), 0.05, gen)
    yield p + "mlp.router.bias", _bf16((X,), 0.05, gen)
    for bank, rows in (("gate_up_proj", 2 * I), ("down_proj", E)):
        b = p + f"mlp.experts.{bank}"
        cols = I if bank == "down_proj" else E
        if fmt == "nvfp4":
            rp, cp = quant.padded_scale_shape(rows, cols // 16)
            yield b + ".weight", pool.take(X * rows * cols // 2).view(X, rows, cols // 2)
            plain = _e4m3_scale_bits(X * rows * (cols // 16), gen).view(X, rows, cols // 16)
            yield b + ".weight_scale", swizzle_scales(plain).view(torch.float8_e4m3fn)
            yield b + ".weight_scale_2", torch.full((X,), 0.01)
            yield b + ".bias", _bf16((X, rows), 0.02, gen)
            yield b + ".comfy_quant", comfy_quant_tensor({"format": "nvfp4", "num_experts": X})
        else:
            yield b + "_blocks", pool.take(X * rows * cols // 2).view(X, rows, cols // 32, 16)
            yield b + "_scales", torch.randint(118, 124, (X, rows, cols // 32), dtype=torch.uint8, generator=gen)
            yield b + "_bias", _bf16((X, rows), 0.02, gen)


# --------------------------------------------------------------------------------------------------
# Streaming safetensors writer (tensor by tensor, header first)


def _st_dtype(t: torch.Tensor) -> str:
    return {torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3"}[t.dtype]


def synthesize(path: Path, layers: int, seed: int = 0) -> Path:
    """Write a full-size random gpt-oss-20b file (ComfyUI NVFP4 layout, bare keys) with ``layers`` layers.

    Two passes over deterministic generators: the first computes the header (shapes only), the second
    writes tensors one by one. Peak memory ~ the random pool + one tensor.
    """
    path.parent.mkdir(parents=True, exist_ok=True)

    def tensors(shapes_only: bool):
        gen = torch.Generator().manual_seed(seed)
        pool = RandomPool(seed=seed) if not shapes_only else None
        if shapes_only:
            yield "embed_tokens.weight", ((V, E), "BF16")
        else:
            yield "embed_tokens.weight", None  # written in chunks below
        for i in range(layers):
            if shapes_only:
                for k, shape, dt in _layer_shapes(i):
                    yield k, (shape, dt)
            else:
                yield from layer_tensors(i, pool, gen)
        if shapes_only:
            yield "norm.weight", ((E,), "BF16")
        else:
            yield "norm.weight", torch.ones(E, dtype=torch.bfloat16)

    tok_json = torch.frombuffer(bytearray(load_tokenizer(None).to_json().encode("utf-8")), dtype=torch.uint8)
    header, off = {}, 0
    sizes = {"BF16": 2, "F32": 4, "U8": 1, "F8_E4M3": 1}
    for k, (shape, dt) in list(tensors(True)) + [("tokenizer_json", (tuple(tok_json.shape), "U8"))]:
        n = sizes[dt]
        for s in shape:
            n *= s
        header[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"lens_bench": "random gpt-oss-20b, ComfyUI NVFP4 layout"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    if raw[:1] == b"\x80":  # keep clear of pickle sniffing on the first byte
        raw += b" " * 8
    tmp = path.with_suffix(".partial")
    t0 = time.perf_counter()
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k, t in itertools.chain(tensors(False), [("tokenizer_json", tok_json)]):  # lazily: one tensor at a time
            if k == "embed_tokens.weight":
                g = torch.Generator().manual_seed(seed + 1)
                for r0 in range(0, V, 8192):
                    rows = min(V, r0 + 8192) - r0
                    f.write(_bf16((rows, E), 1.0, g).view(torch.uint8).numpy().tobytes())
                continue
            meta = header[k]
            assert list(t.shape) == meta["shape"] and _st_dtype(t) == meta["dtype"], (k, t.shape, t.dtype, meta)
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    os.replace(tmp, path)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {layers} layers) in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def _layer_shapes(i: int):
    p = f"layers.{i}."
    yield p + "input_layernorm.weight", (E,), "BF16"
    yield p + "post_attention_layernorm.weight", (E,), "BF16"
    for name, rows, cols in (("q_proj", H * D, E), ("k_proj", KV * D, E), ("v_proj", KV * D, E), ("o_proj", E, H * D)):
        yield p + f"self_attn.{name}.weight", (rows, cols), "BF16"
        yield p + f"self_attn.{name}.bias", (rows,), "BF16"
    yield p + "self_attn.sinks", (H,), "BF16"
    yield p + "mlp.router.weight", (X, E), "BF16"
    yield p + "mlp.router.bias", (X,), "BF16"
    for bank, rows in (("gate_up_proj", 2 * I), ("down_proj", E)):
        b = p + f"mlp.experts.{bank}"
        cols = I if bank == "down_proj" else E
        rp, cp = quant.padded_scale_shape(rows, cols // 16)
        yield b + ".weight", (X, rows, cols // 2), "U8"
        yield b + ".weight_scale", (X, rp, cp), "F8_E4M3"
        yield b + ".weight_scale_2", (X,), "F32"
        yield b + ".bias", (X, rows), "BF16"
        yield b + ".comfy_quant", (len(json.dumps({"format": "nvfp4", "num_experts": X})),), "U8"


# --------------------------------------------------------------------------------------------------
# Single layer in memory


def layer_only(fmt: str, tokens: int, dtype: torch.dtype, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    pool = RandomPool(seed=0)
    raw = dict(layer_tensors(1, pool, gen, fmt))
    p = "layers.1."
    t = {k[len(p):]: v for k, v in raw.items() if not k.endswith("comfy_quant") and ".experts." not in k}
    for bank, rows, cols in (("gate_up_proj", 2 * I, E), ("down_proj", E, I)):
        b = p + f"mlp.experts.{bank}"
        if fmt == "nvfp4":
            t[f"mlp.experts.{bank}"] = ExpertBank("nvfp4", X, rows, cols, raw[b + ".bias"], codes=raw[b + ".weight"],
                                                  scales=raw[b + ".weight_scale"].view(torch.uint8), global_scale=raw[b + ".weight_scale_2"])
        else:
            t[f"mlp.experts.{bank}"] = ExpertBank("mxfp4", X, rows, cols, raw[b + "_bias"],
                                                  codes=raw[b + "_blocks"].reshape(X, rows, cols // 2), scales=raw[b + "_scales"])
    del pool, raw
    cfg = GptOssConfig()
    x = torch.randn(1, tokens, E, generator=gen).to(dtype)
    cos, sin = rope_cos_sin(cfg, tokens, dtype, "cpu")
    bias = attention_bias(torch.ones(1, tokens, dtype=torch.long), None)
    ws = CastWorkspace()
    pool = ExpertPool(torch.get_num_threads()) if torch.get_num_threads() > 1 else None
    layer = GptOssDecoderLayer(cfg, 1)  # meta device; the weights go in as the encoder puts them in
    layer.assign(t)
    layer.mlp.experts.cast_workspace, layer.mlp.experts.expert_pool = ws, pool
    attn, mlp = layer.self_attn, layer.mlp
    res = {"format": fmt, "tokens": tokens, "dtype": str(dtype), "threads": torch.get_num_threads()}
    with torch.inference_mode():
        h = rms_norm(x, t["post_attention_layernorm.weight"].to(dtype), cfg.rms_norm_eps).reshape(tokens, E)
        mlp(h)  # warm-up
        attn_t, moe_t, moe_cpu = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            attn(x, cos, sin, bias)
            t1 = time.perf_counter()
            c1 = time.process_time()
            mlp(h)
            t2 = time.perf_counter()
            moe_cpu.append(time.process_time() - c1)
            attn_t.append(t1 - t0)
            moe_t.append(t2 - t1)
        logits = torch.nn.functional.linear(h.float(), t["mlp.router.weight"].float())
        hit = torch.topk(logits, cfg.num_experts_per_tok, dim=-1).indices.unique().numel()
    res.update(attention_s=min(attn_t), moe_s=min(moe_t), moe_cpu_s=min(moe_cpu), experts_hit=hit,
               layer_s=min(attn_t) + min(moe_t), extrapolated_24_layers_s=24 * (min(attn_t) + min(moe_t)),
               cpu_time_s=time.process_time(), peak_rss_mb=_peak_rss_mb())
    return res


# --------------------------------------------------------------------------------------------------
# Child: load + encode


def child(path: str, dtype: str | None, prompt: str, offload: str | None, runs: int, layers: int) -> dict:
    out = {"rss_start_mb": _rss_mb()}
    selected = tuple(sorted({min(n, layers - 1) for n in DEFAULT_SELECTED_LAYERS}))
    t0 = time.perf_counter()
    te = load_text_encoder(path, dtype=dtype, device="cpu", offload=offload, selected_layers=selected)
    out["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = te.tokenize(prompt)
    out["tokenizer_s"] = time.perf_counter() - t0
    out["ids"] = len(ids)
    out["rss_after_load_mb"] = _rss_mb()
    times, per_layer = [], []

    def on_layer(done, total):
        now = time.perf_counter()
        per_layer.append(now - last[0])
        last[0] = now

    for _ in range(runs):
        per_layer.clear()
        t0 = time.perf_counter()
        last = [t0]
        ctx, mask = te.encode([prompt], callback=on_layer)
        times.append(time.perf_counter() - t0)
    out.update(encode_s=times, last_run_layer_s=[round(t, 3) for t in per_layer], context=list(ctx.shape), finite=bool(torch.isfinite(ctx).all()),
               dtype=str(te.dtype), offload=te.offload, threads=torch.get_num_threads(),
               peak_rss_mb=_peak_rss_mb(), rss_end_mb=_rss_mb())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", type=Path, default=None, help=f"synthetic file (default {DEFAULT_PATH})")
    ap.add_argument("--layers", type=int, default=24, help="decoder layers in the synthetic file")
    ap.add_argument("--layer-only", action="store_true", help="time one in-memory layer and extrapolate")
    ap.add_argument("--format", default="nvfp4", choices=["nvfp4", "mxfp4"], help="expert format for --layer-only")
    ap.add_argument("--tokens", type=int, default=125)
    ap.add_argument("--dtype", default=None, help="bf16 | fp32 (default: the encoder's default)")
    ap.add_argument("--offload", default=None, help="device | layers | stream (default: stream on the CPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=2, help="encodes per child (first is cold)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--synthesize-only", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(child(str(args.path), args.dtype, PROMPT, args.offload, args.runs, args.layers)), flush=True)
        return
    if args.layer_only:
        dtype = resolve_dtype(args.dtype, torch.device("cpu")) if args.dtype else default_dtype(torch.device("cpu"))
        print(json.dumps(layer_only(args.format, args.tokens, dtype, args.repeats), indent=1))
        return
    path = args.path or (DEFAULT_PATH if args.layers == 24 else DEFAULT_PATH.with_name(f"gpt_oss_20b_nvfp4_random_{args.layers}l.safetensors"))
    if not path.exists():
        synthesize(path, args.layers)
    else:
        print(f"reusing {path} ({path.stat().st_size / 1e9:.2f} GB)")
    if args.synthesize_only:
        return
    if args.layers < 24:
        print(f"note: {args.layers}-layer model; the encoder runs layers 0..{args.layers - 1} "
              f"(captures clamp to the available layers)", flush=True)
    cmd = [sys.executable, __file__, "--child", "--path", str(path), "--runs", str(args.runs), "--layers", str(args.layers)]
    for flag, val in (("--dtype", args.dtype), ("--offload", args.offload), ("--threads", args.threads)):
        if val:
            cmd += [flag, str(val)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        raise SystemExit(proc.returncode)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["file_gb"] = path.stat().st_size / 1e9
    res["layers"] = args.layers
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
