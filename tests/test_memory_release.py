"""The generator as wired to the memory planner, the prompt cache and release (CPU, tiny models)."""
import gc
import weakref

import pytest
import torch

from fastvideo_nodes.pipeline.generator import VideoGenerator

SIZE = dict(height=32, width=48, num_frames=5)


def gen_for(tiny_model_set, **kw):
    c = tiny_model_set["comfy_fp32"]
    return VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"], device="cpu",
                                          **kw)


def test_second_call_with_the_same_prompts_does_not_encode(tiny_model_set):
    with gen_for(tiny_model_set) as gen:
        calls = []
        real = gen._encode_uncached
        gen._encode_uncached = lambda prompts: calls.append(list(prompts)) or real(prompts)
        a = gen.generate_video("a red fox", num_inference_steps=1, seed=1, **SIZE)
        b = gen.generate_video("a red fox", num_inference_steps=1, seed=1, **SIZE)
        assert len(calls) == 2  # positive, then the default negative: each once
        assert b.timings["encode_s"] <= 0.1 and b.timings["load_s"] == 0.0
        assert torch.equal(a.latents, b.latents)


def test_load_reports_apart_and_first_call_does_not_load(tiny_model_set):
    gen = gen_for(tiny_model_set)
    assert gen._parts.dit is None  # lazy until load()
    s = gen.load()
    assert 0 < gen.load_s <= s and all(p is not None for p in (gen._parts.dit, gen._parts.vae,
                                                                      gen._parts.text_encoder))
    r = gen.generate_video("x", num_inference_steps=1, **SIZE)
    assert r.timings["load_s"] == 0.0
    gen.close()


def test_parts_are_shared_and_close_frees_them(tiny_model_set):
    gen, same = gen_for(tiny_model_set), gen_for(tiny_model_set)
    assert gen._parts is same._parts and gen_for(tiny_model_set, precision="fp16")._parts is not gen._parts
    gen.load()
    dit, vae = weakref.ref(gen._parts.dit), weakref.ref(gen._parts.vae)
    te = weakref.ref(gen._parts.text_encoder.model)
    gen.encode_prompt("a boat")
    assert len(gen._parts.prompts) == 1
    gen.close()
    gc.collect()
    assert dit() is None and vae() is None and te() is None and len(gen._parts.prompts) == 0
    assert same.encode_prompt("a boat").shape[0] == 1  # a later use loads again


def test_dropping_the_last_generator_frees_without_close(tiny_model_set):
    gen = gen_for(tiny_model_set, precision="fp16")
    gen.load()
    dit = weakref.ref(gen._parts.dit)
    del gen
    gc.collect()
    assert dit() is None  # the registry holds parts weakly


@pytest.mark.parametrize("gb,streamed", [(100.0, False), (0.004, True)])
def test_budget_decides_the_placement(tiny_model_set, gb, streamed):
    """A fake budget (gpu_memory_gb on the CPU device): a large one keeps everything resident; one
    below the planner's need takes the least plan (every block streamed through the offload hooks,
    VAE moved in to decode, encoder on the CPU) with a warning; the result is the same. (On a CPU
    device no pinned homes are made: there is nothing to move.)"""
    gen = gen_for(tiny_model_set, gpu_memory_gb=gb)
    gen.load(**SIZE)
    plan = gen.memory_plan
    assert plan is not None and (plan.dit_blocks_streamed > 0) == streamed
    assert (gen.offload_note is not None) == streamed
    if streamed:
        assert plan.dit_blocks_resident == 0 and plan.vae == "on_demand" and plan.text_encoder == "cpu"
    else:
        assert plan.all_resident and not gen._parts.homes
    r = gen.generate_video("a red fox", num_inference_steps=1, seed=2, **SIZE)
    want = gen_for(tiny_model_set, precision="fp32").generate_video("a red fox", num_inference_steps=1, seed=2,
                                                                     **SIZE)
    torch.testing.assert_close(r.latents, want.latents, rtol=1e-4, atol=1e-4)
    gen.close()


def test_out_of_memory_while_encoding_is_the_friendly_error(tiny_model_set):
    from fastvideo_nodes.errors import FastVideoError
    gen = gen_for(tiny_model_set)
    gen.load(**SIZE)

    def oom(prompts):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 11.00 GiB")
    gen._parts.text_encoder.encode = oom
    with pytest.raises(FastVideoError, match="while encoding the prompts.*weight_storage fp8"):
        gen.encode_prompt("a fox")
    gen.close()


def test_the_result_names_the_attention_backend(tiny_model_set, monkeypatch):
    """GenerationResult.attention says what was asked for and, for auto, what it chose and why."""
    from fastvideo_nodes.attention import auto
    with gen_for(tiny_model_set, attention_backend="TORCH_SDPA") as gen:
        r = gen.generate_video("a red fox", num_inference_steps=1, seed=1, **SIZE)
        assert r.attention == {"requested": "TORCH_SDPA"}
    record = {"choice": "INT8_ATTN", "why": "fastest that passes the guard", "key": "k"}
    monkeypatch.setattr(auto, "_last", record)
    with gen_for(tiny_model_set, attention_backend="auto") as gen:
        r = gen.generate_video("a red fox", num_inference_steps=1, seed=1, **SIZE)
        assert r.attention == {"requested": "AUTO", **record}


@pytest.mark.parametrize("size,needle", [(dict(height=-5), "height must be a positive multiple of 16"),
                                         (dict(width=100), "width must be a positive multiple of 16, got 100; "
                                                           "nearest valid: 96 or 112"),
                                         (dict(num_frames="x"), "num_frames must be 4n\\+1")])
def test_load_refuses_a_bad_size_before_loading(tiny_model_set, size, needle):
    from fastvideo_nodes.errors import FastVideoError
    with gen_for(tiny_model_set) as gen:
        with pytest.raises(FastVideoError, match=needle):
            gen.load(**size)
        assert gen._parts.dit is None  # nothing loaded
        gen.load(height=32, width=48, num_frames=5)  # and the generator still works
        assert gen._parts.dit is not None
