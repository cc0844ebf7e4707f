"""Load the Wan2.1 DiT (text-to-video or image-to-video) from the files users have.

Accepted: a diffusers folder (`transformer/config.json` + sharded safetensors and index), a
diffusers-named single file, and an original/ComfyUI single file (optionally with the
`model.diffusion_model.` prefix); FastWan's (an extra `to_gate_compress` per block) in each.
Stored fp32/bf16/fp16/fp8 and ComfyUI scaled fp8.
Steps: locate → header → config from shapes (bounded) → materialize.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os

import torch

from ..errors import ModelFileError
from ..models.wan_dit import WanDiT, WanDiTConfig, keep_fp32
from ..ops.linear import enable_fp8_matmul, fp8_matmul_supported
from . import detect
from .bounds import bounded, layer_count, need
from .keymaps import dit_name
from .materialize import Rules, Source, materialize, open_component

logger = logging.getLogger(__name__)

ROLE = "Diffusion model"
RULES = Rules(keep_fp32=keep_fp32)


def config_from_shapes(shapes: dict[str, tuple], num_heads: int | None = None, role: str = ROLE) -> WanDiTConfig:
    """Read the architecture off original-named tensor shapes (as ComfyUI does)."""
    pe = need(shapes, "patch_embedding.weight", role, "the patch embedding")
    if len(pe) != 5:
        raise ModelFileError(f"{role}: patch_embedding.weight has shape {pe}; a Wan DiT has a 5-D Conv3d there.")
    dim, in_ch, patch = pe[0], pe[1], tuple(pe[2:])
    layers = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")), default=-1)
    bounded(role, layers=layers, dim=dim, channels=in_ch)
    for p in patch:
        bounded(role, patch=p)
    if num_heads is None:
        if dim % 128:
            raise ModelFileError(f"{role}: width {dim} is not a multiple of the Wan head size 128, and a single "
                                 "file does not state the head count; use a diffusers folder with config.json.")
        num_heads = dim // 128
    bounded(role, heads=num_heads)
    if dim % num_heads:
        raise ModelFileError(f"{role}: width {dim} does not divide into {num_heads} heads; check config.json.")
    head = need(shapes, "head.head.weight", role, "the output head (head.head)")
    image_dim = None
    if any(k.startswith("img_emb.") for k in shapes):
        if "img_emb.emb_pos" in shapes:
            raise ModelFileError(f"{role} is a Wan2.1 first-last-frame (FLF2V) model, which is not supported yet; "
                                 "use an image-to-video (I2V) or text-to-video model.")
        image_dim = need(shapes, "img_emb.proj.1.weight", role, "the image embedding (img_emb.proj.1)")[1]
        bounded(role, dim=image_dim)
        need(shapes, "blocks.0.cross_attn.k_img.weight", role, "the image keys of cross-attention (k_img)")
    cfg = WanDiTConfig(
        dim=dim, in_channels=in_ch, patch_size=patch, num_heads=num_heads, num_layers=layers,
        ffn_dim=need(shapes, "blocks.0.ffn.0.weight", role, "the feed-forward of block 0")[0],
        text_dim=need(shapes, "text_embedding.0.weight", role, "the text embedding")[1],
        freq_dim=need(shapes, "time_embedding.0.weight", role, "the time embedding")[1],
        out_channels=head[0] // math.prod(patch), image_dim=image_dim)
    bounded(role, ffn=cfg.ffn_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, channels=cfg.out_channels)
    if _has_gate(shapes, dim, layers, role):
        cfg = dataclasses.replace(cfg, gate_compress=True)
    return cfg


def _has_gate(shapes: dict[str, tuple], dim: int, layers: int, role: str) -> bool:
    """FastWan: a `gate_compress` projection (dim → dim) in every block, or in none."""
    names = [(f"blocks.{i}.self_attn.gate_compress.weight", f"blocks.{i}.self_attn.gate_compress.bias")
             for i in range(layers)]
    present = [w in shapes or b in shapes for w, b in names]
    if not any(present):
        return False
    for i, (w, b) in enumerate(names):
        if w not in shapes or b not in shapes:
            have = present.index(True)
            part = "weight" if w not in shapes else "bias"
            raise ModelFileError(f"{role}: block {i} lacks the {part} of its gate projection (attn1.to_gate_compress) "
                                 f"while block {have} has one; a FastWan checkpoint has it in all {layers} blocks. "
                                 "The file is incomplete or mixes two models.")
        if shapes[w] != (dim, dim) or shapes[b] != (dim,):
            raise ModelFileError(f"{role}: block {i}'s gate projection (attn1.to_gate_compress) has shapes "
                                 f"{shapes[w]} and {shapes[b]}; expected ({dim}, {dim}) and ({dim},).")
    return True


def _check_diffusers_config(config: dict, role: str) -> int | None:
    """The head count a diffusers config.json states (None if absent), after checking what it is."""
    cls = config.get("_class_name", "WanTransformer3DModel")
    if cls != "WanTransformer3DModel":
        raise ModelFileError(f"{role}: config.json describes a {cls}, not a WanTransformer3DModel.")
    if config.get("pos_embed_seq_len"):
        raise ModelFileError(f"{role}: config.json describes a Wan first-last-frame (FLF2V) model "
                             "(pos_embed_seq_len), which is not supported yet.")
    heads = config.get("num_attention_heads")
    if heads is not None:
        bounded(f"{role} config.json", heads=heads)
    if config.get("attention_head_dim") is not None:
        bounded(f"{role} config.json", head_dim=config["attention_head_dim"])
    return heads


def _read(path: str) -> tuple[Source, WanDiTConfig, str]:
    """Locate, read the headers and the architecture; no tensor data, no model."""
    where, source, kind = open_component(path, "transformer", ROLE,
                                         ("wan_dit", "wan_dit_diffusers", "wan_i2v", "wan_i2v_diffusers"))
    role = source.role
    prefix, names = detect.strip_prefix(source.header)
    diffusers_names = kind in ("wan_dit_diffusers", "wan_i2v_diffusers")
    source.prefix, source.rename = prefix, (dit_name if diffusers_names else source.rename)
    num_heads = _check_diffusers_config(where.config, role) if where.config is not None else None
    shapes = source.shapes(RULES)
    layer_count(shapes, r"^blocks\.(\d+)\.", role)
    cfg = config_from_shapes(shapes, num_heads, role)
    if where.config is not None and where.config.get("attention_head_dim") not in (None, cfg.head_dim):
        raise ModelFileError(f"{role}: config.json says head_dim {where.config['attention_head_dim']} but the "
                             f"weights imply {cfg.head_dim}.")
    return source, cfg, role


def read_dit_config(path: str) -> WanDiTConfig:
    """The architecture of a DiT file or folder, read from headers only (no weights)."""
    return _read(os.fspath(path))[1]


def load_dit(path: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             weight_dtype: torch.dtype | None = None, fp8_matmul: bool = False) -> WanDiT:
    """Build a WanDiT on the meta device and fill it from `path`, one tensor at a time.

    dtype: compute dtype. weight_dtype: optional storage dtype for the linear weights (e.g.
    torch.float8_e4m3fn); weights already stored as fp8 always stay fp8. fp8_matmul: the blocks'
    linears multiply in fp8 on the tensor cores (implies e4m3fn storage; GPUs of compute
    capability 8.9+, elsewhere the weights stay fp8 and are dequantised at use).
    """
    if fp8_matmul and weight_dtype is None:
        weight_dtype = torch.float8_e4m3fn
    source, cfg, role = _read(os.fspath(path))
    if cfg.image_dim is not None or cfg.in_channels == 36:
        # Image-to-video: noise 16 + mask 4 + image latent 16 (Wan2.1 I2V with CLIP layers; Wan2.2
        # I2V-A14B's experts without them).
        if cfg.in_channels != 36:
            raise ModelFileError(f"{role} takes {cfg.in_channels} input channels; Wan2.1 image-to-video takes 36 "
                                 "(16 noise + 4 mask + 16 image latent).")
    elif cfg.in_channels not in (16, 48):  # 48: Wan2.2 TI2V-5B (its VAE's latent channels)
        raise ModelFileError(f"{role} takes {cfg.in_channels} input channels; Wan2.1 text-to-video takes 16, "
                             "Wan2.1 image-to-video 36 (with CLIP image layers) and Wan2.2 TI2V-5B 48 (other Wan2.2 "
                             "models are not supported yet).")
    if cfg.in_channels == 48 and cfg.out_channels != 48:
        raise ModelFileError(f"{role} takes 48 input channels (Wan2.2 TI2V-5B) but its head gives "
                             f"{cfg.out_channels}; a Wan2.2 TI2V-5B model gives 48. The file is damaged or mixed.")
    with torch.device("meta"):
        model = WanDiT(cfg)
    materialize(model, source, role=role, dtype=dtype, device=device, rules=RULES, weight_dtype=weight_dtype)
    if fp8_matmul:
        if fp8_matmul_supported(device):
            enable_fp8_matmul(model.blocks)
        else:
            logger.warning("fp8 matmul needs an NVIDIA GPU of compute capability 8.9 or newer; on %s the fp8 "
                           "weights are dequantised at use instead.", device)
    return model
