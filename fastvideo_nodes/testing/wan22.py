"""A tiny Wan2.2 TI2V-5B model set: the diffusers folder layout of `Wan2.2-TI2V-5B-Diffusers`
(transformer/ with 48 channels, vae/ with the 2.2 VAE, text_encoder/, tokenizer/, scheduler/) and
the same weights as ComfyUI single files (`wan2.2_ti2v_5B_fp16`-style DiT, `wan2.2_vae`).

Test-only: the diffusers side is built with diffusers itself.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

from . import dit as tiny_dit
from . import text_encoder as tiny_te
from . import vae as tiny_vae
from .folders import MODEL_INDEX, UNIPC_CONFIG

# The 5B's shape (dim 3072 = 24 heads of 128, 30 layers, 48 channels) shrunk; the channels stay 48.
TINY_TI2V = dataclasses.replace(tiny_dit.TINY_DIT, in_channels=48, out_channels=48)


def build_wan22_set(root: str, seed: int = 0) -> dict:
    """Write root/diffusers (folder) and root/comfy_fp32 (single files); return their paths."""
    folder = os.path.join(root, "diffusers")
    transformer = tiny_dit.diffusers_transformer(TINY_TI2V, seed=seed)
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    umt5 = tiny_te.random_umt5(d_model=TINY_TI2V.text_dim, seed=seed + 1)
    tiny_te.save_diffusers(umt5, folder)
    vae = tiny_vae.diffusers_vae22(seed=seed + 2)
    vae.save_pretrained(os.path.join(folder, "vae"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({**UNIPC_CONFIG, "flow_shift": 5.0}, f, indent=1)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({**MODEL_INDEX, "expand_timesteps": True, "boundary_ratio": None,
                   "transformer_2": [None, None]}, f, indent=1)
    d = os.path.join(root, "comfy_fp32")
    out: dict[str, Any] = {"folder": folder, "comfy_fp32": {
        "model": tiny_dit.save_original(tiny_dit.diffusers_to_original(transformer.state_dict()),
                                        os.path.join(d, "wan2.2_ti2v_tiny.safetensors"), dtype=None),
        "text_encoder": tiny_te.save_comfy(umt5, os.path.join(d, "umt5_tiny.safetensors"), dtype=torch.float32),
        "vae": tiny_vae.save_original(tiny_vae.diffusers22_to_original(vae.state_dict()),
                                      os.path.join(d, "wan2.2_vae_tiny.safetensors")),
    }}
    return out
