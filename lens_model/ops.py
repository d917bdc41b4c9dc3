"""Layer "operations" for the Lens DiT: plain, casting and quantised Linear layers.

This is the seam between the model math (``dit.py``) and weight storage, in the spirit of
ComfyUI's ``operations`` objects: the model builds its Linears through an :class:`Operations`
object, and the loader swaps in :class:`QuantLinear` for layers stored quantised. The forward math
never sees storage formats. The text encoder keeps its quantised attention projections as
:class:`QuantLinear` too; every format's arithmetic lives in :mod:`lens_model.quant`.

- :class:`Linear` is an ``nn.Linear`` that casts its weight to the input dtype when they differ,
  so bf16 weights can run in an fp32 compute dtype (CPUs without a native bf16 matmul) without a
  second resident copy.
- :class:`QuantLinear` keeps ``float8_e4m3fn`` (per-tensor scale), ``mxfp8`` (E8M0 block scales)
  or ``nvfp4`` weights in their stored form and dequantises the whole matrix to the compute dtype
  at each call, so only one layer's dense weight exists at a time.
- :class:`CastWorkspace` is the scratch memory those per-call casts / dequantisations write into:
  one per model, handed to its layers (``layer.cast_workspace``), reused across layers and steps.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant

logger = logging.getLogger(__name__)

#: Formats :class:`QuantLinear` can hold (ComfyUI ``comfy_quant`` names); the list lives in quant.py.
QUANT_FORMATS = quant.LINEAR_FORMATS


# -- cast workspace --------------------------------------------------------------------------------

class CastWorkspace:
    """Reusable scratch memory for weights cast or dequantised to the compute dtype at each call.

    Casting a bf16 weight to fp32 into freshly allocated memory costs a page fault per 4 KiB on the
    CPU (the allocator hands large blocks back to the OS and gets new zeroed pages each time): about
    4x the conversion itself (7.8 vs 1.9 ms for a 4096 x 1536 weight). Layers that cast therefore
    write into buffers kept here and reused by every layer of the model, step after step.

    One workspace per model (:class:`~lens_model.dit.LensTransformer` creates it and hands it to its
    layers as ``layer.cast_workspace``); nothing is shared between models. Buffers are allocated at
    first use (a model whose weights are already in the compute dtype never allocates any), at least
    :meth:`reserve` elements large (the owner's largest weight), on the device of the weight, and
    dropped when the weights move (:meth:`clear`). On accelerators each stream gets its own
    buffers, so reuse follows the stream order exactly as the caching allocator's would.

    Use::

        with workspace.lease() as lease:
            if lease is not None:            # None: use fresh memory as before
                w = lease.cast(weight, torch.float32)
                y = F.linear(x, w)           # w is valid only inside the with block

    :meth:`lease` yields None (callers then allocate as before) when autograd is recording (a
    reused buffer must not be saved for backward) or when another thread is inside a lease of the
    same workspace. Buffers are created as normal tensors even under ``torch.inference_mode`` so the
    same workspace serves inference-mode and ``no_grad`` calls alike.
    """

    def __init__(self, reserve: int = 0) -> None:
        self._reserve = int(reserve)
        self._lock = threading.Lock()
        self._device: torch.device | None = None
        self._buffers: dict[tuple, torch.Tensor] = {}

    # copies and pickles start empty (a lock cannot be copied; buffers are scratch)
    def __getstate__(self) -> dict:
        return {"reserve": self._reserve}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state.get("reserve", 0))

    def __repr__(self) -> str:
        return f"CastWorkspace(reserve={self._reserve}, allocated={self.nbytes} bytes)"

    def reserve(self, numel: int) -> None:
        """Make buffers allocated from now on hold at least ``numel`` elements."""
        self._reserve = max(self._reserve, int(numel))

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer (the next cast allocates again)."""
        with self._lock:
            self._buffers.clear()
            self._device = None

    @contextlib.contextmanager
    def lease(self) -> Iterator["CastWorkspace | None"]:
        """Exclusive use of the buffers for one layer call; yields None when they cannot be used."""
        if torch.is_grad_enabled() or not self._lock.acquire(blocking=False):
            yield None
            return
        try:
            yield self
        finally:
            self._lock.release()

    def buffer(self, numel: int, dtype: torch.dtype, device: torch.device, slot: int = 0) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements backed by a reused buffer (contents undefined).

        Only inside :meth:`lease`. Different ``slot`` values are distinct buffers, for a layer that
        needs two at once (dequantise in fp32, then round to bf16).
        """
        device = torch.device(device)
        if device != self._device:
            self._buffers.clear()
            self._device = device
        key: tuple = (slot, dtype)
        if device.type != "cpu":
            stream = _current_stream(device)
            key = key + (stream,)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(key, None)
            with torch.inference_mode(False):  # a normal tensor: writable under no_grad too
                buf = torch.empty(max(numel, self._reserve), dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel]

    def cast(self, t: torch.Tensor, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
        """``t.to(dtype)`` (same values, contiguous, shape of ``t``) written into a reused buffer."""
        out = self.buffer(t.numel(), dtype, t.device, slot).view(t.shape)
        out.copy_(t)
        return out


def _current_stream(device: torch.device):
    """An id of the current stream on an accelerator (None where there is no stream API)."""
    try:
        if device.type == "cuda":
            return torch.cuda.current_stream(device).cuda_stream
        acc = getattr(torch, "accelerator", None)
        if acc is not None and hasattr(acc, "current_stream"):
            return getattr(acc.current_stream(device), "stream_id", None)
    except (RuntimeError, AssertionError, TypeError, ValueError):
        pass
    return None


# -- layers ----------------------------------------------------------------------------------------

class Linear(nn.Linear):
    """``nn.Linear`` that casts weight and bias to the input dtype when they differ.

    Same parameters and state-dict keys as ``nn.Linear`` (``weight`` [out, in], ``bias`` [out]).
    With a ``cast_workspace`` (:class:`CastWorkspace`, set by the owning model) the weight is cast
    into reused memory instead of a fresh tensor; the result is bitwise the same.
    """

    cast_workspace: CastWorkspace | None = None

    def reset_parameters(self) -> None:
        if self.weight.is_meta:  # built on the meta device to be filled by a loader: nothing to init
            return
        super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        if w.dtype != x.dtype:
            ws = self.cast_workspace
            if ws is not None and w.is_contiguous():
                with ws.lease() as lease:
                    if lease is not None:
                        return F.linear(x, lease.cast(w, x.dtype), b)
            w = w.to(x.dtype)
        return F.linear(x, w, b)


class QuantLinear(nn.Module):
    """A Linear whose weight stays quantised and is dequantised to the input dtype at every call.

    Storage (state-dict names as in ComfyUI files):

    - ``float8_e4m3fn``: ``weight`` float8_e4m3fn [out, in], ``weight_scale`` fp32 scalar;
      W = float(w) * s.
    - ``mxfp8``: ``weight`` float8_e4m3fn [out_p, in_p] (zero-padded to multiples of 32),
      ``weight_scale`` uint8 E8M0 exponents kept **unswizzled** as [out_p, in_p / 32] (the loader
      unswizzles once); W = float(w) * 2^(e - 127), byte 0 = scale 0, padding sliced off.
    - ``nvfp4``: ``weight`` uint8 [out, in / 2], ``weight_scale`` swizzled E4M3 bits (uint8),
      ``weight_scale_2`` fp32 scalar.

    ``bias`` [out] is a plain tensor in the model dtype (or None). With a ``cast_workspace``
    (:class:`CastWorkspace`) the ``float8_e4m3fn`` and ``mxfp8`` weights are dequantised into
    reused memory (bitwise the same values as :meth:`dequantize`).
    """

    cast_workspace: CastWorkspace | None = None

    def __init__(
        self,
        fmt: str,
        in_features: int,
        out_features: int,
        weight: torch.Tensor,
        weight_scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        weight_scale_2: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if fmt not in QUANT_FORMATS:
            raise ValueError(f"QuantLinear: unsupported format {fmt!r} (supported: {', '.join(QUANT_FORMATS)})")
        self.fmt = fmt
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        if weight_scale_2 is not None:
            self.register_buffer("weight_scale_2", weight_scale_2)
        else:
            self.weight_scale_2 = None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (weight, scales, bias)."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.weight_scale, self.weight_scale_2, self.bias)
                   if t is not None)

    def moved(self, device, non_blocking: bool = False) -> "QuantLinear":
        """A new layer holding this one's tensors on ``device`` (``self`` is left where it is, unlike
        ``Module.to``): the text encoder keeps layers in host memory and moves a copy per run."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return QuantLinear(self.fmt, self.in_features, self.out_features, move(self.weight), move(self.weight_scale),
                           move(self.bias), move(self.weight_scale_2))

    def dequantize(self, dtype: torch.dtype, workspace: CastWorkspace | None = None) -> torch.Tensor:
        """The dense weight [out, in] in ``dtype`` (products formed in fp32).

        ``workspace``: a :class:`CastWorkspace` the caller holds a lease on; the result then lives
        in its buffers (valid until the lease ends). Fresh memory otherwise.
        """
        if self.fmt == "mxfp8":
            return quant.dequantize_mxfp8_unswizzled(
                self.weight, self.weight_scale, self.out_features, self.in_features, dtype, workspace=workspace
            )
        if self.fmt == "float8_e4m3fn":
            return quant.dequantize_float8(self.weight, self.weight_scale, dtype, workspace=workspace)
        return quant.dequantize_nvfp4(
            self.weight, self.weight_scale, self.weight_scale_2, self.out_features, self.in_features, dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        ws = self.cast_workspace
        if ws is not None and self.fmt != "nvfp4" and self.weight.is_contiguous():
            with ws.lease() as lease:
                if lease is not None:
                    return F.linear(x, self.dequantize(x.dtype, lease), b)
        return F.linear(x, self.dequantize(x.dtype), b)


#: The DiT's fp8 storage mode quantises with :func:`quant.quantize_float8` (kept under this name for callers).
quantize_float8_tensorwise = quant.quantize_float8


def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Loading casts many tensors of 2-60 MB; glibc keeps the freed temporaries in its heap, which
    shows up as resident memory the model does not use.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Operations:
    """Factory the model builds its layers with (ComfyUI's ``operations`` pattern).

    Stateless: the cast workspace belongs to each model, which hands it to its layers.
    """

    Linear = Linear


default_operations = Operations()
