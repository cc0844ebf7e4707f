"""Flow-matching sampling loop: noise → latents, with classifier-free guidance, CFG gate and TeaCache.

Works in the DiT's model space ((raw − mean) / std); the caller converts to raw VAE space.
The same function runs in-process and inside sequence-parallel workers (`parallel=`).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from ..errors import CancelledError, FastVideoError
from ..models.wan_dit import SharedFirstSelfAttention, trim_text_padding
from .experts import Experts, expert_per_step
from .schedulers import DMD_TIMESTEPS, SCHEDULERS, SPACINGS, check_sigmas, check_timesteps, make_scheduler
from .teacache import MODES, TeaCache, coefficients_for

if TYPE_CHECKING:
    from ..attention import AttentionOptions

VAE_STRIDE_T, VAE_STRIDE_HW, LATENT_CHANNELS = 4, 8, 16
GEOMETRIES = ((16, 8), (48, 16))  # (latent channels, spatial stride): Wan 2.1 VAE, Wan 2.2 VAE
# Far beyond any useful schedule (Wan uses 50); it keeps the schedulers' arithmetic well away from trouble.
MAX_STEPS = 1000
MAX_SEED = 2**64 - 1  # ComfyUI's seed widget range, which torch.Generator.manual_seed also takes


def _is_int(v) -> bool:
    """A whole number: an int (numpy ints too), never a bool or a float such as 1.5."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _floor(v, k: int) -> int:
    """v rounded down to a multiple of k, for the "nearest valid" hint (0 when v is not a finite number)."""
    return int(v) // k * k if _is_real(v) and math.isfinite(v) else 0


