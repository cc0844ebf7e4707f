"""Complete tiny model sets from one set of weights: a diffusers folder that diffusers'
`WanPipeline.from_pretrained` loads, and the same weights as ComfyUI single files.

Test-only: the diffusers side is built with diffusers itself.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from . import dit as tiny_dit
from . import text_encoder as tiny_te
from . import vae as tiny_vae

UNIPC_CONFIG = {
    "_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction", "use_flow_sigmas": True,
    "flow_shift": 3.0, "num_train_timesteps": 1000, "solver_order": 2, "solver_type": "bh2", "predict_x0": True,
    "lower_order_final": True, "final_sigmas_type": "zero", "timestep_spacing": "linspace",
}
MODEL_INDEX = {
    "_class_name": "WanPipeline",
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}


def build_model_set(root: str, seed: int = 0, *, transformer=None, model_name: str = "wan2.1_t2v_tiny.safetensors",
                    model_index: dict | None = None, scheduler: dict | None = None) -> dict:
    """Write root/diffusers (folder), root/comfy (fp16 single files), root/comfy_fp32; return their paths.
    transformer: a diffusers WanTransformer3DModel to write (default: the tiny T2V one); model_index and
    scheduler: that folder's model_index.json and scheduler config (default: Wan2.1 T2V's)."""
    folder = os.path.join(root, "diffusers")
    if transformer is None:
        transformer = tiny_dit.diffusers_transformer(tiny_dit.TINY_DIT, seed=seed)
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    umt5 = tiny_te.random_umt5(d_model=transformer.config.text_dim, seed=seed + 1)
    tiny_te.save_diffusers(umt5, folder)
    vae = tiny_vae.diffusers_vae(base_dim=8, seed=seed + 2)
    vae.save_pretrained(os.path.join(folder, "vae"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler or UNIPC_CONFIG, f, indent=1)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(model_index or MODEL_INDEX, f, indent=1)

    out: dict[str, Any] = {"folder": folder}
    for name, dtype in (("comfy", torch.float16), ("comfy_fp32", torch.float32)):
        d = os.path.join(root, name)
        out[name] = {
            "model": tiny_dit.save_original(tiny_dit.diffusers_to_original(transformer.state_dict()),
                                            os.path.join(d, model_name), dtype=dtype),
            "text_encoder": tiny_te.save_comfy(umt5, os.path.join(d, "umt5_tiny.safetensors"), dtype=dtype),
            "vae": tiny_vae.save_original(tiny_vae.diffusers_to_original(vae.state_dict()),
                                          os.path.join(d, "wan_2.1_vae_tiny.safetensors"), dtype=dtype),
        }
    return out
