"""VideoGenerator: the Python API over encode → sample → decode.

    gen = VideoGenerator.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")          # a diffusers folder
    gen = VideoGenerator.from_pretrained("wan2.1_t2v_1.3B_fp16.safetensors",    # or ComfyUI files
                                         text_encoder="umt5_xxl_fp16.safetensors", vae="wan_2.1_vae.safetensors")
    result = gen.generate_video("a red fox in the snow", seed=42, output_path="fox.mp4")

    gen = VideoGenerator.from_pretrained("wan2.1_i2v_480p_14B_fp16.safetensors", text_encoder=..., vae=...,
                                         image_encoder="clip_vision_h.safetensors")  # image-to-video
    result = gen.generate_video("the fox turns its head", image="fox.png")

    with VideoGenerator.from_pretrained(...) as gen:                          # close() frees it all
        gen.load()                                                             # optional: load now

Components load on first use (or all at once in `load()`, timed apart, with a warm-up that builds the
kernels of the shape's first step so that it costs what a later one does) and stay where the memory
plan put them (memory/planner.py decides, memory/placement.py carries it out): with room for
everything, nothing moves between calls; else DiT blocks stream and the VAE or text encoder move in
from pinned memory only for their phase. Loaded parts are shared by every generator made from the
same files and options (pipeline/components.py, a weak registry: the last generator to go frees
them), and so are their cached prompt embeddings. The image side of a run is pipeline/conditioning.py,
the two experts of Wan2.2 A14B pipeline/experts.py, the shared input checks pipeline/inputs.py.

LoRAs belong to a generator, not to the weights: `from_pretrained(..., loras=[(path, strength)])`,
`gen.with_loras([...])` (another generator on the same loaded weights) or `gen.set_loras([...])`.
The shared DiT is patched to the list of whichever generator samples, just before it samples and
under the shared lock (loading/lora.py merges in place and keeps the base, so a change never
reloads anything from disk); worker pools get the list with each job and patch their own DiTs.
"""
from __future__ import annotations

import copy
import logging
import numbers
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..attention import AttentionOptions
from ..attention.sliding_tile import SlidingTileOptions
from ..attention.video_sparse import VideoSparseOptions
from ..errors import FastVideoError, ModelFileError
from ..memory.placement import Placement, buffers_to, friendly_oom
from ..memory.planner import VideoShape
from ..models.wan_vae import model_to_raw
from . import conditioning, ti2v
from .components import LoadTimer, ModelFiles, shared_parts
from .conditioning import ImageCondition
from .inputs import check_loras, check_prompt, parse_gpu_ids, parse_sigmas
from .options import LoadOptions
from .sampler import SamplingSettings, SamplingStats, check_finite_latents, denoise, initial_noise

logger = logging.getLogger(__name__)



@dataclass
class GenerationResult:
    frames: torch.Tensor          # float32 [T,H,W,3] in 0..1 (CPU)
    latents: torch.Tensor         # float32 raw VAE space [1,16,T',H',W'] (CPU)
    timings: dict = field(default_factory=dict)
    stats: SamplingStats | None = None
    output_path: str | None = None
    attention: dict | None = None  # the backend asked for, and what `auto` chose and why (see attention_used)






def _latent_shape(latents: torch.Tensor) -> VideoShape:
    t, h, w = latents.shape[2:]
    s = 16 if latents.shape[1] == 48 else 8  # Wan 2.2 VAE: 48 channels at 1/16
    return VideoShape(h * s, w * s, (t - 1) * 4 + 1, vae_stride=s)


