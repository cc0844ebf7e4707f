"""A small persistent pool of sequence-parallel workers behind one process (ComfyUI's).

One process per GPU (gloo workers on CPU, for tests), started once and kept across prompts. Each
loads the DiT itself from the same file (Wan2.2 A14B: both experts); the text, CLIP and VAE encoders
stay in the caller's process. Tensors (noise, text embeddings, Wan2.1 I2V's image condition and CLIP
tokens, result latents) travel as torch shared-memory tensors; control messages are small.

Why it is built this way:
- Every message carries its job id. A job the caller abandoned (its callback raised, Ctrl-C) is
  cancelled and its late messages are dropped, so a result can never reach the wrong request.
- One lock: two threads calling `sample` take turns instead of mixing their messages.
- Cancel travels as a message that each rank reads at its step boundary; all ranks then agree on it
  with one all-reduce. No multiprocessing Event, Lock or Queue is used: under the spawn context those
  are named semaphores in /dev/shm that outlive a killed parent.
- Each rank says what it is doing (loading, step i of n) and a side thread beats while it is busy.
  A rank that makes no progress for `step_timeout` seconds ends the job with an error naming it,
  and the pool is stopped; the beat tells a frozen rank from one waiting on a frozen peer.
- LoRAs travel with each job as a list of (path, strength) (two experts: one list each); a rank
  whose DiT carries another list merges this one (loading/lora.py, in place, base kept) before
  sampling. The ranks agree with one all-reduce whether every merge worked, so a LoRA that does not
  fit is an error for this job only and the pool stays up.
- Wan2.2 A14B: each rank holds both experts and the same denoise() switches between them
  (pipeline/experts.py). Whether both stay on the device is decided per job by the one-process rule
  for the worker's part of the work (see `expert_placement`); otherwise they swap from host memory.
- A worker that raises becomes one line (rank, what it was doing, cause); its traceback goes to a log
  file under cache_dir()/logs whose path the message gives. Workers ignore Ctrl-C (the parent
  decides), and exit quietly when the parent goes away.
"""
from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import signal
import socket
import threading
import time
import traceback
import weakref
from multiprocessing.connection import wait
from typing import TYPE_CHECKING

import torch
import torch.multiprocessing as mp

from .. import env
from ..errors import CancelledError, FastVideoError

if TYPE_CHECKING:
    from ..pipeline.options import LoadOptions

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.25  # a busy worker's side thread beats this often
KEEP_LOGS = 20      # newest worker traceback files kept under cache_dir()/logs

_live_pools: weakref.WeakSet = weakref.WeakSet()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_step_timeout() -> float | None:
    raw = env.get("FASTVIDEO_STEP_TIMEOUT")
    try:
        value = float(raw)
    except ValueError:
        raise FastVideoError(f"FASTVIDEO_STEP_TIMEOUT must be a number of seconds (0: no limit), "
                             f"got {raw!r}.") from None
    return value if value > 0 else None


def _exit_status(proc) -> str:
    proc.join(timeout=2.0)  # the sentinel fires at exit; reap it so the exit code is known
    code = proc.exitcode
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _write_traceback(rank: int, text: str) -> str | None:
    """Keep a worker's traceback in a file; returns its path (None if it could not be written)."""
    try:
        folder = os.path.join(env.cache_dir(), "logs")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"worker-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-rank{rank}.log")
        with open(path, "w") as f:
            f.write(text)
        old = sorted((e for e in os.scandir(folder) if e.name.startswith("worker-")), key=lambda e: e.stat().st_mtime)
        for e in old[:-KEEP_LOGS]:
            os.remove(e.path)
        return path
    except OSError:
        log.exception("could not write the worker traceback file")
        return None


class _Rank:
    """What the parent knows about one worker: what it last said it was doing, and when."""

    def __init__(self, now: float, doing: str):
        self.doing = doing
        self.seen = self.moved = now  # last message of any kind / last progress


