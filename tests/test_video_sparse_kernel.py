"""VIDEO_SPARSE_ATTN's Triton kernel: under Triton's CPU interpreter against the dense-mask reference
(tests/test_video_sparse.py) and the FlexAttention path, its tables, its place in compiled graphs, and on a
GPU at FastWan's 480p shape."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import run_interpreted, sm90_build

from fastvideo_nodes.attention import video_sparse as vs
from fastvideo_nodes.errors import FastVideoError

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- Triton interpreter (CPU)

# One process for every case: the interpreter must be chosen before triton is imported, and the
# imports cost more than a case. Each case: (grid, sparsity, D, B, dtype, gated). Half precision is
# fp16 here: Triton 3.9's interpreter multiplies bf16 tl.dot operands as raw bits (bf16 runs on the GPU).
INTERPRETED = r"""
import json, math, sys, warnings
import torch
warnings.filterwarnings("ignore")
sys.path.insert(0, "tests")
from test_video_sparse import reference
from fastvideo_nodes.attention import attention, video_sparse as vs, video_sparse_kernel as K

def inputs(grid, b, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, math.prod(grid), 2, d, generator=g).to(dtype) for _ in range(4)]

def diff(a, b):
    return (a.double() - b.double()).abs().max().item()

res = {"fused": [], "plain": [], "configs": []}
CASES = [((5, 6, 7), 0.0, 64, 1, "float32", True), ((5, 6, 7), 0.5, 128, 2, "float32", True),
         ((5, 6, 7), 0.8, 64, 2, "float32", True), ((4, 8, 8), 0.0, 128, 1, "float32", True),
         ((4, 8, 8), 0.5, 64, 2, "float32", True), ((3, 5, 9), 0.5, 128, 1, "float32", False),
         ((3, 5, 9), 0.8, 64, 1, "float32", True), ((5, 6, 7), 0.8, 128, 2, "float16", True),
         ((3, 5, 9), 0.5, 64, 1, "float16", True), ((1, 9, 2), 0.5, 64, 1, "float32", True)]
for i, (grid, sp, d, b, dtype, gated) in enumerate(CASES):
    q, k, v, gate = inputs(grid, b, d, getattr(torch, dtype), seed=i)
    gate = gate if gated else None
    opts = vs.VideoSparseOptions(sp)
    if i == 4:  # other memory layouts: heads-first storage for q, k, v, a gate whose last dim is strided
        given = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
        given.append(gate.transpose(-1, -2).contiguous().transpose(-1, -2))
        assert given[3].stride(-1) != 1 and given[0].stride() != q.stride()
    else:
        given = [q, k, v, gate]
    out = vs.attend(*given[:3], grid=grid, gate=given[3], options=opts, impl="triton")
    flex = vs.attend(q, k, v, grid=grid, gate=gate, options=opts, impl="flex")
    want = reference(q, k, v, grid, gate, sp)[0]
    res["fused"].append(dict(case=[list(grid), sp, d, b, dtype, gated], ref=diff(out, want), flex=diff(out, flex),
                             dtype=str(out.dtype), shape=list(out.shape),
                             cos=torch.nn.functional.cosine_similarity(out.double().flatten(), want.flatten(),
                                                                       dim=0).item()))

# The plain sparse branch in the padded layout (identity slot table, no compressed branch): all 64
# rows of every query tile as one launch, then the layout's launches by real count (real rows only).
for grid, sp in (((5, 6, 7), 0.5), ((3, 5, 9), 0.8)):
    q, k, v, _ = inputs(grid, 2, 64, torch.float32, seed=20)
    lay = vs.layout(grid, "cpu")
    qt, kt, vt, _, index, ends = vs.prepare(q, k, v, lay, sp)
    ident = torch.arange(qt.shape[1], dtype=torch.int32)
    sparse = reference(q, k, v, grid, None, sp)[1]
    row = dict(grid=list(grid), groups=[[r, ids.tolist()] for r, ids in lay.query_groups])
    runs = [("whole", None, "w4s3"), ("split", lay.query_groups, "w4s3"), ("split2", lay.query_groups, "w4s3_q16q32")]
    for name, groups, cfg in runs[:3 if grid == (5, 6, 7) else 2]:
        out = torch.full_like(qt, float("nan"))
        K.attention(qt, kt, vt, index, ends, lay.counts, ident, out, query_groups=groups, cfg=K.CONFIGS[cfg])
        row[name] = diff(out[:, lay.slot], sparse)
        row[name + "_finite"] = bool(out.isfinite().all())
    res["plain"].append(row)

