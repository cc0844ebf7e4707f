"""The one place where the models do attention.

`attention(q, k, v, ...)` takes and returns [B, S, H, D]. The backend is chosen by, in order:
an explicit name (SetAttentionBackend node, `attention_backend=`, `--attention-backend`), the
environment variable FASTVIDEO_ATTENTION_BACKEND, then "auto" (the fastest available backend as
measured on this GPU, dtype and head size; see `auto.py`). One module per backend, each with
`available() -> str | None` (None when usable, else how to install) and `attend(q, k, v, ...)`;
`backend_status()` asks them all (the CLI's `backends` command and the attention node show it).
Backend settings travel typed (`AttentionOptions`): `SlidingTileOptions` for SLIDING_TILE_ATTN,
`VideoSparseOptions` for VIDEO_SPARSE_ATTN, whose self-attention also takes the block's per-token gate.
The hybrid schedule (`backend_for_step`) runs exact attention in place of an 8-bit backend on the
first and last N sampling steps; the DiT decides it per forward, outside its compiled blocks.
Text cross-attention over a prompt whose zero padding the DiT folded into one key (with each key's
count) is `counted.py`, exact, whatever the backend.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import torch

from .. import env
from ..errors import FastVideoError
from . import counted, video_sparse
from .sliding_tile import SlidingTileOptions
from .video_sparse import VideoSparseOptions

ENV_VAR = "FASTVIDEO_ATTENTION_BACKEND"
BACKENDS = {  # name → module in this package
    "TORCH_SDPA": "sdpa",
    "FLASH_ATTN": "flash",
    "FLASH_ATTN_4": "flash4",
    "SAGE_ATTN": "sage",
    "SLIDING_TILE_ATTN": "sliding_tile",
    "INT8_ATTN": "int8",
    "KITCHEN_INT8": "kitchen",
    "VIDEO_SPARSE_ATTN": "video_sparse",
}
# Recognised names we cannot run: they need trained checkpoints or hardware we do not target.
UNSUPPORTED = {
    "VMOBA_ATTN": "needs a checkpoint trained for mixture-of-block attention",
    "SLA_ATTN": "needs a checkpoint fine-tuned for sparse-linear attention",
    "SAGE_SLA_ATTN": "needs a checkpoint fine-tuned for sparse-linear attention",
    "SAGE_ATTN_THREE": "SageAttention3 runs FP4 tensor cores and needs a Blackwell GPU",
    "FLASH_ATTN_FP4": "FP4 FlashAttention needs a Blackwell GPU",
}
# Backends that use the video's geometry: they get the grid and their options, and under
# torch.compile they never go through the opaque dense op.
AttentionOptions = SlidingTileOptions | VideoSparseOptions
GEOMETRIC: dict[str, type[SlidingTileOptions] | type[VideoSparseOptions]] = {
    "SLIDING_TILE_ATTN": SlidingTileOptions, "VIDEO_SPARSE_ATTN": VideoSparseOptions}
# 8-bit backends: close to exact, not equal. The hybrid schedule runs EXACT in their place on the first
# and last steps, those most sensitive to attention error (layout is set early, fine detail late).
APPROXIMATE = ("SAGE_ATTN", "INT8_ATTN", "KITCHEN_INT8")
EXACT = "TORCH_SDPA"
CROSS_AS_NAMED = ("TORCH_SDPA", "FLASH_ATTN", "FLASH_ATTN_4")  # exact kernels: text cross-attention keeps them


def backend_module(name: str):
    return importlib.import_module(f".{BACKENDS[name]}", __name__)


def backend_status() -> dict[str, str | None]:
    """Every backend name → None when it can run here, else why not and how to install it. Never raises:
    a backend whose check itself fails is reported with the error."""
    status: dict[str, str | None] = {}
    for name in BACKENDS:
        try:
            status[name] = backend_module(name).available()
        except Exception as e:  # a broken optional package must not break the listing
            status[name] = f"its availability check failed: {e!r:.200}"
    return status


def describe_backends() -> list[str]:
    """One line per backend name (usable, or why not + install hint), then the recognised names we
    do not run: for `fastvideo-nodes backends` and the attention node's text."""
    lines = [f"{name}: {'usable' if problem is None else 'not usable: ' + problem}"
             for name, problem in backend_status().items()]
    lines += [f"{name}: not supported: {why}" for name, why in UNSUPPORTED.items()]
    return lines


