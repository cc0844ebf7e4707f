""""auto": pick the fastest usable backend for this GPU, dtype and head size, by measuring.

The first time a (GPU, dtype, head size, sequence-length bucket) is seen, each usable exact-enough
backend runs a short probe at that length (kernels rank differently at 8k and 32k tokens); the
winner is remembered in memory and in the cache folder, so each probe runs once per machine. On CPU
the answer is TORCH_SDPA without probing.
"""
from __future__ import annotations

import json
import os
import time

import torch

CANDIDATES = ("TORCH_SDPA", "FLASH_ATTN", "SAGE_ATTN")
_memo: dict[str, str] = {}


def _cache_file() -> str:
    from ..env import cache_dir
    return os.path.join(cache_dir(), "attention_auto.json")


def choose(q: torch.Tensor) -> str:
    return choose_for(q.device, q.dtype, q.shape[-1], q.shape[-2], q.shape[1])


def length_bucket(seq_len: int) -> int:
    """Next power of two, at least 1,024 and at most 65,536 tokens."""
    return min(max(1024, 1 << max(0, seq_len - 1).bit_length()), 65536)


def choose_for(device, dtype: torch.dtype, head_dim: int, heads: int, seq_len: int = 32768) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return "TORCH_SDPA"
    bucket = length_bucket(seq_len)
    key = f"{torch.cuda.get_device_name(device)}|{dtype}|{head_dim}|{bucket}|torch{torch.__version__}"
    if key in _memo:
        return _memo[key]
    try:
        with open(_cache_file()) as f:
            _memo.update(json.load(f))
    except (OSError, ValueError):
        pass
    if key not in _memo:
        _memo[key] = _measure(device, dtype, head_dim, heads, bucket)
        try:
            with open(_cache_file(), "w") as f:
                json.dump(_memo, f, indent=1)
        except OSError:
            pass
    return _memo[key]


def _measure(device, dtype, head_dim, heads, tokens: int) -> str:
    from . import BACKENDS, backend_module
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype, generator=g) for _ in range(3))
    exact = backend_module("TORCH_SDPA").attend(q, k, v).float()
    best, best_t = "TORCH_SDPA", float("inf")
    for name in CANDIDATES:
        mod = backend_module(name)
        if name not in BACKENDS or mod.available():
            continue
        try:
            out = mod.attend(q, k, v)
            cos = torch.nn.functional.cosine_similarity(out.float().flatten(), exact.flatten(), dim=0).item()
            if cos < 0.999:  # auto never trades visible accuracy for speed
                continue
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(5):
                mod.attend(q, k, v)
            torch.cuda.synchronize(device)
            t = time.perf_counter() - start
        except Exception:
            continue
        if t < best_t:
            best, best_t = name, t
    return best
