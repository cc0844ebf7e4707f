"""KITCHEN_INT8: comfy-kitchen's INT8 attention (`comfy_kitchen.sage_attention.int8_attention`, the kernel
behind ComfyUI's "Model Attention Backend" node), for users who already have the package. It takes
[B, H, L, D]; ours are [B, S, H, D], so the call goes through transposed views. Its Hopper speed is
unpublished: `auto` measures it and holds it to the same accuracy guard as every backend."""
from __future__ import annotations

import functools

import torch


@functools.cache
def _int8_attention():
    try:
        from comfy_kitchen.sage_attention import int8_attention
        return int8_attention
    except Exception:
        return None


def available() -> str | None:
    if not torch.cuda.is_available():
        return "comfy-kitchen's INT8 attention needs a CUDA GPU."
    if _int8_attention() is None:
        return "comfy-kitchen is not installed (`pip install comfy-kitchen`)."
    return None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or _int8_attention() is None:
        from . import sdpa  # outside what its kernel covers: stay exact rather than fail
        return sdpa.attend(q, k, v)
    out = _int8_attention()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
