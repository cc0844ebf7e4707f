"""The seams the DiT exposes, as typing.Protocols.

The DiT knows parallelism, caching and the attention kernel only through three small objects it
is handed per forward. These Protocols state their contracts in code, so that a checker (and
`isinstance`, they are runtime-checkable) can hold an implementation to them:

- `Attention`: what a block calls for attention (`AttentionSpec`, or Ulysses' wrapper of it).
- `ParallelPlan`: `enter` shards the sequence before the blocks, `exit` gathers it after (Ulysses).
- `BlockCache`: may replace the run through all blocks (TeaCache skips it on quiet steps).

Tokens are [B, S, C]; q, k, v are [B, S, H, D]; rope is (cos, sin), each [S, D/2].
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

Rope = tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class Attention(Protocol):
    @property
    def gated(self) -> bool:
        """True when self_attention weighs a compressed branch by a per-token gate (VIDEO_SPARSE_ATTN):
        a model with a gate projection (FastWan) then computes the gate and passes it."""
        ...

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       gate: torch.Tensor | None = None) -> torch.Tensor:
        """Over the video tokens → [B, Sq, H, D]; gate [B, Sq, H, D] or None."""
        ...

    def cross_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        log_count: torch.Tensor | None = None) -> torch.Tensor:
        """Video queries over the text tokens → [B, Sq, H, D]. log_count [B, Lk]: each key's log
        multiplicity (Wan's zero padding folded into one key, attention/counted.py), or None: once each."""
        ...


@runtime_checkable
class ParallelPlan(Protocol):
    def enter(self, tokens: torch.Tensor, rope: Rope, attn: Attention) -> tuple[torch.Tensor, Rope, Attention]:
        """The full sequence → this rank's shard of tokens and rope, and the attention to use on it."""
        ...

    def exit(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's shard → the full sequence."""
        ...


@runtime_checkable
class BlockCache(Protocol):
    def __call__(self, tokens: torch.Tensor, e: torch.Tensor, e0: torch.Tensor,
                 run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`run(tokens)` through all blocks, or an answer that stands in for it. e: the timestep
        embedding [B, dim]; e0: its projection [B, 6, dim]."""
        ...