# Pointer and TMA loads, and one-warp small programs, agree; (5, 6, 7) has tiles of every group
# (64, 48, 32, 24, 16, 12, 8, 6 tokens).
grid = (5, 6, 7)
q, k, v, gate = inputs(grid, 1, 64, torch.float32, seed=30)
want = reference(q, k, v, grid, gate, 0.3)[0]
lay = vs.layout(grid, "cpu")
qt, kt, vt, comp, index, ends = vs.prepare(q, k, v, lay, 0.3)
for name in ("w4s3", "w4s3_tma", "w4s3_sw1"):
    out = torch.empty_like(q)
    K.attention(qt, kt, vt, index, ends, lay.counts, lay.token, out, comp=comp, gate=gate, cfg=K.CONFIGS[name])
    res["configs"].append(dict(cfg=name, ref=diff(out, want), groups=sorted(set(lay.counts.tolist()))))

# Tile order (tiled=True): q, k, v, gate and the output in the layout's tile order, no padding. Against the
# reference (tiled alike) and the token-order op, for cases of every kind above, then per config on (5, 6, 7)
# (pointer and TMA loads, every split of the query rows; its last tile ends the tensor).
res["tiled"], res["tiled_configs"] = [], []
tile = lambda x, lay: None if x is None else x[:, lay.order]
for i in (1, 3, 5, 7, 9):
    grid, sp, d, b, dtype, gated = CASES[i]
    q, k, v, gate = inputs(grid, b, d, getattr(torch, dtype), seed=i)
    gate = gate if gated else None
    lay = vs.layout(grid, "cpu")
    opts = vs.VideoSparseOptions(sp)
    out = vs.attend(*(tile(x, lay) for x in (q, k, v)), grid=grid, gate=tile(gate, lay), options=opts,
                    impl="triton", tiled=True)
    old = vs.attend(q, k, v, grid=grid, gate=gate, options=opts, impl="triton")
    want = reference(q, k, v, grid, gate, sp)[0]
    res["tiled"].append(dict(case=[list(grid), sp, d, b, dtype, gated], ref=diff(out, tile(want, lay)),
                             old=diff(out, tile(old, lay)), shape=list(out.shape), dtype=str(out.dtype)))
grid = (5, 6, 7)
q, k, v, gate = inputs(grid, 2, 64, torch.float32, seed=31)
lay = vs.layout(grid, "cpu")
want = tile(reference(q, k, v, grid, gate, 0.3)[0], lay)
qt, kt, vt, comp, index, ends = vs.prepare_tiled(*(tile(x, lay) for x in (q, k, v)), lay, 0.3)
for name in ("w4s3", "w4s3_tma", "w4s3_sw1", "w4s3_q16q32", "w4s3_wholeq", "w4s2_tma", "w4s1_tma", "w4s1_tma_r128",
             "w4s2_tma_lazy", "w4s1_tma_lazy", "w4s1_tma_lazy_r128", "w4s1_tma_r128_wholeq"):
    out = torch.full_like(qt, float("nan"))
    K.attention(qt, kt, vt, index, ends, lay.counts, lay.tiled_token, out, comp=comp, gate=tile(gate, lay),
                cfg=K.CONFIGS[name], query_groups=lay.query_groups, starts=lay.starts)
    res["tiled_configs"].append(dict(cfg=name, ref=diff(out, want)))

# Lazy rescaling where it matters: queries scaled up so that a row's max grows by more than 2^8 after its
# first key tile (rescales in the middle of a row), and as is (most tiles skip it); against the eager rescale.
res["lazy"] = []
for scale in (1.0, 12.0):
    qs = tile(q, lay) * scale
    want = tile(reference(q * scale, k, v, grid, gate, 0.3)[0], lay)
    qt, kt, vt, comp, index, ends = vs.prepare_tiled(qs, *(tile(x, lay) for x in (k, v)), lay, 0.3)
    row, outs = dict(scale=scale), []
    for name in ("w4s2_tma", "w4s2_tma_lazy", "w4s1_tma_lazy"):
        outs.append(torch.full_like(qt, float("nan")))
        K.attention(qt, kt, vt, index, ends, lay.counts, lay.tiled_token, outs[-1], comp=comp, gate=tile(gate, lay),
                    cfg=K.CONFIGS[name], query_groups=lay.query_groups, starts=lay.starts)
        row[name] = diff(outs[-1], want)
    row["lazy_vs_eager"] = max(diff(out, outs[0]) for out in outs[1:])
    res["lazy"].append(row)

