"""Where the first call's extra time goes (issue 14: without compile, a first call ≤ 1.5× a later one).

In a fresh process: `from_pretrained` + `load()` on bench/e2e.py's random 1.3B folder (load() warms
up for the shape: pipeline/warmup.py), then the same generate_video call twice (default: the
4-step CFG-1 setting, where warm-up weighs most). Each call reports encode / denoise / decode and
each step's wall time (a synchronising callback); the first call also runs under cProfile, and the
functions with the most cumulative time are printed, so what is left of warm-up (kernel builds,
cuDNN plans, the attention probe) shows by name. The last line is the summary: load_s, warmup_s,
first and second call totals and first ÷ second.

    python3 bench/first_call.py --out $OUT [--steps 4 --cfg 1] [--fresh] [--no-warmup]

--fresh: a fresh machine: Triton's, Inductor's and CUDA's kernel caches and our cache folder (the
attention probe's records) point at new empty folders, set before anything reads them. Without it,
run it twice on one machine to see the first call with warm disk caches.
--no-warmup: load() without the warm-up (the behaviour before it), for comparison.
"""
from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

CACHES = {"TRITON_CACHE_DIR": "triton", "TORCHINDUCTOR_CACHE_DIR": "inductor", "CUDA_CACHE_PATH": "cuda",
          "FASTVIDEO_CACHE": "fastvideo"}  # FASTVIDEO_CACHE: attention_auto.json, the probe's records


def fresh_caches() -> dict[str, str]:
    """Every on-disk cache the first call reads → a new empty folder (the environment variables)."""
    root = tempfile.mkdtemp(prefix="first_call_fresh_")
    for var, name in CACHES.items():
        os.environ[var] = os.path.join(root, name)
        os.makedirs(os.environ[var])
    return {var: os.environ[var] for var in CACHES}


# Before the imports below: torch, diffusers or Triton may read these when they load.
FRESH = fresh_caches() if "--fresh" in sys.argv[1:] else None

import e2e  # noqa: E402
from e2e import PROMPT, build_folder, log, sync  # noqa: E402


def main():
    ap = e2e.common_args()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--fresh", action="store_true", help="empty kernel and probe caches (a fresh machine)")
    ap.add_argument("--no-warmup", action="store_true", help="load() without its warm-up, for comparison")
    args = ap.parse_args()
    e2e.DEVICE = args.device
    os.makedirs(args.out, exist_ok=True)
    if FRESH:
        log(kind="fresh_caches", **FRESH)
    folder = build_folder(args.models, args.size)
    from fastvideo_nodes import VideoGenerator
    if args.no_warmup:
        from fastvideo_nodes.pipeline import warmup
        warmup.wanted = lambda device: False  # the seam the CPU tests switch; the library never changes it
    t0 = time.perf_counter()
    gen = VideoGenerator.from_pretrained(folder, attention_backend=None if args.backend == "auto" else args.backend,
                                         compile=args.compile, device=args.device,
                                         dtype="bf16" if args.device == "cuda" else "fp32")
    load = dict(height=args.height, width=args.width, num_frames=args.frames)
    gen.load(**load)
    sync()
    load_wall = time.perf_counter() - t0
    load_s, warmup_s = gen.load_s, gen.warmup_s  # warmup_s is inside load_s
    log(kind="load", s=round(load_wall, 2), load_s=round(load_s, 2), warmup_s=round(warmup_s, 2),
        attention=gen.attention_used().get("choice"))
    totals = {}
    for call in ("first", "second"):
        marks: list[float] = []

        def step(i, n, x0, marks=marks):
            sync()
            marks.append(time.perf_counter())
        prof = cProfile.Profile() if call == "first" else None
        sync()
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        r = gen.generate_video(PROMPT, height=args.height, width=args.width, num_frames=args.frames,
                               num_inference_steps=args.steps, guidance_scale=args.cfg, seed=0, callback=step)
        sync()
        total = totals[call] = time.perf_counter() - t0
        if prof is not None:
            prof.disable()
        t = r.timings
        steps = [round(b - a, 3) for a, b in zip([t0 + t.get("encode_s", 0)] + marks[:-1], marks)]
        log(kind="call", call=call, total_s=round(total, 2), encode_s=round(t.get("encode_s", 0), 3),
            denoise_s=round(t.get("sample_s", 0), 2), decode_s=round(t.get("decode_s", 0), 2), step_s=steps,
            attention=(r.attention or {}).get("choice", (r.attention or {}).get("requested")))
        if prof is not None:
            buf = io.StringIO()
            stats = pstats.Stats(prof, stream=buf)
            stats.sort_stats("cumulative").print_stats(args.top)
            stats.sort_stats("tottime").print_stats(args.top)
            text = buf.getvalue()
            print(text)
            with open(os.path.join(args.out, "first_call_profile.txt"), "w") as f:
                f.write(text)
    gen.close()
    log(kind="summary", fresh=FRESH is not None, warmup=not args.no_warmup, load_wall_s=round(load_wall, 2),
        load_s=round(load_s, 2), warmup_s=round(warmup_s, 2),
        first_s=round(totals["first"], 2), second_s=round(totals["second"], 2),
        first_over_second=round(totals["first"] / totals["second"], 2))
    with open(os.path.join(args.out, "first_call.json"), "w") as f:
        json.dump(e2e.RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
