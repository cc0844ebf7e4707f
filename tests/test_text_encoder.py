"""UMT5 loading and prompt encoding equal transformers + the tokenizer, as diffusers' WanPipeline uses them."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvideo_nodes.errors import ModelFileError
from fastvideo_nodes.loading.text_encoder import load_text_encoder
from fastvideo_nodes.models.text_encoder import DEFAULT_NEGATIVE_PROMPT, clean_prompt
from fastvideo_nodes.testing.text_encoder import random_umt5, save_comfy, save_diffusers

PROMPTS = ["a small red boat drifting on a calm lake", "  the  fox &amp; the cat\n", DEFAULT_NEGATIVE_PROMPT]


@pytest.fixture(scope="module")
def umt5():
    return random_umt5(seed=2)


@pytest.fixture(scope="module")
def files(umt5, tmp_path_factory):
    d = tmp_path_factory.mktemp("te")
    return {"folder": save_diffusers(umt5, str(d / "folder")),
            "fp32": save_comfy(umt5, str(d / "umt5_fp32.safetensors"), dtype=torch.float32),
            "fp16": save_comfy(umt5, str(d / "umt5_fp16.safetensors")),
            "scaled": save_comfy(umt5, str(d / "umt5_fp8_scaled.safetensors"), scaled_fp8=True),
            "dir": d}


def oracle(model, folder, prompts):
    """diffusers' WanPipeline prompt encoding, run on the same weights and tokenizer."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import AutoTokenizer
    pipe = diffusers.WanPipeline(tokenizer=AutoTokenizer.from_pretrained(f"{folder}/tokenizer"), text_encoder=model,
                                 transformer=None, vae=None, scheduler=None)
    with torch.no_grad():
        return pipe._get_t5_prompt_embeds(prompts, max_sequence_length=512, device=torch.device("cpu"),
                                          dtype=torch.float32)


@pytest.mark.parametrize("layout", ["folder", "fp32"])
def test_embeddings_equal_diffusers_pipeline(umt5, files, layout):
    want = oracle(umt5, files["folder"], PROMPTS)
    got = load_text_encoder(files[layout]).encode(PROMPTS)
    assert got.shape == (3, 512, 32) and got.dtype == torch.float32
    err = (got - want).abs().max().item()
    print(f"UMT5 {layout}: max abs err {err:.2e} (scale {want.abs().max():.2f})")
    assert err <= 1e-5
    n = [int((row.abs().sum(-1) > 0).sum()) for row in got]
    assert len(set(n)) == 3 and all(0 < k < 512 for k in n)  # different lengths, zeros past each


def test_fp16_file_equals_rounded_weights(umt5, files):
    rounded = random_umt5(seed=2)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    want = oracle(rounded, files["folder"], PROMPTS[:1])
    assert (load_text_encoder(files["fp16"]).encode(PROMPTS[:1]) - want).abs().max().item() <= 1e-5


def test_scaled_fp8_equals_manual_dequant(files, tmp_path):
    sd = load_file(files["scaled"])
    assert sd["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == torch.float8_e4m3fn
    plain = {}
    for k, v in sd.items():
        if k.endswith("scale_weight") or k == "scaled_fp8":
            continue
        s = sd.get(k[: -len("weight")] + "scale_weight")
        plain[k] = v if k == "spiece_model" else (v.float() * s if s is not None else v.float())
    p = str(tmp_path / "dequant.safetensors")
    save_file(plain, p)
    enc = load_text_encoder(files["scaled"])
    q = enc.model.encoder.block[0].layer[0].SelfAttention.q
    assert q.weight.dtype == torch.float8_e4m3fn and q.scale_weight is not None  # stays fp8 in memory
    a = enc.encode(PROMPTS[:2])
    b = load_text_encoder(p).encode(PROMPTS[:2])
    assert torch.equal(a, b)


def test_long_prompt_truncates_to_512(files):
    enc = load_text_encoder(files["fp32"])
    out = enc.encode([" ".join(["fox"] * 2000)])
    assert out.shape == (1, 512, 32) and bool((out[0].abs().sum(-1) > 0).all())


def test_clean_prompt():
    assert clean_prompt("  a &amp;amp; b \n\t c ") == "a & b c"


def test_single_file_without_tokenizer(files, tmp_path):
    sd = load_file(files["fp16"])
    del sd["spiece_model"]
    p = str(tmp_path / "umt5_notok.safetensors")
    save_file(sd, p)
    with pytest.raises(ModelFileError, match="no embedded tokenizer .*umt5_xxl_fp16.safetensors"):
        load_text_encoder(p)


@pytest.mark.parametrize("tensors,needle", [
    ({"decoder.middle.0.residual.0.gamma": (4,)}, "Wan2.1 VAE"),
    ({"head.modulation": (1, 2, 4), "patch_embedding.weight": (4, 16, 1, 2, 2)}, "diffusion model"),
    ({"first_stage_model.decoder.conv_in.weight": (4,), "model.diffusion_model.input_blocks.0.0.weight": (4,)},
     "Stable Diffusion"),
])
def test_wrong_kind_of_file(tmp_path, tensors, needle):
    p = str(tmp_path / "wrong.safetensors")
    save_file({k: torch.zeros(v) for k, v in tensors.items()}, p)
    with pytest.raises(ModelFileError, match=needle):
        load_text_encoder(p)


def test_missing_truncated_and_pickle(files, tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_text_encoder(str(tmp_path / "none.safetensors"))
    data = open(files["fp16"], "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError, match="truncated"):
        load_text_encoder(str(cut))
    pt = tmp_path / "umt5.bin"
    pt.write_bytes(b"\x80\x02")
    with pytest.raises(ModelFileError, match="pickle"):
        load_text_encoder(str(pt))


def test_embedded_tokenizer_equals_transformers(files):
    """The single-file tokenizer (plain sentencepiece) gives the ids transformers' T5 tokenizer gives."""
    from transformers import AutoTokenizer

    from fastvideo_nodes.models.text_encoder import SentencePieceTokenizer
    from fastvideo_nodes.testing.tokenizer import spiece_model
    hf = AutoTokenizer.from_pretrained(f"{files['folder']}/tokenizer")
    ours = SentencePieceTokenizer(spiece_model()[1])
    texts = ["a small red boat", "Über-fast ☃ video, 3 cats!", " ".join(["fox"] * 700), ""]
    a = hf(texts, padding="max_length", max_length=512, truncation=True, return_attention_mask=True,
           return_tensors="pt")
    b = ours(texts, max_length=512)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
