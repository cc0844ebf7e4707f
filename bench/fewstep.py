"""Few-step generation as users of the distill LoRAs run it: 4 steps at CFG 1 with a rank-64 LoRA.

Same process, same files (bench/e2e.py's random diffusers folder, plus a random rank-64 LoRA in the
lightx2v release layout: `diffusion_model.blocks.N.<module>.lora_down/lora_up.weight` + `.alpha`):

- ours: the LoRA merge (`set_loras`) is timed apart, once for the first merge and once for a
  change of strength (restore + merge, no reload); then the public `generate_video` whole call at
  4 steps, CFG 1, euler, spacing "simple", shift 5, first and second call.
- diffusers: `WanPipeline` with `load_lora_weights` + `fuse_lora` (timed apart), then the whole
  `__call__` at 4 steps, CFG 1, FlowMatchEulerDiscreteScheduler(shift=5). Its spacing is diffusers'
  default flow-Euler one (timesteps 1000, 909.7, 717.3, 24.4 instead of 1000, 937.5, 833.3, 625):
  the schedules differ, the work (4 DiT forwards, one prompt encoded, one decode) is the same.

    python3 bench/fewstep.py --out $OUT --size 1.3B          # 480×832×81 on the GPU
    python3 bench/fewstep.py --out $OUT --size 14B
    python3 bench/fewstep.py --device cpu --size tiny --height 64 --width 64 --frames 9   # smoke test

Random weights: speed does not depend on the values (see bench/e2e.py).
"""
from __future__ import annotations

import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import e2e  # noqa: E402  (build_folder, timing helpers; its DEVICE is set in main)
import report  # noqa: E402
from e2e import PROMPT, RESULTS, CardPeak, build_folder, cuda_gib, log, release, sync  # noqa: E402

STEPS, CFG, SHIFT = 4, 1.0, 5.0


def build_lora(models: str, folder: str, size: str, rank: int) -> str:
    """A random rank-`rank` LoRA for every block linear of this size, in the lightx2v layout."""
    from fastvideo_nodes.loading.dit import read_dit_config
    from fastvideo_nodes.testing.lora import save_random_lora
    path = os.path.join(models, f"lora_{size}_rank{rank}.safetensors")
    if not os.path.exists(path):
        t0 = time.time()
        save_random_lora(read_dit_config(folder), path, rank=rank, scale=0.02, dtype=torch.bfloat16)
        log(kind="build_lora", size=size, rank=rank, mb=round(os.path.getsize(path) / 2**20, 1),
            s=round(time.time() - t0, 1))
    return path


def run_ours(folder: str, lora: str, args) -> None:
    from fastvideo_nodes import VideoGenerator
    sync()
    t0 = time.perf_counter()
    gen = VideoGenerator.from_pretrained(folder, compile=args.compile, device=e2e.DEVICE,
                                         dtype="bf16" if e2e.DEVICE == "cuda" else "fp32")
    if hasattr(gen, "load"):
        gen.load()
    else:
        gen.dit  # noqa: B018  (load the DiT now, so that the merge below is the merge alone)
    sync()
    log(kind="load", impl="ours", size=args.size, s=round(time.perf_counter() - t0, 2))
    for what, strength in (("merge", 1.0), ("change_strength", 0.8), ("merge_back", 1.0)):
        sync()
        t0 = time.perf_counter()
        report = gen.set_loras([(lora, strength)])
        sync()
        log(kind="lora", impl="ours", size=args.size, what=what, wall_s=round(time.perf_counter() - t0, 3),
            merge_s=round(report.seconds, 3) if report is not None else None,
            patched=report.patched if report is not None else None)
    for call in ("first", "second"):
        with CardPeak() as card:
            sync()
            t0 = time.perf_counter()
            r = gen.generate_video(PROMPT, height=args.height, width=args.width, num_frames=args.frames,
                                   num_inference_steps=STEPS, guidance_scale=CFG, flow_shift=SHIFT,
                                   scheduler="euler", spacing="simple", seed=0)
            sync()
            total = time.perf_counter() - t0
        t = r.timings
        log(kind="call", impl="ours", size=args.size, call=call, total_s=round(total, 2),
            encode_s=round(t.get("encode_s", 0), 3), denoise_s=round(t.get("sample_s", 0), 2),
            decode_s=round(t.get("decode_s", 0), 2), lora_s=round(t.get("lora_s", 0), 3),
            forwards=r.stats.cond_forwards + r.stats.uncond_forwards,
            card_peak_gib=round(card.peak, 2), torch_peak_gib=cuda_gib("max_memory_allocated"))
        release()
    gen.close()
    del gen, r
    release()


