"""Sequence-parallel workers (2 CPU gloo ranks) for Wan2.1 I2V and Wan2.2 A14B: the same latents as
one process (same seed, same tiny random weights), the experts' switch, guidance and caches per span
on every rank, both experts resident or swapped by the one-process rule, and worker errors that name
the rank."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from fastvideo_nodes.errors import FastVideoError, ModelFileError
from fastvideo_nodes.loading.dit import load_dit
from fastvideo_nodes.memory import planner
from fastvideo_nodes.models.wan_vae import model_to_raw
from fastvideo_nodes.parallel import WorkerPool
from fastvideo_nodes.parallel.pool import expert_placement
from fastvideo_nodes.pipeline import experts as experts_mod
from fastvideo_nodes.pipeline.generator import VideoGenerator
from fastvideo_nodes.pipeline.sampler import SamplingSettings, SamplingStats, initial_noise
from fastvideo_nodes.pipeline.schedulers import make_scheduler

pytest.importorskip("diffusers")  # the tiny model sets are written with diffusers

PROMPT, NEGATIVE = "a small red boat drifting on a calm lake", "blurry, static"
SIZE = dict(height=32, width=48, num_frames=5)
# fp32 on CPU: each worker runs fewer threads than this process, so sums may be added in another
# order (tests/test_parallel.py sees ~1e-5 relative); anything structural is far larger.
REL_TOL = 2e-5


def close(got, want):
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= REL_TOL * scale, (err, scale)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE["height"], SIZE["width"], 3), dtype=np.uint8))


def _run(gen, settings, picture=None, stats=None):
    """Raw latents of one sampling through the generator (the image encoded in this process)."""
    encoded = gen.encode_image(picture, settings) if picture is not None else None
    return gen.sample(gen.encode_prompt(PROMPT), gen.encode_prompt(NEGATIVE), settings, image_condition=encoded,
                      stats=stats)


# ----------------------------------------------------------------------------- Wan2.1 I2V

@pytest.fixture(scope="module")
def i2v_gen(tmp_path_factory):
    from fastvideo_nodes.testing.i2v import build_i2v_model_set
    c = build_i2v_model_set(str(tmp_path_factory.mktemp("i2v")), seed=0)["comfy_fp32"]
    gen = VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"],
                                         image_encoder=c["image_encoder"], device="cpu", dtype="fp32")
    yield gen
    gen.close()  # also stops the pools of the generators sharing its parts


@pytest.mark.parametrize("kw", [dict(), dict(num_frames=9, height=16, width=48),  # 3×1×3 = 9 tokens: padded
                                dict(cfg_gate=0.5), dict(teacache_threshold=3.0, teacache_coefficients=[1.0, 0.0])])
def test_i2v_on_two_workers_equals_one_process(i2v_gen, picture, kw):
    """The condition (36 input channels) and the CLIP tokens reach both ranks; encoding stays here."""
    par = i2v_gen.with_parallel(2)
    settings = SamplingSettings(**{**SIZE, "steps": 3, "guidance_scale": 5.0, "seed": 7, **kw})
    ref_stats, par_stats = SamplingStats(), SamplingStats()
    want = _run(i2v_gen, settings, picture, ref_stats)
    got = _run(par, settings, picture, par_stats)
    assert i2v_gen._parts.pools and all(p.alive for p in i2v_gen._parts.pools.values())  # it ran on the workers
    close(got, want)
    assert (par_stats.cond_forwards, par_stats.uncond_forwards, par_stats.teacache_skipped) == \
        (ref_stats.cond_forwards, ref_stats.uncond_forwards, ref_stats.teacache_skipped)


def test_i2v_image_changes_the_parallel_result(i2v_gen, picture):
    """The image really conditions the workers' run (parity alone would hold if both ignored it)."""
    par = i2v_gen.with_parallel(2)
    settings = SamplingSettings(**SIZE, steps=2, seed=7)
    other = Image.fromarray(255 - np.asarray(picture))
    assert (_run(par, settings, picture) - _run(par, settings, other)).abs().max().item() > 1e-3


