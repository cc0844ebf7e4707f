"""Wan2.1 image-to-video: the DiT's image branch, the CLIP vision encoder and the whole pipeline equal
diffusers / transformers on identical tiny random weights, in the diffusers folder and Comfy file layouts;
bad inputs give clear errors."""
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastvideo_nodes.errors import FastVideoError, ModelFileError
from fastvideo_nodes.loading import detect
from fastvideo_nodes.loading.clip_vision import load_image_encoder
from fastvideo_nodes.loading.dit import load_dit, read_dit_config
from fastvideo_nodes.models.wan_vae import raw_to_model
from fastvideo_nodes.pipeline.generator import VideoGenerator
from fastvideo_nodes.pipeline.image_condition import as_image, first_frame_mask, fit
from fastvideo_nodes.pipeline.sampler import SamplingSettings
from fastvideo_nodes.testing import dit as tiny_dit
from fastvideo_nodes.testing import i2v as tiny_i2v

diffusers = pytest.importorskip("diffusers")

PROMPT = "a small red boat drifting on a calm lake at sunset"
NEGATIVE = "blurry, static, low quality"
SIZE = dict(height=32, width=48, num_frames=5)


@pytest.fixture(scope="module")
def model_set(tmp_path_factory):
    return tiny_i2v.build_i2v_model_set(str(tmp_path_factory.mktemp("i2v")), seed=0)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE["height"], SIZE["width"], 3), dtype=np.uint8))


def comfy_generator(files, **kw):
    return VideoGenerator.from_pretrained(files["model"], text_encoder=files["text_encoder"], vae=files["vae"],
                                          image_encoder=files["image_encoder"], device="cpu", dtype="fp32", **kw)


# ----------------------------------------------------------------------------- the DiT

@pytest.mark.parametrize("layout", ["diffusers_folder", "comfy_single_file"])
def test_dit_equals_diffusers_i2v_transformer(model_set, tmp_path, layout):
    ref = tiny_i2v.diffusers_i2v_transformer(tiny_i2v.TINY_I2V, seed=5)
    if layout == "diffusers_folder":
        ref.save_pretrained(str(tmp_path / "transformer"))
        path = str(tmp_path)
    else:
        path = tiny_dit.save_original(tiny_dit.diffusers_to_original(ref.state_dict()),
                                      str(tmp_path / "wan2.1_i2v.safetensors"), dtype=None,
                                      prefix="model.diffusion_model.")
    ours = load_dit(path)
    assert ours.cfg.image_dim == tiny_i2v.CLIP_WIDTH and ours.cfg.in_channels == 36
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(1, 16, 2, 4, 6, generator=g), torch.randn(1, 20, 2, 4, 6, generator=g)
    text = torch.randn(1, 9, tiny_i2v.TINY_I2V.text_dim, generator=g)
    image = torch.randn(1, tiny_i2v.CLIP_TOKENS, tiny_i2v.CLIP_WIDTH, generator=g)
    t = torch.tensor([733.0])
    with torch.no_grad():
        want = ref(hidden_states=torch.cat([x, cond], 1), timestep=t, return_dict=False,
                   encoder_hidden_states=torch.nn.functional.pad(text, (0, 0, 0, 512 - 9)),
                   encoder_hidden_states_image=image)[0]
        got = ours(x, t, text, condition=cond, image_embeds=image)
    err = (got - want).abs().max().item()
    print(f"I2V DiT ({layout}): max abs err {err:.2e} (output scale {want.abs().max():.2f})")
    assert err <= 1e-4
    # The image branch matters: other image tokens (their order alone would not: no positions) change it.
    with torch.no_grad():
        other = ours(x, t, text, condition=cond, image_embeds=torch.randn(image.shape, generator=g))
    assert (other - got).abs().max().item() > 1e-3


