"""The one place where the models do attention.

`attention(q, k, v, ...)` takes and returns [B, S, H, D]. The backend is chosen by, in order:
an explicit name (SetAttentionBackend node, `attention_backend=`, `--attention-backend`), the
environment variable FASTVIDEO_ATTENTION_BACKEND, then "auto".
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import FastVideoError
from . import sdpa

ENV_VAR = "FASTVIDEO_ATTENTION_BACKEND"
BACKENDS = {"TORCH_SDPA": sdpa}


def resolve_backend(name: str | None) -> str:
    """Explicit name > environment variable > auto; returns a registered backend name."""
    chosen = name or os.environ.get(ENV_VAR) or "auto"
    chosen = chosen.strip().upper()
    if chosen == "AUTO":
        return "TORCH_SDPA"
    if chosen not in BACKENDS:
        raise FastVideoError(f"attention backend {chosen!r} is unknown; valid names: auto, {', '.join(BACKENDS)}.")
    return chosen


@dataclass(frozen=True)
class AttentionSpec:
    """What one DiT forward needs to know to do attention.

    backend: a registered name (already resolved). grid: the latent token grid (t, h, w) of the
    self-attention sequence, for backends that use the video's geometry (sparse tiles).
    """
    backend: str = "TORCH_SDPA"
    grid: tuple[int, int, int] | None = None

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, backend=self.backend, grid=self.grid)

    def cross_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, backend=self.backend, grid=None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None,
              grid: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Non-causal attention. q: [B, Sq, H, D], k/v: [B, Sk, H, D] → [B, Sq, H, D]."""
    return BACKENDS[resolve_backend(backend)].attend(q, k, v, grid=grid)
