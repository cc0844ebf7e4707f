"""Wan2.1 diffusion transformer (text-to-video, and image-to-video when `image_dim` is set), top to bottom.

Tensor names follow the original Wan release (and ComfyUI's single files), so those files load
as they are; `wan_loader` maps the diffusers names onto these.

Data path of one forward (B batch, S = T'·H'·W'/4 tokens, C = dim):
  latents [B,16,T',H',W'] --patch_embedding--> tokens [B,S,C]
  timestep [B] --sinusoid→MLP--> e [B,C] --SiLU→Linear--> e0 [B,6,C]   (float32)
  text [B,L,4096] --MLP--> context [B,512,C], or (a short prompt's zero padding folded into one key) [B,128,C]
  N × block(tokens, e0, context)   self-attn with 3D RoPE, cross-attn, FFN; fp32 residual stream
  head(tokens, e) --unpatchify--> velocity [B,16,T',H',W']

Image-to-video (Wan2.1 I2V, cfg.image_dim = 1280, in_channels 36): the input is noise ++ condition
(4-channel first-frame mask + 16-channel image latent, built by pipeline/image_condition.py), and the
CLIP image tokens [B,257,1280] go through `img_emb` and are put before the text context; each
cross-attention then adds a second attention over those tokens (own k_img/v_img/norm_k_img).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionOptions, AttentionSpec, backend_for_step, resolve_backend, token_order
from ..errors import FastVideoError
from ..ops import (
    Linear,
    layer_norm_affine,
    layer_norm_modulate,
    linear_gelu,
    residual_layer_norm,
    rms_norm,
    rms_norm_rope,
)
from .seams import Attention, BlockCache, ParallelPlan


@dataclass(frozen=True)
class WanDiTConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # FastWan (VSA-distilled): each self-attention has a `gate_compress` projection whose output
    # weighs VIDEO_SPARSE_ATTN's compressed branch.
    gate_compress: bool = False
    image_dim: int | None = None  # CLIP-vision width (1280) for image-to-video; None = text-to-video

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def size_name(self) -> str:
        """"1.3B", "14B" or "custom": picks presets such as the TeaCache coefficients."""
        return {1536: "1.3B", 5120: "14B"}.get(self.dim, "custom")


# ----------------------------------------------------------------------------- small pieces

def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] raw timesteps (0..1000) → [B, dim] float32, cos half first."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float, device) -> torch.Tensor:
    """Rotation angles [S, head_dim/2] for a (t, h, w) token grid, computed in float64.

    head_dim is split t/h/w as d-4(d//6), 2(d//6), 2(d//6) (44/42/42 for 128); each axis uses
    the standard 1/theta^(2i/d_axis) frequencies over its own position.
    """
    d_hw = 2 * (head_dim // 6)
    parts = []
    for axis, (n, d_axis) in enumerate(zip(grid, (head_dim - 2 * d_hw, d_hw, d_hw))):
        inv = 1.0 / theta ** (torch.arange(0, d_axis, 2, dtype=torch.float64, device=device) / d_axis)
        ang = torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv)  # [n, d_axis/2]
        shape = [1, 1, 1, -1]
        shape[axis] = n
        parts.append(ang.view(shape).expand(*grid, -1))
    return torch.cat(parts, dim=-1).reshape(math.prod(grid), head_dim // 2)


def rope_cos_sin(grid, head_dim, theta, device) -> tuple[torch.Tensor, torch.Tensor]:
    ang = rope_angles(grid, head_dim, theta, device)
    return ang.cos().float(), ang.sin().float()


class RMSNorm(nn.Module):
    """RMSNorm over the whole feature dim (across heads, as Wan's q/k norm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class AffineLayerNorm(nn.Module):
    """The cross-attention input norm (affine): float32 math, the result in the compute dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return layer_norm_affine(x, self.weight, self.bias, self.eps, dtype)


# ----------------------------------------------------------------------------- attention

class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float, gate_compress: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.gate_compress = Linear(dim, dim) if gate_compress else None

    def forward(self, x, rope, attn: Attention):
        """x [B,S,C] → [B,S,C]."""
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1))
        cos, sin = rope
        q = rms_norm_rope(heads(self.q(x)), self.norm_q.weight, cos, sin, self.norm_q.eps)
        k = rms_norm_rope(heads(self.k(x)), self.norm_k.weight, cos, sin, self.norm_k.eps)
        v = heads(self.v(x))
        if self.gate_compress is not None and attn.gated:  # FastWan: from the same modulated input as q, k, v
            return self.o(attn.self_attention(q, k, v, heads(self.gate_compress(x))).flatten(2))
        return self.o(attn.self_attention(q, k, v).flatten(2))


class CrossAttention(SelfAttention):
    def __init__(self, dim: int, num_heads: int, eps: float, text_len: int | None = None):
        """text_len: set for image-to-video, where the context is image tokens ++ text_len text tokens."""
        super().__init__(dim, num_heads, eps)
        self.text_len = text_len
        if text_len is not None:
            self.k_img, self.v_img = Linear(dim, dim), Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x, context, attn: Attention, text_log_count=None):
        """x [B,S,C] attends to the text context [B,L,C] (image-to-video: [B,I+L,C], image first) → [B,S,C].
        text_log_count [B,L]: each text key's log multiplicity (fold_text_padding), or None: once each."""
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1))
        image = None
        if self.text_len is not None:
            n_text = self.text_len if text_log_count is None else text_log_count.shape[1]
            image, context = context[:, :-n_text], context[:, -n_text:]
        q = heads(self.norm_q(self.q(x)))
        k = heads(self.norm_k(self.k(context)))
        v = heads(self.v(context))
        out = attn.cross_attention(q, k, v, text_log_count).flatten(2)
        if image is not None:  # Wan adds the two attentions before the output projection
            k_img = heads(self.norm_k_img(self.k_img(image)))
            out = out + attn.cross_attention(q, k_img, heads(self.v_img(image))).flatten(2)
        return self.o(out)


