"""Load the UMT5 text encoder from a ComfyUI single file or a diffusers folder.

ComfyUI files use HF-style names, fp16/bf16/fp32 or scaled fp8, and carry the sentencepiece model
as the uint8 tensor `spiece_model`; diffusers folders have `text_encoder/` + `tokenizer/`.
"""
from __future__ import annotations

import json
import os

import torch

from ..errors import ModelFileError
from ..models.text_encoder import SentencePieceTokenizer, TextEncoder
from ..ops.linear import FP8_DTYPES, Linear
from . import detect
from .files import all_keys, iter_tensors, open_safetensors, shard_files

ROLE = "Text encoder"


def _config_from_shapes(shapes: dict[str, tuple]):
    from transformers import UMT5Config
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block."))
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    vocab, d_model = shapes["shared.weight"] if "shared.weight" in shapes else shapes["encoder.embed_tokens.weight"]
    return UMT5Config(vocab_size=vocab, d_model=d_model, num_layers=layers, num_heads=heads,
                      d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
                      d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
                      relative_attention_num_buckets=buckets, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, is_encoder_decoder=False)


def _locate(path: str):
    """(weight files, config dict or None, tokenizer folder or None)."""
    if not os.path.exists(path):
        raise ModelFileError(f"{ROLE}: {path!r} does not exist. Give a UMT5 .safetensors file "
                             "(e.g. umt5_xxl_fp16.safetensors) or a diffusers Wan folder.")
    if not os.path.isdir(path):
        return [path], None, None
    folder = os.path.join(path, "text_encoder") if os.path.isdir(os.path.join(path, "text_encoder")) else path
    tok = os.path.join(os.path.dirname(folder), "tokenizer")
    cfg = os.path.join(folder, "config.json")
    if not os.path.exists(cfg):
        raise ModelFileError(f"{ROLE}: {path!r} has no text_encoder/config.json; expected a diffusers Wan folder "
                             "or a UMT5 .safetensors file.")
    if not os.path.isdir(tok):
        raise ModelFileError(f"{ROLE}: {path!r} has no tokenizer/ folder next to text_encoder/.")
    with open(cfg) as f:
        return shard_files(folder, ROLE, "model"), json.load(f), tok


def _use_our_linears(model) -> None:
    """Swap the encoder's nn.Linear layers for ops.Linear (same names, same math when not fp8)."""
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(mod, child_name, Linear(child.in_features, child.out_features, bias=child.bias is not None))


def load_text_encoder(path: str, *, device="cpu", dtype: torch.dtype = torch.float32,
                      weight_dtype: torch.dtype | None = None) -> TextEncoder:
    """Load a UMT5 encoder and its tokenizer, one tensor at a time (no second copy in RAM).

    fp8 linear weights (plain or ComfyUI scaled fp8) stay fp8 in memory and are dequantised at
    use, so umt5_xxl_fp8_e4m3fn_scaled takes about half the memory of fp16. weight_dtype (e.g.
    torch.float8_e4m3fn) stores the linear weights of a higher-precision file that way too.
    """
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    files, config, tok_dir = _locate(os.fspath(path))
    header = all_keys(files, ROLE)
    detect.expect_kind(header, ("umt5",), ROLE, path)
    prefix, names = detect.strip_prefix(header)
    name = lambda n: n[len(prefix):] if prefix and n.startswith(prefix) else n
    shapes = {name(k): tuple(v["shape"]) for k, v in header.items()}

    if config is not None:
        cfg = UMT5Config(**{k: v for k, v in config.items() if not k.startswith("_")})
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    else:
        if "spiece_model" not in shapes:
            raise ModelFileError(f"{ROLE}: {os.path.basename(path)!r} has no embedded tokenizer (`spiece_model`). "
                                 "Use a file that carries it (the Comfy-Org umt5_xxl_fp16.safetensors or "
                                 "umt5_xxl_fp8_e4m3fn_scaled.safetensors) or a diffusers folder with tokenizer/.")
        cfg = _config_from_shapes(shapes)
        tokenizer = None

    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
        _use_our_linears(model)  # fp8 weights can then stay fp8, dequantised at use
    expected = dict(model.named_parameters())
    scales = {}  # scaled fp8: scales may come after their weights in the file, so read them first
    for p in files:
        with open_safetensors(p, ROLE) as f:
            for k in f.keys():
                if k.endswith(".scale_weight"):
                    scales[name(k)[: -len("scale_weight")] + "weight"] = f.get_tensor(k).float()

    seen = set()
    for k, t in iter_tensors(files, ROLE):
        k = name(k)
        if k == "spiece_model":
            tokenizer = SentencePieceTokenizer(t.numpy().tobytes())
            continue
        if k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8" or k not in expected:
            if k not in expected and not k.endswith((".scale_weight", ".scale_input")) and k != "scaled_fp8":
                raise ModelFileError(f"{ROLE}: unexpected tensor {k!r} in {os.path.basename(path)!r}; "
                                     "it does not look like a UMT5 encoder.")
            continue
        mod_name, _, attr = k.rpartition(".")
        owner = model.get_submodule(mod_name)
        # transformers casts the FFN input to `wo.weight.dtype`, so that one layer is stored dequantised.
        keep_fp8 = (isinstance(owner, Linear) and attr == "weight" and not mod_name.endswith(".wo")
                    and (t.dtype in FP8_DTYPES or weight_dtype is not None))
        if keep_fp8:
            t = t if t.dtype in FP8_DTYPES else t.to(dtype).to(weight_dtype)
            if k in scales:
                owner.scale_weight = scales[k].to(device)
        elif k in scales:
            t = (t.float() * scales[k]).to(dtype)
        else:
            t = t.to(dtype) if t.is_floating_point() else t
        setattr(owner, attr, torch.nn.Parameter(t.to(device=device), requires_grad=False))
        seen.add(k)
    # The token embedding is shared between `shared` and `encoder.embed_tokens`; files may store either.
    for a, b in (("shared.weight", "encoder.embed_tokens.weight"), ("encoder.embed_tokens.weight", "shared.weight")):
        if a in seen and b not in seen:
            model.get_submodule(b.rpartition(".")[0]).weight = model.get_submodule(a.rpartition(".")[0]).weight
            seen.add(b)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ModelFileError(f"{ROLE}: {os.path.basename(path)!r} lacks {len(missing)} tensors, e.g. {missing[:3]}.")
    return TextEncoder(model.eval().requires_grad_(False), tokenizer)
