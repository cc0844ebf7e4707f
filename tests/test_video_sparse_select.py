"""The VSA Triton path's set-up kernels (video_sparse_select) under Triton's CPU interpreter: `select`
equals `tables(top_tiles(...))`, ties go to the lower tile id, `gather3` equals three `gather`s; and
both build for Hopper offline. The whole op with them is held to the dense reference in
test_video_sparse_kernel.py."""
import os

import pytest
from test_video_sparse_kernel import run_interpreted, sm90_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process (the interpreter must be chosen before triton is imported). Real counts come from the
# layouts of grids with partial edge tiles, and for N = 30, 45, 100 from random edge-tile sizes. The
# interpreter's cost is per program, not per score, so the larger cases run 256 rows a program (the
# last one partial), the grids' the default rows, one case one row a program.
INTERPRETED = r"""
import json, warnings
import torch
warnings.filterwarnings("ignore")
from fastvideo_nodes.attention import video_sparse as vs, video_sparse_kernel as K
from fastvideo_nodes.attention.video_sparse_select import gather3, means3, select

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
        res["ties"].append(dict(counts=name, k=k, equal=same(select(scores, c, k, rows=128), K.tables(order, c))))

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
        assert c["equal"], c
        assert c["shapes"] == [[2, 3, c["n"], c["k"]], [2, 3, c["n"], 3]] and c["dtypes"] == ["torch.int32"] * 2, c


def test_select_ties_keep_the_lower_tile_id(interpreted):
    assert len(interpreted["ties"]) == 10
    for c in interpreted["ties"]:
        assert c["equal"], c


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


@pytest.mark.parametrize("rows,packed", [(1, False), (4, False), (1, True)])
def test_select_builds_for_hopper(rows, packed):
    S = pytest.importorskip("fastvideo_nodes.attention.video_sparse_select")
    # 480p: 624 tiles in a 1024-wide row (the default: one row a program), 125 kept (odd, as the launcher sees it)
    kernel = sm90_build(S._select, dict(S="*fp32", COUNTS="*i64", STARTS="*i32", IDX="*i32", ENDS="*i32"),
                        dict(NP=1024, ROWS=rows, PACKED=packed), num_warps=min(8, 4 * rows), odd=("k",))
    assert "redux.sync.add" in kernel.asm["ptx"]  # the counts reduce in hardware within each warp


@pytest.mark.parametrize("store", [True, False])
def test_gather3_builds_for_hopper(store):
    """store False: `means3` (inputs already in tile order), which writes only the fp32 means."""
    S = pytest.importorskip("fastvideo_nodes.attention.video_sparse_select")
    types = {n: "*bf16" for n in ("Q", "K", "V", "QT", "KT", "VT")}
    types.update(TOK="*i32", COUNTS="*i64", QM="*fp32", KM="*fp32", VM="*fp32")
    ptx = sm90_build(S._gather3, types, dict(D=128, STORE=store)).asm["ptx"]
    assert "ld.global" in ptx and ("st.global.v4.b32" in ptx) == store  # bf16 tiles go out in 16-byte stores
