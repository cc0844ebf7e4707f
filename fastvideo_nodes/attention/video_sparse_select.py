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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .video_sparse_kernel import _TILE, BLOCK, _gather


@triton.jit
def _row_keys(S, rows, cols, R, N):
    """Scores S[rows, cols] as int32 keys that order as the floats do (negatives reversed; -0.0 ties
    with 0.0; every NaN above +inf, as torch.topk has it), padding below every score, -inf included."""
    live = (rows < R)[:, None] & (cols < N)[None, :]
    x = tl.load(S + rows[:, None] * N + cols[None, :], mask=live, other=0.0)
    x = tl.where(x == 0.0, 0.0, x)
    x = tl.where(x != x, float("nan"), x)
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return tl.where(live, key, -2147483648), live


@triton.jit
def _at_least(key, cand):
    """Per row, how many keys are ≥ that row's candidate."""
    return tl.sum((key >= cand[:, None]).to(tl.int32), 1)


@triton.jit
def _place(keep, group, g, end):
    """Row positions of the kept tiles of group g in this chunk, after `end` places already taken."""
    mine = keep & (group == g)
    return mine, end[:, None] + tl.cumsum(mine.to(tl.int32), 1) - 1, end + tl.sum(mine.to(tl.int32), 1)


@triton.jit
def _select(S, COUNTS, STARTS, IDX, ENDS, R, N, k, NP: tl.constexpr, ROWS: tl.constexpr, PACKED: tl.constexpr,
            BITS: tl.constexpr = 1, NP2: tl.constexpr = 0):
    """Program p: rows p·ROWS.. of scores [R, N] fp32 → their k kept tiles into IDX [R, k] and group ends
    into ENDS [R, 3]. PACKED: each kept tile as `start · 64 + count − 1` (the kernel's `pack`), not its id.
    A row is read as NP columns, then (NP2 > 0) NP2 more: 624 tiles as 512 + 128 rather than 1024, so
    every pass compares 40 % fewer keys (the passes are what the kernel spends its time on).
    BITS 2 (N < 1024, one chunk): the k-th key two bits a pass, its three counts summed as one (10 bits
    each), so half the row reductions."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, NP)
    key, live = _row_keys(S, rows, cols, R, N)
    if NP2 > 0:
        cols2 = NP + tl.arange(0, NP2)
        key2, live2 = _row_keys(S, rows, cols2, R, N)
    # Each row's k-th largest key, highest bit first: the sign (is it ≥ 0?), then each of the 31 others.
    zero = tl.zeros([ROWS], tl.int32)
    n0 = _at_least(key, zero)
    if NP2 > 0:
        n0 += _at_least(key2, zero)
    thr = tl.where(n0 >= k, 0, -2147483648)
    if BITS == 2:
        for b in tl.static_range(29, 0, -2):  # bits (30, 29), (28, 27), …, (2, 1)
            c1, c2, c3 = thr | (1 << b), thr | (2 << b), thr | (3 << b)
            n = tl.sum((key >= c1[:, None]).to(tl.int32) + ((key >= c2[:, None]).to(tl.int32) << 10)
                       + ((key >= c3[:, None]).to(tl.int32) << 20), 1)
            thr = tl.where((n >> 20) >= k, c3, tl.where(((n >> 10) & 1023) >= k, c2,
                                                        tl.where((n & 1023) >= k, c1, thr)))
        thr = tl.where(_at_least(key, thr | 1) >= k, thr | 1, thr)
    else:
        for b in tl.static_range(30, -1, -1):
            cand = thr | (1 << b)
            n = _at_least(key, cand)
            if NP2 > 0:
                n += _at_least(key2, cand)
            thr = tl.where(n >= k, cand, thr)
    above = key > thr[:, None]
    tie = key == thr[:, None]
    n_above = tl.sum(above.to(tl.int32), 1)
    ties = tl.cumsum(tie.to(tl.int32), 1)
    if NP2 > 0:
        above2 = key2 > thr[:, None]
        tie2 = key2 == thr[:, None]
        n_above += tl.sum(above2.to(tl.int32), 1)
        ties2 = tl.sum(tie.to(tl.int32), 1)[:, None] + tl.cumsum(tie2.to(tl.int32), 1)
    room = k - n_above  # ties kept, the lowest tile ids first
    keep = live & (above | (tie & (ties <= room[:, None])))  # rows past R: none
    c = tl.load(COUNTS + cols, mask=cols < N, other=0)
    group = tl.where(c == 64, 0, tl.where(c <= 16, 1, tl.where(c <= 32, 2, 3)))[None, :]
    if PACKED:
        entry = (tl.load(STARTS + cols, mask=cols < N, other=0) * 64 + c - 1).to(tl.int32)
    else:
        entry = cols
    pos = tl.zeros([ROWS, NP], tl.int32)
    if NP2 > 0:
        keep2 = live2 & (above2 | (tie2 & (ties2 <= room[:, None])))
        c2 = tl.load(COUNTS + cols2, mask=cols2 < N, other=0)
        group2 = tl.where(c2 == 64, 0, tl.where(c2 <= 16, 1, tl.where(c2 <= 32, 2, 3)))[None, :]
        if PACKED:
            entry2 = (tl.load(STARTS + cols2, mask=cols2 < N, other=0) * 64 + c2 - 1).to(tl.int32)
        else:
            entry2 = cols2
        pos2 = tl.zeros([ROWS, NP2], tl.int32)
    end = tl.zeros([ROWS], tl.int32)
    for g in tl.static_range(4):
        mine, at, end = _place(keep, group, g, end)
        pos = tl.where(mine, at, pos)
        if NP2 > 0:
            mine2, at2, end = _place(keep2, group2, g, end)
            pos2 = tl.where(mine2, at2, pos2)
        if g < 3:
            tl.store(ENDS + rows * 3 + g, end, mask=rows < R)
    tl.store(IDX + rows[:, None] * k + pos, tl.broadcast_to(entry[None, :], [ROWS, NP]), mask=keep)
    if NP2 > 0:
        tl.store(IDX + rows[:, None] * k + pos2, tl.broadcast_to(entry2[None, :], [ROWS, NP2]), mask=keep2)


def select(scores: torch.Tensor, counts: torch.Tensor, k: int, rows: int | None = None,
           starts: torch.Tensor | None = None, warps: int | None = None,
           bits: int = 1, split: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, H, N, N] fp32 compressed scores, counts [N] real tokens per tile (any int), k key tiles
    per query tile (1..N) → (index [B, H, N, k] int32, ends [B, H, N, 3] int32), what
    `tables(top_tiles(scores, sparsity), counts)` gives (ties: the lower tile id is kept).
    rows: score rows per program, a power of two (None: about 1024 scores a program).
    starts: [N] int32 each tile's first token in tile order: the index then comes `pack`ed for it.
    warps: a program's warps (None: 1 per 256 scores, at most 8); bits: see `_select` (2 falls back to 1
    from N = 1024 on, where three counts no longer fit one sum, and reads the row in one chunk).
    split: a row in two power-of-two chunks where they are narrower than one (see `_select`)."""
    *lead, N = scores.shape
    if not 1 <= k <= N:
        raise ValueError(f"video sparse select: k must be in [1, {N}], got {k}")
    scores = scores.float().contiguous()
    index = torch.empty(*lead, k, dtype=torch.int32, device=scores.device)
    ends = torch.empty(*lead, 3, dtype=torch.int32, device=scores.device)
    R = scores.numel() // N
    NP, NP2 = triton.next_power_of_2(N), 0
    bits = bits if N < 1024 else 1
    low = NP // 2
    if split and bits == 1 and N > low and low + triton.next_power_of_2(N - low) < NP:
        NP, NP2 = low, triton.next_power_of_2(N - low)
    width = NP + NP2
    rows = rows or 1 << max(0, (1024 // width).bit_length() - 1)  # a power of two
    _select[(triton.cdiv(R, rows),)](scores, counts, starts if starts is not None else counts, index, ends, R, N, k,
                                     NP=NP, ROWS=rows, PACKED=starts is not None, BITS=bits, NP2=NP2,
                                     num_warps=warps or max(1, min(8, rows * width // 256)))
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


@triton.jit
def _means_rows(Q, K, V, STARTS, COUNTS, QM, KM, VM, N, H, sxb, sxs, sxh, D: tl.constexpr):
    """Program (b·H + h, tile) of `means3` for inputs in tile order: each tile's rows from its start under
    the count mask (no slot table to read first), the three loads issued before any sum. The heads of a
    tile are neighbours in launch order, so its rows (all heads, contiguous) stream from DRAM together
    rather than in 12 visits far apart."""
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.arange(0, _TILE)
    offs_d = tl.arange(0, D)
    count = tl.load(COUNTS + tile)
    at = b * sxb + h * sxh + (tl.load(STARTS + tile).to(tl.int64) + offs_m)[:, None] * sxs + offs_d[None, :]
    live = (offs_m < count)[:, None]
    q = tl.load(Q + at, mask=live, other=0.0)
    k = tl.load(K + at, mask=live, other=0.0)
    v = tl.load(V + at, mask=live, other=0.0)
    out = (bh.to(tl.int64) * N + tile) * D + offs_d
    n = count.to(tl.float32)
    tl.store(QM + out, tl.sum(q.to(tl.float32), 0) / n)
    tl.store(KM + out, tl.sum(k.to(tl.float32), 0) / n)
    tl.store(VM + out, tl.sum(v.to(tl.float32), 0) / n)


def means3_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor):
    """`means3` (the same sums, bit for bit) for q, k, v [B, S, H, D] in tile order sharing one layout, last
    dim contiguous (what `prepare_tiled` hands on), found from the tile starts."""
    B, _, H, D = q.shape
    N = counts.numel()
    means = [torch.empty(B, H, N, D, dtype=torch.float32, device=q.device) for _ in range(3)]
    _means_rows[(B * H, N)](q, k, v, starts, counts, *means, N, H, q.stride(0), q.stride(1), q.stride(2), D=D)
    return tuple(means)


@triton.jit
def _compressed(QM, KM, VM, S, OC, N, sqrt_d, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                PRECISION: tl.constexpr):
    """Program (i, b·H + h): the compressed branch of query tiles i·BM.. from the tile means [B·H, N, D]:
    their scores qc·kcᵀ / √D into S [B·H, N, N] (for `select`) and softmax(scores)·vc into OC, the softmax
    online over BN key tiles at a time, so one launch does what four torch ops did."""
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    base = bh * N * D
    live = rows < N
    qc = tl.load(QM + base + rows[:, None] * D + offs_d[None, :], mask=live[:, None], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for j in range(0, N, BN):
        cols = j + tl.arange(0, BN)
        real = cols < N
        kc = tl.load(KM + base + cols[:, None] * D + offs_d[None, :], mask=real[:, None], other=0.0)
        vc = tl.load(VM + base + cols[:, None] * D + offs_d[None, :], mask=real[:, None], other=0.0)
        s = tl.div_rn(tl.dot(qc, tl.trans(kc), input_precision=PRECISION), sqrt_d)  # rounded as torch's `/`
        tl.store(S + (bh * N + rows)[:, None] * N + cols[None, :], s, mask=live[:, None] & real[None, :])
        s = tl.where(real[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p, vc, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    tl.store(OC + base + rows[:, None] * D + offs_d[None, :], acc / l_i[:, None], mask=live[:, None])


def compressed(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, precision: str = "tf32x3",
               rows: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """`video_sparse.compressed_from_means` in one launch: tile means [B, H, N, D] fp32 contiguous →
    (scores [B, H, N, N], out [B, H, N, D]) fp32. precision: of the two dots ("ieee": fp32 FMAs as cuBLAS
    without TF32; "tf32x3": three TF32 tensor-core products, about as close); rows: query tiles a program."""
    B, H, N, D = qc.shape
    scores = torch.empty(B, H, N, N, dtype=torch.float32, device=qc.device)
    out = torch.empty_like(qc)
    _compressed[(triton.cdiv(N, rows), B * H)](qc, kc, vc, scores, out, N, D ** 0.5, D=D, BM=rows, BN=64,
                                               PRECISION=precision, num_warps=4, num_stages=2)
    return scores, out


@dataclass(frozen=True)
class Setup:
    """How the Triton path's set-up runs (all give the same tables from the same scores; the bench
    picks). compressed: "torch" (four torch ops on fp32 matmuls) or the precision of one `compressed`
    launch ("tf32x3", "ieee"), comp_rows its query tiles a program; select_warps, select_bits: `select`'s
    warps and bits; direct_means: tile order's means from the tile starts (`means3_rows`); head_chunks:
    tile order's heads in that many groups, each group's set-up under the kernel of the one before
    (`video_sparse._overlapped`)."""
    compressed: str = "torch"
    comp_rows: int = 32
    select_warps: int | None = None
    select_bits: int = 1
    direct_means: bool = False
    head_chunks: int = 1


SETUPS = {  # in the order the bench tries them (the likelier winners first, in case its budget runs out)
    "torch": Setup(),
    "overlap2": Setup(head_chunks=2), "overlap3": Setup(head_chunks=3), "overlap4": Setup(head_chunks=4),
    "fused_overlap3": Setup("tf32x3", select_warps=1, direct_means=True, head_chunks=3),
    "fused_all": Setup("tf32x3", select_warps=1, select_bits=2, direct_means=True),
    "fused": Setup("tf32x3"), "fused_m16": Setup("tf32x3", 16), "fused_m64": Setup("tf32x3", 64),
    "fused_w1": Setup("tf32x3", select_warps=1), "fused_ieee": Setup("ieee"),
    "select_w1": Setup(select_warps=1), "select_w2": Setup(select_warps=2),
    "select_b2": Setup(select_bits=2), "select_w1_b2": Setup(select_warps=1, select_bits=2),
    "direct_means": Setup(direct_means=True),
    "direct_fused_m16": Setup("tf32x3", 16, direct_means=True),
    "direct_fused_m16_w1": Setup("tf32x3", 16, select_warps=1, direct_means=True),
    "direct_select_w1": Setup(select_warps=1, direct_means=True),
}
# H200, 480p at 0.8 with w4s2_tma: torch 3.99 ms, overlap2 3.88, the others 3.91–4.21; with w4s1_tma_r128,
# overlap2 3.764 against torch 3.773: not worth two more streams.
DEFAULT_SETUP = SETUPS["torch"]
