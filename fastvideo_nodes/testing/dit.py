"""Tiny random Wan DiTs in the real file layouts.

The width stays a multiple of 128 (two heads of 128) because single files carry no head count and
Wan's convention is head_dim 128; everything else is shrunk.
"""
from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file

from ..loading.keymaps import dit_name as diffusers_to_wan_name
from ..models.wan_dit import WanDiT, WanDiTConfig

TINY_DIT = WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32)


M = TypeVar("M", bound=torch.nn.Module)


def randomize_(module: M, seed: int = 0, scale: float = 0.05) -> M:
    """Fill every parameter with seeded noise; norm weights around 1 so the network stays tame."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            center = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(noise + center)
    return module


def random_dit(cfg: WanDiTConfig = TINY_DIT, seed: int = 0) -> WanDiT:
    """Our own DiT with seeded random weights (fp32, CPU); needs no diffusers."""
    return randomize_(WanDiT(cfg), seed).eval()


def save_original(state_dict: dict, path: str, dtype: torch.dtype | None = torch.float16, prefix: str = "") -> str:
    """Write an original/ComfyUI-named single file (optionally with `model.diffusion_model.`)."""
    sd = {prefix + k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
          for k, v in state_dict.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path)
    return path


def quantize_fp8(state_dict: dict, fp8: torch.dtype = torch.float8_e4m3fn, scaled: bool = False) -> dict:
    """Linear weights (2-D) to fp8, the rest fp16. scaled=True writes ComfyUI "scaled fp8":
    a per-layer `scale_weight` (absmax / fp8 max) and the `scaled_fp8` marker tensor."""
    out = {}
    fmax = torch.finfo(fp8).max
    for k, v in state_dict.items():
        if v.ndim == 2 and k.endswith(".weight"):
            if scaled:
                scale = v.float().abs().max().clamp(min=1e-12) / fmax
                out[k] = (v.float() / scale).to(fp8)
                out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
            else:
                out[k] = v.to(fp8)
        else:
            out[k] = v.to(torch.float16) if v.is_floating_point() else v
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=fp8)
    return out


def diffusers_transformer(cfg: WanDiTConfig = TINY_DIT, seed: int = 0):
    """A diffusers WanTransformer3DModel of the same architecture with seeded random weights.

    Test-only: imports diffusers.
    """
    from diffusers import WanTransformer3DModel

    m: Any = WanTransformer3DModel(  # diffusers' classes are not typed as nn.Module
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps)
    return randomize_(m, seed).eval()


def diffusers_to_original(state_dict: dict) -> dict:
    """Rename a diffusers transformer state dict to the original Wan names."""
    return {diffusers_to_wan_name(k): v for k, v in state_dict.items()}
