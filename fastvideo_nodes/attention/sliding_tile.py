"""SLIDING_TILE_ATTN: training-free sparse attention over 3D tiles of the latent video.

The token grid (t, h, w) is cut into tiles of `tile` tokens; tokens are reordered so each tile is
contiguous, and a query tile attends only to the key tiles within `window` tiles of it (in t, h
and w). With tile volumes a multiple of 128, FlexAttention's block mask skips whole blocks, so the
work falls with the window. Masks are built once per shape. `dense_steps` keeps the first sampling
steps dense, where the layout of the video is decided. `SlidingTileOptions` carries the three,
validated once, from the node or API down to `attend`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ..errors import FastVideoError


def _triple(name: str, value) -> tuple[int, int, int]:
    try:
        t = tuple(value)
    except TypeError:
        t = ()
    if len(t) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in t):
        raise FastVideoError(f"sliding-tile {name} must be three positive integers (t, h, w), got {value!r}.")
    return t


@dataclass(frozen=True)
class SlidingTileOptions:
    """tile: tokens per tile (t, h, w). window: tiles attended around the query's tile (t, h, w;
    odd sizes are centred, an even size w reaches w // 2 tiles each way). dense_steps: the first
    sampling steps that stay dense."""
    tile: tuple[int, int, int] = (4, 8, 8)
    window: tuple[int, int, int] = (3, 3, 5)
    dense_steps: int = 0

    def __post_init__(self):
        object.__setattr__(self, "tile", _triple("tile", self.tile))  # frozen: lists become tuples once
        object.__setattr__(self, "window", _triple("window", self.window))
        if isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise FastVideoError(f"sliding-tile dense_steps must be an integer ≥ 0, got {self.dense_steps!r}.")


PRESETS = {
    "wan-480p": SlidingTileOptions(tile=(4, 8, 8), window=(3, 3, 5)),
    "wan-720p": SlidingTileOptions(tile=(4, 8, 8), window=(3, 3, 5)),
    "wide": SlidingTileOptions(tile=(4, 8, 8), window=(5, 5, 7)),
}
DEFAULT = "wan-480p"


def available() -> str | None:
    return None


@functools.lru_cache(maxsize=16)
def _layout(grid, tile, window, device):
    """Token order (tile-major), padding validity and the block mask for one shape."""
    padded = [math.ceil(n / s) * s for n, s in zip(grid, tile)]
    tiles = [p // s for p, s in zip(padded, tile)]
    vol = math.prod(tile)
    # Position of every padded-grid token in tile-major order.
    t, h, w = (torch.arange(p, device=device) for p in padded)
    tt, th, tw = torch.meshgrid(t, h, w, indexing="ij")
    tile_id = ((tt // tile[0]) * tiles[1] + th // tile[1]) * tiles[2] + tw // tile[2]
    within = ((tt % tile[0]) * tile[1] + th % tile[1]) * tile[2] + tw % tile[2]
    order = torch.argsort((tile_id * vol + within).flatten())  # tile-major slot → padded-grid index
    pt, ph, pw = (c.flatten()[order] for c in (tt, th, tw))
    valid = (pt < grid[0]) & (ph < grid[1]) & (pw < grid[2])
    source = torch.where(valid, (pt * grid[1] + ph) * grid[2] + pw, torch.zeros_like(pt))  # index in [S]
    ct, ch, cw = (c.flatten() for c in torch.meshgrid(*(torch.arange(n, device=device) for n in tiles),
                                                        indexing="ij"))  # tile id → tile coordinates
    wt, wh, ww = (x // 2 for x in window)

    def mask_mod(b, hd, q_idx, kv_idx):
        tq, tk = q_idx // vol, kv_idx // vol
        near = ((ct[tq] - ct[tk]).abs() <= wt) & ((ch[tq] - ch[tk]).abs() <= wh) & ((cw[tq] - cw[tk]).abs() <= ww)
        return near & valid[kv_idx]

    n = math.prod(padded)
    block = 128 if vol % 128 == 0 else vol
    # On the GPU the mask is built by a compiled kernel block by block; evaluated eagerly it would
    # materialise all S² pairs.
    mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device, BLOCK_SIZE=block,
                             _compile=str(device).startswith("cuda"))
    return source, valid, mask, mask_mod


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def dense_mask(grid, tile=PRESETS[DEFAULT].tile, window=PRESETS[DEFAULT].window, device="cpu"):
    """The [S, S] boolean mask STA applies, in the original token order (for tests)."""
    source, valid, _, mask_mod = _layout(tuple(grid), tuple(tile), tuple(window), str(device))
    n = source.numel()
    idx = torch.arange(n, device=device)
    m = mask_mod(None, None, idx[:, None], idx[None, :])
    s = math.prod(grid)
    out = torch.zeros(s, s, dtype=torch.bool, device=device)
    vq = idx[valid]
    out[source[vq][:, None], source[vq][None, :]] = m[vq][:, vq]
    return out


def density(grid, tile=PRESETS[DEFAULT].tile, window=PRESETS[DEFAULT].window) -> float:
    """Fraction of the dense query·key pairs that STA computes, counted per tile pair."""
    tiles = [math.ceil(n / s) for n, s in zip(grid, tile)]
    counts = []  # real tokens per tile along each axis
    for n, s, m in zip(grid, tile, tiles):
        counts.append(torch.tensor([min(s, n - i * s) for i in range(m)], dtype=torch.float64))
    total = 1.0
    for c, w in zip(counts, window):  # the window factorises over the axes
        i = torch.arange(len(c))
        near = ((i[:, None] - i[None, :]).abs() <= w // 2).double()
        total *= float(c @ near @ c)
    return total / float(math.prod(grid)) ** 2


def attend(q, k, v, *, grid=None, step=None, options: SlidingTileOptions | None = None):
    """q, k, v: [B, S, H, D] with S = t·h·w of `grid` → [B, S, H, D]. options: None = the default preset."""
    options = options or PRESETS[DEFAULT]
    if grid is None or math.prod(grid) != q.shape[1] or (step is not None and step < options.dense_steps):
        from . import sdpa
        return sdpa.attend(q, k, v)
    source, valid, mask, _ = _layout(tuple(grid), options.tile, options.window, str(q.device))
    # Gather into tile-major order (padding slots read token 0; they are masked as keys, dropped as queries).
    gather = lambda x: x[:, source].transpose(1, 2)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    out = fn(gather(q), gather(k), gather(v), block_mask=mask).transpose(1, 2)  # [B, S_pad, H, D]
    result = torch.empty_like(q)
    result[:, source[valid]] = out[:, valid]
    return result
