"""gpu_memory_gb is a budget for the whole card: what the process holds outside torch's allocator
(the CUDA context, other processes) and a margin for kernels loaded later come off it before the
plan is made (memory/planner.card_budget). CPU: torch.cuda's memory calls answer for a fake card."""
import pytest
import torch

from fastvideo_nodes.memory import planner

GiB = 2**30


def fake_card(monkeypatch, total, used, reserved):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - used, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_the_context_comes_off_the_budget(monkeypatch):
    fake_card(monkeypatch, total=140 * GiB, used=int(1.2 * GiB), reserved=0)  # a fresh H200: the context only
    assert planner.card_budget("cuda", 24 * GiB) == 24 * GiB - int(1.2 * GiB) - planner.LAZY_MARGIN


def test_what_torch_already_holds_stays_inside_the_budget(monkeypatch):
    """Memory torch has reserved is ours and counted by the plan; only the rest is outside."""
    fake_card(monkeypatch, total=80 * GiB, used=11 * GiB, reserved=10 * GiB)
    assert planner.card_budget("cuda:0", 20 * GiB) == 20 * GiB - 1 * GiB - planner.LAZY_MARGIN


@pytest.mark.parametrize("gb", [1e-6, 2.0, 3.0])
def test_a_budget_the_context_would_mostly_take_is_planned_as_given(monkeypatch, caplog, gb):
    fake_card(monkeypatch, total=24 * GiB, used=int(0.6 * GiB), reserved=0)
    with caplog.at_level("WARNING"):
        assert planner.card_budget("cuda", int(gb * GiB)) == int(gb * GiB)
    assert "planning with it as given" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_generator_plans_for_less_than_its_budget(tiny_model_set):
    from fastvideo_nodes import VideoGenerator
    files = tiny_model_set["comfy"]
    gen = VideoGenerator.from_pretrained(files["model"], text_encoder=files["text_encoder"], vae=files["vae"],
                                         device="cuda", gpu_memory_gb=8)
    gen.load(height=64, width=64, num_frames=9)
    assert 0 < gen.memory_plan.budget <= 8 * GiB - planner.LAZY_MARGIN
    gen.close()
