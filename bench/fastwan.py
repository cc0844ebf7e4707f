"""FastWan on one GPU (issue 16): the VSA kernel against dense cuDNN attention at 480p, then FastWan2.1-1.3B's
3-step generation end to end through the public API.

- kernel: q, k, v and the gate [1, 32,760, 12, 128] bf16 on the 480×832×81 token grid (21, 30, 52),
  VIDEO_SPARSE_ATTN at FastWan's sparsity 0.8 (and 0.9), via FlexAttention and via our Triton kernel,
  against torch SDPA pinned to cuDNN: warm ms (CUDA events), the first call's seconds, the speed-up,
  the largest difference between the two VSA outputs, the Triton op in token order against tile order
  (`vsa_tiled`, `vsa_tiled_split` rows), the split of the Triton call (tiles, compressed branch, top-k,
  tables, kernel, epilogue) and every kernel config (`vsa_split`, `vsa_config` rows).
- tiled: only the cuDNN row and the `vsa_tiled` rows. dit: a random 1.3B FastWan DiT's 480p forward
  (eager) with its blocks in tile order against token order (`dit_forward` row).
- fastvideo: FastVideo's own VSA (the `fastvideo-kernel` wheel) against ours on the same inputs.
- variants: the whole op in tile order per set-up (`video_sparse_select.SETUPS`) and per kernel
  config, then the best pair (`variant*` rows, then a table).
- e2e: a random full-size FastWan folder (bench/e2e.py's 1.3B folder plus the per-block
  `attn1.to_gate_compress` weights FastWan adds), `VideoGenerator.from_pretrained(folder)`, `load()`,
  then `generate_video(prompt)` with the defaults the loader picks for FastWan (VSA 0.8, dmd
  1000/757/522, CFG 1): first call and second call, encode / denoise / decode.

    python3 bench/fastwan.py --out $OUT [--compile] [--parts kernel,e2e]
    python3 bench/fastwan.py --out $OUT --parts tiled,dit   # token order against tile order, op and 1.3B DiT (short)
    python3 bench/fastwan.py --out $OUT --parts variants [--budget-s 90]   # issue 16's set-up × kernel pick (~80 s)
    python3 bench/fastwan.py --out $OUT --parts fastvideo   # fastvideo-kernel installed
    python3 bench/fastwan.py --device cpu --size tiny --height 64 --width 64 --frames 9 --parts e2e   # smoke test

Random weights: speed does not depend on the values (see bench/e2e.py).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import e2e  # noqa: E402
from diffusers_baseline import event_time  # noqa: E402  (build_folder, timing helpers; its DEVICE is set in main)
from e2e import PROMPT, RESULTS, CardPeak, build_folder, cuda_gib, log, release, sync  # noqa: E402


def cuda_ms(fn, n: int = 10) -> float:
    """Warm milliseconds per call (CUDA events) after one untimed call: a config's first call
    compiles it, which the 0.8 rows of the session-5 config sweep still timed."""
    return event_time(fn, warm=1, iters=n) * 1000


GRID, HEADS, DIM = (21, 30, 52), 12, 128


def dense_inputs():
    """q, k, v, gate [1, 32,760, 12, 128] bf16, then cuDNN dense on them: (q, k, v, gate, ms, TFLOP/s)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    tokens = GRID[0] * GRID[1] * GRID[2]
    q, k, v, gate = (torch.randn(1, tokens, HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        F.scaled_dot_product_attention(qt, kt, vt)
        dense = cuda_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt))
    dense_tflops = 4 * tokens * tokens * HEADS * DIM / dense / 1e9
    log(kind="kernel", backend="TORCH_SDPA (cuDNN)", tokens=tokens, heads=HEADS, ms=round(dense, 3),
        tflops=round(dense_tflops))
    return q, k, v, gate, dense, dense_tflops