def test_i2v_worker_error_names_the_rank_and_the_next_run_works(i2v_gen, picture):
    par = i2v_gen.with_parallel(2)
    settings = par.check_settings(SamplingSettings(**SIZE, steps=2, seed=7))
    condition, embeds = par.encode_image(picture, settings)
    pos, neg = par.encode_prompt(PROMPT), par.encode_prompt(NEGATIVE)
    with pytest.raises(FastVideoError) as info:
        par.pool().sample(initial_noise(settings), pos, neg, settings, condition=condition,
                          image_embeds=embeds[..., :100])  # CLIP tokens of the wrong width
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(("worker rank 0 failed at step 1 of 2: ", "worker rank 1 failed at step 1 of 2: ")), \
        message
    assert "image_embeds: expected [B,I,160], got (1, 17, 100)" in message, message
    with pytest.raises(FastVideoError, match=r"^worker rank [01] failed before step 1: image_embeds without "
                                             r"condition: image-to-video needs the image condition too\."):
        par.pool().sample(initial_noise(settings), pos, neg, settings, image_embeds=embeds)  # no condition
    close(_run(par, settings, picture), _run(i2v_gen, settings, picture))  # a fresh pool


# ----------------------------------------------------------------------------- Wan2.2 A14B

STEPS, SHIFT, G_HIGH, G_LOW, BOUNDARY = 6, 12.0, 4.0, 3.0, 0.875


@pytest.fixture(scope="module")
def a14b_files(tmp_path_factory):
    from fastvideo_nodes.testing.a14b import build_a14b_set
    return build_a14b_set(str(tmp_path_factory.mktemp("a14b")), seed=0)["comfy_fp32"]


@pytest.fixture(scope="module")
def a14b_gen(a14b_files):
    c = a14b_files
    gen = VideoGenerator.from_pretrained(c["model"], low_noise_model=c["low_noise_model"],
                                         text_encoder=c["text_encoder"], vae=c["vae"], device="cpu", dtype="fp32")
    yield gen
    gen.close()


def _a14b_settings(**kw):
    return SamplingSettings(**{**SIZE, "steps": STEPS, "shift": SHIFT, "guidance_scale": G_HIGH,
                               "guidance_scale_low": G_LOW, "boundary": BOUNDARY, "seed": 3, **kw})


def test_a14b_schedule_uses_both_experts():
    """Each expert serves at least two steps, so the switch, the per-span gate and TeaCache's fresh
    start are all exercised below."""
    which = experts_mod.expert_per_step(make_scheduler("unipc", STEPS, SHIFT).timesteps, BOUNDARY)
    assert which.count(experts_mod.HIGH) >= 2 and which.count(experts_mod.LOW) >= 2


@pytest.mark.parametrize("kw", [dict(), dict(cfg_gate=0.5),
                                dict(teacache_threshold=100.0, teacache_coefficients=[1.0, 0.0]),
                                dict(num_frames=9, height=16, width=48)])
def test_a14b_on_two_workers_equals_one_process(a14b_gen, a14b_files, kw):
    """Both experts on every rank, switched at the same step with the same guidance; the CFG gate per
    expert span and TeaCache's fresh start at the switch give the same forward counts."""
    c = a14b_files
    par = VideoGenerator.from_pretrained(c["model"], low_noise_model=c["low_noise_model"],
                                         text_encoder=c["text_encoder"], vae=c["vae"], device="cpu", dtype="fp32",
                                         num_gpus=2)
    assert par._parts is a14b_gen._parts  # the same encoders; sampling goes to the workers
    settings = _a14b_settings(**kw)
    ref_stats, par_stats = SamplingStats(), SamplingStats()
    want = _run(a14b_gen, settings, stats=ref_stats)
    got = _run(par, settings, stats=par_stats)
    close(got, want)
    assert (par_stats.cond_forwards, par_stats.uncond_forwards, par_stats.teacache_skipped) == \
        (ref_stats.cond_forwards, ref_stats.uncond_forwards, ref_stats.teacache_skipped)
    assert par_stats.extra["experts"] == "resident"  # a CPU without gpu_memory_gb: nothing to plan
    if "cfg_gate" in kw:
        which = experts_mod.expert_per_step(make_scheduler("unipc", STEPS, SHIFT).timesteps, BOUNDARY)
        assert par_stats.uncond_forwards == sum(math.ceil(which.count(k) * 0.5) for k in (0, 1))
    if "teacache_threshold" in kw:
        assert par_stats.teacache_skipped == 2 * (STEPS - 3)  # first, switch and last steps computed


