"""End to end as users run it: our public `generate_video` against diffusers' `WanPipeline.__call__`.

Both load the same files (a diffusers folder with full-size random weights, written here on first
use) with the same settings, in one process, and each whole call is timed as one call: never a
total composed from parts. Per call it reports encode / denoise / decode (read inside the call),
the total, the first call apart from the steady state, the whole-card peak (NVML, CUDA context
included) and what is still allocated after the pipeline is dropped.

    python3 bench/e2e.py --out $OUT --size 1.3B --steps 50          # 480×832×81, CFG 5
    python3 bench/e2e.py --out $OUT --size 1.3B --steps 4 --cfg 1   # the few-step setting
    python3 bench/e2e.py --out $OUT --size 14B --steps 50 --first-steps 1 --parts build,diffusers
                                                    # a first call of 1 step: one 14B stack fits a 600 s call

Random weights use std 0.02 (trained Wan weights are of that size), so activations stay finite
through every layer. Speed does not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from diffusers_baseline import SHARED, WAN  # noqa: E402

# "tiny" exists to smoke-test this script on a CPU (--device cpu) before spending GPU time.
SIZES = {**WAN, "tiny": dict(num_attention_heads=2, attention_head_dim=128, ffn_dim=512, num_layers=2)}
DEVICE = "cuda"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cuda_gib(what: str) -> float:
    """torch's allocator figures ("max_memory_allocated", "memory_allocated") in GiB; 0 on CPU."""
    return round(getattr(torch.cuda, what)() / 2**30, 3) if DEVICE == "cuda" else 0.0


def release():
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

def still_held(top: int = 6) -> list[dict]:
    """When memory stays allocated after a drop: what gc still reaches on the card, for the next
    run to name the holder (see `held_report`)."""
    if DEVICE != "cuda" or torch.cuda.memory_allocated() < 2**27:
        return []
    return held_report("cuda", top)


def held_report(device: str, top: int = 6) -> list[dict]:
    """The largest real tensors on `device` gc still reaches (one per storage), each with its
    referrer chain (`holders`); then the gc-visible total against torch's allocated figure (much
    less: the rest is held outside Python objects), and with --alloc-stacks the allocation sites
    of the largest live blocks. FakeTensors (torch.compile's graph metadata: shapes, no memory)
    are counted apart: the old report listed them as if they held the card."""
    from torch._subclasses.fake_tensor import FakeTensor
    gc.collect()
    storages: dict[int, torch.Tensor] = {}
    fakes = 0
    for o in gc.get_objects():
        if not issubclass(type(o), torch.Tensor) or o.device.type != device:  # type(): no lazy __class__
            continue
        if isinstance(o, FakeTensor):
            fakes += 1
            continue
        with contextlib.suppress(Exception):  # tensors without a storage (other subclasses)
            key = o.untyped_storage().data_ptr()
            if key not in storages or o.numel() > storages[key].numel():
                storages[key] = o
    found = sorted(storages.values(), key=lambda t: -t.untyped_storage().nbytes())
    out: list[dict] = [dict(shape=list(t.shape), dtype=str(t.dtype),
                            mib=round(t.untyped_storage().nbytes() / 2**20, 1),
                            held_by=holders(t, skip=(found, storages))) for t in itertools.islice(found, top)]
    out.append(dict(real_tensors=len(found), fake_tensors=fakes,
                    gc_visible_gib=round(sum(t.untyped_storage().nbytes() for t in found) / 2**30, 3),
                    allocated_gib=cuda_gib("memory_allocated") if device == "cuda" else None))
    if device == "cuda" and RECORDING:
        out.append(dict(allocated_at=allocation_sites(top)))
    return out


def _describe(o) -> str:
    """One referrer in a few words: dicts by their first keys, frames and generators by function and
    file:line, containers by length, anything else by its class."""
    import types
    if isinstance(o, dict):
        return "dict{" + ", ".join(f"{k!r:.40}" for k in list(o)[:4]) + (", …}" if len(o) > 4 else "}")
    if isinstance(o, types.FrameType):
        return f"frame {o.f_code.co_qualname} {os.path.basename(o.f_code.co_filename)}:{o.f_lineno}"
    if isinstance(o, (types.GeneratorType, types.CoroutineType)):
        frame = o.gi_frame if isinstance(o, types.GeneratorType) else o.cr_frame
        where = f" {os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}" if frame else " (done)"
        return f"{type(o).__name__} {o.__qualname__}{where}"
    if isinstance(o, (types.FunctionType, types.MethodType)):
        return f"{type(o).__name__} {o.__qualname__}"
    if isinstance(o, (list, tuple, set)):
        return f"{type(o).__name__}[{len(o)}]"
    return f"{type(o).__module__}.{type(o).__qualname__}"


