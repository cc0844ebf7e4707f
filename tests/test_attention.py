"""Attention dispatch: backend selection, exactness of each backend, sliding tiles vs a hand-built mask."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastvideo_nodes.attention import (
    BACKENDS,
    ENV_VAR,
    UNSUPPORTED,
    AttentionSpec,
    attention,
    resolve_backend,
    sliding_tile,
)
from fastvideo_nodes.errors import FastVideoError

cuda = pytest.mark.gpu  # conftest skips it without CUDA


def exact(q, k, v, mask=None):
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                              v.transpose(1, 2).float(), attn_mask=mask).transpose(1, 2)


def qkv(s=48, h=2, d=16, sk=None, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(1, s, h, d, generator=g, device=device, dtype=dtype),
            torch.randn(1, sk or s, h, d, generator=g, device=device, dtype=dtype),
            torch.randn(1, sk or s, h, d, generator=g, device=device, dtype=dtype))


def test_precedence_explicit_env_auto(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(None) == "AUTO"
    monkeypatch.setenv(ENV_VAR, "sliding_tile_attn")
    assert resolve_backend(None) == "SLIDING_TILE_ATTN"
    assert resolve_backend("torch_sdpa") == "TORCH_SDPA"  # explicit beats the environment


def test_auto_on_cpu_is_sdpa():
    from fastvideo_nodes.attention.auto import choose_for, length_bucket
    assert choose_for("cpu", torch.float32, 128, 12, 32760) == "TORCH_SDPA"
    assert [length_bucket(n) for n in (10, 1025, 32760, 75600, 10**6)] == [1024, 2048, 32768, 65536, 65536]


def test_unknown_name_lists_valid_ones():
    with pytest.raises(FastVideoError,
                       match="unknown; valid names: auto, TORCH_SDPA, FLASH_ATTN, FLASH_ATTN_4, SAGE_ATTN"):
        resolve_backend("FLASHY")


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_recognised_but_unsupported(name):
    with pytest.raises(FastVideoError, match="not supported: .*(checkpoint|Blackwell)"):
        resolve_backend(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these may be installed")
@pytest.mark.parametrize("name,needle", [("FLASH_ATTN", "CUDA"), ("FLASH_ATTN_4", "CUDA"), ("SAGE_ATTN", "CUDA")])
def test_gpu_backends_say_why_not_here(name, needle):
    with pytest.raises(FastVideoError, match=f"cannot run here: .*{needle}"):
        resolve_backend(name)


def test_sdpa_equals_exact_self_and_cross():
    q, k, v = qkv()
    assert torch.allclose(attention(q, k, v, backend="TORCH_SDPA"), exact(q, k, v), atol=1e-5)
    q, k, v = qkv(s=40, sk=12, seed=1)
    assert torch.allclose(AttentionSpec("TORCH_SDPA").cross_attention(q, k, v), exact(q, k, v), atol=1e-5)


@pytest.mark.parametrize("grid,tile,window", [((5, 6, 7), (2, 2, 2), (1, 3, 1)), ((4, 8, 8), (2, 4, 4), (3, 1, 3)),
                                              ((3, 5, 4), (4, 8, 8), (3, 3, 5))])
def test_sliding_tile_equals_dense_with_hand_built_mask(grid, tile, window):
    s = math.prod(grid)
    q, k, v = qkv(s=s, seed=2)
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    c = torch.stack([t.flatten() // tile[0], h.flatten() // tile[1], w.flatten() // tile[2]], -1)
    hand = ((c[:, None] - c[None]).abs() <= torch.tensor([x // 2 for x in window])).all(-1)
    assert torch.equal(sliding_tile.dense_mask(grid, tile, window), hand)
    assert abs(sliding_tile.density(grid, tile, window) - hand.double().mean().item()) < 1e-9
    out = attention(q, k, v, backend="SLIDING_TILE_ATTN", grid=grid, options=dict(tile=tile, window=window))
    assert torch.allclose(out, exact(q, k, v, hand), atol=1e-5)
    if hand.all():  # a window covering everything is plain attention
        assert torch.allclose(out, exact(q, k, v), atol=1e-5)
    else:
        assert not torch.allclose(out, exact(q, k, v), atol=1e-3)


def test_sliding_tile_dense_first_steps_and_cross_attention():
    grid = (4, 4, 4)
    q, k, v = qkv(s=64, seed=3)
    opts = dict(tile=(2, 2, 2), window=(1, 1, 1), dense_steps=2)
    spec = AttentionSpec("SLIDING_TILE_ATTN", grid=grid, step=1, options=opts)
    assert torch.allclose(spec.self_attention(q, k, v), exact(q, k, v), atol=1e-5)
    sparse = AttentionSpec("SLIDING_TILE_ATTN", grid=grid, step=2, options=opts).self_attention(q, k, v)
    assert not torch.allclose(sparse, exact(q, k, v), atol=1e-3)
    q2, k2, v2 = qkv(s=64, sk=10, seed=4)  # text cross-attention stays dense
    assert torch.allclose(spec.cross_attention(q2, k2, v2), exact(q2, k2, v2), atol=1e-5)


def test_dit_runs_with_sliding_tiles():
    from fastvideo_nodes.testing.dit import random_dit
    dit = random_dit()
    x, t, ctx = torch.randn(1, 16, 3, 8, 8), torch.tensor([500.0]), torch.randn(1, 8, 32)
    with torch.no_grad():
        dense = dit(x, t, ctx, attention_backend="TORCH_SDPA")
        wide = dit(x, t, ctx, attention_backend="SLIDING_TILE_ATTN", attention_options=dict(window=(99, 99, 99)))
    assert torch.allclose(dense, wide, atol=1e-4)


# ----------------------------------------------------------------------------- GPU (skipped without CUDA)

@cuda
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_gpu_backend_close_to_exact(name):
    from fastvideo_nodes.attention import backend_module
    if backend_module(name).available():
        pytest.skip(f"{name} not installed")
    q, k, v = qkv(s=1024, h=4, d=128, device="cuda", dtype=torch.bfloat16)
    grid = (4, 16, 16)
    if name == "VIDEO_SPARSE_ATTN":  # every key tile kept and the compressed branch gated off: exact
        out = attention(q, k, v, backend=name, grid=grid, options=dict(sparsity=0.0), gate=torch.zeros_like(q))
    else:
        out = attention(q, k, v, backend=name, grid=grid, options=dict(window=(99, 99, 99)))
    cos = F.cosine_similarity(out.float().flatten(), exact(q, k, v).flatten(), dim=0).item()
    assert cos > 0.999


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it may run")
def test_int8_backend_registered_and_says_why_not_here():
    assert "INT8_ATTN" in BACKENDS
    with pytest.raises(FastVideoError, match="cannot run here: INT8_ATTN needs a CUDA GPU"):
        resolve_backend("int8_attn")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it may run")
def test_kitchen_backend_registered_and_says_why_not_here():
    from fastvideo_nodes.attention import kitchen
    assert "KITCHEN_INT8" in BACKENDS
    with pytest.raises(FastVideoError, match="cannot run here: comfy-kitchen"):
        resolve_backend("KITCHEN_INT8")
    q, k, v = qkv(s=20, d=16)
    assert torch.allclose(kitchen.attend(q, k, v), exact(q, k, v), atol=1e-5)  # CPU: exact SDPA
