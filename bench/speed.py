"""Speed and memory on one GPU, ours vs diffusers in the same process (issue 7).

Full-size Wan2.1 models with random weights (speed does not depend on their values), bf16.
Warm-up runs are excluded from every timing; torch.compile warm-up is reported on its own line.

    python bench/speed.py --out $OUT                                  # 1.3B, VAE, text, end to end
    python bench/speed.py --out $OUT --parts anchor14,dit14           # 14B

diffusers is measured in the same process by bench/diffusers_baseline.py. Prints one JSON line per
measurement, then a markdown table; writes speed.json to --out. Whole generations (the public call
against diffusers' pipeline call) are bench/e2e.py's job, never composed from these parts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import report  # noqa: E402

from fastvideo_nodes.models.wan_dit import WanDiT, WanDiTConfig, keep_fp32  # noqa: E402
from fastvideo_nodes.pipeline.sampler import SamplingSettings, SamplingStats, denoise, initial_noise  # noqa: E402

SIZES = {"1.3B": WanDiTConfig(), "14B": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)}
log = report.Log()
RESULTS = log.rows


def timeit(fn, warm=1, iters=3) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def random_dit(size: str) -> WanDiT:
    """Full-size DiT on the GPU, default (random) init, bf16 with the fp32 tables kept fp32."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = WanDiT(SIZES[size])
    for name, p in m.named_parameters():
        p.data = p.data.to(torch.float32 if keep_fp32(name) else torch.bfloat16)
        if "modulation" in name:
            p.data.normal_(0, 0.02)
    return m.eval().requires_grad_(False)


def inputs(frames=81, h=480, w=832):
    """The same latents and text every call (seeded), so that variants can be compared."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8, device="cuda", generator=g)
    ctx = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    return x, torch.tensor([500.0], device="cuda"), ctx


def to_fp8_matmul(m: WanDiT) -> WanDiT:
    """The blocks' linears as load_dit(fp8_matmul=True) leaves them: e4m3fn with per-channel scales."""
    from fastvideo_nodes.ops.linear import Linear, enable_fp8_matmul, quantize_fp8
    for layer in m.blocks.modules():
        if isinstance(layer, Linear):
            w, scale = quantize_fp8(layer.weight.data, torch.float8_e4m3fn)
            layer.weight = torch.nn.Parameter(w, requires_grad=False)
            layer.register_buffer("scale_weight", scale)
    enable_fp8_matmul(m.blocks)
    return m


def sage_available() -> bool:
    from fastvideo_nodes.attention import backend_module
    return backend_module("SAGE_ATTN").available() is None