# The dispatch under torch.compile: one graph holding the custom op, no recompile for new values.
vs.kernel_applies = lambda q, v: True  # as on a GPU
graphs = []
def backend(gm, example):
    graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
    return gm
def block(q, k, v, gate):
    return attention(q * 1.0, k, v, backend="VIDEO_SPARSE_ATTN", grid=grid, gate=gate,
                     options=vs.VideoSparseOptions(0.5)) + 1.0
compiled = torch.compile(block, fullgraph=True, backend=backend)
first = compiled(q, k, v, gate)
second = compiled(q + 0.5, k, v, gate)
res["compiled"] = dict(graphs=len(graphs), op=any("video_sparse_attention" in t for t in graphs[0]),
                       first=diff(first, reference(q, k, v, grid, gate, 0.5)[0] + 1.0),
                       second=diff(second, reference(q + 0.5, k, v, grid, gate, 0.5)[0] + 1.0))
graphs.clear()
def tiled_block(q, k, v, gate):
    return attention(q * 1.0, k, v, backend="VIDEO_SPARSE_ATTN", grid=grid, gate=gate,
                     options=vs.VideoSparseOptions(0.5), tiled=True) + 1.0
compiled = torch.compile(tiled_block, fullgraph=True, backend=backend)
got = compiled(*(tile(x, lay) for x in (q, k, v, gate)))
res["compiled_tiled"] = dict(graphs=len(graphs), op=any("video_sparse_attention" in t for t in graphs[0]),
                             diff=diff(got, tile(reference(q, k, v, grid, gate, 0.5)[0], lay) + 1.0))

# A tiny FastWan DiT on the kernel (as on a GPU): its blocks in tile order against token order all through.
from fastvideo_nodes.models import wan_dit
from fastvideo_nodes.testing.fastwan import TINY_FASTWAN, random_fastwan
model = random_fastwan(TINY_FASTWAN, seed=5)
g = torch.Generator().manual_seed(5)
x, ctx = torch.randn(2, 16, 5, 12, 14, generator=g), torch.randn(2, 12, 32, generator=g)
t = torch.tensor([999.0, 412.0])
opts = vs.VideoSparseOptions(0.5)
with torch.no_grad():
    tiled = model(x, t, ctx, attention_backend="VIDEO_SPARSE_ATTN", attention_options=opts)
    wan_dit.token_order = lambda backend, grid, device: None
    plain = model(x, t, ctx, attention_backend="VIDEO_SPARSE_ATTN", attention_options=opts)
res["dit"] = dict(diff=diff(tiled, plain), scale=plain.abs().max().item())
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(INTERPRETED)


def test_kernel_equals_dense_mask_reference_and_flex(interpreted):
    """Grids with partial edge tiles (5,6,7: one full tile of 8; 3,5,9 and 1,9,2: none) and without (4,8,8),
    sparsity 0 / 0.5 / 0.8, D 64 and 128, B 1 and 2, with and without a gate, inputs in other strides."""
    cases = interpreted["fused"]
    assert len(cases) == 10
    for c in cases:
        grid, sp, d, b, dtype, gated = c["case"]
        assert c["shape"] == [b, math.prod(grid), 2, d] and c["dtype"] == f"torch.{dtype}", c
        if dtype == "float32":
            assert c["ref"] < 1e-5 and c["flex"] < 1e-5, c
        else:  # P is rounded to the input dtype before P·V, as every flash kernel does
            assert c["cos"] > 0.9999 and c["ref"] < 5e-3 and c["flex"] < 5e-3, c


def test_plain_sparse_branch_in_padded_layout(interpreted):
    for c in interpreted["plain"]:
        assert c["whole"] < 1e-5 and c["whole_finite"], c  # padded query rows are written too, and finite
        assert c["split"] < 1e-5, c  # ≤ 16-token tiles as 16-row launches
    assert interpreted["plain"][0]["split2"] < 1e-5  # (5, 6, 7) has tiles of ≤ 32 tokens too: 32-row launches
    # (5, 6, 7): the full tile and those of 48 as 64 rows, 32 and 24 as 32, the t-edge tiles (≤ 16) as 16;
    # (3, 5, 9): tiles of 48 and of 12, 12 and 3 tokens.
    assert [c["groups"] for c in interpreted["plain"]] == [
        [[64, [0, 1]], [32, [2, 3]], [16, [4, 5, 6, 7]]], [[64, [0, 1]], [16, [2, 3, 4, 5]]]]


