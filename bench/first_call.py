"""Where the first call's extra time goes (issue 14: without compile, a first call ≤ 1.5× a later one).

In a fresh process: `from_pretrained` + `load()` on bench/e2e.py's random 1.3B folder, then the same
generate_video call twice (default: the 4-step CFG-1 setting, where warm-up weighs most). Each call
reports encode / denoise / decode and each step's wall time (a synchronising callback); the first
call also runs under cProfile, and the functions with the most cumulative time are printed, so
warm-up (kernel compiles, cuDNN plans, the attention probe) shows by name.

    python3 bench/first_call.py --out $OUT [--steps 4 --cfg 1]

Run it twice on one machine to see the first call with warm disk caches (probe record, Triton).
"""
from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import e2e  # noqa: E402
from e2e import PROMPT, build_folder, log, sync  # noqa: E402


def main():
    ap = e2e.common_args()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    e2e.DEVICE = args.device
    os.makedirs(args.out, exist_ok=True)
    folder = build_folder(args.models, args.size)
    from fastvideo_nodes import VideoGenerator
    t0 = time.perf_counter()
    gen = VideoGenerator.from_pretrained(folder, attention_backend=None if args.backend == "auto" else args.backend,
                                         compile=args.compile, device=args.device,
                                         dtype="bf16" if args.device == "cuda" else "fp32")
    load = dict(height=args.height, width=args.width, num_frames=args.frames)
    gen.load(**load)
    sync()
    log(kind="load", s=round(time.perf_counter() - t0, 2))
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
        total = time.perf_counter() - t0
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
    with open(os.path.join(args.out, "first_call.json"), "w") as f:
        json.dump(e2e.RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
