"""Writing frames to an mp4 with PyAV."""
from __future__ import annotations

import os

import torch


def write_mp4(frames: torch.Tensor, path: str, fps: int = 16) -> str:
    """frames: float [T,H,W,3] in 0..1 → H.264 mp4 (yuv420p; sizes are multiples of 16 so they are even)."""
    import av
    import numpy as np

    data = (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(path, mode="w") as container:
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
    return path


def read_video_info(path: str) -> tuple[int, int, int]:
    """(frames, height, width) of a video file, decoding every frame."""
    import av

    with av.open(path) as c:
        frames = [f for f in c.decode(video=0)]
    return len(frames), frames[0].height, frames[0].width
