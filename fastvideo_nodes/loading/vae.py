"""Load the Wan 2.1 VAE from `wan_2.1_vae.safetensors` (original names) or a diffusers `vae/` folder.

Steps: locate → header → config from shapes (bounded) → materialize.
"""
from __future__ import annotations

import os

import torch

from ..errors import ModelFileError
from ..models.wan_vae import WanVAE, WanVAEConfig
from . import detect
from .bounds import bounded, need
from .keymaps import is_diffusers_vae, vae_name
from .locate import locate
from .materialize import Source, materialize, role_of

ROLE = "VAE"


def _check_diffusers_config(config: dict, role: str) -> None:
    z_dim = config.get("z_dim", 16)
    if config.get("is_residual") or z_dim != 16 or config.get("patch_size"):
        raise ModelFileError(f"{role} is a Wan2.2 VAE (or not a Wan VAE: z_dim {z_dim!r}), which is not supported "
                             "yet; use the Wan 2.1 VAE (wan_2.1_vae.safetensors).")


def config_from_shapes(shapes: dict[str, tuple], role: str = ROLE) -> WanVAEConfig:
    """Base width and latent channels; both halves must be there (a decoder-only file is refused)."""
    for part in ("encoder", "decoder"):
        if not any(n.startswith(part + ".") for n in shapes):
            raise ModelFileError(f"{role}: the file has no {part} (no tensor named {part}.*); the VAE needs both "
                                 "halves, encoder and decoder. Use the full wan_2.1_vae.safetensors.")
    cfg = WanVAEConfig(base_dim=need(shapes, "encoder.conv1.weight", role, "the encoder's first convolution")[0],
                       z_dim=need(shapes, "conv2.weight", role, "the post-quantisation convolution (conv2)")[0])
    bounded(role, channels=cfg.base_dim)
    bounded(role, channels=cfg.z_dim)
    return cfg


def load_vae(path: str, *, device="cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    path = os.fspath(path)
    where = locate(path, "vae")
    role = role_of(ROLE, path)
    source = Source(where.files, role)
    detect.expect_kind(source.header, ("wan_vae",), ROLE, path)
    source.prefix, names = detect.strip_prefix(source.header)
    if where.config is not None:
        _check_diffusers_config(where.config, role)
    if is_diffusers_vae(names):
        source.rename = vae_name
    cfg = config_from_shapes(source.shapes(), role)
    with torch.device("meta"):
        vae = WanVAE(cfg)
    materialize(vae, source, role=role, dtype=dtype, device=device)
    return vae
