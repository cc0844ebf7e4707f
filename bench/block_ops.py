"""The DiT block's small operations at Wan's 480×832×81 shapes, and what each choice costs in a whole
compiled forward (issues 14 and 17).

    python bench/block_ops.py --out $OUT [--parts cross,folded,rope,forward] [--sizes 14B,1.3B]

cross:   text cross-attention (32,760 queries, 512 keys, 12 and 40 heads, D=128) per kernel: torch's
         cuDNN / flash / memory-efficient SDPA and each installed 8-bit backend; ms, TFLOP/s, rel. L2
         against fp32.
folded:  text cross-attention as the DiT now runs it for a prompt of L tokens (12 and 40 heads): the zero
         padding folded into one counted key (attention/counted.py, 128 or 256 keys) against cuDNN over all
         512 padded keys; ms and rel. L2 of both against fp32 attention over the 512 keys.
rope:    the q/k RMSNorm+RoPE kernel against the strided even/odd loads it replaced; ms, TB/s.
forward: one compiled DiT forward with INT8_ATTN as the package runs it, then with the LayerNorms
         left to Inductor (the earlier choice), then also with text cross-attention on INT8_ATTN;
         seconds and rel. error against the first.
Prints one JSON line per measurement; writes block_ops.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import report  # noqa: E402
from diffusers_baseline import event_time  # noqa: E402

from fastvideo_nodes import attention as attn  # noqa: E402
from fastvideo_nodes.ops import fused  # noqa: E402
from fastvideo_nodes.ops import triton_kernels as tk  # noqa: E402

log = report.Log()


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return round(((out.float() - ref.float()).norm() / ref.float().norm()).item(), 5)


def cross():
    status = attn.backend_status()
    for heads in (12, 40):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, 32760, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, 512, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g) * 2
        v = torch.randn(1, 512, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
        kernels = {}
        for sdp in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            def run(sdp=sdp):
                with sdpa_kernel([getattr(SDPBackend, sdp)]):
                    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                          v.transpose(1, 2)).transpose(1, 2)
            kernels[f"sdpa {sdp.lower()}"] = run
        for name in attn.APPROXIMATE + ("FLASH_ATTN_4",):
            if not status.get(name):
                kernels[name] = lambda name=name: attn.backend_module(name).attend(q, k, v)
        for name, run in kernels.items():
            try:
                err = rel_l2(run(), ref)
                ms = event_time(run, warm=3, iters=20) * 1e3
                log(kind="cross", heads=heads, kernel=name, ms=round(ms, 4),
                    tflops=round(4 * 32760 * 512 * heads * 128 / ms / 1e9, 1), rel_l2=err)
            except Exception as e:  # one broken kernel must not cost the others' rows
                log(kind="cross", heads=heads, kernel=name, error=repr(e)[:300])


def folded():
    from fastvideo_nodes.attention import counted
    from fastvideo_nodes.attention.counted_kernel import attention as kernel
    from fastvideo_nodes.models.wan_dit import fold_text_padding
    configs = {f"m{m}q{qb}w{w}": dict(block_m=m, q_blocks=qb, num_warps=w)
               for m, qb, w in ((64, 8, 4), (64, 16, 4), (64, 4, 4), (128, 4, 8), (128, 8, 8), (64, 8, 8))}
    for heads in (12, 40):
        for rows in (20, 100, 200):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(1, 32760, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            text = torch.zeros(1, 512, heads * 128, device="cuda")
            text[:, :rows] = torch.randn(rows, heads * 128, device="cuda", generator=g)
            lift = torch.randn(heads * 128, device="cuda", generator=g)  # the padding's key and value are not 0
            kv = lambda c, sign: ((c + sign * lift) * 2).unflatten(-1, (heads, 128)).bfloat16()
            k, v = kv(text, 1), kv(text, -1)
            ref = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
            ctx, log_count = fold_text_padding(text[:, :rows], 512)
            kf, vf = kv(ctx, 1), kv(ctx, -1)
            runs = {"cudnn, 512 keys": lambda: attn.backend_module("TORCH_SDPA").attend(q, k, v),
                    "counted (package)": lambda: counted.attend(q, kf, vf, log_count)}
            runs |= {f"counted {n}": (lambda c=c: kernel(q, kf, vf, log_count, **c)) for n, c in configs.items()}
            for name, run in runs.items():
                try:
                    err = rel_l2(run(), ref)
                    ms = event_time(run, warm=3, iters=20) * 1e3
                    log(kind="folded", heads=heads, prompt_tokens=rows, keys=kf.shape[1] if "counted" in name else 512,
                        kernel=name, ms=round(ms, 4), rel_l2=err)
                except Exception as e:  # one broken config must not cost the others' rows
                    log(kind="folded", heads=heads, prompt_tokens=rows, kernel=name, error=repr(e)[:300])


def rope():
    import triton

    from fastvideo_nodes.ops.triton_jit import rms_norm_rope_kernel
    strided = _strided_rope_kernel()
    for heads in (12, 40):
        s, d = 32760, 128
        x = torch.randn(1, s, heads, d, device="cuda", dtype=torch.bfloat16)
        w = torch.rand(heads * d, device="cuda") + 0.5
        ang = torch.rand(s, d // 2, device="cuda") * 6
        cos, sin = ang.cos(), ang.sin()
        pairs, gb = heads * d // 2, 2 * x.numel() * x.element_size() / 1e9
        y = torch.empty_like(x)
        for name, kernel in (("package", rms_norm_rope_kernel), ("strided even/odd loads", strided)):
            def run(kernel=kernel):
                kernel[(s,)](x, w, cos, sin, y, s, pairs, d // 2, 1e-6, BLOCK=triton.next_power_of_2(pairs),
                             num_warps=4)
            run()
            diff = (y.float() - tk.rms_norm_rope(x, w, cos, sin, 1e-6).float()).abs().max().item()
            ms = event_time(run, warm=3, iters=20) * 1e3
            log(kind="rope", heads=heads, kernel=name, ms=round(ms, 4), tb_per_s=round(gb / ms, 2),
                max_diff_vs_package=diff)


def _strided_rope_kernel():
    """The kernel the package ran before 2026-12-04 (even and odd elements as two strided loads)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, seq_len, n_pairs, half_d, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK)
        mask = j < n_pairs
        base = row * n_pairs * 2
        xe = tl.load(x_ptr + base + 2 * j, mask=mask, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + base + 2 * j + 1, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(xe * xe + xo * xo, axis=0) / (2 * n_pairs) + eps)
        xe = xe * r * tl.load(w_ptr + 2 * j, mask=mask, other=0.0).to(tl.float32)
        xo = xo * r * tl.load(w_ptr + 2 * j + 1, mask=mask, other=0.0).to(tl.float32)
        angle = (row % seq_len) * half_d + j % half_d
        c = tl.load(cos_ptr + angle, mask=mask, other=0.0)
        s = tl.load(sin_ptr + angle, mask=mask, other=0.0)
        tl.store(y_ptr + base + 2 * j, (xe * c - xo * s).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptr + base + 2 * j + 1, (xe * s + xo * c).to(y_ptr.dtype.element_ty), mask=mask)
    return kernel


