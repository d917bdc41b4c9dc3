"""Per-expert dequantisation keeps memory bounded on a full-size MoE layer (GptOssMLP).

A subprocess builds ONE full-size gpt-oss-20b MoE layer with MXFP4 experts (32 experts, gate_up
5760x2880 and down 2880x2880, random codes: ~420 MB), then runs the layer's MoE on 16 tokens and
measures the peak resident set (VmHWM, reset just before the MoE) against the resident set before it.
Dequantising the whole layer would need 3.2 GB of fp32; the limit is two dequantised expert pairs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, threading, time, sys
import torch
sys.path.insert(0, ROOT)
torch.set_num_threads(1)
from lens_model.gpt_oss import GptOssConfig, GptOssMLP, assign_weights
from lens_model.ops import CastWorkspace, ExpertBank

def moe(x, weights, cfg, ws):
    # the MoE of one layer: GptOssMLP built on the meta device with `weights` assigned into it
    mlp = GptOssMLP(cfg, device="meta")
    assign_weights(mlp, weights, "mlp.")
    mlp.experts.cast_workspace = ws
    return mlp(x)

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

E, I, X = 2880, 2880, 32
g = torch.Generator().manual_seed(0)

def bank(rows, cols):
    blocks = torch.randint(0, 256, (X, rows, cols // 2), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 124, (X, rows, cols // 32), dtype=torch.uint8, generator=g)
    return ExpertBank("mxfp4", X, rows, cols, torch.randn(X, rows, generator=g) * 0.02, codes=blocks, scales=scales)

cfg = GptOssConfig()
def layer(gate_up, down):
    return {"mlp.router.weight": torch.randn(X, E, generator=g), "mlp.router.bias": torch.zeros(X),
            "mlp.experts.gate_up_proj": gate_up, "mlp.experts.down_proj": down}

# warm-up on a small bank so code pages and allocator pools exist before the baseline
small = GptOssConfig(hidden_size=64, intermediate_size=64, num_local_experts=X)
small_layer = {"mlp.router.weight": torch.randn(X, 64), "mlp.router.bias": torch.zeros(X),
    "mlp.experts.gate_up_proj": ExpertBank("mxfp4", X, 128, 64, torch.zeros(X, 128), codes=torch.zeros(X, 128, 32, dtype=torch.uint8), scales=torch.full((X, 128, 2), 127, dtype=torch.uint8)),
    "mlp.experts.down_proj": ExpertBank("mxfp4", X, 64, 64, torch.zeros(X, 64), codes=torch.zeros(X, 64, 32, dtype=torch.uint8), scales=torch.full((X, 64, 2), 127, dtype=torch.uint8))}
moe(torch.randn(16, 64), small_layer, small, CastWorkspace())

lw = layer(bank(2 * I, E), bank(E, I))
quantised = sum(b.nbytes for b in (lw["mlp.experts.gate_up_proj"], lw["mlp.experts.down_proj"]))
x = torch.randn(16, E, generator=g)
ws = CastWorkspace()
base = status("VmRSS")
peak_box = [base]
sampler_stop = threading.Event()
if not reset_peak():
    def sample():
        while not sampler_stop.is_set():
            peak_box[0] = max(peak_box[0], status("VmRSS"))
            time.sleep(0.0005)
    threading.Thread(target=sample, daemon=True).start()
logits = torch.nn.functional.linear(x, lw["mlp.router.weight"])
hit = torch.topk(logits, 4, dim=-1).indices.unique().numel()
t0 = time.perf_counter()
out = moe(x, lw, cfg, ws)
elapsed = time.perf_counter() - t0
sampler_stop.set()
peak = max(peak_box[0], status("VmHWM"))
print("RESULT " + json.dumps({"base": base, "peak": peak, "quantised": quantised, "hit": hit,
                              "finite": bool(torch.isfinite(out).all()), "seconds": elapsed}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_full_size_moe_layer_dequantises_one_expert_at_a_time():
    proc = subprocess.run([sys.executable, "-c", SCRIPT.replace("ROOT", repr(str(ROOT)))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert 400e6 < res["quantised"] < 450e6  # one full-size MXFP4 layer (blocks + scales + biases)
    assert res["finite"] and res["hit"] >= 16  # 16 tokens x top-4 reach most of the 32 experts
    pair_fp32 = (2 * 2880 + 2880) * 2880 * 4  # one dequantised gate_up + down expert: 99.5 MB
    extra = res["peak"] - res["base"]
    whole_layer = 32 * pair_fp32
    assert extra < 2 * pair_fp32, f"MoE grew the resident set by {extra / 1e6:.0f} MB (whole layer would be {whole_layer / 1e9:.1f} GB)"
