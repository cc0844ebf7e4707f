"""VIDEO_SPARSE_ATTN: the FlexAttention fast path equals a naive dense-mask reference built from the definition
(the Triton kernel is held to the same reference in test_video_sparse_kernel.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastvideo_nodes.attention import BACKENDS, UNSUPPORTED, resolve_backend
from fastvideo_nodes.attention import video_sparse as vs
from fastvideo_nodes.errors import FastVideoError

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def tensors(grid, heads, d=16, n=4, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    s = math.prod(grid)
    return [torch.randn(1, s, heads, d, generator=g, device=device, dtype=dtype) for _ in range(n)]


def tile_ids(grid):
    """Tile of each token (t, h, w order): tiles of 4×4×4 numbered in t, h, w order."""
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    nh, nw = math.ceil(grid[1] / 4), math.ceil(grid[2] / 4)
    return ((t // 4 * nh + h // 4) * nw + w // 4).flatten()


def reference(q, k, v, grid, gate, sparsity):
    """VSA written out densely in float64, in the original token order: tile means over real tokens,
    softmax over tile scores, the top-k key tiles per query tile from those scores as an explicit
    [S, S] mask for exact attention, then sparse + compressed · gate."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))  # [B, H, S, D]
    tid = tile_ids(grid)
    n = int(tid.max()) + 1
    count = torch.bincount(tid, minlength=n).double()

    def means(x):
        return torch.zeros(*x.shape[:2], n, x.shape[-1], dtype=x.dtype).index_add_(2, tid, x) / count[:, None]

    scores = means(q) @ means(k).transpose(-1, -2) / math.sqrt(q.shape[-1])
    comp = scores.softmax(-1) @ means(v)  # [B, H, N, D]
    keep = max(1, min(math.ceil((1 - sparsity) * n), n))
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(keep, -1).indices, True)
    mask = chosen[:, :, tid][:, :, :, tid]  # [B, H, S, S]: query token i may see key token j
    logits = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, -math.inf)
    sparse = logits.softmax(-1) @ v
    out = sparse + comp[:, :, tid] * (1.0 if gate is None else gate.double().transpose(1, 2))
    return out.transpose(1, 2), sparse.transpose(1, 2), mask


def exact(q, k, v):
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


@pytest.mark.parametrize("grid", [(4, 4, 4), (5, 6, 7), (3, 5, 9), (8, 4, 8), (1, 9, 2)])
def test_layout_is_fastvideos_tile_order(grid):
    """Tiles in t, h, w order, each tile's real tokens first (t, h, w order inside its own box),
    padding after: the slot of every token, built here by walking the tiles."""
    idx = torch.arange(math.prod(grid)).reshape(grid)
    slot = torch.empty(math.prod(grid), dtype=torch.long)
    counts, base = [], 0
    for t in range(0, grid[0], 4):
        for h in range(0, grid[1], 4):
            for w in range(0, grid[2], 4):
                members = idx[t:t + 4, h:h + 4, w:w + 4].flatten()
                slot[members] = base + torch.arange(members.numel())
                counts.append(members.numel())
                base += 64
    lay = vs.layout(grid, "cpu")
    assert torch.equal(lay.slot, slot)
    assert lay.counts.tolist() == counts
    assert lay.valid.sum().item() == math.prod(grid) and torch.equal(lay.full, torch.tensor(counts) == 64)


