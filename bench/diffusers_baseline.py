"""diffusers measured on the GPU, for the ratios every bench reports (same process, same run).

The peer side of bench/speed.py and bench/e2e.py: diffusers 0.42's WanTransformer3DModel forward
(eager and with torch.compile), AutoencoderKLWan decode, and the bf16 matmul ceiling. Weights are
random: speed does not depend on their values. diffusers is not in the device image; carry its
wheel (see docs/benchmarks.md). Results go through the caller's `log` (bench/speed.py's by default).

    python3 bench/diffusers_baseline.py dit vae        # alone, one JSON line per measurement
"""
from __future__ import annotations

import sys
import time

import torch

WAN = {  # diffusers WanTransformer3DModel arguments per published size
    "1.3B": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14B": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
}
SHARED = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)


def _default_log(**kw):
    import json
    print(json.dumps(kw), flush=True)


log = _default_log  # bench/speed.py replaces it with its own, which also records the result


def event_time(fn, warm: int = 1, iters: int = 3) -> float:
    """Seconds per call, timed with CUDA events after `warm` untimed calls."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1000


def transformer(size: str = "1.3B"):
    """A full-size diffusers Wan DiT on the GPU in bf16 with seeded random weights."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    with torch.device("cuda"):
        return WanTransformer3DModel(**SHARED, **WAN[size]).to(torch.bfloat16).eval()


def wan_dit(size: str = "1.3B", frames: int = 81, h: int = 480, w: int = 832, compile_: bool = False) -> None:
    """One forward at 480×832×81 (32,760 tokens), eager and optionally with torch.compile."""
    m = transformer(size)
    lt, lh, lw = (frames - 1) // 4 + 1, h // 8, w // 8
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16, lt, lh, lw, device="cuda", dtype=torch.bfloat16, generator=g)
    ctx = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    ts = torch.tensor([500.0], device="cuda")
    call = lambda model: model(hidden_states=x, timestep=ts, encoder_hidden_states=ctx, return_dict=False)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        t = event_time(lambda: call(m))
    log(kind="wan_dit_forward", impl="diffusers", size=size, frames=frames, h=h, w=w, attn="native",
        s_per_forward=round(t, 3), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    if compile_:
        mc = torch.compile(m)
        with torch.inference_mode():
            t0 = time.time()
            call(mc)
            torch.cuda.synchronize()
            log(kind="compile_warmup", impl="diffusers", size=size, s=round(time.time() - t0, 1))
            t = event_time(lambda: call(mc))
        log(kind="wan_dit_forward", impl="diffusers+torch.compile", size=size, frames=frames, h=h, w=w,
            attn="native", s_per_forward=round(t, 3))
    m = None  # frees it before the next measurement
    torch.cuda.empty_cache()


def wan_vae(frames: int = 81, h: int = 480, w: int = 832) -> None:
    """AutoencoderKLWan decode of a 480×832×81 latent, with its peak memory."""
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLWan().to(torch.bfloat16).eval()
    z = torch.randn(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8, device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        t = event_time(lambda: vae.decode(z, return_dict=False), warm=1, iters=2)
    log(kind="wan_vae_decode", impl="diffusers", frames=frames, h=h, w=w, s=round(t, 3),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    vae = None
    torch.cuda.empty_cache()


def matmul_peak(n: int = 8192) -> None:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t = event_time(lambda: a @ b, warm=3, iters=10)
    log(kind="matmul", n=n, tflops=round(2 * n**3 / t / 1e12, 1))


if __name__ == "__main__":
    what = sys.argv[1:] or ["matmul", "dit", "vae"]
    if "matmul" in what:
        matmul_peak()
    if "dit" in what:
        wan_dit("1.3B", compile_="compile" in what)
    if "vae" in what:
        wan_vae()
    if "dit14" in what:
        wan_dit("14B")