def tiled_vs_token(q, k, v, gate, sparsity: float, dense: float) -> None:
    """The whole Triton op on the same inputs in token order (gather + scatter per call, as before) and
    in tile order (what the DiT now hands it: no gather, output in place; the permutation is the DiT's,
    once a forward, so it is not timed here), side by side, with the largest difference between the two
    outputs (both in token order) and the split of the tiled call."""
    from fastvideo_nodes.attention import video_sparse as vs
    from fastvideo_nodes.attention import video_sparse_kernel as K
    from fastvideo_nodes.attention import video_sparse_select as sel
    lay = vs.layout(GRID, str(q.device))
    opts = vs.VideoSparseOptions(sparsity=sparsity)
    tiled_in = [x[:, lay.order].contiguous() for x in (q, k, v, gate)]
    token_op = lambda: vs.attend(q, k, v, grid=GRID, gate=gate, options=opts, impl="triton")
    tiled_op = lambda: vs.attend(*tiled_in[:3], grid=GRID, gate=tiled_in[3], options=opts, impl="triton", tiled=True)
    old, new = token_op(), tiled_op()[:, lay.inverse]
    old_ms, new_ms = cuda_ms(token_op, 20), cuda_ms(tiled_op, 20)
    log(kind="vsa_tiled", sparsity=sparsity, token_order_ms=round(old_ms, 3), tile_order_ms=round(new_ms, 3),
        token_speedup_vs_dense=round(dense / old_ms, 2), tiled_speedup_vs_dense=round(dense / new_ms, 2),
        target_ms_3x=round(dense / 3, 3),
        max_abs_diff_tiled_vs_token=round((old.float() - new.float()).abs().max().item(), 5))
    qt, kt, vt, comp, index, ends = vs.prepare_tiled(*tiled_in[:3], lay, sparsity)
    out = torch.empty_like(q)
    steps = {"means3_ms": lambda: sel.means3(*tiled_in[:3], lay.tiled_token, lay.counts),
             "gather3_ms": lambda: sel.gather3(q, k, v, lay.token, lay.counts),
             "prepare_tiled_ms": lambda: vs.prepare_tiled(*tiled_in[:3], lay, sparsity),
             "prepare_ms": lambda: vs.prepare(q, k, v, lay, sparsity),
             "kernel_tiled_ms": lambda: K.attention(qt, kt, vt, index, ends, lay.counts, lay.tiled_token, out,
                                                    comp=comp, gate=tiled_in[3], query_groups=lay.query_groups,
                                                    starts=lay.starts)}
    log(kind="vsa_tiled_split", sparsity=sparsity, **{name: round(cuda_ms(fn), 3) for name, fn in steps.items()})


def tiled() -> None:
    """Short: cuDNN dense, then the Triton op in token order against tile order at 0.8 and 0.9."""
    q, k, v, gate, dense, _ = dense_inputs()
    for sparsity in (0.8, 0.9):
        tiled_vs_token(q, k, v, gate, sparsity, dense)


def fastvideo(sparsity: float = 0.8) -> None:
    """FastVideo's own VSA (`fastvideo_kernel.video_sparse_attn`, the PyPI package's wheel) on the same
    inputs as ours at 480p: its default path (the sm_90 ThunderKittens kernel when its extension loads,
    else its Triton kernel) and its Triton path, each as its whole call on its own layout ([B, H, S, D],
    every tile padded to 64); ours as the DiT calls it (tile order). Same outputs to bf16 tolerance."""
    from fastvideo_nodes.attention import video_sparse as vs
    try:
        import fastvideo_kernel as fvk
        from fastvideo_kernel.block_sparse_attn import _get_sm90_ops
    except Exception as e:  # not installed, or built for another torch
        log(kind="fastvideo_vsa", unavailable=repr(e)[:400])
        return
    q, k, v, gate, dense, _ = dense_inputs()
    lay = vs.layout(GRID, str(q.device))
    n = lay.num_tiles

    def padded(x):  # token order [1, S, H, D] → [1, H, N·64, D], zeros in the padding
        out = x.new_zeros(1, n * vs.TILE_TOKENS, HEADS, DIM)
        out[:, lay.slot] = x
        return out.transpose(1, 2).contiguous()

    pq, pk, pv, pg = (padded(x) for x in (q, k, v, gate))
    sizes = lay.counts.to(torch.int32)
    topk = vs.kept_tiles(sparsity, n)
    theirs = lambda: fvk.video_sparse_attn(pq, pk, pv, sizes, sizes, topk, vs.TILE, pg)
    tq, tk, tv, tg = (x[:, lay.order].contiguous() for x in (q, k, v, gate))
    opts = vs.VideoSparseOptions(sparsity=sparsity)
    ours = lambda: vs.attend(tq, tk, tv, grid=GRID, gate=tg, options=opts, impl="triton", tiled=True)
    ref = ours()[:, lay.inverse].float()
    row = dict(kind="fastvideo_vsa", version=fvk.__version__, sparsity=sparsity, dense_ms=round(dense, 3),
               sm90_extension=_get_sm90_ops()[0] is not None, ours_ms=round(cuda_ms(ours, 20), 3))
    for name, force_triton in (("default", "0"), ("triton", "1")):
        os.environ["FASTVIDEO_VSA_TRITON"] = force_triton
        try:
            t0 = time.perf_counter()
            out = theirs()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            diff = (out.transpose(1, 2)[:, lay.slot].float() - ref).abs()
            row |= {f"{name}_ms": round(cuda_ms(theirs, 20), 3), f"{name}_first_s": round(first, 2),
                    f"{name}_max_abs_diff": round(diff.max().item(), 5),
                    f"{name}_mean_abs_diff": round(diff.mean().item(), 6)}
        except Exception as e:
            row[f"{name}_error"] = repr(e)[:400]
    os.environ.pop("FASTVIDEO_VSA_TRITON", None)
    row["ref_mean_abs"] = round(ref.abs().mean().item(), 5)
    log(**row)


