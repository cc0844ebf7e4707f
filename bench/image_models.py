"""Issue 18's bench: Wan2.1 I2V-14B and Wan2.2 T2V-A14B at 480p, ours against diffusers, one run.

Both stacks load the same diffusers folder (full-size random weights, written here) and are called
as users call them: our `generate_video(prompt, image=...)` and diffusers' `WanImageToVideoPipeline`
/ `WanPipeline` (with `transformer_2` and `boundary_ratio`) `__call__`. Each stack makes a short
warm-up call, then the measured whole call; per step = denoise / steps. Then the A14B under a
24 GiB budget (`gpu_memory_gb=24`: the planner places the experts, blocks stream) with the whole-card
peak (NVML).

- i2v: Wan2.1-I2V-14B-480P layout: 36-channel DiT with the image branch (image_dim 1280), a ViT-H/14
  CLIPVisionModel (32 layers, 1280 wide), UMT5-XXL, the Wan 2.1 VAE; 832×480 start image.
- a14b: Wan2.2-T2V-A14B layout: two 14B experts (transformer/ and transformer_2/ hold the same
  random tensors through hard links: speed does not depend on values, and disk is 64 GiB), boundary
  0.875, guidance 4 / 3 (the published defaults).

    python3 bench/image_models.py --out $OUT --todo a14b,a14b_24,i2v --steps 10 --drop

GPU only (the CPU tests hold both models to diffusers on tiny weights).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import e2e  # noqa: E402
import report  # noqa: E402
from diffusers_baseline import SHARED, WAN  # noqa: E402
from e2e import NEGATIVE, PROMPT, RESULTS, CardPeak, build_folder, cuda_gib, log, release, sync, timed_part  # noqa: E402

CLIP_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
              patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024)
PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 224},
             "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
             "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
INDEX = {"scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
         "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "WanTransformer3DModel"],
         "vae": ["diffusers", "AutoencoderKLWan"]}


def _share_parts(base: str, folder: str) -> None:
    """text encoder, tokenizer, VAE and scheduler from the 1.3B folder (symlinks)."""
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        os.symlink(os.path.realpath(os.path.join(base, part)), os.path.join(folder, part))


def build_i2v(root: str) -> str:
    from diffusers import WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel
    folder = os.path.join(root, "Wan2.1-I2V-14B-480P-random")
    if os.path.exists(os.path.join(folder, "model_index.json")):
        return folder
    base = build_folder(root, "1.3B")
    t0 = time.time()
    os.makedirs(folder, exist_ok=True)
    with torch.device("cuda"):
        dit = WanTransformer3DModel(**{**SHARED, "in_channels": 36}, **WAN["14B"], image_dim=1280,
                                    added_kv_proj_dim=5120).to(torch.bfloat16)
    e2e._randomize(dit, 3)
    dit.save_pretrained(os.path.join(folder, "transformer"), max_shard_size="10GB")
    del dit
    with torch.device("cuda"):
        clip = CLIPVisionModel(CLIPVisionConfig(**CLIP_H)).to(torch.bfloat16)
    e2e._randomize(clip, 4)
    clip.save_pretrained(os.path.join(folder, "image_encoder"))
    del clip
    os.makedirs(os.path.join(folder, "image_processor"))
    with open(os.path.join(folder, "image_processor", "preprocessor_config.json"), "w") as f:
        json.dump(PROCESSOR, f)
    _share_parts(base, folder)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "WanImageToVideoPipeline", **INDEX,
                   "image_encoder": ["transformers", "CLIPVisionModel"],
                   "image_processor": ["transformers", "CLIPImageProcessor"]}, f)
    release()
    log(kind="build", model="i2v", s=round(time.time() - t0, 1))
    return folder


def build_a14b(root: str) -> str:
    folder = os.path.join(root, "Wan2.2-T2V-A14B-random")
    if os.path.exists(os.path.join(folder, "model_index.json")):
        return folder
    base, t2v = build_folder(root, "1.3B"), build_folder(root, "14B")
    os.makedirs(folder, exist_ok=True)
    for part in ("transformer", "transformer_2"):  # hard links: two paths, one copy on disk
        os.makedirs(os.path.join(folder, part))
        for name in os.listdir(os.path.join(t2v, "transformer")):
            os.link(os.path.join(t2v, "transformer", name), os.path.join(folder, part, name))
    _share_parts(base, folder)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "WanPipeline", **INDEX, "transformer_2": ["diffusers", "WanTransformer3DModel"],
                   "boundary_ratio": 0.875, "expand_timesteps": False}, f)
    return folder


def start_image(args):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(args.height // 8, args.width // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels).resize((args.width, args.height))


def call_kwargs(model: str, args, steps: int) -> dict:
    kw = dict(height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=steps)
    return {**kw, "guidance_scale": 4.0, "guidance_scale_2": 3.0} if model == "a14b" else \
        {**kw, "guidance_scale": 5.0}


def run_diffusers(model: str, folder: str, args) -> None:
    from diffusers import WanImageToVideoPipeline, WanPipeline
    sync()
    t0 = time.perf_counter()
    cls = WanImageToVideoPipeline if model == "i2v" else WanPipeline
    pipe = cls.from_pretrained(folder, torch_dtype=torch.bfloat16)
    pipe.vae.to(torch.float32)
    pipe.to("cuda")
    sync()
    log(kind="load", impl="diffusers", model=model, s=round(time.perf_counter() - t0, 2))
    parts: dict = {}
    wrapped = {"encode_prompt": "encode_s"}
    if model == "i2v":
        wrapped.update(encode_image="image_s", prepare_latents="image_s")
    originals = {name: getattr(pipe, name) for name in wrapped}
    decode = pipe.vae.decode

    def timed(fn, label):
        def run(*a, **k):
            with timed_part(parts, label):
                return fn(*a, **k)
        return run
    for name, label in wrapped.items():
        setattr(pipe, name, timed(originals[name], label))
    pipe.vae.decode = timed(decode, "decode_s")
    extra = {"image": start_image(args)} if model == "i2v" else {}
    for call, steps in (("warm-up", args.warmup_steps), ("measured", args.steps)):
        parts.clear()
        with CardPeak() as card:
            sync()
            t0 = time.perf_counter()
            pipe(prompt=PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(0),
                 output_type="np", **extra, **call_kwargs(model, args, steps))
            sync()
            total = time.perf_counter() - t0
        denoise = total - sum(parts.values())
        log(kind="call", impl="diffusers", model=model, call=call, steps=steps, total_s=round(total, 2),
            **{k: round(v, 3) for k, v in parts.items()}, denoise_s=round(denoise, 2),
            step_s=round(denoise / steps, 3), card_peak_gib=round(card.peak, 2),
            torch_peak_gib=cuda_gib("max_memory_allocated"))
        release()
    originals = decode = None
    del pipe
    release()


def run_ours(model: str, folder: str, args, budget: float | None = None) -> None:
    from fastvideo_nodes import VideoGenerator
    label = model if budget is None else f"{model} @{budget:g} GiB"
    sync()
    t0 = time.perf_counter()
    gen = VideoGenerator.from_pretrained(folder, compile=args.compile, device="cuda", dtype="bf16",
                                         gpu_memory_gb=budget)
    gen.load(height=args.height, width=args.width, num_frames=args.frames)
    sync()
    log(kind="load", impl="ours", model=label, s=round(time.perf_counter() - t0, 2),
        plan=gen.memory_plan.describe() if gen.memory_plan is not None else None)
    extra = {"image": start_image(args)} if model == "i2v" else {}
    calls = (("warm-up", args.warmup_steps), ("measured", args.steps))
    for call, steps in calls[1:] if budget is not None and args.skip_budget_warmup else calls:
        with CardPeak() as card:
            sync()
            t0 = time.perf_counter()
            kw = call_kwargs(model, args, steps)
            if "guidance_scale_2" in kw:  # our name for the low-noise expert's guidance
                kw["guidance_scale_low"] = kw.pop("guidance_scale_2")
            r = gen.generate_video(PROMPT, negative_prompt=NEGATIVE, seed=0, **extra, **kw)
            sync()
            total = time.perf_counter() - t0
        t = r.timings
        log(kind="call", impl="ours", model=label, call=call, steps=steps, total_s=round(total, 2),
            encode_s=round(t.get("encode_s", 0), 3), image_s=round(t.get("image_s", 0), 3),
            decode_s=round(t.get("decode_s", 0), 2), denoise_s=round(t.get("sample_s", 0), 2),
            step_s=round(t.get("sample_s", 0) / steps, 3), card_peak_gib=round(card.peak, 2),
            torch_peak_gib=cuda_gib("max_memory_allocated"),
            attention=(r.attention or {}).get("choice", (r.attention or {}).get("requested")),
            switch_s=[round(s, 2) for s in r.stats.extra.get("switch_s", [])])
        release()
    gen.close()
    del gen, r
    release()
    log(kind="after_drop", impl="ours", model=label, allocated_gib=cuda_gib("memory_allocated"))


def table() -> str:
    rows = ["| model | stack | call | steps | total s | per step s | card peak GiB | × diffusers (total / step) |",
            "|---|---|---|---|---|---|---|---|"]
    ref = {(r["model"], r["call"]): r for r in RESULTS if r.get("kind") == "call" and r["impl"] == "diffusers"}
    for r in RESULTS:
        if r.get("kind") == "call":
            d = ref.get((r["model"], r["call"]))
            ratio = f"{d['total_s'] / r['total_s']:.2f}× / {d['step_s'] / r['step_s']:.2f}×" \
                if d and r["impl"] == "ours" else "–"
            rows.append(f"| {r['model']} | {r['impl']} | {r['call']} | {r['steps']} | {r['total_s']} | {r['step_s']} "
                        f"| {r['card_peak_gib']} | {ratio} |")
    return "\n".join(rows)


def main():
    ap = e2e.common_args()
    ap.add_argument("--todo", default="a14b,a14b_24,i2v", help="i2v, a14b (ours and diffusers), a14b_24 (ours, 24 GiB)")
    ap.add_argument("--stacks", default="diffusers,ours")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--skip-budget-warmup", action="store_true")
    ap.add_argument("--drop", action="store_true",
                    help="delete a model's folder after its last run (the disk holds one 14B pair at a time)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log(kind="env", torch=torch.__version__, gpu=torch.cuda.get_device_name(), steps=args.steps)
    todo = args.todo.split(",")

    def attempt(fn, *a):
        try:
            fn(*a)
        except Exception as e:  # one failing part must not hide the others' figures
            log(kind="error", part=f"{fn.__name__}{a[:1]}", error=repr(e)[:600])
            release()
    for item in todo:  # in the order given
        if item == "i2v":
            folder = build_i2v(args.models)
            for stack in args.stacks.split(","):
                attempt(run_diffusers if stack == "diffusers" else run_ours, "i2v", folder, args)
        elif item in ("a14b", "a14b_24"):
            folder = build_a14b(args.models)
            if item == "a14b":
                for stack in args.stacks.split(","):
                    attempt(run_diffusers if stack == "diffusers" else run_ours, "a14b", folder, args)
            else:
                attempt(run_ours, "a14b", folder, args, 24.0)
        else:
            raise SystemExit(f"--todo: unknown {item!r}")
        if args.drop and item in ("i2v", "a14b_24"):  # the 14B folders do not fit the disk together
            shutil.rmtree(folder)
            if item == "a14b_24":
                shutil.rmtree(os.path.join(args.models, "Wan2.1-T2V-14B-random"), ignore_errors=True)
    report.save(args.out, "image_models", RESULTS, table())


if __name__ == "__main__":
    main()
