"""Block offload: run a DiT whose blocks do not all fit on the GPU.

The first `blocks_on_gpu` blocks and everything outside the blocks live on the GPU; the other
blocks' weights live in pinned CPU memory. Before an offloaded block runs, its weights are already
on their way: each block starts the copy of the next offloaded block on a side stream, so the
transfer overlaps the current block's compute. The copies land in a ring of two flat device
buffers (slots) allocated once: per-block tensors, freed on another stream than the one that
allocated them, piled up in torch's caching allocator (a 14B run at a 24 GiB budget reserved 11 GiB
over what it used). The model code is untouched: this works through forward hooks on the blocks.

Weights already in pinned memory (a planner.PinnedHome's, as Wan2.2 A14B's idle expert rests in)
are used where they lie: no copy, no second pin, and the resident part comes over with
non-blocking copies, so starting an offload from a pinned home costs one host-to-device copy.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ..errors import FastVideoError

SLOTS = 2  # blocks on the device at once: the one running and the next, on its way


def block_bytes(block: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(block.parameters()) + list(block.buffers()))


def activation_bytes(dim: int, ffn_dim: int, tokens: int) -> int:
    """Rough peak of one block's activations at bf16 with an fp32 residual stream."""
    return tokens * (6 * 4 * dim + 2 * 2 * ffn_dim)


def host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """t in host memory, pinned when `pin`: t itself when it already is (no copy, no second pin),
    else one copy straight into (pinned) host memory."""
    if t.device.type == "cpu" and (t.is_pinned() or not pin):
        return t
    if not pin:
        return t.to("cpu")
    return torch.empty_like(t, device="cpu", pin_memory=True).copy_(t)