# The kernel configs `variants` times by default: the TMA ones near the default, and the new ones.
VARIANT_CONFIGS = ("w4s1_tma_r128", "w4s1_tma_r128_wholeq", "w4s2_tma", "w4s1_tma", "w4s1_tma_lazy_r128", "w4s3_tma")


def variants(budget_s: float, setups: list[str] | None = None, configs: list[str] | None = None,
             sparsity: float = 0.8) -> None:
    """Issue 16's pick: the whole op in tile order (set-up + kernel, `video_sparse.triton_call`, what the
    op runs) at 480p, per set-up of `video_sparse_select.SETUPS` under the default kernel config and per
    kernel config (`VARIANT_CONFIGS` or `configs`) under the default set-up, then the best of each
    together. Order: the first six set-ups, the configs, the other set-ups, then the set-up's steps
    one by one, so that a spent budget skips the least promising (a skipped row says so). Each row:
    warm ms of the whole op and of its part alone (the kernel, or `prepare_tiled` with all heads at
    once, also for the head_chunks set-ups), the first call's seconds (compiles), the largest
    difference from the defaults' output, and for set-ups the share of index-table rows unlike the
    default's (a near-tie at the k-th score: the fused compressed branch sums in another order).
    Adopting a winner is one line: `DEFAULT_SETUP` or `DEFAULT` in its module."""
    from fastvideo_nodes.attention import video_sparse as vs
    from fastvideo_nodes.attention import video_sparse_kernel as K
    from fastvideo_nodes.attention import video_sparse_select as sel
    t0 = time.time()
    q, k, v, gate, dense, _ = dense_inputs()
    lay = vs.layout(GRID, str(q.device))
    tq, tk, tv, tg = (x[:, lay.order].contiguous() for x in (q, k, v, gate))
    whole = lambda setup=None, cfg=None: vs.triton_call(tq, tk, tv, tg, lay, sparsity, True, setup, cfg)
    base_out = whole()
    base = vs.prepare_tiled(tq, tk, tv, lay, sparsity)
    op = lambda: vs.attend(tq, tk, tv, grid=GRID, gate=tg, options=vs.VideoSparseOptions(sparsity), impl="triton",
                           tiled=True)
    log(kind="variant_op", sparsity=sparsity, op_ms=round(cuda_ms(op, 20), 3),
        whole_default_ms=round(cuda_ms(whole, 20), 3), target_ms_3x=round(dense / 3, 3))
    found: dict[str, dict[str, float]] = {"setup": {}, "config": {}}

    def row(part: str, name: str, setup, cfg, alone, **extra) -> None:
        info = dict(kind="variant", part=part, name=name, sparsity=sparsity,
                    default=(setup or cfg) in (sel.DEFAULT_SETUP, K.DEFAULT))
        if time.time() - t0 > budget_s:
            log(**info, skipped=f"budget of {budget_s:.0f} s spent")
            return
        try:
            sync()
            start = time.perf_counter()
            out = whole(setup, cfg)
            sync()
            first_s = time.perf_counter() - start
            ms = cuda_ms(lambda: whole(setup, cfg), 20)
            alone_ms = cuda_ms(alone, 20)
        except Exception as e:  # a variant this GPU or Triton cannot build: the row says why
            log(**info, error=f"{e!r:.300}")
            return
        found[part][name] = ms
        log(**info, whole_ms=round(ms, 3), alone_ms=round(alone_ms, 3), first_s=round(first_s, 2),
            speedup_vs_dense=round(dense / ms, 2),
            max_abs_diff=round((out.float() - base_out.float()).abs().max().item(), 5), **extra)

    def setup_row(name: str) -> None:
        st = sel.SETUPS[name]
        try:
            got = vs.prepare_tiled(tq, tk, tv, lay, sparsity, st)
            extra = dict(index_rows_unlike_default=(got[4] != base[4]).any(-1).float().mean().item(),
                         comp_max_abs_diff=(got[3] - base[3]).abs().max().item())
        except Exception as e:
            log(kind="variant", part="setup", name=name, error=f"{e!r:.300}")
            return
        row("setup", name, st, None, lambda: vs.prepare_tiled(tq, tk, tv, lay, sparsity, st), **extra)

    out = torch.empty_like(tq)

    def config_row(name: str) -> None:
        cfg = K.CONFIGS[name]
        row("config", name, None, cfg, lambda: K.attention(
            *base[:3], base[4], base[5], lay.counts, lay.tiled_token, out, comp=base[3], gate=tg, cfg=cfg,
            query_groups=lay.query_groups, starts=lay.starts))

    # The first set-ups (the likelier winners), every config, then the other set-ups: a spent budget
    # skips the least promising.
    names = setups or list(sel.SETUPS)
    for name in names[:6]:
        setup_row(name)
    for name in configs or VARIANT_CONFIGS:
        config_row(name)
    for name in names[6:]:
        setup_row(name)
    if time.time() - t0 < budget_s:  # the set-up's steps one by one
        means = sel.means3(tq, tk, tv, lay.tiled_token, lay.counts)
        scores, _ = vs.compressed_from_means(*means)
        kept = vs.kept_tiles(sparsity, lay.num_tiles)
        steps = {"means3": lambda: sel.means3(tq, tk, tv, lay.tiled_token, lay.counts),
                 "means3_rows": lambda: sel.means3_rows(tq, tk, tv, lay.starts, lay.counts),
                 "compressed_torch": lambda: vs.compressed_from_means(*means),
                 **{f"compressed_{p}_m{r}": lambda p=p, r=r: sel.compressed(*means, precision=p, rows=r)
                    for p, r in (("tf32x3", 16), ("tf32x3", 32), ("tf32x3", 64), ("ieee", 32))},
                 **{f"select_w{w}_b{b}": lambda w=w, b=b: sel.select(scores, lay.counts, kept, starts=lay.starts,
                                                                     warps=w, bits=b)
                    for w, b in ((4, 1), (2, 1), (1, 1), (4, 2), (1, 2))},
                 **{f"select_one_chunk_w{w}": lambda w=w: sel.select(scores, lay.counts, kept, starts=lay.starts,
                                                                     warps=w, split=False) for w in (4, 2)}}
        log(kind="variant_steps", sparsity=sparsity,
            **{f"{name}_ms": round(cuda_ms(fn, 20), 4) for name, fn in steps.items()})
    if found["setup"] and found["config"]:
        best_setup = min(found["setup"], key=found["setup"].get)
        best_cfg = min(found["config"], key=found["config"].get)
        st, cfg = sel.SETUPS[best_setup], K.CONFIGS[best_cfg]
        ms = cuda_ms(lambda: whole(st, cfg), 20)
        log(kind="variant_best", setup=best_setup, config=best_cfg, whole_ms=round(ms, 3),
            speedup_vs_dense=round(dense / ms, 2), target_ms_3x=round(dense / 3, 3), meets_3x=ms <= dense / 3)
    print("\nwhole op, tile order, 480p, sparsity", sparsity, f"(cuDNN dense {dense:.3f} ms, 3x = {dense / 3:.3f} ms)")
    for part, times in found.items():
        for name, ms in sorted(times.items(), key=lambda kv: kv[1]):
            print(f"  {part:6} {name:22} {ms:7.3f} ms  {dense / ms:5.2f}x")


