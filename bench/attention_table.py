"""One table of attention backends at Wan shapes from one GPU run (issue 17).

Shapes: 32,760 tokens (480×832×81) and 75,600 tokens (720×1280×81), head dim 128, 12 heads (1.3B) and
40 heads (14B), bf16, non-causal. Rows: TORCH_SDPA pinned to cuDNN, FLASH_ATTN (FA2/FA3 if
installed), FLASH_ATTN_4, KITCHEN_INT8, SAGE_ATTN, INT8_ATTN (ours), each called as the DiT calls it
(quantisation passes included). Per row: warm ms (CUDA events), dense-equivalent TFLOP/s
(4·S²·H·D / t), cosine and relative L2 against fp32 attention on Wan-like inputs (auto's probe
inputs) and on plain noise (e4m3's worst case), and the first call's seconds (JIT compiles: Triton,
CuTe). The fp32 reference runs a few heads at a time on the memory-efficient kernel so that
75,600 tokens × 40 heads fits. A backend that cannot run is a row with its reason and install hint.
Then auto's decision at 32,760 × 12 (its guard figures per backend).

--forward adds one compiled DiT forward (--size 1.3B or 14B; random full-size weights built on the GPU,
as in bench/speed.py) per usable backend at 480×832×81: warm seconds, compile warm-up, error vs exact;
--anchor times diffusers' eager forward of the same size first (the ratio issue 17 asks for), and
--fp8-matmul repeats the backends with fp8 linears.
--hybrid adds the hybrid schedule: whole samplings (compiled 1.3B, 480×832×81, --hybrid-steps steps,
one forward per step) with an 8-bit backend and exact attention on the first and last N steps, for
several N: seconds and the final latents' relative error against an all-exact run (random weights:
a proxy for how far the 8-bit error carries, not a quality score).

    python bench/attention_table.py --out $OUT [--forward] [--hybrid] [--backends INT8_ATTN,FLASH_ATTN_4]
    python bench/attention_table.py --out $OUT --no-kernels --forward --size 14B --anchor --fp8-matmul

Writes table.md and attention_table.json to --out; prints one JSON line per measurement, then the table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import metadata

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import report  # noqa: E402

from fastvideo_nodes.attention import backend_module, backend_status  # noqa: E402
from fastvideo_nodes.attention.auto import _PACKAGES, wan_like_inputs  # noqa: E402

ROWS = ("TORCH_SDPA", "FLASH_ATTN", "FLASH_ATTN_4", "KITCHEN_INT8", "SAGE_ATTN", "INT8_ATTN")
LABELS = {"TORCH_SDPA": "TORCH_SDPA (cuDNN)"}
SHAPES = ((32760, 12), (32760, 40), (75600, 12), (75600, 40))  # (tokens, heads), head dim 128
HEAD_DIM = 128
log = report.Log()
RESULTS = log.rows


def versions(name: str) -> str:
    found = []
    for dist in _PACKAGES.get(name, ()):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def reference(q, k, v, heads_per_chunk: int = 4) -> torch.Tensor:
    """fp32 exact attention [B, S, H, D], a few heads at a time (fp32 copies of q, k, v for all 40
    heads at 75,600 tokens would be 4.6 GiB at once)."""
    out = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        for h in range(0, q.shape[2], heads_per_chunk):
            part = [x[:, :, h:h + heads_per_chunk].float().transpose(1, 2) for x in (q, k, v)]
            out[:, :, h:h + heads_per_chunk] = F.scaled_dot_product_attention(*part).transpose(1, 2)
    return out


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(cosine, relative L2) over the whole output, accumulated in float64."""
    dot = ref_sq = out_sq = diff_sq = 0.0
    for h in range(out.shape[2]):  # per head: no full-size fp32 temporaries
        o, r = out[:, :, h].double(), ref[:, :, h].double()
        dot += (o * r).sum().item()
        ref_sq += (r * r).sum().item()
        out_sq += (o * o).sum().item()
        diff_sq += ((o - r) ** 2).sum().item()
    return round(dot / (ref_sq * out_sq) ** 0.5, 6), round((diff_sq / ref_sq) ** 0.5, 5)


def event_ms(fn, first_s: float) -> float:
    """Warm milliseconds per call with CUDA events; about a second of calls, 3 to 20."""
    from diffusers_baseline import event_time
    return event_time(fn, warm=1, iters=max(3, min(20, int(1.0 / max(first_s, 1e-3))))) * 1000


def caller(name: str):
    mod = backend_module(name)
    if name != "TORCH_SDPA":
        return mod.attend

    def cudnn(q, k, v):  # pinned: a silent fallback to another SDPA kernel would mislabel the row
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2)).transpose(1, 2)
    return cudnn


