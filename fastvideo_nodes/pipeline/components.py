"""The files a generator is made from and the loaded parts it shares.

Generators made from the same files and load options (with_loras, with_attention_backend,
with_parallel, or a second from_pretrained) share one `Parts`: the weights load once, runs on them
are serialised by its lock, and the last generator to go frees them (the registry holds them weakly).
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from ..errors import ModelFileError
from .options import LoadOptions
from .prompt_cache import PromptCache


@dataclass
class ModelFiles:
    """Where each component comes from; a diffusers folder supplies all of them (the image encoder
    only for image-to-video: its image_encoder/ folder)."""
    model: str
    text_encoder: str | None = None
    vae: str | None = None
    image_encoder: str | None = None
    low_noise_model: str | None = None  # Wan2.2 A14B: the low-noise expert (model is the high-noise one)

    @classmethod
    def resolve(cls, model: str, text_encoder: str | None, vae: str | None,
                image_encoder: str | None = None, low_noise_model: str | None = None) -> ModelFiles:
        model = os.fspath(model)
        if low_noise_model is not None:
            low_noise_model = os.fspath(low_noise_model)
            if not os.path.exists(low_noise_model):
                raise ModelFileError(f"low_noise_model: {low_noise_model!r} does not exist. Give the low-noise "
                                     "expert of Wan2.2 A14B (wan2.2_t2v_low_noise_14B_*.safetensors).")
        if os.path.isdir(model):
            text_encoder = text_encoder or model
            vae = vae or model
            if image_encoder is None and os.path.isdir(os.path.join(model, "image_encoder")):
                image_encoder = model
            if low_noise_model is None and os.path.isdir(os.path.join(model, "transformer_2")):
                low_noise_model = os.path.join(model, "transformer_2")  # a Wan2.2 A14B diffusers folder
        elif not os.path.exists(model):
            raise ModelFileError(f"model: {model!r} does not exist. Give a Wan2.1 .safetensors file or a "
                                 "diffusers folder.")
        return cls(model, text_encoder, vae, None if image_encoder is None else os.fspath(image_encoder),
                   low_noise_model)

    def require(self, what: str) -> str:
        path = getattr(self, what)
        if path is None:
            flag = what.replace("_", "-")
            raise ModelFileError(f"{what}: not given. With a single-file model, name the {what.replace('_', ' ')} "
                                 f"file too (Python: {what}=..., CLI: --{flag} FILE).")
        return path


class Parts:
    """Loaded parts, shared by generators made from the same files and load options.

    The lock serialises runs on these parts: the models hold per-run state (the VAE's stream cache,
    offload hooks), so two threads on one set would corrupt each other's run. `plan` is the memory
    plan the parts are placed by; `homes` the pinned host copies of parts moved in for their phase."""

    def __init__(self, lock: threading.RLock | None = None):
        self.lock = lock or threading.RLock()
        self.dit: Any = None
        self.text_encoder: Any = None
        self.vae: Any = None
        self.image_encoder: Any = None  # models.clip_vision.ImageEncoder (image-to-video)
        self.dit_low: Any = None  # Wan2.2 A14B: the low-noise expert
        self.experts: Any = None  # pipeline/experts.Experts over dit and dit_low, placed by the plan
        self.offload: Any = None
        self.pools: dict[tuple, Any] = {}
        self.plan: Any = None
        self.sizes: Any = None
        self.budget: int | None = None
        self.homes: dict[str, Any] = {}
        self.host: Any = None  # a memory host (ComfyUI's model management), see set_memory_host
        self.prompts = PromptCache()
        self.load_s = 0.0
        self.warmup_s = 0.0  # of load_s: load()'s warm-ups (pipeline/warmup.py)
        self.warmed: set[tuple] = set()  # (shape, attention backend, exact steps) warmed up on these parts

    def release(self) -> None:
        """Drop every loaded part and stop every pool; using them again loads them again."""
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
        if self.experts is not None:
            self.experts.release()
        if self.offload is not None:
            self.offload.disable(to="cpu")  # hooks off, blocks to host memory (then dropped)
        if self.host is not None:
            for part in (self.text_encoder and self.text_encoder.model, self.vae):
                if part is not None:
                    self.host.release(part)
        if self.text_encoder is not None:
            self.prompts.forget(self.text_encoder)
        self.dit = self.text_encoder = self.vae = self.image_encoder = self.offload = self.plan = None
        self.dit_low = self.experts = None
        self.homes.clear()
        self.warmed.clear()


# Parts by (files, options), held weakly: the registry never keeps weights no generator uses.
_SHARED: weakref.WeakValueDictionary[tuple, Parts] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def shared_parts(files: ModelFiles, options: LoadOptions) -> Parts:
    def norm(p):
        return None if p is None else os.path.abspath(os.fspath(p))
    key = (norm(files.model), norm(files.text_encoder), norm(files.vae), norm(files.image_encoder),
           norm(files.low_noise_model), options)
    with _SHARED_LOCK:
        parts = _SHARED.get(key)
        if parts is None:
            parts = _SHARED[key] = Parts()
        return parts


class LoadTimer:
    """Adds the seconds spent inside to parts.load_s."""

    def __init__(self, parts: Parts):
        self.parts = parts

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.parts.load_s += time.perf_counter() - self.t0
