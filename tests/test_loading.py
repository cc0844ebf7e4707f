"""The one loading path: locate(), the shared fp8 policy, and every broken file refused with a
one-line ModelFileError before tensor data is read or a model is built (issue 19)."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvideo_nodes.errors import ModelFileError
from fastvideo_nodes.loading import files as loading_files
from fastvideo_nodes.loading.dit import load_dit, read_dit_config
from fastvideo_nodes.loading.locate import locate
from fastvideo_nodes.loading.text_encoder import load_text_encoder
from fastvideo_nodes.loading.vae import load_vae
from fastvideo_nodes.ops.linear import Linear
from fastvideo_nodes.testing.dit import TINY_DIT, random_dit, save_original
from fastvideo_nodes.testing.text_encoder import random_umt5, save_comfy, save_diffusers
from fastvideo_nodes.testing.vae import random_vae
from fastvideo_nodes.testing.vae import save_original as save_vae

PROMPTS = ["a small red boat drifting on a calm lake", "the fox and the cat at sunset"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny DiT / VAE / UMT5 as single files and as a diffusers-style folder (our own models, no diffusers)."""
    d = tmp_path_factory.mktemp("loading")
    dit_sd = random_dit(TINY_DIT, seed=3).state_dict()
    umt5 = random_umt5(seed=5)
    root = d / "wan"
    (root / "transformer").mkdir(parents=True)
    names = sorted(dit_sd)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: dit_sd[k].contiguous() for k in keys}, str(root / "transformer" / shard))
    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: s for s, keys in halves.items() for k in keys}}))
    (root / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "WanTransformer3DModel", "num_attention_heads": TINY_DIT.num_heads,
         "attention_head_dim": TINY_DIT.head_dim}))
    save_diffusers(umt5, str(root))
    return {
        "dir": d, "root": str(root), "umt5": umt5,
        "dit": save_original(dit_sd, str(d / "dit.safetensors"), dtype=None),
        "vae": save_vae(random_vae(seed=4).state_dict(), str(d / "vae.safetensors")),
        "te": save_comfy(umt5, str(d / "umt5.safetensors"), dtype=torch.float32),
    }


@pytest.fixture
def no_data_read(monkeypatch):
    """Fails the test if any tensor data is opened (safe_open is only used to read data)."""
    def refuse(*a, **k):
        raise AssertionError("tensor data was read before the error")
    monkeypatch.setattr(loading_files, "safe_open", refuse)


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def write_raw(path, header, data: bytes = b"") -> str:
    """A safetensors file with an arbitrary JSON header (to forge broken ones)."""
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)
    return str(path)


def edited(src: str, dst, drop=(), add=None) -> str:
    sd = load_file(src)
    sd = {k: v for k, v in sd.items() if not any(k.startswith(p) for p in drop)}
    sd.update(add or {})
    save_file(sd, str(dst))
    return str(dst)


# ----------------------------------------------------------------------------- locate

def test_locate_single_file_root_and_component_folder(tiny):
    single = locate(tiny["dit"], "transformer")
    assert single.files == [tiny["dit"]] and single.config is None and single.folder is None
    root = locate(tiny["root"], "transformer")
    comp = locate(os.path.join(tiny["root"], "transformer"), "transformer")
    assert root == comp and [os.path.basename(f) for f in root.files] == ["a.safetensors", "b.safetensors"]
    assert root.config["num_attention_heads"] == TINY_DIT.num_heads
    te = locate(tiny["root"], "text_encoder")
    assert te.tokenizer == os.path.join(tiny["root"], "tokenizer") and te.config["d_model"] == 32
    assert locate(os.path.join(tiny["root"], "text_encoder"), "text_encoder") == te


def test_sharded_folder_loads_like_the_single_file(tiny):
    a, b = load_dit(tiny["root"]), load_dit(tiny["dit"])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ----------------------------------------------------------------------------- one fp8 policy