def dit_forward(cfg=None, device: str = "cuda", grid: tuple[int, int, int] = GRID) -> None:
    """A random full-size FastWan 1.3B DiT (gate projections, bf16, eager), one 480p forward under VSA 0.8
    with its blocks in tile order and in token order (the attention gathering per call): ms each and
    the largest difference of the two velocities. cfg, device, grid: other sizes (a CPU smoke test)."""
    from fastvideo_nodes.models import wan_dit
    from fastvideo_nodes.models.wan_dit import WanDiT, WanDiTConfig, keep_fp32
    torch.manual_seed(0)
    with torch.device(device):
        model = WanDiT(cfg or WanDiTConfig(gate_compress=True))
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keep_fp32(name) or device == "cpu" else torch.bfloat16)
        if "modulation" in name:
            p.data.normal_(0, 0.02)
    model.eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, model.cfg.in_channels, grid[0], 2 * grid[1], 2 * grid[2], device=device, generator=g)
    t = torch.tensor([757.0], device=device)
    ctx = torch.randn(1, 512, model.cfg.text_dim, device=device, generator=g).to(model.dtype)
    run = lambda: model(x, t, ctx, attention_backend="VIDEO_SPARSE_ATTN")
    real = wan_dit.token_order
    with torch.inference_mode():
        tiled_out = run()
        tiled_ms = cuda_ms(run, 3)
        wan_dit.token_order = lambda backend, grid, device: None
        try:
            token_out = run()
            token_ms = cuda_ms(run, 3)
        finally:
            wan_dit.token_order = real
    log(kind="dit_forward", size=model.cfg.size_name, grid=list(grid), token_order_ms=round(token_ms, 1),
        tile_order_ms=round(tiled_ms, 1), max_abs_diff=round((tiled_out - token_out).abs().max().item(), 5),
        scale=round(token_out.abs().max().item(), 3))
    model.to("meta")  # its 2.6 GB back before the next part
    release()


