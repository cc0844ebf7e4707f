"""The Triton path's set-up of VIDEO_SPARSE_ATTN in few launches: the tile choice and the kernel's index
table in one (`select`, for `tables(top_tiles(scores, sparsity), counts)`, which took ten-odd torch
ops and a sort), and the three gathers of q, k, v in one (`gather3`; for inputs already in tile order,
`means3`: their tile means alone).

`select` needs no sort. For each row of compressed scores (one or more a program) it finds the k-th largest
value by building it bit by bit (32 passes of count(key ≥ candidate)) over int32 keys that order as
the floats do; the row keeps the scores above it and, of those equal to it, the lowest tile ids.
Each kept tile's place in the row is its group's offset plus its rank in the group (a prefix sum),
so the row comes out ordered by group and by tile id within a group, as `tables` orders it.

Ties: among equal scores the lower tile id is kept (torch.topk leaves that order unspecified);
-0.0 equals 0.0. A NaN score counts as the largest, as in torch.topk.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .video_sparse_kernel import BLOCK, _gather


@triton.jit
def _select(S, COUNTS, STARTS, IDX, ENDS, R, N, k, NP: tl.constexpr, ROWS: tl.constexpr, PACKED: tl.constexpr):
    """Program p: rows p·ROWS.. of scores [R, N] fp32 → their k kept tiles into IDX [R, k] and group ends
    into ENDS [R, 3]. PACKED: each kept tile as `start · 64 + count − 1` (the kernel's `pack`), not its id."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, NP)
    live = (rows < R)[:, None] & (cols < N)[None, :]
    x = tl.load(S + rows[:, None] * N + cols[None, :], mask=live, other=0.0)
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with 0.0
    x = tl.where(x != x, float("nan"), x)  # every NaN positive: above +inf, as torch.topk has it
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negatives reversed: signed key order = float order
    key = tl.where(live, key, -2147483648)  # padding sorts below every score, -inf included
    # Each row's k-th largest key, highest bit first: the sign (is it ≥ 0?), then each of the 31 others.
    thr = tl.where(tl.sum((key >= 0).to(tl.int32), 1) >= k, 0, -2147483648)
    for b in tl.static_range(30, -1, -1):
        cand = thr | (1 << b)
        thr = tl.where(tl.sum((key >= cand[:, None]).to(tl.int32), 1) >= k, cand, thr)
    above = key > thr[:, None]
    tie = key == thr[:, None]
    room = k - tl.sum(above.to(tl.int32), 1)  # ties kept, the lowest tile ids first
    keep = live & (above | (tie & (tl.cumsum(tie.to(tl.int32), 1) <= room[:, None])))  # rows past R: none
    c = tl.load(COUNTS + cols, mask=cols < N, other=0)
    group = tl.where(c == 64, 0, tl.where(c <= 16, 1, tl.where(c <= 32, 2, 3)))[None, :]
    pos = tl.zeros([ROWS, NP], tl.int32)
    end = tl.zeros([ROWS], tl.int32)
    for g in tl.static_range(4):
        mine = keep & (group == g)
        pos = tl.where(mine, end[:, None] + tl.cumsum(mine.to(tl.int32), 1) - 1, pos)
        end += tl.sum(mine.to(tl.int32), 1)
        if g < 3:
            tl.store(ENDS + rows * 3 + g, end, mask=rows < R)
    if PACKED:
        entry = (tl.load(STARTS + cols, mask=cols < N, other=0) * 64 + c - 1).to(tl.int32)
    else:
        entry = cols
    tl.store(IDX + rows[:, None] * k + pos, tl.broadcast_to(entry[None, :], [ROWS, NP]), mask=keep)


def select(scores: torch.Tensor, counts: torch.Tensor, k: int, rows: int | None = None,
           starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, H, N, N] fp32 compressed scores, counts [N] real tokens per tile (any int), k key tiles
    per query tile (1..N) → (index [B, H, N, k] int32, ends [B, H, N, 3] int32), what
    `tables(top_tiles(scores, sparsity), counts)` gives (ties: the lower tile id is kept).
    rows: score rows per program, a power of two (None: about 1024 scores a program).
    starts: [N] int32 each tile's first token in tile order: the index then comes `pack`ed for it."""
    *lead, N = scores.shape
    if not 1 <= k <= N:
        raise ValueError(f"video sparse select: k must be in [1, {N}], got {k}")
    scores = scores.float().contiguous()
    index = torch.empty(*lead, k, dtype=torch.int32, device=scores.device)
    ends = torch.empty(*lead, 3, dtype=torch.int32, device=scores.device)
    R = scores.numel() // N
    NP = triton.next_power_of_2(N)
    rows = rows or max(1, 1024 // NP)
    _select[(triton.cdiv(R, rows),)](scores, counts, starts if starts is not None else counts, index, ends, R, N, k,
                                     NP=NP, ROWS=rows, PACKED=starts is not None,
                                     num_warps=max(1, min(8, rows * NP // 256)))
    return index, ends


@triton.jit
def _gather3(Q, K, V, TOK, COUNTS, QT, KT, VT, QM, KM, VM, N, H, sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
             stb, sts, sth, D: tl.constexpr, STORE: tl.constexpr):
    """Program (tile, b·H + h): `_gather`'s work for q, k and v in turn (its program ids are ours)."""
    _gather(Q, TOK, COUNTS, QT, QM, N, H, sqb, sqs, sqh, stb, sts, sth, D, STORE)
    _gather(K, TOK, COUNTS, KT, KM, N, H, skb, sks, skh, stb, sts, sth, D, STORE)
    _gather(V, TOK, COUNTS, VT, VM, N, H, svb, svs, svh, stb, sts, sth, D, STORE)


def gather3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor):
    """`gather` of q, k, v [B, S, H, D] in one launch → ((tiles, means) for each), tiles [B, N·64, H, D]
    contiguous, means [B, H, N, D] fp32."""
    B, _, H, D = q.shape
    N = counts.numel()
    xs = [x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v)]
    tiles = [torch.empty(B, N * BLOCK, H, D, dtype=x.dtype, device=x.device) for x in xs]
    means = [torch.empty(B, H, N, D, dtype=torch.float32, device=x.device) for x in xs]
    t = tiles[0]
    _gather3[(N, B * H)](*xs, tokens, counts, *tiles, *means, N, H, *(s for x in xs for s in x.stride()[:3]),
                         t.stride(0), t.stride(1), t.stride(2), D=D, STORE=True)
    return tuple(zip(tiles, means))


def means3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor):
    """The tile means [B, H, N, D] fp32 of q, k, v [B, S, H, D] already in tile order (tokens: the
    layout's `tiled_token`), in one launch: `gather3` without writing tiles, one read of each input."""
    B, _, H, D = q.shape
    N = counts.numel()
    xs = [x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v)]
    means = [torch.empty(B, H, N, D, dtype=torch.float32, device=x.device) for x in xs]
    _gather3[(N, B * H)](*xs, tokens, counts, *xs, *means, N, H, *(s for x in xs for s in x.stride()[:3]),
                         0, 0, 0, D=D, STORE=False)
    return tuple(means)
