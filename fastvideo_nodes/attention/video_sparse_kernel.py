"""Triton kernel of VIDEO_SPARSE_ATTN's sparse branch: exact attention over each query tile's chosen key tiles.

One program = one 64-token query tile of one (batch, head). It loads the tile once, walks the key tiles
of its row of the index table (full tiles first, then the tiles with padding), and keeps the softmax
online in fp32 with exp2 (log2(e)/√D folded into one scale). Full tiles take no mask; a tile with
padding is read in CHUNK-token pieces up to its real count (its real tokens come first), so an edge
tile of 16 tokens costs a 32-key piece instead of a 64-key one, and only those pieces are masked.

The epilogue is fused: `sparse + compressed · gate` is formed in fp32 and written straight to the
token-order output through the slot → token table, so neither the padded sparse result nor the
broadcast compressed branch ever goes through memory. With no compressed branch and an identity
table the same kernel writes the plain padded sparse output (the tests and the bench use that).

Inputs are the padded tile-major tensors `video_sparse._to_tiles` makes, [B, N·64, H, D] (any strides
with the last dim contiguous); bf16/fp16 on the GPU, fp32 too under the interpreter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
BLOCK = 64  # tokens per 4×4×4 tile


@dataclass(frozen=True)
class Config:
    num_warps: int = 4
    num_stages: int = 3
    chunk: int = 32  # key piece for tiles with padding: 64 = whole tiles under the mask


# Offered to the bench (and to autotune, `attention(cfg=None)`); DEFAULT is what attend() runs.
CONFIGS = {
    "w4s2": Config(4, 2), "w4s3": Config(4, 3), "w4s4": Config(4, 4),
    "w8s2": Config(8, 2), "w8s3": Config(8, 3), "w8s4": Config(8, 4),
    "w4s3c64": Config(4, 3, 64), "w4s3c16": Config(4, 3, 16),
}
DEFAULT = CONFIGS["w4s3"]


@triton.jit
def _online(acc, l_i, m_i, q, k, v, qk_scale, live, MASK: tl.constexpr):
    """One key block into the running softmax: q [BM, D], k/v [BN, D], live [BN] (MASK only)."""
    s = tl.dot(q, tl.trans(k))
    if MASK:
        s = tl.where(live[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _vsa_fwd(Q, K, V, IDX, NFULL, COUNTS, COMP, GATE, TOK, O,
             N, H, k_tiles, sxb, sxs, sxh, sgb, sgs, sgh, sob, sos, soh, qk_scale,
             D: tl.constexpr, CHUNK: tl.constexpr, HAS_COMP: tl.constexpr, HAS_GATE: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    base = b * sxb + h * sxh  # q, k and v tiles share one layout
    q = tl.load(Q + base + (tile * BLOCK + offs_m)[:, None] * sxs + offs_d[None, :])
    row = bh.to(tl.int64) * N + tile
    idx = IDX + row * k_tiles
    n_full = tl.load(NFULL + row)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, D], tl.float32)
    offs_n = tl.arange(0, BLOCK)
    for i in range(0, n_full):
        j = tl.load(idx + i).to(tl.int64)
        kv = base + (j * BLOCK + offs_n)[:, None] * sxs + offs_d[None, :]
        k = tl.load(K + kv)
        v = tl.load(V + kv)
        acc, l_i, m_i = _online(acc, l_i, m_i, q, k, v, qk_scale, offs_n, False)
    offs_c = tl.arange(0, CHUNK)
    for i in range(n_full, k_tiles):
        j = tl.load(idx + i).to(tl.int64)
        count = tl.load(COUNTS + j)
        for c in range(0, tl.cdiv(count, CHUNK)):  # real tokens come first: stop at the last real one
            kv = base + (j * BLOCK + c * CHUNK + offs_c)[:, None] * sxs + offs_d[None, :]
            k = tl.load(K + kv)
            v = tl.load(V + kv)
            acc, l_i, m_i = _online(acc, l_i, m_i, q, k, v, qk_scale, c * CHUNK + offs_c < count, True)
    out = acc / l_i[:, None]
    tok = tl.load(TOK + tile * BLOCK + offs_m)  # output row of each slot, -1 for padding
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


_AUTOTUNED = triton.autotune(
    [triton.Config({}, num_warps=c.num_warps, num_stages=c.num_stages) for c in CONFIGS.values() if c.chunk == 32],
    key=["D", "k_tiles"])(_vsa_fwd)


def tables(chosen: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """chosen [B, H, N, k] key tiles per query tile, full [N] tiles without padding →
    (index table [B, H, N, k] int32 with each row's full tiles first, full-tile count [B, H, N] int32)."""
    n = full.numel()
    is_full = full[chosen]
    order = torch.sort(chosen + n * (~is_full).long(), dim=-1).values % n
    return order.to(torch.int32).contiguous(), is_full.sum(-1, dtype=torch.int32).contiguous()


def attention(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, index: torch.Tensor, n_full: torch.Tensor,
              counts: torch.Tensor, tokens: torch.Tensor, out: torch.Tensor, comp: torch.Tensor | None = None,
              gate: torch.Tensor | None = None, cfg: Config | None = DEFAULT) -> torch.Tensor:
    """The sparse branch, written into `out`.

    qt, kt, vt: [B, N·64, H, D] padded tiles (same strides, last dim contiguous); index [B, H, N, k]
    int32 and n_full [B, H, N] int32 from `tables`; counts [N] real tokens per tile (any int); tokens
    [N·64] int32: the row of `out` each slot goes to (-1: padding, not written); out [B, S_out, H, D];
    comp [B, H, N, D] fp32 (contiguous) and gate [B, S_out, H, D]: when given, out = sparse + comp · gate
    (gate None: + comp). cfg None: Triton's autotune over CONFIGS' whole-piece settings.
    """
    B, P, H, D = qt.shape
    N, k_tiles = index.shape[2], index.shape[3]
    if not (qt.stride() == kt.stride() == vt.stride() and qt.stride(-1) == 1 and out.stride(-1) == 1):
        raise ValueError("video sparse kernel: q, k, v tiles must share one layout, last dim contiguous")
    if P != N * BLOCK or D < 16 or D & (D - 1):  # tl.dot wants a power of two ≥ 16
        raise ValueError(f"video sparse kernel: tiles {tuple(qt.shape)} do not fit {N} tiles of {BLOCK} "
                         f"with a power-of-two D ≥ 16")
    g = gate if gate is not None else out  # a placeholder pointer when unused
    args = (qt, kt, vt, index, n_full, counts, comp if comp is not None else qt, g, tokens, out,
            N, H, k_tiles, qt.stride(0), qt.stride(1), qt.stride(2), g.stride(0), g.stride(1), g.stride(2),
            out.stride(0), out.stride(1), out.stride(2), LOG2E / math.sqrt(D))
    launch = (N, B * H)
    flags = dict(D=D, HAS_COMP=comp is not None, HAS_GATE=gate is not None)
    if cfg is None:
        _AUTOTUNED[launch](*args, CHUNK=32, **flags)
    else:
        _vsa_fwd[launch](*args, CHUNK=cfg.chunk, **flags, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
