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


# -- Wan 2.2 (48 channels, residual stages, 2×2 pixel folding)

def tiny_wan22_config(base_dim: int = 8, decoder_base_dim: int = 12) -> WanVAEConfig:
    """The Wan 2.2 VAE's architecture at a tiny width (the real one: 160 / 256)."""
    return WanVAEConfig(base_dim=base_dim, decoder_base_dim=decoder_base_dim, z_dim=48, residual=True, patch_size=2)


def diffusers_vae22(base_dim: int = 8, decoder_base_dim: int = 12, seed: int = 0):
    """diffusers AutoencoderKLWan with the Wan 2.2 config at a tiny width, seeded random weights. Test-only."""
    from diffusers import AutoencoderKLWan

    from ..models.wan_vae import LATENT_MEAN_22, LATENT_STD_22
    vae: Any = AutoencoderKLWan(base_dim=base_dim, decoder_base_dim=decoder_base_dim, z_dim=48, is_residual=True,
                                in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                                scale_factor_temporal=4, temperal_downsample=[False, True, True],
                                latents_mean=LATENT_MEAN_22, latents_std=LATENT_STD_22)
    return randomize_(vae, seed, scale=0.1).eval()


def diffusers22_to_original(state_dict: dict) -> dict:
    return {diffusers_to_wan_name(k, residual=True): v for k, v in state_dict.items()}
