"""FastWan: checkpoints with the per-block gate projection load, run VIDEO_SPARSE_ATTN with their gate
(= diffusers with a dense-mask VSA written from the definition), under Ulysses SP too, and pick
their own defaults (VSA, dmd, guidance 1) in generate_video, saying so."""
import dataclasses
import logging
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from test_video_sparse import reference  # the dense-mask VSA from the definition

from fastvideo_nodes.attention import AttentionSpec, as_options, attention
from fastvideo_nodes.attention import video_sparse as vs
from fastvideo_nodes.attention.sliding_tile import SlidingTileOptions
from fastvideo_nodes.attention.video_sparse import VideoSparseOptions
from fastvideo_nodes.errors import FastVideoError, ModelFileError
from fastvideo_nodes.loading import detect
from fastvideo_nodes.loading.dit import load_dit, read_dit_config
from fastvideo_nodes.pipeline.generator import ModelFiles, VideoGenerator
from fastvideo_nodes.pipeline.sampler import SamplingSettings, SamplingStats, denoise, initial_noise
from fastvideo_nodes.testing.dit import TINY_DIT, random_dit, save_original
from fastvideo_nodes.testing.fastwan import (
    TINY_FASTWAN,
    build_fastwan_folder,
    fastwan_transformer,
    random_fastwan,
    save_transformer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
SMALL = dict(height=128, width=96, num_frames=9)  # token grid (3, 8, 6): 4 tiles, partial in t and w


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    return build_fastwan_folder(str(tmp_path_factory.mktemp("fastwan")), seed=3)


@pytest.fixture(scope="module")
def fastwan_file(tmp_path_factory):
    """Our own FastWan DiT as an original-named fp32 single file (for the worker pool)."""
    return save_original(random_fastwan(TINY_FASTWAN, seed=4).state_dict(),
                         str(tmp_path_factory.mktemp("fw") / "fastwan.safetensors"), dtype=None)


def latent_inputs(batch=2, grid=(3, 8, 6)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 16, grid[0], 2 * grid[1], 2 * grid[2], generator=g)
    t = torch.tensor([999.0, 412.0][:batch])
    ctx = torch.randn(batch, 512, TINY_FASTWAN.text_dim, generator=g)
    ctx[:, 20:] = 0
    return x, t, ctx


# -- loading

def test_folder_loads_with_the_gate(folder):
    cfg = read_dit_config(folder)
    assert cfg.gate_compress and dataclasses.replace(cfg, gate_compress=False) == dataclasses.replace(
        TINY_FASTWAN, gate_compress=False)
    weights = os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors")
    with safe_open(weights, "pt") as f:
        assert detect.kind_of(f.keys()) == "wan_dit_diffusers"
        model = load_dit(folder)
        for i, block in enumerate(model.blocks):
            for part in ("weight", "bias"):
                stored = f.get_tensor(f"blocks.{i}.attn1.to_gate_compress.{part}")
                assert torch.equal(getattr(block.self_attn.gate_compress, part), stored)
    assert model.blocks[0].cross_attn.gate_compress is None


def test_plain_wan_has_no_gate_and_no_new_tensors(tmp_path):
    path = save_original(random_dit(TINY_DIT).state_dict(), str(tmp_path / "plain.safetensors"), dtype=None)
    assert not read_dit_config(path).gate_compress
    assert not any("gate_compress" in k for k in random_dit(TINY_DIT).state_dict())


def test_our_single_file_keeps_the_flag(fastwan_file):
    assert read_dit_config(fastwan_file).gate_compress


@pytest.mark.parametrize("drop", [0, 1])
def test_a_block_without_its_gate_is_named(tmp_path, drop):
    pytest.importorskip("diffusers")
    path = save_transformer(fastwan_transformer(TINY_FASTWAN, seed=0), str(tmp_path / "transformer"), drop_gate_of=drop)
    other = 1 - drop
    with pytest.raises(ModelFileError, match=f"block {drop} lacks the weight of its gate projection "
                                             rf"\(attn1.to_gate_compress\) while block {other} has one; a FastWan "
                                             "checkpoint has it in all 2 blocks"):
        read_dit_config(path)


def test_a_gate_of_the_wrong_shape_is_named(tmp_path):
    sd = random_fastwan().state_dict()
    sd["blocks.1.self_attn.gate_compress.weight"] = sd["blocks.1.self_attn.gate_compress.weight"][:, :128]
    path = save_original(sd, str(tmp_path / "bad.safetensors"), dtype=None)
    with pytest.raises(ModelFileError, match=r"block 1's gate projection .* has shapes \(256, 128\) and \(256,\); "
                                             r"expected \(256, 256\) and \(256,\)"):
        read_dit_config(path)


# -- the forward: diffusers plus a dense-mask VSA processor (the definition) on the same weights

def rotate(x, cos, sin):
    """diffusers' Wan RoPE on interleaved pairs: x [B, S, H, D], cos/sin [1, S, 1, D]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


class DenseVSAProcessor:
    """diffusers' self-attention with FastVideo's gate (to_gate_compress of the block's modulated
    input) and VSA computed densely in float64 by `reference`."""

    def __init__(self, grid, sparsity):
        self.grid, self.sparsity = grid, sparsity

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        heads = lambda t: t.unflatten(2, (attn.heads, -1))
        q = rotate(heads(attn.norm_q(attn.to_q(hidden_states))), *rotary_emb)
        k = rotate(heads(attn.norm_k(attn.to_k(hidden_states))), *rotary_emb)
        v = heads(attn.to_v(hidden_states))
        gate = heads(attn.to_gate_compress(hidden_states))
        out = reference(q, k, v, self.grid, gate, self.sparsity)[0].to(q.dtype).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8])
def test_forward_with_gate_equals_dense_reference(tmp_path, sparsity):
    pytest.importorskip("diffusers")
    ref = fastwan_transformer(TINY_FASTWAN, seed=2)
    save_transformer(ref, str(tmp_path / "transformer"))
    model = load_dit(str(tmp_path))
    x, t, ctx = latent_inputs()
    grid = (x.shape[2], x.shape[3] // 2, x.shape[4] // 2)
    for block in ref.blocks:
        block.attn1.set_processor(DenseVSAProcessor(grid, sparsity))
    with torch.no_grad():
        want = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        got = model(x, t, ctx[:, :20], attention_backend="VIDEO_SPARSE_ATTN",
                    attention_options=VideoSparseOptions(sparsity))
        auto = model(x, t, ctx[:, :20], attention_options=VideoSparseOptions(sparsity))  # auto → VSA for FastWan
        dense = model(x, t, ctx[:, :20], attention_backend="TORCH_SDPA")
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2e-5 * scale
    assert torch.equal(auto, got)
    assert (dense - want).abs().max() > 1e-2 * scale  # the gated compressed branch is really in there


# -- tile order: under VSA the blocks keep the sequence in its tiles, and nothing else may tell

def untiled(monkeypatch):
    """The DiT in token order all through (as before tile order): its attention gathers per call."""
    from fastvideo_nodes.models import wan_dit
    monkeypatch.setattr(wan_dit, "token_order", lambda backend, grid, device: None)


@pytest.mark.parametrize("grid,per_token", [((3, 8, 6), False), ((5, 6, 7), False), ((4, 8, 8), False),
                                            ((2, 5, 9), True)])
def test_tile_order_forward_equals_token_order(monkeypatch, grid, per_token):
    """Partial edge tiles in t, h and w ((5, 6, 7), (2, 5, 9)), none ((4, 8, 8)), batch 2, and per-token
    timesteps (Wan 2.2's [B, S] form, whose modulation is per token): one forward each way."""
    model = random_fastwan(seed=7)
    x, t, ctx = latent_inputs(grid=grid)
    if per_token:
        t = torch.tensor([999.0, 412.0])[:, None].repeat(1, grid[0] * grid[1] * grid[2])
        t[:, : grid[1] * grid[2]] = 0.0  # the first frame's tokens at t = 0, as Wan 2.2's image frame
    opts = VideoSparseOptions(0.5)
    orders = []
    real = vs.tile_order
    monkeypatch.setattr(vs, "tile_order", lambda g, d: orders.append(g) or real(g, d))
    with torch.no_grad():
        tiled = model(x, t, ctx, attention_backend="VIDEO_SPARSE_ATTN", attention_options=opts)
        assert orders == [grid]
        untiled(monkeypatch)
        plain = model(x, t, ctx, attention_backend="VIDEO_SPARSE_ATTN", attention_options=opts)
        dense = model(x, t, ctx, attention_backend="TORCH_SDPA")
    assert (tiled - plain).abs().max().item() <= 1e-5 * plain.abs().max().item()
    assert (dense - plain).abs().max().item() > 1e-3 * plain.abs().max().item()  # VSA did run


def test_only_vsa_takes_tile_order():
    from fastvideo_nodes.attention import token_order
    assert token_order("TORCH_SDPA", (4, 4, 4), "cpu") is None and token_order("VIDEO_SPARSE_ATTN", None, "cpu") is None
    order, inverse = token_order("VIDEO_SPARSE_ATTN", (5, 6, 7), "cpu")
    assert torch.equal(order[inverse], torch.arange(210)) and torch.equal(vs.layout((5, 6, 7), "cpu").slot[order],
                                                                          vs.layout((5, 6, 7), "cpu").tiled_slot)
    q = torch.zeros(1, 64, 2, 16)
    with pytest.raises(FastVideoError, match="TORCH_SDPA takes its sequence in token order; only VIDEO_SPARSE_ATTN"):
        attention(q, q, q, backend="TORCH_SDPA", grid=(4, 4, 4), tiled=True)


def test_vsa_on_a_plain_model_needs_fastwan(tmp_path):
    x, t, ctx = latent_inputs(batch=1)
    msg = "attention backend VIDEO_SPARSE_ATTN needs a FastWan checkpoint .* this model has none"
    with pytest.raises(FastVideoError, match=msg), torch.no_grad():
        random_dit(TINY_DIT)(x, t, ctx, attention_backend="VIDEO_SPARSE_ATTN")
    path = save_original(random_dit(TINY_DIT).state_dict(), str(tmp_path / "plain.safetensors"), dtype=None)
    gen = VideoGenerator(ModelFiles(path), device="cpu", attention_backend="VIDEO_SPARSE_ATTN")
    with pytest.raises(FastVideoError, match=msg):  # before any work, from the header
        gen.check_settings(SamplingSettings(**SMALL, steps=1))
    assert gen._parts.dit is None


# -- the dispatch

def test_dispatch_routes_the_gate_and_keeps_cross_attention_dense():
    g = torch.Generator().manual_seed(0)
    q, k, v, gate = (torch.randn(1, 144, 2, 16, generator=g) for _ in range(4))
    grid, opts = (3, 8, 6), VideoSparseOptions(0.5)
    spec = AttentionSpec("VIDEO_SPARSE_ATTN", grid=grid, options=opts)
    assert spec.gated and not AttentionSpec("TORCH_SDPA", grid=grid).gated
    assert torch.equal(spec.self_attention(q, k, v, gate), vs.attend(q, k, v, grid=grid, gate=gate, options=opts))
    assert not torch.equal(spec.self_attention(q, k, v, gate), spec.self_attention(q, k, v))
    text = torch.randn(1, 7, 2, 16, generator=g)
    want = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, text, text))).transpose(1, 2)
    assert torch.allclose(spec.cross_attention(q, text, text), want, atol=1e-5)