# ----------------------------------------------------------------------------- block and head

class WanBlock(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.eps, cfg.gate_compress)
        self.norm3 = AffineLayerNorm(cfg.dim, eps=cfg.eps)  # cross-attn input norm (diffusers: norm2)
        self.cross_attn = CrossAttention(cfg.dim, cfg.num_heads, cfg.eps,
                                         text_len=cfg.text_len if cfg.image_dim is not None else None)
        self.ffn = nn.Sequential(Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 Linear(cfg.ffn_dim, cfg.dim))
        # shift, scale, gate for self-attn; shift, scale, gate for the FFN (added to e0).
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim))

    def forward(self, x, e0, context, rope, attn: Attention, text_log_count=None):
        """x: fp32 residual stream [B,S,C]; e0: [B,6,C] or per token [B,S,6,C] fp32; context [B,L,C];
        text_log_count [B,L] or None (see CrossAttention)."""
        return self.finish(x, self.self_attention_out(x, e0, rope, attn, context.dtype), e0, context, attn,
                           text_log_count)

    def _modulation(self, e0):
        """i → modulation term i: 0-2 shift, scale, gate of self-attention; 3-5 of the FFN."""
        if e0.ndim == 3:  # one timestep per sample: [B,6,C] → six [B,1,C]
            return (self.modulation + e0).unsqueeze(2).unbind(1).__getitem__
        table = self.modulation[0]  # per token (Wan 2.2 TI2V): each [B,S,C] made when used (each is as big as x)
        return lambda i: e0[:, :, i] + table[i]

    def self_attention_out(self, x, e0, rope, attn: Attention, dtype) -> torch.Tensor:
        """The self-attention's output [B,S,C] in dtype, before its gate. It does not depend on the prompt,
        so a step's two CFG passes can share block 0's (WanDiT.forward's `share`)."""
        get = self._modulation(e0)
        return self.self_attn(layer_norm_modulate(x, get(0), get(1), self.eps, dtype), rope, attn)

    def finish(self, x, self_out, e0, context, attn: Attention, text_log_count=None):
        """The rest of the block after self_attention_out: its gated residual, cross-attention, FFN."""
        dtype = context.dtype
        get = self._modulation(e0)
        # Each residual add runs with the norm after it (norm3, then the FFN's modulated LayerNorm).
        x, h = residual_layer_norm(x, self_out, get(2), self.norm3.weight, self.norm3.bias, self.norm3.eps, dtype)
        x, h = residual_layer_norm(x, self.cross_attn(h, context, attn, text_log_count), None, 1 + get(4), get(3),
                                   self.eps, dtype)
        return torch.addcmul(x, self.ffn[2](linear_gelu(cast(Linear, self.ffn[0]), h)), get(5))


