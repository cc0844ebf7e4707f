"""Triton kernel of `counted.attend`: attention over a few keys, each counted by its multiplicity.

One program holds all keys of one head (at most a few hundred; 128 for a folded Wan prompt) and
runs several blocks of queries against them: one softmax per block over every key at once, with each
key's log2 multiplicity added to its score in fp32. The work is about one read of q and one write of
the output. The first version, one query block a program in a flash-style key loop, ran at 0.42–0.55 ms
at 32,760 × 40 heads × 128 keys (H200), no faster than cuDNN over all 512 keys (0.58 ms): each program
read K and V again.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _counted_attn_fwd(Q, K, V, W, O, Sq, Lk, H, sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, swb,
                      qk_scale, q_blocks, D: tl.constexpr, BM: tl.constexpr, LK: tl.constexpr):
    """One program: q_blocks blocks of BM queries of one head, against all LK (≥ Lk) keys at once. K and V
    are read once per program, not once per query block: at 128 keys they are as big as 4 such blocks of q."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, LK)
    inside = offs_n < Lk
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :], mask=inside[:, None], other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :], mask=inside[:, None], other=0.0)
    w = tl.load(W + b * swb + offs_n, mask=inside, other=float("-inf"))  # log2 multiplicity; -inf: no key
    for i in range(q_blocks):
        offs_m = (chunk * q_blocks + i) * BM + tl.arange(0, BM)
        rows = offs_m[:, None] < Sq
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=rows, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale + w[None, :]
        p = tl.math.exp2(s - tl.max(s, 1)[:, None])  # key 0 is a real one: every row has a finite maximum
        out = tl.dot(p.to(v.dtype), v) / tl.sum(p, 1)[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=rows)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_count: torch.Tensor, block_m: int = 64,
              q_blocks: int = 8, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """q [B,Sq,H,D], k/v [B,Lk,H,D] half precision (any strides with a contiguous last dim), log_count
    [B,Lk] → [B,Sq,H,D] contiguous. Lk is rounded up to a power of two (≥ 16) inside."""
    b, sq, h, d = q.shape
    lk = k.shape[1]
    w = (log_count.float() * LOG2E).contiguous()
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty((b, sq, h, d), device=q.device, dtype=q.dtype)
    q_blocks = max(1, min(q_blocks, triton.cdiv(sq, block_m)))
    grid = (triton.cdiv(sq, block_m * q_blocks), b * h)
    _counted_attn_fwd[grid](q, k, v, w, out, sq, lk, h, q.stride(0), q.stride(1), q.stride(2),
                            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                            out.stride(0), out.stride(1), out.stride(2), w.stride(0),
                            LOG2E / math.sqrt(d), q_blocks, D=d, BM=block_m, LK=max(16, triton.next_power_of_2(lk)),
                            num_warps=num_warps, num_stages=num_stages)
    return out