@dataclass
class SamplingSettings:
    """Everything that decides one video's latents besides the weights and the prompts."""
    height: int = 480
    width: int = 832
    num_frames: int = 81
    steps: int = 50
    guidance_scale: float = 5.0
    shift: float = 3.0
    scheduler: str = "unipc"
    seed: int = 0
    cfg_gate: float = 1.0
    teacache_threshold: float = 0.0
    teacache_mode: str = "default"
    teacache_coefficients: list[float] | None = None
    # Few-step sampling: "simple" = ComfyUI's spacing; sigmas (descending, in (0, 1]) are used as
    # given, without shift, and decide the step count (steps is then ignored). euler and lcm only.
    spacing: str = "default"
    sigmas: tuple[float, ...] | None = None
    # DMD (scheduler "dmd", FastWan): the DiT timesteps, descending in 1..1000; None = FastWan's
    # 1000, 757, 522. The list decides the step count; DMD runs without guidance (guidance_scale 1).
    timesteps: tuple[int, ...] | None = None
    # Latent geometry, from the model (not the user): Wan 2.1 = 16 channels at 1/8 of the pixels,
    # Wan 2.2 TI2V-5B = 48 channels at 1/16 (see with_geometry).
    latent_channels: int = LATENT_CHANNELS
    vae_stride: int = VAE_STRIDE_HW
    # Wan2.2 A14B (two experts, pipeline/experts.py): the high-noise expert serves t ≥ boundary·1000
    # with guidance_scale, the low-noise one the rest with guidance_scale_low (None: guidance_scale).
    boundary: float | None = None
    guidance_scale_low: float | None = None

    def with_geometry(self, latent_channels: int, vae_stride: int) -> SamplingSettings:
        """A copy for a model whose VAE has this many latent channels and this spatial stride."""
        return replace(self, latent_channels=latent_channels, vae_stride=vae_stride)

    def validate(self) -> SamplingSettings:
        """Raise FastVideoError naming the first bad setting and what would be valid."""
        if (self.latent_channels, self.vae_stride) not in GEOMETRIES:
            raise FastVideoError(f"latent geometry {self.latent_channels} channels at 1/{self.vae_stride} is not a "
                                 "Wan VAE's; Wan2.1: 16 at 1/8, Wan2.2: 48 at 1/16.")
        k = 2 * self.vae_stride  # the VAE's stride times the DiT's 2×2 patch
        for name in ("height", "width"):
            v = getattr(self, name)
            if not _is_int(v) or v < k or v % k:
                lo = max(k, _floor(v, k))
                hint = "" if k == 16 else " for Wan2.2 TI2V-5B"
                raise FastVideoError(f"{name} must be a positive multiple of {k}{hint}, got {v!r}; "
                                     f"nearest valid: {lo} or {lo + k}.")
        n = self.num_frames
        if not _is_int(n) or n < 1 or (n - 1) % 4:
            lo = max(1, _floor(n - 1 if _is_real(n) else 0, 4) + 1)
            raise FastVideoError(f"num_frames must be 4n+1 (1, 5, 9, …, 81), got {n!r}; nearest valid: "
                                 f"{lo} or {lo + 4}.")
        if not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise FastVideoError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {self.steps!r}.")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise FastVideoError(f"seed must be a whole number from 0 to 2^64-1 ({MAX_SEED}), got {self.seed!r}.")
        for name in ("guidance_scale", "shift", "cfg_gate", "teacache_threshold"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v):
                raise FastVideoError(f"{name} must be a finite number, got {v!r}.")
        if not 0.0 <= self.cfg_gate <= 1.0:
            raise FastVideoError(f"cfg_gate must be in [0, 1] (1 = off), got {self.cfg_gate}.")
        if self.teacache_threshold < 0:
            raise FastVideoError(f"teacache_threshold must be ≥ 0 (0 = off), got {self.teacache_threshold}.")
        if self.teacache_mode not in MODES:
            raise FastVideoError(f"teacache_mode must be one of {MODES}, got {self.teacache_mode!r}.")
        if self.scheduler not in SCHEDULERS:
            raise FastVideoError(f"scheduler {self.scheduler!r} is unknown; use one of {', '.join(SCHEDULERS)}.")
        if self.shift <= 0:
            raise FastVideoError(f"shift must be > 0, got {self.shift}.")
        if self.guidance_scale < 0:
            raise FastVideoError(f"guidance_scale must be ≥ 0, got {self.guidance_scale}.")
        if self.boundary is not None:
            from .experts import check_boundary
            check_boundary(self.boundary)
        if self.guidance_scale_low is not None:
            g = self.guidance_scale_low
            if not _is_real(g) or not math.isfinite(g) or g < 0:
                raise FastVideoError(f"guidance_scale_low must be a finite number ≥ 0 (the low-noise expert's "
                                     f"guidance), got {g!r}.")
        if self.spacing not in SPACINGS:
            raise FastVideoError(f"spacing {self.spacing!r} is unknown; use one of {', '.join(SPACINGS)}.")
        if self.sigmas is not None:
            check_sigmas(self.sigmas)
        if self.scheduler == "unipc" and (self.sigmas is not None or self.spacing != "default"):
            raise FastVideoError("scheduler 'unipc' follows diffusers' own spacing; explicit sigmas and spacing "
                                 "'simple' need scheduler 'euler' or 'lcm'.")
        if self.timesteps is not None:
            if self.scheduler != "dmd":
                raise FastVideoError(f"a timestep list is for scheduler 'dmd'; scheduler {self.scheduler!r} takes "
                                     "steps or sigmas.")
            check_timesteps(self.timesteps)
        if self.scheduler == "dmd":
            if self.sigmas is not None or self.spacing != "default":
                raise FastVideoError("scheduler 'dmd' runs its own timestep list (FastWan: 1000, 757, 522); explicit "
                                     "sigmas and spacing 'simple' need scheduler 'euler' or 'lcm'.")
            if self.guidance_scale > 1:  # distilled without guidance: CFG would push it off its training
                raise FastVideoError(f"scheduler 'dmd' runs without guidance: set guidance_scale to 1, got "
                                     f"{self.guidance_scale}.")
        return self

    @property
    def num_steps(self) -> int:
        """Model steps of the run: the DMD timestep list's or the sigma list's length, else steps."""
        if self.scheduler == "dmd":
            return len(self.timesteps if self.timesteps is not None else DMD_TIMESTEPS)
        return len(self.sigmas) if self.sigmas is not None else self.steps

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return (1, self.latent_channels, (self.num_frames - 1) // VAE_STRIDE_T + 1,
                self.height // self.vae_stride, self.width // self.vae_stride)

    def to_dict(self) -> dict:
        return asdict(self)


def initial_noise(settings: SamplingSettings) -> torch.Tensor:
    """The noise diffusers and ComfyUI draw for a seed: float32 on a CPU generator."""
    g = torch.Generator("cpu").manual_seed(int(settings.seed))
    return torch.randn(settings.latent_shape, generator=g, dtype=torch.float32)


def check_finite_latents(latents: torch.Tensor) -> torch.Tensor:
    """One check after sampling: NaN or inf latents would decode to a garbage video with exit code 0."""
    if not bool(torch.isfinite(latents).all()):
        bad = (~torch.isfinite(latents)).float().mean().item()
        raise FastVideoError(f"sampling produced non-finite latents (NaN/inf in {bad:.0%} of values), so no video "
                             "was written. Likely causes: fp16 overflow (use precision bf16 or fp32), a damaged "
                             "model file or LoRA, or an extreme guidance_scale/shift.")
    return latents


def step_noise_generator(settings: SamplingSettings) -> torch.Generator:
    """The CPU generator for noise drawn during sampling (LCM, DMD): the seed's stream continued past the
    initial noise, so a seed fixes the whole run and the steps never reuse the initial noise."""
    g = torch.Generator("cpu").manual_seed(int(settings.seed))
    torch.randn(settings.latent_shape, generator=g, dtype=torch.float32)
    return g


@dataclass
class SamplingStats:
    cond_forwards: int = 0
    uncond_forwards: int = 0
    teacache_skipped: int = 0
    extra: dict = field(default_factory=dict)


def denoise(dit, noise: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None,
            settings: SamplingSettings, *, attention_backend: str | None = None,
            attention_options: AttentionOptions | None = None, callback: Callable | None = None,
            cancel: Callable[[], bool] | None = None,
            parallel=None, stats: SamplingStats | None = None, exact_attention_steps: int = 0,
            condition: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
            first_frame=None) -> torch.Tensor:
    """Run the sampler. Returns model-space latents, float32, on the DiT's device.

    noise: [1,C,T',H',W'] float32; positive/negative: text embeddings [1,L,text_dim].
    Wan2.1 image-to-video: condition [1,20,T',H',W'] joins the latents at every DiT call and
    image_embeds [1,257,1280] the text, in both CFG passes (as diffusers' WanImageToVideoPipeline).
    first_frame: a ti2v.FirstFrame (Wan2.2 TI2V with an image): the model sees the image's latent
    in the first frame, at timestep 0 per token, and the result carries it.
    callback(step, total, x0): after each step with the model-space x0 estimate (for previews).
    cancel(): checked before each step; returning True stops with CancelledError.
    dit may be an experts.Experts (Wan2.2 A14B): each step runs the expert its timestep belongs to
    (settings.boundary), with that expert's guidance. TeaCache state and the CFG gate's guidance
    direction are reset at the switch: both describe the other expert's outputs. The gate fraction
    applies to each expert's own span of steps.
    exact_attention_steps N: an 8-bit attention backend gives way to exact attention on the first and
    last N steps (the hybrid schedule; the DiT decides per forward).
    """
    settings.validate()
    stats = stats if stats is not None else SamplingStats()
    experts = dit if isinstance(dit, Experts) else None
    if experts is not None and settings.boundary is None:
        raise FastVideoError("boundary: a two-expert model (Wan2.2 A14B) needs the boundary where the low-noise "
                             "expert takes over (0.875 for T2V).")
    generator = step_noise_generator(settings) if settings.scheduler in ("lcm", "dmd") else None
    sched = make_scheduler(settings.scheduler, settings.steps, settings.shift, spacing=settings.spacing,
                           sigmas=settings.sigmas, generator=generator, timesteps=settings.timesteps)
    n = settings.num_steps
    # Which model serves each step, and its guidance: one DiT, or two experts split at the boundary.
    which = [0] * n
    if experts is not None and settings.boundary is not None:
        which = expert_per_step(sched.timesteps, settings.boundary)
    g_low = settings.guidance_scale if settings.guidance_scale_low is None else settings.guidance_scale_low
    scales = (settings.guidance_scale, g_low)
    do_cfg = max(scales[k] for k in set(which)) > 1.0 and negative is not None
    # CFG gate: both passes only for the first ⌈span·X⌉ steps of each model's span of steps (at least
    # its first, to have a guidance direction of its own).
    span_start = [which.index(which[i]) for i in range(n)]
    uncond_steps = {k: max(1, math.ceil(which.count(k) * settings.cfg_gate)) for k in set(which)}
    switched = len(experts.switch_s) if experts is not None else 0
    device = next((experts.use(which[0]) if experts is not None else dit).parameters()).device
    # Once per call, not per step: the DiT folds the zero rows Wan pads a prompt with into one counted key.
    positive = trim_text_padding(positive).to(device, dit.dtype)
    negative = trim_text_padding(negative).to(device, dit.dtype) if do_cfg and negative is not None else None

    caches: tuple[TeaCache | None, ...] = (None, None)
    if settings.teacache_threshold > 0:
        coeffs = settings.teacache_coefficients or coefficients_for(
            dit.cfg.size_name, settings.teacache_mode, image_to_video=dit.cfg.image_dim is not None,
            pixels=settings.height * settings.width)
        caches = tuple(TeaCache(settings.teacache_threshold, n, coeffs, settings.teacache_mode) for _ in range(2))

    # Only image-to-video passes these, so text-to-video calls stay exactly as they were.
    image: dict = {}
    if condition is not None or image_embeds is not None:
        if condition is None:  # Wan2.2 I2V-A14B takes a condition without CLIP embeddings; never the reverse
            raise FastVideoError("image_embeds without condition: image-to-video needs the image condition too.")
        image = {"condition": condition.to(device, torch.float32),
                 "image_embeds": None if image_embeds is None else image_embeds.to(device, dit.dtype)}

    def forward(model, x, t, context, cache, step, share=None):
        if cache is not None:
            cache.step = step
        if first_frame is not None:
            x, t = first_frame.model_input(x), first_frame.timesteps(t)
        return model(x, t, context, attention_backend=attention_backend, attention_options=attention_options,
                   step=step, cache=cache, parallel=parallel, num_steps=n,
                   exact_attention_steps=exact_attention_steps, share=share, **image)

    x = noise.to(device, torch.float32)
    delta: torch.Tensor | None = None
    skipped = 0
    for i, t in enumerate(sched.timesteps):
        if cancel is not None and cancel():
            raise CancelledError(f"cancelled before step {i + 1} of {n}.")
        k = which[i]
        model = experts.use(k) if experts is not None else dit
        if i > 0 and k != which[i - 1]:  # the other expert: nothing cached from the first one applies
            skipped += sum(c.skipped for c in caches if c is not None)
            caches = tuple(None if c is None else TeaCache(c.threshold, n, c.coefficients, c.mode) for c in caches)
            delta = None
        g = scales[k]
        t = t.to(device).reshape(1)
        both = do_cfg and g > 1.0 and i - span_start[i] < uncond_steps[k]  # an expert at guidance ≤ 1: cond only
        share = SharedFirstSelfAttention() if both else None  # same x and t: block 0's self-attention once
        v = forward(model, x, t, positive, caches[0], i, share)
        stats.cond_forwards += 1
        if do_cfg and g > 1.0:
            if both:
                v_uncond = forward(model, x, t, negative, caches[1], i, share)
                stats.uncond_forwards += 1
                delta = v - v_uncond
                v = v_uncond + g * delta
            else:  # reuse the last guidance direction: pred = cond + (g − 1)·δ
                assert delta is not None  # step 0 always runs both passes
                v = v + (g - 1.0) * delta
        x0 = sched.denoised(v, x) if callback is not None else None
        if x0 is not None and first_frame is not None:
            x0 = first_frame.model_input(x0)
        x = sched.step(v, x)
        if callback is not None:
            callback(i + 1, n, x0)
    stats.teacache_skipped = skipped + sum(c.skipped for c in caches if c is not None)
    if experts is not None and len(experts.switch_s) > switched:
        stats.extra["switch_s"] = experts.switch_s[switched:]  # the seconds of this call's expert switches
    return x if first_frame is None else first_frame.model_input(x)
