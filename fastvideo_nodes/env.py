"""Every environment variable the engine reads, in one place, with its type and meaning.

No other module reads `os.environ` for a FASTVIDEO_* variable (a test checks the sources), and
the README table is `markdown_table()` (`python -m fastvideo_nodes.env` prints it; a test checks
that the committed copy matches), so neither can drift from what the code does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Variable:
    name: str
    kind: str      # "path", "choice" or "seconds"
    default: str
    meaning: str
    choices: tuple[str, ...] = ()  # kind "choice": the values that mean something (case-insensitive)


VARIABLES = {v.name: v for v in (
    Variable("FASTVIDEO_ATTENTION_BACKEND", "choice", "auto",
             "attention backend when none is given explicitly (an unknown name is an error)",
             ("auto", "TORCH_SDPA", "FLASH_ATTN", "SAGE_ATTN", "SLIDING_TILE_ATTN")),
    Variable("FASTVIDEO_SDPA_KERNEL", "choice", "",
             "pin torch SDPA to one kernel (empty or another value: cuDNN on Hopper+, else torch's choice)",
             ("cudnn", "flash", "efficient", "math")),
    Variable("FASTVIDEO_CACHE", "path", "~/.cache/fastvideo_nodes",
             "where the attention probe results, the demo model and test tokenizers are kept "
             "(unset: $XDG_CACHE_HOME/fastvideo_nodes when XDG_CACHE_HOME is set)"),
    Variable("FASTVIDEO_STEP_TIMEOUT", "seconds", "600",
             "seconds a sequence-parallel worker may spend on one sampling step before the run fails with "
             "an error naming it and the worker pool is stopped (0: no limit)"),
)}


# Set, not read: every sequence-parallel worker runs with NVLink multicast off (a program that uses
# it can take a host's shared GPUs out of service).
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def apply_worker_env() -> None:
    os.environ.update(WORKER_ENV)


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
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for v in VARIABLES.values():
        kind = f"one of {', '.join(f'`{c}`' for c in v.choices)}" if v.choices else v.kind
        rows.append(f"| `{v.name}` | {kind} | {v.default or '(unset)'} | {v.meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys
    sys.stdout.write(markdown_table() + "\n")