def test_fp8_storage_is_per_channel_for_the_text_encoder_too(tiny, tmp_path):
    """Asked-for fp8 on UMT5 stores e4m3fn with one scale per output channel (not a plain cast).
    With Linear weights of a real model's size (std ~0.015, where a plain cast loses bits to fp8's
    subnormals) the embeddings stay within 1e-3 relative L2 of fp32 and at most 0.8x the error a
    plain cast gives (measured: 5.4e-4 against 7.8e-4)."""
    umt5 = random_umt5(seed=5)
    with torch.no_grad():
        for m in umt5.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(0.05)  # std 0.3 -> 0.015
    p = save_comfy(umt5, str(tmp_path / "umt5_small.safetensors"), dtype=torch.float32)
    want = load_text_encoder(p).encode(PROMPTS)
    fp8 = load_text_encoder(p, weight_dtype=torch.float8_e4m3fn)
    q = fp8.model.encoder.block[0].layer[0].SelfAttention.q
    assert q.weight.dtype == torch.float8_e4m3fn and q.scale_weight.shape == (q.out_features, 1)
    wo = fp8.model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight.dtype == torch.float32 and wo.scale_weight is None  # kept dequantised
    got = fp8.encode(PROMPTS)

    plain = load_text_encoder(p)  # the same layers, weights plainly cast to fp8 without a scale
    for name, m in plain.model.named_modules():
        if isinstance(m, Linear) and not name.endswith(".wo"):
            m.weight = torch.nn.Parameter(m.weight.to(torch.float8_e4m3fn), requires_grad=False)
    cast = plain.encode(PROMPTS)
    rel = lambda a: ((a - want).norm() / want.norm()).item()
    print(f"UMT5 fp8 rel. L2 err: per-channel {rel(got):.2e}, plain cast {rel(cast):.2e}")
    assert rel(got) < 1e-3 and rel(got) <= 0.8 * rel(cast)


def test_scaled_fp8_file_keeps_its_per_tensor_scales(tiny, tmp_path):
    p = save_comfy(tiny["umt5"], str(tmp_path / "scaled.safetensors"), scaled_fp8=True)
    enc = load_text_encoder(p, weight_dtype=torch.float8_e4m3fn)
    q = enc.model.encoder.block[0].layer[0].SelfAttention.q
    assert q.weight.dtype == torch.float8_e4m3fn and q.scale_weight.numel() == 1
    assert enc.model.shared.weight.dtype == torch.float32  # an embedding is dequantised, not kept fp8


def test_fp8_storage_policy_same_for_the_dit(tiny):
    m = load_dit(tiny["dit"], weight_dtype=torch.float8_e4m3fn)
    q = m.blocks[0].self_attn.q
    assert q.weight.dtype == torch.float8_e4m3fn and q.scale_weight.shape == (q.out_features, 1)


# ----------------------------------------------------------------------------- broken headers

