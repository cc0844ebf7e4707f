"""The memory planner on the real model sizes (pure arithmetic), and PinnedHome's round trip."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from fastvideo_nodes.errors import FastVideoError
from fastvideo_nodes.memory.offload import block_bytes
from fastvideo_nodes.memory.planner import (
    Components,
    DitSizes,
    GiB,
    PinnedHome,
    VideoShape,
    _peak,
    budget_bytes,
    placement_rank,
    plan_memory,
)
from fastvideo_nodes.testing.dit import random_dit

UMT5_XXL = int(10.6 * GiB)  # bf16, as measured
VAE = int(0.25e9)


def wan_sizes(dim: int, ffn: int, layers: int, itemsize: int = 2) -> DitSizes:
    """Byte counts of a Wan2.1 T2V DiT from its parameter shapes (REFERENCE.md)."""
    attn = 4 * (dim * dim + dim) + 2 * dim  # q, k, v, o and the two qk norms
    block = 2 * attn + 2 * dim + (dim * ffn + ffn + ffn * dim + dim) + 6 * dim
    other = (16 * 4 * dim + dim + 4096 * dim + dim + dim * dim + dim + 256 * dim + dim + dim * dim + dim
             + dim * 6 * dim + 6 * dim + dim * 64 + 64 + 2 * dim)
    return DitSizes(block * itemsize, layers, other * itemsize, dim, ffn)


WAN_1_3B = Components(wan_sizes(1536, 8960, 30), VAE, UMT5_XXL)
WAN_14B = Components(wan_sizes(5120, 13824, 40), VAE, UMT5_XXL)
SHAPE = VideoShape(480, 832, 81)


def test_sizes_match_the_published_parameter_counts():
    assert 2.7e9 < WAN_1_3B.dit.total < 2.9e9  # "2.8 GB" of bf16 weights
    assert 13.5e9 < WAN_14B.dit.total / 2 < 14.5e9
    assert SHAPE.tokens == 32760


def test_large_card_keeps_everything_resident():
    plan = plan_memory(WAN_1_3B, SHAPE, 141 * GiB)
    assert plan.all_resident and plan.dit_blocks_streamed == 0
    assert "everything resident" in plan.describe()


def test_24gib_and_1_3b_keep_everything_resident():
    plan = plan_memory(WAN_1_3B, SHAPE, 24 * GiB)
    assert plan.all_resident
    weights = WAN_1_3B.dit.total + VAE + UMT5_XXL
    assert weights < plan.peak < 24 * GiB


def test_24gib_and_14b_stream_blocks_and_encode_on_cpu():
    plan = plan_memory(WAN_14B, SHAPE, 24 * GiB)
    assert 0 < plan.dit_blocks_resident < 40
    assert plan.text_encoder == "cpu"
    assert plan.peak < 24 * GiB
    assert "streamed" in plan.describe() and "text encoder on the CPU" in plan.describe()


def test_streaming_counts_the_offload_slots_in_every_phase():
    """The offload's two slots stay allocated while it streams, so a phase without DiT compute (here
    encoding, made the largest by a huge on-demand text encoder) carries them too."""
    big_te = replace(WAN_14B, text_encoder_bytes=100 * GiB)
    d = big_te.dit
    no_dit = replace(big_te, dit=replace(d, block_bytes=0, other_bytes=0))
    rest = _peak(no_dit, SHAPE, 20, "on_demand", "on_demand")
    assert _peak(big_te, SHAPE, 20, "on_demand", "on_demand") - rest == d.other_bytes + (20 + 2) * d.block_bytes
    assert _peak(big_te, SHAPE, 40, "on_demand", "on_demand") - rest == d.other_bytes + 40 * d.block_bytes


def test_8gib_and_1_3b_take_the_text_encoder_off_the_gpu():
    plan = plan_memory(WAN_1_3B, SHAPE, 8 * GiB)
    assert plan.text_encoder in ("on_demand", "cpu")
    assert plan.peak < 8 * GiB


def test_text_encoder_on_demand_when_it_fits_next_to_the_resident_set():
    plan = plan_memory(WAN_14B, SHAPE, 40 * GiB)
    assert plan.dit_blocks_streamed == 0 and plan.text_encoder == "on_demand"
    assert plan.peak >= WAN_14B.dit.total + UMT5_XXL  # the encoder sits next to the DiT while encoding


def test_text_encoder_on_cpu_when_asked():
    plan = plan_memory(WAN_1_3B, SHAPE, 141 * GiB, text_encoder_on_cpu=True)
    assert plan.text_encoder == "cpu" and plan.dit_blocks_streamed == 0
    assert plan.peak < plan_memory(WAN_1_3B, SHAPE, 141 * GiB).peak


def test_impossible_budget_names_settings_that_fit():
    with pytest.raises(FastVideoError) as e:
        plan_memory(WAN_14B, SHAPE, 4 * GiB)
    msg = str(e.value)
    assert "4.0 GiB is too small" in msg and "832x480, 81-frame" in msg
    assert "a budget of at least" in msg and "gpu_memory_gb" in msg
    # Every suggestion it names does fit.
    assert "416x240" in msg
    plan_memory(WAN_14B, VideoShape(240, 416, 81), 4 * GiB)
    plan_memory(WAN_14B, SHAPE, int((_needed_gib(msg) + 0.1) * GiB))


def _needed_gib(message: str) -> float:
    return float(message.split("a budget of at least ")[1].split(" GiB")[0])


def test_error_suggests_tiles_and_fp8_only_when_they_fit():
    with pytest.raises(FastVideoError) as e:
        plan_memory(WAN_1_3B, SHAPE, 4 * GiB)
    assert "tile_size=64" in str(e.value) and "fp8" not in str(e.value)  # 1.3B blocks are too small to matter
    plan_memory(WAN_1_3B, SHAPE, 4 * GiB, decode_tile=64)

    hd = VideoShape(720, 1280, 81)  # 14B at 720p: two bf16 blocks in flight tip it over, fp8 ones do not
    with pytest.raises(FastVideoError) as e:
        plan_memory(WAN_14B, hd, 8 * GiB)
    budget = int((_needed_gib(str(e.value)) - 0.3) * GiB)
    with pytest.raises(FastVideoError, match="weight_storage fp8"):
        plan_memory(WAN_14B, hd, budget)
    plan_memory(Components(WAN_14B.dit.fp8(), VAE, UMT5_XXL), hd, budget)


def _plans_by_budget(components, shape, tenths: range):
    """(previous, plan) over growing budgets (tenths of a GiB) from the first one that fits; a larger
    budget must never stop fitting."""
    previous = None
    for tenth in tenths:
        try:
            plan = plan_memory(components, shape, tenth * GiB // 10)
        except FastVideoError:
            assert previous is None, "a larger budget must not stop fitting"
            continue
        yield previous, plan
        previous = plan


@pytest.mark.parametrize("components", [WAN_1_3B, WAN_14B], ids=["1.3B", "14B"])
@pytest.mark.parametrize("shape", [SHAPE, VideoShape(720, 1280, 81)], ids=["480p", "720p"])
def test_decisions_are_monotone_in_the_budget(components, shape):
    for previous, plan in _plans_by_budget(components, shape, range(40, 1500, 3)):
        assert plan.peak <= plan.budget
        if previous is not None:
            assert plan.dit_blocks_resident >= previous.dit_blocks_resident
            assert placement_rank(plan.vae) >= placement_rank(previous.vae)
            assert placement_rank(plan.text_encoder) >= placement_rank(previous.text_encoder)
    assert plan.all_resident


# Wan2.2 A14B: two 14B experts of the Wan2.1 14B architecture.
A14B = replace(WAN_14B, dit_low=WAN_14B.dit)
_EXPERTS_RANK = {"stream": 0, "swap": 1, "resident": 2}


@pytest.mark.parametrize("gib, mode", [(141, "resident"), (80, "resident"), (48, "swap"), (24, "stream")])
def test_a14b_experts_by_budget(gib, mode):
    """Both experts resident when both fit; else one on the GPU and the other in pinned host memory;
    else the active one's blocks streamed."""
    plan = plan_memory(A14B, SHAPE, gib * GiB)
    assert plan.experts == mode and plan.peak <= gib * GiB
    dit = A14B.dit.total
    if mode == "resident":
        assert plan.all_resident and plan.peak >= 2 * dit + UMT5_XXL
    else:
        assert not plan.all_resident and plan.peak < 2 * dit  # never both on the GPU
    if mode == "swap":
        assert plan.dit_blocks_streamed == 0 and plan.peak >= dit
    if mode == "stream":
        assert 0 < plan.dit_blocks_resident < 40 and plan.text_encoder == "cpu"
    text = plan.describe()
    assert "high and low noise" in text or "high noise, then low noise" in text
    assert {"resident": "both experts (high and low noise) resident",
            "swap": "the idle one in pinned host memory, swapped at the boundary",
            "stream": "the active expert's blocks streamed"}[mode] in text


