"""Layers whose stored weight dtype may differ from the compute dtype.

The models build their linears from here, so fp8 storage (plain or ComfyUI "scaled fp8") and,
later, offloading need no edits to the model code: the weight is cast (and scaled) at use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)


class Linear(nn.Linear):
    """nn.Linear that dequantises a low-precision weight at use: w.float() * scale_weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw):
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.register_buffer("scale_weight", None)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight
        if self.scale_weight is not None:
            return (w.float() * self.scale_weight.float()).to(dtype)
        return w if w.dtype == dtype else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), b)