@pytest.mark.parametrize("grid,heads", [((4, 4, 4), 1), ((4, 8, 8), 2), ((5, 6, 7), 3), ((3, 5, 9), 4),
                                        ((8, 8, 12), 2), ((2, 11, 6), 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.95])
def test_fast_path_equals_dense_mask_reference(grid, heads, sparsity):
    q, k, v, gate = tensors(grid, heads, seed=heads)
    out = vs.attend(q, k, v, grid=grid, gate=gate, options=vs.VideoSparseOptions(sparsity))
    want, sparse, mask = reference(q, k, v, grid, gate, sparsity)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert (out.double() - want).abs().max().item() < 2e-5
    n = len(vs.layout(grid, "cpu").counts)
    if sparsity == 0.0 or vs.kept_tiles(sparsity, n) == n:  # every tile kept: the sparse branch is exact attention
        assert mask.all() and (sparse - exact(q, k, v)).abs().max().item() < 1e-9
    else:
        assert not mask.all() and (sparse - exact(q, k, v)).abs().max().item() > 1e-3


def test_without_gate_the_branches_add_up():
    grid = (5, 6, 7)
    q, k, v = tensors(grid, 2, n=3, seed=7)
    out = vs.attend(q, k, v, grid=grid, options=vs.VideoSparseOptions(0.6))
    assert (out.double() - reference(q, k, v, grid, None, 0.6)[0]).abs().max().item() < 2e-5


def test_default_sparsity_is_fastwans():
    assert vs.VideoSparseOptions().sparsity == 0.8 == vs.DEFAULT_SPARSITY
    grid = (8, 8, 12)  # 12 tiles: ⌈2.4⌉ = 3 kept at 0.8
    q, k, v, gate = tensors(grid, 2, seed=3)
    out = vs.attend(q, k, v, grid=grid, gate=gate)
    want, _, mask = reference(q, k, v, grid, gate, 0.8)
    assert (out.double() - want).abs().max().item() < 2e-5
    assert mask[0, 0, 0].sum().item() == 3 * 64


@pytest.mark.parametrize("sparsity,tiles,kept", [(0.8, 624, 125), (0.8, 5, 1), (0.8, 20, 4), (0.0, 7, 7),
                                                 (0.99, 8, 1), (0.5, 9, 5), (0.9, 1, 1)])
def test_kept_tiles_is_the_ceiling_of_the_kept_fraction(sparsity, tiles, kept):
    assert vs.kept_tiles(sparsity, tiles) == kept


def test_block_mask_rows_hold_the_chosen_tiles_split_full_and_partial():
    grid = (5, 6, 7)  # 8 tiles, only the first one full
    lay = vs.layout(grid, "cpu")
    chosen = torch.tensor([[[[3, 0, 5], [0, 1, 2], [7, 6, 4]]]])  # 3 query rows shown
    mask = vs.block_mask(chosen, lay)
    assert mask.full_kv_num_blocks[0, 0].tolist() == [1, 1, 0]
    assert mask.full_kv_indices[0, 0, 0, 0].item() == 0 and mask.full_kv_indices[0, 0, 1, 0].item() == 0
    assert mask.kv_num_blocks[0, 0].tolist() == [2, 2, 3]
    assert mask.kv_indices[0, 0, 0, :2].tolist() == [3, 5] and mask.kv_indices[0, 0, 2, :3].tolist() == [4, 6, 7]
    picked = torch.zeros(1, 1, 3, 8, dtype=torch.bool).scatter_(-1, chosen, True)
    assert torch.equal(mask.to_dense().bool(), picked)  # the blocks the kernel visits are the chosen tiles


def test_splitting_heads_equals_all_heads():
    """Under Ulysses each rank runs the full sequence with its share of the heads."""
    grid = (5, 6, 7)
    q, k, v, gate = tensors(grid, 4, seed=11)
    opts = vs.VideoSparseOptions(0.7)
    whole = vs.attend(q, k, v, grid=grid, gate=gate, options=opts)
    parts = [vs.attend(*(x[:, :, i:i + 2] for x in (q, k, v)), grid=grid, gate=gate[:, :, i:i + 2], options=opts)
             for i in (0, 2)]
    assert torch.equal(torch.cat(parts, dim=2), whole)


def test_without_a_grid_it_is_dense_attention():
    q, k, v = tensors((2, 3, 4), 2, n=3, seed=5)
    text_k, text_v = k[:, :10], v[:, :10]  # text cross-attention: other length, no grid
    assert (vs.attend(q, text_k, text_v).double() - exact(q, text_k, text_v)).abs().max().item() < 1e-5
    assert (vs.attend(q, k, v).double() - exact(q, k, v)).abs().max().item() < 1e-5


def test_bfloat16_stays_close_and_keeps_its_dtype():
    grid = (5, 6, 7)
    q, k, v, gate = tensors(grid, 2, seed=2)
    out = vs.attend(*(x.bfloat16() for x in (q, k, v)), grid=grid, gate=gate.bfloat16())
    assert out.dtype == torch.bfloat16
    want = reference(*(x.bfloat16() for x in (q, k, v)), grid, gate.bfloat16(), 0.8)[0]
    assert F.cosine_similarity(out.double().flatten(), want.flatten(), dim=0).item() > 0.999


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.8", True, None])
def test_bad_sparsity_says_what_is_valid(bad):
    with pytest.raises(FastVideoError, match=r"sparsity must be a number in \[0, 1\) .*FastWan uses 0.8\), got"):
        vs.VideoSparseOptions(bad)


def test_shape_errors_name_the_shapes():
    grid = (2, 4, 4)
    q, k, v, gate = tensors(grid, 2, seed=1)
    with pytest.raises(FastVideoError, match=r"got 32 tokens for the grid \(2, 4, 5\) \(40 tokens\)"):
        vs.attend(q, k, v, grid=(2, 4, 5))
    with pytest.raises(FastVideoError, match=r"gate shaped like the queries \(1, 32, 2, 16\), got \(1, 32, 1, 16\)"):
        vs.attend(q, k, v, grid=grid, gate=gate[:, :, :1])


def test_registered_as_a_backend():
    assert BACKENDS["VIDEO_SPARSE_ATTN"] == "video_sparse" and "VIDEO_SPARSE_ATTN" not in UNSUPPORTED
    assert resolve_backend("video_sparse_attn") == "VIDEO_SPARSE_ATTN"


@pytest.mark.gpu
@pytest.mark.parametrize("grid", [(8, 16, 16), (5, 18, 26)])
@pytest.mark.parametrize("impl", ["auto", "flex"])  # auto: the Triton kernel on CUDA
def test_gpu_fast_paths_equal_reference(grid, impl):
    q, k, v, gate = tensors(grid, 2, d=128, seed=4, dtype=torch.bfloat16, device="cuda")
    out = vs.attend(q, k, v, grid=grid, gate=gate, impl=impl)
    want = reference(*(x.cpu() for x in (q, k, v)), grid, gate.cpu(), 0.8)[0]
    assert F.cosine_similarity(out.double().cpu().flatten(), want.flatten(), dim=0).item() > 0.999
