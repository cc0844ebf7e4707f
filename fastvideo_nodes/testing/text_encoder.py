"""Tiny random UMT5 encoders in the real file layouts (ComfyUI single files, diffusers folder)."""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import save_file

from .dit import quantize_fp8, randomize_
from .tokenizer import VOCAB_SIZE, spiece_model


def random_umt5(d_model: int = 32, seed: int = 0, *, d_kv: int | None = None, d_ff: int | None = None):
    """transformers UMT5EncoderModel, 2 layers, 4 heads (of d_model/4 unless d_kv), seeded random weights (fp32).
    A small d_kv/d_ff with d_model 4096 gives the real output width at a tiny size (ComfyUI's native Wan
    model reads 4096-wide text)."""
    from transformers import UMT5Config, UMT5EncoderModel
    fields: dict[str, Any] = dict(vocab_size=VOCAB_SIZE, d_model=d_model, d_kv=d_kv or d_model // 4,
                                  d_ff=d_ff or 2 * d_model, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=32,
                                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=False)
    cfg = UMT5Config(**fields)
    torch.manual_seed(seed)
    model = UMT5EncoderModel(cfg).eval()
    return randomize_(model, seed, scale=0.3)


def _state_dict(model) -> dict:
    # ComfyUI's files carry the embedding once, as `shared.weight`.
    return {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def save_comfy(model, path: str, *, dtype=torch.float16, scaled_fp8: bool = False) -> str:
    """ComfyUI single file with the tokenizer embedded as the uint8 tensor `spiece_model`."""
    sd = _state_dict(model)
    sd = quantize_fp8(sd, scaled=True) if scaled_fp8 else {k: v.to(dtype) for k, v in sd.items()}
    sd["spiece_model"] = torch.frombuffer(bytearray(spiece_model()[1]), dtype=torch.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def save_tokenizer(folder: str) -> str:
    """A diffusers `tokenizer/` folder: the tiny sentencepiece model and a T5Tokenizer config."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(spiece_model()[1])
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512}, f)
    return folder


def save_diffusers(model, root: str) -> str:
    """root/text_encoder (save_pretrained) and root/tokenizer (spiece.model + config)."""
    model.save_pretrained(os.path.join(root, "text_encoder"))
    save_tokenizer(os.path.join(root, "tokenizer"))
    return root
