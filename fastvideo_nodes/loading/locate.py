"""Where the weights of one component are: the single answer every loader (and the generator's
memory estimate) uses.

A user may give a single .safetensors file, a diffusers root folder (transformer/ vae/
text_encoder/ tokenizer/) or one component folder of it; all three resolve to the same `Located`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ModelFileError
from .files import read_json, shard_files

# component → (role in messages, weight file stem in diffusers folders, what a single file would be)
COMPONENTS = {
    "transformer": ("Diffusion model", "diffusion_pytorch_model", "a Wan2.1 .safetensors file"),
    "vae": ("VAE", "diffusion_pytorch_model", "wan_2.1_vae.safetensors"),
    "text_encoder": ("Text encoder", "model", "a UMT5 .safetensors file (e.g. umt5_xxl_fp16.safetensors)"),
    "image_encoder": ("Image encoder", "model", "a CLIP vision .safetensors file (e.g. clip_vision_h.safetensors)"),
}


@dataclass(frozen=True)
class Located:
    """files: the safetensors files; config: the component's config.json (None for a single file);
    folder: the component folder (None for a single file); tokenizer: the diffusers tokenizer/
    folder next to text_encoder/ (text encoder only, None otherwise)."""
    files: list[str]
    config: dict | None = None
    folder: str | None = None
    tokenizer: str | None = None


def locate(path: str | os.PathLike, component: str) -> Located:
    """Resolve `path` for `component` ("transformer", "vae", "text_encoder" or "image_encoder"); reads
    JSON, no weights."""
    role, stem, expected = COMPONENTS[component]
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"{role}: {path!r} does not exist. Give {expected} or a diffusers Wan folder.")
    if not os.path.isdir(path):
        return Located([path])
    folder = os.path.join(path, component) if os.path.isdir(os.path.join(path, component)) else path
    cfg = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg):
        raise ModelFileError(f"{role}: {path!r} is a folder without {component}/config.json; expected a diffusers "
                             f"Wan folder or {expected}.")
    config = read_json(cfg, role, "a model config")
    tokenizer = None
    if component == "text_encoder":
        tokenizer = os.path.join(os.path.dirname(os.path.abspath(folder)), "tokenizer")
        if not os.path.isdir(tokenizer):
            raise ModelFileError(f"{role}: {path!r} has no tokenizer/ folder next to text_encoder/; "
                                 "copy the tokenizer/ folder of the diffusers release there.")
    return Located(shard_files(folder, role, stem), config, folder, tokenizer)
