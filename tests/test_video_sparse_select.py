"""The VSA Triton path's set-up kernels (video_sparse_select) under Triton's CPU interpreter: `select`
equals `tables(top_tiles(...))`, ties go to the lower tile id, `gather3` equals three `gather`s; and
both build for Hopper offline. The whole op with them is held to the dense reference in
test_video_sparse_kernel.py."""
import os

import pytest
from triton_interpreter import run_interpreted, sm90_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process (the interpreter must be chosen before triton is imported). Real counts come from the
# layouts of grids with partial edge tiles, and for N = 30, 45, 100 from random edge-tile sizes. The
# interpreter's cost is per program, not per score, so the larger cases run 256 rows a program (the
# last one partial), the grids' the default rows, one case one row a program.
INTERPRETED = r"""
import json, math, sys, warnings
import torch
warnings.filterwarnings("ignore")
sys.path.insert(0, "tests")
from test_video_sparse import reference
from fastvideo_nodes.attention import video_sparse as vs, video_sparse_kernel as K
from fastvideo_nodes.attention.video_sparse_select import (SETUPS, compressed, gather3, means3, means3_rows,
                                                           select)

g = torch.Generator().manual_seed(0)
counts = {f"grid{grid}": vs.layout(grid, "cpu").counts for grid in ((5, 6, 7), (3, 5, 9), (1, 9, 2), (4, 8, 8),
                                                                     (9, 10, 11))}
sizes = torch.tensor([64, 64, 64, 48, 32, 24, 17, 16, 12, 8, 3])
for n in (30, 45, 100):
    counts[f"n{n}"] = sizes[torch.randint(0, len(sizes), (n,), generator=g)]

def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))

res = {"random": [], "ties": [], "errors": []}
for name, c in counts.items():
    n = c.numel()
    for k in sorted({1, n, vs.kept_tiles(0.8, n), vs.kept_tiles(0.5, n)}):
        scores = torch.randn(2, 3, n, n, generator=g)
        rows = 256 if n >= 30 else 1 if (n, k) == (6, 2) else None
        got = select(scores, c, k, rows=rows)
        want = K.tables(scores.topk(k, -1).indices, c)
        res["random"].append(dict(counts=name, n=n, k=k, rows=rows, equal=same(got, want),
                                  equal_b2=same(select(scores, c, k, rows=rows, bits=2), want),
                                  shapes=[list(x.shape) for x in got], dtypes=[str(x.dtype) for x in got]))

# Ties everywhere: few distinct values, -0.0 beside 0.0, ±inf, NaN; the rule's reference is a stable sort.
for name in ("grid(5, 6, 7)", "n45"):
    c = counts[name]
    n = c.numel()
    scores = torch.randint(-2, 3, (1, 2, n, n), generator=g).float()
    scores[torch.rand(scores.shape, generator=g) < 0.3] = -0.0
    scores[..., 0, :] = -float("inf")  # a row of -inf only: still k real tiles, never padding
    scores[..., 1, ::3] = float("inf")
    scores[..., 2, 5], scores[..., 3, 1] = float("nan"), -float("nan")  # NaN above +inf, as torch orders it
    for k in sorted({1, 2, n // 2, n - 1, n}):
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
        res["ties"].append(dict(counts=name, k=k, equal=same(select(scores, c, k, rows=128), K.tables(order, c)),
                                equal_b2=same(select(scores, c, k, rows=128, bits=2), K.tables(order, c))))
# Two bits a pass near its limit (counts up to 1000 of 10 bits), and past it (N 1024: one bit a pass).
res["wide"] = []
for n in (1000, 1024):
    c = sizes[torch.randint(0, len(sizes), (n,), generator=g)]
    scores = torch.randn(1, 1, n, n, generator=g)
    want = K.tables(scores.topk(n // 5, -1).indices, c)
    res["wide"].append(dict(n=n, equal=same(select(scores, c, n // 5, rows=256, bits=2), want)))

for k in (0, 9):
    try:
        select(torch.zeros(1, 1, 8, 8), counts["grid(5, 6, 7)"], k)
    except ValueError as e:
        res["errors"].append(str(e))

# gather3 against three gathers, with inputs of three different memory layouts
lay = vs.layout((5, 6, 7), "cpu")
q, k, v = (torch.randn(2, 210, 3, 64, generator=g) for _ in range(3))
k = k.transpose(1, 2).contiguous().transpose(1, 2)
v = v[..., ::2].repeat_interleave(2, -1)[..., :64]
res["gather3"] = all(same(a, K.gather(x, lay.token, lay.counts))
                     for a, x in zip(gather3(q, k, v, lay.token, lay.counts), (q, k, v)))

# Tile order: means3 of the tiled inputs equals gather3's means of the token-order ones; select with the
# tile starts equals `pack` of the tile ids (the 480p layout's counts and starts too).
tiled = [x[:, lay.order] for x in (q, k, v)]
res["means3"] = all(torch.allclose(m, want[1], atol=1e-6, rtol=0) for m, want in
                    zip(means3(*tiled, lay.tiled_token, lay.counts), gather3(q, k, v, lay.token, lay.counts)))
res["packed"] = []
for grid in ((5, 6, 7), (3, 5, 9), (21, 30, 52)):
    tl_ = vs.layout(grid, "cpu")
    n = tl_.num_tiles
    scores = torch.randn(1, 2, n, n, generator=g)
    for k in sorted({1, vs.kept_tiles(0.8, n), n}):
        ids = select(scores, tl_.counts, k, rows=256)
        got = select(scores, tl_.counts, k, rows=256, starts=tl_.starts)
        want = K.pack(ids[0], tl_.starts, tl_.counts)
        res["packed"].append(dict(grid=list(grid), k=k,
                                  equal=torch.equal(got[0], want) and torch.equal(got[1], ids[1])))

# The one-launch compressed branch against torch's four ops, over several key blocks (N 100, 150) and
# one partial; its scores select the same tables.
res["compressed"] = []
for n in (27, 100, 150):
    qc, kc, vc = (torch.randn(2, 3, n, 64, generator=g) for _ in range(3))
    scores, out = vs.compressed_from_means(qc, kc, vc)
    want = select(scores, counts["n100"].repeat(2)[:n], vs.kept_tiles(0.8, n), rows=256)
    for precision, rows in (("tf32x3", 32), ("ieee", 16), ("tf32x3", 64)):
        s2, o2 = compressed(qc, kc, vc, precision=precision, rows=rows)
        res["compressed"].append(dict(n=n, precision=precision, rows=rows, scores=(s2 - scores).abs().max().item(),
                                      out=(o2 - out).abs().max().item(),
                                      tables=same(select(s2, counts["n100"].repeat(2)[:n], vs.kept_tiles(0.8, n),
                                                         rows=256), want)))

# Every set-up of the Triton path: the tables bit for bit those of the default set-up, the compressed
# branch within rounding, in tile order (means3_rows: the means bit for bit too) and token order; the
# whole op against the dense reference.
res["setups"] = []
for grid, sp in (((5, 6, 7), 0.5), ((3, 5, 9), 0.8)):
    lay = vs.layout(grid, "cpu")
    x = [torch.randn(2, math.prod(grid), 2, 64, generator=g) for _ in range(4)]
    tiled = [t[:, lay.order] for t in x]
    base, base_tok = vs.prepare_tiled(*tiled[:3], lay, sp), vs.prepare(*x[:3], lay, sp)
    want = reference(*x[:3], grid, x[3], sp)[0][:, lay.order]
    means = same(means3_rows(*tiled[:3], lay.starts, lay.counts), means3(*tiled[:3], lay.tiled_token, lay.counts))
    for name, st in SETUPS.items():
        got, tok = vs.prepare_tiled(*tiled[:3], lay, sp, st), vs.prepare(*x[:3], lay, sp, st)
        row = dict(grid=list(grid), setup=name, tables=same(got[4:], base[4:]) and same(tok[4:], base_tok[4:]),
                   comp=max((got[3] - base[3]).abs().max().item(), (tok[3] - base_tok[3]).abs().max().item()),
                   means=means)
        if grid == (5, 6, 7):
            row["ref"] = (vs.triton_call(*tiled[:3], tiled[3], lay, sp, True, st).double() - want).abs().max().item()
        res["setups"].append(row)

# Heads in groups (head_chunks; on the CPU one group after another): 5 heads in 2, 3, 4 uneven groups and
# more groups than the 2 heads above give the default's output.
res["overlap"] = []
lay = vs.layout((5, 6, 7), "cpu")
x = [torch.randn(1, 210, 5, 64, generator=g)[:, lay.order] for _ in range(4)]
base = vs.triton_call(*x[:3], x[3], lay, 0.5, True)
for name, st in SETUPS.items():
    if st.head_chunks > 1:
        out = vs.triton_call(*x[:3], x[3], lay, 0.5, True, st)
        res["overlap"].append(dict(setup=name, diff=(out - base).abs().max().item()))
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(INTERPRETED)


def test_select_equals_tables_of_top_tiles(interpreted):
    cases = interpreted["random"]
    assert {c["n"] for c in cases} == {8, 6, 3, 4, 27, 30, 45, 100}
    assert {c["k"] for c in cases if c["n"] == 100} == {1, 20, 50, 100}
    assert {c["rows"] for c in cases} == {None, 1, 256}
    for c in cases:
        assert c["equal"] and c["equal_b2"], c
        assert c["shapes"] == [[2, 3, c["n"], c["k"]], [2, 3, c["n"], 3]] and c["dtypes"] == ["torch.int32"] * 2, c


def test_select_ties_keep_the_lower_tile_id(interpreted):
    assert len(interpreted["ties"]) == 10
    for c in interpreted["ties"]:
        assert c["equal"] and c["equal_b2"], c


def test_select_two_bits_a_pass_near_and_past_its_limit(interpreted):
    assert [c["n"] for c in interpreted["wide"]] == [1000, 1024]
    for c in interpreted["wide"]:
        assert c["equal"], c


def test_compressed_in_one_launch_equals_torch(interpreted):
    """`compressed` (the fused set-ups' branch): scores and output within fp32 rounding of torch's matmuls
    and softmax over 1 to 3 key blocks, and the same tables from its scores. (The interpreter computes
    every dot in fp32; on the GPU "tf32x3" and "ieee" stay within about that.)"""
    assert len(interpreted["compressed"]) == 9
    for c in interpreted["compressed"]:
        assert c["scores"] < 1e-5 and c["out"] < 1e-6 and c["tables"], c


def test_head_groups_give_the_default_output(interpreted):
    rows = interpreted["overlap"]
    assert [c["setup"] for c in rows] == ["overlap2", "overlap3", "overlap4", "fused_overlap3"]
    for c in rows:  # the same sums per head; the fused set-up's branch within rounding
        assert c["diff"] == 0.0 if c["setup"].startswith("overlap") else c["diff"] < 1e-6, c


def test_every_setup_gives_the_default_tables_and_the_reference(interpreted):
    from fastvideo_nodes.attention.video_sparse_select import SETUPS
    rows = interpreted["setups"]
    assert len(rows) == 2 * len(SETUPS)
    for c in rows:
        assert c["tables"] and c["means"] and c["comp"] < 1e-6, c
        if c["grid"] == [5, 6, 7]:
            assert c["ref"] < 1e-5, c


def test_select_says_which_k_is_valid(interpreted):
    assert interpreted["errors"] == ["video sparse select: k must be in [1, 8], got 0",
                                     "video sparse select: k must be in [1, 8], got 9"]


def test_gather3_equals_three_gathers(interpreted):
    assert interpreted["gather3"]


def test_tile_order_means_and_packed_select(interpreted):
    assert interpreted["means3"]
    assert len(interpreted["packed"]) == 9
    for c in interpreted["packed"]:
        assert c["equal"], c


@pytest.mark.parametrize("rows,packed,bits,warps,np2", [
    (1, False, 1, 4, 0), (4, False, 1, 8, 0), (1, True, 1, 4, 0), (1, True, 2, 1, 0), (1, True, 1, 2, 128),
    (2, False, 1, 4, 128)])
def test_select_builds_for_hopper(rows, packed, bits, warps, np2):
    S = pytest.importorskip("fastvideo_nodes.attention.video_sparse_select")
    # 480p: 624 tiles in a 1024-wide row, or in 512 + 128 (the default: one row a program), 125 kept (odd, as the
    # launcher sees it)
    kernel = sm90_build(S._select, dict(S="*fp32", COUNTS="*i64", STARTS="*i32", IDX="*i32", ENDS="*i32"),
                        dict(NP=1024 if not np2 else 512, ROWS=rows, PACKED=packed, BITS=bits, NP2=np2),
                        num_warps=warps, odd=("k",))
    assert "redux.sync.add" in kernel.asm["ptx"]  # the counts reduce in hardware within each warp


@pytest.mark.parametrize("store", [True, False])
def test_gather3_builds_for_hopper(store):
    """store False: `means3` (inputs already in tile order), which writes only the fp32 means."""
    S = pytest.importorskip("fastvideo_nodes.attention.video_sparse_select")
    types = {n: "*bf16" for n in ("Q", "K", "V", "QT", "KT", "VT")}
    types.update(TOK="*i32", COUNTS="*i64", QM="*fp32", KM="*fp32", VM="*fp32")
    ptx = sm90_build(S._gather3, types, dict(D=128, STORE=store)).asm["ptx"]
    assert "ld.global" in ptx and ("st.global.v4.b32" in ptx) == store  # bf16 tiles go out in 16-byte stores


@pytest.mark.parametrize("precision,rows", [("tf32x3", 32), ("ieee", 16)])
def test_compressed_builds_for_hopper(precision, rows):
    """tf32x3 runs on the tensor cores; ieee on fp32 FMAs (no MMA), as cuBLAS without TF32."""
    S = pytest.importorskip("fastvideo_nodes.attention.video_sparse_select")
    types = {n: "*fp32" for n in ("QM", "KM", "VM", "S", "OC")}
    ptx = sm90_build(S._compressed, dict(types, sqrt_d="fp32"), dict(D=128, BM=rows, BN=64, PRECISION=precision),
                     num_stages=2, odd=("N",)).asm["ptx"]  # 624 tiles at 480p
    assert ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32" in ptx) == (precision == "tf32x3")


def test_means_rows_builds_for_hopper():
    S = pytest.importorskip("fastvideo_nodes.attention.video_sparse_select")
    types = {n: "*bf16" for n in ("Q", "K", "V")}
    types.update(STARTS="*i32", COUNTS="*i64", QM="*fp32", KM="*fp32", VM="*fp32")
    ptx = sm90_build(S._means_rows, types, dict(D=128)).asm["ptx"]
    assert ptx.count("ld.global.v4") >= 3 * 8  # each input in 16-byte loads: 16 KB a tile over 128 threads
