"""VideoGenerator: the Python API over encode → sample → decode.

    gen = VideoGenerator.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")          # a diffusers folder
    gen = VideoGenerator.from_pretrained("wan2.1_t2v_1.3B_fp16.safetensors",    # or ComfyUI files
                                         text_encoder="umt5_xxl_fp16.safetensors", vae="wan_2.1_vae.safetensors")
    result = gen.generate_video("a red fox in the snow", seed=42, output_path="fox.mp4")

Components load lazily on first use and stay loaded.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import FastVideoError, ModelFileError
from ..models.wan_vae import model_to_raw
from .sampler import SamplingSettings, SamplingStats, denoise, initial_noise

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(dtype, device: torch.device) -> torch.dtype:
    """None → bf16 on GPU, fp32 on CPU; strings as DTYPES."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise FastVideoError(f"dtype {dtype!r} is unknown; use bf16, fp16 or fp32.")
    return DTYPES[str(dtype).lower()]


def parse_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise FastVideoError(f"device {device!r} is not a valid torch device (use cpu, cuda or cuda:N).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastVideoError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu.")
    return device


@contextlib.contextmanager
def _friendly_oom():
    """CUDA out-of-memory → a FastVideoError naming the settings to change; the process stays usable."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        from ..memory.offload import out_of_memory_error
        raise out_of_memory_error(e) from None  # DecodeVAE: a tile_size (e.g. 32) also lowers the peak


@dataclass
class GenerationResult:
    frames: torch.Tensor          # float32 [T,H,W,3] in 0..1 (CPU)
    latents: torch.Tensor         # float32 raw VAE space [1,16,T',H',W'] (CPU)
    timings: dict = field(default_factory=dict)
    stats: SamplingStats | None = None
    output_path: str | None = None


@dataclass
class ModelFiles:
    """Where each component comes from; a diffusers folder supplies all three."""
    model: str
    text_encoder: str | None = None
    vae: str | None = None

    @classmethod
    def resolve(cls, model: str, text_encoder: str | None, vae: str | None) -> ModelFiles:
        model = os.fspath(model)
        if os.path.isdir(model):
            text_encoder = text_encoder or model
            vae = vae or model
        elif not os.path.exists(model):
            raise ModelFileError(f"model: {model!r} does not exist. Give a Wan2.1 .safetensors file or a diffusers folder.")
        return cls(model, text_encoder, vae)

    def require(self, what: str) -> str:
        path = getattr(self, what)
        if path is None:
            flag = what.replace("_", "-")
            raise ModelFileError(f"{what}: not given. With a single-file model, name the {what.replace('_', ' ')} "
                                 f"file too (Python: {what}=..., CLI: --{flag} FILE).")
        return path


class _Components:
    """Loaded parts, shared by generators that differ only in run options (attention backend)."""
    dit = text_encoder = vae = pool = offload = None


class VideoGenerator:
    def __init__(self, files: ModelFiles, *, device=None, dtype=None, attention_backend: str | None = None,
                 num_gpus: int = 1, weight_dtype: torch.dtype | None = None, gpu_ids: list[int] | None = None,
                 compile: bool = False, attention_options: dict | None = None,
                 gpu_memory_gb: float | None = None, text_encoder_device=None, fp8_matmul: bool = False):
        self.files = files
        self.fp8_matmul = bool(fp8_matmul)
        self.text_encoder_device = torch.device(text_encoder_device) if text_encoder_device else None
        self.gpu_memory_gb = gpu_memory_gb or None
        self.offload_note = None
        self.attention_options = attention_options or {}
        self.compile = compile
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype, self.device)
        self.weight_dtype = weight_dtype
        if attention_backend is not None:
            from ..attention import resolve_backend
            resolve_backend(attention_backend)  # fail early on an unknown or unavailable name
        self.attention_backend = attention_backend
        self.num_gpus = int(num_gpus)
        if self.num_gpus < 1:
            raise FastVideoError(f"num_gpus must be at least 1, got {num_gpus}.")
        self.gpu_ids = gpu_ids
        self.offload_text_encoder = True
        self._parts = _Components()

    def with_attention_backend(self, name: str | None, options: dict | None = None) -> VideoGenerator:
        """A generator that shares this one's loaded weights but uses another attention backend."""
        if name is not None:
            from ..attention import resolve_backend
            resolve_backend(name)
        other = copy.copy(self)
        other.attention_backend = name
        other.attention_options = dict(options or {})
        return other

    @classmethod
    def from_pretrained(cls, model, *, text_encoder=None, vae=None, device=None, dtype=None,
                        attention_backend: str | None = None, num_gpus: int = 1, weight_dtype=None,
                        gpu_ids: list[int] | None = None, compile: bool = False,
                        gpu_memory_gb: float | None = None, text_encoder_device=None,
                        fp8_matmul: bool = False) -> VideoGenerator:
        """model: a diffusers folder, or a DiT .safetensors with text_encoder= and vae= files.
        compile: torch.compile the DiT blocks (first run of a shape pays the warm-up).
        gpu_memory_gb: GPU memory the DiT may use; blocks beyond it stream from CPU memory
        (None/0: all resident when it fits the free memory, else fit it automatically).
        text_encoder_device: where prompts are encoded ("cpu" for cards too small for UMT5-XXL);
        default the main device, with the encoder moved back to CPU after each encoding.
        fp8_matmul: the DiT's block linears store e4m3fn weights (one scale per channel) and multiply
        on fp8 tensor cores with per-token activation scales (compute capability 8.9+; lossy, faster)."""
        return cls(ModelFiles.resolve(model, text_encoder, vae), device=device, dtype=dtype,
                   attention_backend=attention_backend, num_gpus=num_gpus, weight_dtype=weight_dtype, gpu_ids=gpu_ids,
                   compile=compile, gpu_memory_gb=gpu_memory_gb, text_encoder_device=text_encoder_device,
                   fp8_matmul=fp8_matmul)

    def with_parallel(self, num_gpus: int, gpu_ids: list[int] | None = None) -> VideoGenerator:
        """A generator whose sampling runs on a pool of `num_gpus` sequence-parallel workers; the
        text encoder and VAE stay shared with this one, in this process."""
        other = copy.copy(self)
        other.num_gpus, other.gpu_ids = int(num_gpus), gpu_ids
        other._parts = _Components()
        other._parts.text_encoder, other._parts.vae = self._parts.text_encoder, self._parts.vae
        return other

    def dit_config(self):
        """The DiT architecture (heads, layers, …), read from the file headers."""
        if self._parts.dit is not None:
            return self._parts.dit.cfg
        from ..loading.dit import read_dit_config
        return read_dit_config(self.files.model)

    # -- components, loaded on first use

    @property
    def dit(self):
        if self._parts.dit is None:
            from ..loading.dit import load_dit
            budget = self._offload_budget()
            dit = load_dit(self.files.model, device="cpu" if budget is not None else self.device, dtype=self.dtype,
                           weight_dtype=self.weight_dtype, fp8_matmul=self.fp8_matmul)
            if budget is not None:
                from ..memory.offload import enable_block_offload
                self._parts.offload = enable_block_offload(dit, device=self.device, budget_gb=budget)
                self.offload_note = self._parts.offload.describe()
                print(f"[FastVideo] {self.offload_note} (GPU memory budget {budget:.1f} GB)")
            self._parts.dit = dit.compile_blocks() if self.compile else dit
        return self._parts.dit

    def _offload_budget(self) -> float | None:
        """GB for the DiT when blocks must be offloaded, else None (all resident)."""
        if self.device.type != "cuda":
            return None
        if self.gpu_memory_gb:
            return float(self.gpu_memory_gb)
        from ..loading.locate import locate
        files = locate(self.files.model, "transformer").files
        weights = sum(os.path.getsize(f) for f in files) * (2 if self.weight_dtype is None and not self.fp8_matmul else 1)
        free = torch.cuda.mem_get_info(self.device)[0]
        return None if weights < 0.7 * free else 0.9 * free / 2**30

    @property
    def text_encoder(self):
        if self._parts.text_encoder is None:
            from ..loading.text_encoder import load_text_encoder
            # Loaded on CPU and moved for each encoding: the 11 GB encoder never sits next to the DiT.
            on_cpu = (self.text_encoder_device or self.device).type == "cpu"
            self._parts.text_encoder = load_text_encoder(
                self.files.require("text_encoder"), device="cpu",
                dtype=torch.bfloat16 if on_cpu and self.device.type == "cuda" else self.dtype,
                weight_dtype=self.weight_dtype)
        return self._parts.text_encoder

    @property
    def vae(self):
        if self._parts.vae is None:
            from ..loading.vae import load_vae
            self._parts.vae = load_vae(self.files.require("vae"), device=self.device, dtype=self.dtype)
        return self._parts.vae

    # -- the three stages

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt → text embeddings [1, 512, dim] float32 on CPU."""
        return self.encode_prompts([prompt])

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts → [B, 512, dim] float32 on CPU. With offload_text_encoder (default) the encoder
        goes back to CPU afterwards, so that the DiT has the GPU to itself."""
        device = self.text_encoder_device or self.device
        enc = self.text_encoder.to(device)
        try:
            with torch.inference_mode(), _friendly_oom():
                return enc.encode(list(prompts)).float().cpu()
        finally:
            if self.offload_text_encoder and device.type != "cpu":
                enc.to("cpu")

    def sample(self, positive: torch.Tensor, negative: torch.Tensor | None, settings: SamplingSettings, *,
               callback: Callable | None = None, cancel: Callable[[], bool] | None = None,
               stats: SamplingStats | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings → raw VAE-space latents [1,16,T',H',W'] float32 on CPU."""
        settings.validate()
        noise = initial_noise(settings) if noise is None else noise
        if self.num_gpus > 1:
            model_latents = self.pool().sample(noise, positive, negative, settings, callback=callback, cancel=cancel,
                                               stats=stats, attention_backend=self.attention_backend,
                                               attention_options=self.attention_options)
        else:
            with torch.inference_mode(), _friendly_oom():
                model_latents = denoise(self.dit, noise, positive, negative, settings,
                                        attention_backend=self.attention_backend,
                                        attention_options=self.attention_options, callback=callback, cancel=cancel,
                                        stats=stats)
        return model_to_raw(model_latents.float().cpu())

    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Raw VAE-space latents [1,16,T',H',W'] → frames float32 [T,H,W,3] in 0..1 on CPU."""
        with torch.inference_mode(), _friendly_oom():
            return self.vae.decode_frames(latents.to(self.device), tile=tile)

    def pool(self):
        """The sequence-parallel worker pool (started on first use, kept across runs)."""
        if self._parts.pool is None or not self._parts.pool.alive:  # a failed pool is replaced
            from ..parallel import WorkerPool
            self._parts.pool = WorkerPool(self.files.model, num_gpus=self.num_gpus, device=self.device,
                                          dtype=self.dtype, weight_dtype=self.weight_dtype, gpu_ids=self.gpu_ids,
                                          fp8_matmul=self.fp8_matmul)
        return self._parts.pool

    def close(self):
        """Stop the worker pool, if any (loaded in-process models are freed with the object)."""
        if self._parts.pool is not None:
            self._parts.pool.close()
            self._parts.pool = None

    def generate_video(self, prompt: str, *, negative_prompt: str | None = None, height: int = 480, width: int = 832,
                       num_frames: int = 81, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                       flow_shift: float | None = None, scheduler: str = "unipc", seed: int = 0,
                       cfg_gate: float = 1.0, teacache_threshold: float = 0.0, teacache_mode: str = "default",
                       output_path: str | None = None, callback: Callable | None = None,
                       cancel: Callable[[], bool] | None = None, fps: int = 16) -> GenerationResult:
        """Prompt → video. flow_shift None: 5.0 at 720p and above, else 3.0 (diffusers' presets)."""
        if flow_shift is None:
            flow_shift = 5.0 if height * width >= 720 * 1280 else 3.0
        settings = SamplingSettings(height=height, width=width, num_frames=num_frames, steps=num_inference_steps,
                                    guidance_scale=guidance_scale, shift=flow_shift, scheduler=scheduler, seed=seed,
                                    cfg_gate=cfg_gate, teacache_threshold=teacache_threshold,
                                    teacache_mode=teacache_mode).validate()
        if negative_prompt is None:
            from ..models.text_encoder import DEFAULT_NEGATIVE_PROMPT
            negative_prompt = DEFAULT_NEGATIVE_PROMPT
        timings = {}
        t0 = time.perf_counter()
        positive = self.encode_prompt(prompt)
        negative = self.encode_prompt(negative_prompt) if guidance_scale > 1.0 else None
        timings["encode_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = SamplingStats()
        latents = self.sample(positive, negative, settings, callback=callback, cancel=cancel, stats=stats)
        timings["sample_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        frames = self.decode(latents)
        timings["decode_s"] = time.perf_counter() - t0
        if output_path:
            from ..video import write_mp4
            write_mp4(frames, output_path, fps=fps)
        return GenerationResult(frames=frames, latents=latents, timings=timings, stats=stats, output_path=output_path)
