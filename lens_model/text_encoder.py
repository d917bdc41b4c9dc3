"""gpt-oss-20b as Lens' frozen text encoder: loading, weight placement and the encode API.

The encoder runs decoder layers 0..max(selected) of :class:`lens_model.gpt_oss.GptOssModel` (the
modules and forward) on a templated prompt and returns the raw residual stream after layers 5, 11,
17 and 23 (0-based, residual included, no final norm). ``lm_head`` and the final ``norm`` are never
read. Expert banks stay quantised and are dequantised one expert at a time, only for experts with
routed tokens (:class:`lens_model.ops.ExpertBank`).

The model's layers are built on the meta device; each layer's stored weights are assigned into its
module just before it runs and released after. Placement (``offload``) decides where those weights
come from:
  ``"device"``: every layer resident on the compute device (GPU: ~12 GB for the NVFP4 file);
  ``"layers"``: every layer kept in host memory (memory-mapped file pages), each moved to the compute
      device when it runs and released after (GPU peak < 1 GB);
  ``"stream"``: nothing resident; each layer's tensors are memory-mapped from the file when it runs
      (the next layer is mapped on a thread meanwhile) and unmapped after. Peak RAM ~
      two layers (~1 GB) + activations. The default on the CPU, and on a GPU without room for the
      whole model.
In every mode the token embedding (:class:`lens_model.gpt_oss.GptOssEmbedding`) reads only the rows a
prompt needs from the file; the 1.2 GB table is never loaded.
Every mode computes the same numbers for the same dtype and device.

On the CPU the experts of a layer run on worker threads, one expert per thread (see
:class:`ExpertPool`), each dequantising its expert in row chunks into a reused buffer.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import threading
import time
from typing import Callable, Sequence

import torch

from . import tokenizer as lens_tokenizer
from .checkpoints import open_checkpoint
from .constants import CAPTURED_LAYERS, PAD_ID, PREFIX_LEN
from .gpt_oss import GptOssConfig, GptOssModel
from .gpt_oss_checkpoints import GptOssCheckpoint, LayerWeights, find_gpt_oss_config_json
from .ops import CastWorkspace
from .precision import default_compute_dtype as default_dtype  # public name of the text encoder's default
from .precision import parse_dtype, refuse_fp16

logger = logging.getLogger(__name__)

#: Decoder layers whose output Lens feeds to the DiT (0-based, after the layer, before any norm).
DEFAULT_SELECTED_LAYERS = CAPTURED_LAYERS
OFFLOAD_MODES = ("device", "layers", "stream")


# --------------------------------------------------------------------------------------------------
# CPU expert threads


class ExpertPool:
    """Worker threads that run whole experts on the CPU, one intra-op thread each.

    Expert-level parallelism keeps every core busy on large independent pieces of work; intra-op
    threading of the many small per-chunk ops collapses when the machine is shared (an OpenMP team
    waits for its slowest, descheduled member). Each worker has its own dequantisation workspace.
    Results are summed by the caller in expert order, so the numbers do not depend on scheduling.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._local = threading.local()
        caller_threads = torch.get_num_threads()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="lens-te-expert",
                                                           initializer=self._init)
        # torch.set_num_threads(1) in a worker is per thread for threads that already run torch, but
        # also becomes the count that threads initialising torch later start with: start every
        # worker now (each blocks until all exist), then restore the caller's count as that default.
        started = threading.Barrier(workers, timeout=60)
        list(self._pool.map(lambda _: started.wait(), range(workers)))
        torch.set_num_threads(caller_threads)

    def _init(self) -> None:
        torch.set_num_threads(1)
        torch.get_num_threads()  # initialises this thread's torch threading now, with 1

    def workspace(self) -> CastWorkspace:
        ws = getattr(self._local, "ws", None)
        if ws is None:
            ws = self._local.ws = CastWorkspace()
        return ws

    def submit(self, fn, *args):
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


