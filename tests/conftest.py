"""Shared fixtures and markers.

Markers: `gpu` (needs CUDA; skipped without it, `pytest -m gpu` selects every CUDA test), `slow`
(slower CPU tests; `-m "not slow"` for a quick run), `comfyui` (needs a real ComfyUI checkout named
by COMFYUI_PATH; skipped otherwise).
"""
from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs CUDA")
    no_comfy = pytest.mark.skip(reason="COMFYUI_PATH is not set")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "comfyui" in item.keywords and not os.environ.get("COMFYUI_PATH"):
            item.add_marker(no_comfy)


@pytest.fixture(scope="session")
def tiny_model_set(tmp_path_factory):
    """One tiny model set (seed 0) for the whole run: a diffusers folder and the same weights as
    ComfyUI single files in fp16 and fp32 (see fastvideo_nodes/testing/folders.py)."""
    pytest.importorskip("diffusers")
    from fastvideo_nodes.testing.folders import build_model_set
    return build_model_set(str(tmp_path_factory.mktemp("tiny_set")), seed=0)