class WorkerPool:
    def __init__(self, model_path: str, *, num_gpus: int, options: LoadOptions | None = None,
                 gpu_ids: list[int] | None = None, start_timeout: float = 600.0, step_timeout: float | None = None,
                 low_noise_model: str | None = None, **load_keywords):
        """options: how each worker loads the DiT (device, precision, weight_storage, gpu_memory_gb);
        its fields, and the older dtype=/weight_dtype=/fp8_matmul=, may also be given as keywords.
        low_noise_model: Wan2.2 A14B's low-noise expert (model_path is the high-noise one); every
        rank loads both.
        step_timeout: seconds a rank may spend on one step before the job fails and the pool stops
        (None: FASTVIDEO_STEP_TIMEOUT; 0: no limit). start_timeout: the same for starting and loading."""
        from ..loading.dit import read_dit_config
        from ..pipeline.options import LoadOptions
        from .ulysses import check_degree
        options = LoadOptions.from_keywords(options, **load_keywords)
        cfg = read_dit_config(model_path)
        check_degree(cfg.num_heads, num_gpus)
        if low_noise_model is not None:
            from ..pipeline.experts import check_pair
            check_pair(cfg, read_dit_config(low_noise_model), model_path, low_noise_model)
        self.two_experts = low_noise_model is not None
        self.step_timeout = _default_step_timeout() if step_timeout is None else (step_timeout or None)
        self.start_timeout = start_timeout
        device = options.torch_device
        if device.type == "cuda":
            ids = gpu_ids if gpu_ids is not None else list(range(num_gpus))
            if len(ids) != num_gpus or max(ids, default=0) >= torch.cuda.device_count():
                raise FastVideoError(f"num_gpus {num_gpus} with gpu_ids {ids}: {torch.cuda.device_count()} GPUs are "
                                     "visible here.")
            devices = [f"cuda:{i}" for i in ids]
        else:
            devices = ["cpu"] * num_gpus
        self._lock = threading.RLock()
        self._jobs = itertools.count(1)
        self._unfinished: int | None = None  # an abandoned job whose end was not seen yet
        self.last_traceback: dict[int, str] = {}
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.conns, self.procs = [], []
        for rank, dev in enumerate(devices):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, name=f"fastvideo-worker-{rank}", daemon=True,
                            args=(rank, num_gpus, port, dev, model_path, low_noise_model, options, child,
                                  os.getpid()))
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        _live_pools.add(self)
        with self._lock:
            try:
                self._wait_job(0, start_timeout)
            except BaseException:
                self._stop(graceful=False)
                raise

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    # ------------------------------------------------------------------ running a job

    def sample(self, noise, positive, negative, settings, *, callback=None, cancel=None, stats=None,
               attention_backend=None, attention_options=None, loras=(), exact_attention_steps=0,
               first_frame=None, condition=None, image_embeds=None, loras_low=()):
        """Run the sampler on every rank with these (path, strength) LoRAs merged into each rank's
        DiT; returns model-space latents [1,C,T',H',W'] float32 (CPU). first_frame: a Wan2.2 TI2V
        image condition (pipeline/ti2v.FirstFrame), sent with the job. condition [1,20,T',H',W'] and
        image_embeds [1,I,1280] (or None): Wan2.1 I2V's image inputs, as sampler.denoise takes them;
        every rank gets all of both (the condition joins the latents before the tokens are split,
        the CLIP tokens join the text, which cross-attention reads whole on every rank).
        loras_low: with two experts, the (path, strength) LoRAs of the low-noise one (`loras` are the
        high-noise one's).
        stats.extra["experts"]: with two experts, where the ranks kept them ("resident" or "swap")."""
        if loras_low and not self.two_experts:
            raise FastVideoError("loras_low: only a two-expert model (Wan2.2 A14B, with low_noise_model) has a "
                                 "low-noise expert; give the LoRAs as loras.")
        with self._lock:  # one job at a time: messages of two callers must not mix
            if self._unfinished is not None:
                self._drain()
            if not self.alive:
                raise FastVideoError("the worker pool is not running; create a new one.")
            shared = [t.detach().float().contiguous().share_memory_() if t is not None else None
                      for t in (noise, positive, negative, condition, image_embeds)]
            job_id = next(self._jobs)
            job = dict(settings=settings, noise=shared[0], positive=shared[1], negative=shared[2],
                       attention_backend=attention_backend, attention_options=attention_options or {},
                       loras=[(str(p), float(s)) for p, s in loras], exact_attention_steps=exact_attention_steps,
                       first_frame=first_frame, condition=shared[3], image_embeds=shared[4],
                       loras_low=[(str(p), float(s)) for p, s in loras_low])
            self._unfinished = job_id
            self._send_all(("sample", job_id, job))
            try:
                latents, counts = self._wait_job(job_id, self.step_timeout, on_progress=callback, cancel=cancel)
            except BaseException:
                # Still running (the caller's callback or cancel raised, or Ctrl-C): end the job first.
                # A job the ranks cancelled is over already; a failed one stopped the pool.
                if self.procs and self._unfinished == job_id:
                    self._abandon(job_id)
                raise
        if stats is not None:
            extra = {k: counts.pop(k) for k in ("lora_s", "experts") if counts.get(k) is not None}
            for k, v in counts.items():
                setattr(stats, k, v)
            stats.extra.update(extra)
        return latents.clone()

    def _send_all(self, msg):
        for r, c in enumerate(self.conns):
            try:
                c.send(msg)
            except (OSError, ValueError):
                self._fail(r, f"worker rank {r} died ({_exit_status(self.procs[r])})")
            except BaseException:  # interrupted half-way through a message: the pipe cannot be trusted
                self._stop(graceful=False)
                raise

    def _abandon(self, job_id: int):
        """Ask every rank to cancel `job_id` and wait for its end, so nothing of it is left behind."""
        if not self.procs:
            return
        log.info("job %d abandoned by the caller: cancelling it on the workers", job_id)
        try:
            self._send_all(("cancel", job_id))
            self._drain()
        except FastVideoError as e:  # the caller's own exception is the one to raise
            log.warning("while cancelling an abandoned job: %s", e)

    def _drain(self):
        """Wait for the abandoned job's last messages and drop them (a second Ctrl-C leaves it for later)."""
        try:
            self._wait_job(self._unfinished, self.step_timeout)
        except CancelledError:
            pass

    def _wait_job(self, job_id: int, timeout: float | None, on_progress=None, cancel=None):
        """Wait until every rank ended `job_id` (0: start-up); returns rank 0's payload.

        Raises CancelledError when the ranks cancelled, FastVideoError (pool stopped) when a rank
        failed, died or made no progress for `timeout` seconds."""
        n = len(self.procs)
        now = time.monotonic()
        ranks = [_Rank(now, "while starting" if job_id == 0 else "before step 1") for _ in range(n)]
        pending = set(range(n))
        result, cancelled, cancel_sent = None, None, False
        rejected: dict[int, str] = {}
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        conns = {c: r for r, c in enumerate(self.conns)}
        while pending:
            for obj in wait(list(conns) + list(sentinels), timeout=0.1):
                if obj in sentinels:
                    r = sentinels[obj]
                    if not self.conns[r].poll():  # read its last words (an error) before calling it dead
                        self._fail(r, f"worker rank {r} died {ranks[r].doing} ({_exit_status(self.procs[r])})")
                    continue
                r = conns[obj]  # type: ignore[index]  # wait() returns what it was given
                while self.procs and self.conns[r].poll():
                    msg = self._recv(r, ranks[r])
                    now = ranks[r].seen = time.monotonic()
                    if msg[1] != job_id:
                        continue  # a late message of an abandoned job (or a beat): dropped
                    kind = msg[0]
                    if kind == "doing":
                        ranks[r].doing, ranks[r].moved = msg[2], now
                    elif kind == "progress":
                        ranks[r].moved = now
                        if on_progress is not None:
                            on_progress(msg[2], msg[3], None)
                    elif kind in ("ready", "done"):
                        pending.discard(r)
                        if r == 0:
                            result = msg[2]
                    elif kind == "error":
                        _, _, what, text, tb = msg
                        self.last_traceback[r] = tb
                        if what == "cancelled":
                            pending.discard(r)
                            cancelled = CancelledError(text)
                        elif what == "rejected":  # every rank refused the job's inputs; the pool is fine
                            pending.discard(r)
                            rejected[r] = text
                        else:
                            where = _write_traceback(r, f"worker rank {r} {ranks[r].doing}: {text}\n\n{tb}")
                            seen = f"traceback in {where}" if where else "traceback in this process's log"
                            if not where:
                                log.error("worker rank %d traceback:\n%s", r, tb)
                            self._fail(r, f"worker rank {r} failed {ranks[r].doing}: {text} ({seen})")
            if cancel is not None and not cancel_sent and pending and cancel():  # after this round's callbacks
                self._send_all(("cancel", job_id))
                cancel_sent = True
            if timeout is not None and pending:
                self._check_deadline(ranks, pending, timeout)
        if job_id == self._unfinished:
            self._unfinished = None
        if rejected:
            own = [t for t in rejected.values() if t != _PEER_REJECTED]
            raise FastVideoError(own[0] if own else next(iter(rejected.values())))
        if cancelled is not None:
            raise cancelled
        return result

    def _recv(self, r: int, rank: _Rank):
        try:
            return self.conns[r].recv()
        except EOFError:
            self._fail(r, f"worker rank {r} died {rank.doing} ({_exit_status(self.procs[r])})")
        except Exception as e:  # e.g. a shared tensor whose sender died before it was fetched
            self._fail(r, f"worker rank {r} sent a message that could not be read {rank.doing}: {e!r}")
        except BaseException:  # Ctrl-C half-way through a message: the pipe cannot be trusted
            self._stop(graceful=False)
            raise

    def _check_deadline(self, ranks: list[_Rank], pending: set[int], timeout: float):
        now = time.monotonic()
        late = [r for r in sorted(pending) if now - ranks[r].moved > timeout]
        if not late:
            return
        # A frozen rank (SIGSTOP, swapped out, a hung driver call holding the GIL) stops beating; its
        # peers keep beating while they wait for it in a collective. Blame the silent one.
        silent_after = min(3.0, max(4 * HEARTBEAT_S, timeout / 2))
        silent = [r for r in sorted(pending) if now - ranks[r].seen > silent_after]
        if silent:
            r = silent[0]
            self._fail(r, f"worker rank {r} stopped responding {ranks[r].doing}: no sign of life for "
                          f"{now - ranks[r].seen:.1f} s (the step limit is {timeout:g} s)")
        states = ", ".join(f"rank {r} {ranks[r].doing}" for r in range(len(ranks)))
        self._fail(late[0], f"worker rank {late[0]} made no progress for {timeout:g} s {ranks[late[0]].doing} "
                            f"({states}): a deadlock or a collective that never completes? The step limit is "
                            "WorkerPool(step_timeout=...) or FASTVIDEO_STEP_TIMEOUT")

    def _fail(self, rank: int, message: str):
        self._stop(graceful=False)  # a rank stuck in a collective will not stop by itself
        raise FastVideoError(message + " (the worker pool was stopped; the next run starts a new one)")

    # ------------------------------------------------------------------ stopping

    def close(self):
        """Stop the workers (waits for a running job of another thread to end first)."""
        with self._lock:
            self._stop(graceful=True)

    def _stop(self, graceful: bool):
        procs, conns = self.procs, self.conns
        self.conns, self.procs = [], []
        self._unfinished = None
        if graceful:
            for c in conns:
                try:
                    c.send(("stop", None))
                except (OSError, ValueError):
                    pass
        for p in procs:
            if graceful:
                p.join(timeout=5)
            if p.is_alive():
                p.kill()  # also ends a SIGSTOPped process
        for p in procs:
            p.join(timeout=5)
        for c in conns:
            c.close()
        _live_pools.discard(self)

    def __del__(self):
        if getattr(self, "procs", None):
            self._stop(graceful=True)


