"""Wan2.2 TI2V-5B: the 48-channel VAE, per-token timesteps in the DiT, text-to-video and
text+image-to-video, each equal to diffusers on the same tiny random weights; and bad inputs."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvideo_nodes.errors import FastVideoError, ModelFileError
from fastvideo_nodes.loading import detect
from fastvideo_nodes.loading.vae import load_vae
from fastvideo_nodes.models.wan_dit import WanDiT
from fastvideo_nodes.models.wan_vae import LATENT_MEAN_22, LATENT_STD_22, model_to_raw, raw_to_model
from fastvideo_nodes.pipeline import ti2v
from fastvideo_nodes.pipeline.generator import VideoGenerator
from fastvideo_nodes.pipeline.sampler import SamplingSettings

diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a small red boat drifting on a calm lake", "blurry, static"
SIZE = dict(height=64, width=96, num_frames=5)  # latent 2×4×6 at 1/16


@pytest.fixture(scope="module")
def wan22_set(tmp_path_factory):
    from fastvideo_nodes.testing.wan22 import build_wan22_set
    return build_wan22_set(str(tmp_path_factory.mktemp("wan22")), seed=0)


@pytest.fixture(scope="module")
def folder_gen(wan22_set):
    return VideoGenerator.from_pretrained(wan22_set["folder"], device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def image():
    from PIL import Image
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE["height"], SIZE["width"], 3), dtype=np.uint8))


def _video(seed=0, frames=9, h=64, w=96):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, h, w, generator=g) * 2 - 1


# ----------------------------------------------------------------------------- VAE


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_vae22_encode_decode_equal_diffusers(wan22_set, layout):
    from diffusers import AutoencoderKLWan
    ref = AutoencoderKLWan.from_pretrained(wan22_set["folder"], subfolder="vae").eval()
    path = wan22_set["folder"] if layout == "diffusers" else wan22_set["comfy_fp32"]["vae"]
    ours = load_vae(path)
    assert ours.cfg.residual and ours.cfg.z_dim == 48 and ours.cfg.spatial_stride == 16
    video = _video()
    z = torch.randn(1, 48, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_enc, want_dec = ref.encode(video).latent_dist.mode(), ref.decode(z).sample
        got_enc, got_dec = ours.encode(video), ours.decode(z)
    assert got_enc.shape == (1, 48, 3, 4, 6) and got_dec.shape == (1, 3, 9, 64, 96)
    assert (got_enc - want_enc).abs().max() <= 1e-5
    assert (got_dec - want_dec).abs().max() <= 1e-5


def test_vae22_single_image_and_detect(wan22_set):
    vae = load_vae(wan22_set["comfy_fp32"]["vae"])
    with torch.no_grad():
        assert vae.encode(_video(frames=1)).shape == (1, 48, 1, 4, 6)
        frames = vae.decode_frames(torch.zeros(1, 48, 1, 4, 6))
    assert frames.shape == (1, 64, 96, 3)
    for path in (wan22_set["comfy_fp32"]["vae"], wan22_set["folder"] + "/vae/diffusion_pytorch_model.safetensors"):
        assert detect.kind_of(load_file(path).keys()) == "wan22_vae"


def test_latent_stats_by_channels():
    z = torch.randn(1, 48, 2, 3, 3)
    mean = torch.tensor(LATENT_MEAN_22).view(1, 48, 1, 1, 1)
    std = torch.tensor(LATENT_STD_22).view(1, 48, 1, 1, 1)
    assert torch.allclose(model_to_raw(z), z * std + mean, atol=1e-6)
    assert torch.allclose(raw_to_model(model_to_raw(z)), z, atol=1e-5)
    with pytest.raises(FastVideoError, match="32 channels; a Wan latent has 16 .* or 48"):
        raw_to_model(torch.zeros(1, 32, 1, 2, 2))


def test_vae22_diffusers_config_checked(wan22_set, tmp_path):
    import json
    import shutil
    folder = tmp_path / "vae_bad"
    shutil.copytree(wan22_set["folder"] + "/vae", folder / "vae")
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**cfg, "patch_size": None}))
    with pytest.raises(ModelFileError, match="z_dim 48, is_residual True, patch_size None.*2.2 \\(z_dim 48"):
        load_vae(str(folder))


# ----------------------------------------------------------------------------- DiT


def _dit_pair(seed=3):
    from fastvideo_nodes.testing import dit as tiny_dit
    from fastvideo_nodes.testing.wan22 import TINY_TI2V
    ref = tiny_dit.diffusers_transformer(TINY_TI2V, seed=seed)
    ours = WanDiT(TINY_TI2V).eval()
    ours.load_state_dict(tiny_dit.diffusers_to_original(ref.state_dict()))
    return ours, ref


def test_dit_per_token_timesteps_equal_diffusers():
    ours, ref = _dit_pair()
    x = torch.randn(2, 48, 3, 4, 6)
    ctx = torch.randn(2, 512, 32)
    ts = torch.full((2, 3 * 2 * 3), 700.0)
    ts[1] = 420.0
    ts[:, :6] = 0.0  # the first latent frame's tokens: the image, clean
    with torch.no_grad():
        got, want = ours(x, ts, ctx), ref(x, ts, ctx, return_dict=False)[0]
        got_b, want_b = ours(x, torch.tensor([700.0, 420.0]), ctx), ref(x, torch.tensor([700.0, 420.0]), ctx,
                                                                      return_dict=False)[0]
    assert got.shape == (2, 48, 3, 4, 6)
    assert (got - want).abs().max() <= 1e-4
    assert (got_b - want_b).abs().max() <= 1e-4
    assert (got - got_b).abs().max() > 1e-3  # the per-token timesteps changed the result


def test_dit_uniform_per_token_equals_one_timestep():
    ours, _ = _dit_pair()
    x, ctx = torch.randn(1, 48, 2, 4, 4), torch.randn(1, 512, 32)
    with torch.no_grad():
        a = ours(x, torch.tensor([640.0]), ctx)
        b = ours(x, torch.full((1, 2 * 2 * 2), 640.0), ctx)
    assert (a - b).abs().max() <= 1e-5


def test_dit_per_token_timesteps_bad_shape():
    ours, _ = _dit_pair()
    with pytest.raises(FastVideoError, match=r"per-token timesteps must be \[batch, tokens\] = \[1, 8\], got \[1, 7\]"):
        ours(torch.randn(1, 48, 2, 4, 4), torch.zeros(1, 7), torch.randn(1, 512, 32))


# ----------------------------------------------------------------------------- pipeline


def _diffusers_t2v(folder, steps=3, seed=3):
    from diffusers import WanPipeline
    pipe = WanPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert pipe.config.expand_timesteps and pipe.vae_scale_factor_spatial == 16
    with torch.no_grad():
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=5.0,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **SIZE).frames, pipe


def _ours(gen, steps=3, seed=3, image=None):
    settings = gen.check_settings(SamplingSettings(steps=steps, guidance_scale=5.0, shift=5.0, seed=seed, **SIZE))
    first = gen.encode_image(image, settings) if image is not None else None
    return gen.sample(gen.encode_prompt(PROMPT), gen.encode_prompt(NEGATIVE), settings, first_frame=first)


def test_t2v_latents_equal_diffusers(wan22_set, folder_gen):
    want, _ = _diffusers_t2v(wan22_set["folder"])
    got = raw_to_model(_ours(folder_gen))
    assert got.shape == want.shape == (1, 48, 2, 4, 6)
    assert (got - want).abs().max().item() <= 1e-3


def test_ti2v_image_latents_equal_diffusers(wan22_set, folder_gen, image):
    from diffusers import WanImageToVideoPipeline
    _, pipe = _diffusers_t2v(wan22_set["folder"], steps=1)
    ipipe = WanImageToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                    scheduler=pipe.scheduler, transformer=pipe.transformer, expand_timesteps=True)
    with torch.no_grad():
        # Embeddings given: diffusers' I2V prompt cleaning needs ftfy; these are its T2V encoder's, at 512.
        pe, ne = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True, max_sequence_length=512,
                                    device=torch.device("cpu"))
        want = ipipe(image=image, prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=3,
                     guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3), output_type="latent",
                     **SIZE).frames
    got = raw_to_model(_ours(folder_gen, image=image))
    assert (got - want).abs().max().item() <= 1e-3
    t2v = raw_to_model(_ours(folder_gen))
    assert (got[:, :, 1:] - t2v[:, :, 1:]).abs().max() > 1e-2  # the image conditioned the later frames


def test_ti2v_first_frame_is_the_image(folder_gen, image):
    settings = folder_gen.check_settings(SamplingSettings(steps=2, seed=1, shift=5.0, **SIZE))
    first = folder_gen.encode_image(image, settings)
    latents = folder_gen.sample(folder_gen.encode_prompt(PROMPT), None, settings, first_frame=first)
    assert torch.allclose(raw_to_model(latents)[:, :, :1], first.latent, atol=1e-5)
    # A ComfyUI IMAGE tensor of the same picture gives the same condition.
    tensor = torch.from_numpy(np.asarray(image).astype(np.float32) / 255).unsqueeze(0)
    assert torch.allclose(folder_gen.encode_image(tensor, settings).latent, first.latent, atol=1e-6)


def test_comfy_files_equal_folder(wan22_set, folder_gen, image):
    c = wan22_set["comfy_fp32"]
    gen = VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"], device="cpu",
                                         dtype="fp32")
    assert (_ours(gen, steps=2, image=image) - _ours(folder_gen, steps=2, image=image)).abs().max() <= 1e-5


def test_generate_video_with_image(wan22_set, image, tmp_path):
    c = wan22_set["comfy_fp32"]
    gen = VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"], device="cpu")
    r = gen.generate_video(PROMPT, image=image, num_inference_steps=2, seed=1, output_path=str(tmp_path / "v.mp4"),
                           **SIZE)
    assert r.latents.shape == (1, 48, 2, 4, 6)
    assert r.frames.shape == (5, 64, 96, 3) and 0 <= r.frames.min() and r.frames.max() <= 1


def test_wan22_defaults(folder_gen, sampling_settings):
    s = sampling_settings(folder_gen, PROMPT, num_inference_steps=1)
    assert (s.height, s.width, s.num_frames, s.shift) == (704, 1280, 121, 5.0)
    assert (s.latent_channels, s.vae_stride) == (48, 16) and s.latent_shape == (1, 48, 31, 44, 80)


# ----------------------------------------------------------------------------- bad inputs


def test_vae_and_dit_of_different_versions_refused(wan22_set, tiny_model_set):
    wan21, wan22 = tiny_model_set["comfy_fp32"], wan22_set["comfy_fp32"]
    settings = SamplingSettings(steps=1, height=64, width=96, num_frames=5)
    gen = VideoGenerator.from_pretrained(wan21["model"], text_encoder=wan21["text_encoder"], vae=wan22["vae"],
                                         device="cpu")
    with pytest.raises(ModelFileError, match=r"vae: '.*wan2.2_vae_tiny.safetensors' is the Wan2.2 VAE \(48 channels\), "
                       r"but the model '.*wan2.1_t2v_tiny.safetensors' is Wan2.1 .*use wan_2.1_vae.safetensors"):
        gen.check_settings(settings)
    gen = VideoGenerator.from_pretrained(wan22["model"], text_encoder=wan22["text_encoder"], vae=wan21["vae"],
                                         device="cpu")
    with pytest.raises(ModelFileError, match=r"is the Wan2.1 VAE \(16 channels\), but the model .* is Wan2.2 "
                       r"TI2V-5B .*use wan2.2_vae.safetensors"):
        gen.check_settings(settings)


def test_wan22_size_must_be_multiple_of_32(folder_gen):
    with pytest.raises(FastVideoError, match="height must be a positive multiple of 32 for Wan2.2 TI2V-5B, got 48; "
                       "nearest valid: 32 or 64"):
        folder_gen.check_settings(SamplingSettings(height=48, width=96, num_frames=5))


def test_image_with_wan21_model_refused(tiny_model_set, image):
    c = tiny_model_set["comfy_fp32"]
    gen = VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"], device="cpu")
    with pytest.raises(FastVideoError, match="is Wan2.1 text-to-video, which takes no image"):
        gen.generate_video(PROMPT, image=image, num_inference_steps=1, height=32, width=48, num_frames=5)


def test_ti2v_takes_no_clip_embeds_and_sample_takes_encode_images_result(folder_gen, image):
    """The one image input dispatches on the model: a TI2V-5B gets a FirstFrame, never CLIP embeddings."""
    settings = folder_gen.check_settings(SamplingSettings(steps=1, **SIZE))
    with pytest.raises(FastVideoError, match="image_embeds .*Wan2.2 TI2V-5B uses no CLIP image embeddings"):
        folder_gen.encode_image(image, settings, image_embeds=torch.zeros(1, 257, 1280))
    first = folder_gen.encode_image(image, settings)
    assert isinstance(first, ti2v.FirstFrame)
    pos = folder_gen.encode_prompt(PROMPT)
    assert torch.equal(folder_gen.sample(pos, None, settings, image_condition=first),
                       folder_gen.sample(pos, None, settings, first_frame=first))


@pytest.mark.parametrize("bad,needle", [
    ("/no/such/picture.png", "image: '/no/such/picture.png' does not exist"),
    (torch.rand(3, 64, 96), r"image: expected \[H,W,3\] .*got \[3, 64, 96\]"),
    (torch.full((64, 96, 3), 2.0), "values must be finite and in 0..1"),
    (12, "image must be a file path, a PIL image or an IMAGE tensor"),
])
def test_bad_images(folder_gen, bad, needle):
    with pytest.raises(FastVideoError, match=needle):
        folder_gen.generate_video(PROMPT, image=bad, num_inference_steps=1, **SIZE)


def test_image_of_another_size_is_cut_and_resized(folder_gen, image):
    settings = folder_gen.check_settings(SamplingSettings(steps=1, **SIZE))
    big = image.resize((192, 128))
    assert folder_gen.encode_image(big, settings).latent.shape == (1, 48, 1, 4, 6)
    # Another aspect ratio: the middle is kept (as ComfyUI's Wan22ImageToVideoLatent), not stretched.
    wide = torch.rand(128, 400, 3, generator=torch.Generator().manual_seed(2))
    middle = wide[:, 8:392]  # 384×128 = the video's 3:2
    assert torch.allclose(ti2v.image_to_video_tensor(wide, 64, 96), ti2v.image_to_video_tensor(middle, 64, 96))
    tall = wide.transpose(0, 1).contiguous()  # 128 wide, 400 tall: the middle 86 rows are 3:2
    assert torch.allclose(ti2v.image_to_video_tensor(tall, 64, 96), ti2v.image_to_video_tensor(tall[157:243], 64, 96))


def test_decode_checks_channels(folder_gen):
    with pytest.raises(FastVideoError, match="latents: 16 channels, but the VAE .* decodes 48"):
        folder_gen.decode(torch.zeros(1, 16, 1, 4, 6))


def test_5b_dit_loads_from_shapes(wan22_set):
    from fastvideo_nodes.loading.dit import read_dit_config
    cfg = read_dit_config(wan22_set["comfy_fp32"]["model"])
    assert (cfg.in_channels, cfg.out_channels) == (48, 48) and ti2v.geometry(cfg) == (48, 16)
    sd = load_file(wan22_set["comfy_fp32"]["model"])
    assert cfg.patch_size == (1, 2, 2) and "head.modulation" in sd


def test_5b_shaped_state_dict_keeps_channels(tmp_path, wan22_set):
    from fastvideo_nodes.loading.dit import load_dit
    sd = load_file(wan22_set["comfy_fp32"]["model"])
    sd["head.head.weight"] = sd["head.head.weight"][:64].contiguous()
    sd["head.head.bias"] = sd["head.head.bias"][:64].contiguous()
    p = str(tmp_path / "mixed.safetensors")
    save_file(sd, p)
    with pytest.raises(ModelFileError, match="takes 48 input channels .* but its head gives 16"):
        load_dit(p)


def test_sampler_node_image_input_equals_api(folder_gen, image, monkeypatch):
    import os
    import sys
    import types
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import nodes as fv
    previews = []

    class ProgressBar:  # ComfyUI's, as the server has it: each step sends a preview of the 48-channel x0
        def __init__(self, total):
            pass

        def update_absolute(self, value, total=None, preview=None):
            previews.append(preview[1].size)
    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=ProgressBar)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)  # type: ignore[attr-defined]
    tensor = torch.from_numpy(np.asarray(image).astype(np.float32) / 255).unsqueeze(0)  # ComfyUI IMAGE
    pos, neg = folder_gen.encode_prompt(PROMPT), folder_gen.encode_prompt(NEGATIVE)
    (out,) = fv.FastVideoSampler().sample(
        model=folder_gen, positive=[[pos, {}]], negative=[[neg, {}]], width=96, height=64, num_frames=5, steps=2,
        cfg=5.0, shift=5.0, scheduler="unipc", seed=3, cfg_gate=1.0, teacache_threshold=0.0, image=tensor)
    assert previews == [(6, 4), (6, 4)]  # PIL size: latent width × height
    assert (out["samples"] - _ours(folder_gen, steps=2, image=image)).abs().max() <= 1e-6
    (frames,) = fv.DecodeVAE().decode(model=folder_gen, samples=out)
    assert frames.shape == (5, 64, 96, 3)


def test_cli_generate_with_image(wan22_set, image, tmp_path, capsys):
    from fastvideo_nodes.cli import main as cli_main
    from fastvideo_nodes.video import read_video_info
    c = wan22_set["comfy_fp32"]
    png = str(tmp_path / "start.png")
    image.save(png)
    out = str(tmp_path / "o.mp4")
    code = cli_main(["generate", "--model", c["model"], "--text-encoder", c["text_encoder"], "--vae", c["vae"],
                     "--prompt", PROMPT, "--image", png, "--height", "64", "--width", "96", "--num-frames", "5",
                     "--steps", "1", "--device", "cpu", "--output", out])
    assert code == 0 and "5 frames 96x64" in capsys.readouterr().out
    assert read_video_info(out) == (5, 64, 96)


def test_fastwan22_dmd_recipe_runs_with_image(folder_gen, image):
    """FastWan2.2-TI2V-5B is this DiT distilled for DMD (3 steps, no guidance): the few-step path
    draws its step noise in the 48-channel geometry and keeps the image's frame."""
    settings = folder_gen.check_settings(SamplingSettings(scheduler="dmd", guidance_scale=1.0, seed=2, **SIZE))
    first = folder_gen.encode_image(image, settings)
    latents = folder_gen.sample(folder_gen.encode_prompt(PROMPT), None, settings, first_frame=first)
    assert latents.shape == (1, 48, 2, 4, 6) and bool(torch.isfinite(latents).all())
    assert torch.allclose(raw_to_model(latents)[:, :, :1], first.latent, atol=1e-5)


