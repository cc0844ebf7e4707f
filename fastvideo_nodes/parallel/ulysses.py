"""Ulysses sequence parallelism around the unchanged DiT.

Each of N ranks keeps S/N tokens between attention calls. Around self-attention an all-to-all
turns "all heads of my tokens" into "my heads of all tokens", attention runs on the full sequence
(any backend; VIDEO_SPARSE_ATTN's per-token gate is exchanged like q, k, v), and a second
all-to-all turns it back. Cross-attention needs no exchange: local queries attend to the full text.
RoPE is computed for the full sequence and sharded like the tokens.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import FastVideoError
from ..models.seams import Attention, Rope


def check_degree(num_heads: int, degree: int) -> None:
    if degree < 1 or num_heads % degree:
        ok = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise FastVideoError(f"num_gpus {degree} does not divide the model's {num_heads} attention heads; "
                             f"sequence parallelism needs one of {ok}.")


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x [N, ...] → [N, ...]: block i goes to rank i; the result's block j came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class UlyssesAttention:
    """Wraps an Attention (seams.py): self-attention exchanges heads for sequence, cross-attention is local."""

    def __init__(self, inner: Attention, plan: UlyssesPlan):
        self.inner, self.plan = inner, plan

    @property
    def gated(self) -> bool:
        return self.inner.gated

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       gate: torch.Tensor | None = None) -> torch.Tensor:
        """q, k, v and gate [B, S/N, H, D] (sequence-sharded) → [B, S/N, H, D]. The gate is per token
        and head like q, so it takes the same exchange."""
        s = self.plan.seq_len
        qf, kf, vf = (self._to_heads(t)[:, :s] for t in (q, k, v))  # [B, S, H/N, D], padding dropped
        gf = self._to_heads(gate)[:, :s] if gate is not None else None
        out = self.inner.self_attention(qf, kf, vf, gf)
        out = F.pad(out, (0, 0, 0, 0, 0, self.plan.padded - s))
        return self._to_tokens(out, q.shape[2])

    def cross_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        log_count: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.cross_attention(q, k, v, log_count)

    def _to_heads(self, x):
        b, sl, h, d = x.shape
        n = self.plan.world
        x = x.view(b, sl, n, h // n, d).permute(2, 0, 1, 3, 4)  # [N, B, S/N, H/N, D]
        x = _all_to_all(x, self.plan.group)  # block j = rank j's tokens, my heads
        return x.permute(1, 0, 2, 3, 4).reshape(b, n * sl, h // n, d)

    def _to_tokens(self, x, heads):
        b, s_pad, hl, d = x.shape
        n = self.plan.world
        x = x.view(b, n, s_pad // n, hl, d).permute(1, 0, 2, 3, 4)  # [N, B, S/N, H/N, D]
        x = _all_to_all(x, self.plan.group)  # block j = my tokens, rank j's heads
        return x.permute(1, 2, 0, 3, 4).reshape(b, s_pad // n, heads, d)


class UlyssesPlan:
    """The DiT's `parallel=` hook (a seams.ParallelPlan): enter() shards tokens and RoPE, exit()
    gathers the sequence."""

    def __init__(self, group=None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def enter(self, tokens: torch.Tensor, rope: Rope, attn: Attention) -> tuple[torch.Tensor, Rope, Attention]:
        self.seq_len = tokens.shape[1]
        self.padded = -(-self.seq_len // self.world) * self.world
        pad = self.padded - self.seq_len

        def shard(t):  # tokens [B, S, C] and rope [S, D/2]: the sequence is the second-to-last dim
            return F.pad(t, (0, 0, 0, pad)).chunk(self.world, dim=-2)[self.rank]
        cos, sin = rope
        return shard(tokens), (shard(cos), shard(sin)), UlyssesAttention(attn, self)

    def exit(self, tokens: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tokens) for _ in range(self.world)]
        dist.all_gather(parts, tokens.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, : self.seq_len]
