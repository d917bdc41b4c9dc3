"""One short GPU check for a lent H100 / H200. Run through bench/gpu_check.sh.

Sections (each guarded: a failure prints its error and the script goes on):

1. device / torch / SDPA settings;
2. golden parity: the tiny DiT in fp32 on the GPU (TF32 off) against ``dit_cases`` at 1e-4;
3. full-size 48-block Lens DiT in bf16 with random weights built directly on the GPU:
   Lens-Turbo, 4 Euler steps, CFG 1, 120 text tokens at 1024^2 and 1440^2: seconds per step,
   ``torch.cuda.max_memory_allocated``, SDPA backend;
4. the same with the optional fp8 weight-only storage (the layers ``dit_loading.FP8_CANDIDATES`` names);
5. VAE decode (1024^2, 1440^2): a random-weight ``Flux2VAE`` decode;
6. two full-size text-encoder layers (NVFP4, random codes) resident and streamed: seconds per layer,
   peak VRAM, 24-layer estimates.

Prints one ``RESULT {json}`` line per measurement and a final ``SUMMARY`` block. Designed to finish in
well under 4 minutes on an H100 (model build ~10 s, each timed step well under a second).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

T0 = time.time()
RESULTS: list[dict] = []
#: --dry-run-cpu exercises every code path on the CPU with a 1-block model at small sizes.
DRY = "--dry-run-cpu" in sys.argv
DEV = torch.device("cpu" if DRY else "cuda")
SIZES = (64, 96) if DRY else (1024, 1440)
LAYERS = 1 if DRY else 48
TEXT = 16 if DRY else 120


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV.type == "cuda" else 0.0


def allocated_gib() -> float:
    return round(torch.cuda.memory_allocated() / 2**30, 2) if DEV.type == "cuda" else 0.0
BUDGET_S = 200.0  # stop starting new sections after this


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def result(**kw) -> None:
    kw.setdefault("device", DEVICE_NAME)
    RESULTS.append(kw)
    print("RESULT " + json.dumps(kw), flush=True)


def section(name: str):
    def deco(fn):
        def run(*a, **k):
            if time.time() - T0 > BUDGET_S:
                log(f"== {name}: skipped (time budget)")
                result(section=name, status="skipped: time budget")
                return
            log(f"== {name}")
            try:
                fn(*a, **k)
            except Exception as e:  # keep going: one broken section must not hide the others
                traceback.print_exc()
                result(section=name, status=f"error: {type(e).__name__}: {e}"[:400])
            finally:
                if DEV.type == "cuda":
                    torch.cuda.empty_cache()
        return run
    return deco


DEVICE_NAME = "cpu"


@section("device")
def device_info() -> None:
    global DEVICE_NAME
    if DRY:
        DEVICE_NAME = "cpu (dry run)"
        result(section="device", torch=torch.__version__, dry_run=True)
        return
    DEVICE_NAME = torch.cuda.get_device_name(0)
    props = torch.cuda.get_device_properties(0)
    result(
        section="device", torch=torch.__version__, cuda=torch.version.cuda,
        capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
        flash_sdp=torch.backends.cuda.flash_sdp_enabled(), mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled(),
        cudnn_sdp=getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
    )


@section("golden tiny DiT fp32 on GPU")
def golden_check() -> None:
    from safetensors import safe_open

    from lens_model.dit_loading import load_transformer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    golden = ROOT / "tests" / "fixtures" / "golden" / "lens_tiny"
    path = golden / "dit_cases.safetensors"
    src = safe_open(str(path), framework="pt")
    model = load_transformer(golden / "transformer", device=DEV)
    worst = 0.0
    for n in range(4):
        p = f"case{n}."
        feats = [src.get_tensor(p + f"encoder_hidden_states.{k}").to(DEV) for k in range(4)]
        out = model.forward_tokens(
            src.get_tensor(p + "hidden_states").to(DEV), src.get_tensor(p + "timestep").to(DEV), feats,
            src.get_tensor(p + "encoder_mask").to(DEV), src.get_tensor(p + "grid_hw").tolist(),
        )
        worst = max(worst, (out.cpu() - src.get_tensor(p + "expected")).abs().max().item())
    result(section="golden", max_abs_err=worst, ok=worst < 1e-4)


def random_full_model(dtype=torch.bfloat16):
    from bench_dit import randomize_
    from lens_model.dit import LensDiTConfig, LensTransformer

    with DEV:
        model = LensTransformer(LensDiTConfig(num_layers=LAYERS), dtype=dtype)
    return randomize_(model)


def sigmas_for(size: int, steps: int) -> torch.Tensor:
    try:
        from lens_model.sampling import lens_sigmas

        return lens_sigmas(size, size, steps).float()
    except Exception:
        return torch.linspace(1.0, 0.0, steps + 1)


def turbo_run(model, size: int, label: str, text: int = TEXT, steps: int = 4) -> None:
    from lens_model.dit import sdpa_backend_name

    h = w = size // 16
    cfg = model.config
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(1, cfg.in_channels, h, w, device=DEV, generator=g)
    ctx = torch.randn(1, text, cfg.num_text_layers * cfg.enc_hidden_dim, device=DEV, generator=g).to(torch.bfloat16) * 3
    mask = torch.ones(1, text, dtype=torch.bool, device=DEV)
    sig = sigmas_for(size, steps)
    model(x, sig[:1].to(DEV), ctx, mask)  # warm-up (kernel selection)
    sync()
    reset_peak()
    times = []
    for i in range(steps):
        sync()
        t = time.perf_counter()
        v = model(x, sig[i:i + 1].to(DEV), ctx, mask)
        x = x + (sig[i + 1] - sig[i]).item() * v.float()
        sync()
        times.append(time.perf_counter() - t)
    n_tok = h * w + text
    q = torch.empty(1, cfg.num_attention_heads, n_tok, cfg.attention_head_dim, device=DEV, dtype=model.resolved_compute_dtype())
    flop = (2.718e9 / 48 * n_tok + 4 * n_tok**2 * 1536) * cfg.num_layers
    result(
        section=label, size=f"{size}x{size}", steps=steps, text_tokens=text,
        s_per_step=round(sum(times) / len(times), 4), step_times=[round(t, 4) for t in times],
        total_s=round(sum(times), 3), tflops_per_s=round(flop / (sum(times) / len(times)) / 1e12, 1),
        max_memory_allocated_gib=peak_gib(), layers=cfg.num_layers,
        sdpa_backend=sdpa_backend_name(q, q, q), finite=bool(torch.isfinite(x).all()),
    )


@section("Lens DiT bf16, 48 blocks, random weights")
def dit_bf16() -> None:
    t = time.perf_counter()
    model = random_full_model()
    sync()
    result(section="dit_build", seconds=round(time.perf_counter() - t, 2), weights_gib=allocated_gib())
    for size in SIZES:
        turbo_run(model, size, "dit_bf16")
    del model


@section("Lens DiT fp8 weight-only storage")
def dit_fp8() -> None:
    from lens_model import ops
    from lens_model.dit_loading import FP8_CANDIDATES

    model = random_full_model()
    with torch.no_grad():
        for name, m in list(model.named_modules()):
            if FP8_CANDIDATES.match(name) and isinstance(m, torch.nn.Linear):
                w8, s = ops.quantize_float8_tensorwise(m.weight)
                q = ops.QuantLinear("float8_e4m3fn", m.in_features, m.out_features, w8, s, m.bias)
                model.set_submodule(name, q)
                del m
    model.attach_cast_workspace()  # the fp8 layers dequantise into the model's reused buffers
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    result(section="dit_fp8_build", weights_gib=allocated_gib())
    for size in SIZES:
        turbo_run(model, size, "dit_fp8_weight_only")
    del model


@section("VAE decode")
def vae_check() -> None:
    from lens_model.constants import LATENT_CELL_PIXELS, LATENT_CHANNELS
    from lens_model.vae import Flux2VAE, Flux2VAEConfig

    vae = Flux2VAE(Flux2VAEConfig()).to(device=DEV, dtype=torch.bfloat16 if DEV.type == "cuda" else torch.float32).eval()
    for size in SIZES:
        lat = torch.randn(1, LATENT_CHANNELS, size // LATENT_CELL_PIXELS, size // LATENT_CELL_PIXELS)
        vae.decode(lat, tile=False)  # warm-up
        sync()
        reset_peak()
        t = time.perf_counter()
        img = vae.decode(lat, tile=False)
        sync()
        result(section="vae_decode", dtype=str(vae.dtype), size=f"{size}x{size}", seconds=round(time.perf_counter() - t, 3),
               max_memory_allocated_gib=peak_gib(),
               out_shape=list(img.shape), note="random weights")


@section("TE layers")
def te_check() -> None:
    """Two full-size gpt-oss layers (ComfyUI NVFP4 layout, random codes) on the GPU.

    The file is synthesised by bench/bench_text_encoder.py (~2.3 GB in /tmp). Measures the encode of
    the 125-id fox prompt through layers 0-1 in the resident ("device") and streamed ("layers")
    placements: seconds per layer and peak VRAM, extrapolated to 24 layers for the resident mode.
    Targets (issue #3): whole encoder resident <= 14 GB VRAM, streamed <= 4 GB.
    """
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_text_encoder as bte
    from lens_model.text_encoder import load_text_encoder

    path = Path("/tmp/lens_gpu_check/gpt_oss_nvfp4_2layers.safetensors")
    if not path.exists():
        bte.synthesize(path, layers=2)
    dtype = torch.float32 if DRY else torch.bfloat16
    for offload in ("device", "layers"):
        reset_peak()
        base = allocated_gib()
        te = load_text_encoder(path, dtype=dtype, device=DEV, offload=offload, selected_layers=(1,))
        ids = torch.tensor([te.tokenize(bte.PROMPT)])
        mask = torch.ones_like(ids)
        te.encode_ids(ids, mask)  # warm-up (first touch, kernels)
        sync()
        t = time.perf_counter()
        out = te.encode_ids(ids, mask)
        sync()
        per_layer = (time.perf_counter() - t) / 2
        peak = peak_gib() - base
        row = dict(section="te_layers", offload=offload, dtype=str(dtype), tokens=int(ids.shape[1]),
                   seconds_per_layer=round(per_layer, 4), encode_24_layers_estimate_s=round(24 * per_layer, 2),
                   peak_vram_gib_2_layers=round(peak, 3), finite=bool(torch.isfinite(out[0]).all()))
        if offload == "device":
            row["resident_24_layers_estimate_gib"] = round(peak / 2 * 24, 2)
        result(**row)
        te.unload()
        del te, out


def main() -> None:
    if not DRY and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --dry-run-cpu to exercise the script on the CPU)", flush=True)
        sys.exit(2)
    device_info()
    golden_check()
    dit_bf16()
    dit_fp8()
    vae_check()
    te_check()
    log("SUMMARY")
    for r in RESULTS:
        print("  " + json.dumps(r), flush=True)
    log("done")


if __name__ == "__main__":
    main()
