"""Where the GPU time of one DiT forward / one VAE decode goes, ours and diffusers' (issue 7).

    python bench/profile_gpu.py --out $OUT [--parts dit,dit_compile,diffusers_dit,vae,diffusers_vae]

torch.profiler over one warm call; kernels are summed into categories (GEMM, attention, Triton
fused, conv, copies, other elementwise) and the top kernels are listed. Writes profile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import RESULTS, inputs, log, our_vae, random_dit, to_fp8_matmul

CATEGORIES = [  # first match wins
    ("attention", r"cudnn.*(fmha|flash|sdpa|attn)|flash|fmha|attention|sm90.*fprop.*bf16.*h128|sage|_attn_fwd"),
    ("conv", r"conv|implicit_gemm|cudnn|xmma_fprop|winograd|dgrad|wgrad"),
    ("gemm", r"gemm|cutlass|nvjet|xmma|sm90_|sm80_|ampere|hopper"),
    ("triton", r"^triton"),
    ("copy", r"copy|Memcpy|Memset|cat|transpose|permute|contiguous"),
]


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name, re.IGNORECASE):
            return cat
    return "elementwise/other"


def profiled(label: str, fn, top: int = 15, sequence: tuple[int, int] | None = None):
    """sequence (start, count): also log kernels start … start+count of the call in launch order,
    each with its time (which GEMM of a block is slow shows there: the sums hide it)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    if sequence:
        runs = sorted((ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA
                       and not ev.name.startswith(("Memcpy", "Memset"))), key=lambda ev: ev.time_range.start)
        for i, ev in enumerate(runs[sequence[0]:sum(sequence)], sequence[0]):
            log(kind="sequence", what=label, i=i, us=round(ev.time_range.elapsed_us(), 1), name=ev.name[:120])
    kernels = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.key and not ev.key.startswith(("ProfilerStep", "aten::", "cuda")):
            k = kernels.setdefault(ev.key, [0.0, 0])
            k[0] += t / 1e3
            k[1] += ev.count
    cats: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        cats[category(name)] = cats.get(category(name), 0.0) + ms
    log(kind="profile", what=label, total_ms=round(sum(cats.values()), 1),
        categories={k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])})
    for name, (ms, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        log(kind="kernel", what=label, ms=round(ms, 2), calls=n, cat=category(name), name=name[:140])


def our_dit(compiled: bool, fp8: bool = False, backend: str = "TORCH_SDPA", size: str = "1.3B",
            sequence: tuple[int, int] | None = None):
    m = random_dit(size)
    if fp8:
        to_fp8_matmul(m)
    if compiled:
        m.compile_blocks()
    x, t, ctx = inputs()
    label = f"ours {size} {'compiled' if compiled else 'eager'}{' fp8 matmul' if fp8 else ''} {backend}"
    with torch.inference_mode():
        profiled(label, lambda: m(x, t, ctx, attention_backend=backend), sequence=sequence)
    m = None
    torch.cuda.empty_cache()


def gemms(size: str = "1.3B"):
    """bf16 vs fp8 (_scaled_mm, row-wise scales) at the block shapes of `size`, 32,760 tokens."""
    from speed import SIZES, timeit

    from fastvideo_nodes.ops.linear import fp8_linear, quantize_fp8
    dim, ffn = SIZES[size].dim, SIZES[size].ffn_dim
    for k, n in ((dim, dim), (dim, ffn), (ffn, dim)):
        x = torch.randn(32760, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq, sw = quantize_fp8(w, torch.float8_e4m3fn)
        sx = torch.ones(32760, 1, device="cuda")
        xq = x.to(torch.float8_e4m3fn)
        swr = sw.reshape(1, n).contiguous()
        flops = 2 * 32760 * k * n
        t_bf16 = timeit(lambda: x @ w.t(), warm=3, iters=10)
        b = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
        t_lin = timeit(lambda: torch.nn.functional.linear(x, w, b), warm=3, iters=10)  # as the blocks call it
        t_hot = timeit(lambda: torch.nn.functional.linear(x, w, b), warm=0, iters=int(2.0 / t_lin))  # 2 s: hot card
        clock = torch.cuda.clock_rate() if hasattr(torch.cuda, "clock_rate") else None  # MHz, after the hot run
        t_mm = timeit(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=swr, out_dtype=torch.bfloat16), 3, 10)
        t_all = timeit(lambda: fp8_linear(x, wq, sw, None), warm=3, iters=10)
        log(kind="gemm", k=k, n=n, bf16_tflops=round(flops / t_bf16 / 1e12),
            linear_bias_tflops=round(flops / t_lin / 1e12), hot_2s_tflops=round(flops / t_hot / 1e12),
            sm_clock_mhz_after=clock, fp8_mm_tflops=round(flops / t_mm / 1e12),
            fp8_linear_eager_ms=round(t_all * 1e3, 3), bf16_ms=round(t_bf16 * 1e3, 3), fp8_mm_ms=round(t_mm * 1e3, 3))


def diffusers_dit():
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    m = m.to(torch.bfloat16).eval()
    x, t, ctx = inputs()
    with torch.inference_mode():
        profiled("diffusers eager", lambda: m(hidden_states=x.bfloat16(), timestep=t, encoder_hidden_states=ctx,
                                              return_dict=False))
    m = None
    torch.cuda.empty_cache()


def vae(ours: bool):
    z = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    if ours:
        v = our_vae()
        fn = lambda: v.decode(z)
    else:
        from diffusers import AutoencoderKLWan
        torch.manual_seed(0)
        with torch.device("cuda"):
            v = AutoencoderKLWan().to(torch.bfloat16).eval()
        fn = lambda: v.decode(z, return_dict=False)
    with torch.inference_mode():
        profiled(("ours" if ours else "diffusers") + " vae decode", fn, top=20)
    v = fn = None
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--parts", default="dit,dit_compile,diffusers_dit,vae,diffusers_vae",
                    help="also: dit_fp8, dit_compile_fp8, dit_compile_sage, gemm, dit_sequence (dit_compile with "
                         "kernels 200-259 in launch order)")
    ap.add_argument("--size", default="1.3B", choices=("1.3B", "14B"), help="our DiT's size and the GEMM shapes")
    ap.add_argument("--backend", default="TORCH_SDPA", help="attention backend of our dit parts")
    args = ap.parse_args()
    size, backend = args.size, args.backend.upper()
    parts = args.parts.split(",")
    os.makedirs(args.out, exist_ok=True)
    jobs = {"dit": lambda: our_dit(False, False, backend, size),
            "dit_compile": lambda: our_dit(True, False, backend, size),
            "dit_sequence": lambda: our_dit(True, False, backend, size, sequence=(200, 60)),
            "diffusers_dit": diffusers_dit, "dit_fp8": lambda: our_dit(False, True, backend, size),
            "dit_compile_fp8": lambda: our_dit(True, True, backend, size),
            "dit_compile_sage": lambda: our_dit(True, backend="SAGE_ATTN", size=size), "gemm": lambda: gemms(size),
            "vae": lambda: vae(True), "diffusers_vae": lambda: vae(False)}
    for p in parts:
        try:
            jobs[p]()
        except Exception as e:
            log(kind=p, error=repr(e)[:400])
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
