"""Wan2.2 A14B with streamed blocks: each expert keeps one home copy for the run, so a switch moves
no weights back and pins nothing again (pipeline/experts.py, "stream"). CPU, tiny DiTs."""
import torch

from fastvideo_nodes.memory.offload import enable_block_offload
from fastvideo_nodes.pipeline.experts import HIGH, LOW, Experts
from fastvideo_nodes.testing.dit import random_dit


def test_switches_reuse_the_home_copies():
    high, low = random_dit(seed=1), random_dit(seed=2)
    want = {k: v.clone() for k, v in low.state_dict().items()}
    first = enable_block_offload(high, device="cpu", blocks_on_gpu=1)  # as the plan places the high expert
    ex = Experts(high, low, device=torch.device("cpu"), mode="stream", blocks_on_gpu=1, offload=first)
    assert ex.homes is not None and ex.active == -1 and first.hooks == []
    homes = [{t.data_ptr() for *_, t in home.home} for home in ex.homes]
    for k in (HIGH, LOW, HIGH, LOW):
        model = ex.use(k)
        offload = ex.offloads[k]
        assert offload is not None and offload.resident == 1 and ex.offloads[1 - k] is None
        # the streamed blocks' host copies are the expert's home tensors themselves (nothing re-copied)
        for pairs in offload.home.values():
            for _, host in pairs:
                assert host.data_ptr() in homes[k]
        # the idle expert points at its home copies
        idle = ex.models[1 - k]
        assert all(p.data_ptr() in homes[1 - k] for p in idle.parameters())
        assert model is ex.models[k]
    assert ex.switches == 4
    got = ex.models[LOW].state_dict()
    assert all(torch.equal(got[name], want[name]) for name in want)  # weights unchanged by the moves
