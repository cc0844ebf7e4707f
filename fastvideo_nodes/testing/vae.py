"""Tiny random Wan 2.1 VAEs in both file layouts."""
from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import save_file

from ..loading.keymaps import vae_name as diffusers_to_wan_name
from ..models.wan_vae import WanVAE, WanVAEConfig
from .dit import randomize_


def random_vae(base_dim: int = 8, seed: int = 0) -> WanVAE:
    """Our own VAE with seeded random weights (fp32, CPU); needs no diffusers."""
    return randomize_(WanVAE(WanVAEConfig(base_dim=base_dim)), seed, scale=0.1).eval()


def save_original(state_dict: dict, path: str, dtype: torch.dtype | None = None) -> str:
    """Original-named single file, as `wan_2.1_vae.safetensors`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: (v.to(dtype) if dtype else v).contiguous() for k, v in state_dict.items()}, path)
    return path


def diffusers_vae(base_dim: int = 8, seed: int = 0):
    """diffusers AutoencoderKLWan of the same architecture with seeded random weights. Test-only."""
    from diffusers import AutoencoderKLWan
    vae: Any = AutoencoderKLWan(base_dim=base_dim, z_dim=16)  # diffusers' classes are not typed as nn.Module
    return randomize_(vae, seed, scale=0.1).eval()


def diffusers_to_original(state_dict: dict) -> dict:
    return {diffusers_to_wan_name(k): v for k, v in state_dict.items()}