class VideoGenerator:
    def __init__(self, files: ModelFiles, options: LoadOptions | None = None, *,
                 attention_backend: str | None = None, attention_options: AttentionOptions | None = None,
                 num_gpus: int = 1, gpu_ids: list[int] | None = None, loras=None, loras_low=None,
                 exact_attention_steps: int = 0, **load_keywords):
        """options: how the models load (see LoadOptions); loras, loras_low and load_keywords as in from_pretrained.
        exact_attention_steps N: with an 8-bit attention backend, exact attention on the first and last N steps."""
        self.files = files
        self.loras, self.loras_low = self._lora_lists(loras, loras_low)
        self.options = LoadOptions.from_keywords(options, **load_keywords)
        self.device = self.options.torch_device
        self.dtype = self.options.dtype
        self.attention_options = attention_options
        if attention_backend is not None:
            from ..attention import resolve_backend
            resolve_backend(attention_backend)  # fail early on an unknown or unavailable name
        self.attention_backend = attention_backend
        from ..attention import check_exact_steps
        self.exact_attention_steps = check_exact_steps(exact_attention_steps)
        self.num_gpus = int(num_gpus)
        if self.num_gpus < 1:
            raise FastVideoError(f"num_gpus must be at least 1, got {num_gpus}.")
        self.gpu_ids = gpu_ids
        if files.low_noise_model is not None:
            from ..loading.dit import read_dit_config
            from .experts import check_pair
            check_pair(read_dit_config(files.model), read_dit_config(files.low_noise_model), files.model,
                       files.low_noise_model)
        self._parts = shared_parts(files, self.options)
        self.placement = Placement(self._parts, files, self.options)

    def with_attention_backend(self, name: str | None, options: AttentionOptions | None = None,
                               exact_steps: int = 0) -> VideoGenerator:
        """A generator that shares this one's loaded weights but uses another attention backend
        (exact_steps: the hybrid schedule's N, see exact_attention_steps)."""
        from ..attention import check_exact_steps, resolve_backend
        check_exact_steps(exact_steps, "exact_steps")
        if name is not None:
            resolve_backend(name)
        if options is not None and not isinstance(options, (SlidingTileOptions, VideoSparseOptions)):
            raise FastVideoError(f"attention options must be SlidingTileOptions or VideoSparseOptions, "
                                 f"got {type(options).__name__}.")
        other = copy.copy(self)
        other.attention_backend = name
        other.attention_options = options
        other.exact_attention_steps = exact_steps
        return other

    def _lora_lists(self, loras, loras_low) -> tuple[tuple[tuple[str, float], ...], tuple[tuple[str, float], ...]]:
        """The checked (loras, loras_low); loras_low only for a model with a low-noise expert."""
        if loras_low and self.files.low_noise_model is None:
            raise FastVideoError(f"loras_low (CLI: --lora-low): only a two-expert model (Wan2.2 A14B, loaded with "
                                 f"low_noise_model) has a low-noise expert; {os.path.basename(self.files.model)!r} "
                                 "has one DiT. Give its LoRAs in loras (CLI: --lora).")
        return check_loras(loras), check_loras(loras_low, "loras_low")

    def with_loras(self, loras, loras_low=None) -> VideoGenerator:
        """A generator that shares this one's loaded weights (nothing is read again from disk) but
        samples with these [(path, strength), ...] LoRAs; [] is the base model. Wan2.2 A14B: loras go
        to the high-noise expert, loras_low to the low-noise one (None or []: none there)."""
        other = copy.copy(self)
        other.loras, other.loras_low = self._lora_lists(loras, loras_low)
        return other

    def set_loras(self, loras, loras_low=None):
        """Replace this generator's LoRA lists (as with_loras). Applied at once when the DiT is loaded
        in this process (returns loading.lora's MergeReport, both experts' together), else at the
        next sampling (returns None)."""
        self.loras, self.loras_low = self._lora_lists(loras, loras_low)
        with self._parts.lock:
            return self._sync_loras() if self._parts.dit is not None and self.num_gpus == 1 else None

    def _sync_loras(self):
        """Patch the in-process DiT(s) (maybe shared with other generators) to this generator's LoRAs,
        each expert to its own list; returns the MergeReport, or None when they already carry exactly
        them. Call under the lock."""
        from ..loading.lora import MergeReport, set_loras
        parts = self._parts
        two = self.files.low_noise_model is not None
        pairs = [(self.dit, self.loras)] + ([(self.dit_low, self.loras_low)] if two else [])
        todo = [(dit, list(want)) for dit, want in pairs if list(getattr(dit, "loras", [])) != list(want)]
        if not todo:
            return None
        if parts.experts is not None and parts.experts.homes is not None:
            # Swapped or streamed experts run on device copies of their pinned homes: merge at home
            # (in place, into the homes' own tensors), then place them again (no copy: already pinned).
            parts.experts.release()
            parts.experts = None
        room = self.placement.spare_gpu_bytes() // (2 if two else 1)  # base copies of both experts
        reports = []
        for dit, want in todo:
            reports.append(set_loras(dit, want, backup_room=room))
            buffers_to(dit, dit.text_embedding[0].weight.device)  # the device compile_blocks uses too
        if parts.offload is not None and parts.experts is None:
            parts.offload.drop_prefetched()  # a streamed block fetched ahead holds the unmerged weights
        if len(reports) == 1:
            return reports[0]
        return MergeReport([r for m in reports for r in m.loras], sum(m.patched for m in reports),
                           sum(m.seconds for m in reports))

    @classmethod
    def from_pretrained(cls, model, *, text_encoder=None, vae=None, image_encoder=None, low_noise_model=None,
                        options: LoadOptions | None = None, attention_backend: str | None = None,
                        num_gpus: int = 1, gpu_ids: list[int] | None = None, loras=None, loras_low=None,
                        exact_attention_steps: int = 0,
                        **load_keywords) -> VideoGenerator:
        """model: a diffusers folder, or a DiT .safetensors with text_encoder= and vae= files.
        image_encoder: the CLIP vision file of an image-to-video model (clip_vision_h.safetensors);
        a diffusers I2V folder brings its own image_encoder/.
        low_noise_model: Wan2.2 A14B's low-noise expert file (wan2.2_t2v_low_noise_14B_*.safetensors;
        model is then the high-noise one); a diffusers A14B folder brings its own transformer_2/.
        loras: [(path, strength), ...] merged into the DiT before it samples (see with_loras); on
        Wan2.2 A14B into the high-noise expert, and loras_low into the low-noise one (LoRAs such as
        Wan2.2 Lightning ship as a HIGH and a LOW file).
        exact_attention_steps N: with an 8-bit attention backend (SAGE_ATTN, INT8_ATTN, KITCHEN_INT8,
        or one `auto` picks), exact attention on the first and last N steps (0: 8-bit throughout).
        options: a LoadOptions (device, precision, weight_storage, compile, gpu_memory_gb,
        text_encoder_device). Those fields may also be given as keywords (they replace the ones of
        `options`), as may the older dtype=, weight_dtype=torch.float8_e4m3fn and fp8_matmul=True."""
        options = LoadOptions.from_keywords(options, **load_keywords)
        return cls(ModelFiles.resolve(model, text_encoder, vae, image_encoder, low_noise_model), options,
                   attention_backend=attention_backend, num_gpus=num_gpus, gpu_ids=gpu_ids, loras=loras,
                   loras_low=loras_low, exact_attention_steps=exact_attention_steps)

    def with_parallel(self, num_gpus: int, gpu_ids: list[int] | None = None) -> VideoGenerator:
        """A generator whose sampling runs on a pool of `num_gpus` sequence-parallel workers; the
        text encoder and VAE stay shared with this one, in this process."""
        other = copy.copy(self)  # the same parts: text encoder, VAE, lock; pools are kept per GPU set
        other.num_gpus, other.gpu_ids = int(num_gpus), parse_gpu_ids(gpu_ids)
        return other

    def dit_config(self):
        """The DiT architecture (heads, layers, …), read from the file headers."""
        if self._parts.dit is not None:
            return self._parts.dit.cfg
        from ..loading.dit import read_dit_config
        return read_dit_config(self.files.model)

    # -- memory: where each part lives

    def set_memory_host(self, host) -> None:
        """Hand the placement of whole parts on the GPU to `host` (ComfyUI's model management, see
        nodes/comfy_memory.py): it moves them in before each phase and may move them out for other
        models. Call before loading; parts already loaded keep their placement."""
        self._parts.host = host

    # -- components, loaded on first use (or all at once by load())

    def load(self, *, height: int | None = None, width: int | None = None, num_frames: int | None = None) -> float:
        """Load every part whose files are known now, placed by the memory plan for this video
        shape (None: the model's own, as generate_video's: Wan2.1 480×832×81, Wan2.2 TI2V-5B
        704×1280×121; a later call of another shape plans again only when it must), then, on CUDA, warm up
        for the shape: the attention backend decided (auto's probe) and the kernels of a step and of
        a decode built (pipeline/warmup.py; `warmup_s`). Returns the seconds spent, also kept in
        `load_s` and reported in each result's timings."""
        t0 = time.perf_counter()
        with self._parts.lock, friendly_oom("loading"):
            shape = self._default_shape(height, width, num_frames)
            self.placement.prepare(shape)
            if self.num_gpus == 1:
                self.dit  # noqa: B018  (loads)
                if self.files.low_noise_model is not None:
                    self.dit_low  # noqa: B018
                    with self._loading():  # placing the experts (pinning their homes) is load-time work too
                        self._experts()
            if self.files.text_encoder is not None:
                self.text_encoder  # noqa: B018
            if self.files.vae is not None:
                self.vae  # noqa: B018
            if self.files.image_encoder is not None:
                self.image_encoder  # noqa: B018
            self._warm_up(shape)
        return time.perf_counter() - t0

    def _warm_up(self, shape: VideoShape) -> None:
        """Build the kernels and decide the attention backend a run of `shape` needs, now (see
        pipeline/warmup.py): once per shape, backend and hybrid schedule on these parts, on CUDA, in
        this process's DiT; with compiled blocks only the attention decision and the decode. Its seconds
        count in load_s and in warmup_s. Call under the lock."""
        from ..attention import resolve_backend
        from . import warmup
        parts = self._parts
        key = (shape, resolve_backend(self.attention_backend), self.exact_attention_steps)
        if (parts.dit is None or self.num_gpus != 1 or key in parts.warmed
                or not warmup.wanted(self.device)):
            return
        t0 = time.perf_counter()
        with self._loading(), friendly_oom("warming up the kernels"):
            self.placement.make_room_for_sampling(shape)  # a memory host frees what one step needs
            dit = self._experts().use(0) if self.files.low_noise_model is not None else parts.dit  # the first step's
            if self.options.compile:  # running a block would compile it at this shape (see pipeline/warmup.py)
                ran = warmup.decide(dit, shape, attention_backend=self.attention_backend)
            else:
                ran = warmup.dit_pass(dit, shape, attention_backend=self.attention_backend,
                                      attention_options=self.attention_options,
                                      exact_attention_steps=self.exact_attention_steps)
            if parts.offload is not None:
                parts.offload.drop_prefetched()  # the next run starts its ring afresh
            vae = parts.vae
            if vae is not None:
                tiny = warmup.vae_shape(shape.vae_stride)
                with self.placement.on_device("vae", vae, self.placement.vae_bytes_needed(tiny)):
                    warmup.vae_pass(vae)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()  # one step's activations, handed back as after each phase
        seconds = time.perf_counter() - t0
        parts.warmup_s += seconds
        parts.warmed.add(key)
        what = "attention decided (blocks compile at the first call)" if self.options.compile else \
            "DiT block 1 with attention"
        logger.info("warm-up for %dx%d, %d frames (%d tokens): %s %s%s in %.2f s", shape.width, shape.height,
                    shape.num_frames, shape.tokens, what, ", ".join(ran), ", VAE decode" if vae is not None else "",
                    seconds)

    @property
    def load_s(self) -> float:
        """Seconds spent loading the parts this generator uses (by load() or on first use), warm-up included."""
        return self._parts.load_s

    @property
    def warmup_s(self) -> float:
        """Of load_s, the seconds of load()'s warm-ups (kernel builds, the attention decision; pipeline/warmup.py)."""
        return self._parts.warmup_s

    @property
    def memory_plan(self):
        """The memory plan the parts are placed by (memory/planner.MemoryPlan; None on a CPU)."""
        return self._parts.plan

    def _video_shape(self, height: int, width: int, num_frames: int) -> VideoShape:
        """A video of this size in the model's latent geometry (Wan2.2 TI2V-5B: 1/16)."""
        return VideoShape(height, width, num_frames, vae_stride=ti2v.geometry(self.dit_config())[1])

    def _default_shape(self, height: int | None = None, width: int | None = None,
                       num_frames: int | None = None) -> VideoShape:
        """_video_shape with the model's own size where one is None; a bad size raises the sampler's
        FastVideoError (what is wrong and the nearest valid values) before anything loads."""
        cfg = self.dit_config()
        d_height, d_width, d_frames, _ = ti2v.default_size(cfg)
        size = SamplingSettings(height=d_height if height is None else height,
                                width=d_width if width is None else width,
                                num_frames=d_frames if num_frames is None else num_frames)
        size.with_geometry(*ti2v.geometry(cfg)).validate()
        return self._video_shape(size.height, size.width, size.num_frames)

    def _loading(self):
        parts = self._parts
        if parts.plan is None:
            self.placement.prepare(self._default_shape())
        return LoadTimer(parts)

    def _load_part(self, name: str, what: str, load, requires: str | None = None):
        """parts.<name>, made once by load(path) under the parts' lock: timed into load_s, with a plan
        made first if there is none, and an out-of-memory error that names what was loading.
        requires: the ModelFiles field that must be known (its path goes to load; else None)."""
        parts = self._parts
        if getattr(parts, name) is None:
            path = self.files.require(requires) if requires else None
            with parts.lock, friendly_oom(f"loading {what}"), self._loading():
                setattr(parts, name, load(path))
        return getattr(parts, name)

    def _read_dit(self, path: str, device, *, placed: bool):
        """A DiT file read onto `device`, placed by the plan (placed=True) before its blocks compile."""
        from ..loading.dit import load_dit
        opts = self.options
        dit = load_dit(path, device=device, dtype=self.dtype, weight_dtype=opts.weight_dtype,
                       fp8_matmul=opts.fp8_matmul)
        if placed:
            self.placement.place_dit(dit)
        return dit.compile_blocks() if opts.compile else dit

    @property
    def dit(self):
        def load(_):
            plan = self._parts.plan
            device = self.device if plan is None or not plan.dit_blocks_streamed else torch.device("cpu")
            return self._read_dit(self.files.model, device, placed=True)
        return self._load_part("dit", "the DiT", load)

    @property
    def dit_low(self):
        """Wan2.2 A14B's low-noise expert, loaded on the CPU; _experts() places it by the plan."""
        path = self.files.low_noise_model
        if path is None and self._parts.dit_low is None:
            raise FastVideoError("low_noise_model: this model has one DiT; only Wan2.2 A14B has a low-noise "
                                 "expert.")
        return self._load_part("dit_low", "the low-noise expert", lambda _: self._read_dit(path, "cpu", placed=False))

    def _experts(self):
        """The two experts placed by the memory plan (made once per plan, and again after a LoRA change
        of swapped or streamed experts): both resident, or one at a time (swapped from pinned memory, or streamed)."""
        from .experts import Experts
        parts = self._parts
        if parts.experts is None:
            high, low = self.dit, self.dit_low
            plan = parts.plan
            resident_blocks = 0 if plan is None else plan.dit_blocks_resident
            parts.experts = Experts(high, low, device=self.device, mode=self.placement.expert_mode(),
                                    offload=parts.offload, blocks_on_gpu=resident_blocks)
            logger.info("%s", parts.experts.describe())
        return parts.experts

    @property
    def offload_note(self) -> str | None:
        return self._parts.offload.describe() if self._parts.offload is not None else None

    @property
    def text_encoder(self):
        def load(path):
            from ..loading.text_encoder import load_text_encoder
            device = self.placement.load_device("text_encoder")
            # On a CPU next to a GPU, in bf16: half the host memory of fp32, at bf16's accuracy.
            runs_on_cpu = self.placement.where("text_encoder") == "cpu" or device.type == "cpu"
            dtype = torch.bfloat16 if runs_on_cpu and self.device.type == "cuda" else self.dtype
            te = load_text_encoder(path, device=device, dtype=dtype, weight_dtype=self.options.weight_dtype)
            self.placement.place("text_encoder", te.model)
            return te
        return self._load_part("text_encoder", "the text encoder", load, requires="text_encoder")

    @property
    def vae(self):
        def load(path):
            from ..loading.vae import load_vae
            vae = load_vae(path, device=self.placement.load_device("vae"), dtype=self.dtype)
            self.placement.place("vae", vae)
            return vae
        return self._load_part("vae", "the VAE", load, requires="vae")

    @property
    def image_encoder(self):
        """The CLIP vision encoder of an image-to-video model, on the text encoder's device (same phase)."""
        def load(path):
            from ..loading.clip_vision import load_image_encoder
            encoder = load_image_encoder(path, device=self.placement.load_device("text_encoder"), dtype=self.dtype)
            image_dim = self.dit_config().image_dim
            if image_dim is not None and encoder.width != image_dim:
                raise ModelFileError(f"image_encoder: {os.path.basename(path)!r} gives {encoder.width}-wide image "
                                     f"tokens but the model takes {image_dim} (Wan2.1 I2V: clip_vision_h, 1280).")
            return encoder
        return self._load_part("image_encoder", "the image encoder", load, requires="image_encoder")

    def check_image(self, image, need_encoder: bool = True):
        """The image read as the loaded model takes it: Wan2.1 I2V → an RGB PIL image (required);
        Wan2.2 TI2V-5B → float32 [H,W,3] in 0..1, or None (the image is optional there); a
        text-to-video model → None, and an image given to it is refused. Raises FastVideoError for
        a bad image or a wrong combination.
        need_encoder: the I2V image encoder file must be known (False when the CLIP embeds come ready)."""
        return conditioning.check_image(self, image, need_encoder)

    def encode_image(self, image, settings: SamplingSettings,
                     image_embeds: torch.Tensor | None = None) -> ImageCondition:
        """The image → its condition for the loaded model, for sample(image_condition=...):
        - Wan2.1 I2V: (condition [1,20,T',H/8,W/8], CLIP image embeddings [1,257,1280]) float32 on CPU.
          The CLIP encoder sees the image as given; the VAE the image fitted to settings' size
          (pipeline/image_condition.py). image_embeds: CLIP penultimate hidden states made elsewhere
          (ComfyUI's CLIPVisionEncode), used instead of this model's encoder.
        - Wan2.2 I2V-A14B: (condition, None).
        - Wan2.2 TI2V-5B: a ti2v.FirstFrame, the image's VAE latent that stays in latent frame 0.
        - a text-to-video model: FastVideoError.
        image: anything check_image takes."""
        return conditioning.encode_image(self, image, settings, image_embeds)

    # -- the three stages

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt → text embeddings [1, 512, dim] float32 on CPU."""
        return self.encode_prompts([prompt])

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts → [B, 512, dim] float32 on CPU. Each (encoder, prompt) is encoded once and kept
        (pipeline/prompt_cache.py); the encoder is wherever the memory plan put it."""
        prompts = [check_prompt(p, f"prompts[{i}]" if len(prompts) > 1 else "prompt") for i, p in enumerate(prompts)]
        with self._parts.lock:
            enc = self.text_encoder
            return self._parts.prompts.encode(enc, prompts, self._encode_uncached)

    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        enc = self._parts.text_encoder
        need = self.placement.encoder_bytes_needed()
        with torch.inference_mode(), friendly_oom("encoding the prompts"), \
                self.placement.on_device("text_encoder", enc.model, need):
            return enc.encode(prompts).float().cpu()

    def check_settings(self, settings: SamplingSettings) -> SamplingSettings:
        """Every check that can run before any work: the settings, gpu_ids, and whether the size fits
        in memory for this DiT (its config comes from the file header when it is not loaded yet)."""
        from .size_check import check_fits
        settings.validate()
        if self.num_gpus > 1:
            parse_gpu_ids(self.gpu_ids)
        cfg = self.dit_config()
        from ..attention import resolve_backend
        if resolve_backend(self.attention_backend) == "VIDEO_SPARSE_ATTN" and not cfg.gate_compress:
            from ..models.wan_dit import NEEDS_FASTWAN
            raise FastVideoError(NEEDS_FASTWAN)
        settings = settings.with_geometry(*ti2v.geometry(cfg)).validate()  # 48 ch at 1/16 for Wan2.2 TI2V-5B
        if self.files.vae is not None:
            from ..loading import detect
            from ..loading.files import all_keys
            from ..loading.locate import locate
            ti2v.check_pair(cfg, detect.kind_of(all_keys(locate(self.files.vae, "vae").files, "VAE")),
                            self.files.model, self.files.vae)
        check_fits(settings, cfg.dim, cfg.ffn_dim, self.dtype, self.device, num_gpus=self.num_gpus)
        return settings

    def sample(self, positive: torch.Tensor, negative: torch.Tensor | None, settings: SamplingSettings, *,
               callback: Callable | None = None, cancel: Callable[[], bool] | None = None,
               stats: SamplingStats | None = None, noise: torch.Tensor | None = None,
               image_condition: ImageCondition | None = None, condition: torch.Tensor | None = None,
               image_embeds: torch.Tensor | None = None,
               first_frame: ti2v.FirstFrame | None = None) -> torch.Tensor:
        """Text embeddings → raw VAE-space latents [1,C,T',H',W'] float32 on CPU (C: 16, Wan2.2
        TI2V-5B 48), with this generator's LoRAs (merge seconds in stats.extra["lora_s"] when a merge ran).
        image_condition: what encode_image returned, for either image model; it stands for the seams
        below. Wan2.1 image-to-video: condition and image_embeds (encode_image's pair). Wan2.2 TI2V-5B:
        first_frame (encode_image's FirstFrame).
        Raises FastVideoError for bad settings before any work, and for non-finite results."""
        settings = self._expert_settings(self.check_settings(settings))
        noise = initial_noise(settings) if noise is None else noise
        condition, image_embeds, first_frame = conditioning.sample_inputs(self, settings, image_condition, condition,
                                                                          image_embeds, first_frame)
        with self._parts.lock:
            self._ready_to_sample(settings)
            if self.num_gpus > 1:
                model_latents = self.pool().sample(noise, positive, negative, settings, callback=callback,
                                                   cancel=cancel, stats=stats,
                                                   attention_backend=self.attention_backend,
                                                   attention_options=self.attention_options, loras=self.loras,
                                                   exact_attention_steps=self.exact_attention_steps,
                                                   first_frame=first_frame, condition=condition,
                                                   image_embeds=image_embeds, loras_low=self.loras_low)
            else:
                two = self.files.low_noise_model is not None
                with friendly_oom():
                    report = self._sync_loras()
                if report is not None and stats is not None:
                    stats.extra["lora_s"] = report.seconds
                with torch.inference_mode(), friendly_oom():
                    model_latents = denoise(self._experts() if two else self.dit, noise, positive, negative, settings,
                                            attention_backend=self.attention_backend,
                                            attention_options=self.attention_options, callback=callback,
                                            cancel=cancel, stats=stats,
                                            exact_attention_steps=self.exact_attention_steps,
                                            condition=condition, image_embeds=image_embeds,
                                            first_frame=first_frame)
        return model_to_raw(check_finite_latents(model_latents.float().cpu()))

    def _expert_settings(self, settings: SamplingSettings) -> SamplingSettings:
        """settings with the boundary filled in for two experts; see experts.expert_settings."""
        from .experts import expert_settings
        return expert_settings(settings, self.files.model, self.files.low_noise_model is not None, self.dit_config())

    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Raw VAE-space latents [1,16,T',H',W'] → frames float32 [T,H,W,3] in 0..1 on CPU."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[0] != 1 \
                or latents.shape[1] not in (16, 48):
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise FastVideoError(f"latents: expected a Wan video latent [1,16,T,H,W] (Wan 2.1 VAE) or [1,48,T,H,W] "
                                 f"(Wan 2.2 VAE), got {shape}.")
        if tile is not None and (isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or tile < 1):
            raise FastVideoError(f"tile must be a positive number of latent pixels (or None = whole frame), "
                                 f"got {tile!r}.")
        check_finite_latents(latents)
        with self._parts.lock, torch.inference_mode(), friendly_oom("decoding"):
            video = _latent_shape(latents)
            with friendly_oom("loading"):
                self.placement.prepare(video, tile)
                vae = self.vae
            if vae.cfg.z_dim != latents.shape[1]:
                raise FastVideoError(f"latents: {latents.shape[1]} channels, but the VAE ({self.files.vae}) decodes "
                                     f"{vae.cfg.z_dim}; decode with the VAE the latents were made for.")
            need = self.placement.vae_bytes_needed(video, tile)
            with self.placement.on_device("vae", vae, need):
                return vae.decode_frames(latents.to(self.device), tile=tile)

    def _ready_to_sample(self, settings: SamplingSettings) -> None:
        """Plan for this shape (again only if it must) and let the host make room for sampling."""
        shape = VideoShape(settings.height, settings.width, settings.num_frames, vae_stride=settings.vae_stride)
        with friendly_oom("loading"):
            self.placement.prepare(shape)
            if self.num_gpus == 1:
                self.dit  # noqa: B018  (loaded before the host is asked for room)
        self.placement.make_room_for_sampling(shape)

    def pool(self):
        """The sequence-parallel worker pool for this generator's GPUs (started on first use, kept
        across runs, shared by generators on the same parts and GPUs)."""
        key = (self.num_gpus, tuple(self.gpu_ids or ()))
        pool = self._parts.pools.get(key)
        if pool is None or not pool.alive:  # a failed pool is replaced
            from ..parallel import WorkerPool
            pool = self._parts.pools[key] = WorkerPool(self.files.model, num_gpus=self.num_gpus,
                                                       options=self.options, gpu_ids=self.gpu_ids,
                                                       low_noise_model=self.files.low_noise_model)
        return pool

    def close(self) -> None:
        """Free every loaded part (DiT, text encoder, VAE and their GPU memory), stop the worker
        pools and forget the cached prompts. Generators sharing these parts (with_attention_backend,
        with_parallel, the same files and options) lose them too; any use afterwards loads again."""
        with self._parts.lock:
            self._parts.release()
            self._parts.budget = None
            self._parts.load_s = self._parts.warmup_s = 0.0
        import gc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> VideoGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate_video(self, prompt: str, *, negative_prompt: str | None = None, height: int | None = None,
                       width: int | None = None, num_frames: int | None = None, num_inference_steps: int = 50,
                       guidance_scale: float | None = None, image=None,
                       flow_shift: float | None = None, scheduler: str | None = None, seed: int = 0,
                       sigmas=None, spacing: str = "default",
                       cfg_gate: float = 1.0, teacache_threshold: float = 0.0, teacache_mode: str = "default",
                       output_path: str | None = None, callback: Callable | None = None,
                       cancel: Callable[[], bool] | None = None, fps: int | None = None,
                       overwrite: bool = False, boundary: float | None = None,
                       guidance_scale_low: float | None = None) -> GenerationResult:
        """Prompt → video. flow_shift None: 5.0 at 720p and above, else 3.0 (diffusers' presets).
        Few-step (distilled) models: scheduler "euler" or "lcm" with spacing="simple" (ComfyUI's,
        what the 4-step distill LoRAs were trained for), or sigmas=[1, 0.9375, 0.8333, 0.625] used as
        given (no shift; their count is the step count). guidance_scale 1 runs one forward per step
        and encodes no negative prompt.
        guidance_scale and scheduler None: the model's defaults, 5.0 and unipc, or for a FastWan
        checkpoint (detected by its gate projections) 1 and dmd (1000, 757, 522) with attention
        VIDEO_SPARSE_ATTN at sparsity 0.8 when no backend was chosen; the log says so.
        output_path: .mp4, .mkv, .mov or .webm; an existing file is refused unless overwrite=True, and
        it is replaced only once the new video is complete. Every input is checked before any work.
        image: a path, a PIL image or an IMAGE tensor [H,W,3] / [1,H,W,3] in 0..1, used as the loaded
        model takes it: a Wan2.1 I2V model requires it (the start image, with its CLIP embeddings); a
        Wan2.2 TI2V-5B takes it as the first frame (optional); a text-to-video model refuses it. An
        image of another aspect ratio has its middle cut to the video's, then is resized.
        height, width, num_frames, fps None: the model's own (Wan2.1: 480×832, 81 at 16 fps; Wan2.2
        TI2V-5B: 704×1280, 121 at 24 fps, shift 5).
        Wan2.2 A14B (two experts): boundary (0..1) is where the low-noise expert takes over (None: the
        folder's boundary_ratio, else 0.875); guidance_scale is the high-noise expert's and
        guidance_scale_low the low-noise one's. Both None: Wan2.2's 4.0 and 3.0; only guidance_scale
        given: the low one follows it (as diffusers). flow_shift None: 12 (Wan2.2 T2V-A14B).
        Calls on one generator (and on those sharing its models) run one at a time."""
        if self.files.low_noise_model is not None:
            from .experts import preset_defaults
            guidance_scale, guidance_scale_low, flow_shift = preset_defaults(self.dit_config(), guidance_scale,
                                                                             guidance_scale_low, flow_shift)
        guidance_scale, scheduler = self._model_defaults(guidance_scale, scheduler)
        wan22 = ti2v.is_wan22(self.dit_config())
        d_height, d_width, d_frames, d_fps = ti2v.default_size(self.dit_config())
        height = d_height if height is None else height
        width = d_width if width is None else width
        num_frames = d_frames if num_frames is None else num_frames
        fps = d_fps if fps is None else fps
        if flow_shift is None and wan22:
            flow_shift = ti2v.WAN22_SHIFT
        if flow_shift is None and all(isinstance(v, numbers.Real) for v in (height, width)):
            flow_shift = 5.0 if height * width >= 720 * 1280 else 3.0
        settings = SamplingSettings(height=height, width=width, num_frames=num_frames, steps=num_inference_steps,
                                    guidance_scale=guidance_scale,
                                    shift=3.0 if flow_shift is None else flow_shift, scheduler=scheduler, seed=seed,
                                    cfg_gate=cfg_gate, teacache_threshold=teacache_threshold,
                                    teacache_mode=teacache_mode, spacing=spacing, sigmas=parse_sigmas(sigmas),
                                    boundary=boundary, guidance_scale_low=guidance_scale_low)
        check_prompt(prompt, "prompt")
        if negative_prompt is not None:
            check_prompt(negative_prompt, "negative_prompt")
        if output_path:
            from ..video import check_fps, check_output_path
            check_output_path(output_path, overwrite=overwrite)
            check_fps(fps)
        settings = self._expert_settings(self.check_settings(settings))
        picture = self.check_image(image)  # fails before any work on a bad image or one the model does not take
        if negative_prompt is None:
            from ..models.text_encoder import DEFAULT_NEGATIVE_PROMPT
            negative_prompt = DEFAULT_NEGATIVE_PROMPT
        with self._parts.lock:
            return self._generate(prompt, negative_prompt, settings, output_path, callback, cancel, fps, overwrite,
                                  picture)

    def _model_defaults(self, guidance_scale: float | None, scheduler: str | None) -> tuple[float, str]:
        """Fill in the unset guidance and scheduler: Wan's (5.0, unipc), or FastWan's (1, dmd), saying so."""
        from ..attention import resolve_backend
        if not self.dit_config().gate_compress:
            return (5.0 if guidance_scale is None else guidance_scale, scheduler or "unipc")
        chosen = []
        if resolve_backend(self.attention_backend) == "AUTO":
            options = self.attention_options
            sparsity = options.sparsity if isinstance(options, VideoSparseOptions) else VideoSparseOptions().sparsity
            chosen.append(f"attention VIDEO_SPARSE_ATTN (sparsity {sparsity:g})")
        if scheduler is None:
            from .schedulers import DMD_TIMESTEPS
            scheduler = "dmd"
            chosen.append(f"scheduler dmd (timesteps {', '.join(map(str, DMD_TIMESTEPS))})")
        if guidance_scale is None:
            guidance_scale = 1.0
            chosen.append("guidance 1 (no negative prompt)")
        if chosen:
            logger.info("FastWan checkpoint (gate projections in its blocks): using %s; set them explicitly "
                        "to override.", ", ".join(chosen))
        return guidance_scale, scheduler

    def _generate(self, prompt, negative_prompt, settings, output_path, callback, cancel, fps,
                  overwrite, picture=None) -> GenerationResult:
        guidance_scale = max(settings.guidance_scale, settings.guidance_scale_low or 0.0)
        warmed = self._parts.warmup_s
        timings = {"load_s": self.load(height=settings.height, width=settings.width, num_frames=settings.num_frames)
                   if self._parts.dit is None and self.num_gpus == 1 else 0.0}
        if self._parts.warmup_s > warmed:  # this call loaded, and warmed up (inside load_s)
            timings["warmup_s"] = self._parts.warmup_s - warmed
        t0 = time.perf_counter()
        positive = self.encode_prompt(prompt)
        negative = self.encode_prompt(negative_prompt) if guidance_scale > 1.0 else None
        timings["encode_s"] = time.perf_counter() - t0
        encoded = None
        if picture is not None:
            t0 = time.perf_counter()
            encoded = self.encode_image(picture, settings)
            timings["image_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = SamplingStats()
        latents = self.sample(positive, negative, settings, callback=callback, cancel=cancel, stats=stats,
                              image_condition=encoded)
        timings["sample_s"] = time.perf_counter() - t0  # includes lora_s
        if self.loras or self.loras_low or "lora_s" in stats.extra:  # a merge ran, or the LoRAs were merged already (0)
            timings["lora_s"] = stats.extra.get("lora_s", 0.0)
        t0 = time.perf_counter()
        frames = self.decode(latents)
        timings["decode_s"] = time.perf_counter() - t0
        if output_path:
            from ..video import write_video
            write_video(frames, output_path, fps=fps, overwrite=overwrite)
        return GenerationResult(frames=frames, latents=latents, timings=timings, stats=stats, output_path=output_path,
                                attention=self.attention_used(settings.num_steps))

    def attention_used(self, num_steps: int | None = None) -> dict:
        """{"requested": name} plus, for auto on this process's GPU, its latest decision ("choice", "why", the
        guard and each backend's figures: cosine, rel_l2, ms or why rejected). Worker pools decide in the
        workers: no decision here. With exact_attention_steps > 0, "hybrid": the schedule over num_steps."""
        from ..attention import APPROXIMATE, EXACT, auto, exact_step_indices, resolve_backend
        requested = resolve_backend(self.attention_backend)
        record = auto.last_choice() if requested == "AUTO" and self.num_gpus == 1 else None
        if requested == "AUTO" and self.dit_config().gate_compress:
            record = {"choice": "VIDEO_SPARSE_ATTN",
                      "why": "a FastWan checkpoint, distilled with video sparse attention"}
        used = {"requested": requested, **(record or {})}
        if self.exact_attention_steps:
            backend = used.get("choice", requested)
            applies = backend in APPROXIMATE or backend == "AUTO"  # AUTO: decided in the workers
            used["hybrid"] = {"exact_steps": self.exact_attention_steps, "exact_backend": EXACT,
                              "applies": applies,
                              "exact_at": exact_step_indices(num_steps, self.exact_attention_steps)
                              if num_steps is not None and applies else []}
        return used
