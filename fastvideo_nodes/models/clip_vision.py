"""The CLIP vision encoder Wan2.1 image-to-video conditions on (open-clip XLM-RoBERTa ViT-H/14, vision half).

Wan takes the hidden states of the penultimate layer over the whole token sequence: the class token
and the 16×16 patches of a 224×224 crop → [B, 257, 1280] (Wan's reference runs 31 of the 32 blocks;
ComfyUI's `penultimate_hidden_states` and diffusers' `hidden_states[-2]` are the same tensor).
The network is transformers' CLIPVisionModel; the preprocessing is its CLIP image processor
(shortest edge to 224, centre crop, CLIP mean/std), as diffusers' WanImageToVideoPipeline uses it.
"""
from __future__ import annotations

from typing import Any

import torch


def vision_tower(model: Any) -> Any:
    """The module holding embeddings/encoder: `model.vision_model` in transformers 4, the model itself in 5."""
    return getattr(model, "vision_model", model)


class ImageEncoder:
    """model: a transformers CLIPVisionModel; processor: a transformers CLIP image processor."""

    def __init__(self, model: Any, processor: Any):
        self.model = model
        self.processor = processor

    @property
    def device(self) -> torch.device:
        return vision_tower(self.model).embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return vision_tower(self.model).embeddings.patch_embedding.weight.dtype

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def pixels(self, image) -> torch.Tensor:
        """A PIL RGB image → pixel values [1, 3, S, S] float32 (S = the model's image size)."""
        return self.processor(images=image, return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def encode(self, image) -> torch.Tensor:
        """A PIL RGB image → penultimate-layer hidden states [1, tokens, width] float32 on CPU."""
        pixels = self.pixels(image).to(self.device, self.dtype)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2].float().cpu()