class Head(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))  # shift, scale

    def forward(self, x, e, dtype):
        """e: [B,C], or per token [B,S,C]."""
        if e.ndim == 2:
            shift, scale = (self.modulation + e.unsqueeze(1)).unsqueeze(2).unbind(1)
        else:
            shift, scale = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return self.head(layer_norm_modulate(x, shift, scale, self.eps, dtype))


class ImageEmbedding(nn.Module):
    """CLIP image tokens → DiT width: LayerNorm, Linear, GELU, Linear, LayerNorm (Wan's `img_emb.proj`)."""

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(AffineLayerNorm(image_dim, eps=1e-5), Linear(image_dim, image_dim), nn.GELU(),
                                  Linear(image_dim, dim), AffineLayerNorm(dim, eps=1e-5))

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B,I,image_dim] → [B,I,dim] in dtype; the norms compute in float32."""
        norm_in, fc1, act, fc2, norm_out = self.proj
        h = fc2(act(fc1(norm_in(x, dtype))))
        return norm_out(h, dtype)


# ----------------------------------------------------------------------------- text padding

# Key counts a folded text context is rounded up to: few, so that compiled blocks see few shapes. 256 is not
# one: there the counted kernel (0.55–0.76 ms at 32,760 queries × 40 heads, H200) was no faster than cuDNN over
# all 512 keys (0.59 ms); at 128 keys it takes 0.29 ms (12 heads: 0.10 against 0.18).
TEXT_KEY_BUCKETS = (128,)


def trim_text_padding(context: torch.Tensor) -> torch.Tensor:
    """[B,L,text_dim] → [B,L',text_dim] without the all-zero rows at the end (Wan's padding; at least one
    row is kept). One look at the values: call it once per generation, not per step."""
    nonzero = torch.nonzero(context.detach().abs().amax(dim=(0, 2)) > 0)
    rows = int(nonzero[-1]) + 1 if len(nonzero) else 1
    return context[:, :rows]


def fold_text_padding(context: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text [B,L,text_dim], L < text_len, that Wan would zero-pad to text_len → (text [B,Lk,text_dim], log_count
    [B,Lk]): the L rows, then one zero row standing for all text_len − L padding rows (log count log(text_len − L);
    they all embed to the same key and value), then zero rows that count for nothing (-inf) up to Lk, the
    smallest of TEXT_KEY_BUCKETS above L. When none is (or L ≥ text_len): padded to text_len as Wan does, None."""
    rows = context.shape[1]
    keys = next((n for n in TEXT_KEY_BUCKETS if rows < n < text_len), None)
    if keys is None:
        return (F.pad(context, (0, 0, 0, text_len - rows)) if rows < text_len else context), None
    log_count = torch.full((context.shape[0], keys), -math.inf, device=context.device)
    log_count[:, :rows] = 0.0
    log_count[:, rows] = math.log(text_len - rows)
    return F.pad(context, (0, 0, 0, keys - rows)), log_count


class SharedFirstSelfAttention:
    """Block 0's self-attention output, kept for the other CFG pass of the same step: both passes feed
    block 0 the same latents, timestep and RoPE, and only its cross-attention sees the prompt. The sampler
    makes one per step that runs both passes; the first pass fills `out`, the second reuses it (about
    1/(2·layers) of the step's attention and projections)."""

    def __init__(self):
        self.out: torch.Tensor | None = None


# ----------------------------------------------------------------------------- the model

NEEDS_FASTWAN = ("attention backend VIDEO_SPARSE_ATTN needs a FastWan checkpoint (one distilled with video sparse "
                 "attention, with a to_gate_compress projection in every block); this model has none. Use auto or "
                 "another backend, or load a FastWan2.1 model.")