@atexit.register
def _close_all():
    """At interpreter exit: let the workers leave their process group cleanly."""
    for pool in list(_live_pools):
        pool._stop(graceful=True)


# ----------------------------------------------------------------------------- worker side

class _Link:
    """The worker's end of the pipe: sends are serialised (main thread and beat thread share it) and
    a parent that went away ends the worker quietly instead of with a BrokenPipe traceback."""

    def __init__(self, conn, parent_pid: int):
        self.conn, self.parent_pid = conn, parent_pid
        self.lock = threading.Lock()
        self.inbox: collections.deque = collections.deque()
        self.job: int | None = 0  # the job being worked on (0: start-up), None when idle

    def send(self, msg):
        try:
            with self.lock:
                self.conn.send(msg)
        except (OSError, EOFError, ValueError):
            os._exit(0)

    def recv(self):
        if self.inbox:
            return self.inbox.popleft()
        try:
            return self.conn.recv()  # idle workers block here: no spinning
        except (OSError, EOFError):
            os._exit(0)

    def cancel_requested(self) -> bool:
        """Read what arrived during the job; True if it asked this job (or the worker) to stop."""
        stop = False
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                if msg[0] == "cancel":
                    stop = stop or msg[1] == self.job
                else:
                    self.inbox.append(msg)
                    stop = stop or msg[0] == "stop"
        except (OSError, EOFError):
            os._exit(0)
        return stop

    def beat_forever(self):
        """Side thread: a heartbeat while busy; exit when the parent is gone, even if it was killed."""
        while True:
            time.sleep(HEARTBEAT_S)
            if os.getppid() != self.parent_pid:
                os._exit(0)
            job = self.job
            if job is not None:
                self.send(("beat", job))