def test_pointer_and_tma_loads_and_warp_counts_agree(interpreted):
    assert [c["cfg"] for c in interpreted["configs"]] == ["w4s3", "w4s3_tma", "w4s3_sw1"]
    for c in interpreted["configs"]:
        assert c["ref"] < 1e-5 and c["groups"] == [6, 8, 12, 16, 24, 32, 48, 64], c


def test_compiled_block_keeps_one_graph_with_the_op(interpreted):
    c = interpreted["compiled"]
    assert c["graphs"] == 1 and c["op"], c  # fullgraph: no break; a second call with new values: no recompile
    assert c["first"] < 1e-5 and c["second"] < 1e-5, c
    c = interpreted["compiled_tiled"]
    assert c["graphs"] == 1 and c["op"] and c["diff"] < 1e-5, c


def test_tiny_fastwan_on_the_kernel_in_tile_order_equals_token_order(interpreted):
    c = interpreted["dit"]  # grid (5, 6, 7): partial edge tiles; batch 2
    assert c["diff"] <= 1e-5 * c["scale"], c


def test_tile_order_equals_reference_and_token_order(interpreted):
    """tiled=True: the same op on inputs already in tile order (no gather, the output in place), against
    the reference and the token-order kernel, tiled alike: partial edge tiles, D 64/128, B 1/2, fp16,
    no gate; then pointer and TMA loads and each query-row split."""
    cases = interpreted["tiled"]
    assert len(cases) == 5
    for c in cases:
        grid, sp, d, b, dtype, gated = c["case"]
        assert c["shape"] == [b, math.prod(grid), 2, d] and c["dtype"] == f"torch.{dtype}", c
        assert c["old"] < (1e-6 if dtype == "float32" else 1e-3), c  # the same sums in the same order
        assert c["ref"] < (1e-5 if dtype == "float32" else 5e-3), c
    assert [c["cfg"] for c in interpreted["tiled_configs"]] == [
        "w4s3", "w4s3_tma", "w4s3_sw1", "w4s3_q16q32", "w4s3_wholeq", "w4s2_tma", "w4s1_tma", "w4s1_tma_r128",
        "w4s2_tma_lazy", "w4s1_tma_lazy", "w4s1_tma_lazy_r128", "w4s1_tma_r128_wholeq"]
    for c in interpreted["tiled_configs"]:
        assert c["ref"] < 1e-5, c  # the NaN-filled output: every real row written, and finite


def test_lazy_rescaling_equals_the_reference(interpreted):
    """Config.lazy: the max (and acc) move only when a row's max grew by more than 2^8; with queries
    scaled ×12 it does so mid-row, unscaled almost never after the first tile."""
    assert [c["scale"] for c in interpreted["lazy"]] == [1.0, 12.0]
    for c in interpreted["lazy"]:
        for name in ("w4s2_tma", "w4s2_tma_lazy", "w4s1_tma_lazy"):
            assert c[name] < 1e-5 * c["scale"], c  # fp32 logits twelve times larger: rounding grows alike
        assert c["lazy_vs_eager"] < 1e-6, c


# ----------------------------------------------------------------------------- built for Hopper, offline (CPU)

@pytest.mark.parametrize("dtype,d,tma,rows,packed,lazy", [
    ("bf16", 128, False, 64, False, False), ("bf16", 128, True, 64, False, False),
    ("bf16", 128, False, 16, False, False), ("fp16", 64, True, 32, False, False), ("bf16", 128, True, 64, True, False),
    ("bf16", 128, False, 64, True, False), ("bf16", 128, True, 16, True, False), ("bf16", 128, True, 64, True, True),
    ("bf16", 128, True, 16, True, True)])