def bench_variant(m: WanDiT, size: str, label: str, backend: str, ref: torch.Tensor | None = None,
                  compiled: bool = False):
    """Time one forward of `m` as it is now (eager or compiled blocks; the first compiled call of
    a variant is its warm-up, reported apart) and compare its output with the exact eager one."""
    x, t, ctx = inputs()
    with torch.inference_mode():
        if compiled:
            torch.cuda.synchronize()
            start = time.perf_counter()
            m(x, t, ctx, attention_backend=backend)
            torch.cuda.synchronize()
            log(kind="compile_warmup", impl="ours", size=size, variant=label, s=round(time.perf_counter() - start, 1))
        torch.cuda.reset_peak_memory_stats()
        s = timeit(lambda: m(x, t, ctx, attention_backend=backend))
        out = m(x, t, ctx, attention_backend=backend)
    rec = dict(kind="dit_forward", impl="ours", size=size, variant=label, attn=backend, s=round(s, 4),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    if ref is not None:
        rec["rel_err_vs_exact"] = round(((out - ref).norm() / ref.norm()).item(), 5)
    log(**rec)
    return out


def bench_dit_variants(size: str, m: WanDiT | None = None, e2e_vae=None):
    """exact eager (+Sage) → exact compiled → SageAttention compiled → fp8 matmul (+Sage) compiled.
    With e2e_vae: 50-step runs after the exact compiled variant and after the fastest one."""
    m = m or random_dit(size)
    ref = bench_variant(m, size, "eager, exact attention", "TORCH_SDPA")
    if size == "1.3B":
        bench_steps(m, "TORCH_SDPA")
        bench_teacache_step(m, "TORCH_SDPA")
    if sage_available():
        bench_variant(m, size, "eager, SageAttention", "SAGE_ATTN", ref)
    m.compile_blocks()
    bench_variant(m, size, "compiled, exact attention", "TORCH_SDPA", ref, compiled=True)
    if e2e_vae is not None:
        bench_e2e(m, "TORCH_SDPA", e2e_vae, fast=False)
    sage = sage_available()
    if sage:
        bench_variant(m, size, "compiled, SageAttention", "SAGE_ATTN", ref, compiled=True)
        if e2e_vae is not None:
            bench_e2e(m, "SAGE_ATTN", e2e_vae, fast=False, label="compiled, SageAttention")
    to_fp8_matmul(m)
    bench_variant(m, size, "compiled, fp8 matmul, exact attention", "TORCH_SDPA", ref, compiled=True)
    best = "SAGE_ATTN" if sage else "TORCH_SDPA"
    if sage:
        bench_variant(m, size, "compiled, fp8 matmul, SageAttention", best, ref, compiled=True)
    if e2e_vae is not None:
        bench_e2e(m, best, e2e_vae, fast=True, label=f"compiled, fp8 matmul, {best}")
    return m


def bench_steps(m: WanDiT, backend):
    """Time of one sampling step with and without CFG (forwards + scheduler), 480×832×81."""
    ctx = torch.randn(1, 512, 4096)
    for g in (5.0, 1.0):
        s = SamplingSettings(steps=3, guidance_scale=g)
        noise = initial_noise(s)
        run = lambda: denoise(m, noise, ctx, ctx, s, attention_backend=backend)
        with torch.inference_mode():
            t = timeit(run, warm=1, iters=1) / 3
        log(kind="sampling_step", impl="ours", cfg=g > 1, s=round(t, 4))


def bench_e2e(m: WanDiT, backend, vae, fast: bool, label: str = "compiled, exact attention"):
    """50-step generation with CFG: sampling and VAE decode (text encoding is measured separately
    and added in the table). fast: CFG gate 0.5 and TeaCache 0.08 on top."""
    ctx = torch.randn(1, 512, 4096)
    kw = dict(cfg_gate=0.5, teacache_threshold=0.08) if fast else {}
    s = SamplingSettings(steps=50, guidance_scale=5.0, **kw)
    stats = SamplingStats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        z = denoise(m, initial_noise(s), ctx, ctx, s, attention_backend=backend, stats=stats)
        torch.cuda.synchronize()
        t_sample = time.perf_counter() - start
        vae.decode(z.to(vae.dtype))
    torch.cuda.synchronize()
    log(kind="e2e_sample_decode", impl="ours", fast=fast, variant=label, s=round(time.perf_counter() - start, 2),
        sample_s=round(t_sample, 2), cond_forwards=stats.cond_forwards, uncond_forwards=stats.uncond_forwards,
        teacache_skipped=stats.teacache_skipped)


def bench_teacache_step(m: WanDiT, backend):
    """With random weights TeaCache's decisions mean nothing: time a skipped and a full forward."""
    from fastvideo_nodes.pipeline.teacache import TeaCache
    x, t, ctx = inputs()
    tc = TeaCache(threshold=1e9, num_steps=10, coefficients=[0.0])
    with torch.inference_mode():
        tc.step = 0
        full = timeit(lambda: (setattr(tc, "step", 0), m(x, t, ctx, attention_backend=backend, cache=tc)), 1, 2)
        tc.step = 1
        skipped = timeit(lambda: m(x, t, ctx, attention_backend=backend, cache=tc), 1, 3)
    log(kind="teacache_forward", impl="ours", full_s=round(full, 4), skipped_s=round(skipped, 4))


def our_vae():
    from fastvideo_nodes.testing.vae import random_vae
    return random_vae(base_dim=96, seed=0).to("cuda", torch.bfloat16)


def bench_vae(vae):
    z = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        s = timeit(lambda: vae.decode(z), warm=1, iters=2)
    log(kind="vae_decode", impl="ours", s=round(s, 3), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))


