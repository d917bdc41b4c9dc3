"""Which dtype Lens computes in on which device: every dtype decision of the pack, made once.

- :func:`cpu_has_native_bf16`: whether this CPU multiplies bf16 matrices in hardware.
- :func:`default_compute_dtype`: the dtype a model computes in when the caller does not choose
  (bf16 where the device computes it natively, else fp32).
- :func:`compute_dtype_for`: the dtype the DiT computes in for weights stored in a given dtype.
- :func:`refuse_fp16`: fp16 is never used (Lens produces NaNs in it); a request for it, or fp16
  weights, become :func:`fp16_replacement` with a warning.
- The VAE computes in its stored dtype (fp32 for the published file) unless asked for bf16: it is
  small (0.34 GB in fp32), its output is the image, and without native bf16 a CPU runs bf16
  convolutions slower than fp32. For the same reasons its fp16 replacement is fp32 everywhere but a
  CUDA device with bf16 (``small_model=True`` in :func:`fp16_replacement` / :func:`refuse_fp16`).
- :func:`parse_dtype`: a dtype name (``"bf16"``, ``"fp32"``, ...) to a ``torch.dtype``.
- :func:`choose_dtype` / :func:`choose_device`: what a loader's ``dtype`` / ``device`` choice
  (``auto``, ``bf16``, ``gpu``, ...) means, for callers that know whether a device computes bf16
  fast (the ComfyUI nodes ask core).

Nothing here runs at import time; the CPU probe runs once, at its first call.
"""

from __future__ import annotations

import functools
import logging
import platform
import warnings

import torch

logger = logging.getLogger(__name__)

#: Accepted dtype names and what they mean (``"auto"`` / None mean :func:`default_compute_dtype`).
DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def _torch_cpu_probe(name: str) -> bool:
    fn = getattr(getattr(torch, "cpu", None), name, None)
    try:
        return bool(fn and fn())
    except Exception:  # private probe: missing or failing means "not known to be there"
        return False


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 matmul instructions (AVX512-BF16 or AMX on x86, BF16 on ARM).

    Without them oneDNN emulates bf16 GEMMs, which on an AVX2 machine runs ~15x slower than fp32.
    x86 features come from PyTorch's own CPU probe or the ``flags`` line of ``/proc/cpuinfo``; ARM
    counts when ``/proc/cpuinfo`` lists ``bf16`` or the machine is an Apple-silicon Mac.
    """
    if _torch_cpu_probe("_is_avx512_bf16_supported") or _torch_cpu_probe("_is_amx_tile_supported"):
        return True
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        flags = ""
    words = set(flags.split())
    if words & {"avx512_bf16", "amx_bf16"}:
        return True
    if platform.machine().lower() in ("arm64", "aarch64") and ("bf16" in words or platform.system() == "Darwin"):
        return True
    return False


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where ``device`` computes it natively (CUDA with bf16, CPUs per :func:`cpu_has_native_bf16`,
    any other accelerator), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.bfloat16


def compute_dtype_for(storage: torch.dtype, device: torch.device | str) -> torch.dtype:
    """Dtype the DiT computes in for weights stored as ``storage`` on ``device``.

    fp32 (and fp64) weights compute in fp32. Any other storage (bf16, quantised) computes in
    :func:`default_compute_dtype`: bf16 where the device has it natively, otherwise fp32 with the
    weights cast per layer at use. fp16 is never a compute dtype.
    """
    if storage in (torch.float32, torch.float64):
        return torch.float32
    return default_compute_dtype(device)


def fp16_replacement(device: torch.device | str, small_model: bool = False) -> torch.dtype:
    """The dtype used instead of fp16: bf16, or fp32 on a CUDA device without bf16.

    ``small_model`` (the VAE): fp32 everywhere except on a CUDA device with bf16.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.float32 if small_model else torch.bfloat16


def refuse_fp16(dtype: torch.dtype, device: torch.device | str, component: str, stored_in: str | None = None,
                stacklevel: int = 2, small_model: bool = False) -> torch.dtype:
    """``dtype``, or :func:`fp16_replacement` with a warning when it is fp16.

    component: what is being loaded, for the message ("DiT", "gpt-oss text encoder", "VAE");
    stored_in: the file name when the fp16 comes from the stored weights rather than a request;
    stacklevel: as for ``warnings.warn``, counted from the caller of this function;
    small_model: as for :func:`fp16_replacement` (the VAE).
    """
    if dtype != torch.float16:
        return dtype
    alt = fp16_replacement(device, small_model)
    what = f"stored in `{stored_in}`" if stored_in is not None else "requested"
    msg = (f"Lens does not run the {component} in fp16 (NaNs); fp16 was {what}, using "
           f"{str(alt).replace('torch.', '')} instead.")
    warnings.warn(msg, stacklevel=stacklevel + 1)
    logger.warning(msg)
    return alt


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a name in :data:`DTYPE_NAMES`; None, ``"auto"`` and ``"default"`` give None."""
    if dtype is None or (isinstance(dtype, str) and dtype in ("auto", "default")):
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use 'bf16' or 'fp32'")
        return DTYPE_NAMES[dtype]
    return dtype


def choose_dtype(choice: str, device: torch.device | str, component: str,
                 fast_bf16: bool) -> torch.dtype | None:
    """The compute dtype for a loader's dtype choice; None lets the loader keep the stored dtype.

    choice: ``"bf16"`` / ``"fp32"`` (taken as they are), or ``"auto"`` / ``"default"`` / ``"fp8"``
    (fp8 is weight-only storage: its compute dtype is chosen as for ``"default"``).
    component: ``"dit"``, ``"te"`` (text encoder) or ``"vae"``.
    fast_bf16: whether ``device`` computes bf16 natively, as the caller decides it (ComfyUI: core's
    ``should_use_bf16``, which honours --force-fp32 and says no for pre-Ampere cards).

    The automatic choice is bf16 when ``fast_bf16``, else fp32, on any device but the CPU. On the CPU
    each component keeps its own default: the DiT its stored dtype (None; bf16 under fp8 storage),
    the text encoder :func:`default_compute_dtype` (bf16 only with native bf16 instructions), the
    VAE fp32.
    """
    if choice in ("bf16", "fp32"):
        return DTYPE_NAMES[choice]
    if torch.device(device).type != "cpu":
        return torch.bfloat16 if fast_bf16 else torch.float32
    if component == "dit":
        return torch.bfloat16 if choice == "fp8" else None
    if component == "te":
        return default_compute_dtype("cpu")
    return torch.float32


def choose_device(choice: str, auto_device: torch.device | str,
                  main_device: torch.device | str) -> torch.device:
    """The device for a loader's ``auto`` / ``gpu`` / ``cpu`` choice.

    ``cpu`` is the CPU; ``gpu`` is ``main_device`` (the GPU everything computes on), a RuntimeError
    when that is the CPU; ``auto`` is ``auto_device`` (the caller's placement for this component,
    e.g. ComfyUI's text-encoder or VAE device).
    """
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "gpu":
        main = torch.device(main_device)
        if main.type == "cpu":
            raise RuntimeError(
                "device 'gpu' was selected but ComfyUI runs on the CPU (no GPU found or --cpu "
                "given). Select 'auto' or 'cpu'."
            )
        return main
    return torch.device(auto_device)


__all__ = [
    "DTYPE_NAMES",
    "choose_device",
    "choose_dtype",
    "compute_dtype_for",
    "cpu_has_native_bf16",
    "default_compute_dtype",
    "fp16_replacement",
    "parse_dtype",
    "refuse_fp16",
]