def test_a14b_one_expert_plans_as_one_dit():
    """With one expert on the GPU the plan is the single 14B's (same blocks, VAE, text encoder)."""
    for gib in (24, 48):
        one, two = plan_memory(WAN_14B, SHAPE, gib * GiB), plan_memory(A14B, SHAPE, gib * GiB)
        assert (one.dit_blocks_resident, one.vae, one.text_encoder, one.peak) == (
            two.dit_blocks_resident, two.vae, two.text_encoder, two.peak)
        assert one.experts is None


def test_a14b_experts_of_other_dtypes_plan_for_the_larger():
    mixed = replace(A14B, dit_low=A14B.dit.fp8())  # e.g. a bf16 high-noise file next to an fp8 low-noise one
    assert mixed.active_dit == A14B.dit and mixed.idle_dit_bytes == A14B.dit.fp8().total
    both = plan_memory(mixed, SHAPE, 141 * GiB)
    assert both.experts == "resident" and both.peak == _peak(mixed, SHAPE, 40, "resident", "resident", None, True)
    assert both.peak - plan_memory(WAN_14B, SHAPE, 141 * GiB).peak == A14B.dit.fp8().total


@pytest.mark.parametrize("shape", [SHAPE, VideoShape(720, 1280, 81)], ids=["480p", "720p"])
def test_a14b_decisions_are_monotone_in_the_budget(shape):
    for previous, plan in _plans_by_budget(A14B, shape, range(100, 1500, 7)):
        if previous is not None:
            assert _EXPERTS_RANK[plan.experts] >= _EXPERTS_RANK[previous.experts]
            assert plan.dit_blocks_resident >= previous.dit_blocks_resident
            assert placement_rank(plan.text_encoder) >= placement_rank(previous.text_encoder)
    assert plan.experts == "resident" and plan.all_resident


