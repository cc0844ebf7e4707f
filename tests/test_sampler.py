"""Sampling loop: CFG, CFG gate, TeaCache decisions, callbacks, cancel and setting validation."""
import math

import pytest
import torch

from fastvideo_nodes.errors import CancelledError, FastVideoError
from fastvideo_nodes.pipeline.sampler import SamplingSettings, SamplingStats, denoise, initial_noise
from fastvideo_nodes.pipeline.schedulers import make_scheduler
from fastvideo_nodes.pipeline.teacache import TeaCache, coefficients_for, polyval
from fastvideo_nodes.testing.dit import TINY_DIT, random_dit

SMALL = dict(height=64, width=64, num_frames=5)


@pytest.fixture(scope="module")
def dit():
    return random_dit(TINY_DIT, seed=3)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 12, TINY_DIT.text_dim, generator=g), torch.randn(1, 7, TINY_DIT.text_dim, generator=g)


def run(dit, prompts, **kw):
    s = SamplingSettings(**{**SMALL, "steps": 4, **kw})
    stats = SamplingStats()
    with torch.no_grad():
        out = denoise(dit, initial_noise(s), prompts[0], prompts[1], s, stats=stats)
    return out, stats


def test_noise_matches_diffusers_convention():
    s = SamplingSettings(**SMALL, seed=7)
    want = torch.randn((1, 16, 2, 8, 8), generator=torch.Generator("cpu").manual_seed(7), dtype=torch.float32)
    assert torch.equal(initial_noise(s), want)


def test_cfg_loop_equals_plain_reading(dit, prompts):
    """Gate 1.0 (off) is bit-identical to a textbook CFG loop over the same scheduler."""
    s = SamplingSettings(**SMALL, steps=4, guidance_scale=5.0)
    ours, stats = run(dit, prompts, guidance_scale=5.0, cfg_gate=1.0)
    sched = make_scheduler("unipc", 4, s.shift)
    x = initial_noise(s)
    with torch.no_grad():
        for t in sched.timesteps:
            t = t.reshape(1)
            c, u = dit(x, t, prompts[0]), dit(x, t, prompts[1])
            x = sched.step(u + 5.0 * (c - u), x)
    assert torch.equal(ours, x)
    assert (stats.cond_forwards, stats.uncond_forwards) == (4, 4)


@pytest.mark.parametrize("gate,steps,expected_uncond",
                         [(0.5, 4, 2), (0.5, 5, 3), (0.25, 8, 2), (0.0, 4, 1), (1.0, 3, 3)])
def test_cfg_gate_counts_unconditional_forwards(dit, prompts, gate, steps, expected_uncond):
    _, stats = run(dit, prompts, steps=steps, cfg_gate=gate)
    assert stats.cond_forwards == steps
    assert stats.uncond_forwards == expected_uncond == max(1, math.ceil(steps * gate))


def test_cfg_gate_reuses_last_delta(dit, prompts):
    """After the gate: pred = cond + (g − 1)·δ with δ from the last step that ran both passes."""
    s = SamplingSettings(**SMALL, steps=4, cfg_gate=0.5, guidance_scale=4.0)
    ours, _ = run(dit, prompts, steps=4, cfg_gate=0.5, guidance_scale=4.0)
    sched = make_scheduler("unipc", 4, s.shift)
    x, delta = initial_noise(s), None
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            t = t.reshape(1)
            c = dit(x, t, prompts[0])
            if i < 2:
                u = dit(x, t, prompts[1])
                delta = c - u
                v = u + 4.0 * delta
            else:
                v = c + 3.0 * delta
            x = sched.step(v, x)
    assert torch.equal(ours, x)


def test_guidance_one_runs_no_unconditional_pass(dit, prompts):
    _, stats = run(dit, prompts, guidance_scale=1.0)
    assert stats.uncond_forwards == 0 and stats.cond_forwards == 4


def test_teacache_zero_computes_every_step(dit, prompts):
    plain, _ = run(dit, prompts, cfg_gate=1.0)
    out, stats = run(dit, prompts, teacache_threshold=0.0)
    assert stats.teacache_skipped == 0 and stats.cond_forwards == stats.uncond_forwards == 4
    assert torch.equal(out, plain)


