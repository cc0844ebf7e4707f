"""Load the UMT5 text encoder from a ComfyUI single file or a diffusers folder.

ComfyUI files use HF-style names, fp16/bf16/fp32 or scaled fp8, and carry the sentencepiece model
as the uint8 tensor `spiece_model`; diffusers folders have `text_encoder/` + `tokenizer/`.
Steps: locate → header → config (from shapes, or the folder's config.json; bounded) → tokenizer
(checked before any weight is read) → materialize with the UMT5 rules.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import ModelFileError
from ..models.text_encoder import SentencePieceTokenizer, TextEncoder
from ..ops.linear import Linear
from . import detect
from .bounds import bounded, layer_count, need
from .files import read_json
from .materialize import Rules, Source, check_header, materialize, open_component

ROLE = "Text encoder"
SPIECE = "spiece_model"
RULES = Rules(
    # transformers casts the FFN input to `wo.weight.dtype`, so that layer must not stay fp8.
    keep_dequantized=lambda n: n.endswith(".wo.weight"),
    extra=frozenset({SPIECE}),
    tied=(("shared.weight", "encoder.embed_tokens.weight"),),
)
# Tokenizer classes a diffusers Wan folder may name; anything else would mean code from the folder.
TOKENIZER_CLASSES = {None, "T5Tokenizer", "T5TokenizerFast"}
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")


def _config_from_shapes(shapes: dict[str, tuple], role: str):
    from transformers import UMT5Config
    layers = layer_count(shapes, r"^encoder\.block\.(\d+)\.", role)
    att = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = need(shapes, att + "relative_attention_bias.weight", role, "the relative attention bias")
    emb = shapes.get("shared.weight") or need(shapes, "encoder.embed_tokens.weight", role, "the token embedding")
    vocab, d_model = emb
    q, d_ff = need(shapes, att + "q.weight", role, "the attention of block 0")[0], \
        need(shapes, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", role, "the feed-forward of block 0")[0]
    bounded(role, vocab=vocab, dim=d_model, heads=heads, buckets=buckets, ffn=d_ff, layers=layers)
    if q % heads:
        raise ModelFileError(f"{role}: the attention width {q} does not divide into {heads} heads.")
    fields: dict[str, Any] = dict(vocab_size=vocab, d_model=d_model, num_layers=layers, num_heads=heads,
                                  d_kv=q // heads, d_ff=d_ff, relative_attention_num_buckets=buckets,
                                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=False)
    return UMT5Config(**fields)


def _config_from_json(config: dict, role: str):
    from transformers import UMT5Config
    role = f"{role} config.json"
    sizes = {"vocab_size": "vocab", "d_model": "dim", "num_layers": "layers", "num_heads": "heads", "d_kv": "head_dim",
             "d_ff": "ffn", "relative_attention_num_buckets": "buckets"}
    bounded(role, **{cap: config[key] for key, cap in sizes.items() if key in config})
    if "auto_map" in config:
        raise ModelFileError(f"{role} asks for custom code (auto_map); only the standard UMT5 encoder is loaded.")
    try:
        return UMT5Config(**{k: v for k, v in config.items() if not k.startswith("_")})
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{role} is not a valid UMT5 config ({e}).") from None


def _folder_tokenizer(folder: str, role: str):
    """transformers' tokenizer from a diffusers tokenizer/ folder, after checking that it is complete
    and asks for no code of its own (never trust_remote_code)."""
    from transformers import AutoTokenizer
    where = f"{role}: tokenizer folder {folder!r}"
    if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise ModelFileError(f"{where} is empty or incomplete: it has neither spiece.model nor tokenizer.json. "
                             "Copy the tokenizer/ folder of the diffusers Wan release again.")
    for name in ("tokenizer_config.json", "config.json"):
        p = os.path.join(folder, name)
        cfg = read_json(p, role, "a tokenizer config") if os.path.isfile(p) else {}
        cls = cfg.get("tokenizer_class")
        if "auto_map" in cfg or cls not in TOKENIZER_CLASSES:
            asked = "auto_map" if "auto_map" in cfg else f"tokenizer_class {cls!r}"
            raise ModelFileError(f"{where} asks for custom code ({asked} in {name}); it is refused, only the T5 "
                                 "tokenizer is loaded. Use the tokenizer/ folder of the diffusers Wan release.")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"{where} could not be loaded ({reason}); copy the tokenizer/ folder of the "
                             "diffusers Wan release again.") from None


def _embedded_tokenizer(source: Source, role: str) -> SentencePieceTokenizer:
    """The tokenizer a ComfyUI single file carries, read before any weight."""
    key = next((k for k in source.header if source.name(k) == SPIECE), None)
    if key is None:
        raise ModelFileError(f"{role} has no embedded tokenizer (`spiece_model`). "
                             "Use a file that carries it (the Comfy-Org umt5_xxl_fp16.safetensors or "
                             "umt5_xxl_fp8_e4m3fn_scaled.safetensors) or a diffusers folder with tokenizer/.")
    if source.header[key]["dtype"] != "U8" or len(source.header[key]["shape"]) != 1:
        raise ModelFileError(f"{role}: `spiece_model` is {source.header[key]['dtype']} "
                             f"{source.header[key]['shape']}; the embedded tokenizer must be a 1-D uint8 tensor.")
    (_, data), = source.tensors([key])
    try:
        return SentencePieceTokenizer(data.numpy().tobytes())
    except ValueError as e:
        raise ModelFileError(f"{role}: the embedded tokenizer (`spiece_model`) is corrupt ({e}); "
                             "download the file again.") from None


def _use_our_linears(model) -> None:
    """Swap the encoder's nn.Linear layers for ops.Linear (same names, same math when not fp8)."""
    for _, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(mod, child_name, Linear(child.in_features, child.out_features, bias=child.bias is not None))


def load_text_encoder(path: str, *, device="cpu", dtype: torch.dtype = torch.float32,
                      weight_dtype: torch.dtype | None = None) -> TextEncoder:
    """Load a UMT5 encoder and its tokenizer, one tensor at a time (no second copy in RAM).

    fp8 linear weights (plain or ComfyUI scaled fp8) stay fp8 in memory and are dequantised at
    use, so umt5_xxl_fp8_e4m3fn_scaled takes about half the memory of fp16. weight_dtype (e.g.
    torch.float8_e4m3fn) stores the linear weights of a higher-precision file that way too, with
    one scale per output channel (the policy every model shares).
    """
    from transformers import UMT5EncoderModel

    path = os.fspath(path)
    where, source, _ = open_component(path, "text_encoder", ROLE, ("umt5",))
    role = source.role
    source.prefix, _ = detect.strip_prefix(source.header)
    shapes = source.shapes(RULES)

    if where.config is not None:
        cfg = _config_from_json(where.config, role)
        layer_count(shapes, r"^encoder\.block\.(\d+)\.", role)
    else:
        cfg = _config_from_shapes(shapes, role)
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
        _use_our_linears(model)  # fp8 weights can then stay fp8, dequantised at use
    check_header(model, source, role=role, rules=RULES)  # the weights are right before the tokenizer is read
    if where.config is not None:
        assert where.tokenizer is not None  # locate() finds a diffusers folder's tokenizer or refuses it
        tokenizer = _folder_tokenizer(where.tokenizer, role)
    else:
        tokenizer = _embedded_tokenizer(source, role)
    materialize(model, source, role=role, dtype=dtype, device=device, rules=RULES, weight_dtype=weight_dtype)
    return TextEncoder(model, tokenizer)