def _describe(e: BaseException) -> str:
    text = str(e) if isinstance(e, FastVideoError) else f"{type(e).__name__}: {e}"
    return text if len(text) <= 500 else text[:500] + "…"


def expert_placement(dit_bytes: int, activation_bytes: int, budget: int | None) -> str:
    """Where a rank keeps Wan2.2 A14B's two experts for one job: "resident" (both on the device) when
    the budget holds both DiTs, the job's sampling activations and the planner's reserve, else
    "swap" (one on the device at a time, the idle one in host memory).

    The one-process rule (the plan's peak plus a second DiT within the budget) for a worker, whose
    only tenant on its device is the DiT: the text encoder and VAE stay in the caller's process.
    Workers do not stream blocks, so a budget too small for both is "swap" whatever its size.
    budget None (a CPU device without gpu_memory_gb): nothing to plan, "resident"."""
    from ..memory.planner import DEFAULT_RESERVE
    if budget is None or 2 * dit_bytes + activation_bytes + DEFAULT_RESERVE <= budget:
        return "resident"
    return "swap"


class _Models:
    """A rank's DiT, or Wan2.2 A14B's two experts placed per job (see expert_placement)."""

    def __init__(self, device: torch.device, dit, low=None, budget: int | None = None):
        self.device, self.dit, self.low, self.budget = device, dit, low, budget
        self.experts = None

    def for_job(self, settings):
        """The model denoise() runs for this job: the DiT, or the experts placed for its video size."""
        if self.low is None:
            return self.dit
        from ..memory.planner import Components, DitSizes, VideoShape, sampling_activation_bytes
        from ..pipeline.experts import Experts
        sizes = Components(DitSizes.of(self.dit), vae_bytes=0, text_encoder_bytes=0)
        # The whole sequence's activations, though a rank keeps 1/N of the tokens between attention
        # calls: an estimate on the safe side.
        shape = VideoShape(settings.height, settings.width, settings.num_frames, vae_stride=settings.vae_stride)
        mode = expert_placement(sizes.dit.total, sampling_activation_bytes(sizes, shape), self.budget)
        if self.experts is None or self.experts.mode != mode:
            self.unplace()
            if mode == "resident":
                self.dit.to(self.device)  # Experts moves the low-noise one next to it
            self.experts = Experts(self.dit, self.low, device=self.device, mode=mode)
            log.info("%s", self.experts.describe())
        return self.experts

    def unplace(self) -> None:
        """Both experts to host memory, unplaced: the next job places them again."""
        if self.experts is not None:
            self.experts.release()
            self.experts = None