@pytest.mark.gpu
def test_cuda_ti2v_equals_cpu(wan22_set, image):
    """The lead's GPU run: TI2V on CUDA (fp32 and bf16) agrees with the CPU, VAE decode included."""
    c = wan22_set["comfy_fp32"]
    out = {}
    for device, dtype in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
        gen = VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"], device=device,
                                             dtype=dtype, attention_backend="TORCH_SDPA")
        z = _ours(gen, steps=3, image=image)
        frames = gen.decode(z)
        assert frames.shape == (5, 64, 96, 3) and bool(torch.isfinite(frames).all())
        out[device, dtype] = z, frames
        gen.close()
    cpu_z, cpu_frames = out["cpu", "fp32"]
    assert (out["cuda", "fp32"][0] - cpu_z).abs().max().item() < 1e-2
    assert (out["cuda", "fp32"][1] - cpu_frames).abs().max().item() < 1e-2
    bf16_z = out["cuda", "bf16"][0]
    assert ((bf16_z - cpu_z).norm() / cpu_z.norm()).item() < 0.1


def test_vae22_tiled_decode(wan22_set):
    vae = load_vae(wan22_set["comfy_fp32"]["vae"])
    z = torch.randn(1, 48, 2, 8, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole, tiled, one_tile = vae.decode(z), vae.decode(z, tile=6), vae.decode(z, tile=12)
    assert whole.shape == tiled.shape == (1, 3, 5, 128, 192)
    assert torch.equal(one_tile, whole)  # a tile as large as the latent is the whole frame
    assert (tiled - whole).abs().mean().item() < 0.2 and bool(torch.isfinite(tiled).all())


def test_memory_plan_counts_5b_tokens(folder_gen):
    """704×1280×121 on the 5B is 31×22×40 = 27,280 tokens (not the 109,120 of a 1/8 VAE)."""
    from fastvideo_nodes.memory.planner import VideoShape
    shape = folder_gen._video_shape(704, 1280, 121)
    assert shape.vae_stride == 16 and shape.tokens == 27280
    assert VideoShape(704, 1280, 121).tokens == 4 * 27280  # Wan2.1 geometry, unchanged


def test_real_sizes_read_back_from_shapes():
    """The full-size architectures (meta tensors, no weights): the 2.2 VAE is the 1.41 GB fp16 file
    (705M parameters), the TI2V-5B DiT ~5B; both are read back from their tensor shapes, and the
    diffusers AutoencoderKLWan 2.2 names map one to one onto ours."""
    from diffusers import AutoencoderKLWan

    from fastvideo_nodes.loading.dit import config_from_shapes as dit_config
    from fastvideo_nodes.loading.keymaps import vae_name
    from fastvideo_nodes.loading.vae import config_from_shapes as vae_config
    from fastvideo_nodes.models.wan_dit import WanDiTConfig
    from fastvideo_nodes.models.wan_vae import WAN22_VAE, WanVAE
    five_b = WanDiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_channels=48, out_channels=48)
    with torch.device("meta"):
        vae, dit = WanVAE(WAN22_VAE), WanDiT(five_b)
        ref = AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12,
                                       out_channels=12, patch_size=2, scale_factor_spatial=16,
                                       latents_mean=LATENT_MEAN_22, latents_std=LATENT_STD_22)
    vae_shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert 704e6 < sum(p.numel() for p in vae.parameters()) < 706e6
    assert vae_config(vae_shapes) == WAN22_VAE
    assert {vae_name(k, residual=True): tuple(v.shape) for k, v in ref.state_dict().items()} == vae_shapes
    assert 4.9e9 < sum(p.numel() for p in dit.parameters()) < 5.1e9
    assert dit_config({k: tuple(v.shape) for k, v in dit.state_dict().items()}) == five_b


