"""The built-in demo model: tiny, fixed random weights, ComfyUI single-file layout, cached."""
from __future__ import annotations

import os

import torch

from . import cache_dir
from .dit import TINY_DIT, random_dit, save_original
from .text_encoder import random_umt5, save_comfy
from .vae import random_vae
from .vae import save_original as save_vae

VERSION = "v1"


def demo_files() -> dict:
    """Paths of the demo DiT, text encoder and VAE files, built on first use (a few seconds)."""
    d = os.path.join(cache_dir(), f"demo_{VERSION}")
    files = {"model": os.path.join(d, "wan2.1_t2v_demo_fp16.safetensors"),
             "text_encoder": os.path.join(d, "umt5_demo_fp16.safetensors"),
             "vae": os.path.join(d, "wan_2.1_vae_demo.safetensors")}
    if all(os.path.exists(p) for p in files.values()):
        return files
    tmp = {k: v + f".{os.getpid()}.tmp" for k, v in files.items()}
    save_original(random_dit(TINY_DIT, seed=0).state_dict(), tmp["model"], dtype=torch.float16)
    save_comfy(random_umt5(d_model=TINY_DIT.text_dim, seed=1), tmp["text_encoder"], dtype=torch.float16)
    save_vae(random_vae(base_dim=8, seed=2).state_dict(), tmp["vae"], dtype=torch.float16)
    for k in files:  # rename last, so an interrupted build is never mistaken for a finished one
        os.replace(tmp[k], files[k])
    return files