def test_options_are_typed_per_backend():
    assert as_options({"sparsity": 0.5}) == VideoSparseOptions(0.5)
    assert AttentionSpec("VIDEO_SPARSE_ATTN", options={"sparsity": 0.6}).options == VideoSparseOptions(0.6)
    assert as_options({"window": (3, 3, 3)}) == SlidingTileOptions(window=(3, 3, 3))
    q = torch.randn(1, 64, 1, 16)
    with pytest.raises(FastVideoError, match="VIDEO_SPARSE_ATTN takes VideoSparseOptions, got SlidingTileOptions"):
        attention(q, q, q, backend="VIDEO_SPARSE_ATTN", grid=(4, 4, 4), options=SlidingTileOptions())
    with pytest.raises(FastVideoError, match="SLIDING_TILE_ATTN takes SlidingTileOptions, got VideoSparseOptions"):
        attention(q, q, q, backend="SLIDING_TILE_ATTN", grid=(4, 4, 4), options=VideoSparseOptions())
    with pytest.raises(FastVideoError, match="TORCH_SDPA takes no gate"):
        attention(q, q, q, backend="TORCH_SDPA", gate=q)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "0.8", True])
def test_sparsity_out_of_range(bad):
    msg = r"video sparse attention sparsity must be a number in \[0, 1\)"
    with pytest.raises(FastVideoError, match=msg):
        as_options({"sparsity": bad})
    sys.path.insert(0, ROOT)
    import nodes as fv
    assert "sparsity must be a number in [0, 1)" in fv.SetAttentionBackend.VALIDATE_INPUTS(
        backend="VIDEO_SPARSE_ATTN", sparsity=bad)


