"""gpu_memory_gb is a budget for the whole card: what the process holds outside torch's allocator
(the CUDA context) comes off it, and the allocator is capped at the rest (memory/planner.hold_to_budget).
CPU: torch.cuda's memory calls are replaced by a fake card."""
import pytest
import torch

from fastvideo_nodes.memory import planner

GiB = 2**30


class FakeCard:
    def __init__(self, total, used, reserved):
        self.total, self.used, self.reserved = total, used, reserved
        self.fraction = None
        self.settings = []

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (self.total - self.used, self.total))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                            lambda f, device=None: setattr(self, "fraction", f))
        monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", self.settings.append)


def test_context_comes_off_the_budget_and_caps_the_allocator(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    card = FakeCard(total=140 * GiB, used=int(1.2 * GiB), reserved=0)  # a fresh H200: the context only
    card.install(monkeypatch)
    room = planner.hold_to_budget("cuda:0", 24 * GiB)
    assert room == 24 * GiB - int(1.2 * GiB) - planner.LAZY_MARGIN
    assert card.fraction == pytest.approx(room / (140 * GiB))
    assert card.settings == ["expandable_segments:True"]
    planner.let_go("cuda:0")
    assert card.fraction == 1.0


def test_what_torch_already_holds_stays_inside_the_budget(monkeypatch):
    """Memory torch has reserved is ours and counted by the plan; only the rest is outside."""
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")  # the user's choice is kept
    card = FakeCard(total=80 * GiB, used=11 * GiB, reserved=10 * GiB)
    card.install(monkeypatch)
    assert planner.hold_to_budget("cuda:0", 20 * GiB) == 20 * GiB - 1 * GiB - planner.LAZY_MARGIN
    assert card.settings == []


def test_a_budget_below_the_context_leaves_no_room(monkeypatch):
    card = FakeCard(total=24 * GiB, used=2 * GiB, reserved=0)
    card.install(monkeypatch)
    assert planner.hold_to_budget("cuda:0", 1 * GiB) == 0
    assert card.fraction == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_generator_holds_its_budget_until_closed(tiny_model_set):
    """gpu_memory_gb on a GPU caps the allocator for the generator's life; close() lets go."""
    from fastvideo_nodes import VideoGenerator
    files = tiny_model_set["comfy"]
    gen = VideoGenerator.from_pretrained(files["model"], text_encoder=files["text_encoder"], vae=files["vae"],
                                         device="cuda", gpu_memory_gb=2)
    gen.load(height=64, width=64, num_frames=9)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    assert gen._parts.held is not None
    if fraction is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        assert fraction() * total <= 2 * GiB
    gen.generate_video("a fox", height=64, width=64, num_frames=9, num_inference_steps=2, seed=0)
    gen.close()
    assert gen._parts.held is None
    if fraction is not None:
        assert fraction() == 1.0
