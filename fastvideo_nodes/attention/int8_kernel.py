"""Triton kernels of INT8_ATTN: INT8 Q·Kᵀ, FP8 (e4m3) P·V, FP32 accumulation, online softmax.

Triton ships as a wheel, so the kernel needs no compiler step on the user's machine. Cheap passes
quantise the inputs into padded [B, H, S_pad, D] buffers (V transposed to [B, H, D, S_pad]: Hopper's
fp8 tensor-core product wants both operands contiguous along the reduced dimension), then one kernel
does the attention (with tail_split, one small launch after it merges the last wave's split query
blocks). The algorithm, step for step, is `int8.emulate` in torch; see there for why each step keeps
the error small.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ..ops.triton_jit import tensor_descriptor

LOG2E = 1.4426950408889634
FP8_MAX = 448.0  # largest finite float8_e4m3fn
LOG2_FP8_MAX = math.log2(FP8_MAX)


@dataclass(frozen=True)
class Config:
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    fast_i2f: bool = True  # int32 → fp32 by a float add instead of the (slow) convert instruction
    tma: bool = False  # tiles through Hopper's tensor-memory accelerator (host tensor descriptors)
    # The options below only act in the TMA kernel.
    fold_bias: bool = False  # fast_i2f without its float subtract: the offset goes into exp2's FMA instead
    acc_in_mma: bool = False  # P·V added up inside the tensor core (Hopper's fp8 accumulator is ~fp22, not fp32)
    q_in_kernel: bool = False  # Q quantised by the attention kernel from bf16: one pre-pass fewer
    fused_quant: bool = False  # pre-passes in four launches, no torch ops: K/V sums, their finish, Q and K, V
    maxnreg: int | None = None  # register cap per thread: 168 lets three 4-warp CTAs share an SM
    tail_split: int = 0  # up to this many key ranges per query block of the last, partial wave (merged by one launch)
    ctas_per_sm: int = 3  # what sm_90a's registers and shared memory allow: tail_split's wave is this × SMs


# Offered to the bench (bench/int8_variants.py); DEFAULT_NAME is what attend() uses. Earlier H200 readings
# (32,760 × 12 × 128, bf16, TFLOP/s with the quantisation passes, triton.testing.do_bench): m64n128w4s3_tma
# 719, m64n64w4s3_tma_cvt 678, m64n64w4s3_tma 664, m64n64w4s4_tma 661, m64n64w4s3 (pointer loads) 599,
# m128n128w8s2 548, m128n128w8s2_tma 530, m128n64w8s3 527, m64n64w8s3_tma 385; cuDNN SDPA 601. Small query
# blocks and TMA loads win; the losers are no longer listed. Triton 3.6 for sm_90a gives m64n128w4s3_tma 240
# registers and 104 KiB of shared memory: two CTAs per SM, whose softmax and products overlap only with each
# other's (each waits for its own Q·Kᵀ and P·V at once). The candidates after the first two attack that:
# fewer float ops per score (fold), fewer registers (accmma: no second [64, 128] fp32 tile for the product),
# more CTAs per SM (r168, r128, 64-key blocks), fewer pre-passes (qk: Q in the kernel, fq: fused K/V passes).
# Not offered: Triton 3.6's tl.range(warp_specialize=True) compiled this loop without partitions for sm_90a,
# and issuing the next block's Q·Kᵀ before this block's softmax by hand (FA3's overlap) got a wait at once.
_BEST = Config(64, 128, 4, 3, tma=True)
CONFIGS = {
    "m64n128w4s3_tma": _BEST,
    "m64n64w4s3_tma": Config(64, 64, 4, 3, tma=True),
    "m64n128w4s3_tma_fold": replace(_BEST, fold_bias=True),
    "m64n128w4s3_tma_fold_accmma": replace(_BEST, fold_bias=True, acc_in_mma=True),
    "m64n128w4s3_tma_fold_qk_fq": replace(_BEST, fold_bias=True, q_in_kernel=True, fused_quant=True),
    "m64n128w4s2_tma_fold_accmma_r168": replace(_BEST, num_stages=2, fold_bias=True, acc_in_mma=True, maxnreg=168),
    "m64n128w4s2_tma_fold_r168": replace(_BEST, num_stages=2, fold_bias=True, maxnreg=168),
    "m64n128w4s3_tma_fold_accmma_qk_fq": replace(_BEST, fold_bias=True, acc_in_mma=True, q_in_kernel=True,
                                                 fused_quant=True),
    # 64-key blocks with acc_in_mma need 160 registers: three CTAs per SM as they are, four under a 128 cap
    "m64n64w4s3_tma_fold_accmma": Config(64, 64, 4, 3, tma=True, fold_bias=True, acc_in_mma=True),
    "m64n64w4s2_tma_fold_accmma_r128": Config(64, 64, 4, 2, tma=True, fold_bias=True, acc_in_mma=True, maxnreg=128),
    # Issue 17's remaining 0.33 ms of pre-passes and the partial last wave (6,144 query blocks at 32,760 tokens
    # over 132 SMs × 3 CTAs leave 204 for a 16th wave): fq = four pre-pass launches and no torch ops (the
    # separate passes take eleven and read V three times), tsN = that wave's blocks cut into up to N key ranges.
    "m64n128w4s2_tma_fold_r168_fq": replace(_BEST, num_stages=2, fold_bias=True, maxnreg=168, fused_quant=True),
    "m64n128w4s2_tma_fold_r168_ts8": replace(_BEST, num_stages=2, fold_bias=True, maxnreg=168, tail_split=8),
    "m64n128w4s2_tma_fold_r168_fq_ts3": replace(_BEST, num_stages=2, fold_bias=True, maxnreg=168, fused_quant=True,
                                                tail_split=3),
    "m64n128w4s2_tma_fold_r168_fq_ts8": replace(_BEST, num_stages=2, fold_bias=True, maxnreg=168, fused_quant=True,
                                                tail_split=8),
    "m64n128w4s2_tma_fold_accmma_r168_fq_ts8": replace(_BEST, num_stages=2, fold_bias=True, acc_in_mma=True,
                                                       maxnreg=168, fused_quant=True, tail_split=8),
}
# H200 reading of 2026-12-03 (bench/int8_variants.py, whole call with pre-passes, 32,760 / 75,600 tokens):
# m64n128w4s3_tma 725 / 728 TFLOP/s, _fold 760 / 769, _fold_accmma 780 / 807, s2_fold_r168 785 / 787 (kernel
# alone 817 / 797), s2_fold_accmma_r168 782 / 790; all cosine 0.999994 on Wan-like inputs. accmma's fp22
# sums cost a little error on plain noise (rel. L2 0.0494 against 0.0492). Later that day, same bench, 32,760
# tokens: s2_fold_r168 781 (pre-passes 0.337 ms), + fq 772 (0.263 ms), + ts8 784, + fq_ts3 797, + fq_ts8 820
# (8.046 ms, kernel alone 847; 816 / 803 in a second run), accmma_r168_fq_ts8 793; the same accuracy against
# exact attention. fq_ts8 became the default on 2026-12-03 (822 / 815 TFLOP/s at 32,760 × 12, 780 at 40 heads):
# its split blocks round P per key range, which the unsplit emulation does not model, so the GPU tests hold
# the unsplit kernel to `int8.emulate` and the split output to exact attention (`check_algorithm`).
DEFAULT_NAME = "m64n128w4s2_tma_fold_r168_fq_ts8"  # the one switch: the bench winner (bump auto.PROBE_VERSION with it)
DEFAULT = CONFIGS[DEFAULT_NAME]


@triton.jit
def _quant_int8(x_ptr, mean_ptr, out_ptr, scale_ptr, S, H, sxb, sxs, sxh, S_pad, n_blk, extra_scale,
                D: tl.constexpr, BLK: tl.constexpr, SMOOTH: tl.constexpr):
    """One block of BLK tokens of one head → int8 with one scale (×extra_scale) per block."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = blk * BLK + tl.arange(0, BLK)
    cols = tl.arange(0, D)
    inside = rows[:, None] < S
    x = tl.load(x_ptr + b * sxb + h * sxh + rows[:, None] * sxs + cols[None, :], mask=inside, other=0.0)
    x = x.to(tl.float32)
    if SMOOTH:  # subtract the key mean: the scores change by a per-row constant, which softmax ignores
        mu = tl.load(mean_ptr + bh * D + cols)
        x = tl.where(inside, x - mu[None, :], 0.0)
    scale = tl.maximum(tl.max(tl.abs(x)), 1e-20) / 127.0
    y = x / scale
    y = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)  # round half away from zero, as the emulation
    tl.store(out_ptr + bh * S_pad * D + rows[:, None] * D + cols[None, :], y)
    tl.store(scale_ptr + bh * n_blk + blk, scale * extra_scale)


