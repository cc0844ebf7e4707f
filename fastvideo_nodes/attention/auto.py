""""auto": pick the fastest usable backend for this GPU, dtype and head size, by measuring.

The first time a (GPU, dtype, head size, sequence-length bucket) is seen, each usable backend runs a
short probe at that length (kernels rank differently at 8k and 32k tokens) on Wan-like inputs, and
is held to an accuracy guard against fp32 exact attention: cosine ≥ 0.999 and relative L2 error
≤ 3 %. Cosine alone lets through about 4 % of noise (8-bit kernels sit near that edge on plain
noise), so both are asked. The fastest backend that passes wins. The figures, the choice and why
are kept as one record per key, in memory and in the cache folder, so each probe runs once per
machine; the key names the GPU, torch, the backends' package versions and PROBE_VERSION, so a new
kernel is measured again. `last_choice()` returns the record behind the latest decision (for the
generation result and the attention node); each key's decision is logged once per process, with
every backend's figures (`summary`). On CPU the answer is TORCH_SDPA without probing.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from importlib import metadata

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CANDIDATES = ("TORCH_SDPA", "FLASH_ATTN", "FLASH_ATTN_4", "SAGE_ATTN", "INT8_ATTN", "KITCHEN_INT8")
MIN_COSINE = 0.999
MAX_REL_L2 = 0.03
PROBE_VERSION = 5  # bump when the probe or a kernel of ours changes what it would measure
_PACKAGES = {  # backend → the distributions whose version changes its figures
    "FLASH_ATTN": ("flash-attn", "flash_attn_3"),
    "FLASH_ATTN_4": ("flash-attn-4", "nvidia-cutlass-dsl"),
    "SAGE_ATTN": ("sageattention",),
    "INT8_ATTN": ("triton",),
    "KITCHEN_INT8": ("comfy-kitchen",),
}
_memo: dict[str, dict] = {}
_logged: set[str] = set()  # keys whose decision this process has logged
_last: dict | None = None


def _cache_file() -> str:
    from ..env import cache_dir
    return os.path.join(cache_dir(), "attention_auto.json")


def choose(q: torch.Tensor) -> str:
    return choose_for(q.device, q.dtype, q.shape[-1], q.shape[-2], q.shape[1])


def length_bucket(seq_len: int) -> int:
    """Next power of two, at least 1,024 and at most 65,536 tokens."""
    return min(max(1024, 1 << max(0, seq_len - 1).bit_length()), 65536)


def last_choice() -> dict | None:
    """The record of the latest auto decision in this process: choice, why, and each backend's figures."""
    return dict(_last) if _last else None


def choose_for(device, dtype: torch.dtype, head_dim: int, heads: int, seq_len: int = 32768) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return "TORCH_SDPA"
    bucket = length_bucket(seq_len)
    key = f"{torch.cuda.get_device_name(device)}|{dtype}|{head_dim}|{bucket}|torch{torch.__version__}|{_versions()}"
    return decide(key, lambda: probe(device, dtype, head_dim, heads, bucket))["choice"]


def decide(key: str, measure: Callable[[], dict]) -> dict:
    """The record for `key`: from memory, else from the cache file, else measured now and saved."""
    global _last
    if key not in _memo:
        try:
            with open(_cache_file()) as f:
                _memo.update({k: r for k, r in json.load(f).items() if isinstance(r, dict) and "choice" in r})
        except (OSError, ValueError, AttributeError):
            pass
    if key not in _memo:
        _memo[key] = {**measure(), "key": key}
        try:
            with open(_cache_file(), "w") as f:
                json.dump(_memo, f, indent=1)
        except OSError:
            pass
    _last = _memo[key]
    if key not in _logged:  # once per shape bucket and process, measured now or read from the cache
        _logged.add(key)
        logger.info("%s", summary(_last))
    return _last


def summary(record: dict) -> str:
    """One line: the choice, why, and each backend's guard figures and time (or why it was rejected)."""
    parts = []
    for name, row in record.get("backends", {}).items():
        figures = " ".join(f"{k} {row[k]}" for k in ("ms", "cosine", "rel_l2") if k in row)
        parts.append(f"{name} {figures}".strip() + (f" rejected: {row['rejected']}" if row.get("rejected") else ""))
    shape = f"{record.get('dtype')}, hd {record.get('head_dim')}, {record.get('tokens')} tokens"
    return (f"attention auto ({shape}): {record.get('choice')} ({record.get('why')})"
            + (f"; {'; '.join(parts)}" if parts else ""))


