"""SAGE_ATTN: SageAttention (1.x Triton from PyPI, or 2.x built by the user): 8-bit QK, fp16 PV."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _sageattn():
    try:
        from sageattention import sageattn
        return sageattn
    except Exception:  # noqa: BLE001
        return None


def available() -> str | None:
    if not torch.cuda.is_available():
        return "SageAttention needs a CUDA GPU."
    return None if _sageattn() is not None else "sageattention is not installed (`pip install sageattention`)."


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (64, 96, 128):
        from . import sdpa  # outside what its kernels cover: stay exact rather than fail
        return sdpa.attend(q, k, v)
    # sageattention 1.0.6 subtracts the key mean from k in place ("smooth_k"): give it a copy.
    return _sageattn()(q, k.clone(), v, tensor_layout="NHD", is_causal=False)
