"""INT8_ATTN: our own 8-bit attention (Triton): INT8 Q·Kᵀ and FP8 (e4m3) P·V with FP32 accumulation.

The SageAttention-2 recipe, in a kernel that installs with Triton and needs no compiler on the user's
machine. Why it stays close to exact:
- K is smoothed first (its per-head mean over tokens subtracted): every score in a row moves by the
  same q·mean, which softmax ignores, and the spread left for int8 is what varies between keys.
- Q and K get one int8 scale per block of tokens per head (not per tensor), so one outlier token only
  coarsens its own block.
- P lies in [0, 1]; scaled by 448 it fills e4m3's range. V is smoothed too (its channel mean goes
  around the product: each row of P/l sums to 1) and gets one e4m3 scale per head channel.
- Softmax runs online in FP32 with exp2 (log2(e)/√D folded into Q's scale), the row sum from the
  unquantised P, the P·V products accumulated per key block and added up in FP32.
`emulate()` is the same algorithm in torch, block for block: the CPU tests hold it to cosine ≥ 0.999
and relative L2 ≤ 3 % against exact attention, and the GPU tests hold the kernel to it.
"""
from __future__ import annotations

import functools
import math

import torch

FP8_MAX = 448.0
LOG2E = 1.4426950408889634


@functools.cache
def _kernel_problem(device_index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) < (8, 9):
        return (f"INT8_ATTN needs compute capability 8.9+ (Ada or Hopper) for fp8 tensor cores; "
                f"this GPU is {major}.{minor}.")
    try:
        import triton  # noqa: F401
    except Exception:
        return "INT8_ATTN needs Triton (`pip install triton`)."
    return None


def available() -> str | None:
    if not torch.cuda.is_available():
        return "INT8_ATTN needs a CUDA GPU (compute capability 8.9+)."
    return _kernel_problem(torch.cuda.current_device())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if (not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (64, 128)
            or v.shape[-1] != q.shape[-1] or _kernel_problem(q.device.index or 0)):
        from . import sdpa  # outside what the kernel covers: stay exact rather than fail
        return sdpa.attend(q, k, v)
    from .int8_kernel import attention
    with torch.cuda.device(q.device):
        return attention(q, k, v)


def _round_int8(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc().clamp_(-127, 127)  # half away from zero, as the kernel


def _block_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, H, S, D] fp32 → (int8 values as fp32, one scale per `block` tokens: [B, H, S])."""
    B, H, S, D = x.shape
    pad = -S % block
    blocks = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(B, H, -1, block, D)
    scale = (blocks.abs().amax(dim=(-1, -2), keepdim=True) / 127.0).clamp_min(1e-20)
    return _round_int8(blocks / scale).view(B, H, -1, D)[:, :, :S], scale.expand(-1, -1, -1, block, 1).reshape(
        B, H, -1)[:, :, :S]


def emulate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int = 128, block_n: int = 64,
            smooth_k: bool = True) -> torch.Tensor:
    """The kernel's quantised algorithm in torch (any device, fp32 math). [B, S, H, D] in and out."""
    D = q.shape[-1]
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))  # [B, H, S, D]
    if smooth_k:
        k = k - k.mean(dim=2, keepdim=True)
    q8, qs = _block_int8(q, block_m)
    qs = qs * (LOG2E / math.sqrt(D))
    k8, ks = _block_int8(k, block_n)
    v_mean = v.mean(dim=2, keepdim=True)  # [B, H, 1, D]; the rows of P/l sum to 1, so it is added back whole
    v = v - v_mean
    vs = (v.abs().amax(dim=2, keepdim=True) / FP8_MAX).clamp_min(1e-20)
    v8 = (v / vs).to(torch.float8_e4m3fn).float()
    B, H, S, _ = q.shape
    m = torch.full((B, H, S, 1), -math.inf, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(B, H, S, D, device=q.device)
    for start in range(0, k.shape[2], block_n):
        sl = slice(start, start + block_n)
        s = (q8 @ k8[:, :, sl].transpose(-1, -2)) * (qs[..., None] * ks[:, :, None, sl])  # log2 units
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s - m_new + math.log2(FP8_MAX))  # in [0, 448]: e4m3's range
        l = l * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + p.to(torch.float8_e4m3fn).float() @ v8[:, :, sl]
        m = m_new
    return (acc / l * vs + v_mean).transpose(1, 2)