def kernel() -> None:
    """cuDNN dense, then per sparsity VSA via FlexAttention and via the Triton kernel (same inputs: the
    outputs are compared), token order against tile order, the split of the Triton call and every kernel
    config."""
    import torch.nn.functional as F

    from fastvideo_nodes.attention import video_sparse as vs
    grid, heads = GRID, HEADS
    q, k, v, gate, dense, dense_tflops = dense_inputs()
    tokens = q.shape[1]
    lay = vs.layout(grid, "cuda")
    for sparsity in (0.8, 0.9):
        opts = vs.VideoSparseOptions(sparsity=sparsity)
        outs = {}
        for impl in ("flex", "triton"):
            run = lambda: vs.attend(q, k, v, grid=grid, gate=gate, options=opts, impl=impl)
            sync()
            t0 = time.perf_counter()
            outs[impl] = run()
            sync()
            first = time.perf_counter() - t0
            ms = cuda_ms(run)
            log(kind="kernel", backend="VIDEO_SPARSE_ATTN", impl=impl, sparsity=sparsity, tokens=tokens,
                heads=heads, ms=round(ms, 3), first_s=round(first, 2), speedup_vs_dense=round(dense / ms, 2))
        a, b = outs["triton"].float(), outs["flex"].float()
        # A near-tie at the top-k boundary (the two paths sum tile means in other orders) can pick another
        # tile for a row: then the largest difference is large but confined to that tile's tokens.
        log(kind="kernel_check", sparsity=sparsity, max_abs_diff_flex_vs_triton=round((a - b).abs().max().item(), 5),
            cosine=round(F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item(), 6),
            share_off_3e_2=(a - b).abs().gt(3e-2).float().mean().item())
        tiled_vs_token(q, k, v, gate, sparsity, dense)
        kernel_split(q, k, v, gate, lay, sparsity, dense_tflops)


