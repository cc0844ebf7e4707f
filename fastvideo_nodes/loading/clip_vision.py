"""Load the CLIP vision image encoder: Comfy-Org `clip_vision_h.safetensors` or a diffusers `image_encoder/`.

Both use transformers' tensor names (`vision_model.*`, maybe `visual_projection.weight`, which Wan
does not use; folders saved by transformers 5 drop the `vision_model.` prefix). The architecture
comes from the folder's config.json or, for a single file, from the tensor shapes; a single file
carries no head count, so the ViT-H convention (head size 80) is used.
Preprocessing: the diffusers folder's `image_processor/preprocessor_config.json`, else CLIP's defaults
(224, centre crop, OpenAI mean/std; what Wan and ComfyUI use).
Steps: locate → header → config (bounded) → materialize.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch

from ..errors import ModelFileError
from ..models.clip_vision import ImageEncoder, vision_tower
from .bounds import bounded, layer_count, need
from .files import read_json
from .materialize import Rules, materialize, open_component

ROLE = "Image encoder"
LAYERS = r"^vision_model\.encoder\.layers\.(\d+)\."
EMB = "vision_model.embeddings."
# The projection head (CLIPVisionModelWithProjection) and position ids are not weights Wan uses.
RULES = Rules(skip=lambda n: n == "visual_projection.weight" or n.endswith(("embeddings.position_ids", "scaled_fp8")))
HEAD_DIM = 80  # ViT-H/14: 1280 = 16 heads × 80
PROCESSOR_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast")
PROCESSOR_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                  "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def config_from_shapes(shapes: dict[str, tuple], role: str = ROLE):
    from transformers import CLIPVisionConfig
    hidden = need(shapes, EMB + "class_embedding", role, "the class embedding")[0]
    patch = need(shapes, EMB + "patch_embedding.weight", role, "the patch embedding")
    positions = need(shapes, EMB + "position_embedding.weight", role, "the position embedding")[0]
    side = math.isqrt(max(positions - 1, 0))
    if len(patch) != 4 or patch[2] != patch[3] or side * side != positions - 1:
        raise ModelFileError(f"{role}: patch embedding {patch} with {positions} positions is not a square ViT "
                             "(class token + n×n patches).")
    layers = layer_count(shapes, LAYERS, role)
    ffn = need(shapes, "vision_model.encoder.layers.0.mlp.fc1.weight", role, "the MLP of layer 0")[0]
    bounded(role, dim=hidden, ffn=ffn, patch=patch[2], layers=layers)
    if hidden % HEAD_DIM:
        raise ModelFileError(f"{role}: width {hidden} is not a multiple of the ViT-H head size {HEAD_DIM}, and a "
                             "single file does not state the head count; use a diffusers image_encoder/ folder.")
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                            num_attention_heads=hidden // HEAD_DIM, image_size=patch[2] * side,
                            patch_size=patch[2], hidden_act="gelu", layer_norm_eps=1e-5)


def _config_from_json(config: dict, role: str):
    from transformers import CLIPVisionConfig
    role = f"{role} config.json"
    if "auto_map" in config:
        raise ModelFileError(f"{role} asks for custom code (auto_map); only the standard CLIP vision model is loaded.")
    archs = config.get("architectures") or ["CLIPVisionModel"]
    if config.get("model_type", "clip_vision_model") != "clip_vision_model" or \
            not set(archs) <= {"CLIPVisionModel", "CLIPVisionModelWithProjection"}:
        raise ModelFileError(f"{role} describes a {archs[0]} ({config.get('model_type')}), not a CLIP vision model.")
    sizes = {"hidden_size": "dim", "intermediate_size": "ffn", "num_hidden_layers": "layers",
             "num_attention_heads": "heads", "patch_size": "patch"}
    bounded(role, **{cap: config[key] for key, cap in sizes.items() if key in config})
    try:
        return CLIPVisionConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{role} is not a valid CLIP vision config ({e}).") from None


def _processor(folder: str | None, image_size: int, role: str):
    """transformers' CLIP image processor (its PIL backend: no torchvision needed), from the diffusers
    image_processor/ folder next to image_encoder/ when there is one, else CLIP's defaults."""
    Processor: Any
    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers 5
    except ImportError:
        from transformers import CLIPImageProcessor as Processor  # 4.x: the PIL/numpy one
    kwargs: dict = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(folder)), "image_processor",
                            "preprocessor_config.json") if folder else None
    if cfg_path and os.path.isfile(cfg_path):
        cfg = read_json(cfg_path, role, "an image processor config")
        if cfg.get("image_processor_type", "CLIPImageProcessor") not in PROCESSOR_TYPES:
            raise ModelFileError(f"{role}: {cfg_path!r} describes a {cfg['image_processor_type']}; a CLIP image "
                                 "processor is expected.")
        kwargs.update({k: cfg[k] for k in PROCESSOR_KEYS if k in cfg})
    try:
        processor = Processor(**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{role}: {cfg_path!r} is not a valid CLIP image processor config ({e}).") from None
    crop = processor.crop_size if processor.do_center_crop else processor.size
    if (crop.get("height"), crop.get("width")) != (image_size, image_size):
        raise ModelFileError(f"{role}: the image processor makes {crop} images but the encoder takes "
                             f"{image_size}×{image_size}; check {cfg_path!r}.")
    return processor


def load_image_encoder(path: str, *, device="cpu", dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """clip_vision_h.safetensors, a diffusers image_encoder/ folder or a diffusers root folder → ImageEncoder."""
    from transformers import CLIPVisionModel

    path = os.fspath(path)
    where, source, _ = open_component(path, "image_encoder", ROLE, ("clip_vision",))
    role = source.role
    if any(k.startswith("visual.transformer.") for k in source.header):
        raise ModelFileError(f"{role}: {path!r} uses open_clip's tensor names (visual.transformer.*); load the "
                             "transformers-named file instead (Comfy-Org clip_vision_h.safetensors).")
    # Shapes are read in the files' usual names (vision_model.*), which a folder saved by transformers 5 lacks.
    if not any(k.startswith("vision_model.") for k in source.header):
        source.rename = lambda n: n if n.startswith("visual_projection.") else "vision_model." + n
    canonical = source.rename
    shapes = source.shapes(RULES)
    if where.config is not None:
        cfg = _config_from_json(where.config, role)
        layer_count(shapes, LAYERS, role)
    else:
        cfg = config_from_shapes(shapes, role)
    processor = _processor(where.folder, int(cfg.image_size), role)
    with torch.device("meta"):
        model = CLIPVisionModel(cfg)
    if not hasattr(model, "vision_model"):  # transformers 5 dropped the wrapper module
        source.rename = lambda n: canonical(n).removeprefix("vision_model.")
    # position_ids is a non-persistent buffer (0..N-1), made here rather than read from the file.
    emb = vision_tower(model).embeddings
    n = emb.position_ids.shape[-1]
    del emb._buffers["position_ids"]
    materialize(model, source, role=role, dtype=dtype, device=device, rules=RULES)
    emb.register_buffer("position_ids", torch.arange(n, device=device).expand(1, -1), persistent=False)
    return ImageEncoder(model, processor)