def test_sizes_of_a_built_dit():
    dit = random_dit(seed=0)
    sizes = DitSizes.of(dit)
    assert sizes.total == sum(t.numel() * t.element_size() for t in list(dit.parameters()) + list(dit.buffers()))
    assert sizes.block_bytes == block_bytes(dit.blocks[1]) and sizes.num_blocks == len(dit.blocks)
    assert (sizes.dim, sizes.ffn_dim) == (dit.cfg.dim, dit.cfg.ffn_dim)
    # Streaming starts with no resident block; each further block's bytes buy one more resident block.
    comps = Components(replace(sizes, num_blocks=10), 0, 0, text_dim=8, vae_base_dim=8)
    shape = VideoShape(32, 32, 5)
    floor = _peak(comps, shape, 0, "on_demand", "cpu")
    with pytest.raises(FastVideoError):
        plan_memory(comps, shape, floor - 1, reserve=0)
    for k in range(3):
        plan = plan_memory(comps, shape, floor + k * sizes.block_bytes, reserve=0)
        assert plan.dit_blocks_resident == k and plan.peak == floor + k * sizes.block_bytes


def test_budget_sources():
    assert budget_bytes("cuda", gpu_memory_gb=20) == 20 * GiB
    assert budget_bytes("cuda", free_bytes=123) == 123
    with pytest.raises(FastVideoError, match="gpu_memory_gb must be positive"):
        budget_bytes("cuda", gpu_memory_gb=0)
    with pytest.raises(FastVideoError, match="needs a CUDA device or gpu_memory_gb"):
        budget_bytes("cpu")


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # tied, like UMT5's shared embedding
        self.register_buffer("scale", torch.arange(4.0))

    def forward(self, x):
        return self.b(self.a(x)) * self.scale


def test_pinned_home_round_trip_keeps_weights_and_ties():
    torch.manual_seed(0)
    m = Tied()
    x = torch.randn(2, 4)
    want = m(x)
    home = PinnedHome(m)
    assert home.nbytes == (16 + 4 + 4 + 4) * 4  # the tied weight counted once
    assert m.a.weight.is_pinned() == torch.cuda.is_available()
    homes = [t.data_ptr() for t in (m.a.weight, m.a.bias, m.b.bias, m.scale)]
    home.to_device("cpu")  # device copies (on CPU too, which makes the swap testable here)
    copies = [t.data_ptr() for t in (m.a.weight, m.a.bias, m.b.bias, m.scale)]
    assert not set(homes) & set(copies)
    assert m.a.weight is m.b.weight
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    with torch.no_grad():
        m.a.weight.zero_()  # writes to the device copy never reach home
    home.to_host()
    assert [t.data_ptr() for t in (m.a.weight, m.a.bias, m.b.bias, m.scale)] == homes
    assert home.device.type == "cpu"
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)


@pytest.mark.gpu
def test_pinned_home_on_cuda():
    torch.manual_seed(0)
    m = Tied()
    x = torch.randn(2, 4)
    want = m(x)
    home = PinnedHome(m)
    assert m.a.weight.is_pinned()
    home.to_device("cuda")
    assert m.a.weight.is_cuda and m.a.weight is m.b.weight and m.scale.is_cuda
    torch.testing.assert_close(m(x.cuda()).cpu(), want)
    home.to_host()
    assert not m.a.weight.is_cuda
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)