def test_sparse_kernel_builds_for_hopper(dtype, d, tma, rows, packed, lazy):
    """packed: inputs in tile order, tiles found through the packed index (`tiled=True`); lazy: the
    rescale under a branch still leaves every key loop pipelined."""
    K = pytest.importorskip("fastvideo_nodes.attention.video_sparse_kernel")
    block = {"Q": rows, "K64": 64, "V64": 64, "K16": 16, "V16": 16, "K32": 32, "V32": 32}
    types = {n: f"tensordesc<{dtype}[{r},{d}]>" if tma else f"*{dtype}" for n, r in block.items()}
    types.update({n: "*i32" for n in ("QTILES", "IDX", "ENDS", "TOK", "STARTS")}, COUNTS="*i64", COMP="*fp32",
                 GATE=f"*{dtype}", O=f"*{dtype}", qk_scale="fp32")
    kernel = sm90_build(K._vsa_fwd, types, dict(D=d, BM=rows, HAS_COMP=True, HAS_GATE=True, TMA=tma, PACKED=packed,
                                                 LAZY=lazy),
                        odd=("H", "H0", "k_tiles", "P"),  # as at 480p: 12 heads, 125 tiles kept, 32,760 tokens
                        num_stages=2 if packed else 3)  # packed: as DEFAULT runs it (at 3 its loops go 3 deep)
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    # 64 query rows run on Hopper's warpgroup MMA; 16 or 32 rows are below its size and use mma.sync
    assert "wgmma" in ptx if rows == 64 else "mma.sync" in ptx and "wgmma" not in ptx
    assert ("cp.async.bulk.tensor" in ptx) == tma
    mlir = {"bf16": "bf16", "fp16": "f16"}[dtype]
    depth = 2 if rows == 64 else 1  # the mma.sync programs get one K/V buffer (still copied ahead, async)
    for piece in (64, 32, 16):  # every key loop is software-pipelined
        assert f"memdesc<{depth}x{piece}x{d}x{mlir}" in ttgir, piece


def test_gather_kernel_builds_for_hopper():
    K = pytest.importorskip("fastvideo_nodes.attention.video_sparse_kernel")
    types = dict(X="*bf16", TOK="*i32", COUNTS="*i64", T="*bf16", M="*fp32")
    for store in (True, False):  # False: the means alone (inputs in tile order)
        ptx = sm90_build(K._gather, types, dict(D=128, STORE=store)).asm["ptx"]
        assert "ld.global" in ptx and ("st.global.v" in ptx) == store


# ----------------------------------------------------------------------------- tables and dispatch (CPU)

def test_tables_group_tiles_by_the_piece_they_are_read_in():
    pytest.importorskip("triton")
    from fastvideo_nodes.attention.video_sparse_kernel import tables
    counts = torch.tensor([64, 16, 64, 33, 8, 32, 17])  # groups: full, ≤16, full, more, ≤16, ≤32, ≤32
    chosen = torch.tensor([[[[3, 0, 4, 6], [1, 5, 2, 3], [6, 4, 5, 1], [3, 2, 6, 0]]]])
    index, ends = tables(chosen, counts)
    assert index.dtype == ends.dtype == torch.int32
    assert index[0, 0].tolist() == [[0, 4, 6, 3], [2, 1, 5, 3], [1, 4, 5, 6], [0, 2, 6, 3]]
    assert ends[0, 0].tolist() == [[1, 2, 3], [1, 2, 3], [0, 2, 4], [2, 2, 3]]


def test_kernel_is_only_chosen_where_it_applies():
    q = torch.zeros(1, 64, 2, 128, dtype=torch.bfloat16)
    assert not vs.kernel_applies(q, q)  # CPU: FlexAttention
    with pytest.raises(FastVideoError, match=r"impl must be one of auto, triton, flex, got 'cuda'"):
        vs.attend(q, q, q, grid=(4, 4, 4), impl="cuda")


def test_kernel_check_traces_without_a_break():
    """kernel_applies runs inside compiled blocks (attention() asks it there): its Triton probe is a
    constant to the compiler, even when first asked during tracing."""
    usable = vs._triton_problem() is None
    vs._triton_problem.cache_clear()
    probe = torch.compile(lambda x: x + 1 if vs._triton_usable() else x - 1, fullgraph=True, backend="eager")
    assert torch.equal(probe(torch.zeros(2)), torch.full((2,), 1.0 if usable else -1.0))


def test_forcing_triton_without_it_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(vs, "_triton_problem", lambda: "the VSA Triton kernel cannot load (x); `pip install triton`")
    q = torch.zeros(1, 64, 2, 64)
    with pytest.raises(FastVideoError, match=r"impl 'triton' cannot run here: .*pip install triton"):
        vs.attend(q, q, q, grid=(4, 4, 4), impl="triton")