def guard(cosine: float, rel_l2: float) -> str | None:
    """None when an output is close enough to exact for auto to use its backend, else why not."""
    if not cosine >= MIN_COSINE:  # also catches NaN
        return f"cosine {cosine:.5f} < {MIN_COSINE}"
    if not rel_l2 <= MAX_REL_L2:
        return f"relative L2 error {rel_l2:.4f} > {MAX_REL_L2}"
    return None


def wan_like_inputs(tokens: int, heads: int, head_dim: int, device, dtype: torch.dtype, seed: int = 0):
    """q, k, v [1, tokens, heads, head_dim] shaped like a Wan DiT's: noise plus per-channel offsets
    shared by all tokens (large on K, as the SageAttention papers show for video DiTs), scores peaked
    enough that softmax is far from uniform."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape, chan = (1, tokens, heads, head_dim), (1, 1, heads, head_dim)
    noise = lambda: torch.randn(shape, generator=g, device=device)
    offset = lambda: torch.randn(chan, generator=g, device=device)
    q = 1.5 * noise() + 0.5 * offset()
    k = 1.5 * noise() + 2.0 * offset()
    v = noise() + offset()
    return q.to(dtype), k.to(dtype), v.to(dtype)


@functools.cache  # choose_for runs on every auto attention call
def _versions() -> str:
    found = []
    for dists in _PACKAGES.values():
        for dist in dists:
            try:
                found.append(f"{dist}{metadata.version(dist)}")
            except metadata.PackageNotFoundError:
                pass
    return f"probe{PROBE_VERSION}|" + ",".join(found)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(device, dtype: torch.dtype, head_dim: int, heads: int, tokens: int, modules: dict | None = None) -> dict:
    """Run each usable backend once against fp32 exact attention, time those that pass the guard."""
    if modules is None:
        from . import BACKENDS, backend_module
        modules = {name: backend_module(name) for name in CANDIDATES if name in BACKENDS}
    device = torch.device(device)
    q, k, v = wan_like_inputs(tokens, heads, head_dim, device, dtype)
    exact = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    figures: dict[str, dict] = {}
    for name, mod in modules.items():
        problem = mod.available()
        if problem:
            figures[name] = {"rejected": problem}
            continue
        try:
            out = mod.attend(q, k, v).float()
            cos = F.cosine_similarity(out.flatten(), exact.flatten(), dim=0).item()
            rel = ((out - exact).norm() / exact.norm()).item()
            row = {"cosine": round(cos, 6), "rel_l2": round(rel, 5), "rejected": guard(cos, rel)}
            if row["rejected"] is None:  # auto never trades visible accuracy for speed
                _sync(device)
                start = time.perf_counter()
                for _ in range(5):
                    mod.attend(q, k, v)
                _sync(device)
                row["ms"] = round((time.perf_counter() - start) / 5 * 1e3, 3)
        except Exception as e:  # a backend that fails here is simply not chosen
            row = {"rejected": f"failed: {e!r}"[:200]}
        figures[name] = row
        logger.info("attention auto probe %s (%s, hd %d, %d tokens, %d heads): %s",
                    name, dtype, head_dim, tokens, heads, row)
    timed = {n: r["ms"] for n, r in figures.items() if "ms" in r}
    if timed:
        choice = min(timed, key=lambda n: timed[n])
        why = f"fastest of {len(timed)} backends within cosine ≥ {MIN_COSINE} and L2 ≤ {MAX_REL_L2}"
    else:
        choice, why = "TORCH_SDPA", "no backend passed the accuracy guard; exact SDPA"
    return {"choice": choice, "why": why, "dtype": str(dtype), "head_dim": head_dim, "heads": heads,
            "tokens": tokens, "device": str(device), "guard": {"min_cosine": MIN_COSINE, "max_rel_l2": MAX_REL_L2},
            "backends": figures}
