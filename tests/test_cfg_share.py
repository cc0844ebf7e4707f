"""A step's two CFG passes share block 0's self-attention (models/wan_dit.SharedFirstSelfAttention): the
same latents as computing it twice, and it runs once a step."""
import copy

import pytest
import torch

from fastvideo_nodes.models.wan_dit import SharedFirstSelfAttention
from fastvideo_nodes.pipeline import sampler
from fastvideo_nodes.pipeline.sampler import SamplingSettings, denoise, initial_noise
from fastvideo_nodes.testing.dit import random_dit


@pytest.fixture(scope="module")
def dit():
    return random_dit(seed=7)


def prompts(dit):
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.zeros(1, 512, dit.cfg.text_dim), torch.zeros(1, 512, dit.cfg.text_dim)
    pos[:, :9] = torch.randn(9, dit.cfg.text_dim, generator=g)
    neg[:, :14] = torch.randn(14, dit.cfg.text_dim, generator=g)
    return pos, neg


def count_calls(module, calls: list):
    return module.register_forward_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize("extra", [{}, {"teacache_threshold": 0.05}, {"cfg_gate": 0.5}])
def test_shared_first_self_attention_gives_the_same_latents(dit, extra, monkeypatch):
    settings = SamplingSettings(height=64, width=96, num_frames=5, steps=4, guidance_scale=5.0, seed=2, **extra)
    pos, neg = prompts(dit)
    first, second = [], []
    hooks = [count_calls(dit.blocks[0].self_attn, first), count_calls(dit.blocks[1].self_attn, second)]
    try:
        with torch.no_grad():
            shared = denoise(dit, initial_noise(settings), pos, neg, settings)
            runs = (len(first), len(second))
            monkeypatch.setattr(sampler, "SharedFirstSelfAttention", lambda: None)
            first.clear(), second.clear()
            twice = denoise(dit, initial_noise(settings), pos, neg, settings)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(shared, twice)  # the same ops on the same inputs: bit for bit
    if not extra:  # 4 steps, both passes each: block 0's self-attention once a step, block 1's twice
        assert runs == (4, 8) and (len(first), len(second)) == (8, 8)
    else:  # fewer passes (TeaCache skips, the gate drops uncond), never more block-0 runs than block-1 runs
        assert runs[0] < runs[1]


def test_share_is_filled_once_and_reused(dit):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 2, 8, 12, generator=g), torch.tensor([600.0])
    pos, neg = prompts(dit)
    share = SharedFirstSelfAttention()
    with torch.no_grad():
        a = dit(x, t, pos[:, :9], share=share)
        kept = share.out
        b = dit(x, t, neg[:, :14], share=share)
        assert share.out is kept and kept is not None
        assert torch.equal(a, dit(x, t, pos[:, :9])) and torch.equal(b, dit(x, t, neg[:, :14]))


def test_streamed_first_block_is_not_split(dit):
    """A block whose weights arrive in a forward pre-hook (memory/offload.py) always runs whole."""
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 16, 2, 8, 12, generator=g), torch.tensor([300.0])
    pos, _ = prompts(dit)
    calls = []
    hook = dit.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        share = SharedFirstSelfAttention()
        with torch.no_grad():
            dit(x, t, pos, share=share)
    finally:
        hook.remove()
    assert calls == [1] and share.out is None


def test_compiled_halves_equal_eager(dit):
    model = copy.deepcopy(dit)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 16, 2, 8, 12, generator=g), torch.tensor([800.0])
    pos, neg = prompts(dit)
    with torch.inference_mode():
        want = [model(x, t, c) for c in (pos, neg)]
        model.compile_blocks()
        share = SharedFirstSelfAttention()
        got = [model(x, t, c, share=share) for c in (pos, neg)]
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < 1e-5 * b.abs().max().item() + 1e-6
