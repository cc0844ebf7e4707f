"""VideoGenerator: the Python API over encode → sample → decode.

    gen = VideoGenerator.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")          # a diffusers folder
    gen = VideoGenerator.from_pretrained("wan2.1_t2v_1.3B_fp16.safetensors",    # or ComfyUI files
                                         text_encoder="umt5_xxl_fp16.safetensors", vae="wan_2.1_vae.safetensors")
    result = gen.generate_video("a red fox in the snow", seed=42, output_path="fox.mp4")

Components load lazily on first use and stay loaded.

LoRAs belong to a generator, not to the weights: `from_pretrained(..., loras=[(path, strength)])`,
`gen.with_loras([...])` (another generator on the same loaded weights) or `gen.set_loras([...])`.
The shared DiT is patched to the list of whichever generator samples, just before it samples and
under the shared lock (loading/lora.py merges in place and keeps the base, so a change never
reloads anything from disk); worker pools get the list with each job and patch their own DiTs.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..attention.sliding_tile import SlidingTileOptions
from ..errors import FastVideoError, ModelFileError
from ..models.wan_vae import model_to_raw
from .options import LoadOptions, parse_device
from .sampler import SamplingSettings, SamplingStats, check_finite_latents, denoise, initial_noise

logger = logging.getLogger(__name__)

def parse_gpu_ids(gpu_ids, name: str = "gpu_ids") -> list[int] | None:
    """"0,2" / [0, 2] → [0, 2]; None or "" → None (the first num_gpus GPUs)."""
    if gpu_ids is None:
        return None
    if isinstance(gpu_ids, str):
        parts = [p.strip() for p in gpu_ids.split(",") if p.strip()]  # "0,1," is fine
        if not all(p.isascii() and p.isdigit() for p in parts):
            raise FastVideoError(f"{name} must be comma-separated GPU indices such as 0,1 (or empty), "
                                 f"got {gpu_ids!r}.")
        ids = [int(p) for p in parts]
    else:
        try:
            ids = list(gpu_ids)
        except TypeError:
            ids = None
        if ids is None or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0
                                  for i in ids):
            raise FastVideoError(f"{name} must be a list of GPU indices such as [0, 1], got {gpu_ids!r}.")
        ids = [int(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise FastVideoError(f"{name} names a GPU twice: {ids}; each GPU can run one worker.")
    return ids or None


def parse_sigmas(value, name: str = "sigmas") -> tuple[float, ...] | None:
    """None, "" → None (steps and shift decide); "1, 0.9375, 0.8333" or a list of numbers → a tuple
    (the range and order are checked with the other sampling settings)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = [p.strip() for p in value.replace(";", ",").split(",") if p.strip()] if isinstance(value, str) else value
    try:
        out = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise FastVideoError(f"{name} must be numbers separated by commas, from 1 down towards 0 "
                             f"(e.g. 1, 0.9375, 0.8333, 0.625), got {value!r}.") from None
    if any(isinstance(p, bool) for p in parts):
        raise FastVideoError(f"{name} must be numbers, got {value!r}.")
    return out


def check_loras(loras, name: str = "loras") -> tuple[tuple[str, float], ...]:
    """[(path, strength), ...] → a checked tuple of (absolute path, float strength).

    Only what can be checked without a model: each file is a readable .safetensors (not a pickle)
    and each strength a finite number. Whether the LoRA fits the DiT is checked when it is merged."""
    from ..loading.files import check_safetensors
    from ..loading.lora import ROLE
    if loras is None:
        return ()
    if isinstance(loras, (str, os.PathLike)) or not isinstance(loras, (list, tuple)):
        raise FastVideoError(f"{name} must be a list of (path, strength) pairs such as "
                             f"[('lightx2v_lora.safetensors', 1.0)], got {loras!r}.")
    out = []
    for i, item in enumerate(loras):
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise FastVideoError(f"{name}[{i}] must be a (path, strength) pair, got {item!r}.")
        path, strength = item
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength):
            raise FastVideoError(f"{name}[{i}]: the strength must be a finite number (1.0 = as trained, "
                                 f"0 = off), got {strength!r}.")
        if not isinstance(path, (str, os.PathLike)):
            raise FastVideoError(f"{name}[{i}]: the path must be a file name, got {path!r}.")
        path = os.path.abspath(os.fspath(path))
        check_safetensors(path, ROLE)
        out.append((path, float(strength)))
    return tuple(out)