# --------------------------------------------------------------------------------------------------
# The encoder


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The text encoder's compute dtype: None / "auto" -> :func:`precision.default_compute_dtype`;
    fp16 -> bf16 with a warning (:func:`precision.refuse_fp16`); otherwise bf16 or fp32."""
    dtype = parse_dtype(dtype)
    if dtype is None:
        return default_dtype(device)
    dtype = refuse_fp16(dtype, device, "gpt-oss text encoder", stacklevel=3)
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"text encoder dtype must be bf16 or fp32, got {dtype}")
    return dtype


class LensTextEncoder:
    """gpt-oss-20b feature extractor for Lens. Build with :func:`load_text_encoder`.

    ``encode(prompts)`` -> (context [B, S, 4E] layer-major, mask [B, S] bool), prefix dropped;
    ``encode_ids(ids, mask)`` -> 4 x [B, S, E] (no drop); ``tokenize(prompt)`` -> templated ids.
    """

    def __init__(self, checkpoint: GptOssCheckpoint, config: GptOssConfig, dtype: torch.dtype,
                 device: torch.device, offload: str, selected_layers: Sequence[int] = DEFAULT_SELECTED_LAYERS,
                 tokenizer=None, tokenizer_path=None) -> None:
        self.checkpoint = checkpoint
        self.config = config
        self.dtype = dtype
        self.device = device
        self.offload = offload
        self._selected = self._check_layers(selected_layers)
        self._tokenizer = tokenizer
        self._tokenizer_path = tokenizer_path
        self.model = GptOssModel(config)  # meta-device layers; weights are assigned per layer as it runs
        self.model.embed_tokens.row_reader = checkpoint.embed  # only the rows a prompt needs, from the file
        self._resident: list[LayerWeights] | None = None
        self._workspace = CastWorkspace()
        self._pool: ExpertPool | None = None
        self._run_lock = threading.Lock()  # one forward at a time (shared workspaces and pools)
        self.name = checkpoint.name
        self.identity = checkpoint.source.identity
        self.last_timings: dict[str, float] = {}
        #: CPU expert worker threads (None: torch.get_num_threads() at encode time)
        self.cpu_threads: int | None = None
        if offload in ("device", "layers"):
            self._load_resident()

    def __repr__(self) -> str:
        return (f"LensTextEncoder({self.name!r}, layout={self.checkpoint.layout}, experts={self.checkpoint.expert_format}, "
                f"dtype={self.dtype}, device={self.device}, offload={self.offload!r})")

    # -- placement ---------------------------------------------------------------------------------
    def _check_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        layers = tuple(int(i) for i in layers)
        n = self.config.num_hidden_layers
        if not layers or max(layers) >= n or min(layers) < 0:
            raise ValueError(f"selected layers {layers} outside 0..{n - 1}")
        return layers

    @property
    def selected_layers(self) -> tuple[int, ...]:
        """Decoder layers captured (0-based, output of the layer); the DiT's ``selected_layer_index``."""
        return self._selected

    @selected_layers.setter
    def selected_layers(self, layers: Sequence[int]) -> None:
        layers = self._check_layers(layers)
        grow = self._resident is not None and max(layers) + 1 > len(self._resident)
        self._selected = layers
        if grow:
            self._load_resident()

    @property
    def num_layers_run(self) -> int:
        return max(self._selected) + 1

    def _load_resident(self) -> None:
        """Read layers 0..n-1 once: onto the compute device ("device") or kept in host memory
        ("layers"; memory-mapped file pages the kernel may reclaim and re-read, not pinned)."""
        target = self.device if self.offload == "device" else torch.device("cpu")
        layers = []
        # On the CPU the layers stay views of one map of the file; layers copied to a device are read
        # through one handle each, so no more than one layer's pages stay mapped meanwhile.
        with self.checkpoint.source.reading() if target.type == "cpu" else contextlib.nullcontext():
            for i in range(self.num_layers_run):
                lw = self.checkpoint.read_layer(i, self.config)
                layers.append(lw.to(target) if target.type != "cpu" else lw)
        self._resident = layers

    def unload(self) -> None:
        """Drop every resident weight and scratch buffer (the file stays open by path only)."""
        self._resident = None
        self._workspace.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def to(self, device=None, offload: str | None = None) -> "LensTextEncoder":
        """Move the compute device (and optionally change ``offload``); resident layers follow."""
        device = torch.device(device) if device is not None else self.device
        offload = offload or self.offload
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        changed = device != self.device or offload != self.offload
        self.device, self.offload = device, offload
        if changed:
            if offload == "stream":
                self.unload()
            elif self._resident is not None and offload == "device":
                self._resident = [lw.to(device) for lw in self._resident]
            elif self._resident is not None and offload == "layers":
                self._resident = [lw.to("cpu") for lw in self._resident]
            else:
                self._load_resident()
        return self

    def _layers(self, n: int):
        """Yield layers 0..n-1 on the compute device."""
        if self.offload in ("device", "layers") and self._resident is None:
            self._load_resident()
        if self.offload == "device":
            yield from self._resident[:n]
            return
        if self.offload == "layers":
            for lw in self._resident[:n]:
                yield lw.to(self.device, non_blocking=True)
            return
        # stream: read layer i+1 on a thread while layer i runs
        ck, cfg, dev = self.checkpoint, self.config, self.device
        # The reader thread copies to the GPU on the consumer's stream (and so its device): a thread
        # starts on device 0's default stream, which would put the weights on another GPU for an
        # unindexed "cuda" on a non-default current device, or tie their memory to a stream the
        # forward does not run on when the caller computes on a side stream.
        stream = torch.cuda.current_stream(dev) if dev.type == "cuda" else None

        def read(i: int) -> LayerWeights:
            lw = ck.read_layer(i, cfg)
            if stream is not None:
                with torch.cuda.stream(stream):
                    return lw.to(stream.device)
            return lw.to(dev) if dev.type != "cpu" else lw

        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lens-te-read") as pool:
            nxt = pool.submit(read, 0)
            for i in range(n):
                lw = nxt.result()
                nxt = pool.submit(read, i + 1) if i + 1 < n else None
                yield lw
                del lw

    def _expert_pool(self) -> ExpertPool | None:
        """Expert worker threads for the CPU: as many as torch's intra-op threads (None for 1)."""
        workers = torch.get_num_threads() if self.cpu_threads is None else self.cpu_threads
        if workers <= 1:
            return None
        if self._pool is None or self._pool.workers != workers:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = ExpertPool(workers)
        return self._pool

    # -- tokenizer ---------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = lens_tokenizer.load_tokenizer(self._tokenizer_path)
        return self._tokenizer

    def tokenize(self, prompt: str, date=None, strip_markers: bool = True, **kwargs) -> list[int]:
        """Templated ids of ``prompt`` (97-token prefix included), capped at 512 (tokenizer.tokenize)."""
        return self.tokenizer.tokenize(prompt, date=date, strip_markers=strip_markers, **kwargs)

    def cache_key(self, prompt: str, date=None, strip_markers: bool = True, **kwargs) -> str:
        """Key for caching features: prompt text, template date, options, file identity, dtype, layers."""
        return encode_prompt_cache_key(prompt, lens_tokenizer.resolve_date(date), self.identity, self.dtype, self.selected_layers,
                                       strip_markers=strip_markers, **kwargs)

    # -- encoding ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   callback: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
        """Run the decoder on ids [B, S] (right padded; mask [B, S], 1 = real) and return the hidden
        states after each selected layer: a list of [B, S, E] in the compute dtype (no prefix drop).
        ``callback(layer_done, layers_total)`` is called after each layer (it may raise to abort)."""
        cfg = self.config
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got {tuple(ids.shape)}")
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
            raise ValueError(
                f"token ids span {int(ids.min())}..{int(ids.max())}, outside this text encoder's vocabulary "
                f"0..{cfg.vocab_size - 1} ({self.name}); were they made by another tokenizer?"
            )
        bsz, s = ids.shape
        if s == 0:
            return [torch.zeros(bsz, 0, cfg.hidden_size, dtype=self.dtype, device=self.device) for _ in self.selected_layers]
        with self._run_lock:
            return self._forward(ids, mask, callback)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, callback) -> list[torch.Tensor]:
        bsz, s = ids.shape
        t0 = time.perf_counter()
        dev, dtype = self.device, self.dtype
        n = self.num_layers_run
        if dev.type == "cpu":
            self.model.set_expert_runtime(self._workspace, self._expert_pool())
        else:
            self.model.set_expert_runtime(None, None)
        feats = self.model(ids, mask.to(dev), self._layers(n), self.selected_layers, callback, num_layers=n, dtype=dtype)
        self.last_timings = {"encode_s": time.perf_counter() - t0, "tokens": float(bsz * s)}
        logger.info("gpt-oss encode: %d x %d tokens, %d layers in %.2f s", bsz, s, n, self.last_timings["encode_s"])
        return feats

    def encode(self, prompts: Sequence[str] | str, date=None, strip_markers: bool = True, *,
               encode_empty: bool = False, callback: Callable[[int, int], None] | None = None,
               **tokenize_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts for the DiT.

        Returns ``context`` [B, S_kept, 4E] layer-major (index l*E + e, compute dtype) and ``mask``
        [B, S_kept] bool, with the 97-token template prefix dropped. Rows are right padded (pad id
        199999, mask False). An empty / whitespace prompt gives zero tokens (all-False mask row;
        [B, 0, 4E] when every prompt is empty) and the model is not run for it, unless
        ``encode_empty=True`` (template it as upstream does for an empty positive).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        width = len(self.selected_layers) * self.config.hidden_size
        rows = []
        for p in prompts:
            if not encode_empty and not p.strip():
                rows.append([])
            else:
                rows.append(self.tokenize(p, date=date, strip_markers=strip_markers, **tokenize_kwargs))
        live = [i for i, r in enumerate(rows) if r]
        bsz = len(prompts)
        if not live:
            return (torch.zeros(bsz, 0, width, dtype=self.dtype, device=self.device),
                    torch.zeros(bsz, 0, dtype=torch.bool, device=self.device))
        s = max(len(rows[i]) for i in live)
        pad = PAD_ID if PAD_ID < self.config.vocab_size else 0  # tiny test models have small vocabularies
        ids = torch.full((len(live), s), pad, dtype=torch.long)
        mask = torch.zeros(len(live), s, dtype=torch.long)
        for j, i in enumerate(live):
            ids[j, : len(rows[i])] = torch.tensor(rows[i])
            mask[j, : len(rows[i])] = 1
        feats = self.encode_ids(ids, mask, callback=callback)
        ctx_live = torch.cat(feats, dim=-1)[:, PREFIX_LEN:]
        mask_live = mask.to(self.device).bool()[:, PREFIX_LEN:]
        kept = ctx_live.shape[1]
        if len(live) == bsz:
            return ctx_live, mask_live
        context = torch.zeros(bsz, kept, width, dtype=ctx_live.dtype, device=ctx_live.device)
        out_mask = torch.zeros(bsz, kept, dtype=torch.bool, device=ctx_live.device)
        index = torch.tensor(live, device=ctx_live.device)
        context[index] = ctx_live
        out_mask[index] = mask_live
        return context, out_mask

    __call__ = encode


def encode_prompt_cache_key(prompt: str, date: str, identity, dtype, selected_layers=DEFAULT_SELECTED_LAYERS,
                            **options) -> str:
    """A stable hex key for cached features of ``prompt`` (text, date, TE file identity, dtype, layers, options)."""
    parts = [repr(prompt), str(date), repr(tuple(identity)), str(dtype), repr(tuple(selected_layers)),
             repr(sorted(options.items()))]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def _default_offload(device: torch.device, ckpt: GptOssCheckpoint, n_layers: int) -> str:
    if device.type == "cpu":
        return "stream"
    if device.type == "cuda":
        need = sum(ckpt.layer_nbytes(i) for i in range(n_layers))
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except Exception:  # pragma: no cover
            return "stream"
        return "device" if free > need * 1.15 + (2 << 30) else "stream"
    return "device"


def _open_checked(path, config: GptOssConfig | dict | None = None) -> tuple[GptOssCheckpoint, GptOssConfig]:
    """Open ``path`` as a gpt-oss checkpoint and check every shape against its configuration
    (config.json when present, else inferred from the shapes). Reads headers only."""
    source = open_checkpoint(path, "te")
    ckpt = GptOssCheckpoint(source)
    if isinstance(config, dict):
        config = GptOssConfig.from_dict(config)
    if config is None:
        hf = find_gpt_oss_config_json(source)
        config = GptOssConfig.from_dict(hf) if hf else GptOssConfig.infer(ckpt)
    ckpt.validate(config)
    return ckpt, config


def inspect_text_encoder(path) -> GptOssConfig:
    """The configuration of the gpt-oss checkpoint at ``path``, after checking its layout and every
    shape (headers only: nothing is loaded). Raises the same errors as :func:`load_text_encoder`."""
    return _open_checked(path)[1]


def load_text_encoder(path, dtype=None, device=None, offload: str | None = None, *, config: GptOssConfig | dict | None = None,
                      selected_layers: Sequence[int] | None = None, tokenizer=None) -> LensTextEncoder:
    """Open a gpt-oss-20b text encoder for Lens.

    Args:
        path: ComfyUI single file (``gpt_oss_20b_nvfp4.safetensors``), HF / diffusers folder
            (``text_encoder/`` or the openai/gpt-oss-20b root, sharded with an index), OpenAI
            ``original/model.safetensors``, or an HF-dequantised bf16/fp32 file.
        dtype: compute dtype: None = bf16 where the device has native bf16 (CUDA, AVX512-BF16/AMX
            CPUs), else fp32; fp16 is refused with a warning (bf16 is used; fp32 on a GPU without bf16).
        device: compute device (default CUDA if available, else CPU).
        offload: ``"device"`` | ``"layers"`` | ``"stream"`` (see module docstring); None picks
            ``"stream"`` on the CPU, ``"device"`` on a GPU with room for the model, else ``"stream"``.
        config: override the configuration (else config.json, else inferred from the shapes).
        selected_layers: decoder layers to capture (default 5, 11, 17, 23; read the DiT's
            ``selected_layer_index`` when one exists).
        tokenizer: a LensTokenizer, or None to find one next to the weights (embedded
            ``tokenizer_json``, ``tokenizer.json``, then the built-in o200k_base fallback).
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(dtype, device)
    ckpt, config = _open_checked(path, config)
    layers = tuple(selected_layers) if selected_layers is not None else DEFAULT_SELECTED_LAYERS
    if offload is None:
        offload = _default_offload(device, ckpt, max(layers) + 1)
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES} or None, got {offload!r}")
    tok_path = None
    if tokenizer is None:
        lens_tokenizer.find_tokenizer_source(path)  # fail now, with the places searched, if there is none
        tok_path = path
    t0 = time.perf_counter()
    enc = LensTextEncoder(ckpt, config, dtype, device, offload, layers, tokenizer=tokenizer, tokenizer_path=tok_path)
    logger.info("Loaded gpt-oss text encoder %s (%s layout, %s experts) in %.1f s: dtype %s, device %s, offload %s",
                ckpt.name, ckpt.layout, ckpt.expert_format, time.perf_counter() - t0, dtype, device, offload)
    return enc


__all__ = [
    "GptOssConfig",
    "LensTextEncoder",
    "load_text_encoder",
    "inspect_text_encoder",
    "encode_prompt_cache_key",
    "ExpertPool",
    "resolve_dtype",
    "default_dtype",
    "DEFAULT_SELECTED_LAYERS",
    "OFFLOAD_MODES",
]