def _worker_main(rank, world, port, device, model_path, low_noise_model, options, conn, parent_pid):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    env.apply_worker_env()
    link = _Link(conn, parent_pid)
    threading.Thread(target=link.beat_forever, name="fastvideo-beat", daemon=True).start()
    try:
        import torch.distributed as dist

        from ..loading.dit import load_dit
        from .ulysses import UlyssesPlan

        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        link.send(("doing", 0, "while joining the process group"))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, device_id=device if device.type == "cuda" else None)
        budget = None
        if low_noise_model is not None and (device.type == "cuda" or options.gpu_memory_gb is not None):
            from ..memory.planner import budget_bytes
            budget = budget_bytes(device, gpu_memory_gb=options.gpu_memory_gb)  # before anything is loaded
        link.send(("doing", 0, "while loading the DiT"))
        dit = load_dit(model_path, device=device, dtype=options.dtype, weight_dtype=options.weight_dtype,
                       fp8_matmul=options.fp8_matmul)
        low = None
        if low_noise_model is not None:  # in host memory until the first job places the pair
            link.send(("doing", 0, "while loading the low-noise expert"))
            low = load_dit(low_noise_model, device="cpu", dtype=options.dtype, weight_dtype=options.weight_dtype,
                           fp8_matmul=options.fp8_matmul)
        models = _Models(device, dit, low, budget)
        plan = UlyssesPlan()
        link.send(("ready", 0, None))
    except BaseException as e:
        link.send(("error", 0, "failed", _describe(e), traceback.format_exc()))
        return
    link.job = None
    while True:
        msg = link.recv()
        if msg[0] == "stop":
            break
        if msg[0] != "sample":
            continue  # a cancel for a job that already ended
        link.job = msg[1]
        _run_job(link, rank, device, models, plan, msg[1], msg[2])
        link.job = None
    try:
        import torch.distributed as dist
        dist.destroy_process_group()
    except Exception:
        pass


