"""Fill a model built on the meta device from its files, one tensor at a time.

Every loader (DiT, VAE, UMT5) ends here, so there is one fp8 storage policy and one set of checks:
- the whole header is compared with the model (missing, unexpected, wrongly shaped or non-float
  tensors) before a single tensor is read;
- each tensor is then read, cast, moved to its device and assigned before the next one, so loading
  never holds two copies of the weights in host memory.

fp8 policy: Linear weights already fp8 in the file stay fp8 with their own `scale_weight` (ComfyUI
scaled fp8 has one per tensor); asking for fp8 storage quantises the other Linear weights with one
scale per output channel (ops.linear.quantize_fp8). Every other scaled tensor is dequantised.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ModelFileError
from ..ops.linear import FP8_DTYPES, Linear, quantize_fp8
from . import detect
from .files import FLOAT_DTYPES, all_keys, iter_tensors
from .locate import Located, locate

SCALE = ".scale_weight"
_never = lambda name: False
_markers = re.compile(r"(^|\.)scaled_fp8$|\.scale_input$")  # ComfyUI fp8 markers, not weights


@dataclass(frozen=True)
class Rules:
    """How one model's files differ from its state dict.

    keep_fp32(name): tensors kept in float32 (modulation tables, norms).
    keep_dequantized(name): Linear weights that must not stay fp8 (UMT5's `wo`: transformers
        casts the FFN input to `wo.weight.dtype`).
    skip(name): marker tensors that are not weights.
    extra: tensors that are not weights and that the loader reads itself (UMT5's `spiece_model`).
    tied: (a, b) pairs sharing one tensor; a file may store either.
    """
    keep_fp32: Callable[[str], bool] = _never
    keep_dequantized: Callable[[str], bool] = _never
    skip: Callable[[str], object] = _markers.search  # truthy for a marker
    extra: frozenset[str] = frozenset()
    tied: tuple[tuple[str, str], ...] = ()


@dataclass
class Source:
    """The files of one model with their checked headers, seen under the model's own names
    (wrapper prefix stripped, foreign naming mapped by `rename`)."""
    files: list[str]
    role: str
    prefix: str = ""
    rename: Callable[[str], str] = lambda n: n
    header: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        if not self.header:
            self.header = all_keys(self.files, self.role)

    def name(self, key: str) -> str:
        return self.rename(key[len(self.prefix):] if self.prefix and key.startswith(self.prefix) else key)

    def entries(self, rules: Rules) -> dict[str, tuple[str, dict]]:
        """{model name: (file key, header entry)} of the weights (markers and extras left out)."""
        out = {}
        for key, entry in self.header.items():
            n = self.name(key)
            if not (rules.skip(n) or n in rules.extra):
                out[n] = (key, entry)
        return out

    def shapes(self, rules: Rules = Rules()) -> dict[str, tuple]:
        return {n: tuple(e["shape"]) for n, (_, e) in self.entries(rules).items()}

    def tensors(self, keys) -> Iterator[tuple[str, torch.Tensor]]:
        for key, t in iter_tensors(self.files, self.role, keys):
            yield self.name(key), t


def _part(name: str) -> str:
    """The part of a model a tensor belongs to, for messages: `blocks.3`, `head`, `encoder`…"""
    bits = name.split(".")
    return ".".join(bits[:2]) if len(bits) > 2 and bits[1].isdigit() else bits[0]


def _describe_missing(missing: list[str]) -> str:
    parts = Counter(_part(n) for n in missing)
    listed = ", ".join(f"{p} ({c})" for p, c in list(parts.items())[:4]) + (", …" if len(parts) > 4 else "")
    return f"lacks {len(missing)} tensors of: {listed}, e.g. {missing[:3]}"


def _check(entries: dict, expected: dict[str, torch.Tensor], rules: Rules, role: str) -> set:
    """Compare the header with the model before reading data; return the tied names to alias."""
    weights = {n for n in entries if not n.endswith(SCALE)}
    unexpected = sorted(n for n in weights if n not in expected)
    unexpected += sorted(n for n in entries if n.endswith(SCALE) and n[: -len(SCALE)] + ".weight" not in weights)
    if unexpected:
        n = unexpected[0]
        raise ModelFileError(f"{role}: unexpected tensor {n!r} {tuple(entries[n][1]['shape'])} for this architecture "
                             f"({len(unexpected)} such); the file does not match the model kind it was given as.")
    aliases = set()
    for a, b in rules.tied:
        for have, lack in ((a, b), (b, a)):
            if have in weights and lack not in weights:
                aliases.add(lack)
    missing = sorted(set(expected) - weights - aliases)
    if missing:
        raise ModelFileError(f"{role}: the file {_describe_missing(missing)}; it may be incomplete "
                             "(a partial download) or of another model kind.")
    for n in sorted(weights):
        entry, want = entries[n][1], expected[n]
        if tuple(entry["shape"]) != tuple(want.shape):
            raise ModelFileError(f"{role}: tensor {n!r} has shape {tuple(entry['shape'])}, the model expects "
                                 f"{tuple(want.shape)}; the file does not match the detected configuration.")
        if want.is_floating_point() and entry["dtype"] not in FLOAT_DTYPES:
            raise ModelFileError(f"{role}: tensor {n!r} is stored as {entry['dtype']}; a float type (F32, F16, BF16 "
                                 "or F8) is expected. The file is not a usable model file.")
    return aliases


def _stored(t: torch.Tensor, name: str, linear: bool, scale: torch.Tensor | None, rules: Rules,
            dtype: torch.dtype, weight_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tensor as stored, scale_weight to keep or None): the one storage policy."""
    if linear and t.dtype in FP8_DTYPES:
        return t, scale  # stays fp8; dequantised at use
    if scale is not None:
        t = t.float() * scale
    if rules.keep_fp32(name):
        return t.to(torch.float32), None
    if linear and weight_dtype is not None and weight_dtype in FP8_DTYPES:
        return quantize_fp8(t, weight_dtype)  # one scale per output channel
    if linear and weight_dtype is not None:
        return t.to(dtype).to(weight_dtype), None
    return (t.to(dtype) if t.is_floating_point() else t), None


def _expected(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters()) | {n: b for n, b in module.named_buffers() if b is not None}


def check_header(module: nn.Module, source: Source, *, role: str, rules: Rules = Rules()) -> tuple[dict, set]:
    """Compare `source`'s header with `module` (built on meta); no tensor data is read.

    Returns (weight entries by model name, tied names to alias); `materialize` calls it first, a
    loader may call it earlier to fail before reading non-weight tensors."""
    expected = _expected(module)
    entries = source.entries(rules)
    for a, b in rules.tied:  # a model that shares one module lists only one of the tied names
        for have, lack in ((a, b), (b, a)):
            if have in entries and have not in expected and lack in expected and lack not in entries:
                entries[lack] = entries.pop(have)
    return entries, _check(entries, expected, rules, role)


def materialize(module: nn.Module, source: Source, *, role: str, dtype: torch.dtype, device: torch.device | str,
                rules: Rules = Rules(), weight_dtype: torch.dtype | None = None) -> None:
    """Assign every parameter/buffer of `module` (built on meta) from `source`.

    dtype: compute dtype for ordinary floating tensors. weight_dtype: storage dtype asked for the
    Linear weights (fp8 → per-channel scaled e4m3fn/e5m2; others a plain cast).
    """
    expected = _expected(module)
    entries, aliases = check_header(module, source, role=role, rules=rules)
    names = {k: n for n, (k, _) in entries.items()}
    # Scales are tiny and may come after their weights in a file: read them all first.
    scales = {names[k][: -len(SCALE)] + ".weight": t.float()
              for k, t in iter_tensors(source.files, role, [k for k, n in names.items() if n.endswith(SCALE)])}
    for key, t in iter_tensors(source.files, role, [k for k, n in names.items() if not n.endswith(SCALE)]):
        name = names[key]
        mod_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(mod_name) if mod_name else module
        linear = isinstance(owner, Linear) and attr == "weight" and not rules.keep_dequantized(name)
        t, scale = _stored(t, name, linear, scales.get(name), rules, dtype, weight_dtype)
        if scale is not None:
            owner.register_buffer("scale_weight", scale.to(device))
        t = t.to(device)
        if isinstance(expected[name], nn.Parameter):
            setattr(owner, attr, nn.Parameter(t, requires_grad=False))
        else:
            owner.register_buffer(attr, t)
    for a, b in rules.tied:
        for have, lack in ((a, b), (b, a)):
            if lack in aliases:
                m_have, _, attr = have.rpartition(".")
                m_lack, _, attr_lack = lack.rpartition(".")
                setattr(module.get_submodule(m_lack), attr_lack, getattr(module.get_submodule(m_have), attr))
    module.eval().requires_grad_(False)


def open_component(path: str, component: str, role: str, kinds: tuple[str, ...]) -> tuple[Located, Source, str]:
    """The first step of every loader: locate `path` as `component` (loading.locate), read its headers
    (no tensor data) and check that it is one of `kinds` (loading.detect). Returns (where, source, kind);
    source.role names the file in messages."""
    where = locate(path, component)
    source = Source(where.files, role_of(role, path))
    return where, source, detect.expect_kind(source.header, kinds, role, path)


def role_of(role: str, path: str | os.PathLike) -> str:
    """`role 'file name'` for messages about one file or folder."""
    return f"{role} {os.path.basename(os.path.normpath(os.fspath(path)))!r}"