def test_dit_needs_its_image_inputs(model_set):
    dit = load_dit(model_set["comfy_fp32"]["model"])
    x, text = torch.zeros(1, 16, 1, 2, 2), torch.zeros(1, 4, tiny_i2v.TINY_I2V.text_dim)
    with pytest.raises(FastVideoError, match="image-to-video model needs the CLIP image embeddings"):
        dit(x, torch.tensor([500.0]), text, condition=torch.zeros(1, 20, 1, 2, 2))
    with pytest.raises(FastVideoError, match="needs the image condition"):
        dit(x, torch.tensor([500.0]), text, image_embeds=torch.zeros(1, 3, tiny_i2v.CLIP_WIDTH))


def test_detect_kinds(model_set):
    from fastvideo_nodes.loading.files import all_keys
    folder = model_set["folder"]
    kinds = {
        "comfy dit": all_keys([model_set["comfy"]["model"]], "x"),
        "diffusers dit": all_keys([os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors")], "x"),
        "comfy clip": all_keys([model_set["comfy"]["image_encoder"]], "x"),
        "diffusers clip": all_keys([os.path.join(folder, "image_encoder", "model.safetensors")], "x"),
    }
    assert {k: detect.kind_of(v) for k, v in kinds.items()} == {
        "comfy dit": "wan_i2v", "diffusers dit": "wan_i2v_diffusers",
        "comfy clip": "clip_vision", "diffusers clip": "clip_vision"}
    assert read_dit_config(folder).image_dim == read_dit_config(model_set["comfy"]["model"]).image_dim == 160


# ----------------------------------------------------------------------------- CLIP vision

@pytest.mark.parametrize("layout", ["diffusers_folder", "comfy_single_file"])
def test_clip_embeds_equal_transformers(model_set, picture, layout):
    from transformers import CLIPVisionModel
    folder = model_set["folder"]
    ref = CLIPVisionModel.from_pretrained(os.path.join(folder, "image_encoder")).eval()
    enc = load_image_encoder(folder if layout == "diffusers_folder" else model_set["comfy_fp32"]["image_encoder"])
    pixels = enc.pixels(picture)
    assert pixels.shape == (1, 3, tiny_i2v.CLIP_IMAGE, tiny_i2v.CLIP_IMAGE)
    with torch.no_grad():
        want = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    got = enc.encode(picture)
    assert got.shape == (1, tiny_i2v.CLIP_TOKENS, tiny_i2v.CLIP_WIDTH)
    assert (got - want).abs().max().item() <= 1e-5


def test_clip_preprocessing_matches_diffusers_image_processor(model_set, picture):
    from transformers import CLIPImageProcessorPil
    want = CLIPImageProcessorPil.from_pretrained(os.path.join(model_set["folder"], "image_processor"))
    enc = load_image_encoder(model_set["folder"])
    assert torch.equal(enc.pixels(picture), want(images=picture, return_tensors="pt")["pixel_values"])


# ----------------------------------------------------------------------------- the pipeline

def diffusers_latents(folder, image, monkeypatch, steps=4, guidance=5.0, seed=11):
    from diffusers import WanImageToVideoPipeline
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v
    # diffusers' I2V pipeline calls ftfy unconditionally; use the T2V pipeline's cleaning, which skips it.
    monkeypatch.setattr(pipeline_wan_i2v, "basic_clean", pipeline_wan.basic_clean)
    pipe = WanImageToVideoPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    with torch.no_grad():
        out = pipe(image=image, prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                   guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed),
                   output_type="latent", **SIZE)
    return out.frames  # model space [1,16,T',H',W']


def our_latents(gen, image, steps=4, guidance=5.0, seed=11):
    settings = SamplingSettings(steps=steps, guidance_scale=guidance, shift=3.0, seed=seed, **SIZE)
    condition, embeds = gen.encode_image(image, settings)
    return gen.sample(gen.encode_prompt(PROMPT), gen.encode_prompt(NEGATIVE), settings, condition=condition,
                      image_embeds=embeds)


def test_pipeline_latents_equal_diffusers_i2v(model_set, picture, monkeypatch):
    want = diffusers_latents(model_set["folder"], picture, monkeypatch)
    gen = VideoGenerator.from_pretrained(model_set["folder"], device="cpu", dtype="fp32")
    got = raw_to_model(our_latents(gen, picture))
    err = (got - want).abs().max().item()
    print(f"I2V pipeline UniPC 4 steps: max abs err {err:.2e} (latent scale {want.abs().max():.2f})")
    assert err <= 1e-3


def test_comfy_single_files_equal_diffusers_folder(model_set, picture):
    a = our_latents(VideoGenerator.from_pretrained(model_set["folder"], device="cpu", dtype="fp32"), picture)
    b = our_latents(comfy_generator(model_set["comfy_fp32"]), picture)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()  # fp32 rounding only (latents reach ~5)


def test_condition_is_mask_then_first_frame_latent(model_set, picture):
    gen = comfy_generator(model_set["comfy_fp32"])
    settings = SamplingSettings(**SIZE)
    condition, _ = gen.encode_image(picture, settings)
    assert condition.shape == (1, 20, 2, 4, 6)
    assert torch.equal(condition[:, :4], first_frame_mask(2, 4, 6))
    # The first latent frame is the image's own latent (the VAE is causal: the zeros after it do not reach it).
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255) * 2 - 1
    alone = raw_to_model(gen.vae.encode(pixels.permute(2, 0, 1)[None, :, None]))
    assert (condition[:, 4:, :1] - alone).abs().max().item() <= 1e-5


