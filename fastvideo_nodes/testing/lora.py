"""Random Wan LoRAs in the lightx2v / CausVid release layout, for tests and benches.

Keys: `diffusion_model.blocks.N.<module>.lora_down.weight` [rank, in], `.lora_up.weight`
[out, rank] and `.alpha` for every linear of every block, which is how the step/CFG-distill LoRAs
ship (Kijai/WanVideo_comfy). Shapes come from the DiT config alone, so a 14B LoRA can be written
without loading the 14B model.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from ..models.wan_dit import WanDiTConfig

BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def linear_shapes(cfg: WanDiTConfig) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} of every linear in the blocks."""
    out = {}
    for b in range(cfg.num_layers):
        for m in BLOCK_LINEARS:
            out[f"blocks.{b}.{m}"] = ((cfg.ffn_dim, cfg.dim) if m == "ffn.0" else
                                      (cfg.dim, cfg.ffn_dim) if m == "ffn.2" else (cfg.dim, cfg.dim))
    return out


def save_random_lora(cfg: WanDiTConfig, path: str, *, rank: int = 4, alpha: float | None = None, seed: int = 0,
                     scale: float = 0.05, dtype: torch.dtype = torch.float32) -> str:
    """Write a random rank-`rank` LoRA for a DiT of this config; alpha None: alpha = rank."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (o, i) in linear_shapes(cfg).items():
        key = f"diffusion_model.{name}"
        sd[f"{key}.lora_down.weight"] = (torch.randn(rank, i, generator=g) * scale).to(dtype)
        sd[f"{key}.lora_up.weight"] = (torch.randn(o, rank, generator=g) * scale).to(dtype)
        sd[f"{key}.alpha"] = torch.tensor(float(rank if alpha is None else alpha), dtype=dtype)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path)
    return path
