"""Reading model files: safetensors only, checked before use.

One place decides whether a path is acceptable (exists, is safetensors, is not truncated, has a
well-formed header) so that every loader fails the same clear way before any tensor data is read.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from safetensors import safe_open

from ..errors import ModelFileError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# Bytes per element of every dtype safetensors writes; also the list of dtypes we accept at all.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_MAX_HEADER = 100 * 2**20


def _check_entry(name: str, entry) -> int:
    """Validate one header entry; return the byte length its shape implies."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ValueError(f"entry {name!r} lacks dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"entry {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"entry {name!r} has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"entry {name!r} has data_offsets {offsets!r}, not [begin, end]")
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"entry {name!r} of shape {shape} {dtype} needs {nbytes} bytes but spans "
                         f"{offsets[1] - offsets[0]}")
    return offsets[1]


def _parse(path: str) -> dict:
    """The checked header of `path` (with __metadata__ removed); raises ValueError on any defect."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError("header length is beyond the end of the file")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    end = max((_check_entry(k, v) for k, v in header.items()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"the file has {size} bytes but its header describes {8 + n + end}")
    return header


def read_header(path: str, role: str) -> dict:
    """The checked safetensors header {name: {"dtype", "shape", "data_offsets"}}, no tensor data read.

    Raises a ModelFileError naming `role` unless `path` is a complete, well-formed safetensors file."""
    if not os.path.exists(path):
        raise ModelFileError(f"{role}: file not found: {path!r}. Check the path or the file name.")
    if os.path.isdir(path):
        raise ModelFileError(f"{role}: {path!r} is a folder; expected a .safetensors file.")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise ModelFileError(
            f"{role}: {os.path.basename(path)!r} is a pickle checkpoint ({os.path.splitext(path)[1]}). "
            "Only .safetensors files are loaded, because pickle files can run code; "
            "use the .safetensors release of this model.")
    try:
        return _parse(path)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ModelFileError(
            f"{role}: {path!r} is not a readable safetensors file ({e}). "
            "It may be truncated by an interrupted download, or not a model file; download it again.") from None


def check_safetensors(path: str, role: str) -> None:
    """Raise a ModelFileError naming `role` unless `path` is a complete safetensors file."""
    read_header(path, role)


def read_json(path: str, role: str, what: str) -> dict:
    """A JSON object from `path`, or a ModelFileError saying the file is broken."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{role}: {path!r} is not valid JSON ({e}); {what} must be a JSON object. "
                             "Download the file again.") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{role}: {path!r} holds a JSON {type(data).__name__}; {what} must be a JSON object.")
    return data


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
        weight_map = read_json(index, role, "a shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(v, str) and isinstance(k, str) for k, v in weight_map.items()):
            raise ModelFileError(f"{role}: {index!r} has no valid \"weight_map\" (tensor name -> shard file name); "
                                 "download the index again.")
        shards = [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
        absent = [s for s in shards if not os.path.isfile(s)]
        if absent:
            raise ModelFileError(f"{role}: {os.path.basename(index)!r} names {len(absent)} shard(s) that are not in "
                                 f"{folder!r}, e.g. {os.path.basename(absent[0])!r}; the download is incomplete.")
        return shards
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


def all_keys(paths: list[str], role: str) -> dict[str, dict]:
    """Checked header entries of every file, for deciding everything before reading any data."""
    out = {}
    for p in paths:
        out.update(read_header(p, role))
    return out


def iter_tensors(paths: list[str], role: str, wanted: Iterable[str] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from each file in turn, one tensor in memory at a time; only the names
    in `wanted` when given (the others are never read)."""
    wanted = None if wanted is None else set(wanted)
    for p in paths:
        with open_safetensors(p, role) as f:
            for k in f.keys():
                if wanted is None or k in wanted:
                    yield k, f.get_tensor(k)