@triton.jit
def _quant_v(v_ptr, mean_ptr, scale_ptr, out_ptr, S, H, svb, svs, svh, S_pad,
             D: tl.constexpr, BLK: tl.constexpr):
    """One block of V tokens of one head, less the channel mean → e4m3 with one scale per channel, as [D, S_pad]."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = blk * BLK + tl.arange(0, BLK)
    cols = tl.arange(0, D)
    inside = rows[:, None] < S
    x = tl.load(v_ptr + b * svb + h * svh + rows[:, None] * svs + cols[None, :], mask=inside, other=0.0)
    x = tl.where(inside, x.to(tl.float32) - tl.load(mean_ptr + bh * D + cols)[None, :], 0.0)
    y = (x / tl.load(scale_ptr + bh * D + cols)[None, :]).to(tl.float8e4nv)
    tl.store(out_ptr + bh * D * S_pad + cols[None, :] * S_pad + rows[:, None], y)


@triton.jit
def _kv_partials(k_ptr, v_ptr, part_ptr, S, H, skb, sks, skh, svb, svs, svh, n_chunk,
                 D: tl.constexpr, CHUNK: tl.constexpr, BLK: tl.constexpr):
    """CHUNK tokens of one head: K's and V's column sums, V's column min and max, as part[bh, 0:4, chunk, :].
    One read of K and V; the totals run elementwise over [BLK, D] tiles and cross threads once at the end."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = tl.arange(0, D)
    k_sum = tl.zeros([BLK, D], tl.float32)
    v_sum = tl.zeros([BLK, D], tl.float32)
    v_min = tl.full([BLK, D], float("inf"), tl.float32)
    v_max = tl.full([BLK, D], float("-inf"), tl.float32)
    for i in range(0, CHUNK, BLK):
        rows = c * CHUNK + i + tl.arange(0, BLK)
        inside = rows[:, None] < S
        kx = tl.load(k_ptr + b * skb + h * skh + rows[:, None] * sks + cols[None, :], mask=inside, other=0.0)
        vx = tl.load(v_ptr + b * svb + h * svh + rows[:, None] * svs + cols[None, :], mask=inside, other=0.0)
        vx = vx.to(tl.float32)
        k_sum += kx.to(tl.float32)
        v_sum += vx
        v_min = tl.minimum(v_min, tl.where(inside, vx, float("inf")))
        v_max = tl.maximum(v_max, tl.where(inside, vx, float("-inf")))
    base = part_ptr + bh * 4 * n_chunk * D + c * D
    tl.store(base + cols, tl.sum(k_sum, 0))
    tl.store(base + n_chunk * D + cols, tl.sum(v_sum, 0))
    tl.store(base + 2 * n_chunk * D + cols, tl.min(v_min, 0))
    tl.store(base + 3 * n_chunk * D + cols, tl.max(v_max, 0))