# -- sequence parallel: the gate takes the same all-to-all as q, k, v

def test_sp_degree_two_with_gate_equals_one_process(fastwan_file):
    from fastvideo_nodes.parallel import WorkerPool
    s = SamplingSettings(**SMALL, scheduler="dmd", guidance_scale=1.0)
    prompt = torch.randn(1, 12, TINY_FASTWAN.text_dim, generator=torch.Generator().manual_seed(0))
    opts = VideoSparseOptions(0.5)
    with torch.no_grad():
        dit = load_dit(fastwan_file)
        ref = denoise(dit, initial_noise(s), prompt, None, s, attention_backend="VIDEO_SPARSE_ATTN",
                      attention_options=opts)
        dense = denoise(dit, initial_noise(s), prompt, None, s, attention_backend="TORCH_SDPA")
    pool = WorkerPool(fastwan_file, num_gpus=2, device="cpu", dtype=torch.float32)
    try:
        out = pool.sample(initial_noise(s), prompt, None, s, attention_options=opts)  # auto → VSA in the workers
    finally:
        pool.close()
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 2e-5 * scale
    assert (dense - ref).abs().max().item() > 1e-3 * scale


# -- FastWan defaults in generate_video

def test_generate_video_takes_fastwan_defaults_and_says_so(folder, caplog):
    gen = VideoGenerator.from_pretrained(folder, device="cpu")
    with caplog.at_level(logging.INFO, logger="fastvideo_nodes.pipeline.generator"):
        result = gen.generate_video("a fox in the snow", **SMALL, seed=5)
    lines = [r.getMessage() for r in caplog.records if "FastWan" in r.getMessage()]
    assert lines == ["FastWan checkpoint (gate projections in its blocks): using attention VIDEO_SPARSE_ATTN "
                     "(sparsity 0.8), scheduler dmd (timesteps 1000, 757, 522), guidance 1 (no negative prompt); "
                     "set them explicitly to override."]
    assert (result.stats.cond_forwards, result.stats.uncond_forwards) == (3, 0)
    assert result.attention["choice"] == "VIDEO_SPARSE_ATTN"
    # The same run spelled out: VSA at 0.8, dmd over 1000/757/522, no guidance, no negative prompt.
    settings = SamplingSettings(**SMALL, seed=5, scheduler="dmd", guidance_scale=1.0, shift=3.0)
    explicit = gen.with_attention_backend("VIDEO_SPARSE_ATTN", VideoSparseOptions(0.8))
    latents = explicit.sample(gen.encode_prompt("a fox in the snow"), None, settings)
    assert torch.equal(latents, result.latents)
    gen.close()


