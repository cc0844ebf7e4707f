"""Attention over keys that each stand for several identical ones: Wan's text padding folded into one key.

Wan pads every prompt's embeddings with zero rows to 512 tokens and its cross-attention attends over all
512 keys, unmasked (the original code, diffusers and ComfyUI alike). The padded rows all become the same
key and value, and attention over n copies of a key equals attention over one copy whose softmax weight
is n·exp(s). So `attend` takes each key's natural-log multiplicity (0: once; log n: the folded padding;
-inf: an empty slot that rounds the key count up to a bucket) and adds it to the score in fp32: the same
result up to rounding, over 128 keys instead of 512 for a prompt of up to 127 tokens (longer prompts keep
all 512 keys: models/wan_dit.TEXT_KEY_BUCKETS says why).

The kernel (`counted_kernel.py`, Triton) runs for half-precision CUDA tensors with D of 64 or 128; other
inputs take the torch path (fp32 math). Inside compiled blocks it is one opaque op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.triton_kernels import triton_available


def kernel_applies(q: torch.Tensor, v: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128)
            and v.shape[-1] == q.shape[-1] and triton_available())


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_count: torch.Tensor) -> torch.Tensor:
    """The torch path: fp32 SDPA with the log multiplicities as an additive mask. [B,S,H,D] in and out."""
    q32, k32, v32 = (x.float().transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=log_count.float()[:, None, None, :])
    return out.transpose(1, 2).to(q.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_count: torch.Tensor) -> torch.Tensor:
    if not kernel_applies(q, v):
        return reference(q, k, v, log_count)
    from .counted_kernel import attention
    with torch.cuda.device(q.device):
        return attention(q, k, v, log_count)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_count: torch.Tensor) -> torch.Tensor:
    """q [B,Sq,H,D], k/v [B,Lk,H,D], log_count [B,Lk] (each key's log multiplicity; the first key of each
    row must be a real one, i.e. finite) → [B,Sq,H,D]."""
    if torch.compiler.is_compiling():
        return torch.ops.fastvideo.counted_attention(q, k, v, log_count)
    return _attend(q, k, v, log_count)


@torch.library.custom_op("fastvideo::counted_attention", mutates_args=())
def _counted_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_count: torch.Tensor) -> torch.Tensor:
    return _attend(q, k, v, log_count).contiguous()


@_counted_attention.register_fake
def _(q, k, v, log_count):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
