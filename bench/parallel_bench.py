"""The worker path (degree 1 or more GPUs) against the in-process path on one GPU, 1.3B at 480×832×81, bf16.

Writes a random full-size DiT file (the workers load weights themselves, never by pickling), then
measures: pool start-up, first-run load, time per sampling step in-process and through the pool,
and the per-run overhead of the exchange (run time − steps × step time).

    python bench/parallel_bench.py --out $OUT [--steps 4] [--num-gpus 1]
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

from bench.speed import RESULTS, log  # noqa: E402
from fastvideo_nodes.loading.dit import load_dit  # noqa: E402
from fastvideo_nodes.parallel import WorkerPool  # noqa: E402
from fastvideo_nodes.pipeline.sampler import SamplingSettings, denoise, initial_noise  # noqa: E402
from fastvideo_nodes.testing.dit import save_original  # noqa: E402


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--num-gpus", type=int, default=1)
    ap.add_argument("--file", default="/tmp/wan_1.3B_random_bf16.safetensors")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not os.path.exists(args.file):
        from bench.speed import random_dit
        save_original({k: v.cpu() for k, v in random_dit("1.3B").state_dict().items()}, args.file, dtype=None)
        torch.cuda.empty_cache()
    ctx = torch.randn(1, 512, 4096)
    s1 = SamplingSettings(steps=1, guidance_scale=1.0)
    sn = SamplingSettings(steps=args.steps, guidance_scale=1.0)

    t_load, dit = timed(lambda: load_dit(args.file, device="cuda", dtype=torch.bfloat16))
    with torch.inference_mode():
        denoise(dit, initial_noise(s1), ctx, None, s1)  # warm-up
        t_in, z_in = timed(lambda: denoise(dit, initial_noise(sn), ctx, None, sn))
    log(kind="in_process", load_s=round(t_load, 2), s_per_step=round(t_in / args.steps, 4))
    dit = None
    torch.cuda.empty_cache()

    t_start, pool = timed(lambda: WorkerPool(args.file, num_gpus=args.num_gpus, device="cuda", dtype=torch.bfloat16))
    log(kind="pool_start", num_gpus=args.num_gpus, start_and_load_s=round(t_start, 2))
    try:
        t_first, _ = timed(lambda: pool.sample(initial_noise(s1), ctx, None, s1))
        t1, _ = timed(lambda: pool.sample(initial_noise(s1), ctx, None, s1))
        tn, z_pool = timed(lambda: pool.sample(initial_noise(sn), ctx, None, sn))
    finally:
        pool.close()
    per_step = (tn - t1) / (args.steps - 1)
    log(kind="worker_path", num_gpus=args.num_gpus, first_run_s=round(t_first, 2), s_per_step=round(per_step, 4),
        run_overhead_s=round(tn - args.steps * per_step, 4),
        step_cost_vs_in_process=round(per_step / (t_in / args.steps), 4),
        latents_rel_err_vs_in_process=round(((z_pool.float().cpu() - z_in.float().cpu()).norm()
                                             / z_in.float().cpu().norm()).item(), 6))
    with open(os.path.join(args.out, "parallel.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
