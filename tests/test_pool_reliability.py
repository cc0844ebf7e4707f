"""The worker pool under abuse (CPU, gloo): aborted jobs never leak into later results, two threads
take turns, a frozen worker ends the job with an error naming it, worker errors are one line with
the traceback in a file, and a killed parent leaves nothing in /dev/shm and no worker behind."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from fastvideo_nodes.errors import CancelledError, FastVideoError
from fastvideo_nodes.loading.dit import load_dit
from fastvideo_nodes.parallel import WorkerPool
from fastvideo_nodes.pipeline.sampler import SamplingSettings, denoise, initial_noise
from fastvideo_nodes.testing.dit import TINY_DIT, random_dit, save_original

PROMPTS = (torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(0)),
           torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1)))
LONG = SamplingSettings(height=32, width=48, num_frames=5, steps=400)  # still running when aborted


def settings(seed: int) -> SamplingSettings:
    return SamplingSettings(height=32, width=48, num_frames=5, steps=3, seed=seed)


@pytest.fixture(scope="module")
def reference(dit_file):
    """In-process answers per seed: what any pool, fresh or not, must return."""
    dit, cache = load_dit(dit_file), {}

    def answer(seed):
        if seed not in cache:
            with torch.no_grad():
                cache[seed] = denoise(dit, initial_noise(settings(seed)), *PROMPTS, settings(seed))
        return cache[seed]
    return answer


def assert_answers(pool, reference, seeds):
    for seed in seeds:
        out = pool.sample(initial_noise(settings(seed)), *PROMPTS, settings(seed))
        ref = reference(seed)
        assert (out - ref).abs().max().item() <= 2e-5 * ref.abs().max().item(), seed  # fp32 sum order only


class Boom(Exception):
    pass


def raise_at(step, exc):
    def callback(i, n, x0):
        if i >= step:
            raise exc
    return callback


@pytest.mark.parametrize("abort", ["callback", "callback_fastvideo_error", "keyboard", "cancel", "cancel_raises"])
def test_aborted_job_never_answers_a_later_request(pool, reference, abort):
    seeds = [11, 12, 13]
    kw, expected = {
        "callback": (dict(callback=raise_at(2, Boom("preview failed"))), Boom),
        "callback_fastvideo_error": (dict(callback=raise_at(2, FastVideoError("a node's own check"))), FastVideoError),
        "keyboard": (dict(callback=raise_at(2, KeyboardInterrupt())), KeyboardInterrupt),
        "cancel": (dict(cancel=lambda: True), CancelledError),
        "cancel_raises": (dict(cancel=lambda: (_ for _ in ()).throw(Boom("interrupted"))), Boom),
    }[abort]
    with pytest.raises(expected):
        pool.sample(initial_noise(LONG), *PROMPTS, LONG, **kw)
    assert pool.alive  # an abort is not a failure: the same workers serve the next requests
    assert_answers(pool, reference, seeds)


def test_second_interrupt_while_draining_is_drained_by_the_next_run(pool, reference):
    """Ctrl-C twice: the first abort's drain is cut short too; the next request drains it first."""
    hits = []

    def callback(i, n, x0):
        hits.append(i)
        raise KeyboardInterrupt
    original = pool._drain

    def interrupted_drain():
        pool._drain = original
        raise KeyboardInterrupt
    pool._drain = interrupted_drain
    with pytest.raises(KeyboardInterrupt):
        pool.sample(initial_noise(LONG), *PROMPTS, LONG, callback=callback)
    assert pool._unfinished is not None and pool.alive
    assert_answers(pool, reference, [21, 22])
    assert pool._unfinished is None


