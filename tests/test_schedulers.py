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


@pytest.mark.parametrize("args,needle", [(("ddim", 4, 3.0), "unknown; use one of unipc, euler"),
                                         (("unipc", 0, 3.0), "steps must be at least 1"),
                                         (("euler", 4, 0.0), "shift must be > 0")])
def test_bad_arguments(args, needle):
    with pytest.raises(FastVideoError, match=needle):
        make_scheduler(*args)