# Parameters kept in float32 whatever the compute dtype: small, and the math around them is fp32.
def keep_fp32(name: str) -> bool:
    return ("modulation" in name or name.startswith(("time_embedding", "time_projection"))
            or ".norm3." in name or name.startswith(("img_emb.proj.0.", "img_emb.proj.4.")))


class WanDiT(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.image_dim is not None:
            self.img_emb = ImageEmbedding(cfg.image_dim, cfg.dim)
        self._rope_cache: dict = {}
        self._first_parts: tuple | None = None  # block 0's two halves, compiled by compile_blocks

    def drop_device_caches(self) -> None:
        """Forget the RoPE tables: they live on the device the model last ran on, and a model sent
        home (module.to, memory/planner.PinnedHome.to_host) must leave nothing there."""
        self._rope_cache = {}

    def _apply(self, fn, *args, **kwargs):
        self.drop_device_caches()  # .to() / .cuda() / .cpu(): rebuilt on the next device used
        return super()._apply(fn, *args, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return cast(torch.Tensor, self.text_embedding[0].bias).dtype  # the weight may be stored as fp8

    # -- stages, public so that caches (TeaCache) and parallel wrappers can compose them

    def embed_time(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] → e [B,C] and e0 [B,6,C], both float32. Per-token timesteps [B,S] (Wan 2.2 TI2V,
        where the image's frame is at t = 0) → e [B,S,C] and e0 [B,S,6,C]."""
        if timestep.ndim == 2:  # few distinct values (t and 0): embed each once, then gather per token
            values, index = torch.unique(timestep, return_inverse=True)
            e, e0 = self.embed_time(values)
            return e[index], e0[index]
        e = self.time_embedding(sinusoidal_embedding(timestep, self.cfg.freq_dim))
        e0 = self.time_projection(e).unflatten(1, (6, self.cfg.dim))
        return e, e0

    def embed_text(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B,L,text_dim] (L ≤ text_len, zero-padded to text_len as Wan does) → [B,text_len,C], or with the
        padding folded into one key (fold_text_padding) [B,Lk,C] and its log counts [B,Lk]."""
        context, log_count = fold_text_padding(context, self.cfg.text_len)
        return self.text_embedding(context.to(self.dtype)), log_count

    def embed_context(self, context: torch.Tensor,
                      image_embeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text [B,L,text_dim] (and, for image-to-video, CLIP tokens [B,I,image_dim]) → the cross-attention
        context [B,Lk,C], or [B,I+Lk,C] with the image tokens first, and the text keys' log counts (embed_text)."""
        if (self.cfg.image_dim is None) != (image_embeds is None):
            raise FastVideoError("image_embeds: an image-to-video model needs the CLIP image embeddings [B,257,1280]"
                                 if image_embeds is None else
                                 "image_embeds: given to a text-to-video model, which takes no image.")
        text, log_count = self.embed_text(context)
        if image_embeds is None:
            return text, log_count
        if image_embeds.ndim != 3 or image_embeds.shape[-1] != self.cfg.image_dim:
            raise FastVideoError(f"image_embeds: expected [B,I,{self.cfg.image_dim}], got {tuple(image_embeds.shape)}.")
        image = self.img_emb(image_embeds.to(text.device, self.dtype), self.dtype)
        return torch.cat([image.expand(text.shape[0], -1, -1), text], dim=1), log_count

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B,16,T',H',W'] → tokens [B,S,C] float32 and the token grid (t, h, w)."""
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        grid = (x.shape[2], x.shape[3], x.shape[4])
        return x.flatten(2).transpose(1, 2).float(), grid

    def unpatchify(self, x: torch.Tensor, grid) -> torch.Tensor:
        """[B,S,pt·ph·pw·c] → [B,c,T',H',W'] float32."""
        pt, ph, pw = self.cfg.patch_size
        t, h, w = grid
        x = x.float().view(x.shape[0], t, h, w, pt, ph, pw, self.cfg.out_channels)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], self.cfg.out_channels, t * pt, h * ph, w * pw)

    def rope(self, grid, device, order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [S, D/2] of the grid's tokens; order: in that order of them (the attention's
        `token_order`), else token order."""
        key = (grid, str(device), order is not None)
        if key not in self._rope_cache:
            cos, sin = rope_cos_sin(grid, self.cfg.head_dim, self.cfg.rope_theta, device)
            self._rope_cache = {key: (cos, sin) if order is None else (cos[order], sin[order])}
        return self._rope_cache[key]

    def attention_backend_for(self, name: str | None, seq_len: int = 32760) -> str:
        """Resolve a backend name; "auto" is decided here, outside any compiled region. For a FastWan
        model auto is VIDEO_SPARSE_ATTN, the attention it was distilled with."""
        backend = resolve_backend(name)
        if backend == "AUTO" and self.cfg.gate_compress:
            return "VIDEO_SPARSE_ATTN"
        if backend == "AUTO":
            from ..attention.auto import choose_for
            backend = choose_for(self.text_embedding[0].weight.device, self.dtype, self.cfg.head_dim,
                                 self.cfg.num_heads, seq_len)
        return backend

    def compile_blocks(self, mode: str | None = None) -> WanDiT:
        """torch.compile every block: the elementwise work around the matmuls (norms, modulation,
        RoPE, gates) fuses into a few kernels. All blocks share one compiled graph."""
        device = self.text_embedding[0].weight.device
        if device.type == "cuda":
            from torch.utils._triton import has_triton
            if not has_triton():
                raise FastVideoError("compile: torch.compile needs Triton for CUDA and it is not installed here; "
                                     "install it (`pip install triton`, on Windows `pip install triton-windows`) "
                                     "or turn compile off.")
        for block in self.blocks:
            block.compile(dynamic=False, mode=mode)
        first = cast(WanBlock, self.blocks[0])
        self._first_parts = (torch.compile(first.self_attention_out, dynamic=False, mode=mode),
                             torch.compile(first.finish, dynamic=False, mode=mode))
        return self

    def run_blocks(self, x, e0, context, rope, attn: Attention, count: int | None = None,
                   text_log_count: torch.Tensor | None = None,
                   share: SharedFirstSelfAttention | None = None) -> torch.Tensor:
        """x through the blocks (the first `count` of them; None: all). share: block 0's self-attention
        output from the step's other CFG pass, or where to leave it. Not for a block with hooks (streamed
        weights arrive in a forward pre-hook, which calling its halves would skip)."""
        blocks = cast(list[WanBlock], list(self.blocks[:count]))
        first = blocks[0] if blocks else None
        if share is not None and first is not None and not (first._forward_pre_hooks or first._forward_hooks):
            self_out, finish = self._first_parts or (first.self_attention_out, first.finish)
            if share.out is None:
                share.out = self_out(x, e0, rope, attn, context.dtype)
            x = finish(x, share.out, e0, context, attn, text_log_count)
            blocks = blocks[1:]
        for block in blocks:
            x = block(x, e0, context, rope, attn, text_log_count)
        return x

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *,
                attention_backend: str | None = None, attention_options: AttentionOptions | None = None,
                step: int | None = None, cache: BlockCache | None = None,
                parallel: ParallelPlan | None = None, num_steps: int | None = None,
                exact_attention_steps: int = 0, condition: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, blocks: int | None = None,
                share: SharedFirstSelfAttention | None = None) -> torch.Tensor:
        """Velocity prediction.

        x: latents in model space [B,16,T',H',W'] (48 channels for Wan 2.2 TI2V-5B); timestep: [B]
        in 0..1000, or per token [B,S] (S = T'·H'·W'/4, in token order); context: text
        embeddings [B,L,4096]. Returns float32 [B,16,T',H',W'].
        Image-to-video: condition [B,20,T',H',W'] (mask ++ image latent) is concatenated to x on the
        channels, and image_embeds [B,257,1280] are the CLIP tokens of the first frame.
        attention_backend: a name or None (env var, then auto); attention_options and step go to
        backends that use them (sliding tiles, video sparse). VIDEO_SPARSE_ATTN needs a FastWan
        model (cfg.gate_compress). step (0-based) of num_steps and exact_attention_steps N: an 8-bit
        backend runs exact attention instead on the first and last N steps (hybrid schedule).
        cache(tokens, e, e0, run) may replace `run(tokens)` (TeaCache skips the blocks).
        parallel: a sequence-parallel plan with enter(tokens, rope, attn) → the local shard, its
        rope and an attention spec that exchanges heads, and exit(tokens) → the full sequence.
        blocks N: only the first N blocks run (the load-time warm-up, pipeline/warmup.py: every kernel of
        a step at its real shape, for 1/num_layers of the blocks' work); None: all of them.
        share: the step's two CFG passes pass the same one: block 0's self-attention runs once for both
        (the caller guarantees the same x, timestep and attention settings in both).
        """
        batch = x.shape[0]
        if condition is not None:
            x = torch.cat([x, condition.to(x.device, x.dtype).expand(batch, -1, -1, -1, -1)], dim=1)
        elif (self.cfg.image_dim is not None or self.cfg.in_channels == 36) and x.shape[1] != self.cfg.in_channels:
            raise FastVideoError(f"the DiT takes {self.cfg.in_channels} input channels, got {x.shape[1]}; an "
                                 "image-to-video model needs the image condition (20 channels) too.")
        tokens, grid = self.patchify(x)
        timestep = timestep.to(x.device)
        if timestep.ndim == 2:  # per token: [B,S] (or [1,S] for the whole batch)
            if timestep.shape[1] != tokens.shape[1] or timestep.shape[0] not in (1, batch):
                raise FastVideoError(f"timestep: per-token timesteps must be [batch, tokens] = [{batch}, "
                                     f"{tokens.shape[1]}], got {list(timestep.shape)}.")
            e, e0 = self.embed_time(timestep.expand(batch, -1))
        else:
            e, e0 = self.embed_time(timestep.reshape(-1).expand(batch))
        context, text_log_count = self.embed_context(context, image_embeds)
        backend = backend_for_step(self.attention_backend_for(attention_backend, math.prod(grid)),
                                   step, num_steps, exact_attention_steps)
        if backend == "VIDEO_SPARSE_ATTN" and not self.cfg.gate_compress:
            raise FastVideoError(NEEDS_FASTWAN)
        # The backend's token order (VSA's tiles): the blocks run in it, per token but for self-attention,
        # and RoPE goes with it; the head and everything outside the blocks see token order.
        tiling = token_order(backend, grid, x.device)
        # Only sparse backends look at the step; elsewhere it would make compiled blocks recompile per step.
        attn = AttentionSpec(backend=backend, grid=grid, step=step if backend == "SLIDING_TILE_ATTN" else None,
                             options=attention_options, tiled=tiling is not None)
        rope = self.rope(grid, x.device, None if tiling is None else tiling[0])
        spec: Attention = attn
        e0_blocks = e0
        if tiling is not None:
            tokens = tokens[:, tiling[0]]
            if e0.ndim == 4:
                e0_blocks = e0[:, tiling[0]]
        if parallel is not None and e0.ndim == 4:
            # Per-token modulation is sharded with its tokens: both ride through one enter(). The cache
            # keeps the full e/e0, so every rank's TeaCache decides alike.
            both, rope, spec = parallel.enter(torch.cat([tokens, e0_blocks.flatten(2)], dim=-1), rope, attn)
            tokens, e0_blocks = both[..., :self.cfg.dim], both[..., self.cfg.dim:].unflatten(-1, (6, self.cfg.dim))
        elif parallel is not None:
            tokens, rope, spec = parallel.enter(tokens, rope, attn)
        run = lambda h: self.run_blocks(h, e0_blocks, context, rope, spec, blocks, text_log_count, share)
        tokens = cache(tokens, e, e0, run) if cache is not None else run(tokens)
        if parallel is not None:
            tokens = parallel.exit(tokens)
        if tiling is not None:
            tokens = tokens[:, tiling[1]]
        return self.unpatchify(self.head(tokens, e, self.dtype), grid)
