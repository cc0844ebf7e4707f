"""Our flow UniPC and Euler reproduce diffusers' schedules and updates."""
import pytest
import torch

from fastvideo_nodes.errors import FastVideoError
from fastvideo_nodes.pipeline.schedulers import make_scheduler

diffusers = pytest.importorskip("diffusers")


def reference(name, steps, shift):
    if name == "unipc":  # as Wan-AI's diffusers release configures it
        s = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                              solver_order=2, solver_type="bh2", predict_x0=True,
                                              lower_order_final=True, final_sigmas_type="zero")
    else:
        s = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(steps)
    return s


def velocity(x, t):
    """A fixed, non-linear stand-in for the DiT."""
    return torch.sin(1.3 * x + t / 300.0) - 0.2 * x


@pytest.mark.parametrize("name", ["unipc", "euler"])
@pytest.mark.parametrize("steps", [1, 2, 4, 10, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
def test_schedule_and_loop_equal_diffusers(name, steps, shift):
    ref, ours = reference(name, steps, shift), make_scheduler(name, steps, shift)
    assert torch.equal(ours.timesteps, ref.timesteps.float())
    assert torch.equal(ours.sigmas, ref.sigmas.float())
    x = torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(steps))
    y = x.clone()
    for t in ref.timesteps:
        x = ref.step(velocity(x, t.float()), t, x).prev_sample
    for t in ours.timesteps:
        y = ours.step(velocity(y, t), y)
    assert (x - y).abs().max().item() <= 1e-5


def test_unipc_gives_the_dit_integer_timesteps():
    assert make_scheduler("unipc", 4, 3.0).timesteps.tolist() == [999.0, 900.0, 750.0, 500.0]


def test_denoised_is_the_x0_estimate():
    s = make_scheduler("euler", 4, 3.0)
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(s.denoised(v, x), x - s.sigmas[0] * v)


def test_reset_repeats_the_same_run():
    s = make_scheduler("unipc", 5, 3.0)
    x0 = torch.randn(3, 4)
    runs = []
    for _ in range(2):
        s.reset()
        x = x0
        for t in s.timesteps:
            x = s.step(velocity(x, t), x)
        runs.append(x)
    assert torch.equal(*runs)


@pytest.mark.parametrize("args,needle", [(("ddim", 4, 3.0), "unknown; use one of unipc, euler, lcm"),
                                         (("unipc", 0, 3.0), "steps must be at least 1"),
                                         (("euler", 4, 0.0), "shift must be > 0")])
def test_bad_arguments(args, needle):
    with pytest.raises(FastVideoError, match=needle):
        make_scheduler(*args)


def test_simple_spacing_gives_the_lightning_timesteps():
    s = make_scheduler("euler", 4, 5.0, spacing="simple")
    assert torch.allclose(s.timesteps, torch.tensor([1000.0, 937.5, 833.3333, 625.0]))
    assert s.sigmas[-1] == 0 and len(s.sigmas) == 5


@pytest.mark.parametrize("steps", [3, 7])
def test_simple_spacing_is_every_nth_entry_of_the_shifted_table(steps):
    """ComfyUI's construction: the 1000 shifted training sigmas, read with a stride of 1000/N."""
    table = [3.0 * (t / 1000) / (1 + 2.0 * (t / 1000)) for t in range(1, 1001)]
    want = [table[-(1 + int(i * 1000 / steps))] for i in range(steps)] + [0.0]
    assert torch.allclose(make_scheduler("lcm", steps, 3.0, spacing="simple").sigmas, torch.tensor(want))


def test_sigma_list_is_used_as_given_with_float_timesteps():
    s = make_scheduler("euler", 99, 5.0, sigmas=(1.0, 0.757, 0.522))
    assert s.num_steps == 3
    assert torch.allclose(s.timesteps, torch.tensor([1000.0, 757.0, 522.0]))
    assert s.timesteps.dtype == torch.float32 and s.sigmas.tolist()[-1] == 0.0


def test_euler_on_a_sigma_list_follows_its_definition():
    sig = [1.0, 0.8, 0.4, 0.1]
    s = make_scheduler("euler", 4, 1.0, sigmas=sig)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    want = x.clone()
    for i, t in enumerate(s.timesteps):
        assert t.item() == pytest.approx(sig[i] * 1000)
        x = s.step(velocity(x, t), x)
        nxt = sig[i + 1] if i + 1 < len(sig) else 0.0
        want = want + (nxt - sig[i]) * velocity(want, torch.tensor(sig[i] * 1000))
        assert torch.allclose(x, want, atol=1e-6)


def test_lcm_predicts_x0_then_renoises_with_the_generators_noise():
    sig = [1.0, 0.6, 0.25]
    s = make_scheduler("lcm", 3, 1.0, sigmas=sig, generator=torch.Generator("cpu").manual_seed(5))
    g = torch.Generator("cpu").manual_seed(5)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    want = x.clone()
    for i, t in enumerate(s.timesteps):
        v = velocity(x, t)
        x = s.step(v, x)
        x0 = want - sig[i] * velocity(want, t)
        if i + 1 < len(sig):
            want = (1 - sig[i + 1]) * x0 + sig[i + 1] * torch.randn(2, 4, generator=g)
        else:
            want = x0  # the last step returns the x0 estimate, no noise
        assert torch.allclose(x, want, atol=1e-6)


def test_lcm_default_spacing_is_the_euler_spacing():
    assert torch.equal(make_scheduler("lcm", 6, 3.0).sigmas, make_scheduler("euler", 6, 3.0).sigmas)


@pytest.mark.parametrize("kw,needle", [
    (dict(sigmas=()), "at least one value"),
    (dict(sigmas=(1.0, 0.5, 0.5)), "strictly descending, got 0.5 then 0.5 at position 3"),
    (dict(sigmas=(1.2, 0.5)), "must lie in \\(0, 1\\], got 1.2 at position 1"),
    (dict(sigmas=(1.0, 0.0)), "must lie in \\(0, 1\\], got 0.0 at position 2; the final 0 is added"),
    (dict(sigmas=(1.0, float("nan"))), "must lie in \\(0, 1\\], got nan"),
    (dict(spacing="karras"), "spacing 'karras' is unknown; use one of default, simple"),
])
def test_bad_sigma_lists_and_spacings(kw, needle):
    with pytest.raises(FastVideoError, match=needle):
        make_scheduler("euler", 4, 3.0, **kw)


def test_unipc_refuses_few_step_spacings():
    with pytest.raises(FastVideoError, match="need scheduler 'euler' or 'lcm'"):
        make_scheduler("unipc", 4, 3.0, spacing="simple")


# ----------------------------------------------------------------------------- DMD (FastWan)

def shift8_table_sigma(t):
    """FastVideo's DMD lookup, written out: the 1000 training sigmas shifted by 8, the entry whose
    timestep σ·1000 lies nearest to t."""
    best = min(range(1, 1001), key=lambda i: abs(8 * (i / 1000) / (1 + 7 * (i / 1000)) * 1000 - t))
    return 8 * (best / 1000) / (1 + 7 * (best / 1000))


def test_dmd_default_is_fastwans_list_with_integer_timesteps():
    s = make_scheduler("dmd", 50, 3.0)
    assert s.num_steps == 3 and s.timesteps.tolist() == [1000.0, 757.0, 522.0]
    want = [shift8_table_sigma(t) for t in (1000, 757, 522)] + [0.0]
    assert torch.allclose(s.sigmas, torch.tensor(want), atol=1e-6)
    assert (s.sigmas[:3] - s.timesteps / 1000).abs().max().item() < 4e-4  # σ ≈ t/1000
    assert torch.equal(make_scheduler("dmd", 4, 8.0).sigmas, s.sigmas)  # the run's shift plays no part


def test_dmd_predicts_x0_then_renoises_to_the_next_timestep():
    ts = (1000, 800, 500, 200)
    s = make_scheduler("dmd", 1, 3.0, timesteps=ts, generator=torch.Generator("cpu").manual_seed(9))
    assert s.timesteps.tolist() == [float(t) for t in ts]
    g = torch.Generator("cpu").manual_seed(9)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    want = x.clone()
    for i, t in enumerate(s.timesteps):
        sigma = shift8_table_sigma(ts[i])
        x = s.step(velocity(x, t), x)
        x0 = want - sigma * velocity(want, t)
        if i + 1 < len(ts):
            nxt = shift8_table_sigma(ts[i + 1])
            want = (1 - nxt) * x0 + nxt * torch.randn(2, 4, generator=g)
        else:
            want = x0  # the last step returns the x0 estimate
        assert torch.allclose(x, want, atol=1e-6)


class StubDiT(torch.nn.Module):
    """A stand-in DiT with a known velocity, v = sin(x) + t/1000; records what it is given."""

    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x, t, context, **kw):
        self.calls.append((float(t), x.clone(), context))
        return torch.sin(x) + t / 1000


