"""LoRAs merged into a loaded Wan DiT: read, map onto our parameter names, merge, undo.

Why merge instead of running LoRA branches: a merged DiT runs at full speed with every fast path
(fp8 matmul, compiled blocks, offload) unchanged. Why keep backups: changing a LoRA's strength or
removing it must not reload gigabytes from disk, so the first time a tensor is patched its stored
form (dtype and fp8 scale) is copied aside, and `set_loras` always starts from those copies. The
copies stay on the DiT's GPU when the caller says there is room for them (a device copy of a 14B is
~30 ms; a host copy of its 27 GB costs seconds), else they go to host memory.

Key layouts read (the suffix says what a tensor is, the rest names a module of the DiT):
- original Wan names, `diffusion_model.` prefix: `.lora_down.weight`/`.lora_up.weight` (+ `.alpha`)
  or `.lora_A.weight`/`.lora_B.weight`; full deltas `.diff` (weight) and `.diff_b` (bias);
- diffusers/PEFT names, `transformer.` prefix: `blocks.0.attn1.to_q.lora_A.weight`, `.lora_B.bias`;
- kohya/musubi: `lora_unet_blocks_0_self_attn_q.lora_down.weight` (+ `.alpha`).

The math (ComfyUI's rule, which diffusers' fuse_lora also computes): W += s·(alpha/rank)·up @ down,
alpha defaulting to rank; W += s·diff; b += s·diff_b. Every delta of every LoRA on one tensor is
summed in float32 and added to the float32 base, then rounded once to the stored dtype. fp8 weights
are dequantised, merged and re-quantised with one scale per output channel (ops.linear.quantize_fp8):
each merged element is then within half an fp8 step of the exact float32 merge, |err| ≤ 2⁻⁴·|w|
for e4m3 (2⁻³ for e5m2) plus the row's subnormal spacing (scale·2⁻⁹ for e4m3), the same bound as
any per-channel fp8 weight (tests/test_lora.py checks it, and the distance to a bf16 merge).

Merging writes in place, so compiled blocks stay valid; a ComfyUI per-tensor fp8 scale becomes a
per-channel buffer. Apply LoRAs before attaching block offload (memory/offload.py keeps its own
references to the tensors it moves).
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import FastVideoError, ModelFileError
from ..ops.linear import FP8_DTYPES, Linear, quantize_fp8
from .files import check_safetensors, iter_tensors
from .keymaps import dit_name as diffusers_to_wan_name

logger = logging.getLogger(__name__)

ROLE = "LoRA"
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.", "lora_unet_")
# suffix → (role of the tensor, which parameter of the module it patches)
_SUFFIXES = {
    ".lora_down.weight": ("down", "weight"), ".lora_up.weight": ("up", "weight"),
    ".lora_A.weight": ("down", "weight"), ".lora_B.weight": ("up", "weight"),
    ".lora_A.default.weight": ("down", "weight"), ".lora_B.default.weight": ("up", "weight"),
    ".lora_B.bias": ("diff", "bias"), ".alpha": ("alpha", "weight"),
    ".diff": ("diff", "weight"), ".diff_b": ("diff", "bias"),
}
_IMAGE_KEYS = re.compile(r"k_img|v_img|img_emb|norm_k_img|add_k_proj|add_v_proj|image_embedder")
_OTHER_ARCHS = [
    (re.compile(r"double_blocks|single_blocks|single_transformer_blocks"), "a Flux model"),
    (re.compile(r"down_blocks|up_blocks|input_blocks|output_blocks|mid_block|lora_te\d?_|text_model"),
     "a Stable Diffusion (UNet) model"),
    (re.compile(r"transformer_blocks|joint_blocks|double_stream|single_stream"), "a DiT of another family"),
]
_WAN_WIDTHS = {1536: "Wan2.1 1.3B", 5120: "Wan2.1 14B", 3072: "Wan2.2 5B"}


@dataclass
class LoraReport:
    """What one LoRA file did: its layout, how many of its tensors were merged, which were not."""
    path: str
    strength: float
    layout: str
    matched: int
    unmatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"LoRA {os.path.basename(self.path)!r} ({self.layout} layout) at strength {self.strength:g}: "
                f"{self.matched} tensors merged")
        if self.unmatched:
            text += f"; lora key not loaded: {len(self.unmatched)}, e.g. {self.unmatched[:5]}"
            if any(_IMAGE_KEYS.search(k) for k in self.unmatched):
                text += " (image-to-video keys: this LoRA was made for Wan image-to-video)"
        return text


@dataclass
class MergeReport:
    loras: list[LoraReport]
    patched: int      # DiT tensors changed from the base
    seconds: float    # reading, mapping and merging, all LoRAs together


@dataclass
class _Patch:
    """The pieces of one LoRA for one DiT tensor."""
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)

    def delta(self, shape: torch.Size, device) -> torch.Tensor:
        """This LoRA's float32 delta at strength 1."""
        out = torch.zeros(shape, dtype=torch.float32, device=device)
        if self.diff is not None:
            out += self.diff.to(device, torch.float32).reshape(shape)
        if self.up is not None and self.down is not None:
            rank = self.down.shape[0]
            scale = (self.alpha if self.alpha is not None else rank) / rank
            up = self.up.to(device, torch.float32).flatten(1)
            down = self.down.to(device, torch.float32).flatten(1)
            out += (scale * (up @ down)).reshape(shape)
        return out


