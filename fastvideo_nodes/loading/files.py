"""Reading model files: safetensors only, checked before use.

One place decides whether a path is acceptable (exists, is safetensors, is not truncated) so that
every loader fails the same clear way.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from safetensors import safe_open

from ..errors import ModelFileError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


def check_safetensors(path: str, role: str) -> None:
    """Raise a ModelFileError naming `role` unless `path` is a complete safetensors file."""
    if not os.path.exists(path):
        raise ModelFileError(f"{role}: file not found: {path!r}. Check the path or the file name.")
    if os.path.isdir(path):
        raise ModelFileError(f"{role}: {path!r} is a folder; expected a .safetensors file.")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise ModelFileError(
            f"{role}: {os.path.basename(path)!r} is a pickle checkpoint ({os.path.splitext(path)[1]}). "
            "Only .safetensors files are loaded, because pickle files can run code; "
            "use the .safetensors release of this model.")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                raise ValueError("header length is beyond the end of the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"the file has {size} bytes but its header describes {8 + n + end}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelFileError(
            f"{role}: {path!r} is not a readable safetensors file ({e}). "
            "It may be truncated by an interrupted download, or not a model file; download it again.") from None


def read_header(path: str) -> dict:
    """The safetensors header: {name: {"dtype", "shape", ...}} without reading tensor data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


@contextmanager
def open_safetensors(path: str, role: str) -> Iterator:
    """safe_open after checking the file; returns a handle with keys() and get_tensor()."""
    check_safetensors(path, role)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            yield f
    except ModelFileError:
        raise
    except Exception as e:  # safetensors raises its own error types
        if "safetensors" in type(e).__module__.lower() or isinstance(e, OSError):
            raise ModelFileError(f"{role}: could not read {path!r}: {e}") from None
        raise


def shard_files(folder: str, role: str, stem: str) -> list[str]:
    """The safetensors files of a diffusers component folder: a single file or an index of shards."""
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    single = os.path.join(folder, f"{stem}.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    if os.path.exists(single):
        return [single]
    found = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
    if found:
        return [os.path.join(folder, p) for p in found]
    pickles = [p for p in os.listdir(folder) if p.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ModelFileError(f"{role}: {folder!r} holds only pickle weights ({pickles[0]}); "
                             "only .safetensors is loaded. Use the safetensors release of this model.")
    raise ModelFileError(f"{role}: no .safetensors weights found in {folder!r}.")


def locate(path: str, role: str, component: str, stem: str, expected: str) -> tuple[list[str], dict | None]:
    """Weight files and config of one model: a single .safetensors file (config None), or a diffusers
    folder given as its root (with `component/`) or as the component folder itself."""
    if not os.path.exists(path):
        raise ModelFileError(f"{role}: {path!r} does not exist. Give {expected} or a diffusers Wan folder.")
    if not os.path.isdir(path):
        return [path], None
    folder = os.path.join(path, component) if os.path.isdir(os.path.join(path, component)) else path
    cfg = os.path.join(folder, "config.json")
    if not os.path.exists(cfg):
        raise ModelFileError(f"{role}: {path!r} is a folder without {component}/config.json; expected a diffusers "
                             f"Wan folder or {expected}.")
    with open(cfg) as f:
        return shard_files(folder, role, stem), json.load(f)


def iter_tensors(paths: list[str], role: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from each file in turn, one tensor in memory at a time."""
    for p in paths:
        with open_safetensors(p, role) as f:
            for k in f.keys():
                yield k, f.get_tensor(k)


def all_keys(paths: list[str], role: str) -> dict[str, dict]:
    """Header entries of every file, for detecting the format before reading any data."""
    out = {}
    for p in paths:
        check_safetensors(p, role)
        out.update(read_header(p))
    return out
