"""VIDEO_SPARSE_ATTN: Video Sparse Attention (VSA, arXiv 2505.13389), as FastWan checkpoints were trained.

Only for checkpoints distilled with it (FastWan2.1): the model learned to rely on both branches and
on the gate, so running a plain Wan model through it just loses quality. The token grid (t, h, w) is
cut into 4×4×4 tiles of 64 tokens, and each self-attention is the sum of two branches:
- compressed: every query tile's mean attends to the means of all key tiles (softmax over tiles,
  scale 1/√D); the result is copied to each token of the query tile;
- sparse: each query tile attends exactly, token by token, to the key tiles with the top-k
  compressed scores (k = ⌈(1 − sparsity)·tiles⌉, at least 1; FastWan runs sparsity 0.8);
combined as `sparse + compressed · gate`, where the gate is the per-token, per-head output of the
block's extra `to_gate_compress` projection, computed by the model and passed in here.

Edge tiles hold fewer tokens when a grid side is not a multiple of 4. As in FastVideo, each tile
keeps a 64-slot place in a padded tile-major layout, its real tokens first (in t, h, w order inside
the tile) and zeros after: tile means divide by the real count, and padded keys are masked.

The sparse branch has two implementations:
- "triton" (CUDA, bf16/fp16, D 64 or 128): our own block-sparse kernel (`video_sparse_kernel`), which
  walks each query tile's index row and writes `sparse + compressed · gate` straight back to the
  sequence's order. Its set-up is two more launches of ours (`video_sparse_select`: one gather of q, k, v; one
  top-k straight into the kernel's index table) around the compressed branch's torch matmuls
  (`video_sparse_select.SETUPS` names other set-ups, e.g. that branch in one launch, for the bench
  to time; DEFAULT_SETUP is the one that runs). The whole call is one custom op
  (fastvideo::video_sparse_attention), so compiled blocks keep it in their graph without a break or
  per-call recompiles.
- "flex" (everywhere else, and the bench's comparison row): FlexAttention with a BlockMask made
  straight from the top-k tile indices (`BlockMask.from_kv_blocks`, block size 64): nothing is
  compiled per call, and whole tiles that were not chosen are skipped. Tiles with padding go in as
  partial blocks under the padding mask; full tiles skip the mask.
Heads are independent, so under sequence parallelism it runs after the all-to-all (full sequence,
local heads) like every other backend.

Tile order (`tiled=True`): the DiT may keep its tokens in the tiles' order, without padding, from before
its first block to after its last (`tile_order`; every block is per token but for RoPE, which is
permuted alike, and this attention). Then no call gathers q, k, v: the Triton path reads each tile
from its first position (the rows past its real tokens are the next tile's, masked as padding was),
needs one read of q, k, v for the tile means, and writes its rows in place; Flex only indexes other
slots.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..errors import FastVideoError

if TYPE_CHECKING:  # both import Triton
    from .video_sparse_kernel import Config
    from .video_sparse_select import Setup

TILE = (4, 4, 4)
TILE_TOKENS = math.prod(TILE)
DEFAULT_SPARSITY = 0.8  # FastWan2.1's published inference setting (FastVideo's VSA_sparsity)


def check_sparsity(sparsity) -> float:
    """Sparsity is the fraction of key tiles each query tile skips: [0, 1), 0 = all tiles (exact
    attention in the sparse branch)."""
    value = float(sparsity) if isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool) else math.nan
    if not 0 <= value < 1:  # NaN fails too
        raise FastVideoError(f"video sparse attention sparsity must be a number in [0, 1) (the fraction of key "
                             f"tiles skipped; FastWan uses {DEFAULT_SPARSITY}), got {sparsity!r}.")
    return value


@dataclass(frozen=True)
class VideoSparseOptions:
    """sparsity: fraction of key tiles each query tile skips, in [0, 1)."""
    sparsity: float = DEFAULT_SPARSITY

    def __post_init__(self):
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))  # frozen


def available() -> str | None:
    return None


def kept_tiles(sparsity: float, num_tiles: int) -> int:
    """Key tiles each query tile attends to: ⌈(1 − sparsity)·tiles⌉ within [1, tiles] (FastVideo's count)."""
    return max(1, min(math.ceil((1 - sparsity) * num_tiles), num_tiles))


@dataclass(frozen=True)
class Layout:
    """Where one grid's tokens sit in the padded tile-major layout.

    slot: [S] padded position of each token (original t, h, w order); counts: [N] real tokens per
    tile; valid: [N·64] True where a slot holds a real token; full: [N] tiles without padding;
    token: [N·64] int32, the token in each slot (-1 for padding), the kernel's way back to token order.
    query_groups: the Triton kernel's launches, (query rows, int32 tile ids) by real count (empty
    where Triton cannot load).

    Tile order (`tiled=True` in attend): the same tiles without the padding, S positions, what the DiT
    keeps its tokens in between the blocks when every self-attention is VSA. order: [S] the token at
    each position (x[:, order] tiles, x[:, inverse] untiles); tiled_slot: [S] the slot of each
    position; tiled_token: [N·64] int32, the position in each slot (-1 for padding); starts: [N] int32,
    each tile's first position (its real tokens follow it).
    """
    slot: torch.Tensor
    counts: torch.Tensor
    valid: torch.Tensor
    full: torch.Tensor
    token: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    tiled_slot: torch.Tensor
    tiled_token: torch.Tensor
    starts: torch.Tensor
    query_groups: tuple[tuple[int, torch.Tensor], ...] = ()

    @property
    def num_tiles(self) -> int:
        return self.counts.numel()


@functools.cache
def _triton_problem() -> str | None:
    try:
        from . import video_sparse_kernel  # noqa: F401
    except Exception as e:  # no Triton, or one too old for the kernel
        return f"the VSA Triton kernel cannot load ({e!r:.120}); `pip install triton` (3.4+)"
    return None


@functools.lru_cache(maxsize=16)
def layout(grid: tuple[int, int, int], device: str) -> Layout:
    tiles = [math.ceil(n / s) for n, s in zip(grid, TILE)]
    t, h, w = torch.meshgrid(*(torch.arange(n, device=device) for n in grid), indexing="ij")
    (it, ih, iw), (lt, lh, lw) = zip(*((c // s, c % s) for c, s in zip((t, h, w), TILE)))
    # Sides of each token's tile: TILE inside the grid, the remainder at the far edges.
    sh = torch.clamp(grid[1] - ih * TILE[1], max=TILE[1])
    sw = torch.clamp(grid[2] - iw * TILE[2], max=TILE[2])
    tile_id = (it * tiles[1] + ih) * tiles[2] + iw
    within = (lt * sh + lh) * sw + lw  # rank inside the tile's own (possibly smaller) box
    slot = (tile_id * TILE_TOKENS + within).flatten()
    n = math.prod(tiles)
    counts = torch.bincount(tile_id.flatten(), minlength=n)
    valid = torch.zeros(n * TILE_TOKENS, dtype=torch.bool, device=device)
    valid[slot] = True
    token = torch.full((n * TILE_TOKENS,), -1, dtype=torch.int32, device=device)
    token[slot] = torch.arange(slot.numel(), dtype=torch.int32, device=device)
    tiled_slot, order = torch.sort(slot)  # slots rise along the tiles: sorting them drops the padding
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    tiled_token = torch.full_like(token, -1)
    tiled_token[tiled_slot] = torch.arange(slot.numel(), dtype=torch.int32, device=device)
    starts = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    groups: tuple[tuple[int, torch.Tensor], ...] = ()
    if _triton_problem() is None:
        from .video_sparse_kernel import query_groups
        groups = query_groups(counts)
    return Layout(slot, counts, valid, counts == TILE_TOKENS, token, order, inverse, tiled_slot, tiled_token,
                  starts, groups)


def tile_order(grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse) [S] of the grid's tile order: x[:, order] puts tokens in it, x[:, inverse] back."""
    lay = layout((int(grid[0]), int(grid[1]), int(grid[2])), str(device))
    return lay.order, lay.inverse


def _to_tiles(x: torch.Tensor, slot: torch.Tensor, lay: Layout) -> torch.Tensor:
    """[B, S, H, D] → [B, N·64, H, D] in tile-major order, zeros in the padding slots; slot [S]: the slot
    of each position (the layout's `slot` for token order, `tiled_slot` for tile order)."""
    out = x.new_zeros((x.shape[0], lay.num_tiles * TILE_TOKENS, *x.shape[2:]))
    out[:, slot] = x
    return out


def _tile_means(x: torch.Tensor, lay: Layout) -> torch.Tensor:
    """[B, N·64, H, D] padded → [B, H, N, D] float32 means over each tile's real tokens."""
    b, _, h, d = x.shape
    sums = x.view(b, lay.num_tiles, TILE_TOKENS, h, d).sum(2, dtype=torch.float32)
    return (sums / lay.counts.view(1, -1, 1, 1)).transpose(1, 2)


def compressed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The compression branch on padded tiles: (scores [B, H, N, N], out [B, H, N, D]), float32."""
    return compressed_from_means(*(_tile_means(x, lay) for x in (q, k, v)))


def compressed_from_means(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile means [B, H, N, D] float32 → (scores [B, H, N, N], out [B, H, N, D])."""
    scores = qc @ kc.transpose(-1, -2) / math.sqrt(qc.shape[-1])
    return scores, scores.softmax(-1) @ vc


def top_tiles(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """[B, H, N, N] compressed scores → [B, H, N, k] indices of the key tiles each query tile keeps."""
    return scores.topk(kept_tiles(sparsity, scores.shape[-1]), dim=-1).indices


def block_mask(chosen: torch.Tensor, lay: Layout) -> BlockMask:
    """A BlockMask of 64-token blocks from the chosen tiles: full tiles as full blocks, the others as
    partial blocks under the mask. Indices come first in each row, in ascending order.

    The kernel visits only the listed blocks, so on the GPU the mask_mod only drops padded keys: one
    gather per element instead of two (the second, of the chosen-tile table, dominated the partial
    blocks). Eager flex_attention (the CPU) evaluates only the mask_mod, which then states the choice
    token by token too.
    """
    n = lay.num_tiles
    is_full = lay.full[chosen]

    def first(flag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.sort(chosen + n * (~flag).long(), dim=-1).values % n  # flagged tiles first
        return flag.sum(-1, dtype=torch.int32), F.pad(order, (0, n - order.shape[-1])).to(torch.int32)

    full_num, full_idx = first(is_full)
    part_num, part_idx = first(~is_full)
    valid = lay.valid
    if chosen.is_cuda:
        def mask_mod(b, h, q_idx, kv_idx):
            return valid[kv_idx]
    else:
        picked = torch.zeros((*chosen.shape[:-1], n), dtype=torch.bool, device=chosen.device)
        picked.scatter_(-1, chosen, True)

        def mask_mod(b, h, q_idx, kv_idx):
            return picked[b, h, q_idx // TILE_TOKENS, kv_idx // TILE_TOKENS] & valid[kv_idx]

    return BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=TILE_TOKENS,
                                    mask_mod=mask_mod, seq_lengths=(n * TILE_TOKENS, n * TILE_TOKENS),
                                    compute_q_blocks=False)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


# Hopper's default FlexAttention tile for bf16, D=128 is 128 query rows; VSA's blocks are 64.
_CUDA_KERNEL_OPTIONS = {"BLOCK_M": TILE_TOKENS, "BLOCK_N": TILE_TOKENS}


IMPLS = ("auto", "triton", "flex")


@torch.compiler.assume_constant_result
def _triton_usable() -> bool:
    return _triton_problem() is None


def kernel_applies(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether attend() runs the Triton kernel for these inputs (impl "auto")."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128)
            and v.shape[-1] == q.shape[-1] and _triton_usable())


def _branch_and_tables(means, lay: Layout, sparsity: float, setup: Setup, starts: torch.Tensor | None = None):
    """The compressed branch [B, H, N, D] fp32 (contiguous) and the tables from the tile means, as `setup`
    (a `video_sparse_select.Setup`) says."""
    from .video_sparse_select import compressed, select
    qc, kc, vc = means
    if setup.compressed == "torch":
        scores, out_c = compressed_from_means(qc, kc, vc)
    else:
        scores, out_c = compressed(qc, kc, vc, precision=setup.compressed, rows=setup.comp_rows)
    index, ends = select(scores, lay.counts, kept_tiles(sparsity, lay.num_tiles), starts=starts,
                         warps=setup.select_warps, bits=setup.select_bits)
    return out_c.contiguous(), index, ends


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: Layout, sparsity: float,
            setup: Setup | None = None):
    """Everything before the sparse kernel, in Triton launches of our own but for the compressed branch
    (under the default `setup`): one gather of q, k, v (one pass per input for tiles and means), then
    from the scores one select (the top-k tiles as the kernel's tables). → padded tiles [B, N·64, H, D],
    the compressed branch [B, H, N, D] fp32 (contiguous) and the tables (index [B, H, N, k], group ends
    [B, H, N, 3]). setup: a `video_sparse_select.Setup` (None: its DEFAULT_SETUP)."""
    from .video_sparse_select import DEFAULT_SETUP, gather3
    (qt, qc), (kt, kc), (vt, vc) = gather3(q, k, v, lay.token, lay.counts)
    return qt, kt, vt, *_branch_and_tables((qc, kc, vc), lay, sparsity, setup or DEFAULT_SETUP)


def prepare_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: Layout, sparsity: float,
                  setup: Setup | None = None):
    """`prepare` for q, k, v [B, S, H, D] already in tile order: nothing to gather, one read of each for
    its tile means. → q, k, v (one shared layout, last dim contiguous), the compressed branch and the
    tables (the index `pack`ed for tile order)."""
    from .video_sparse_select import DEFAULT_SETUP
    q, k, v = _one_layout(q, k, v)
    return q, k, v, *_tiled_tables(q, k, v, lay, sparsity, setup or DEFAULT_SETUP)


def _one_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v as the kernel reads them in tile order: one shared layout, contiguous."""
    if not (q.stride() == k.stride() == v.stride() and q.is_contiguous()):
        q, k, v = (x.contiguous() for x in (q, k, v))
    return q, k, v


def _tiled_tables(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: Layout, sparsity: float, setup: Setup):
    """From q, k, v in tile order (all heads or a slice of them): the tile means, then the compressed
    branch and the tables, the index `pack`ed for tile order."""
    from .video_sparse_select import means3, means3_rows
    means = (means3_rows(q, k, v, lay.starts, lay.counts) if setup.direct_means
             else means3(q, k, v, lay.tiled_token, lay.counts))
    return _branch_and_tables(means, lay, sparsity, setup, starts=lay.starts)


def triton_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None, lay: Layout,
                sparsity: float, tiled: bool, setup: Setup | None = None, cfg: Config | None = None) -> torch.Tensor:
    """The Triton path's whole call (what the op runs), set-up and kernel; setup, cfg: the
    `video_sparse_select.Setup` and kernel `Config` (None: the defaults), for the bench's variants."""
    from .video_sparse_kernel import DEFAULT, attention
    from .video_sparse_select import DEFAULT_SETUP
    setup, cfg = setup or DEFAULT_SETUP, cfg or DEFAULT
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if tiled and setup.head_chunks > 1:
        return _overlapped(q, k, v, gate, lay, sparsity, setup, cfg, out)
    if tiled:  # in and out in tile order: no gather, and the kernel writes its rows in place
        qt, kt, vt, out_c, index, ends = prepare_tiled(q, k, v, lay, sparsity, setup)
        return attention(qt, kt, vt, index, ends, lay.counts, lay.tiled_token, out, comp=out_c, gate=gate, cfg=cfg,
                         query_groups=lay.query_groups, starts=lay.starts)
    qt, kt, vt, out_c, index, ends = prepare(q, k, v, lay, sparsity, setup)
    return attention(qt, kt, vt, index, ends, lay.counts, lay.token, out, comp=out_c, gate=gate, cfg=cfg,
                     query_groups=lay.query_groups)


@functools.cache
def _side_streams(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """(set-up, second kernel) streams of `_overlapped`; the set-up's at high priority, so its programs
    start first as SMs free up."""
    return torch.cuda.Stream(device, priority=-1), torch.cuda.Stream(device)


def _overlapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None, lay: Layout,
                sparsity: float, setup: Setup, cfg: Config, out: torch.Tensor) -> torch.Tensor:
    """Tile order with the heads in `setup.head_chunks` groups: each group's set-up on a side stream while
    the kernel runs the group before, so the memory-bound set-up hides under the compute-bound kernel
    (their programs fit on an SM together) but for the first group's. The groups' kernels alternate
    between the caller's stream and a second one, so each fills the tail of the one before. On the CPU
    (the interpreter) the same groups run one after another."""
    from .video_sparse_kernel import attention
    q, k, v = _one_layout(q, k, v)
    heads = q.shape[2]
    chunks = min(setup.head_chunks, heads)  # no empty group
    bounds = [heads * i // chunks for i in range(chunks + 1)]
    streams = None
    if q.is_cuda:
        main = torch.cuda.current_stream(q.device)
        side, second = _side_streams(q.device)
        side.wait_stream(main)  # q, k, v are written
        second.wait_stream(main)  # and `out` is allocated
        streams = (side, (main, second))
    for i, (h0, h1) in enumerate(zip(bounds, bounds[1:])):
        with torch.cuda.stream(streams[0]) if streams else contextlib.nullcontext():
            comp, index, ends = _tiled_tables(q[:, :, h0:h1], k[:, :, h0:h1], v[:, :, h0:h1], lay, sparsity, setup)
        run = streams[1][i % 2] if streams else None
        if streams and run is not None:
            run.wait_stream(streams[0])
            for t in (comp, index, ends):
                t.record_stream(run)  # made on the set-up stream, read on this one
        with torch.cuda.stream(run) if run is not None else contextlib.nullcontext():
            attention(q, k, v, index, ends, lay.counts, lay.tiled_token, out, comp=comp, gate=gate, cfg=cfg,
                      query_groups=lay.query_groups, starts=lay.starts, heads=(h0, h1))
    if streams:
        streams[1][0].wait_stream(streams[1][1])  # the caller's stream: every group written
    return out


@torch.library.custom_op("fastvideo::video_sparse_attention", mutates_args=())
def _video_sparse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None,
                     grid: list[int], sparsity: float, tiled: bool = False) -> torch.Tensor:
    lay = layout((grid[0], grid[1], grid[2]), str(q.device))
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():  # Triton launches on it
        return triton_call(q, k, v, gate, lay, sparsity, tiled)


@_video_sparse_op.register_fake
def _(q, k, v, gate, grid, sparsity, tiled=False):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int, int] | None = None,
           gate: torch.Tensor | None = None, options: VideoSparseOptions | None = None,
           impl: str = "auto", tiled: bool = False) -> torch.Tensor:
    """q, k, v, gate: [B, S, H, D] with S = t·h·w of `grid` → [B, S, H, D].

    gate: the `to_gate_compress` output (None: the branches are added ungated, as FastVideo's kernel
    does). Without a grid (text cross-attention) this is dense attention. impl: "auto" (the Triton
    kernel where `kernel_applies`, else FlexAttention), "triton" or "flex" (tests and the bench).
    tiled: the sequence (in and out) is in the grid's tile order (`tile_order`), as the DiT keeps it
    between the blocks under VSA; else in token order.
    """
    if impl not in IMPLS:
        raise FastVideoError(f"video sparse attention impl must be one of {', '.join(IMPLS)}, got {impl!r}.")
    if grid is None or k.shape[1] != q.shape[1]:
        from . import sdpa
        return sdpa.attend(q, k, v)
    grid = (int(grid[0]), int(grid[1]), int(grid[2]))
    if math.prod(grid) != q.shape[1]:
        raise FastVideoError(f"video sparse attention got {q.shape[1]} tokens for the grid {grid} "
                             f"({math.prod(grid)} tokens).")
    if gate is not None and gate.shape != q.shape:
        raise FastVideoError(f"video sparse attention needs a gate shaped like the queries {tuple(q.shape)}, "
                             f"got {tuple(gate.shape)}.")
    sparsity = DEFAULT_SPARSITY if options is None else options.sparsity  # no object built: traceable
    if impl == "triton" and _triton_problem():
        raise FastVideoError(f"video sparse attention impl 'triton' cannot run here: {_triton_problem()}.")
    if impl == "triton" or impl == "auto" and kernel_applies(q, v):
        return torch.ops.fastvideo.video_sparse_attention(q, k, v, gate, list(grid), sparsity, tiled)
    lay = layout(grid, str(q.device))
    slot = lay.tiled_slot if tiled else lay.slot  # where each position of the sequence sits in padded tiles
    qt, kt, vt = (_to_tiles(x, slot, lay) for x in (q, k, v))
    scores, out_c = compressed(qt, kt, vt, lay)
    mask = block_mask(top_tiles(scores, sparsity), lay)
    heads_first = lambda x: x.transpose(1, 2)  # [B, H, S, D], what flex_attention takes
    if q.is_cuda:
        sparse = _compiled_flex()(heads_first(qt), heads_first(kt), heads_first(vt), block_mask=mask,
                                  kernel_options=_CUDA_KERNEL_OPTIONS)
    else:  # eager: fine for the small shapes the CPU tests use
        sparse = flex_attention(heads_first(qt), heads_first(kt), heads_first(vt), block_mask=mask)
    sparse = heads_first(sparse)[:, slot]  # back to [B, S, H, D], padding dropped
    comp = out_c.transpose(1, 2)[:, slot // TILE_TOKENS]  # each token takes its tile's result
    if gate is not None:
        comp = comp * gate.float()
    return (sparse.float() + comp).to(q.dtype)