def test_a14b_low_expert_guidance_reaches_the_workers(a14b_gen):
    par = a14b_gen.with_parallel(2)
    assert (_run(par, _a14b_settings()) - _run(par, _a14b_settings(guidance_scale_low=1.0))).abs().max() > 1e-3


def test_expert_placement_rule():
    GiB, DEFAULT_RESERVE = planner.GiB, planner.DEFAULT_RESERVE
    assert expert_placement(10 * GiB, 2 * GiB, None) == "resident"
    assert expert_placement(10 * GiB, 2 * GiB, 22 * GiB + DEFAULT_RESERVE) == "resident"
    assert expert_placement(10 * GiB, 2 * GiB, 22 * GiB + DEFAULT_RESERVE - 1) == "swap"
    assert expert_placement(10 * GiB, 2 * GiB, 5 * GiB) == "swap"  # not even one fits: still one at a time


def _budget_between(model: str, small, large) -> int:
    """Bytes with room for both experts at the small video size but not at the large one."""
    sizes = planner.Components(planner.DitSizes.of(load_dit(model)), vae_bytes=0, text_encoder_bytes=0)

    def need(s):
        shape = planner.VideoShape(s.height, s.width, s.num_frames)
        return 2 * sizes.dit.total + planner.sampling_activation_bytes(sizes, shape) + planner.DEFAULT_RESERVE
    assert need(small) < need(large)
    return (need(small) + need(large)) // 2


def test_a14b_workers_swap_when_both_do_not_fit(a14b_gen, a14b_files):
    """A budget with room for both experts at the small size but not at the large one: the ranks keep
    both resident, swap them one at a time, then keep both again; every result equals one process."""
    small, large = _a14b_settings(), _a14b_settings(height=64, width=96, num_frames=9)
    budget = _budget_between(a14b_files["model"], small, large)
    pool = WorkerPool(a14b_files["model"], low_noise_model=a14b_files["low_noise_model"], num_gpus=2, device="cpu",
                      dtype=torch.float32, gpu_memory_gb=budget / planner.GiB)
    pos, neg = a14b_gen.encode_prompt(PROMPT), a14b_gen.encode_prompt(NEGATIVE)
    try:
        for s, mode in ((small, "resident"), (large, "swap"), (small, "resident")):
            stats = SamplingStats()
            got = pool.sample(initial_noise(s), pos, neg, s, stats=stats)
            close(model_to_raw(got), _run(a14b_gen, s))
            assert stats.extra["experts"] == mode
    finally:
        pool.close()


def _reference(files, settings, pos, neg, loras=(), loras_low=()):
    """One process: both experts loaded, each with its own LoRAs merged, through the same denoise()."""
    from fastvideo_nodes.loading.lora import set_loras
    from fastvideo_nodes.pipeline.sampler import denoise
    high, low = load_dit(files["model"]), load_dit(files["low_noise_model"])
    set_loras(high, list(loras))
    set_loras(low, list(loras_low))
    with torch.inference_mode():
        return denoise(experts_mod.Experts(high, low, device=torch.device("cpu")), initial_noise(settings), pos, neg,
                       settings)


