"""INT8_ATTN's kernel variants side by side (issue 17): every config of `int8_kernel.CONFIGS` at
32,760 × H × 128 and 75,600 × H × 128 (H = 12, the 1.3B, or --heads 40, the 14B; bf16, non-causal),
one GPU command of about a minute.

Per variant and shape: warm ms of the whole call (its quantisation passes included) and of the
pre-passes alone (`quantize`; for q_in_kernel variants Q's quantisation is inside the kernel's
time), dense-equivalent TFLOP/s (4·S²·H·D / t) of the whole call and of the kernel alone, and
cosine / relative L2 against fp32 exact attention on Wan-like inputs (auto's probe inputs, where
issue 17's cosine ≥ 0.999 is asked) and on plain noise (e4m3's worst case). The default config is
marked; after a reading, set `int8_kernel.DEFAULT_NAME` to the winner. A variant that fails to
compile or run is a row with its error. Configs are skipped (and say so) once --budget-s has gone,
so the command stays within its device time.

    python bench/int8_variants.py --out $OUT [--configs a,b] [--shapes 32760,75600] [--heads 12,40] [--budget-s 80]

Writes int8_variants.json and int8_variants.md to --out; prints one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import report  # noqa: E402
from bench.attention_table import errors, probe_inputs  # noqa: E402  (inputs, fp32 references, error figures)
from bench.diffusers_baseline import event_time  # noqa: E402
from fastvideo_nodes.attention import int8, int8_kernel  # noqa: E402

HEAD_DIM = 128
log = report.Log()
RESULTS = log.rows


def shape_rows(tokens: int, heads: int, names: list[str], budget_s: float):
    wan, noise, ref_wan, ref_noise = probe_inputs(tokens, heads)
    flops = 4 * tokens * tokens * heads * HEAD_DIM
    iters = 10 if tokens <= 40000 else 5
    for name in names:
        row = dict(kind="variant", config=name, tokens=tokens, heads=heads, default=name == int8_kernel.DEFAULT_NAME)
        if time.time() - log.t0 > budget_s:
            log(**row, skipped=f"budget of {budget_s:.0f} s spent")
            continue
        cfg = int8_kernel.CONFIGS[name]
        try:
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = int8_kernel.attention(*wan, cfg)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - start  # the JIT compiles of this config
            cos_w, l2_w = errors(out, ref_wan)
            del out
            cos_n, l2_n = errors(int8_kernel.attention(*noise, cfg), ref_noise)
            ms = event_time(lambda: int8_kernel.attention(*wan, cfg), warm=1, iters=iters) * 1e3
            quant_ms = event_time(lambda: int8_kernel.quantize(*wan, cfg), warm=1, iters=iters) * 1e3
            log(**row, ms=round(ms, 3), quant_ms=round(quant_ms, 3), tflops=round(flops / ms / 1e9, 1),
                kernel_tflops=round(flops / (ms - quant_ms) / 1e9, 1), cos_wan=cos_w, l2_wan=l2_w,
                cos_noise=cos_n, l2_noise=l2_n, first_call_s=round(first_s, 2))
        except Exception as e:  # one broken variant must not cost the others' rows
            log(**row, error=repr(e)[:400])
        torch.cuda.empty_cache()


def table() -> list[str]:
    lines = ["| tokens × heads × 128 | config | ms | pre-pass ms | TFLOP/s | kernel-only TFLOP/s | "
             "cos / L2 Wan-like | cos / L2 noise | first call s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in RESULTS:
        if r.get("kind") != "variant":
            continue
        name = r["config"] + (" (default)" if r["default"] else "")
        if "ms" in r:
            lines.append(f"| {r['tokens']} × {r['heads']} | {name} | {r['ms']} | {r['quant_ms']} | {r['tflops']} | "
                         f"{r['kernel_tflops']} | {r['cos_wan']} / {r['l2_wan']} | {r['cos_noise']} / "
                         f"{r['l2_noise']} | {r['first_call_s']} |")
        else:
            lines.append(f"| {r['tokens']} × {r['heads']} | {name} | {r.get('error') or r.get('skipped')} |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--configs", default=",".join(int8_kernel.CONFIGS), help="comma-separated CONFIGS names")
    ap.add_argument("--shapes", default="32760,75600", help="token counts (head dim 128)")
    ap.add_argument("--heads", default="12", help="head counts, each with every token count")
    ap.add_argument("--budget-s", type=float, default=80.0, help="skip further configs after this many seconds")
    args = ap.parse_args()
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in int8_kernel.CONFIGS]
    if unknown:
        sys.exit(f"--configs: unknown {unknown}; known: {', '.join(int8_kernel.CONFIGS)}")
    os.makedirs(args.out, exist_ok=True)
    if int8.available():
        sys.exit(int8.available())
    import triton
    log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        default=int8_kernel.DEFAULT_NAME)
    for heads in (int(h) for h in args.heads.split(",")):
        for tokens in (int(s) for s in args.shapes.split(",")):
            shape_rows(tokens, heads, names, args.budget_s)
            torch.cuda.empty_cache()
    report.save(args.out, "int8_variants", RESULTS, "\n".join(table()))

if __name__ == "__main__":
    main()
