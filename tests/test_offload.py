"""Block offload bookkeeping (CPU): same outputs, blocks go home, nothing accumulates across runs."""
from dataclasses import replace

import pytest
import torch

from fastvideo_nodes.errors import FastVideoError
from fastvideo_nodes.memory.offload import enable_block_offload, out_of_memory_error, plan_blocks
from fastvideo_nodes.testing.dit import TINY_DIT, random_dit


@pytest.fixture
def dit():
    return random_dit(replace(TINY_DIT, num_layers=4), seed=2)


def run(dit):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        return dit(x, torch.tensor([500.0]), ctx)


def test_offloaded_forward_is_exact_and_blocks_go_home(dit):
    want = run(dit)
    off = enable_block_offload(dit, device="cpu", blocks_on_gpu=1)
    assert len(off.offloaded) == 3 and "1 of 4 DiT blocks" in off.describe()
    homes = [[p.data.data_ptr() for p, _ in off.home[i]] for i in range(3)]
    for _ in range(3):  # repeated runs: same result, weights back home after each block
        assert torch.equal(run(dit), want)
        assert [[p.data.data_ptr() for p, _ in off.home[i]] for i in range(3)] == homes
        assert not off.in_flight or set(off.in_flight) == {0}  # at most the next run's first prefetch
    off.disable()
    assert not dit.blocks[0]._forward_pre_hooks and not dit.blocks[3]._forward_hooks
    assert torch.equal(run(dit), want)


def test_plan_blocks_from_budget(dit):
    per_block = sum(p.numel() * 4 for p in dit.blocks[0].parameters())
    assert plan_blocks(dit, budget_gb=0.0) == 0
    assert plan_blocks(dit, budget_gb=100.0) == 4
    some = plan_blocks(dit, budget_gb=(per_block * 5.5 + 3e6) / 2**30, tokens=8)
    assert 0 < some < 4


def test_cpu_needs_an_explicit_count(dit):
    with pytest.raises(FastVideoError, match="needs blocks_on_gpu"):
        enable_block_offload(dit, device="cpu")


def test_out_of_memory_message_names_settings():
    msg = str(out_of_memory_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    assert "gpu_memory_gb" in msg and "weight_storage fp8" in msg and "num_frames" in msg
    assert "fp8_e4m3fn" not in msg and "text_encoder_device cpu" in msg and "tile_size" in msg
    assert "while decoding" in str(out_of_memory_error(RuntimeError("x"), "decoding"))


def test_streamed_weights_use_two_fixed_slots(dit):
    """Every streamed block runs from one of two buffers allocated at enable time (nothing goes
    through the allocator per block), and each slot holds the block that runs in it."""
    off = enable_block_offload(dit, device="cpu", blocks_on_gpu=1)
    spans = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in off.slots]
    assert len(spans) == 2
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(m.ffn[0].weight.data_ptr()), prepend=False)
             for b in off.offloaded]
    want = None
    for _ in range(2):
        got = run(dit)
        want = got if want is None else want
        assert torch.equal(got, want)
    for h in hooks:
        h.remove()
    assert len(seen) == 6 and all(any(lo <= ptr < hi for lo, hi in spans) for ptr in seen)
    assert len({ptr for ptr in seen}) == 2  # the ring: two slots, alternating


def test_weights_written_at_home_reach_the_next_run(dit):
    """A LoRA merge writes the home weights between runs; the next run's first streamed block was
    already prefetched at the end of the last one, so drop_prefetched() must drop that copy."""
    off = enable_block_offload(dit, device="cpu", blocks_on_gpu=1)
    run(dit)
    assert set(off.in_flight) == {0}
    with torch.no_grad():
        for p in off.offloaded[0].parameters():
            p.data.mul_(1.5)  # in place, at home: what loading.lora does
    stale = run(dit)
    off.drop_prefetched()
    fresh = run(dit)
    off.disable()
    assert torch.equal(run(dit), fresh) and not torch.equal(stale, fresh)


def test_a_run_broken_off_inside_a_block_leaves_the_next_exact(dit):
    """Cancel raises inside a block: the ring starts afresh at the next run."""
    want = run(dit)
    off = enable_block_offload(dit, device="cpu", blocks_on_gpu=1)
    boom = off.offloaded[1].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(dit)
    boom.remove()
    assert torch.equal(run(dit), want) and torch.equal(run(dit), want)
