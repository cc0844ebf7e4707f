"""A tiny Wan2.2 T2V-A14B model set: the diffusers folder layout of `Wan2.2-T2V-A14B-Diffusers`
(transformer/ = high-noise expert, transformer_2/ = low-noise expert, boundary_ratio in
model_index.json) and the same weights as ComfyUI single files (`wan2.2_t2v_high_noise_14B`- and
`..._low_noise_14B`-style DiTs next to the Wan2.1 VAE and UMT5).

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

BOUNDARY, I2V_BOUNDARY = 0.875, 0.9
# I2V-A14B's experts: 36 input channels (noise 16 + mask 4 + image latent 16) and no CLIP layers.
TINY_I2V_A14B = dataclasses.replace(tiny_dit.TINY_DIT, in_channels=36)
I2V_INDEX = {**MODEL_INDEX, "_class_name": "WanImageToVideoPipeline", "image_encoder": [None, None],
             "image_processor": [None, None]}


def build_a14b_set(root: str, seed: int = 0, boundary: float = BOUNDARY, i2v: bool = False) -> dict:
    """Write root/diffusers (folder) and root/comfy_fp32 (single files); return their paths.
    i2v: the I2V-A14B layout (WanImageToVideoPipeline, 36-channel experts, boundary 0.9 by default)."""
    if i2v and boundary == BOUNDARY:
        boundary = I2V_BOUNDARY
    cfg, kind = (TINY_I2V_A14B, "i2v") if i2v else (tiny_dit.TINY_DIT, "t2v")
    folder = os.path.join(root, "diffusers")
    high = tiny_dit.diffusers_transformer(cfg, seed=seed)
    low = tiny_dit.diffusers_transformer(cfg, seed=seed + 10)  # another expert, same shape
    high.save_pretrained(os.path.join(folder, "transformer"))
    low.save_pretrained(os.path.join(folder, "transformer_2"))
    umt5 = tiny_te.random_umt5(d_model=tiny_dit.TINY_DIT.text_dim, seed=seed + 1)
    tiny_te.save_diffusers(umt5, folder)
    vae = tiny_vae.diffusers_vae(base_dim=8, seed=seed + 2)
    vae.save_pretrained(os.path.join(folder, "vae"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({**UNIPC_CONFIG, "flow_shift": 5.0 if i2v else 12.0}, f, indent=1)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({**(I2V_INDEX if i2v else MODEL_INDEX), "transformer_2": ["diffusers", "WanTransformer3DModel"],
                   "boundary_ratio": boundary, "expand_timesteps": False}, f, indent=1)
    d = os.path.join(root, "comfy_fp32")
    out: dict[str, Any] = {"folder": folder, "comfy_fp32": {
        "model": tiny_dit.save_original(tiny_dit.diffusers_to_original(high.state_dict()),
                                        os.path.join(d, f"wan2.2_{kind}_high_noise_tiny.safetensors"), dtype=None),
        "low_noise_model": tiny_dit.save_original(tiny_dit.diffusers_to_original(low.state_dict()),
                                                  os.path.join(d, f"wan2.2_{kind}_low_noise_tiny.safetensors"),
                                                  dtype=None),
        "text_encoder": tiny_te.save_comfy(umt5, os.path.join(d, "umt5_tiny.safetensors"), dtype=torch.float32),
        "vae": tiny_vae.save_original(tiny_vae.diffusers_to_original(vae.state_dict()),
                                      os.path.join(d, "wan_2.1_vae_tiny.safetensors"), dtype=torch.float32),
    }}
    return out