def run_diffusers(folder: str, lora: str, args) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    sync()
    t0 = time.perf_counter()
    pipe = WanPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    pipe.vae.to(torch.float32)
    pipe.to(e2e.DEVICE)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    sync()
    log(kind="load", impl="diffusers", size=args.size, s=round(time.perf_counter() - t0, 2))
    try:
        sync()
        t0 = time.perf_counter()
        pipe.load_lora_weights(lora, adapter_name="distill")
        pipe.fuse_lora(lora_scale=1.0)
        sync()
        log(kind="lora", impl="diffusers", size=args.size, what="load_lora_weights+fuse_lora",
            wall_s=round(time.perf_counter() - t0, 3))
    except Exception as e:  # the timing of the call below still means something without it
        log(kind="error", part="diffusers LoRA", error=repr(e)[:400])
    for call in ("first", "second"):
        with CardPeak() as card:
            sync()
            t0 = time.perf_counter()
            pipe(prompt=PROMPT, negative_prompt=None, height=args.height, width=args.width, num_frames=args.frames,
                 num_inference_steps=STEPS, guidance_scale=CFG, generator=torch.Generator("cpu").manual_seed(0),
                 output_type="np")
            sync()
            total = time.perf_counter() - t0
        log(kind="call", impl="diffusers", size=args.size, call=call, total_s=round(total, 2),
            card_peak_gib=round(card.peak, 2), torch_peak_gib=cuda_gib("max_memory_allocated"))
        release()
    del pipe
    release()


def table() -> str:
    rows = ["| stack | call | total s | encode s | denoise s | decode s | × diffusers |",
            "|---|---|---|---|---|---|---|"]
    ref = {r["call"]: r["total_s"] for r in RESULTS if r.get("kind") == "call" and r["impl"] == "diffusers"}
    for r in RESULTS:
        if r.get("kind") == "call":
            ratio = f"{ref[r['call']] / r['total_s']:.2f}×" if r["call"] in ref and r["total_s"] else "–"
            rows.append(f"| {r['impl']} | {r['call']} | {r['total_s']} | {r.get('encode_s', '–')} | "
                        f"{r.get('denoise_s', '–')} | {r.get('decode_s', '–')} | {ratio} |")
    for r in RESULTS:
        if r.get("kind") == "lora":
            rows.append(f"\nLoRA ({r['impl']}, {r['what']}): {r['wall_s']} s"
                        + (f" (merge {r['merge_s']} s, {r['patched']} tensors)" if r.get("merge_s") is not None
                           else ""))
    return "\n".join(rows)


def main():
    ap = e2e.common_args()
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--parts", default="diffusers,ours")
    args = ap.parse_args()
    e2e.DEVICE = args.device
    os.makedirs(args.out, exist_ok=True)
    log(kind="env", torch=torch.__version__, gpu=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        steps=STEPS, cfg=CFG, shift=SHIFT, size=f"{args.height}x{args.width}x{args.frames}")
    folder = build_folder(args.models, args.size)
    lora = build_lora(args.models, folder, args.size, args.rank)
    for part, fn in (("diffusers", run_diffusers), ("ours", run_ours)):
        if part in args.parts.split(","):
            try:
                fn(folder, lora, args)
            except Exception as e:  # one failing part must not hide the other's figures
                log(kind="error", part=part, error=repr(e)[:400])
    report.save(args.out, f"fewstep_{args.size}", RESULTS, table())


if __name__ == "__main__":
    main()
