"""A small persistent pool of sequence-parallel workers behind one process (ComfyUI's).

One process per GPU (gloo workers on CPU, for tests), started once and kept across prompts. Each
loads the DiT itself from the same file; the text encoder and VAE stay in the caller's process.
Tensors (noise, text embeddings, result latents) travel as torch shared-memory tensors; control
messages are small. Rank 0 reports progress; a cancel flag is agreed on by all ranks every step;
a worker that raises or dies becomes a FastVideoError naming its rank, and the pool is torn down
so the next run starts fresh. Workers exit when their parent goes away.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from multiprocessing.connection import wait
from typing import TYPE_CHECKING

import torch
import torch.multiprocessing as mp

from ..errors import CancelledError, FastVideoError

if TYPE_CHECKING:
    from ..pipeline.options import LoadOptions

# NVLink multicast stays off in every worker (it can take shared GPUs out of service).
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerPool:
    def __init__(self, model_path: str, *, num_gpus: int, options: LoadOptions | None = None,
                 gpu_ids: list[int] | None = None, start_timeout: float = 600.0, **load_keywords):
        """options: how each worker loads the DiT (device, precision, weight_storage); its fields,
        and the older dtype=/weight_dtype=/fp8_matmul=, may also be given as keywords."""
        from ..loading.dit import read_dit_config
        from ..pipeline.options import LoadOptions
        from .ulysses import check_degree
        options = LoadOptions.from_keywords(options, **load_keywords)
        check_degree(read_dit_config(model_path).num_heads, num_gpus)
        device = options.torch_device
        if device.type == "cuda":
            ids = gpu_ids if gpu_ids is not None else list(range(num_gpus))
            if len(ids) != num_gpus or max(ids, default=0) >= torch.cuda.device_count():
                raise FastVideoError(f"num_gpus {num_gpus} with gpu_ids {ids}: {torch.cuda.device_count()} GPUs are "
                                     "visible here.")
            devices = [f"cuda:{i}" for i in ids]
        else:
            devices = ["cpu"] * num_gpus
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.cancel_flag = ctx.Event()  # shared at start: events cannot travel in messages
        self.conns, self.procs = [], []
        for rank, dev in enumerate(devices):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, name=f"fastvideo-worker-{rank}", daemon=True,
                            args=(rank, num_gpus, port, dev, model_path, options, child, os.getpid(),
                                  self.cancel_flag))
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self.last_traceback: dict[int, str] = {}
        try:
            self._collect("ready", timeout=start_timeout)
        except BaseException:
            self.close()
            raise

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def _collect(self, kind: str, timeout: float | None = None, on_progress=None, cancel=None):
        """Wait until every rank sent `kind`; returns rank 0's payload. Raises on error or death."""
        pending = set(range(len(self.conns)))
        result = interrupt = None
        deadline = None if timeout is None else time.time() + timeout
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        while pending:
            ready = wait([self.conns[r] for r in pending] + list(sentinels), timeout=0.2)
            for obj in ready:
                if obj in sentinels:
                    r = sentinels[obj]
                    if r in pending or kind == "ready":
                        self._fail(r, f"worker rank {r} died (exit code {self.procs[r].exitcode})")
                    continue
                r = self.conns.index(obj)
                try:
                    msg = obj.recv()
                except EOFError:  # usually the process just died: say so, with its exit code
                    self.procs[r].join(timeout=1.0)
                    self._fail(r, f"worker rank {r} died (exit code {self.procs[r].exitcode})")
                if msg[0] == "progress":
                    if on_progress is not None:
                        on_progress(*msg[1:])
                elif msg[0] == "error":
                    self.last_traceback[r] = msg[2]
                    if msg[1] == "cancelled":
                        pending.discard(r)
                        result = CancelledError(msg[2])
                    else:
                        self._fail(r, f"worker rank {r} failed: {msg[1]}\n{msg[2]}")
                elif msg[0] == kind:
                    pending.discard(r)
                    if r == 0:
                        result = msg[1]
            if cancel is not None and not self.cancel_flag.is_set():  # after this round's progress callbacks
                try:
                    if cancel():
                        self.cancel_flag.set()
                except BaseException as e:  # ComfyUI's interrupt raises: stop the ranks, re-raise after
                    interrupt = e
                    self.cancel_flag.set()
            if deadline is not None and time.time() > deadline:
                self._fail(min(pending), f"worker rank {min(pending)} did not answer within {timeout:.0f} s")
        if interrupt is not None:
            raise interrupt
        if isinstance(result, CancelledError):
            raise result
        return result

    def _fail(self, rank: int, message: str):
        for p in self.procs:  # a rank stuck in a collective will not stop by itself
            p.kill()
        self.close()
        raise FastVideoError(message + " (the worker pool was stopped; the next run starts a new one)")

    def sample(self, noise, positive, negative, settings, *, callback=None, cancel=None, stats=None,
               attention_backend=None, attention_options=None):
        """Run the sampler on every rank; returns model-space latents [1,16,T',H',W'] float32 (CPU)."""
        if not self.alive:
            raise FastVideoError("the worker pool is not running; create a new one.")
        self.cancel_flag.clear()
        shared = [t.detach().float().contiguous().share_memory_() if t is not None else None
                  for t in (noise, positive, negative)]
        job = dict(settings=settings, noise=shared[0], positive=shared[1], negative=shared[2],
                   attention_backend=attention_backend, attention_options=attention_options or {})
        for c in self.conns:
            c.send(("sample", job))
        latents, counts = self._collect("done", on_progress=callback, cancel=cancel)
        if stats is not None:
            for k, v in counts.items():
                setattr(stats, k, v)
        return latents.clone()

    def close(self):
        for c in self.conns:
            try:
                c.send(("stop", None))
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for c in self.conns:
            c.close()
        self.conns, self.procs = [], []
        self.cancel_flag = None  # releases its named semaphores in /dev/shm

    def __del__(self):
        if getattr(self, "procs", None):
            self.close()


