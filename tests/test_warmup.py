"""load()'s warm-up (pipeline/warmup.py): once per shape, the attention decided at load, nothing left behind.

On a CPU the warm-up is off (nothing to build); these tests switch it on through `warmup.wanted`.
"""
import gc

import pytest
import torch

from fastvideo_nodes.memory.planner import VideoShape
from fastvideo_nodes.pipeline import warmup
from fastvideo_nodes.pipeline.generator import VideoGenerator

SIZE = dict(height=32, width=48, num_frames=5)
TOKENS = VideoShape(**SIZE).tokens  # 2 latent frames x 2 x 3 patches


def gen_for(tiny_model_set, **kw):
    c = tiny_model_set["comfy_fp32"]
    return VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"], device="cpu",
                                          **kw)


@pytest.fixture
def passes(monkeypatch):
    """Warm-up on, and each pass counted: {"dit": [(shape, backends ran)], "vae": [n]}."""
    seen: dict[str, list] = {"dit": [], "vae": []}
    real_dit, real_vae = warmup.dit_pass, warmup.vae_pass

    def dit_pass(dit, shape, **kw):
        ran = real_dit(dit, shape, **kw)
        seen["dit"].append((shape, ran))
        return ran

    def vae_pass(vae):
        real_vae(vae)
        seen["vae"].append(1)
    monkeypatch.setattr(warmup, "wanted", lambda device: True)
    monkeypatch.setattr(warmup, "dit_pass", dit_pass)
    monkeypatch.setattr(warmup, "vae_pass", vae_pass)
    return seen


def test_off_on_a_cpu(tiny_model_set):
    assert not warmup.wanted(torch.device("cpu"))
    with gen_for(tiny_model_set) as gen:
        gen.load(**SIZE)
        assert gen.warmup_s == 0.0 and not gen._parts.warmed


def test_load_warms_up_once(tiny_model_set, passes):
    with gen_for(tiny_model_set, attention_backend="TORCH_SDPA") as gen:
        s = gen.load(**SIZE)
        assert [shape for shape, _ in passes["dit"]] == [VideoShape(**SIZE)] and passes["vae"] == [1]
        assert passes["dit"][0][1] == ["TORCH_SDPA"]
        assert 0 < gen.warmup_s < gen.load_s <= s  # inside the load time, and apart
        gen.load(**SIZE)  # loaded and warm: nothing again
        r = gen.generate_video("a red fox", num_inference_steps=1, seed=1, **SIZE)
        assert len(passes["dit"]) == 1 and len(passes["vae"]) == 1
        assert r.timings["load_s"] == 0.0 and "warmup_s" not in r.timings


def test_first_call_that_loads_reports_the_warm_up_apart(tiny_model_set, passes):
    with gen_for(tiny_model_set, attention_backend="TORCH_SDPA") as gen:
        r = gen.generate_video("a red fox", num_inference_steps=1, seed=1, **SIZE)
        assert len(passes["dit"]) == 1
        assert 0 < r.timings["warmup_s"] < r.timings["load_s"]
        assert "warmup_s" not in gen.generate_video("a red fox", num_inference_steps=1, seed=1, **SIZE).timings
        assert len(passes["dit"]) == 1


def test_the_hybrid_schedule_warms_the_exact_backend_too(tiny_model_set, passes, monkeypatch):
    """exact_attention_steps with an 8-bit backend (auto's choice here): its step and the exact step
    both run at load, each through its own backend's kernel."""
    from fastvideo_nodes.attention import auto, int8, sdpa
    monkeypatch.setattr(auto, "choose_for", lambda *a, **k: "INT8_ATTN")
    called = []
    exact = sdpa.attend
    monkeypatch.setattr(sdpa, "attend", lambda q, k, v: called.append("TORCH_SDPA") or exact(q, k, v))
    monkeypatch.setattr(int8, "attend", lambda q, k, v: called.append("INT8_ATTN") or exact(q, k, v))
    with gen_for(tiny_model_set, exact_attention_steps=1) as gen:
        gen.load(**SIZE)
    assert passes["dit"][0][1] == ["INT8_ATTN", "TORCH_SDPA"]
    assert called[0] == "INT8_ATTN" and "TORCH_SDPA" in called