@pytest.mark.parametrize("kw", [dict(height=64, width=96),  # 3 frames × 6 tokens: the image's 6 on rank 0
                                dict(height=96, width=32),  # 3 × 3 = 9 tokens, padded to 10
                                dict(height=64, width=96, teacache_threshold=3.0, teacache_coefficients=[1.0, 0.0])])
def test_ti2v_on_two_workers_equals_one_process(wan22_set, folder_gen, image, kw):
    """Sequence parallel (2 CPU workers): the per-token modulation is sharded with its tokens."""
    from fastvideo_nodes.parallel import WorkerPool
    from fastvideo_nodes.pipeline.sampler import SamplingStats, denoise, initial_noise
    settings = folder_gen.check_settings(SamplingSettings(steps=3, seed=5, num_frames=9, shift=5.0, **kw))
    first = folder_gen.encode_image(image, settings)
    pos, neg = folder_gen.encode_prompt(PROMPT), folder_gen.encode_prompt(NEGATIVE)
    ref_stats, par_stats = SamplingStats(), SamplingStats()
    with torch.no_grad():
        ref = denoise(folder_gen.dit, initial_noise(settings), pos, neg, settings, first_frame=first, stats=ref_stats)
    pool = WorkerPool(wan22_set["comfy_fp32"]["model"], num_gpus=2, device="cpu", dtype=torch.float32)
    try:
        out = pool.sample(initial_noise(settings), pos, neg, settings, first_frame=first, stats=par_stats)
    finally:
        pool.close()
    assert (out - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()
    assert par_stats.teacache_skipped == ref_stats.teacache_skipped


def test_compiled_blocks_per_token_equal_eager():
    ours, _ = _dit_pair()
    x, ctx = torch.randn(1, 48, 2, 4, 4), torch.randn(1, 512, 32)
    ts = torch.full((1, 8), 640.0)
    ts[:, :4] = 0.0
    with torch.inference_mode():
        want = ours(x, ts, ctx)
        got = ours.compile_blocks()(x, ts, ctx)
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item() + 1e-6


def test_load_plans_and_warms_for_the_models_own_size(wan22_set, tiny_model_set, monkeypatch):
    """load() without a size: TI2V-5B's 704×1280×121 at 1/16, Wan2.1's 480×832×81 at 1/8 (what the
    loader node's warm-up then runs at)."""
    from fastvideo_nodes.memory.placement import Placement
    seen = []
    real = Placement.prepare
    monkeypatch.setattr(Placement, "prepare", lambda self, shape: seen.append(shape) or real(self, shape))
    c = tiny_model_set["comfy_fp32"]
    shapes = []
    for gen in (VideoGenerator.from_pretrained(wan22_set["folder"], device="cpu", dtype="fp32"),
                VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"],
                                               device="cpu", dtype="fp32")):
        seen.clear()
        with gen:
            gen.load()
        shapes.append({(s.height, s.width, s.num_frames, s.vae_stride) for s in seen})
    assert shapes == [{(704, 1280, 121, 16)}, {(480, 832, 81, 8)}]
