"""Every environment variable the engine reads, in one place, with its type and meaning.

Code reads settings through these accessors, never `os.environ` directly, so the README table
(`python -m fastvideo_nodes env` prints it) cannot drift from what the code does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Variable:
    name: str
    kind: str      # "str", "path", "choice"
    default: str
    meaning: str


VARIABLES = {v.name: v for v in (
    Variable("FASTVIDEO_ATTENTION_BACKEND", "choice", "auto",
             "attention backend when none is given explicitly (auto, TORCH_SDPA, FLASH_ATTN, SAGE_ATTN, "
             "SLIDING_TILE_ATTN)"),
    Variable("FASTVIDEO_SDPA_KERNEL", "choice", "",
             "pin torch SDPA to one kernel: cudnn, flash, efficient or math (empty: cuDNN on Hopper+, "
             "else torch's choice)"),
    Variable("FASTVIDEO_CACHE", "path", "~/.cache/fastvideo_nodes",
             "where the attention probe results, the demo model and test tokenizers are kept"),
    Variable("FASTVIDEO_STEP_TIMEOUT", "str", "600",
             "seconds a sequence-parallel worker may spend on one sampling step before the run fails with "
             "an error naming it and the worker pool is stopped (0: no limit)"),
)}


def get(name: str) -> str:
    """The variable's value, or its default when unset or empty."""
    var = VARIABLES[name]
    return os.environ.get(name) or var.default


def cache_dir() -> str:
    """FASTVIDEO_CACHE, else $XDG_CACHE_HOME/fastvideo_nodes, else ~/.cache/fastvideo_nodes (created)."""
    base = os.environ.get("FASTVIDEO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastvideo_nodes")
    os.makedirs(base, exist_ok=True)
    return base


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{v.name}` | {v.default or '(unset)'} | {v.meaning} |" for v in VARIABLES.values()]
    return "\n".join(rows)