def _buffers_to(dit, device: torch.device) -> None:
    """Buffers live on the compute device, also in blocks whose weights stream from CPU memory; a
    LoRA merge may register a new fp8 scale next to a weight that rests in CPU memory."""
    for mod in dit.modules():
        for key, b in mod._buffers.items():
            if b is not None and b.device != device:
                mod._buffers[key] = b.to(device)


def check_prompt(text, name: str = "prompt") -> str:
    """A str the tokenizer can take: text that is valid UTF-8 (no lone surrogates such as '\\udcff')."""
    if not isinstance(text, str):
        raise FastVideoError(f"{name} must be text, got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FastVideoError(f"{name} is not valid UTF-8 text (character {e.start}: {text[e.start]!r}); "
                             "remove or retype that character.") from None
    return text


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
            raise ModelFileError(f"model: {model!r} does not exist. Give a Wan2.1 .safetensors file or a "
                                 "diffusers folder.")
        return cls(model, text_encoder, vae)

    def require(self, what: str) -> str:
        path = getattr(self, what)
        if path is None:
            flag = what.replace("_", "-")
            raise ModelFileError(f"{what}: not given. With a single-file model, name the {what.replace('_', ' ')} "
                                 f"file too (Python: {what}=..., CLI: --{flag} FILE).")
        return path


class _Components:
    """Loaded parts, shared by generators that differ only in run options (attention backend).

    The lock serialises runs on these parts: the models hold per-run state (the VAE's stream cache,
    offload hooks), so two threads on one set would corrupt each other's run."""
    dit = text_encoder = vae = pool = offload = None

    def __init__(self, lock: threading.RLock | None = None):
        self.lock = lock or threading.RLock()


