"""Wan2.2 A14B: two DiTs of one architecture sharing one denoise loop.

The high-noise expert runs the steps whose timestep t ≥ boundary·1000, the low-noise expert the
rest, each with its own guidance scale (as Wan2.2's reference and diffusers' `transformer_2` /
`boundary_ratio` / `guidance_scale_2`). The loop asks `Experts` which one serves a step; this
module also keeps only the expert in use on the GPU when both do not fit:

- "resident": both on the device (the plan has room for a second DiT), nothing moves;
- "swap": both live in (pinned) host memory (memory/planner.PinnedHome); at the switch the active
  one goes home first (free: its device copies are dropped), then the other is copied in;
- "stream": the plan streams DiT blocks; the active expert has the block offload
  (memory/offload.py), the idle one rests in its pinned home. The offload's streamed blocks are
  the home's own tensors, so at the switch the old expert's device copies are dropped (free) and
  the new one's offload starts from its home: one host-to-device copy of its resident part. (It
  used to re-pin the streamed blocks and copy the resident ones back: ~13 s a switch for a 14B.)

The homes live as long as this object. Weights only change by a LoRA merge, in place: into the
home itself for an expert at home, into device copies for the active one; a changed expert's
home is rebuilt from the module (models' `loras` differ from those seen) before it is used or
goes home, so a stale home never undoes a merge.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from ..errors import FastVideoError, ModelFileError

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000
HIGH, LOW = 0, 1


@dataclass(frozen=True)
class Preset:
    """Published sampling defaults (Wan-Video/Wan2.2 wan/configs/wan_*_A14B.py)."""
    boundary: float
    guidance_high: float
    guidance_low: float
    shift: float
    steps: int


# Wan2.2 lists sample_guide_scale as (low noise, high noise); these are named to avoid that trap.
T2V_A14B = Preset(boundary=0.875, guidance_high=4.0, guidance_low=3.0, shift=12.0, steps=40)
I2V_A14B = Preset(boundary=0.900, guidance_high=3.5, guidance_low=3.5, shift=5.0, steps=40)


def check_boundary(boundary, name: str = "boundary") -> float:
    """A boundary ratio strictly inside (0, 1): 0 or 1 would leave one expert without steps."""
    if isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not math.isfinite(boundary) \
            or not 0.0 < boundary < 1.0:
        raise FastVideoError(f"{name} must be a number between 0 and 1 (exclusive), the fraction of the "
                             f"timesteps where the high-noise expert hands over (Wan2.2 T2V: 0.875, I2V: 0.9), "
                             f"got {boundary!r}.")
    return float(boundary)


def folder_boundary(model: str) -> float | None:
    """boundary_ratio from a diffusers folder's model_index.json (None: no folder or not stated)."""
    from ..loading.files import read_json
    index = os.path.join(os.fspath(model), "model_index.json")
    if not os.path.isfile(index):
        return None
    value = read_json(index, "model_index.json", "the pipeline index").get("boundary_ratio")
    return None if value is None else check_boundary(value, f"{index}: boundary_ratio")


