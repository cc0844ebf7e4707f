"""Tiny random Wan2.1 image-to-video model sets in the real file layouts.

- a diffusers folder that diffusers' `WanImageToVideoPipeline.from_pretrained` loads (transformer/
  with the image branch, image_encoder/ CLIPVisionModel, image_processor/, text_encoder/, tokenizer/,
  vae/, scheduler/);
- the same weights as Comfy-Org single files (wan2.1_i2v DiT in original names, clip_vision_h-style
  CLIP file with transformers names and its projection head, UMT5, VAE).
Test-only: the diffusers side is built with diffusers and transformers themselves.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

import torch
from safetensors.torch import save_file

from . import dit as tiny_dit
from .folders import build_model_set

# CLIP: 2 heads of 80 (the ViT-H head size the single-file loader assumes), 56×56 images in 14-pixel
# patches → 16 patches + the class token = 17 tokens (the real encoder gives 257 of width 1280).
CLIP_WIDTH, CLIP_IMAGE, CLIP_PATCH = 160, 56, 14
CLIP_TOKENS = (CLIP_IMAGE // CLIP_PATCH) ** 2 + 1
TINY_I2V = replace(tiny_dit.TINY_DIT, in_channels=36, image_dim=CLIP_WIDTH)
# What diffusers' Wan2.1-I2V image_processor/preprocessor_config.json holds, at the tiny size.
PROCESSOR_CONFIG = {
    "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": CLIP_IMAGE},
    "resample": 3, "do_center_crop": True, "crop_size": {"height": CLIP_IMAGE, "width": CLIP_IMAGE},
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}
MODEL_INDEX = {
    "_class_name": "WanImageToVideoPipeline",
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
    "image_encoder": ["transformers", "CLIPVisionModel"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
}


def random_clip_vision(seed: int = 0, layers: int = 3):
    """transformers CLIPVisionModel (ViT-H layout, tiny) with seeded random weights (fp32)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=layers,
                           num_attention_heads=CLIP_WIDTH // 80, image_size=CLIP_IMAGE, patch_size=CLIP_PATCH,
                           hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=64)
    model: Any = CLIPVisionModel(cfg)
    return tiny_dit.randomize_(model, seed, scale=0.1).eval()


def save_clip_comfy(model, path: str, dtype: torch.dtype | None = torch.float16, seed: int = 0) -> str:
    """clip_vision_h.safetensors layout: transformers names plus the projection head Wan does not use."""
    sd = {("" if k.startswith("vision_model.") else "vision_model.") + k: v
          for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    g = torch.Generator().manual_seed(seed)
    sd["visual_projection.weight"] = torch.randn(64, CLIP_WIDTH, generator=g)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: (v.to(dtype) if dtype else v).contiguous() for k, v in sd.items()}, path)
    return path


def save_clip_diffusers(model, root: str) -> str:
    """root/image_encoder (save_pretrained) and root/image_processor (preprocessor_config.json)."""
    model.save_pretrained(os.path.join(root, "image_encoder"))
    os.makedirs(os.path.join(root, "image_processor"), exist_ok=True)
    with open(os.path.join(root, "image_processor", "preprocessor_config.json"), "w") as f:
        json.dump(PROCESSOR_CONFIG, f, indent=1)
    return root


def diffusers_i2v_transformer(cfg=TINY_I2V, seed: int = 0):
    """diffusers WanTransformer3DModel with the image branch (as Wan2.1-I2V-14B-*-Diffusers: added
    key/value projections of the DiT width), seeded random weights."""
    from diffusers import WanTransformer3DModel
    m: Any = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim)
    return tiny_dit.randomize_(m, seed).eval()


def build_i2v_model_set(root: str, seed: int = 0) -> dict:
    """Write root/diffusers (folder) and root/comfy, root/comfy_fp32 (single files); return their paths."""
    out = build_model_set(root, seed, transformer=diffusers_i2v_transformer(TINY_I2V, seed=seed),
                          model_name="wan2.1_i2v_tiny.safetensors", model_index=MODEL_INDEX)
    clip = random_clip_vision(seed=seed + 3)
    save_clip_diffusers(clip, out["folder"])
    for name, dtype in (("comfy", torch.float16), ("comfy_fp32", torch.float32)):
        out[name]["image_encoder"] = save_clip_comfy(clip, os.path.join(root, name, "clip_vision_tiny.safetensors"),
                                                     dtype=dtype)
    return out