# ----------------------------------------------------------------------------- GPU

def masked_reference(q, k, v, gate, grid, sparsity):
    """The sparse branch as dense fp32 attention under the kernel's own tile choice (so that near-ties in
    the top-k cannot differ), one head at a time, plus compressed · gate: [B, S, H, D] fp32."""
    lay = vs.layout(grid, str(q.device))
    qt, kt, vt, comp, index, _ = vs.prepare(q, k, v, lay, sparsity)
    n, b, h = lay.num_tiles, q.shape[0], q.shape[2]
    tile = torch.arange(n * 64, device=q.device) // 64
    out = torch.empty(b, n * 64, h, q.shape[-1], device=q.device)
    for i in range(b):
        for j in range(h):
            picked = torch.zeros(n, n, dtype=torch.bool, device=q.device).scatter_(-1, index[i, j].long(), True)
            allowed = picked[tile][:, tile] & lay.valid[None, :]
            logits = (qt[i, :, j].float() @ kt[i, :, j].float().T) / math.sqrt(q.shape[-1])
            out[i, :, j] = logits.masked_fill_(~allowed, -math.inf).softmax(-1) @ vt[i, :, j].float()
            del logits, allowed
    return out[:, lay.slot] + comp.transpose(1, 2)[:, lay.slot // 64] * gate.float()


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.8, 0.9])
def test_gpu_kernel_equals_flex_and_reference_at_480p(sparsity):
    grid, heads = (21, 30, 52), 12
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, gate = (torch.randn(1, math.prod(grid), heads, 128, device="cuda", generator=g).bfloat16()
                     for _ in range(4))
    opts = vs.VideoSparseOptions(sparsity)
    assert vs.kernel_applies(q, v)
    out = vs.attend(q, k, v, grid=grid, gate=gate, options=opts)
    flex = vs.attend(q, k, v, grid=grid, gate=gate, options=opts, impl="flex")
    want = masked_reference(q, k, v, gate, grid, sparsity)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert F.cosine_similarity(out.float().flatten(), want.flatten(), dim=0).item() > 0.9999
    assert (out.float() - want).abs().max().item() < 3e-2
    # Flex takes its tile means from torch, summed in another order: a near-tie at the top-k boundary
    # may pick another tile for a row, so it is held to the reference almost everywhere, not everywhere.
    for a, b in ((flex.float(), want), (flex.float(), out.float())):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() > 0.9999
        assert ((a - b).abs() > 3e-2).float().mean().item() < 1e-3


@pytest.mark.gpu
def test_gpu_every_config_and_autotune_agree():
    from fastvideo_nodes.attention import video_sparse_kernel as K
    grid = (5, 18, 26)
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v, gate = (torch.randn(2, math.prod(grid), 4, 64, device="cuda", generator=g).half() for _ in range(4))
    lay = vs.layout(grid, "cuda")
    qt, kt, vt, comp, index, ends = vs.prepare(q, k, v, lay, 0.8)
    base = vs.attend(q, k, v, grid=grid, gate=gate).float()
    for cfg in [*K.CONFIGS.values(), None]:
        out = K.attention(qt, kt, vt, index, ends, lay.counts, lay.token, torch.empty_like(q), comp=comp,
                          gate=gate, cfg=cfg, query_groups=lay.query_groups)
        assert (out.float() - base).abs().max().item() < 1e-2, cfg


@pytest.mark.gpu
def test_gpu_compiled_dispatch_is_one_graph():
    from fastvideo_nodes.attention import attention
    grid = (8, 16, 16)
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v, gate = (torch.randn(1, math.prod(grid), 4, 128, device="cuda", generator=g).bfloat16()
                     for _ in range(4))
    block = lambda q, k, v, gate: attention(q, k, v, backend="VIDEO_SPARSE_ATTN", grid=grid, gate=gate) * 1.0
    compiled = torch.compile(block, fullgraph=True)
    torch._dynamo.config.error_on_recompile = True
    try:
        assert torch.equal(compiled(q, k, v, gate), block(q, k, v, gate))
        assert torch.equal(compiled(q * 2, k, v, gate), block(q * 2, k, v, gate))
    finally:
        torch._dynamo.config.error_on_recompile = False
