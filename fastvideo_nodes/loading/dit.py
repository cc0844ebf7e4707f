"""Load the Wan2.1 DiT from the files users have.

Accepted: a diffusers folder (`transformer/config.json` + sharded safetensors and index), a
diffusers-named single file, and an original/ComfyUI single file (optionally with the
`model.diffusion_model.` prefix). Stored fp32/bf16/fp16/fp8 and ComfyUI scaled fp8.
"""
from __future__ import annotations

import math
import os
import re

import torch

from ..errors import ModelFileError
from ..models.wan_dit import WanDiT, WanDiTConfig, keep_fp32
from ..ops.linear import enable_fp8_matmul, fp8_matmul_supported
from . import detect
from .files import all_keys, iter_tensors, locate
from .materialize import materialize

ROLE = "Diffusion model"

# diffusers name → original Wan name (regex, replacement), applied in order.
_DIFFUSERS_TO_WAN = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".o."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."), (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
]
# Tensors in files that are markers, not weights.
_SKIP = re.compile(r"(^|\.)scaled_fp8$|\.scale_input$")


def diffusers_to_wan_name(name: str) -> str:
    for pat, rep in _DIFFUSERS_TO_WAN:
        name = re.sub(pat, rep, name)
    return name


def config_from_shapes(shapes: dict[str, tuple], num_heads: int | None = None) -> WanDiTConfig:
    """Read the architecture off original-named tensor shapes (as ComfyUI does)."""
    pe = shapes["patch_embedding.weight"]
    dim, in_ch, patch = pe[0], pe[1], tuple(pe[2:])
    layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    if num_heads is None:
        if dim % 128:
            raise ModelFileError(f"{ROLE}: width {dim} is not a multiple of the Wan head size 128, and a single "
                                 "file does not state the head count; use a diffusers folder with config.json.")
        num_heads = dim // 128
    return WanDiTConfig(
        dim=dim, in_channels=in_ch, patch_size=patch, num_heads=num_heads, num_layers=layers,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0], text_dim=shapes["text_embedding.0.weight"][1],
        freq_dim=shapes["time_embedding.0.weight"][1], out_channels=shapes["head.head.weight"][0] // math.prod(patch))


def _locate(path: str) -> tuple[list[str], dict | None]:
    return locate(path, ROLE, "transformer", "diffusion_pytorch_model", "a Wan2.1 .safetensors file")


def _check_diffusers_config(config: dict, path: str) -> None:
    cls = config.get("_class_name", "WanTransformer3DModel")
    if cls != "WanTransformer3DModel":
        raise ModelFileError(f"{ROLE}: {path!r} holds a {cls}, not a WanTransformer3DModel.")
    if config.get("image_dim") or config.get("added_kv_proj_dim"):
        raise ModelFileError(f"{ROLE}: {path!r} is a Wan image-to-video model; only text-to-video is supported yet.")


def read_dit_config(path: str) -> WanDiTConfig:
    """The architecture of a DiT file or folder, read from headers only (no weights)."""
    files, config = _locate(path)
    header = all_keys(files, ROLE)
    prefix, names = detect.strip_prefix(header)
    kind = detect.expect_kind(header, ("wan_dit", "wan_dit_diffusers"), ROLE, path)
    rename = diffusers_to_wan_name if kind == "wan_dit_diffusers" else (lambda n: n)
    shapes = {rename(n): tuple(header[prefix + n]["shape"]) for n in names if not _SKIP.search(n)}
    return config_from_shapes(shapes, (config or {}).get("num_attention_heads"))


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
    files, config = _locate(path)
    header = all_keys(files, ROLE)
    prefix, names = detect.strip_prefix(header)
    kind = detect.expect_kind(header, ("wan_dit", "wan_dit_diffusers"), ROLE, path)
    rename = (lambda n: diffusers_to_wan_name(n)) if kind == "wan_dit_diffusers" else (lambda n: n)
    shapes = {rename(n): tuple(header[prefix + n]["shape"]) for n in names if not _SKIP.search(n)}

    num_heads = None
    if config is not None:
        _check_diffusers_config(config, path)
        num_heads = config.get("num_attention_heads")
    if shapes["patch_embedding.weight"][1] != 16:
        raise ModelFileError(f"{ROLE}: {path!r} takes {shapes['patch_embedding.weight'][1]} input channels; "
                             "Wan2.1 text-to-video takes 16 (Wan2.2 and image-to-video models are not supported yet).")
    cfg = config_from_shapes(shapes, num_heads)
    if config is not None and config.get("attention_head_dim") not in (None, cfg.head_dim):
        raise ModelFileError(f"{ROLE}: config.json says head_dim {config['attention_head_dim']} but the weights "
                             f"imply {cfg.head_dim}.")

    with torch.device("meta"):
        model = WanDiT(cfg)

    def tensors():
        for name, t in iter_tensors(files, ROLE):
            n = name[len(prefix):] if prefix and name.startswith(prefix) else name
            if not _SKIP.search(n):
                yield rename(n), t

    materialize(model, tensors(), role=f"{ROLE} {os.path.basename(path)!r}", dtype=dtype, device=device,
                keep_fp32=keep_fp32, weight_dtype=weight_dtype)
    if fp8_matmul:
        if fp8_matmul_supported(device):
            enable_fp8_matmul(model.blocks)
        else:
            print(f"[FastVideo] fp8 matmul needs an NVIDIA GPU of compute capability 8.9 or newer; on {device} "
                  "the fp8 weights are dequantised at use instead.")
    return model
