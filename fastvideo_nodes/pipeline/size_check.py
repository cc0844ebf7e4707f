"""Will a video of this size fit in memory? A rough estimate, made before any work.

Without it a size no machine can hold (width 100000, 100001 frames) ends in an allocator traceback
or a machine that swaps for minutes. The estimate counts only what grows with the video; the weights
are the loader's business (block offload). It is deliberately on the low side, so it refuses only
sizes that surely do not fit and never a run that would have worked.

- DiT: tokens = T'·(H/16)·(W/16) (VAE stride 4×8×8, patch 1×2×2). At its peak a block holds about
  8·dim + 2·ffn_dim values per token (residual, normed input, q, k, v, attention output, the FFN
  hidden and its activation), in the compute dtype. Attention kernels are memory-efficient, so there
  is no tokens² term. Sequence parallel splits the tokens over the GPUs.
- VAE decode: one latent frame at a time, i.e. 4 output frames at full resolution × 96 channels ×
  about 4 live tensors, in the compute dtype.
- Frames: float32 [T,H,W,3], twice (the clamped copy when writing).
The DiT and the VAE do not run at once, so the peak is the larger of the two plus the frames.
"""
from __future__ import annotations

import os

import torch

from ..errors import FastVideoError
from .sampler import SamplingSettings

DIT_HIDDEN_COPIES, DIT_FFN_COPIES = 8, 2
VAE_VALUES_PER_PIXEL = 4 * 96 * 4   # frames per latent frame × channels × live tensors
FRAME_BYTES_PER_PIXEL = 3 * 4 * 2   # RGB float32, twice


def estimate_bytes(settings: SamplingSettings, dim: int, ffn_dim: int, dtype: torch.dtype,
                   num_gpus: int = 1) -> int:
    """Bytes that grow with the video size on the busiest device (see the module docstring)."""
    _, _, t, h, w = settings.latent_shape
    tokens = t * (h // 2) * (w // 2)
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 2
    dit = -(-tokens // num_gpus) * (DIT_HIDDEN_COPIES * dim + DIT_FFN_COPIES * ffn_dim) * size
    pixels = settings.height * settings.width
    vae = pixels * VAE_VALUES_PER_PIXEL * size
    frames = settings.num_frames * pixels * FRAME_BYTES_PER_PIXEL
    return max(dit, vae) + frames


def available_bytes(device: torch.device) -> int:
    """Free GPU memory on a CUDA device, else the host RAM still available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(settings: SamplingSettings, dim: int, ffn_dim: int, dtype: torch.dtype, device: torch.device,
               num_gpus: int = 1, available: int | None = None) -> None:
    """Raise FastVideoError when the size surely does not fit, naming the largest sizes that would."""
    available = available_bytes(device) if available is None else available

    def fits(height: int, width: int, num_frames: int) -> bool:
        s = SamplingSettings(height=height, width=width, num_frames=num_frames)
        return estimate_bytes(s, dim, ffn_dim, dtype, num_gpus) <= available

    h, w, n = settings.height, settings.width, settings.num_frames
    if fits(h, w, n):
        return
    need = estimate_bytes(settings, dim, ffn_dim, dtype, num_gpus)
    hints = []
    k = _largest(lambda k: fits(h, w, 4 * k + 1), (n - 1) // 4)
    if k is not None:
        hints.append(f"{4 * k + 1} frames at {w}x{h}")
    j = _largest(lambda j: fits(16 * j, _scaled(w, h, 16 * j), n), h // 16 - 1, low=1)
    if j is not None:
        hints.append(f"about {_scaled(w, h, 16 * j)}x{16 * j} at {n} frames")
    where = "free GPU memory" if device.type == "cuda" else "available host RAM"
    fix = "the largest that fits: " + " or ".join(hints) if hints else "not even 16x16 with 1 frame fits"
    raise FastVideoError(f"height/width/num_frames {w}x{h}x{n} needs about {need / 2**30:.1f} GB for latents and "
                         f"activations on {device}, but {available / 2**30:.1f} GB is {where}; {fix}.")


def _scaled(width: int, height: int, new_height: int) -> int:
    """The width that keeps the aspect ratio at new_height, on the multiple-of-16 grid."""
    return max(16, round(width * new_height / height / 16) * 16)


def _largest(ok, high: int, low: int = 0) -> int | None:
    """The largest i in [low, high] with ok(i), for ok monotone (true up to some i); None when none."""
    if high < low or not ok(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if ok(mid) else (low, mid - 1)
    return low