@pytest.mark.slow  # ~25-45 s on 2 cores: five jobs and their one-process references
def test_a14b_workers_merge_each_experts_own_loras(a14b_gen, a14b_files, tmp_path):
    """loras go to the high-noise expert, loras_low to the low-noise one, on every rank; changing them
    between jobs (also while the experts swap, where merges must reach the host copies) gives the
    one-process latents each time."""
    from fastvideo_nodes.testing.dit import TINY_DIT
    from fastvideo_nodes.testing.lora import save_random_lora
    hi = [(save_random_lora(TINY_DIT, str(tmp_path / "high.safetensors"), seed=1, scale=0.2), 1.0)]
    lo = [(save_random_lora(TINY_DIT, str(tmp_path / "low.safetensors"), seed=2, scale=0.2), 0.8)]
    small, large = _a14b_settings(), _a14b_settings(height=64, width=96, num_frames=9)
    pool = WorkerPool(a14b_files["model"], low_noise_model=a14b_files["low_noise_model"], num_gpus=2, device="cpu",
                      dtype=torch.float32,
                      gpu_memory_gb=_budget_between(a14b_files["model"], small, large) / planner.GiB)
    pos, neg = a14b_gen.encode_prompt(PROMPT), a14b_gen.encode_prompt(NEGATIVE)
    refs: dict = {}

    def ref(s, loras=(), loras_low=()):
        key = (s.height, tuple(loras), tuple(loras_low))
        if key not in refs:
            refs[key] = _reference(a14b_files, s, pos, neg, loras, loras_low)
        return refs[key]
    try:
        runs = ((small, hi, lo, "resident"), (large, hi, lo, "swap"), (large, [], lo, "swap"),
                (large, [], [], "swap"), (small, hi, [], "resident"))
        for s, loras, loras_low, mode in runs:
            stats = SamplingStats()
            got = pool.sample(initial_noise(s), pos, neg, s, stats=stats, loras=loras, loras_low=loras_low)
            close(got, ref(s, loras, loras_low))
            assert stats.extra["experts"] == mode
            if loras or loras_low:  # the LoRAs matter: far from the base model's latents
                assert (got - ref(s)).abs().max().item() > 1e-3
    finally:
        pool.close()


def test_a14b_generator_sends_each_experts_loras_to_the_workers(a14b_gen, tmp_path):
    """from_pretrained/with_loras(loras, loras_low) on two workers: the one-process latents."""
    from fastvideo_nodes.testing.dit import TINY_DIT
    from fastvideo_nodes.testing.lora import save_random_lora
    hi = [(save_random_lora(TINY_DIT, str(tmp_path / "high.safetensors"), seed=1, scale=0.2), 1.0)]
    lo = [(save_random_lora(TINY_DIT, str(tmp_path / "low.safetensors"), seed=2, scale=0.2), 0.8)]
    one = a14b_gen.with_loras(hi, lo)
    settings = _a14b_settings()
    want = _run(one, settings)
    got = _run(one.with_parallel(2), settings)
    close(got, want)
    assert (got - _run(a14b_gen, settings)).abs().max().item() > 1e-3  # the LoRAs matter


def test_loras_low_on_a_one_dit_pool_is_refused(i2v_gen, tmp_path):
    from fastvideo_nodes.testing.i2v import TINY_I2V
    from fastvideo_nodes.testing.lora import save_random_lora
    lora = save_random_lora(TINY_I2V, str(tmp_path / "l.safetensors"))
    s = SamplingSettings(**SIZE, steps=1)
    with pytest.raises(FastVideoError, match=r"^loras_low: only a two-expert model \(Wan2.2 A14B, with "
                                             r"low_noise_model\) has a low-noise expert; give the LoRAs as loras\.$"):
        i2v_gen.with_parallel(2).pool().sample(initial_noise(s), torch.zeros(1, 4, 32), None, s,
                                               loras_low=[(lora, 1.0)])


def test_pool_refuses_a_low_expert_of_another_size(a14b_files, tmp_path):
    from fastvideo_nodes.testing.dit import TINY_DIT, random_dit, save_original
    other = save_original(random_dit(replace(TINY_DIT, num_layers=3), seed=2).state_dict(),
                          str(tmp_path / "low_other.safetensors"), dtype=None)
    with pytest.raises(ModelFileError, match=r"low_noise_model: 'low_other.safetensors' is not the twin of the "
                                             r"high-noise expert .*num_layers 2 vs 3"):
        WorkerPool(a14b_files["model"], low_noise_model=other, num_gpus=2, device="cpu", dtype=torch.float32)