def test_generate_video_takes_comfy_image_tensor_like_a_pil_image(model_set, picture, tmp_path):
    gen = comfy_generator(model_set["comfy_fp32"])
    kw = dict(num_inference_steps=2, guidance_scale=1.0, seed=3, **SIZE)
    tensor = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255)[None]  # ComfyUI IMAGE [1,H,W,3]
    path = str(tmp_path / "start.png")
    picture.save(path)
    a = gen.generate_video(PROMPT, image=tensor, **kw)
    b = gen.generate_video(PROMPT, image=path, output_path=str(tmp_path / "out.mp4"), **kw)
    assert torch.equal(a.latents, b.latents) and os.path.getsize(tmp_path / "out.mp4") > 0
    assert a.frames.shape == (5, 32, 48, 3) and "image_s" in a.timings


def test_image_of_another_aspect_is_centre_cropped_with_a_log_line(caplog):
    wide = Image.fromarray(np.arange(40 * 120 * 3, dtype=np.uint8).reshape(40, 120, 3) % 251)
    with caplog.at_level(logging.INFO, logger="fastvideo_nodes.pipeline.image_condition"):
        out = fit(wide, 32, 48)
    assert out.size == (48, 32) and "centre-cropped to 60x40" in caplog.text
    want = wide.crop((30, 0, 90, 40)).resize((48, 32), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out), np.asarray(want))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastvideo_nodes.pipeline.image_condition"):
        same_aspect = fit(wide.crop((0, 0, 60, 40)), 32, 48)
    assert same_aspect.size == (48, 32) and "resized from 60x40" in caplog.text and "cropped" not in caplog.text


# ----------------------------------------------------------------------------- bad inputs

def test_i2v_model_without_an_image(model_set):
    gen = comfy_generator(model_set["comfy"])
    with pytest.raises(FastVideoError, match="image: this is an image-to-video model; give the start image"):
        gen.generate_video(PROMPT, **SIZE)


def test_image_given_to_a_text_to_video_model(tmp_path, model_set, picture):
    t2v = tiny_dit.save_original(tiny_dit.random_dit().state_dict(), str(tmp_path / "t2v.safetensors"))
    c = model_set["comfy"]
    gen = VideoGenerator.from_pretrained(t2v, text_encoder=c["text_encoder"], vae=c["vae"], device="cpu")
    with pytest.raises(FastVideoError, match="image: the model .* is Wan2.1 text-to-video, which takes no image; "
                       "for image-to-video load a Wan2.1 I2V model .* or Wan2.2 TI2V-5B"):
        gen.generate_video(PROMPT, image=picture, **SIZE)


