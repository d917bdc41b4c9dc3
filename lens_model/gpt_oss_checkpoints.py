"""gpt-oss text-encoder checkpoints: key-layout normalisation and quantised expert banks.

Four layouts are normalised to ONE internal layout with
bare names (``embed_tokens.weight``, ``layers.{i}.self_attn.q_proj.weight``, ...) and expert banks
in Linear orientation ``[E_x, out, in]``:

- ``comfy``: ComfyUI single file, bare keys, NVFP4 expert banks ``.weight`` / ``.weight_scale`` /
  ``.weight_scale_2`` / ``.bias`` with a mandatory ``comfy_quant`` marker (or header
  ``_quantization_metadata``); per-layer markers on q/k/v/o are honoured too;
- ``hf``: openai/gpt-oss-20b root or diffusers ``text_encoder/`` folder, ``model.`` prefix (stripped by
  :func:`lens_model.checkpoints.open_checkpoint`), MXFP4 ``_blocks`` / ``_scales`` experts;
- ``openai``: ``original/model.safetensors`` names (fused ``attn.qkv``, ``mlp1`` / ``mlp2``);
- ``hf_dense``: HF-dequantised bf16/fp32 experts ``[E_x, in, out]`` without ``.weight`` suffix
  (``down_proj`` is square, so the orientation comes from the naming, never from the shape).

The format is decided **per expert bank from its key names and marker**, never from dtypes alone.
Expert banks stay in their stored (quantised) form; :class:`lens_model.ops.ExpertBank` dequantises one
expert at a time, in row chunks into a reused buffer on the CPU, and only for the experts that have tokens.

Nothing here reads ``lm_head.weight`` / ``unembedding.weight`` / ``norm.weight``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Iterable

import torch

from . import quant
from .checkpoints import CheckpointError, TensorSource, quant_layers, quantised_linear_problems
from .gpt_oss import GptOssConfig, layer_shapes
from .ops import ExpertBank, QuantLinear

logger = logging.getLogger(__name__)

LAYOUTS = ("comfy", "hf", "openai", "hf_dense")

#: Per-layer tensors that are plain (never expert banks), internal names relative to ``layers.{i}.``
NORM_KEYS = ("input_layernorm.weight", "post_attention_layernorm.weight")
ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
BANKS = ("gate_up_proj", "down_proj")


@dataclass
class LayerWeights:
    """The stored weights of one decoder layer, named as in :class:`lens_model.gpt_oss.GptOssDecoderLayer`
    (relative to ``layers.{i}.``), ready for its ``assign``.

    Plain entries are tensors in their stored dtype; a quantised attention projection is one
    ``self_attn.{q,k,v,o}_proj`` entry holding a :class:`lens_model.ops.QuantLinear` (bias included)
    in place of its ``.weight`` / ``.bias`` pair; ``mlp.experts.{gate_up_proj,down_proj}`` are
    :class:`ExpertBank`.
    """

    index: int
    tensors: dict = field(default_factory=dict)

    def __getitem__(self, key: str):
        return self.tensors[key]

    def items(self):
        return self.tensors.items()

    @property
    def nbytes(self) -> int:
        total = 0
        for v in self.tensors.values():
            total += v.nbytes if not isinstance(v, torch.Tensor) else v.numel() * v.element_size()
        return total

    def to(self, device, non_blocking: bool = False) -> "LayerWeights":
        """A copy on ``device``; this one's tensors stay where they are."""
        def move(v):
            if isinstance(v, QuantLinear):
                return v.moved(device, non_blocking=non_blocking)
            return v.to(device, non_blocking=non_blocking)

        return LayerWeights(self.index, {k: move(v) for k, v in self.tensors.items()})


# --------------------------------------------------------------------------------------------------
# Checkpoint reader


_LAYER_RE = re.compile(r"^(?:layers|block)\.(\d+)\.")


