"""Our Wan 2.1 VAE equals diffusers' AutoencoderKLWan on identical weights, in both file layouts."""
import pytest
import torch
from safetensors.torch import save_file

from fastvideo_nodes.errors import ModelFileError
from fastvideo_nodes.loading.vae import load_vae
from fastvideo_nodes.models.wan_vae import LATENT_MEAN, LATENT_STD, model_to_raw, raw_to_model
from fastvideo_nodes.testing.vae import diffusers_to_original, diffusers_vae, random_vae, save_original

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def ref():
    return diffusers_vae(base_dim=8, seed=4)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(d / "folder" / "vae")
    return {"folder": str(d / "folder"),
            "original": save_original(diffusers_to_original(ref.state_dict()), str(d / "wan_2.1_vae.safetensors")),
            "dir": d}


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layout", ["folder", "original"])
def test_decode_and_encode_equal_diffusers(ref, files, latents, layout):
    vae = load_vae(files[layout])
    assert vae.cfg.base_dim == 8
    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want_dec = ref.decode(latents).sample
        want_enc = ref.encode(video).latent_dist.mean
        got_dec, got_enc = vae.decode(latents), vae.encode(video)
    assert got_dec.shape == (1, 3, 9, 32, 48) and got_enc.shape == (1, 16, 3, 4, 6)
    e_dec = ((got_dec - want_dec).abs().max() / want_dec.abs().max()).item()
    e_enc = ((got_enc - want_enc).abs().max() / want_enc.abs().max()).item()
    print(f"VAE {layout}: decode err/scale {e_dec:.1e}, encode err/scale {e_enc:.1e}")
    assert e_dec <= 1e-4 and e_enc <= 1e-4


def test_decode_frames_is_comfy_image(files, latents):
    vae = load_vae(files["original"])
    img = vae.decode_frames(latents)
    assert img.shape == (9, 32, 48, 3) and img.dtype == torch.float32 and img.device.type == "cpu"
    assert img.min() >= 0 and img.max() <= 1


def test_tiled_decode_close_to_whole(latents):
    vae = random_vae(base_dim=8, seed=1)
    z = torch.randn(1, 16, 2, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole, tiled = vae.decode(z), vae.decode(z, tile=8)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean().item() < 0.02  # seams differ a little; the picture does not


def test_channels_last_decode_equals_contiguous(latents):
    """The GPU decode runs channels-last (one-copy causal padding, interleaved time upsampling);
    the same code on CPU in that layout gives the contiguous result."""
    vae = random_vae(base_dim=8, seed=2)
    with torch.no_grad():
        want = vae.decode(latents)
        vae._decoder_channels_last()
        got = vae.decode(latents.contiguous(memory_format=torch.channels_last_3d))
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA")
def test_fused_norm_decode_equals_torch_path(latents):
    """The CUDA decode (channels-last, each RMSNorm+SiLU one Triton pass) against the same decode
    with the norms on their torch math (tests/test_ops.py checks the kernel alone)."""
    from fastvideo_nodes.ops import fused
    from fastvideo_nodes.ops.triton_kernels import triton_available
    if not triton_available():
        pytest.skip("the Triton kernel needs Triton")
    vae = random_vae(base_dim=8, seed=2).cuda()
    z = latents.cuda()
    # TF32 convolutions (cuDNN's default) pick other algorithms for channels-last and differ by ~1e-3:
    # full fp32 convs leave only the norm implementation to compare.
    with torch.no_grad(), pytest.MonkeyPatch.context() as tf32:
        tf32.setattr(torch.backends.cudnn, "allow_tf32", False)
        assert fused.rms_norm_channels_impl(z.contiguous(memory_format=torch.channels_last_3d)) == "triton"
        got = vae.decode(z)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused, "_cuda", lambda x: False)
            want = vae.decode(z)
        assert got.shape == want.shape == (1, 3, 9, 32, 48)
        assert (got - want).abs().max().item() < 1e-4


def test_normalisation_matches_diffusers_convention(ref):
    z = torch.randn(1, 16, 2, 3, 3)
    mean = torch.tensor(ref.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.allclose(model_to_raw(z), z / inv_std + mean, atol=1e-6)  # what WanPipeline does before decode
    assert torch.allclose(raw_to_model(model_to_raw(z)), z, atol=1e-5)
    assert list(ref.config.latents_mean) == LATENT_MEAN and list(ref.config.latents_std) == LATENT_STD


@pytest.mark.parametrize("tensors,needle", [
    ({"decoder.middle.0.residual.0.gamma": (4,), "decoder.upsamples.0.upsamples.0.residual.2.weight": (4,)},
     "the file has no encoder"),  # a Wan 2.2 VAE (supported) with only a decoder
    ({"head.modulation": (1, 2, 4)}, "diffusion model"),
    ({"shared.weight": (10, 4)}, "text encoder"),
    ({"first_stage_model.decoder.conv_in.weight": (4,), "model.diffusion_model.input_blocks.0.0.weight": (4,)},
     "Stable Diffusion"),
])
def test_wrong_kind_of_file(tmp_path, tensors, needle):
    p = str(tmp_path / "v.safetensors")
    save_file({k: torch.zeros(v) for k, v in tensors.items()}, p)
    with pytest.raises(ModelFileError, match=needle):
        load_vae(p)


def test_missing_truncated_pickle(files, tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_vae(str(tmp_path / "none.safetensors"))
    data = open(files["original"], "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[:1000])
    with pytest.raises(ModelFileError, match="truncated"):
        load_vae(str(tmp_path / "cut.safetensors"))
    (tmp_path / "vae.pt").write_bytes(b"\x80\x02")
    with pytest.raises(ModelFileError, match="pickle"):
        load_vae(str(tmp_path / "vae.pt"))