def published_teacache(signals, threshold, coeffs, ret_mode):
    """TeaCache4Wan2.1 as published: one call counter over alternating cond/uncond calls."""
    n = len(signals)
    ret_steps, cutoff = (10, 2 * n) if ret_mode else (2, 2 * n - 2)
    acc, prev, decisions = [0.0, 0.0], [None, None], []
    for cnt in range(2 * n):
        b, sig = cnt % 2, signals[cnt // 2]
        if cnt < ret_steps or cnt >= cutoff:
            calc = True
            acc[b] = 0.0
        else:
            acc[b] += polyval(coeffs, ((sig - prev[b]).abs().mean() / prev[b].abs().mean()).item())
            calc = acc[b] >= threshold
            if calc:
                acc[b] = 0.0
        prev[b] = sig.clone()
        decisions.append(calc)
    return decisions


# The tiny random DiT's time embedding moves far more per step than a trained one, so the default-mode
# cases use a linear rescale (the user override) to land in the regime where steps get skipped.
@pytest.mark.parametrize("mode,threshold,steps,coeffs", [("default", 1.5, 12, [1.0, 0.0]),
                                                         ("default", 3.0, 12, [1.0, 0.0]),
                                                         ("ret", 0.15, 14, None)])
def test_teacache_decisions_match_published_algorithm(dit, prompts, monkeypatch, mode, threshold, steps, coeffs):
    recorded = []
    original = TeaCache.decide

    def spy(self, signal):
        out = original(self, signal)
        recorded.append(out)
        return out

    monkeypatch.setattr(TeaCache, "decide", spy)
    _, stats = run(dit, prompts, steps=steps, teacache_threshold=threshold, teacache_mode=mode,
                   teacache_coefficients=coeffs)
    sched = make_scheduler("unipc", steps, 3.0)
    with torch.no_grad():
        signals = [dit.embed_time(t.reshape(1))[0 if mode == "default" else 1] for t in sched.timesteps]
    want = published_teacache(signals, threshold, coeffs or coefficients_for("1.3B", mode), mode == "ret")
    assert recorded == want
    assert stats.teacache_skipped == want.count(False) > 0  # the thresholds chosen do skip some steps


def test_teacache_skip_adds_cached_residual(dit, prompts):
    """A skipped step returns tokens + the residual of the last computed step, not the blocks' output."""
    tc = TeaCache(threshold=1e9, num_steps=10, coefficients=[0.0, 1.0])
    tokens = torch.randn(1, 4, 8)
    e = torch.ones(1, 8)
    tc.step = 0
    out0 = tc(tokens, e, None, lambda h: h * 2)
    assert torch.equal(out0, tokens * 2) and tc.computed == 1
    tc.step = 1
    calls = []
    out1 = tc(tokens + 1, e * 1.01, None, lambda h: calls.append(1) or h)
    assert not calls and tc.skipped == 1
    assert torch.allclose(out1, tokens + 1 + tokens)  # residual of step 0 was 2t - t = t


def test_callback_and_cancel(dit, prompts):
    seen = []
    s = SamplingSettings(**SMALL, steps=3)
    with torch.no_grad():
        denoise(dit, initial_noise(s), *prompts, s, callback=lambda i, n, x0: seen.append((i, n, tuple(x0.shape))))
    assert seen == [(1, 3, (1, 16, 2, 8, 8)), (2, 3, (1, 16, 2, 8, 8)), (3, 3, (1, 16, 2, 8, 8))]
    steps_done = []
    with pytest.raises(CancelledError, match="step 3 of 4"):
        s4 = SamplingSettings(**SMALL, steps=4)
        with torch.no_grad():
            denoise(dit, initial_noise(s4), *prompts, s4, callback=lambda i, n, x0: steps_done.append(i),
                    cancel=lambda: len(steps_done) >= 2)
    assert steps_done == [1, 2]


@pytest.mark.parametrize("kw,needle", [
    (dict(height=100), "height must be a positive multiple of 16, got 100; nearest valid: 96 or 112"),
    (dict(width=0), "width must be a positive multiple of 16"),
    (dict(num_frames=80), "num_frames must be 4n\\+1.*got 80; nearest valid: 77 or 81"),
    (dict(steps=0), "steps must be a whole number from 1 to 1000, got 0"),
    (dict(cfg_gate=1.5), "cfg_gate must be in \\[0, 1\\]"),
    (dict(teacache_threshold=-0.1), "teacache_threshold must be ≥ 0"),
    (dict(scheduler="ddim"), "scheduler 'ddim' is unknown; use one of unipc, euler"),
    (dict(shift=0), "shift must be > 0"),
])
def test_bad_settings_name_the_input(kw, needle):
    with pytest.raises(FastVideoError, match=needle):
        SamplingSettings(**kw).validate()


class VelocityStub(torch.nn.Module):
    """A stand-in DiT whose velocity is known: v = 0.5·x + t/1000; counts its forwards."""

    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.timesteps = []

    def forward(self, x, t, context, **kw):
        self.timesteps.append(float(t))
        return 0.5 * x + t / 1000


def test_cfg_one_is_one_forward_per_step():
    for negative in (None, torch.zeros(1, 3, 8)):
        stub = VelocityStub()
        s = SamplingSettings(**SMALL, steps=4, guidance_scale=1.0, scheduler="lcm", spacing="simple", shift=5.0)
        stats = SamplingStats()
        denoise(stub, initial_noise(s), torch.zeros(1, 3, 8), negative, s, stats=stats)
        assert len(stub.timesteps) == stats.cond_forwards == 4 and stats.uncond_forwards == 0
        assert stub.timesteps == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=1e-3)


