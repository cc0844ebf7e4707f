"""Attention backends on the GPU at Wan shapes (issue 5).

Per backend: effective TFLOP/s (4·S²·H·D per call; sparse backends counted as dense, so their
figure is the speed-up in dense terms), cosine similarity to an fp32 reference, and the whole
1.3B DiT forward at 480×832×81 with that backend. Sliding-tile windows: density vs speed.

    python bench/attention_bench.py --out $OUT [--dit]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.speed import RESULTS, log, timeit  # noqa: E402
from fastvideo_nodes.attention import (  # noqa: E402
    BACKENDS,
    attention,
    backend_module,
    sliding_tile,
)

GRID = (21, 30, 52)  # 480×832×81 → 32,760 tokens
def kernels(heads: int):
    s = math.prod(GRID)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, s, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]):
        ref = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    flops = 4 * s * s * heads * 128
    cases = [(name, {}) for name in BACKENDS if name != "SLIDING_TILE_ATTN"]
    cases += [("SLIDING_TILE_ATTN", dict(tile=(4, 8, 8), window=w)) for w in ((3, 3, 5), (5, 3, 5), (5, 5, 7))]
    for name, opts in cases:
        problem = backend_module(name).available()
        if problem:
            log(kind="attn", backend=name, heads=heads, skipped=problem)
            continue
        try:
            run = lambda: attention(q, k, v, backend=name, grid=GRID, options=opts)
            out = run()
            t = timeit(run)
            cos = F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0).item()
            row = dict(kind="attn", backend=name, heads=heads, ms=round(t * 1e3, 2),
                       tflops=round(flops / t / 1e12, 1), cos_vs_fp32=round(cos, 5))
            if opts:
                row.update(window=opts["window"], density=round(sliding_tile.density(GRID, opts["tile"], opts["window"]), 3))
            log(**row)
        except Exception as e:
            log(kind="attn", backend=name, heads=heads, error=repr(e)[:300])
    del q, k, v, ref
    torch.cuda.empty_cache()


def dit_forward():
    from bench.speed import inputs, random_dit
    m = random_dit("1.3B")
    x, t, ctx = inputs()
    for name, opts in [(n, {}) for n in BACKENDS if n != "SLIDING_TILE_ATTN"] + [
            ("SLIDING_TILE_ATTN", dict(window=(3, 3, 5))), ("SLIDING_TILE_ATTN", dict(window=(5, 5, 7)))]:
        if backend_module(name).available():
            continue
        try:
            with torch.inference_mode():
                s = timeit(lambda: m(x, t, ctx, attention_backend=name, attention_options=opts), iters=2)
            log(kind="dit_forward_by_backend", size="1.3B", backend=name, window=opts.get("window"), s=round(s, 4))
        except Exception as e:
            log(kind="dit_forward_by_backend", backend=name, error=repr(e)[:300])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--dit", action="store_true", help="also the whole 1.3B DiT forward per backend")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    for heads in (12, 40):
        kernels(heads)
    if args.dit:
        dit_forward()
    lines = ["| backend | heads | window | density | ms | TFLOP/s (dense-equivalent) | cos vs fp32 |", "|---|---|---|---|---|---|---|"]
    for r in RESULTS:
        if r.get("kind") == "attn" and "ms" in r:
            lines.append(f"| {r['backend']} | {r['heads']} | {r.get('window', '')} | {r.get('density', 1.0)} | "
                         f"{r['ms']} | {r['tflops']} | {r['cos_vs_fp32']} |")
    lines += ["", "| backend | window | 1.3B DiT forward (s) |", "|---|---|---|"]
    lines += [f"| {r['backend']} | {r.get('window') or ''} | {r['s']} |" for r in RESULTS
              if r.get("kind") == "dit_forward_by_backend" and "s" in r]
    print("\n".join(lines))
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    with open(os.path.join(args.out, "attention.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