def test_auto_is_decided_at_load_at_the_real_length(tiny_model_set, passes, monkeypatch, tmp_path):
    """auto's probe runs inside load() for the shape's token count and head layout, once: the first
    call's steps reuse the decision."""
    from fastvideo_nodes.attention import auto
    monkeypatch.setenv("FASTVIDEO_CACHE", str(tmp_path))
    monkeypatch.setattr(auto, "_memo", {})
    measured, asked = [], []

    def choose_for(device, dtype, head_dim, heads, seq_len=32768):  # a CUDA device's path: decide, then probe
        asked.append((head_dim, heads, seq_len))
        key = f"test|{dtype}|{head_dim}|{auto.length_bucket(seq_len)}"
        return auto.decide(key, lambda: measured.append(seq_len) or {"choice": "TORCH_SDPA", "why": "test"})["choice"]
    monkeypatch.setattr(auto, "choose_for", choose_for)
    with gen_for(tiny_model_set, attention_backend="auto") as gen:
        cfg = gen.dit_config()
        gen.load(**SIZE)
        assert measured == [TOKENS] and asked[0] == (cfg.head_dim, cfg.num_heads, TOKENS)
        assert gen.attention_used()["choice"] == "TORCH_SDPA"
        gen.generate_video("a red fox", num_inference_steps=2, seed=1, **SIZE)
        assert measured == [TOKENS] and len(asked) > 1  # asked again at each step, measured once


def _live_tensors() -> dict[int, torch.Tensor]:
    gc.collect()
    return {id(o): o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)}


def test_warm_up_leaves_no_tensors_behind(tiny_model_set, monkeypatch):
    """Parts loaded cold, then a warm-up: the only tensors it leaves are the RoPE table the DiT keeps
    for the shape (the first step would make the same), and the weights are untouched."""
    with gen_for(tiny_model_set, attention_backend="TORCH_SDPA") as gen:
        gen.load(**SIZE)
        assert gen.warmup_s == 0.0
        weights = {k: v.clone() for k, v in gen.dit.state_dict().items()}
        before = _live_tensors()
        monkeypatch.setattr(warmup, "wanted", lambda device: True)
        gen.load(**SIZE)  # nothing to load: the warm-up alone
        assert gen.warmup_s > 0
        new = [t for i, t in _live_tensors().items() if i not in before]
        rope = [t for table in gen.dit._rope_cache.values() for t in table]
        assert len(rope) == 2 and {id(t) for t in new} == {id(t) for t in rope}, [tuple(t.shape) for t in new]
        for k, v in gen.dit.state_dict().items():
            assert torch.equal(v, weights[k]), k


def test_streamed_blocks_warm_up_and_sample_the_same(tiny_model_set, passes):
    """Every block streamed (a fake budget far too small): the warm-up's block runs through the offload
    hooks, and the run after it gives the latents of a generator that never warmed up."""
    gen = gen_for(tiny_model_set, gpu_memory_gb=0.004, attention_backend="TORCH_SDPA")
    gen.load(**SIZE)
    assert gen.offload_note is not None and len(passes["dit"]) == 1
    assert not gen._parts.offload.in_flight
    r = gen.generate_video("a red fox", num_inference_steps=2, seed=2, **SIZE)
    gen.close()
    with gen_for(tiny_model_set, precision="fp32", attention_backend="TORCH_SDPA") as cold:
        want = cold.generate_video("a red fox", num_inference_steps=2, seed=2, **SIZE)
    assert len(passes["dit"]) == 2  # the cold one warmed up too, on its own parts
    torch.testing.assert_close(r.latents, want.latents, rtol=1e-4, atol=1e-4)