def check_pair(high_cfg, low_cfg, high_path: str, low_path: str) -> None:
    """The low-noise expert must be the high-noise one's twin: a Wan2.2 A14B pair of equal architecture."""
    name_high, name_low = os.path.basename(os.fspath(high_path)), os.path.basename(os.fspath(low_path))
    if high_cfg.in_channels == 48:
        raise ModelFileError(f"low_noise_model: {name_high!r} is Wan2.2 TI2V-5B, a single model; only Wan2.2 A14B "
                             "comes as two experts. Leave low_noise_model out.")
    if high_cfg.image_dim is not None:
        raise ModelFileError(f"low_noise_model: {name_high!r} is Wan2.1 image-to-video (it has CLIP image layers), "
                             "a single model; only Wan2.2 A14B comes as two experts. Leave low_noise_model out.")
    if high_cfg.dim == 1536:
        raise ModelFileError(f"low_noise_model: {name_high!r} is Wan2.1 1.3B, a single model; only Wan2.2 A14B "
                             "(wan2.2_t2v_high_noise_14B_*.safetensors) comes as two experts.")
    if high_cfg.in_channels not in (16, 36):
        raise ModelFileError(f"model: {name_high!r} takes {high_cfg.in_channels} input channels; Wan2.2 A14B's "
                             "experts take 16 (T2V) or 36 (I2V).")
    fields = ("dim", "ffn_dim", "num_heads", "num_layers", "in_channels", "out_channels", "text_dim",
              "patch_size", "image_dim", "gate_compress")
    diff = [f"{f} {getattr(high_cfg, f)} vs {getattr(low_cfg, f)}" for f in fields
            if getattr(high_cfg, f) != getattr(low_cfg, f)]
    if diff:
        raise ModelFileError(f"low_noise_model: {name_low!r} is not the twin of the high-noise expert "
                             f"{name_high!r} ({', '.join(diff)}); give the two experts of one Wan2.2 A14B release "
                             "(…_high_noise_14B_… and …_low_noise_14B_…).")


def preset_for(cfg) -> Preset:
    """Wan2.2's published defaults for this expert pair: I2V-A14B (36 input channels) or T2V-A14B."""
    return I2V_A14B if cfg.in_channels == 36 else T2V_A14B


def preset_defaults(cfg, guidance_scale: float | None, guidance_scale_low: float | None,
                    flow_shift: float | None) -> tuple[float | None, float | None, float | None]:
    """The unset ones of (guidance_scale, guidance_scale_low, flow_shift) from Wan2.2's preset. Both
    guidance scales unset: the preset's pair; only guidance_scale set: guidance_scale_low stays None,
    so the low-noise expert follows it (as diffusers)."""
    preset = preset_for(cfg)
    if guidance_scale is None:
        guidance_scale = preset.guidance_high
        guidance_scale_low = preset.guidance_low if guidance_scale_low is None else guidance_scale_low
    return guidance_scale, guidance_scale_low, preset.shift if flow_shift is None else flow_shift


def expert_settings(settings, model: str, two_experts: bool, cfg):
    """Sampling settings for this DiT (cfg, from `model`): with two experts the boundary filled in (the
    folder's boundary_ratio, else the preset's: T2V 0.875, I2V 0.9); with one, boundary and
    guidance_scale_low refused (they would silently do nothing)."""
    if not two_experts:
        for name in ("boundary", "guidance_scale_low"):
            if getattr(settings, name) is not None:
                raise FastVideoError(f"{name}: only a two-expert model (Wan2.2 A14B, loaded with "
                                     f"low_noise_model) takes it; {os.path.basename(model)!r} has "
                                     "one DiT. Leave it out.")
        return settings
    if settings.boundary is None:
        boundary = folder_boundary(model)
        settings = replace(settings, boundary=preset_for(cfg).boundary if boundary is None else boundary)
    return settings


def expert_per_step(timesteps: Iterable, boundary: float) -> list[int]:
    """HIGH or LOW for each step: the high-noise expert while t ≥ boundary·1000 (diffusers' rule, on the
    same integer timesteps)."""
    edge = boundary * NUM_TRAIN_TIMESTEPS
    return [HIGH if float(t) >= edge else LOW for t in timesteps]


