"""Triton kernels for the GPU path. The models keep the plain torch math (CPU, and the reference the
GPU tests compare with) and call these where `fusable` says they apply.

rms_norm_silu: the Wan VAE's "L2-normalise over channels × √C × γ, then SiLU", one read and one
write of a channels-last tensor instead of five elementwise passes (the VAE decoder spends a
third of its time in them).
rms_norm_rope and layer_norm_affine: the DiT's q/k "RMSNorm then 3D RoPE" and "LayerNorm then
modulation, cast to the compute dtype", one pass each. Eager CUDA runs use both; compiled blocks
use rms_norm_rope as an opaque op and let torch.compile fuse the rest.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def triton_ok() -> bool:
    try:
        import triton  # noqa: F401
        return torch.cuda.is_available()
    except Exception:
        return False


def channels_last(x: torch.Tensor) -> bool:
    """True when channels are the innermost (stride-1) dim of a 4D/5D tensor."""
    return x.dim() in (4, 5) and x.stride(1) == 1 and x.shape[1] > 1 and \
        x.permute(0, *range(2, x.dim()), 1).is_contiguous()


HALF = (torch.bfloat16, torch.float16)


def fusable(x: torch.Tensor, *, layout: str = "contiguous", dtypes: tuple = ()) -> bool:
    """Whether the Triton kernels below take x: a CUDA tensor with Triton present, in the layout
    ("contiguous" or "channels_last") and, if given, one of the dtypes. Callers run their plain
    torch math otherwise; that math is the reference the GPU tests compare these kernels with."""
    if not (x.is_cuda and triton_ok()) or (dtypes and x.dtype not in dtypes):
        return False
    return channels_last(x) if layout == "channels_last" else x.is_contiguous()


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool = True) -> torch.Tensor:
    """Channels-last x [B,C,...] → silu(normalize(x over C) · scale · gamma); gamma has C elements."""
    c = x.shape[1]
    rows = x.numel() // c
    y = torch.empty_like(x)  # keeps the channels-last layout
    block_c = max(16, 1 << (c - 1).bit_length())
    block_rows = max(1, 8192 // block_c)
    grid = (triton.cdiv(rows, block_rows),)
    _rms_norm_silu_kernel[grid](x, gamma.reshape(-1), y, rows, c, float(scale), 1e-12,
                                BLOCK_C=block_c, BLOCK_ROWS=block_rows, SILU=silu, num_warps=8)
    return y


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    """Contiguous half-precision x [B,S,H,D] → RMSNorm over H·D (weight [H·D]), then pairs (2i, 2i+1)
    rotated by cos/sin [S, D/2]; float32 inside, one rounding at the end."""
    b, s, h, d = x.shape
    y = torch.empty_like(x)
    pairs = h * d // 2
    _rms_norm_rope_kernel[(b * s,)](x, weight, cos.contiguous(), sin.contiguous(), y, s, pairs, d // 2, float(eps),
                                    BLOCK=max(16, 1 << (pairs - 1).bit_length()), num_warps=4)
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


def layer_norm_affine(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Contiguous x [B,S,C] → (LayerNorm(x)·a + b) in float32, cast to dtype; a, b: [B or 1, 1, C] or [C]."""
    bsz, s, c = x.shape
    a2, b2 = a.float().reshape(-1, c).contiguous(), b.float().reshape(-1, c).contiguous()
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    _layer_norm_affine_kernel[(bsz * s,)](x, a2, b2, y, s, c, a2.shape[0] > 1, b2.shape[0] > 1, float(eps),
                                          BLOCK=max(16, 1 << (c - 1).bit_length()), num_warps=4)
    return y


if triton_ok():
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, seq_len, n_pairs, half_d, eps,
                              BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK)
        mask = j < n_pairs
        base = row * n_pairs * 2
        xe = tl.load(x_ptr + base + 2 * j, mask=mask, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + base + 2 * j + 1, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(xe * xe + xo * xo, axis=0) / (2 * n_pairs) + eps)
        xe = xe * r * tl.load(w_ptr + 2 * j, mask=mask, other=0.0).to(tl.float32)
        xo = xo * r * tl.load(w_ptr + 2 * j + 1, mask=mask, other=0.0).to(tl.float32)
        angle = (row % seq_len) * half_d + j % half_d
        c = tl.load(cos_ptr + angle, mask=mask, other=0.0)
        s = tl.load(sin_ptr + angle, mask=mask, other=0.0)
        tl.store(y_ptr + base + 2 * j, (xe * c - xo * s).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptr + base + 2 * j + 1, (xe * s + xo * c).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _layer_norm_affine_kernel(x_ptr, a_ptr, b_ptr, y_ptr, seq_len, n_cols, a_per_batch, b_per_batch, eps,
                                  BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
        y = xc * tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
        batch = row // seq_len
        a = tl.load(a_ptr + tl.where(a_per_batch, batch, 0) * n_cols + cols, mask=mask, other=0.0)
        b = tl.load(b_ptr + tl.where(b_per_batch, batch, 0) * n_cols + cols, mask=mask, other=0.0)
        tl.store(y_ptr + row * n_cols + cols, (y * a + b).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_silu_kernel(x_ptr, g_ptr, y_ptr, n_rows, n_cols, scale, eps,
                              BLOCK_C: tl.constexpr, BLOCK_ROWS: tl.constexpr, SILU: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
        cols = tl.arange(0, BLOCK_C)[None, :]
        mask = (rows < n_rows) & (cols < n_cols)
        offs = rows * n_cols + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, axis=1))[:, None]
        y = x / tl.maximum(norm, eps) * scale * g
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