def test_two_threads_each_get_their_own_latents(pool, reference):
    out, errors = {}, []

    def run(seeds):
        try:
            for seed in seeds:
                out[seed] = pool.sample(initial_noise(settings(seed)), *PROMPTS, settings(seed))
        except BaseException as e:  # reported by the main thread
            errors.append(e)
    threads = [threading.Thread(target=run, args=(seeds,)) for seeds in ([31, 32, 33], [41, 42, 43])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for seed, latents in out.items():
        ref = reference(seed)
        assert (latents - ref).abs().max().item() <= 2e-5 * ref.abs().max().item(), seed
    assert sorted(out) == [31, 32, 33, 41, 42, 43]


def test_frozen_worker_ends_the_job_naming_its_rank(dit_file):
    p = WorkerPool(dit_file, num_gpus=2, device="cpu", dtype=torch.float32, step_timeout=2.0)
    s = SamplingSettings(height=64, width=96, num_frames=9, steps=1000)
    victim = p.procs[1]
    threading.Timer(1.0, lambda: os.kill(victim.pid, signal.SIGSTOP)).start()
    start = time.monotonic()
    try:
        with pytest.raises(FastVideoError, match=r"worker rank 1 stopped responding at step \d+ of 1000: "
                                                 r"no sign of life .*pool was stopped"):
            p.sample(initial_noise(s), *PROMPTS, s)
        assert time.monotonic() - start < 1.0 + 2.0 + 5.0
        assert not p.alive and not victim.is_alive()  # killed (SIGKILL ends a stopped process) and reaped
        assert victim.exitcode == -signal.SIGKILL
    finally:
        if victim.is_alive():
            os.kill(victim.pid, signal.SIGCONT)
        p.close()


def test_step_error_is_one_line_with_the_traceback_in_a_file(dit_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVIDEO_CACHE", str(tmp_path))
    pool = WorkerPool(dit_file, num_gpus=2, device="cpu", dtype=torch.float32)
    s = settings(0)
    bad_noise = torch.zeros(1, 15, 2, 4, 6)  # 15 channels: the DiT's patch embedding raises
    with pytest.raises(FastVideoError) as info:
        pool.sample(bad_noise, *PROMPTS, s)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert re.match(r"worker rank ([01]) failed at step 1 of 3: RuntimeError: .*16 channels", message), message
    logs = list((tmp_path / "logs").glob(f"worker-*-rank{message[12]}.log"))  # both ranks fail; the first is told
    assert len(logs) == 1 and str(logs[0]) in message
    assert "Traceback (most recent call last)" in logs[0].read_text()
    assert not pool.alive


def test_load_error_names_rank_and_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVIDEO_CACHE", str(tmp_path))
    weights = random_dit(TINY_DIT, seed=2).state_dict()
    del weights["blocks.0.ffn.0.bias"]  # the config still reads from the header; only the workers' load fails
    broken = save_original(weights, str(tmp_path / "incomplete.safetensors"), dtype=None)
    with pytest.raises(FastVideoError) as info:
        WorkerPool(broken, num_gpus=2, device="cpu", dtype=torch.float32)
    message = str(info.value)
    assert "\n" not in message, message
    assert re.match(r"worker rank [01] failed while loading the DiT: Diffusion model 'incomplete.safetensors': "
                    r"the file lacks 1 tensors .*blocks.0.ffn.0.bias", message), message
    assert "traceback in " + str(tmp_path / "logs") in message


def test_killed_worker_reports_its_signal(dit_file):
    p = WorkerPool(dit_file, num_gpus=2, device="cpu", dtype=torch.float32)
    threading.Timer(0.5, lambda: os.kill(p.procs[0].pid, signal.SIGKILL)).start()
    with pytest.raises(FastVideoError, match=r"worker rank 0 died at step \d+ of 1000 \(killed by SIGKILL\)"):
        p.sample(initial_noise(LONG), *PROMPTS, SamplingSettings(height=64, width=96, num_frames=9, steps=1000))
    p.close()


PARENT = textwrap.dedent("""
    import sys, torch
    from fastvideo_nodes.parallel import WorkerPool
    from fastvideo_nodes.pipeline.sampler import SamplingSettings, initial_noise
    p = WorkerPool(sys.argv[1], num_gpus=2, device="cpu", dtype=torch.float32)
    print(" ".join(str(w.pid) for w in p.procs), flush=True)
    s = SamplingSettings(height=32, width=48, num_frames=5, steps=1000)
    ctx = torch.randn(1, 12, 32)
    p.sample(initial_noise(s), ctx, ctx, s, callback=lambda i, n, x0: i == 3 and print("running", flush=True))
""")


def mapped_shm(pids) -> set[str]:
    """Names in /dev/shm these processes map and that still exist (a named semaphore is mapped while open).

    /dev/shm is shared with whatever else runs on the machine, so a bare before/after count could blame
    us for another process's semaphores; what our own processes map is ours."""
    names = set()
    for pid in pids:
        with open(f"/proc/{pid}/maps") as f:
            names |= {line.split("/dev/shm/")[1].strip() for line in f
                      if "/dev/shm/" in line and "(deleted)" not in line}
    return names


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for init counts as gone
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc and /dev/shm (Linux)")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "SIGKILL to the process group"])
def test_killed_parent_leaves_nothing_behind(dit_file, how):
    """Named semaphores (what mp.Event/Lock/Queue are under spawn) outlive a group kill, which takes
    multiprocessing's resource tracker too: so nothing named may exist in /dev/shm even while the pool
    runs. Workers must exit by themselves, without a traceback on stderr."""
    proc = subprocess.Popen([sys.executable, "-c", PARENT, dit_file], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.getcwd()}, start_new_session=True)
    try:
        workers = [int(x) for x in proc.stdout.readline().split()]
        assert len(workers) == 2
        assert proc.stdout.readline().strip() == "running"
        ours = mapped_shm([proc.pid, *workers])
        assert not ours  # nothing named exists while it runs: nothing can outlive a kill
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        elif how == "SIGKILL":
            proc.send_signal(signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)  # EOF once the workers (holding stderr too) have exited
        deadline = time.monotonic() + 10
        while not all(gone(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(w) for w in workers)
        assert "Traceback" not in err and "BrokenPipe" not in err and "leaked" not in err, err
    finally:  # a failed check must not leave the run going (it has its own session, hence its own group)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
