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
- :class:`ExpertBank` holds one projection of all experts of a gpt-oss MoE layer (MXFP4, NVFP4 or
  dense) and computes one expert's ``x @ W_e^T + b_e`` at a time, dequantising only that expert.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant

logger = logging.getLogger(__name__)


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
        if fmt not in quant.LINEAR_FORMATS:
            raise ValueError(f"QuantLinear: unsupported format {fmt!r} (supported: {', '.join(quant.LINEAR_FORMATS)})")
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

    @classmethod
    def from_stored(
        cls,
        fmt: str,
        in_features: int,
        out_features: int,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        weight_scale_2: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """A layer from its tensors as a ComfyUI file stores them (each on the device it should use).

        Block scales may come as float8 / E8M0 storage dtypes and are kept as their uint8 bits;
        MXFP8 scales are unswizzled here, once; the per-tensor fp8 scale and the NVFP4 global scale
        become fp32 scalars. Only the scales are copied (the weight and bias are used as given).
        """
        if fmt in ("mxfp8", "nvfp4") and weight_scale.dtype != torch.uint8:
            weight_scale = weight_scale.view(torch.uint8)
        if fmt == "mxfp8":
            out_p, in_p = weight.shape
            weight_scale = quant.unswizzle_scales(weight_scale, out_p, in_p // quant.MX_BLOCK).contiguous()
        elif fmt == "float8_e4m3fn":
            weight_scale = weight_scale.to(torch.float32).reshape(())
        if weight_scale_2 is not None:
            weight_scale_2 = weight_scale_2.to(torch.float32).reshape(())
        return cls(fmt, in_features, out_features, weight, weight_scale, bias, weight_scale_2)

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


# -- expert banks (the text encoder's MoE weights) ---------------------------------------------------
# A gpt-oss MoE layer stores all its experts' matrices in one bank per projection; the bank keeps
# its stored (quantised) form and computes one expert at a time, so a layer is never dequantised whole.

#: Rows of one expert matrix dequantised at a time on the CPU (~1.5 MB of fp32 for in = 2880, so a
#: chunk stays in the L2 cache between dequantisation and its matmul).
CPU_CHUNK_ROWS = 128


def _move(t: torch.Tensor | None, device, non_blocking: bool = False) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to(device, non_blocking=non_blocking)


@dataclass
class ExpertBank:
    """One MoE projection bank of ``num_experts`` matrices ``[out_features, in_features]``.

    ``format``:
      ``"nvfp4"``: ``codes`` uint8 [E, out, in/2] (high nibble first), ``scales`` uint8 E4M3 bits,
        swizzled [E, Rp, Cp] or [E, Rp*Cp], ``global_scale`` fp32 [E] or 0-d;
      ``"mxfp4"``: ``codes`` uint8 [E, out, in/2] (= blocks [E, out, in/32, 16] flattened; low nibble
        first), ``scales`` uint8 E8M0 [E, out, in/32];
      ``"dense_io"``: ``weight`` [E, in, out] (HF dequantised; forward is x @ W[e]);
      ``"dense_oi"``: ``weight`` [E, out, in] (Linear orientation).
    ``bias``: [E, out] (always present).
    """

    format: str
    num_experts: int
    out_features: int
    in_features: int
    bias: torch.Tensor
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    name: str = ""

    #: ``format`` values: the block-quantised :data:`quant.EXPERT_FORMATS`, or dense in either orientation.
    FORMATS = quant.EXPERT_FORMATS + ("dense_io", "dense_oi")

    def __post_init__(self) -> None:
        if self.format not in self.FORMATS:
            raise ValueError(f"ExpertBank: unknown format {self.format!r} (expected one of {', '.join(self.FORMATS)})")

    # -- storage -----------------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.bias, self.codes, self.scales, self.global_scale, self.weight) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def device(self) -> torch.device:
        return self.bias.device

    def to(self, device, non_blocking: bool = False) -> "ExpertBank":
        return ExpertBank(
            self.format, self.num_experts, self.out_features, self.in_features,
            _move(self.bias, device, non_blocking), _move(self.codes, device, non_blocking),
            _move(self.scales, device, non_blocking), _move(self.global_scale, device, non_blocking),
            _move(self.weight, device, non_blocking), self.name,
        )

    # -- dequantisation ----------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return quant.NVFP4_BLOCK if self.format == "nvfp4" else quant.MX_BLOCK

    def expert_scales(self, e: int) -> torch.Tensor:
        """fp32 block scales of expert ``e`` (global scale folded in for NVFP4): [out, in / block]."""
        rows, cols = self.out_features, self.in_features // self.block_size
        dev = self.codes.device
        if self.format == "mxfp4":
            idx = self.scales[e].reshape(-1).to(torch.int32)
            table = quant.e8m0_table(dev, zero_byte_is_zero=False)
        else:
            idx = quant.unswizzle_scales(self.scales[e], rows, cols).reshape(-1).to(torch.int32)
            g = self.global_scale
            g = g.reshape(-1)[e] if g.numel() > 1 else g.reshape(())
            table = quant.e4m3_table(dev) * g.to(dev, torch.float32)  # g*b formed in fp32
        return torch.index_select(table, 0, idx).view(rows, cols)

    def _fp4_rows(self, e: int, r0: int, r1: int, out32: torch.Tensor, scales: torch.Tensor,
                  idx: torch.Tensor | None = None) -> torch.Tensor:
        """Dequantise rows [r0, r1) of expert ``e`` into ``out32`` (fp32, >= (r1-r0)*in elements).

        ``scales``: this expert's :meth:`expert_scales`; ``idx``: optional int32 scratch (>= (r1-r0)*in/2).
        Each code byte becomes a pair of fp32 values with one ``index_select`` from a 256-word table,
        then the block scales multiply in place. Returns the [r1 - r0, in] view.
        """
        n, k, bs = r1 - r0, self.in_features, self.block_size
        table = quant.fp4_pair_table(torch.float32, low_first=self.format == "mxfp4", device=out32.device)
        codes = self.codes[e, r0:r1].reshape(-1)
        if idx is None:
            idx = codes.to(torch.int32)
        else:
            idx = idx[: codes.numel()]
            idx.copy_(codes)
        dst = out32.reshape(-1)[: n * k]
        torch.index_select(table, 0, idx, out=dst.view(torch.int64))
        dst.view(n, k // bs, bs).mul_(scales[r0:r1].unsqueeze(-1))
        return dst.view(n, k)

    def dequantize(self, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert ``e`` as a dense ``[out, in]`` matrix in ``dtype``."""
        if self.format == "dense_io":
            return self.weight[e].t().to(dtype)
        if self.format == "dense_oi":
            return self.weight[e].to(dtype)
        out = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=self.device)
        self._fp4_rows(e, 0, self.out_features, out, self.expert_scales(e))
        return out.to(dtype)

    def linear(self, e: int, x: torch.Tensor, workspace: CastWorkspace | None = None) -> torch.Tensor:
        """``x @ W_e^T + b_e`` for expert ``e``: x [n, in] (compute dtype) -> [n, out] (x's dtype).

        Quantised experts are dequantised in row chunks of ``CPU_CHUNK_ROWS`` into reused buffers
        (CPU: ``workspace``, a :class:`CastWorkspace`, one per worker thread)
        or whole (other devices), so at most one expert's dequantised weights exist at a time per
        worker.
        """
        dtype = x.dtype
        bias = self.bias[e].to(dtype)
        if self.format == "dense_io":
            return torch.addmm(bias, x, self.weight[e].to(dtype))
        if self.format == "dense_oi":
            return F.linear(x, self.weight[e].to(dtype), bias)
        n_out, k = self.out_features, self.in_features
        scales = self.expert_scales(e)
        if x.device.type != "cpu":
            w = torch.empty(n_out, k, dtype=torch.float32, device=x.device)
            self._fp4_rows(e, 0, n_out, w, scales)
            return F.linear(x, w.to(dtype), bias)
        ch = CPU_CHUNK_ROWS
        x = x.contiguous()
        out = torch.empty(x.shape[0], n_out, dtype=dtype)
        with (workspace if workspace is not None else CastWorkspace()).lease() as lease:
            bufs = lease if lease is not None else CastWorkspace()  # busy, or autograd recording: fresh memory
            idx = bufs.buffer(ch * k // 2, torch.int32, x.device, slot=0)
            buf32 = bufs.buffer(ch * k, torch.float32, x.device, slot=1)
            buf = bufs.buffer(ch * k, dtype, x.device, slot=2) if dtype != torch.float32 else None
            for r0, r1 in _row_chunks(n_out, ch):
                w = self._fp4_rows(e, r0, r1, buf32, scales, idx)
                if buf is not None:
                    w = buf[: w.numel()].view_as(w).copy_(w)
                # x @ w^T (not w @ x^T: MKL is several times slower for that orientation at 2..15 tokens)
                out[:, r0:r1] = torch.mm(x, w.t())
        return out.add_(bias)


def _row_chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(r0, min(n, r0 + chunk)) for r0 in range(0, n, chunk)]
