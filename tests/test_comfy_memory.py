"""ComfyModel against the real comfy.model_management (CPU), and its contract without ComfyUI."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from nodes.comfy_memory import ComfyModel, adapter_for, ensure_loaded


def small_module(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def ptrs(m: nn.Module) -> list[int]:
    return [p.data_ptr() for p in m.parameters()]


def test_reports_sizes_and_moves_all_or_nothing():
    m = small_module()
    want = {k: v.clone() for k, v in m.state_dict().items()}
    a = ComfyModel(m, "cpu", name="tiny")
    size = sum(p.numel() * 4 for p in m.parameters())
    assert (a.model_size(), a.loaded_size(), a.current_loaded_device().type) == (size, 0, "cpu")
    assert a.model_dtype() == torch.float32 and a.model_patches_models() == [] and a.lowvram_patch_counter() == 0
    home = ptrs(m)
    assert a.partially_load(a.load_device, extra_memory=1) == size  # all of it, whatever the offer
    assert a.loaded_size() == size and a.partially_load(a.load_device, 10**12) == 0
    assert not set(ptrs(m)) & set(home)  # working copies on the load device
    assert a.partially_unload(a.offload_device, 10) == 0  # no partial unload: ComfyUI then detaches
    assert a.loaded_size() == size
    a.detach(unpatch_all=False)  # ComfyUI re-registering a loaded model: stays loaded
    assert a.loaded_size() == size
    assert a.detach() is m and a.loaded_size() == 0 and ptrs(m) == home
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    assert a.is_clone(ComfyModel(m, "cpu")) and not a.is_clone(ComfyModel(small_module(), "cpu"))


def test_adapter_for_keeps_one_adapter_on_the_module():
    m = small_module()
    a = adapter_for(m, "cpu")
    assert adapter_for(m, "cpu") is a
    assert "tiny" not in repr(a) and "Sequential" in repr(a)
    assert adapter_for(m, "meta") is not a  # another device: a new adapter


@pytest.fixture
def mm():
    """The real comfy.model_management on CPU, with an empty list of loaded models."""
    path = os.environ["COMFYUI_PATH"]
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    assert mm.get_torch_device().type == "cpu"
    mm.unload_all_models()
    yield mm
    mm.unload_all_models()


def loaded(mm) -> list:
    return [lm.model for lm in mm.current_loaded_models]


@pytest.mark.comfyui
def test_comfyui_loads_unloads_and_reloads_ours(mm):
    m = small_module()
    x = torch.randn(3, 16)
    want = m(x)
    a = adapter_for(m, mm.get_torch_device(), "tiny")
    home = ptrs(m)

    ensure_loaded([a], memory_required=1024)
    assert loaded(mm) == [a] and a.loaded_size() == a.model_size()
    assert not set(ptrs(m)) & set(home)
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    ensure_loaded([a])  # loading again while loaded: still one entry, still loaded
    assert loaded(mm) == [a] and a.loaded_size() == a.model_size()

    mm.unload_all_models()  # ComfyUI evicts everything: our detach runs, the module goes home
    assert loaded(mm) == [] and a.loaded_size() == 0 and ptrs(m) == home

    ensure_loaded([a])
    assert loaded(mm) == [a] and a.loaded_size() == a.model_size()
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)


@pytest.mark.comfyui
def test_free_memory_evicts_ours_for_another_model(mm):
    ours, theirs = small_module(0), small_module(1)
    a = adapter_for(ours, mm.get_torch_device(), "ours")
    b = adapter_for(theirs, mm.get_torch_device(), "theirs")
    ensure_loaded([a])
    ensure_loaded([b])
    assert set(loaded(mm)) == {a, b}
    # Ask for more than this machine has, keeping theirs: ours is unloaded, theirs stays.
    keep = [lm for lm in mm.current_loaded_models if lm.model is b]
    mm.free_memory(1e30, mm.get_torch_device(), keep_loaded=keep)
    assert loaded(mm) == [b] and a.loaded_size() == 0 and b.loaded_size() == b.model_size()
    mm.unload_all_models()
    assert b.loaded_size() == 0


@pytest.mark.comfyui
def test_a_dropped_module_leaves_comfyuis_list(mm):
    import gc
    m = small_module()
    ensure_loaded([adapter_for(m, mm.get_torch_device())])
    assert len(mm.current_loaded_models) == 1
    del m
    gc.collect()  # module and adapter form a cycle; ComfyUI's finalizer then drops the entry
    mm.cleanup_models()
    assert mm.current_loaded_models == []
