"""Checks on an architecture read from a file, made before any model is built.

A header is small and cheap to forge or corrupt: `blocks.100000000` in a 1 MB file would have us
build 10^8 layers until memory runs out. Every size read from shapes or config.json is bounded
here (generously: far above any released Wan or UMT5), and layer indices must be contiguous.
"""
from __future__ import annotations

import re

from ..errors import ModelFileError

# Upper bounds, ~10× the largest released models (Wan 14B: dim 5120, 40 layers; UMT5-XXL: 24 layers).
CAPS = {
    "layers": 1024, "dim": 65536, "heads": 1024, "head_dim": 4096, "ffn": 1 << 18, "text_dim": 65536,
    "freq_dim": 65536, "channels": 4096, "patch": 64, "text_len": 1 << 16, "vocab": 1 << 22, "buckets": 4096,
}


def bounded(role: str, **values) -> None:
    """Raise unless every value is an int in [1, CAPS[name]]."""
    for name, v in values.items():
        if type(v) is not int or not 1 <= v <= CAPS[name]:
            raise ModelFileError(f"{role}: the architecture read from the file has {name} = {v!r}; expected a whole "
                                 f"number from 1 to {CAPS[name]}. The file or its config.json is corrupt.")


def need(shapes: dict[str, tuple], name: str, role: str, part: str) -> tuple:
    """The shape of `name`, or an error saying which part of the model the file lacks."""
    if name not in shapes:
        raise ModelFileError(f"{role}: the file lacks {part}: no tensor {name!r}; it may be incomplete or "
                             "hold only part of the model.")
    return shapes[name]


def layer_count(names, pattern: str, role: str) -> int:
    """Layers named by `pattern` (one group: the index); they must be 0..n-1 with no gap."""
    found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    if not found:
        raise ModelFileError(f"{role}: the file holds no layers (no tensor matching {pattern!r}).")
    n = max(found) + 1
    if len(found) != n:
        gap = next(i for i in range(n) if i not in found)
        raise ModelFileError(f"{role}: the file names layer {n - 1} but has no layer {gap} "
                             f"({n - len(found)} of {n} missing); the file is corrupt or incomplete.")
    bounded(role, layers=n)
    return n