def _lookup(dit: nn.Module) -> tuple[dict[str, str], dict[str, torch.Size]]:
    """Every name a LoRA may use for a DiT module or parameter → our module/parameter name; and
    our parameter shapes."""
    shapes = {n: p.shape for n, p in dit.named_parameters()}
    names: dict[str, str] = {}
    for p in shapes:
        base = p[: -len(".weight")] if p.endswith(".weight") else p if not p.endswith(".bias") else None
        if base is not None:
            names[base] = base
            names[base.replace(".", "_")] = base  # kohya/musubi spelling
    return names, shapes


def _resolve(base: str, names: dict[str, str]) -> str | None:
    if base in names:
        return names[base]
    for candidate in (diffusers_to_wan_name(base + ".weight")[: -len(".weight")], diffusers_to_wan_name(base)):
        if candidate in names:
            return names[candidate]
    return None


def _split(key: str) -> tuple[str, str, str] | None:
    """key → (module name without prefix, tensor role, patched parameter) or None."""
    for suffix, (role, param) in _SUFFIXES.items():
        if key.endswith(suffix):
            base = key[: -len(suffix)]
            for prefix in _PREFIXES:
                if base.startswith(prefix):
                    base = base[len(prefix):]
                    break
            return base, role, param
    return None


def _layout(keys: list[str]) -> str:
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(".attn1." in k or ".attn2." in k or k.startswith("transformer.") or "condition_embedder" in k
           for k in keys):
        return "diffusers"
    return "wan"


def _what_it_is_for(keys: list[str]) -> str:
    """A guess at the model a LoRA that matches nothing was made for."""
    text = " ".join(keys[:200])
    for pattern, arch in _OTHER_ARCHS:
        if pattern.search(text):
            return f"its keys look like a LoRA for {arch}, not for Wan"
    if keys and all(_IMAGE_KEYS.search(k) for k in keys):
        return "its keys are Wan image-to-video layers (k_img/v_img/img_emb), which this text-to-video model lacks"
    if not any(_split(k) for k in keys):
        return "it holds no LoRA tensors (.lora_down/.lora_up, .lora_A/.lora_B, .diff, .diff_b)"
    return f"its key names are not Wan DiT layers (first: {keys[:3]})"


def _width_hint(lora_width: int, ours: int) -> str:
    a, b = _WAN_WIDTHS.get(lora_width, f"width {lora_width}"), _WAN_WIDTHS.get(ours, f"width {ours}")
    return f"the LoRA was made for {a} (width {lora_width}), the loaded model is {b} (width {ours})"