def test_dmd_sampling_loop_follows_its_definition_step_by_step():
    from fastvideo_nodes.pipeline.sampler import SamplingSettings, SamplingStats, denoise, initial_noise
    s = SamplingSettings(height=32, width=32, num_frames=5, guidance_scale=1.0, scheduler="dmd", seed=21)
    assert s.num_steps == 3
    stub, stats, previews = StubDiT(), SamplingStats(), []
    pos, neg = torch.ones(1, 3, 8), torch.zeros(1, 3, 8)
    with torch.no_grad():
        out = denoise(stub, initial_noise(s), pos, neg, s, stats=stats,
                      callback=lambda i, n, x0: previews.append((i, n, x0)))
    # CFG 1: one forward per step, always on the positive prompt, at FastWan's integer timesteps.
    assert [c[0] for c in stub.calls] == [1000.0, 757.0, 522.0]
    assert all(c[2] is not neg and torch.equal(c[2], pos) for c in stub.calls)
    assert (stats.cond_forwards, stats.uncond_forwards) == (3, 0)
    g = torch.Generator("cpu").manual_seed(21)
    x = torch.randn(s.latent_shape, generator=g)  # the initial noise; step noise continues this stream
    for i, t in enumerate((1000, 757, 522)):
        assert torch.allclose(stub.calls[i][1], x, atol=1e-6)  # what the DiT was given at this step
        x0 = x - shift8_table_sigma(t) * (torch.sin(x) + t / 1000)
        assert previews[i][:2] == (i + 1, 3) and torch.allclose(previews[i][2], x0, atol=1e-5)
        if i < 2:
            nxt = shift8_table_sigma((757, 522)[i])
            x = (1 - nxt) * x0 + nxt * torch.randn(s.latent_shape, generator=g)
        else:
            x = x0
    assert torch.allclose(out, x, atol=1e-5)


