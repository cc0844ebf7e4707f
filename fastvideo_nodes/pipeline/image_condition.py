"""The image conditioning of Wan2.1 image-to-video, as diffusers' WanImageToVideoPipeline builds it.

Two signals come from the one start image:
- CLIP image embeddings [1, 257, 1280] of the image as given (the CLIP processor crops it to 224²);
- the condition latent [1, 20, T', H/8, W/8], concatenated to the noise at every step: a 4-channel
  mask (1 on the first latent frame, which the image fixes, 0 elsewhere; 4 because one latent frame
  stands for 4 video frames) followed by the VAE latent, in model space, of [image, 0, 0, …] over
  all num_frames.
The image is fitted to the video size first: resized with Lanczos as diffusers does; an image of
another aspect ratio is centre-cropped to the video's aspect first (as ComfyUI's Wan node does)
instead of being stretched, with a log line.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from ..errors import FastVideoError
from ..models.wan_vae import raw_to_model

logger = logging.getLogger(__name__)

MASK_CHANNELS = 4  # one latent frame = 4 video frames (the VAE's temporal stride)
IMAGE_HINT = "a path to a PNG/JPEG/WebP file, a PIL image, or a float tensor [H,W,3] or [1,H,W,3] in 0..1"


def as_image(image, name: str = "image"):
    """A path, PIL image or ComfyUI IMAGE tensor → an RGB PIL image; anything else is refused."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FastVideoError(f"{name}: {path!r} does not exist; give {IMAGE_HINT}.")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise FastVideoError(f"{name}: {path!r} is not an image that can be read ({type(e).__name__}); "
                                 f"give {IMAGE_HINT}.") from None
    if isinstance(image, torch.Tensor):
        t = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        if t.ndim != 3 or t.shape[-1] != 3 or not t.is_floating_point() or min(t.shape[:2]) < 1:
            raise FastVideoError(f"{name}: a tensor of shape {tuple(image.shape)} and dtype {image.dtype} is not "
                                 f"one image; give {IMAGE_HINT}.")
        if not bool(torch.isfinite(t).all()):
            raise FastVideoError(f"{name}: the image tensor holds NaN or inf values.")
        pixels = (t.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return Image.fromarray(pixels, "RGB")
    raise FastVideoError(f"{name}: got {type(image).__name__}; give {IMAGE_HINT}.")


def fit(image, height: int, width: int):
    """The RGB PIL image at width×height: centre-cropped to that aspect if it differs, then resized."""
    from PIL import Image
    w, h = image.size
    if abs(w * height - h * width) > max(w, h):  # more than a pixel of rounding apart
        if w * height > h * width:  # wider than the video: crop the sides
            cw, ch = round(h * width / height), h
        else:
            cw, ch = w, round(w * height / width)
        left, top = (w - cw) // 2, (h - ch) // 2
        logger.info("image: %dx%d has another aspect ratio than the %dx%d video; centre-cropped to %dx%d, then "
                    "resized.", w, h, width, height, cw, ch)
        image = image.crop((left, top, left + cw, top + ch))
    elif (w, h) != (width, height):
        logger.info("image: resized from %dx%d to the video size %dx%d.", w, h, width, height)
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def first_frame_mask(latent_frames: int, height: int, width: int) -> torch.Tensor:
    """[1, 4, T', h, w] float32: ones on the first latent frame, zeros after."""
    mask = torch.zeros(1, MASK_CHANNELS, latent_frames, height, width)
    mask[:, :, 0] = 1.0
    return mask


@torch.inference_mode()
def vae_condition(vae, image, num_frames: int) -> torch.Tensor:
    """The fitted RGB PIL image → condition [1, 20, T', H/8, W/8] float32 on CPU (mask ++ model-space latent).

    vae: models.wan_vae.WanVAE on its compute device."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # [H,W,3] in 0..1
    first = (pixels * 2 - 1).permute(2, 0, 1)[None, :, None]  # [1,3,1,H,W] in -1..1
    video = torch.cat([first, first.new_zeros(1, 3, num_frames - 1, *first.shape[-2:])], dim=2)
    latent = raw_to_model(vae.encode(video)).cpu()
    return torch.cat([first_frame_mask(*latent.shape[2:]), latent], dim=1)