def test_i2v_a14b_on_two_workers_equals_one_process(tmp_path_factory, picture):
    """Wan2.2 I2V-A14B: two 36-channel experts, the condition without CLIP tokens, on both ranks."""
    from fastvideo_nodes.testing.a14b import build_a14b_set
    c = build_a14b_set(str(tmp_path_factory.mktemp("i2v_a14b")), seed=4, i2v=True)["comfy_fp32"]
    files = dict(low_noise_model=c["low_noise_model"], text_encoder=c["text_encoder"], vae=c["vae"], device="cpu",
                 dtype="fp32")
    gen = VideoGenerator.from_pretrained(c["model"], **files)
    try:
        settings = SamplingSettings(**SIZE, steps=6, shift=5.0, guidance_scale=3.5, guidance_scale_low=2.5,
                                    boundary=0.9, seed=5, cfg_gate=0.5)
        which = experts_mod.expert_per_step(make_scheduler("unipc", 6, 5.0).timesteps, 0.9)
        assert 0 < which.count(experts_mod.HIGH) < 6
        ref_stats, par_stats = SamplingStats(), SamplingStats()
        want = _run(gen, settings, picture, ref_stats)
        got = _run(VideoGenerator.from_pretrained(c["model"], num_gpus=2, **files), settings, picture, par_stats)
        close(got, want)
        assert par_stats.uncond_forwards == ref_stats.uncond_forwards
    finally:
        gen.close()


# ----------------------------------------------------------------------------- ComfyUI: the launcher node

def _nodes():
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import nodes
    return nodes


def test_nodes_i2v_through_the_parallel_launcher_equal_one_process(i2v_gen, picture):
    """Loader → FastVideo Parallel Workers → sampler with a native IMAGE: the workers' latents are the
    one-process engine's (the node passes the image through the generator unchanged)."""
    fv = _nodes()
    (par,) = fv.FastVideoParallelWorkers().launch(model=i2v_gen, num_gpus=2)
    pos, neg = fv.EncodePrompt().encode(model=par, prompt=PROMPT, negative_prompt=NEGATIVE)
    image = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255)[None]  # [1,H,W,3]
    (latent,) = fv.FastVideoSampler().sample(model=par, positive=pos, negative=neg, steps=2, cfg=5.0, shift=3.0,
                                             scheduler="unipc", seed=3, cfg_gate=1.0, teacache_threshold=0.0,
                                             image=image, **SIZE)
    settings = SamplingSettings(steps=2, seed=3, **SIZE)
    close(latent["samples"], _run(i2v_gen, settings, picture))


def test_nodes_a14b_through_the_parallel_launcher_equal_one_process(a14b_gen):
    fv = _nodes()
    (par,) = fv.FastVideoParallelWorkers().launch(model=a14b_gen, num_gpus=2)
    pos, neg = fv.EncodePrompt().encode(model=par, prompt=PROMPT, negative_prompt=NEGATIVE)
    (latent,) = fv.FastVideoSampler().sample(model=par, positive=pos, negative=neg, steps=STEPS, cfg=G_HIGH,
                                             shift=SHIFT, scheduler="unipc", seed=3, cfg_gate=1.0,
                                             teacache_threshold=0.0, boundary=BOUNDARY, cfg_low=G_LOW, **SIZE)
    close(latent["samples"], _run(a14b_gen, _a14b_settings()))


# ----------------------------------------------------------------------------- on 2 GPUs (the lead runs these)

@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_two_gpus_equal_one_gpu(i2v_gen, a14b_gen, picture):
    """NCCL, fp32: I2V and A14B (both resident, then swapped from pinned memory) on 2 GPUs give the
    one-GPU latents."""
    from fastvideo_nodes.pipeline.generator import VideoGenerator as Gen

    def cuda(gen, **kw):
        return Gen(gen.files, device="cuda", dtype="fp32", attention_backend="TORCH_SDPA", **kw)

    def near(got, want):
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()

    i2v_settings = SamplingSettings(**SIZE, steps=3, seed=7)
    one, two = cuda(i2v_gen), cuda(i2v_gen, num_gpus=2)
    try:
        near(_run(two, i2v_settings, picture), _run(one, i2v_settings, picture))
    finally:
        one.close()
    large = _a14b_settings(height=64, width=96, num_frames=9)
    one = cuda(a14b_gen)
    try:
        want = _run(one, large)
        swap_gb = _budget_between(a14b_gen.files.model, _a14b_settings(), large) / planner.GiB
        for gb, mode in ((None, "resident"), (swap_gb, "swap")):
            two = cuda(a14b_gen, num_gpus=2, gpu_memory_gb=gb)
            stats = SamplingStats()
            near(_run(two, large, stats=stats), want)
            assert stats.extra["experts"] == mode
            two.close()
    finally:
        one.close()