def expert_of(path: str) -> str | None:
    """"high" or "low" when the file name says which Wan2.2 A14B expert the LoRA was made for, as the
    two-file releases name them (Wan2.2-Lightning_…_HIGH_fp16, …_lightx2v_4steps_lora_v1.1_low_noise,
    high_noise_model.safetensors); None when it names neither or both."""
    words = set(re.split(r"[^a-z0-9]+", os.path.splitext(os.path.basename(os.fspath(path)))[0].lower()))
    said = {w for w in ("high", "low") if w in words or f"{w}noise" in words}
    return said.pop() if len(said) == 1 else None


def read_lora(path: str, dit: nn.Module, strength: float = 1.0) -> tuple[dict[str, _Patch], LoraReport]:
    """Read one LoRA file and map it onto `dit`'s parameter names, checking every shape first.

    Returns {our parameter name: patch} and the report (nothing is merged here)."""
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise FastVideoError(f"LoRA strength for {os.path.basename(path)!r} must be a finite number, "
                             f"got {strength!r}; 1.0 is the LoRA as trained, 0 turns it off.")
    check_safetensors(path, ROLE)
    names, shapes = _lookup(dit)
    width: int | None = getattr(getattr(dit, "cfg", None), "dim", None)
    tensors = dict(iter_tensors([path], ROLE))
    keys = list(tensors)
    patches: dict[str, _Patch] = {}
    unmatched = []
    for key, t in tensors.items():
        split = _split(key)
        target = _resolve(split[0], names) if split else None
        if target is None or split is None:
            unmatched.append(key)
            continue
        base, role, param = split
        name = f"{target}.{param}" if f"{target}.{param}" in shapes else target if param == "weight" else None
        if name not in shapes:
            unmatched.append(key)
            continue
        patch = patches.setdefault(name, _Patch())
        patch.keys.append(key)
        if role == "alpha":
            patch.alpha = float(t.float().item())
        elif role == "diff":
            patch.diff = t
        else:
            setattr(patch, role, t)
    if not patches:
        raise ModelFileError(f"{ROLE}: none of the {len(keys)} tensors in {os.path.basename(path)!r} match this Wan "
                             f"DiT; {_what_it_is_for(keys)}.")
    for name, p in patches.items():
        _check_patch(name, p, shapes[name], path, width)
    report = LoraReport(path, float(strength), _layout(keys), sum(len(p.keys) for p in patches.values()), unmatched)
    return patches, report


def _check_patch(name: str, p: _Patch, shape: torch.Size, path: str, width: int | None) -> None:
    file = os.path.basename(path)
    if (p.up is None) != (p.down is None):
        raise ModelFileError(f"{ROLE}: {file!r} has only one half of the LoRA pair for {name!r} ({p.keys}); "
                             "each layer needs both the down (A) and the up (B) matrix.")
    problems = []
    if p.up is not None and p.down is not None:
        rank = p.down.shape[0]
        if p.up.ndim < 2 or p.up.shape[1] != rank:
            problems.append(f"up {tuple(p.up.shape)} does not fit down {tuple(p.down.shape)} (rank {rank})")
        elif (p.up.shape[0], math.prod(p.down.shape[1:])) != (shape[0], math.prod(shape[1:])):
            problems.append(f"up @ down is {p.up.shape[0]}×{math.prod(p.down.shape[1:])}, the weight is "
                            f"{tuple(shape)}")
    if p.diff is not None and p.diff.numel() != math.prod(shape):
        problems.append(f"delta {tuple(p.diff.shape)} against the weight {tuple(shape)}")
    if problems:
        lora_width = p.up.shape[0] if p.up is not None else p.diff.shape[-1] if p.diff is not None else 0
        hint = _width_hint(lora_width, width) if width and lora_width != width else "the shapes do not agree"
        raise ModelFileError(f"{ROLE}: {file!r} does not fit this DiT at {name!r}: {problems[0]}; {hint}.")


