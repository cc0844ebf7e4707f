"""Soak: many runs in one process, and on the worker pool, leave resources flat.

Measured after warm-up runs (first runs fill caches: attention probes, allocator pools, the
resource sharer thread). Tolerances: RSS may grow by at most 48 MiB over the whole loop (allocator
fragmentation; a run's own tensors are far smaller, so this catches a retained model or pool,
not a retained latent); open file descriptors, threads, our /dev/shm mappings and child processes must be
exactly equal.
"""
import multiprocessing
import os

import pytest
import torch

from fastvideo_nodes.pipeline.generator import ModelFiles, VideoGenerator
from fastvideo_nodes.testing.dit import TINY_DIT, random_dit
from fastvideo_nodes.testing.dit import save_original as save_dit
from fastvideo_nodes.testing.text_encoder import random_umt5, save_comfy
from fastvideo_nodes.testing.vae import random_vae
from fastvideo_nodes.testing.vae import save_original as save_vae

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc (Linux)")
RSS_TOLERANCE = 48 << 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("soak")
    return ModelFiles(save_dit(random_dit(TINY_DIT, seed=3).state_dict(), str(d / "dit.safetensors"), dtype=None),
                      save_comfy(random_umt5(d_model=TINY_DIT.text_dim, seed=4), str(d / "te.safetensors"),
                                 dtype=torch.float32),
                      save_vae(random_vae(base_dim=8, seed=5).state_dict(), str(d / "vae.safetensors")))


def rss(pid="self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def children() -> set[int]:
    pids = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids |= {int(p) for p in f.read().split()}
    return pids


def shm_mapped(pid="self") -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split("/dev/shm/")[1].strip() for line in f if "/dev/shm/" in line and "(deleted)" not in line}


def snapshot(pids=()) -> dict:
    return dict(rss=[rss(), *(rss(p) for p in pids)], fds=len(os.listdir("/proc/self/fd")),
                threads=len(os.listdir("/proc/self/task")), shm=shm_mapped().union(*(shm_mapped(p) for p in pids)),
                children=children(), mp_children={p.pid for p in multiprocessing.active_children()})


def assert_flat(before: dict, after: dict):
    for a, b in zip(before["rss"], after["rss"]):
        assert b - a <= RSS_TOLERANCE, (before["rss"], after["rss"])
    for key in ("fds", "threads", "shm", "children", "mp_children"):
        assert after[key] == before[key], (key, before[key], after[key])


def run(gen: VideoGenerator, seed: int):
    out = gen.generate_video("a red fox in the snow", height=16, width=16, num_frames=1, num_inference_steps=2,
                             guidance_scale=1.0, seed=seed)  # the whole path (encode, sample, decode), kept small
    assert out.frames.shape == (1, 16, 16, 3) and torch.isfinite(out.frames).all()


def test_twenty_runs_in_process_stay_flat(files):
    gen = VideoGenerator(files, device="cpu")
    for seed in range(2):
        run(gen, seed)
    before = snapshot()
    for seed in range(20):
        run(gen, 100 + seed)
    assert_flat(before, snapshot())


@pytest.mark.slow
def test_five_runs_on_the_pool_stay_flat(files):
    gen = VideoGenerator(files, device="cpu", num_gpus=2)
    try:
        run(gen, 0)
        pool = gen.pool()
        workers = [p.pid for p in pool.procs]
        before = snapshot(workers)
        for seed in range(5):
            run(gen, 200 + seed)
        assert gen.pool() is pool  # the same workers served every run
        assert_flat(before, snapshot(workers))
    finally:
        gen.close()
    assert {p.pid for p in multiprocessing.active_children()}.isdisjoint(workers)
