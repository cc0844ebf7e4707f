"""LoRA merge time into a resident DiT on the GPU (issue 15's target: rank 64 into the 14B ≤ 5 s).

Builds our WanDiT of the chosen size straight on the GPU with random bf16 weights (no model file
is needed: merge time depends on shapes, not values), writes a random rank-`rank` LoRA in the
original Wan layout, then times `loading.lora.set_loras` as the generator calls it: the first
merge (reads the file, copies the base aside, merges), a strength change (re-merge from the kept
copy), and removal (bit-exact restore). Both homes of the base copy are timed: host memory (what
the generator does when blocks stream or inside ComfyUI) and the GPU (when the memory plan leaves
room, as on an H200 holding a resident 14B).

    python3 bench/lora_merge.py --out $OUT --size 14B --rank 64
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

from fastvideo_nodes.loading.lora import set_loras  # noqa: E402
from fastvideo_nodes.models.wan_dit import WanDiT, WanDiTConfig  # noqa: E402
from fastvideo_nodes.testing.lora import save_random_lora  # noqa: E402

CONFIGS = {"1.3B": WanDiTConfig(), "14B": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
           "tiny": WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--size", default="14B", choices=list(CONFIGS))
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cfg = CONFIGS[args.size]
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(args.device):
        dit = WanDiT(cfg).eval()
    torch.set_default_dtype(torch.float32)
    path = save_random_lora(cfg, os.path.join("/tmp", f"lora_{args.size}_r{args.rank}.safetensors"), rank=args.rank,
                            dtype=torch.bfloat16)
    rows = []

    def timed(label, loras, room):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        report = set_loras(dit, loras, backup_room=room)
        if args.device == "cuda":
            torch.cuda.synchronize()
        row = dict(step=label, copies="gpu" if room else "host", wall_s=round(time.perf_counter() - t0, 3),
                   patched=report.patched,
                   gpu_gib=round(torch.cuda.memory_allocated() / 2**30, 2) if args.device == "cuda" else 0)
        rows.append(row)
        print(json.dumps(row), flush=True)

    params = sum(p.numel() for p in dit.parameters())
    print(json.dumps(dict(size=args.size, params_b=round(params / 1e9, 2), rank=args.rank,
                          lora_mb=round(os.path.getsize(path) / 2**20, 1))), flush=True)
    for room in (0, 2**50):  # host copies, then copies on the GPU
        timed("first merge", [(path, 1.0)], room)
        timed("strength 0.5", [(path, 0.5)], room)
        timed("remove", [], room)
        timed("merge again", [(path, 1.0)], room)
        timed("remove", [], room)
    with open(os.path.join(args.out, f"lora_merge_{args.size}.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
