"""One function per fused operation of the Wan models; each picks its implementation inside.

The models call these and read like Wan's reference; which kernel runs is decided here, as
`attention()` decides the attention backend. For each op the torch math below is written once:
it is the CPU path and the reference the GPU tests compare the kernels with.

  rms_norm_rope        q/k RMSNorm over all heads, then interleaved 3D RoPE (DiT self-attention)
  layer_norm_modulate  LayerNorm (no affine)·(1 + scale) + shift, cast to the compute dtype
  layer_norm_affine    the affine LayerNorm before cross-attention, cast to the compute dtype
  residual_layer_norm  a residual add (gated or not), then LayerNorm·a + b of the new stream
  rms_norm_channels    the VAE's RMSNorm over channels, optionally followed by SiLU
  linear_gelu          GELU(tanh)(Linear(x)), fused into the matmul epilogue on CUDA

Choices (measured): eager CUDA runs take the one-pass Triton kernels; inside a torch.compile region
the RoPE op and the LayerNorms stay opaque custom ops: their single pass beat Inductor's kernels
(which read a 5,120-wide row twice). Wan 2.2's per-token modulation takes the torch math everywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_kernels as tk
from .linear import Linear

HALF = (torch.bfloat16, torch.float16)


# -- the seams the dispatch reads (tests replace them to take the GPU branches on a CPU)

def _cuda(x: torch.Tensor) -> bool:
    return x.is_cuda


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _triton_eager(x: torch.Tensor) -> bool:
    """An eager CUDA call where the Triton kernels can run. Compiling is checked before Triton, so
    traced code never reaches the (cached, importing) Triton check."""
    return _cuda(x) and not _compiling() and tk.triton_available()


def channels_last(x: torch.Tensor) -> bool:
    """True when channels are the innermost (stride-1) dim of a 4D/5D tensor."""
    return x.dim() in (4, 5) and x.stride(1) == 1 and x.shape[1] > 1 and \
        x.permute(0, *range(2, x.dim()), 1).is_contiguous()


# -- RMSNorm + RoPE

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in x's dtype (float32 inside torch's kernel), as torch.nn.RMSNorm."""
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B,S,H,D] by angles cos/sin [S, D/2], in float32."""
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    if not _compiling():  # eager: one complex multiply instead of six passes
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * torch.complex(c, s)).flatten(-2).type_as(x)
    xf = x.float().unflatten(-1, (-1, 2))  # compiled: real arithmetic, which Inductor fuses
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).type_as(x)


def rms_norm_rope_impl(x: torch.Tensor) -> str:
    """"custom_op", "triton" or "torch": what rms_norm_rope runs for x."""
    if not (_cuda(x) and x.dtype in HALF):
        return "torch"
    if _compiling():
        return "custom_op"  # compile_blocks has checked that Triton is there
    return "triton" if tk.triton_available() and x.is_contiguous() else "torch"


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """x [B,S,H,D] → RMSNorm over H·D (weight [H·D], as Wan's q/k norm), then interleaved RoPE by
    cos/sin [S, D/2]; the result in x's dtype."""
    impl = rms_norm_rope_impl(x)
    if impl == "custom_op":
        return tk.rms_norm_rope_op(x, weight, cos, sin, eps)
    if impl == "triton":
        return tk.rms_norm_rope(x, weight, cos, sin, eps)
    return apply_rope(rms_norm(x.flatten(2), weight, eps).unflatten(-1, x.shape[2:]), cos, sin)


# -- LayerNorm + modulation / affine

def layer_norm_impl(x: torch.Tensor, *params: torch.Tensor | None) -> str:
    """"custom_op" (compiled), "triton" (eager) or "torch": what the LayerNorm ops run for x [B,S,C].
    The kernels take per-sample params ([B or 1, 1, C] or [C]), not per-token ones."""
    c = x.shape[-1]
    if not (_cuda(x) and x.dim() == 3 and all(p is None or p.numel() in (c, x.shape[0] * c) for p in params)):
        return "torch"
    if _compiling():
        return "custom_op"  # compile_blocks has checked that Triton is there
    return "triton" if tk.triton_available() and x.is_contiguous() else "torch"


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim without affine, in float32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


def _layer_norm_ab(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    impl = layer_norm_impl(x, a, b)
    if impl == "custom_op":
        return tk.layer_norm_affine_op(x, a, b, eps, dtype)
    if impl == "triton":
        return tk.layer_norm_affine(x, a, b, eps, dtype)
    return torch.addcmul(b, layer_norm(x, eps), a).to(dtype)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                        dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm(x)·(1 + scale) + shift in float32, cast to dtype. x [B,S,C]; shift, scale
    [B or 1, 1, C] float32 (Wan's modulation), or [B,S,C] (per token)."""
    return _layer_norm_ab(x, 1 + scale, shift, eps, dtype)


def layer_norm_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm(x) with weight and bias [C], in float32, cast to dtype."""
    return _layer_norm_ab(x, weight, bias, eps, dtype)


def residual_layer_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, a: torch.Tensor,
                        b: torch.Tensor, eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y·gate, LayerNorm(x + y·gate)·a + b cast to dtype): a block's residual add and the norm
    after it. x float32 [B,S,C], y [B,S,C]; gate (None: x + y), a, b as layer_norm_impl takes them."""
    impl = layer_norm_impl(x, gate, a, b)
    if impl == "custom_op":
        return tk.residual_layer_norm_op(x, y, gate, a, b, eps, dtype)
    if impl == "triton":
        return tk.residual_layer_norm(x, y.contiguous(), gate, a, b, eps, dtype)
    x = x + y if gate is None else torch.addcmul(x, y, gate)
    return x, torch.addcmul(b, layer_norm(x, eps), a).to(dtype)


# -- the VAE's RMSNorm over channels

def rms_norm_channels_impl(x: torch.Tensor) -> str:
    """"triton" or "torch": the kernel reads channels-last tensors only."""
    return "triton" if _triton_eager(x) and channels_last(x) else "torch"


def rms_norm_channels(x: torch.Tensor, gamma: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """x [B,C,...] L2-normalised over C, times √C·gamma (gamma broadcasts over C), then SiLU if
    asked; the layout of x is kept."""
    scale = x.shape[1] ** 0.5
    if rms_norm_channels_impl(x) == "triton":
        return tk.rms_norm_silu(x, gamma, scale, silu=silu)
    y = F.normalize(x, dim=1) * scale * gamma
    return F.silu(y) if silu else y


# -- Linear + GELU

def linear_gelu_impl(layer: Linear, x: torch.Tensor) -> str:
    """"cublaslt" (GELU in the matmul's epilogue) for a plain weight in x's dtype on CUDA, else "torch"."""
    plain = layer.weight.dtype == x.dtype and layer.scale_weight is None and layer.bias is not None
    return "cublaslt" if _cuda(x) and plain else "torch"


def linear_gelu(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    """GELU(tanh)(layer(x))."""
    if linear_gelu_impl(layer, x) == "cublaslt":
        out = torch._addmm_activation(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], -1)
    return F.gelu(layer(x), approximate="tanh")