def test_dmd_timestep_list_is_an_option():
    from fastvideo_nodes.pipeline.sampler import SamplingSettings, denoise, initial_noise
    s = SamplingSettings(height=32, width=32, num_frames=1, guidance_scale=1.0, scheduler="dmd",
                         timesteps=(1000, 750, 500, 250))
    assert s.validate().num_steps == 4
    stub = StubDiT()
    with torch.no_grad():
        denoise(stub, initial_noise(s), torch.ones(1, 3, 8), None, s)
    assert [c[0] for c in stub.calls] == [1000.0, 750.0, 500.0, 250.0]


@pytest.mark.parametrize("kw,needle", [
    (dict(timesteps=()), "timesteps must hold at least one value \\(FastWan uses 1000, 757, 522\\)"),
    (dict(timesteps=(1000, 757, 757)), "strictly descending, got 757 then 757 at position 3"),
    (dict(timesteps=(1001, 500)), "whole numbers from 1 to 1000, got 1001 at position 1"),
    (dict(timesteps=(1000, 0)), "whole numbers from 1 to 1000, got 0 at position 2"),
    (dict(timesteps=(1000, 757.5)), "whole numbers from 1 to 1000, got 757.5 at position 2"),
    (dict(sigmas=(1.0, 0.5)), "'dmd' runs its own timestep list .*need scheduler 'euler' or 'lcm'"),
    (dict(spacing="simple"), "'dmd' runs its own timestep list"),
])
def test_bad_dmd_arguments(kw, needle):
    with pytest.raises(FastVideoError, match=needle):
        make_scheduler("dmd", 4, 3.0, **kw)


@pytest.mark.parametrize("kw,needle", [
    (dict(scheduler="dmd", guidance_scale=5.0), "'dmd' runs without guidance: set guidance_scale to 1, got 5.0"),
    (dict(scheduler="euler", timesteps=(1000, 500)), "timestep list is for scheduler 'dmd'; scheduler 'euler'"),
    (dict(scheduler="dmd", guidance_scale=1.0, timesteps=(500, 900)), "strictly descending, got 500 then 900"),
    (dict(scheduler="dmd", guidance_scale=1.0, sigmas=(1.0, 0.5)), "'dmd' runs its own timestep list"),
])
def test_bad_dmd_settings_name_the_input(kw, needle):
    from fastvideo_nodes.pipeline.sampler import SamplingSettings
    with pytest.raises(FastVideoError, match=needle):
        SamplingSettings(**kw).validate()


def test_timesteps_belong_to_dmd_only():
    with pytest.raises(FastVideoError, match="timestep list is for scheduler 'dmd'; scheduler 'lcm'"):
        make_scheduler("lcm", 3, 3.0, timesteps=(1000, 500))
