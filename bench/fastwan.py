"""FastWan on one GPU (issue 16): the VSA kernel against dense cuDNN attention at 480p, then FastWan2.1-1.3B's
3-step generation end to end through the public API.

- kernel: q, k, v and the gate [1, 32,760, 12, 128] bf16 on the 480×832×81 token grid (21, 30, 52),
  VIDEO_SPARSE_ATTN at FastWan's sparsity 0.8 (and 0.9) against torch SDPA pinned to cuDNN: warm ms
  (CUDA events), the first call's seconds, and the speed-up.
- e2e: a random full-size FastWan folder (bench/e2e.py's 1.3B folder plus the per-block
  `attn1.to_gate_compress` weights FastWan adds), `VideoGenerator.from_pretrained(folder)`, `load()`,
  then `generate_video(prompt)` with the defaults the loader picks for FastWan (VSA 0.8, dmd
  1000/757/522, CFG 1): first call and second call, encode / denoise / decode.

    python3 bench/fastwan.py --out $OUT [--compile] [--parts kernel,e2e]
    python3 bench/fastwan.py --device cpu --size tiny --height 64 --width 64 --frames 9 --parts e2e   # smoke test

Random weights: speed does not depend on the values (see bench/e2e.py).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import e2e  # noqa: E402  (build_folder, timing helpers; its DEVICE is set in main)
from e2e import PROMPT, RESULTS, CardPeak, build_folder, cuda_gib, log, release, sync  # noqa: E402


def cuda_ms(fn, n: int = 10) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def kernel() -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastvideo_nodes.attention import video_sparse
    grid, heads, dim = (21, 30, 52), 12, 128
    tokens = grid[0] * grid[1] * grid[2]
    q, k, v, gate = (torch.randn(1, tokens, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        F.scaled_dot_product_attention(qt, kt, vt)
        dense = cuda_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt))
    log(kind="kernel", backend="TORCH_SDPA (cuDNN)", tokens=tokens, heads=heads, ms=round(dense, 3))
    for sparsity in (0.8, 0.9):
        opts = video_sparse.VideoSparseOptions(sparsity=sparsity)
        run = lambda: video_sparse.attend(q, k, v, grid=grid, gate=gate, options=opts)
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        first = time.perf_counter() - t0
        ms = cuda_ms(run)
        log(kind="kernel", backend="VIDEO_SPARSE_ATTN", sparsity=sparsity, tokens=tokens, heads=heads,
            ms=round(ms, 3), first_s=round(first, 2), speedup_vs_dense=round(dense / ms, 2))


def fastwan_folder(root: str, size: str) -> str:
    """bench/e2e.py's random folder of this size, plus random gate projections in every block."""
    from safetensors.torch import load_file, save_file
    base = build_folder(root, size)
    folder = os.path.join(root, f"FastWan2.1-T2V-{size}-random")
    if os.path.exists(os.path.join(folder, "model_index.json")):
        return folder
    os.makedirs(os.path.join(folder, "transformer"), exist_ok=True)
    for part in ("text_encoder", "tokenizer", "vae", "scheduler", "model_index.json"):
        os.symlink(os.path.realpath(os.path.join(base, part)), os.path.join(folder, part))
    src = os.path.join(base, "transformer")
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            os.symlink(os.path.join(src, name), os.path.join(folder, "transformer", name))
    shards = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    config = json.load(open(os.path.join(src, "config.json")))
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    g = torch.Generator().manual_seed(3)
    for i, name in enumerate(shards):
        sd = load_file(os.path.join(src, name))
        if i == len(shards) - 1:  # the gates go in the last shard, so an index file must name them
            for n in range(config["num_layers"]):
                sd[f"blocks.{n}.attn1.to_gate_compress.weight"] = (torch.randn(dim, dim, generator=g) * 0.02).bfloat16()
                sd[f"blocks.{n}.attn1.to_gate_compress.bias"] = torch.zeros(dim, dtype=torch.bfloat16)
        save_file(sd, os.path.join(folder, "transformer", name))
    index = os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors.index.json")
    if os.path.islink(index):
        data = json.load(open(index))
        os.remove(index)
        for n in range(config["num_layers"]):
            for p in ("weight", "bias"):
                data["weight_map"][f"blocks.{n}.attn1.to_gate_compress.{p}"] = shards[-1]
        json.dump(data, open(index, "w"))
    return folder


def run(folder: str, args) -> None:
    from fastvideo_nodes import VideoGenerator
    sync()
    t0 = time.perf_counter()
    gen = VideoGenerator.from_pretrained(folder, compile=args.compile, device=e2e.DEVICE,
                                         dtype="bf16" if e2e.DEVICE == "cuda" else "fp32")
    gen.load()
    sync()
    log(kind="load", impl="ours", size=args.size, s=round(time.perf_counter() - t0, 2))
    for call in ("first", "second"):
        with CardPeak() as card:
            sync()
            t0 = time.perf_counter()
            r = gen.generate_video(PROMPT, height=args.height, width=args.width, num_frames=args.frames, seed=0)
            sync()
            total = time.perf_counter() - t0
        t = r.timings
        log(kind="call", impl="ours (FastWan defaults)", size=args.size, call=call, total_s=round(total, 2),
            encode_s=round(t.get("encode_s", 0), 3), denoise_s=round(t.get("sample_s", 0), 2),
            decode_s=round(t.get("decode_s", 0), 2),
            forwards=r.stats.cond_forwards + r.stats.uncond_forwards if r.stats else None,
            card_peak_gib=round(card.peak, 2), attention=r.attention, compile=args.compile)
        release()
    gen.close()
    del gen, r
    release()
    log(kind="after_drop", allocated_gib=cuda_gib("memory_allocated"))


def main():
    ap = e2e.common_args()
    ap.add_argument("--parts", default="kernel,e2e")
    args = ap.parse_args()
    e2e.DEVICE = args.device
    os.makedirs(args.out, exist_ok=True)
    parts = args.parts.split(",")
    if "kernel" in parts:
        kernel()
    if "e2e" in parts:
        run(fastwan_folder(args.models, args.size), args)
    with open(os.path.join(args.out, f"fastwan_{args.size}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