class VideoGenerator:
    def __init__(self, files: ModelFiles, options: LoadOptions | None = None, *,
                 attention_backend: str | None = None, attention_options: SlidingTileOptions | None = None,
                 num_gpus: int = 1, gpu_ids: list[int] | None = None, loras=None, **load_keywords):
        """options: how the models load (see LoadOptions); loras and load_keywords as in from_pretrained."""
        self.files = files
        self.loras = check_loras(loras)
        self.options = LoadOptions.from_keywords(options, **load_keywords)
        self.device = self.options.torch_device
        self.dtype = self.options.dtype
        self.text_encoder_device = (parse_device(self.options.text_encoder_device, "text_encoder_device")
                                    if self.options.text_encoder_device else None)
        self.offload_note = None
        self.attention_options = attention_options
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

    def with_attention_backend(self, name: str | None,
                               options: SlidingTileOptions | None = None) -> VideoGenerator:
        """A generator that shares this one's loaded weights but uses another attention backend."""
        if name is not None:
            from ..attention import resolve_backend
            resolve_backend(name)
        if options is not None and not isinstance(options, SlidingTileOptions):
            raise FastVideoError(f"attention options must be SlidingTileOptions, got {type(options).__name__}.")
        other = copy.copy(self)
        other.attention_backend = name
        other.attention_options = options
        return other

    def with_loras(self, loras) -> VideoGenerator:
        """A generator that shares this one's loaded weights (nothing is read again from disk) but
        samples with these [(path, strength), ...] LoRAs; [] is the base model."""
        other = copy.copy(self)
        other.loras = check_loras(loras)
        return other

    def set_loras(self, loras):
        """Replace this generator's LoRA list. Applied at once when the DiT is loaded in this
        process (returns loading.lora's MergeReport), else at the next sampling (returns None)."""
        self.loras = check_loras(loras)
        with self._parts.lock:
            return self._sync_loras() if self._parts.dit is not None and self.num_gpus == 1 else None

    def _sync_loras(self):
        """Patch the in-process DiT (maybe shared with other generators) to this generator's LoRAs;
        returns the MergeReport, or None when it already carries exactly them. Call under the lock."""
        dit = self.dit
        if list(getattr(dit, "loras", [])) == list(self.loras):
            return None
        from ..loading.lora import set_loras
        report = set_loras(dit, self.loras)
        _buffers_to(dit, dit.text_embedding[0].weight.device)  # the device compile_blocks uses too
        return report

    @classmethod
    def from_pretrained(cls, model, *, text_encoder=None, vae=None, options: LoadOptions | None = None,
                        attention_backend: str | None = None, num_gpus: int = 1,
                        gpu_ids: list[int] | None = None, loras=None, **load_keywords) -> VideoGenerator:
        """model: a diffusers folder, or a DiT .safetensors with text_encoder= and vae= files.
        loras: [(path, strength), ...] merged into the DiT before it samples (see with_loras).
        options: a LoadOptions (device, precision, weight_storage, compile, gpu_memory_gb,
        text_encoder_device). Those fields may also be given as keywords (they replace the ones of
        `options`), as may the older dtype=, weight_dtype=torch.float8_e4m3fn and fp8_matmul=True."""
        options = LoadOptions.from_keywords(options, **load_keywords)
        return cls(ModelFiles.resolve(model, text_encoder, vae), options, attention_backend=attention_backend,
                   num_gpus=num_gpus, gpu_ids=gpu_ids, loras=loras)

    def with_parallel(self, num_gpus: int, gpu_ids: list[int] | None = None) -> VideoGenerator:
        """A generator whose sampling runs on a pool of `num_gpus` sequence-parallel workers; the
        text encoder and VAE stay shared with this one, in this process."""
        other = copy.copy(self)
        other.num_gpus, other.gpu_ids = int(num_gpus), parse_gpu_ids(gpu_ids)
        other._parts = _Components(self._parts.lock)  # shares the text encoder and VAE, so their lock too
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
            opts = self.options
            dit = load_dit(self.files.model, device="cpu" if budget is not None else self.device, dtype=self.dtype,
                           weight_dtype=opts.weight_dtype, fp8_matmul=opts.fp8_matmul)
            if budget is not None:
                from ..memory.offload import enable_block_offload
                self._parts.offload = enable_block_offload(dit, device=self.device, budget_gb=budget)
                self.offload_note = self._parts.offload.describe()
                logger.info("%s (GPU memory budget %.1f GB)", self.offload_note, budget)
            self._parts.dit = dit.compile_blocks() if opts.compile else dit
        return self._parts.dit

    def _offload_budget(self) -> float | None:
        """GB for the DiT when blocks must be offloaded, else None (all resident)."""
        if self.device.type != "cuda":
            return None
        if self.options.gpu_memory_gb:
            return self.options.gpu_memory_gb
        from ..loading.locate import locate
        files = locate(self.files.model, "transformer").files
        weights = sum(os.path.getsize(f) for f in files) * (2 if self.options.weight_storage == "as_stored" else 1)
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
                weight_dtype=self.options.weight_dtype)
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
        prompts = [check_prompt(p, f"prompts[{i}]" if len(prompts) > 1 else "prompt") for i, p in enumerate(prompts)]
        device = self.text_encoder_device or self.device
        with self._parts.lock:
            enc = self.text_encoder.to(device)
            try:
                with torch.inference_mode(), _friendly_oom():
                    return enc.encode(prompts).float().cpu()
            finally:
                if self.offload_text_encoder and device.type != "cpu":
                    enc.to("cpu")

    def check_settings(self, settings: SamplingSettings) -> SamplingSettings:
        """Every check that can run before any work: the settings, gpu_ids, and whether the size fits
        in memory for this DiT (its config comes from the file header when it is not loaded yet)."""
        from .size_check import check_fits
        settings.validate()
        if self.num_gpus > 1:
            parse_gpu_ids(self.gpu_ids)
        cfg = self.dit_config()
        check_fits(settings, cfg.dim, cfg.ffn_dim, self.dtype, self.device, num_gpus=self.num_gpus)
        return settings

    def sample(self, positive: torch.Tensor, negative: torch.Tensor | None, settings: SamplingSettings, *,
               callback: Callable | None = None, cancel: Callable[[], bool] | None = None,
               stats: SamplingStats | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings → raw VAE-space latents [1,16,T',H',W'] float32 on CPU, with this
        generator's LoRAs (merge seconds in stats.extra["lora_s"] when a merge ran).
        Raises FastVideoError for bad settings before any work, and for non-finite results."""
        self.check_settings(settings)
        noise = initial_noise(settings) if noise is None else noise
        with self._parts.lock:
            if self.num_gpus > 1:
                model_latents = self.pool().sample(noise, positive, negative, settings, callback=callback,
                                                   cancel=cancel, stats=stats,
                                                   attention_backend=self.attention_backend,
                                                   attention_options=self.attention_options, loras=self.loras)
            else:
                with _friendly_oom():
                    report = self._sync_loras()
                if report is not None and stats is not None:
                    stats.extra["lora_s"] = report.seconds
                with torch.inference_mode(), _friendly_oom():
                    model_latents = denoise(self.dit, noise, positive, negative, settings,
                                            attention_backend=self.attention_backend,
                                            attention_options=self.attention_options, callback=callback,
                                            cancel=cancel, stats=stats)
        return model_to_raw(check_finite_latents(model_latents.float().cpu()))

    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Raw VAE-space latents [1,16,T',H',W'] → frames float32 [T,H,W,3] in 0..1 on CPU."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[:2] != (1, 16):
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise FastVideoError(f"latents: expected a Wan 2.1 video latent [1,16,T,H,W], got {shape}.")
        if tile is not None and (isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or tile < 1):
            raise FastVideoError(f"tile must be a positive number of latent pixels (or None = whole frame), "
                                 f"got {tile!r}.")
        check_finite_latents(latents)
        with self._parts.lock, torch.inference_mode(), _friendly_oom():
            return self.vae.decode_frames(latents.to(self.device), tile=tile)

    def pool(self):
        """The sequence-parallel worker pool (started on first use, kept across runs)."""
        if self._parts.pool is None or not self._parts.pool.alive:  # a failed pool is replaced
            from ..parallel import WorkerPool
            self._parts.pool = WorkerPool(self.files.model, num_gpus=self.num_gpus, options=self.options,
                                          gpu_ids=self.gpu_ids)
        return self._parts.pool

    def close(self):
        """Stop the worker pool, if any (loaded in-process models are freed with the object)."""
        if self._parts.pool is not None:
            self._parts.pool.close()
            self._parts.pool = None

    def generate_video(self, prompt: str, *, negative_prompt: str | None = None, height: int = 480, width: int = 832,
                       num_frames: int = 81, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                       flow_shift: float | None = None, scheduler: str = "unipc", seed: int = 0,
                       sigmas=None, spacing: str = "default",
                       cfg_gate: float = 1.0, teacache_threshold: float = 0.0, teacache_mode: str = "default",
                       output_path: str | None = None, callback: Callable | None = None,
                       cancel: Callable[[], bool] | None = None, fps: int = 16,
                       overwrite: bool = False) -> GenerationResult:
        """Prompt → video. flow_shift None: 5.0 at 720p and above, else 3.0 (diffusers' presets).
        Few-step (distilled) models: scheduler "euler" or "lcm" with spacing="simple" (ComfyUI's,
        what the 4-step distill LoRAs were trained for), or sigmas=[1, 0.9375, 0.8333, 0.625] used as
        given (no shift; their count is the step count). guidance_scale 1 runs one forward per step
        and encodes no negative prompt.
        output_path: .mp4, .mkv, .mov or .webm; an existing file is refused unless overwrite=True, and
        it is replaced only once the new video is complete. Every input is checked before any work.
        Calls on one generator (and on those sharing its models) run one at a time."""
        if flow_shift is None and all(isinstance(v, numbers.Real) for v in (height, width)):
            flow_shift = 5.0 if height * width >= 720 * 1280 else 3.0
        settings = SamplingSettings(height=height, width=width, num_frames=num_frames, steps=num_inference_steps,
                                    guidance_scale=guidance_scale, shift=flow_shift, scheduler=scheduler, seed=seed,
                                    cfg_gate=cfg_gate, teacache_threshold=teacache_threshold,
                                    teacache_mode=teacache_mode, spacing=spacing, sigmas=parse_sigmas(sigmas))
        check_prompt(prompt, "prompt")
        if negative_prompt is not None:
            check_prompt(negative_prompt, "negative_prompt")
        if output_path:
            from ..video import check_fps, check_output_path
            check_output_path(output_path, overwrite=overwrite)
            check_fps(fps)
        self.check_settings(settings)
        if negative_prompt is None:
            from ..models.text_encoder import DEFAULT_NEGATIVE_PROMPT
            negative_prompt = DEFAULT_NEGATIVE_PROMPT
        with self._parts.lock:
            return self._generate(prompt, negative_prompt, settings, output_path, callback, cancel, fps, overwrite)

    def _generate(self, prompt, negative_prompt, settings, output_path, callback, cancel, fps,
                  overwrite) -> GenerationResult:
        guidance_scale = settings.guidance_scale
        timings = {}
        t0 = time.perf_counter()
        positive = self.encode_prompt(prompt)
        negative = self.encode_prompt(negative_prompt) if guidance_scale > 1.0 else None
        timings["encode_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = SamplingStats()
        latents = self.sample(positive, negative, settings, callback=callback, cancel=cancel, stats=stats)
        timings["sample_s"] = time.perf_counter() - t0  # includes lora_s
        if self.loras or "lora_s" in stats.extra:  # a merge ran, or the LoRAs were merged already (0)
            timings["lora_s"] = stats.extra.get("lora_s", 0.0)
        t0 = time.perf_counter()
        frames = self.decode(latents)
        timings["decode_s"] = time.perf_counter() - t0
        if output_path:
            from ..video import write_video
            write_video(frames, output_path, fps=fps, overwrite=overwrite)
        return GenerationResult(frames=frames, latents=latents, timings=timings, stats=stats, output_path=output_path)