def report_lines(requested: str | None = None, exact_steps: int = 0) -> list[str]:
    """What the attention node shows: the backend asked for, auto's latest decision in this process
    (or when it will be made), the hybrid schedule, then describe_backends()."""
    from . import auto
    name = (requested or "auto").upper()
    lines = [f"requested: {name}"]
    if name == "AUTO":
        record = auto.last_choice()
        lines.append(auto.summary(record) if record else
                     "auto: decided at the first sampling step, by measuring each usable backend once per GPU "
                     "and shape bucket (kept on disk); the log and the generation result show the figures")
    if exact_steps:
        lines.append(f"hybrid: {EXACT} on the first and last {exact_steps} steps when the backend is 8-bit "
                     f"({', '.join(APPROXIMATE)}), that backend in between")
    return lines + describe_backends()


def check_exact_steps(value, name: str = "exact_attention_steps") -> int:
    """The hybrid schedule's N (exact attention on the first and last N steps): a whole number ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FastVideoError(f"{name} must be a whole number of steps ≥ 0 (0 = 8-bit on every step), "
                             f"got {value!r}.")
    return value


def backend_for_step(backend: str, step: int | None, num_steps: int | None, exact_steps: int = 0) -> str:
    """The hybrid schedule: an 8-bit `backend` (APPROXIMATE) gives way to EXACT on the first and last
    `exact_steps` of `num_steps` (0-based `step`); other backends, and calls outside a sampling loop
    (step or num_steps None), keep `backend`. Decided per forward, outside compiled blocks, so compiled
    blocks see two backend names in all (two graphs), not one per step."""
    if exact_steps <= 0 or step is None or num_steps is None or backend not in APPROXIMATE:
        return backend
    return EXACT if step < exact_steps or step >= num_steps - exact_steps else backend


def exact_step_indices(num_steps: int, exact_steps: int) -> list[int]:
    """The 0-based steps that the hybrid schedule runs exact (for the generation record)."""
    return [i for i in range(num_steps) if i < exact_steps or i >= num_steps - exact_steps]


def resolve_backend(name: str | None) -> str:
    """Explicit name > FASTVIDEO_ATTENTION_BACKEND > "AUTO". Raises for unknown or unusable names."""
    chosen = (name or env.get(ENV_VAR)).strip().upper()
    if chosen == "AUTO":
        return chosen
    if chosen in UNSUPPORTED:
        raise FastVideoError(f"attention backend {chosen} is not supported: {UNSUPPORTED[chosen]}. "
                             f"Use one of: auto, {', '.join(BACKENDS)}.")
    if chosen not in BACKENDS:
        raise FastVideoError(f"attention backend {chosen!r} is unknown; valid names: auto, {', '.join(BACKENDS)}.")
    problem = backend_module(chosen).available()
    if problem:
        raise FastVideoError(f"attention backend {chosen} cannot run here: {problem}")
    return chosen


@dataclass(frozen=True)
class AttentionSpec:
    """What one DiT forward needs to know to do attention (a models.seams.Attention).

    backend: a resolved name or "AUTO". grid: the (t, h, w) token grid of the self-attention
    sequence, for backends that use the video's geometry. step: the sampling step (sparse
    backends may stay dense for the first steps). options: the backend's settings, None = defaults.
    tiled: the model keeps the self-attention sequence in VIDEO_SPARSE_ATTN's tile order
    (`token_order`), so the backend neither gathers nor scatters it.
    """
    backend: str = "AUTO"
    grid: tuple[int, int, int] | None = None
    step: int | None = None
    options: AttentionOptions | None = field(default=None, hash=False, compare=False)
    tiled: bool = False

    def __post_init__(self):
        object.__setattr__(self, "options", as_options(self.options))  # frozen

    @property
    def gated(self) -> bool:
        return self.backend == "VIDEO_SPARSE_ATTN"

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       gate: torch.Tensor | None = None) -> torch.Tensor:
        return attention(q, k, v, backend=self.backend, grid=self.grid, step=self.step, options=self.options,
                         gate=gate, tiled=self.tiled)

    def cross_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        log_count: torch.Tensor | None = None) -> torch.Tensor:
        # Text cross-attention (512 keys) is dense for every backend, and exact unless an exact kernel was
        # named: there the 8-bit kernels lose (H200, 32,760 queries × 40 heads: cuDNN 0.59 ms at rel. error
        # 0.002, INT8_ATTN 0.80 ms at 0.037), and auto's probe was made at self-attention's length.
        # log_count: the keys' multiplicities (the text padding folded into one key, counted.py).
        if log_count is not None:
            return counted.attend(q, k, v, log_count)
        backend = self.backend if self.backend in CROSS_AS_NAMED else EXACT
        return attention(q, k, v, backend=backend)


def as_options(options) -> AttentionOptions | None:
    """Options as given; None or an empty mapping → None (defaults); a mapping of one options
    class's fields (older callers, the worker pool's `attention_options or {}`) → that class,
    validated: {"sparsity": …} is VideoSparseOptions, the sliding-tile fields SlidingTileOptions."""
    if options is None or isinstance(options, (SlidingTileOptions, VideoSparseOptions)):
        return options
    if isinstance(options, Mapping):
        if not options:
            return None
        return VideoSparseOptions(**options) if set(options) == {"sparsity"} else SlidingTileOptions(**options)
    raise FastVideoError(f"attention options must be SlidingTileOptions or VideoSparseOptions, "
                         f"got {type(options).__name__}.")


def _options_for(name: str, options) -> AttentionOptions | None:
    """The options of a geometric backend, refused when they belong to the other one."""
    options = as_options(options)
    wanted = GEOMETRIC[name]
    if options is not None and not isinstance(options, wanted):
        raise FastVideoError(f"attention backend {name} takes {wanted.__name__}, got {type(options).__name__}.")
    return options


def token_order(backend: str, grid: tuple[int, int, int] | None, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The order a model may keep its self-attention sequence in between the blocks for this backend, as
    (order, inverse) [S] (x[:, order] enters it, x[:, inverse] leaves it), or None: token order.
    VIDEO_SPARSE_ATTN works on 4×4×4 tiles: in their order every call skips a gather of q, k, v and a
    scatter of its output. Each block is per token but for RoPE (permuted alike) and self-attention."""
    if backend != "VIDEO_SPARSE_ATTN" or grid is None:
        return None
    return video_sparse.tile_order(grid, device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None,
              grid: tuple[int, int, int] | None = None, step: int | None = None,
              options: AttentionOptions | None = None, gate: torch.Tensor | None = None,
              tiled: bool = False) -> torch.Tensor:
    """Non-causal attention. q: [B, Sq, H, D], k/v: [B, Sk, H, D] → [B, Sq, H, D].

    gate: [B, Sq, H, D], VIDEO_SPARSE_ATTN's weight on its compressed branch (FastWan's
    `to_gate_compress`); the other backends have no such branch and take None.
    tiled: the sequence is in `token_order(backend, grid)` (VIDEO_SPARSE_ATTN only).
    """
    name = resolve_backend(backend) if backend is None or backend not in BACKENDS else backend
    if name == "AUTO":
        from .auto import choose
        name = choose(q)
    if gate is not None and name != "VIDEO_SPARSE_ATTN":
        raise FastVideoError(f"attention backend {name} takes no gate; only VIDEO_SPARSE_ATTN has a gated "
                             "compressed branch.")
    if tiled and (name != "VIDEO_SPARSE_ATTN" or grid is None):
        raise FastVideoError(f"attention backend {name} takes its sequence in token order; only "
                             "VIDEO_SPARSE_ATTN (with a grid) takes it in tile order.")
    # FlexAttention backends: torch.compile should see (and fuse) them, not the opaque dense op.
    if name == "SLIDING_TILE_ATTN":
        return backend_module(name).attend(q, k, v, grid=grid, step=step, options=_options_for(name, options))
    if name == "VIDEO_SPARSE_ATTN":
        options = cast("VideoSparseOptions | None", _options_for(name, options))
        if grid is not None and video_sparse.kernel_applies(q, v):  # the Triton kernel: one custom op, traceable
            return video_sparse.attend(q, k, v, grid=grid, gate=gate, options=options, tiled=tiled)
        return _video_sparse(q, k, v, grid, gate, options, tiled)
    if torch.compiler.is_compiling():
        return torch.ops.fastvideo.dense_attention(q, k, v, name)
    return backend_module(name).attend(q, k, v)


# Under torch.compile VSA's Flex path runs as eager code between the compiled parts of the block (as
# FastVideo runs it): its tile bookkeeping (top-k, BlockMask building) broke the graph anyway, and on CUDA its
# FlexAttention call is compiled on its own (video_sparse._compiled_flex).
@torch.compiler.disable
def _video_sparse(q, k, v, grid, gate, options, tiled=False):
    return backend_module("VIDEO_SPARSE_ATTN").attend(q, k, v, grid=grid, gate=gate, options=options, tiled=tiled)


# Inside compiled blocks dense kernels run as one opaque op: the compiler fuses the work around them
# but hands the kernel the same contiguous [B,S,H,D] inputs as eager (it ran ~5% slower on the
# re-laid-out tensors the compiler produced otherwise).
@torch.library.custom_op("fastvideo::dense_attention", mutates_args=())
def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    return backend_module(backend).attend(q.contiguous(), k.contiguous(), v.contiguous()).contiguous()


@_dense_attention.register_fake
def _(q, k, v, backend):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
