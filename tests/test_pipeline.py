"""End to end: our latents equal diffusers' WanPipeline for the same weights, prompts and seed."""
import os
import subprocess
import sys

import pytest
import torch

from fastvideo_nodes.cli import main as cli_main
from fastvideo_nodes.models.wan_vae import raw_to_model
from fastvideo_nodes.pipeline.generator import VideoGenerator
from fastvideo_nodes.pipeline.sampler import SamplingSettings

diffusers = pytest.importorskip("diffusers")

PROMPT = "a small red boat drifting on a calm lake at sunset"
NEGATIVE = "blurry, static, low quality"
SIZE = dict(height=32, width=48, num_frames=5)


@pytest.fixture(scope="module")
def model_set(tmp_path_factory):
    from fastvideo_nodes.testing.folders import build_model_set
    return build_model_set(str(tmp_path_factory.mktemp("set")), seed=0)


def diffusers_latents(folder, scheduler=None, steps=4, guidance=5.0, seed=11):
    from diffusers import WanPipeline
    pipe = WanPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    if scheduler is not None:
        pipe.scheduler = scheduler
    with torch.no_grad():
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **SIZE)
    return out.frames  # model space [1,16,T',H',W']


def our_latents(gen, scheduler="unipc", steps=4, guidance=5.0, seed=11, **kw):
    settings = SamplingSettings(steps=steps, guidance_scale=guidance, shift=3.0, scheduler=scheduler, seed=seed,
                                **SIZE, **kw)
    pos, neg = gen.encode_prompt(PROMPT), gen.encode_prompt(NEGATIVE)
    return gen.sample(pos, neg, settings)  # raw VAE space


def test_unipc_latents_equal_diffusers(model_set):
    want = diffusers_latents(model_set["folder"])
    gen = VideoGenerator.from_pretrained(model_set["folder"], device="cpu", dtype="fp32")
    got = raw_to_model(our_latents(gen))
    err = (got - want).abs().max().item()
    print(f"pipeline UniPC 4 steps: max abs err {err:.2e} (latent scale {want.abs().max():.2f})")
    assert err <= 1e-3


def test_euler_latents_equal_diffusers(model_set):
    from diffusers import FlowMatchEulerDiscreteScheduler
    want = diffusers_latents(model_set["folder"], scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    gen = VideoGenerator.from_pretrained(model_set["folder"], device="cpu", dtype="fp32")
    err = (raw_to_model(our_latents(gen, scheduler="euler")) - want).abs().max().item()
    print(f"pipeline Euler 4 steps: max abs err {err:.2e}")
    assert err <= 1e-3


def test_comfy_single_files_equal_diffusers_folder(model_set):
    c = model_set["comfy_fp32"]
    a = our_latents(VideoGenerator.from_pretrained(model_set["folder"], device="cpu", dtype="fp32"))
    b = our_latents(VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"],
                                                   device="cpu", dtype="fp32"))
    assert (a - b).abs().max().item() <= 1e-5


def test_generate_video_writes_mp4(model_set, tmp_path):
    from fastvideo_nodes.video import read_video_info
    c = model_set["comfy"]
    gen = VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"], device="cpu")
    steps = []
    out = str(tmp_path / "v.mp4")
    r = gen.generate_video(PROMPT, num_inference_steps=2, seed=1, output_path=out,
                           callback=lambda i, n, x0: steps.append(i), **SIZE)
    assert r.frames.shape == (5, 32, 48, 3) and r.frames.dtype == torch.float32
    assert r.frames.min() >= 0 and r.frames.max() <= 1
    assert r.latents.shape == (1, 16, 2, 4, 6)
    assert steps == [1, 2] and set(r.timings) == {"load_s", "encode_s", "sample_s", "decode_s"}
    assert read_video_info(out) == (5, 32, 48)


def test_single_file_model_needs_the_other_files(model_set):
    gen = VideoGenerator.from_pretrained(model_set["comfy"]["model"], device="cpu")
    with pytest.raises(Exception, match="text_encoder: not given.*--text-encoder"):
        gen.encode_prompt("x")


