"""The whole generator on a GPU (skipped without CUDA): same latents as on CPU, offload and fp8 paths run."""
import pytest
import torch

from fastvideo_nodes.pipeline.generator import VideoGenerator
from fastvideo_nodes.pipeline.sampler import SamplingSettings

pytestmark = pytest.mark.gpu  # conftest skips these without CUDA
SET = dict(height=32, width=48, num_frames=5, steps=3, seed=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    pytest.importorskip("diffusers")
    from fastvideo_nodes.testing.folders import build_model_set
    return build_model_set(str(tmp_path_factory.mktemp("gpu")), seed=9)["comfy"]


def latents(files, emb=None, **kw):
    gen = VideoGenerator.from_pretrained(files["model"], text_encoder=files["text_encoder"], vae=files["vae"], **kw)
    pos, neg = emb or (gen.encode_prompt("a red fox in the snow"), gen.encode_prompt("blurry"))
    z = gen.sample(pos, neg, SamplingSettings(**SET))
    frames = gen.decode(z)
    assert frames.shape == (5, 32, 48, 3) and torch.isfinite(frames).all()
    return z


def test_cuda_fp32_equals_cpu(files):
    cpu = latents(files, device="cpu", dtype="fp32")
    gpu = latents(files, device="cuda", dtype="fp32", attention_backend="TORCH_SDPA")
    assert (gpu - cpu).abs().max().item() < 1e-2


def test_cuda_bf16_offload_and_fp8_run_close(files):
    gen = VideoGenerator.from_pretrained(files["model"], text_encoder=files["text_encoder"], vae=files["vae"],
                                         device="cuda", dtype="bf16")
    emb = gen.encode_prompt("a red fox in the snow"), gen.encode_prompt("blurry")
    ref = latents(files, emb, device="cuda", dtype="bf16")
    # Stream every block. The same embeddings: with this budget the planner encodes on the CPU.
    offloaded = latents(files, emb, device="cuda", dtype="bf16", gpu_memory_gb=1e-6)
    assert torch.equal(offloaded, ref)
    fp8 = latents(files, device="cuda", dtype="bf16", weight_dtype=torch.float8_e4m3fn, text_encoder_device="cpu")
    assert ((fp8 - ref).norm() / ref.norm()).item() < 0.2
