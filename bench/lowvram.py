"""Low VRAM (issue 8): the 14B DiT under a 24 GiB cap and the 1.3B under 8 GiB, against resident runs.

The cap emulates a smaller card with torch.cuda.set_per_process_memory_fraction. Random full-size
weights; 480×832×81, bf16 compute. For each setting: time per sampling step (no CFG), peak memory,
and the latents after 2 steps against the resident bf16 run.

    python bench/lowvram.py --out $OUT
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.speed import RESULTS, log, random_dit  # noqa: E402
from fastvideo_nodes.memory.offload import enable_block_offload  # noqa: E402
from fastvideo_nodes.ops.linear import Linear  # noqa: E402
from fastvideo_nodes.pipeline.sampler import SamplingSettings, denoise, initial_noise  # noqa: E402


def measure(name, dit, ref=None):
    ctx = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(0))
    s1, s2 = SamplingSettings(steps=1, guidance_scale=1.0), SamplingSettings(steps=2, guidance_scale=1.0)
    with torch.inference_mode():
        denoise(dit, initial_noise(s1), ctx, None, s1)  # warm-up (kernel choice, first transfers)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        z = denoise(dit, initial_noise(s2), ctx, None, s2).cpu()
        torch.cuda.synchronize()
        per_step = (time.perf_counter() - start) / 2
    row = dict(kind="lowvram", setting=name, s_per_step=round(per_step, 3),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    if ref is not None:
        row["max_abs_err_vs_resident"] = round((z - ref).abs().max().item(), 4)
        row["rel_err_vs_resident"] = round(((z - ref).norm() / ref.norm()).item(), 5)
    log(**row)
    return z, per_step


def to_fp8(dit):
    for m in dit.modules():
        if isinstance(m, Linear) and m.weight.dim() == 2 and m.weight.shape[0] >= 1024:
            m.weight.data = m.weight.data.to(torch.float8_e4m3fn)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    # (size, cap GiB, fp8 storage); every model is rebuilt with the same seed, so weights are identical.
    ref = t_res = None  # the fp8 case compares with the bf16 run just before it
    for size, cap, fp8 in (("1.3B", 8.0, False), ("14B", 24.0, False), ("14B", 24.0, True)):
        dit = random_dit(size)
        ref, t_res = measure(f"{size} resident bf16", dit) if not fp8 else (ref, t_res)
        dit.to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap / total)
        if fp8:
            to_fp8(dit)  # fp8 storage, dequantised at use
        off = enable_block_offload(dit, device="cuda", budget_gb=cap - 1.0)
        log(kind="offload_plan", size=size, cap_gib=cap, fp8=fp8, plan=off.describe())
        try:
            _, t = measure(f"{size} {'fp8' if fp8 else 'bf16'} under {cap:.0f} GiB", dit, ref)
            log(kind="lowvram_ratio", size=size, fp8=fp8, step_time_vs_resident=round(t / t_res, 3))
        except torch.cuda.OutOfMemoryError as e:
            log(kind="lowvram", setting=f"{size} cap {cap}", error=str(e)[:200])
        torch.cuda.set_per_process_memory_fraction(1.0)
        del dit, off
        gc.collect()  # the offload hooks and the blocks reference each other
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "lowvram.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
