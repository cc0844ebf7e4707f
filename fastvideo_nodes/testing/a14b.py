"""A tiny Wan2.2 T2V-A14B model set: the diffusers folder layout of `Wan2.2-T2V-A14B-Diffusers`
(transformer/ = high-noise expert, transformer_2/ = low-noise expert, boundary_ratio in
model_index.json) and the same weights as ComfyUI single files (`wan2.2_t2v_high_noise_14B`- and
`..._low_noise_14B`-style DiTs next to the Wan2.1 VAE and UMT5).

Test-only: the diffusers side is built with diffusers itself.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from . import dit as tiny_dit
from .folders import MODEL_INDEX, UNIPC_CONFIG, build_model_set

BOUNDARY, I2V_BOUNDARY = 0.875, 0.9
# I2V-A14B's experts: 36 input channels (noise 16 + mask 4 + image latent 16) and no CLIP layers.
TINY_I2V_A14B = dataclasses.replace(tiny_dit.TINY_DIT, in_channels=36)
I2V_INDEX = {**MODEL_INDEX, "_class_name": "WanImageToVideoPipeline", "image_encoder": [None, None],
             "image_processor": [None, None]}


def build_a14b_set(root: str, seed: int = 0, boundary: float = BOUNDARY, i2v: bool = False) -> dict:
    """Write root/diffusers (folder) and root/comfy, root/comfy_fp32 (single files); return their paths.
    i2v: the I2V-A14B layout (WanImageToVideoPipeline, 36-channel experts, boundary 0.9 by default)."""
    if i2v and boundary == BOUNDARY:
        boundary = I2V_BOUNDARY
    cfg, kind = (TINY_I2V_A14B, "i2v") if i2v else (tiny_dit.TINY_DIT, "t2v")
    high = tiny_dit.diffusers_transformer(cfg, seed=seed)
    low = tiny_dit.diffusers_transformer(cfg, seed=seed + 10)  # another expert, same shape
    index = {**(I2V_INDEX if i2v else MODEL_INDEX), "transformer_2": ["diffusers", "WanTransformer3DModel"],
             "boundary_ratio": boundary, "expand_timesteps": False}
    out = build_model_set(root, seed, transformer=high, model_name=f"wan2.2_{kind}_high_noise_tiny.safetensors",
                          model_index=index, scheduler={**UNIPC_CONFIG, "flow_shift": 5.0 if i2v else 12.0})
    low.save_pretrained(os.path.join(out["folder"], "transformer_2"))
    for name, dtype in (("comfy", torch.float16), ("comfy_fp32", torch.float32)):
        out[name]["low_noise_model"] = tiny_dit.save_original(
            tiny_dit.diffusers_to_original(low.state_dict()),
            os.path.join(root, name, f"wan2.2_{kind}_low_noise_tiny.safetensors"), dtype=dtype)
    return out
