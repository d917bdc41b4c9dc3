#!/usr/bin/env bash
# One short GPU check: golden parity on the GPU, full-size Lens DiT bf16 and fp8
# weight-only at 1024^2 / 1440^2 (Turbo, 4 steps, CFG 1, 120 text tokens), VAE decode, two text-encoder layers.
# Usage (repository root): bash bench/gpu_check.sh        Must finish in < 4 minutes on an H100.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
echo "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" || { echo "python3/torch sanity check failed"; exit 1; }
python3 -c "import lens_model.dit, lens_model.ops" || { echo "lens_model does not import"; exit 1; }
timeout 230 python3 bench/gpu_check.py "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu_check.py hit the 230 s timeout"
exit $rc
