"""Load a Wan VAE — 2.1 (`wan_2.1_vae.safetensors`) or the 48-channel 2.2 (`wan2.2_vae.safetensors`),
original/ComfyUI names or a diffusers `vae/` folder.

Steps: locate → header → config from shapes (bounded) → materialize.
"""
from __future__ import annotations

import functools
import os

import torch

from ..errors import ModelFileError
from ..models.wan_vae import WanVAE, WanVAEConfig
from . import detect
from .bounds import bounded, need
from .keymaps import is_diffusers_vae, is_residual_vae, vae_name
from .materialize import materialize, open_component

ROLE = "VAE"


def _check_diffusers_config(config: dict, role: str) -> None:
    """The two known Wan VAEs: 2.1 (16 channels, no patch) and 2.2 (residual, 48 channels, patch 2)."""
    z_dim, residual, patch = config.get("z_dim", 16), bool(config.get("is_residual")), config.get("patch_size")
    if (z_dim, residual, patch or 1) not in ((16, False, 1), (48, True, 2)):
        raise ModelFileError(f"{role}: config.json describes z_dim {z_dim!r}, is_residual {residual}, patch_size "
                             f"{patch!r}; a Wan VAE is either 2.1 (z_dim 16, not residual, no patch) or 2.2 "
                             "(z_dim 48, is_residual true, patch_size 2).")


def config_from_shapes(shapes: dict[str, tuple], role: str = ROLE) -> WanVAEConfig:
    """Base width and latent channels; both halves must be there (a decoder-only file is refused)."""
    for part in ("encoder", "decoder"):
        if not any(n.startswith(part + ".") for n in shapes):
            raise ModelFileError(f"{role}: the file has no {part} (no tensor named {part}.*); the VAE needs both "
                                 "halves, encoder and decoder. Use the full wan_2.1_vae.safetensors.")
    conv_in = need(shapes, "encoder.conv1.weight", role, "the encoder's first convolution")
    z_dim = need(shapes, "conv2.weight", role, "the post-quantisation convolution (conv2)")[0]
    if not is_residual_vae(shapes):
        cfg = WanVAEConfig(base_dim=conv_in[0], z_dim=z_dim)
    else:  # Wan 2.2: 2×2-folded pixels in, a decoder of its own width, time downsampling per stage
        cfg = WanVAEConfig(base_dim=conv_in[0], z_dim=z_dim, residual=True, patch_size=2,
                           decoder_base_dim=need(shapes, "decoder.head.2.weight", role, "the decoder's output")[1],
                           temporal_downsample=tuple(f"encoder.downsamples.{i}.downsamples.2.time_conv.weight" in shapes
                                                     for i in range(3)))
        if conv_in[1] != cfg.image_channels or z_dim != 48:
            raise ModelFileError(f"{role}: a Wan 2.2 VAE takes {cfg.image_channels} input channels (RGB folded 2×2) "
                                 f"and has 48 latent channels; this file has {conv_in[1]} and {z_dim}. It is not a "
                                 "Wan 2.2 VAE, or it is damaged.")
    bounded(role, channels=cfg.base_dim)
    bounded(role, channels=cfg.decoder_base_dim or cfg.base_dim)
    bounded(role, channels=cfg.z_dim)
    return cfg


def load_vae(path: str, *, device="cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    path = os.fspath(path)
    where, source, _ = open_component(path, "vae", ROLE, ("wan_vae", "wan22_vae"))
    role = source.role
    source.prefix, names = detect.strip_prefix(source.header)
    if where.config is not None:
        _check_diffusers_config(where.config, role)
    if is_diffusers_vae(names):
        source.rename = functools.partial(vae_name, residual=is_residual_vae(names))
    cfg = config_from_shapes(source.shapes(), role)
    with torch.device("meta"):
        vae = WanVAE(cfg)
    materialize(vae, source, role=role, dtype=dtype, device=device)
    return vae