def kernel_split(q, k, v, gate, lay, sparsity: float, dense_tflops: float) -> None:
    """Where the Triton call's time goes: the steps before the kernel (and, for comparison, the Flex
    path's torch gather of the three inputs, which its tile means then read again), then per config
    the kernel with the fused epilogue (the real call) and without it (plain padded output; the
    difference is the epilogue), with TFLOP/s over the work the kernel does (its query rows × key
    pieces) and over the real tokens."""
    from fastvideo_nodes.attention import video_sparse as vs
    from fastvideo_nodes.attention import video_sparse_kernel as K
    from fastvideo_nodes.attention import video_sparse_select as sel
    gathered = [K.gather(x, lay.token, lay.counts) for x in (q, k, v)]
    means = [m for _, m in gathered]
    scores, _ = vs.compressed_from_means(*means)
    chosen = vs.top_tiles(scores, sparsity)
    kept = vs.kept_tiles(sparsity, lay.num_tiles)
    # select: prepare's one kernel for topk + tables (default rows a program, then 1, 2, 4 rows to compare)
    selects = {f"select{f'_r{r}' if r else ''}_ms": lambda r=r: sel.select(scores, lay.counts, kept, rows=r)
               for r in (None, 1, 2, 4)}
    same = all(map(torch.equal, sel.select(scores, lay.counts, kept), K.tables(chosen, lay.counts)))
    steps = {"gather_ms": lambda: [K.gather(x, lay.token, lay.counts) for x in (q, k, v)],
             "gather3_ms": lambda: sel.gather3(q, k, v, lay.token, lay.counts),
             "compressed_ms": lambda: vs.compressed_from_means(*means),
             "topk_ms": lambda: vs.top_tiles(scores, sparsity),
             "tables_ms": lambda: K.tables(chosen, lay.counts),
             **selects,
             "prepare_ms": lambda: vs.prepare(q, k, v, lay, sparsity),
             "flex_to_tiles_ms": lambda: [vs._to_tiles(x, lay.slot, lay) for x in (q, k, v)]}
    log(kind="vsa_split", sparsity=sparsity, select_equals_tables=same,  # False only on a tie at the k-th score
        **{name: round(cuda_ms(fn), 3) for name, fn in steps.items()})
    qt, kt, vt, comp, index, ends = vs.prepare(q, k, v, lay, sparsity)
    counts = lay.counts[index.long()]
    piece = torch.where(counts == 64, 64, torch.where(counts <= 16, 16, torch.where(counts <= 32, 32, 64)))
    dim = q.shape[-1]
    keys = piece.sum(-1)  # [B, H, N] key slots each query tile's program reads

    def work(q_rows: tuple[int, ...]) -> float:  # the kernel's MMA work: its query rows × key pieces
        rows = torch.full_like(lay.counts, 64)
        for r in sorted(q_rows, reverse=True):
            rows = torch.where(lay.counts <= r, r, rows)
        return 4 * dim * (rows[None, None, :] * keys).sum().item()

    real = 4 * dim * (lay.counts[None, None, :] * counts.sum(-1)).sum().item()  # real query × real key tokens
    out, plain_out = torch.empty_like(q), torch.empty_like(qt)
    ident = torch.arange(qt.shape[1], dtype=torch.int32, device=q.device)
    for name, cfg in [*K.CONFIGS.items(), ("autotune", None)]:
        try:
            fused = cuda_ms(lambda: K.attention(qt, kt, vt, index, ends, lay.counts, lay.token, out, comp=comp,
                                                gate=gate, cfg=cfg, query_groups=lay.query_groups))
            plain = cuda_ms(lambda: K.attention(qt, kt, vt, index, ends, lay.counts, ident, plain_out, cfg=cfg,
                                                query_groups=lay.query_groups))
        except Exception as e:  # a config this GPU or Triton cannot build: the row says why
            log(kind="vsa_config", sparsity=sparsity, config=name, error=f"{e!r:.300}")
            continue
        done = work((cfg or K.DEFAULT).q_rows)
        log(kind="vsa_config", sparsity=sparsity, config=name, fused_ms=round(fused, 3), plain_ms=round(plain, 3),
            epilogue_ms=round(fused - plain, 3), tflops_work=round(done / plain / 1e9),
            tflops_real=round(real / plain / 1e9), efficiency_vs_cudnn=round(done / plain / 1e9 / dense_tflops, 3),
            default=cfg == K.DEFAULT)


