"""TORCH_SDPA: torch's scaled_dot_product_attention, cuDNN's kernel first on Hopper and newer.

On our H100 (bf16, 32,760 tokens, D=128) cuDNN ran at ~600 TFLOP/s against 365 for the flash
kernel torch picks by default in some releases. The choice is made per call with the backend-flag
context (never `set_priority`, which leaves its order behind for everything else in the process,
ComfyUI's own nodes included). FASTVIDEO_SDPA_KERNEL (cudnn, flash, efficient, math) pins one kernel.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import env

_NAMED = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
_cudnn_rejected: set[tuple] = set()  # input kinds cuDNN refused once: not asked again


def available() -> str | None:
    return None


@functools.cache
def _prefers_cudnn(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # SDPA wants [B, H, S, D]; the transposes are views.
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    pinned = env.get("FASTVIDEO_SDPA_KERNEL").lower()
    if pinned in _NAMED:
        with sdpa_kernel([_NAMED[pinned]]):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    kind = (q.dtype, q.shape[-1], v.shape[-1], q.device.index)
    if kind not in _cudnn_rejected and _prefers_cudnn(q.device.index or 0):
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        except RuntimeError:  # e.g. a head size or dtype cuDNN does not take: torch's own choice
            _cudnn_rejected.add(kind)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