class Experts:
    """The two DiTs and where they live; `use(k)` makes expert k the one on the device and returns it.
    switch_s: the seconds of each switch (the device synchronised on both sides)."""

    def __init__(self, high, low, *, device: torch.device, mode: str = "resident", blocks_on_gpu: int = 0,
                 offload=None):
        from ..memory.planner import PinnedHome
        if mode not in ("resident", "swap", "stream"):
            raise ValueError(f"unknown experts placement {mode!r}")
        self.models = (high, low)
        self.device, self.mode, self.blocks_on_gpu = torch.device(device), mode, blocks_on_gpu
        self.cfg = high.cfg
        self.active = HIGH
        self.switches = 0  # experts moved onto the device (swap and stream), for the log and tests
        self.switch_s: list[float] = []
        self.homes: list | None = None
        self.offloads = [offload, None]
        if mode == "resident":
            low.to(self.device)
        else:
            if offload is not None:  # the high expert's offload from loading: its pinned blocks join the home
                offload.disable(to="cpu")
            self.offloads = [None, None]
            self.homes = [PinnedHome(high), PinnedHome(low)]  # both at home until use()
            self.active = -1
        self.seen = [_weights(m) for m in self.models]

    @property
    def dtype(self) -> torch.dtype:
        return self.models[HIGH].dtype

    def parameters(self):
        return self.models[max(self.active, 0)].parameters()

    def describe(self) -> str:
        where = {"resident": "both resident on the device",
                 "swap": "one on the device at a time, the idle one in pinned host memory (swapped at the switch)",
                 "stream": f"blocks streamed ({self.blocks_on_gpu} resident) from each expert's pinned home, "
                           "the idle expert at home"}
        return f"Wan2.2 A14B experts: {where[self.mode]}"

    def use(self, k: int):
        """Expert k on the device (the other moved out first, so both are never there at once)."""
        if k == self.active or self.mode == "resident":
            if self.offloads[k] is not None and _weights(self.models[k]) != self.seen[k]:
                self.offloads[k].drop_prefetched()  # merged while active; its home is rebuilt when it leaves
            self.active = k
            return self.models[k]
        assert self.homes is not None
        self._sync()
        start = time.perf_counter()
        if self.active >= 0:
            self._go_home(self.active)
        self._refresh(k)  # merged while at home: a new fp8 scale would be unknown to the old home
        if self.mode == "swap":
            self.homes[k].to_device(self.device)
        else:
            from ..memory.offload import enable_block_offload
            self.offloads[k] = enable_block_offload(self.models[k], device=self.device,
                                                    blocks_on_gpu=self.blocks_on_gpu)
        self.active = k
        self.switches += 1
        self._sync()
        self.switch_s.append(time.perf_counter() - start)
        logger.info("expert switch: %s-noise expert on %s in %.2f s", "high" if k == HIGH else "low", self.device,
                    self.switch_s[-1])
        return self.models[k]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _go_home(self, k: int) -> None:
        """Expert k back in its home, its device copies dropped (a merge made on them kept)."""
        assert self.homes is not None
        if self.offloads[k] is not None:
            self.offloads[k].disable(to="cpu")  # the streamed blocks point at their pinned (home) tensors
            self.offloads[k] = None
        if not self._refresh(k):
            self.homes[k].to_host()

    def _refresh(self, k: int) -> bool:
        """Rebuild expert k's home from the module when its weights changed since the home was made:
        host tensors already pinned are kept (no copy), only device copies come back. True: rebuilt
        (the module is then at home)."""
        from ..memory.planner import PinnedHome
        assert self.homes is not None
        if _weights(self.models[k]) == self.seen[k]:
            return False
        self.homes[k] = PinnedHome(self.models[k])
        self.seen[k] = _weights(self.models[k])
        logger.info("%s-noise expert: weights changed (LoRA), its pinned home rebuilt", "high" if k == HIGH else "low")
        return True

    def release(self) -> None:
        """Everything to host memory (before the models are dropped, merged or placed again): the
        idle expert already is at home, the active one goes home."""
        if self.homes is not None:
            if self.active >= 0:
                self._go_home(self.active)
        else:
            for off in self.offloads:
                if off is not None:
                    off.disable(to="cpu")
            self.offloads = [None, None]
            for m in self.models:
                m.to("cpu")
        self.active = -1


def _weights(model) -> tuple:
    """What a model's weights are: the LoRAs merged into them (loading/lora.set_loras records them)."""
    return tuple(getattr(model, "loras", ()))
