"""gpt-oss-20b decoder layers as ``nn.Module`` s: configuration, modules and forward only.

Lens uses gpt-oss-20b as a frozen feature extractor: decoder layers 0..max(selected) run on a
templated prompt and the raw residual stream after selected layers is returned (``lm_head`` and the
final norm are never built). File reading, key layouts and weight placement live elsewhere
(:mod:`lens_model.gpt_oss_checkpoints`, :mod:`lens_model.text_encoder`).

Module and parameter names equal the checkpoint's internal key names (relative to ``layers.{i}.``):
``input_layernorm.weight``, ``self_attn.{q,k,v,o}_proj.{weight,bias}``, ``self_attn.sinks``,
``post_attention_layernorm.weight``, ``mlp.router.{weight,bias}``,
``mlp.experts.{gate_up_proj,down_proj}``.

Weights enter through the ``ops`` seam: Linears are built with ``operations.Linear`` (a stored
bf16/fp32 weight is cast to the compute dtype at the call), and a Linear stored quantised
(float8 / MXFP8 / NVFP4) is an :class:`lens_model.ops.QuantLinear` put in its place. The expert
banks are storage objects (:class:`lens_model.ops.ExpertBank`: MXFP4, NVFP4 or
dense) that compute one expert's ``x @ W_e^T + b_e`` at a time, dequantising only that expert.

The layers are built on the meta device and hold no weights of their own: the owner assigns one
layer's stored tensors with :meth:`GptOssDecoderLayer.assign` just before the layer runs and
:meth:`GptOssDecoderLayer.release` s them after (every placement mode of the text encoder, from
all-resident to streamed from the file, goes through this). The token embedding
(:class:`GptOssEmbedding`) likewise holds no table: it asks a row reader the owner assigns for the
rows of the ids it embeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from . import ops
from .constants import TEXT_HIDDEN_SIZE, VOCAB_SIZE


@dataclass
class GptOssConfig:
    """gpt-oss hyper-parameters (HF ``config.json`` names; defaults are gpt-oss-20b)."""

    vocab_size: int = VOCAB_SIZE
    hidden_size: int = TEXT_HIDDEN_SIZE
    intermediate_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    rms_norm_eps: float = 1e-5
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    attention_bias: bool = True
    rope_type: str = "yarn"
    rope_theta: float = 150000.0
    rope_factor: float = 32.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_original_max_position_embeddings: int = 4096
    rope_truncate: bool = False
    rope_attention_factor: float | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = tuple(
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers)
            )
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_dict(cls, d: dict) -> "GptOssConfig":
        """From an HF ``config.json`` (transformers 5 ``rope_parameters`` or 4.x ``rope_scaling`` +
        ``rope_theta``) or OpenAI's ``original/config.json`` (``num_experts``, ``experts_per_token``,
        ``rope_scaling_factor``, ``rope_ntk_alpha/beta``, ``initial_context_length``)."""
        kw: dict = {}
        names = {f.name for f in fields(cls)}
        for k, v in d.items():
            if k in names and not k.startswith("rope_") and v is not None:
                kw[k] = v
        if "num_experts" in d and "num_local_experts" not in d:  # OpenAI original config
            kw["num_local_experts"] = d["num_experts"]
            kw["num_experts_per_tok"] = d.get("experts_per_token", 4)
            kw["rope_theta"] = float(d.get("rope_theta", 150000.0))
            kw["rope_factor"] = float(d.get("rope_scaling_factor", 32.0))
            kw["rope_beta_slow"] = float(d.get("rope_ntk_alpha", 1.0))
            kw["rope_beta_fast"] = float(d.get("rope_ntk_beta", 32.0))
            kw["rope_original_max_position_embeddings"] = int(d.get("initial_context_length", 4096))
            kw["rope_truncate"] = False
        else:
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
            if isinstance(rope, dict) and "rope_type" not in rope and "full_attention" in rope:
                rope = rope["full_attention"]  # per-layer-type rope dict (not used by gpt-oss)
            rope = dict(rope or {})
            theta = rope.get("rope_theta", d.get("rope_theta"))
            if theta is not None:
                kw["rope_theta"] = float(theta)
            rtype = rope.get("rope_type", rope.get("type", "yarn" if rope else "default"))
            kw["rope_type"] = rtype
            if rtype == "yarn":
                kw["rope_factor"] = float(rope.get("factor", 32.0))
                kw["rope_beta_fast"] = float(rope.get("beta_fast") or 32.0)
                kw["rope_beta_slow"] = float(rope.get("beta_slow") or 1.0)
                kw["rope_original_max_position_embeddings"] = int(
                    rope.get("original_max_position_embeddings") or d.get("max_position_embeddings", 4096)
                )
                kw["rope_truncate"] = bool(rope.get("truncate", True))  # transformers' default
                if rope.get("attention_factor") is not None:
                    kw["rope_attention_factor"] = float(rope["attention_factor"])
            elif rtype != "default":
                raise ValueError(f"unsupported rope_type {rtype!r} for gpt-oss (expected 'yarn')")
        if "head_dim" not in kw and "hidden_size" in kw and "num_attention_heads" in kw:
            kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
        if "layer_types" in kw:
            kw["layer_types"] = tuple(kw["layer_types"])
        return cls(**kw)

    @classmethod
    def infer(cls, ckpt) -> "GptOssConfig":
        """From the tensor shapes of a checkpoint without config.json
        (:meth:`lens_model.gpt_oss_checkpoints.GptOssCheckpoint.infer_config`)."""
        return ckpt.infer_config()


def yarn_inv_freq(config: GptOssConfig) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies [head_dim/2] (fp32) and the cos/sin amplitude factor.

    YaRN: theta_j = base^(-2j/d); ramp between
    low = max(corr(beta_fast), 0) and high = min(corr(beta_slow), d-1), corr(n) = d ln(L/(2 pi n)) / (2 ln base);
    inv_freq = theta (1 - r) + theta / factor * r; amplitude 0.1 ln(factor) + 1.
    """
    d = config.head_dim
    base = config.rope_theta
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if config.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    factor = config.rope_factor
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    L = config.rope_original_max_position_embeddings

    def corr(n: float) -> float:
        return (d * math.log(L / (n * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr(config.rope_beta_fast), corr(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    amp = config.rope_attention_factor
    if amp is None:
        amp = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, float(amp)


def rope_cos_sin(config: GptOssConfig, seq_len: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, head_dim/2] for positions 0..S-1, amplitude applied in fp32, then cast to ``dtype``."""
    inv_freq, amp = yarn_inv_freq(config)
    pos = torch.arange(seq_len, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]
    return (freqs.cos() * amp).to(device=device, dtype=dtype), (freqs.sin() * amp).to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Split-half (NeoX) rotation. x: [B, heads, S, d]; cos/sin: [S, d/2]."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


# --------------------------------------------------------------------------------------------------
# Forward math shared by the modules


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps), computed in fp32, returned in x's dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype)


def attention_bias(attention_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """Additive fp32 mask [B, S, S] (0 or -inf): causal j <= i, sliding i - window < j (when
    ``window``), padded keys (attention_mask 0) masked. Queries are never masked."""
    b, s = attention_mask.shape
    dev = attention_mask.device
    i = torch.arange(s, device=dev)[:, None]
    j = torch.arange(s, device=dev)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    allowed = allowed[None] & attention_mask.bool()[:, None, :]
    bias = torch.zeros(b, s, s, dtype=torch.float32, device=dev)
    return bias.masked_fill_(~allowed, float("-inf"))


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, bias: torch.Tensor,
                   scale: float, max_scores: int = 1 << 24) -> torch.Tensor:
    """Softmax attention with one extra "sink" logit per head (a learned logit with no value), in fp32.

    q: [B, H, S, d]; k, v: [B, KV, S, d] (GQA: head h uses KV head h // (H/KV)); sinks: [H];
    bias: [B, S, S] additive. out_i = sum_j e^{l_ij} v_j / (sum_j e^{l_ij} + e^{s_h}); a fully masked
    row gives 0. Returns [B, H, S, d] fp32. Queries are processed in chunks of at most
    ``max_scores`` score elements.
    """
    bsz, heads, s, d = q.shape
    kvh = k.shape[1]
    g = heads // kvh
    qf = q.float().reshape(bsz, kvh, g, s, d)
    kt = k.float().transpose(-1, -2)[:, :, None]  # [B, KV, 1, d, S]
    vf = v.float()[:, :, None]  # [B, KV, 1, S, d]
    sink = sinks.float().reshape(1, kvh, g, 1, 1)
    out = torch.empty(bsz, kvh, g, s, d, dtype=torch.float32, device=q.device)
    step = max(1, max_scores // max(1, bsz * heads * s))
    for q0 in range(0, s, step):
        q1 = min(s, q0 + step)
        logits = torch.matmul(qf[:, :, :, q0:q1], kt) * scale  # [B, KV, G, q, S]
        logits += bias[:, None, None, q0:q1]
        m = torch.maximum(logits.amax(-1, keepdim=True), sink)
        p = torch.exp(logits - m)
        denom = p.sum(-1, keepdim=True) + torch.exp(sink - m)
        out[:, :, :, q0:q1] = torch.matmul(p / denom, vf)
    return out.reshape(bsz, heads, s, d)


# --------------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` in fp32 (:func:`rms_norm`). x: [..., dim] -> same shape and dtype."""

    def __init__(self, dim: int, eps: float, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight.to(x.dtype), self.eps)


class GptOssAttention(nn.Module):
    """Grouped-query self-attention with per-head sink logits (:func:`sink_attention`).

    ``q_proj`` [H*d, E], ``k_proj`` / ``v_proj`` [KV*d, E], ``o_proj`` [E, H*d] (all with bias),
    ``sinks`` [H]. Causal and sliding-window masking come in as the additive ``bias``.
    """

    def __init__(self, config: "GptOssConfig", operations=ops.default_operations, device=None) -> None:
        super().__init__()
        e, d = config.hidden_size, config.head_dim
        q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
        self.head_dim = d
        self.q_proj = operations.Linear(e, q, bias=True, device=device)
        self.k_proj = operations.Linear(e, kv, bias=True, device=device)
        self.v_proj = operations.Linear(e, kv, bias=True, device=device)
        self.o_proj = operations.Linear(q, e, bias=True, device=device)
        self.sinks = nn.Parameter(torch.empty(config.num_attention_heads, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: [B, S, E] (normed, compute dtype); cos/sin: [S, d/2]; bias: [B, S, S] -> [B, S, E]."""
        dtype = x.dtype
        bsz, s, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(bsz, s, -1, d).transpose(1, 2)
        k = self.k_proj(x).view(bsz, s, -1, d).transpose(1, 2)
        v = self.v_proj(x).view(bsz, s, -1, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = sink_attention(q, k, v, self.sinks.to(dtype), bias, d ** -0.5)
        return self.o_proj(o.transpose(1, 2).reshape(bsz, s, -1).to(dtype))


class GptOssExperts(nn.Module):
    """The expert banks of one MoE layer and the clamped SwiGLU between them.

    ``gate_up_proj``: bank of ``num_experts`` matrices [2I, E] (rows interleaved: even rows gate,
    odd rows up); ``down_proj``: bank of [E, I]. A bank is any object with ``linear(e, x, workspace)``
    = ``x @ W_e^T + b_e`` for one expert (:class:`lens_model.ops.ExpertBank`), so
    only the experts with routed tokens are ever dequantised, one at a time per worker.

    Set by the owner, like the DiT's ``cast_workspace``: ``cast_workspace`` (scratch memory for the
    dequantisation on the CPU) and ``expert_pool`` (worker threads running whole experts, with
    ``submit(fn, *args)`` and a per-thread ``workspace()``), both optional.
    """

    cast_workspace: ops.CastWorkspace | None = None
    expert_pool = None

    def __init__(self, config: "GptOssConfig") -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.limit = config.swiglu_limit
        self.alpha = config.swiglu_alpha
        self.gate_up_proj = None
        self.down_proj = None

    def bank_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Logical shape [num_experts, out, in] of each bank (Linear orientation)."""
        x, e, i = self.num_experts, self.hidden_size, self.intermediate_size
        return {"gate_up_proj": (x, 2 * i, e), "down_proj": (x, e, i)}

    def _expert(self, e: int, x: torch.Tensor, weight: torch.Tensor,
                workspace: ops.CastWorkspace | None) -> torch.Tensor:
        """One expert on its tokens. x: [n, E]; weight: [n] routing weights -> [n, E] fp32 (weighted)."""
        gu = self.gate_up_proj.linear(e, x, workspace)
        gate = gu[:, 0::2].clamp(max=self.limit)
        up = gu[:, 1::2].clamp(min=-self.limit, max=self.limit)
        a = gate * torch.sigmoid(gate * self.alpha) * (up + 1)
        y = self.down_proj.linear(e, a.contiguous(), workspace)
        return y.float() * weight[:, None]

    def forward(self, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """x: [T, E]; top_i / top_w: [T, k] chosen experts and their weights -> [T, E] fp32.

        Each expert's weighted output is added in ascending expert order, so the sum does not
        depend on how the experts were scheduled.
        """
        k = top_i.shape[-1]
        flat = top_i.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // k
        tok_w = top_w.reshape(-1)[order]
        jobs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                jobs.append((e, tokens[start:start + n], tok_w[start:start + n]))
                start += n
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        pool = self.expert_pool
        if pool is not None and len(jobs) > 1:
            return self._pooled(x, jobs, out, pool)
        for e, tok, w in jobs:
            out.index_add_(0, tok, self._expert(e, x.index_select(0, tok), w, self.cast_workspace))
        return out

    def _pooled(self, x: torch.Tensor, jobs: list, out: torch.Tensor, pool) -> torch.Tensor:
        def run(e, tok, w):
            with torch.inference_mode():  # grad mode is per thread
                return self._expert(e, x.index_select(0, tok), w, pool.workspace())

        # the workers use every core: keep this thread's own small ops off the OpenMP team meanwhile
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        futures = [pool.submit(run, *job) for job in jobs]
        try:
            for (e, tok, _), fut in zip(jobs, futures):
                out.index_add_(0, tok, fut.result())
        finally:
            for fut in futures:
                fut.cancel()
            torch.set_num_threads(prev)
        return out


class GptOssMLP(nn.Module):
    """Top-k mixture of experts. ``router`` [X, E] with bias; ``experts``: :class:`GptOssExperts`.

    Router logits in fp32 -> top-k -> softmax over those k -> weighted sum of the chosen experts.
    """

    def __init__(self, config: "GptOssConfig", operations=ops.default_operations, device=None) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = operations.Linear(config.hidden_size, config.num_local_experts, bias=True, device=device)
        self.experts = GptOssExperts(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, E] (normed, compute dtype) -> [T, E] in x's dtype."""
        logits = self.router(x.float())
        top_v, top_i = torch.topk(logits, self.top_k, dim=-1)
        return self.experts(x, top_i, torch.softmax(top_v, dim=-1)).to(x.dtype)


class GptOssDecoderLayer(nn.Module):
    """One pre-norm decoder layer: h + attn(norm(h)), then h + moe(norm(h)).

    ``attention_type``: ``"full_attention"`` or ``"sliding_attention"`` (which mask it takes).
    Built on the meta device by default; :meth:`assign` puts stored weights in, :meth:`release`
    takes them out again.
    """

    def __init__(self, config: "GptOssConfig", index: int, operations=ops.default_operations,
                 device="meta") -> None:
        super().__init__()
        self.index = index
        self.attention_type = config.layer_types[index]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device)
        self.self_attn = GptOssAttention(config, operations, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device)
        self.mlp = GptOssMLP(config, operations, device=device)
        self._placeholders: dict[str, object] = {}

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """h: [B, S, E] residual stream (compute dtype); cos/sin [S, d/2]; bias [B, S, S] -> [B, S, E]."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, bias)
        x = self.post_attention_layernorm(h)
        bsz, s, e = x.shape
        return h + self.mlp(x.reshape(bsz * s, e)).reshape(bsz, s, e)

    def assign(self, weights: Mapping[str, object]) -> None:
        """Use ``weights`` (names as in the module; no copies) until :meth:`release`.

        A tensor replaces the parameter of that name; an ``nn.Module`` (a ``QuantLinear``) replaces
        the Linear of that name; anything else (an expert bank) is set as the attribute. Every
        parameter and both expert banks must be given.
        """
        if self._placeholders:
            self.release()
        self._placeholders = assign_weights(self, weights)
        missing = [n for n, p in self.named_parameters() if p.is_meta]
        missing += [f"mlp.experts.{b}" for b in ("gate_up_proj", "down_proj") if getattr(self.mlp.experts, b) is None]
        if missing:
            self.release()
            raise KeyError(f"gpt-oss layer {self.index}: no weights given for {', '.join(missing)}")

    def release(self) -> None:
        """Drop the assigned weights (back to the meta placeholders)."""
        restore_weights(self, self._placeholders)
        self._placeholders = {}


def layer_shapes(config: "GptOssConfig") -> dict[str, tuple[int, ...]]:
    """The shape of every weight of one decoder layer, by name relative to ``layers.{i}.``, read off a
    :class:`GptOssDecoderLayer` built on the meta device. Expert banks appear as
    ``mlp.experts.{bank}`` [X, out, in] and ``mlp.experts.{bank}_bias`` [X, out]."""
    layer = GptOssDecoderLayer(config, 0)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    for bank, shape in layer.mlp.experts.bank_shapes().items():
        shapes[f"mlp.experts.{bank}"] = shape
        shapes[f"mlp.experts.{bank}_bias"] = shape[:2]
    return shapes


def assign_weights(module: nn.Module, weights: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """Put the entries of ``weights`` whose names start with ``prefix`` into ``module`` (names relative
    to it after the prefix; no copies) and return what they replaced, by name.

    A tensor becomes the parameter of that name; an ``nn.Module`` (a ``QuantLinear``) replaces the
    Linear of that name; anything else (an expert bank) is set as the attribute.
    """
    replaced: dict[str, object] = {}
    try:
        for name, value in weights.items():
            if not name.startswith(prefix):
                continue
            name = name[len(prefix):]
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name)
            if not hasattr(parent, attr):
                raise KeyError(f"{type(module).__name__} has no `{name}`")
            replaced[name] = getattr(parent, attr)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                value = nn.Parameter(value, requires_grad=False)
            setattr(parent, attr, value)
    except Exception:
        restore_weights(module, replaced)  # nothing left half assigned
        raise
    return replaced


def restore_weights(module: nn.Module, replaced: Mapping[str, object]) -> None:
    """Undo :func:`assign_weights`: put back what it returned."""
    for name, previous in reversed(list(replaced.items())):
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name), attr, previous)


class GptOssEmbedding(nn.Module):
    """Token embedding ``[vocab_size, hidden_size]`` whose rows come from a row reader.

    The table is 1.2 GB in bf16 and a prompt needs a few hundred of its rows, so the module holds
    no weight: the owner sets ``row_reader`` (ids of any shape -> ``ids.shape + (hidden_size,)``,
    e.g. rows read from the file) when it loads the model. forward: ids [B, S] -> [B, S, E] as
    the reader returns them (stored dtype, or fp32 for an fp8 table).
    """

    row_reader: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, config: "GptOssConfig") -> None:
        super().__init__()
        self.num_embeddings = config.vocab_size
        self.embedding_dim = config.hidden_size

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.row_reader is None:
            raise RuntimeError("GptOssEmbedding has no row_reader: the owner assigns one when it loads the model")
        rows = self.row_reader(input_ids)
        if tuple(rows.shape) != (*input_ids.shape, self.embedding_dim):
            raise ValueError(f"embedding rows have shape {tuple(rows.shape)}, expected "
                             f"{(*input_ids.shape, self.embedding_dim)}")
        return rows


class GptOssModel(nn.Module):
    """The token embedding and the decoder stack, without final norm and ``lm_head`` (Lens never uses them).

    ``embed_tokens``: :class:`GptOssEmbedding` (rows from the owner's ``row_reader``);
    ``layers``: :class:`GptOssDecoderLayer` 0..num_hidden_layers-1 on the meta device.
    """

    def __init__(self, config: "GptOssConfig", operations=ops.default_operations) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = GptOssEmbedding(config)
        self.layers = nn.ModuleList(
            GptOssDecoderLayer(config, i, operations) for i in range(config.num_hidden_layers)
        )

    def set_expert_runtime(self, workspace: ops.CastWorkspace | None, pool=None) -> None:
        """Scratch memory and worker threads the expert banks use (see :class:`GptOssExperts`)."""
        for layer in self.layers:
            layer.mlp.experts.cast_workspace = workspace
            layer.mlp.experts.expert_pool = pool

    def attention_biases(self, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The additive masks [B, S, S] per attention type, from ``attention_mask`` [B, S] (1 = real)."""
        return {
            "full_attention": attention_bias(attention_mask, None),
            "sliding_attention": attention_bias(attention_mask, self.config.sliding_window),
        }

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                layer_weights: Iterable[Mapping[str, object]], capture: Sequence[int],
                callback: Callable[[int, int], None] | None = None, num_layers: int | None = None, *,
                dtype: torch.dtype) -> list[torch.Tensor]:
        """Embed ``input_ids``, run layers 0..n-1 and return the residual stream after each layer in ``capture``.

        input_ids: [B, S] (on the device the row reader reads from); attention_mask: [B, S] on the
        compute device (1 = real token, right padded); ``dtype``: the compute dtype.
        ``layer_weights`` yields the weights of layers 0..n-1 (each assigned just before its layer
        runs and released after); ``num_layers`` (n) is the number of layers to run (default
        max(capture) + 1). Returns a list of [B, S, E] in ``dtype``, in the order of ``capture``.
        ``callback(layers_done, n)`` runs after each layer (it may raise to abort).
        """
        n = max(capture) + 1 if num_layers is None else num_layers
        h = self.embed_tokens(input_ids).to(device=attention_mask.device, dtype=dtype)
        cos, sin = rope_cos_sin(self.config, h.shape[1], h.dtype, h.device)
        biases = self.attention_biases(attention_mask)
        wanted = set(capture)
        captured: dict[int, torch.Tensor] = {}
        for i, weights in enumerate(layer_weights):
            if i >= n:
                raise ValueError(f"layer_weights yielded more than the {n} layers to run")
            layer = self.layers[i]
            if layer.attention_type not in biases:
                raise ValueError(f"unknown layer type {layer.attention_type!r} at layer {i}")
            layer.assign(weights)
            del weights
            try:
                h = layer(h, cos, sin, biases[layer.attention_type])
            finally:
                layer.release()
            if i in wanted:
                captured[i] = h
            if callback is not None:
                callback(i + 1, n)
        return [captured[i] for i in capture]


__all__ = [
    "GptOssConfig",
    "GptOssModel",
    "GptOssEmbedding",
    "GptOssDecoderLayer",
    "GptOssAttention",
    "GptOssMLP",
    "GptOssExperts",
    "RMSNorm",
    "assign_weights",
    "layer_shapes",
    "restore_weights",
    "yarn_inv_freq",
    "rope_cos_sin",
    "apply_rope",
    "rms_norm",
    "attention_bias",
    "sink_attention",
]
