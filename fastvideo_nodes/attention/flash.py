"""FLASH_ATTN: FlashAttention 3 (`flash_attn_interface`) or 2 (`flash_attn`), whichever is importable,
best first. Both take [B, S, H, D] directly. FlashAttention 4 is FLASH_ATTN_4 (flash4.py), measured apart."""
from __future__ import annotations

import functools

import torch

INSTALL = ("no FlashAttention package is importable. Install FlashAttention 2 (`pip install flash-attn "
           "--no-build-isolation`, builds from source) or build FlashAttention 3 from its hopper/ folder. "
           "FlashAttention 4 (`pip install flash-attn-4`) is the FLASH_ATTN_4 backend.")


@functools.cache
def _impl():
    for module, name in (("flash_attn_interface", "fa3"), ("flash_attn", "fa2")):
        try:
            mod = __import__(module, fromlist=["flash_attn_func"])
            return name, mod.flash_attn_func
        except Exception:
            continue
    return None, None


def available() -> str | None:
    if not torch.cuda.is_available():
        return "FlashAttention needs a CUDA GPU."
    return None if _impl()[1] is not None else INSTALL


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    name, fn = _impl()
    out = fn(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # FA3 may also return the log-sum-exp
