"""Checks of the user inputs the API, the CLI and the ComfyUI nodes share: GPU lists, sigmas, LoRA
lists and prompts. Each returns the value in the form the engine uses or raises a FastVideoError
naming the input and what would be right."""
from __future__ import annotations

import math
import numbers
import os

from ..errors import FastVideoError


def parse_gpu_ids(gpu_ids, name: str = "gpu_ids") -> list[int] | None:
    """"0,2" / [0, 2] → [0, 2]; None or "" → None (the first num_gpus GPUs)."""
    if gpu_ids is None:
        return None
    if isinstance(gpu_ids, str):
        parts = [p.strip() for p in gpu_ids.split(",") if p.strip()]  # "0,1," is fine
        if not all(p.isascii() and p.isdigit() for p in parts):
            raise FastVideoError(f"{name} must be comma-separated GPU indices such as 0,1 (or empty), "
                                 f"got {gpu_ids!r}.")
        ids = [int(p) for p in parts]
    else:
        try:
            given = list(gpu_ids)
        except TypeError:
            given = None
        if given is None or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and int(i) >= 0
                                    for i in given):
            raise FastVideoError(f"{name} must be a list of GPU indices such as [0, 1], got {gpu_ids!r}.")
        ids = [int(i) for i in given]
    if len(set(ids)) != len(ids):
        raise FastVideoError(f"{name} names a GPU twice: {ids}; each GPU can run one worker.")
    return ids or None


def parse_sigmas(value, name: str = "sigmas") -> tuple[float, ...] | None:
    """None, "" → None (steps and shift decide); "1, 0.9375, 0.8333" or a list of numbers → a tuple
    (the range and order are checked with the other sampling settings)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = [p.strip() for p in value.replace(";", ",").split(",") if p.strip()] if isinstance(value, str) else value
    try:
        out = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise FastVideoError(f"{name} must be numbers separated by commas, from 1 down towards 0 "
                             f"(e.g. 1, 0.9375, 0.8333, 0.625), got {value!r}.") from None
    if any(isinstance(p, bool) for p in parts):
        raise FastVideoError(f"{name} must be numbers, got {value!r}.")
    return out


def check_loras(loras, name: str = "loras") -> tuple[tuple[str, float], ...]:
    """[(path, strength), ...] → a checked tuple of (absolute path, float strength).

    Only what can be checked without a model: each file is a readable .safetensors (not a pickle)
    and each strength a finite number. Whether the LoRA fits the DiT is checked when it is merged."""
    from ..loading.files import check_safetensors
    from ..loading.lora import ROLE
    if loras is None:
        return ()
    if isinstance(loras, (str, os.PathLike)) or not isinstance(loras, (list, tuple)):
        raise FastVideoError(f"{name} must be a list of (path, strength) pairs such as "
                             f"[('lightx2v_lora.safetensors', 1.0)], got {loras!r}.")
    out = []
    for i, item in enumerate(loras):
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise FastVideoError(f"{name}[{i}] must be a (path, strength) pair, got {item!r}.")
        path, strength = item
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength):
            raise FastVideoError(f"{name}[{i}]: the strength must be a finite number (1.0 = as trained, "
                                 f"0 = off), got {strength!r}.")
        if not isinstance(path, (str, os.PathLike)):
            raise FastVideoError(f"{name}[{i}]: the path must be a file name, got {path!r}.")
        path = os.path.abspath(os.fspath(path))
        check_safetensors(path, ROLE)
        out.append((path, float(strength)))
    return tuple(out)


def check_prompt(text, name: str = "prompt") -> str:
    """A str the tokenizer can take: text that is valid UTF-8 (no lone surrogates such as '\\udcff')."""
    if not isinstance(text, str):
        raise FastVideoError(f"{name} must be text, got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FastVideoError(f"{name} is not valid UTF-8 text (character {e.start}: {text[e.start]!r}); "
                             "remove or retype that character.") from None
    return text
