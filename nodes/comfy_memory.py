"""Our components as models ComfyUI's memory management knows about.

ComfyUI frees GPU memory for a model it is about to load by unloading others from its list of
loaded models (`comfy.model_management.current_loaded_models`). A component it does not know
about is invisible to that: a native loader later in the graph runs out of memory next to our
DiT, or we run out next to its models. `ComfyModel` lets ComfyUI see one of our modules: it
answers the questions ComfyUI's `LoadedModel` asks a ModelPatcher (size, what is loaded, where)
and obeys its load and unload calls by moving the whole module between its load device and
pinned CPU memory (memory/planner.PinnedHome). There is no partial loading: what is reported as
loaded is exactly what is on the device, all or nothing.

Before each phase, our code calls `ensure_loaded([...], memory_required)`; ComfyUI then evicts
whatever it must (theirs or ours) and moves the module in. ComfyUI holds these objects weakly, so
`adapter_for()` keeps one on the module itself: it lives exactly as long as the module.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from fastvideo_nodes.memory.planner import PinnedHome

log = logging.getLogger(__name__)

_ATTR = "_fastvideo_comfy_model"


class ComfyModel:
    """One of our nn.Modules, shaped like the ModelPatcher that ComfyUI's LoadedModel expects.

    Weights are treated as read-only while loaded (unloading drops the device copy instead of
    copying it back)."""

    parent = None  # not a clone of another patcher

    def __init__(self, module: nn.Module, load_device, name: str | None = None):
        self.model = module
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device("cpu")
        self.name = name or type(module).__name__
        self.home = PinnedHome(module)  # the module now points at its host copies
        self._size = self.home.nbytes
        self._loaded = False

    def __repr__(self) -> str:
        return f"ComfyModel({self.name}, {self._size / 2**30:.2f} GiB, loaded={self._loaded})"

    # What ComfyUI asks
    def model_size(self) -> int:
        return self._size

    def loaded_size(self) -> int:
        return self._size if self._loaded else 0

    def current_loaded_device(self) -> torch.device:
        return self.load_device if self._loaded else self.offload_device

    def model_dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    def model_patches_models(self) -> list:
        return []  # no patches that are models of their own

    def lowvram_patch_counter(self) -> int:
        return 0  # never partially loaded, so no weights patched on the fly

    def is_clone(self, other) -> bool:
        return getattr(other, "model", None) is self.model

    # What ComfyUI tells us to do
    def model_patches_to(self, device_or_dtype) -> None:
        pass  # no patches

    def partially_load(self, device, extra_memory=0, force_patch_weights: bool = False) -> int:
        """Load all of it (ComfyUI has already freed what it could; we cannot run half a module
        that is not built for streaming). Returns the bytes newly on the device."""
        if self._loaded:
            return 0
        self.home.to_device(self.load_device)
        self._loaded = True
        log.debug("%s loaded on %s by ComfyUI", self.name, self.load_device)
        return self._size

    def partially_unload(self, device, memory_to_free: int = 0) -> int:
        """No partial unloading: report nothing freed, so ComfyUI unloads all of it (detach)."""
        return 0

    def detach(self, unpatch_all: bool = True) -> nn.Module:
        # ComfyUI detaches with unpatch_all=False to re-register a model it keeps loaded.
        if unpatch_all and self._loaded:
            self.home.to_host()
            self._loaded = False
            log.debug("%s moved to %s by ComfyUI", self.name, self.offload_device)
        return self.model


def adapter_for(module: nn.Module, load_device, name: str | None = None) -> ComfyModel:
    """The module's one ComfyModel (made on first use; pass modules that are on the CPU)."""
    adapter = module.__dict__.get(_ATTR)
    if adapter is None or adapter.load_device != torch.device(load_device):
        if adapter is not None:
            adapter.detach()
        adapter = ComfyModel(module, load_device, name)
        module.__dict__[_ATTR] = adapter
    return adapter


def ensure_loaded(adapters: list[ComfyModel], memory_required: int = 0) -> None:
    """Have ComfyUI put these on their devices, evicting other models (theirs or ours) until the
    weights plus `memory_required` bytes of working memory fit."""
    import comfy.model_management as mm

    mm.load_models_gpu(adapters, memory_required=memory_required)


class ComfyHost:
    """The generator's memory host inside ComfyUI (VideoGenerator.set_memory_host): the text
    encoder and VAE become ComfyModels that ComfyUI loads before their phase and may evict for its
    own models; before sampling, ComfyUI frees room for the DiT's working memory.

    The DiT is not handed over: LoRAs are merged into its weights in place (loading/lora.py), and
    an evicted copy would come back without them. It stays ours (resident or block-streamed).

    budget: bytes to plan for (None: the generator measures free memory). minimal: the user asked
    ComfyUI for the least GPU memory (--novram); the least plan is then taken without a warning."""

    def __init__(self, budget: int | None = None, minimal: bool = False):
        self._budget = budget
        self.minimal = minimal

    def budget(self, device) -> int | None:
        return self._budget

    def use(self, module: nn.Module, device, name: str, memory_required: int) -> None:
        ensure_loaded([adapter_for(module, device, name)], memory_required=memory_required)

    def before_sampling(self, device, memory_required: int) -> None:
        import comfy.model_management as mm

        mm.free_memory(memory_required, torch.device(device))

    def release(self, module: nn.Module) -> None:
        """Out of ComfyUI's list and back to host memory; the adapter leaves the module (no cycle)."""
        adapter = module.__dict__.pop(_ATTR, None)
        if adapter is None:
            return
        adapter.detach()
        try:
            import comfy.model_management as mm
        except ImportError:
            return
        mm.current_loaded_models[:] = [lm for lm in mm.current_loaded_models if lm.model is not adapter]