def test_i2v_single_file_without_the_image_encoder(model_set, picture):
    c = model_set["comfy"]
    gen = VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"], device="cpu")
    with pytest.raises(ModelFileError, match=r"image_encoder: not given.*--image-encoder FILE"):
        gen.generate_video(PROMPT, image=picture, **SIZE)


@pytest.mark.parametrize("image,needle", [
    (42, "got int"),
    ("missing.png", "does not exist"),
    ("not_an_image.txt", "is not an image that can be read"),
    (torch.zeros(3, 32, 48), r"shape \(3, 32, 48\).*is not one image"),
    (torch.zeros(2, 32, 48, 3), r"shape \(2, 32, 48, 3\)"),
    (torch.zeros(32, 48, 3, dtype=torch.uint8), "dtype torch.uint8"),
    (torch.full((32, 48, 3), float("nan")), "NaN or inf"),
])
def test_bad_images_are_refused(image, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not_an_image.txt").write_text("hello")
    with pytest.raises(FastVideoError, match=f"image: .*{needle}"):
        as_image(image)


def test_clip_file_in_the_wrong_slot_is_named(model_set):
    clip = model_set["comfy"]["image_encoder"]
    with pytest.raises(ModelFileError, match="is a CLIP vision image encoder .*load it as the image encoder"):
        load_dit(clip)
    c = model_set["comfy"]
    gen = VideoGenerator.from_pretrained(c["model"], text_encoder=clip, vae=c["vae"], image_encoder=clip,
                                         device="cpu")
    with pytest.raises(ModelFileError, match="Text encoder: .* is a CLIP vision image encoder"):
        gen.encode_prompt(PROMPT)


def test_other_file_given_as_the_image_encoder(model_set):
    with pytest.raises(ModelFileError, match="Image encoder: .* is a Wan2.1 image-to-video diffusion model.*"
                                             "expected a CLIP vision image encoder"):
        load_image_encoder(model_set["comfy"]["model"])
    with pytest.raises(ModelFileError, match="Image encoder: .* is a Wan2.1 VAE"):
        load_image_encoder(model_set["comfy"]["vae"])


def test_image_encoder_of_another_width_is_refused(model_set, tmp_path, picture):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    other = CLIPVisionModel(CLIPVisionConfig(hidden_size=80, intermediate_size=160, num_hidden_layers=2,
                                             num_attention_heads=1, image_size=28, patch_size=14))
    path = tiny_i2v.save_clip_comfy(other, str(tmp_path / "clip_other.safetensors"))
    c = model_set["comfy"]
    gen = VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"],
                                         image_encoder=path, device="cpu")
    with pytest.raises(ModelFileError, match="gives 80-wide image tokens but the model takes 160"):
        gen.encode_image(picture, SamplingSettings(**SIZE))


# ----------------------------------------------------------------------------- CLI

def test_cli_generate_with_image_writes_video(model_set, picture, tmp_path):
    from fastvideo_nodes.cli import main as cli_main
    c = model_set["comfy_fp32"]
    start, out = str(tmp_path / "start.png"), str(tmp_path / "out.mp4")
    picture.save(start)
    args = ["generate", "--model", c["model"], "--text-encoder", c["text_encoder"], "--vae", c["vae"],
            "--image-encoder", c["image_encoder"], "--image", start, "--prompt", PROMPT, "--height", "32",
            "--width", "48", "--num-frames", "5", "--steps", "2", "--device", "cpu", "--precision", "fp32",
            "--output", out, "--latents-out", str(tmp_path / "lat.safetensors")]
    assert cli_main(args) == 0 and os.path.getsize(out) > 0
    from safetensors.torch import load_file
    gen = comfy_generator(c)
    want = gen.generate_video(PROMPT, image=start, num_inference_steps=2, seed=0, **SIZE).latents
    assert torch.equal(load_file(str(tmp_path / "lat.safetensors"))["latents"], want)


