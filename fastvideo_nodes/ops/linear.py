"""Layers whose stored weight dtype may differ from the compute dtype.

The models build their linears from here, so fp8 storage (plain, ComfyUI "scaled fp8", or our own
per-channel scaled fp8) and offloading need no edits to the model code: the weight is cast (and
scaled) at use. With `fp8_matmul` on (weight_storage "fp8_e4m3fn_fast") an fp8 weight is not cast
at all: activations are quantised per token and the product runs on fp8 tensor cores (Ada/Hopper+).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)


def quantize_fp8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[N,K] weight → (fp8 weight, float32 scale [N,1]) with one scale per output channel, so that
    each row uses the whole fp8 range (a plain cast flushes Wan's ~0.02-sized weights toward fp8's
    subnormals)."""
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / torch.finfo(dtype).max).clamp_min(1e-12)
    return (w / scale).to(dtype), scale


def fp8_matmul_supported(device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [...,K] @ w[N,K]ᵀ with w float8_e4m3fn: x is quantised to e4m3 with one scale per token.

    CUDA runs torch._scaled_mm (fp8 tensor cores); elsewhere the same arithmetic in float32, which
    is what the tests compare with."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    sx = (x2.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp_min(1e-12)  # e4m3 max is 448
    xq = (x2.float() / sx).to(torch.float8_e4m3fn)
    n = w.shape[0]
    sw = (w_scale.float().reshape(-1) if w_scale is not None else x.new_ones(1, dtype=torch.float32)).expand(n)
    if x.is_cuda:
        b = bias.to(x.dtype) if bias is not None else None
        out = torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=sw.reshape(1, n).contiguous(), bias=b, out_dtype=x.dtype)
    else:
        out = (xq.float() * sx) @ (w.float() * sw[:, None]).t()
        out = (out + bias.float() if bias is not None else out).to(x.dtype)
    return out.reshape(*shape[:-1], n)


class Linear(nn.Linear):
    """nn.Linear that dequantises a low-precision weight at use: w.float() * scale_weight."""

    fp8_matmul = False  # set per layer by enable_fp8_matmul
    scale_weight: torch.Tensor | None  # a buffer: fp8 weights' scale (per tensor or per output channel)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw):
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.register_buffer("scale_weight", None)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight
        if self.scale_weight is not None:
            return (w.float() * self.scale_weight.float()).to(dtype)
        return w if w.dtype == dtype else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_matmul and x.dtype in (torch.bfloat16, torch.float16):
            return fp8_linear(x, self.weight, self.scale_weight, self.bias)
        b: torch.Tensor | None = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), b)


def enable_fp8_matmul(module: nn.Module) -> int:
    """Run every e4m3fn-weighted Linear of `module` on fp8 tensor cores; returns how many.
    _scaled_mm needs both dims to be multiples of 16 and one scale per channel or per tensor."""
    count = 0
    for m in module.modules():
        if isinstance(m, Linear) and m.weight.dtype == torch.float8_e4m3fn and \
                m.in_features % 16 == 0 and m.out_features % 16 == 0 and \
                (m.scale_weight is None or m.scale_weight.numel() in (1, m.out_features)):
            m.fp8_matmul = True
            count += 1
    return count