def fastwan_folder(root: str, size: str) -> str:
    """bench/e2e.py's random folder of this size, plus random gate projections in every block."""
    from safetensors.torch import load_file, save_file
    base = build_folder(root, size)
    folder = os.path.join(root, f"FastWan2.1-T2V-{size}-random")
    if os.path.exists(os.path.join(folder, "model_index.json")):
        return folder
    os.makedirs(os.path.join(folder, "transformer"), exist_ok=True)
    for part in ("text_encoder", "tokenizer", "vae", "scheduler", "model_index.json"):
        os.symlink(os.path.realpath(os.path.join(base, part)), os.path.join(folder, part))
    src = os.path.join(base, "transformer")
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            os.symlink(os.path.join(src, name), os.path.join(folder, "transformer", name))
    shards = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    config = json.load(open(os.path.join(src, "config.json")))
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    g = torch.Generator().manual_seed(3)
    for i, name in enumerate(shards):
        sd = load_file(os.path.join(src, name))
        if i == len(shards) - 1:  # the gates go in the last shard, so an index file must name them
            for n in range(config["num_layers"]):
                sd[f"blocks.{n}.attn1.to_gate_compress.weight"] = (torch.randn(dim, dim, generator=g) * 0.02).bfloat16()
                sd[f"blocks.{n}.attn1.to_gate_compress.bias"] = torch.zeros(dim, dtype=torch.bfloat16)
        save_file(sd, os.path.join(folder, "transformer", name))
    index = os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors.index.json")
    if os.path.islink(index):
        data = json.load(open(index))
        os.remove(index)
        for n in range(config["num_layers"]):
            for p in ("weight", "bias"):
                data["weight_map"][f"blocks.{n}.attn1.to_gate_compress.{p}"] = shards[-1]
        json.dump(data, open(index, "w"))
    return folder


def run(folder: str, args) -> None:
    from fastvideo_nodes import VideoGenerator
    sync()
    t0 = time.perf_counter()
    gen = VideoGenerator.from_pretrained(folder, compile=args.compile, device=e2e.DEVICE,
                                         dtype="bf16" if e2e.DEVICE == "cuda" else "fp32")
    gen.load()
    sync()
    log(kind="load", impl="ours", size=args.size, s=round(time.perf_counter() - t0, 2))
    for call in ("first", "second"):
        with CardPeak() as card:
            sync()
            t0 = time.perf_counter()
            r = gen.generate_video(PROMPT, height=args.height, width=args.width, num_frames=args.frames, seed=0)
            sync()
            total = time.perf_counter() - t0
        t = r.timings
        log(kind="call", impl="ours (FastWan defaults)", size=args.size, call=call, total_s=round(total, 2),
            encode_s=round(t.get("encode_s", 0), 3), denoise_s=round(t.get("sample_s", 0), 2),
            decode_s=round(t.get("decode_s", 0), 2),
            forwards=r.stats.cond_forwards + r.stats.uncond_forwards if r.stats else None,
            card_peak_gib=round(card.peak, 2), attention=r.attention, compile=args.compile)
        release()
    gen.close()
    del gen, r
    release()
    log(kind="after_drop", allocated_gib=cuda_gib("memory_allocated"), held=e2e.still_held())


def main():
    ap = e2e.common_args()
    ap.add_argument("--parts", default="kernel,e2e")
    ap.add_argument("--budget-s", type=float, default=90, help="variants: skip the rest after this long")
    ap.add_argument("--setups", help="variants: comma-separated SETUPS names (default all)")
    ap.add_argument("--configs", help="variants: comma-separated kernel CONFIGS names (default VARIANT_CONFIGS)")
    args = ap.parse_args()
    e2e.DEVICE = args.device
    os.makedirs(args.out, exist_ok=True)
    parts = args.parts.split(",")
    if "kernel" in parts:
        kernel()
    if "tiled" in parts:
        tiled()
    if "fastvideo" in parts:
        fastvideo()
    if "variants" in parts:
        variants(args.budget_s, args.setups and args.setups.split(","), args.configs and args.configs.split(","))
    if "dit" in parts:
        dit_forward()
    if "e2e" in parts:
        run(fastwan_folder(args.models, args.size), args)
    with open(os.path.join(args.out, f"fastwan_{args.size}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
