"""Triton launchers: one implementation behind each fused op in `fused.py`, never called directly
by the models.

rms_norm_silu: the Wan VAE's "L2-normalise over channels × √C × γ, then SiLU", one read and one
write of a channels-last tensor instead of five elementwise passes (the VAE decoder spends a
third of its time in them).
rms_norm_rope and layer_norm_affine: the DiT's q/k "RMSNorm then 3D RoPE" and "LayerNorm then
modulation, cast to the compute dtype", one pass each. residual_layer_norm: a residual add and the
LayerNorm after it, one read of the stream and one write.

The jit kernels live in `triton_jit.py` and are imported on the first launch, so this module
imports without Triton and a launch without it raises a FastVideoError instead of a NameError.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch

from ..errors import FastVideoError


@functools.cache
def triton_available() -> bool:
    """Triton imports and a CUDA device is present (checked once, then a cached answer)."""
    try:
        import triton  # noqa: F401
    except Exception:  # an ImportError, or a broken install raising something else
        return False
    return torch.cuda.is_available()


@functools.cache
def _jit() -> ModuleType:
    if not triton_available():
        raise FastVideoError("fused kernels: they need Triton and a CUDA GPU, and this machine lacks one of them; "
                             "install Triton (`pip install triton`, on Windows `pip install triton-windows`) "
                             "or run on CPU / without the kernels, where the plain torch math is used.")
    from . import triton_jit
    return triton_jit


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool = True) -> torch.Tensor:
    """Channels-last x [B,C,...] → silu(normalize(x over C) · scale · gamma); gamma has C elements."""
    kernels = _jit()
    c = x.shape[1]
    rows = x.numel() // c
    y = torch.empty_like(x)  # keeps the channels-last layout
    block_c = max(16, 1 << (c - 1).bit_length())
    block_rows = max(1, 8192 // block_c)
    kernels.rms_norm_silu_kernel[(_cdiv(rows, block_rows),)](
        x, gamma.reshape(-1), y, rows, c, float(scale), 1e-12,
        BLOCK_C=block_c, BLOCK_ROWS=block_rows, SILU=silu, num_warps=8)
    return y


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """Contiguous half-precision x [B,S,H,D] → RMSNorm over H·D (weight [H·D]), then pairs (2i, 2i+1)
    rotated by cos/sin [S, D/2]; float32 inside, one rounding at the end."""
    kernels = _jit()
    b, s, h, d = x.shape
    y = torch.empty_like(x)
    pairs = h * d // 2
    kernels.rms_norm_rope_kernel[(b * s,)](x, weight, cos.contiguous(), sin.contiguous(), y, s, pairs, d // 2,
                                           float(eps), BLOCK=max(16, 1 << (pairs - 1).bit_length()), num_warps=4)
    return y


# Compiled blocks call it as one opaque op: its single pass beat the compiler's fused kernel for the
# same math (RMSNorm over all heads, then interleaved-pair rotation).
@torch.library.custom_op("fastvideo::rms_norm_rope", mutates_args=())
def rms_norm_rope_op(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     eps: float) -> torch.Tensor:
    return rms_norm_rope(x.contiguous(), weight, cos, sin, eps)


@rms_norm_rope_op.register_fake
def _(x, weight, cos, sin, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def layer_norm_affine(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float,
                      dtype: torch.dtype) -> torch.Tensor:
    """Contiguous x [B,S,C] → (LayerNorm(x)·a + b) in float32, cast to dtype; a, b: [B or 1, 1, C] or [C]."""
    kernels = _jit()
    bsz, s, c = x.shape
    a2, b2 = _vector_rows(a, c), _vector_rows(b, c)
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    kernels.layer_norm_affine_kernel[(bsz * s,)](x, a2, b2, y, s, c, a2.shape[0] > 1, b2.shape[0] > 1, float(eps),
                                                 **_row_launch(c))
    return y


def _vector_rows(t: torch.Tensor, c: int) -> torch.Tensor:
    """[B or 1, 1, C] or [C] → a contiguous float32 [B or 1, C]."""
    return t.float().reshape(-1, c).contiguous()


def _row_launch(c: int) -> dict:
    """BLOCK and num_warps of a one-row-per-program kernel over c columns (8 warps from 4,096 wide)."""
    block = max(16, 1 << (c - 1).bit_length())
    return {"BLOCK": block, "num_warps": 8 if block >= 4096 else 4}


def residual_layer_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, a: torch.Tensor,
                        b: torch.Tensor, eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous x (float32) and y [B,S,C] → (x + y·gate in float32, LayerNorm(that)·a + b cast to
    dtype); gate, a, b [B or 1, 1, C] or [C] (gate None: x + y)."""
    kernels = _jit()
    bsz, s, c = x.shape
    a2, b2 = _vector_rows(a, c), _vector_rows(b, c)
    g2 = a2 if gate is None else _vector_rows(gate, c)  # unread without a gate
    x_out = torch.empty_like(x)
    h = torch.empty(x.shape, dtype=dtype, device=x.device)
    kernels.residual_layer_norm_kernel[(bsz * s,)](
        x, y, g2, a2, b2, x_out, h, s, c, g2.shape[0] > 1, a2.shape[0] > 1, b2.shape[0] > 1, float(eps),
        GATED=gate is not None, **_row_launch(c))
    return x_out, h


# Compiled blocks call these as opaque ops: Inductor's kernels for the same math read a 5,120-wide
# row twice (a looped reduction), ours once.
@torch.library.custom_op("fastvideo::residual_layer_norm", mutates_args=())
def residual_layer_norm_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, a: torch.Tensor,
                           b: torch.Tensor, eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return residual_layer_norm(x.contiguous(), y.contiguous(), gate, a, b, eps, dtype)


@residual_layer_norm_op.register_fake
def _(x, y, gate, a, b, eps, dtype):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("fastvideo::layer_norm_affine", mutates_args=())
def layer_norm_affine_op(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float,
                         dtype: torch.dtype) -> torch.Tensor:
    return layer_norm_affine(x.contiguous(), a, b, eps, dtype)


@layer_norm_affine_op.register_fake
def _(x, a, b, eps, dtype):
    return x.new_empty(x.shape, dtype=dtype)
