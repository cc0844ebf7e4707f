"""SAGE_ATTN: SageAttention: 8-bit QK; PV in fp16 (1.x, Triton, PyPI) or fp8 (2.x CUDA kernels, built
from source; its `sageattn` picks the kernel for the GPU)."""
from __future__ import annotations

import functools

import torch


@functools.cache
def _sageattn():
    try:
        import sageattention
        return sageattention.sageattn
    except Exception:
        return None


@functools.cache
def _smooths_k_in_place() -> bool:
    """1.x (Triton, PyPI) subtracts the key mean from k in place; 2.x passes the mean to its kernels."""
    import sageattention
    return not hasattr(sageattention, "sageattn_qk_int8_pv_fp8_cuda")


def available() -> str | None:
    if not torch.cuda.is_available():
        return "SageAttention needs a CUDA GPU."
    return None if _sageattn() is not None else "sageattention is not installed (`pip install sageattention`)."


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (64, 96, 128):
        from . import sdpa  # outside what its kernels cover: stay exact rather than fail
        return sdpa.attend(q, k, v)
    if _smooths_k_in_place():
        k = k.clone()  # the caller's k must stay as it was
    return _sageattn()(q, k, v, tensor_layout="NHD", is_causal=False)