@pytest.mark.parametrize("extra,needle", [
    ([], "image: this is an image-to-video model; give the start image"),
    (["--image", "nowhere.png"], "image: 'nowhere.png' does not exist"),
])
def test_cli_i2v_errors_are_one_clear_line(model_set, capsys, tmp_path, monkeypatch, extra, needle):
    from fastvideo_nodes.cli import main as cli_main
    monkeypatch.chdir(tmp_path)
    c = model_set["comfy"]
    args = ["generate", "--model", c["model"], "--text-encoder", c["text_encoder"], "--vae", c["vae"],
            "--image-encoder", c["image_encoder"], "--prompt", PROMPT, "--device", "cpu", *extra]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- ComfyUI nodes

def test_nodes_i2v_chain_equals_the_engine(model_set, picture):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import nodes as fv
    c = model_set["comfy_fp32"]
    (model,) = fv.LoadFastVideoModel().load(model=c["model"], text_encoder=c["text_encoder"], vae=c["vae"],
                                            precision="fp32", weight_storage="as_stored",
                                            clip_vision=c["image_encoder"])
    assert model._parts.image_encoder is not None  # loaded by the node with the rest
    pos, neg = fv.EncodePrompt().encode(model=model, prompt=PROMPT, negative_prompt=NEGATIVE)
    image = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255)[None]  # native IMAGE [1,H,W,3]
    kw = dict(model=model, positive=pos, negative=neg, steps=2, cfg=5.0, shift=3.0, scheduler="unipc", seed=3,
              cfg_gate=1.0, teacache_threshold=0.0, **SIZE)
    (latent,) = fv.FastVideoSampler().sample(**kw, image=torch.cat([image, image.flip(1)]))  # first of a batch
    settings = SamplingSettings(steps=2, seed=3, **SIZE)
    condition, embeds = model.encode_image(picture, settings)
    want = model.sample(pos[0][0], neg[0][0], settings, condition=condition, image_embeds=embeds)
    assert torch.equal(latent["samples"], want)
    with pytest.raises(FastVideoError, match="image-to-video model; give the start image"):
        fv.FastVideoSampler().sample(**kw)


# ----------------------------------------------------------------------------- GPU (the lead runs these)

@pytest.mark.gpu
def test_cuda_i2v_matches_cpu_and_offload_and_fp8_run(model_set, picture):
    files = model_set["comfy"]
    cpu = our_latents(comfy_generator(model_set["comfy_fp32"]), picture)
    gpu = our_latents(VideoGenerator.from_pretrained(
        files["model"], text_encoder=files["text_encoder"], vae=files["vae"], image_encoder=files["image_encoder"],
        device="cuda", dtype="fp32", attention_backend="TORCH_SDPA"), picture)
    assert (gpu - cpu).abs().max().item() < 1e-2

    def bf16(**kw):
        return our_latents(VideoGenerator.from_pretrained(
            files["model"], text_encoder=files["text_encoder"], vae=files["vae"],
            image_encoder=files["image_encoder"], device="cuda", dtype="bf16", **kw), picture)
    ref = bf16()
    assert ((ref - cpu).norm() / cpu.norm()).item() < 0.1
    offloaded = bf16(gpu_memory_gb=1e-6)  # every block streamed, encoders moved in per phase
    assert ((offloaded - ref).norm() / ref.norm()).item() < 0.05
    fp8 = bf16(weight_dtype=torch.float8_e4m3fn)
    assert ((fp8 - ref).norm() / ref.norm()).item() < 0.2


# ----------------------------------------------------------------------------- LoRA on an I2V model

@pytest.mark.parametrize("prefix,k_img", [("diffusion_model.", "blocks.1.cross_attn.k_img"),
                                          ("transformer.", "blocks.1.attn2.add_k_proj")])