def _msg_keys(keys: Iterable[str], limit: int = 10) -> str:
    keys = list(keys)
    text = ", ".join(f"`{k}`" for k in keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@dataclass
class _BankSpec:
    """Where one expert bank lives in the file."""

    format: str  # one of ExpertBank.FORMATS
    keys: dict  # role -> stored key (codes, scales, global_scale, weight, bias)


class GptOssCheckpoint:
    """A gpt-oss text-encoder checkpoint seen through the internal layout.

    ``source``: a :class:`~lens_model.checkpoints.TensorSource` opened as ``"te"``. The constructor
    reads headers and ``comfy_quant`` markers only. :meth:`read_layer` reads one decoder layer
    (stored dtypes); :meth:`embed` reads only the embedding rows it needs.

    A layer's tensors are zero-copy views of the file's memory map (:meth:`TensorSource.read`),
    read through one ``safe_open`` handle per layer so that the map, and the pages it holds, go
    away with the layer's tensors.
    """

    def __init__(self, source: TensorSource) -> None:
        self.source = source
        self.name = source.name
        keys = set(source.keys())
        if "block.0.attn.sinks" in keys and "layers.0.self_attn.sinks" not in keys:
            self.layout = "openai"
        else:
            self.layout = "hf"  # refined below from the expert-bank naming
        self.markers = quant_layers(source) if self.layout != "openai" else {}
        self.num_layers = self._count_layers(keys)
        if self.num_layers == 0:
            raise CheckpointError(f"`{self.name}`: no decoder layers found (expected `layers.0.*` or `block.0.*` keys).")
        self._banks: dict[tuple[int, str], _BankSpec] = {}
        for i in range(self.num_layers):
            for bank in BANKS:
                self._banks[(i, bank)] = self._bank_spec(i, bank, keys)
        fmt0 = self._banks[(0, "gate_up_proj")].format
        if self.layout != "openai":
            self.layout = {"nvfp4": "comfy", "mxfp4": "hf", "dense_io": "hf_dense", "dense_oi": "comfy"}[fmt0]
        self.expert_format = fmt0
        self.embed_key = "embedding.weight" if self.layout == "openai" else "embed_tokens.weight"
        if self.embed_key not in keys:
            raise CheckpointError(f"`{self.name}`: the token embedding `{source.stored_key(self.embed_key)}` is missing.")
        for layer, cfg in self.markers.items():
            fmt = cfg.get("format")
            if layer.endswith(".mlp.experts.gate_up_proj") or layer.endswith(".mlp.experts.down_proj"):
                continue
            if layer == "embed_tokens" and fmt != "float8_e4m3fn":
                raise CheckpointError(
                    f"`{self.name}`: the embedding `embed_tokens` carries quantisation format `{fmt}`; "
                    "only float8_e4m3fn embeddings are supported."
                )
            if fmt not in quant.LINEAR_FORMATS:
                raise CheckpointError(quant.unsupported_format_message(self.name, source.stored_key(layer), fmt))

    # -- discovery ---------------------------------------------------------------------------------
    @staticmethod
    def _count_layers(keys: set[str]) -> int:
        found = {int(m.group(1)) for k in keys if (m := _LAYER_RE.match(k))}
        n = 0
        while n in found:
            n += 1
        return n

    def _bank_spec(self, i: int, bank: str, keys: set[str]) -> _BankSpec:
        src = self.source
        if self.layout == "openai":
            mlp = {"gate_up_proj": "mlp1", "down_proj": "mlp2"}[bank]
            base = f"block.{i}.mlp.{mlp}"
            blocks, scales, bias = f"{base}_weight.blocks", f"{base}_weight.scales", f"{base}_bias"
            if blocks in keys and scales in keys and bias in keys:
                return _BankSpec("mxfp4", {"codes": blocks, "scales": scales, "bias": bias})
            missing = [k for k in (blocks, scales, bias) if k not in keys]
            raise CheckpointError(
                f"`{self.name}`: OpenAI-layout expert bank `{base}` is incomplete: missing {_msg_keys(src.stored_key(k) for k in missing)} "
                "(expected MXFP4 `.blocks` / `.scales` and a bias, as in openai/gpt-oss-20b `original/model.safetensors`)."
            )
        base = f"layers.{i}.mlp.experts.{bank}"
        if f"{base}_blocks" in keys:
            need = (f"{base}_blocks", f"{base}_scales", f"{base}_bias")
            missing = [k for k in need if k not in keys]
            if missing:
                raise CheckpointError(f"`{self.name}`: MXFP4 expert bank `{src.stored_key(base)}` lacks {_msg_keys(src.stored_key(k) for k in missing)}.")
            return _BankSpec("mxfp4", {"codes": need[0], "scales": need[1], "bias": need[2]})
        if f"{base}.weight" in keys:
            marker = self.markers.get(base)
            wdt = src.dtype(f"{base}.weight")
            bias = f"{base}.bias"
            if bias not in keys:
                if f"{base}_bias" in keys:
                    logger.warning("%s: expert bank %s has no `.bias` but a `_bias` tensor; using it (ComfyUI would not).",
                                   self.name, src.stored_key(base))
                    bias = f"{base}_bias"
                else:
                    raise CheckpointError(
                        f"`{self.name}`: expert bank `{src.stored_key(base)}` has no bias `{src.stored_key(base)}.bias`; "
                        "ComfyUI would leave it uninitialised. The file is incomplete or was written wrongly; "
                        "re-export it with the expert biases."
                    )
            if marker is None:
                if wdt in ("U8", "I8", "F8_E4M3", "F8_E5M2"):
                    raise CheckpointError(
                        f"`{self.name}`: expert bank `{src.stored_key(base)}` is {wdt} but has no `comfy_quant` marker "
                        "(and no `_quantization_metadata` entry), so its format is unknown; ComfyUI would load it as a "
                        "plain weight and fail. Expected `{\"format\": \"nvfp4\"}` for the ComfyUI NVFP4 layout."
                    )
                return _BankSpec("dense_oi", {"weight": f"{base}.weight", "bias": bias})
            fmt = marker.get("format")
            if fmt != "nvfp4":
                raise CheckpointError(quant.unsupported_format_message(self.name, src.stored_key(base), str(fmt))
                                      + " Expert banks must be nvfp4 (ComfyUI) or MXFP4 (OpenAI/HF).")
            if wdt != "U8":
                raise CheckpointError(f"`{self.name}`: expert bank `{src.stored_key(base)}` is nvfp4 but its weight is stored as {wdt}; expected U8.")
            need = {"codes": f"{base}.weight", "scales": f"{base}.weight_scale", "global_scale": f"{base}.weight_scale_2", "bias": bias}
            missing = [k for k in need.values() if k not in keys]
            if missing:
                raise CheckpointError(f"`{self.name}`: NVFP4 expert bank `{src.stored_key(base)}` lacks {_msg_keys(src.stored_key(k) for k in missing)}.")
            sdt = src.dtype(need["scales"])
            if sdt not in ("U8", "F8_E4M3"):
                raise CheckpointError(f"`{self.name}`: `{src.stored_key(need['scales'])}` is {sdt}; NVFP4 block scales must be F8_E4M3 (or U8 bits).")
            return _BankSpec("nvfp4", need)
        if base in keys:
            bias = f"{base}_bias"
            if bias not in keys:
                raise CheckpointError(f"`{self.name}`: expert bank `{src.stored_key(base)}` has no bias `{src.stored_key(bias)}`.")
            if src.dtype(base) not in ("F32", "BF16", "F16"):
                raise CheckpointError(f"`{self.name}`: dense expert bank `{src.stored_key(base)}` is {src.dtype(base)}; expected BF16 or F32.")
            return _BankSpec("dense_io", {"weight": base, "bias": bias})
        raise CheckpointError(
            f"`{self.name}`: expert bank for layer {i} `{bank}` not found: looked for `{src.stored_key(base)}_blocks` (MXFP4), "
            f"`{src.stored_key(base)}.weight` (ComfyUI NVFP4) and `{src.stored_key(base)}` (bf16/fp32)."
        )

    # -- internal name -> stored key ---------------------------------------------------------------
    def _plain_key(self, i: int, name: str) -> str:
        if self.layout != "openai":
            return f"layers.{i}.{name}"
        table = {
            "input_layernorm.weight": "attn.norm.scale",
            "post_attention_layernorm.weight": "mlp.norm.scale",
            "self_attn.sinks": "attn.sinks",
            "self_attn.o_proj.weight": "attn.out.weight",
            "self_attn.o_proj.bias": "attn.out.bias",
            "mlp.router.weight": "mlp.gate.weight",
            "mlp.router.bias": "mlp.gate.bias",
        }
        return f"block.{i}.{table[name]}"

    def plain_names(self) -> tuple[str, ...]:
        names = list(NORM_KEYS) + ["self_attn.sinks", "mlp.router.weight", "mlp.router.bias"]
        for lin in ATTN_LINEARS:
            names += [f"self_attn.{lin}.weight", f"self_attn.{lin}.bias"]
        return tuple(names)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Internal name -> logical shape for every tensor the encoder uses (header only).

        Expert banks appear as ``layers.{i}.mlp.experts.{bank}`` [E_x, out, in] and
        ``...{bank}_bias`` [E_x, out]; quantised Linears with their logical [out, in] when known.
        """
        src = self.source
        out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": src.shape(self.embed_key)}
        for i in range(self.num_layers):
            for name in self.plain_names():
                shape = self._plain_shape(i, name)
                if shape is not None:
                    out[f"layers.{i}.{name}"] = shape
            for bank in BANKS:
                spec = self._banks[(i, bank)]
                out[f"layers.{i}.mlp.experts.{bank}"] = self._bank_logical_shape(spec)
                out[f"layers.{i}.mlp.experts.{bank}_bias"] = src.shape(spec.keys["bias"])
        return out

    def _plain_shape(self, i: int, name: str) -> tuple[int, ...] | None:
        src = self.source
        if self.layout == "openai" and name.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            return None  # fused qkv: checked in validate()
        key = self._plain_key(i, name)
        if key not in src:
            return None
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer is not None and layer in self.markers:
            return None  # quantised Linear: checked in validate()
        return src.shape(key)

    def _bank_logical_shape(self, spec: _BankSpec) -> tuple[int, ...]:
        src = self.source
        if spec.format in quant.EXPERT_FORMATS:
            shape = src.shape(spec.keys["codes"])
            if spec.format == "mxfp4":
                if len(shape) != 4 or shape[-1] != 16:
                    raise CheckpointError(f"`{self.name}`: MXFP4 blocks `{src.stored_key(spec.keys['codes'])}` have shape {list(shape)}; expected [E, out, in/32, 16].")
                return (shape[0], shape[1], shape[2] * quant.MX_BLOCK)
            if len(shape) != 3:
                raise CheckpointError(f"`{self.name}`: NVFP4 weight `{src.stored_key(spec.keys['codes'])}` has shape {list(shape)}; expected [E, out, in/2].")
            return (shape[0], shape[1], shape[2] * 2)
        shape = src.shape(spec.keys["weight"])
        if len(shape) != 3:
            raise CheckpointError(f"`{self.name}`: expert bank `{src.stored_key(spec.keys['weight'])}` has shape {list(shape)}; expected 3-D.")
        if spec.format == "dense_io":
            return (shape[0], shape[2], shape[1])
        return tuple(shape)

    def infer_config(self) -> GptOssConfig:
        """The configuration from tensor shapes (for a file without config.json): head_dim 64, and
        the constants no shape shows are the gpt-oss-20b defaults."""
        shapes = self.shapes()
        vocab, hidden = shapes["embed_tokens.weight"]
        heads = shapes["layers.0.self_attn.sinks"][0]
        head_dim = 64
        if "layers.0.self_attn.k_proj.weight" in shapes:
            kv = shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim
        elif self.layout == "openai":
            kv = (self.source.shape("block.0.attn.qkv.weight")[0] - heads * head_dim) // (2 * head_dim)
        else:
            kv = shapes["layers.0.self_attn.k_proj.bias"][0] // head_dim
        experts, two_i, _ = shapes["layers.0.mlp.experts.gate_up_proj"]
        return GptOssConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=two_i // 2,
            num_hidden_layers=self.num_layers, num_attention_heads=heads, num_key_value_heads=kv,
            head_dim=head_dim, num_local_experts=experts, num_experts_per_tok=min(4, experts),
        )

    # -- validation --------------------------------------------------------------------------------
    def validate(self, config: GptOssConfig) -> None:
        """Check every tensor the encoder needs against ``config`` (a GptOssConfig)."""
        src = self.source
        c = config
        if self.num_layers < c.num_hidden_layers:
            raise CheckpointError(f"`{self.name}`: {self.num_layers} decoder layers found, the config says {c.num_hidden_layers}.")
        e, hd = c.hidden_size, c.head_dim
        x, inter = c.num_local_experts, c.intermediate_size
        per_layer = layer_shapes(c)  # from the decoder layer built on the meta device
        expected: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (c.vocab_size, e)}
        for i in range(c.num_hidden_layers):
            expected.update({f"layers.{i}.{name}": shape for name, shape in per_layer.items()})
        have = self.shapes()
        bad, missing = [], []
        for name, shape in expected.items():
            if name not in have:
                if self._is_special(name):
                    continue
                missing.append(name)
            elif tuple(have[name]) != shape:
                bad.append(f"`{name}` is {list(have[name])}, expected {list(shape)}")
        if missing:
            raise CheckpointError(
                f"`{self.name}`: {len(missing)} tensors of gpt-oss are missing: {_msg_keys(missing)} "
                f"(layout `{self.layout}`; is the file complete?)."
            )
        if bad:
            raise CheckpointError(
                f"`{self.name}`: tensor shapes do not match the gpt-oss config "
                f"(hidden {e}, heads {c.num_attention_heads}/{c.num_key_value_heads}x{hd}, experts {x}x{inter}): "
                + "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
            )
        # fused qkv / quantised linears / bank side tensors
        for i in range(c.num_hidden_layers):
            if self.layout == "openai":
                fused = [sum(per_layer[f"self_attn.{lin}.weight"][0] for lin in ("q_proj", "k_proj", "v_proj")), e]
                qkv = src.shape(f"block.{i}.attn.qkv.weight")
                if list(qkv) != fused:
                    raise CheckpointError(f"`{self.name}`: `block.{i}.attn.qkv.weight` is {list(qkv)}, expected {fused}.")
            for lin in ATTN_LINEARS:
                layer = f"layers.{i}.self_attn.{lin}"
                if layer in self.markers:
                    self._check_quant_linear(layer, *per_layer[f"self_attn.{lin}.weight"])
            for bank in BANKS:
                self._check_bank(i, bank, *per_layer[f"mlp.experts.{bank}"])

    def _is_special(self, name: str) -> bool:
        """Names checked elsewhere (fused qkv in the OpenAI layout, quantised Linears)."""
        m = re.match(r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight$", name)
        if m is None:
            m2 = re.match(r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.bias$", name)
            return bool(m2) and self.layout == "openai"
        if self.layout == "openai" and m.group(2) != "o_proj":
            return True
        return f"layers.{m.group(1)}.self_attn.{m.group(2)}" in self.markers

    def _check_quant_linear(self, layer: str, out_f: int, in_f: int) -> None:
        problems = quantised_linear_problems(self.source, layer, self.markers[layer]["format"], out_f, in_f)
        if problems:
            raise CheckpointError(f"`{self.name}`: quantised layer `{self.source.stored_key(layer)}`: " + "; ".join(problems) + ".")

    def _check_bank(self, i: int, bank: str, x: int, out_f: int, in_f: int) -> None:
        src = self.source
        spec = self._banks[(i, bank)]
        if spec.format == "mxfp4":
            s = tuple(src.shape(spec.keys["scales"]))
            if s != (x, out_f, in_f // quant.MX_BLOCK):
                raise CheckpointError(f"`{self.name}`: MXFP4 scales `{src.stored_key(spec.keys['scales'])}` are {list(s)}, expected {[x, out_f, in_f // quant.MX_BLOCK]}.")
        elif spec.format == "nvfp4":
            s = tuple(src.shape(spec.keys["scales"]))
            rp, cp = quant.padded_scale_shape(out_f, in_f // quant.NVFP4_BLOCK)
            if s not in ((x, rp, cp), (x, rp * cp)):
                raise CheckpointError(
                    f"`{self.name}`: NVFP4 block scales `{src.stored_key(spec.keys['scales'])}` are {list(s)}; expected the "
                    f"swizzled {[x, rp, cp]} (or flat {[x, rp * cp]})."
                )
            g = tuple(src.shape(spec.keys["global_scale"]))
            if g not in ((), (1,), (x,)):
                raise CheckpointError(f"`{self.name}`: `{src.stored_key(spec.keys['global_scale'])}` is {list(g)}; expected [{x}] or a scalar.")

    # -- reading -----------------------------------------------------------------------------------
    def _read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.source.read(key, dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows for ``ids`` (any shape) -> ``ids.shape + (E,)`` in the stored dtype (fp32 for fp8)."""
        rows = self.source.read_rows(self.embed_key, ids.cpu())
        marker = self.markers.get("embed_tokens")
        if marker is not None:
            scale = self.source.read("embed_tokens.weight_scale") if "embed_tokens.weight_scale" in self.source else None
            rows = quant.dequantize_float8(rows, scale, torch.float32)
        return rows

    def _read_linear(self, i: int, lin: str, shape: tuple[int, int]) -> dict:
        """Entries of ``self_attn.{lin}``: ``.weight`` and ``.bias`` tensors, or one QuantLinear."""
        layer = f"layers.{i}.self_attn.{lin}"
        marker = self.markers.get(layer)
        src = self.source
        bias = self._read(self._plain_key(i, f"self_attn.{lin}.bias"))
        if marker is None:
            return {f"self_attn.{lin}.weight": self._read(self._plain_key(i, f"self_attn.{lin}.weight")),
                    f"self_attn.{lin}.bias": bias}
        out_f, in_f = shape
        scale2 = self._read(f"{layer}.weight_scale_2") if f"{layer}.weight_scale_2" in src else None
        return {f"self_attn.{lin}": QuantLinear.from_stored(marker["format"], in_f, out_f, self._read(f"{layer}.weight"),
                                                            self._read(f"{layer}.weight_scale"), bias, scale2)}

    def read_layer(self, i: int, config) -> LayerWeights:
        """Read decoder layer ``i`` from the file (views of the file's map, stored dtypes)."""
        with self.source.reading():
            return self._read_layer(i, config)

    def _read_layer(self, i: int, config) -> LayerWeights:
        t: dict = {}
        shapes = layer_shapes(config)
        for name in NORM_KEYS + ("self_attn.sinks", "mlp.router.weight", "mlp.router.bias"):
            t[name] = self._read(self._plain_key(i, name))
        if self.layout == "openai":
            q, kv = shapes["self_attn.q_proj.weight"][0], shapes["self_attn.k_proj.weight"][0]
            w = self._read(f"block.{i}.attn.qkv.weight")
            b = self._read(f"block.{i}.attn.qkv.bias")
            for lin, (a, z) in (("q_proj", (0, q)), ("k_proj", (q, q + kv)), ("v_proj", (q + kv, q + 2 * kv))):
                t[f"self_attn.{lin}.weight"] = w[a:z].clone()
                t[f"self_attn.{lin}.bias"] = b[a:z].clone()
            del w, b
            t["self_attn.o_proj.weight"] = self._read(self._plain_key(i, "self_attn.o_proj.weight"))
            t["self_attn.o_proj.bias"] = self._read(self._plain_key(i, "self_attn.o_proj.bias"))
        else:
            for lin in ATTN_LINEARS:
                t.update(self._read_linear(i, lin, shapes[f"self_attn.{lin}.weight"]))
        for bank in BANKS:
            t[f"mlp.experts.{bank}"] = self.read_bank(i, bank)
        return LayerWeights(i, t)

    def read_bank(self, i: int, bank: str) -> ExpertBank:
        spec = self._banks[(i, bank)]
        src = self.source
        x, out_f, in_f = self._bank_logical_shape(spec)
        bias = self._read(spec.keys["bias"])
        name = src.stored_key(spec.keys.get("codes") or spec.keys.get("weight"))
        if spec.format == "mxfp4":
            codes = self._read(spec.keys["codes"]).reshape(x, out_f, in_f // 2)
            return ExpertBank("mxfp4", x, out_f, in_f, bias, codes=codes, scales=self._read(spec.keys["scales"]), name=name)
        if spec.format == "nvfp4":
            scales = self._read(spec.keys["scales"])
            if scales.dtype != torch.uint8:
                scales = scales.view(torch.uint8)
            g = self._read(spec.keys["global_scale"], torch.float32)
            return ExpertBank("nvfp4", x, out_f, in_f, bias, codes=self._read(spec.keys["codes"]), scales=scales,
                              global_scale=g, name=name)
        return ExpertBank(spec.format, x, out_f, in_f, bias, weight=self._read(spec.keys["weight"]), name=name)

    def layer_nbytes(self, i: int) -> int:
        """Stored bytes of layer ``i`` (what a stream read moves)."""
        src = self.source
        total = 0
        prefix = f"block.{i}." if self.layout == "openai" else f"layers.{i}."
        for k in src.keys():
            if k.startswith(prefix):
                total += src.info(k).nbytes
        return total


def find_gpt_oss_config_json(source: TensorSource) -> dict | None:
    """``source.config`` or, for a single file, a gpt-oss ``config.json`` beside it (HF or OpenAI
    ``original/config.json`` format; other models' configs are ignored)."""
    if source.config:
        return source.config
    cfg = source.root / "config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError):
            return None
        if isinstance(data, dict) and (data.get("model_type") == "gpt_oss" or {"num_experts", "experts_per_token"} <= set(data)):
            return data  # HF gpt-oss config, or OpenAI's original/config.json
    return None


__all__ = [
    "LAYOUTS",
    "LayerWeights",
    "GptOssCheckpoint",
    "find_gpt_oss_config_json",
]