_PEER_REJECTED = "another worker rank could not apply the job's LoRAs"


def _apply_loras(link: _Link, device, models: _Models, job_id: int, job: dict) -> float | None:
    """Make this rank's DiT carry exactly the job's `loras` (two experts: the high-noise one `loras`,
    the low-noise one `loras_low`); every rank learns whether all of them could.

    Returns the merge seconds (0 when nothing changed), or None when the job is refused (the
    message is sent). A FastVideoError (a LoRA that does not fit) refuses the job; anything else
    is raised after the agreement, as a worker failure."""
    import torch.distributed as dist

    from ..loading.lora import set_loras
    error: Exception | None = None
    seconds = 0.0
    wanted = [(models.dit, job.get("loras", []))] + ([(models.low, job.get("loras_low", []))] if models.low else [])
    changed = [(dit, loras) for dit, loras in wanted if list(getattr(dit, "loras", [])) != list(loras)]
    if changed:
        link.send(("doing", job_id, "while merging LoRAs"))
        try:
            if models.experts is not None and models.experts.homes is not None:
                # Merges write in place: they must reach the host copies, not device copies that the
                # next switch drops (and an fp8 scale they re-register is unknown to the old homes).
                models.unplace()
            for dit, loras in changed:
                seconds += set_loras(dit, loras).seconds
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as e:
            error = e
    failed = torch.tensor([0.0 if error is None else 1.0], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None and not isinstance(error, FastVideoError):
        raise error
    if bool(failed.item()):
        link.send(("error", job_id, "rejected", _describe(error) if error is not None else _PEER_REJECTED, ""))
        return None
    return seconds


def _run_job(link: _Link, rank: int, device, models: _Models, plan, job_id: int, job: dict):
    """One sampling job on this rank; every outcome is one message (its tensors die on return)."""
    import torch.distributed as dist

    from ..pipeline.sampler import SamplingStats, denoise
    n = job["settings"].num_steps
    steps_begun = 0

    def cancel():  # all ranks take the same decision, or the next collective would hang
        nonlocal steps_begun
        steps_begun += 1
        link.send(("doing", job_id, f"at step {steps_begun} of {n}"))
        t = torch.tensor([1.0 if link.cancel_requested() else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    try:
        lora_s = _apply_loras(link, device, models, job_id, job)
        if lora_s is None:
            return
        progress = (lambda i, total, x0: link.send(("progress", job_id, i, total))) if rank == 0 else None
        stats = SamplingStats()
        if models.low is not None:
            link.send(("doing", job_id, "while placing the two experts"))
        model = models.for_job(job["settings"])
        with torch.inference_mode():
            out = denoise(model, job["noise"], job["positive"], job["negative"], job["settings"],
                          attention_backend=job["attention_backend"], attention_options=job["attention_options"],
                          callback=progress, cancel=cancel, parallel=plan, stats=stats,
                          exact_attention_steps=job.get("exact_attention_steps", 0),
                          first_frame=job.get("first_frame"), condition=job.get("condition"),
                          image_embeds=job.get("image_embeds"))
        link.send(("doing", job_id, "while sending the result"))
        result = out.float().cpu().share_memory_() if rank == 0 else None
        counts = dict(cond_forwards=stats.cond_forwards, uncond_forwards=stats.uncond_forwards,
                      teacache_skipped=stats.teacache_skipped, lora_s=lora_s,
                      experts=None if models.experts is None else models.experts.mode)
        link.send(("done", job_id, (result, counts)))
    except CancelledError as e:
        link.send(("error", job_id, "cancelled", str(e), ""))
    except BaseException as e:
        link.send(("error", job_id, "failed", _describe(e), traceback.format_exc()))