@triton.jit
def _kv_finish(part_ptr, k_mean_ptr, v_mean_ptr, v_scale_ptr, S, n_chunk,
               D: tl.constexpr, DC: tl.constexpr, CT: tl.constexpr):
    """DC channels of one head's partials → K mean, V mean, V scale: the torch formulas of the separate
    passes, with IEEE divisions (Triton's `/` is an approximate one on the GPU)."""
    bh = tl.program_id(0)
    cols = tl.program_id(1) * DC + tl.arange(0, DC)
    k_sum = tl.zeros([CT, DC], tl.float32)
    v_sum = tl.zeros([CT, DC], tl.float32)
    v_min = tl.full([CT, DC], float("inf"), tl.float32)
    v_max = tl.full([CT, DC], float("-inf"), tl.float32)
    base = part_ptr + bh * 4 * n_chunk * D
    for c0 in range(0, n_chunk, CT):
        chunks = c0 + tl.arange(0, CT)
        ok = chunks[:, None] < n_chunk
        offs = base + chunks[:, None] * D + cols[None, :]
        k_sum += tl.load(offs, mask=ok, other=0.0)
        v_sum += tl.load(offs + n_chunk * D, mask=ok, other=0.0)
        v_min = tl.minimum(v_min, tl.load(offs + 2 * n_chunk * D, mask=ok, other=float("inf")))
        v_max = tl.maximum(v_max, tl.load(offs + 3 * n_chunk * D, mask=ok, other=float("-inf")))
    n = S.to(tl.float32)
    v_mean = tl.math.div_rn(tl.sum(v_sum, 0), n)
    spread = tl.maximum(tl.max(v_max, 0) - v_mean, v_mean - tl.min(v_min, 0))
    tl.store(k_mean_ptr + bh * D + cols, tl.math.div_rn(tl.sum(k_sum, 0), n))
    tl.store(v_mean_ptr + bh * D + cols, v_mean)
    tl.store(v_scale_ptr + bh * D + cols, tl.maximum(tl.math.div_rn(spread, 448.0), 1e-20))  # FP8_MAX


