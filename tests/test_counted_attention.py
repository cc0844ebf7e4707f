"""Wan's text padding folded into one counted key (attention/counted.py, models/wan_dit.fold_text_padding):
the same attention as over all 512 padded keys, at the DiT, the pipeline and the kernel."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import run_interpreted, sm90_build

from fastvideo_nodes.attention import counted
from fastvideo_nodes.models import wan_dit
from fastvideo_nodes.models.wan_dit import fold_text_padding, trim_text_padding


def test_fold_picks_the_bucket_and_counts_the_padding():
    ctx = torch.randn(2, 20, 8)
    folded, log_count = fold_text_padding(ctx, 512)
    assert folded.shape == (2, 128, 8) and log_count.shape == (2, 128)
    assert torch.equal(folded[:, :20], ctx) and not folded[:, 20:].any()  # row 20 stands for the padding
    assert (log_count[:, :20] == 0).all() and torch.allclose(log_count[:, 20], torch.tensor(math.log(492.0)))
    assert torch.isneginf(log_count[:, 21:]).all()
    assert fold_text_padding(torch.randn(1, 127, 8), 512)[0].shape[1] == 128  # 127 rows + the padding key
    # beyond the largest bucket, or a model whose text_len the buckets do not undercut: padded as Wan does
    for rows, text_len in ((128, 512), (300, 512), (20, 128), (512, 512)):
        padded, none = fold_text_padding(torch.randn(1, rows, 8), text_len)
        assert none is None and padded.shape[1] == text_len


def test_trim_keeps_every_row_up_to_the_last_nonzero_one():
    ctx = torch.zeros(2, 512, 4)
    ctx[0, :7] = 1.0
    ctx[1, 3] = 2.0
    ctx[0, 2] = 0.0  # an all-zero row inside the prompt stays
    assert trim_text_padding(ctx).shape == (2, 7, 4)
    assert trim_text_padding(torch.zeros(1, 512, 4)).shape == (1, 1, 4)


@pytest.mark.parametrize("lengths", [(20,), (5, 90), (0,), (127,), (100, 3)])
def test_counted_attention_equals_attention_over_every_padded_key(lengths):
    """Per sample its own prompt length, zero rows past it: folded keys with counts = all 512 keys."""
    g = torch.Generator().manual_seed(len(lengths))
    b, sq, h, d, text_len = len(lengths), 33, 3, 16, 512
    ctx = torch.zeros(b, text_len, 24)
    for i, n in enumerate(lengths):
        ctx[i, :n] = torch.randn(n, 24, generator=g)
    embed = torch.nn.Sequential(torch.nn.Linear(24, h * d), torch.nn.GELU(), torch.nn.Linear(h * d, 2 * h * d))
    q = torch.randn(b, sq, h, d, generator=g)

    def keys(c):
        k, v = embed(c).unflatten(-1, (2, h, d)).unbind(2)
        return k * 3, v  # sharper scores than unit noise: the padding's weight then varies with q

    k, v = keys(ctx)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    folded, log_count = fold_text_padding(trim_text_padding(ctx), text_len)
    assert log_count is not None
    got = counted.attend(q, *keys(folded), log_count)
    assert (got - want).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def models():
    from dataclasses import replace

    from fastvideo_nodes.testing.dit import TINY_DIT, random_dit
    i2v = replace(TINY_DIT, image_dim=48, in_channels=36)
    return {"t2v": random_dit(seed=3), "i2v": random_dit(i2v, seed=4)}


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_dit_with_folded_padding_equals_the_padded_context(kind, models, monkeypatch):
    model = models[kind]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 12, generator=g)
    t = torch.tensor([700.0])
    ctx = torch.randn(1, 30, model.cfg.text_dim, generator=g)
    extra = {}
    if kind == "i2v":
        extra = {"condition": torch.randn(1, 20, 3, 8, 12, generator=g),
                 "image_embeds": torch.randn(1, 257, 48, generator=g)}
    with torch.no_grad():
        folded = model(x, t, ctx, **extra)
        monkeypatch.setattr(wan_dit, "TEXT_KEY_BUCKETS", ())
        padded = model(x, t, ctx, **extra)
    assert (folded - padded).abs().max().item() < 1e-5 * padded.abs().max().item()


def test_compiled_blocks_take_the_folded_context(models):
    model = models["t2v"]
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 16, 3, 8, 12, generator=g), torch.tensor([500.0])
    ctx = torch.randn(1, 40, model.cfg.text_dim, generator=g)
    with torch.inference_mode():
        want = model(x, t, ctx)
        got = copy.deepcopy(model).compile_blocks()(x, t, ctx)
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item() + 1e-6


def test_sampler_trims_the_padding_once(monkeypatch):
    """denoise hands the DiT the prompt without its zero rows: the same latents as with all 512 rows
    unfolded, and the DiT sees the trimmed length."""
    from fastvideo_nodes.pipeline.sampler import SamplingSettings, denoise, initial_noise
    from fastvideo_nodes.testing.dit import random_dit
    dit = random_dit(seed=5)
    settings = SamplingSettings(height=64, width=96, num_frames=5, steps=2, guidance_scale=4.0, seed=1)
    g = torch.Generator().manual_seed(2)
    pos, neg = torch.zeros(1, 512, dit.cfg.text_dim), torch.zeros(1, 512, dit.cfg.text_dim)
    pos[:, :11] = torch.randn(11, dit.cfg.text_dim, generator=g)
    neg[:, :6] = torch.randn(6, dit.cfg.text_dim, generator=g)
    seen = []
    forward = dit.forward

    def spy(x, t, context, **kw):
        seen.append(context.shape[1])
        return forward(x, t, context, **kw)

    monkeypatch.setattr(dit, "forward", spy)
    with torch.no_grad():
        folded = denoise(dit, initial_noise(settings), pos, neg, settings)
        assert seen == [11, 6, 11, 6]
        monkeypatch.setattr(wan_dit, "TEXT_KEY_BUCKETS", ())
        padded = denoise(dit, initial_noise(settings), pos, neg, settings)
    assert (folded - padded).abs().max().item() < 1e-5 * padded.abs().max().item()


KERNEL = r"""
import json, math, torch
from fastvideo_nodes.attention import counted
from fastvideo_nodes.attention.counted_kernel import attention
from fastvideo_nodes.models.wan_dit import fold_text_padding
res = {}
for name, b, sq, h, d, rows in (("d128", 1, 150, 2, 128, 20), ("d64_batch", 2, 70, 3, 64, 127)):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, sq, h, d, generator=g).half()
    ctx, log_count = fold_text_padding(torch.randn(b, rows, h * d, generator=g), 512)
    k = (ctx.unflatten(-1, (h, d)) * 2 + 0.5).half()  # the padding's key is not zero after the projections
    v = torch.randn(b, k.shape[1], h, d, generator=g).half()
    got = attention(q, k, v, log_count, block_m=64, q_blocks=2, num_warps=4).float()
    want = counted.reference(q.float(), k.float(), v.float(), log_count)
    res[name] = {"keys": k.shape[1], "err": (got - want).abs().max().item(), "scale": want.abs().max().item()}