def holders(obj, skip=(), depth: int = 5, width: int = 3) -> list[str]:
    """What refers to obj, up to `depth` levels up: the first `width` referrers of obj, then the first
    of each of those's referrers, and so on ("<" per level). `skip`: the caller's own containers."""
    ignore = {id(s) for s in skip}
    frame = sys._getframe()
    for _ in range(3):  # this report's own frames (held_report's locals, its list comprehension)
        if frame is not None:
            ignore.add(id(frame))
            frame = frame.f_back
    lines: list[str] = []
    seen: set[int] = set()

    def up(o, level: int, n: int) -> None:
        refs = [r for r in gc.get_referrers(o) if id(r) not in ignore and id(r) not in seen]
        ignore.add(id(refs))
        for r in itertools.islice(refs, n):  # a slice would be one more list holding r
            seen.add(id(r))
            lines.append("<" * level + " " + _describe(r))
            if level < depth:
                up(r, level + 1, 1)

    ignore.add(id(lines))
    up(obj, 1, width)
    return lines


RECORDING = False


def record_allocations() -> None:
    """Keep the Python stack of every live CUDA allocation (the current ones only, no history), for
    `allocation_sites`. Slows each allocation a little: only with --alloc-stacks."""
    global RECORDING
    torch.cuda.memory._record_memory_history("state", context="alloc", stacks="python")
    RECORDING = True


def allocation_sites(top: int) -> list[dict]:
    """The `top` largest live blocks with the innermost frames of where each was allocated (torch's
    own frames left out, the first three of ours and the libraries')."""
    blocks = [b for s in torch.cuda.memory._snapshot()["segments"] for b in s["blocks"]
              if b["state"] == "active_allocated"]
    blocks.sort(key=lambda b: -b["size"])
    sites = []
    for b in blocks[:top]:
        frames = [f for f in b.get("frames", []) if "/torch/" not in f["filename"]] or b.get("frames", [])
        sites.append(dict(mib=round(b["size"] / 2**20, 1),
                          at=[f"{f['name']} {os.path.basename(f['filename'])}:{f['line']}" for f in frames[:3]]))
    return sites


RESULTS: list[dict] = []
T0 = time.time()
PROMPT = "A red fox trotting through fresh snow at dawn, cinematic, golden light"
NEGATIVE = "Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality"


def log(**kw):
    kw["t"] = round(time.time() - T0, 1)
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


class CardPeak:
    """Whole-card memory in use (NVML: every process and the CUDA context), sampled every 5 ms."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()
        self._handle = None
        if DEVICE == "cuda":
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())

    def used_gib(self) -> float:
        if self._handle is None:
            return 0.0
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**30

    def __enter__(self):
        self.peak = self.used_gib()
        self._stop.clear()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, self.used_gib())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used_gib())


class PhasePeaks:
    """Per-phase memory of our generator's calls: wraps this instance's encode_prompt / sample /
    decode (generate_video calls them through self) and records, for each phase, torch's allocated
    and reserved peaks and the NVML card peak while it ran, in GiB."""

    def __init__(self, gen, card: CardPeak | None = None):
        self.peaks: dict[str, dict] = {}
        for name in ("encode_prompt", "sample", "decode"):
            setattr(gen, name, self._wrap(name, getattr(gen, name)))

    def _wrap(self, name, fn):
        def run(*a, **k):
            if DEVICE != "cuda":
                return fn(*a, **k)
            torch.cuda.reset_peak_memory_stats()
            with CardPeak() as card:
                out = fn(*a, **k)
                sync()
            mine = self.peaks.setdefault(name, {"allocated": 0.0, "reserved": 0.0, "card": 0.0})
            mine["allocated"] = max(mine["allocated"], cuda_gib("max_memory_allocated"))
            mine["reserved"] = max(mine["reserved"], cuda_gib("max_memory_reserved"))
            mine["card"] = max(mine["card"], round(card.peak, 2))
            return out
        return run

    def take(self) -> dict:
        out, self.peaks = self.peaks, {}
        return out


@contextlib.contextmanager
def timed_part(parts: dict, name: str):
    sync()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        sync()
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0


# ----------------------------------------------------------------------------- model files

def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith("gamma")):
                p.fill_(1.0)
            elif p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).mul_(0.02))


def build_folder(root: str, size: str) -> str:
    """A diffusers Wan2.1 T2V folder with random full-size weights (bf16), built once per machine."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    folder = os.path.join(root, f"Wan2.1-T2V-{size}-random")
    if os.path.exists(os.path.join(folder, "model_index.json")):
        return folder
    t0 = time.time()
    te_dir = os.path.join(root, "umt5-tiny-random" if size == "tiny" else "umt5-xxl-random")  # shared by sizes
    if not os.path.exists(os.path.join(te_dir, "config.json")):
        xxl = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
        small = dict(vocab_size=256, d_model=4096, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
        cfg = UMT5Config(**(small if size == "tiny" else xxl), relative_attention_num_buckets=32,
                         feed_forward_proj="gated-gelu", is_encoder_decoder=False)
        with torch.device(DEVICE):
            te = UMT5EncoderModel(cfg).to(torch.bfloat16)
        _randomize(te, 1)
        te.save_pretrained(te_dir)
        del te
    with torch.device(DEVICE):
        dit = WanTransformer3DModel(**SHARED, **SIZES[size]).to(torch.bfloat16)
    _randomize(dit, 0)
    dit.save_pretrained(os.path.join(folder, "transformer"), max_shard_size="10GB")
    del dit
    with torch.device(DEVICE):
        vae = AutoencoderKLWan(base_dim=8 if size == "tiny" else 96).to(torch.float32)
    _randomize(vae, 2)
    vae.save_pretrained(os.path.join(folder, "vae"))
    del vae
    release()
    os.symlink(te_dir, os.path.join(folder, "text_encoder"))
    from fastvideo_nodes.testing.text_encoder import save_tokenizer  # a small tokenizer trained on the spot
    save_tokenizer(os.path.join(folder, "tokenizer"))
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                            solver_order=2).save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "WanPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                   "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
                   "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}, f)
    log(kind="build_folder", size=size, s=round(time.time() - t0, 1))
    return folder