@triton.jit
def _int8_slice(x_ptr, mu, rows, S, sxs, D: tl.constexpr, SMOOTH: tl.constexpr, LAST: tl.constexpr):
    cols = tl.arange(0, D)
    inside = rows[:, None] < S
    x = tl.load(x_ptr + rows[:, None] * sxs + cols[None, :], mask=inside, other=0.0,
                eviction_policy="evict_first" if LAST else "evict_last")  # the first read stays in L2 for the second
    x = x.to(tl.float32)
    if SMOOTH:
        x = tl.where(inside, x - mu[None, :], 0.0)
    return x


@triton.jit
def _quant_int8_sliced(blk, bh, x_ptr, mean_ptr, out_ptr, scale_ptr, S, H, sxb, sxs, sxh, S_pad, n_blk, extra_scale,
                       D: tl.constexpr, BLK: tl.constexpr, SUB: tl.constexpr, SMOOTH: tl.constexpr):
    """_quant_int8's block blk of head bh in slices of SUB rows, read twice (the second time from L2):
    the block's largest magnitude first, then its int8 values. Far fewer registers than a whole block
    (sm_90a: 56–64 against 168–255), so more programs' loads in flight; the same float operations, so
    the same bits."""
    x_ptr += (bh // H) * sxb + (bh % H) * sxh
    cols = tl.arange(0, D)
    mu = tl.load(mean_ptr + bh * D + cols) if SMOOTH else tl.zeros([D], tl.float32)
    amax = 0.0
    for i in range(0, BLK, SUB):
        x = _int8_slice(x_ptr, mu, blk * BLK + i + tl.arange(0, SUB), S, sxs, D, SMOOTH, False)
        amax = tl.maximum(amax, tl.max(tl.abs(x)))
    scale = tl.maximum(amax, 1e-20) / 127.0
    for i in range(0, BLK, SUB):
        rows = blk * BLK + i + tl.arange(0, SUB)
        y = _int8_slice(x_ptr, mu, rows, S, sxs, D, SMOOTH, True) / scale
        y = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)
        tl.store(out_ptr + bh * S_pad * D + rows[:, None] * D + cols[None, :], y)
    tl.store(scale_ptr + bh * n_blk + blk, scale * extra_scale)