print(json.dumps(res))
"""


def test_kernel_under_interpreter():
    """The Triton kernel's indexing, key masks and log counts, on the CPU interpreter, against the torch
    path: fp16 inputs (the interpreter's bf16 products are wrong; bf16 runs in the GPU test), P rounded
    to fp16 for its product, fp32 everything else."""
    for name, r in run_interpreted(KERNEL).items():
        assert r["keys"] == 128
        assert r["err"] < 0.01 * r["scale"], (name, r)


def test_kernel_builds_for_sm90():
    """What the interpreter cannot check: that Triton's compiler takes the kernel for Hopper."""
    from fastvideo_nodes.attention import counted_kernel as ck
    types = {n: "*bf16" for n in ("Q", "K", "V", "O")} | {"W": "*fp32", "qk_scale": "fp32"}
    kernel = sm90_build(ck._counted_attn_fwd, types, {"D": 128, "BM": 64, "LK": 128}, num_warps=4, num_stages=2)
    assert kernel.asm["sass" if "sass" in kernel.asm else "ptx"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs on CUDA")
@pytest.mark.parametrize("rows,d", [(20, 128), (120, 128), (57, 64)])
def test_gpu_kernel_equals_attention_over_the_padded_keys(rows, d):
    """On the GPU: the kernel with the folded keys against cuDNN/flash SDPA over all 512 padded keys."""
    from fastvideo_nodes.ops.triton_kernels import triton_available
    if not triton_available():
        pytest.skip("the counted-key kernel needs Triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    h = 12
    q = torch.randn(1, 4000, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    ctx = torch.zeros(1, 512, h * d, device="cuda")
    ctx[:, :rows] = torch.randn(rows, h * d, device="cuda", generator=g)
    lift = torch.randn(h * d, device="cuda", generator=g)  # the padding's key: not zero after the projections
    kv = lambda c: ((c + lift) * 2).unflatten(-1, (h, d)).bfloat16()
    want = F.scaled_dot_product_attention(q.transpose(1, 2), kv(ctx).transpose(1, 2),
                                          kv(ctx).flip(-1).transpose(1, 2)).transpose(1, 2).float()
    folded, log_count = fold_text_padding(ctx[:, :rows], 512)
    assert log_count is not None
    got = counted.attend(q, kv(folded), kv(folded).flip(-1), log_count).float()
    assert ((got - want).norm() / want.norm()).item() < 0.01