def probe_inputs(tokens: int, heads: int):
    """(wan, noise, ref_wan, ref_noise): q, k, v [1, S, H, 128] bf16 on CUDA, Wan-like (auto's probe
    inputs) and plain noise (e4m3's worst case), and each one's fp32 exact attention."""
    wan = wan_like_inputs(tokens, heads, HEAD_DIM, "cuda", torch.bfloat16, seed=0)
    g = torch.Generator(device="cuda").manual_seed(1)
    noise = tuple(torch.randn(1, tokens, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
                  for _ in range(3))
    return wan, noise, reference(*wan), reference(*noise)


def kernels(names: list[str]):
    status = backend_status()
    for tokens, heads in SHAPES:
        wan, noise, ref_wan, ref_noise = probe_inputs(tokens, heads)
        flops = 4 * tokens * tokens * heads * HEAD_DIM
        for name in names:
            row = dict(kind="kernel", backend=name, tokens=tokens, heads=heads, packages=versions(name))
            if status.get(name):
                log(**row, unavailable=status[name])
                continue
            fn = caller(name)
            try:
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = fn(*wan)
                torch.cuda.synchronize()
                first_s = time.perf_counter() - start
                cos_w, l2_w = errors(out, ref_wan)
                del out
                cos_n, l2_n = errors(fn(*noise), ref_noise)
                ms = event_ms(lambda fn=fn, args=wan: fn(*args), first_s)
                log(**row, ms=round(ms, 3), tflops=round(flops / (ms * 1e-3) / 1e12, 1), cos_wan=cos_w,
                    l2_wan=l2_w, cos_noise=cos_n, l2_noise=l2_n, first_call_s=round(first_s, 2))
            except Exception as e:  # one broken backend must not cost the others' rows
                log(**row, error=repr(e)[:300])
            torch.cuda.empty_cache()
        del wan, noise, ref_wan, ref_noise
        torch.cuda.empty_cache()


def auto_decision():
    from fastvideo_nodes.attention import auto
    choice = auto.choose_for("cuda", torch.bfloat16, HEAD_DIM, 12, 32760)
    record = auto.last_choice() or {}
    log(kind="auto", choice=choice, why=record.get("why"), backends=record.get("backends"))


def forward(names: list[str], size: str = "1.3B", anchor: bool = False, fp8: bool = False):
    """One compiled DiT forward of `size` per usable backend (exact first: the reference), then with
    fp8 matmul (the linears as `load_dit(fp8_matmul=True)` leaves them) per backend when `fp8`. With
    `anchor`, diffusers' eager forward of the same size first, in this process (its model freed before
    ours is built), so that the rows carry their ratio to it."""
    from bench.speed import inputs, random_dit, to_fp8_matmul
    anchor_s = None
    if anchor:
        import diffusers_baseline as baseline
        baseline.log = log  # its row lands in this table's results
        baseline.wan_dit(size)  # logs kind="wan_dit_forward"
        anchor_s = next(r["s_per_forward"] for r in RESULTS if r["kind"] == "wan_dit_forward")
    status = backend_status()
    m = random_dit(size).compile_blocks()
    x, t, ctx = inputs()
    ref = None
    order = ["TORCH_SDPA"] + [n for n in names if n != "TORCH_SDPA"]
    for matmul in ("bf16", "fp8") if fp8 else ("bf16",):
        if matmul == "fp8":
            to_fp8_matmul(m)
        for name in order:
            row = dict(kind="forward", size=size, matmul=matmul, backend=name)
            if status.get(name):
                log(**row, unavailable=status[name])
                continue
            try:
                with torch.inference_mode():
                    run = lambda: m(x, t, ctx, attention_backend=name)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    out = run()  # a new backend name or matmul: the blocks compile again
                    torch.cuda.synchronize()
                    warm_s = time.perf_counter() - start
                    s = event_ms(run, 0.5) / 1e3
                rel = None if ref is None else round(((out - ref).norm() / ref.norm()).item(), 5)
                ref = out if ref is None else ref
                log(**row, s=round(s, 4), compile_warmup_s=round(warm_s, 1), rel_err_vs_exact=rel,
                    x_diffusers_eager=None if anchor_s is None else round(anchor_s / s, 3))
            except Exception as e:
                log(**row, error=repr(e)[:300])


def hybrid(backend: str, steps: int, exact_counts=(0, 1, 2, 4)):
    from bench.speed import random_dit
    from fastvideo_nodes.pipeline.sampler import SamplingSettings, denoise, initial_noise
    problem = backend_status().get(backend)
    if problem:
        log(kind="hybrid", backend=backend, unavailable=problem)
        return
    m = random_dit("1.3B").compile_blocks()
    s = SamplingSettings(height=480, width=832, num_frames=81, steps=steps, guidance_scale=1.0)
    ctx = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16,
                      generator=torch.Generator(device="cuda").manual_seed(0))

    def sample(name, n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            z = denoise(m, initial_noise(s), ctx, None, s, attention_backend=name, exact_attention_steps=n)
        torch.cuda.synchronize()
        return z, time.perf_counter() - start

    with torch.inference_mode():  # compile both graphs before anything is timed
        x = initial_noise(s).cuda()
        for name in ("TORCH_SDPA", backend):
            m(x, torch.tensor([500.0], device="cuda"), ctx, attention_backend=name)
    exact, exact_s = sample("TORCH_SDPA", 0)
    log(kind="hybrid", backend="TORCH_SDPA", steps=steps, exact_steps=steps, s=round(exact_s, 2), rel_err=0.0)
    for n in exact_counts:
        z, secs = sample(backend, n)
        log(kind="hybrid", backend=backend, steps=steps, exact_steps=n, s=round(secs, 2),
            rel_err=round(((z - exact).norm() / exact.norm()).item(), 5))


def table() -> str:
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, head dim {HEAD_DIM}, "
             "non-causal. Errors vs fp32 attention."]
    if any(r["kind"] == "kernel" for r in RESULTS):
        lines += ["", "| backend | tokens | heads | ms | TFLOP/s (dense-eq.) | cos / L2 Wan-like | cos / L2 noise | "
                  "first call s | packages | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in RESULTS:
        if r["kind"] != "kernel":
            continue
        head = f"| {LABELS.get(r['backend'], r['backend'])} | {r['tokens']} | {r['heads']} |"
        if "ms" in r:
            lines.append(f"{head} {r['ms']} | {r['tflops']} | {r['cos_wan']} / {r['l2_wan']} | "
                         f"{r['cos_noise']} / {r['l2_noise']} | {r['first_call_s']} | {r['packages']} | |")
        else:
            why = r.get("unavailable") or f"failed: {r.get('error')}"
            lines.append(f"{head} – | – | – | – | – | {r['packages']} | {why.replace('|', '/')} |")
    for r in RESULTS:
        if r["kind"] == "auto":
            lines += ["", f"auto at 32,760 × 12 × 128: **{r['choice']}** ({r['why']})", "",
                      "| backend | ms (probe) | cosine | rel L2 | rejected |", "|---|---|---|---|---|"]
            for name, f in (r.get("backends") or {}).items():
                lines.append(f"| {name} | {f.get('ms', '')} | {f.get('cosine', '')} | {f.get('rel_l2', '')} | "
                             f"{(f.get('rejected') or '').replace('|', '/')} |")
    fwd = [r for r in RESULTS if r["kind"] == "forward"]
    if fwd:
        anchor = [r for r in RESULTS if r["kind"] == "wan_dit_forward"]
        head = f" (diffusers eager {anchor[0]['s_per_forward']} s)" if anchor else ""
        lines += ["", f"Compiled {fwd[0]['size']} DiT forward, 480×832×81{head}", "",
                  "| backend | matmul | s | × diffusers eager | compile warm-up (s) | rel err vs exact |",
                  "|---|---|---|---|---|---|"]
        for r in fwd:
            if "s" in r:
                ratio = f"{r['x_diffusers_eager']}×" if r.get("x_diffusers_eager") else ""
                lines.append(f"| {r['backend']} | {r['matmul']} | {r['s']} | {ratio} | {r['compile_warmup_s']} | "
                             f"{r['rel_err_vs_exact']} |")
            else:
                why = (r.get("unavailable") or r.get("error", "")).replace("|", "/")
                lines.append(f"| {r['backend']} | {r['matmul']} | {why} | | | |")
    hyb = [r for r in RESULTS if r["kind"] == "hybrid"]
    if hyb:
        lines += ["", "| backend | exact steps (first + last N) | sampling s | final latents rel err vs all-exact |",
                  "|---|---|---|---|"]
        for r in hyb:
            if "s" in r:
                lines.append(f"| {r['backend']} | {r['exact_steps']} of {r['steps']} | {r['s']} | {r['rel_err']} |")
            else:
                lines.append(f"| {r['backend']} | {r['unavailable'].replace('|', '/')} | | |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--forward", action="store_true", help="also a compiled DiT forward per backend")
    ap.add_argument("--size", default="1.3B", choices=("1.3B", "14B"), help="the DiT of --forward")
    ap.add_argument("--anchor", action="store_true", help="--forward: diffusers' eager forward first (needs diffusers)")
    ap.add_argument("--fp8-matmul", action="store_true", help="--forward: the backends again with fp8 matmul")
    ap.add_argument("--backends", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel table (with --forward/--hybrid)")
    ap.add_argument("--hybrid", action="store_true", help="also the hybrid schedule: samplings for several N")
    ap.add_argument("--hybrid-backend", default="INT8_ATTN", help="the 8-bit backend of --hybrid")
    ap.add_argument("--hybrid-steps", type=int, default=20)
    args = ap.parse_args()
    names = [n.strip().upper() for n in args.backends.split(",") if n.strip()]
    os.makedirs(args.out, exist_ok=True)
    log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        capability=".".join(map(str, torch.cuda.get_device_capability())))
    if not args.no_kernels:
        kernels(names)
        try:
            auto_decision()
        except Exception as e:
            log(kind="auto_error", error=repr(e)[:300])
    if args.forward:
        forward(names, args.size, args.anchor, args.fp8_matmul)
        torch.cuda.empty_cache()
    if args.hybrid:
        try:
            hybrid(args.hybrid_backend.upper(), args.hybrid_steps)
        except Exception as e:
            log(kind="hybrid", backend=args.hybrid_backend, unavailable=f"failed: {e!r:.300}")
    report.save(args.out, "attention_table", RESULTS, table(), md_name="table.md")


if __name__ == "__main__":
    main()