def test_compiled_blocks_run_no_block_but_decide_the_attention_at_load(tiny_model_set, passes, monkeypatch):
    """compile=True: no block runs at load (it would compile at load()'s shape), but auto's decision
    and the VAE's kernels are load-time work all the same."""
    from fastvideo_nodes.models.wan_dit import WanDiT
    asked: list[tuple[str | None, int]] = []
    real = WanDiT.attention_backend_for

    def counted(self, name, seq_len=32760):
        asked.append((name, seq_len))
        return real(self, name, seq_len)
    monkeypatch.setattr(WanDiT, "attention_backend_for", counted)
    with gen_for(tiny_model_set, compile=True, attention_backend="auto") as gen:
        gen.load(**SIZE)
        assert not passes["dit"] and passes["vae"] == [1]
        assert asked == [("auto", TOKENS)] and gen.warmup_s > 0
        assert gen._parts.warmed


def test_a_new_shape_warms_again_and_close_forgets(tiny_model_set, passes):
    with gen_for(tiny_model_set, attention_backend="TORCH_SDPA") as gen:
        gen.load(**SIZE)
        gen.load(height=48, width=48, num_frames=5)
        assert [s for s, _ in passes["dit"]] == [VideoShape(**SIZE), VideoShape(48, 48, 5)]
        gen.close()
        assert gen.warmup_s == 0.0 and not gen._parts.warmed
        gen.load(**SIZE)
        assert len(passes["dit"]) == 3


@pytest.mark.gpu
def test_warm_up_on_cuda_hands_its_memory_back(tiny_model_set):
    """On CUDA the warm-up is on by default. A second one (another shape; cuBLAS's workspaces and the VAE's
    channels-last weights, made once by the first, are in place) leaves allocated memory as it was,
    but for the RoPE table of the new shape (the old one's is dropped)."""
    c = tiny_model_set["comfy_fp32"]
    with VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"], device="cuda",
                                        attention_backend="TORCH_SDPA") as gen:
        gen.load(**SIZE)
        first = gen.warmup_s
        assert first > 0
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        gen.load(height=64, width=64, num_frames=9)
        assert gen.warmup_s > first
        rope = sum(t.numel() * t.element_size() for table in gen.dit._rope_cache.values() for t in table)
        assert torch.cuda.memory_allocated() - before <= rope + 4096  # allocator rounding
        r = gen.generate_video("a red fox", num_inference_steps=1, seed=1, height=64, width=64, num_frames=9)
        assert r.timings["load_s"] == 0.0 and "warmup_s" not in r.timings


def test_two_experts_warm_the_first_steps_expert(tmp_path_factory, passes, monkeypatch):
    """Wan2.2 A14B: the warm-up runs the high-noise expert (the one the first steps use); the run after
    it matches a generator that never warmed up."""
    from fastvideo_nodes.pipeline import experts
    from fastvideo_nodes.testing.a14b import build_a14b_set
    c = build_a14b_set(str(tmp_path_factory.mktemp("a14b_warm")), seed=0)["comfy_fp32"]

    def make(**kw):
        return VideoGenerator.from_pretrained(c["model"], low_noise_model=c["low_noise_model"],
                                              text_encoder=c["text_encoder"], vae=c["vae"], device="cpu",
                                              attention_backend="TORCH_SDPA", **kw)
    with make() as gen:
        seen = []
        gen.dit.register_forward_pre_hook(lambda m, a: seen.append("high"))
        gen.dit_low.register_forward_pre_hook(lambda m, a: seen.append("low"))
        gen.load(**SIZE)
        assert seen == ["high"] and gen._parts.experts.active == experts.HIGH
        r = gen.generate_video("a red fox", num_inference_steps=4, seed=3, **SIZE)
    passes["dit"].clear()
    monkeypatch.setattr(warmup, "wanted", lambda device: False)
    with make(precision="fp32") as cold:
        want = cold.generate_video("a red fox", num_inference_steps=4, seed=3, **SIZE)
    assert not passes["dit"]
    torch.testing.assert_close(r.latents, want.latents, rtol=1e-4, atol=1e-4)
