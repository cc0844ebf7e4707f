"""What lives where: the loaded parts placed by the memory plan (memory/planner.py decides).

A `Placement` is the generator's view of one set of shared parts (pipeline/components.Parts): it
sizes the parts from their file headers, asks the planner for a plan for a video shape (again only
when a shape does not fit the plan in force), puts each part where the plan says after loading
(resident on the GPU, a pinned host copy moved in per phase, or DiT blocks streamed), and moves
parts when a new plan puts them elsewhere. The state (plan, sizes, budget, pinned homes, block
offload, memory host) lives in the Parts, so every generator on them sees one placement.
"""
from __future__ import annotations

import contextlib
import logging
import re

import torch

from ..errors import FastVideoError
from .offload import enable_block_offload, out_of_memory_error
from .planner import (
    DEFAULT_RESERVE,
    Components,
    DitSizes,
    PinnedHome,
    VideoShape,
    budget_bytes,
    card_budget,
    decode_activation_bytes,
    encode_activation_bytes,
    lowest_plan,
    peak_of,
    plan_memory,
    sampling_activation_bytes,
)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def friendly_oom(phase: str | None = None):
    """CUDA out-of-memory → a FastVideoError naming the settings to change; the process stays usable."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        raise out_of_memory_error(e, phase) from None


def buffers_to(dit, device: torch.device) -> None:
    """Buffers live on the compute device, also in blocks whose weights stream from CPU memory; a
    LoRA merge may register a new fp8 scale next to a weight that rests in CPU memory."""
    for mod in dit.modules():
        for key, b in mod._buffers.items():
            if b is not None and b.device != device:
                mod._buffers[key] = b.to(device)


def estimate_components(files, options, cfg) -> Components:
    """memory/planner.Components from the file headers: each tensor at the compute dtype's size,
    fp8 (one byte) where it will be stored as fp8 (2-D linear weights with fp8 storage, and
    tensors already fp8 in the file). A part without a file counts as zero."""
    from ..loading.files import all_keys
    from ..loading.locate import locate
    itemsize = torch.empty((), dtype=options.dtype).element_size()
    fp8 = options.weight_storage != "as_stored"

    def sizes(path, component, may_store_fp8=True):
        if path is None:
            return {}
        out = {}
        for name, entry in all_keys(locate(path, component).files, component).items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            shape = entry.get("shape", [])
            n = 1
            for d in shape:
                n *= int(d)
            stored_fp8 = str(entry.get("dtype", "")).startswith("F8")
            linear = len(shape) == 2 and name.endswith(".weight") and "embed" not in name and "shared" not in name
            out[name] = n * (1 if stored_fp8 or (fp8 and linear and may_store_fp8) else itemsize)
        return out

    def dit_sizes(path) -> DitSizes:
        block = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
        per_block: dict[int, int] = {}
        other = 0
        for name, n in sizes(path, "transformer").items():
            m = block.search(name)
            if m:
                per_block[int(m.group(1))] = per_block.get(int(m.group(1)), 0) + n
            else:
                other += n
        return DitSizes(max(per_block.values(), default=0), max(len(per_block), 1), other, cfg.dim, cfg.ffn_dim)

    te = sizes(files.text_encoder, "text_encoder")
    text_dim = 4096  # UMT5-XXL; else read from the embedding's width
    if files.text_encoder is not None:
        header = all_keys(locate(files.text_encoder, "text_encoder").files, "text_encoder")
        text_dim = next((int(header[k]["shape"][1]) for k in te if k.endswith("shared.weight")), text_dim)
    # The CLIP vision encoder (image-to-video) is placed with the text encoder: same phase. It is
    # loaded in the compute dtype (no fp8 storage).
    clip = sizes(files.image_encoder, "image_encoder", may_store_fp8=False) if cfg.image_dim is not None else {}
    # Wan2.2 A14B's low-noise expert, sized from its own file (the two may be stored in other dtypes).
    low = None if files.low_noise_model is None else dit_sizes(files.low_noise_model)
    return Components(dit_sizes(files.model), vae_bytes=sum(sizes(files.vae, "vae").values()),
                      text_encoder_bytes=sum(te.values()) + sum(clip.values()), text_dim=text_dim, dit_low=low)


class Placement:
    """Placement of `parts`, loaded from `files` with `options` (see the module docstring)."""

    def __init__(self, parts, files, options):
        from ..pipeline.options import parse_device
        self.parts = parts
        self.files = files
        self.options = options
        self.device = options.torch_device
        self.text_encoder_device = (parse_device(options.text_encoder_device, "text_encoder_device")
                                    if options.text_encoder_device else None)

    def _dit_config(self):
        if self.parts.dit is not None:
            return self.parts.dit.cfg
        from ..loading.dit import read_dit_config
        return read_dit_config(self.files.model)

    def sizes(self):
        """Sizes of the three parts from their file headers (no weights read), as the loaders will
        store them: compute dtype, fp8 linears with fp8 storage (and in files already fp8)."""
        if self.parts.sizes is None:
            self.parts.sizes = estimate_components(self.files, self.options, self._dit_config())
        return self.parts.sizes

    def budget(self) -> int | None:
        """GPU bytes to plan for (the user's gpu_memory_gb, else the host's view, else free memory),
        measured once per load; None on a CPU device without gpu_memory_gb (nothing to plan)."""
        parts = self.parts
        if parts.budget is None:
            if self.options.gpu_memory_gb is None and self.device.type != "cuda":
                return None
            free = parts.host.budget(self.device) if parts.host is not None else None
            budget = budget_bytes(self.device, gpu_memory_gb=self.options.gpu_memory_gb, free_bytes=free)
            if self.options.gpu_memory_gb is not None and self.device.type == "cuda":
                budget = card_budget(self.device, budget)  # the budget is for the whole card
            parts.budget = budget
        return parts.budget

    def text_encoder_elsewhere(self) -> bool:
        """The user put the encoder on another device than the main one (cpu, or another GPU)."""
        return self.text_encoder_device is not None and self.text_encoder_device != self.device

    def make_plan(self, shape: VideoShape, tile: int | None = None):
        budget = self.budget()
        if budget is None:
            return None
        sizes = self.sizes()
        on_cpu = self.text_encoder_elsewhere() or self.files.text_encoder is None
        try:
            return plan_memory(sizes, shape, budget, text_encoder_on_cpu=on_cpu, decode_tile=tile)
        except FastVideoError as e:
            if self.parts.host is None or not self.parts.host.minimal:
                logger.warning("%s Trying with the least GPU memory anyway.", e)
            return lowest_plan(sizes, shape, budget, decode_tile=tile)

    def prepare(self, shape: VideoShape, tile: int | None = None) -> None:
        """Plan (once per load) and place; plan again when this shape does not fit the current plan."""
        parts = self.parts
        if parts.plan is None:
            parts.plan = self.make_plan(shape, tile)
            if parts.plan is not None:
                logger.info("%s (for %dx%d, %d frames)", parts.plan.describe(), shape.width, shape.height,
                            shape.num_frames)
            return
        if peak_of(parts.plan, self.sizes(), shape, tile) + DEFAULT_RESERVE <= parts.plan.budget:
            return
        plan = self.make_plan(shape, tile)
        if plan is not None and plan != parts.plan:
            logger.info("%s (planned again for %dx%d, %d frames)", plan.describe(), shape.width, shape.height,
                        shape.num_frames)
            self.replace(plan)

    def replace(self, plan) -> None:
        """Move loaded parts to a new plan's places."""
        parts, old = self.parts, self.parts.plan
        parts.plan = plan
        if parts.experts is not None:  # placed again by the new plan at the next sampling
            parts.experts.release()
            parts.experts = None
            if parts.offload is not None:
                parts.offload.disable(to="cpu")
                parts.offload = None
            parts.dit.to("cpu")
            self.place_dit(parts.dit)
        if parts.dit is not None and plan.dit_blocks_resident != old.dit_blocks_resident:
            if parts.offload is not None:
                parts.offload.disable(to="cpu")
                parts.offload = None
            parts.dit.to("cpu")
            self.place_dit(parts.dit)
        for name, module in (("vae", parts.vae), ("text_encoder", parts.text_encoder and parts.text_encoder.model)):
            if module is not None and getattr(plan, name) != getattr(old, name):
                home = parts.homes.pop(name, None)
                if home is not None:
                    home.to_host()
                module.to("cpu")
                self.place(name, module)

    def where(self, name: str) -> str:
        """Placement of the text encoder or VAE: resident | on_demand | cpu (no plan: resident)."""
        plan = self.parts.plan
        if name == "text_encoder" and self.text_encoder_elsewhere():
            return "elsewhere"
        return "resident" if plan is None else getattr(plan, name)

    def load_device(self, name: str) -> torch.device:
        where = self.where(name)
        if where == "elsewhere":
            return self.text_encoder_device or self.device
        if where == "resident" and self.parts.host is None:
            return self.device
        return torch.device("cpu")

    def place(self, name: str, module) -> None:
        """After loading on load_device: keep pinned host copies for a part moved in per phase."""
        if self.device.type == "cpu" or self.parts.host is not None:
            return  # nothing to move on a CPU; the host makes its own copies
        if self.where(name) == "on_demand":
            self.parts.homes[name] = PinnedHome(module)
        elif self.where(name) == "resident":
            module.to(self.device)

    def place_dit(self, dit) -> None:
        plan = self.parts.plan
        if plan is not None and plan.dit_blocks_streamed:
            self.parts.offload = enable_block_offload(dit, device=self.device, blocks_on_gpu=plan.dit_blocks_resident)
            logger.info("%s", self.parts.offload.describe())
        else:
            dit.to(self.device)

    @contextlib.contextmanager
    def on_device(self, name: str, module, memory_required: int):
        """The part is on its compute device for the block: the host loads it, or its pinned home
        is copied in and dropped afterwards; a resident part is already there."""
        parts = self.parts
        if parts.host is not None and self.where(name) in ("resident", "on_demand") and self.device.type != "cpu":
            parts.host.use(module, self.device, name, memory_required)
            yield
            return
        home = parts.homes.get(name)
        if home is None:
            yield
            return
        home.to_device(self.device)
        try:
            yield
        finally:
            home.to_host()
            if self.device.type == "cuda":
                # Hand the part's blocks back: left cached, the next phase's differently sized
                # tensors stack on top (a 14B planned for 24 GiB used 33.8 on the card, 21.4 allocated).
                torch.cuda.empty_cache()

    def spare_gpu_bytes(self) -> int:
        """GPU bytes the plan leaves free at its peak, for copies such as the LoRA base backup; 0 when
        blocks stream (the room is the streaming's) or inside ComfyUI (its models may need it)."""
        plan = self.parts.plan
        if plan is None or plan.dit_blocks_streamed or self.parts.host is not None:
            return 0
        return max(0, plan.budget - plan.peak - DEFAULT_RESERVE)

    def vae_bytes_needed(self, shape: VideoShape, tile: int | None = None) -> int:
        """Activation bytes of a VAE pass over `shape`, to ask a memory host for (0 without a plan)."""
        return 0 if self.parts.plan is None else decode_activation_bytes(self.sizes(), shape, tile)

    def encoder_bytes_needed(self) -> int:
        """Activation bytes of a prompt encode, to ask a memory host for (0 without a plan)."""
        return 0 if self.parts.plan is None else encode_activation_bytes(self.sizes())

    def make_room_for_sampling(self, shape: VideoShape) -> None:
        """Ask the memory host (if any) to free what sampling `shape` needs: the activations plus,
        when blocks stream, the two blocks in flight."""
        plan, host = self.parts.plan, self.parts.host
        if host is not None and plan is not None:
            streamed = 2 * self.sizes().dit.block_bytes if plan.dit_blocks_streamed else 0
            host.before_sampling(self.device, sampling_activation_bytes(self.sizes(), shape) + streamed)

    def expert_mode(self) -> str:
        """How Wan2.2 A14B's two experts are placed: the plan's choice (planner.MemoryPlan.experts);
        "resident" without a plan (CPU)."""
        plan = self.parts.plan
        if plan is None:
            return "resident"
        return plan.experts or ("stream" if plan.dit_blocks_streamed else "swap")
