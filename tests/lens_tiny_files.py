"""Small model files for command-line and pipeline tests (written on the fly, never committed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GOLDEN = Path(__file__).parent / "fixtures/golden/lens_tiny"


def write_tiny_text_encoder(out: Path, hidden: int = 32, vocab_size: int = 201088) -> Path:
    """A seeded random gpt-oss folder (``model.safetensors`` + ``config.json``) that fits the golden
    tiny DiT: the golden text-encoder configuration with ``hidden_size`` 32 (the DiT's
    ``enc_hidden_dim``) and, by default, the full o200k_harmony vocabulary (the harmony template
    needs ids up to ~200k; header-only checks work with a smaller one)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((GOLDEN / "text_encoder/config.json").read_text())
    heads, kv, hd, inter, ne = (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
                                cfg["intermediate_size"], cfg["num_local_experts"])
    cfg.update(hidden_size=hidden, vocab_size=vocab_size)
    g = torch.Generator().manual_seed(0)

    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    sd = {"model.embed_tokens.weight": r(vocab_size, hidden, std=1.0), "model.norm.weight": torch.ones(hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": 1 + r(hidden), p + "post_attention_layernorm.weight": 1 + r(hidden),
            p + "self_attn.q_proj.weight": r(heads * hd, hidden), p + "self_attn.q_proj.bias": r(heads * hd),
            p + "self_attn.k_proj.weight": r(kv * hd, hidden), p + "self_attn.k_proj.bias": r(kv * hd),
            p + "self_attn.v_proj.weight": r(kv * hd, hidden), p + "self_attn.v_proj.bias": r(kv * hd),
            p + "self_attn.o_proj.weight": r(hidden, heads * hd), p + "self_attn.o_proj.bias": r(hidden),
            p + "self_attn.sinks": r(heads),
            p + "mlp.router.weight": r(ne, hidden), p + "mlp.router.bias": r(ne),
            p + "mlp.experts.gate_up_proj": r(ne, hidden, 2 * inter),
            p + "mlp.experts.gate_up_proj_bias": r(ne, 2 * inter),
            p + "mlp.experts.down_proj": r(ne, inter, hidden), p + "mlp.experts.down_proj_bias": r(ne, hidden),
        })
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def write_broken_transformer(out: Path, drop: str = "transformer_blocks.1.img_mlp.w2.weight") -> Path:
    """The golden tiny DiT as one ``.safetensors`` file with the tensor ``drop`` left out."""
    sd = load_file(str(GOLDEN / "transformer/diffusion_pytorch_model.safetensors"))
    del sd[drop]
    save_file(sd, str(out))
    return out


def write_flux1_vae(out: Path) -> Path:
    """A header-level stand-in for a FLUX.1 VAE: 16 latent channels, no ``bn`` statistics."""
    save_file({"decoder.conv_in.weight": torch.zeros(8, 16, 3, 3),
               "decoder.up.0.block.0.norm1.weight": torch.zeros(8),
               "encoder.down.0.block.0.norm1.weight": torch.zeros(8)}, str(out))
    return out
