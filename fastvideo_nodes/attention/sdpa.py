"""torch.nn.functional.scaled_dot_product_attention (cuDNN / flash / efficient / math)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def available() -> bool:
    return True


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid=None) -> torch.Tensor:
    # SDPA wants [B, H, S, D]; the transposes are views.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
