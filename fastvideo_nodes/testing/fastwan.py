"""Tiny random FastWan models: Wan DiTs with the extra per-block `to_gate_compress` projection that
FastWan's video-sparse-attention distillation adds, in its diffusers layout and in ours.

FastWan's diffusers transformer is a WanTransformer3DModel plus `blocks.N.attn1.to_gate_compress`
(Linear dim → dim, with bias). The gate weights get a larger scale than the rest so that the gated
compressed branch moves the output measurably in tests.

Test-only: the diffusers side is built with diffusers itself.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors.torch import load_file, save_file

from ..models.wan_dit import SelfAttention, WanDiT, WanDiTConfig
from . import dit as tiny_dit
from . import text_encoder as tiny_te
from . import vae as tiny_vae
from .folders import MODEL_INDEX, UNIPC_CONFIG

TINY_FASTWAN = dataclasses.replace(tiny_dit.TINY_DIT, gate_compress=True)
GATE_SCALE = 0.5


def _gate_(linear: torch.nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in linear.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * GATE_SCALE)


def random_fastwan(cfg: WanDiTConfig = TINY_FASTWAN, seed: int = 0) -> WanDiT:
    """Our own FastWan DiT (cfg.gate_compress) with seeded random weights, fp32 on CPU."""
    model = tiny_dit.random_dit(cfg, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    for module in model.modules():
        if isinstance(module, SelfAttention) and module.gate_compress is not None:
            _gate_(module.gate_compress, g)
    return model


def fastwan_transformer(cfg: WanDiTConfig = TINY_FASTWAN, seed: int = 0):
    """A diffusers WanTransformer3DModel with a seeded random `attn1.to_gate_compress` in every
    block, so its state dict has FastWan's diffusers names."""
    model = tiny_dit.diffusers_transformer(cfg, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    for block in model.blocks:
        block.attn1.to_gate_compress = torch.nn.Linear(cfg.dim, cfg.dim)
        _gate_(block.attn1.to_gate_compress, g)
    return model


def save_transformer(model, folder: str, drop_gate_of: int | None = None) -> str:
    """Write `folder` as a diffusers transformer folder (config.json + weights with the gates);
    drop_gate_of: leave that block's gate out (a broken file, for the error tests)."""
    model.save_pretrained(folder)  # config.json and the weights, the gates included
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    sd = load_file(path)
    if drop_gate_of is not None:
        for part in ("weight", "bias"):
            del sd[f"blocks.{drop_gate_of}.attn1.to_gate_compress.{part}"]
        save_file(sd, path)
    return folder


def build_fastwan_folder(root: str, seed: int = 0, drop_gate_of: int | None = None) -> str:
    """A complete tiny FastWan diffusers folder at root/fastwan (transformer, text encoder and
    tokenizer, VAE, scheduler, model_index.json); returns its path."""
    folder = os.path.join(root, "fastwan")
    save_transformer(fastwan_transformer(TINY_FASTWAN, seed), os.path.join(folder, "transformer"), drop_gate_of)
    tiny_te.save_diffusers(tiny_te.random_umt5(d_model=TINY_FASTWAN.text_dim, seed=seed + 1), folder)
    tiny_vae.diffusers_vae(base_dim=8, seed=seed + 2).save_pretrained(os.path.join(folder, "vae"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({**UNIPC_CONFIG, "flow_shift": 8.0}, f, indent=1)  # FastWan's published shift
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({**MODEL_INDEX, "_class_name": "WanDMDPipeline"}, f, indent=1)
    return folder