def test_lora_on_image_layers_merges_into_the_i2v_model(model_set, tmp_path, prefix, k_img):
    from safetensors.torch import save_file

    from fastvideo_nodes.loading.lora import set_loras
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(4, 256, generator=g) * 0.1, torch.randn(256, 4, generator=g) * 0.1
    suffix = (".lora_down.weight", ".lora_up.weight") if prefix == "diffusion_model." else \
        (".lora_A.weight", ".lora_B.weight")
    path = str(tmp_path / "i2v_lora.safetensors")
    save_file({prefix + k_img + suffix[0]: down, prefix + k_img + suffix[1]: up}, path)
    dit = load_dit(model_set["comfy_fp32"]["model"])
    base = dit.blocks[1].cross_attn.k_img.weight.clone()
    report = set_loras(dit, [(path, 1.0)])
    assert report.loras[0].matched == 2 and not report.loras[0].unmatched
    assert torch.allclose(dit.blocks[1].cross_attn.k_img.weight, base + up @ down, atol=1e-6)


def test_memory_estimate_counts_the_image_encoder_with_the_text_encoder(model_set):
    from fastvideo_nodes.loading.files import all_keys
    c = model_set["comfy"]
    with_clip = comfy_generator(c).placement.sizes()
    without = VideoGenerator.from_pretrained(c["model"], text_encoder=c["text_encoder"], vae=c["vae"],
                                             device="cpu", dtype="fp32").placement.sizes()
    clip_elements = sum(int(np.prod(e["shape"])) for e in all_keys([c["image_encoder"]], "x").values())
    assert with_clip.text_encoder_bytes - without.text_encoder_bytes == 4 * clip_elements  # fp32 compute dtype


def test_sampler_takes_native_clip_vision_output(model_set, picture):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import nodes as fv
    c = model_set["comfy_fp32"]
    # No clip_vision file on the loader: the embeds come from ComfyUI's CLIPVisionEncode instead.
    (model,) = fv.LoadFastVideoModel().load(model=c["model"], text_encoder=c["text_encoder"], vae=c["vae"],
                                            precision="fp32", weight_storage="as_stored")

    class Output:  # what ComfyUI's CLIPVisionEncode returns: attributes read by item
        def __init__(self, hidden):
            self.penultimate_hidden_states = hidden

        def __getitem__(self, key):
            return getattr(self, key)

    hidden = load_image_encoder(c["image_encoder"]).encode(picture)
    pos, neg = fv.EncodePrompt().encode(model=model, prompt=PROMPT, negative_prompt=NEGATIVE)
    image = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255)[None]
    kw = dict(model=model, positive=pos, negative=neg, steps=2, cfg=5.0, shift=3.0, scheduler="unipc", seed=3,
              cfg_gate=1.0, teacache_threshold=0.0, image=image, **SIZE)
    (latent,) = fv.FastVideoSampler().sample(**kw, clip_vision_output=Output(hidden))
    engine = comfy_generator(c)
    settings = SamplingSettings(steps=2, seed=3, **SIZE)
    condition, embeds = engine.encode_image(picture, settings)
    assert torch.equal(embeds, hidden)
    assert torch.equal(latent["samples"], engine.sample(pos[0][0], neg[0][0], settings, condition=condition,
                                                      image_embeds=embeds))
    with pytest.raises(FastVideoError, match=r"image_embeds: expected CLIP vision hidden states \[1, tokens, 160\]"):
        fv.FastVideoSampler().sample(**kw, clip_vision_output=Output(torch.zeros(1, 257, 1280)))
    with pytest.raises(FastVideoError, match="clip_vision_output: expected the output of ComfyUI's CLIPVisionEncode"):
        fv.FastVideoSampler().sample(**kw, clip_vision_output=object())
    with pytest.raises(ModelFileError, match="image_encoder: not given"):  # neither a file nor native embeds
        fv.FastVideoSampler().sample(**kw)