@triton.jit
def _quant_qk(q_ptr, k_ptr, k_mean_ptr, q8_ptr, qs_ptr, k8_ptr, ks_ptr, Sq, S, H, sqb, sqs, sqh, skb, sks, skh,
              Sq_pad, S_pad, n_qblk, n_kblk, q_extra,
              D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr):
    """K's int8 blocks (grid axis 2 = 0) and Q's (= 1, left out by a grid of one) in one launch, in slices
    read twice; Q's half as tall, or its two-slice loop unrolls and takes the launch to 128 registers.
    V has its own launch: a program gets the registers of its launch's largest branch."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    if tl.program_id(2) == 1:
        if blk < n_qblk:
            _quant_int8_sliced(blk, bh, q_ptr, q_ptr, q8_ptr, qs_ptr, Sq, H, sqb, sqs, sqh,
                               Sq_pad, n_qblk, q_extra, D, BM, SUB // 2, False)
    elif blk < n_kblk:
        _quant_int8_sliced(blk, bh, k_ptr, k_mean_ptr, k8_ptr, ks_ptr, S, H, skb, sks, skh,
                           S_pad, n_kblk, 1.0, D, BN, SUB, True)


@triton.jit
def _block(acc, l_i, m_i, q, k, v, qk_scale, start_n, S,
           BN: tl.constexpr, MASK: tl.constexpr, FAST_I2F: tl.constexpr):
    qk = tl.dot(q, tl.trans(k))  # int8 × int8 → int32
    if FAST_I2F:  # |qk| ≤ 128·127² < 2²²: adding 1.5·2²³ puts it, exact, in the float's mantissa
        qk = (qk + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        qk = qk.to(tl.float32)
    if MASK:  # the last key block reaches past S
        qk = tl.where((start_n + tl.arange(0, BN))[None, :] < S, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # in log2 units: qk_scale holds log2(e)/√D
    alpha = tl.math.exp2(m_i - m_new)
    # P scaled into e4m3's range for free: 448 = 2^LOG2_FP8_MAX goes into the exponent (l carries it too)
    p = tl.math.exp2(qk * qk_scale - (m_new - 8.807354922057604)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(Q, K, V, QS, KS, VS, VM, O, Sq, S, H, Sq_pad, Sk_pad, n_qblk, n_kblk, sob, sos, soh,
              D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, FAST_I2F: tl.constexpr):
    mblk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = mblk * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + bh * Sq_pad * D + offs_m[:, None] * D + offs_d[None, :])
    q_scale = tl.load(QS + bh * n_qblk + mblk)
    k_ptrs = K + bh * Sk_pad * D + offs_n[:, None] * D + offs_d[None, :]
    v_ptrs = V + bh * D * Sk_pad + offs_n[:, None] + offs_d[None, :] * Sk_pad
    ks_ptr = KS + bh * n_kblk
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    n_full = S // BN
    for j in range(0, n_full):
        k = tl.load(k_ptrs + j * BN * D)
        v = tl.load(v_ptrs + j * BN)
        acc, l_i, m_i = _block(acc, l_i, m_i, q, k, v, q_scale * tl.load(ks_ptr + j), j * BN, S,
                               BN, False, FAST_I2F)
    if n_full * BN < S:
        k = tl.load(k_ptrs + n_full * BN * D)
        v = tl.load(v_ptrs + n_full * BN)
        acc, l_i, m_i = _block(acc, l_i, m_i, q, k, v, q_scale * tl.load(ks_ptr + n_full), n_full * BN, S,
                               BN, True, FAST_I2F)
    v_scale = tl.load(VS + bh * D + offs_d)
    out = acc * (v_scale[None, :] / l_i[:, None]) + tl.load(VM + bh * D + offs_d)[None, :]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=offs_m[:, None] < Sq)


@triton.jit
def _block_tma(acc, l_i, m_i, q, k, v, qk_scale, start_n, S,
               BN: tl.constexpr, MASK: tl.constexpr, FAST_I2F: tl.constexpr, FOLD: tl.constexpr,
               ACC_MMA: tl.constexpr):
    """_block with two options: FOLD keeps the i2f offset 1.5·2²³ in the scores and takes it out of the
    per-row term of exp2's FMA (one float op less per score); ACC_MMA hands acc to the fp8 product."""
    qk = tl.dot(q, tl.trans(k))  # int8 × int8 → int32
    if FAST_I2F:  # exact, as in _block; FOLD leaves the scores offset by 12582912
        qk = (qk + 0x4B400000).to(tl.float32, bitcast=True)
        if not FOLD:
            qk = qk - 12582912.0
    else:
        qk = qk.to(tl.float32)
    if MASK:
        qk = tl.where((start_n + tl.arange(0, BN))[None, :] < S, qk, float("-inf"))
    if FAST_I2F and FOLD:  # the subtract is exact here (integers below 2²⁴), once per row
        m_new = tl.maximum(m_i, (tl.max(qk, 1) - 12582912.0) * qk_scale)
        row = m_new + (12582912.0 * qk_scale - 8.807354922057604)  # rounded once: ~2⁻²⁴ of 2²³·scale
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        row = m_new - 8.807354922057604
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk * qk_scale - row[:, None])  # in [0, 448], as in _block
    l_i = l_i * alpha + tl.sum(p, 1)
    if ACC_MMA:
        acc = tl.dot(p.to(tl.float8e4nv), v, acc * alpha[:, None])
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)
    return acc, l_i, m_new


@triton.jit
def _store_out(acc, l_i, VS, VM, O, b, h, bh, offs_m, Sq, sob, sos, soh, D: tl.constexpr):
    offs_d = tl.arange(0, D)
    out = acc * (tl.load(VS + bh * D + offs_d)[None, :] / l_i[:, None]) + tl.load(VM + bh * D + offs_d)[None, :]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=offs_m[:, None] < Sq)