def bench_text():
    """UMT5-XXL (random, bf16) on one 512-token prompt; the network is transformers' in both stacks."""
    from transformers import UMT5Config, UMT5EncoderModel
    cfg = UMT5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=256384,
                     feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        enc = UMT5EncoderModel(cfg).eval()
        torch.set_default_dtype(torch.float32)
    ids = torch.randint(0, 256384, (1, 512), device="cuda")
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        s = timeit(lambda: enc(input_ids=ids, attention_mask=mask).last_hidden_state, warm=1, iters=3)
    log(kind="text_encode", impl="transformers UMT5EncoderModel (both)", s=round(s, 4))
    enc = None
    torch.cuda.empty_cache()


def table():
    def get(kind, **match):
        for r in RESULTS:
            if r.get("kind") == kind and all(r.get(k) == v for k, v in match.items()) and "error" not in r:
                return r
        return None

    def ratio(ref, ours):
        return f"{ref / ours:.2f}×" if ref and ours else "–"

    rows = []
    for size in ("1.3B", "14B"):
        eager = (get("wan_dit_forward", impl="diffusers", size=size) or {}).get("s_per_forward")
        comp = (get("wan_dit_forward", impl="diffusers+torch.compile", size=size) or {}).get("s_per_forward")
        ours = [r for r in RESULTS if r.get("kind") == "dit_forward" and r.get("size") == size and "s" in r]
        if not ours and not eager:
            continue
        said = lambda v: f"{v} s" if v else "not measured"
        title = f"{size} DiT forward, 480×832×81 (diffusers 0.42.1: {said(eager)} eager, {said(comp)} compiled)"
        rows += ["", title, "",
                 "| ours | s | peak GiB | × diffusers eager | × diffusers compiled | rel. error vs exact |",
                 "|---|---|---|---|---|---|"]
        for r in ours:
            rows.append(f"| {r['variant']} | {r['s']} | {r['peak_gib']} | {ratio(eager, r['s'])} | "
                        f"{ratio(comp, r['s'])} | {r.get('rel_err_vs_exact', '–')} |")
    vae_o, vae_d = get("vae_decode", impl="ours"), get("wan_vae_decode")
    if vae_o and vae_d:
        rows += ["", "| VAE decode 480×832×81 | ours | diffusers | ratio |", "|---|---|---|---|",
                 f"| s | {(vae_o or {}).get('s')} | {(vae_d or {}).get('s')} | "
                 f"{ratio((vae_d or {}).get('s'), (vae_o or {}).get('s'))} |",
                 f"| peak GiB | {(vae_o or {}).get('peak_gib')} | {(vae_d or {}).get('peak_gib')} | |"]
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--parts", default="anchor13,vae,text,dit13",
                    help="any of anchor13, no_anchor_compile, vae, text, dit13, e2e, anchor14, dit14")
    args = ap.parse_args()
    parts = args.parts.split(",")
    os.makedirs(args.out, exist_ok=True)
    log(kind="env", torch=torch.__version__, gpu=torch.cuda.get_device_name(), cudnn=torch.backends.cudnn.version(),
        sage=sage_available())

    def attempt(name, fn):
        if name in parts:
            try:
                return fn()
            except Exception as e:
                log(kind=name, error=repr(e)[:400])
        return None

    import diffusers_baseline as baseline
    baseline.log = log
    attempt("anchor13", lambda: baseline.wan_dit("1.3B", compile_="no_anchor_compile" not in parts))
    attempt("anchor13", baseline.wan_vae)
    attempt("anchor14", lambda: baseline.wan_dit("14B"))
    torch.cuda.empty_cache()
    vae = attempt("vae", our_vae)
    if vae is not None:
        attempt("vae", lambda: bench_vae(vae))
    attempt("text", bench_text)
    attempt("dit13", lambda: bench_dit_variants("1.3B", e2e_vae=vae if "e2e" in parts else None))
    torch.cuda.empty_cache()
    attempt("dit14", lambda: bench_dit_variants("14B"))
    report.save(args.out, "speed", RESULTS, table())


if __name__ == "__main__":
    main()
