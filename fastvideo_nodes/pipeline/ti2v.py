"""Wan2.2 TI2V-5B: its latent geometry and defaults, and text+image-to-video through the first frame.

The 5B DiT works on the Wan 2.2 VAE's latents: 48 channels at 1/16 of the pixels (1/4 in time).
With an image, the image alone is encoded (one frame → one latent frame), put in model space and
kept in latent frame 0 for the whole run: before every DiT call frame 0 of the model input is
replaced by it and its tokens get timestep 0 while the others get the step's t (diffusers'
`expand_timesteps`). The scheduler steps the whole latent; frame 0 of the result is the image's.
Without an image the 5B samples like any text-to-video model (one timestep for all tokens).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FastVideoError, ModelFileError

# Wan2.2's own TI2V-5B settings (wan/configs/wan_ti2v_5B.py): 1280×704 or 704×1280, 121 frames at 24 fps.
# (height, width, num_frames, fps) when the caller leaves them out; guidance 5 for both.
WAN22_SIZE: tuple[int, int, int, int] = (704, 1280, 121, 24)
WAN21_SIZE: tuple[int, int, int, int] = (480, 832, 81, 16)
WAN22_SHIFT = 5.0


def is_wan22(dit_cfg) -> bool:
    """The DiT works on Wan 2.2 VAE latents (TI2V-5B: 48 channels in)."""
    return dit_cfg.in_channels == 48


def default_size(dit_cfg) -> tuple[int, int, int, int]:
    """(height, width, num_frames, fps) of a video when the caller leaves them out."""
    return WAN22_SIZE if is_wan22(dit_cfg) else WAN21_SIZE


def geometry(dit_cfg) -> tuple[int, int]:
    """(latent channels, spatial stride) of the VAE the DiT was trained with."""
    return (48, 16) if is_wan22(dit_cfg) else (16, 8)


def check_pair(dit_cfg, vae_kind: str, model_path: str, vae_path: str) -> None:
    """A Wan 2.2 VAE goes with a 48-channel DiT and a Wan 2.1 VAE with a 16-channel one."""
    want = "wan22_vae" if is_wan22(dit_cfg) else "wan_vae"
    if vae_kind in ("wan_vae", "wan22_vae") and vae_kind != want:
        dit_name = "Wan2.2 TI2V-5B (48 latent channels)" if is_wan22(dit_cfg) else \
            f"Wan2.1 ({dit_cfg.in_channels} latent channels)"
        vae_name = "the Wan2.2 VAE (48 channels)" if vae_kind == "wan22_vae" else "the Wan2.1 VAE (16 channels)"
        right = "wan2.2_vae.safetensors" if want == "wan22_vae" else "wan_2.1_vae.safetensors"
        raise ModelFileError(f"vae: {vae_path!r} is {vae_name}, but the model {model_path!r} is {dit_name}; "
                             f"use {right} with this model.")


def load_image(image) -> torch.Tensor:
    """A file path, a PIL image, a ComfyUI IMAGE ([1,H,W,3] or [H,W,3] in 0..1) or a uint8 array
    [H,W,3] → float32 [H,W,3] in 0..1 on CPU."""
    if isinstance(image, (str, os.PathLike)) or (hasattr(image, "convert") and hasattr(image, "size")):
        from .image_condition import as_image  # files and PIL images are read as for Wan2.1 I2V
        image = np.asarray(as_image(image))
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            image = torch.from_numpy(image.astype(np.float32) / 255.0)
        else:
            image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise FastVideoError(f"image must be a file path, a PIL image or an IMAGE tensor [H,W,3] in 0..1, got "
                             f"{type(image).__name__}.")
    x = image.detach().float().cpu()
    if x.ndim == 4 and x.shape[0] >= 1:
        x = x[0]  # a ComfyUI IMAGE batch: its first frame starts the video
    if x.ndim != 3 or x.shape[-1] not in (3, 4) or x.shape[0] < 1 or x.shape[1] < 1:
        raise FastVideoError(f"image: expected [H,W,3] (or a ComfyUI IMAGE [N,H,W,3]), got {list(image.shape)}.")
    x = x[..., :3]
    if not bool(torch.isfinite(x).all()) or x.min() < 0 or x.max() > 1:
        raise FastVideoError("image: values must be finite and in 0..1 (ComfyUI's IMAGE range).")
    return x


def fit_image(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N,3,h,w] → [N,3,height,width]: the middle cut to the video's aspect ratio, then resized
    bilinearly, as ComfyUI's Wan22ImageToVideoLatent prepares its start image (no stretching)."""
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    if w * height > width * h:  # wider than the video: cut left and right
        cut = round((w - w * (width * h) / (height * w)) / 2)
        x = x[..., :, cut:w - cut]
    elif w * height < width * h:  # taller: cut top and bottom
        cut = round((h - h * (height * w) / (width * h)) / 2)
        x = x[..., cut:h - cut, :]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False).clamp_(0, 1)


def image_to_video_tensor(image, height: int, width: int) -> torch.Tensor:
    """The image as the VAE's input: [1,3,1,height,width] in [-1,1] (another size: see fit_image)."""
    x = fit_image(load_image(image).permute(2, 0, 1).unsqueeze(0), height, width)  # [1,3,H,W]
    return (x * 2 - 1).unsqueeze(2)


class FirstFrame:
    """Keeps the image's latent in frame 0 (sampler.denoise's `first_frame`).

    latent: model-space [1,C,1,h,w]; shape: the video latent's [1,C,T',h,w]; the DiT patches 2×2."""

    def __init__(self, latent: torch.Tensor, shape: tuple[int, ...], patch: tuple[int, int] = (2, 2)):
        _, c, t, h, w = shape
        if tuple(latent.shape) != (1, c, 1, h, w):
            raise FastVideoError(f"image latent {list(latent.shape)} does not fit the video latent {list(shape)}.")
        self.latent = latent.float()
        tokens = torch.ones(t, h // patch[0], w // patch[1], dtype=torch.float32)
        tokens[0] = 0  # the image's tokens are clean: timestep 0
        self.token_mask = tokens.flatten().unsqueeze(0)  # [1,S]

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """[B,C,T',h,w] with frame 0 replaced by the image's latent."""
        first = self.latent.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1, -1)
        return torch.cat([first, x[:, :, 1:]], dim=2)

    def timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The step's timestep [1] → per token [1,S]: 0 on frame 0, t elsewhere."""
        return self.token_mask.to(t.device) * t.float().reshape(1, 1)


def first_frame_for(vae, image, settings) -> FirstFrame:
    """Encode `image` with the Wan 2.2 VAE into model space, for a video of `settings`' size."""
    from ..models.wan_vae import raw_to_model
    if vae.cfg.z_dim != settings.latent_channels:
        raise FastVideoError(f"image: the VAE has {vae.cfg.z_dim} latent channels but the model takes "
                             f"{settings.latent_channels}; an image-conditioned Wan2.2 TI2V-5B needs the Wan2.2 VAE.")
    video = image_to_video_tensor(image, settings.height, settings.width)
    latent = raw_to_model(vae.encode(video)).cpu()
    return FirstFrame(latent, settings.latent_shape)