def test_lcm_sigma_list_run_follows_its_definition():
    """x0 = x − σ·v, then x = (1 − σ')·x0 + σ'·ε with ε from the seed's stream after the initial noise."""
    sig = (1.0, 0.757, 0.522)
    s = SamplingSettings(**SMALL, steps=50, guidance_scale=1.0, scheduler="lcm", sigmas=sig, seed=11)
    stub = VelocityStub()
    out = denoise(stub, initial_noise(s), torch.zeros(1, 3, 8), None, s)
    assert stub.timesteps == pytest.approx([1000.0, 757.0, 522.0])
    g = torch.Generator("cpu").manual_seed(11)
    x = torch.randn(s.latent_shape, generator=g)
    assert torch.equal(x, initial_noise(s))
    for i, sigma in enumerate(sig):
        x0 = x - sigma * (0.5 * x + sigma)
        x = x0 if i == len(sig) - 1 else (1 - sig[i + 1]) * x0 + sig[i + 1] * torch.randn(s.latent_shape, generator=g)
    assert torch.allclose(out, x, atol=1e-6)


def test_lcm_run_is_deterministic_per_seed(dit, prompts):
    a, _ = run(dit, prompts, scheduler="lcm", spacing="simple", guidance_scale=1.0, seed=2)
    b, _ = run(dit, prompts, scheduler="lcm", spacing="simple", guidance_scale=1.0, seed=2)
    c, _ = run(dit, prompts, scheduler="lcm", spacing="simple", guidance_scale=1.0, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kw,needle", [
    (dict(scheduler="euler", sigmas=(1.0, 1.0)), "sigmas must be strictly descending"),
    (dict(scheduler="lcm", spacing="linear"), "spacing 'linear' is unknown"),
    (dict(scheduler="unipc", sigmas=(1.0, 0.5)), "need scheduler 'euler' or 'lcm'"),
])
def test_bad_few_step_settings(kw, needle):
    with pytest.raises(FastVideoError, match=needle):
        SamplingSettings(**kw).validate()


def test_teacache_tables_follow_the_model_and_the_video_size():
    """TeaCache4Wan2.1's tables: T2V by size; I2V by the checkpoint resolution the video matches."""
    from fastvideo_nodes.pipeline.teacache import COEFFICIENTS
    assert coefficients_for("14B", "default") == COEFFICIENTS[("14B", "default")]
    assert coefficients_for("custom", "ret") == COEFFICIENTS[("1.3B", "ret")]
    assert coefficients_for("14B", "default", image_to_video=True, pixels=480 * 832)[0] == -3.02331670e2
    assert coefficients_for("14B", "default", image_to_video=True, pixels=720 * 1280)[0] == -114.36346466
    assert coefficients_for("14B", "ret", image_to_video=True, pixels=720 * 1280)[0] == 8.10705460e3