def _stored(dit: nn.Module, name: str) -> tuple[nn.Module, str, torch.Tensor, torch.Tensor | None]:
    mod_name, _, attr = name.rpartition(".")
    owner = dit.get_submodule(mod_name) if mod_name else dit
    scale = owner.scale_weight if isinstance(owner, Linear) and attr == "weight" else None
    return owner, attr, getattr(owner, attr), scale


def _write(owner: nn.Module, attr: str, value: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Write in place (keeps offload hooks and compiled graphs valid); re-register only the fp8
    scale when its shape changes (a per-tensor ComfyUI scale becomes per-channel)."""
    getattr(owner, attr).copy_(value)
    if isinstance(owner, Linear) and attr == "weight":
        current = owner.scale_weight
        if scale is None or current is None or current.shape != scale.shape:
            owner.register_buffer("scale_weight", None if scale is None else scale.to(value.device).clone())
        else:
            current.copy_(scale)


def restore(dit: nn.Module, keep_backup: bool = False) -> int:
    """Put every patched tensor back to its stored base form, bit for bit; returns how many.
    keep_backup: keep the base copies (set_loras reuses them instead of copying the base again)."""
    backup = getattr(dit, "lora_backup", {})
    with torch.no_grad():
        for name, (value, scale) in backup.items():
            owner, attr, current, _ = _stored(dit, name)
            _write(owner, attr, value.to(current.device), scale)
    count = len(backup)
    vars(dit).update(lora_backup=backup if keep_backup else {}, loras=[])  # plain attributes, not parameters
    return count


def _backup_device(dit: nn.Module, names: list[str], old: dict, room: int) -> torch.device:
    """Where the new base copies go: the weights' own device when they fit in `room` bytes."""
    new = [_stored(dit, n)[2] for n in names if n not in old]
    device = new[0].device if new else torch.device("cpu")
    return device if sum(t.nbytes for t in new) <= room else torch.device("cpu")


def set_loras(dit: nn.Module, loras: Sequence[tuple[str, float]], backup_room: int = 0) -> MergeReport:
    """Make `dit` the base plus exactly these (path, strength) LoRAs; [] restores the base exactly.

    All files are read and checked before the model is touched, so a bad LoRA leaves it unchanged.
    backup_room: bytes the caller can spare on the weights' device for the base copies (0: host).
    """
    start = time.perf_counter()
    parsed = [read_lora(path, dit, strength) for path, strength in loras]
    restore(dit, keep_backup=bool(loras))
    old: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = getattr(dit, "lora_backup", {})
    backup: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    targets = sorted({name for patches, _ in parsed for name in patches})
    home = _backup_device(dit, targets, old, backup_room)
    with torch.no_grad():
        for name in targets:
            owner, attr, stored, scale = _stored(dit, name)
            # The base is back in place; its copy from the last merge is still exact. Host copies are
            # plain: pinning ~27 GB for a 14B took most of a 30 s first merge (docs/benchmarks.md).
            backup[name] = old.get(name) or (stored.detach().to(home, copy=True),
                                             None if scale is None else scale.detach().to(home, copy=True))
            w = stored.float() * scale.float() if scale is not None else stored.float()
            for patches, report in parsed:
                if name in patches and report.strength != 0:
                    w = w + report.strength * patches[name].delta(stored.shape, stored.device)
            if stored.dtype in FP8_DTYPES:
                value, new_scale = quantize_fp8(w.reshape(w.shape[0], -1), stored.dtype)
                _write(owner, attr, value.reshape(stored.shape), new_scale)
            else:
                _write(owner, attr, w.to(stored.dtype), scale)
    # Plain attributes (not parameters or buffers): restore() and the next set_loras() start from them.
    vars(dit).update(lora_backup=backup, loras=[(path, float(s)) for path, s in loras])
    result = MergeReport([r for _, r in parsed], len(targets), time.perf_counter() - start)
    for r in result.loras:
        (logger.warning if r.unmatched else logger.info)(r.summary())
    if loras:
        logger.info("LoRA merge: %d DiT tensors patched in %.2f s (base copies on %s)", result.patched,
                    result.seconds, home)
    return result