def device_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`: a fresh copy from host memory (non-blocking when pinned; on a CPU device too,
    so the module never writes through to its host tensors), t itself when already there."""
    return t.to(device, non_blocking=t.is_pinned(), copy=t.device.type == "cpu")


def plan_blocks(dit, budget_gb: float, tokens: int = 32760) -> int:
    """How many blocks fit on the GPU within `budget_gb`, keeping room for activations and two
    blocks in flight."""
    per_block = block_bytes(dit.blocks[0])
    rest = sum(t.numel() * t.element_size() for n, t in dit.state_dict().items() if not n.startswith("blocks."))
    free = budget_gb * 2**30 - rest - activation_bytes(dit.cfg.dim, dit.cfg.ffn_dim, tokens) - 2 * per_block
    return max(0, min(len(dit.blocks), int(free // per_block)))


class BlockOffload:
    def __init__(self, dit, device, blocks_on_gpu: int):
        self.device = torch.device(device)
        self.blocks = list(dit.blocks)
        self.resident = max(0, min(blocks_on_gpu, len(self.blocks)))
        self.offloaded = self.blocks[self.resident:]
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        # Home copies of the offloaded weights (pinned, so copies can run asynchronously); weights
        # already pinned are kept as they are, so a PinnedHome and this offload share one storage.
        self.home: dict[int, list[tuple[nn.Parameter, torch.Tensor]]] = {}
        for i, block in enumerate(self.offloaded):
            pairs = []
            for p in block.parameters():
                pairs.append((p, host_copy(p.data, cuda)))
                p.data = pairs[-1][1]
            self.home[i] = pairs
        away = {id(p) for pairs in self.home.values() for p, _ in pairs}
        for p in dit.parameters():  # everything else, and the resident blocks, to the device
            if id(p) not in away:
                p.data = device_copy(p.data, self.device)
        moved: dict[int, torch.Tensor] = {}  # a buffer shared by several modules stays one tensor
        for mod in dit.modules():
            for name, b in mod._buffers.items():
                if b is not None:
                    if id(b) not in moved:
                        moved[id(b)] = device_copy(b, self.device)
                    mod._buffers[name] = moved[id(b)]
        # One slot per block in flight (the running one and the next); every block's tensors at the
        # same 256-byte-aligned offsets, so a block fits any slot.
        self.offsets = [_offsets([cpu for _, cpu in self.home[i]]) for i in self.home]
        size = max((offs[-1] for offs in self.offsets), default=0)
        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device)
                      for _ in range(min(SLOTS, len(self.offloaded)))]
        self.slot_free: list[torch.cuda.Event | None] = [None] * len(self.slots)  # its last block's kernels done
        self.slot_views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.next_slot = 0
        self.running: int | None = None  # the slot of the block running now
        self.in_flight: dict[int, tuple[int, list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.hooks: list = []
        # The hooks hold this object weakly: blocks → hook → offload → blocks would be a cycle that
        # keeps every weight alive until the garbage collector runs, after the owner let go.
        me = weakref.ref(self)
        for i, block in enumerate(self.offloaded):
            self.hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: _call(me, "_before", i)))
            self.hooks.append(block.register_forward_hook(lambda m, a, o, i=i: _call(me, "_after", i)))

    def describe(self) -> str:
        return (f"block offload: {self.resident} of {len(self.blocks)} DiT blocks on {self.device}, "
                f"{len(self.offloaded)} streamed from pinned CPU memory")

    def _fetch(self, i: int) -> None:
        """Start copying offloaded block i into the next slot (side stream on CUDA)."""
        if i in self.in_flight or i >= len(self.offloaded):
            return
        slot = self.next_slot
        if slot == self.running:  # one slot: no room to prefetch, fetched when the block runs
            return
        self.next_slot = (slot + 1) % len(self.slots)
        views = self._views(i, slot)
        if self.stream is None:
            for view, (_, cpu) in zip(views, self.home[i]):
                view.copy_(cpu)
            self.in_flight[i] = (slot, views, None)
            return
        with torch.cuda.stream(self.stream):
            free = self.slot_free[slot]
            if free is not None:  # the slot's previous block must have finished
                self.stream.wait_event(free)
            for view, (_, cpu) in zip(views, self.home[i]):
                view.copy_(cpu, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.in_flight[i] = (slot, views, event)

    def _views(self, i: int, slot: int) -> list[torch.Tensor]:
        """Block i's tensors laid out in `slot`, made once per (block, slot): the fetch runs per block per step."""
        views = self.slot_views.get((i, slot))
        if views is None:
            buf = self.slots[slot]
            views = self.slot_views[i, slot] = [buf[o:o + cpu.numel() * cpu.element_size()].view(cpu.dtype)
                                                .view(cpu.shape) for o, (_, cpu) in zip(self.offsets[i], self.home[i])]
        return views

    def _before(self, i: int) -> None:
        if i not in self.in_flight:  # first run, or a run broken off (cancel): start the ring afresh
            self.in_flight.clear()
            self.running = None
            self._fetch(i)
        slot, views, event = self.in_flight.pop(i)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        for (p, _), t in zip(self.home[i], views):
            p.data = t
        self.running = slot
        self._fetch((i + 1) % len(self.offloaded))  # overlap the next copy with this block

    def _after(self, i: int) -> None:
        for p, cpu in self.home[i]:
            p.data = cpu
        if self.stream is not None and self.running is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self.slot_free[self.running] = done
        self.running = None

    def drop_prefetched(self) -> None:
        """Forget copies fetched ahead (the next run's first streamed block): after weights changed in
        place (a LoRA merge), they would hold the old values."""
        self.in_flight.clear()

    def disable(self, to=None) -> None:
        """Remove the hooks and put every offloaded block on `to` (default: the device); to="cpu"
        leaves them in host memory, e.g. before planning again or releasing the model."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.in_flight.clear()
        if self.stream is not None:
            self.stream.synchronize()  # a prefetch may still write a slot that is about to be freed
        self.slots, self.slot_free, self.slot_views = [], [], {}
        to = self.device if to is None else torch.device(to)
        for i in self.home:
            for p, cpu in self.home[i]:
                p.data = cpu if to.type == "cpu" else cpu.to(to)
        self.home = {}


def _offsets(tensors: list[torch.Tensor], align: int = 256) -> list[int]:
    """Byte offsets of the tensors packed in one buffer, each aligned; the last entry is the size."""
    offs, at = [], 0
    for t in tensors:
        offs.append(at)
        at += -(-t.numel() * t.element_size() // align) * align
    return offs + [at]


def _call(ref: weakref.ref, method: str, i: int) -> None:
    offload = ref()
    if offload is not None and offload.hooks:
        getattr(offload, method)(i)


def enable_block_offload(dit, *, device, blocks_on_gpu: int | None = None, budget_gb: float | None = None,
                         tokens: int = 32760) -> BlockOffload:
    """Offload DiT blocks to pinned CPU memory. With neither argument, fit the GPU's free memory."""
    device = torch.device(device)
    if blocks_on_gpu is None:
        if budget_gb is None:
            if device.type != "cuda":
                raise FastVideoError("block offload on CPU needs blocks_on_gpu (there is no GPU memory to fit).")
            budget_gb = torch.cuda.mem_get_info(device)[0] / 2**30
        blocks_on_gpu = plan_blocks(dit, budget_gb, tokens)
    return BlockOffload(dit, device, blocks_on_gpu)


def out_of_memory_error(e: BaseException, phase: str | None = None) -> FastVideoError:
    """A CUDA out-of-memory error as a message that names the settings to change; phase: what was
    running ("loading", "encoding the prompts", "sampling", "decoding")."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    where = f" while {phase}" if phase else ""
    return FastVideoError(f"the GPU ran out of memory{where}. Settings that lower the peak: a smaller "
                          "gpu_memory_gb (more DiT blocks streamed from CPU memory), weight_storage fp8 (half "
                          "the DiT's memory), text_encoder_device cpu (encode prompts on the CPU), decoding in "
                          "tiles (tile_size 32), or a lower resolution or num_frames. "
                          f"({first})")
