"""Sequence-parallel workers on CPU (gloo): same latents as one process, progress, cancel, crashes, leaks."""
import os
import signal
import threading
import time

import pytest
import torch

from fastvideo_nodes.errors import CancelledError, FastVideoError
from fastvideo_nodes.loading.dit import load_dit
from fastvideo_nodes.parallel import WorkerPool
from fastvideo_nodes.pipeline.sampler import SamplingSettings, SamplingStats, denoise, initial_noise

PROMPTS = (torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(0)),
           torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1)))


def shm_entries():
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def children():
    import multiprocessing
    return {p.pid for p in multiprocessing.active_children()}


@pytest.mark.parametrize("kw", [dict(), dict(num_frames=9, height=16, width=48),  # 9 tokens: padded to 10
                                dict(cfg_gate=0.5), dict(teacache_threshold=3.0, teacache_coefficients=[1.0, 0.0])])
def test_degree_two_equals_one_process(pool, dit_file, kw):
    s = SamplingSettings(**{**dict(height=32, width=48, num_frames=5, steps=4), **kw})
    ref_stats, par_stats = SamplingStats(), SamplingStats()
    with torch.no_grad():
        ref = denoise(load_dit(dit_file), initial_noise(s), *PROMPTS, s, stats=ref_stats)
    out = pool.sample(initial_noise(s), *PROMPTS, s, stats=par_stats)
    # fp32 on CPU: each worker runs fewer threads than this process, so sums may be added in
    # another order (seen as ~1e-5 on a 32-core host, where the CFG gate scales the cached δ by g−1).
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 2e-5 * scale, (err, scale)
    assert (par_stats.uncond_forwards, par_stats.teacache_skipped) == (ref_stats.uncond_forwards,
                                                                       ref_stats.teacache_skipped)


def test_progress_every_step_and_cancel_within_one(pool):
    s = SamplingSettings(height=128, width=128, num_frames=9, steps=6)  # steps long enough to see the boundary
    seen = []
    pool.sample(initial_noise(s), *PROMPTS, s, callback=lambda i, n, x0: seen.append((i, n)))
    assert seen == [(i, 6) for i in range(1, 7)]
    seen.clear()
    with pytest.raises(CancelledError):
        pool.sample(initial_noise(s), *PROMPTS, s, callback=lambda i, n, x0: seen.append(i),
                    cancel=lambda: len(seen) >= 2)
    assert 2 <= len(seen) <= 3  # the flag is seen at the next step boundary
    assert pool.alive  # a cancel is not a failure: the workers stay up
    assert pool.sample(initial_noise(s), *PROMPTS, s).shape == (1, 16, 3, 16, 16)


def test_degree_must_divide_heads(dit_file):
    with pytest.raises(FastVideoError, match="does not divide the model's 2 attention heads.*\\[1, 2\\]"):
        WorkerPool(dit_file, num_gpus=3, device="cpu", dtype=torch.float32)


def test_killed_worker_is_a_clear_error_and_next_run_works(dit_file):
    from fastvideo_nodes.pipeline.generator import ModelFiles, VideoGenerator
    gen = VideoGenerator(ModelFiles(dit_file), device="cpu", num_gpus=2)
    s = SamplingSettings(height=64, width=96, num_frames=9, steps=1000)  # long enough to be killed mid-run
    shm_before = shm_entries()
    victim = gen.pool().procs[1].pid
    threading.Timer(1.0, lambda: os.kill(victim, signal.SIGKILL)).start()
    start = time.time()
    with pytest.raises(FastVideoError, match=r"worker rank 1 died at step \d+ of 1000 \(killed by SIGKILL\)"):
        gen.sample(*PROMPTS, s)
    assert time.time() - start < 1.0 + 5.0
    assert shm_entries() <= shm_before
    short = SamplingSettings(height=32, width=48, num_frames=5, steps=2)
    assert gen.sample(*PROMPTS, short).shape == (1, 16, 2, 4, 6)  # a fresh pool
    gen.close()


def test_twenty_runs_leak_nothing(pool):
    s = SamplingSettings(height=32, width=48, num_frames=5, steps=1)
    pool.sample(initial_noise(s), *PROMPTS, s)
    shm, procs = shm_entries(), children()
    for seed in range(20):
        s.seed = seed
        pool.sample(initial_noise(s), *PROMPTS, s)
    assert shm_entries() <= shm and children() == procs
