"""Load-time warm-up: the first generation of a shape should cost about what a later one does (issue 14).

On a fresh machine the first sampling step of a process paid for Triton building our fused kernels
and the INT8 attention kernel, for cuBLAS and cuDNN setting up, and for `auto` measuring the
attention backends at the shape's length bucket (attention/auto.py); the first decode built the
VAE's kernels. VideoGenerator.load() moves that work here, timed apart (`warmup_s`, inside `load_s`):

- `dit_pass` resolves the attention backend for the real token count and head layout (auto's probe
  runs now when no record is on disk) and runs one DiT forward through its first block only, on
  random inputs of the real shape: patch embedding, time and text embeddings, the block's norms,
  RoPE, attention, FFN and the head, each kernel at the shape a step launches it. With the hybrid
  schedule (exact_attention_steps) the exact backend's step is run too.
- `vae_pass` decodes two latent frames at a small size: the VAE kernels' builds depend on its
  channel counts, not on the picture size, and the second frame takes the decoder's other path.

Both run without autograd, as the sampler; their activations are one step's (inside the memory
plan's sampling budget) and are gone when they return.

With compiled blocks (compile=True) no block runs: that would compile at load()'s shape, which the
nodes do not know, so the first call of a shape compiles, as before. The attention decision
(`decide`: auto's probe, which builds and times every installed backend; a compiled 14B's first 1-step
call at 480p took 34.1 s with auto against 14.5 s with FlashAttention 4 named) and the VAE pass still
run at load. Not warmed: sequence-parallel workers (the pool starts at the first parallel sampling,
and a worker learns the shape and the attention backend only from its job).
"""
from __future__ import annotations

import torch

from ..attention import backend_for_step
from ..memory.planner import VideoShape

VAE_LATENT = (2, 8, 8)  # latent frames, height, width of the VAE warm-up decode


def wanted(device: torch.device) -> bool:
    """Only on CUDA is there anything to build or measure (tests replace this to run it on a CPU)."""
    return torch.device(device).type == "cuda"


def latent_grid(shape: VideoShape) -> tuple[int, int, int]:
    """(T', H', W') of the latents of a video of this shape."""
    return (shape.num_frames - 1) // 4 + 1, shape.height // shape.vae_stride, shape.width // shape.vae_stride


def tokens(dit, shape: VideoShape) -> int:
    """The DiT's sequence length for a video of this shape."""
    t, h, w = latent_grid(shape)
    return t * (h // dit.cfg.patch_size[1]) * (w // dit.cfg.patch_size[2])


def decide(dit, shape: VideoShape, *, attention_backend: str | None = None) -> list[str]:
    """The attention backend a run of `shape` uses, decided now (auto's probe when no record is on disk),
    without running the DiT; returns it as dit_pass does."""
    return [dit.attention_backend_for(attention_backend, tokens(dit, shape))]


def dit_pass(dit, shape: VideoShape, *, attention_backend: str | None = None, attention_options=None,
             exact_attention_steps: int = 0) -> list[str]:
    """One forward through the first block of `dit` at `shape`; returns the attention backends it ran."""
    cfg = dit.cfg
    device = dit.text_embedding[0].weight.device  # the compute device, also when blocks stream
    gen = torch.Generator(device).manual_seed(0)
    noise = lambda *size, dtype=torch.float32: torch.randn(size, generator=gen, device=device, dtype=dtype)
    t, h, w = latent_grid(shape)
    x = noise(1, cfg.out_channels, t, h, w)
    extra = cfg.in_channels - cfg.out_channels  # image-to-video: mask and image latent join the noise
    condition = noise(1, extra, t, h, w) if extra > 0 else None
    image_embeds = noise(1, 257, cfg.image_dim, dtype=dit.dtype) if cfg.image_dim is not None else None
    # A short prompt, as most are: its zero padding folded into one key (the counted-key kernel builds now).
    context = noise(1, 16, cfg.text_dim, dtype=dit.dtype)
    timestep = torch.full((1,), 999.0, device=device)
    backend = dit.attention_backend_for(attention_backend, tokens(dit, shape))
    n = 2 * exact_attention_steps + 1  # a schedule whose middle step runs `backend`
    steps = [exact_attention_steps]
    if backend_for_step(backend, 0, n, exact_attention_steps) != backend:
        steps.append(0)  # the hybrid schedule's exact step
    ran = []
    with torch.no_grad():
        for step in steps:
            dit(x, timestep, context, attention_backend=attention_backend, attention_options=attention_options,
                step=step, num_steps=n, exact_attention_steps=exact_attention_steps, condition=condition,
                image_embeds=image_embeds, blocks=1)
            ran.append(backend_for_step(backend, step, n, exact_attention_steps))
    return ran


def vae_pass(vae) -> None:
    """Decode VAE_LATENT random latents (the result is dropped)."""
    with torch.no_grad():
        vae.decode(torch.randn(1, vae.cfg.z_dim, *VAE_LATENT, generator=torch.Generator().manual_seed(0)))


def vae_shape(vae_stride: int) -> VideoShape:
    """The video shape of vae_pass's decode, for the memory host's request."""
    t, h, w = VAE_LATENT
    return VideoShape(h * vae_stride, w * vae_stride, (t - 1) * 4 + 1, vae_stride=vae_stride)
