"""FLASH_ATTN_4: FlashAttention 4, `flash_attn.cute.flash_attn_func` from the PyPI `flash-attn-4` package.

Its kernels are written in NVIDIA's CuTe Python DSL and compiled on first call, so it installs without a
compiler but needs `nvidia-cutlass-dsl` at a version its release was tested with. The forward runs on
Hopper and Blackwell (compute capability 9.0+), fp16/bf16, head dims 64/96/128 on Hopper. It takes
[B, S, H, D] as we do and returns (out, lse). A backend of its own rather than a FLASH_ATTN fallback, so
`auto` measures it apart from FA2/FA3 (users report it level with FA3 on Hopper).
"""
from __future__ import annotations

import functools

import torch

# The pair measured on an H200 (torch 2.11, CUDA 13, 2026-12-03): 664 TFLOP/s at 75,600 x 40 x 128
# against cuDNN's 562, exact to fp32 as cuDNN is. `[cu13]` brings the CUDA 13 build of the DSL libraries.
INSTALL = ("`pip install flash-attn-4==4.0.0b36 'nvidia-cutlass-dsl[cu13]==4.8.1'` "
           "(plain `nvidia-cutlass-dsl` with a CUDA 12 torch)")
HEAD_DIMS = (64, 96, 128)


@functools.cache
def _import() -> tuple:
    """(flash_attn_func, None) or (None, why the import failed). The cache keeps only the message: an
    exception's traceback holds the frames up to the caller, which is auto's probe inside a DiT forward."""
    try:
        from flash_attn.cute import flash_attn_func
        return flash_attn_func, None
    except ModuleNotFoundError as e:
        if e.name in ("flash_attn", "flash_attn.cute"):
            return None, f"flash-attn-4 is not installed: {INSTALL}."
        why = repr(e)
    except Exception as e:  # a CuTe DSL that fails while loading
        why = repr(e)
    # Installed but broken, usually an nvidia-cutlass-dsl version it was not built against.
    return None, (f"flash-attn-4 is installed but `flash_attn.cute` does not import ({why:.160}); "
                  f"reinstall a matching pair: {INSTALL}.")


def import_problem() -> str | None:
    return _import()[1]


def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability()


def available() -> str | None:
    if not torch.cuda.is_available():
        missing = import_problem()  # worth saying here too: the listing is how users find the install line
        return "FlashAttention 4 needs a CUDA GPU (Hopper or newer)" + (f"; {missing}" if missing else ".")
    major, minor = _capability()
    if major < 9:
        return (f"FlashAttention 4 runs on Hopper or newer (compute capability 9.0+); this GPU is "
                f"{major}.{minor}. Use FLASH_ATTN (FlashAttention 2) or TORCH_SDPA.")
    return import_problem()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [B, Sq, H, D], k/v: [B, Sk, H, D] → [B, Sq, H, D]."""
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in HEAD_DIMS:
        from . import sdpa  # outside what its kernels cover: stay exact rather than fail
        return sdpa.attend(q, k, v)
    fn, _ = _import()
    out = fn(q, k, v, causal=False)
    return out[0] if isinstance(out, tuple) else out  # (out, lse); lse is None unless asked for
