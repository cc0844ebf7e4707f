"""Wan VAEs: causal 3D-convolution autoencoders, 4× in time.

- Wan 2.1: 8× in space, 16 latent channels (`wan_2.1_vae.safetensors`).
- Wan 2.2 (`residual=True`, `patch_size=2`): pixels are first folded 2×2 into 12 channels, each
  down/up stage adds a parameter-free shortcut (channel-group averaging down, duplication up), 16×
  in space, 48 latent channels, its own latent mean/std (`wan2.2_vae.safetensors`).

Names follow the original Wan release (and ComfyUI's files), which load as they are.

Video is processed in chunks along time so that memory does not grow with length: the encoder
takes the first frame alone and then 4 frames at a time (one latent frame each); the decoder takes
one latent frame at a time (the first gives 1 frame, the others 4). Every causal convolution keeps
the last 2 frames of its input between chunks (`stream()`), which makes chunked processing equal to
processing the whole clip at once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import channels_last, rms_norm_channels

LATENT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
LATENT_MEAN_22 = [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
                  0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158,
                  0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649,
                  0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573,
                  -0.0548, -0.1681, -0.0667]
LATENT_STD_22 = [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]
# The latent channel count tells the two VAEs apart, so raw ↔ model space needs no VAE at hand.
LATENT_STATS = {16: (LATENT_MEAN, LATENT_STD), 48: (LATENT_MEAN_22, LATENT_STD_22)}
CACHE_T = 2  # frames a causal 3×3×3 conv needs from the previous chunk


def _stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..errors import FastVideoError
    if z.shape[1] not in LATENT_STATS:
        raise FastVideoError(f"latents: {z.shape[1]} channels; a Wan latent has 16 (Wan 2.1 VAE) or 48 "
                             "(Wan 2.2 VAE) channels.")
    mean, std = LATENT_STATS[z.shape[1]]
    view = (1, -1) + (1,) * (z.ndim - 2)
    return (torch.tensor(mean, dtype=torch.float32, device=z.device).view(view),
            torch.tensor(std, dtype=torch.float32, device=z.device).view(view))


def raw_to_model(z: torch.Tensor) -> torch.Tensor:
    """Raw VAE space (what ComfyUI's LATENT holds) → the DiT's model space: (z − mean) / std."""
    mean, std = _stats(z)
    return (z.float() - mean) / std


def model_to_raw(z: torch.Tensor) -> torch.Tensor:
    """DiT model space → raw VAE space: z·std + mean."""
    mean, std = _stats(z)
    return z.float() * std + mean


@dataclass(frozen=True)
class WanVAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    # Wan 2.2: residual stages with shortcuts, pixels folded patch×patch, a wider decoder.
    residual: bool = False
    patch_size: int = 1
    decoder_base_dim: int | None = None  # None = base_dim

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent pixel: 8 for Wan 2.1, 16 for Wan 2.2."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    @property
    def image_channels(self) -> int:
        """Channels the encoder takes (and the decoder gives): RGB folded patch×patch."""
        return 3 * self.patch_size ** 2


WAN22_VAE = WanVAEConfig(base_dim=160, decoder_base_dim=256, z_dim=48, residual=True, patch_size=2)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B,C,T,H,W] → [B,C·p·p,T,H/p,W/p]; channel order (c, column in patch, row in patch) as Wan 2.2."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of patchify: [B,C·p·p,T,h,w] → [B,C,T,h·p,w·p]."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    x = x.reshape(b, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cpp // (p * p), t, h * p, w * p)


def avg_down(x: torch.Tensor, out_ch: int, ft: int, fs: int) -> torch.Tensor:
    """Wan 2.2's encoder shortcut: fold ft×fs×fs neighbours into channels, then average groups of
    channels down to out_ch. A short chunk is padded with zero frames at the front to ft frames."""
    pad_t = -x.shape[2] % ft
    if pad_t:
        x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    x = x.reshape(b, out_ch, c * ft * fs * fs // out_ch, t // ft, h // fs, w // fs)
    return x.mean(dim=2)


def dup_up(x: torch.Tensor, out_ch: int, ft: int, fs: int, first_chunk: bool) -> torch.Tensor:
    """Wan 2.2's decoder shortcut: repeat channels, then unfold them into ft×fs×fs neighbours; the
    first chunk drops its first ft−1 frames (it stands for one frame, as the main path's)."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(out_ch * ft * fs * fs // c, dim=1)
    x = x.reshape(b, out_ch, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, out_ch, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1:] if first_chunk else x


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only on the past side in time. While streaming, the past comes from a cache
    of the previous chunk's last input frames instead of zeros."""

    def __init__(self, in_ch, out_ch, kernel, stride=1, padding=0):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
        padding = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0)
        # Spatial zero padding is applied explicitly, as the reference does: padding inside the
        # 3D conv made cuDNN pick algorithms with several GB of workspace at 480p.
        self.space_pad = (padding[2], padding[2], padding[1], padding[1])
        self.time_pad = 2 * padding[0]
        self.cache: torch.Tensor | None = None
        self.streaming = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        past = self.cache if self.streaming and self.time_pad else None
        if self.streaming and self.time_pad:
            recent = x if past is None or x.shape[2] >= CACHE_T else torch.cat([past, x], dim=2)
            self.cache = recent[:, :, -CACHE_T:].clone()
        if not self.time_pad and not any(self.space_pad):
            return super().forward(x)
        return super().forward(self._padded(x, past))

    def _padded(self, x: torch.Tensor, past: torch.Tensor | None) -> torch.Tensor:
        """[past or zeros, x] in time and zeros around in space, written once into one buffer
        (rather than a concatenation and then a pad, two full copies)."""
        pw, ph, tp = self.space_pad[0], self.space_pad[2], self.time_pad
        b, c, t, h, w = x.shape
        fmt = torch.channels_last_3d if channels_last(x) else torch.contiguous_format
        buf = torch.empty((b, c, tp + t, h + 2 * ph, w + 2 * pw), dtype=x.dtype, device=x.device, memory_format=fmt)
        if ph:
            buf[:, :, :, :ph].zero_()
            buf[:, :, :, -ph:].zero_()
        if pw:
            buf[:, :, :, :, :pw].zero_()
            buf[:, :, :, :, -pw:].zero_()
        inner = buf[:, :, :, ph:ph + h, pw:pw + w]
        n_past = 0 if past is None else past.shape[2]
        if tp > n_past:
            inner[:, :, : tp - n_past].zero_()
        if past is not None and n_past:
            inner[:, :, tp - n_past: tp].copy_(past)
        inner[:, :, tp:].copy_(x)
        return buf


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C)·gamma, then SiLU if asked (the norm and the SiLU
    after it are one pass on the GPU). images=True for [N,C,H,W] inputs."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        return rms_norm_channels(x, self.gamma, silu=silu)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Index layout matters: residual.{0,2,3,6} are the tensors' names in the released file.
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x):
        r = self.residual  # norm, SiLU, conv, norm, SiLU, dropout (0), conv; each SiLU runs inside its norm
        h = r[6](r[3](r[2](r[0](x, silu=True)), silu=True))
        return h.add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))
        q, k, v = self.to_qkv(y).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)  # [bt,1,hw,c]
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return x + self.proj(y).reshape(b, t, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """Spatial ×2 up/down per frame, plus (the "3d" modes) ×2 in time through a causal time conv."""

    def __init__(self, dim: int, mode: str, up_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):  # Wan 2.1 halves the channels here (up_dim None), 2.2 keeps them
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2 if up_dim is None else up_dim, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        self.first_chunk_done = False
        self.last_frame: torch.Tensor | None = None

    def reset(self):
        self.first_chunk_done = False
        self.last_frame = None

    def forward(self, x):
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d":
            if self.first_chunk_done:  # the first chunk (one latent frame) is not doubled in time
                y = self.time_conv(x).view(b, 2, c, t, h, w)
                fmt = torch.channels_last_3d if channels_last(x) else torch.contiguous_format
                x = torch.empty((b, c, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=fmt)
                x[:, :, 0::2], x[:, :, 1::2] = y[:, 0], y[:, 1]  # frames interleaved: 0a 0b 1a 1b …
            self.first_chunk_done = True
        t = x.shape[2]
        y = self.resample(x.transpose(1, 2).reshape(b * t, x.shape[1], h, w))
        x = y.reshape(b, t, *y.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            first, self.last_frame = self.last_frame, x[:, :, -1:].clone()
            if first is not None:  # stride-2 time conv over (last frame of previous chunk, this chunk)
                x = self.time_conv(torch.cat([first, x], dim=2))
        return x


class DownStage(nn.Module):
    """Wan 2.2 encoder stage: residual blocks then a resample (`downsamples`), plus the averaging
    shortcut from the stage's input."""

    def __init__(self, d_in: int, d_out: int, num_res_blocks: int, down: bool, temporal: bool):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_res_blocks):
            layers.append(ResidualBlock(d_in if i == 0 else d_out, d_out))
        if down:
            layers.append(Resample(d_out, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.out_ch, self.ft, self.fs = d_out, 2 if temporal else 1, 2 if down else 1

    def forward(self, x):
        return self.downsamples(x).add_(avg_down(x, self.out_ch, self.ft, self.fs))


class UpStage(nn.Module):
    """Wan 2.2 decoder stage: residual blocks then a resample (`upsamples`), plus the duplicating
    shortcut from the stage's input (none in the last stage)."""

    def __init__(self, d_in: int, d_out: int, num_res_blocks: int, up: bool, temporal: bool):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_res_blocks + 1):
            layers.append(ResidualBlock(d_in if i == 0 else d_out, d_out))
        if up:
            layers.append(Resample(d_out, "upsample3d" if temporal else "upsample2d", up_dim=d_out))
        self.upsamples = nn.Sequential(*layers)
        self.up, self.out_ch, self.ft = up, d_out, 2 if temporal else 1
        self.first_chunk_done = False

    def reset(self):
        self.first_chunk_done = False

    def forward(self, x):
        y = self.upsamples(x)
        if self.up:
            y = y.add_(dup_up(x, self.out_ch, self.ft, 2, first_chunk=not self.first_chunk_done))
        self.first_chunk_done = True
        return y


class _Head(nn.Sequential):
    def __init__(self, dim: int, out: int):
        super().__init__(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out, 3, padding=1))

    def forward(self, x):
        return self[2](self[0](x, silu=True))  # the SiLU runs inside the norm


class Encoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1,) + tuple(cfg.dim_mult)]
        self.conv1 = CausalConv3d(cfg.image_channels, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(cfg.dim_mult) - 1
            if cfg.residual:
                layers.append(DownStage(d_in, d_out, cfg.num_res_blocks, down=not last,
                                        temporal=not last and cfg.temporal_downsample[i]))
                continue
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(d_in, d_out))
                d_in = d_out
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(d_out, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                    ResidualBlock(dims[-1], dims[-1]))
        self.head = _Head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x):
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mult = tuple(cfg.dim_mult)
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * m for m in (mult[-1],) + mult[::-1]]
        temporal_up = tuple(cfg.temporal_downsample[::-1])
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(mult) - 1
            if cfg.residual:
                layers.append(UpStage(d_in, d_out, cfg.num_res_blocks, up=not last,
                                      temporal=not last and temporal_up[i]))
                continue
            if i > 0:
                d_in //= 2  # the previous upsample's conv halves the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(d_in, d_out))
                d_in = d_out
            if i != len(mult) - 1:
                layers.append(Resample(d_out, "upsample3d" if temporal_up[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = _Head(dims[-1], cfg.image_channels)

    def forward(self, z):
        return self.head(self.upsamples(self.middle(self.conv1(z))))


class WanVAE(nn.Module):
    def __init__(self, cfg: WanVAEConfig = WanVAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # to (mean, log-variance)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @contextlib.contextmanager
    def stream(self, part: nn.Module):
        """Chunked processing of `part`: caches on for the duration, cleared before and after."""
        convs = [m for m in part.modules() if isinstance(m, CausalConv3d)]
        resamples = [m for m in part.modules() if isinstance(m, (Resample, UpStage))]

        def clear(streaming: bool):
            for conv in convs:
                conv.cache, conv.streaming = None, streaming
            for r in resamples:
                r.reset()
        clear(True)
        try:
            yield
        finally:
            clear(False)

    # -- latent normalisation: model space = (raw − mean) / std
    normalize = staticmethod(raw_to_model)
    denormalize = staticmethod(model_to_raw)

    # -- encode / decode

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B,3,T,H,W] in [-1,1], T = 4n+1 → raw latent mean [B,z,n+1,H/s,W/s] float32
        (z, s = 16, 8 for Wan 2.1; 48, 16 for Wan 2.2)."""
        x = patchify(video.to(self.device, self.dtype), self.cfg.patch_size)
        chunks = [x[:, :, :1]] + [x[:, :, i:i + 4] for i in range(1, x.shape[2], 4)]
        with self.stream(self.encoder):
            out = torch.cat([self.encoder(c) for c in chunks], dim=2)
        return self.conv1(out)[:, : self.cfg.z_dim].float()

    def decode(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Raw latents [B,z,T',h,w] → video [B,3,4T'−3,s·h,s·w] in [-1,1], float32 (s: spatial_stride).

        tile: optional spatial tile size in latent pixels (overlapping tiles, blended), for memory.
        """
        z = z.to(self.device, self.dtype)
        if tile is not None and max(z.shape[-2:]) > tile:
            return self._decode_tiled(z, tile)
        if z.is_cuda:  # cuDNN's native layout: no transposes around every convolution
            self._decoder_channels_last()
            z = z.contiguous(memory_format=torch.channels_last_3d)
        x = self.conv2(z)
        with self.stream(self.decoder):
            frames = [self.decoder(x[:, :, i:i + 1]).float() for i in range(x.shape[2])]
        return unpatchify(torch.cat(frames, dim=2), self.cfg.patch_size).clamp_(-1, 1)

    def _decoder_channels_last(self):
        for m in (self.conv2, self.decoder):
            for p in m.parameters():
                if p.dim() in (4, 5) and not channels_last(p):
                    p.data = p.data.contiguous(memory_format=torch.channels_last if p.dim() == 4
                                               else torch.channels_last_3d)

    def _decode_tiled(self, z: torch.Tensor, tile: int) -> torch.Tensor:
        """Decode overlapping spatial tiles and blend them with linear ramps over the overlap."""
        overlap = max(1, tile // 4)
        s = self.cfg.spatial_stride
        step = tile - overlap
        b, _, t, h, w = z.shape
        out: torch.Tensor | None = None
        weight: torch.Tensor | None = None
        for y0 in range(0, max(h - overlap, 1), step):
            for x0 in range(0, max(w - overlap, 1), step):
                y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                y0, x0 = max(0, y1 - tile), max(0, x1 - tile)
                piece = self.decode(z[..., y0:y1, x0:x1])
                if out is None or weight is None:
                    out = torch.zeros(b, 3, piece.shape[2], s * h, s * w, device=piece.device)
                    weight = torch.zeros(1, 1, 1, s * h, s * w, device=piece.device)
                ramp = _ramp2d(piece.shape[-2], piece.shape[-1], s * overlap, y0 > 0, y1 < h, x0 > 0, x1 < w,
                               piece.device)
                out[..., s * y0:s * y1, s * x0:s * x1] += piece * ramp
                weight[..., s * y0:s * y1, s * x0:s * x1] += ramp
        assert out is not None and weight is not None  # the loops cover at least one tile
        return (out / weight).clamp_(-1, 1)

    def decode_frames(self, z_raw: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """[1,z,T',h,w] raw latents → ComfyUI IMAGE: float32 [T,H,W,3] in 0..1 on CPU."""
        video = self.decode(z_raw, tile=tile)[0]
        return ((video + 1) / 2).clamp_(0, 1).permute(1, 2, 3, 0).contiguous().cpu()


def _ramp2d(h, w, overlap, top, bottom, left, right, device) -> torch.Tensor:
    """Blend weights for one tile: rising over `overlap` pixels on the sides that have a neighbour."""
    def ramp(n, lo, hi):
        r = torch.ones(n, device=device)
        k = min(overlap, n)
        edge = (torch.arange(k, device=device) + 1) / (k + 1)
        if lo:
            r[:k] = torch.minimum(r[:k], edge)
        if hi:
            r[-k:] = torch.minimum(r[-k:], edge.flip(0))
        return r
    return (ramp(h, top, bottom)[:, None] * ramp(w, left, right)[None, :]).view(1, 1, 1, h, w)