@triton.jit
def _attn_fwd_tma(q_src, k_desc, v_desc, QS, KS, VS, VM, O, Sq, S, H, Sq_pad, Sk_pad, n_qblk, n_kblk, sob, sos, soh,
                  sqb, sqs, sqh, q_extra, WA, WML, n_whole, n_pieces,
                  D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, FAST_I2F: tl.constexpr,
                  FOLD: tl.constexpr, ACC_MMA: tl.constexpr, Q_IN_KERNEL: tl.constexpr, SPLIT: tl.constexpr):
    """_attn_fwd with the tiles read through tensor descriptors: k as [B·H·S_pad, D], vᵀ as [B·H·D, S_pad];
    q as [B·H·S_pad, D] int8, or (Q_IN_KERNEL) the caller's bf16 [B, S, H, D], quantised here the way
    _quant_int8 does it (one scale per BM rows, q_extra folded in). SPLIT: a 1-D grid of the 2-D grid's
    first n_whole programs, then n_pieces programs for each later query block, each over 1/n_pieces of
    the key blocks, leaving its unnormalised sums in WA (acc) and WML (m, l) for _merge_tail."""
    n_kb = tl.cdiv(S, BN)
    if SPLIT:
        pid = tl.program_id(0)
        piece = pid - n_whole
        unit = tl.where(piece < 0, pid, n_whole + piece // n_pieces)
        mblk = unit % n_qblk
        bh = unit // n_qblk
        part = piece % n_pieces  # only read where piece ≥ 0
        lo = tl.where(piece < 0, 0, part * n_kb // n_pieces)
        hi = tl.where(piece < 0, n_kb, (part + 1) * n_kb // n_pieces)
    else:
        mblk = tl.program_id(0)
        bh = tl.program_id(1)
        lo = 0
        hi = n_kb
    b = bh // H
    h = bh % H
    offs_m = mblk * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    if Q_IN_KERNEL:
        x = tl.load(q_src + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                    mask=offs_m[:, None] < Sq, other=0.0).to(tl.float32)
        s_q = tl.maximum(tl.max(tl.abs(x)), 1e-20) / 127.0
        x = x / s_q
        q = tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)
        q_scale = s_q * q_extra
    else:
        q = q_src.load([bh * Sq_pad + mblk * BM, 0])
        q_scale = tl.load(QS + bh * n_qblk + mblk)
    ks_ptr = KS + bh * n_kblk
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    n_full = S // BN
    for j in range(lo, tl.minimum(hi, n_full)):
        k = k_desc.load([bh * Sk_pad + j * BN, 0])
        v = tl.trans(v_desc.load([bh * D, j * BN]))
        acc, l_i, m_i = _block_tma(acc, l_i, m_i, q, k, v, q_scale * tl.load(ks_ptr + j), j * BN, S,
                                   BN, False, FAST_I2F, FOLD, ACC_MMA)
    if hi > n_full:  # the last key block reaches past S
        k = k_desc.load([bh * Sk_pad + n_full * BN, 0])
        v = tl.trans(v_desc.load([bh * D, n_full * BN]))
        acc, l_i, m_i = _block_tma(acc, l_i, m_i, q, k, v, q_scale * tl.load(ks_ptr + n_full), n_full * BN, S,
                                   BN, True, FAST_I2F, FOLD, ACC_MMA)
    if SPLIT:
        piece = tl.program_id(0) - n_whole  # again: one register less through the loop
        if piece >= 0:
            rows = tl.arange(0, BM)
            tl.store(WA + piece * BM * D + rows[:, None] * D + offs_d[None, :], acc)
            tl.store(WML + piece * 2 * BM + rows, m_i)
            tl.store(WML + piece * 2 * BM + BM + rows, l_i)
        else:
            _store_out(acc, l_i, VS, VM, O, b, h, bh, offs_m, Sq, sob, sos, soh, D)
    else:
        _store_out(acc, l_i, VS, VM, O, b, h, bh, offs_m, Sq, sob, sos, soh, D)


@triton.jit
def _merge_tail(WA, WML, VS, VM, O, Sq, H, n_qblk, n_whole, n_pieces, sob, sos, soh,
                D: tl.constexpr, BM: tl.constexpr):
    """One split query block: its n_pieces partial softmax sums, each relative to its own row maximum
    (P's 448 scale included), rescaled to the largest and added up as one key loop would have."""
    t = tl.program_id(0)
    unit = n_whole + t
    mblk = unit % n_qblk
    bh = unit // n_qblk
    rows = tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    m = tl.full([BM], float("-inf"), tl.float32)
    for p in range(0, n_pieces):
        m = tl.maximum(m, tl.load(WML + (t * n_pieces + p) * 2 * BM + rows))
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for p in range(0, n_pieces):
        piece = t * n_pieces + p
        w = tl.math.exp2(tl.load(WML + piece * 2 * BM + rows) - m)
        l_i += w * tl.load(WML + piece * 2 * BM + BM + rows)
        acc += w[:, None] * tl.load(WA + piece * BM * D + rows[:, None] * D + offs_d[None, :])
    _store_out(acc, l_i, VS, VM, O, bh // H, bh % H, bh, mblk * BM + rows, Sq, sob, sos, soh, D)


STATS_CHUNK = 256  # tokens per _kv_partials program: 128 programs per head at 32,760 tokens
QUANT_SUB = 32  # rows per K slice and per V block: [32, 128] tiles at 4 warps take 48–64 registers


def _kv_stats(k: torch.Tensor, v: torch.Tensor):
    """(K mean, V mean, V scale), each [B, H, D] fp32, from two launches: partial sums, their finish."""
    B, Sk, H, D = k.shape
    n_chunk = triton.cdiv(Sk, STATS_CHUNK)
    part = torch.empty(B * H, 4, n_chunk, D, device=k.device, dtype=torch.float32)
    _kv_partials[(n_chunk, B * H)](k, v, part, Sk, H, k.stride(0), k.stride(1), k.stride(2),
                                   v.stride(0), v.stride(1), v.stride(2), n_chunk, D=D, CHUNK=STATS_CHUNK, BLK=8)
    k_mean, v_mean, v_scale = torch.empty(3, B, H, D, device=k.device, dtype=torch.float32)
    _kv_finish[(B * H, D // 16)](part, k_mean, v_mean, v_scale, Sk, n_chunk, D=D, DC=16, CT=128)
    return k_mean, v_mean, v_scale


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: Config = DEFAULT):
    """[B, S, H, D] inputs → int8 Q/K with block scales (Q's holding log2(e)/√D), e4m3 Vᵀ with channel
    scales and means (V less its mean is what is quantised). With cfg.q_in_kernel (TMA kernel only) Q
    is left to the attention kernel: q8 and its scales come back None."""
    B, S, H, D = q.shape
    Sk = k.shape[1]
    step = math.lcm(cfg.block_m, cfg.block_n)
    pad_q, pad_k = triton.cdiv(S, step) * step, triton.cdiv(Sk, step) * step
    dev = q.device
    nq, nk = pad_q // cfg.block_m, pad_k // cfg.block_n
    k8 = torch.empty(B, H, pad_k, D, device=dev, dtype=torch.int8)
    v8 = torch.empty(B, H, D, pad_k, device=dev, dtype=torch.float8_e4m3fn)
    ks = torch.empty(B, H, nk, device=dev, dtype=torch.float32)
    q8 = qs = None
    if not (cfg.q_in_kernel and _uses_tma(cfg)):
        q8 = torch.empty(B, H, pad_q, D, device=dev, dtype=torch.int8)
        qs = torch.empty(B, H, nq, device=dev, dtype=torch.float32)
    q_extra = LOG2E / math.sqrt(D)
    if cfg.fused_quant:
        k_mean, v_mean, v_scale = _kv_stats(k, v)
        with_q = q8 is not None
        _quant_qk[(max(nq * with_q, nk), B * H, 1 + with_q)](
            q, k, k_mean, k8 if q8 is None else q8, ks if qs is None else qs, k8, ks, S, Sk, H,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), pad_q, pad_k, nq, nk,
            q_extra, D=D, BM=cfg.block_m, BN=cfg.block_n, SUB=QUANT_SUB)
        _quant_v[(pad_k // QUANT_SUB, B * H)](v, v_mean, v_scale, v8, Sk, H, v.stride(0), v.stride(1), v.stride(2),
                                              pad_k, D=D, BLK=QUANT_SUB)
        return q8, qs, k8, ks, v8, v_scale, v_mean
    if q8 is not None:
        _quant_int8[(nq, B * H)](q, q, q8, qs, S, H, q.stride(0), q.stride(1), q.stride(2), pad_q, nq,
                                 q_extra, D=D, BLK=cfg.block_m, SMOOTH=False)
    k_mean = k.mean(dim=1, dtype=torch.float32).contiguous()  # [B, H, D]
    v_mean = v.mean(dim=1, dtype=torch.float32)
    v_min, v_max = torch.aminmax(v, dim=1)
    v_scale = (torch.maximum(v_max - v_mean, v_mean - v_min) / FP8_MAX).clamp_min_(1e-20).contiguous()
    v_mean = v_mean.contiguous()
    _quant_int8[(nk, B * H)](k, k_mean, k8, ks, Sk, H, k.stride(0), k.stride(1), k.stride(2), pad_k, nk,
                             1.0, D=D, BLK=cfg.block_n, SMOOTH=True)
    _quant_v[(nk, B * H)](v, v_mean, v_scale, v8, Sk, H, v.stride(0), v.stride(1), v.stride(2), pad_k,
                          D=D, BLK=cfg.block_n)
    return q8, qs, k8, ks, v8, v_scale, v_mean


def _uses_tma(cfg: Config) -> bool:
    return cfg.tma and tensor_descriptor() is not None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: Config = DEFAULT) -> torch.Tensor:
    """q: [B, Sq, H, D], k/v: [B, Sk, H, D] (the last dim contiguous) → [B, Sq, H, D] in q's dtype."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    B, S, H, D = q.shape
    q8, qs, k8, ks, v8, vs, vm = quantize(q, k, v, cfg)
    out = torch.empty_like(q)
    step = math.lcm(cfg.block_m, cfg.block_n)
    pad_q = triton.cdiv(S, step) * step
    nq = pad_q // cfg.block_m
    sizes = (S, k.shape[1], H, pad_q, k8.shape[2], nq, ks.shape[-1], out.stride(0), out.stride(1), out.stride(2))
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.maxnreg:
        opts["maxnreg"] = cfg.maxnreg
    if not _uses_tma(cfg):
        _attn_fwd[(nq, B * H)](q8, k8, v8, qs, ks, vs, vm, out, *sizes,
                               D=D, BM=cfg.block_m, BN=cfg.block_n, FAST_I2F=cfg.fast_i2f, **opts)
        return out
    units = nq * B * H
    n_whole, n_pieces = units, 1
    if cfg.tail_split > 1:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        n_kb = triton.cdiv(k.shape[1], cfg.block_n)
        n_whole, n_pieces = _tail_plan(units, sms * cfg.ctas_per_sm, cfg.tail_split, n_kb)
    n_split = units - n_whole
    wa = wml = vs  # unread without a split
    if n_split:
        wa = torch.empty(n_split * n_pieces, cfg.block_m, D, device=q.device, dtype=torch.float32)
        wml = torch.empty(n_split * n_pieces, 2, cfg.block_m, device=q.device, dtype=torch.float32)
    TensorDescriptor = tensor_descriptor()
    q_src = q if q8 is None else TensorDescriptor.from_tensor(q8.view(-1, D), [cfg.block_m, D])
    grid = (n_whole + n_split * n_pieces,) if n_split else (nq, B * H)
    _attn_fwd_tma[grid](
        q_src, TensorDescriptor.from_tensor(k8.view(-1, D), [cfg.block_n, D]),
        TensorDescriptor.from_tensor(v8.view(-1, v8.shape[-1]), [D, cfg.block_n]),
        ks if qs is None else qs, ks, vs, vm, out, *sizes, q.stride(0), q.stride(1), q.stride(2),
        LOG2E / math.sqrt(D), wa, wml, n_whole, n_pieces, D=D, BM=cfg.block_m, BN=cfg.block_n,
        FAST_I2F=cfg.fast_i2f, FOLD=cfg.fold_bias, ACC_MMA=cfg.acc_in_mma, Q_IN_KERNEL=q8 is None,
        SPLIT=n_split > 0, **opts)
    if n_split:
        _merge_tail[(n_split,)](wa, wml, vs, vm, out, S, H, nq, n_whole, n_pieces, *sizes[-3:], D=D, BM=cfg.block_m)
    return out


def _tail_plan(units: int, wave: int, most: int, n_kb: int) -> tuple[int, int]:
    """(query blocks run whole, key ranges for each later one): the last, partial wave's r blocks cut
    into p ranges take ceil(r·p / wave) / p of a wave instead of one; worth it from a tenth saved (the
    pieces' sums go through memory and a merge launch)."""
    r = units % wave
    best, pieces = 0.9, 1
    for p in range(2, min(most, n_kb) + 1):
        if math.ceil(r * p / wave) / p < best:
            best, pieces = math.ceil(r * p / wave) / p, p
    return (units - r, pieces) if r and pieces > 1 else (units, 1)
