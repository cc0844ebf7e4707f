"""The image side of a run: which image the loaded model takes and what it becomes.

- Wan2.1 I2V (CLIP layers in the DiT): a start image, required → (condition latent, CLIP embeds),
  see pipeline/image_condition.py;
- Wan2.2 I2V-A14B (36 input channels, no CLIP): the same condition latent, no embeds;
- Wan2.2 TI2V-5B: an optional first frame → ti2v.FirstFrame, kept in latent frame 0;
- text-to-video models: no image; one given is refused.
The functions take the VideoGenerator (`gen`) whose parts, placement and lock they use; the
generator's check_image / encode_image / sample are the public faces.
"""
from __future__ import annotations

import torch

from ..errors import FastVideoError
from ..memory.placement import friendly_oom
from ..memory.planner import VideoShape
from . import ti2v
from .image_condition import as_image, fit, vae_condition
from .sampler import SamplingSettings

# What encode_image gives for sample(image_condition=): Wan2.1 I2V's (condition, CLIP embeds), or
# Wan2.2 TI2V-5B's first frame.
ImageCondition = tuple[torch.Tensor, torch.Tensor | None] | ti2v.FirstFrame  # None: Wan2.2 I2V-A14B, no CLIP


def check_image(gen, image, need_encoder: bool = True):
    """VideoGenerator.check_image: the image as the loaded model takes it, or None; FastVideoError
    for a bad image or one the model does not take."""
    cfg = gen.dit_config()
    if ti2v.is_wan22(cfg):
        return None if image is None else ti2v.load_image(image)
    clip = cfg.image_dim is not None
    if cfg.image_dim is None and cfg.in_channels != 36:  # 36 without CLIP layers: Wan2.2 I2V-A14B
        if image is not None:
            raise FastVideoError(f"image: the model {gen.files.model!r} is Wan2.1 text-to-video, which takes no "
                                 "image; for image-to-video load a Wan2.1 I2V model "
                                 "(wan2.1_i2v_480p_14B_*.safetensors) with its CLIP vision encoder "
                                 "(clip_vision_h.safetensors), or Wan2.2 TI2V-5B "
                                 "(wan2.2_ti2v_5B_fp16.safetensors).")
        return None
    if image is None:
        raise FastVideoError("image: this is an image-to-video model; give the start image (Python: image=..., "
                             "CLI: --image FILE, ComfyUI: the sampler's image input).")
    if need_encoder and clip:
        gen.files.require("image_encoder")
    return as_image(image)


def encode_image(gen, image, settings: SamplingSettings,
                 image_embeds: torch.Tensor | None = None) -> ImageCondition:
    """VideoGenerator.encode_image: the image → (condition, CLIP embeds or None) or a ti2v.FirstFrame."""
    if ti2v.is_wan22(gen.dit_config()):
        if image_embeds is not None:
            raise FastVideoError("image_embeds (the sampler's clip_vision_output): Wan2.2 TI2V-5B uses no CLIP "
                                 "image embeddings; leave it out.")
        if image is None:
            raise FastVideoError("image: none given; Wan2.2 TI2V-5B without an image is text-to-video, which "
                                 "needs no encode_image.")
        return _encode_first_frame(gen, image, settings)
    return _encode_i2v(gen, image, settings, image_embeds)


def _encode_i2v(gen, image, settings: SamplingSettings,
                image_embeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Wan2.1 I2V: the start image → (condition, CLIP embeds); see encode_image."""
    picture = check_image(gen, image, need_encoder=image_embeds is None)
    if picture is None:
        raise FastVideoError("image: this is a text-to-video model, which takes no image.")
    image_dim = gen.dit_config().image_dim
    if image_embeds is not None and image_dim is None:
        raise FastVideoError("image_embeds (the sampler's clip_vision_output): Wan2.2 I2V-A14B uses no CLIP "
                             "image embeddings; leave it out.")
    if image_embeds is not None:
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.ndim != 3 or \
                image_embeds.shape[-1] != image_dim:
            got = tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds)
            raise FastVideoError(f"image_embeds: expected CLIP vision hidden states [1, tokens, {image_dim}] "
                                 f"(clip_vision_h's penultimate layer), got {got}.")
    shape = VideoShape(settings.height, settings.width, settings.num_frames)
    with gen._parts.lock, torch.inference_mode(), friendly_oom("encoding the image"):
        gen.placement.prepare(shape)
        embeds = (image_embeds[:1].float().cpu() if image_embeds is not None
                  else _clip_embeds(gen, picture) if image_dim is not None else None)
        vae = gen.vae
        need = gen.placement.vae_bytes_needed(shape)
        with gen.placement.on_device("vae", vae, need):
            condition = vae_condition(vae, fit(picture, settings.height, settings.width), settings.num_frames)
    return condition, embeds


def _encode_first_frame(gen, image, settings: SamplingSettings) -> ti2v.FirstFrame:
    """Wan2.2 TI2V-5B: the image → the first-frame condition of a run of `settings`' size, encoded
    by the VAE wherever the memory plan puts it."""
    settings = gen.check_settings(settings)
    with gen._parts.lock, torch.inference_mode(), friendly_oom("encoding the image"):
        shape = VideoShape(settings.height, settings.width, 1, vae_stride=settings.vae_stride)
        with friendly_oom("loading"):
            gen.placement.prepare(shape)
            vae = gen.vae
        need = gen.placement.vae_bytes_needed(shape)
        with gen.placement.on_device("vae", vae, need):
            return ti2v.first_frame_for(vae, image, settings)


def _clip_embeds(gen, picture) -> torch.Tensor:
    """The CLIP tokens of the RGB PIL image [1,257,1280] float32 on CPU, the encoder on the GPU for it."""
    encoder = gen.image_encoder
    home = encoder.device
    placed = gen.placement.where("text_encoder") in ("resident", "on_demand")
    if home.type == "cpu" and gen.device.type != "cpu" and placed:
        encoder.model.to(gen.device)  # in for this phase only (on demand, or kept by a memory host)
    try:
        return encoder.encode(picture)
    finally:
        encoder.model.to(home)



def sample_inputs(gen, settings: SamplingSettings, image_condition: ImageCondition | None,
                  condition: torch.Tensor | None, image_embeds: torch.Tensor | None,
                  first_frame: ti2v.FirstFrame | None):
    """sample()'s image seams, checked against each other and the settings: encode_image's result
    stands for (condition, image_embeds) or first_frame. Returns (condition, image_embeds, first_frame)."""
    if isinstance(image_condition, ti2v.FirstFrame):
        first_frame = image_condition
    elif image_condition is not None:
        condition, image_embeds = image_condition
    if first_frame is not None and condition is not None:
        raise FastVideoError("first_frame (Wan2.2 TI2V-5B) and condition (Wan2.1 I2V) are for different models; "
                             "give what encode_image returned for this one.")
    if (condition is None) != (image_embeds is None) and gen.dit_config().image_dim is not None:
        raise FastVideoError("condition and image_embeds come together (from encode_image); got only one.")
    if condition is not None and tuple(condition.shape[2:]) != tuple(settings.latent_shape[2:]):
        raise FastVideoError(f"condition: latent grid {tuple(condition.shape[2:])} does not match the video size "
                             f"{settings.width}x{settings.height}, {settings.num_frames} frames; encode the image "
                             "again for these settings.")
    return condition, image_embeds, first_frame
