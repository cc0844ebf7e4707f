"""Tell what a checkpoint is from its tensor names, before reading any data.

Used by every loader so that a file put in the wrong slot says what it is and where it belongs.
"""
from __future__ import annotations

from ..errors import ModelFileError

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


def strip_prefix(keys) -> tuple[str, list[str]]:
    """Return (prefix, keys without it) for the known wrapper prefixes of single files."""
    keys = list(keys)
    for p in PREFIXES:
        if keys and sum(k.startswith(p) for k in keys) > len(keys) // 2:
            return p, [k[len(p):] if k.startswith(p) else k for k in keys]
    return "", keys


def kind_of(keys) -> str:
    """One of: wan_dit, wan_dit_diffusers, wan_i2v, wan_i2v_diffusers, wan_vae, wan22_vae, umt5,
    clip_vision, sd, unknown."""
    _, ks = strip_prefix(keys)
    s = set(ks)
    if any(k.startswith("img_emb.") or ".k_img." in k for k in s):
        return "wan_i2v"
    if any(k.startswith("condition_embedder.image_embedder.") or ".add_k_proj." in k for k in s):
        return "wan_i2v_diffusers"
    # transformers 5 writes CLIPVisionModel without its `vision_model.` prefix
    if "embeddings.class_embedding" in s or \
            any(k.startswith(("vision_model.encoder.layers.", "visual.transformer.resblocks.")) for k in s):
        return "clip_vision"
    # Wan is recognised by its head (as ComfyUI does) or, for a file that lacks the head, by its
    # first layers, so that the loader can say which part is missing.
    if "head.modulation" in s or {"patch_embedding.weight", "blocks.0.self_attn.q.weight"} <= s:
        return "wan_dit"
    if "patch_embedding.weight" in s and any(k.startswith("condition_embedder.") for k in s):
        return "wan_dit_diffusers"
    if "decoder.upsamples.0.upsamples.0.residual.2.weight" in s or "encoder.down_blocks.0.resnets.0.conv1.weight" in s:
        return "wan22_vae"
    if "decoder.middle.0.residual.0.gamma" in s or "decoder.mid_block.resnets.0.norm1.gamma" in s:
        return "wan_vae"
    if s & {"shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.embed_tokens.weight"}:
        return "umt5"
    if any(k.startswith(("input_blocks.", "first_stage_model.", "cond_stage_model.", "conditioner.", "down_blocks.",
                         "double_blocks.")) for k in s) \
            or any(k.startswith("model.diffusion_model.input_blocks") for k in keys):
        return "sd"
    return "unknown"


DESCRIPTIONS = {
    "wan_dit": "a Wan2.1 text-to-video diffusion model (load it as the model)",
    "wan_dit_diffusers": "a Wan2.1 text-to-video diffusion model in diffusers naming (load it as the model)",
    "wan_i2v": "a Wan2.1 image-to-video diffusion model (load it as the model, with a CLIP vision image encoder)",
    "wan_i2v_diffusers": "a Wan2.1 image-to-video diffusion model in diffusers naming (load it as the model, with a "
                         "CLIP vision image encoder)",
    "clip_vision": "a CLIP vision image encoder (load it as the image encoder: clip_vision_h.safetensors, "
                   "ComfyUI folder clip_vision)",
    "wan_vae": "a Wan2.1 VAE (load it as the VAE)",
    "wan22_vae": "the 48-channel Wan2.2 VAE (load it as the VAE, with a Wan2.2 TI2V-5B model)",
    "umt5": "a UMT5 text encoder (load it as the text encoder)",
    "sd": "a Stable Diffusion / other image-model checkpoint, not a Wan model",
    "unknown": "not a recognised Wan2.1 file",
}


def expect_kind(keys, wanted: tuple[str, ...], role: str, path: str) -> str:
    """Return the detected kind if it is one of `wanted`, else raise a clear error."""
    k = kind_of(keys)
    if k not in wanted:
        want = DESCRIPTIONS[wanted[0]].split(" (")[0]
        raise ModelFileError(f"{role}: {path!r} is {DESCRIPTIONS[k]}; expected {want}.")
    return k