# ----------------------------------------------------------------------------- the two stacks

def call_steps(args, call: str) -> int:
    """Steps of the first or the second call: `--first-steps` shortens the first (the warm-up one)."""
    return args.first_steps if call == "first" and args.first_steps else args.steps


def run_diffusers(folder: str, args) -> None:
    from diffusers import WanPipeline
    sync()
    t0 = time.perf_counter()
    pipe = WanPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    pipe.vae.to(torch.float32)  # diffusers' Wan examples decode in float32
    pipe.to(DEVICE)
    sync()
    log(kind="load", impl="diffusers", size=args.size, s=round(time.perf_counter() - t0, 2))
    parts: dict = {}
    encode, decode = pipe.encode_prompt, pipe.vae.decode

    def timed_encode(*a, **k):
        with timed_part(parts, "encode_s"):
            return encode(*a, **k)

    def timed_decode(*a, **k):
        with timed_part(parts, "decode_s"):
            return decode(*a, **k)
    pipe.encode_prompt, pipe.vae.decode = timed_encode, timed_decode
    for call in ("first", "second"):
        parts.clear()
        with CardPeak() as card:
            sync()
            t0 = time.perf_counter()
            pipe(prompt=PROMPT, negative_prompt=NEGATIVE if args.cfg > 1 else None, height=args.height,
                 width=args.width, num_frames=args.frames, num_inference_steps=call_steps(args, call),
                 guidance_scale=args.cfg, generator=torch.Generator("cpu").manual_seed(0), output_type="np")
            sync()
            total = time.perf_counter() - t0
        log(kind="call", impl="diffusers", size=args.size, call=call, steps=call_steps(args, call), cfg=args.cfg,
            total_s=round(total, 2), encode_s=round(parts.get("encode_s", 0), 3),
            decode_s=round(parts.get("decode_s", 0), 2),
            denoise_s=round(total - parts.get("encode_s", 0) - parts.get("decode_s", 0), 2),
            card_peak_gib=round(card.peak, 2), torch_peak_gib=cuda_gib("max_memory_allocated"))
        release()
    encode = decode = None  # the bound methods (and the wrappers around them) held the pipeline too
    del pipe
    release()
    log(kind="after_drop", impl="diffusers", size=args.size,
        allocated_gib=cuda_gib("memory_allocated"))