@pytest.mark.parametrize("flags,needle", [
    (["--height", "100"], "height must be a positive multiple of 16, got 100; nearest valid: 96 or 112"),
    (["--num-frames", "80"], "num_frames must be 4n\\+1"),
    (["--steps", "0"], "steps must be a whole number from 1 to 1000"),
    (["--cfg-gate", "2"], "cfg_gate must be in \\[0, 1\\]"),
    (["--teacache-threshold", "-1"], "teacache_threshold must be ≥ 0"),
    (["--steps", "10000000"], "steps must be a whole number from 1 to 1000, got 10000000"),
    (["--guidance-scale", "nan"], "guidance_scale must be a finite number, got nan"),
    (["--shift", "inf"], "shift must be a finite number, got inf"),
    (["--seed", "-1"], "seed must be a whole number from 0 to 2\\^64-1"),
    (["--seed", str(2**64)], "seed must be a whole number from 0 to 2\\^64-1"),
    (["--device", "quantum"], "device 'quantum' is not a device this runs on; use cpu, cuda or cuda:N"),
    (["--output", "video.txt"], "--output: 'video.txt' is not a video file name; end it in one of .mp4"),
    (["--fps", "0"], "fps must be a whole number from 1 to 240"),
    (["--prompt", "fox \udcff"], "prompt is not valid UTF-8 text"),
    (["--negative-prompt", "\udcff"], "negative_prompt is not valid UTF-8 text"),
    (["--height", "100000"], "needs about .* GB .*; the largest that fits: about \\d+x\\d+ at 81 frames"),
    (["--num-frames", "100001"], "needs about .* GB .* 256.0 GB is available host RAM; the largest that fits: "
                                 "\\d+ frames at 832x480 or about"),
])
def test_cli_bad_input_is_one_clear_line(model_set, capsys, tmp_path, monkeypatch, flags, needle):
    import re

    from fastvideo_nodes.pipeline import size_check
    monkeypatch.setattr(size_check, "available_bytes", lambda device: 256 * 2**30)  # any machine: the same answer
    c = model_set["comfy"]
    code = cli_main(["generate", "--model", c["model"], "--text-encoder", c["text_encoder"], "--vae", c["vae"],
                     "--prompt", "x", "--device", "cpu", "--output", str(tmp_path / "o.mp4"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and re.search(needle, err) and "Traceback" not in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == []  # refused before anything was written


def test_cli_missing_model_file(capsys, tmp_path):
    code = cli_main(["generate", "--model", str(tmp_path / "nope.safetensors"), "--prompt", "x", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_cli_generate_writes_video_and_latents(model_set, tmp_path):
    from safetensors.torch import load_file

    from fastvideo_nodes.video import read_video_info
    c = model_set["comfy"]
    out, lat = str(tmp_path / "o.mp4"), str(tmp_path / "l.safetensors")
    code = cli_main(["generate", "--model", c["model"], "--text-encoder", c["text_encoder"], "--vae", c["vae"],
                     "--prompt", PROMPT, "--device", "cpu", "--height", "32", "--width", "48", "--num-frames", "5",
                     "--steps", "2", "--output", out, "--latents-out", lat, "--cfg-gate", "0.5",
                     "--teacache-threshold", "0.05"])
    assert code == 0
    assert read_video_info(out) == (5, 32, 48)
    assert load_file(lat)["latents"].shape == (1, 16, 2, 4, 6)


def test_fp8_matmul_option_reaches_the_dit(model_set, caplog):
    """fp8_matmul (node: fp8_e4m3fn_fast, CLI: --fp8-fast) stores the DiT's linears as e4m3fn with
    per-channel scales; on a CPU the products stay dequantised, with a note, and the result stays close."""
    c = model_set["comfy_fp32"]
    kw = dict(text_encoder=c["text_encoder"], vae=c["vae"], device="cpu", dtype="fp32")
    gen = VideoGenerator.from_pretrained(c["model"], fp8_matmul=True, **kw)
    ffn = gen.dit.blocks[0].ffn[0]
    assert ffn.weight.dtype == torch.float8_e4m3fn and ffn.scale_weight.shape == (ffn.out_features, 1)
    assert not ffn.fp8_matmul and "compute capability 8.9" in caplog.text
    want = our_latents(VideoGenerator.from_pretrained(c["model"], **kw), steps=2)
    got = our_latents(gen, steps=2)
    assert ((got - want).norm() / want.norm()).item() < 0.05


def test_demo_command(tmp_path):
    """The README's main-job command, as a user runs it (its own process, a fresh cache)."""
    env = dict(os.environ, FASTVIDEO_CACHE=str(tmp_path / "cache"))
    out = str(tmp_path / "demo.mp4")
    p = subprocess.run([sys.executable, "-m", "fastvideo_nodes", "demo", "--output", out], env=env,
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "RANDOM weights" in p.stdout and "generate --model" in p.stdout
    from fastvideo_nodes.video import read_video_info
    assert read_video_info(out) == (17, 128, 192)
