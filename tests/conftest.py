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


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    """A tiny random DiT as an original-layout fp32 single file (for the worker-pool tests)."""
    from fastvideo_nodes.testing.dit import TINY_DIT, random_dit, save_original
    return save_original(random_dit(TINY_DIT, seed=1).state_dict(),
                         str(tmp_path_factory.mktemp("dit") / "dit.safetensors"), dtype=None)


@pytest.fixture(scope="module")
def pool(dit_file):
    """Two CPU (gloo) sequence-parallel workers over `dit_file`, closed after the module."""
    from fastvideo_nodes.parallel import WorkerPool
    p = WorkerPool(dit_file, num_gpus=2, device="cpu", dtype=torch.float32)
    yield p
    p.close()


@pytest.fixture(scope="session")
def tiny_model_set(tmp_path_factory):
    """One tiny model set (seed 0) for the whole run: a diffusers folder and the same weights as
    ComfyUI single files in fp16 and fp32 (see fastvideo_nodes/testing/folders.py)."""
    pytest.importorskip("diffusers")
    from fastvideo_nodes.testing.folders import build_model_set
    return build_model_set(str(tmp_path_factory.mktemp("tiny_set")), seed=0)


class _Sampled(Exception):
    """Raised by the fake sample of `sampling_settings`: the call stops once its settings are known."""


@pytest.fixture
def sampling_settings(monkeypatch):
    """The SamplingSettings a generate_video(...) call hands to sample, without sampling:
    sampling_settings(gen, prompt, **call_kwargs)."""
    def run(gen, *args, **kwargs):
        seen = {}

        def capture(positive, negative, settings, **_):
            seen["settings"] = settings
            raise _Sampled
        monkeypatch.setattr(gen, "sample", capture)
        with pytest.raises(_Sampled):
            gen.generate_video(*args, **kwargs)
        return seen["settings"]
    return run