def run_ours(folder: str, args, backend: str | None, label: str) -> None:
    from fastvideo_nodes import VideoGenerator
    sync()
    t0 = time.perf_counter()
    gen = VideoGenerator.from_pretrained(folder, attention_backend=backend, compile=args.compile, device=DEVICE,
                                         gpu_memory_gb=args.gpu_memory_gb,
                                         dtype="bf16" if DEVICE == "cuda" else "fp32")
    if hasattr(gen, "load"):
        gen.load()  # loading is reported apart from the first generation
    sync()
    log(kind="load", impl="ours", variant=label, size=args.size, s=round(time.perf_counter() - t0, 2),
        plan=gen.memory_plan.describe() if gen.memory_plan is not None else None,
        card_gib=round(CardPeak().used_gib(), 2), reserved_gib=cuda_gib("memory_reserved"))
    phases = PhasePeaks(gen)
    for call in ("first", "second"):
        with CardPeak() as card:
            sync()
            t0 = time.perf_counter()
            r = gen.generate_video(PROMPT, negative_prompt=NEGATIVE, height=args.height, width=args.width,
                                   num_frames=args.frames, num_inference_steps=call_steps(args, call),
                                   guidance_scale=args.cfg, seed=0)
            sync()
            total = time.perf_counter() - t0
        t = r.timings
        log(kind="call", impl="ours", variant=label, size=args.size, call=call, steps=call_steps(args, call),
            cfg=args.cfg,
            total_s=round(total, 2), encode_s=round(t.get("encode_s", 0), 3),
            denoise_s=round(t.get("sample_s", 0), 2), decode_s=round(t.get("decode_s", 0), 2),
            card_peak_gib=round(card.peak, 2), torch_peak_gib=cuda_gib("max_memory_allocated"),
            attention=(r.attention or {}).get("choice", (r.attention or {}).get("requested")),
            phases=phases.take())
        release()
    gen.close()
    del gen, r
    release()
    log(kind="after_drop", impl="ours", variant=label, size=args.size,
        allocated_gib=cuda_gib("memory_allocated"), held=still_held())


def emulate_card(card_gb: float) -> None:
    """A smaller card on a big one: torch's allocator gets (card − what NVML shows in use now, the
    CUDA context) of room, and when it runs out it frees its cache and retries before failing, as
    on a real card of that size."""
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # the context exists now
    context = CardPeak().used_gib()
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(max(0.0, card_gb - context) / total)
    log(kind="emulated_card", card_gb=card_gb, context_gib=round(context, 2),
        allocator_cap_gib=round(card_gb - context, 2))


def table() -> str:
    rows = ["| stack | call | steps | total s | encode s | denoise s | decode s | card peak GiB | × diffusers |",
            "|---|---|---|---|---|---|---|---|---|"]
    ref = {r["call"]: r["total_s"] for r in RESULTS if r.get("kind") == "call" and r["impl"] == "diffusers"}
    for r in RESULTS:
        if r.get("kind") == "call":
            name = r["impl"] + (f" ({r['variant']})" if r.get("variant") else "")
            ratio = f"{ref[r['call']] / r['total_s']:.2f}×" if r["call"] in ref else "–"
            rows.append(f"| {name} | {r['call']} | {r['steps']} | {r['total_s']} | {r['encode_s']} | "
                        f"{r['denoise_s']} | {r['decode_s']} | {r['card_peak_gib']} | {ratio} |")
    return "\n".join(rows)


def common_args() -> argparse.ArgumentParser:
    """The options every end-to-end bench shares (this one, fewstep.py, fastwan.py)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--models", default="/tmp/e2e_models", help="where the random model folders are written")
    ap.add_argument("--size", default="1.3B", choices=list(SIZES))
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test the script with --size tiny")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--alloc-stacks", nargs=0, action=_RecordAllocations,
                    help="record where each live CUDA block was allocated, for the after-drop report")
    return ap


class _RecordAllocations(argparse.Action):
    """--alloc-stacks starts recording as it is parsed: before anything is allocated, in every bench."""

    def __call__(self, parser, namespace, values, option_string=None):
        if torch.cuda.is_available():
            record_allocations()


def main():
    ap = common_args()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--first-steps", type=int, default=None,
                    help="steps of the first (warm-up) call; default --steps")
    ap.add_argument("--gpu-memory-gb", type=float, default=None, help="ours: the memory budget (None: fit the card)")
    ap.add_argument("--backends", default="TORCH_SDPA,auto", help="ours: attention backends, one run each")
    ap.add_argument("--card-gb", type=float, default=None,
                    help="emulate a card of this size: cap torch's allocator so that it, plus what the CUDA "
                         "context already holds, stays within it (as a real card of that size would force)")
    ap.add_argument("--parts", default="build,diffusers,ours")
    args = ap.parse_args()
    parts = args.parts.split(",")
    global DEVICE
    DEVICE = args.device
    os.makedirs(args.out, exist_ok=True)
    log(kind="env", torch=torch.__version__, gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu")
    if args.card_gb is not None and DEVICE == "cuda":
        emulate_card(args.card_gb)
    folder = build_folder(args.models, args.size) if "build" in parts else \
        os.path.join(args.models, f"Wan2.1-T2V-{args.size}-random")

    def attempt(fn, *a):
        try:
            fn(*a)
        except Exception as e:  # one failing part must not hide the others' figures
            log(kind="error", part=fn.__name__, error=repr(e)[:400])

    if "diffusers" in parts:
        attempt(run_diffusers, folder, args)
    if "ours" in parts:
        for b in args.backends.split(","):
            attempt(run_ours, folder, args, None if b == "auto" else b, b)
    md = table()
    print(md)
    with open(os.path.join(args.out, f"e2e_{args.size}_{args.steps}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
