"""Triton kernel of VIDEO_SPARSE_ATTN's sparse branch: exact attention over each query tile's chosen key tiles.

One program = one query tile of one (batch, head). It loads the tile once, walks the key tiles
of its row of the index table and keeps the softmax online in fp32 with exp2 (log2(e)/√D folded into
one scale). A row lists its full tiles first: they are read whole and take no mask. The tiles with
padding follow, grouped by their real count (real tokens come first in a tile): ≤ 16 tokens are read
as a 16-key piece, ≤ 32 as a 32-key piece, more as the whole tile, each under the count mask. At
480p the edge tiles hold 8, 16 or 32 tokens, so none of them costs a whole 64-key block. The same
holds for queries: tiles of ≤ 16 or ≤ 32 real tokens run in their own launches as 16- or 32-row
programs (`query_groups`), the others as 64 rows.

The epilogue is fused: `sparse + compressed · gate` is formed in fp32 and written straight to the
token-order output through the slot → token table, so neither the padded sparse result nor the
broadcast compressed branch ever goes through memory. With no compressed branch and an identity
table the same kernel writes the plain padded sparse output (the tests and the bench use that).

Inputs are padded tile-major tensors [B, N·64, H, D] (the last dim contiguous): `gather` makes them
from token order in one pass that also yields the fp32 tile means of the compressed branch (in place
of a zero fill, a scatter and a reduction per input). bf16/fp16 on the GPU, fp32 too under the
interpreter.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..ops.triton_jit import tensor_descriptor

LOG2E = 1.4426950408889634
BLOCK = 64  # tokens per 4×4×4 tile
_TILE = tl.constexpr(BLOCK)  # the same, for the kernels (plain globals are not visible there)
_LAZY_GROWTH = tl.constexpr(8.0)  # log2 units: a lazy max may lag the true one by 2^8 (FA4's threshold)


@dataclass(frozen=True)
class Config:
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False  # tiles through Hopper's tensor-memory accelerator (host tensor descriptors)
    # Query tiles of ≤ 16 (≤ 32) real tokens run as 16- (32-) row programs in launches of their own when
    # 16 (32) is listed; the others as 64 rows. Below 64 rows Triton uses mma.sync, not wgmma, with
    # single-buffered K/V (seen in the sm_90 build): a quarter of the work pays for it, half may not.
    q_rows: tuple[int, ...] = (16,)
    small_warps: int | None = None  # warps of those 16/32-row programs (None: num_warps)
    maxnreg: int | None = None  # register cap per thread: 128 lets four 4-warp programs share an SM
    # Lazy rescaling (FA4's trick): the running max moves, and the accumulator is rescaled, only when some
    # row's max grew by more than 2^8 (p stays ≤ 256, harmless in fp32 and bf16): most key tiles then
    # skip the rescale of acc.
    lazy: bool = False


# Offered to the bench (and, the pointer ones, to autotune: `attention(cfg=None)`); DEFAULT is what
# attend() runs until the bench has picked one on the H200.
CONFIGS = {
    "w4s1": Config(4, 1),  # no K/V double buffer: 48 KB of shared memory, 4 programs per SM instead of 2
    "w4s2": Config(4, 2), "w4s3": Config(4, 3), "w4s4": Config(4, 4),
    "w8s2": Config(8, 2), "w8s3": Config(8, 3), "w8s4": Config(8, 4),
    "w4s2_tma": Config(4, 2, True), "w4s3_tma": Config(4, 3, True), "w4s4_tma": Config(4, 4, True),
    "w8s3_tma": Config(8, 3, True),
    "w4s3_q16q32": Config(4, 3, q_rows=(16, 32)), "w4s3_wholeq": Config(4, 3, q_rows=()),
    "w4s3_tma_wholeq": Config(4, 3, True, q_rows=()),
    "w4s3_sw2": Config(4, 3, small_warps=2), "w4s3_sw1": Config(4, 3, small_warps=1),
    "w4s1_tma": Config(4, 1, True), "w4s1_tma_r128": Config(4, 1, True, maxnreg=128),
    "w4s2_tma_lazy": Config(4, 2, True, lazy=True), "w4s1_tma_lazy": Config(4, 1, True, lazy=True),
    "w4s1_tma_lazy_r128": Config(4, 1, True, maxnreg=128, lazy=True),
    "w4s1_tma_r128_wholeq": Config(4, 1, True, maxnreg=128, q_rows=()),
}
# H200, 32,760 tokens × 12 heads × 128 at 0.8, whole op in tile order (bench/fastwan.py --parts variants):
# w4s1_tma_r128 3.77 ms (kernel 3.52), w4s2_tma 4.04 (3.70), w4s3_tma 3.95, lazy rescaling 3.92–4.45.
DEFAULT = CONFIGS["w4s1_tma_r128"]


@triton.jit
def _pieces(acc, l_i, m_i, q, K, V, idx, counts, lo, hi, b, h, P, sxb, sxs, sxh, qk_scale,
            D: tl.constexpr, PIECE: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr, PACKED: tl.constexpr,
            LAZY: tl.constexpr):
    """Entries lo..hi of one index row, each read as a PIECE-token block from its tile's start, into the
    running softmax of the query rows q [BM, D]. K, V: pointers, or descriptors of PIECE × D blocks.
    PACKED: inputs in tile order (no padding), each entry `start · 64 + real count − 1` (see `pack`);
    else padded tiles, each entry a tile id. LAZY: see `Config.lazy` (m_i is then the max in use, not the
    true one; the first tile always sets it, from -inf)."""
    offs_n = tl.arange(0, PIECE)
    offs_d = tl.arange(0, D)
    for i in range(lo, hi):
        j = tl.load(idx + i)
        if PACKED:  # the rows past the count belong to the next tile (or lie past the end): masked
            start = j >> 6
            real = (j & 63) + 1
        else:
            start = j * _TILE
            real = PIECE
        if TMA:  # rows past the tensor's end read as zeros
            k = K.load([(b * P + start).to(tl.int32), (h * D).to(tl.int32)])
            v = V.load([(b * P + start).to(tl.int32), (h * D).to(tl.int32)])
        else:
            kv = b * sxb + h * sxh + (start.to(tl.int64) + offs_n)[:, None] * sxs + offs_d[None, :]
            if PACKED and MASK:
                k = tl.load(K + kv, mask=(offs_n < real)[:, None], other=0.0)
                v = tl.load(V + kv, mask=(offs_n < real)[:, None], other=0.0)
            else:
                k = tl.load(K + kv)
                v = tl.load(V + kv)
        s = tl.dot(q, tl.trans(k))
        if MASK:
            if not PACKED:
                real = tl.load(counts + j)
            s = tl.where((offs_n < real)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units
        if LAZY:
            if tl.max(m_new - m_i, 0) > _LAZY_GROWTH:  # one test for the whole block: no divergence
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha
                acc = acc * alpha[:, None]
                m_i = m_new
            p = tl.math.exp2(s * qk_scale - m_i[:, None])
            l_i += tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc)
        else:
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _vsa_fwd(Q, K64, V64, K16, V16, K32, V32, QTILES, IDX, ENDS, COUNTS, STARTS, COMP, GATE, TOK, O,
             N, H, H0, P, k_tiles, sxb, sxs, sxh, sgb, sgs, sgh, sob, sos, soh, qk_scale,
             D: tl.constexpr, BM: tl.constexpr, HAS_COMP: tl.constexpr, HAS_GATE: tl.constexpr,
             TMA: tl.constexpr, PACKED: tl.constexpr, LAZY: tl.constexpr = False):
    """Program (i, b·H + h): query tile QTILES[i], its first BM slots (all its real tokens). PACKED: the
    inputs in tile order, the tile from STARTS[tile] (P = S rows a batch), IDX packed (`pack`). H heads
    from head H0 of the inputs and the output; the tables and COMP hold those H alone."""
    tile = tl.load(QTILES + tl.program_id(0))
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H + H0).to(tl.int64)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    q_start = tl.load(STARTS + tile) if PACKED else tile * _TILE
    if TMA:
        q = Q.load([(b * P + q_start).to(tl.int32), (h * D).to(tl.int32)])
    elif PACKED:  # rows past the tile's real ones: the next tile's, or past the end; never stored
        q = tl.load(Q + b * sxb + h * sxh + (q_start.to(tl.int64) + offs_m)[:, None] * sxs + offs_d[None, :],
                    mask=(offs_m < tl.load(COUNTS + tile))[:, None], other=0.0)
    else:
        q = tl.load(Q + b * sxb + h * sxh + (tile * _TILE + offs_m)[:, None] * sxs + offs_d[None, :])
    row = bh.to(tl.int64) * N + tile
    idx = IDX + row * k_tiles
    e_full = tl.load(ENDS + row * 3)
    e_16 = tl.load(ENDS + row * 3 + 1)
    e_32 = tl.load(ENDS + row * 3 + 2)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    acc, l_i, m_i = _pieces(acc, l_i, m_i, q, K64, V64, idx, COUNTS, 0, e_full, b, h, P, sxb, sxs, sxh,
                            qk_scale, D, _TILE, False, TMA, PACKED, LAZY)
    acc, l_i, m_i = _pieces(acc, l_i, m_i, q, K16, V16, idx, COUNTS, e_full, e_16, b, h, P, sxb, sxs, sxh,
                            qk_scale, D, 16, True, TMA, PACKED, LAZY)
    acc, l_i, m_i = _pieces(acc, l_i, m_i, q, K32, V32, idx, COUNTS, e_16, e_32, b, h, P, sxb, sxs, sxh,
                            qk_scale, D, 32, True, TMA, PACKED, LAZY)
    acc, l_i, m_i = _pieces(acc, l_i, m_i, q, K64, V64, idx, COUNTS, e_32, k_tiles, b, h, P, sxb, sxs, sxh,
                            qk_scale, D, _TILE, True, TMA, PACKED, LAZY)
    out = acc / l_i[:, None]
    tok = tl.load(TOK + tile * _TILE + offs_m)  # output row of each slot, -1 for padding
    live = tok >= 0
    tok = tl.where(live, tok, 0).to(tl.int64)
    if HAS_COMP:
        comp = tl.load(COMP + row * D + offs_d)  # fp32 [D]: this tile's compressed result
        if HAS_GATE:
            gate = tl.load(GATE + b * sgb + h * sgh + tok[:, None] * sgs + offs_d[None, :], mask=live[:, None],
                           other=0.0)
            out += comp[None, :] * gate.to(tl.float32)
        else:
            out += comp[None, :]
    tl.store(O + b * sob + h * soh + tok[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=live[:, None])


@triton.jit
def _gather(X, TOK, COUNTS, T, M, N, H, sxb, sxs, sxh, stb, sts, sth, D: tl.constexpr, STORE: tl.constexpr):
    """One tile of one (batch, head): its tokens from token order into the padded tile (zeros in the
    padding) and their fp32 mean over the real ones. One read of x for both. STORE False: the mean only
    (inputs already in tile order, TOK the layout's `tiled_token`)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    slots = tile * _TILE + tl.arange(0, _TILE)
    offs_d = tl.arange(0, D)
    tok = tl.load(TOK + slots)
    live = tok >= 0
    x = tl.load(X + b * sxb + h * sxh + tl.where(live, tok, 0).to(tl.int64)[:, None] * sxs + offs_d[None, :],
                mask=live[:, None], other=0.0)
    if STORE:
        tl.store(T + b * stb + h * sth + slots.to(tl.int64)[:, None] * sts + offs_d[None, :], x)
    mean = tl.sum(x.to(tl.float32), 0) / tl.load(COUNTS + tile).to(tl.float32)
    tl.store(M + (bh.to(tl.int64) * N + tile) * D + offs_d, mean)


def gather(x: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S, H, D] (last dim contiguous) → (padded tiles [B, N·64, H, D] contiguous, tile means
    [B, H, N, D] fp32), with tokens [N·64] the layout's slot → token table and counts [N] its tile sizes."""
    B, _, H, D = x.shape
    N = counts.numel()
    if x.stride(-1) != 1:
        x = x.contiguous()
    tiles = torch.empty(B, N * BLOCK, H, D, dtype=x.dtype, device=x.device)
    means = torch.empty(B, H, N, D, dtype=torch.float32, device=x.device)
    _gather[(N, B * H)](x, tokens, counts, tiles, means, N, H, x.stride(0), x.stride(1), x.stride(2),
                        tiles.stride(0), tiles.stride(1), tiles.stride(2), D=D, STORE=True)
    return tiles, means


_AUTOTUNED = triton.autotune(
    [triton.Config({}, num_warps=w, num_stages=st)
     for w, st in sorted({(c.num_warps, c.num_stages) for c in CONFIGS.values() if not c.tma})],
    key=["D", "k_tiles", "BM"])(_vsa_fwd)


def tables(chosen: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """chosen [B, H, N, k] key tiles per query tile, counts [N] real tokens per tile → (index table
    [B, H, N, k] int32, each row ordered full tiles, then tiles of ≤ 16, ≤ 32 and more real tokens;
    ends [B, H, N, 3] int32, where the first three of those groups end)."""
    n = counts.numel()
    group = torch.where(counts == BLOCK, 0, torch.where(counts <= 16, 1, torch.where(counts <= 32, 2, 3)))[chosen]
    order = torch.sort(chosen + n * group, dim=-1).values % n
    ends = torch.stack([(group <= g).sum(-1, dtype=torch.int32) for g in range(3)], dim=-1)
    return order.to(torch.int32).contiguous(), ends.contiguous()


def pack(index: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """An index table of tile ids → its entries for inputs in tile order: `start · 64 + real count − 1`,
    so that the kernel finds where a key tile begins and how many tokens it holds in one load."""
    i = index.long()
    return (starts.long()[i] * BLOCK + counts.long()[i] - 1).to(torch.int32)


def attention(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, index: torch.Tensor, ends: torch.Tensor,
              counts: torch.Tensor, tokens: torch.Tensor, out: torch.Tensor, comp: torch.Tensor | None = None,
              gate: torch.Tensor | None = None, cfg: Config | None = DEFAULT,
              query_groups: tuple[tuple[int, torch.Tensor], ...] | None = None,
              starts: torch.Tensor | None = None, heads: tuple[int, int] | None = None) -> torch.Tensor:
    """The sparse branch, written into `out`.

    qt, kt, vt: [B, N·64, H, D] padded tiles (same strides, last dim contiguous; TMA wants them
    contiguous); index [B, H, N, k] and ends [B, H, N, 3] from `tables`; counts [N] real tokens per
    tile (any int); tokens [N·64] int32: the row of `out` each slot goes to (-1: padding, not written);
    out [B, S_out, H, D]; comp [B, H, N, D] fp32 (contiguous) and gate [B, S_out, H, D]: when given,
    out = sparse + comp · gate (gate None: + comp). cfg None: Triton's autotune over the pointer CONFIGS.
    query_groups: the layout's `query_groups` (None or empty: every tile as 64 rows, one launch); the
    groups whose rows are not in cfg.q_rows join the 64-row launch.
    starts: [N] int32, given when qt, kt, vt are in tile order without padding ([B, S, H, D], tile i's
    tokens from starts[i]); index is then `pack`ed and tokens the layout's `tiled_token`.
    heads: (first, end) to run only those heads of qt, kt, vt, gate and out (whole tensors, so TMA still
    applies); index, ends and comp then hold those heads alone.
    """
    B, P, H, D = qt.shape
    h0, hc = (0, H) if heads is None else (heads[0], heads[1] - heads[0])
    N, k_tiles = index.shape[2], index.shape[3]
    if not (qt.stride() == kt.stride() == vt.stride() and qt.stride(-1) == 1 and out.stride(-1) == 1):
        raise ValueError("video sparse kernel: q, k, v tiles must share one layout, last dim contiguous")
    if (P != N * BLOCK if starts is None else P * BLOCK >= 2 ** 31) or D < 16 or D & (D - 1):
        raise ValueError(f"video sparse kernel: tiles {tuple(qt.shape)} do not fit {N} tiles of {BLOCK} "
                         f"with a power-of-two D ≥ 16")  # (tile order: packed entries must fit int32)
    launches = _launches(query_groups, (cfg or DEFAULT).q_rows, N, qt.device)
    if gate is not None and gate.stride(-1) != 1:
        gate = gate.contiguous()
    g = gate if gate is not None else out  # a placeholder pointer when unused
    tma = cfg is not None and cfg.tma and tensor_descriptor() is not None and qt.is_contiguous()
    desc = lambda x, rows: tensor_descriptor().from_tensor(x.view(B * P, H * D), [rows, D])
    kv = (desc(kt, BLOCK), desc(vt, BLOCK), desc(kt, 16), desc(vt, 16), desc(kt, 32), desc(vt, 32)) if tma \
        else (kt, vt, kt, vt, kt, vt)
    rest = (index, ends, counts, starts if starts is not None else counts, comp if comp is not None else qt, g,
            tokens, out, N, hc, h0, P, k_tiles, qt.stride(0), qt.stride(1), qt.stride(2), g.stride(0), g.stride(1),
            g.stride(2), out.stride(0), out.stride(1), out.stride(2), LOG2E / math.sqrt(D))
    flags = dict(D=D, HAS_COMP=comp is not None, HAS_GATE=gate is not None, TMA=tma, PACKED=starts is not None)
    for rows, qtiles in launches:
        args = (desc(qt, rows) if tma else qt, *kv, qtiles, *rest)
        launch = (qtiles.numel(), B * hc)
        if cfg is None:
            _AUTOTUNED[launch](*args, BM=rows, **flags)
        else:
            warps = cfg.small_warps if rows < BLOCK and cfg.small_warps else cfg.num_warps
            opts = dict(maxnreg=cfg.maxnreg) if cfg.maxnreg else {}
            _vsa_fwd[launch](*args, BM=rows, **flags, LAZY=cfg.lazy, num_warps=warps, num_stages=cfg.num_stages,
                             **opts)
    return out


@functools.lru_cache(maxsize=64)  # the layout's groups are one cached object per grid: merged once
def _launches(groups: tuple[tuple[int, torch.Tensor], ...] | None, q_rows: tuple[int, ...], n: int,
              device: torch.device) -> tuple[tuple[int, torch.Tensor], ...]:
    """The (rows, tile ids) launches: the groups of `q_rows` on their own, the rest as one 64-row launch."""
    if not groups:
        return ((BLOCK, torch.arange(n, dtype=torch.int32, device=device)),)
    own = [(r, ids) for r, ids in groups if r in q_rows and r != BLOCK]
    rest = [ids for r, ids in groups if r not in q_rows or r == BLOCK]
    if rest:
        own.insert(0, (BLOCK, rest[0] if len(rest) == 1 else torch.cat(rest)))
    return tuple(own)


def query_groups(counts: torch.Tensor) -> tuple[tuple[int, torch.Tensor], ...]:
    """counts [N] → the non-empty launches (rows, int32 tile ids): tiles of ≤ 16 real tokens as 16 rows,
    ≤ 32 as 32, the others as 64 (real tokens come first, so the first rows hold them all)."""
    rows = torch.where(counts <= 16, 16, torch.where(counts <= 32, 32, BLOCK))
    groups = ((r, torch.nonzero(rows == r).flatten().to(torch.int32)) for r in (BLOCK, 32, 16))
    return tuple((r, ids) for r, ids in groups if ids.numel())
