"""The memory planner: one place that decides what lives on the GPU.

Measured on an H200, moving the 10.6 GiB UMT5-XXL to the GPU and back for every prompt cost 19 s
a call, and a 14B run on a 24 GiB budget died inside prompt encoding because the encoder was moved
next to the resident DiT blocks. Both came from each component deciding for itself. Here the
decision is made once per load, from sizes alone (bytes), so it is tested on CPU:

- everything fits (weights plus the largest phase's activations): everything stays resident and
  nothing moves between calls;
- otherwise residency goes by priority: the DiT first (as many blocks as fit, the rest streamed
  from pinned memory by memory/offload.py), then the VAE (else moved in for decoding), then the text
  encoder (else moved in from pinned memory for encoding, else run on the CPU);
- a set that does not fit even with every DiT block streamed is a FastVideoError naming settings
  that would fit;
- Wan2.2 A14B's second expert (a whole second DiT) is the last to become resident: until both fit,
  one expert is on the GPU at a time, the idle one in pinned host memory, swapped at the boundary
  (two host-to-device copies a run), or, when even one does not fit, the active one's blocks stream.

The plans form one ladder ordered by GPU use, and the planner takes the highest rung that fits, so
every decision is monotone in the budget. The module also holds `PinnedHome`, which moves a
module's weights between pinned host memory and the GPU (the "on demand" placement).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from ..errors import FastVideoError
from .offload import SLOTS, activation_bytes, block_bytes, device_copy, host_copy

log = logging.getLogger(__name__)

GiB = 2**30
Placement = Literal["resident", "on_demand", "cpu"]
ExpertsMode = Literal["resident", "swap", "stream"]  # pipeline/experts.Experts' modes
_EXPERTS_LINE = {"resident": "both experts (high and low noise) resident",
                 "swap": "one expert on the GPU at a time (high noise, then low noise), the idle one in pinned "
                         "host memory, swapped at the boundary",
                 "stream": "the active expert's blocks streamed (high noise, then low noise), the idle one in "
                           "host memory"}
_RANK = {"cpu": 0, "on_demand": 1, "resident": 2}

# Headroom for what the estimates leave out: allocator fragmentation, cuBLAS/attention workspaces.
DEFAULT_RESERVE = GiB // 2


# ---------------------------------------------------------------------------------------------
# Inputs: sizes of the components and of the requested video


@dataclass(frozen=True)
class DitSizes:
    block_bytes: int  # one transformer block (all blocks are alike)
    num_blocks: int
    other_bytes: int  # embeddings, head: always resident when the DiT is on the GPU
    dim: int
    ffn_dim: int

    @property
    def total(self) -> int:
        return self.other_bytes + self.num_blocks * self.block_bytes

    @classmethod
    def of(cls, dit) -> DitSizes:
        """Sizes of a built DiT (any device, meta included)."""
        per_block = block_bytes(dit.blocks[0])
        total = sum(t.numel() * t.element_size() for t in list(dit.parameters()) + list(dit.buffers()))
        return cls(per_block, len(dit.blocks), total - per_block * len(dit.blocks), dit.cfg.dim, dit.cfg.ffn_dim)

    def fp8(self) -> DitSizes:
        """The same DiT with its block weights stored as fp8 (half of bf16)."""
        return replace(self, block_bytes=self.block_bytes // 2)


@dataclass(frozen=True)
class Components:
    dit: DitSizes
    vae_bytes: int
    text_encoder_bytes: int
    text_dim: int = 4096  # UMT5-XXL d_model
    vae_base_dim: int = 96
    dit_low: DitSizes | None = None  # Wan2.2 A14B: the low-noise expert (dit is the high-noise one)

    @property
    def active_dit(self) -> DitSizes:
        """The DiT to plan one-on-the-GPU placements for: the larger expert (their files may differ in
        dtype), or the only DiT."""
        return self.dit if self.dit_low is None or self.dit.total >= self.dit_low.total else self.dit_low

    @property
    def idle_dit_bytes(self) -> int:
        """Bytes of the expert that is not active_dit (0 with one DiT)."""
        if self.dit_low is None:
            return 0
        return min(self.dit.total, self.dit_low.total)


@dataclass(frozen=True)
class VideoShape:
    height: int = 480
    width: int = 832
    num_frames: int = 81
    vae_stride: int = 8  # pixels per latent pixel: 8 (Wan 2.1 VAE, 16 channels) or 16 (Wan 2.2, 48)

    @property
    def tokens(self) -> int:
        """DiT tokens: latent (T'=(F-1)/4+1, H/s, W/s), patched by (1, 2, 2)."""
        k = 2 * self.vae_stride
        return ((self.num_frames - 1) // 4 + 1) * (self.height // k) * (self.width // k)


def sampling_activation_bytes(c: Components, shape: VideoShape) -> int:
    """One DiT forward's peak (offload.activation_bytes: one block at bf16, fp32 residual), block 0's
    self-attention output that a step's two CFG passes share (bf16), and the sampler's fp32 latents (x,
    noise prediction, CFG delta and scheduler history: ~8 copies)."""
    s = shape.vae_stride
    channels = 48 if s == 16 else 16
    latent = channels * ((shape.num_frames - 1) // 4 + 1) * (shape.height // s) * (shape.width // s) * 4
    return activation_bytes(c.dit.dim, c.dit.ffn_dim, shape.tokens) + 2 * c.dit.dim * shape.tokens + 8 * latent


def decode_activation_bytes(c: Components, shape: VideoShape, tile: int | None = None) -> int:
    """The VAE decodes one latent frame (4 video frames) at a time; the peak is about 14 live
    feature maps of base_dim channels at 2 bytes for that chunk at full resolution (or one tile of
    `tile` latent pixels; calibrated on diffusers' 4.65 GiB peak at 480x832 with weights and
    output), plus the whole decoded video in fp32."""
    pixels = shape.height * shape.width
    work = pixels if tile is None else min(shape.height, 8 * tile) * min(shape.width, 8 * tile)
    return 14 * 4 * work * c.vae_base_dim * 2 + shape.num_frames * 3 * pixels * 4


def encode_activation_bytes(c: Components, text_len: int = 512, heads: int = 64) -> int:
    """UMT5 on one prompt of 512 tokens: a few fp32 hidden states and one layer's attention scores."""
    return 16 * text_len * c.text_dim * 4 + heads * text_len * text_len * 4


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    dit_blocks_resident: int
    dit_blocks: int
    vae: Placement  # "resident" or "on_demand"
    text_encoder: Placement
    peak: int  # expected peak GPU bytes over encode / sample / decode
    # Two experts (Wan2.2 A14B): "resident" both on the GPU; "swap" one at a time, the idle one in
    # pinned host memory; "stream" the active one's blocks streamed. None: one DiT.
    experts: ExpertsMode | None = None

    @property
    def all_resident(self) -> bool:
        return (self.dit_blocks_resident == self.dit_blocks and self.vae == "resident"
                and self.text_encoder == "resident" and self.experts in (None, "resident"))

    @property
    def dit_blocks_streamed(self) -> int:
        return self.dit_blocks - self.dit_blocks_resident

    def describe(self) -> str:
        """One line for the log."""
        if self.all_resident:
            what = "everything resident" + (", " + _EXPERTS_LINE["resident"] if self.experts else "")
        else:
            te = {"resident": "resident", "on_demand": "moved in from pinned memory to encode",
                  "cpu": "on the CPU"}[self.text_encoder]
            what = (f"DiT {self.dit_blocks_resident}/{self.dit_blocks} blocks resident"
                    f"{f', {self.dit_blocks_streamed} streamed' if self.dit_blocks_streamed else ''}; "
                    f"VAE {'resident' if self.vae == 'resident' else 'moved in to decode'}; text encoder {te}")
            if self.experts is not None:
                what += "; " + _EXPERTS_LINE[self.experts]
        return f"memory plan: {what}; expected peak {self.peak / GiB:.1f} of {self.budget / GiB:.1f} GiB"


def _peak(c: Components, shape: VideoShape, k: int, vae: Placement, te: Placement, tile: int | None = None,
          both_experts: bool = False) -> int:
    """Largest GPU use over the three phases for one configuration (both_experts: the second expert
    resident next to the first)."""
    d = c.active_dit
    streaming = k < d.num_blocks
    resident = d.other_bytes + k * d.block_bytes + (c.vae_bytes if vae == "resident" else 0)
    resident += c.idle_dit_bytes if both_experts else 0
    resident += c.text_encoder_bytes if te == "resident" else 0
    # Streamed blocks land in the offload's two slots, allocated for as long as it streams: every phase.
    resident += SLOTS * d.block_bytes if streaming else 0
    encode = resident + (c.text_encoder_bytes if te == "on_demand" else 0) + (
        encode_activation_bytes(c) if te != "cpu" else 0)
    sample = resident + sampling_activation_bytes(c, shape)
    decode = resident + (c.vae_bytes if vae != "resident" else 0) + decode_activation_bytes(c, shape, tile)
    return max(encode, sample, decode)


def _ladder(c: Components, shape: VideoShape, tile: int | None):
    """Configurations (blocks, VAE, text encoder, both experts) from least to most GPU use, peaks
    non-decreasing: DiT blocks one by one, then the VAE, then the text encoder on demand, then
    resident, then (two experts) the second expert. The text encoder is on demand from the first
    rung when it fits in the room the other phases need anyway (it is gone before sampling)."""
    free_te = encode_activation_bytes(c) + c.text_encoder_bytes <= max(
        sampling_activation_bytes(c, shape), decode_activation_bytes(c, shape, tile))
    low: Placement = "on_demand" if free_te else "cpu"
    n = c.active_dit.num_blocks
    for k in range(n + 1):
        yield k, "on_demand", low, False
    yield n, "resident", low, False
    yield n, "resident", "on_demand", False
    yield n, "resident", "resident", False
    if c.dit_low is not None:
        yield n, "resident", "resident", True


def _experts_mode(c: Components, k: int, both: bool) -> ExpertsMode | None:
    if c.dit_low is None:
        return None
    return "resident" if both else "stream" if k < c.active_dit.num_blocks else "swap"


def plan_memory(c: Components, shape: VideoShape, budget: int, *, reserve: int = DEFAULT_RESERVE,
                text_encoder_on_cpu: bool = False, decode_tile: int | None = None) -> MemoryPlan:
    """The most resident plan whose expected peak plus `reserve` fits in `budget` bytes.

    text_encoder_on_cpu: the user asked for CPU encoding; the encoder then never takes GPU memory.
    decode_tile: the VAE's spatial tile size in latent pixels, when decoding in tiles.
    """
    best = None
    for k, vae, te, both in _ladder(c, shape, decode_tile):
        if text_encoder_on_cpu:
            te = "cpu"
        peak = _peak(c, shape, k, vae, te, decode_tile, both)
        if peak + reserve > budget:
            break
        best = MemoryPlan(budget, k, c.active_dit.num_blocks, vae, te, peak, _experts_mode(c, k, both))
    if best is None:
        raise _does_not_fit(c, shape, budget, reserve, decode_tile)
    return best


def lowest_plan(c: Components, shape: VideoShape, budget: int, *, decode_tile: int | None = None) -> MemoryPlan:
    """The plan with the least GPU use (every DiT block streamed, VAE moved in to decode, text
    encoder on the CPU), for a budget the estimates say is too small: the run is tried anyway."""
    return MemoryPlan(budget, 0, c.active_dit.num_blocks, "on_demand", "cpu",
                      _peak(c, shape, 0, "on_demand", "cpu", decode_tile), _experts_mode(c, 0, False))


def peak_of(plan: MemoryPlan, c: Components, shape: VideoShape, decode_tile: int | None = None) -> int:
    """The expected peak of an existing plan's placement for another video shape."""
    return _peak(c, shape, plan.dit_blocks_resident, plan.vae, plan.text_encoder, decode_tile,
                 plan.experts == "resident")


def _does_not_fit(c: Components, shape: VideoShape, budget: int, reserve: int, tile: int | None) -> FastVideoError:
    def fits(c: Components = c, shape: VideoShape = shape, tile: int | None = tile) -> bool:
        return _peak(c, shape, 0, "on_demand", "cpu", tile) + reserve <= budget

    need = _peak(c, shape, 0, "on_demand", "cpu", tile) + reserve
    ideas = [f"a budget of at least {need / GiB:.1f} GiB (gpu_memory_gb)"]
    for t in (64, 32, 16):
        if (tile is None or t < tile) and fits(tile=t):
            ideas.append(f"decoding in tiles (tile_size={t})")
            break
    frames = next((f for f in range(shape.num_frames - 4, 0, -4) if fits(shape=replace(shape, num_frames=f))), None)
    if frames is not None:
        ideas.append(f"num_frames={frames} at this size")
    for scale in (0.75, 0.5):  # same aspect, multiples of 16
        h, w = int(shape.height * scale) // 16 * 16, int(shape.width * scale) // 16 * 16
        if h and w and fits(shape=VideoShape(h, w, shape.num_frames, shape.vae_stride)):
            ideas.append(f"{w}x{h}")
            break
    if fits(c=replace(c, dit=c.dit.fp8(), dit_low=c.dit_low and c.dit_low.fp8())):
        ideas.append("weight_storage fp8")
    return FastVideoError(
        f"the GPU memory budget of {budget / GiB:.1f} GiB is too small for a {shape.width}x{shape.height}, "
        f"{shape.num_frames}-frame video even with every DiT block streamed from CPU memory and the text "
        f"encoder on the CPU (needs about {need / GiB:.1f} GiB). What would fit: " + "; ".join(ideas) + ".")


def budget_bytes(device, *, gpu_memory_gb: float | None = None, free_bytes: int | None = None) -> int:
    """The budget to plan for: the user's gpu_memory_gb, else what the caller measured free (e.g.
    ComfyUI's view), else the device's free memory now."""
    if gpu_memory_gb is not None:
        if gpu_memory_gb <= 0:
            raise FastVideoError(f"gpu_memory_gb must be positive (got {gpu_memory_gb}); leave it unset to use "
                                 "the GPU's free memory.")
        return int(gpu_memory_gb * GiB)
    if free_bytes is not None:
        return int(free_bytes)
    device = torch.device(device)
    if device.type != "cuda":
        raise FastVideoError(f"memory planning needs a CUDA device or gpu_memory_gb (device is {device}).")
    return torch.cuda.mem_get_info(device)[0]


# Beyond torch's allocator the process holds the CUDA context (0.55 GiB when a plan is made on an
# H200 under CUDA 13) and, later, lazily loaded kernel modules and library handles: an A14B run
# planned for 24 − 0.8 GiB peaked at 24.65 GiB on the card, so they grew by at least 1.15 GiB.
LAZY_MARGIN = 3 * GiB // 2


def card_budget(device, card_bytes: int) -> int:
    """The user's gpu_memory_gb is for the whole card: what torch may plan for is that less what
    the card holds outside torch's allocator now (CUDA context, other processes) less LAZY_MARGIN.
    A budget they would take more than half of is planned as given, with a warning: at that size
    it is a request to stream all that can be streamed (the tests force placements this way), not
    a card.

    The allocator is not capped: torch keeps freed blocks cached, so on a card larger than the
    budget the reserved memory can exceed it (a 14B planned for 24 GiB: 21.4 allocated, 32.2
    reserved on an H200). On a card of the budget's size the allocator frees that cache and retries
    instead; with the card emulated (allocator capped) the same run peaked at 24.2 GiB, as fast."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    outside = max(0, total - free - torch.cuda.memory_reserved(device)) + LAZY_MARGIN
    if 2 * outside > card_bytes:
        log.warning("gpu_memory_gb %.1f GiB: the card holds %.1f GiB outside torch (with a margin for kernels "
                    "loaded later), more than half of it; planning with it as given", card_bytes / GiB,
                    outside / GiB)
        return card_bytes
    log.info("gpu_memory_gb: planning for %.1f of the %.1f GiB budget (%.1f GiB held outside torch: CUDA "
             "context, other processes, kernels)", (card_bytes - outside) / GiB, card_bytes / GiB, outside / GiB)
    return card_bytes - outside


def placement_rank(p: Placement) -> int:
    """cpu < on_demand < resident: more GPU use ranks higher (for monotonicity checks)."""
    return _RANK[p]


# ---------------------------------------------------------------------------------------------
# Moving a module between pinned host memory and the GPU


class PinnedHome:
    """Keeps a module's weights in (pinned, when CUDA is present) host memory and swaps device
    copies in and out. Weights are only read during inference, so going home drops the device
    copies instead of copying back: `to_host()` is free and `to_device()` is one non-blocking
    host-to-device copy per tensor."""

    def __init__(self, module: nn.Module):
        self.module = module
        pin = torch.cuda.is_available()
        # (owner, name, key, host tensor); key groups tied weights so they stay one tensor.
        self.home: list[tuple[nn.Module, str, int, torch.Tensor]] = []
        seen: dict[int, torch.Tensor] = {}
        for owner in module.modules():
            for table in (owner._parameters, owner._buffers):
                for name, t in table.items():
                    if t is not None:
                        if id(t) not in seen:  # already pinned (e.g. a block offload's): kept, not copied
                            seen[id(t)] = host_copy(t.detach(), pin)
                        self.home.append((owner, name, id(t), seen[id(t)]))
        self.device = torch.device("cpu")
        self.to_host()

    @property
    def nbytes(self) -> int:
        unique = {key: t for _, _, key, t in self.home}
        return sum(t.numel() * t.element_size() for t in unique.values())

    @staticmethod
    def _set(owner: nn.Module, name: str, t: torch.Tensor) -> None:
        param = owner._parameters.get(name)
        if param is not None:
            param.data = t
        else:
            owner._buffers[name] = t

    def to_device(self, device) -> None:
        """Copy the weights to `device` (non-blocking from pinned memory; the copies are ordered on
        the current stream, so kernels launched after this see them). Always fresh copies, on CPU
        too, so the home tensors are never written through the module."""
        device = torch.device(device)
        copies: dict[int, torch.Tensor] = {}
        for owner, name, key, host in self.home:
            if key not in copies:
                copies[key] = device_copy(host, device)
            self._set(owner, name, copies[key])
        self.device = device

    def to_host(self) -> None:
        """Point the module back at its host copies; the device copies are freed."""
        for owner, name, _, host in self.home:
            self._set(owner, name, host)
        self.device = torch.device("cpu")
        drop = getattr(self.module, "drop_device_caches", None)  # e.g. the DiT's RoPE tables
        if drop is not None:
            drop()
