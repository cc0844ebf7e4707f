"""Speed and memory on one GPU, ours vs diffusers in the same process (issue 7).

Full-size Wan2.1 models with random weights (speed does not depend on their values), bf16.
Warm-up runs are excluded from every timing; torch.compile warm-up is reported on its own line.

    python bench/speed.py --out $OUT --parts dit13,compile13,step,vae,text,e2e,dit14

diffusers is measured with ../shared/tools/diffusers_anchor.py (copied to .peer/ for the device
run). Prints one JSON line per measurement, then a markdown table; writes speed.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, ".peer"))

from fastvideo_nodes.models.wan_dit import WanDiT, WanDiTConfig, keep_fp32  # noqa: E402
from fastvideo_nodes.pipeline.sampler import SamplingSettings, SamplingStats, denoise, initial_noise  # noqa: E402

SIZES = {"1.3B": WanDiTConfig(), "14B": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)}
RESULTS: list[dict] = []
T0 = time.time()


def log(**kw):
    kw["t"] = round(time.time() - T0, 1)
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


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
    x = torch.randn(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8, device="cuda")
    ctx = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    return x, torch.tensor([500.0], device="cuda"), ctx


def bench_dit(size: str, backend: str | None, compile_: bool = False):
    m = random_dit(size)
    x, t, ctx = inputs()
    if compile_:
        m.compile_blocks()
        start = time.perf_counter()
        with torch.inference_mode():
            m(x, t, ctx, attention_backend=backend)
        torch.cuda.synchronize()
        log(kind="compile_warmup", impl="ours", size=size, s=round(time.perf_counter() - start, 1))
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        s = timeit(lambda: m(x, t, ctx, attention_backend=backend))
    log(kind="dit_forward", impl="ours" + ("+compile" if compile_ else ""), size=size,
        attn=backend or "auto=" + m.attention_backend_for(None, x[0, 0].numel() // 4),
        s=round(s, 4), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    return m


def bench_steps(m: WanDiT, backend):
    """Time of one sampling step with and without CFG (forwards + scheduler), 480×832×81."""
    ctx = torch.randn(1, 512, 4096)
    for g in (5.0, 1.0):
        s = SamplingSettings(steps=3, guidance_scale=g)
        noise = initial_noise(s)
        run = lambda: denoise(m, noise, ctx, ctx, s, attention_backend=backend)  # noqa: E731
        with torch.inference_mode():
            t = timeit(run, warm=1, iters=1) / 3
        log(kind="sampling_step", impl="ours", cfg=g > 1, s=round(t, 4))


def bench_e2e(m: WanDiT, backend, vae, fast: bool):
    """50-step generation with CFG on the compiled DiT: sampling and VAE decode (text encoding is
    measured separately and added in the table)."""
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
    log(kind="e2e_sample_decode", impl="ours", fast=fast, s=round(time.perf_counter() - start, 2),
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
    from fastvideo_nodes.tiny.vae import random_vae
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
    del enc
    torch.cuda.empty_cache()


def table():
    def get(kind, **match):
        for r in RESULTS:
            if r.get("kind") == kind and all(r.get(k) == v for k, v in match.items()) and "error" not in r:
                return r
        return None

    rows = ["| measurement | ours | diffusers | ratio (diffusers / ours) |", "|---|---|---|---|"]

    def row(name, ours, ref, key_o="s", key_r="s"):
        o = ours.get(key_o) if ours else None
        r = ref.get(key_r) if ref else None
        ratio = f"{r / o:.2f}×" if o and r else "–"
        rows.append(f"| {name} | {o if o is not None else '–'} | {r if r is not None else '–'} | {ratio} |")

    eager = get("wan_dit_forward", impl="diffusers-0.42.1", size="1.3B")
    comp = get("wan_dit_forward", impl="diffusers-0.42.1+torch.compile", size="1.3B")
    for impl in ("ours", "ours+compile"):
        o = get("dit_forward", impl=impl, size="1.3B")
        row(f"1.3B DiT forward, {impl} vs diffusers eager (s)", o, eager, key_r="s_per_forward")
        row(f"1.3B DiT forward, {impl} vs diffusers compiled (s)", o, comp, key_r="s_per_forward")
    row("14B DiT forward vs diffusers eager (s)", get("dit_forward", size="14B"),
        get("wan_dit_forward", impl="diffusers-0.42.1", size="14B"), key_r="s_per_forward")
    row("VAE decode 480×832×81 (s)", get("vae_decode", impl="ours"), get("wan_vae_decode"))
    row("VAE decode peak (GiB)", get("vae_decode", impl="ours"), get("wan_vae_decode"), "peak_gib", "peak_gib")
    text = get("text_encode")
    if eager and get("wan_vae_decode"):
        # diffusers' 50-step CFG run from its measured parts: 100 forwards + decode + 2 prompt encodings.
        est = 100 * eager["s_per_forward"] + get("wan_vae_decode")["s"] + 2 * (text["s"] if text else 0)
        ref = {"s": round(est, 2)}
        for fast in (False, True):
            o = get("e2e_sample_decode", fast=fast)
            if o:
                o = dict(o, s=round(o["s"] + 2 * (text["s"] if text else 0), 2))
            row(f"50-step CFG generation end to end{' (CFG gate 0.5 + TeaCache 0.08)' if fast else ''} (s)", o, ref)
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--parts", default="anchor,dit13,step,teacache,vae,text,e2e,compile13,dit14")
    ap.add_argument("--backend", default=None, help="attention backend for our runs (default: auto)")
    args = ap.parse_args()
    parts = args.parts.split(",")
    os.makedirs(args.out, exist_ok=True)
    log(kind="env", torch=torch.__version__, gpu=torch.cuda.get_device_name(), cudnn=torch.backends.cudnn.version())

    def attempt(name, fn):
        if name in parts:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - a bench keeps going and reports
                log(kind=name, error=repr(e)[:400])
        return None

    if "anchor" in parts:
        import diffusers_anchor as anchor
        anchor.log = log
        attempt("anchor", lambda: anchor.wan_dit("1.3B", backends=("native",), compile_="no_anchor_compile" not in parts))
        attempt("anchor", lambda: anchor.wan_vae())
    m = attempt("dit13", lambda: bench_dit("1.3B", args.backend))
    if m is not None:
        attempt("step", lambda: bench_steps(m, args.backend))
        attempt("teacache", lambda: bench_teacache_step(m, args.backend))
    del m
    torch.cuda.empty_cache()
    vae = attempt("vae", our_vae)
    if vae is not None:
        attempt("vae", lambda: bench_vae(vae))
    attempt("text", bench_text)
    # End to end with our best settings: compiled blocks, auto attention.
    mc = attempt("compile13", lambda: bench_dit("1.3B", args.backend, compile_=True))
    if mc is not None and vae is not None and "e2e" in parts:
        attempt("e2e", lambda: bench_e2e(mc, args.backend, vae, fast=False))
        attempt("e2e", lambda: bench_e2e(mc, args.backend, vae, fast=True))
    del mc, vae
    torch.cuda.empty_cache()
    if "dit14" in parts:
        attempt("dit14", lambda: bench_dit("14B", args.backend))
        torch.cuda.empty_cache()
        if "anchor" in parts:
            attempt("anchor", lambda: anchor.wan_dit("14B", backends=("native",)))
    md = table()
    print(md)
    with open(os.path.join(args.out, "speed.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    with open(os.path.join(args.out, "speed.md"), "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    main()