def test_explicit_settings_win_over_fastwan_defaults(folder, caplog):
    gen = VideoGenerator.from_pretrained(folder, device="cpu", attention_backend="TORCH_SDPA")
    with caplog.at_level(logging.INFO, logger="fastvideo_nodes.pipeline.generator"):
        stats = gen.generate_video("a fox", **SMALL, scheduler="euler", guidance_scale=3.0,
                                   num_inference_steps=2).stats
    assert (stats.cond_forwards, stats.uncond_forwards) == (2, 2)
    assert not [r for r in caplog.records if "FastWan" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastvideo_nodes.pipeline.generator"):
        gen.generate_video("a fox", **SMALL, guidance_scale=1.0)
    assert [r.getMessage().split("using ")[1] for r in caplog.records if "FastWan" in r.getMessage()] == [
        "scheduler dmd (timesteps 1000, 757, 522); set them explicitly to override."]
    assert gen.attention_used() == {"requested": "TORCH_SDPA"}
    gen.close()


def test_set_attention_node_offers_vsa_with_sparsity(folder, tmp_path):
    sys.path.insert(0, ROOT)
    import nodes as fv
    backends = fv.SetAttentionBackend.INPUT_TYPES()
    assert "VIDEO_SPARSE_ATTN" in backends["required"]["backend"][0]
    assert backends["optional"]["sparsity"][1]["default"] == 0.8
    gen = VideoGenerator.from_pretrained(folder, device="cpu")
    vsa = fv.SetAttentionBackend().apply(gen, "VIDEO_SPARSE_ATTN", sparsity=0.6)["result"][0]
    assert vsa.attention_backend == "VIDEO_SPARSE_ATTN" and vsa.attention_options == VideoSparseOptions(0.6)
    assert vsa._parts is gen._parts
    plain = save_original(random_dit(TINY_DIT).state_dict(), str(tmp_path / "plain.safetensors"), dtype=None)
    with pytest.raises(FastVideoError, match="needs a FastWan checkpoint"):
        fv.SetAttentionBackend().apply(VideoGenerator(ModelFiles(plain), device="cpu"), "VIDEO_SPARSE_ATTN")
    stats = SamplingStats()
    vsa.sample(gen.encode_prompt("a fox"), None, SamplingSettings(**SMALL, scheduler="dmd", guidance_scale=1.0),
               stats=stats)
    assert stats.cond_forwards == 3
    gen.close()


# -- torch.compile: VSA runs between the compiled parts, with its grid and gate (not the dense op)

def _compiled_vs_eager(monkeypatch, device, dtype):
    model = random_fastwan(seed=6).to(device, dtype)
    x, t, ctx = (a.to(device) for a in latent_inputs(batch=1))
    seen = []

    def spy(q, k, v, *, grid=None, gate=None, options=None, tiled=False):
        seen.append((grid, gate is not None, tiled))
        return real(q, k, v, grid=grid, gate=gate, options=options, tiled=tiled)
    real = vs.attend
    with torch.inference_mode():
        want = model(x, t, ctx, attention_backend="VIDEO_SPARSE_ATTN")
        monkeypatch.setattr(vs, "attend", spy)
        got = model.compile_blocks()(x, t, ctx, attention_backend="VIDEO_SPARSE_ATTN")
    assert seen == [((3, 8, 6), True, True)] * TINY_FASTWAN.num_layers  # the blocks run in tile order
    return got, want


def test_compiled_blocks_with_vsa_equal_eager(monkeypatch):
    got, want = _compiled_vs_eager(monkeypatch, "cpu", torch.float32)
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item()


@pytest.mark.gpu
def test_gpu_compiled_blocks_with_vsa_close_to_eager(monkeypatch):
    got, want = _compiled_vs_eager(monkeypatch, "cuda", torch.bfloat16)
    assert F.cosine_similarity(got.double().flatten(), want.double().flatten(), dim=0).item() > 0.999


def test_cli_generates_from_a_fastwan_folder_with_its_defaults(folder, tmp_path, caplog, capsys):
    from fastvideo_nodes.cli import main
    out = str(tmp_path / "fw.mp4")
    with caplog.at_level(logging.INFO, logger="fastvideo_nodes.pipeline.generator"):
        code = main(["generate", "--model", folder, "--prompt", "a fox", "--device", "cpu", "--height", "32",
                     "--width", "48", "--num-frames", "5", "--sparsity", "0.5", "--output", out])
    assert code == 0 and os.path.getsize(out) > 0
    assert any("VIDEO_SPARSE_ATTN (sparsity 0.5), scheduler dmd" in r.getMessage() for r in caplog.records)
    assert main(["generate", "--model", folder, "--prompt", "a fox", "--device", "cpu", "--sparsity", "1",
                 "--output", str(tmp_path / "no.mp4")]) == 2
    assert "sparsity must be a number in [0, 1)" in capsys.readouterr().err
