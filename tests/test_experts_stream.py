"""Wan2.2 A14B's experts in "stream" mode (pipeline/experts.py): each expert keeps one pinned home for
the life of the Experts object, the block offload streams from that home's own tensors, and a switch
drops the old expert's device copies and starts the new one's offload from its home. Outputs equal
both experts resident, no host copy is made at a switch, a LoRA merged after placement survives
the switches (a stale home would undo it), and release() leaves every weight at home."""
import copy
from dataclasses import replace

import pytest
import torch

from fastvideo_nodes.loading.lora import set_loras
from fastvideo_nodes.pipeline.experts import HIGH, LOW, Experts
from fastvideo_nodes.testing.dit import TINY_DIT, random_dit
from fastvideo_nodes.testing.lora import save_random_lora

CFG = replace(TINY_DIT, num_layers=4)
ORDER = (HIGH, LOW, HIGH, LOW)  # two calls: high → low, then back to high


def run(dit, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        return dit(x.to(device), torch.tensor([500.0], device=device), ctx.to(device)).cpu()


@pytest.fixture
def pair():
    return random_dit(CFG, seed=2), random_dit(CFG, seed=3)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return save_random_lora(CFG, str(tmp_path_factory.mktemp("lora") / "tiny_lora.safetensors"), rank=4, seed=1,
                            scale=0.2)


def streamed(pair, device="cpu", blocks_on_gpu=1):
    return Experts(*pair, device=torch.device(device), mode="stream", blocks_on_gpu=blocks_on_gpu)


def home_ptrs(ex: Experts, k: int) -> list[int]:
    return [t.data_ptr() for _, _, _, t in ex.homes[k].home]


def weight_ptrs(dit) -> set[int]:
    return {t.data_ptr() for t in list(dit.parameters()) + list(dit.buffers())}


def test_stream_switches_equal_resident(pair):
    resident = Experts(*copy.deepcopy(pair), device=torch.device("cpu"), mode="resident")
    want = [run(resident.use(k)) for k in ORDER]
    ex = streamed(pair)
    for k, w in zip(ORDER, want):
        got = run(ex.use(k))
        assert torch.equal(got, w)
        assert ex.offloads[k] is not None and ex.offloads[1 - k] is None  # one expert placed at a time
        assert not any(b._forward_hooks for b in ex.models[1 - k].blocks)  # the idle one has no hooks
    assert ex.switches == 4 and len(ex.switch_s) == 4


def test_a_switch_makes_no_host_copy(pair):
    """The homes' tensors are the same storage across switches; the offload streams those very
    tensors (no second pinned copy), and the resident part runs on copies, never on the home."""
    ex = streamed(pair)
    homes, ptrs = list(ex.homes), [home_ptrs(ex, k) for k in (HIGH, LOW)]
    for k in ORDER:
        run(ex.use(k))
        assert ex.homes == homes and [home_ptrs(ex, j) for j in (HIGH, LOW)] == ptrs
        at_home = set(ptrs[k])
        off = ex.offloads[k]
        assert all(cpu.data_ptr() in at_home for pairs in off.home.values() for _, cpu in pairs)
        assert all(p.data_ptr() in at_home for b in off.offloaded for p in b.parameters())  # between forwards
        assert not any(p.data_ptr() in at_home for b in ex.models[k].blocks[:1] for p in b.parameters())
        assert weight_ptrs(ex.models[1 - k]) <= set(ptrs[1 - k])  # the idle expert rests at home


def test_a_loading_offload_joins_the_high_experts_home(pair):
    """The generator hands over the high expert's offload from loading: its streamed blocks become
    the home's tensors as they are."""
    from fastvideo_nodes.memory.offload import enable_block_offload
    off = enable_block_offload(pair[0], device="cpu", blocks_on_gpu=1)
    streamed_ptrs = {cpu.data_ptr() for pairs in off.home.values() for _, cpu in pairs}
    ex = Experts(*pair, device=torch.device("cpu"), mode="stream", blocks_on_gpu=1, offload=off)
    assert streamed_ptrs <= set(home_ptrs(ex, HIGH)) and not off.hooks
    want = run(copy.deepcopy(pair[0]))
    assert torch.equal(run(ex.use(HIGH)), want)


@pytest.mark.parametrize("merged", ["active", "idle"])
def test_lora_merged_after_placement_survives_switches(pair, lora, merged):
    """A LoRA merged in place into the active expert (its resident part: device copies) or the idle one
    (its home) is what runs after the next switches, and removing it brings the base back."""
    base = [run(copy.deepcopy(m)) for m in pair]
    ref = copy.deepcopy(pair[HIGH])
    set_loras(ref, [(lora, 1.0)])
    want = run(ref)
    ex = streamed(pair)
    run(ex.use(HIGH if merged == "active" else LOW))
    set_loras(pair[HIGH], [(lora, 1.0)])
    for k in ORDER:
        assert torch.equal(run(ex.use(k)), want if k == HIGH else base[LOW])
    assert (want - base[HIGH]).abs().max().item() > 1e-3  # the LoRA matters
    set_loras(pair[HIGH], [])
    for k in ORDER:
        assert torch.equal(run(ex.use(k)), base[k])


def test_lora_merged_then_released(pair, lora):
    """release() with a merge on the active expert's device copies keeps it (the home is rebuilt),
    and a new Experts over the released models reuses the homes' tensors (no copy)."""
    ref = copy.deepcopy(pair[HIGH])
    set_loras(ref, [(lora, 0.5)])
    ex = streamed(pair)
    run(ex.use(HIGH))
    set_loras(pair[HIGH], [(lora, 0.5)])
    ex.release()
    again = streamed(pair)
    assert set(home_ptrs(again, HIGH)) == set(home_ptrs(ex, HIGH)) and home_ptrs(again, LOW) == home_ptrs(ex, LOW)
    assert torch.equal(run(again.use(HIGH)), run(ref))


def test_release_leaves_every_weight_at_home(pair):
    ex = streamed(pair)
    for k in ORDER[:3]:
        run(ex.use(k))
    ex.release()
    assert ex.active == -1 and ex.offloads == [None, None]
    for k in (HIGH, LOW):
        assert weight_ptrs(ex.models[k]) <= set(home_ptrs(ex, k))
        assert not any(b._forward_hooks or b._forward_pre_hooks for b in ex.models[k].blocks)
        assert ex.models[k]._rope_cache == {}  # its RoPE tables lived where it ran: sent home with it


def test_a_moved_dit_forgets_its_rope_tables(pair):
    dit = pair[HIGH]
    run(dit)
    assert dit._rope_cache  # built by the forward, on the device it ran on
    dit.to("cpu")
    assert dit._rope_cache == {}
    assert torch.equal(run(dit), run(copy.deepcopy(dit)))  # rebuilt alike on the next forward


def test_streamed_generator_keeps_a_lora_set_after_a_run(tmp_path):
    """Through the generator: a LoRA set after a streamed run (low expert active) reaches the high
    expert at the next call, equal to merging it with both experts resident."""
    from fastvideo_nodes.pipeline.generator import VideoGenerator
    from fastvideo_nodes.pipeline.sampler import SamplingSettings
    from fastvideo_nodes.testing.a14b import build_a14b_set
    c = build_a14b_set(str(tmp_path), seed=0)["comfy_fp32"]
    path = save_random_lora(TINY_DIT, str(tmp_path / "lora_HIGH.safetensors"), rank=4, seed=1, scale=0.2)
    settings = SamplingSettings(steps=4, shift=12.0, guidance_scale=4.0, guidance_scale_low=3.0, seed=3, height=32,
                                width=48, num_frames=5, boundary=0.875)

    def make(**kw):
        return VideoGenerator.from_pretrained(c["model"], low_noise_model=c["low_noise_model"],
                                              text_encoder=c["text_encoder"], vae=c["vae"], device="cpu",
                                              dtype="fp32", **kw)

    def latents(gen):
        return gen.sample(gen.encode_prompt("a boat"), gen.encode_prompt("blurry"), settings)

    want = latents(make(loras=[(path, 1.0)]))
    gen = make(gpu_memory_gb=1.5)
    gen.load(height=32, width=48, num_frames=5)
    plan = gen.memory_plan
    gen.placement.replace(type(plan)(**{**plan.__dict__, "dit_blocks_resident": 1, "experts": "stream"}))
    base = latents(gen)
    assert gen._parts.experts.mode == "stream" and gen._parts.experts.active == LOW
    gen.set_loras([(path, 1.0)])
    assert (want - base).abs().max().item() > 1e-2  # the LoRA matters
    assert (latents(gen) - want).abs().max().item() <= 1e-4  # resident vs streamed: summation order only
    gen.set_loras([])
    assert torch.equal(latents(gen), base)


@pytest.mark.gpu
def test_cuda_switch_is_one_copy_in_and_never_both(pair):
    """On CUDA: homes pinned, shared with the offload, the same storage across switches; the device
    holds one expert's resident part (plus blocks in flight) at a time; release() frees it all."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    resident = Experts(*[copy.deepcopy(m).cuda() for m in pair], device=torch.device("cuda"), mode="resident")
    want = [run(resident.use(k), "cuda") for k in ORDER]
    del resident
    ex = streamed(pair, "cuda", blocks_on_gpu=2)
    assert all(t.is_pinned() for k in (HIGH, LOW) for _, _, _, t in ex.homes[k].home)
    ptrs = [home_ptrs(ex, k) for k in (HIGH, LOW)]
    one = sum(t.nbytes for t in pair[HIGH].state_dict().values())
    for k, w in zip(ORDER, want):
        got = run(ex.use(k), "cuda")
        assert torch.allclose(got, w, atol=1e-5)
        in_flight = sum(s.nbytes for s in ex.offloads[k].slots)  # the two streamed blocks' slots
        assert torch.cuda.memory_allocated() - before < one + in_flight  # never both experts on the GPU
        assert all(p.device.type == "cpu" for p in ex.models[1 - k].parameters())
        assert [home_ptrs(ex, j) for j in (HIGH, LOW)] == ptrs
    ex.release()
    assert all(p.device.type == "cpu" for m in pair for p in list(m.parameters()) + list(m.buffers()))
    assert torch.cuda.memory_allocated() == before