def forward(sizes: list[str]):
    import torch._dynamo

    from bench.speed import inputs, random_dit
    package_impl, package_cross = fused.layer_norm_impl, attn.AttentionSpec.cross_attention

    def inductor_norms(x, *params):  # the earlier choice: Inductor fuses the LayerNorms' torch math
        return "torch" if fused._compiling() else package_impl(x, *params)

    def cross_on_backend(self, q, k, v):
        return attn.attention(q, k, v, backend=self.backend)
    variants = (("package", package_impl, package_cross), ("Inductor norms", inductor_norms, package_cross),
                ("Inductor norms, INT8 cross-attention", inductor_norms, cross_on_backend))
    try:
        for size in sizes:
            m = random_dit(size).compile_blocks()
            x, t, ctx = inputs()
            ref = None
            for name, impl, cross_fn in variants:
                fused.layer_norm_impl, attn.AttentionSpec.cross_attention = impl, cross_fn
                torch._dynamo.reset()  # the blocks compile again with this choice
                with torch.inference_mode():
                    run = lambda: m(x, t, ctx, attention_backend="INT8_ATTN")
                    start = time.perf_counter()
                    out = run()
                    torch.cuda.synchronize()
                    warm_s = time.perf_counter() - start
                    s = event_time(run, warm=1, iters=5 if size == "14B" else 10)
                log(kind="forward", size=size, variant=name, s=round(s, 4), compile_warmup_s=round(warm_s, 1),
                    rel_err_vs_package=None if ref is None else rel_l2(out, ref))
                ref = out if ref is None else ref
            m = ref = out = None
            torch.cuda.empty_cache()
    finally:
        fused.layer_norm_impl, attn.AttentionSpec.cross_attention = package_impl, package_cross


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--parts", default="cross,rope,forward")
    ap.add_argument("--sizes", default="14B,1.3B", help="the DiTs of --parts forward")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    jobs = {"cross": cross, "folded": folded, "rope": rope, "forward": lambda: forward(args.sizes.split(","))}
    for part in args.parts.split(","):
        try:
            jobs[part]()
        except Exception as e:
            log(kind=part, error=repr(e)[:500])
    with open(os.path.join(args.out, "block_ops.json"), "w") as f:
        json.dump(log.rows, f, indent=1)


if __name__ == "__main__":
    main()