@pytest.mark.parametrize("header,needle", [
    ([1, 2, 3], "JSON list, not an object"),
    ({"a.weight": {"shape": [2], "data_offsets": [0, 8]}}, "lacks dtype/shape/data_offsets"),
    ({"a.weight": {"dtype": "F32", "data_offsets": [0, 8]}}, "lacks dtype/shape/data_offsets"),
    ({"a.weight": {"dtype": "F32", "shape": [2]}}, "lacks dtype/shape/data_offsets"),
    ({"a.weight": {"dtype": "F32", "shape": [2], "data_offsets": "0-8"}}, "data_offsets"),
    ({"a.weight": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, "not a list of sizes"),
    ({"a.weight": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype"),
    ({"a.weight": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 8]}}, "needs 40000000000 bytes"),
    ({"a.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {}}, "header describes"),
])
@pytest.mark.parametrize("loader", [load_dit, load_vae, load_text_encoder])
def test_malformed_header(tmp_path, no_data_read, header, needle, loader):
    p = write_raw(tmp_path / "bad.safetensors", header, b"\0" * (8 if needle != "header describes" else 4))
    with pytest.raises(ModelFileError, match=needle) as e:
        loader(p)
    assert "bad.safetensors" in one_line(e)


def test_absurd_layer_index_refused_before_building(tiny, tmp_path, no_data_read, monkeypatch):
    import fastvideo_nodes.loading.dit as dit_loader
    monkeypatch.setattr(dit_loader, "WanDiT", lambda cfg: pytest.fail("a model was built"))
    q = load_file(tiny["dit"])["blocks.0.self_attn.q.weight"]
    p = edited(tiny["dit"], tmp_path / "huge.safetensors", add={"blocks.100000000.self_attn.q.weight": q})
    with pytest.raises(ModelFileError, match="names layer 100000000 but has no layer 2") as e:
        load_dit(p)
    assert "huge.safetensors" in one_line(e)
    with pytest.raises(ModelFileError, match="names layer 100000000"):
        read_dit_config(p)


def test_absurd_layer_count_in_umt5_refused(tiny, tmp_path, no_data_read):
    k = load_file(tiny["te"])["encoder.block.0.layer.0.layer_norm.weight"]
    far = "encoder.block.100000000.layer.0.layer_norm.weight"
    p = edited(tiny["te"], tmp_path / "huge_te.safetensors", add={far: k})
    with pytest.raises(ModelFileError, match="names layer 100000000") as e:
        load_text_encoder(p)
    one_line(e)


def test_absurd_sizes_refused(tiny, tmp_path, no_data_read):
    """Many contiguous layers in a small file, and absurd head counts in config.json."""
    layer = {k: v for k, v in load_file(tiny["dit"]).items() if k.startswith("blocks.1.")}
    many = {k.replace("blocks.1.", f"blocks.{i}."): v.clone() for i in range(2, 1100) for k, v in layer.items()
            if k.endswith("modulation")}
    p = edited(tiny["dit"], tmp_path / "many.safetensors", add=many)
    with pytest.raises(ModelFileError, match="layers = 1100; expected a whole number from 1 to 1024"):
        load_dit(p)
    folder = tmp_path / "heads" / "transformer"
    folder.mkdir(parents=True)
    os.link(tiny["dit"], folder / "diffusion_pytorch_model.safetensors")
    for heads in (10**9, "2", 0):
        (folder / "config.json").write_text(json.dumps({"num_attention_heads": heads}))
        with pytest.raises(ModelFileError, match=r"config.json: the architecture read from the file has heads") as e:
            load_dit(str(tmp_path / "heads"))
        one_line(e)


def test_umt5_config_json_with_absurd_layers(tiny, tmp_path, no_data_read):
    cfg = json.load(open(os.path.join(tiny["root"], "text_encoder", "config.json")))
    with pytest.raises(ModelFileError, match="layers = 100000000"):
        load_text_encoder(_te_config_folder(tiny, tmp_path, {**cfg, "num_layers": 100000000}))


def _te_config_folder(tiny, tmp_path, config: dict) -> str:
    """The tiny diffusers text encoder with another config.json."""
    root = tmp_path / "te_cfg"
    (root / "text_encoder").mkdir(parents=True)
    os.symlink(os.path.join(tiny["root"], "tokenizer"), root / "tokenizer")
    weights = os.path.join(tiny["root"], "text_encoder", "model.safetensors")
    os.link(weights, root / "text_encoder" / "model.safetensors")
    (root / "text_encoder" / "config.json").write_text(json.dumps(config))
    return str(root)


# ----------------------------------------------------------------------------- missing parts, wrong dtypes

def test_decoder_only_vae_says_encoder_missing(tiny, tmp_path, no_data_read):
    p = edited(tiny["vae"], tmp_path / "decoder_only.safetensors", drop=("encoder.", "conv1."))
    with pytest.raises(ModelFileError, match="has no encoder") as e:
        load_vae(p)
    assert "decoder_only.safetensors" in one_line(e)


def test_vae_missing_one_half_block_named(tiny, tmp_path, no_data_read):
    p = edited(tiny["vae"], tmp_path / "partial.safetensors", drop=("decoder.upsamples.3.",))
    with pytest.raises(ModelFileError, match=r"lacks \d+ tensors of: decoder \(\d+\)"):
        load_vae(p)


def test_dit_without_head_says_head_missing(tiny, tmp_path, no_data_read):
    p = edited(tiny["dit"], tmp_path / "headless.safetensors", drop=("head.",))
    with pytest.raises(ModelFileError, match=r"lacks the output head \(head.head\)") as e:
        load_dit(p)
    assert "headless.safetensors" in one_line(e)
    p = edited(tiny["dit"], tmp_path / "no_mod.safetensors", drop=("head.modulation",))
    with pytest.raises(ModelFileError, match=r"lacks 1 tensors of: head \(1\)"):
        load_dit(p)


def test_dit_missing_a_block_part_named(tiny, tmp_path, no_data_read):
    p = edited(tiny["dit"], tmp_path / "no_ffn.safetensors", drop=("blocks.1.ffn.",))
    with pytest.raises(ModelFileError, match=r"blocks.1 \(4\).*blocks.1.ffn.0.bias"):
        load_dit(p)


@pytest.mark.parametrize("which", ["dit", "vae", "te"])
def test_integer_weights_refused(tiny, tmp_path, no_data_read, which):
    sd = load_file(tiny[which])
    name = {"dit": "blocks.0.self_attn.q.weight", "vae": "decoder.conv1.weight",
            "te": "encoder.block.0.layer.0.SelfAttention.q.weight"}[which]
    p = edited(tiny[which], tmp_path / "int.safetensors", add={name: sd[name].to(torch.int32)})
    loader = {"dit": load_dit, "vae": load_vae, "te": load_text_encoder}[which]
    with pytest.raises(ModelFileError, match=f"{name}' is stored as I32; a float type") as e:
        loader(p)
    assert "int.safetensors" in one_line(e)


# ----------------------------------------------------------------------------- tokenizers

def test_corrupt_embedded_tokenizer(tiny, tmp_path):
    bad = torch.frombuffer(bytearray(b"not a sentencepiece model" * 10), dtype=torch.uint8)
    p = edited(tiny["te"], tmp_path / "badtok.safetensors", add={"spiece_model": bad})
    with pytest.raises(ModelFileError, match="embedded tokenizer .* is corrupt") as e:
        load_text_encoder(p)
    assert "badtok.safetensors" in one_line(e)


def _te_folder(tiny, tmp_path, tokenizer_files: dict) -> str:
    root = tmp_path / "wan_te"
    (root / "tokenizer").mkdir(parents=True)
    os.symlink(os.path.join(tiny["root"], "text_encoder"), root / "text_encoder")
    for name, data in tokenizer_files.items():
        (root / "tokenizer" / name).write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return str(root)


def test_empty_or_incomplete_tokenizer_folder(tiny, tmp_path, no_data_read):
    root = _te_folder(tiny, tmp_path, {})
    with pytest.raises(ModelFileError, match="tokenizer.* is empty or incomplete: it has neither spiece.model") as e:
        load_text_encoder(root)
    assert "sentencepiece" not in one_line(e).replace("spiece.model", "")
    (tmp_path / "wan_te" / "tokenizer" / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer"}')
    with pytest.raises(ModelFileError, match="empty or incomplete"):
        load_text_encoder(root)


def test_corrupt_folder_tokenizer(tiny, tmp_path, no_data_read):
    root = _te_folder(tiny, tmp_path, {"spiece.model": b"garbage" * 20,
                                       "tokenizer_config.json": {"tokenizer_class": "T5Tokenizer"}})
    with pytest.raises(ModelFileError, match="could not be loaded") as e:
        load_text_encoder(root)
    one_line(e)


@pytest.mark.parametrize("config,needle", [
    ({"tokenizer_class": "T5Tokenizer", "auto_map": {"AutoTokenizer": ["tok.MyTok", None]}}, "auto_map"),
    ({"tokenizer_class": "EvilTokenizer"}, "tokenizer_class 'EvilTokenizer'"),
])
def test_remote_code_tokenizer_refused(tiny, tmp_path, no_data_read, config, needle):
    spiece = open(os.path.join(tiny["root"], "tokenizer", "spiece.model"), "rb").read()
    root = _te_folder(tiny, tmp_path, {"spiece.model": spiece, "tokenizer_config.json": config,
                                       "tok.py": b"raise SystemExit('remote code ran')\n"})
    with pytest.raises(ModelFileError, match=f"asks for custom code \\({needle}.*refused") as e:
        load_text_encoder(root)
    one_line(e)


# ----------------------------------------------------------------------------- broken diffusers folders

def _dit_folder(tiny, tmp_path) -> str:
    folder = tmp_path / "wan_dit" / "transformer"
    folder.mkdir(parents=True)
    for name in os.listdir(os.path.join(tiny["root"], "transformer")):
        if name.endswith(".safetensors"):
            os.link(os.path.join(tiny["root"], "transformer", name), folder / name)
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": TINY_DIT.num_heads}))
    return str(folder)


@pytest.mark.parametrize("text,needle", [
    ('{"num_attention_heads": 2,', "is not valid JSON"),
    ("[2, 128]", "holds a JSON list; a model config must be a JSON object"),
])
def test_broken_config_json(tiny, tmp_path, no_data_read, text, needle):
    folder = _dit_folder(tiny, tmp_path)
    open(os.path.join(folder, "config.json"), "w").write(text)
    with pytest.raises(ModelFileError, match=needle) as e:
        load_dit(os.path.dirname(folder))
    assert "config.json" in one_line(e)


@pytest.mark.parametrize("index,needle", [
    ("{not json", "is not valid JSON"),
    ({"weight_map": ["a.safetensors"]}, 'no valid "weight_map"'),
    ({"weight_map": {"x.weight": 3}}, 'no valid "weight_map"'),
    ({"weight_map": {"x.weight": "a.safetensors", "y.weight": "c.safetensors"}},
     "names 1 shard.* not in .*'c.safetensors'; the download is incomplete"),
])
def test_broken_shard_index(tiny, tmp_path, no_data_read, index, needle):
    folder = _dit_folder(tiny, tmp_path)
    text = index if isinstance(index, str) else json.dumps(index)
    open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w").write(text)
    with pytest.raises(ModelFileError, match=needle) as e:
        load_dit(os.path.dirname(folder))
    one_line(e)


def test_umt5_config_json_wrong_types(tiny, tmp_path, no_data_read):
    with pytest.raises(ModelFileError, match="dim = '32'") as e:
        load_text_encoder(_te_config_folder(tiny, tmp_path, {"d_model": "32", "num_layers": 2}))
    one_line(e)


def test_tied_embedding_stored_under_either_name(tiny, tmp_path):
    """ComfyUI files store `shared.weight`; a file storing only `encoder.embed_tokens.weight` is the same model."""
    sd = load_file(tiny["te"])
    sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")
    p = str(tmp_path / "embed_tokens.safetensors")
    save_file(sd, p)
    a, b = load_text_encoder(tiny["te"]), load_text_encoder(p)
    assert b.model.encoder.embed_tokens.weight is b.model.shared.weight
    assert torch.equal(a.encode(PROMPTS), b.encode(PROMPTS))
