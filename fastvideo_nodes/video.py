"""Writing frames to a video file with PyAV, without ever destroying an existing file.

The output path is checked before any generation (`check_output_path`): a wrong extension or an
existing file would otherwise be found only after minutes of sampling. The video is written to a
temporary file in the same folder and moved over the target only when complete, so a full disk or
a kill mid-write leaves the old file (if any) intact.
"""
from __future__ import annotations

import logging
import numbers
import os
import uuid

import torch

from .errors import FastVideoError

log = logging.getLogger(__name__)

# Extension → (PyAV container format, codecs to try in order). H.264 where the container takes it.
CONTAINERS = {
    ".mp4": ("mp4", ("libx264", "mpeg4")),
    ".mov": ("mov", ("libx264", "mpeg4")),
    ".mkv": ("matroska", ("libx264", "mpeg4")),
    ".webm": ("webm", ("libvpx-vp9", "libvpx")),
}


def check_output_path(path: str, *, overwrite: bool = False, name: str = "output_path") -> str:
    """Raise FastVideoError unless a video can be written at path; returns the path."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in CONTAINERS:
        raise FastVideoError(f"{name}: {path!r} is not a video file name; end it in one of "
                             f"{', '.join(CONTAINERS)} (e.g. {os.path.splitext(path)[0] or 'output'}.mp4).")
    if os.path.isdir(path):
        raise FastVideoError(f"{name}: {path!r} is a folder; give a file name such as {os.path.join(path, 'out.mp4')}.")
    if os.path.lexists(path) and not overwrite:
        raise FastVideoError(f"{name}: {path!r} already exists; choose another name or allow overwriting "
                             f"(CLI: --overwrite, Python: overwrite=True).")
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.isdir(existing):
        if os.path.exists(existing):
            raise FastVideoError(f"{name}: {path!r} cannot be created: {existing!r} is a file, not a folder.")
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FastVideoError(f"{name}: {path!r} cannot be written: no write permission in {existing!r}.")
    return path


def check_fps(fps) -> int:
    if not isinstance(fps, numbers.Integral) or isinstance(fps, bool) or not 1 <= int(fps) <= 240:
        raise FastVideoError(f"fps must be a whole number from 1 to 240 (Wan 2.1 renders at 16), got {fps!r}.")
    return int(fps)


def write_video(frames: torch.Tensor, path: str, fps: int = 16, *, overwrite: bool = False) -> str:
    """frames: float [T,H,W,3] in 0..1 → a video (H.264 yuv420p in mp4/mov/mkv, VP9 in webm).

    Sizes are multiples of 16, so even, as yuv420p needs. Writes a temporary file next to the target
    and renames it over the target only when complete."""
    import av
    import numpy as np

    check_output_path(path, overwrite=overwrite)
    fps = check_fps(fps)
    ext = os.path.splitext(path)[1].lower()
    fmt, codecs = CONTAINERS[ext]
    codec = next((c for c in codecs if c in av.codecs_available), None)
    if codec is None:
        raise FastVideoError(f"output_path: this PyAV build has no encoder for {ext} ({', '.join(codecs)}); "
                             f"use .mp4.")
    data = (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.part{ext}")
    try:
        with av.open(tmp, mode="w", format=fmt) as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height = data.shape[2], data.shape[1]
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "18"}
            for frame in data:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    except BaseException:  # a full disk, an encoder error or SIGTERM: the target stays as it was
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    log.info("wrote %s (%d frames, %s)", path, len(data), codec)
    return path


def write_mp4(frames: torch.Tensor, path: str, fps: int = 16, *, overwrite: bool = False) -> str:
    """The older name of write_video (any supported container, despite the name)."""
    return write_video(frames, path, fps, overwrite=overwrite)


def read_video_info(path: str) -> tuple[int, int, int]:
    """(frames, height, width) of a video file, decoding every frame."""
    import av

    with av.open(path) as c:
        frames = [f for f in c.decode(video=0)]
    return len(frames), frames[0].height, frames[0].width