# ----------------------------------------------------------------------------- worker side

def _watch_parent(parent_pid: int):
    """Exit when the parent (ComfyUI) is gone, even if it was killed."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _worker_main(rank, world, port, device, model_path, options, conn, parent_pid, flag):
    os.environ.update(WORKER_ENV)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        import torch.distributed as dist

        from ..loading.dit import load_dit
        from ..pipeline.sampler import SamplingStats, denoise
        from .ulysses import UlyssesPlan

        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, device_id=device if device.type == "cuda" else None)
        dit = load_dit(model_path, device=device, dtype=options.dtype, weight_dtype=options.weight_dtype,
                       fp8_matmul=options.fp8_matmul)
        plan = UlyssesPlan()
        conn.send(("ready", None))
    except BaseException as e:
        conn.send(("error", repr(e), traceback.format_exc()))
        return
    while True:
        try:
            cmd, job = conn.recv()  # idle workers block here: no spinning
        except (EOFError, OSError):
            break
        if cmd == "stop":
            break
        try:
            def cancel():  # all ranks take the same decision, or the next collective would hang
                t = torch.tensor([1.0 if flag.is_set() else 0.0], device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                return bool(t.item())

            progress = (lambda i, n, x0: conn.send(("progress", i, n, None))) if rank == 0 else None
            stats = SamplingStats()
            with torch.inference_mode():
                out = denoise(dit, job["noise"], job["positive"], job["negative"], job["settings"],
                              attention_backend=job["attention_backend"], attention_options=job["attention_options"],
                              callback=progress, cancel=cancel, parallel=plan, stats=stats)
            result = out.float().cpu().share_memory_() if rank == 0 else None
            counts = dict(cond_forwards=stats.cond_forwards, uncond_forwards=stats.uncond_forwards,
                          teacache_skipped=stats.teacache_skipped)
            conn.send(("done", (result, counts)))
        except CancelledError as e:
            conn.send(("error", "cancelled", str(e)))
        except BaseException as e:
            conn.send(("error", repr(e)[:500], traceback.format_exc()))
    try:
        import torch.distributed as dist
        dist.destroy_process_group()
    except Exception:
        pass
