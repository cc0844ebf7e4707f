"""INT8_ATTN's algorithm written in Gluon (Triton's lower-level dialect) with FA3's intra-warpgroup
overlap, against the package kernel (issues 14 and 17: attention is half of a 14B step).

The package kernel (`int8_kernel._attn_fwd_tma`) is Triton: every `tl.dot` there is waited for at
once, so a CTA's softmax never runs under its own products; only the other CTAs on the SM fill the
tensor cores meanwhile. Here the loop over key blocks issues Q·K_jᵀ, then P·V_{j-1}, waits for the
first and runs block j's softmax while P·V_{j-1} is still on the tensor cores. Same quantised inputs
(`int8_kernel.quantize`), same arithmetic (the i2f offset rides in the score accumulator's start
value, P scaled into e4m3's range), P·V accumulated inside the fp8 product as acc_in_mma does.

Two things ptxas needs, found by compiling for sm_90a on a CPU (`triton.compile` with a GPUTarget;
tests/test_int8_gluon_build.py checks the result in the SASS):
- P goes through shared memory, not registers: as a register operand, the registers of P_{j-1} are
  free to the allocator once the product is issued, and ptxas waits for the product before reusing
  them, early in the softmax;
- no product in flight across the loop's back edge: with one, ptxas serializes every wgmma (C7514).

H200 readings (2026-12-04, Triton 3.6, whole call with the pre-passes; TFLOP/s dense-equivalent, over
three calls): STAGES=1 838–849 at 32,760 × 12 (package 814–829) but 752–764 at × 40; STAGES=2 733–805
at × 40 (package 782–800). Outputs within 0.0009 of the package kernel, the same error against exact
attention. Two other designs measured in
the same session and not kept: two query tiles per warpgroup taking turns (BN=64, 680–722) and two
warp-specialized warpgroups issuing their products in turns through mbarriers (FA3's pingpong,
723–750). The package kernel stays the default; this bench is where a faster Gluon design is tried.

    python3 bench/int8_gluon.py --out $OUT [--shapes 32760x12,32760x40]

Needs a Hopper GPU and a Triton with Gluon's Hopper API (3.6 on the device). Writes int8_gluon.json.
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
from bench.attention_table import errors, reference  # noqa: E402  (fp32 exact attention, cos / rel. L2)
from bench.diffusers_baseline import event_time  # noqa: E402
from fastvideo_nodes.attention import int8_kernel as K  # noqa: E402
from fastvideo_nodes.attention.auto import wan_like_inputs  # noqa: E402

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError as e:  # older Triton: the bench says so and stops
    sys.exit(f"int8_gluon: this Triton has no Gluon Hopper API ({e})")

log = report.Log()
BM, D = 64, 128
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # renamed after Triton 3.6


@gluon.jit
def _softmax(s_int, m_i, l_i, qk_scale, start, S, BN: gl.constexpr, s_layout: gl.constexpr, MASK: gl.constexpr):
    s = s_int.to(gl.float32, bitcast=True)  # 12582912 + qk, exact: the accumulator started at 1.5·2²³
    if MASK:
        cols = start + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols < S, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, (gl.max(s, 1) - 12582912.0) * qk_scale)
    row = m_new + (12582912.0 * qk_scale - 8.807354922057604)  # P scaled to 448 = 2^8.807
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - gl.expand_dims(row, 1))
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _step(j, p_smem, alpha, m_i, l_i, acc, q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, k_row, v_row, n_kb, S,
          qk_scale, magic, BN: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr, row_o: gl.constexpr,
          MASK: gl.constexpr):
    """Key block j: S_j = Q·K_jᵀ issued, then P·V_{j-1} (acc rescaled first); S_j's softmax runs
    while P·V_{j-1} is on the tensor cores."""
    st = j % STAGES
    prev = (j - 1) % STAGES
    mbarrier.wait(k_bar.index(st), (j // STAGES) & 1)
    s_tok = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), magic, is_async=True)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    mbarrier.wait(v_bar.index(prev), ((j - 1) // STAGES) & 1)
    acc_tok = warpgroup_mma(p_smem.index((j - 1) % 2), v_smem.index(prev).permute((1, 0)), acc, is_async=True)
    s_int = warpgroup_mma_wait(1, deps=(s_tok,))
    p, alpha, m_i, l_i = _softmax(s_int, m_i, l_i, qk_scale, j * BN, S, BN, s_layout, MASK)
    p_smem.index(j % 2).store(p.to(gl.float8e4nv))  # the other buffer: P·V_{j-1} reads P_{j-1}
    fence_async_shared()
    acc = warpgroup_mma_wait(0, deps=(acc_tok,))
    if j + STAGES < n_kb:  # S_j is done: K_j's buffer takes K_{j+STAGES}
        mbarrier.expect(k_bar.index(st), k_desc.block_type.nbytes)
        _tma_load(k_desc, [k_row + (j + STAGES) * BN, 0], k_bar.index(st), k_smem.index(st))
    if j - 1 + STAGES < n_kb:  # P·V_{j-1} is done: V_{j-1}'s buffer takes V_{j-1+STAGES}
        mbarrier.expect(v_bar.index(prev), v_desc.block_type.nbytes)
        _tma_load(v_desc, [v_row, (j - 1 + STAGES) * BN], v_bar.index(prev), v_smem.index(prev))
    return alpha, m_i, l_i, acc


@gluon.jit
def attn_fwd(q_desc, k_desc, v_desc, QS, KS, VS, VM, O, Sq, S, H, Sq_pad, Sk_pad, n_qblk, n_kblk, sob, sos, soh,
             D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """Program (query block, b·H + h): q, k as [B·H·S_pad, D] int8, vᵀ as [B·H·D, S_pad] e4m3, the
    scales and V's channel means as `int8_kernel.quantize` makes them; O [B, Sq, H, D]."""
    mblk = gl.program_id(0)
    bh = gl.program_id(1)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BN, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, D, 32])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    q_smem = gl.allocate_shared_memory(gl.int8, [BM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, D, BN], v_desc.layout)
    p_smem = gl.allocate_shared_memory(gl.float8e4nv, [2, BM, BN],
                                       gl.NVMMASharedLayout.get_default_for([BM, BN], gl.float8e4nv))
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)

    n_kb = gl.cdiv(S, BN)
    k_row = bh * Sk_pad
    v_row = bh * D
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [bh * Sq_pad + mblk * BM, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        if i < n_kb:
            mbarrier.expect(k_bar.index(i), k_desc.block_type.nbytes)
            _tma_load(k_desc, [k_row + i * BN, 0], k_bar.index(i), k_smem.index(i))
            mbarrier.expect(v_bar.index(i), v_desc.block_type.nbytes)
            _tma_load(v_desc, [v_row, i * BN], v_bar.index(i), v_smem.index(i))
    q_scale = gl.load(QS + bh * n_qblk + mblk)
    ks_ptr = KS + bh * n_kblk
    magic = gl.full([BM, BN], 0x4B400000, gl.int32, layout=s_layout)
    m_i = gl.full([BM], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BM], gl.float32, layout=row_s)
    acc = gl.zeros([BM, D], gl.float32, layout=o_layout)

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    s_int = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), magic)
    if STAGES < n_kb:  # K_0's buffer is free again
        mbarrier.expect(k_bar.index(0), k_desc.block_type.nbytes)
        _tma_load(k_desc, [k_row + STAGES * BN, 0], k_bar.index(0), k_smem.index(0))
    p, alpha, m_i, l_i = _softmax(s_int, m_i, l_i, q_scale * gl.load(ks_ptr), 0, S, BN, s_layout, True)
    p_smem.index(0).store(p.to(gl.float8e4nv))
    fence_async_shared()
    for j in range(1, n_kb - 1):
        alpha, m_i, l_i, acc = _step(j, p_smem, alpha, m_i, l_i, acc, q_smem, k_smem, v_smem, k_bar, v_bar, k_desc,
                                     v_desc, k_row, v_row, n_kb, S, q_scale * gl.load(ks_ptr + j), magic, BN, STAGES,
                                     s_layout, row_o, False)
    if n_kb > 1:  # the last key block reaches past S
        j = n_kb - 1
        alpha, m_i, l_i, acc = _step(j, p_smem, alpha, m_i, l_i, acc, q_smem, k_smem, v_smem, k_bar, v_bar, k_desc,
                                     v_desc, k_row, v_row, n_kb, S, q_scale * gl.load(ks_ptr + j), magic, BN, STAGES,
                                     s_layout, row_o, True)
    last = (n_kb - 1) % STAGES
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    mbarrier.wait(v_bar.index(last), ((n_kb - 1) // STAGES) & 1)
    acc = warpgroup_mma(p_smem.index((n_kb - 1) % 2), v_smem.index(last).permute((1, 0)), acc)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bar.index(i))
        mbarrier.invalidate(v_bar.index(i))
    offs_m = mblk * BM + gl.arange(0, BM, layout=row_o)
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    scale = gl.expand_dims(gl.load(VS + bh * D + offs_d), 0) / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
    out = acc * scale + gl.expand_dims(gl.load(VM + bh * D + offs_d), 0)
    ptrs = O + (bh // H) * sob + (bh % H) * soh + gl.expand_dims(offs_m, 1) * sos + gl.expand_dims(offs_d, 0)
    gl.store(ptrs, out.to(O.dtype.element_ty), mask=gl.expand_dims(offs_m < Sq, 1))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stages: int = 2, maxnreg: int | None = 168):
    """q, k, v [B, S, H, 128] bf16 on a Hopper GPU → [B, S, H, 128]: the package's pre-passes, then attn_fwd."""
    B, S, H, _ = q.shape
    bn = 128
    q8, qs, k8, ks, v8, vs, vm = K.quantize(q, k, v, K.Config(BM, bn, 4, 2, tma=True, fused_quant=True))
    out = torch.empty_like(q)
    layout = gl.NVMMASharedLayout.get_default_for
    qd = TensorDescriptor.from_tensor(q8.view(-1, D), [BM, D], layout([BM, D], gl.int8))
    kd = TensorDescriptor.from_tensor(k8.view(-1, D), [bn, D], layout([bn, D], gl.int8))
    vd = TensorDescriptor.from_tensor(v8.view(-1, v8.shape[-1]), [D, bn], layout([D, bn], gl.float8e4nv))
    opts = dict(maxnreg=maxnreg) if maxnreg else {}
    attn_fwd[(qs.shape[-1], B * H)](qd, kd, vd, qs, ks, vs, vm, out, S, k.shape[1], H, q8.shape[2], k8.shape[2],
                                    qs.shape[-1], ks.shape[-1], out.stride(0), out.stride(1), out.stride(2),
                                    D=D, BM=BM, BN=bn, STAGES=stages, num_warps=4, **opts)
    return out


def shape_rows(S: int, H: int) -> None:
    q, k, v = wan_like_inputs(S, H, D, "cuda", torch.bfloat16, seed=0)
    exact = reference(q, k, v)
    base = K.attention(q, k, v)
    flops = 4 * S * S * H * D
    t = event_time(lambda: K.attention(q, k, v), warm=1, iters=10)
    log(kind="package", config=K.DEFAULT_NAME, tokens=S, heads=H, ms=round(t * 1e3, 3),
        tflops=round(flops / t / 1e12, 1), rel_exact=errors(base, exact)[1])
    for stages, maxnreg in ((2, 168), (1, 168), (2, None)):
        row = dict(kind="gluon", stages=stages, maxnreg=maxnreg, tokens=S, heads=H)
        try:
            start = time.perf_counter()
            out = attention(q, k, v, stages, maxnreg)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            t = event_time(lambda: attention(q, k, v, stages, maxnreg), warm=1, iters=10)
            log(**row, ms=round(t * 1e3, 3), tflops=round(flops / t / 1e12, 1), first_call_s=round(first, 2),
                rel_package=errors(out, base)[1], rel_exact=errors(out, exact)[1],
                finite=bool(out.isfinite().all()))
        except Exception as e:  # a variant this GPU or Triton cannot build: the row says why
            log(**row, error=repr(e)[:300])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--shapes", default="1000x2,32760x12,32760x40", help="tokens x heads, head dim 128")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for shape in args.shapes.split(","):
        shape_rows(*(int(n) for n in shape.split("x")))
        torch.cuda.empty_cache()
    lines = ["| tokens × heads | kernel | ms | TFLOP/s | rel. L2 vs package / exact |", "|---|---|---|---|---|"]
    for r in log.rows:
        name = r["config"] if r["kind"] == "package" else f"gluon STAGES={r['stages']} maxnreg={r['maxnreg']}"
        cells = f"{r['ms']} | {r['tflops']} | {r.get('rel_package', '–')} / {r['rel_exact']}" if "ms" in r \
            else r.get("error", "")
        lines.append(f"| {r['tokens']} × {r['heads']} | {name} | {cells} |")
    report.save(args.out, "int8_gluon", log.rows, "\n".join(lines))


if __name__ == "__main__":
    main()
